"""A calibrated ensemble of rewards, ``load_reward("ensemble:FILE")`` / ``reward=ensemble:FILE``.

The file (JSON, written by ``mmalign bench rewards --fit-ensemble``, see :mod:`mmalign.bench.ensemble`) lists
member rewards with their files, each member's standardisation (mean and standard deviation of its scores on the
fitting split) and a non-negative weight. The ensemble's score is ``sum_k w_k (s_k - mu_k) / sigma_k``
(MetaMetrics-style calibrated combination); :meth:`EnsembleReward.components` gives the standardised ``z_k``.
It is differentiable when every member is; all members must score the same modality.

File format (``format`` 1)::

    {"format": "mmalign-ensemble", "version": 1,
     "members": [{"name": "pickscore", "weights": "PATH", "processor": null, "backbone": null,
                  "label": "pickscore", "mean": 21.3, "std": 0.9, "weight": 0.8}, ...],
     "fit": {...}}    # how it was fitted (free-form, informative)

Relative member paths are resolved against the file's folder when they exist there, else kept as written
(hub ids).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .base import DTYPE_NAMES

PREFIX = "ensemble:"
FORMAT = "mmalign-ensemble"
VERSION = 1


def is_ensemble_spec(name: str) -> bool:
    """Whether a reward name is ``ensemble:FILE``."""
    return name.startswith(PREFIX)


@dataclass
class Member:
    """One reward of an ensemble: how to load it, its standardisation and its weight."""

    name: str
    mean: float
    std: float
    weight: float
    weights: str | None = None
    processor: str | None = None
    backbone: str | None = None
    label: str | None = None


@dataclass
class EnsembleSpec:
    """The content of an ensemble file."""

    members: list[Member]
    fit: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "members": [asdict(m) for m in self.members],
            "fit": self.fit,
        }

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> EnsembleSpec:
        """Read and validate a file; every error names the file and the key at fault."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such ensemble file")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ConfigError(f"{path}: not a JSON ensemble file ({error})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object with key 'members'")
        if data.get("format", FORMAT) != FORMAT:
            raise ConfigError(f"{path}: key 'format' is {data.get('format')!r}, expected {FORMAT!r}")
        if data.get("version", VERSION) != VERSION:
            raise ConfigError(f"{path}: key 'version' is {data.get('version')!r}; this mmalign reads {VERSION}")
        members = data.get("members")
        if not isinstance(members, list) or not members:
            raise ConfigError(f"{path}: key 'members' must be a non-empty list")
        out = []
        for index, raw in enumerate(members):
            where = f"{path}: key 'members[{index}]"
            if not isinstance(raw, dict):
                raise ConfigError(f"{where}' must be an object")
            unknown = set(raw) - {f for f in Member.__dataclass_fields__}
            if unknown:
                raise ConfigError(f"{where}.{sorted(unknown)[0]}' is not a member key")
            if not isinstance(raw.get("name"), str) or not raw["name"]:
                raise ConfigError(f"{where}.name' must be a reward name")
            numbers = {}
            for key in ("mean", "std", "weight"):
                value = raw.get(key)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise ConfigError(f"{where}.{key}' must be a finite number, got {value!r}")
                numbers[key] = float(value)
            if numbers["std"] <= 0:
                raise ConfigError(f"{where}.std' must be positive, got {numbers['std']}")
            if numbers["weight"] < 0:
                raise ConfigError(f"{where}.weight' must be non-negative, got {numbers['weight']}")
            files = {}
            for key in ("weights", "processor", "backbone", "label"):
                value = raw.get(key)
                if value is not None and not isinstance(value, str):
                    raise ConfigError(f"{where}.{key}' must be a string or null, got {value!r}")
                if value and key != "label" and not Path(value).is_absolute() and (path.parent / value).exists():
                    value = str(path.parent / value)
                files[key] = value
            out.append(Member(name=raw["name"], **numbers, **files))
        fit = data.get("fit", {})
        return cls(out, fit if isinstance(fit, dict) else {})


class EnsembleReward(nn.Module):
    """``sum_k w_k (s_k - mu_k) / sigma_k`` over member rewards, with the reward surface of the others
    (``score_tensor``, ``score_images``, ``score``, ``info``, ``components``)."""

    higher_is_better = True

    def __init__(
        self,
        rewards: Sequence[Any],
        means: Sequence[float],
        stds: Sequence[float],
        weights: Sequence[float],
        name: str = "ensemble",
        labels: Sequence[str] | None = None,
    ):
        super().__init__()
        if not rewards or not len(rewards) == len(means) == len(stds) == len(weights):
            raise ValueError("an ensemble needs at least one reward and one mean, std and weight per reward")
        modalities = {str(getattr(r, "modality", "image")) for r in rewards}
        if len(modalities) > 1:
            described = ", ".join(
                f"{getattr(r, 'name', type(r).__name__)}: {getattr(r, 'modality', 'image')}" for r in rewards
            )
            raise ConfigError(f"an ensemble's members must score one modality; got {described}")
        self.modality = modalities.pop()
        modules = [r for r in rewards if isinstance(r, nn.Module)]
        self.member_modules = nn.ModuleList(modules)  # .to()/.eval() reach them
        self.rewards = list(rewards)
        self.labels = list(labels) if labels else [str(getattr(r, "name", f"member{i}")) for i, r in enumerate(rewards)]
        # plain floats, not buffers: a member's .half() must not round the calibration
        self.means = [float(m) for m in means]
        self.stds = [float(s) for s in stds]
        self.weights = [float(w) for w in weights]
        self.name = name
        self.uses_prompt = any(bool(getattr(r, "uses_prompt", True)) for r in rewards)
        self.is_differentiable = all(bool(getattr(r, "is_differentiable", False)) for r in rewards)
        self.score_scale = "sum_k w_k (s_k - mean_k) / std_k: " + ", ".join(
            f"{w:.4g} x {label}" for w, label in zip(self.weights, self.labels)
        )

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        weights: str | None = None,
        processor: str | None = None,
        backbone: str | None = None,
        **options: Any,
    ) -> EnsembleReward:
        """What :func:`mmalign.rewards.load_reward` builds for ``ensemble:FILE``; ``device``/``dtype`` go to
        every member, member files come from the ensemble file (giving ``weights`` etc. here is an error)."""
        from . import load_reward

        files = (("weights", weights), ("processor", processor), ("backbone", backbone))
        given = [flag for flag, value in files if value]
        if given:
            raise ConfigError(f"ensemble:{path}: member files are in the ensemble file; drop {', '.join(given)}")
        spec = EnsembleSpec.load(path)
        rewards = []
        for member in spec.members:
            files = {k: getattr(member, k) for k in ("weights", "processor", "backbone") if getattr(member, k)}
            rewards.append(load_reward(member.name, **files, **options))
        return cls(
            rewards,
            [m.mean for m in spec.members],
            [m.std for m in spec.members],
            [m.weight for m in spec.members],
            name=f"ensemble:{Path(path).stem}",
            labels=[m.label or m.name for m in spec.members],
        )

    def with_members(self, adapt: Any) -> EnsembleReward:
        """The same calibration over ``adapt(member)`` for each member (e.g. image members lifted to video by
        :func:`mmalign.rewards.lifted.lift`: the standardisation stays the one fitted on the members' scores)."""
        return EnsembleReward(
            [adapt(r) for r in self.rewards], self.means, self.stds, self.weights, name=self.name, labels=self.labels
        )

    # -- the reward surface -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        for reward in self.rewards:
            if hasattr(reward, "device"):
                return torch.device(reward.device)
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for reward in self.rewards:
            if hasattr(reward, "dtype"):
                return reward.dtype
        return torch.float32

    def info(self) -> dict[str, object]:
        return {
            "reward": self.name,
            "modality": self.modality,
            "higher_is_better": True,
            "is_differentiable": self.is_differentiable,
            "scale": self.score_scale,
            "dtype": DTYPE_NAMES.get(self.dtype, str(self.dtype)),
            "members": [
                {"label": label, "weight": w, "mean": m, "std": s}
                for label, w, m, s in zip(self.labels, self.weights, self.means, self.stds)
            ],
        }

    def standardise(self, raw: torch.Tensor) -> torch.Tensor:
        """``[B, K]`` raw member scores -> ``z = (s - mu) / sigma``."""
        means = torch.tensor(self.means, dtype=torch.float64, device=raw.device)
        stds = torch.tensor(self.stds, dtype=torch.float64, device=raw.device)
        return ((raw - means) / stds).to(raw.dtype)

    def combine(self, z: torch.Tensor) -> torch.Tensor:
        """``[B, K]`` standardised scores -> ``[B]`` ensemble scores ``sum_k w_k z_k``."""
        return z @ torch.tensor(self.weights, dtype=z.dtype, device=z.device)

    def components(self, media: torch.Tensor, prompts: Any = None, **options: Any) -> torch.Tensor:
        """Standardised member scores ``z`` ``[B, K]`` of a canonical batch (non-differentiable members without
        gradients)."""
        scores = []
        for reward in self.rewards:
            if getattr(reward, "is_differentiable", False) and torch.is_grad_enabled():
                scores.append(reward.score_tensor(media, prompts, **options).float())
            else:
                with torch.no_grad():
                    scores.append(reward.score_tensor(media.detach(), prompts, **options).float())
        return self.standardise(torch.stack([s.to(media.device) for s in scores], dim=1))

    def score_tensor(self, media: torch.Tensor, prompts: Any = None, **options: Any) -> torch.Tensor:
        """Ensemble scores ``[B]`` of a canonical batch; differentiable when every member is."""
        return self.combine(self.components(media, prompts, **options))

    def forward(self, media: torch.Tensor, prompts: Any = None) -> torch.Tensor:
        return self.score_tensor(media, prompts)

    @torch.no_grad()
    def score_images(self, images: Sequence[Any], prompts: Any = None, batch_size: int = 32) -> torch.Tensor:
        """Ensemble scores of files or Pillow images, each member with its reference preprocessing."""
        raw = torch.stack(
            [r.score_images(list(images), prompts, batch_size=batch_size).float().cpu() for r in self.rewards], dim=1
        )
        return self.combine(self.standardise(raw))

    def score(self, media: Any, prompts: Any = None, batch_size: int = 32) -> torch.Tensor:
        if isinstance(media, torch.Tensor):
            return self.score_tensor(media, prompts)
        if isinstance(media, (str, os.PathLike)) or hasattr(media, "getpixel"):
            media = [media]
        return self.score_images(list(media), prompts, batch_size)


__all__ = ["PREFIX", "EnsembleReward", "EnsembleSpec", "Member", "is_ensemble_spec"]
