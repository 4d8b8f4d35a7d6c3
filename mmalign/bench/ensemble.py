"""Fit a calibrated ensemble of rewards on human pairs (MetaMetrics-style), evaluate it held out, save it.

Each member's scores are standardised with the mean and standard deviation of its scores over the distinct
(image, prompt) items of the fitting split, ``z_k = (s_k - mu_k) / sigma_k``. Non-negative weights ``w`` then
minimise the regularised Bradley-Terry negative log-likelihood over the fitting split's pairs::

    L(w) = -(1/N) sum_i [ y_i log sigma(w . d_i) + (1 - y_i) log sigma(-w . d_i) ] + (lambda / 2) ||w||^2,
    d_i = z(chosen_i) - z(rejected_i),  w >= 0,

where ``y_i`` is P(chosen preferred) (1 for a plain pair, a soft label where the data has one) and human ties
(``y = 0.5``) are left out, as the pairwise accuracy protocols leave them out; ``lambda`` defaults to 1e-3.
The minimiser is scipy's L-BFGS-B with the bounds ``w_k >= 0`` (a projected quasi-Newton method) and the
analytic gradient ``-(1/N) sum_i (y_i - sigma(w . d_i)) d_i + lambda w``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import MMAlignError
from . import protocols as P
from .runner import Benchmark, Group, ScoreTable, _expand_pairs, distinct_items, group_scores, split_by_prompt

DEFAULT_L2 = 1e-3


def log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


def bt_objective(
    w: np.ndarray, diffs: np.ndarray, labels: np.ndarray | None = None, l2: float = DEFAULT_L2
) -> tuple[float, np.ndarray]:
    """``(L(w), dL/dw)`` of the module docstring for differences ``diffs`` ``[N, K]`` and labels ``[N]``."""
    w = np.asarray(w, dtype=np.float64)
    diffs = np.asarray(diffs, dtype=np.float64)
    y = np.ones(len(diffs)) if labels is None else np.asarray(labels, dtype=np.float64)
    margin = diffs @ w
    n = max(len(diffs), 1)
    value = -(y * log_sigmoid(margin) + (1.0 - y) * log_sigmoid(-margin)).sum() / n + 0.5 * l2 * float(w @ w)
    grad = -((y - P.sigmoid(margin))[:, None] * diffs).sum(axis=0) / n + l2 * w
    return float(value), grad


def fit_weights(
    diffs: np.ndarray, labels: np.ndarray | None = None, l2: float = DEFAULT_L2, max_iter: int = 1000
) -> np.ndarray:
    """Non-negative ``w`` minimising :func:`bt_objective` (L-BFGS-B with bounds ``[0, inf)``), from ``w = 1/K``."""
    from scipy.optimize import minimize

    diffs = np.asarray(diffs, dtype=np.float64)
    if diffs.ndim != 2 or not len(diffs):
        raise MMAlignError("fitting an ensemble needs at least one non-tied pair")
    k = diffs.shape[1]
    result = minimize(
        bt_objective,
        np.full(k, 1.0 / k),
        args=(diffs, labels, l2),
        jac=True,
        method="L-BFGS-B",
        bounds=[(0.0, None)] * k,
        options={"maxiter": max_iter, "gtol": 1e-10, "ftol": 1e-14},
    )
    return np.clip(result.x, 0.0, None)


@dataclass
class EnsembleFit:
    """Fitted ensemble: member labels, standardisation, weights, and where it was fitted."""

    labels: list[str]
    means: np.ndarray
    stds: np.ndarray
    weights: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    def standardise(self, raw: np.ndarray) -> np.ndarray:
        return (np.asarray(raw, dtype=np.float64) - self.means) / self.stds

    def table(self, tables: Sequence[ScoreTable], groups: Sequence[Group], name: str = "ensemble") -> ScoreTable:
        """The ensemble's scores of every item of ``groups`` from the members' tables."""
        out = ScoreTable(name, reward="ensemble")
        for (key, prompt), _ in distinct_items(groups).items():
            raw = [t.get(key, prompt) for t in tables]
            if any(v is None for v in raw):
                continue  # reported by group_scores when evaluated
            out.add(key, prompt, float(self.standardise(np.array(raw)) @ self.weights))
        return out


def member_statistics(tables: Sequence[ScoreTable], groups: Sequence[Group]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation (ddof 0) of each member's scores over the distinct items of ``groups``."""
    items = list(distinct_items(groups))
    means, stds = [], []
    for table in tables:
        values = np.array([table.get(key, prompt) for key, prompt in items], dtype=np.float64)
        if np.isnan(values).any() or len(values) < 2:
            raise MMAlignError(f"{table.name}: needs a score for each of at least 2 fitting items")
        std = float(values.std())
        if not std > 0 or not math.isfinite(std):
            raise MMAlignError(f"{table.name}: its scores are constant on the fitting split; it cannot be standardised")
        means.append(float(values.mean()))
        stds.append(std)
    return np.array(means), np.array(stds)


def pair_differences(
    tables: Sequence[ScoreTable], groups: Sequence[Group], means: np.ndarray, stds: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(d [N, K], y [N])``: standardised chosen-minus-rejected differences of the non-tied pairs of ``groups``."""
    columns, labels = [], None
    del means  # they cancel in the differences
    for table, std in zip(tables, stds):
        pairs = _expand_pairs(groups, group_scores(groups, table))
        columns.append((pairs.s_a - pairs.s_b) / std)
        labels = pairs.labels
    diffs = np.stack(columns, axis=1)
    kept = labels != 0.5
    return diffs[kept], labels[kept]


def fit_ensemble(tables: Sequence[ScoreTable], groups: Sequence[Group], l2: float = DEFAULT_L2) -> EnsembleFit:
    """Standardise each member on ``groups`` and fit the non-negative Bradley-Terry weights there."""
    if len(tables) < 2:
        raise MMAlignError("an ensemble needs at least two rewards")
    means, stds = member_statistics(tables, groups)
    diffs, labels = pair_differences(tables, groups, means, stds)
    weights = fit_weights(diffs, labels, l2)
    value, _ = bt_objective(weights, diffs, labels, l2)
    info = {
        "objective": "mean Bradley-Terry NLL of sum_k w_k (z_k(chosen) - z_k(rejected)) + l2/2 ||w||^2, w >= 0",
        "l2": l2,
        "pairs": int(len(diffs)),
        "groups": len(groups),
        "items": len(distinct_items(groups)),
        "objective_value": value,
    }
    return EnsembleFit([t.name for t in tables], means, stds, weights, info)


def fitting_split(benchmark: Benchmark, fraction: float, seed: int) -> tuple[list[Group], Benchmark, str]:
    """``(fitting groups, held-out benchmark, description)``: the benchmark's validation split when it has one
    (``--val-data``, Pick-a-Pic's ``validation_unique`` or its prompt split), else a seeded ``fraction`` of the
    test prompts (the rest is held out)."""
    if benchmark.validation:
        return list(benchmark.validation), benchmark, f"validation ({benchmark.validation_source})"
    if not 0.0 < fraction < 1.0:
        raise MMAlignError("--fit-fraction must be in (0, 1)")
    fit, held_out = split_by_prompt(benchmark.test, fraction, seed)
    name = f"{benchmark.name}:held-out"
    rest = Benchmark(benchmark.protocol, name, benchmark.data, held_out, [], "", benchmark.skipped, benchmark.modality)
    return fit, rest, f"{fraction:g} of the prompts (seed {seed}); the other prompts are held out"


def run_ensemble(
    benchmark: Benchmark,
    rewards: Sequence[Any],
    *,
    fit_fraction: float = 0.5,
    l2: float = DEFAULT_L2,
    split_seed: int = 0,
    batch_size: int = 32,
    device: str = "cpu",
    dtype: str = "fp32",
    progress: bool = False,
    **options: Any,
) -> tuple[list[dict[str, Any]], EnsembleFit]:
    """Score ``benchmark`` with each reward spec, fit the ensemble on the fitting split (:func:`fitting_split`),
    and evaluate every member and the ensemble on the held-out split with the protocol (``options`` go to
    :func:`~mmalign.bench.runner.evaluate`: bootstrap, thresholds...). Returns (results, fit); the ensemble's
    result comes last, named ``ensemble``."""
    from .runner import evaluate, score_spec

    if len(rewards) < 2:
        raise MMAlignError("--fit-ensemble needs at least two --reward")
    groups = [*benchmark.validation, *benchmark.test]
    common = dict(batch_size=batch_size, device=device, dtype=dtype, progress=progress, modality=benchmark.modality)
    tables = [score_spec(spec, groups, **common) for spec in rewards]
    fit_groups, held_out, described = fitting_split(benchmark, fit_fraction, split_seed)
    fit = fit_ensemble(tables, fit_groups, l2)
    fit.info["fitting_split"] = described
    results = [evaluate(held_out, table, **options) for table in tables]
    held_groups = [*held_out.validation, *held_out.test]
    ensemble = evaluate(held_out, fit.table(tables, held_groups), **options)
    ensemble["settings"]["ensemble"] = {
        "members": fit.labels,
        "weights": fit.weights.tolist(),
        "means": fit.means.tolist(),
        "stds": fit.stds.tolist(),
        **fit.info,
    }
    return [*results, ensemble], fit


def ensemble_markdown(fit: EnsembleFit) -> str:
    lines = ["| member | weight | mean | std |", "|---|---|---|---|"]
    for label, w, m, s in zip(fit.labels, fit.weights, fit.means, fit.stds):
        lines.append(f"| {label} | {w:.4f} | {m:.6g} | {s:.6g} |")
    return "\n".join(lines) + "\n"


def member_records(specs: Sequence[Any], fit: EnsembleFit) -> list[dict[str, Any]]:
    """The ``members`` of an ensemble file: each reward spec's files (absolute when they exist here) and fit."""
    import os

    def path(value: str | None) -> str | None:
        return os.path.abspath(value) if value and os.path.exists(value) else value

    return [
        {
            "name": spec.name,
            "weights": path(spec.weights),
            "processor": path(spec.processor),
            "backbone": path(spec.backbone),
            "label": spec.label or spec.name,
            "mean": float(m),
            "std": float(s),
            "weight": float(w),
        }
        for spec, m, s, w in zip(specs, fit.means, fit.stds, fit.weights)
    ]


def save_ensemble(path: Any, specs: Sequence[Any], fit: EnsembleFit, extra: Mapping[str, Any] | None = None):
    from ..rewards.ensemble import EnsembleSpec, Member

    members = [Member(**record) for record in member_records(specs, fit)]
    return EnsembleSpec(members, {**fit.info, **dict(extra or {})}).save(path)


__all__ = [
    "DEFAULT_L2",
    "EnsembleFit",
    "bt_objective",
    "ensemble_markdown",
    "fit_ensemble",
    "fit_weights",
    "fitting_split",
    "member_statistics",
    "pair_differences",
    "run_ensemble",
    "save_ensemble",
]
