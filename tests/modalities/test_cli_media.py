"""`mmalign score` end to end on a video, a multi-view folder, a grid and an audio file: the image contract's
keys plus modality and per-unit scores; resume per variant; bad media; reward/modality mismatches."""

from __future__ import annotations

import json
import shutil

import pytest
import soundfile as sf
from PIL import Image

import mmalign
from mmalign.cli import main
from mmalign.rewards.lifted import MultiviewReward, VideoReward
from mmalign.scoring import items_from_pairs, items_from_paths
from tests import tiny
from tests.modalities.tiny_media import random_frames, sine, write_video
from tests.tolerances import kernel_approx

CONTRACT = {"path", "prompt", "reward", "score", "dtype"}


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    write_video(root / "clip.mkv", random_frames(12, 48, 64, seed=7))
    views = root / "chair"
    views.mkdir()
    for n in range(4):
        tiny.random_image(20 + n, (40, 32)).save(views / f"{n:03d}.png")
    (views / "cameras.json").write_text(json.dumps([{"azimuth": 90 * n, "elevation": 0} for n in range(4)]))
    grid = Image.new("RGB", (80, 64))
    for n in range(4):
        grid.paste(Image.open(views / f"{n:03d}.png"), ((n % 2) * 40, (n // 2) * 32))
    grid.save(root / "grid.png")
    sf.write(root / "tone.wav", sine(440, 2.0, 16000)[0], 16000)
    return root


def pick_args(clip_folder, out):
    return ["score", "--reward", "pickscore", "--weights", str(clip_folder), "--out", str(out), "--no-progress"]


@pytest.mark.kernels
def test_video_and_views_end_to_end(media, clip_folder, tmp_path, capsys):
    out = tmp_path / "scores.jsonl"
    argv = pick_args(clip_folder, out) + ["--prompt", "a chair", "--frames", "4", "--aggregate", "tar"]
    assert main(argv + [str(media / "clip.mkv")]) == 0
    (video,) = read(out)
    assert set(video) >= CONTRACT and video["modality"] == "video" and video["aggregate"] == "tar"
    assert video["unit"] == "frame" and video["unit_positions"] == [0, 3, 6, 9] and video["num_frames"] == 12
    assert len(video["units"]) == 4 and video["variant"] == "tar/4f"
    reward = mmalign.load_reward("pickscore", weights=str(clip_folder))
    expected = VideoReward(reward, "tar", 4).score_files([media / "clip.mkv"], "a chair")[0]
    assert video["score"] == pytest.approx(expected.total, rel=1e-5)
    assert video["unit_weights"] == pytest.approx(expected.weights)
    # tar has no meaning for views: a clear error, nothing written
    assert main(argv + [str(media / "chair")]) == 2
    assert "tar" in capsys.readouterr().err and len(read(out)) == 1
    # a view folder (it has cameras.json) and the clip again: the clip's tar/4f variant is already there
    plain = pick_args(clip_folder, out) + ["--prompt", "a chair", "--frames", "4"]
    assert main(plain + [str(media / "chair"), str(media / "clip.mkv")]) == 0
    rows = read(out)
    views = rows[1]
    assert views["modality"] == "multiview" and views["aggregate"] == "mean" and views["unit"] == "view"
    assert views["views"] == ["000.png", "001.png", "002.png", "003.png"] and len(views["units"]) == 4
    assert [r["variant"] for r in rows] == ["tar/4f", "mean", "mean/4f"]
    assert main(argv + [str(media / "clip.mkv")]) == 0
    assert "1 already in" in capsys.readouterr().err and len(read(out)) == 3


def test_grid_and_min(media, clip_folder, tmp_path):
    out = tmp_path / "grid.jsonl"
    argv = pick_args(clip_folder, out) + ["--prompt", "a chair", "--grid", "2x2", "--aggregate", "min"]
    assert main(argv + [str(media / "grid.png")]) == 0
    (row,) = read(out)
    assert row["modality"] == "multiview" and row["variant"] == "min/grid2x2"
    reward = mmalign.load_reward("pickscore", weights=str(clip_folder))
    views = MultiviewReward(reward, "mean").score_files([media / "chair"], "a chair")[0]
    assert row["units"] == pytest.approx(views.units, rel=1e-5) and row["score"] == pytest.approx(min(views.units))


def test_audio_end_to_end(media, clap_folder, tmp_path, capsys):
    out = tmp_path / "audio.jsonl"
    base = ["score", "--reward", "clap", "--weights", str(clap_folder), "--out", str(out), "--no-progress"]
    assert main(base + ["--prompt", "a beep", str(media / "tone.wav")]) == 0
    (row,) = read(out)
    assert set(row) >= CONTRACT and row["modality"] == "audio" and row["unit"] == "window"
    assert row["units"] == [row["score"]] and row["unit_positions"] == [0.0] and row["duration"] == 2.0
    reward = mmalign.load_reward("clap", weights=str(clap_folder))
    assert row["score"] == kernel_approx(reward.score(media / "tone.wav", "a beep").item())
    music = base + ["--prompt", "a beep", "--modality", "music", "--window-seconds", "0.5", str(media / "tone.wav")]
    assert main(music) == 0
    row = read(out)[-1]
    assert row["modality"] == "music" and row["variant"] == "cover/0.5s/mean" and len(row["units"]) == 4
    assert row["unit_positions"] == [0.0, 0.5, 1.0, 1.5]
    # an image reward cannot score audio, nor CLAP an image
    assert main(["score", "--reward", "jpeg-compressibility", "--no-progress", str(media / "tone.wav")]) == 2
    assert "audio reward" in capsys.readouterr().err
    assert main(base + ["--prompt", "x", str(media / "grid.png")]) == 2
    assert "not images" in capsys.readouterr().err


def test_bad_media_skip_and_stop(media, clip_folder, tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(media / "clip.mkv", folder / "a.mkv")
    (folder / "b_broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 truncated")
    tiny.random_image(1, (32, 32)).save(folder / "c.png")
    out = tmp_path / "s.jsonl"
    argv = pick_args(clip_folder, out) + ["--prompt", "x", "--batch-size", "1", str(folder)]
    assert main(argv) == 2
    assert "b_broken.mp4" in capsys.readouterr().err
    assert [r["path"].endswith("a.mkv") for r in read(out)] == [True]
    assert main(argv + ["--skip-bad"]) == 0
    err = capsys.readouterr().err
    assert "skipped 1" in err and "b_broken.mp4" in err
    rows = read(out)
    assert [r.get("modality", "image") for r in rows] == ["video", "image"]


def test_item_expansion(media, tmp_path):
    items = items_from_paths([media], "p", "auto")
    kinds = {item.path.split("/")[-1]: item.modality for item in items}
    assert kinds == {"clip.mkv": "video", "grid.png": "image", "tone.wav": "audio"}  # subfolders are not listed
    assert [i.modality for i in items_from_paths([media / "chair"], "p", "auto")] == ["multiview"]
    frames = tmp_path / "frames"
    frames.mkdir()
    for n in range(3):
        Image.fromarray(random_frames(1, seed=n)[0]).save(frames / f"f{n}.png")
    assert [(i.path, i.modality) for i in items_from_paths([frames], "p", "video")] == [(str(frames), "video")]
    assert [i.modality for i in items_from_paths([media / "grid.png"], "p", "auto", grid="2x2")] == ["multiview"]
    assert len(items_from_paths([frames], "p")) == 3  # the default stays images
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "a", "video": "m/clip.mkv"}, {"prompt": "b", "media": str(media / "tone.wav")}]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = items_from_pairs(pairs)
    assert [(i.modality, i.prompt) for i in got] == [("video", "a"), ("audio", "b")]
    assert got[0].path == str(tmp_path / "m" / "clip.mkv")


@pytest.mark.kernels
def test_frames_folder_video_cli(clip_folder, tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    still = random_frames(1, seed=9)[0]
    for n in range(6):
        Image.fromarray(still).save(frames / f"frame_{n}.png")
    out = tmp_path / "f.jsonl"
    argv = pick_args(clip_folder, out) + ["--prompt", "x", "--modality", "video", "--frames", "3", str(frames)]
    assert main(argv) == 0
    (row,) = read(out)
    image = mmalign.load_reward("pickscore", weights=str(clip_folder)).score([frames / "frame_0.png"], "x").item()
    # three equal frames scored in one batch vs the image alone: equal up to the kernels' rounding (with AVX2
    # kernels even the three rows of the batch differ from one another)
    assert row["score"] == kernel_approx(image) and row["unit_positions"] == [0, 2, 5]
    assert row["units"] == kernel_approx([image] * 3)
