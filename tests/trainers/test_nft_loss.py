"""DiffusionNFT's optimality, loss, timestep subsets and old-policy update, and Flow-DPO's loss, against
independent re-derivations of NVlabs/DiffusionNFT ``scripts/train_nft_sd3.py`` and yifan123/flow_grpo
``scripts/train_sd3_dpo.py``.

As in ``test_grpo_losses.py``: the expected values are written again per element in plain Python (``math``,
``statistics``) on fixed float64 tensors, never by calling the function under test. The NFT loss is re-derived
in velocity space (x̂0 − x0 = σ·(v* − v) with v* = ε − x0), not through x̂0 as the implementation computes it.
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
# Optimality probability
# ----------------------------------------------------------------------------------------------------------
REWARDS = [0.1, 0.9, 0.3, 0.35, 0.8, 0.25, 0.5, 0.5, 10.0, -10.0]
PROMPTS = ["a", "b", "a", "c", "b", "a", "d", "d", "e", "e"]


def optimality_by_hand(global_std=True, clip=5.0, mode="all") -> list[float]:
    everyone = statistics.pstdev(REWARDS)
    out = []
    for i, prompt in enumerate(PROMPTS):
        group = [r for r, p in zip(REWARDS, PROMPTS) if p == prompt]
        std = everyone if global_std else statistics.pstdev(group)
        a = (REWARDS[i] - statistics.fmean(group)) / (std + 1e-4)
        a = min(max(a, -clip), clip)
        if mode == "positive_only":
            a = max(a, 0.0)
        elif mode == "negative_only":
            a = min(a, 0.0)
        elif mode == "one_only":
            a = 1.0 if a > 0 else 0.0
        elif mode == "binary":
            a = (a > 0) - (a < 0)
        out.append(min(max(0.5 + a / (2 * clip), 0.0), 1.0))
    return out


@pytest.mark.parametrize("mode", ["all", "positive_only", "negative_only", "one_only", "binary"])
@pytest.mark.parametrize("global_std", [True, False])
def test_optimality_matches_hand_derivation(mode, global_std):
    out = L.nft_optimality(t(REWARDS), PROMPTS, global_std=global_std, adv_mode=mode)
    expected = optimality_by_hand(global_std, mode=mode)
    assert out.shape == (len(REWARDS),) and not out.requires_grad
    for i, value in enumerate(expected):
        assert close(out[i], value, rel=1e-12), (i, mode)


def test_optimality_defaults_range_and_ties():
    out = L.nft_optimality(t(REWARDS), PROMPTS)
    assert torch.equal(out, L.nft_optimality(t(REWARDS), PROMPTS, global_std=True, adv_clip_max=5.0, eps=1e-4))
    assert bool(((out >= 0) & (out <= 1)).all())
    # tied group "d": A = 0 -> r = 1/2; a pair with its own std has A = ±10/(10 + 1e-4): r = 1/2 ± 1/10
    assert out[6] == 0.5 and out[7] == 0.5
    per_group = L.nft_optimality(t(REWARDS), PROMPTS, global_std=False)
    assert close(per_group[8], 0.5 + 0.1 * 10 / 10.0001) and close(per_group[9], 0.5 - 0.1 * 10 / 10.0001)
    # a wider clip shrinks r toward 1/2
    wide = L.nft_optimality(t(REWARDS), PROMPTS, adv_clip_max=50.0)
    assert close(wide[1], optimality_by_hand(clip=50.0)[1], rel=1e-12)


def test_optimality_from_advantages_and_errors():
    adv = t([-7.0, -5.0, -2.5, 0.0, 2.5, 5.0, 7.0])
    out = L.nft_optimality_from_advantages(adv)
    assert out.tolist() == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert L.nft_optimality_from_advantages(adv, adv_mode="one_only").tolist() == [0.5] * 4 + [0.6] * 3
    with pytest.raises(ValueError, match="adv_mode"):
        L.nft_optimality_from_advantages(adv, adv_mode="sign")
    with pytest.raises(ValueError, match="adv_clip_max"):
        L.nft_optimality_from_advantages(adv, adv_clip_max=0.0)
    with pytest.raises(ValueError, match="1-D"):
        L.nft_optimality_from_advantages(adv.reshape(7, 1))
    with pytest.raises(ValueError, match="entries"):
        L.nft_optimality(t(REWARDS), PROMPTS[:-1])


# ----------------------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------------------
B, SHAPE = 4, (2, 3, 3)
SIGMAS = [0.9, 0.55, 0.3, 0.08]
R = [1.0, 0.0, 0.3, 0.75]


def tensors(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, *SHAPE, dtype=F64, generator=gen)
    eps = torch.randn(B, *SHAPE, dtype=F64, generator=gen)
    target = eps - x0
    v_old = target + 0.4 * torch.randn(B, *SHAPE, dtype=F64, generator=gen)
    v_theta = v_old + 0.1 * torch.randn(B, *SHAPE, dtype=F64, generator=gen)
    v_ref = v_old + 0.2 * torch.randn(B, *SHAPE, dtype=F64, generator=gen)
    sig = t(SIGMAS).reshape(B, 1, 1, 1)
    x_t = (1 - sig) * x0 + sig * eps
    return {"v_theta": v_theta, "v_old": v_old, "x0": x0, "x_t": x_t, "eps": eps, "v_ref": v_ref}


def rows(tensor, b):
    return tensor[b].flatten().tolist()


def nft_by_hand(d, beta=1.0, kl_beta=1e-4, clip=5.0, r=R, sigmas=SIGMAS):
    """Per sample, in velocity space: L^± = σ·mean((v^± − v*)²) / max(mean|v^± − v*|, 1e-5/σ)."""
    policy, kl, pos_sum, neg_sum = 0.0, 0.0, 0.0, 0.0
    for b in range(B):
        sigma = sigmas[b]
        star = [e - x for e, x in zip(rows(d["eps"], b), rows(d["x0"], b))]
        theta, old, ref = rows(d["v_theta"], b), rows(d["v_old"], b), rows(d["v_ref"], b)
        pos = [beta * th + (1 - beta) * o - s for th, o, s in zip(theta, old, star)]
        neg = [(1 + beta) * o - beta * th - s for th, o, s in zip(theta, old, star)]
        pos_loss = sigma**2 * statistics.fmean(p * p for p in pos) / max(sigma * statistics.fmean(map(abs, pos)), 1e-5)
        neg_loss = sigma**2 * statistics.fmean(n * n for n in neg) / max(sigma * statistics.fmean(map(abs, neg)), 1e-5)
        policy += clip * (r[b] * pos_loss + (1 - r[b]) * neg_loss) / beta
        kl += statistics.fmean((th - f) ** 2 for th, f in zip(theta, ref))
        pos_sum += pos_loss
        neg_sum += neg_loss
    policy, kl = policy / B, kl / B
    return {"loss": policy + kl_beta * kl, "policy": policy, "kl": kl, "pos": pos_sum / B, "neg": neg_sum / B}


def call(d, **kwargs):
    kwargs.setdefault("r", t(R))
    kwargs.setdefault("v_ref", d["v_ref"])
    return L.diffusion_nft_loss(d["v_theta"], d["v_old"], d["x0"], d["x_t"], kwargs.pop("sigma", t(SIGMAS)), **kwargs)


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_nft_loss_matches_hand_derivation(beta):
    d = tensors(0)
    out = call(d, beta=beta)
    expected = nft_by_hand(d, beta=beta)
    assert close(out.loss, expected["loss"], rel=1e-10)
    assert close(out.policy_loss, expected["policy"], rel=1e-10)
    assert close(out.unweighted_policy_loss, expected["policy"] / 5.0, rel=1e-10)
    assert close(out.kl_div_loss, expected["kl"], rel=1e-10) and close(out.kl_div, expected["kl"], rel=1e-10)
    assert close(out.positive_loss, expected["pos"], rel=1e-10)
    assert close(out.negative_loss, expected["neg"], rel=1e-10)
    assert close(out.optimality, statistics.fmean(R))
    deviations = [(a - b) ** 2 for a, b in zip(d["v_theta"].flatten().tolist(), d["v_old"].flatten().tolist())]
    assert close(out.old_deviate, statistics.fmean(deviations)) and close(out.old_deviate_max, max(deviations))
    squares = [x * x for x in d["x0"].flatten().tolist()]
    assert close(out.x0_norm, statistics.fmean(squares)) and close(out.x0_norm_max, max(squares))
    old_kl = statistics.fmean(
        (a - b) ** 2 for a, b in zip(d["v_old"].flatten().tolist(), d["v_ref"].flatten().tolist())
    )
    assert close(out.old_kl_div, old_kl)


def test_nft_loss_sigma_forms_and_kl_options():
    d = tensors(1)
    base = call(d).loss
    assert close(call(d, sigma=t(SIGMAS).reshape(B, 1, 1, 1)).loss, base, rel=1e-14)
    # a scalar sigma: rebuild x_t with that sigma
    d2 = dict(d)
    d2["x_t"] = 0.6 * d["x0"] + 0.4 * d["eps"]
    scalar = L.diffusion_nft_loss(d2["v_theta"], d2["v_old"], d2["x0"], d2["x_t"], 0.4, t(R), v_ref=d["v_ref"])
    assert close(scalar.loss, nft_by_hand(d2, sigmas=[0.4] * B)["loss"], rel=1e-10)
    # kl_beta = 0: the KL is logged, not added; without v_ref it is 0 and kl_beta must be 0
    logged = call(d, kl_beta=0.0)
    expected = nft_by_hand(d)
    assert close(logged.loss, expected["policy"], rel=1e-10) and close(logged.kl_div_loss, expected["kl"], rel=1e-10)
    bare = call(d, kl_beta=0.0, v_ref=None)
    assert (
        close(bare.loss, expected["policy"], rel=1e-10) and bare.kl_div_loss == 0 and "old_kl_div" not in bare.metrics
    )
    assert close(call(d, kl_beta=0.5).loss, expected["policy"] + 0.5 * expected["kl"], rel=1e-10)
    assert close(call(d, adv_clip_max=1.0, kl_beta=0.0).loss, expected["policy"] / 5.0, rel=1e-10)


def test_nft_loss_gradients_follow_the_stop_gradients():
    d = tensors(2)
    v_theta = d["v_theta"].clone().requires_grad_(True)
    leaves = {name: d[name].clone().requires_grad_(True) for name in ("v_old", "x0", "x_t", "v_ref")}
    r = t(R).requires_grad_(True)
    sigma = t(SIGMAS).requires_grad_(True)
    beta, kl_beta = 0.5, 0.01
    out = L.diffusion_nft_loss(
        v_theta,
        leaves["v_old"],
        leaves["x0"],
        leaves["x_t"],
        sigma,
        r,
        beta=beta,
        v_ref=leaves["v_ref"],
        kl_beta=kl_beta,
    )
    out.loss.backward()
    assert all(leaf.grad is None for leaf in leaves.values()) and r.grad is None and sigma.grad is None
    # dL/dv_θ = (2·5·σ²/(B·K))·[−r·(v*−v⁺)/w⁺ + (1−r)·(v*−v⁻)/w⁻] + kl_beta·2·(v_θ − v_ref)/(B·K),
    # w^± = σ·mean|v* − v^±| (the stop-gradient weight)
    k = math.prod(SHAPE)
    star = d["eps"] - d["x0"]
    for b in range(B):
        sigma_b = SIGMAS[b]
        pos = beta * d["v_theta"][b] + (1 - beta) * d["v_old"][b]
        neg = (1 + beta) * d["v_old"][b] - beta * d["v_theta"][b]
        w_pos = sigma_b * (star[b] - pos).abs().mean()
        w_neg = sigma_b * (star[b] - neg).abs().mean()
        policy = (2 * 5.0 * sigma_b**2 / (B * k)) * (
            -R[b] * (star[b] - pos) / w_pos + (1 - R[b]) * (star[b] - neg) / w_neg
        )
        kl = kl_beta * 2 * (d["v_theta"][b] - d["v_ref"][b]) / (B * k)
        torch.testing.assert_close(v_theta.grad[b], policy + kl, rtol=1e-10, atol=1e-14)


def test_positive_r_pulls_toward_the_target_and_negative_pushes_away():
    d = tensors(3)
    d["v_theta"] = d["v_old"].clone()  # on-policy: v⁺ = v⁻ = v_old
    star = d["eps"] - d["x0"]
    for r_value, sign in ((1.0, 1), (0.0, -1)):
        v_theta = d["v_theta"].clone().requires_grad_(True)
        L.diffusion_nft_loss(
            v_theta, d["v_old"], d["x0"], d["x_t"], t(SIGMAS), t([r_value] * B), kl_beta=0.0
        ).loss.backward()
        step = -v_theta.grad  # gradient-descent direction
        for b in range(B):
            alignment = float((step[b] * (star[b] - d["v_theta"][b])).sum())
            assert sign * alignment > 0, (r_value, b)
        # a small step moves the velocity closer to (r = 1) / further from (r = 0) the target
        before = (d["v_theta"] - star).pow(2).sum()
        after = (d["v_theta"] + 1e-3 * step / step.abs().max() - star).pow(2).sum()
        assert sign * float(before - after) > 0
    # r = 1/2 on-policy: the two pulls cancel exactly
    v_theta = d["v_theta"].clone().requires_grad_(True)
    L.diffusion_nft_loss(v_theta, d["v_old"], d["x0"], d["x_t"], t(SIGMAS), t([0.5] * B), kl_beta=0.0).loss.backward()
    assert float(v_theta.grad.abs().max()) < 1e-15


def test_on_policy_loss_does_not_depend_on_r_and_exact_predictions_hit_the_weight_floor():
    d = tensors(4)
    d["v_theta"] = d["v_old"].clone()
    losses = [float(call(d, r=t([value] * B), kl_beta=0.0).loss) for value in (0.0, 0.3, 1.0)]
    assert max(losses) - min(losses) < 1e-12
    # the old and trained velocities are exactly the target: x̂0 = x0, weight clamped to 1e-5, loss 0, no NaN
    d["v_old"] = d["eps"] - d["x0"]
    v_theta = d["v_old"].clone().requires_grad_(True)
    out = L.diffusion_nft_loss(v_theta, d["v_old"], d["x0"], d["x_t"], t(SIGMAS), t(R), kl_beta=0.0)
    out.loss.backward()
    assert float(out.loss.detach()) < 1e-20 and torch.isfinite(v_theta.grad).all()


def test_nft_loss_dtypes():
    d = {name: value.float() for name, value in tensors(5).items()}
    out = call(d, r=torch.tensor(R))
    assert out.loss.dtype == F64  # float64 weights promote, as the reference
    assert close(out.loss, nft_by_hand({k: v.double() for k, v in d.items()})["loss"], rel=1e-5)
    half = {name: value.half() for name, value in d.items()}
    out_half = call(half, r=torch.tensor(R))
    assert torch.isfinite(out_half.loss) and out_half.kl_div.dtype == torch.float32


def test_nft_loss_rejects_bad_inputs():
    d = tensors(6)
    with pytest.raises(ValueError, match="same shape"):
        L.diffusion_nft_loss(d["v_theta"], d["v_old"][:, :1], d["x0"], d["x_t"], t(SIGMAS), t(R))
    with pytest.raises(ValueError, match="same shape"):
        call(d, v_ref=d["v_ref"][:2])
    with pytest.raises(ValueError, match="non-batch"):
        L.diffusion_nft_loss(t(R), t(R), t(R), t(R), t(SIGMAS), t(R))
    with pytest.raises(ValueError, match="r has 3"):
        call(d, r=t(R[:3]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        call(d, r=t([1.5, 0.0, 0.2, 0.3]))
    with pytest.raises(ValueError, match="sigma"):
        call(d, sigma=t(SIGMAS[:3]))
    with pytest.raises(ValueError, match="beta"):
        call(d, beta=0.0)
    with pytest.raises(ValueError, match="kl_beta"):
        call(d, kl_beta=-1.0)
    with pytest.raises(ValueError, match="needs v_ref"):
        call(d, v_ref=None)
    with pytest.raises(TypeError, match="x0"):
        L.diffusion_nft_loss(d["v_theta"], d["v_old"], d["x0"].tolist(), d["x_t"], t(SIGMAS), t(R))


# ----------------------------------------------------------------------------------------------------------
# Timestep subsets and the old policy
# ----------------------------------------------------------------------------------------------------------
def test_timestep_indices_are_distinct_per_sample_and_seeded():
    out = L.nft_timestep_indices(6, 10, generator=torch.Generator().manual_seed(0))
    assert out.shape == (6, 9) and out.dtype == torch.long
    for row in out.tolist():
        assert len(set(row)) == 9 and all(0 <= i < 10 for i in row)
    again = L.nft_timestep_indices(6, 10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert L.nft_timestep_indices(2, 25).shape == (2, 24)
    assert L.nft_timestep_indices(2, 10, timestep_fraction=1.0).shape == (2, 10)
    with pytest.raises(ValueError, match="is 0"):
        L.nft_timestep_indices(2, 1, timestep_fraction=0.5)
    with pytest.raises(ValueError, match="timestep_fraction"):
        L.nft_timestep_indices(2, 10, timestep_fraction=0.0)


def test_old_decay_schedules():
    assert [L.nft_old_decay(s) for s in (0, 1, 250, 500, 10_000)] == [0.0, 0.001, 0.25, 0.5, 0.5]
    assert [L.nft_old_decay(s, 2) for s in (0, 74, 75, 76, 150, 10_000)] == [0.0, 0.0, 0.0, 0.0075, 0.5625, 0.999]
    assert L.nft_old_decay(1000, 0) == 0.0
    with pytest.raises(ValueError, match="decay_type"):
        L.nft_old_decay(3, 3)
    with pytest.raises(ValueError, match="step"):
        L.nft_old_decay(-1)


def test_old_policy_update():
    old, current = t([1.0, 2.0]), t([3.0, -2.0]).requires_grad_(True)
    out = L.nft_old_policy_update(old, current, 0.25)
    assert out.tolist() == [0.25 * 1 + 0.75 * 3, 0.25 * 2 - 0.75 * 2] and not out.requires_grad
    assert torch.equal(L.nft_old_policy_update(old, current, 0.0), current.detach())
    with pytest.raises(ValueError, match="shape"):
        L.nft_old_policy_update(old, t([1.0]), 0.5)
    with pytest.raises(ValueError, match="decay"):
        L.nft_old_policy_update(old, current, 1.5)


# ----------------------------------------------------------------------------------------------------------
# Flow-DPO = Diffusion-DPO on velocity MSEs with beta 100
# ----------------------------------------------------------------------------------------------------------
def test_flow_dpo_is_diffusion_dpo_on_velocity_errors():
    gen = torch.Generator().manual_seed(7)
    n = 3
    x0 = torch.randn(2 * n, *SHAPE, dtype=F64, generator=gen)
    noise = torch.randn(n, *SHAPE, dtype=F64, generator=gen).repeat(2, 1, 1, 1)  # shared by winner and loser
    target = noise - x0
    pred = target + 0.3 * torch.randn(2 * n, *SHAPE, dtype=F64, generator=gen)
    ref = target + 0.3 * torch.randn(2 * n, *SHAPE, dtype=F64, generator=gen)
    beta = L.flow_dpo_defaults()["beta"]
    mse = L.per_sample_mse(pred, target)
    ref_mse = L.per_sample_mse(ref, target)
    out = L.diffusion_dpo_loss(mse[:n], mse[n:], ref_mse[:n], ref_mse[n:], beta=beta)
    # flow_grpo train_sd3_dpo.py, per pair: w_diff = θ_w − ref_w, l_diff = θ_l − ref_l,
    # loss = −log σ(−½·β·(w_diff − l_diff)), mean over pairs
    total = 0.0
    for i in range(n):
        errs = []
        for row in (i, n + i):
            errs.append(statistics.fmean((p - g) ** 2 for p, g in zip(rows(pred, row), rows(target, row))))
            errs.append(statistics.fmean((p - g) ** 2 for p, g in zip(rows(ref, row), rows(target, row))))
        theta_w, ref_w, theta_l, ref_l = errs
        inside = -0.5 * beta * ((theta_w - ref_w) - (theta_l - ref_l))
        total += math.log1p(math.exp(-inside))
    assert close(out.loss, total / n, rel=1e-10)


def test_flow_dpo_defaults():
    defaults = L.flow_dpo_defaults()
    assert defaults["beta"] == 100.0 and defaults["timestep_sampling"] == "logit_normal"
    assert defaults["learning_rate"] == 3e-4 and defaults["sample_guidance_scale"] == 4.5
    assert defaults is not L.flow_dpo_defaults()  # a fresh dict each call
