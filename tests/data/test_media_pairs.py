"""Video and audio preference pairs (VideoDPO / VideoAlign Flow-DPO JSONL of video paths; Tango 2 style .wav pairs): bad
videos named by their line when read, clips sampled, resized and cropped alike (training a tiny Wan on them:
tests/trainers/test_flow_trainers.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmalign.data import load_preferences
from mmalign.data.dataset import PreferenceDataset, VideoPairTransform
from mmalign.errors import MediaError
from tests.modalities.tiny_media import random_frames, write_video


def write_video_pairs(folder, count: int = 4, frames: int = 9):
    """Bright-over-dark video pairs (lossless ffv1, 48×64) and their JSONL; returns (path, the frames written)."""
    folder.mkdir(parents=True, exist_ok=True)
    written, lines = {}, []
    for i in range(count):
        bright = (random_frames(frames, seed=i) // 2 + 128).astype(np.uint8)
        dark = (random_frames(frames, seed=100 + i) // 3).astype(np.uint8)
        for name, clip in ((f"w{i}.mkv", bright), (f"l{i}.mkv", dark)):
            write_video(folder / name, clip)
            written[name] = clip
        lines.append({"prompt": ["a bright video", "light"][i % 2], "chosen": f"w{i}.mkv", "rejected": f"l{i}.mkv"})
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path, written


@pytest.fixture(scope="module")
def video_pairs(tmp_path_factory):
    return write_video_pairs(tmp_path_factory.mktemp("video-pairs"))


def test_bad_videos_are_rows_named_by_their_line(tmp_path):
    path, _ = write_video_pairs(tmp_path, count=1)
    (tmp_path / "broken.mp4").write_bytes(b"\x00not a video" * 50)
    with open(path, "a") as handle:
        handle.write(json.dumps({"prompt": "p", "chosen": "w0.mkv", "rejected": "missing.mkv"}) + "\n")
        handle.write(json.dumps({"prompt": "p", "chosen": "broken.mp4", "rejected": "l0.mkv"}) + "\n")
    pairs = load_preferences(path)
    assert len(pairs) == 1 and [pair.source for pair in pairs] == [f"{path} line 1"]
    reasons = dict(pairs.skipped)
    assert "video not found" in reasons[f"{path} line 2"] and "missing.mkv" in reasons[f"{path} line 2"]
    assert "broken.mp4" in reasons[f"{path} line 3"] and "cannot open" in reasons[f"{path} line 3"]


def test_clips_are_sampled_evenly_and_share_one_crop_and_flip(video_pairs):
    path, written = video_pairs
    pairs = load_preferences(path)
    transform = VideoPairTransform(32, frames=5, train=True, hflip=True, random_crop=True, seed=3)
    item = transform(pairs[0], 0)
    assert item["chosen_pixels"].shape == item["rejected_pixels"].shape == (5, 3, 32, 32)
    assert item["chosen_pixels"].min() >= -1 and item["chosen_pixels"].max() <= 1
    assert item["original_size"].tolist() == [48, 64]
    fx, fy, flip = transform._draws(0, 0)
    for side, name in (("chosen_pixels", "w0.mkv"), ("rejected_pixels", "l0.mkv")):
        source = written[name][[0, 2, 4, 6, 8]]  # 5 of 9 frames: linspace(0, 8, 5)
        expected = torch.stack([transform._apply(Image.fromarray(frame), fx, fy, flip)[0] for frame in source])
        torch.testing.assert_close(item[side], expected, rtol=0, atol=0)
    assert item["chosen_pixels"].mean() > item["rejected_pixels"].mean()


def test_a_clip_shorter_than_the_model_trains_on_names_its_pair_and_side(video_pairs):
    path, _ = video_pairs
    pairs = load_preferences(path)
    with pytest.raises(MediaError, match=r"line 1 chosen: .*w0\.mkv: 9 frames, fewer than the 13"):
        VideoPairTransform(32, frames=13)(pairs[0], 0)
    dataset = PreferenceDataset(list(pairs), 32, frames=5)
    assert dataset[0]["chosen_pixels"].shape == (5, 3, 32, 32)


def test_bad_audio_is_a_row_named_by_its_line(tmp_path):
    """Audio pairs (Tango 2 / BATON style JSONL with .wav paths): a missing file is a bad row when read; with
    ``decode=True`` an unreadable or empty one too; the good row stays."""
    import soundfile

    rate = 16000
    wave = 0.1 * np.sin(np.linspace(0, 440 * 2 * np.pi, rate, dtype=np.float32))
    soundfile.write(tmp_path / "a.wav", wave, rate)
    soundfile.write(tmp_path / "b.wav", wave[::-1].copy(), rate)
    (tmp_path / "broken.wav").write_bytes(b"RIFF\x00\x00not audio")
    rows = [
        {"prompt": "a tone", "chosen": "a.wav", "rejected": "b.wav"},
        {"prompt": "a tone", "chosen": "a.wav", "rejected": "missing.wav"},
        {"prompt": "a tone", "chosen": "broken.wav", "rejected": "b.wav"},
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    pairs = load_preferences(path)
    assert [pair.source for pair in pairs] == [f"{path} line 1", f"{path} line 3"]  # broken.wav exists
    assert "audio not found" in dict(pairs.skipped)[f"{path} line 2"]
    decoded = load_preferences(path, decode=True)
    assert [pair.source for pair in decoded] == [f"{path} line 1"]
    assert "broken.wav" in dict(decoded.skipped)[f"{path} line 3"]
