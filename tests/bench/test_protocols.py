"""Accuracy protocols against hand-computed cases (ties included) and independent re-derivations."""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import pytest
from scipy import stats

from mmalign.bench import protocols as P

# ---------------------------------------------------------------- Pick-a-Pic

P0 = [0.875, 0.625, 0.5, 0.25, 0.625]  # exact binary fractions: |p1 - p0| = 0.75, 0.25, 0, 0.5, 0.25
P1 = [1.0 - p for p in P0]
LABEL_0 = [1.0, 1.0, 0.5, 0.5, 0.0]  # image 0 wins, image 0 wins, tie, tie, image 1 wins


def test_pickapic_scores_match_tie_and_mismatch():
    # t = 0: predictions 0, 0, tie (|gap| <= 0), 1, 0 -> 1, 1, 1, 0.5 (one tie), 0 (wrong side)
    assert P.pickapic_outcomes(P0, P1, LABEL_0, 0.0).tolist() == [1.0, 1.0, 1.0, 0.5, 0.0]
    assert P.pickapic_accuracy(P0, P1, LABEL_0, 0.0) == pytest.approx(0.7)
    # t = 0.25 (inclusive): 0, tie, tie, 1, tie -> 1, 0.5, 1, 0.5, 0.5
    assert P.pickapic_outcomes(P0, P1, LABEL_0, 0.25).tolist() == [1.0, 0.5, 1.0, 0.5, 0.5]
    # t = 0.5: 0, tie, tie, tie, tie -> 1, 0.5, 1, 1, 0.5
    assert P.pickapic_accuracy(P0, P1, LABEL_0, 0.5) == pytest.approx(0.8)
    # t = 1: everything a tie -> 0.5, 0.5, 1, 1, 0.5
    assert P.pickapic_accuracy(P0, P1, LABEL_0, 1.0) == pytest.approx(0.7)


def test_pickapic_threshold_selection_takes_the_first_best():
    threshold, accuracies = P.select_tie_threshold(P0, P1, LABEL_0)
    # reference grid 0, 0.1, ..., 1: 0.5, 0.6 and 0.7 all give 0.8; np.argmax keeps the first
    assert threshold == 0.5
    assert accuracies == pytest.approx([0.7, 0.7, 0.7, 0.7, 0.7, 0.8, 0.8, 0.8, 0.7, 0.7, 0.7])
    exhaustive = P.candidate_thresholds(P0, P1)
    assert exhaustive == [0.0, 0.25, 0.5, 0.75]
    assert P.select_tie_threshold(P0, P1, LABEL_0, exhaustive)[0] == 0.5


def test_pickapic_probabilities_are_the_two_way_softmax():
    s0, s1 = np.array([21.0, 19.5, 20.0]), np.array([20.0, 20.5, 20.0])
    p0, p1 = P.pickapic_probabilities(s0, s1)
    softmax = np.exp(np.stack([s0, s1])) / np.exp(np.stack([s0, s1])).sum(axis=0)
    assert np.allclose(p0, softmax[0]) and np.allclose(p1, softmax[1])
    hps0, hps1 = P.pickapic_probabilities(s0 / 100, s1 / 100, logit_scale=100.0)
    assert np.allclose(hps0, p0)


# ---------------------------------------------------------------- HPDv2


def hps_inversion_score(scores, ranks):
    """An independent re-derivation of HPSv2's evaluation: argsort(-scores) -> positions, then count inversions."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # Python's sort is stable
    positions = [order.index(j) for j in range(len(scores))]
    n, count = len(scores), 0
    for i in range(n - 1):
        for j in range(i + 1, n):
            opposite = (positions[i] > positions[j] and ranks[i] < ranks[j]) or (
                positions[i] < positions[j] and ranks[i] > ranks[j]
            )
            count += opposite
    return 1 - count / (n * (n - 1) / 2)


@pytest.mark.parametrize(
    ("scores", "ranks", "expected"),
    [
        ([0.3, 0.2, 0.1], [1, 2, 3], 1.0),
        ([0.1, 0.2, 0.3], [1, 2, 3], 0.0),
        ([0.3, 0.1, 0.2], [1, 2, 2], 1.0),  # the human tie (items 1, 2) is never discordant
        ([0.2, 0.3, 0.1], [1, 1, 2], 1.0),
        ([0.1, 0.3, 0.2, 0.0], [1, 2, 3, 4], 1 - 2 / 6),
        ([0.5, 0.5], [2, 1], 0.0),  # equal scores: index order, item 0 predicted better -> discordant
        ([0.5, 0.5], [1, 2], 1.0),
    ],
)
def test_hpdv2_prompt_accuracy_hand_cases(scores, ranks, expected):
    assert P.hpdv2_prompt_accuracy(scores, ranks) == pytest.approx(expected)
    assert hps_inversion_score(scores, ranks) == pytest.approx(expected)


def test_hpdv2_half_ties_and_mean_over_prompts():
    assert P.hpdv2_prompt_accuracy([0.5, 0.5], [2, 1], predicted_ties="half") == 0.5
    assert P.hpdv2_prompt_accuracy([0.5, 0.5, 0.9], [1, 1, 2], predicted_ties="half") == pytest.approx(1 - 2 / 3)
    scores = [[0.3, 0.2, 0.1], [0.1, 0.2, 0.3], [0.1, 0.3, 0.2, 0.0]]
    ranks = [[1, 2, 3], [1, 2, 3], [1, 2, 3, 4]]
    assert P.hpdv2_accuracy(scores, ranks) == pytest.approx((1 + 0 + 2 / 3) / 3)


def test_hpdv2_matches_reference_on_random_rankings_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(2, 9))
        scores = rng.integers(0, 4, n).astype(float).tolist()  # many exact score ties
        ranks = rng.integers(1, 4, n).astype(float).tolist()  # many human ties
        assert P.hpdv2_prompt_accuracy(scores, ranks) == pytest.approx(hps_inversion_score(scores, ranks))


# ---------------------------------------------------------------- ImageRewardDB


def imagereward_acc(all_scores, all_ranks):
    """THUDM/ImageReward test.py ``acc``, re-derived: pooled, human ties skipped, predicted ties wrong."""
    correct = total = 0
    for scores, ranks in zip(all_scores, all_ranks):
        for i, j in combinations(range(len(ranks)), 2):
            if ranks[i] == ranks[j]:
                continue
            total += 1
            better, worse = (i, j) if ranks[i] < ranks[j] else (j, i)
            correct += scores[better] > scores[worse]
    return correct / total


def test_imagereward_pooled_hand_case():
    scores = [[3.0, 2.0, 1.0], [1.0, 1.0, 2.0]]
    ranks = [[1, 2, 2], [1, 2, 3]]
    assert P.imagereward_counts(scores[0], ranks[0]) == (2, 2)  # the human tie is skipped
    assert P.imagereward_counts(scores[1], ranks[1]) == (0, 3)  # the predicted tie (1.0, 1.0) is wrong
    assert P.imagereward_accuracy(scores, ranks) == pytest.approx(2 / 5)  # pooled, not (1 + 0) / 2
    rng = np.random.default_rng(1)
    s = [rng.integers(0, 3, 5).astype(float) for _ in range(50)]
    r = [rng.integers(1, 4, 5).astype(float) for _ in range(50)]
    assert P.imagereward_accuracy(s, r) == pytest.approx(imagereward_acc(s, r))


# ---------------------------------------------------------------- pairs, rankings, calibration


def test_pairwise_accuracy_with_ties():
    outcomes = P.pairwise_outcomes([1, 2, 3, 3, 0], [0, 3, 3, 1, 1], [1, 1, 1, 0.5, 0.0])
    assert outcomes[:3].tolist() == [1.0, 0.0, 0.5] and math.isnan(outcomes[3]) and outcomes[4] == 1.0
    assert P.pairwise_accuracy([1, 2, 3, 3, 0], [0, 3, 3, 1, 1], [1, 1, 1, 0.5, 0.0]) == pytest.approx(2.5 / 4)
    assert P.pairwise_accuracy([1, 2, 3], [0, 3, 3], predicted_tie=0.0) == pytest.approx(1 / 3)


def test_rank_correlations():
    assert P.rank_correlations([3, 2, 1], [1, 2, 3]) == pytest.approx((1.0, 1.0))
    assert P.rank_correlations([1, 2, 3], [1, 2, 3]) == pytest.approx((-1.0, -1.0))
    rho, tau = P.rank_correlations([1, 1, 1], [1, 2, 3])
    assert math.isnan(rho) and math.isnan(tau)
    scores, ranks = [0.3, 0.1, 0.2, 0.2], [1, 2, 2, 3]
    rho, tau = P.rank_correlations(scores, ranks)
    assert rho == pytest.approx(stats.spearmanr(scores, [-r for r in ranks]).statistic)
    assert tau == pytest.approx(stats.kendalltau(scores, [-r for r in ranks]).statistic)


def test_ece_hand_cases_and_temperature_fit():
    d = math.log(3.0)  # sigma(d) = 0.75
    # four pairs at confidence 0.75, three right: perfectly calibrated
    assert P.expected_calibration_error([d] * 4, [0.0] * 4, [1, 1, 1, 0]) == pytest.approx(0.0)
    # all right at confidence 0.75: |1 - 0.75|
    assert P.expected_calibration_error([d, d], [0.0, 0.0]) == pytest.approx(0.25)
    # two bins: conf 0.75 right (gap 0.25) and conf 0.5 (p = 0.5) right (gap 0.5) -> (0.25 + 0.5) / 2
    assert P.expected_calibration_error([d, 0.0], [0.0, 0.0]) == pytest.approx(0.375)
    # the logit scale is a temperature: scale 2 gives sigma(2 log 3) = 0.9
    assert P.expected_calibration_error([d], [0.0], logit_scale=2.0) == pytest.approx(0.1)
    # weights are multiplicities
    assert P.expected_calibration_error([d, 0.0], [0.0, 0.0], weights=[3, 1]) == pytest.approx((0.75 + 0.5) / 4)
    rng = np.random.default_rng(0)
    delta = rng.normal(size=400)
    soft = P.sigmoid(2.0 * delta)  # soft labels drawn from a BT model at logit scale 2
    assert P.fit_logit_scale(delta, np.zeros_like(delta), soft) == pytest.approx(2.0, rel=1e-3)


# ---------------------------------------------------------------- bootstrap


def test_bootstrap_contains_point_and_is_deterministic():
    rng = np.random.default_rng(3)
    values = (rng.random(300) < 0.7).astype(float)
    a = P.bootstrap_ratio(values, n_resamples=500, seed=7)
    b = P.bootstrap_ratio(values, n_resamples=500, seed=7)
    c = P.bootstrap_ratio(values, n_resamples=500, seed=8)
    assert a == b and a != c
    assert a.low <= a.value <= a.high and a.value == pytest.approx(values.mean())
    assert 0.6 < a.low < a.value < a.high < 0.8
    weights = rng.integers(1, 5, 300).astype(float)
    ratio = P.bootstrap_ratio(values * weights, weights, n_resamples=300, seed=1)
    assert ratio.value == pytest.approx((values * weights).sum() / weights.sum())
    assert ratio.low <= ratio.value <= ratio.high
    generic = P.bootstrap_statistic(lambda idx: float(np.median(values[idx])), len(values), n_resamples=50, seed=2)
    assert generic == P.bootstrap_statistic(
        lambda idx: float(np.median(values[idx])), len(values), n_resamples=50, seed=2
    )
    assert generic.low <= generic.value <= generic.high
    no_ci = P.bootstrap_ratio(values, n_resamples=0)
    assert math.isnan(no_ci.low) and no_ci.value == pytest.approx(values.mean())
