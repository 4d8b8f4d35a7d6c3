"""Every training objective of mmalign as a pure function of tensors.

No modules, no I/O, no global state: each function takes the per-sample quantities a trainer computed (per-sample
MSEs, per-step log-probabilities, rewards) and returns a :class:`LossOutput` (the scalar loss plus detached
metrics) or a tensor. Each function is its own objective, with its reference and defaults in its docstring; no
string switch over families.

Conventions shared by every function here:

* "mean" over a sample is the mean over all non-batch elements (C·H·W, and frames for video), exactly as the
  references reduce: their betas and clip ranges were tuned against means, and a sum would change them by the
  element count. :func:`per_sample_mse` gives that reduction; log-probabilities come from
  :func:`ddim_step_log_prob`, which also averages over non-batch elements.
* Paired inputs are 1-D tensors ``[B]`` with the winner ("w", preferred) and loser ("l") of pair ``b`` at the same
  index. The losses are means over the batch.
* Reference-model quantities (``ref_*``) and sampling-time quantities (``old_logp``) are detached inside the
  function (stop-gradient), whatever the caller passes; each docstring names every other stop-gradient.
* Metrics in :attr:`LossOutput.metrics` are detached tensors (scalars unless stated).

The functions live in one module per family (``dpo``, ``policy_gradient``, ``reward_backprop``, ``grpo``,
``nft``) and are all importable from here.
"""

from .base import LossOutput
from .dpo import (
    SMPO_SCORE_HIGH,
    SMPO_SCORE_LOW,
    adaptive_dpo_loss,
    beta_from_diffusers,
    diffusion_dpo_loss,
    diffusion_kto_loss,
    dpo_logits,
    epsilon_from_x0,
    flow_dpo_defaults,
    per_sample_mse,
    sft_loss,
    smpo_loss,
    smpo_preference,
)
from .grpo import flow_grpo_loss, group_advantages
from .nft import (
    diffusion_nft_loss,
    nft_old_decay,
    nft_old_policy_update,
    nft_optimality,
    nft_optimality_from_advantages,
    nft_timestep_indices,
)
from .policy_gradient import DDIMLogProb, d3po_loss, ddim_step_log_prob, ddpo_ppo_loss
from .reward_backprop import alignprop_aesthetic_loss, draft_loss, refl_loss, target_distance_loss

__all__ = [
    "SMPO_SCORE_HIGH",
    "SMPO_SCORE_LOW",
    "DDIMLogProb",
    "LossOutput",
    "adaptive_dpo_loss",
    "alignprop_aesthetic_loss",
    "beta_from_diffusers",
    "d3po_loss",
    "ddim_step_log_prob",
    "ddpo_ppo_loss",
    "flow_grpo_loss",
    "diffusion_dpo_loss",
    "diffusion_kto_loss",
    "diffusion_nft_loss",
    "dpo_logits",
    "draft_loss",
    "epsilon_from_x0",
    "flow_dpo_defaults",
    "group_advantages",
    "nft_old_decay",
    "nft_old_policy_update",
    "nft_optimality",
    "nft_optimality_from_advantages",
    "nft_timestep_indices",
    "per_sample_mse",
    "refl_loss",
    "sft_loss",
    "smpo_loss",
    "smpo_preference",
    "target_distance_loss",
]
