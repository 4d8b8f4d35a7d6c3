"""Reward models: ``score(media, prompts) -> Tensor[B]``. Entries live in :data:`mmalign.registry.REWARDS`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..registry import REWARDS

if TYPE_CHECKING:
    from .base import Reward


def load_reward(name: str, **kwargs: Any) -> Reward:
    """Build a registered reward, e.g. ``load_reward("hpsv2.1", weights="HPS_v2.1_compressed.pt")``.

    Common keyword arguments: ``weights`` (file, folder or hub id), ``processor`` (tokenizer/processor
    folder or hub id), ``backbone`` (CLIP folder for heads on CLIP features), ``device``, ``dtype``.
    """
    return REWARDS.build(name, **kwargs)


def list_rewards() -> list[str]:
    return REWARDS.names()


__all__ = ["load_reward", "list_rewards", "REWARDS"]
