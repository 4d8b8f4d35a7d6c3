"""ImageReward v1.0 on a tiny random checkpoint in the published key layout, checked against an independent
functional re-implementation (``blip_reference.py``). Offline and fast."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import BertTokenizer

import mmalign
from mmalign.errors import StateDictMismatchError, UnsafeCheckpointError, WeightsError
from mmalign.modalities.image import pil_to_tensor
from mmalign.rewards.imagereward import (
    ImageReward,
    convert_original_state_dict,
    module_to_original_key,
    original_to_module_key,
)

from .blip_reference import imagereward_scores, reference_transform

VOCAB_WORDS = (
    "a an the of on in with at and photo painting cat dog red blue green hat sitting mountain sky sunset "
    "house tree big small castle river astronaut horse riding ##s ##ing"
)
WORDS = VOCAB_WORDS.split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
VOCAB_SIZE = len(VOCAB) + 2  # + [DEC] + [ENC], as BLIP's init_tokenizer

VISION_WIDTH, VISION_DEPTH, VISION_MLP, PATCH, IMAGE = 128, 2, 256, 16, 224
VISION_HEADS = VISION_WIDTH // 64  # what the loader infers
TEXT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
MED_CONFIG = {
    "architectures": ["BertModel"],
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 64,
    "model_type": "bert",
    "pad_token_id": 0,
    "type_vocab_size": 2,
    "vocab_size": VOCAB_SIZE,
    "encoder_width": 768,  # the reference overrides it with the vision width (128 here)
    "add_cross_attention": True,
    **TEXT,
}
PROMPTS = [
    "a red cat sitting on the mountain",
    "a painting of a big castle at sunset",
    " ".join(["an astronaut riding a horse in the sky"] * 6),  # longer than 35 tokens: truncated
    "",
]
# The tensor path resizes floats instead of rounded uint8 pixels (see mmalign.rewards.preprocess); on these
# smooth test images that moved normalised scores by about 2e-3 (measured). bf16 moved them by about 2e-2.
TENSOR_PATH_ATOL = 1e-2
BF16_ATOL = 0.1
SMALL = 3e-3


class Payload:
    """Anything that is not a tensor: unpickling it needs code execution."""

    def __init__(self) -> None:
        self.value = 1


@dataclass
class Assets:
    root: Path
    folder: Path
    tokenizer: Path
    images: list[Path]
    state_dict: dict[str, torch.Tensor]


def make_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the published ImageReward.pt key layout (blip.*, mlp.layers.*)."""
    generator = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, std: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std

    def linear(name: str, out: int, inp: int) -> None:
        sd[name + ".weight"] = rnd(out, inp, std=inp**-0.5)
        sd[name + ".bias"] = rnd(out, std=0.1)

    def norm(name: str, width: int) -> None:
        sd[name + ".weight"] = 1 + rnd(width, std=0.1)
        sd[name + ".bias"] = rnd(width, std=0.1)

    # Embeddings are tiny (std SMALL) so that the first LayerNorms' eps (1e-6 vision, 1e-12 text) matters.
    sd: dict[str, torch.Tensor] = {}
    v, w = "blip.visual_encoder.", VISION_WIDTH
    sd[v + "cls_token"] = rnd(1, 1, w, std=SMALL)
    sd[v + "pos_embed"] = rnd(1, (IMAGE // PATCH) ** 2 + 1, w, std=SMALL)
    sd[v + "patch_embed.proj.weight"] = rnd(w, 3, PATCH, PATCH, std=SMALL * (3 * PATCH * PATCH) ** -0.5)
    sd[v + "patch_embed.proj.bias"] = rnd(w, std=SMALL)
    for i in range(VISION_DEPTH):
        b = f"{v}blocks.{i}."
        norm(b + "norm1", w)
        linear(b + "attn.qkv", 3 * w, w)
        linear(b + "attn.proj", w, w)
        norm(b + "norm2", w)
        linear(b + "mlp.fc1", VISION_MLP, w)
        linear(b + "mlp.fc2", w, VISION_MLP)
    norm(v + "norm", w)

    t, h, inter = "blip.text_encoder.", TEXT["hidden_size"], TEXT["intermediate_size"]
    sd[t + "embeddings.word_embeddings.weight"] = rnd(VOCAB_SIZE, h, std=SMALL)
    sd[t + "embeddings.position_embeddings.weight"] = rnd(MED_CONFIG["max_position_embeddings"], h, std=SMALL)
    sd[t + "embeddings.position_ids"] = torch.arange(MED_CONFIG["max_position_embeddings"]).unsqueeze(0)
    norm(t + "embeddings.LayerNorm", h)
    for i in range(TEXT["num_hidden_layers"]):
        b = f"{t}encoder.layer.{i}."
        for part, width in (("attention", h), ("crossattention", w)):
            linear(b + part + ".self.query", h, h)
            linear(b + part + ".self.key", h, width)
            linear(b + part + ".self.value", h, width)
            linear(b + part + ".output.dense", h, h)
            norm(b + part + ".output.LayerNorm", h)
        linear(b + "intermediate.dense", inter, h)
        linear(b + "output.dense", h, inter)
        norm(b + "output.LayerNorm", h)
    linear("blip.vision_proj", 16, w)  # BLIP_Pretrain's contrastive projections: in the file, unused
    linear("blip.text_proj", 16, h)
    for index, (out, inp) in zip((0, 2, 4, 6, 7), ((1024, h), (128, 1024), (64, 128), (16, 64), (1, 16))):
        linear(f"mlp.layers.{index}", out, inp)
    return sd


def smooth_image(seed: int, height: int, width: int) -> Image.Image:
    """A smooth random RGB image (low-frequency noise upsampled), saved as 8-bit."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8), mode="RGB")
    return coarse.resize((width, height), Image.Resampling.BICUBIC)


def write_checkpoint(folder: Path, state_dict: dict[str, torch.Tensor], med: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, folder / "ImageReward.pt")
    (folder / "med_config.json").write_text(json.dumps(med or MED_CONFIG))
    return folder


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Assets:
    root = tmp_path_factory.mktemp("imagereward")
    state_dict = make_state_dict()
    folder = write_checkpoint(root / "weights", state_dict)
    tokenizer = root / "tokenizer"
    tokenizer.mkdir()
    (tokenizer / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    (tokenizer / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    images = []
    for i, (height, width) in enumerate([(256, 320), (256, 320), (256, 320), (320, 240)]):
        path = root / f"image_{i}.png"
        smooth_image(i, height, width).save(path)
        images.append(path)
    return Assets(root, folder, tokenizer, images, state_dict)


@pytest.fixture(scope="session")
def reward(assets: Assets) -> ImageReward:
    return mmalign.load_reward("imagereward", weights=assets.folder, processor=assets.tokenizer)


def reference_tokens(assets: Assets, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    tokenizer = BertTokenizer.from_pretrained(str(assets.tokenizer))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    encoded = tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    return encoded.input_ids, encoded.attention_mask


def reference(assets: Assets, prompts: list[str], heads: int = VISION_HEADS, sd=None) -> torch.Tensor:
    pixels = torch.stack([reference_transform(Image.open(path)) for path in assets.images])
    ids, mask = reference_tokens(assets, prompts)
    return imagereward_scores(sd or assets.state_dict, MED_CONFIG, pixels, ids, mask, heads)


# -- architecture and equality with the independent reference ------------------------------------------------
def test_architecture_is_read_from_the_checkpoint(reward: ImageReward) -> None:
    vision = reward.vision.config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (128, 2, 2)
    assert (vision.image_size, vision.patch_size, vision.intermediate_size) == (224, 16, 256)
    assert vision.layer_norm_eps == 1e-6
    assert reward.text.config.encoder_hidden_size == VISION_WIDTH  # not med_config's encoder_width
    assert not hasattr(reward.text.embeddings, "token_type_embeddings")
    assert all(hasattr(layer, "crossattention") for layer in reward.text.encoder.layer)
    assert not reward.training
    assert reward.info()["reward"] == "imagereward"
    assert reward.higher_is_better and reward.is_differentiable


def test_tokens_match_blip_init_tokenizer(reward: ImageReward, assets: Assets) -> None:
    ids, mask = reward.tokenize(PROMPTS)
    expected_ids, expected_mask = reference_tokens(assets, PROMPTS)
    assert torch.equal(ids, expected_ids) and torch.equal(mask, expected_mask)
    assert ids.shape == (len(PROMPTS), 35)
    assert (ids[:, 0] == reward.tokenizer.cls_token_id).all()
    assert mask[2].all() and not mask[0].all()  # truncated / padded
    assert len(reward.tokenizer) == VOCAB_SIZE
    assert reward.tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [VOCAB_SIZE - 2, VOCAB_SIZE - 1]


def test_scores_equal_independent_reference(reward: ImageReward, assets: Assets) -> None:
    expected = reference(assets, PROMPTS)
    got = reward.score(assets.images, PROMPTS)
    assert got.dtype == torch.float32 and got.shape == (len(PROMPTS),)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert expected.std() > 0.05  # the test is not vacuous
    same_prompt = reward.score(assets.images, PROMPTS[0])
    assert same_prompt.std() > 1e-3  # the image matters through cross-attention


def test_vision_heads_override(assets: Assets) -> None:
    model = ImageReward.from_pretrained(assets.folder, processor=assets.tokenizer, vision_heads=4)
    assert model.vision.config.num_attention_heads == 4
    scores = model.score(assets.images, PROMPTS)
    torch.testing.assert_close(scores, reference(assets, PROMPTS, heads=4), atol=1e-5, rtol=0)
    assert (scores - reference(assets, PROMPTS)).abs().max() > 1e-2  # the head count matters


# -- batching, tensor path, ranking ----------------------------------------------------------------------
def test_batch_equals_one_by_one(reward: ImageReward, assets: Assets) -> None:
    batch = reward.score(assets.images, PROMPTS)
    single = torch.cat([reward.score(path, prompt) for path, prompt in zip(assets.images, PROMPTS)])
    chunked = reward.score(assets.images, PROMPTS, batch_size=3)
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=0)
    torch.testing.assert_close(batch, chunked, atol=1e-5, rtol=0)


def test_tensor_path_agrees_and_has_gradients(reward: ImageReward, assets: Assets) -> None:
    paths = assets.images[:3]  # same size, so they stack
    images = torch.stack([pil_to_tensor(Image.open(path)) for path in paths]).requires_grad_(True)
    scores = reward(images, PROMPTS[:3])
    torch.testing.assert_close(scores.detach(), reward.score(paths, PROMPTS[:3]), atol=TENSOR_PATH_ATOL, rtol=0)
    scores.sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_rank_is_one_based_and_consistent(reward: ImageReward, assets: Assets) -> None:
    prompt = PROMPTS[1]
    ranks, scores = reward.rank(prompt, assets.images)
    torch.testing.assert_close(scores, reward.score(assets.images, prompt))
    assert sorted(ranks) == list(range(1, len(assets.images) + 1))
    for i, rank in enumerate(ranks):
        assert rank == 1 + int((scores > scores[i]).sum())
    # the reference's inference_rank: argsort of the descending argsort, plus one
    order = torch.sort(scores, descending=True).indices
    assert ranks == (torch.sort(order).indices + 1).tolist()
    assert reward.rank(prompt, assets.images[:1])[0] == [1]


# -- loading: strictness, safety, formats, dtype ---------------------------------------------------------
def test_key_renaming_round_trips(assets: Assets, reward: ImageReward) -> None:
    converted = convert_original_state_dict(assets.state_dict)
    own = set(reward.state_dict())
    allowed = {
        "blip.vision_proj.weight",
        "blip.vision_proj.bias",
        "blip.text_proj.weight",
        "blip.text_proj.bias",
    }
    assert set(converted) - own == allowed | {"text.embeddings.position_ids"}
    assert own <= set(converted)
    for key in assets.state_dict:
        assert module_to_original_key(original_to_module_key(key)) == key
    assert original_to_module_key("blip.visual_encoder.blocks.1.attn.proj.weight") == (
        "vision.encoder.layers.1.self_attn.projection.weight"
    )


@pytest.mark.parametrize(
    "key",
    [
        "blip.visual_encoder.blocks.1.norm1.weight",
        "blip.text_encoder.encoder.layer.1.crossattention.self.key.weight",
        "mlp.layers.7.bias",
    ],
)
def test_missing_key_is_named(assets: Assets, tmp_path: Path, key: str) -> None:
    sd = dict(assets.state_dict)
    del sd[key]
    folder = write_checkpoint(tmp_path / "ckpt", sd)
    with pytest.raises(StateDictMismatchError, match="missing keys") as info:
        ImageReward.from_pretrained(folder, processor=assets.tokenizer)
    assert info.value.missing == [key] and key in str(info.value)


@pytest.mark.parametrize(
    "key", ["blip.text_encoder.encoder.layer.0.attention.self.extra.weight", "blip.itm_head.weight"]
)
def test_unexpected_key_is_named(assets: Assets, tmp_path: Path, key: str) -> None:
    sd = {**assets.state_dict, key: torch.zeros(3)}
    folder = write_checkpoint(tmp_path / "ckpt", sd)
    with pytest.raises(StateDictMismatchError, match="unexpected keys") as info:
        ImageReward.from_pretrained(folder, processor=assets.tokenizer)
    assert info.value.unexpected == [key] and key in str(info.value)


def test_wrong_shape_is_named(assets: Assets, tmp_path: Path) -> None:
    sd = {**assets.state_dict, "mlp.layers.6.weight": torch.zeros(8, 64)}
    folder = write_checkpoint(tmp_path / "ckpt", sd)
    with pytest.raises(StateDictMismatchError, match=r"mlp\.layers\.6\.weight \(8, 64\) vs \(16, 64\)"):
        ImageReward.from_pretrained(folder, processor=assets.tokenizer)


def test_allow_listed_keys_may_be_absent(assets: Assets, tmp_path: Path) -> None:
    sd = {k: v for k, v in assets.state_dict.items() if "_proj." not in k and not k.endswith("position_ids")}
    folder = write_checkpoint(tmp_path / "ckpt", sd)
    model = ImageReward.from_pretrained(folder, processor=assets.tokenizer)
    torch.testing.assert_close(model.score(assets.images, PROMPTS), reference(assets, PROMPTS), atol=1e-5, rtol=0)


def test_code_executing_pickle_is_refused(assets: Assets, tmp_path: Path) -> None:
    folder = tmp_path / "unsafe"
    folder.mkdir()
    torch.save({"model": Payload()}, folder / "ImageReward.pt")
    shutil.copy(assets.folder / "med_config.json", folder / "med_config.json")
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        ImageReward.from_pretrained(folder, processor=assets.tokenizer)


def test_safetensors_and_file_path(reward: ImageReward, assets: Assets, tmp_path: Path) -> None:
    path = tmp_path / "ImageReward.safetensors"
    save_file({k: v.contiguous() for k, v in assets.state_dict.items()}, str(path))
    with pytest.raises(WeightsError, match="med_config"):  # not beside the file, not given
        ImageReward.from_pretrained(path, processor=assets.tokenizer)
    model = ImageReward.from_pretrained(path, processor=assets.tokenizer, med_config=assets.folder / "med_config.json")
    torch.testing.assert_close(
        model.score(assets.images, PROMPTS), reward.score(assets.images, PROMPTS), atol=0, rtol=0
    )
    pt_file = ImageReward.from_pretrained(assets.folder / "ImageReward.pt", processor=assets.tokenizer)
    torch.testing.assert_close(
        pt_file.score(assets.images[:1], PROMPTS[0]), reward.score(assets.images[:1], PROMPTS[0])
    )


def test_missing_local_paths_fail_without_the_network(
    assets: Assets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match="no such file or folder"):
        ImageReward.from_pretrained(tmp_path / "absent", processor=assets.tokenizer)
    with pytest.raises(WeightsError, match="no such folder"):
        ImageReward.from_pretrained(assets.folder, processor=tmp_path / "absent")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WeightsError, match="ImageReward.pt"):
        ImageReward.from_pretrained(empty, processor=assets.tokenizer)


def test_tokenizer_vocab_must_match(assets: Assets, tmp_path: Path) -> None:
    folder = write_checkpoint(tmp_path / "ckpt", assets.state_dict, {**MED_CONFIG, "vocab_size": VOCAB_SIZE + 1})
    with pytest.raises(WeightsError, match="vocab_size"):
        ImageReward.from_pretrained(folder, processor=assets.tokenizer)


def test_bf16_runs_close_to_fp32(reward: ImageReward, assets: Assets) -> None:
    model = mmalign.load_reward("imagereward", weights=assets.folder, processor=assets.tokenizer, dtype="bf16")
    assert model.dtype == torch.bfloat16 and model.info()["dtype"] == "bf16"
    assert model.mlp.layers[0].weight.dtype == torch.float32  # the head runs in float32
    scores = model.score(assets.images, PROMPTS)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, reward.score(assets.images, PROMPTS), atol=BF16_ATOL, rtol=0)
