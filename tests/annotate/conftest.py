"""The annotation tests need the `annotate` extra (`pip install -e '.[annotate]'`, which `make install` does).

``new_db``: the database of a test, on each backend: ``new_db("a")`` is a SQLite file in the test's folder, or a
fresh database of a throwaway PostgreSQL cluster (tests/annotate/postgres.py; one per session, started on first
use); the same name gives the same database within a test. The PostgreSQL variants (marked ``postgres``) skip,
saying why, unless ``MMALIGN_POSTGRES=1`` (``make test-postgres``), which fails them when PostgreSQL is missing."""

import importlib.util
import os

import pytest

MISSING = [m for m in ("fastapi", "uvicorn", "sqlalchemy", "httpx", "multipart") if importlib.util.find_spec(m) is None]
if MISSING:  # pragma: no cover - only without the extra
    print(f"tests/annotate skipped: missing {MISSING} (pip install -e '.[annotate]')")
collect_ignore_glob = ["test_*.py"] if MISSING else []


@pytest.fixture(scope="session")
def postgres_cluster():
    from tests.annotate import postgres

    reason = postgres.unavailable()
    if reason is not None and os.environ.get(postgres.WANTED) == "1":
        pytest.fail(f"{postgres.WANTED}=1 but {reason}")  # asked for: a missing server must not pass as a skip
    if reason is not None:
        pytest.skip(reason)
    cluster = postgres.Cluster().start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def backend(request):
    return request.param


@pytest.fixture
def new_db(backend, tmp_path, request):
    """``new_db(name) -> str``: a SQLite path or a PostgreSQL URL, for ``init_database`` / ``--db``."""
    if backend == "sqlite":
        yield lambda name="a": str(tmp_path / f"{name}.db")
        return
    cluster = request.getfixturevalue("postgres_cluster")
    made: dict[str, str] = {}

    def make(name: str = "a") -> str:
        if name not in made:
            made[name] = cluster.new_database()
        return made[name]

    yield make
    for url in made.values():
        cluster.drop_database(url)
