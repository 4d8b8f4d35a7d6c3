"""Small tensor helpers shared by the sampler math (:mod:`mmalign.models`) and the losses
(:mod:`mmalign.trainers.losses`): a low layer, importing nothing of mmalign."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["compute_dtype", "left_broadcast"]


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """At least float32: the references cast model outputs with ``.float()`` before reducing."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def left_broadcast(value: float | Tensor, like: Tensor, name: str) -> Tensor:
    """A float, a 0-d tensor or a per-sample tensor ``[B]`` -> shaped to broadcast against ``like`` [B, ...]."""
    tensor = torch.as_tensor(value, device=like.device, dtype=like.dtype)
    if tensor.ndim == 0:
        return tensor
    if tensor.ndim != 1 or tensor.shape[0] != like.shape[0]:
        raise ValueError(
            f"{name} must be a scalar or a per-sample tensor [{like.shape[0]}], got shape {tuple(tensor.shape)}"
        )
    return tensor.reshape(tensor.shape + (1,) * (like.ndim - 1))
