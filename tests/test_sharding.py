"""``mmalign score`` across processes (:mod:`mmalign.sharding`): slices, part files with torn lines, the merge, a
single process finishing what a killed multi-process run left, and under ``torchrun``: two processes write what
one writes, and a process killed with SIGKILL mid-run loses and duplicates nothing when the job is re-run.

Order: the merged file lists the records in the order one process writes them (process 0 sorts the part records
by the job's item order), so outputs are compared line by line, not after sorting.

Scores: each process scores whole batches of the single-process run (the item list is cut into blocks of
``--batch-size``), so a fresh multi-process run computes the same batches; after a kill, a batch cut mid-write is
re-scored with other neighbours, and BLAS rounds a batch's rows differently with other neighbours. Measured on the
tiny CLIP of these tests (pickscore formula, scores 8-19, one thread): the same images scored in batches of 1, 3
and 4 differ by at most 4.8e-6 absolute, 2.6e-7 relative (2 float32 ulps at 16). ``SCORE_RTOL`` = 1e-5 leaves a
margin of about 40; a record scored from another image's pixels is off by far more (their scores spread over
units). The kill test scores JPEG sizes
(no model, so fewer imports per process; exact, so its lines are compared as text).
"""

from __future__ import annotations

import json
import shutil

import pytest

from mmalign.cli import main
from mmalign.errors import MMAlignError
from mmalign.scoring import merge_parts
from mmalign.sharding import (
    Shard,
    close_part,
    current_shard,
    open_part,
    part_file,
    part_rows,
    parts_dir,
)
from tests import processes, tiny

pytestmark = pytest.mark.usefixtures("one_thread")
SCORE_RTOL = 1e-5


def lines(path):
    return path.read_text().splitlines()


def record(path, prompt="p", reward="r", score=0.5):
    return json.dumps({"path": path, "prompt": prompt, "reward": reward, "score": score, "dtype": "fp32"}) + "\n"


def write_part(out, shard, text):
    part = part_file(out, shard)
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_text(text)


# ----------------------------------------------------------------------------------------------------------
# Slices, part files, merge
# ----------------------------------------------------------------------------------------------------------
def test_shard_from_the_launchers_environment():
    assert current_shard({}) == Shard(0, 1, 0)
    assert current_shard({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == Shard(3, 4, 1)
    assert current_shard({"WORLD_SIZE": "2", "RANK": "1"}).local_rank == 1
    with pytest.raises(MMAlignError, match="RANK is not"):
        current_shard({"WORLD_SIZE": "2"})
    with pytest.raises(MMAlignError, match="RANK=2 does not fit WORLD_SIZE=2"):
        current_shard({"WORLD_SIZE": "2", "RANK": "2"})
    with pytest.raises(MMAlignError, match="WORLD_SIZE='two'"):
        current_shard({"WORLD_SIZE": "two", "RANK": "0"})
    assert Shard(1, 2, 1).device("cuda") == "cuda:1"
    assert Shard(1, 2, 1).device("cuda:0") == "cuda:0" and Shard(1, 2, 1).device("cpu") == "cpu"
    assert Shard().device("cuda") == "cuda"


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("block", [1, 2, 3])
def test_slices_cover_every_item_once_in_whole_blocks(world, block):
    items = list(range(11))
    taken = [index for rank in range(world) for index, _ in Shard(rank, world).take(items, block)]
    assert sorted(taken) == items
    for rank in range(world):
        mine = [index for index, _ in Shard(rank, world).take(items, block)]
        blocks = [b for b in range(-(-len(items) // block)) if b % world == rank]  # block b goes to b % world
        assert mine == [i for b in blocks for i in range(b * block, min(len(items), (b + 1) * block))]


def test_part_files_drop_torn_lines_and_only_the_owner_cuts_them(tmp_path):
    out = tmp_path / "s.jsonl"
    shard = Shard(1, 2)
    handle = open_part(out, shard)
    handle.write(record("a") + record("b"))
    close_part(handle)
    part = part_file(out, shard)
    with part.open("a") as raw:
        raw.write(record("c")[:20])  # killed mid-write
    assert [row.row["path"] for row in part_rows(out)] == ["a", "b"]
    assert part.read_text().endswith(record("c")[:20])  # a reader leaves it alone
    handle = open_part(out, shard)  # the owner cuts it before appending
    handle.write(record("d"))
    close_part(handle)
    assert part.read_text() == record("a") + record("b") + record("d")
    whole_but_unterminated = record("e").rstrip("\n")
    write_part(out, Shard(0, 2), record("x") + whole_but_unterminated)
    assert [row.row["path"] for row in part_rows(out)] == ["x", "a", "b", "d"]  # only newline-ended lines count
    write_part(out, Shard(0, 3), record("y") + "not json\n")
    with pytest.raises(MMAlignError, match=r"rank-00000-of-00003\.jsonl: line 2 is not valid JSON"):
        part_rows(out)


def test_merge_writes_one_process_order_and_never_duplicates(tmp_path):
    out = tmp_path / "s.jsonl"
    out.write_text(record("old", reward="other") + record("torn")[:25])
    write_part(out, Shard(0, 2), record("i0") + record("i2"))
    write_part(out, Shard(1, 2), record("i1") + record("elsewhere") + record("i3"))
    write_part(out, Shard(0, 3), record("i4"))  # left by an earlier run on three processes
    order = {item: index for index, item in enumerate(_items("i0", "i1", "i2", "i3", "i4"))}
    assert merge_parts(out, "r", order) == 6
    expected = [record(p).rstrip("\n") for p in ("i0", "i1", "i2", "i3", "i4", "elsewhere")]
    assert lines(out) == [record("old", reward="other").rstrip("\n"), *expected]
    assert not parts_dir(out).exists()
    # a merge killed after replacing the output leaves parts whose records the output holds: merged again, no copies
    write_part(out, Shard(1, 2), record("i1") + record("i3"))
    before = out.read_bytes()
    assert merge_parts(out, "r", order) == 0
    assert out.read_bytes() == before and not parts_dir(out).exists()


def _items(*paths):
    from mmalign.scoring import ScoreItem

    return [ScoreItem(path, "p") for path in paths]


def test_one_process_finishes_what_a_killed_multi_process_run_left(image_files, tmp_path, capsys):
    images = tmp_path / "imgs"
    images.mkdir()
    for path in image_files:
        shutil.copy(path, images / path.name)
    argv = ["score", "--reward", "jpeg-incompressibility", "--batch-size", "2", "--no-progress", str(images)]
    full = tmp_path / "full.jsonl"
    assert main([*argv, "--out", str(full)]) == 0
    reference = full.read_text().splitlines(keepends=True)  # 5 records: batches (0, 1) (2, 3) (4)
    out = tmp_path / "resumed.jsonl"
    write_part(out, Shard(0, 2), reference[0] + reference[1] + reference[4][:30])  # rank 0: batch 0, torn in 2
    write_part(out, Shard(1, 2), reference[3])  # rank 1: half of batch 1
    capsys.readouterr()
    assert main([*argv, "--out", str(out)]) == 0
    resumed = out.read_text().splitlines(keepends=True)
    # the parts' records merged in item order, then the rest appended as a single resumed run always did
    assert resumed == [reference[0], reference[1], reference[3], reference[2], reference[4]]
    assert not parts_dir(out).exists()
    assert "scored 2, 3 already in" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# Under torchrun
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def many_images(tmp_path_factory):
    """48 images, so that each of two processes scores 12 batches of 2; of 150-200 px, so that a batch takes
    milliseconds even on a fast machine (the kill test needs process 1 alive a few steps after its first batch)."""
    folder = tmp_path_factory.mktemp("many")
    for index in range(48):
        tiny.random_image(100 + index, (150 + index, 160)).save(folder / f"img_{index:02d}.png")
    return folder


def score_args(images, out, clip_folder=None):
    """A tiny CLIP (pickscore formula) when ``clip_folder`` is given, else JPEG size (no model: fewer imports)."""
    clip = str(clip_folder)
    reward = ["pickscore", "--weights", clip, "--processor", clip] if clip_folder else ["jpeg-compressibility"]
    return [
        "score",
        "--reward",
        *reward,
        "--prompt",
        "a cat",
        "--batch-size",
        "2",
        "--no-progress",
        "--out",
        str(out),
        str(images),
    ]


@pytest.fixture(scope="module")
def one_process(one_thread, clip_folder, many_images, tmp_path_factory):
    """One process's output of each reward (``{"clip": lines, "jpeg": lines}``)."""
    folder = tmp_path_factory.mktemp("one")
    assert main(score_args(many_images, folder / "clip.jsonl", clip_folder)) == 0
    assert main(score_args(many_images, folder / "jpeg.jsonl")) == 0
    return {name: lines(folder / f"{name}.jsonl") for name in ("clip", "jpeg")}


def assert_same_records(got, want):
    """Line by line: every key equal, the score to ``SCORE_RTOL`` (module docstring)."""
    assert len(got) == len(want)
    for line, expected in zip(got, want):
        row, reference = json.loads(line), json.loads(expected)
        assert row["score"] == pytest.approx(reference.pop("score"), rel=SCORE_RTOL), (row, expected)
        row.pop("score")
        assert row == reference


@pytest.mark.kernels
def test_two_processes_write_what_one_writes(clip_folder, many_images, one_process, tmp_path):
    out = tmp_path / "scores.jsonl"
    done = processes.run(score_args(many_images, out, clip_folder), 2)
    assert_same_records(lines(out), one_process["clip"])
    assert not parts_dir(out).exists()
    assert "mmalign score: scored 48" in done.stderr


@pytest.mark.kernels
def test_a_killed_process_then_a_rerun_on_another_process_count(many_images, one_process, tmp_path):
    """SIGKILL of process 1 of 2 mid-run, then the job re-run on three processes (tests/trainers/
    test_label_processes.py re-runs on the same count; test_one_process_finishes_... above on one)."""
    out = tmp_path / "scores.jsonl"
    args = score_args(many_images, out)
    written = processes.kill_one_mid_run(args, 2, part_file(out, Shard(1, 2)))
    assert 1 <= written < 24, "process 1 was not killed mid-run"
    kept = len(part_rows(out))
    assert not out.exists() and kept < 48
    done = processes.run(args, 3)
    assert f"scored {48 - kept}, {kept} already in {out}" in done.stderr
    assert lines(out) == one_process["jpeg"]  # every item once, in one process's order
    assert not parts_dir(out).exists()
