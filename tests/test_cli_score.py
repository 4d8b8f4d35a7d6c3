"""`mmalign score`: the contract (flags, JSONL keys), incremental output, resume, --skip-bad, --pairs."""

from __future__ import annotations

import json
import shutil

import pytest

import mmalign
from mmalign.cli import main


def read(path):
    return read_text_rows(path.read_text())


def read_text_rows(text):
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture()
def folder(tmp_path, image_files):
    target = tmp_path / "imgs"
    target.mkdir()
    for path in image_files:
        shutil.copy(path, target / path.name)
    return target


def test_score_folder_writes_contract_keys(folder, tmp_path, clip_folder, capsys):
    out = tmp_path / "scores.jsonl"
    argv = [
        "score",
        "--reward",
        "pickscore",
        "--weights",
        str(clip_folder),
        "--processor",
        str(clip_folder),
        "--prompt",
        "a cat",
        "--batch-size",
        "2",
        "--dtype",
        "fp32",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--no-progress",
        str(folder),
    ]
    assert main(argv) == 0
    rows = read(out)
    assert len(rows) == 5
    for row in rows:
        assert {"path", "prompt", "reward", "score", "dtype"} <= set(row)
        assert row["reward"] == "pickscore" and row["prompt"] == "a cat" and row["dtype"] == "fp32"
    reward = mmalign.load_reward("pickscore", weights=str(clip_folder))
    expected = reward.score([r["path"] for r in rows], "a cat").tolist()
    assert [r["score"] for r in rows] == pytest.approx(expected, abs=1e-5)
    # resume: nothing rescored
    assert main(argv) == 0
    assert len(read(out)) == 5
    assert "5 already in" in capsys.readouterr().err


def test_resume_after_torn_line_and_partial_run(folder, tmp_path):
    out = tmp_path / "s.jsonl"
    argv = ["score", "--reward", "jpeg-incompressibility", "--out", str(out), "--no-progress", str(folder)]
    assert main(argv) == 0
    full = read(out)
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:2]) + lines[2][:15])  # crash mid-write of the third line
    assert main(argv) == 0
    again = read(out)
    assert sorted(r["path"] for r in again) == sorted(r["path"] for r in full) and len(again) == 5


def test_resume_keeps_a_whole_last_record_that_lost_its_newline(folder, tmp_path):
    out = tmp_path / "s.jsonl"
    argv = ["score", "--reward", "jpeg-incompressibility", "--out", str(out), "--no-progress", str(folder)]
    assert main(argv) == 0
    full = out.read_text()
    lines = full.splitlines(keepends=True)
    out.write_text("".join(lines[:2]) + lines[2].rstrip("\n"))  # a crash between the record and its newline
    assert main(argv) == 0
    again = read(out)  # would fail to parse if the next record were appended to the same line
    assert sorted(r["path"] for r in again) == sorted(r["path"] for r in read_text_rows(full)) and len(again) == 5
    assert main(argv) == 0 and len(read(out)) == 5


def test_bad_image_stops_with_named_error_and_keeps_work(folder, tmp_path, capsys):
    (folder / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "s.jsonl"
    argv = [
        "score",
        "--reward",
        "jpeg-compressibility",
        "--batch-size",
        "1",
        "--out",
        str(out),
        "--no-progress",
        str(folder),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "zz_broken.png" in err
    assert len(read(out)) == 5  # everything before the bad file was kept
    assert main(argv + ["--skip-bad"]) == 0
    err = capsys.readouterr().err
    assert "skipped 1" in err and "zz_broken.png" in err


def test_pairs_file_and_prompt_required(tmp_path, image_files, clip_folder, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(json.dumps({"prompt": f"p{i}", "image": str(p)}) + "\n" for i, p in enumerate(image_files))
    )
    out = tmp_path / "o.jsonl"
    assert (
        main(
            [
                "score",
                "--reward",
                "clipscore",
                "--weights",
                str(clip_folder),
                "--pairs",
                str(pairs),
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    assert [r["prompt"] for r in read(out)] == [f"p{i}" for i in range(5)]
    assert main(["score", "--reward", "clipscore", "--weights", str(clip_folder), str(image_files[0])]) == 2
    assert "--prompt is required" in capsys.readouterr().err
    pairs.write_text('{"prompt": "x"}\n')
    assert main(["score", "--reward", "clipscore", "--weights", str(clip_folder), "--pairs", str(pairs)]) == 2
    assert "pairs.jsonl:1" in capsys.readouterr().err


def test_unknown_reward_and_stdout(image_files, capsys):
    assert main(["score", "--reward", "hpsv2.2", "--prompt", "x", str(image_files[0])]) == 2
    assert "hpsv2" in capsys.readouterr().err  # suggests close names
    assert main(["score", "--reward", "jpeg-compressibility", "--no-progress", str(image_files[0])]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["reward"] == "jpeg-compressibility" and row["score"] < 0


def test_missing_weights_offline_message(image_files, capsys):
    assert main(["score", "--reward", "pickscore", "--prompt", "x", str(image_files[0])]) == 2
    assert "local path" in capsys.readouterr().err


def test_device_map_is_refused_for_rewards_loaded_whole(image_files, capsys):
    argv = ["score", str(image_files[0]), "--reward", "jpeg-compressibility"]
    assert main([*argv, "--device-map", "auto"]) == 2
    assert "--device-map: jpeg-compressibility is loaded whole" in capsys.readouterr().err
    assert main([*argv, "--offload-folder", "x"]) == 2
    assert "go with --device-map" in capsys.readouterr().err
