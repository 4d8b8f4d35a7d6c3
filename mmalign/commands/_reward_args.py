"""``--reward NAME [--weights PATH] [--processor PATH] [--backbone PATH] [--reward NAME ...]``: the reward options
that ``mmalign bench`` and ``mmalign serve`` share (a helper module, not a command). Each ``--reward`` starts a
:class:`~mmalign.bench.runner.RewardSpec` in ``namespace.rewards``; the file options after it belong to it."""

from __future__ import annotations

import argparse
from typing import Any


class RewardAction(argparse.Action):
    """``--reward NAME`` starts a reward; the ``--weights/--processor/--backbone`` that follow belong to it."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: Any, value: Any, option_string: Any = None):
        from ..bench.runner import RewardSpec

        rewards = list(getattr(namespace, "rewards", None) or [])
        rewards.append(RewardSpec(value))
        namespace.rewards = rewards


class RewardOption(argparse.Action):
    """A file option of the preceding ``--reward`` (once per reward)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: Any, value: Any, option_string: Any = None):
        rewards = getattr(namespace, "rewards", None) or []
        if not rewards:
            parser.error(f"{option_string} must follow the --reward it belongs to")
        spec = rewards[-1]
        if getattr(spec, self.dest) is not None:
            parser.error(f"{option_string} given twice for --reward {spec.name}")
        setattr(spec, self.dest, value)


def add_reward_file_options(group: Any, reward_help: str) -> None:
    """``--reward`` (repeatable) and the ``--weights``, ``--processor``, ``--backbone`` of each."""
    group.add_argument("--reward", action=RewardAction, metavar="NAME", help=reward_help)
    group.add_argument("--weights", action=RewardOption, metavar="PATH", help="weights of the preceding --reward")
    group.add_argument("--processor", action=RewardOption, metavar="PATH", help="processor of the preceding --reward")
    group.add_argument("--backbone", action=RewardOption, metavar="PATH", help="CLIP backbone (aesthetic)")
