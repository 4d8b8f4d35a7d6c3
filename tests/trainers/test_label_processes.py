"""``mmalign label`` across processes: prompt ``i`` is sampled with seed ``seed + i`` and scored as one batch of K
wherever it runs, so the images, trajectories, ``rankings.jsonl`` and ``pairs.jsonl`` of two processes are the
bytes of one process's; and a process killed with SIGKILL mid-run loses nothing when the job is re-run: the prompts
finished before the kill are not sampled again, and the folder ends as an uninterrupted run's."""

from __future__ import annotations

import pytest

from mmalign.cli import main
from mmalign.sharding import Shard, part_file, part_rows, parts_dir
from tests import processes

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = [
    f"{n} {colour} {shape}"
    for n in ("one", "two")
    for colour in ("red", "blue")
    for shape in ("circles", "squares", "stars")
]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("label-prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def label_args(sd_folder, prompts_file, out):
    args = ["label", "--model", str(sd_folder), "--reward", "jpeg-compressibility", "--prompts", str(prompts_file)]
    return [*args, "--k", "3", "--out", str(out), "--steps", "2", "--resolution", "32", "--trajectories"]


def folder_bytes(folder):
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def one_process(one_thread, sd_folder, prompts_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("label-one") / "labels"
    assert main(label_args(sd_folder, prompts_file, out)) == 0
    files = folder_bytes(out)
    assert len(files["rankings.jsonl"].splitlines()) == len(PROMPTS) and files["pairs.jsonl"]
    assert not parts_dir(out / "rankings.jsonl").exists()
    return files


@pytest.mark.kernels
def test_two_processes_label_what_one_labels(sd_folder, prompts_file, one_process, tmp_path):
    out = tmp_path / "labels"
    processes.run(label_args(sd_folder, prompts_file, out), 2)
    got = folder_bytes(out)
    assert got.keys() == one_process.keys()
    assert [name for name in got if got[name] != one_process[name]] == []


@pytest.mark.kernels
def test_a_killed_process_then_a_rerun_on_the_same_count(sd_folder, prompts_file, one_process, tmp_path):
    out = tmp_path / "labels"
    args = label_args(sd_folder, prompts_file, out)
    written = processes.kill_one_mid_run(args, 2, part_file(out / "rankings.jsonl", Shard(1, 2)))
    assert 1 <= written < len(PROMPTS) // 2, "process 1 was not killed mid-run"
    assert not (out / "rankings.jsonl").exists() and not (out / "pairs.jsonl").exists()
    finished = [row.row["ranking"]["images"][0] for row in part_rows(out / "rankings.jsonl")]
    stamps = {name: (out / name).stat().st_mtime_ns for name in finished}
    processes.run(args, 2)
    assert {name: (out / name).stat().st_mtime_ns for name in finished} == stamps  # not sampled again
    got = folder_bytes(out)
    assert got.keys() == one_process.keys()
    assert [name for name in got if got[name] != one_process[name]] == []


def test_a_rerun_skips_finished_prompts_and_other_settings_start_over(
    sd_folder, prompts_file, one_process, tmp_path, monkeypatch
):
    """One process, interrupted: the re-run samples only the rest; a run with another seed in between drops the
    parts (it overwrote images), so the next run samples every prompt again, and each run ends as a clean one."""
    from mmalign.commands import label as command

    out = tmp_path / "labels"
    args = label_args(sd_folder, prompts_file, out)
    real, sampled = command._label_prompt, []

    def interrupt_after(count):
        def label_prompt(*arguments, **keywords):
            if len(sampled) == count:
                raise KeyboardInterrupt
            sampled.append(arguments[3])  # the prompt's index
            return real(*arguments, **keywords)

        sampled.clear()
        monkeypatch.setattr(command, "_label_prompt", label_prompt)

    interrupt_after(3)
    assert main(args) == 130
    assert len(part_rows(out / "rankings.jsonl")) == 3 and not (out / "rankings.jsonl").exists()
    interrupt_after(2)
    assert main(args) == 130 and sampled == [3, 4]
    interrupt_after(1)
    assert main([*args, "--seed", "1"]) == 130 and sampled == [0]
    interrupt_after(len(PROMPTS))
    assert main(args) == 0 and sampled == list(range(len(PROMPTS)))
    assert folder_bytes(out) == one_process
    assert not parts_dir(out / "rankings.jsonl").exists()
