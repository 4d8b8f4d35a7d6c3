"""Reward models: ``score(media, prompts) -> Tensor[B]``. Entries live in :data:`mmalign.registry.REWARDS`; an
``http(s)://HOST:PORT/NAME`` address is a reward served by ``mmalign serve`` (:mod:`mmalign.serve`), and
``ensemble:FILE`` a calibrated ensemble fitted by ``mmalign bench rewards --fit-ensemble``
(:mod:`mmalign.rewards.ensemble`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..registry import REWARDS

if TYPE_CHECKING:
    from .base import Reward


REWARD_URL_SCHEMES = ("http://", "https://")


def is_reward_url(name: str) -> bool:
    """Whether a reward name is the address of a served reward (``http://127.0.0.1:8000/pickscore``)."""
    return name.startswith(REWARD_URL_SCHEMES)


def load_reward(name: str, **kwargs: Any) -> Reward:
    """Build a registered reward, e.g. ``load_reward("hpsv2.1", weights="HPS_v2.1_compressed.pt")``, or connect
    to a served one, ``load_reward("http://127.0.0.1:8000/hpsv2.1")`` (an :class:`~mmalign.serve.client.HTTPReward`,
    used the same way; its files, device and dtype are the server's), or build an ensemble from its file,
    ``load_reward("ensemble:runs/ensemble.json")`` (member files come from the file).

    Common keyword arguments: ``weights`` (file, folder or hub id), ``processor`` (tokenizer/processor
    folder or hub id), ``backbone`` (CLIP folder for heads on CLIP features), ``device``, ``dtype``.
    """
    if is_reward_url(name):
        from ..serve.client import HTTPReward

        return HTTPReward.from_url(name, **kwargs)
    if name.startswith("ensemble:"):
        from .ensemble import EnsembleReward

        return EnsembleReward.from_file(name[len("ensemble:") :], **kwargs)
    return REWARDS.build(name, **kwargs)


def list_rewards() -> list[str]:
    return REWARDS.names()


__all__ = ["load_reward", "list_rewards", "is_reward_url", "REWARDS"]
