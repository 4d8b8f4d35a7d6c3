"""Reward3D (DreamReward) on tiny random checkpoints in the published key layout (``Reward3D_Scorer.pt``,
``Reward3D_CrossViewFusion.pt``: ``blip.*``, ``mlp.layers.*``, ``Scorer.fc*`` / ``cross_view_adapter.*``), saved
with ``torch.save`` and loaded through the real loader, checked against an independent plain-torch forward
(``blip_reference.py`` for BLIP, the fusion heads written out below). Offline and fast."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision import transforms
from transformers import BertTokenizer

import mmalign
from mmalign.errors import MediaError, StateDictMismatchError, UnsafeCheckpointError, WeightsError
from mmalign.modalities.image import pil_to_tensor
from mmalign.rewards.reward3d import Reward3D, view_directions, view_prompts

from .blip_reference import bert_forward, reference_transform, vit_forward
from .test_imagereward import MED_CONFIG, VISION_HEADS, VOCAB, Payload, make_state_dict, smooth_image

MEAN = 0.16717362830052426
STD = {"scorer": 1.0333394966054072, "crossviewfusion": 5.0}
MED = {**MED_CONFIG, "max_position_embeddings": 128}  # DreamReward tokenises to 100 tokens
FUSION_HEADS = 2  # the published model has 12 heads of 64 over 768; the tiny text width is 32
PROMPT = "a red cat sitting on the mountain"
IMAGE = 64  # a 4x4 grid of 16-px patches keeps the tiny ViT cheap (the published model reads 224 px)


@dataclass
class Assets:
    root: Path
    folders: dict[str, Path]
    tokenizer: Path
    state_dicts: dict[str, dict[str, torch.Tensor]]
    sets: list[Path]


def make_state_dicts() -> dict[str, dict[str, torch.Tensor]]:
    base = make_state_dict(seed=3)
    generator = torch.Generator().manual_seed(4)
    width = MED["max_position_embeddings"]
    base["blip.text_encoder.embeddings.position_embeddings.weight"] = 3e-3 * torch.randn(width, 32, generator=generator)
    base["blip.text_encoder.embeddings.position_ids"] = torch.arange(width).unsqueeze(0)
    base["blip.visual_encoder.pos_embed"] = 3e-3 * torch.randn(1, (IMAGE // 16) ** 2 + 1, 128, generator=generator)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) / math.sqrt(shape[-1])

    scorer = dict(base)
    for name, (out, inp) in {"fc1": (256, 512), "fc2": (64, 256), "fc3": (1, 64)}.items():
        scorer[f"Scorer.{name}.weight"], scorer[f"Scorer.{name}.bias"] = rnd(out, inp), 0.1 * rnd(out)
    cvf = dict(base)
    p, h = "cross_view_adapter.", 32
    cvf[p + "self_attn.in_proj_weight"], cvf[p + "self_attn.in_proj_bias"] = rnd(3 * h, h), 0.1 * rnd(3 * h)
    cvf[p + "self_attn.out_proj.weight"], cvf[p + "self_attn.out_proj.bias"] = rnd(h, h), 0.1 * rnd(h)
    cvf[p + "fusion_gate.0.weight"], cvf[p + "fusion_gate.0.bias"] = rnd(h, 2 * h), 0.1 * rnd(h)
    return {"scorer": scorer, "crossviewfusion": cvf}


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Assets:
    root = tmp_path_factory.mktemp("reward3d")
    state_dicts = make_state_dicts()
    folders = {}
    for variant, file in (("scorer", "Reward3D_Scorer.pt"), ("crossviewfusion", "Reward3D_CrossViewFusion.pt")):
        folder = root / variant
        folder.mkdir()
        torch.save(state_dicts[variant], folder / file)
        (folder / "med_config.json").write_text(json.dumps(MED))
        folders[variant] = folder
    tokenizer = root / "tokenizer"
    tokenizer.mkdir()
    (tokenizer / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    (tokenizer / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    sets = []
    for index, (size, cameras) in enumerate(
        [((96, 128), {"azimuth": [-10, 80, 170, 260], "elevation": [15, 15, 15, 70]}), ((120, 80), None)]
    ):
        folder = root / f"set{index}"
        folder.mkdir()
        for view in range(4):
            smooth_image(10 * index + view, *size).save(folder / f"view_{view}.png")
        if cameras:
            (folder / "cameras.json").write_text(json.dumps(cameras))
        sets.append(folder)
    return Assets(root, folders, tokenizer, state_dicts, sets)


@pytest.fixture(scope="module")
def rewards(assets: Assets) -> dict[str, Reward3D]:
    return {
        "scorer": mmalign.load_reward("reward3d", weights=assets.folders["scorer"], processor=assets.tokenizer),
        "crossviewfusion": mmalign.load_reward(
            "reward3d-cvf",
            weights=assets.folders["crossviewfusion"],
            processor=assets.tokenizer,
            fusion_heads=FUSION_HEADS,
        ),
    }


# -- the independent re-derivation ------------------------------------------------------------------------------
def reference_tokens(assets: Assets, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    tokenizer = BertTokenizer.from_pretrained(str(assets.tokenizer))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    encoded = tokenizer(prompts, padding="max_length", truncation=True, max_length=100, return_tensors="pt")
    return encoded.input_ids, encoded.attention_mask


def linear(x: torch.Tensor, sd: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def fused_reference(sd: dict[str, torch.Tensor], variant: str, cls: torch.Tensor) -> torch.Tensor:
    """Reward3D_ / Reward3D heads from the published keys: ``cls`` ``[B*4, D]`` of consecutive views -> ``[B]``."""
    batch = cls.shape[0] // 4
    if variant == "scorer":
        x = linear(linear(cls, sd, "mlp.layers.0"), sd, "mlp.layers.2")  # the first output of width 128
        x = torch.cat([x.view(batch, 4, 128)[:, i] for i in range(4)], dim=1)
        raw = linear(linear(linear(x, sd, "Scorer.fc1"), sd, "Scorer.fc2"), sd, "Scorer.fc3")
    else:
        p = "cross_view_adapter."
        seq = cls.view(batch, 4, -1).permute(1, 0, 2)  # [4, B, D]
        q, k, v = (seq @ sd[p + "self_attn.in_proj_weight"].T + sd[p + "self_attn.in_proj_bias"]).chunk(3, dim=-1)

        def heads(t: torch.Tensor) -> torch.Tensor:  # [4, B, D] -> [B, H, 4, D/H]
            return t.reshape(4, batch, FUSION_HEADS, -1).permute(1, 2, 0, 3)

        q, k, v = heads(q), heads(k), heads(v)
        attn = ((q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])).softmax(-1) @ v
        attn = linear(attn.permute(2, 0, 1, 3).reshape(4, batch, -1), sd, p + "self_attn.out_proj")
        gate = torch.sigmoid(linear(torch.cat([seq, attn], dim=-1), sd, p + "fusion_gate.0"))
        fused = (gate * attn + (1 - gate) * seq).mean(dim=0)
        raw = fused
        for index in (0, 2, 4, 6, 7):
            raw = linear(raw, sd, f"mlp.layers.{index}")
    return (raw.squeeze(-1) - MEAN) / STD[variant]


@torch.no_grad()
def reference_scores(assets: Assets, variant: str, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    sd = assets.state_dicts[variant]
    ids, mask = reference_tokens(assets, prompts)
    hidden = bert_forward(sd, ids, mask, vit_forward(sd, pixels, VISION_HEADS), MED)
    return fused_reference(sd, variant, hidden[:, 0])


def set_pixels(folder: Path) -> torch.Tensor:
    return torch.stack([reference_transform(Image.open(folder / f"view_{v}.png"), IMAGE) for v in range(4)])


def grid_of(views: list[Image.Image]) -> Image.Image:
    """4 views tiled 2x2, row-major."""
    width, height = views[0].size
    grid = Image.new("RGB", (2 * width, 2 * height))
    for v, image in enumerate(views):
        grid.paste(image, ((v % 2) * width, (v // 2) * height))
    return grid


SET_PROMPTS = [
    [f"{PROMPT}, front view", f"{PROMPT}, side view", f"{PROMPT}, back view", f"{PROMPT}, overhead view"],
    [PROMPT] * 4,  # no cameras: the prompt as it is
]


# -- tests ---------------------------------------------------------------------------------------------------------
def test_view_dependent_prompts_follow_threestudio() -> None:
    assert view_directions([0, 29, 31, 90, 151, 179, -150, 335, 200], [0] * 8 + [61]) == [
        "front", "front", "side", "side", "back", "back", "side", "front", "overhead",
    ]  # fmt: skip
    assert view_prompts("a cat", [0, 90], [10, 10]) == ["a cat, front view", "a cat, side view"]


@pytest.mark.parametrize("variant", ["scorer", "crossviewfusion"])
def test_file_scores_equal_independent_reference(rewards, assets: Assets, variant: str) -> None:
    reward = rewards[variant]
    results = reward.score_files(assets.sets, PROMPT)
    assert [r.extra["view_prompts"] for r in results] == SET_PROMPTS
    pixels = torch.cat([set_pixels(folder) for folder in assets.sets])
    expected = reference_scores(assets, variant, pixels, [p for row in SET_PROMPTS for p in row])
    got = torch.tensor([r.total for r in results])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (expected[0] - expected[1]).abs() > 1e-3  # the sets differ: the comparison means something
    single = reward.score(assets.sets[1], PROMPT)  # one by one as in a batch
    torch.testing.assert_close(single, expected[1:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["scorer", "crossviewfusion"])
def test_tensor_path_equals_reference_tensor_transform(rewards, assets: Assets, variant: str) -> None:
    """DreamReward's guidance applies torchvision's Resize(224, bicubic) + CenterCrop + Normalize to tensors."""
    views = torch.stack([pil_to_tensor(Image.open(assets.sets[0] / f"view_{v}.png")) for v in range(4)])
    transform = transforms.Compose(
        [
            transforms.Resize(IMAGE, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
            transforms.CenterCrop(IMAGE),
            transforms.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
        ]
    )
    expected = reference_scores(assets, variant, transform(views), SET_PROMPTS[1])
    got = rewards[variant].score(views[None], PROMPT)
    torch.testing.assert_close(got.detach(), expected, atol=1e-5, rtol=0)
    cameras = json.loads((assets.sets[0] / "cameras.json").read_text())
    with_cameras = rewards[variant].score_tensor(views[None], PROMPT, cameras["azimuth"], cameras["elevation"])
    expected = reference_scores(assets, variant, transform(views), SET_PROMPTS[0])
    torch.testing.assert_close(with_cameras.detach(), expected, atol=1e-5, rtol=0)


def test_view_order_matters_to_the_scorer_only(rewards) -> None:
    views = torch.rand(1, 4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    shuffled = views[:, [2, 0, 3, 1]]
    with torch.no_grad():
        cvf = rewards["crossviewfusion"].score(torch.cat([views, shuffled]), PROMPT)
        scorer = rewards["scorer"].score(torch.cat([views, shuffled]), PROMPT)
    torch.testing.assert_close(cvf[0], cvf[1], atol=1e-5, rtol=0)
    assert (scorer[0] - scorer[1]).abs() > 1e-4


def test_gradient_reaches_the_views(rewards) -> None:
    views = torch.rand(2, 4, 3, 40, 40, generator=torch.Generator().manual_seed(1), requires_grad=True)
    for reward in rewards.values():
        views.grad = None
        reward.score_tensor(views, ["a cat", "a dog"])[0].backward()
        assert views.grad is not None and views.grad[1].abs().sum() == 0  # sets do not mix
        assert all(views.grad[0, v].abs().sum() > 0 for v in range(4))
    # the trainers' reward of a multi-view generator (a 2x2 ViewGridGenerator) is the reward itself, not a lifting
    from mmalign.trainers.online import WeightedReward, for_modality

    weighted = WeightedReward([rewards["scorer"]], [2.0])
    assert for_modality(weighted, "multiview") is weighted


def test_view_count_is_checked(rewards, assets: Assets, tmp_path: Path) -> None:
    reward = rewards["scorer"]
    with pytest.raises(ValueError, match="exactly 4 views.*has 3"):
        reward.score(torch.rand(1, 3, 3, 32, 32), PROMPT)
    folder = tmp_path / "six"
    folder.mkdir()
    for view in range(6):
        smooth_image(view, 40, 40).save(folder / f"view_{view}.png")
    with pytest.raises(MediaError, match="six: reward3d scores sets of exactly 4 views; this one has 6"):
        reward.score([folder], PROMPT)
    with pytest.raises(ValueError, match="4 views; a 2x3 grid holds 6"):
        reward.with_grid("2x3")


def test_grid_images_score_as_their_views(rewards, assets: Assets) -> None:
    """``label`` scores Pillow images: read as 2x2 grids of views, row-major."""
    views = [Image.open(assets.sets[1] / f"view_{v}.png") for v in range(4)]
    grid = grid_of(views)
    reward = rewards["scorer"].with_grid("2x2")
    from_grid = reward.score_images([grid], PROMPT)
    torch.testing.assert_close(from_grid, rewards["scorer"].score_images([views], PROMPT), atol=1e-6, rtol=0)
    torch.testing.assert_close(from_grid, rewards["scorer"].score([assets.sets[1]], PROMPT), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="grid"):
        rewards["scorer"].score_images([grid], PROMPT)


def test_checkpoint_keys_are_checked(assets: Assets, tmp_path: Path) -> None:
    sd = dict(assets.state_dicts["scorer"])
    del sd["Scorer.fc2.weight"], sd["blip.text_encoder.encoder.layer.0.output.dense.bias"]
    sd["Scorer.fc4.weight"] = torch.zeros(1)
    sd["extra_head.weight"] = torch.zeros(1)
    sd["Scorer.fc1.bias"] = torch.zeros(7)
    torch.save(sd, tmp_path / "Reward3D_Scorer.pt")
    with pytest.raises(StateDictMismatchError) as caught:
        mmalign.load_reward("reward3d", weights=tmp_path, med_config=assets.folders["scorer"] / "med_config.json",
                            processor=assets.tokenizer)  # fmt: skip
    error = caught.value
    assert set(error.missing) == {"Scorer.fc2.weight", "blip.text_encoder.encoder.layer.0.output.dense.bias"}
    assert set(error.unexpected) == {"Scorer.fc4.weight", "extra_head.weight"}
    assert [m.split()[0] for m in error.mismatched] == ["Scorer.fc1.bias"]


def test_variant_is_detected_and_pickles_refused(assets: Assets, tmp_path: Path) -> None:
    cvf_file = assets.folders["crossviewfusion"] / "Reward3D_CrossViewFusion.pt"
    with pytest.raises(WeightsError, match="reward3d-cvf"):
        mmalign.load_reward("reward3d", weights=cvf_file, processor=assets.tokenizer)
    base = {k: v for k, v in assets.state_dicts["scorer"].items() if not k.startswith("Scorer.")}
    torch.save(base, tmp_path / "Reward3D_Scorer.pt")
    with pytest.raises(WeightsError, match="neither of Scorer"):
        mmalign.load_reward("reward3d", weights=tmp_path, processor=assets.tokenizer)
    torch.save({"model": Payload()}, tmp_path / "Reward3D_Scorer.pt")
    with pytest.raises(UnsafeCheckpointError):
        mmalign.load_reward("reward3d", weights=tmp_path, processor=assets.tokenizer)


def test_registry_and_declared_scale(rewards) -> None:
    assert {"reward3d", "reward3d-cvf"} <= set(mmalign.rewards.list_rewards())
    for variant, reward in rewards.items():
        info = reward.info()
        assert info["modality"] == "multiview" and info["views"] == 4 and info["variant"] == variant
        assert info["higher_is_better"] and info["is_differentiable"] and str(STD[variant]) in info["scale"]
        assert reward.imagereward.max_length == 100 and not reward.training
    assert rewards["scorer"].name == "reward3d" and rewards["crossviewfusion"].name == "reward3d-cvf"


def test_mmalign_score_on_view_folders(rewards, assets: Assets, tmp_path: Path) -> None:
    from mmalign.cli import main

    out = tmp_path / "scores.jsonl"
    code = main(
        ["score", "--reward", "reward3d", "--weights", str(assets.folders["scorer"]), "--processor",
         str(assets.tokenizer), "--prompt", PROMPT, "--modality", "multiview", "--no-progress", "--out", str(out),
         str(assets.sets[0])]
    )  # fmt: skip
    assert code == 0
    record = json.loads(out.read_text().splitlines()[0])
    expected = rewards["scorer"].score([assets.sets[0]], PROMPT)
    assert record["reward"] == "reward3d" and record["view_prompts"] == SET_PROMPTS[0]
    assert abs(record["score"] - float(expected[0])) < 1e-5
    assert record["modality"] == "multiview" and record["aggregate"] == "fused"
    # --grid 2x2: each image is a set of 4 views, row-major
    grid_of([Image.open(assets.sets[1] / f"view_{v}.png") for v in range(4)]).save(tmp_path / "grid.png")
    code = main(
        ["score", "--reward", "reward3d", "--weights", str(assets.folders["scorer"]), "--processor",
         str(assets.tokenizer), "--prompt", PROMPT, "--grid", "2x2", "--no-progress", "--out", str(out),
         str(tmp_path / "grid.png")]
    )  # fmt: skip
    assert code == 0
    record = json.loads(out.read_text().splitlines()[1])
    assert record["variant"] == "scorer/grid2x2"
    assert abs(record["score"] - float(rewards["scorer"].score([assets.sets[1]], PROMPT)[0])) < 1e-5


def test_label_scores_a_view_grid_generator_as_reward3d_scores_the_saved_views(rewards, tmp_path: Path) -> None:
    """``label`` on an image generator read as 2x2 views (the shipped tiny flow pipeline): each grid PNG's score is
    Reward3D's score of its 4 views as saved."""
    from mmalign.commands.label import label
    from mmalign.modalities.image import open_image, pil_to_tensor
    from mmalign.modalities.multiview import split_grid
    from mmalign.models.generator import configure_output, load_generator
    from mmalign.toyworld.sampling import ASSETS
    from mmalign.trainers.online import WeightedReward

    if not (ASSETS / "flow_pipeline").is_dir():
        pytest.skip("assets/toyworld not built")
    generator = configure_output(load_generator(str(ASSETS / "flow_pipeline")), views_grid="2x2")
    reward = rewards["scorer"]
    prompt = "two red circles on the left"
    label(generator, WeightedReward([reward], [1.0]), [prompt], 2, tmp_path, steps=2, guidance=1.0, resolution=32)
    row = json.loads((tmp_path / "rankings.jsonl").read_text())
    for name, score in zip(row["images"], row["scores"]):
        views = torch.stack([pil_to_tensor(v) for v in split_grid(open_image(tmp_path / name), 2, 2)])
        with torch.no_grad():
            expected = reward.score_tensor(views[None], [prompt])
        assert score == pytest.approx(float(expected[0]), abs=1e-5)
