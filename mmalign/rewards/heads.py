"""The small MLP heads of the LAION aesthetic predictor and ImageReward, in their published key layouts."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..errors import WeightsError

# Linear 768->1024->128->64->16->1 with dropouts and no activations: keys layers.{0,2,4,6,7}.
LINEAR_HEAD_KEYS = frozenset(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))
# The ReLU variant (ava+logos-l14-reluMSE.pth): keys layers.{0,3,6,9,11}.
RELU_HEAD_KEYS = frozenset(f"layers.{i}.{p}" for i in (0, 3, 6, 9, 11) for p in ("weight", "bias"))


class MLPHead(nn.Module):
    """``improved-aesthetic-predictor``'s MLP (and ImageReward's, which is the linear variant)."""

    def __init__(self, in_dim: int = 768, relu: bool = False):
        super().__init__()
        self.relu = relu
        widths = [in_dim, 1024, 128, 64, 16]
        dropouts = [0.2, 0.2, 0.1, None]
        modules: list[nn.Module] = []
        for (w_in, w_out), drop in zip(zip(widths, widths[1:]), dropouts):
            modules.append(nn.Linear(w_in, w_out))
            if relu:
                modules.append(nn.ReLU())
            if drop is not None:
                modules.append(nn.Dropout(drop))
        modules.append(nn.Linear(16, 1))
        self.layers = nn.Sequential(*modules)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features).squeeze(-1)


def detect_head(state_dict: Mapping[str, torch.Tensor], source: str) -> bool:
    """Return ``relu`` for a head state dict: detected from its keys, never guessed."""
    keys = set(state_dict)
    if keys == LINEAR_HEAD_KEYS:
        return False
    if keys == RELU_HEAD_KEYS:
        return True
    raise WeightsError(
        f"{source}: not an aesthetic-predictor head; expected keys layers.{{0,2,4,6,7}} (linear) or "
        f"layers.{{0,3,6,9,11}} (ReLU), found {', '.join(sorted(keys)[:12])}"
    )
