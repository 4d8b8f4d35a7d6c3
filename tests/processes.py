"""``mmalign`` commands under ``torchrun`` in tests, and one of their processes killed mid-run with SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from tests.trainers.distributed import REPO, free_port

TIMEOUT = 240
STEP = 0.003  # seconds a process to be killed runs between looks at its part file


def command(args: list[str], processes: int) -> list[str]:
    """``python -m mmalign.cli ARGS``, under ``torchrun --nproc_per_node N`` on a free port when N > 1."""
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(free_port())]
    return [sys.executable, *(launcher if processes > 1 else []), "-m", "mmalign.cli", *args]


def environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}


def run(args: list[str], processes: int) -> subprocess.CompletedProcess:
    """Run to the end; fail with its stderr unless it succeeds."""
    done = subprocess.run(command(args, processes), env=environment(), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def complete_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def kill_one_mid_run(args: list[str], processes: int, part: Path, rank: int = 1) -> int:
    """Start the job and kill its process ``rank`` with SIGKILL once it has written a line to its part file
    ``part`` (the launcher then stops the others); returns the complete lines ``part`` held. The process runs in
    slices of ``STEP`` seconds and is stopped while its file is looked at, so that however fast the machine, it is
    killed within one slice of its first line, not after its last."""
    with tempfile.TemporaryFile("w+") as log:  # not a pipe: a full pipe would block the job while this polls
        job = subprocess.Popen(command(args, processes), env=environment(), stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + TIMEOUT
        target = None
        try:
            while True:
                assert job.poll() is None, f"the job ended before process {rank} was killed:\n{_tail(log)}"
                assert time.monotonic() < deadline, "timed out waiting for the part file"
                if target is None:
                    target = _child_of_rank(job.pid, rank)
                    time.sleep(0.002)
                    continue
                os.kill(target, signal.SIGSTOP)
                lines = complete_lines(part)
                if lines >= 1:
                    os.kill(target, signal.SIGKILL)
                    break
                os.kill(target, signal.SIGCONT)
                time.sleep(STEP)
            job.wait(timeout=TIMEOUT)
        finally:
            if job.poll() is None:
                job.kill()
                job.wait()
        assert job.returncode != 0, f"the launcher reported success although a process was killed:\n{_tail(log)}"
    return lines


def _child_of_rank(pid: int, rank: int) -> int | None:
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank):
                return child.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return None


def _tail(log) -> str:
    log.seek(0)
    return log.read()[-4000:]
