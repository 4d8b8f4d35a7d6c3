"""SmPO's ReNoise inversion against the reference loop (JaydenLyh/SmPO ``train.py``), re-derived here by hand.

The reference, for SD1.5 (``DDIMInverseScheduler.from_pretrained(model).set_timesteps(5)``, leading spacing,
``steps_offset`` 1, ``set_alpha_to_one`` false): ``times = grid[grid < t0]`` with ``grid = [1, 201, 401, 601,
801]``; for each ``t`` in ``times``: ``e1 = unet(x, t)``, ``guess = step(e1, t, x)``, ``e2 = unet(guess, t)``,
``x = step((e1 + e2)/2, t, x)``, where ``step`` moves from ᾱ at ``t − 200`` (ᾱ_0 when that is negative) to ᾱ at
``t``; then ``ε̂ = (x − √ᾱ_{t0}·x0)/√(1 − ᾱ_{t0})``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.trainers.conftest import write_pairs
from tests.trainers.test_training import make_trainer

GRID = [1, 201, 401, 601, 801]
RATIO = 200
# Stable Diffusion 1.5's scheduler_config.json (the reference builds its inverse scheduler from it)
SD15_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}


@pytest.fixture(scope="module")
def smpo(sd_folder, tmp_path_factory):
    from diffusers import DDPMScheduler

    tmp = tmp_path_factory.mktemp("smpo")
    data = write_pairs(tmp / "d", count=2)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    for row in rows:
        row["score_chosen"], row["score_rejected"] = 0.25, 0.15
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trainer = make_trainer(sd_folder, data, tmp / "o", "trainer=smpo")
    trainer.policy.noise_scheduler = DDPMScheduler.from_config(SD15_SCHEDULER)
    return trainer


def reference_steps(t0: int) -> list[tuple[int, float, float]]:
    """The reference loop's steps for one sample: (label t, ᾱ of the source, ᾱ of the destination)."""
    alphas = sd15_alphas()
    steps = []
    for t in [g for g in GRID if g < t0]:
        source = t - RATIO
        steps.append((t, float(alphas[source]) if source >= 0 else float(alphas[0]), float(alphas[t])))
    return steps


def sd15_alphas() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def ddim(x, e, a_from, a_to):
    return math.sqrt(a_to) * (x - math.sqrt(1 - a_from) * e) / math.sqrt(a_from) + math.sqrt(1 - a_to) * e


class Recorder:
    """A toy epsilon model that records each call's (timestep labels, input)."""

    def __init__(self, eps):
        self.eps, self.calls = eps, []

    def __call__(self, x, t, embeds, time_ids):
        self.calls.append((t.tolist(), x.detach().double().clone()))
        return self.eps(x, t).float()


def test_grid_is_the_references(smpo):
    assert smpo.renoise_grid().timesteps.tolist() == GRID
    assert [len(reference_steps(t0)) for t0 in (0, 1, 2, 150, 201, 202, 500, 999)] == [0, 0, 1, 1, 1, 2, 3, 5]


def test_calls_are_labelled_with_the_destination_at_the_references_noise_levels(smpo, monkeypatch):
    """A constant-ε model keeps DDIM's predicted x0 ``P`` fixed, so every input is ``√ᾱ·P + √(1−ᾱ)·E`` and its
    noise level ᾱ can be read back; the calls must be (label, level) as in the reference loop."""
    torch.manual_seed(0)
    E = torch.randn(1, 4, 4, 4, dtype=torch.float64)
    recorder = Recorder(lambda x, t: E.expand(x.shape[0], -1, -1, -1))
    monkeypatch.setattr(smpo, "predict", recorder)
    alphas = sd15_alphas()
    for t0 in (150, 500):
        recorder.calls.clear()
        x0 = torch.randn(1, 4, 4, 4, dtype=torch.float64)
        a_init = float(alphas[0])  # set_alpha_to_one false
        P = (x0 - math.sqrt(1 - a_init) * E) / math.sqrt(a_init)
        x_t, eps_hat = smpo.renoise_invert(x0.float(), torch.tensor([t0]), None, None)
        basis = torch.stack([P.flatten(), E.flatten()], 1)

        def level(x, basis=basis):
            a, b = torch.linalg.lstsq(basis, x.flatten()[:, None]).solution.flatten().tolist()
            assert a**2 + b**2 == pytest.approx(1.0, abs=1e-5)  # on the DDIM path of (P, E)
            return a**2

        got = [(labels[0], level(x)) for labels, x in recorder.calls]
        expected = []
        for t, a_from, a_to in reference_steps(t0):
            expected += [(t, a_from), (t, a_to)]  # first call at the source, second at the guess (destination)
        assert [label for label, _ in got] == [label for label, _ in expected]
        assert [lv for _, lv in got] == pytest.approx([lv for _, lv in expected], abs=1e-5)
        # t0 = 150: one step, to t = 1; t0 = 500: three, ending at t = 401 (the last grid point below t0)
        assert [label for label, _ in got] == ({150: [1, 1], 500: [1, 1, 201, 201, 401, 401]}[t0])
        last = reference_steps(t0)[-1][2]
        assert level(x_t.double()) == pytest.approx(last, abs=1e-5)
        a_t0 = float(alphas[t0])  # the target still uses ᾱ at t0
        torch.testing.assert_close(
            eps_hat.double(), (x_t.double() - math.sqrt(a_t0) * x0) / math.sqrt(1 - a_t0), atol=1e-5, rtol=1e-5
        )


def test_mixed_batch_follows_the_reference_per_sample(smpo, monkeypatch):
    """Samples with t0 = 150, 500 and 1 (one, three and no grid steps) in one batch; an input-dependent ε; the
    inputs of every call and the results equal the reference loop run on each sample alone in float64."""

    def eps(x, t):
        return 0.3 * x + 0.01 * t.view(-1, 1, 1, 1).to(x.dtype) / 1000

    recorder = Recorder(eps)
    monkeypatch.setattr(smpo, "predict", recorder)
    torch.manual_seed(1)
    x0 = torch.randn(3, 4, 4, 4)
    t0 = torch.tensor([150, 500, 1])
    x_t, eps_hat = smpo.renoise_invert(x0, t0, None, None)

    alphas = sd15_alphas()
    per_sample = []  # the reference loop, one sample at a time: its calls and its result
    for b in range(3):
        x, calls = x0[b].double(), []
        for t, a_from, a_to in reference_steps(int(t0[b])):
            e1 = eps(x[None], torch.tensor([t]))[0]
            calls.append((t, x))
            guess = ddim(x, e1, a_from, a_to)
            calls.append((t, guess))
            e2 = eps(guess[None], torch.tensor([t]))[0]
            x = ddim(x, (e1 + e2) / 2, a_from, a_to)
        per_sample.append((calls, x))
        a = float(alphas[int(t0[b])])
        torch.testing.assert_close(x_t[b].double(), x, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            eps_hat[b].double(), (x - math.sqrt(a) * x0[b].double()) / math.sqrt(1 - a), atol=1e-4, rtol=1e-4
        )
    # the batched calls: call k holds call k of every sample that still has it, in batch order
    expected = []
    for k in range(max(len(calls) for calls, _ in per_sample)):
        active = [calls[k] for calls, _ in per_sample if len(calls) > k]
        expected.append(([t for t, _ in active], torch.stack([x for _, x in active])))
    assert [labels for labels, _ in recorder.calls] == [labels for labels, _ in expected]
    assert [labels for labels, _ in recorder.calls] == [[1, 1], [1, 1], [201], [201], [401], [401]]
    for (_, got), (_, want) in zip(recorder.calls, expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_t[2], x0[2])  # t0 = 1: no grid point below it, x stays the clean latents
