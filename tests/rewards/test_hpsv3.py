"""HPSv3: a tiny Qwen2-VL reward saved in the published layout (``HPSv3.safetensors`` of the 4.45 class),
loaded through the real loader. Parity with the hpsv3 package itself: benchmarks/parity_hpsv3.py (own env)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

import mmalign
from mmalign.errors import StateDictMismatchError, WeightsError
from mmalign.rewards.hpsv3 import INSTRUCTION, PROMPT_WITH_REWARD_TOKEN, build_hpsv3_text
from mmalign.rewards.qwen2vl import build_backbone, load_backbone_config, load_tokenizer, patchify, smart_resize
from tests import qwen2vl_tiny


def _randomise(module: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator) / max(1, parameter.shape[-1]) ** 0.5
            parameter.copy_(noise + (1.0 if "norm" in name and parameter.ndim == 1 else 0.0))


@pytest.fixture(scope="module")
def hpsv3_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("hpsv3")
    folder = qwen2vl_tiny.write_backbone_folder(root / "backbone", corpus=INSTRUCTION + PROMPT_WITH_REWARD_TOKEN)
    tokenizer = load_tokenizer(folder, ("<|Reward|>",))
    backbone = build_backbone(load_backbone_config(folder, len(tokenizer)), torch.float32)
    head = nn.Sequential(
        nn.Linear(32, 1024), nn.ReLU(), nn.Dropout(0.05), nn.Linear(1024, 16), nn.ReLU(), nn.Linear(16, 2)
    )
    _randomise(backbone, 0)
    _randomise(head, 1)
    module_keys = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    module_keys |= {f"rm_head.{k}": v for k, v in head.state_dict().items()}
    state = qwen2vl_tiny.reference_keys_from_module(module_keys)
    state["lm_head.weight"] = torch.randn(len(tokenizer), 32)
    save_file(state, str(root / "HPSv3.safetensors"))
    rng = np.random.default_rng(0)
    images = []
    for index, (height, width) in enumerate([(120, 160), (200, 200), (90, 300)]):
        path = root / f"image{index}.png"
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
        images.append(path)
    return root, folder, images


@pytest.fixture(scope="module")
def hpsv3(hpsv3_files):
    root, folder, _ = hpsv3_files
    return mmalign.load_reward("hpsv3", weights=str(root / "HPSv3.safetensors"), backbone=str(folder))


def test_published_layout_keys(hpsv3_files):
    keys = set(load_file(str(hpsv3_files[0] / "HPSv3.safetensors")))
    assert {
        "model.embed_tokens.weight",
        "visual.patch_embed.proj.weight",
        "rm_head.0.weight",
        "rm_head.3.weight",
        "rm_head.5.weight",
        "lm_head.weight",
    } <= keys


def test_mu_sigma_shapes_and_determinism(hpsv3, hpsv3_files):
    images = hpsv3_files[2]
    first = hpsv3.score_detailed(images, ["a red circle", "two blue squares", "camera"])
    again = hpsv3.score_detailed(images[:1], ["a red circle"])
    assert first.mu.shape == first.sigma.shape == (3,)
    torch.testing.assert_close(first.mu[:1], again.mu, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(first.mu, first.sigma)
    assert hpsv3.info()["higher_is_better"] and hpsv3.modality == "image"


def test_batch_equals_one_by_one(hpsv3, hpsv3_files):
    images, prompts = hpsv3_files[2], ["a", "two blue squares in snow", "cat"]
    batched = hpsv3.score(images, prompts, batch_size=3)
    single = torch.cat([hpsv3.score([i], [p]) for i, p in zip(images, prompts)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_image_size_and_patch_layout(hpsv3, hpsv3_files):
    """min = max = 256*28*28 pixels: sides grow (ceil) to multiples of 28; the patch order is
    Qwen2VLImageProcessor's (checked against transformers' own PIL image processor)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image = Image.open(hpsv3_files[2][0]).convert("RGB")
    pixels = hpsv3.preprocess_reference(image)
    assert tuple(pixels.shape[1:]) == smart_resize(120, 160, 28, 200704, 200704) == (392, 532)
    patches, grid = patchify(pixels.unsqueeze(0))
    assert grid.tolist() == [1, 28, 38] and int(grid.prod()) // 4 == 266
    resized = image.resize((532, 392), Image.BICUBIC)
    processor = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056)
    expected = processor(images=[resized], return_tensors="pt")
    torch.testing.assert_close(patches, expected["pixel_values"], atol=1e-5, rtol=1e-5)
    assert expected["image_grid_thw"][0].tolist() == grid.tolist()


def test_prompt_holds_one_reward_token(hpsv3):
    text = hpsv3.chat_text(build_hpsv3_text("a cat"), "image")
    assert text.startswith(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>\nYou are tasked with evaluating"
    )
    assert text.count("<|Reward|>") == 1 and text.endswith("END\n<|im_end|>\n<|im_start|>assistant\n")
    assert "Textual prompt - a cat\n" in text


def test_tensor_path_is_differentiable(hpsv3):
    images = torch.rand(2, 3, 64, 80, requires_grad=True)
    scores = hpsv3.score_tensor(images, "a red circle")
    assert scores.shape == (2,)
    scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_tensor_path_close_to_file_path(hpsv3, hpsv3_files):
    path = hpsv3_files[2][1]  # 200x200: resized to 448x448 either way
    array = np.asarray(Image.open(path).convert("RGB"))
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(255).unsqueeze(0)
    by_file, by_tensor = hpsv3.score([path], "cat"), hpsv3.score_tensor(tensor, "cat").detach()
    assert (by_file - by_tensor).abs().max() < 0.05  # PIL vs torch bicubic resampling only


def test_bad_checkpoints_named_in_error(hpsv3_files, tmp_path):
    root, folder, _ = hpsv3_files
    state = load_file(str(root / "HPSv3.safetensors"))
    missing = dict(state)
    del missing["model.layers.0.mlp.up_proj.weight"]
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(StateDictMismatchError, match="missing.safetensors") as caught:
        mmalign.load_reward("hpsv3", weights=str(tmp_path / "missing.safetensors"), backbone=str(folder))
    assert "language_model.layers.0.mlp.up_proj.weight" in str(caught.value)
    extra = dict(state) | {"rm_head.9.weight": torch.zeros(2, 2)}
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(StateDictMismatchError, match="rm_head.9.weight"):
        mmalign.load_reward("hpsv3", weights=str(tmp_path / "extra.safetensors"), backbone=str(folder))
    headless = {k: v for k, v in state.items() if not k.startswith("rm_head")}
    save_file(headless, str(tmp_path / "headless.safetensors"))
    with pytest.raises(WeightsError, match="headless.safetensors.*reward head"):
        mmalign.load_reward("hpsv3", weights=str(tmp_path / "headless.safetensors"), backbone=str(folder))
    with pytest.raises(WeightsError, match="no config.json"):
        mmalign.load_reward("hpsv3", weights=str(root / "HPSv3.safetensors"), backbone=str(tmp_path))


def test_memory_aware_loading(hpsv3_files, monkeypatch):
    """``dtype="auto"`` is bf16 where the CPU computes bf16 natively, fp32 elsewhere; a model that cannot fit is
    refused before its checkpoint is read, with the figures (parameters, GiB needed, GiB free)."""
    from mmalign import memory
    from mmalign.errors import WeightsError

    root, folder, _ = hpsv3_files
    weights = str(root / "HPSv3.safetensors")
    monkeypatch.setattr(memory, "cpu_flags", lambda: {"avx2", "avx512_bf16"})
    assert mmalign.load_reward("hpsv3", weights=weights, backbone=str(folder), dtype="auto").dtype == torch.bfloat16
    monkeypatch.setattr(memory, "cpu_flags", lambda: {"avx2"})
    assert mmalign.load_reward("hpsv3", weights=weights, backbone=str(folder), dtype="auto").dtype == torch.float32
    monkeypatch.setattr(memory, "free_device_memory", lambda device: 1024)
    read = []
    monkeypatch.setattr("mmalign.rewards.hpsv3.load_state_dict", lambda *a, **k: read.append(a) or {})
    with pytest.raises(WeightsError, match=r"HPSv3 .*B parameters in float32 need .* GiB to load on cpu.*bf16"):
        mmalign.load_reward("hpsv3", weights=weights, backbone=str(folder))
    assert not read  # refused before the checkpoint was read


def test_placed_over_cpu_and_disk_scores_as_loaded_whole(hpsv3, hpsv3_files, tmp_path):
    """``device_map`` (accelerate's placement; on a GPU machine the GPUs first): the backbone's blocks beyond the
    CPU budget offloaded to disk and read back per forward give the same scores."""
    root, folder, images = hpsv3_files
    size = sum(p.numel() * 4 for p in hpsv3.backbone.parameters())
    placed = mmalign.load_reward(
        "hpsv3",
        weights=str(root / "HPSv3.safetensors"),
        backbone=str(folder),
        device_map="sequential",
        max_memory={"cpu": size},  # less the largest block accelerate keeps free: some decoder layers go to disk
        offload_folder=tmp_path,
    )
    assert {str(v) for v in placed.placement.values()} == {"cpu", "disk"} and placed.device == torch.device("cpu")
    assert placed.to("cpu") is placed  # the placement stays
    prompts = ["a red circle", "two blue squares", "camera"]
    expected = hpsv3.score_detailed(images, prompts)
    scores = placed.score_detailed(images, prompts)
    torch.testing.assert_close(scores.mu, expected.mu, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores.sigma, expected.sigma, atol=1e-5, rtol=1e-5)
