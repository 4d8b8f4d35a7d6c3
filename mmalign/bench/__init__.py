"""Benchmarks: reward-model accuracy with the published protocols, leaderboards and generator arenas.

Light at import (numpy only, on first use): :mod:`~mmalign.bench.protocols` holds the pure metric functions,
:mod:`~mmalign.bench.runner` runs a protocol over a dataset with a reward model or a scores file,
:mod:`~mmalign.bench.leaderboard` writes markdown/HTML/plot tables, :mod:`~mmalign.bench.ensemble` fits calibrated
ensembles of rewards and :mod:`~mmalign.bench.arena` ranks generators from votes (Elo, Bradley-Terry, K-wise
Bayesian).

>>> from mmalign.bench import protocols
>>> protocols.pickapic_accuracy([0.9, 0.5], [0.1, 0.5], [1.0, 0.5], threshold=0.0)
1.0
"""

from __future__ import annotations

import importlib
from typing import Any

_SUBMODULES = ("protocols", "runner", "leaderboard", "arena", "examples", "ensemble")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_SUBMODULES)
