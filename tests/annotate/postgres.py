"""A throwaway PostgreSQL cluster for the annotation tests: Debian's server binaries (``/usr/lib/postgresql/*/bin``),
``initdb`` into a fresh temporary folder, ``pg_ctl start`` listening on 127.0.0.1 and a free port only (its unix
socket in that folder too), a password for its one superuser, and ``pg_ctl stop`` + the folder removed at the end.
It never touches a system cluster. As root (``initdb`` refuses root) the server runs as the ``postgres`` user
(``nobody`` when there is none). ``make test-postgres`` installs the server and runs the PostgreSQL variants."""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.annotate.server import free_port

WANTED = "MMALIGN_POSTGRES"  # =1: run the PostgreSQL variants (make test-postgres sets it)


def server_binaries() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` with ``initdb`` and ``pg_ctl``, or ``None``."""
    found = [
        Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb") if Path(p).with_name("pg_ctl").exists()
    ]
    return max(found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0) if found else None


def unavailable() -> str | None:
    """Why the PostgreSQL variants cannot run here, or ``None`` when they can."""
    if os.environ.get(WANTED) != "1":
        return f"PostgreSQL variant: run `make test-postgres` ({WANTED}=1)"
    if server_binaries() is None:
        return "no PostgreSQL server under /usr/lib/postgresql/*/bin: `make test-postgres` installs Debian's postgresql"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "no psycopg: pip install -e '.[postgres]' (make test-postgres does)"
    return None


class Cluster:
    """``start()``: initdb + pg_ctl start; ``new_database()``: a fresh database's SQLAlchemy URL; ``stop()``."""

    def __init__(self) -> None:
        self.bin = server_binaries()
        self.port = free_port()
        self.password = secrets.token_hex(16)
        self.user = "mmalign"
        self.folder = Path(tempfile.mkdtemp(prefix="mmalign-pg-"))
        self.data = self.folder / "data"
        self.log = self.folder / "server.log"
        self.run_as = None
        if os.geteuid() == 0:
            for name in ("postgres", "nobody"):
                try:
                    self.run_as = pwd.getpwnam(name)
                    break
                except KeyError:
                    continue
            os.chown(self.folder, self.run_as.pw_uid, self.run_as.pw_gid)
        self.version = self.bin.parent.name
        self.databases = 0
        self.started = False

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        user = None if self.run_as is None else self.run_as.pw_uid
        group = None if self.run_as is None else self.run_as.pw_gid
        result = subprocess.run(
            [str(self.bin / args[0]), *args[1:]],
            user=user,
            group=group,
            extra_groups=[] if user is not None else None,
            cwd=self.folder,
            env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "HOME": str(self.folder)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode != 0:
            log = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{args[0]} failed ({result.returncode}): {result.stderr[-2000:]}\n{log}")
        return result

    def start(self) -> Cluster:
        pwfile = self.folder / "pw"
        pwfile.write_text(self.password + "\n")
        if self.run_as is not None:
            os.chown(pwfile, self.run_as.pw_uid, self.run_as.pw_gid)
        self._run(
            "initdb", "-D", str(self.data), "-U", self.user, f"--pwfile={pwfile}", "--auth=scram-sha-256",
            "-E", "UTF8", "--no-sync",
        )  # fmt: skip
        pwfile.unlink()
        options = f"-h 127.0.0.1 -p {self.port} -k {self.folder} -c fsync=off -c max_connections=300"
        self._run("pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data), "-l", str(self.log), "-o", options)
        self.started = True
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def _admin(self, statement: str) -> None:
        import psycopg

        with psycopg.connect(self.url().replace("+psycopg", ""), autocommit=True) as conn:
            conn.execute(statement)

    def new_database(self) -> str:
        self.databases += 1
        name = f"t{self.databases}"
        self._admin(f"CREATE DATABASE {name}")
        return self.url(name)

    def drop_database(self, url: str) -> None:
        self._admin(f"DROP DATABASE IF EXISTS {url.rsplit('/', 1)[1]} WITH (FORCE)")

    def stop(self) -> None:
        try:
            if self.started:
                self._run("pg_ctl", "stop", "-w", "-m", "fast", "-D", str(self.data))
                self.started = False
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)
