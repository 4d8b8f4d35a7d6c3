"""Each loss against an independent re-derivation of its published formula.

The expected values are written again here per element with ``math`` / ``statistics`` / numpy loops (never by
calling the function under test), on fixed float64 tensors. Gradient checks compare autograd with the analytic
derivative that the stop-gradients of each paper imply.
"""

from __future__ import annotations

import math
import os
import statistics

import numpy as np
import pytest
import torch

from mmalign.trainers import losses as L

F64 = torch.float64


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def log_sig(x: float) -> float:
    # log σ(x) = −log(1 + e^{−x}), written stably for either sign
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def close(actual, expected, rel=1e-9, abs_=1e-12) -> bool:
    if isinstance(actual, torch.Tensor):
        actual = actual.detach()
    return math.isclose(float(actual), float(expected), rel_tol=rel, abs_tol=abs_)


# Fixed per-sample MSEs of 4 pairs (winner / loser, trained / reference): realistic magnitudes.
MW = [0.1000, 0.2050, 0.3100, 0.0500]
ML = [0.1010, 0.2000, 0.3050, 0.0503]
RW = [0.1005, 0.2040, 0.3080, 0.0501]
RL = [0.1008, 0.2010, 0.3090, 0.0502]


def ell(b: int) -> float:
    """ℓ_b = (ref_w − ref_l) − (model_w − model_l)."""
    return (RW[b] - RL[b]) - (MW[b] - ML[b])


# ----------------------------------------------------------------------------------------------------------
# LossOutput and per-sample MSE
# ----------------------------------------------------------------------------------------------------------
def test_loss_output_metrics_are_detached_read_only_and_attributes():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    out = L.LossOutput(x.sum(), {"m": x * 2})
    assert out.loss.requires_grad
    assert not out.metrics["m"].requires_grad
    assert torch.equal(out.m, torch.tensor([2.0, 4.0]))
    with pytest.raises(TypeError):
        out.metrics["other"] = x  # type: ignore[index]
    with pytest.raises(AttributeError):
        _ = out.not_a_metric
    assert out.scalars() == {"loss": 3.0, "m": 3.0}


def test_per_sample_mse_means_over_every_non_batch_element():
    gen = torch.Generator().manual_seed(0)
    pred = torch.randn(3, 4, 2, 5, 6, generator=gen)  # video-like latents [B, C, T, H, W]
    target = torch.randn(3, 4, 2, 5, 6, generator=gen)
    got = L.per_sample_mse(pred, target)
    p, q = pred.numpy(), target.numpy()
    for b in range(3):
        total, count = 0.0, 0
        for value_p, value_q in zip(p[b].ravel(), q[b].ravel()):
            total += (float(value_p) - float(value_q)) ** 2
            count += 1
        assert math.isclose(float(got[b]), total / count, rel_tol=1e-5)
    assert got.shape == (3,) and got.dtype == torch.float32
    # half-precision inputs are reduced in float32, as the references' .float()
    assert L.per_sample_mse(pred.bfloat16(), target.bfloat16()).dtype == torch.float32
    with pytest.raises(ValueError):
        L.per_sample_mse(pred, target[:, :2])


def test_sft_is_the_plain_mean_of_winner_mse():
    out = L.sft_loss(t(MW))
    assert close(out.loss, sum(MW) / len(MW))


# ----------------------------------------------------------------------------------------------------------
# Diffusion-DPO
# ----------------------------------------------------------------------------------------------------------
def test_dpo_sigmoid_matches_official_formula():
    beta = 5000.0
    out = L.diffusion_dpo_loss(t(MW), t(ML), t(RW), t(RL), beta=beta)
    insides = [-0.5 * beta * ((MW[b] - ML[b]) - (RW[b] - RL[b])) for b in range(4)]
    expected = sum(-log_sig(x) for x in insides) / 4
    assert close(out.loss, expected)
    assert close(out.reward_margin, sum(insides) / 4)
    assert close(out.implicit_acc, sum(1 for x in insides if x > 0) / 4)
    assert close(out.model_diff, sum(MW[b] - ML[b] for b in range(4)) / 4)
    assert close(out.ref_diff, sum(RW[b] - RL[b] for b in range(4)) / 4)
    assert close(out.model_mse, 0.5 * (sum(MW) / 4 + sum(ML) / 4))
    assert close(out.ref_mse, 0.5 * (sum(RW) / 4 + sum(RL) / 4))
    # the fixture really mixes right and wrong pairs
    assert 0 < float(out.implicit_acc) < 1


def test_official_beta_5000_equals_diffusers_beta_prime_2500():
    beta_prime = 2500.0
    # diffusers train_diffusion_dpo.py: logits = ref_diff − model_diff; −logsigmoid(beta_dpo·logits).mean()
    diffusers_sigmoid = sum(-log_sig(beta_prime * ell(b)) for b in range(4)) / 4
    diffusers_hinge = sum(max(0.0, 1.0 - beta_prime * ell(b)) for b in range(4)) / 4
    assert L.beta_from_diffusers(beta_prime) == 5000.0
    official = L.diffusion_dpo_loss(t(MW), t(ML), t(RW), t(RL), beta=5000.0)
    assert close(official.loss, diffusers_sigmoid)
    assert close(L.diffusion_dpo_loss(t(MW), t(ML), t(RW), t(RL)).loss, diffusers_sigmoid)  # default β
    hinge = L.diffusion_dpo_loss(t(MW), t(ML), t(RW), t(RL), beta=5000.0, loss_type="hinge")
    assert close(hinge.loss, diffusers_hinge)
    assert float(hinge.loss) > 0  # some pairs inside the margin


def test_dpo_ipo_form():
    # IPO (Azar et al.): (h − 1/(2τ))² with h = ℓ; default τ = β/2 = diffusers' β′
    beta = 5000.0
    default = L.diffusion_dpo_loss(t(MW), t(ML), t(RW), t(RL), beta=beta, loss_type="ipo")
    tau = beta / 2
    assert close(default.loss, sum((ell(b) - 1.0 / (2.0 * tau)) ** 2 for b in range(4)) / 4, abs_=1e-18)
    explicit = L.diffusion_dpo_loss(t(MW), t(ML), t(RW), t(RL), beta=beta, loss_type="ipo", ipo_tau=100.0)
    assert close(explicit.loss, sum((ell(b) - 1.0 / 200.0) ** 2 for b in range(4)) / 4, abs_=1e-18)
    # the minimiser is ℓ = 1/(2τ), i.e. inside = ½·β·ℓ = ½: zero loss and zero gradient there
    mw = torch.tensor([0.3 - 1.0 / beta], dtype=F64, requires_grad=True)
    at_min = L.diffusion_dpo_loss(mw, t([0.3]), t([0.2]), t([0.2]), beta=beta, loss_type="ipo")
    at_min.loss.backward()
    assert float(at_min.loss.detach()) < 1e-25 and abs(float(mw.grad[0])) < 1e-12
    assert close(at_min.reward_margin, 0.5, rel=1e-9)


def test_dpo_implicit_accuracy_counts_exact_ties_as_zero():
    # pair 0: model improves on ref (inside > 0); pair 1: worse (< 0); pair 2: exactly the reference (= 0)
    mw, ml = t([0.10, 0.30, 0.25]), t([0.20, 0.20, 0.50])
    rw, rl = t([0.15, 0.20, 0.25]), t([0.20, 0.20, 0.50])
    out = L.diffusion_dpo_loss(mw, ml, rw, rl, beta=10.0)
    insides = [-5.0 * ((0.10 - 0.20) - (0.15 - 0.20)), -5.0 * ((0.30 - 0.20) - 0.0), 0.0]
    assert insides[0] > 0 > insides[1]
    assert close(out.implicit_acc, 1 / 3)
    assert close(out.loss, sum(-log_sig(x) for x in insides) / 3)


def test_dpo_gradient_flows_to_the_model_only():
    beta = 5000.0
    mw = torch.tensor(MW, dtype=F64, requires_grad=True)
    ml = torch.tensor(ML, dtype=F64, requires_grad=True)
    rw = torch.tensor(RW, dtype=F64, requires_grad=True)
    rl = torch.tensor(RL, dtype=F64, requires_grad=True)
    out = L.diffusion_dpo_loss(mw, ml, rw, rl, beta=beta)
    out.loss.backward()
    assert rw.grad is None and rl.grad is None  # reference is stop-gradient
    for b in range(4):
        inside = -0.5 * beta * ((MW[b] - ML[b]) - (RW[b] - RL[b]))
        # d/d mse_w of −log σ(inside)/B = −(1 − σ(inside))·(−½β)/B
        expected = (1.0 - sig(inside)) * 0.5 * beta / 4
        assert close(mw.grad[b], expected)
        assert close(ml.grad[b], -expected)
    assert all(not value.requires_grad for value in out.metrics.values())


def test_dpo_rejects_bad_arguments():
    with pytest.raises(ValueError, match="loss_type"):
        L.diffusion_dpo_loss(t(MW), t(ML), t(RW), t(RL), loss_type="cpo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch"):
        L.diffusion_dpo_loss(t(MW), t(ML[:3]), t(RW), t(RL))
    with pytest.raises(ValueError, match="beta"):
        L.diffusion_dpo_loss(t(MW), t(ML), t(RW), t(RL), beta=0.0)


def test_dpo_logits_is_ref_diff_minus_model_diff():
    got = L.dpo_logits(t(MW), t(ML), t(RW), t(RL))
    for b in range(4):
        assert close(got[b], ell(b))


# ----------------------------------------------------------------------------------------------------------
# SmPO
# ----------------------------------------------------------------------------------------------------------
def test_smpo_normalisation_constants_and_preference():
    assert L.SMPO_SCORE_LOW == 0.11543526500463486
    assert L.SMPO_SCORE_HIGH == 0.28201571106910706
    low, high = 0.11543526500463486, 0.28201571106910706
    assert close(L.smpo_preference(t([high]), t([low]))[0], sig(1.0))
    assert close(L.smpo_preference(t([low]), t([high]))[0], sig(-1.0))
    assert close(L.smpo_preference(t([0.2]), t([0.2]))[0], 0.5)
    # the reference's exp(n0)/(exp(n0)+exp(n1)) on raw PickScore cosines
    sw, sl = [0.231, 0.205, 0.198], [0.219, 0.224, 0.150]
    got = L.smpo_preference(t(sw), t(sl))
    for b in range(3):
        n0, n1 = (sw[b] - low) / (high - low), (sl[b] - low) / (high - low)
        assert close(got[b], math.exp(n0) / (math.exp(n0) + math.exp(n1)))
    assert not got.requires_grad


def test_smpo_loss_formula():
    beta, p = 2000.0, [0.7, 0.55, 0.9, 0.62]
    out = L.smpo_loss(t(MW), t(ML), t(RW), t(RL), preference=t(p), beta=beta)
    insides = [-0.5 * beta * (2 * p[b] - 1) * 10 * ((MW[b] - ML[b]) - (RW[b] - RL[b])) for b in range(4)]
    assert close(out.loss, sum(-log_sig(x) for x in insides) / 4)
    assert close(out.implicit_acc, sum(1 for x in insides if x > 0) / 4)
    assert close(out.preference, sum(p) / 4)
    # a scalar preference is broadcast to every pair
    scalar = L.smpo_loss(t(MW), t(ML), t(RW), t(RL), preference=0.8, beta=beta)
    insides = [-0.5 * beta * 0.6 * 10 * ((MW[b] - ML[b]) - (RW[b] - RL[b])) for b in range(4)]
    assert close(scalar.loss, sum(-log_sig(x) for x in insides) / 4)


def test_smpo_half_preference_gives_zero_gradient():
    mw = torch.tensor(MW, dtype=F64, requires_grad=True)
    ml = torch.tensor(ML, dtype=F64, requires_grad=True)
    out = L.smpo_loss(mw, ml, t(RW), t(RL), preference=0.5)
    out.loss.backward()
    assert close(out.loss, math.log(2.0))
    assert torch.count_nonzero(mw.grad) == 0 and torch.count_nonzero(ml.grad) == 0
    # and a confident preference does train
    mw.grad = None
    L.smpo_loss(mw, ml, t(RW), t(RL), preference=0.9).loss.backward()
    assert torch.count_nonzero(mw.grad) == 4


def test_epsilon_from_x0_inverts_the_forward_process():
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 4, 5, 5, generator=gen, dtype=F64)
    eps = torch.randn(3, 4, 5, 5, generator=gen, dtype=F64)
    alphas = [0.9, 0.5, 0.05]
    x_t = torch.stack([math.sqrt(a) * x0[i] + math.sqrt(1 - a) * eps[i] for i, a in enumerate(alphas)])
    assert torch.allclose(L.epsilon_from_x0(x_t, x0, t(alphas)), eps, atol=1e-12)
    # a scalar ᾱ, element by element
    got = L.epsilon_from_x0(x_t, x0, 0.3)
    for index in [(0, 0, 0, 0), (1, 2, 3, 4), (2, 3, 1, 0)]:
        expected = (float(x_t[index]) - math.sqrt(0.3) * float(x0[index])) / math.sqrt(0.7)
        assert close(got[index], expected)


# ----------------------------------------------------------------------------------------------------------
# Adaptive-DPO
# ----------------------------------------------------------------------------------------------------------
CUR = [0.0020, -0.0010, 0.0005]
EMA1 = [0.0021, -0.0009, 0.0005]
EMA2 = [0.0019, -0.0011, 0.0009]


def adaptive_by_hand(cur, emas, beta=1000.0, rho=15.0):
    rows = []
    for row in [cur, *emas]:
        norm = math.sqrt(sum(v * v for v in row))
        rows.append([rho * v / norm for v in row])
    weights, minority, margins, losses = [], [], [], []
    mean_cur = sum(cur) / len(cur)
    for b in range(len(cur)):
        column = [row[b] for row in rows]
        s = min(statistics.stdev(column), 1.0)  # unbiased (n − 1), as torch.std
        m = sum(sig(v) for v in column) / len(column)
        u = abs(m - 1.0) * s
        w = 1.0 / (10.0 * u + 1.0)
        margin = mean_cur - u * u / beta
        weights.append(w)
        minority.append(u)
        margins.append(margin)
        losses.append(-w * log_sig(beta * cur[b] - margin))
    return sum(losses) / len(losses), weights, minority, margins


def test_adaptive_dpo_weights_and_margin_on_a_hand_example():
    # the fixture must exercise the unclamped, unbiased std (else the convention would be untested)
    rows = []
    for row in [CUR, EMA1, EMA2]:
        norm = math.sqrt(sum(v * v for v in row))
        rows.append([15.0 * v / norm for v in row])
    stds = [statistics.stdev([row[b] for row in rows]) for b in range(3)]
    assert any(0.0 < s < 1.0 for s in stds)
    assert any(abs(s - statistics.pstdev([row[b] for row in rows])) > 1e-3 for b, s in enumerate(stds))

    out = L.adaptive_dpo_loss(t(CUR), [t(EMA1), t(EMA2)], beta=1000.0, rho=15.0)
    loss, weights, minority, margins = adaptive_by_hand(CUR, [EMA1, EMA2])
    assert close(out.loss, loss)
    for b in range(3):
        assert close(out.weights[b], weights[b])
        assert close(out.minority_scores[b], minority[b])
    assert close(out.margin, sum(margins) / 3)
    assert close(out.weight, sum(weights) / 3)
    assert close(out.implicit_acc, 2 / 3)
    assert any(w < 0.99 for w in weights)  # the reweighting is active in this example


def test_adaptive_dpo_gradient_only_through_beta_ell():
    cur = torch.tensor(CUR, dtype=F64, requires_grad=True)
    e1 = torch.tensor(EMA1, dtype=F64, requires_grad=True)
    e2 = torch.tensor(EMA2, dtype=F64, requires_grad=True)
    out = L.adaptive_dpo_loss(cur, [e1, e2])
    out.loss.backward()
    assert e1.grad is None and e2.grad is None
    _, weights, _, margins = adaptive_by_hand(CUR, [EMA1, EMA2])
    for b in range(3):
        # w, the margin and mean(ℓ) inside it are stop-gradient: d/dℓ_b = −w_b·β·(1 − σ(βℓ_b − m_b))/B
        expected = -weights[b] * 1000.0 * (1.0 - sig(1000.0 * CUR[b] - margins[b])) / 3
        assert close(cur.grad[b], expected)


def test_adaptive_dpo_without_ema_copies_is_margin_dpo():
    out = L.adaptive_dpo_loss(t(CUR), [], beta=1000.0)
    mean_cur = sum(CUR) / 3
    assert close(out.loss, sum(-log_sig(1000.0 * c - mean_cur) for c in CUR) / 3)
    assert torch.equal(out.weights, torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match="ema_logits"):
        L.adaptive_dpo_loss(t(CUR), [t(EMA1[:2])])


# ----------------------------------------------------------------------------------------------------------
# Diffusion-KTO
# ----------------------------------------------------------------------------------------------------------
K_MODEL = [0.1000, 0.2030, 0.0800, 0.1500, 0.3000]
K_REF = [0.1010, 0.2025, 0.0803, 0.1496, 0.3004]
K_LABEL = [True, False, True, False, True]


def kto_by_hand(model, ref, label, beta, lam_d, lam_u, kl=None):
    g = [ref[i] - model[i] for i in range(len(model))]
    z = max(sum(g) / len(g) if kl is None else kl, 0.0)
    total, xs = 0.0, []
    for i, good in enumerate(label):
        x = beta * (g[i] - z) if good else beta * (z - g[i])
        xs.append(x)
        total += (lam_d if good else lam_u) * (1.0 - sig(x))
    return total / len(model), z, xs


def test_kto_desirable_and_undesirable_terms():
    for lam_d, lam_u in [(1.0, 1.0), (1.0, 2.5)]:
        out = L.diffusion_kto_loss(t(K_MODEL), t(K_REF), torch.tensor(K_LABEL), lambda_d=lam_d, lambda_u=lam_u)
        loss, z, xs = kto_by_hand(K_MODEL, K_REF, K_LABEL, 1000.0, lam_d, lam_u)
        assert close(out.loss, loss)
        assert close(out.kl, z) and z > 0  # the clamp is inactive here
        assert close(out.implicit_acc, sum(1 for x in xs if x > 0) / 5)
    g = [K_REF[i] - K_MODEL[i] for i in range(5)]
    assert close(out.reward_desirable, (g[0] + g[2] + g[4]) / 3)
    assert close(out.reward_undesirable, (g[1] + g[3]) / 2)
    assert close(out.desirable_fraction, 0.6)


def test_kto_reference_point_is_clamped_at_zero_and_overridable():
    model = [0.2, 0.2010, 0.3005]
    ref = [0.2002, 0.2000, 0.3000]  # mean g < 0 -> z0 = 0
    label = torch.tensor([1, 0, 1])
    out = L.diffusion_kto_loss(t(model), t(ref), label, beta=1000.0)
    loss, z, _ = kto_by_hand(model, ref, [True, False, True], 1000.0, 1.0, 1.0)
    assert z == 0.0 and float(out.kl) == 0.0
    assert close(out.loss, loss)
    # a global (all-reduced) mean of g passed in, as the reference's accelerator.reduce
    out = L.diffusion_kto_loss(t(model), t(ref), label, beta=1000.0, kl=2e-4)
    loss, z, _ = kto_by_hand(model, ref, [True, False, True], 1000.0, 1.0, 1.0, kl=2e-4)
    assert close(out.loss, loss) and close(out.kl, 2e-4)


def test_kto_gradient_treats_reference_point_as_constant():
    model = torch.tensor(K_MODEL, dtype=F64, requires_grad=True)
    ref = torch.tensor(K_REF, dtype=F64, requires_grad=True)
    lam_d, lam_u, beta = 1.0, 2.0, 1000.0
    L.diffusion_kto_loss(model, ref, torch.tensor(K_LABEL), beta=beta, lambda_d=lam_d, lambda_u=lam_u).loss.backward()
    assert ref.grad is None
    _, _, xs = kto_by_hand(K_MODEL, K_REF, K_LABEL, beta, lam_d, lam_u)
    for i, good in enumerate(K_LABEL):
        sign, lam = (1.0, lam_d) if good else (-1.0, lam_u)
        # x_i = sign·β·(ref_i − model_i − z0) with z0 constant: dL/dmodel_i = λ·σ'(x_i)·sign·β/B
        expected = lam * sig(xs[i]) * (1.0 - sig(xs[i])) * sign * beta / 5
        assert close(model.grad[i], expected)


# ----------------------------------------------------------------------------------------------------------
# D3PO
# ----------------------------------------------------------------------------------------------------------
REF_W = [-1.30, -0.90, -1.10, -1.00]
REF_L = [-1.20, -1.05, -0.95, -1.00]
# log-ratios: w = [0.05, 0.30 (clamped high), −0.02, −0.50 (clamped low)], l = [−0.03, 0.01, 0.20 (clamped), 0.04]
LOGP_W = [REF_W[0] + 0.05, REF_W[1] + 0.30, REF_W[2] - 0.02, REF_W[3] - 0.50]
LOGP_L = [REF_L[0] - 0.03, REF_L[1] + 0.01, REF_L[2] + 0.20, REF_L[3] + 0.04]


def d3po_by_hand(beta=0.1, clip=0.1, tie=(False,) * 4):
    total, insides = 0.0, []
    for b in range(4):
        rw = min(max(math.exp(LOGP_W[b] - REF_W[b]), 1 - clip), 1 + clip)
        rl = min(max(math.exp(LOGP_L[b] - REF_L[b]), 1 - clip), 1 + clip)
        inside = 0.0 if tie[b] else beta * (math.log(rw) - math.log(rl))
        insides.append(inside)
        total += -log_sig(inside)
    return total / 4, insides


def test_d3po_formula_and_clipfrac():
    out = L.d3po_loss(t(LOGP_W), t(LOGP_L), t(REF_W), t(REF_L))
    loss, insides = d3po_by_hand()
    assert close(out.loss, loss)
    assert close(out.implicit_acc, sum(1 for x in insides if x > 0) / 4)
    assert close(out.clipfrac, 3 / 8)  # 0.30, −0.50 and 0.20 leave [0.9, 1.1]
    assert close(out.tie_fraction, 0.0)


def test_d3po_gradient_is_zero_where_the_ratio_is_clamped():
    logp_w = torch.tensor(LOGP_W, dtype=F64, requires_grad=True)
    logp_l = torch.tensor(LOGP_L, dtype=F64, requires_grad=True)
    ref_w = torch.tensor(REF_W, dtype=F64, requires_grad=True)
    L.d3po_loss(logp_w, logp_l, ref_w, t(REF_L)).loss.backward()
    assert ref_w.grad is None
    _, insides = d3po_by_hand()
    assert logp_w.grad[1] == 0 and logp_w.grad[3] == 0 and logp_l.grad[2] == 0
    for b in (0, 2):  # unclamped winners: d/dlogp_w of −log σ(β(log r_w − log r_l))/B
        assert close(logp_w.grad[b], -(1.0 - sig(insides[b])) * 0.1 / 4)
    for b in (0, 1, 3):
        assert close(logp_l.grad[b], (1.0 - sig(insides[b])) * 0.1 / 4)


def test_d3po_ties_add_log2_and_no_gradient():
    tie = torch.tensor([False, False, True, False])
    logp_w = torch.tensor(LOGP_W, dtype=F64, requires_grad=True)
    logp_l = torch.tensor(LOGP_L, dtype=F64, requires_grad=True)
    out = L.d3po_loss(logp_w, logp_l, t(REF_W), t(REF_L), tie=tie)
    out.loss.backward()
    loss, insides = d3po_by_hand(tie=(False, False, True, False))
    assert close(out.loss, loss)
    assert logp_w.grad[2] == 0 and logp_l.grad[2] == 0
    assert logp_w.grad[0] != 0
    assert close(out.tie_fraction, 0.25)
    assert close(out.implicit_acc, sum(1 for b in (0, 1, 3) if insides[b] > 0) / 3)


# ----------------------------------------------------------------------------------------------------------
# DDPO PPO-clip
# ----------------------------------------------------------------------------------------------------------
OLD = [-1.0, -1.2, -0.8, -1.1, -0.9]
LOG_RATIO = [0.0, 5e-5, 3e-4, -3e-4, 2e-4]
ADV = [1.0, -2.0, 10.0, 0.7, -7.0]


def ppo_by_hand(eps=1e-4, adv_max=5.0):
    total = 0.0
    for b in range(5):
        a = min(max(ADV[b], -adv_max), adv_max)
        r = math.exp(LOG_RATIO[b])
        total += max(-a * r, -a * min(max(r, 1 - eps), 1 + eps))
    return total / 5


def test_ppo_clip_formula_and_metrics():
    logp = t([OLD[b] + LOG_RATIO[b] for b in range(5)])
    out = L.ddpo_ppo_loss(logp, t(OLD), t(ADV))
    assert close(out.loss, ppo_by_hand(), rel=1e-7)
    assert close(out.approx_kl, 0.5 * sum(x * x for x in LOG_RATIO) / 5, rel=1e-6)
    assert close(out.clipfrac, sum(1 for x in LOG_RATIO if abs(math.exp(x) - 1) > 1e-4) / 5)
    assert close(out.advantage, (1.0 - 2.0 + 5.0 + 0.7 - 5.0) / 5)


def test_ppo_advantages_are_clipped_to_five():
    logp = t([OLD[b] + LOG_RATIO[b] for b in range(5)])
    clipped_adv = [min(max(a, -5.0), 5.0) for a in ADV]
    assert torch.equal(L.ddpo_ppo_loss(logp, t(OLD), t(ADV)).loss, L.ddpo_ppo_loss(logp, t(OLD), t(clipped_adv)).loss)
    # with a looser clip, the 10 is still worth 5 and −7 worth −5
    wide = L.ddpo_ppo_loss(logp, t(OLD), t(ADV), clip_range=1e-4, adv_clip_max=8.0)
    assert close(wide.loss, ppo_by_hand(adv_max=8.0), rel=1e-7)
    assert not close(wide.loss, ppo_by_hand(), rel=1e-3)


def test_ppo_gradient_vanishes_in_the_clipped_region():
    logp = torch.tensor([OLD[b] + LOG_RATIO[b] for b in range(5)], dtype=F64, requires_grad=True)
    old = torch.tensor(OLD, dtype=F64, requires_grad=True)
    adv = torch.tensor(ADV, dtype=F64, requires_grad=True)
    L.ddpo_ppo_loss(logp, old, adv).loss.backward()
    assert old.grad is None and adv.grad is None
    # sample 2: A > 0 and ratio > 1 + ε -> clipped objective is active -> no gradient
    assert logp.grad[2] == 0
    # sample 3: A > 0 and ratio < 1 − ε -> unclipped -> d/dlogp (−A·r)/B = −A·r/B
    assert close(logp.grad[3], -0.7 * math.exp(-3e-4) / 5, rel=1e-7)
    # sample 4: A < 0 and ratio > 1 + ε -> unclipped (pessimistic) -> −A·r/B
    assert close(logp.grad[4], 5.0 * math.exp(2e-4) / 5, rel=1e-7)
    # samples inside the trust region have the plain policy-gradient term
    assert close(logp.grad[0], -1.0 / 5, rel=1e-7)


# ----------------------------------------------------------------------------------------------------------
# DDIM step log-probability
# ----------------------------------------------------------------------------------------------------------
def ddim_sigma(alpha_t: float, alpha_prev: float, eta: float) -> float:
    return eta * math.sqrt((1 - alpha_prev) / (1 - alpha_t)) * math.sqrt(1 - alpha_t / alpha_prev)


def test_ddim_log_prob_equals_normal_log_prob_per_sample():
    gen = torch.Generator().manual_seed(2)
    shape = (3, 2, 4, 4)
    x_t = torch.randn(shape, generator=gen, dtype=F64)
    eps = torch.randn(shape, generator=gen, dtype=F64)
    prev = torch.randn(shape, generator=gen, dtype=F64)
    alpha_t, alpha_prev = [0.50, 0.70, 0.90], [0.60, 0.80, 0.9991]
    for eta in (1.0, 0.5):
        out = L.ddim_step_log_prob(prev, x_t, eps, t(alpha_t), t(alpha_prev), eta=eta)
        assert out.log_prob.shape == (3,)
        for b in range(3):
            a, ap = alpha_t[b], alpha_prev[b]
            sigma = ddim_sigma(a, ap, eta)
            x0 = (x_t[b] - math.sqrt(1 - a) * eps[b]) / math.sqrt(a)
            mu = math.sqrt(ap) * x0 + math.sqrt(1 - ap - sigma**2) * eps[b]
            expected = torch.distributions.Normal(mu, sigma).log_prob(prev[b]).mean()
            assert close(out.log_prob[b], expected)
            assert torch.allclose(out.mean[b], mu, atol=1e-12)
            assert close(out.std.reshape(-1)[b], sigma)


def test_ddim_sigma_scales_with_eta_and_accepts_float_alphas():
    x = torch.zeros(2, 3, dtype=F64)
    s1 = L.ddim_step_log_prob(x, x, x, 0.4, 0.5, eta=1.0).std
    s_half = L.ddim_step_log_prob(x, x, x, 0.4, 0.5, eta=0.5).std
    assert close(s1, math.sqrt(0.5 / 0.6) * math.sqrt(1 - 0.4 / 0.5))
    assert close(s_half, 0.5 * float(s1))
    with pytest.raises(ValueError, match="eta"):
        L.ddim_step_log_prob(x, x, x, 0.4, 0.5, eta=0.0)
    with pytest.raises(ValueError, match="alpha_bar_t"):
        L.ddim_step_log_prob(x, x, x, t([0.4, 0.5, 0.6]), 0.5)


def test_ddim_log_prob_gradient_reaches_the_prediction_not_the_sample():
    gen = torch.Generator().manual_seed(3)
    x_t = torch.randn(2, 3, 4, generator=gen, dtype=F64)
    eps = torch.randn(2, 3, 4, generator=gen, dtype=F64, requires_grad=True)
    prev = torch.randn(2, 3, 4, generator=gen, dtype=F64, requires_grad=True)
    L.ddim_step_log_prob(prev, x_t, eps, 0.3, 0.4).log_prob.sum().backward()
    assert prev.grad is None
    assert eps.grad is not None and torch.count_nonzero(eps.grad) > 0


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MMALIGN_SLOW") != "1", reason="imports diffusers (slow); set MMALIGN_SLOW=1")
def test_ddim_mean_matches_diffusers_scheduler_step():
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False)
    scheduler.set_timesteps(20)
    timestep = int(scheduler.timesteps[5])
    prev_t = timestep - 1000 // 20
    gen = torch.Generator().manual_seed(4)
    x_t = torch.randn(2, 4, 8, 8, generator=gen)
    eps = torch.randn(2, 4, 8, 8, generator=gen)
    noise = torch.randn(2, 4, 8, 8, generator=gen)
    step = scheduler.step(eps, timestep, x_t, eta=1.0, variance_noise=noise).prev_sample
    ours = L.ddim_step_log_prob(
        step, x_t, eps, scheduler.alphas_cumprod[timestep], scheduler.alphas_cumprod[prev_t], eta=1.0
    )
    assert torch.allclose(ours.mean + ours.std * noise, step, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Reward backpropagation
# ----------------------------------------------------------------------------------------------------------
def test_reward_backprop_losses():
    rewards = [2.5, 1.2, -0.3, 1.99]
    refl = L.refl_loss(t(rewards))
    assert close(refl.loss, sum(max(0.0, 2.0 - r) for r in rewards) / 4 * 1e-3)
    aesthetic = [6.1, 7.4, 10.5]
    assert close(L.alignprop_aesthetic_loss(t(aesthetic)).loss, np.mean([abs(a - 10) for a in aesthetic]) * 0.01)
    hps = [0.27, 0.31]
    assert close(L.target_distance_loss(t(hps), target=1.0).loss, np.mean([1.0 - h for h in hps]) * 0.01)
    assert close(L.draft_loss(t(rewards), scale=0.5).loss, -sum(rewards) / 4 * 0.5)


def test_reward_backprop_gradients():
    rewards = torch.tensor([2.5, 1.2, -0.3], dtype=F64, requires_grad=True)
    L.refl_loss(rewards).loss.backward()
    # relu: no gradient once the reward passed the target; −scale/B below it
    assert rewards.grad[0] == 0 and close(rewards.grad[1], -1e-3 / 3)
    rewards.grad = None
    L.draft_loss(rewards).loss.backward()
    assert torch.allclose(rewards.grad, torch.full((3,), -1 / 3, dtype=F64))
