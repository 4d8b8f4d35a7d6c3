"""Which sampling steps are stochastic (and trained) in the GRPO family: Flow-GRPO-Fast's random window, MixGRPO's
sliding window (and MixGRPO-Flash's compressed ODE tail), DanceGRPO's per-sample random subset of steps.

Every function is pure: integers (and an explicitly passed random generator) in, a window or a schedule out.
A window ``(start, end)`` means steps ``start <= j < end`` are SDE steps, as ``sde_window`` of
:func:`mmalign.models.flow_rollout.sample_flow_trajectories`; every other step is an ODE step.

References (read, re-derived; no code taken):

* Flow-GRPO-Fast: yifan123/flow_grpo at commit 9745241cf1101407e9b518dd4f10498092150522 (read from the fork
  zhtmike/flow_grpo, whose head is that upstream merge commit): ``flow_grpo/diffusers_patch/
  sd3_pipeline_with_logprob_fast.py`` ``pipeline_with_logprob`` lines 135-143 (window) and 150-196 (noise level
  per step, what is recorded); ``scripts/train_sd3_fast.py`` lines 347-351 (trained steps), 380 (seeding),
  643-664 (one pipeline call per sampling batch), 869 (every window step trained); ``config/base.py`` lines
  64-67 and ``config/grpo.py`` (recipes).
* MixGRPO: Tencent-Hunyuan/MixGRPO at commit e5cdd6a427778d8c8b2e7a48ce16972141adbe7c:
  ``fastvideo/utils/grpo_states.py`` ``GRPOTrainingStates`` (lines 29-148), ``fastvideo/train_grpo_flux.py``
  lines 915-947 (state set-up, window read *before* each update), ``fastvideo/utils/sampling_utils.py``
  ``run_sample_step`` lines 29-54 (Flash's compressed schedule) and 112-144 (which solver where),
  ``scripts/finetune/finetune_flux_grpo_MixGRPO*.sh`` (defaults).
* DanceGRPO: XueZeyue/DanceGRPO at commit 15cc71d53cc2e6e18a68ee607d5fb6ba9a99e344: ``fastvideo/train_grpo_flux.py``
  lines 127-128 and 311-313 (schedule), 231-232 and 505-524 (timesteps; last step dropped), 551-570
  (per-sample permutation, fraction).
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "MIXGRPO_STRATEGIES",
    "dance_train_steps",
    "fast_window",
    "mixgrpo_flash_sigmas",
    "mixgrpo_window",
    "reference_timesteps",
    "shifted_linear_sigmas",
]

MIXGRPO_STRATEGIES = ("progressive", "random", "decay", "exp_decay")


def fast_window(
    steps: int,
    window_size: int = 2,
    window_range: tuple[int, int] = (0, 10),
    rng: random.Random | None = None,
) -> tuple[int, int]:
    """Flow-GRPO-Fast's SDE window for one sampling batch.

    ``start`` is drawn uniformly from ``window_range[0] .. window_range[1] − window_size`` (both ends included:
    Python's ``random.randint``) and ``end = start + window_size``; ``window_size == 0`` gives Flow-GRPO's
    default ``(0, steps − 1)`` (every step but the last, whose Gaussian is too sharp to train on). Only the
    window's steps are stochastic, recorded and trained (all of them, in order). Defaults are
    ``config/base.py`` lines 65-67 (``sde_window_size = 2``, ``sde_window_range = (0, 10)``).

    ``rng`` must be a ``random.Random`` when there is more than one possible start. The reference draws from
    Python's global ``random``, seeded by ``set_seed(config.seed, device_specific=True)`` (seed 42 + process
    index), once per pipeline call, i.e. one window shared by the ``train_batch_size`` images of a sampling batch
    and a different window on each process and batch; ``random.Random(s).randint`` reproduces
    ``random.seed(s); random.randint`` exactly.
    """
    steps, window_size = int(steps), int(window_size)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if window_size < 0:
        raise ValueError(f"window_size must be >= 0, got {window_size}")
    if window_size == 0:
        return (0, steps - 1)
    low, high = (int(value) for value in window_range)
    if not 0 <= low <= high <= steps:
        raise ValueError(f"window_range {tuple(window_range)} must satisfy 0 <= low <= high <= steps ({steps})")
    if high - low < window_size:
        raise ValueError(f"window_range {tuple(window_range)} is narrower than window_size {window_size}")
    if high - low == window_size:
        return (low, high)
    if rng is None:
        raise ValueError("fast_window needs rng (a random.Random) to draw the window's start")
    start = rng.randint(low, high - window_size)
    return (start, start + window_size)


def mixgrpo_window(
    iteration: int,
    steps: int = 25,
    window_size: int = 4,
    shift_interval: int = 25,
    stride: int = 1,
    strategy: str = "progressive",
    roll_back: bool = True,
    max_iters_per_group: int = 10,
    min_iters_per_group: int = 1,
    exp_decay_threshold: int = 13,
    exp_decay_k: float = 0.1,
    rng: np.random.Generator | None = None,
) -> tuple[int, int]:
    """MixGRPO's SDE window at training ``iteration`` (0-based: the reference's ``global_step``).

    The window start ``s`` walks over step indices ``0 .. steps − 2`` (``max_timesteps = sampling_steps − 2``)
    and the window is ``(s, min(s + window_size, steps − 2))``: it is truncated near the end and *empty* when
    ``s = steps − 2`` (the reference's ``get_current_timesteps``; index ``steps − 2`` is never in a window and the
    last step is never trained, ``--ignore_last``). Every step of the window is SDE and trained, for every
    sample; all others are ODE. The window used at iteration ``k`` is read before the ``k``-th update:

    * ``"progressive"`` (the scripts'): ``s`` moves by ``stride`` every ``shift_interval`` iterations. When it
      would pass ``steps − 2`` it restarts at 0 (``roll_back=True``, the scripts') or stays at ``steps − 2``
      (an empty window from then on). Hence ``s = stride·⌊k / shift_interval⌋`` until the restart.
      ``stride`` is ``prog_overlap_step`` (``--prog_overlap``); without ``--prog_overlap`` it is ``window_size``;
      0 freezes the window at ``(0, window_size)`` (MixGRPO-Flash*).
    * ``"decay"``: as progressive, but the window stays ``int(max_iters·(1 − p) + min_iters·p)`` iterations
      (at least ``min_iters``) with ``p = s / (steps − 2)``.
    * ``"exp_decay"``: stays ``ceil(shift_interval·exp(−k·max(0, s − threshold)))`` iterations.
    * ``"random"``: ``s`` uniform in ``0 .. steps − 2 − window_size`` (numpy ``integers``) from iteration 1 on,
      0 at iteration 0. The reference draws from a fresh unseeded ``np.random.default_rng()`` each time; here
      ``rng`` (a ``np.random.Generator``) is required and one value is drawn per call.

    Defaults: ``scripts/finetune/finetune_flux_grpo_MixGRPO.sh`` lines 54-60, 164-168 (25 steps, window 4,
    ``iters_per_group`` 25, progressive, overlap step 1, roll back, max/min iters 10/1); MixGRPO-Flash uses
    ``shift_interval=20`` (``finetune_flux_grpo_MixGRPO_Flash.sh`` line 57), Flash* ``stride=0``.
    ``exp_decay_threshold``/``exp_decay_k`` are ``GRPOTrainingStates`` defaults (``grpo_states.py`` lines 40-41).
    """
    iteration, steps, window_size = int(iteration), int(steps), int(window_size)
    shift_interval, stride = int(shift_interval), int(stride)
    if strategy not in MIXGRPO_STRATEGIES:
        raise ValueError(f"strategy must be one of {MIXGRPO_STRATEGIES}, got {strategy!r}")
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}")
    if steps < 3:
        raise ValueError(f"steps must be >= 3 (windows live in 0 .. steps - 2), got {steps}")
    last = steps - 2
    if not 1 <= window_size <= last:
        raise ValueError(f"window_size must be in 1 .. steps - 2 ({last}), got {window_size}")
    if shift_interval < 1 or stride < 0:
        raise ValueError(f"shift_interval must be >= 1 and stride >= 0, got {shift_interval} and {stride}")

    def window(start: int) -> tuple[int, int]:
        return (start, max(start, min(start + window_size, last)))

    if strategy == "random":
        if iteration == 0:
            return window(0)
        if rng is None:
            raise ValueError("strategy 'random' needs rng (a numpy Generator)")
        return window(int(rng.integers(0, last - window_size + 1)))
    if strategy == "decay" and not 1 <= min_iters_per_group <= max_iters_per_group:
        raise ValueError(f"decay needs 1 <= min_iters_per_group <= max_iters_per_group, got "
                         f"{min_iters_per_group}, {max_iters_per_group}")  # fmt: skip

    def dwell(start: int) -> float:
        """Iterations the window stays at ``start`` before it moves."""
        if strategy == "decay":
            progress = start / last
            current = int(max_iters_per_group * (1 - progress) + min_iters_per_group * progress)
            return max(min_iters_per_group, current)
        if strategy == "exp_decay":
            return float(np.ceil(shift_interval * np.exp(-exp_decay_k * max(0, start - exp_decay_threshold))))
        return shift_interval

    start, in_group = 0, 0
    for _ in range(iteration):
        in_group += 1
        if in_group >= dwell(start):
            in_group = 0
            start += stride
        if start > last:
            if roll_back:
                start, in_group = 0, 0
            else:
                start = last
    return window(start)


def shifted_linear_sigmas(steps: int, shift: float = 3.0) -> Tensor:
    """DanceGRPO's and MixGRPO's FLUX schedule ``[steps + 1]``: σ = shift·t / (1 + (shift − 1)·t) on
    ``t = linspace(1, 0, steps + 1)`` (float32), from 1 to exactly 0 (``sd3_time_shift``; DanceGRPO
    ``train_grpo_flux.py`` lines 127-128, 311-313). Not diffusers' FLUX schedule (which is resolution-dependent
    and stops at σ = 1/1000 before appending 0)."""
    steps = int(steps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    t = torch.linspace(1, 0, steps + 1)
    return (shift * t) / (1 + (shift - 1) * t)


def reference_timesteps(sigmas: Tensor) -> Tensor:
    """The model timesteps DanceGRPO and MixGRPO feed FLUX for a schedule: ``int(σ·1000)`` (truncated toward 0)
    for ``sigmas[:-1]``, as float; the transformer receives this ``/ 1000``. The SDE step itself uses the exact
    σ (``run_sample_step``, DanceGRPO ``train_grpo_flux.py`` lines 231-232, 505-512)."""
    return torch.tensor([float(int(float(s) * 1000)) for s in sigmas[:-1]])


def mixgrpo_flash_sigmas(steps: int, window_end: int, shift: float = 3.0, compress_ratio: float = 0.4) -> Tensor:
    """MixGRPO-Flash's sampling schedule: :func:`shifted_linear_sigmas` up to the window's end, then a shorter
    ODE tail taken with DPM-Solver++(2M) (:func:`mmalign.models.flow_sampling.flow_dpm2_step`).

    Reference: ``run_sample_step`` with ``dpm_apply_strategy='post'`` (``sampling_utils.py`` lines 31-54). With
    ``last = window_end − 1`` (the last SDE step) and ``n = int(max((steps − last)·compress_ratio, 1))``, the tail
    is ``shift(linspace(t_end, 0, n))`` with ``t_end = linspace(1, 0, steps + 1)[window_end]``, so its first
    σ is the window's end σ and the schedule has ``window_end + n − 1`` steps: steps before the window are Euler
    ODE steps on the original grid (not compressed), the window's steps SDE, the tail ``n − 1`` DPM steps.

    Quirk kept from the reference: when ``n == 1`` the tail is the single point σ(window_end) and the schedule
    ends there, not at 0 (the image is decoded from a partly noisy latent); it happens only for windows ending
    near the last steps (``(steps − last)·compress_ratio < 2``). An empty window makes the reference fail, so
    ``window_end`` must be >= 1. MixGRPO-Flash: ``compress_ratio`` 0.4 (``finetune_flux_grpo_MixGRPO_Flash.sh``
    line 77); Flash*: 0.2.
    """
    steps, window_end = int(steps), int(window_end)
    if not 1 <= window_end <= steps:
        raise ValueError(f"window_end must be in 1 .. steps ({steps}), got {window_end}")
    if not 0 < compress_ratio <= 1:
        raise ValueError(f"compress_ratio must be in (0, 1], got {compress_ratio}")
    last = window_end - 1
    points = int(max((steps - last) * compress_ratio, 1))
    t_end = torch.linspace(1, 0, steps + 1)[window_end].item()
    tail = torch.linspace(t_end, 0, points)
    tail = (shift * tail) / (1 + (shift - 1) * tail)
    return torch.cat([shifted_linear_sigmas(steps, shift)[:window_end], tail])


def dance_train_steps(
    steps: int, batch: int, timestep_fraction: float = 0.6, generator: torch.Generator | None = None
) -> Tensor:
    """DanceGRPO's trained steps ``[batch, k]``: for every sample its own random permutation of the steps
    ``0 .. steps − 2`` (the last step is never trained), of which the first ``k = int((steps − 1)·fraction)``
    are trained, in that order (``train_grpo_flux.py`` lines 511-524, 551-570: ``torch.randperm`` per sample
    from the global torch RNG, seeded ``seed + rank``). ``generator`` (CPU) is used for the permutations;
    row ``b`` is the ``b``-th ``torch.randperm(steps − 1, generator=generator)``. Defaults: ``timestep_fraction``
    0.6 with 16 steps (``scripts/finetune/finetune_flux_grpo.sh``) trains 9 of 15 steps per sample.
    """
    steps, batch = int(steps), int(batch)
    if steps < 2:
        raise ValueError(f"steps must be >= 2 (the last step is never trained), got {steps}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if not 0 < timestep_fraction <= 1:
        raise ValueError(f"timestep_fraction must be in (0, 1], got {timestep_fraction}")
    count = int((steps - 1) * timestep_fraction)
    if count < 1:
        raise ValueError(f"timestep_fraction {timestep_fraction} of {steps - 1} steps trains no step")
    perms = torch.stack([torch.randperm(steps - 1, generator=generator) for _ in range(batch)])
    return perms[:, :count]
