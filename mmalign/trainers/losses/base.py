"""The output type of every loss and the small checks the loss families share."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
from torch import Tensor

from ...tensors import compute_dtype as _compute_dtype  # noqa: F401  (used by the loss modules)
from ...tensors import left_broadcast as _left_broadcast  # noqa: F401


@dataclass(frozen=True)
class LossOutput:
    """A scalar ``loss`` (differentiable) and named ``metrics`` (detached; read-only mapping).

    Metrics can also be read as attributes: ``out.implicit_acc`` is ``out.metrics["implicit_acc"]``.
    """

    loss: Tensor
    metrics: Mapping[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        detached = {name: value.detach() for name, value in self.metrics.items()}
        object.__setattr__(self, "metrics", MappingProxyType(detached))

    def __getattr__(self, name: str) -> Tensor:
        metrics = self.__dict__.get("metrics")
        if metrics is not None and name in metrics:
            return metrics[name]
        raise AttributeError(f"{type(self).__name__} has no attribute or metric {name!r}")

    def scalars(self) -> dict[str, float]:
        """``loss`` and every metric (means of any non-scalar metric) as Python floats, for logging."""
        out = {"loss": float(self.loss.detach().float())}
        out.update({name: float(value.float().mean()) for name, value in self.metrics.items()})
        return out


def _check_batch(**tensors: Tensor) -> int:
    """All tensors 1-D of the same length; returns that length."""
    size = None
    for name, tensor in tensors.items():
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.ndim != 1:
            raise ValueError(f"{name} must be a 1-D per-sample tensor [B], got shape {tuple(tensor.shape)}")
        if size is None:
            size = tensor.shape[0]
        elif tensor.shape[0] != size:
            shapes = ", ".join(f"{key}={tuple(value.shape)}" for key, value in tensors.items())
            raise ValueError(f"per-sample tensors have different batch sizes: {shapes}")
    if not size:
        raise ValueError("empty batch: every per-sample tensor has length 0")
    return size


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")


def _per_sample(value: float | Tensor, size: int, like: Tensor, name: str) -> Tensor:
    """A float or a tensor of shape [] / [B] -> a detached tensor [B] on ``like``'s device and dtype."""
    tensor = torch.as_tensor(value, device=like.device, dtype=like.dtype).detach()
    if tensor.ndim == 0:
        return tensor.expand(size)
    if tensor.shape != (size,):
        raise ValueError(f"{name} must be a scalar or shape ({size},), got {tuple(tensor.shape)}")
    return tensor


def _fraction(mask: Tensor, like: Tensor) -> Tensor:
    """Mean of a boolean mask, in ``like``'s floating dtype (at least float32)."""
    return mask.to(_compute_dtype(like)).mean()
