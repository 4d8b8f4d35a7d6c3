"""Diffusion-KTO's reference point is the mean of ``g`` over the global batch, all processes together, as the
reference all-reduces it (jacklishufan/diffusion-kto ``train_kto_sd_v1.5.py``: ``accelerator.reduce(kl_gpu,
reduction="mean")``); so two processes with one pair each train as one process with both pairs."""

from __future__ import annotations

import pytest
import torch

from mmalign.trainers import losses as L
from tests.trainers import distributed
from tests.trainers.test_training import make_trainer

BETA = 1000.0


def kto_by_hand(model_mse, ref_mse, desirable, kl):
    """The reference's loss with ``--loss kto --halo sigmoid``, λ_D = λ_U = 1: g = −mse_θ + mse_ref,
    h = σ(sign·β·(g − max(kl, 0))), loss = mean(1 − h)."""
    g = ref_mse - model_mse
    sign = desirable.double() * 2 - 1
    return (1 - torch.sigmoid(sign * BETA * (g - max(float(kl), 0.0)))).mean()


def test_global_reference_point_makes_the_split_batch_gradient_the_full_batch_one():
    """Fixed tensors for a global batch of 8 split over two processes of 4 (DDP averages their gradients)."""
    ref = torch.tensor([0.30, 0.20, 0.25, 0.40, 0.31, 0.22, 0.27, 0.35], dtype=torch.float64)
    g = torch.tensor([4e-4, -1e-4, 6e-4, 1e-4, 1.5e-3, 2e-4, -3e-4, 9e-4], dtype=torch.float64)
    model = (ref - g).requires_grad_()
    desirable = torch.tensor([1, 0, 1, 0, 1, 0, 1, 0]).bool()

    def grad(kl_of_half):
        model.grad = None
        for half in (slice(0, 4), slice(4, 8)):
            kl = kl_of_half(half)
            out = L.diffusion_kto_loss(model[half], ref[half], desirable[half], beta=BETA, kl=kl)
            torch.testing.assert_close(out.loss, kto_by_hand(model[half], ref[half], desirable[half], kl))
            (out.loss / 2).backward()
        return model.grad.clone()

    full = L.diffusion_kto_loss(model, ref, desirable, beta=BETA)  # one process: the batch mean of g
    torch.testing.assert_close(full.loss, kto_by_hand(model, ref, desirable, g.mean()))
    (expected,) = torch.autograd.grad(full.loss, model)
    global_kl = grad(lambda half: g.mean())  # the all-reduced mean: what the trainer passes now
    per_process = grad(lambda half: g[half].mean())  # the previous per-process batch mean
    torch.testing.assert_close(global_kl, expected)
    assert (per_process - expected).abs().max() > 0.05 * expected.abs().max()


@pytest.mark.kernels  # two training runs in subprocesses: about 20 s on 2 cores
def test_two_processes_equal_one_for_kto(sd_folder, pairs_file, tmp_path):
    """The same 2 pairs each step; λ_U = 0.1 so the model improves on both halves and the reference point
    becomes positive (clamped at 0 otherwise, and then the same whatever the split)."""
    args = [
        f"model={sd_folder}",
        f"data={pairs_file}",
        "trainer=kto",
        "resolution=32",
        "tracker=none",
        "progress=false",
        "max_steps=3",
        "max_train_samples=2",
        "lambda_undesirable=0.1",
        "lr=0.03",  # plain SGD: the reference point moves (4e-4 at step 2) and updates stay comparable
        "optimizer=sgd",
        "lora_rank=4",
        "log_every=1",
    ]
    runs = distributed.train_one_and_two(args, tmp_path)
    one, two = runs["one"]["logs"], runs["two"]["logs"]
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):  # tolerances measured in tests/trainers/distributed.py
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=distributed.NORM_RTOL)
        assert b["loss"] == pytest.approx(a["loss"], rel=distributed.NORM_RTOL, abs=1e-6)
        assert b["kl"] == pytest.approx(a["kl"], rel=1e-2)  # a mean of MSE differences: cancellation
    assert min(r["kl"] for r in one[1:]) > 1e-4  # the reference point is in play after the first step
    # measured: tests/trainers/distributed.py (KTO: grad norms within 1e-5, update 5.5e-6 on AVX2 kernels); the
    # former per-process reference point gave 7.7e-3 and 2.2e-2 at steps 2 and 3
    init = distributed.initial_lora(make_trainer(sd_folder, pairs_file, tmp_path / "init", "trainer=kto"))
    distributed.assert_two_processes_equal_one(runs, init)
