"""Flow-GRPO's advantages and loss against independent re-derivations of the formulas in flow_grpo
(``flow_grpo/stat_tracking.py``, ``scripts/train_sd3.py``; REFERENCES.md).

As in ``test_losses.py``: expected values are written again per element in plain Python (``math``,
``statistics``) on fixed float64 tensors, never by calling the function under test; gradient checks compare
autograd with the analytic derivative implied by the stop-gradients.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from mmalign.trainers import losses as L

F64 = torch.float64


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def close(actual, expected, rel=1e-9, abs_=1e-12) -> bool:
    if isinstance(actual, torch.Tensor):
        actual = actual.detach()
    return math.isclose(float(actual), float(expected), rel_tol=rel, abs_tol=abs_)


# ----------------------------------------------------------------------------------------------------------
# Group advantages
# ----------------------------------------------------------------------------------------------------------
REWARDS = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.5, 0.5]
PROMPTS = ["a", "b", "a", "c", "b", "a", "d", "d"]


def advantages_by_hand(global_std: bool, eps: float = 1e-4, unbiased: bool = False) -> list[float]:
    out = []
    spread = statistics.stdev if unbiased else statistics.pstdev
    everyone = spread(REWARDS)
    for i, prompt in enumerate(PROMPTS):
        group = [r for r, p in zip(REWARDS, PROMPTS) if p == prompt]
        # a group of one: r − mean = 0 (its unbiased std is undefined; DanceGRPO's torch.std gives nan there)
        std = everyone if global_std else (spread(group) if len(group) > 1 else 0.0)
        out.append((REWARDS[i] - statistics.fmean(group)) / (std + eps))
    return out


@pytest.mark.parametrize("global_std", [True, False])
def test_group_advantages_with_dancegrpos_unbiased_std_and_eps(global_std):
    """DanceGRPO: ``(r − mean) / (group_rewards.std() + 1e-8)`` with torch's unbiased std (``ddof`` 1)."""
    expected = advantages_by_hand(global_std, eps=1e-8, unbiased=True)
    got = L.group_advantages(t(REWARDS), PROMPTS, global_std=global_std, eps=1e-8, ddof=1)
    for i in range(len(REWARDS)):
        assert close(got[i], expected[i], rel=1e-12)
    with pytest.raises(ValueError, match="ddof"):
        L.group_advantages(t(REWARDS), PROMPTS, ddof=2)


@pytest.mark.parametrize("global_std", [True, False])
def test_group_advantages_per_prompt_mean_and_global_or_group_std(global_std):
    expected = advantages_by_hand(global_std)
    by_prompt = L.group_advantages(t(REWARDS), PROMPTS, global_std=global_std)
    ids = torch.tensor([ord(p) for p in PROMPTS])
    by_id = L.group_advantages(t(REWARDS), ids, global_std=global_std)
    for i in range(len(REWARDS)):
        assert close(by_prompt[i], expected[i], rel=1e-12)
        assert close(by_id[i], expected[i], rel=1e-12)
    # the tied group "d" has advantage 0 either way (and no division by zero: eps)
    assert by_prompt[6] == 0 and by_prompt[7] == 0


def test_group_advantages_default_is_global_std_and_eps_1e4():
    default = L.group_advantages(t(REWARDS), PROMPTS)
    assert torch.equal(default, L.group_advantages(t(REWARDS), PROMPTS, global_std=True, eps=1e-4))
    spread = L.group_advantages(t(REWARDS), PROMPTS, eps=1.0)
    assert close(spread[0], advantages_by_hand(True, eps=1.0)[0], rel=1e-12)


def test_group_advantages_dtype_and_detached():
    rewards = torch.tensor(REWARDS, dtype=torch.float16, requires_grad=False)
    out = L.group_advantages(rewards, PROMPTS)
    assert out.dtype == torch.float32 and not out.requires_grad
    rewards = t(REWARDS).requires_grad_(True)
    assert not L.group_advantages(rewards, PROMPTS).requires_grad


def test_group_advantages_rejects_mismatched_groups():
    with pytest.raises(ValueError, match="entries"):
        L.group_advantages(t(REWARDS), PROMPTS[:-1])
    with pytest.raises(ValueError, match="shape"):
        L.group_advantages(t(REWARDS), torch.zeros(3))


# ----------------------------------------------------------------------------------------------------------
# Flow-GRPO loss
# ----------------------------------------------------------------------------------------------------------
OLD = [-1.0, -1.2, -0.8, -1.1, -0.9, -1.05]
LOG_RATIO = [0.0, 5e-5, 3e-4, -3e-4, 2e-4, -2e-4]
ADV = [1.0, -2.0, 10.0, 0.7, -7.0, -0.5]
B = len(OLD)
EPS = 1e-4


def policy_by_hand(eps=EPS, adv_max=5.0) -> float:
    total = 0.0
    for b in range(B):
        a = min(max(ADV[b], -adv_max), adv_max)
        r = math.exp(LOG_RATIO[b])
        total += max(-a * r, -a * min(max(r, 1 - eps), 1 + eps))
    return total / B


def means(seed: int):
    gen = torch.Generator().manual_seed(seed)
    mean = torch.randn(B, 2, 3, 3, dtype=F64, generator=gen)
    ref = mean + 0.01 * torch.randn(B, 2, 3, 3, dtype=F64, generator=gen)
    std = [0.2 + 0.1 * b for b in range(B)]
    return mean, ref, std


def kl_by_hand(mean, ref, std) -> float:
    total = 0.0
    for b in range(B):
        diffs = [(m - r) ** 2 for m, r in zip(mean[b].flatten().tolist(), ref[b].flatten().tolist())]
        total += statistics.fmean(diffs) / (2 * std[b] ** 2)
    return total / B


def logp() -> torch.Tensor:
    return t([OLD[b] + LOG_RATIO[b] for b in range(B)])


def test_flow_grpo_policy_term_and_metrics():
    out = L.flow_grpo_loss(logp(), t(OLD), t(ADV))
    assert close(out.loss, policy_by_hand(), rel=1e-7)
    assert close(out.policy_loss, policy_by_hand(), rel=1e-7)
    ratios = [math.exp(x) for x in LOG_RATIO]
    assert close(out.approx_kl, 0.5 * sum(x * x for x in LOG_RATIO) / B, rel=1e-6)
    assert close(out.clipfrac, sum(1 for r in ratios if abs(r - 1) > EPS) / B)
    assert close(out.clipfrac_gt_one, sum(1 for r in ratios if r - 1 > EPS) / B)
    assert close(out.clipfrac_lt_one, sum(1 for r in ratios if 1 - r > EPS) / B)
    assert "kl_loss" not in out.metrics
    assert close(L.flow_grpo_loss(logp(), t(OLD), t(ADV), adv_clip_max=8.0).loss, policy_by_hand(adv_max=8.0), 1e-7)


@pytest.mark.parametrize("std_shape", ["list", "b111", "scalar"])
def test_flow_grpo_kl_term(std_shape):
    mean, ref, std = means(0)
    if std_shape == "scalar":
        std = [0.3] * B
        std_arg = 0.3
    elif std_shape == "b111":
        std_arg = t(std).reshape(B, 1, 1, 1)
    else:
        std_arg = t(std)
    out = L.flow_grpo_loss(logp(), t(OLD), t(ADV), mean=mean, ref_mean=ref, std=std_arg, beta=0.04)
    kl = kl_by_hand(mean, ref, std)
    assert close(out.kl_loss, kl, rel=1e-10)
    assert close(out.loss, policy_by_hand() + 0.04 * kl, rel=1e-7)
    # β = 0: the KL is logged, not added
    logged = L.flow_grpo_loss(logp(), t(OLD), t(ADV), mean=mean, ref_mean=ref, std=std_arg)
    assert close(logged.kl_loss, kl, rel=1e-10) and close(logged.loss, policy_by_hand(), rel=1e-7)


def test_flow_grpo_gradients_clipped_and_unclipped_entries():
    lp = logp().requires_grad_(True)
    old = t(OLD).requires_grad_(True)
    adv = t(ADV).requires_grad_(True)
    mean, ref, std = means(1)
    mean.requires_grad_(True)
    ref.requires_grad_(True)
    beta = 0.04
    L.flow_grpo_loss(lp, old, adv, mean=mean, ref_mean=ref, std=t(std), beta=beta).loss.backward()
    assert old.grad is None and adv.grad is None and ref.grad is None
    for b in range(B):
        a = min(max(ADV[b], -5.0), 5.0)
        r = math.exp(LOG_RATIO[b])
        clipped_r = min(max(r, 1 - EPS), 1 + EPS)
        # max picks the clipped branch (constant in logp) only where it is strictly larger
        clipped_active = -a * clipped_r > -a * r
        expected = 0.0 if clipped_active else -a * r / B
        assert close(lp.grad[b], expected, rel=1e-7, abs_=1e-15), b
    # entries 2 (A>0, r>1+ε) and 5 (A<0, r<1−ε) are clipped; 3 and 4 (pessimistic side) are not
    assert lp.grad[2] == 0 and lp.grad[5] == 0 and lp.grad[3] != 0 and lp.grad[4] != 0
    # d KL / d mean = β·(mean − ref)/(std_b²·K·B), K elements per sample
    k = mean[0].numel()
    expected = beta * (mean.detach() - ref.detach()) / (t(std).reshape(B, 1, 1, 1) ** 2 * k * B)
    torch.testing.assert_close(mean.grad, expected, rtol=1e-10, atol=1e-14)


def test_flow_grpo_rejects_incomplete_kl_arguments():
    mean, ref, std = means(2)
    with pytest.raises(ValueError, match="beta > 0"):
        L.flow_grpo_loss(logp(), t(OLD), t(ADV), beta=0.04)
    with pytest.raises(ValueError, match="all three"):
        L.flow_grpo_loss(logp(), t(OLD), t(ADV), mean=mean, std=t(std))
    with pytest.raises(ValueError, match="B ="):
        L.flow_grpo_loss(logp(), t(OLD), t(ADV), mean=mean[:2], ref_mean=ref[:2], std=0.3)
