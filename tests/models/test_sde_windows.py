"""SDE-window policies of the GRPO family (:mod:`mmalign.models.sde_windows`) against closed forms written again
here from the references' descriptions (Flow-GRPO-Fast, MixGRPO, DanceGRPO), never by calling the function under
test to produce an expectation."""

from __future__ import annotations

import math
import random
from collections import Counter
from itertools import groupby

import numpy as np
import pytest
import torch

from mmalign.models.sde_windows import (
    dance_train_steps,
    fast_window,
    mixgrpo_flash_sigmas,
    mixgrpo_window,
    reference_timesteps,
    shifted_linear_sigmas,
)

# ----------------------------------------------------------------------------------------------- Flow-GRPO-Fast


def test_fast_window_zero_size_is_every_step_but_the_last():
    assert fast_window(10, 0) == (0, 9)
    assert fast_window(40, 0, (3, 7)) == (0, 39)  # the range is ignored


def test_fast_window_draws_start_uniformly_in_the_range_inclusive():
    rng = random.Random(0)
    starts = Counter(fast_window(10, 3, (0, 5), rng)[0] for _ in range(3000))
    assert set(starts) == {0, 1, 2}  # 0 .. 5 − 3, both ends
    assert all(abs(count - 1000) < 120 for count in starts.values())
    for _ in range(50):
        start, end = fast_window(10, 2, (0, 10), rng)
        assert end - start == 2 and 0 <= start <= 8


def test_fast_window_matches_the_global_random_module_draw_for_draw():
    """The reference calls ``random.randint`` on Python's global generator after ``random.seed``."""
    state = random.getstate()
    try:
        random.seed(42)
        expected = [random.randint(0, 10 - 2) for _ in range(20)]
    finally:
        random.setstate(state)
    rng = random.Random(42)
    assert [fast_window(10, 2, (0, 10), rng)[0] for _ in range(20)] == expected


def test_fast_window_single_choice_needs_no_rng():
    """FLUX-fast recipes: 6 steps, window 3, range (0, 6 // 2): the window is always (0, 3)."""
    assert fast_window(6, 3, (0, 3)) == (0, 3)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((10, 2, (0, 11)), "0 <= low <= high <= steps"),
        ((10, 4, (2, 5)), "narrower"),
        ((10, -1, (0, 5)), "window_size"),
        ((10, 2, (0, 5)), "needs rng"),
        ((0, 0, (0, 0)), "steps"),
    ],
)
def test_fast_window_errors(args, message):
    with pytest.raises(ValueError, match=message):
        fast_window(*args)


# ----------------------------------------------------------------------------------------------------- MixGRPO


def progressive_start(k: int, last: int, interval: int, stride: int, roll_back: bool) -> int:
    """Start of the window at iteration k: +stride every interval iterations; past ``last`` restart or stay."""
    if roll_back and stride > 0:
        positions = last // stride + 1  # 0, stride, ..., ≤ last
        k %= positions * interval
    return min(stride * (k // interval), last)


@pytest.mark.parametrize("roll_back", [True, False])
@pytest.mark.parametrize(("steps", "size", "interval", "stride"), [(25, 4, 25, 1), (25, 4, 20, 1), (16, 3, 5, 3)])
def test_mixgrpo_progressive_windows_follow_the_closed_form(steps, size, interval, stride, roll_back):
    last = steps - 2
    for k in range(0, 1400):
        start = progressive_start(k, last, interval, stride, roll_back)
        got = mixgrpo_window(k, steps, size, interval, stride, roll_back=roll_back)
        assert got == (start, max(start, min(start + size, last))), k


def test_mixgrpo_script_defaults_walk_one_step_every_25_iterations_and_restart():
    assert mixgrpo_window(0) == (0, 4) and mixgrpo_window(24) == (0, 4)
    assert mixgrpo_window(25) == (1, 5) and mixgrpo_window(299) == (11, 15)  # max_train_steps 300
    assert mixgrpo_window(20 * 25) == (20, 23)  # truncated at steps − 2 = 23
    assert mixgrpo_window(23 * 25) == (23, 23)  # empty: index 23 is never in a window
    assert mixgrpo_window(24 * 25) == (0, 4)  # roll back
    assert mixgrpo_window(24 * 25, roll_back=False) == (23, 23)  # clip: empty from then on


def test_mixgrpo_flash_star_window_is_frozen_and_no_overlap_moves_by_the_window():
    assert {mixgrpo_window(k, stride=0, shift_interval=20) for k in range(0, 2000, 7)} == {(0, 4)}
    assert mixgrpo_window(25, stride=4) == (4, 8)


def run_lengths(starts):
    return [(start, len(list(group))) for start, group in groupby(starts)]


def test_mixgrpo_decay_dwell_times_shrink_linearly():
    steps, last = 25, 23
    starts = [mixgrpo_window(k, steps, 4, 25, 1, "decay", max_iters_per_group=10, min_iters_per_group=1)[0]
              for k in range(120)]  # fmt: skip
    for start, length in run_lengths(starts)[:-1]:
        p = start / last
        assert length == max(1, int(10 * (1 - p) + 1 * p)), (start, length)


def test_mixgrpo_exp_decay_dwell_times():
    starts = [mixgrpo_window(k, 25, 4, 5, 1, "exp_decay")[0] for k in range(200)]
    for start, length in run_lengths(starts)[:-1]:
        assert length == math.ceil(5 * math.exp(-0.1 * max(0, start - 13))), (start, length)


def test_mixgrpo_random_windows():
    assert mixgrpo_window(0, strategy="random") == (0, 4)  # the first iteration uses the initial state
    rng = np.random.default_rng(3)
    starts = Counter(mixgrpo_window(5, strategy="random", rng=rng)[0] for _ in range(4000))
    assert set(starts) == set(range(0, 23 - 4 + 1))
    expected = np.random.default_rng(3).integers(0, 20)
    assert mixgrpo_window(1, strategy="random", rng=np.random.default_rng(3)) == (expected, expected + 4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"iteration": -1}, "iteration"),
        ({"iteration": 0, "strategy": "linear"}, "strategy"),
        ({"iteration": 0, "steps": 2}, "steps"),
        ({"iteration": 0, "window_size": 24}, "window_size"),
        ({"iteration": 0, "shift_interval": 0}, "shift_interval"),
        ({"iteration": 3, "strategy": "random"}, "needs rng"),
        ({"iteration": 3, "strategy": "decay", "min_iters_per_group": 0}, "decay"),
    ],
)
def test_mixgrpo_window_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mixgrpo_window(**kwargs)


# -------------------------------------------------------------------------------------------- schedules, Flash


def test_shifted_linear_sigmas():
    sigmas = shifted_linear_sigmas(16, 3.0)
    assert sigmas.shape == (17,) and sigmas[0] == 1 and sigmas[-1] == 0
    t = np.linspace(1, 0, 17)
    np.testing.assert_allclose(sigmas.numpy(), 3 * t / (1 + 2 * t), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(shifted_linear_sigmas(4, 1.0), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    with pytest.raises(ValueError, match="shift"):
        shifted_linear_sigmas(4, 0.0)


def test_reference_timesteps_truncate():
    sigmas = torch.tensor([1.0, 0.99971, 0.5004, 0.0015, 0.0])
    assert reference_timesteps(sigmas).tolist() == [1000.0, 999.0, 500.0, 1.0]


def test_flash_schedule_keeps_the_window_and_compresses_the_tail():
    full = shifted_linear_sigmas(25)
    # window (0, 4): last SDE step 3, n = int((25 − 3)·0.4) = 8 tail points → 7 DPM steps, 11 steps in all
    flash = mixgrpo_flash_sigmas(25, 4)
    assert flash.shape == (12,)
    torch.testing.assert_close(flash[:5], full[:5])  # the tail starts at the window's end σ
    assert flash[-1] == 0 and bool((flash[1:] < flash[:-1]).all())
    t = np.linspace(np.linspace(1, 0, 26)[4], 0, 8)
    np.testing.assert_allclose(flash[4:].numpy(), 3 * t / (1 + 2 * t), rtol=1e-6, atol=1e-7)
    # Flash*: ratio 0.2 → n = int(22·0.2) = 4
    assert mixgrpo_flash_sigmas(25, 4, compress_ratio=0.2).shape == (4 + 4,)


def test_flash_schedule_quirk_single_tail_point_does_not_reach_zero():
    flash = mixgrpo_flash_sigmas(25, 24)  # last SDE step 23: n = int(max(2·0.4, 1)) = 1
    assert flash.shape == (25,) and flash[-1] > 0
    torch.testing.assert_close(flash, shifted_linear_sigmas(25)[:25])
    with pytest.raises(ValueError, match="window_end"):
        mixgrpo_flash_sigmas(25, 0)
    with pytest.raises(ValueError, match="compress_ratio"):
        mixgrpo_flash_sigmas(25, 4, compress_ratio=0.0)


# --------------------------------------------------------------------------------------------------- DanceGRPO


def test_dance_train_steps_are_per_sample_permutations_of_all_but_the_last_step():
    steps = dance_train_steps(16, 12, 0.6, torch.Generator().manual_seed(0))
    assert steps.shape == (12, 9)  # int(15 · 0.6)
    for row in steps.tolist():
        assert len(set(row)) == 9 and all(0 <= j <= 14 for j in row)
    assert len({tuple(row) for row in steps.tolist()}) > 1
    gen = torch.Generator().manual_seed(0)
    expected = torch.stack([torch.randperm(15, generator=gen) for _ in range(12)])[:, :9]
    assert torch.equal(steps, expected)
    counts = Counter(dance_train_steps(16, 3000, 0.6, torch.Generator().manual_seed(1)).flatten().tolist())
    assert set(counts) == set(range(15)) and all(abs(c - 1800) < 150 for c in counts.values())


def test_dance_train_steps_errors():
    with pytest.raises(ValueError, match="steps"):
        dance_train_steps(1, 2)
    with pytest.raises(ValueError, match="timestep_fraction"):
        dance_train_steps(16, 2, 1.5)
    with pytest.raises(ValueError, match="no step"):
        dance_train_steps(3, 2, 0.4)
