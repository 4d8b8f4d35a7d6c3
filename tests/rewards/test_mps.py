"""MPS: a tiny CLIP + fusion network in the published key layout, through the real loader, against the formula
re-derived here in plain torch (one image at a time, as the reference's inference function)."""

from __future__ import annotations

import argparse
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import mmalign
from mmalign.commands import convert as convert_command
from mmalign.errors import MMAlignError, StateDictMismatchError, UnsafeCheckpointError
from mmalign.hub import convert_pickle_to_safetensors
from mmalign.registry import REWARDS
from mmalign.rewards.mps import (
    CONDITIONS,
    OVERALL_CONDITION,
    POSITION_ID_KEYS,
    MPSReward,
    condition_keep,
    load_mps_state_dict,
)
from tests import tiny

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGE_SIZE = 64
PROJECTION = 128  # wide enough that unrelated tokens fall under the 0.3 mask threshold
PROMPTS = ["a red circle on the left", "two blue squares with hands", "a", "light and color of a face at night"]


def without_common_direction(clip, tok) -> torch.Tensor:
    ids = tok(PROMPTS + list(CONDITIONS.values()), padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = clip.text_model(input_ids=ids).last_hidden_state.flatten(0, 1)
        weight = clip.text_projection.weight
        u = F.normalize(F.normalize(hidden @ weight.T, dim=-1).mean(0), dim=0)
        return weight - torch.outer(u, u @ weight)


def make_clip_folder(folder):
    """config.json, the CLIP tokenizer files and a 64 px PIL image processor: what the MPS loader reads from
    ``processor``; returns the CLIPModel (random weights) and its tokenizer."""
    from transformers import AutoTokenizer, CLIPModel
    from transformers.models.clip import CLIPImageProcessorPil

    from mmalign.models.builders import clip_config
    from mmalign.tokenizers import write_clip_tokenizer

    torch.manual_seed(0)
    config = clip_config(
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        vision=dict(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=2,
            patch_size=16,
            image_size=IMAGE_SIZE,
        ),
        projection_dim=PROJECTION,
        logit_scale_init_value=4.6052,
    )
    config.save_pretrained(folder)
    write_clip_tokenizer(folder)
    size = {"shortest_edge": IMAGE_SIZE}, {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    CLIPImageProcessorPil(size=size[0], crop_size=size[1]).save_pretrained(folder)
    return CLIPModel(config).eval(), AutoTokenizer.from_pretrained(str(folder))


def tiny_state_dict(clip, tok) -> dict[str, torch.Tensor]:
    """The published module's state dict: ``model.*`` (a CLIPModel saved by transformers 4.27, with its
    ``position_ids`` buffers) and ``cross_model.layers.{i}.{0,1}.fn.*`` with random weights."""
    state = {f"model.{k}": v.clone() for k, v in clip.state_dict().items()}
    # A random text tower gives every token nearly the same feature direction, so every prompt token would be
    # close to some condition token and the mask would keep all 77. Projecting the common direction out of
    # ``text_projection`` (a weight edit of a random model) leaves token-specific features, as a trained tower.
    state["model.text_projection.weight"] = without_common_direction(clip, tok)
    n_vision = (IMAGE_SIZE // 16) ** 2 + 1
    state["model.vision_model.embeddings.position_ids"] = torch.arange(n_vision).expand(1, -1).clone()
    g = torch.Generator().manual_seed(1)
    dim, dim_head, heads, ff = PROJECTION, 8, 4, 2 * PROJECTION

    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    for i in range(2):
        c, s = f"cross_model.layers.{i}.0.fn.", f"cross_model.layers.{i}.1.fn."
        state.update(
            {
                c + "norm.weight": 1 + rand(dim),
                c + "norm.bias": torch.zeros(dim),
                c + "to_q.weight": rand(heads * dim_head, dim),
                c + "to_kv.weight": rand(2 * dim_head, dim),
                c + "to_out.weight": rand(dim, heads * dim_head),
                c + "ff.0.weight": rand(2 * ff, dim),
                c + "ff.2.weight": rand(dim, ff),
                s + "norm.weight": 1 + rand(dim),
                s + "norm.bias": torch.zeros(dim),
                s + "rotary_emb.inv_freq": 1.0 / 10000 ** (torch.arange(0, dim_head, 2).float() / dim_head),
                s + "fused_attn_ff_proj.weight": rand(heads * dim_head + 2 * dim_head + 2 * ff, dim),
                s + "attn_out.weight": rand(dim, heads * dim_head),
                s + "ff_out.1.weight": rand(dim, ff),
            }
        )
    return state


@pytest.fixture(scope="module")
def mps_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("mps")
    folder = root / "clip"
    towers = make_clip_folder(folder)
    state = tiny_state_dict(*towers)
    save_file(state, str(root / "MPS_overall_checkpoint.safetensors"))
    return root, folder, state, towers


@pytest.fixture(scope="module")
def mps(mps_files):
    root, folder, *_ = mps_files
    return mmalign.load_reward("mps", weights=str(root), processor=str(folder))


# -- the formula, re-derived ----------------------------------------------------------------------------------
def layer_norm(x, w):
    return F.layer_norm(x, x.shape[-1:], w, torch.zeros_like(w))


def swiglu(x):
    a, b = x.chunk(2, -1)
    return F.silu(b) * a


def rot(t, pos):
    """Rotary: the first and second halves of the head dimension rotated by the position angles."""
    half = t.shape[-1] // 2
    return t * pos.cos() + torch.cat([-t[..., half:], t[..., :half]], -1) * pos.sin()


def fusion(state, image, text, mask, layers=2, heads=4, dim_head=8):
    """``cross_modeling.Cross_model`` on one batch, written out with einsum."""
    x = image
    for i in range(layers):
        p = {k.split(f"layers.{i}.", 1)[1]: v for k, v in state.items() if f"cross_model.layers.{i}." in k}
        h = layer_norm(x, p["0.fn.norm.weight"])
        q = (h @ p["0.fn.to_q.weight"].T).unflatten(-1, (heads, dim_head)).permute(0, 2, 1, 3) * dim_head**-0.5
        k, v = (text @ p["0.fn.to_kv.weight"].T).split(dim_head, -1)
        attn = (torch.einsum("bhid,bjd->bhij", q, k) + mask[:, None]).softmax(-1)
        out = torch.einsum("bhij,bjd->bhid", attn, v).permute(0, 2, 1, 3).flatten(2)
        ff = swiglu(h @ p["0.fn.ff.0.weight"].T) @ p["0.fn.ff.2.weight"].T
        x = x + out @ p["0.fn.to_out.weight"].T + ff
        h = layer_norm(x, p["1.fn.norm.weight"])
        fused = h @ p["1.fn.fused_attn_ff_proj.weight"].T
        q, k, v, ff = fused.split([heads * dim_head, dim_head, dim_head, fused.shape[-1] - (heads + 2) * dim_head], -1)
        n = x.shape[1]
        freqs = torch.arange(n).float()[:, None] * (1.0 / 10000 ** (torch.arange(0, dim_head, 2).float() / dim_head))
        pos = torch.cat([freqs, freqs], -1)

        q = rot(q.unflatten(-1, (heads, dim_head)).permute(0, 2, 1, 3), pos) * dim_head**-0.5
        attn = torch.einsum("bhid,bjd->bhij", q, rot(k, pos)).softmax(-1)
        out = torch.einsum("bhij,bjd->bhid", attn, v).permute(0, 2, 1, 3).flatten(2)
        x = x + out @ p["1.fn.attn_out.weight"].T + swiglu(ff) @ p["1.fn.ff_out.1.weight"].T
    return x


def reference_score(towers, state, pixels, prompt, condition=OVERALL_CONDITION):
    """``eval_overall_mps_on_hpdv2.infer_one_sample`` on one image: all 77 text tokens, image tokens before the
    post-LayerNorm, mask = max over condition tokens / max, > 0.3; logit_scale.exp() * cos."""
    clip, tok = towers
    clip.load_state_dict({k: state[f"model.{k}"] for k in clip.state_dict()})  # the checkpoint's towers

    def text(s):
        ids = tok(s, max_length=77, padding="max_length", truncation=True, return_tensors="pt").input_ids
        out = clip.text_model(input_ids=ids)
        return out.last_hidden_state @ clip.text_projection.weight.T, out.pooler_output @ clip.text_projection.weight.T

    with torch.no_grad():
        text_f, eos = text(prompt)
        cond_f, _ = text(condition)
        image_f = clip.vision_model(pixel_values=pixels[None]).last_hidden_state @ clip.visual_projection.weight.T
        sim = torch.einsum("bid,bjd->bji", text_f, cond_f).max(dim=1, keepdim=True)[0]
        sim = sim / sim.max()
        mask = torch.where(sim > 0.3, 0.0, float("-inf")).repeat(1, image_f.shape[1], 1)
        fused = fusion(state, image_f, text_f, mask)[:, 0]
        return (clip.logit_scale.exp() * F.cosine_similarity(fused, eos))[0]


def test_scores_equal_the_formula(mps, mps_files, image_files):
    _, folder, state, towers = mps_files
    files = image_files[:3]
    ours = mps.score(files, PROMPTS[:3])
    pixels = mps.preprocess_reference_batch([mmalign.rewards.base.Reward._decode(f) for f in files])
    ref = torch.stack([reference_score(towers, state, px, p) for px, p in zip(pixels, PROMPTS[:3])])
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    aesthetics = mmalign.load_reward("mps-aesthetics", weights=str(mps_files[0]), processor=str(folder))
    torch.testing.assert_close(
        aesthetics.score(files[:1], PROMPTS[3]),
        reference_score(towers, state, pixels[0], PROMPTS[3], CONDITIONS["aesthetics"])[None],
        atol=1e-5,
        rtol=1e-5,
    )


def test_per_sample_normalisation_batch_equals_one_by_one(mps, image_files):
    batched = mps.score(image_files[:4], PROMPTS, batch_size=4)
    single = torch.cat([mps.score([f], [p]) for f, p in zip(image_files[:4], PROMPTS)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)
    # the reference's division by the batch's maximum would give these prompts other masks in a batch
    tokens, _ = mps.encode_text(PROMPTS)
    condition = mps.encode_text([OVERALL_CONDITION])[0].expand(len(PROMPTS), -1, -1)
    sim = torch.einsum("bld,bcd->blc", tokens, condition).amax(-1)
    assert not torch.equal(sim / sim.max() > 0.3, condition_keep(tokens, condition))


def test_tensor_path_is_differentiable_and_close(mps, image_files):
    image = mmalign.modalities.image.pil_to_tensor(tiny.random_image(3, (96, 80)))[None].requires_grad_(True)
    score = mps.score(image, PROMPTS[0])
    score.sum().backward()
    score = score.detach()
    assert image.grad is not None and image.grad.abs().sum() > 0
    from PIL import Image

    pil = Image.fromarray((image.detach()[0].permute(1, 2, 0) * 255).round().byte().numpy())
    assert abs(score.item() - float(mps.score([pil], PROMPTS[0]))) < 0.5  # resampling noise only (scale 100)


def test_dimensions_and_registry(mps, image_files):
    detailed = mps.score_detailed(image_files[:2], PROMPTS[2:])
    assert set(detailed) == {"overall", "aesthetics", "detail", "semantic"}
    torch.testing.assert_close(detailed["overall"], mps.score(image_files[:2], PROMPTS[2:]))
    # PROMPTS[3] opens with "light", as the overall and aesthetics conditions: their masks keep more tokens
    assert abs(detailed["aesthetics"][1] - detailed["detail"][1]) > 1e-3
    tokens, _ = mps.encode_text([PROMPTS[3]])
    keep = condition_keep(tokens, mps.encode_text([CONDITIONS["aesthetics"]])[0])
    assert 1 < int(keep.sum()) < 77
    for dim in ("aesthetics", "detail", "semantic"):  # built by the registry's defaults (one full load is enough:
        entry = REWARDS.entry(f"mps-{dim}")  # test_scores_equal_the_formula loads mps-aesthetics by name)
        assert entry.target == REWARDS.entry("mps").target and entry.defaults == {"dimension": dim}
        reward = MPSReward(mps.mps, mps.tokenizer, mps.image_processor, **entry.defaults)
        assert reward.condition == CONDITIONS[dim] and reward.info()["dimension"] == dim
        assert reward.name == f"mps-{dim}"
        torch.testing.assert_close(reward.score(image_files[:2], PROMPTS[2:]), detailed[dim])
    info = mps.info()
    assert info["reward"] == "mps" and info["modality"] == "image" and info["higher_is_better"] and info["scale"]


def test_key_mismatch_names_the_keys(mps_files, tmp_path):
    _, folder, state, *_ = mps_files
    bad = dict(state)
    del bad["cross_model.layers.1.0.fn.to_out.weight"]
    bad["cross_model.extra.weight"] = torch.zeros(1)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(StateDictMismatchError) as info:
        mmalign.load_reward("mps", weights=str(tmp_path / "bad.safetensors"), processor=str(folder))
    assert "cross_model.layers.1.0.fn.to_out.weight" in str(info.value)
    assert "cross_model.extra.weight" in str(info.value)
    assert all(key not in str(info.value) for key in POSITION_ID_KEYS)


def test_pickled_module_refused_then_converted(mps, mps_files, tmp_path, image_files):
    """The release pickles a whole module of the reference's ``trainer`` package: refused without the trust
    flag; converted (without that package importable) it scores like the safetensors."""
    _, folder, state, *_ = mps_files
    fake = types.ModuleType("trainer_mps_fake")

    class CLIPModel(nn.Module):  # stands for trainer.models.clip_model.CLIPModel, with its key layout
        def __init__(self):
            super().__init__()
            self.model = nn.Module()
            self.cross_model = nn.Module()

    CLIPModel.__module__, CLIPModel.__qualname__ = "trainer_mps_fake", "CLIPModel"
    fake.CLIPModel = CLIPModel
    module = CLIPModel()
    for key, value in state.items():
        owner = module
        *path, leaf = key.split(".")
        for part in path:
            if not hasattr(owner, part):
                owner.add_module(part, nn.Module())
            owner = getattr(owner, part)
        owner.register_buffer(leaf, value.clone())
    sys.modules["trainer_mps_fake"] = fake
    try:
        torch.save(module, tmp_path / "MPS_overall_checkpoint.pth")
    finally:
        del sys.modules["trainer_mps_fake"]
    pth = tmp_path / "MPS_overall_checkpoint.pth"
    with pytest.raises(UnsafeCheckpointError, match="--trust-pickle"):
        mmalign.load_reward("mps", weights=str(pth), processor=str(folder))
    with pytest.raises(MMAlignError, match="--trust-pickle"):  # `mmalign convert` without the flag
        convert_command.run(argparse.Namespace(source=str(pth), target=str(tmp_path / "x"), trust_pickle=False))
    out = convert_pickle_to_safetensors(pth, tmp_path / "MPS_overall_checkpoint.safetensors")
    converted = mmalign.load_reward("mps", weights=str(out), processor=str(folder))
    torch.testing.assert_close(converted.score(image_files[:1], PROMPTS[0]), mps.score(image_files[:1], PROMPTS[0]))
    torch.save(state, tmp_path / "plain.pth")  # a plain state dict loads with weights_only=True
    plain = load_mps_state_dict(tmp_path / "plain.pth")
    assert plain.keys() == state.keys() and all(torch.equal(plain[k], state[k]) for k in state)
