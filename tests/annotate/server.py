"""A real `mmalign annotate serve` in a subprocess on a free loopback port, for the server and browser tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`mmalign annotate serve --db DB` (a SQLite path or a URL) on 127.0.0.1:port, waited for until /api/health
    answers; stop() ends it."""

    def __init__(self, db_path: Path | str, log: Path):
        self.db_path, self.log = db_path, log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # the database by $MMALIGN_ANNOTATE_DB, not --db: a PostgreSQL URL's password stays out of the process list
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MMALIGN_ANNOTATE_DB": str(db_path)}
        command = [sys.executable, "-m", "mmalign.cli", "annotate", "serve"]
        command += ["--port", str(self.port), "--log-level", "warning"]
        self.process = subprocess.Popen(command, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
            try:
                if requests.get(self.url + "/api/health", timeout=1).ok:
                    return
            except requests.ConnectionError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("server did not start in 30 s")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
