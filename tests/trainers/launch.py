"""Run ``mmalign train`` in a subprocess, on one process or on several CPU (gloo) processes under torchrun, and
read its ``log.jsonl``: the launcher of the trainers' process-count tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A free TCP port for torchrun's rendezvous (a fixed one collides with runs in parallel)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_cli(args: list[str], processes: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m mmalign.cli train ARGS`` (``processes`` > 1: under ``torch.distributed.run``); fails the
    test with the end of stderr when the command fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
        launcher += ["--master_port", str(free_port())]
    command = [*launcher, "-m", "mmalign.cli", "train", *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def read_log(output_dir: Path) -> list[dict]:
    """The records of ``output_dir/log.jsonl`` (written by the main process only)."""
    return [json.loads(line) for line in (Path(output_dir) / "log.jsonl").read_text().splitlines()]
