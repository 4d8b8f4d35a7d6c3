"""HPSv2: the published checkpoint format through the real loader, against the reference computation."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

import mmalign
from mmalign.errors import StateDictMismatchError
from tests import tiny

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)


def reference_preprocess(image: Image.Image) -> torch.Tensor:
    """HPSv2's eval transform, written out: ToTensor, ResizeMaxSize(224) with zero fill, Normalize."""
    x = TF.to_tensor(image.convert("RGB"))
    h, w = x.shape[-2:]
    scale = 224 / float(max(h, w))
    new_h, new_w = round(h * scale), round(w * scale)
    x = TF.resize(x, [new_h, new_w], interpolation=InterpolationMode.BICUBIC)
    pad_h, pad_w = 224 - new_h, 224 - new_w
    x = TF.pad(x, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
    return (x - MEAN) / STD


def reference_scores(checkpoint, images, prompt):
    """``hpsv2/img_score.py``: open_clip forward, diag(image_features @ text_features.T), one image at a time."""
    import open_clip

    model = open_clip.create_model(tiny.TINY_OPEN_CLIP, pretrained=None)
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["state_dict"])
    model.eval()
    tokenizer = open_clip.get_tokenizer(tiny.TINY_OPEN_CLIP)
    out = []
    with torch.no_grad():
        for image in images:
            features = model(reference_preprocess(image).unsqueeze(0), tokenizer([prompt]))
            out.append(torch.diagonal(features[0] @ features[1].T)[0])
    return torch.stack(out)


@pytest.fixture(scope="module")
def hps(hps_checkpoint):
    return mmalign.load_reward("hpsv2.1", weights=str(hps_checkpoint), arch=tiny.TINY_OPEN_CLIP)


def test_scores_equal_reference(hps, hps_checkpoint, image_files):
    images = [Image.open(p) for p in image_files]
    ours = hps.score(image_files, "a red circle on the left")
    ref = reference_scores(hps_checkpoint, images, "a red circle on the left")
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)


def test_letterbox_pixels_match_reference(hps, image_files):
    for path in image_files:
        image = Image.open(path).convert("RGB")
        torch.testing.assert_close(hps.preprocess_reference(image), reference_preprocess(image), atol=0, rtol=0)


def test_batch_equals_one_by_one(hps, image_files):
    prompts = ["one", "two blue squares", "one", "a", "three green triangles at the top"]
    batched = hps.score(image_files, prompts, batch_size=5)
    single = torch.cat([hps.score([p], [q]) for p, q in zip(image_files, prompts)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_text_features_cached_per_prompt(hps, image_files, monkeypatch):
    hps._text_cache.clear()
    calls = []
    original = hps._encode_text
    monkeypatch.setattr(hps, "_encode_text", lambda prompts: calls.append(list(prompts)) or original(prompts))
    hps.score(image_files, "same prompt")
    hps.score(image_files, ["same prompt", "other"] * 2 + ["other"])
    assert calls == [["same prompt"], ["other"]]


def test_tensor_path_differentiable_and_close(hps, image_files):
    image = Image.open(image_files[0]).convert("RGB")
    x = TF.to_tensor(image).unsqueeze(0).requires_grad_(True)
    score = hps(x, "a prompt")
    score.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # identical ops on identical pixels: the tensor path equals the file path
    torch.testing.assert_close(score.detach(), hps.score([image], "a prompt"), atol=1e-6, rtol=1e-6)


def test_rgba_and_palette_inputs(hps, tmp_path):
    rgba = tiny.random_image(7, (200, 150), "RGBA")
    rgba.save(tmp_path / "rgba.png")
    tiny.random_image(8, (150, 200), "P").save(tmp_path / "p.png")
    scores = hps.score([tmp_path / "rgba.png", tmp_path / "p.png"], "x")
    assert torch.isfinite(scores).all()
    torch.testing.assert_close(scores[:1], hps.score([rgba.convert("RGB")], "x"))


def test_architecture_mismatch_is_reported(hps_checkpoint, tmp_path):
    state = torch.load(hps_checkpoint, weights_only=True)["state_dict"]
    state["extra.weight"] = torch.zeros(1)
    del state["logit_scale"]
    bad = tmp_path / "bad.pt"
    torch.save({"state_dict": state}, bad)
    with pytest.raises(StateDictMismatchError) as info:
        mmalign.load_reward("hpsv2", weights=str(bad), arch=tiny.TINY_OPEN_CLIP)
    assert "logit_scale" in str(info.value) and "extra.weight" in str(info.value)


def test_safetensors_copy_loads_same(hps, hps_checkpoint, tmp_path, image_files):
    from safetensors.torch import save_file

    state = torch.load(hps_checkpoint, weights_only=True)["state_dict"]
    path = tmp_path / "hps.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    other = mmalign.load_reward("hpsv2.1", weights=str(path), arch=tiny.TINY_OPEN_CLIP)
    torch.testing.assert_close(other.score(image_files[:2], "p"), hps.score(image_files[:2], "p"))


def test_bf16_close_to_fp32_without_ties(hps_checkpoint, hps, image_files):
    bf16 = mmalign.load_reward("hpsv2.1", weights=str(hps_checkpoint), arch=tiny.TINY_OPEN_CLIP, dtype="bf16")
    a, b = hps.score(image_files, "p"), bf16.score(image_files, "p")
    assert b.dtype == torch.float32
    assert (a - b).abs().max() < 0.02
    assert len(set(b.tolist())) == len(image_files)


def test_letterbox_geometry():
    from mmalign.rewards.preprocess import letterbox

    x = torch.ones(1, 3, 100, 400)
    y = letterbox(x, 224)
    assert y.shape == (1, 3, 224, 224)
    rows = y[0, 0].abs().sum(dim=1) > 0
    assert rows.sum() == 56 and rows[84:140].all()  # 224 * 100/400 = 56 rows, top pad 168 // 2


def test_longest_side_already_model_size_is_letterboxed(hps):
    """Deliberate difference: the reference's ResizeMaxSize leaves a 224x100 image unpadded (and the tower then
    fails on 113 tokens); mmalign pads it, so it scores like the same image letterboxed by hand."""
    size = hps.image_size
    height = size * 100 // 224
    generator = torch.Generator().manual_seed(0)
    array = (torch.rand(height, size, 3, generator=generator) * 255).round().to(torch.uint8).numpy()
    image = Image.fromarray(array)  # width = size (the longest side), height < size
    pixels = TF.to_tensor(image)
    pad = size - height
    by_hand = TF.pad(pixels, [0, pad // 2, 0, pad - pad // 2], fill=0)  # left, top, right, bottom
    assert by_hand.shape == (3, size, size)
    expected = hps.score_pixels(((by_hand - MEAN) / STD).unsqueeze(0), ["a red circle"])
    torch.testing.assert_close(hps.preprocess_reference(image), (by_hand - MEAN) / STD, atol=1e-6, rtol=0)
    torch.testing.assert_close(hps.score([image], "a red circle"), expected, atol=1e-6, rtol=1e-5)
