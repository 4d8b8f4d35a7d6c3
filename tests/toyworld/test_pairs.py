"""Pairing a prompt's samples by the learned reward's scores."""

from __future__ import annotations

import numpy as np
import pytest

from mmalign.toyworld.demo import pair_indices


def test_extremes_pair_the_best_with_the_worst():
    assert pair_indices(np.array([0.2, 0.9, 0.1, 0.5]), "extremes") == [(1, 2)]
    assert pair_indices(np.array([0.3, 0.3]), "extremes") == []  # a tie gives no pair


def test_halves_pair_every_better_sample_with_every_worse_one():
    scores = np.array([0.2, 0.9, 0.1, 0.5, 0.4, 0.8])
    pairs = pair_indices(scores, "halves")
    assert sorted(pairs) == sorted((w, l) for w in (1, 5, 3) for l in (4, 0, 2))
    assert all(scores[w] > scores[l] for w, l in pairs)
    tied = pair_indices(np.array([0.5, 0.5, 0.5, 0.1]), "halves")
    assert tied == [(0, 3), (1, 3)]  # the tied (0.5, 0.5) pair is left out
    with pytest.raises(ValueError, match="pairing must be one of"):
        pair_indices(scores, "all")
