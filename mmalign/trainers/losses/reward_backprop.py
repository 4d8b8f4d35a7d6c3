"""Reward backpropagation objectives: ReFL, DRaFT and AlignProp."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .base import LossOutput, _check_batch


# ----------------------------------------------------------------------------------------------------------
# Reward backpropagation (ReFL, DRaFT, AlignProp)
# ----------------------------------------------------------------------------------------------------------
def refl_loss(rewards: Tensor, target: float = 2.0, scale: float = 1e-3) -> LossOutput:
    """ReFL (Xu et al. 2023, "ImageReward"): ``L = mean relu(target − r)·scale``.

    Reference: THUDM/ImageReward ``ReFL.py`` (``F.relu(-rewards + 2)``, ``.mean() * args.grad_scale``,
    ``grad_scale`` 1e-3), ``rewards`` ``[B]`` from ImageReward on the predicted x0 (differentiable).
    Metrics: ``reward`` (mean).
    """
    _check_batch(rewards=rewards)
    return LossOutput(F.relu(target - rewards).mean() * scale, {"reward": rewards.mean()})


def target_distance_loss(rewards: Tensor, target: float, scale: float = 0.01) -> LossOutput:
    """AlignProp-style distance to a target reward: ``L = mean |r − target|·scale``.

    Reference: mihirp1998/AlignProp (``aesthetic_loss_fn``: ``|aesthetic − 10|``, ``hps_loss_fn``:
    ``1 − hps``, which is ``|hps − 1|`` for cosine scores ≤ 1; ``loss_coeff`` 0.01). Metrics: ``reward``.
    """
    _check_batch(rewards=rewards)
    return LossOutput((rewards - target).abs().mean() * scale, {"reward": rewards.mean()})


def alignprop_aesthetic_loss(rewards: Tensor, target: float = 10.0, scale: float = 0.01) -> LossOutput:
    """AlignProp's aesthetic objective ``0.01·mean |aesthetic − 10|`` (:func:`target_distance_loss`)."""
    return target_distance_loss(rewards, target=target, scale=scale)


def draft_loss(rewards: Tensor, scale: float = 1.0) -> LossOutput:
    """DRaFT (Clark et al. 2024, "Directly Fine-Tuning Diffusion Models on Differentiable Rewards"):
    maximise the reward, ``L = −mean(r)·scale``. No official code; the truncation (DRaFT-K, DRaFT-LV) lives
    in the sampler, not in the loss. Metrics: ``reward``."""
    _check_batch(rewards=rewards)
    return LossOutput(-rewards.mean() * scale, {"reward": rewards.mean()})
