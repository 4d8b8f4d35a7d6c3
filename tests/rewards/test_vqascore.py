"""VQAScore: tiny Qwen2.5-VL / Qwen2-VL chat models saved in the releases' layout (flat config.json, safetensors
with ``model.*`` / ``visual.*`` / ``lm_head.*`` keys, tokenizer, chat template, generation_config.json with a
repetition penalty), loaded through the real loader and checked against P("Yes") re-derived by hand from the
model's logits on inputs made by transformers' own Qwen-VL processor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import mmalign
from mmalign.errors import MediaError, StateDictMismatchError
from mmalign.rewards.vqascore import video_frame_count, video_indices, video_size
from tests import qwen2vl_tiny

PROMPTS = ["a red circle", "two blue squares"]


def _write_video(path, frames, rate):
    """Lossless RGB (ffv1, bgr0) so the decoded frames equal ``frames``."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=rate)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "bgr0"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqascore")
    folders = {kind: qwen2vl_tiny.write_chat_model(root / kind, kind) for kind in ("qwen2_5_vl", "qwen2_vl")}
    rng = np.random.default_rng(0)
    images = []
    for index, (height, width) in enumerate([(60, 80), (90, 50)]):
        path = root / f"image{index}.png"
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
        images.append(path)
    videos = []
    for index, (count, rate) in enumerate([(12, 12), (9, 3)]):
        path = root / f"clip{index}.mkv"
        frames = rng.integers(0, 255, (count, 40, 60, 3), dtype=np.uint8)
        _write_video(path, frames, rate)
        videos.append((path, frames, rate))
    return folders, images, videos


@pytest.fixture(scope="module")
def vqa(files):
    return mmalign.load_reward("vqascore", weights=str(files[0]["qwen2_5_vl"]))


def _by_hand(folder, model_type, text_prompt, image=None, frames=None, sample_fps=None):
    """P("Yes") written out: transformers' processor on qwen-vl-utils-resized media, the full model's logits at
    the last prompt position, generation_config's repetition penalty over the prompt ids, softmax."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    cls = Qwen2_5_VLForConditionalGeneration if model_type == "qwen2_5_vl" else Qwen2VLForConditionalGeneration
    model = cls.from_pretrained(str(folder), attn_implementation="sdpa").eval()
    processor = AutoProcessor.from_pretrained(str(folder))
    kind = "image" if image is not None else "video"
    question = f'Does this figure show "{text_prompt}"? Please answer Yes or No.'
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": question}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text.endswith(f"{question}<|im_end|>\n<|im_start|>assistant\n")
    if image is not None:
        inputs = processor(text=[text], images=[image], do_resize=False, return_tensors="pt")
    else:
        inputs = processor(text=[text], videos=[frames], do_resize=False, do_sample_frames=False, return_tensors="pt")
        if model_type == "qwen2_5_vl":
            inputs["second_per_grid_ts"] = torch.tensor([2.0 / sample_fps])
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1].float()
    seen = torch.unique(inputs["input_ids"][0])
    logits[seen] = torch.where(logits[seen] > 0, logits[seen] / 1.05, logits[seen] * 1.05)
    yes = processor.tokenizer.encode("Yes", add_special_tokens=False)
    assert len(yes) == 1
    return torch.softmax(logits, dim=-1)[yes[0]].item()


def test_frame_sampling_and_sizes():
    # 12 frames at 12 fps = 1 s at 8 fps -> 8 frames; 9 at 3 fps = 3 s -> 24 wanted, at most 9, floor even -> 8
    assert video_indices(12, 12.0) == [0, 2, 3, 5, 6, 8, 9, 11]
    assert video_frame_count(9, 3.0) == 8 and video_frame_count(3, 30.0) == 2
    with pytest.raises(ValueError, match="too short"):
        video_frame_count(1, 1.0)
    # 40x60 frames grow to at least 128*28*28 pixels; max 360*420
    assert video_size(40, 60, 8) == (280, 392) and video_size(720, 1280, 8) == (280, 504)


def test_image_equals_by_hand(vqa, files):
    folders, images, _ = files
    assert vqa.info()["higher_is_better"] and vqa.modality == "image" and vqa.repetition_penalty == 1.05
    ours = vqa.score(images, PROMPTS)
    for path, prompt, value in zip(images, PROMPTS, ours.tolist()):
        image = Image.open(path).convert("RGB")
        resized = image.resize((84, 56) if image.width == 80 else (56, 84))  # smart_resize: 4*28*28 minimum
        assert vqa.preprocess_image_file(image).shape[-2:] == (resized.height, resized.width)
        expected = _by_hand(folders["qwen2_5_vl"], "qwen2_5_vl", prompt, image=resized)
        assert value == pytest.approx(expected, abs=1e-5)
    assert ((ours > 0) & (ours < 1)).all()


@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen2_vl"])
def test_video_equals_by_hand(files, model_type):
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    folders, _, videos = files
    reward = mmalign.load_reward("vqascore-video", weights=str(folders[model_type]))
    assert reward.modality == "video" and reward.name == "vqascore-video"
    path, frames, rate = videos[0]
    decoded = reward.decode(path)
    assert decoded.indices == [0, 2, 3, 5, 6, 8, 9, 11] and decoded.sample_fps == pytest.approx(8.0)
    np.testing.assert_array_equal(decoded.frames, frames[decoded.indices])
    ours = reward.score([path], "a cat walking in snow").item()
    picked = torch.from_numpy(frames[decoded.indices]).permute(0, 3, 1, 2)
    resized = TF.resize(picked, [280, 392], interpolation=InterpolationMode.BICUBIC, antialias=True)
    expected = _by_hand(folders[model_type], model_type, "a cat walking in snow", frames=resized, sample_fps=8.0)
    assert ours == pytest.approx(expected, abs=1e-5)


def test_batch_equals_one_by_one(vqa, files):
    _, images, videos = files
    batched = vqa.score(images, PROMPTS, batch_size=2)
    single = torch.cat([vqa.score([i], [p]) for i, p in zip(images, PROMPTS)])
    torch.testing.assert_close(batched, single, atol=1e-6, rtol=1e-5)
    video = mmalign.load_reward("vqascore-video", weights=str(files[0]["qwen2_5_vl"]))
    paths = [path for path, _, _ in videos]
    batched = video.score(paths, ["cat", "a much longer prompt about two blue squares"], batch_size=2)
    single = torch.cat(
        [video.score([paths[0]], "cat"), video.score([paths[1]], "a much longer prompt about two blue squares")]
    )
    torch.testing.assert_close(batched, single, atol=1e-6, rtol=1e-5)


def test_repetition_penalty_off_is_plain_softmax(files):
    folders, images, _ = files
    plain = mmalign.load_reward("vqascore", weights=str(folders["qwen2_5_vl"]), repetition_penalty=1.0)
    from mmalign.rewards.vqascore import VisualInput

    pixels = plain.preprocess_image_file(Image.open(images[0]))
    with torch.no_grad():
        logits = plain.answer_logits([VisualInput(pixels, "image")], ["cat"])
        score = plain.score([images[0]], "cat")
    assert score.item() == pytest.approx(torch.softmax(logits, -1)[0, plain.answer_token_id].item(), abs=1e-7)


def test_tensor_paths_differentiable(vqa, files):
    images = torch.rand(2, 3, 50, 70, requires_grad=True)
    scores = vqa.score_tensor(images, "a red circle")
    scores.sum().backward()
    assert scores.shape == (2,) and images.grad.abs().sum() > 0
    video_reward = mmalign.load_reward("vqascore-video", weights=str(files[0]["qwen2_5_vl"]))
    video = torch.rand(1, 12, 3, 40, 60, requires_grad=True)
    score = video_reward(video, "cat", video_fps=48.0)  # 0.25 s: 4 frames, indices 0, 4, 7, 11
    score.sum().backward()
    assert video.grad[0, 1].abs().sum() == 0 and video.grad[0, 4].abs().sum() > 0  # frame 1 is not sampled
    # the tensor path resizes in float without uint8 rounding: close to the file path, not equal
    path, frames, _ = files[2][0]
    as_tensor = torch.from_numpy(frames).permute(0, 3, 1, 2).float().div(255).unsqueeze(0)
    by_file = video_reward.score([path], "cat").item()
    assert abs(video_reward.score_tensor(as_tensor, "cat", video_fps=12.0).item() - by_file) < 0.02


def test_bad_inputs_name_the_item(vqa, files, tmp_path):
    _, images, videos = files
    missing = tmp_path / "missing.png"
    with pytest.raises(MediaError, match="missing.png"):
        vqa.score([images[0], missing], "cat")
    thin = tmp_path / "thin.png"
    Image.new("RGB", (900, 2)).save(thin)
    with pytest.raises(ValueError, match=r"item 1 \(.*thin.png\): aspect ratio"):
        vqa.score([images[0], thin], "cat")
    with pytest.raises(ValueError, match=r"item 0: a video of 1 frame"):
        vqa.score_tensor(torch.rand(2, 1, 3, 40, 60), "cat", video_fps=5.0)
    still = tmp_path / "still.mkv"
    _write_video(still, np.zeros((1, 40, 60, 3), dtype=np.uint8), 5)
    video = mmalign.load_reward("vqascore-video", weights=str(files[0]["qwen2_5_vl"]))
    with pytest.raises(MediaError, match=r"still.mkv: a video of 1 frame"):
        video.score([videos[0][0], still], "cat")
    with pytest.raises(ValueError, match="2 prompts for 1"):
        vqa.score([images[0]], ["a", "b"])
    with pytest.raises(ValueError, match="float tensor"):
        vqa.score_tensor(torch.zeros(1, 3, 40, 40, dtype=torch.uint8), "cat")


def test_bad_checkpoint_named(files, tmp_path):
    import shutil

    from safetensors.torch import load_file

    source = files[0]["qwen2_5_vl"]
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    state = load_file(str(broken / "model.safetensors"))
    del state["model.layers.0.mlp.up_proj.weight"]
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(StateDictMismatchError, match="broken.*\n.*missing keys: .*layers.0.mlp.up_proj"):
        mmalign.load_reward("vqascore", weights=str(broken))


@pytest.mark.parametrize("name", ["vqascore", "vqascore-video"])
def test_mmalign_score_command(files, tmp_path, name):
    import json

    from mmalign.cli import main

    folders, images, videos = files
    media = [str(images[0])] if name == "vqascore" else [str(videos[0][0])]
    out = tmp_path / "scores.jsonl"
    argv = ["score", "--reward", name, "--weights", str(folders["qwen2_5_vl"]), "--prompt", "cat"]
    assert main([*argv, "--out", str(out), "--no-progress", *media]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    reward = mmalign.load_reward(name, weights=str(folders["qwen2_5_vl"]))
    assert rows[0]["reward"] == name and rows[0]["score"] == pytest.approx(reward.score(media, "cat").item(), abs=1e-6)


def test_mrope_positions_follow_the_releases_rule():
    """Text after a video restarts at the block's largest position + 1 (transformers 4.x, the releases' code), also
    when the temporal extent passes the spatial one (where transformers 5.24's own get_rope_index differs)."""
    from mmalign.rewards.vqascore import mrope_positions

    # [text x2][video: t=3 grids of 2x2 merged tokens][text x2][pad]; Qwen2.5-VL step 1 s/grid * 2 tokens/s
    ids = torch.tensor([[5, 5, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 5, 5, 0]])
    mask = torch.ones_like(ids)
    mask[0, -1] = 0
    types = (ids == 9).int() * 2
    grids = torch.tensor([[3, 4, 4]])
    positions = mrope_positions(ids, mask, grids, types, 2, second_per_grid=[1.0], tokens_per_second=2)
    assert positions[0, 0].tolist() == [0, 1] + [2] * 4 + [4] * 4 + [6] * 4 + [7, 8, 1]
    assert positions[1, 0].tolist() == [0, 1] + [2, 2, 3, 3] * 3 + [7, 8, 1]
    assert positions[2, 0].tolist() == [0, 1] + [2, 3, 2, 3] * 3 + [7, 8, 1]
    plain = mrope_positions(ids, mask, grids, types, 2)  # Qwen2-VL: t, no scaling
    assert plain[0, 0].tolist() == [0, 1] + [2] * 4 + [3] * 4 + [4] * 4 + [5, 6, 1]


def test_trainer_reward_spec(files):
    """The trainers' reward spec loads it; images of an image generator and videos of a video one are scored."""
    from mmalign.trainers.online import build_reward, for_modality

    folder = str(files[0]["qwen2_5_vl"])
    images = torch.rand(2, 3, 48, 48, requires_grad=True)
    scores = build_reward("vqascore", weights=folder)(images, ["a", "b"])
    scores.sum().backward()
    assert scores.shape == (2,) and images.grad.abs().sum() > 0
    video = for_modality(build_reward("vqascore-video", weights=folder), "video")
    assert video(torch.rand(1, 4, 3, 40, 60), ["cat"]).shape == (1,)


def test_placed_over_cpu_and_disk_scores_as_loaded_whole(vqa, files, tmp_path):
    """``device_map`` through transformers' loader (the map inferred per block, not merged): the blocks beyond the
    CPU budget on disk give the same P("Yes"), and the reward stays placed."""
    size = sum(p.numel() * 4 for p in vqa.parameters())
    placed = mmalign.load_reward(
        "vqascore",
        weights=str(files[0]["qwen2_5_vl"]),
        device_map="sequential",
        max_memory=f"cpu={size // 2}",
        offload_folder=tmp_path,
    )
    assert {str(v) for v in placed.placement.values()} == {"cpu", "disk"} and placed.to("cpu") is placed
    images = torch.rand(2, 3, 56, 84, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(placed(images, PROMPTS), vqa(images, PROMPTS), atol=1e-6, rtol=1e-5)
