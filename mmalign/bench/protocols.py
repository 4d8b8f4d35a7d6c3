"""Reward-model accuracy protocols as published, as pure numpy functions (no torch, no I/O).

Each protocol follows its reference evaluation code exactly, ties included:

* Pick-a-Pic (Kirstain et al. 2023, yuvalkirstain/PickScore ``trainer/scripts/eval_preference_predictor.py``):
  ``p0, p1`` = softmax of the two scores; predict a tie when ``|p1 - p0| <= t``; score 1 for a match, 0.5 when
  exactly one of (prediction, label) is a tie, else 0; ``t`` is the first best of a grid on a validation split.
* HPDv2 (Wu et al. 2023, tgxs002/HPSv2 ``hpsv2/evaluation.py`` + ``inversion_score`` in
  ``hpsv2/src/training/train.py``): per prompt ``1 - discordant / C(n, 2)`` between the predicted order and the
  human ranks; ground-truth ties are never discordant; mean over prompts.
* ImageRewardDB (Xu et al. 2023, THUDM/ImageReward ``test.py`` ``acc``): pairs pooled over all prompts,
  ground-truth ties skipped, predicted ties wrong. (HPSv2's ``evaluate_IR`` applies the same pair rule but
  averages per-prompt ratios; mmalign follows ImageReward's pooled figure.)
* VideoGen-RewardBench (Liu et al. 2025, KlingAIResearch/VideoAlign, formerly KwaiVGI/VideoAlign:
  ``calc_accuracy.py`` and ``eval_videogen_rewardbench.py`` at commit 219ab9db64c0): per dimension (VQ, MQ, TA,
  Overall) the human label ``h`` (A -> 1, B -> -1, same -> 0) against ``m = score(A) - score(B)``. "w/o ties":
  ``C / (C + D)`` over the pairs humans did not tie, an exact predicted tie counted discordant; "w/ ties": the
  tie-calibrated accuracy of Deutsch et al. 2023 (``(C + Thm) / N`` over all pairs, maximised over a tie
  threshold on ``|m|``).
* HPDv3 (Ma et al. 2025, HPSv3 ``evaluate/evaluate.py``, PyPI ``hpsv3`` 1.0.0): pairs ``{prompt, path1, path2}``
  with ``path1`` the preferred image; accuracy = pairs with ``score(path1) > score(path2)`` over all pairs (an
  exact tie is wrong); its ``ranking`` mode is ImageRewardDB's pooled rule (:func:`imagereward_accuracy`).
* Plain pairwise accuracy, Spearman / Kendall (tau-b) rank correlations, and the expected calibration error
  (Guo et al. 2017) of Bradley-Terry probabilities ``sigma(a * (s_a - s_b))``.

Ranks are "lower is better" (1 = best) and scores "higher is better" everywhere. Bootstrap confidence intervals
(Efron & Tibshirani 1993, percentile method) resample whole units (prompts or pairs), seeded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

ArrayLike = Sequence[float] | np.ndarray

PICKAPIC_THRESHOLDS: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
"""The tie-threshold grid of PickScore's ``eval_preference_predictor.py``."""

TIE = -1

METRICS: dict[str, dict[str, object]] = {
    "accuracy": {"higher_is_better": True, "range": (0.0, 1.0)},
    "pairwise_accuracy": {"higher_is_better": True, "range": (0.0, 1.0)},
    "spearman": {"higher_is_better": True, "range": (-1.0, 1.0)},
    "kendall": {"higher_is_better": True, "range": (-1.0, 1.0)},
    "ece": {"higher_is_better": False, "range": (0.0, 0.5)},
    "accuracy_with_ties": {"higher_is_better": True, "range": (0.0, 1.0)},
}
"""What each reported figure means (torchmetrics' ``higher_is_better`` convention)."""


def _array(values: ArrayLike, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite numbers")
    return array


def _same_length(*arrays: np.ndarray) -> None:
    if len({len(a) for a in arrays}) > 1:
        raise ValueError(f"length mismatch: {[len(a) for a in arrays]}")


def sigmoid(x: ArrayLike) -> np.ndarray:
    """Numerically stable logistic function."""
    x = np.asarray(x, dtype=np.float64)
    return 0.5 * (1.0 + np.tanh(0.5 * x))


# ---------------------------------------------------------------- Pick-a-Pic


def pickapic_probabilities(s0: ArrayLike, s1: ArrayLike, logit_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """``softmax(logit_scale * [s0, s1])`` per pair, as PickScore's ``probs`` (its scores already include CLIP's
    ``logit_scale.exp()``, so ``logit_scale=1`` there)."""
    s0, s1 = _array(s0, "s0"), _array(s1, "s1")
    _same_length(s0, s1)
    p0 = sigmoid(logit_scale * (s0 - s1))
    return p0, 1.0 - p0


def pickapic_labels(label_0: ArrayLike) -> np.ndarray:
    """Pick-a-Pic ``label_0`` -> outcome codes: 0 (image 0 wins), 1 (image 1 wins), ``TIE`` (-1) for 0.5."""
    label_0 = _array(label_0, "label_0")
    return np.where(label_0 == 0.5, TIE, np.where(label_0 > 0.5, 0, 1))


def pickapic_predictions(p0: ArrayLike, p1: ArrayLike, threshold: float) -> np.ndarray:
    """Predicted outcome codes: a tie when ``|p1 - p0| <= threshold`` (inclusive, as the reference)."""
    p0, p1 = _array(p0, "p0"), _array(p1, "p1")
    _same_length(p0, p1)
    return np.where(np.abs(p1 - p0) <= threshold, TIE, np.where(p0 > p1, 0, 1))


def pickapic_outcomes(p0: ArrayLike, p1: ArrayLike, label_0: ArrayLike, threshold: float) -> np.ndarray:
    """Per-pair score: 1 if the prediction matches the label, 0.5 if exactly one of them is a tie, else 0."""
    pred = pickapic_predictions(p0, p1, threshold)
    label = pickapic_labels(label_0)
    _same_length(pred, label)
    one_tie = (pred == TIE) | (label == TIE)
    return np.where(pred == label, 1.0, np.where(one_tie, 0.5, 0.0))


def pickapic_accuracy(p0: ArrayLike, p1: ArrayLike, label_0: ArrayLike, threshold: float) -> float:
    """PickScore's 3-way accuracy (``calc_acc``) at tie threshold ``threshold``."""
    outcomes = pickapic_outcomes(p0, p1, label_0, threshold)
    return float(outcomes.mean()) if outcomes.size else math.nan


def select_tie_threshold(
    p0: ArrayLike, p1: ArrayLike, label_0: ArrayLike, thresholds: Sequence[float] = PICKAPIC_THRESHOLDS
) -> tuple[float, list[float]]:
    """The threshold with the best validation accuracy (the first one on equal accuracy, as ``np.argmax``),
    and the accuracy at every threshold. Pass ``thresholds=candidate_thresholds(p0, p1)`` for an exact search."""
    if not len(thresholds):
        raise ValueError("thresholds is empty")
    accuracies = [pickapic_accuracy(p0, p1, label_0, float(t)) for t in thresholds]
    best = int(np.argmax(accuracies))
    return float(thresholds[best]), accuracies


def candidate_thresholds(p0: ArrayLike, p1: ArrayLike) -> list[float]:
    """Every distinct ``|p1 - p0|`` plus 0: the accuracy only changes at these values."""
    gaps = np.abs(_array(p1, "p1") - _array(p0, "p0"))
    return sorted({0.0, *gaps.tolist()})


# ---------------------------------------------------------------- HPDv2


PredictedTies = Literal["index", "half"]


def predicted_positions(scores: ArrayLike) -> np.ndarray:
    """Position of each item in the predicted order (0 = best): a stable ``argsort(-scores)``, so equal scores
    keep their index order (HPSv2's ``torch.argsort(-k)`` breaks them in an unspecified order)."""
    scores = _array(scores, "scores")
    order = np.argsort(-scores, kind="stable")
    positions = np.empty(len(scores), dtype=np.int64)
    positions[order] = np.arange(len(scores))
    return positions


def discordant_pairs(scores: ArrayLike, ranks: ArrayLike, predicted_ties: PredictedTies = "index") -> float:
    """Pairs ordered the opposite way by the scores and the ranks; ground-truth ties never count.

    ``predicted_ties="index"`` breaks equal scores by index (the reference's argsort); ``"half"`` counts a
    predicted tie against a strict human preference as half a discordant pair (its expectation under random
    tie-breaking).
    """
    scores, ranks = _array(scores, "scores"), _array(ranks, "ranks")
    _same_length(scores, ranks)
    upper = np.triu(np.ones((len(ranks), len(ranks)), dtype=bool), k=1)
    rank_diff = np.sign(ranks[:, None] - ranks[None, :])
    if predicted_ties == "index":
        positions = predicted_positions(scores).astype(np.float64)
        pred_diff = np.sign(positions[:, None] - positions[None, :])  # + when i is predicted worse
        return float(((pred_diff * rank_diff < 0) & upper).sum())
    if predicted_ties == "half":
        score_diff = np.sign(scores[None, :] - scores[:, None])  # + when i is predicted worse
        strict = ((score_diff * rank_diff < 0) & upper).sum()
        half = ((score_diff == 0) & (rank_diff != 0) & upper).sum()
        return float(strict + 0.5 * half)
    raise ValueError(f"predicted_ties must be 'index' or 'half', got {predicted_ties!r}")


def hpdv2_prompt_accuracy(scores: ArrayLike, ranks: ArrayLike, predicted_ties: PredictedTies = "index") -> float:
    """HPSv2's ``inversion_score`` for one prompt: ``1 - discordant / C(n, 2)``."""
    n = len(np.asarray(ranks).reshape(-1))
    if n < 2:
        raise ValueError(f"a ranking needs at least 2 items, got {n}")
    return 1.0 - discordant_pairs(scores, ranks, predicted_ties) / (n * (n - 1) / 2)


def hpdv2_per_prompt(
    scores: Sequence[ArrayLike], ranks: Sequence[ArrayLike], predicted_ties: PredictedTies = "index"
) -> np.ndarray:
    """Per-prompt HPDv2 accuracies."""
    if len(scores) != len(ranks):
        raise ValueError(f"{len(scores)} score lists but {len(ranks)} rank lists")
    return np.array([hpdv2_prompt_accuracy(s, r, predicted_ties) for s, r in zip(scores, ranks)], dtype=np.float64)


def hpdv2_accuracy(
    scores: Sequence[ArrayLike], ranks: Sequence[ArrayLike], predicted_ties: PredictedTies = "index"
) -> float:
    """HPDv2 test accuracy: the mean over prompts of :func:`hpdv2_prompt_accuracy`."""
    per_prompt = hpdv2_per_prompt(scores, ranks, predicted_ties)
    return float(per_prompt.mean()) if per_prompt.size else math.nan


# ---------------------------------------------------------------- ImageRewardDB


def imagereward_counts(scores: ArrayLike, ranks: ArrayLike) -> tuple[int, int]:
    """(correct, counted) pairs of one prompt: ground-truth ties skipped, the better-ranked image must score
    strictly higher (a predicted tie is wrong), as ``acc`` in THUDM/ImageReward ``test.py``."""
    scores, ranks = _array(scores, "scores"), _array(ranks, "ranks")
    _same_length(scores, ranks)
    upper = np.triu(np.ones((len(ranks), len(ranks)), dtype=bool), k=1)
    rank_diff = np.sign(ranks[:, None] - ranks[None, :])  # + when i is ranked worse
    score_diff = np.sign(scores[:, None] - scores[None, :])  # + when i scores higher
    counted = (rank_diff != 0) & upper
    correct = counted & (rank_diff * score_diff < 0)
    return int(correct.sum()), int(counted.sum())


def imagereward_accuracy(scores: Sequence[ArrayLike], ranks: Sequence[ArrayLike]) -> float:
    """ImageRewardDB test accuracy: correct / counted pairs pooled over all prompts."""
    if len(scores) != len(ranks):
        raise ValueError(f"{len(scores)} score lists but {len(ranks)} rank lists")
    counts = np.array([imagereward_counts(s, r) for s, r in zip(scores, ranks)], dtype=np.float64).reshape(-1, 2)
    total = counts[:, 1].sum()
    return float(counts[:, 0].sum() / total) if total else math.nan


# ---------------------------------------------------------------- VideoGen-RewardBench

VIDEOGEN_DIMENSIONS: tuple[str, ...] = ("VQ", "MQ", "TA", "Overall")
"""The label columns of ``videogen-rewardbench.csv``: visual quality, motion quality, text alignment, overall."""

VIDEOGEN_LABELS: dict[str, int] = {"A": 1, "B": -1, "same": 0}
"""Label text -> ``h`` as ``eval_videogen_rewardbench.py`` maps it."""


def _videogen_inputs(h: ArrayLike, m: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    h, m = _array(h, "h"), _array(m, "m")
    _same_length(h, m)
    if not np.isin(h, (-1.0, 0.0, 1.0)).all():
        raise ValueError("human labels h must be 1 (A preferred), -1 (B preferred) or 0 (tie)")
    return h, m


def videogen_counts(h: ArrayLike, m: ArrayLike, epsilon: float = -1.0) -> dict[str, int]:
    """The sufficient statistics of VideoAlign's ``suff_stats``: ``C`` consistent, ``D`` discordant, ``Th`` human
    tie only, ``Tm`` model tie only (``|m| <= epsilon``), ``Thm`` both. ``epsilon = -1`` (the default, as the
    reference's "w/o ties") predicts no ties, so an exact ``m == 0`` against a human preference is discordant."""
    h, m = _videogen_inputs(h, m)
    model_tie = np.abs(m) <= epsilon
    human_tie = h == 0
    strict = ~human_tie & ~model_tie
    return {
        "C": int((strict & (h * m > 0)).sum()),
        "D": int((strict & ~(h * m > 0)).sum()),
        "Th": int((human_tie & ~model_tie).sum()),
        "Tm": int((~human_tie & model_tie).sum()),
        "Thm": int((human_tie & model_tie).sum()),
    }


def videogen_accuracy_without_ties(h: ArrayLike, m: ArrayLike) -> float:
    """VideoGen-RewardBench accuracy "w/o ties": ``C / (C + D + Tm)`` at ``epsilon = -1``, i.e. the fraction of
    the pairs with a human preference whose score difference has its sign (``m == 0`` counts wrong); human ties
    are left out."""
    c = videogen_counts(h, m)
    counted = c["C"] + c["D"] + c["Tm"]
    return c["C"] / counted if counted else math.nan


VideogenThresholds = Literal["reference", "distinct"]


def videogen_tie_calibration(
    h: ArrayLike, m: ArrayLike, thresholds: VideogenThresholds = "reference"
) -> tuple[float, float]:
    """(accuracy w/ ties, its threshold ``epsilon``): Deutsch et al. 2023's tie calibration as VideoAlign's
    ``calc_accuracy_with_ties``.

    The pairs are sorted by ``|m|`` (a stable sort, so equal gaps keep their input order); after the k-th pair
    (k = 1..N) the first k are predicted ties and the rest are not, and the accuracy is
    ``(C + Thm) / N = (#human ties among the first k + #sign matches among the rest) / N``; the result is the
    first maximum. ``thresholds="reference"`` evaluates every k as the reference does, also between pairs of equal
    ``|m|`` (a split no threshold can make); ``"distinct"`` evaluates only where ``|m|`` changes, so every figure
    belongs to a real threshold ``|m| <= epsilon``. Neither evaluates k = 0 (no predicted tie).
    """
    h, m = _videogen_inputs(h, m)
    n = len(h)
    if n == 0:
        return math.nan, math.nan
    order = np.argsort(np.abs(m), kind="stable")
    gaps = np.abs(m[order])
    human_tie = (h[order] == 0).astype(np.float64)
    match = (h[order] * m[order] > 0).astype(np.float64)
    accuracy = (np.cumsum(human_tie) + match.sum() - np.cumsum(match)) / n
    if thresholds == "distinct":
        last = np.append(gaps[1:] != gaps[:-1], True)  # the last pair of each equal-|m| run
        candidates = np.flatnonzero(last)
    elif thresholds == "reference":
        candidates = np.arange(n)
    else:
        raise ValueError(f"thresholds must be 'reference' or 'distinct', got {thresholds!r}")
    best = candidates[int(np.argmax(accuracy[candidates]))]
    return float(accuracy[best]), float(gaps[best])


def videogen_accuracy_with_ties(h: ArrayLike, m: ArrayLike, thresholds: VideogenThresholds = "reference") -> float:
    """VideoGen-RewardBench accuracy "w/ ties" (see :func:`videogen_tie_calibration`)."""
    return videogen_tie_calibration(h, m, thresholds)[0]


# ---------------------------------------------------------------- HPDv3


def hpdv3_outcomes(s_preferred: ArrayLike, s_other: ArrayLike) -> np.ndarray:
    """Per pair 1 when the preferred image (``path1``) scores strictly higher, else 0 (a tie is wrong)."""
    s_preferred, s_other = _array(s_preferred, "s_preferred"), _array(s_other, "s_other")
    _same_length(s_preferred, s_other)
    return (s_preferred > s_other).astype(np.float64)


def hpdv3_accuracy(s_preferred: ArrayLike, s_other: ArrayLike) -> float:
    """HPDv3 pair accuracy as HPSv3's ``evaluate.py`` (mode ``pair``): ``total_correct / total_items``."""
    outcomes = hpdv3_outcomes(s_preferred, s_other)
    return float(outcomes.mean()) if outcomes.size else math.nan


# ---------------------------------------------------------------- pairs and rankings


def pairwise_outcomes(
    s_chosen: ArrayLike, s_rejected: ArrayLike, labels: ArrayLike | None = None, predicted_tie: float = 0.5
) -> np.ndarray:
    """Per pair: 1 if ``chosen`` scores higher, 0 if lower, ``predicted_tie`` if equal; NaN for ground-truth
    ties (``label == 0.5``; labels are P(chosen preferred), default 1)."""
    s_chosen, s_rejected = _array(s_chosen, "s_chosen"), _array(s_rejected, "s_rejected")
    _same_length(s_chosen, s_rejected)
    labels = np.ones_like(s_chosen) if labels is None else _array(labels, "labels")
    _same_length(s_chosen, labels)
    diff = np.where(labels >= 0.5, s_chosen - s_rejected, s_rejected - s_chosen)
    out = np.where(diff > 0, 1.0, np.where(diff < 0, 0.0, predicted_tie))
    return np.where(labels == 0.5, np.nan, out)


def pairwise_accuracy(
    s_chosen: ArrayLike, s_rejected: ArrayLike, labels: ArrayLike | None = None, predicted_tie: float = 0.5
) -> float:
    """Fraction of non-tied pairs the scores order like the humans (predicted ties count ``predicted_tie``)."""
    outcomes = pairwise_outcomes(s_chosen, s_rejected, labels, predicted_tie)
    kept = outcomes[~np.isnan(outcomes)]
    return float(kept.mean()) if kept.size else math.nan


def rank_correlations(scores: ArrayLike, ranks: ArrayLike) -> tuple[float, float]:
    """(Spearman rho, Kendall tau-b) between the scores and the human order (``-ranks``) of one prompt;
    NaN when either side is constant."""
    from scipy import stats

    scores, ranks = _array(scores, "scores"), _array(ranks, "ranks")
    _same_length(scores, ranks)
    if len(scores) < 2 or np.ptp(scores) == 0 or np.ptp(ranks) == 0:
        return math.nan, math.nan
    rho = stats.spearmanr(scores, -ranks).statistic
    tau = stats.kendalltau(scores, -ranks, variant="b").statistic
    return float(rho), float(tau)


# ---------------------------------------------------------------- Bradley-Terry calibration


def bt_probability(s_a: ArrayLike, s_b: ArrayLike, logit_scale: float = 1.0) -> np.ndarray:
    """Bradley-Terry P(a preferred to b) = ``sigmoid(logit_scale * (s_a - s_b))``; temperature = 1/logit_scale."""
    s_a, s_b = _array(s_a, "s_a"), _array(s_b, "s_b")
    _same_length(s_a, s_b)
    return sigmoid(logit_scale * (s_a - s_b))


def expected_calibration_error(
    s_chosen: ArrayLike,
    s_rejected: ArrayLike,
    labels: ArrayLike | None = None,
    logit_scale: float = 1.0,
    n_bins: int = 10,
    weights: ArrayLike | None = None,
) -> float:
    """Top-label ECE (Guo et al. 2017) of Bradley-Terry probabilities over pairs.

    The confidence of a pair is ``max(p, 1 - p)`` with ``p = bt_probability(s_chosen, s_rejected)``; it falls in
    one of ``n_bins`` equal bins of [0.5, 1]; ``ECE = sum_b |sum correct - sum confidence| / N``. Labels are
    P(chosen preferred) (default 1): a ground-truth tie (0.5) is half correct whatever the prediction.
    ``weights`` (pair multiplicities, e.g. from a bootstrap resample) default to 1.
    """
    p = bt_probability(s_chosen, s_rejected, logit_scale)
    y = np.ones_like(p) if labels is None else _array(labels, "labels")
    w = np.ones_like(p) if weights is None else _array(weights, "weights")
    _same_length(p, y, w)
    if not p.size or w.sum() == 0:
        return math.nan
    confidence = np.maximum(p, 1.0 - p)
    correct = np.where(p >= 0.5, y, 1.0 - y)
    bins = np.minimum(((confidence - 0.5) / 0.5 * n_bins).astype(np.int64), n_bins - 1)
    gap = np.bincount(bins, weights=w * (correct - confidence), minlength=n_bins)
    return float(np.abs(gap).sum() / w.sum())


def bt_nll(s_chosen: ArrayLike, s_rejected: ArrayLike, labels: ArrayLike | None = None, logit_scale: float = 1.0):
    """Mean negative log-likelihood of soft labels under the Bradley-Terry model."""
    s_chosen, s_rejected = _array(s_chosen, "s_chosen"), _array(s_rejected, "s_rejected")
    y = np.ones_like(s_chosen) if labels is None else _array(labels, "labels")
    z = logit_scale * (s_chosen - s_rejected)
    return float(np.mean(y * np.logaddexp(0.0, -z) + (1.0 - y) * np.logaddexp(0.0, z)))


def fit_logit_scale(
    s_chosen: ArrayLike,
    s_rejected: ArrayLike,
    labels: ArrayLike | None = None,
    bounds: tuple[float, float] = (1e-4, 1e4),
) -> float:
    """The ``logit_scale`` (1 / temperature) minimising the Bradley-Terry NLL (temperature scaling, Guo et al.
    2017), searched on a log scale within ``bounds``; fit it on a validation split, report on the test split."""
    from scipy.optimize import minimize_scalar

    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    result = minimize_scalar(
        lambda log_a: bt_nll(s_chosen, s_rejected, labels, math.exp(log_a)), bounds=(lo, hi), method="bounded"
    )
    return float(math.exp(result.x))


# ---------------------------------------------------------------- bootstrap


@dataclass(frozen=True)
class Estimate:
    """A figure with its percentile bootstrap confidence interval."""

    value: float
    low: float
    high: float
    n: int
    level: float = 0.95

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.value:.4f} [{self.low:.4f}, {self.high:.4f}]"


def _quantiles(stats: np.ndarray, level: float) -> tuple[float, float]:
    stats = stats[np.isfinite(stats)]
    if not stats.size:
        return math.nan, math.nan
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(stats, [alpha, 1.0 - alpha])
    return float(low), float(high)


def bootstrap_ratio(
    values: ArrayLike,
    weights: ArrayLike | None = None,
    *,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """``sum(values) / sum(weights)`` (the mean when ``weights`` is None) with a percentile CI from
    ``n_resamples`` resamples of the units with replacement (``np.random.default_rng(seed)``)."""
    values = _array(values, "values")
    weights = np.ones_like(values) if weights is None else _array(weights, "weights")
    _same_length(values, weights)
    n = len(values)
    if n == 0 or weights.sum() == 0:
        return Estimate(math.nan, math.nan, math.nan, n, level)
    point = float(values.sum() / weights.sum())
    if n_resamples <= 0:
        return Estimate(point, math.nan, math.nan, n, level)
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_resamples, 4_000_000 // n))
    stats = []
    for start in range(0, n_resamples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_resamples - start), n))
        num, den = values[idx].sum(axis=1), weights[idx].sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            stats.append(num / den)
    low, high = _quantiles(np.concatenate(stats), level)
    return Estimate(point, low, high, n, level)


def bootstrap_statistic(
    statistic: Callable[[np.ndarray], float],
    n_units: int,
    *,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """Any statistic of resampled unit indices: ``statistic(np.arange(n))`` is the point estimate, the CI is the
    percentile interval of ``statistic(idx)`` over ``n_resamples`` seeded resamples."""
    point = float(statistic(np.arange(n_units)))
    if n_units == 0 or n_resamples <= 0:
        return Estimate(point, math.nan, math.nan, n_units, level)
    rng = np.random.default_rng(seed)
    stats = np.array([statistic(rng.integers(0, n_units, size=n_units)) for _ in range(n_resamples)])
    low, high = _quantiles(stats, level)
    return Estimate(point, low, high, n_units, level)
