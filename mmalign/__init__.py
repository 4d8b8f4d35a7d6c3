"""mmalign: align generative media models with human preferences.

Light at import: heavy libraries load when a component is first asked for.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load_reward(name: str, **kwargs: Any):
    """Build a named reward model (see :func:`mmalign.rewards.load_reward`)."""
    from .rewards import load_reward as _load

    return _load(name, **kwargs)


def list_rewards() -> list[str]:
    from .registry import REWARDS

    return REWARDS.names()


def score(reward: str, images, prompts=None, **kwargs: Any):
    """One-shot scoring: ``mmalign.score("pickscore", ["a.png"], "a cat", weights=...)``."""
    return load_reward(reward, **kwargs).score(images, prompts)


__all__ = ["__version__", "load_reward", "list_rewards", "score"]
