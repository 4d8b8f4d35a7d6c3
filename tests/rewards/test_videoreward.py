"""VideoReward (VideoAlign): a tiny Qwen2-VL reward in the published folder layout (model_config.json,
checkpoint-<step>/model.pth of the peft-wrapped 4.45 class, checkpoint-<step>/tokenizer), loaded through the real
loader and checked against an independent re-derivation of the published computation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import mmalign
from mmalign.errors import WeightsError
from mmalign.rewards.qwen2vl import build_backbone, load_backbone_config, load_tokenizer
from mmalign.rewards.videoreward import DETAILED_PROMPT_WITH_SPECIAL_TOKEN, REWARD_TOKENS, build_prompt, sample_indices
from tests import qwen2vl_tiny

INFERENCE = {"VQ_mean": 0.5, "VQ_std": 2.0, "MQ_mean": -0.25, "MQ_std": 0.5, "TA_mean": 1.0, "TA_std": 4.0}
LORA_R, LORA_ALPHA = 4, 8


def _settings(folder):
    return {
        "data_config": {
            "max_frame_pixels": 280 * 364,
            "fps": 2.0,
            "num_frames": None,
            "eval_dim": ["VQ", "MQ", "TA"],
            "prompt_template_type": "detailed_special",
            "sample_type": "uniform",
        },
        "model_config": {
            "model_name_or_path": str(folder),
            "output_dim": 1,
            "use_special_tokens": True,
            "reward_token": "special",
        },
        "peft_lora_config": {"lora_enable": True, "lora_r": LORA_R, "lora_alpha": LORA_ALPHA, "use_rslora": False},
        "inference_config": INFERENCE,
    }


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """The folder VideoReward publishes, with a peft-style model.pth (LoRA on q_proj of layer 0)."""
    root = tmp_path_factory.mktemp("videoreward")
    backbone_folder = qwen2vl_tiny.write_backbone_folder(
        root / "Qwen2-VL-tiny", layers=1, corpus=DETAILED_PROMPT_WITH_SPECIAL_TOKEN
    )
    checkpoint = root / "release" / "checkpoint-7"
    tokenizer = load_tokenizer(backbone_folder, REWARD_TOKENS)
    tokenizer.save_pretrained(str(checkpoint / "tokenizer"))
    backbone = build_backbone(load_backbone_config(backbone_folder, len(tokenizer)), torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in backbone.named_parameters():
            parameter.copy_(
                torch.randn(parameter.shape, generator=generator) / max(1, parameter.shape[-1]) ** 0.5
                + (1.0 if "norm" in name and parameter.ndim == 1 else 0.0)
            )
    head = nn.Linear(32, 1, bias=False)
    module = {f"backbone.{k}": v for k, v in backbone.state_dict().items()} | {"rm_head.weight": head.weight.data}
    plain = qwen2vl_tiny.reference_keys_from_module(module)
    peft = {}
    target = "model.layers.0.self_attn.q_proj"
    lora_a, lora_b = torch.randn(LORA_R, 32, generator=generator), torch.randn(32, LORA_R, generator=generator)
    for key, value in plain.items():
        if key.startswith(target + ".weight"):
            peft[f"base_model.model.{target}.base_layer.weight"] = value
        elif key == "rm_head.weight":
            peft["base_model.model.rm_head.original_module.weight"] = torch.zeros_like(value)
            peft["base_model.model.rm_head.modules_to_save.default.weight"] = value
        else:
            peft[f"base_model.model.{key}"] = value
    peft[f"base_model.model.{target}.lora_A.default.weight"] = lora_a
    peft[f"base_model.model.{target}.lora_B.default.weight"] = lora_b
    peft["base_model.model.lm_head.weight"] = torch.randn(len(tokenizer), 32)
    torch.save(peft, checkpoint / "model.pth")
    (root / "release" / "model_config.json").write_text(json.dumps(_settings(backbone_folder)))
    merged = dict(module)
    merged["backbone.language_model.layers.0.self_attn.q_proj.weight"] = module[
        "backbone.language_model.layers.0.self_attn.q_proj.weight"
    ] + lora_b @ lora_a * (LORA_ALPHA / LORA_R)
    return root / "release", backbone_folder, merged


@pytest.fixture(scope="module")
def videoreward(release):
    return mmalign.load_reward("videoreward", weights=str(release[0]))


def test_sampling_at_two_fps():
    # 30 frames at 10 fps = 3 s -> 6 frames; clamped to [4, total]; even; linspace rounded half to even
    assert sample_indices(30, 10.0) == [0, 6, 12, 17, 23, 29]
    assert sample_indices(10, 30.0) == [0, 3, 6, 9]  # 0.67 frames -> at least 4
    assert sample_indices(5, 1.0) == [0, 1, 3, 4]  # 10 wanted, 5 there: floor to even 4, over 0..4
    with pytest.raises(ValueError):
        sample_indices(1, 1.0)


def _rederived(release, videos, prompts):
    """The published computation written out independently: sequential positions, head at the three reward
    tokens, per-dimension (r - mean) / std, Overall = sum."""
    folder, backbone_folder, merged = release
    tokenizer = load_tokenizer(folder / "checkpoint-7" / "tokenizer", REWARD_TOKENS)
    model = build_backbone(load_backbone_config(backbone_folder, len(tokenizer)), torch.float32).eval()
    model.load_state_dict({k[len("backbone.") :]: v for k, v in merged.items() if k.startswith("backbone.")})
    weight = merged["rm_head.weight"]
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    rows = []
    for video, prompt in zip(videos, prompts):
        frames = (video - mean) / std  # 280x364: multiples of 28, within [128*28*28, max_frame_pixels]
        t, _, h, w = frames.shape
        x = frames.reshape(t // 2, 2, 3, h // 28, 2, 14, w // 28, 2, 14).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        patches = x.reshape(-1, 3 * 2 * 14 * 14)
        grid = torch.tensor([[t // 2, h // 14, w // 14]])
        text = (
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
            + "<|video_pad|>" * (int(grid.prod()) // 4)
            + "<|vision_end|>"
            + build_prompt(prompt, ["VQ", "MQ", "TA"], "detailed_special")
            + "<|im_end|>\n<|im_start|>assistant\n"
        )
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        embeds = model.language_model.embed_tokens(ids)
        vision = model.visual(patches, grid_thw=grid).pooler_output
        embeds[ids == model.config.video_token_id] = vision
        hidden = model.language_model(inputs_embeds=embeds).last_hidden_state[0]  # default: sequential positions
        where = [int((ids[0] == tokenizer.convert_tokens_to_ids(tok)).nonzero()) for tok in REWARD_TOKENS]
        raw = hidden[where] @ weight.T
        rows.append(raw[:, 0])
    raw = torch.stack(rows)
    out = {}
    for index, dim in enumerate(("VQ", "MQ", "TA")):
        out[dim] = (raw[:, index] - INFERENCE[f"{dim}_mean"]) / INFERENCE[f"{dim}_std"]
    out["Overall"] = out["VQ"] + out["MQ"] + out["TA"]
    return out


def test_equals_rederivation(videoreward, release):
    torch.manual_seed(0)
    videos = torch.rand(2, 4, 3, 280, 364)
    prompts = ["a cat walking in snow", "camera"]
    with torch.no_grad():
        ours = videoreward.score_detailed(videos, prompts)
        expected = _rederived(release, videos, prompts)
    for dim in ("VQ", "MQ", "TA", "Overall"):
        torch.testing.assert_close(ours.get(dim), expected[dim], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.Overall, ours.VQ + ours.MQ + ours.TA)
    assert (ours.VQ - ours.MQ).abs().max() > 1e-3  # three different dimensions


def test_dimensions_registered(release):
    vq = mmalign.load_reward("videoreward-vq", weights=str(release[0]))
    assert vq.dimension == "VQ" and vq.name == "videoreward-vq" and vq.modality == "video"
    with pytest.raises(ValueError, match="dimension"):
        mmalign.load_reward("videoreward", weights=str(release[0]), dimension="XX")


def test_tensor_path_differentiable_and_files(videoreward, tmp_path):

    torch.manual_seed(1)
    video = torch.rand(1, 6, 3, 60, 90, requires_grad=True)
    score = videoreward.score_tensor(video, "cat", video_fps=4.0)
    score.sum().backward()
    assert score.shape == (1,) and video.grad.abs().sum() > 0
    path = tmp_path / "clip.mkv"
    frames = (np.random.default_rng(0).random((10, 60, 90, 3)) * 255).astype(np.uint8)
    write_clip(path, frames, rate=5)
    decoded = videoreward.decode(path)
    assert decoded.indices == [0, 3, 6, 9]  # 2 s at 2 fps = 4 frames
    by_file = videoreward.score([path], "cat")
    tensor = torch.from_numpy(frames[decoded.indices]).permute(0, 3, 1, 2).float().div(255).unsqueeze(0)
    assert abs(by_file.item() - videoreward.score_tensor(tensor, "cat").item()) < 0.05


def test_bad_release_named_in_error(release, tmp_path):
    with pytest.raises(WeightsError, match="model_config.json"):
        mmalign.load_reward("videoreward", weights=str(tmp_path))
    (tmp_path / "model_config.json").write_text(json.dumps(_settings(release[1])))
    with pytest.raises(WeightsError, match="checkpoint-<step>"):
        mmalign.load_reward("videoreward", weights=str(tmp_path))
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(WeightsError, match="LoRA-only"):
        mmalign.load_reward("videoreward", weights=str(tmp_path))


def test_lora_scaling_math():
    from mmalign.rewards.qwen2vl import convert_reference_state_dict

    base, a, b = torch.randn(3, 3), torch.randn(2, 3), torch.randn(3, 2)
    out = convert_reference_state_dict(
        {
            "base_model.model.model.x.base_layer.weight": base,
            "base_model.model.model.x.lora_A.default.weight": a,
            "base_model.model.model.x.lora_B.default.weight": b,
        },
        lora_scaling=2.0,
    )
    torch.testing.assert_close(out["backbone.language_model.x.weight"], base + 2.0 * b @ a)
    assert math.isclose(8 / 4, 2.0)


def test_mmalign_score_writes_a_native_video_record(release, tmp_path):
    """``mmalign score --reward videoreward CLIP``: the reward scores the file natively (no lifting), and the JSONL
    record says so (``aggregate`` "native") with the score the reward gives the same file."""

    from mmalign.cli import main

    path = write_clip(tmp_path / "clip.mkv", (np.random.default_rng(2).random((6, 60, 90, 3)) * 255).astype(np.uint8))
    out = tmp_path / "scores.jsonl"
    code = main(["score", "--reward", "videoreward", "--weights", str(release[0]), "--prompt", "cat"]
                + ["--out", str(out), "--no-progress", str(path)])  # fmt: skip
    assert code == 0
    record = json.loads(out.read_text().splitlines()[0])
    assert record["modality"] == "video" and record["aggregate"] == "native"
    expected = mmalign.load_reward("videoreward", weights=str(release[0])).score([path], "cat").item()
    assert abs(record["score"] - expected) < 1e-5


def write_clip(path, frames, rate: int = 4):
    """A lossless FFV1 clip of ``frames`` (uint8 ``[T, H, W, 3]``)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=rate)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "bgr0"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
