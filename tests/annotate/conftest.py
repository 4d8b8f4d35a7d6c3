"""The annotation tests need the `annotate` extra (`pip install -e '.[annotate]'`, which `make install` does)."""

import importlib.util

MISSING = [m for m in ("fastapi", "uvicorn", "sqlalchemy", "httpx", "multipart") if importlib.util.find_spec(m) is None]
if MISSING:  # pragma: no cover - only without the extra
    print(f"tests/annotate skipped: missing {MISSING} (pip install -e '.[annotate]')")
collect_ignore_glob = ["test_*.py"] if MISSING else []
