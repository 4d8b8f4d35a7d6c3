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


def encoded_audio(wave: np.ndarray, rate: int, fmt: str) -> bytes:
    import io

    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, wave, rate, format=fmt)
    return buffer.getvalue()


def write_audio_alpaca(folder, rows):
    """Audio-Alpaca's layout (``declare-lab/audio-alpaca``): parquet shards under ``data/`` with ``prompt``,
    ``chosen`` and ``rejected`` as ``datasets`` Audio structs ``{bytes, path}`` and ``strategy``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    audio = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("prompt", pa.string()), ("chosen", audio), ("rejected", audio), ("strategy", pa.string())])
    path = folder / "data" / "train-00000-of-00001.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def test_audio_alpaca_parquet_pairs_hold_encoded_audio_and_bad_rows_are_named(tmp_path):
    """Audio-Alpaca (Tango 2) pairs: detected from the parquet's columns, the encoded audio kept as bytes (or the
    struct's path where it has no bytes), ``strategy`` in meta; broken audio is a bad row named by file and row when
    decoded, and replaced and named by the dataset when not; the bytes decode to what the same audio read from a
    file gives."""
    from mmalign.data import AudioPreferenceDataset, detect_format
    from mmalign.modalities.audio import load_audio

    rate = 16000
    time = np.arange(rate // 10, dtype=np.float32) / rate
    tone, low = 0.3 * np.sin(2 * np.pi * 440 * time), 0.2 * np.sin(2 * np.pi * 110 * time)
    import soundfile

    soundfile.write(tmp_path / "tone.wav", tone, rate)
    (tmp_path / "data").mkdir()
    soundfile.write(tmp_path / "data" / "low.flac", low, rate)
    wav, flac = encoded_audio(tone, rate, "WAV"), encoded_audio(low, rate, "FLAC")
    broken = b"RIFF\x10\x00\x00\x00WAVEfmt " + b"\x00" * 8
    rows = [
        {"prompt": "a beep", "chosen": {"bytes": wav, "path": "x.wav"}, "rejected": {"bytes": flac, "path": None},
         "strategy": "inverse"},
        {"prompt": "a hum", "chosen": {"bytes": None, "path": "low.flac"}, "rejected": {"bytes": wav, "path": None},
         "strategy": "random"},
        {"prompt": "a click", "chosen": {"bytes": broken, "path": None}, "rejected": {"bytes": wav, "path": None},
         "strategy": "random"},
    ]  # fmt: skip
    file = write_audio_alpaca(tmp_path, rows)
    assert detect_format(tmp_path) == "pairs-parquet" and detect_format(file) == "pairs-parquet"

    pairs = load_preferences(tmp_path, stream=False)
    assert [pair.source for pair in pairs] == [f"{file} row {i}" for i in range(3)]
    assert pairs[0].chosen == wav and pairs[0].rejected == flac and pairs[0].meta == {"strategy": "inverse"}
    assert pairs[1].chosen == str(tmp_path / "data" / "low.flac")
    decoded = load_preferences(tmp_path, decode=True, stream=False)
    assert len(decoded) == 2 and f"{file} row 2" in dict(decoded.skipped)
    assert "'chosen' audio bytes" in dict(decoded.skipped)[f"{file} row 2"]

    dataset = AudioPreferenceDataset(list(pairs), 8000, 2)
    item = dataset[0]
    from_file = load_audio(tmp_path / "tone.wav", sample_rate=8000).waveform.repeat(2, 1)
    assert item["chosen_pixels"].shape == (2, 800) and item["prompt"] == "a beep"
    torch.testing.assert_close(item["chosen_pixels"], from_file.clamp(-1, 1))
    torch.testing.assert_close(
        dataset[1]["chosen_pixels"], load_audio(tmp_path / "data" / "low.flac", sample_rate=8000).waveform.repeat(2, 1)
    )
    assert dataset[2]["index"] == 0 and f"{file} row 2 chosen" in dataset.failed[2]


def test_a_datasets_audio_column_is_read_undecoded(tmp_path):
    """A ``save_to_disk`` folder with ``datasets.Audio`` columns (Audio-Alpaca loaded by ``datasets``): mapped with
    ``columns``, its sides stay encoded bytes (no decoding backend needed to read it)."""
    import datasets

    rate = 8000
    wave = 0.1 * np.sin(np.linspace(0, 200 * 2 * np.pi, rate // 10, dtype=np.float32))
    wav = encoded_audio(wave, rate, "WAV")
    struct = {"bytes": datasets.Value("binary"), "path": datasets.Value("string")}
    features = datasets.Features({"prompt": datasets.Value("string"), "chosen": struct, "rejected": struct})
    side = {"bytes": wav, "path": None}
    data = datasets.Dataset.from_dict({"prompt": ["a tone"], "chosen": [side], "rejected": [side]}, features=features)
    data = data.cast_column("chosen", datasets.Audio()).cast_column("rejected", datasets.Audio())
    assert isinstance(data.features["chosen"], datasets.Audio)
    data.save_to_disk(str(tmp_path / "alpaca"))
    pairs = load_preferences(tmp_path / "alpaca", columns={"chosen": "chosen", "rejected": "rejected"})
    assert len(pairs) == 1 and pairs[0].chosen == wav and pairs[0].rejected == wav
