"""``mmalign generate``: best-of-N picks the argmax and writes every score, resumes, N = 1 is plain sampling with
the same seed (UNet and flow matching); ReNO's objective, regulariser and optimiser step re-derived on fixed
tensors; non-differentiable rewards refused for noise optimisation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from mmalign.cli import main
from mmalign.commands import generate as generate_command
from mmalign.commands.generate import generate
from mmalign.errors import ConfigError
from mmalign.models.noise_opt import (
    NoiseSampler,
    candidate_seed,
    chi_norm_regulariser,
    noise_objective,
    optimise_noise,
)
from mmalign.toyworld.sampling import ASSETS

PROMPTS = ["two red circles on the left", "one blue square on the right", "three green triangles at the top"]
needs_pipeline = pytest.mark.skipif(not (ASSETS / "pipeline").is_dir(), reason="assets/toyworld not built")
needs_flow = pytest.mark.skipif(not (ASSETS / "flow_pipeline").is_dir(), reason="assets/toyworld not built")

pytestmark = pytest.mark.usefixtures("one_thread")


class Redness:
    """A reward reading saved pictures: mean red minus mean green, blue (exact on the PNGs); differentiable on
    tensors. Counts the images it scores."""

    name = "redness"
    is_differentiable = True

    def __init__(self):
        self.scored = 0

    @staticmethod
    def _of(pixels: torch.Tensor) -> torch.Tensor:
        return pixels[:, 0].mean(dim=(1, 2)) - 0.5 * (pixels[:, 1] + pixels[:, 2]).mean(dim=(1, 2))

    def score_images(self, pictures, prompts):
        self.scored += len(pictures)
        arrays = [np.asarray(p, dtype=np.float32) / 255 for p in pictures]
        pixels = torch.stack([torch.from_numpy(a).permute(2, 0, 1) for a in arrays])
        return self._of(pixels)

    def __call__(self, images, prompts):
        return self._of(images)


@pytest.fixture(scope="module")
def unet():
    from mmalign.models.generator import load_generator

    return load_generator(ASSETS / "pipeline")


@pytest.fixture(scope="module")
def flow():
    from mmalign.toyworld.sampling import load_flow_generator

    return load_flow_generator()


def rows(out):
    return [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------- best-of-N


@needs_pipeline
def test_best_of_n_picks_the_argmax_and_writes_every_score(unet, tmp_path):
    reward = Redness()
    summary = generate(unet, reward, PROMPTS[:2], 3, tmp_path, steps=3, guidance=1.0, resolution=32, seed=5)
    assert summary == {"prompts": 2, "images": 6, "forward": 6, "backward": 0}
    for i, row in enumerate(rows(tmp_path)):
        assert row["prompt"] == PROMPTS[i] and row["n"] == 3 and row["noise_opt"] is None
        assert row["images"] == [f"images/{i:05d}_{j:02d}.png" for j in range(3)]
        assert row["seeds"] == [candidate_seed(5, i, j) for j in range(3)] == [5 + i + j * 1_000_003 for j in range(3)]
        pictures = [Image.open(tmp_path / name).convert("RGB") for name in row["images"]]
        assert row["scores"] == [float(s) for s in Redness().score_images(pictures, None)]  # every candidate's
        assert row["chosen"] == int(np.argmax(row["scores"]))
        assert (tmp_path / row["best"]).read_bytes() == (tmp_path / row["images"][row["chosen"]]).read_bytes()
        assert row["generator_calls"] == {"forward": 3, "backward": 0, "total": 3, "steps": 3}
    assert len({(tmp_path / n).read_bytes() for r in rows(tmp_path) for n in r["images"]}) == 6  # distinct noises
    # candidate j has the same seed whatever N: N = 2's candidates are the first two of N = 3's
    generate(unet, reward, PROMPTS[:2], 2, tmp_path / "n2", steps=3, guidance=1.0, resolution=32, seed=5)
    for row, fewer in zip(rows(tmp_path), rows(tmp_path / "n2")):
        assert fewer["scores"] == row["scores"][:2] and fewer["seeds"] == row["seeds"][:2]


@needs_pipeline
def test_a_rerun_skips_finished_prompts_and_a_killed_run_resumes(unet, tmp_path, monkeypatch):
    args = dict(steps=2, guidance=1.0, resolution=32, seed=0)
    clean = tmp_path / "clean"
    generate(unet, Redness(), PROMPTS, 2, clean, **args)
    again = generate(unet, Redness(), PROMPTS, 2, clean, **args)
    assert again["forward"] == 0 and len(rows(clean)) == 3  # nothing sampled again, the output written again

    killed, real, calls = tmp_path / "killed", generate_command._generate_prompt, []

    def dies_on_the_second(sampler, reward, prompt, i, *rest):
        calls.append(i)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(sampler, reward, prompt, i, *rest)

    monkeypatch.setattr(generate_command, "_generate_prompt", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        generate(unet, Redness(), PROMPTS, 2, killed, **args)
    assert not (killed / "scores.jsonl").exists()
    monkeypatch.setattr(generate_command, "_generate_prompt", real)
    resumed = generate(unet, Redness(), PROMPTS, 2, killed, **args)
    assert resumed["forward"] == 4  # prompts 1 and 2 only
    assert rows(killed) == rows(clean)
    other = generate(unet, Redness(), PROMPTS, 2, killed, **{**args, "seed": 1})  # other settings: all again
    assert other["forward"] == 6


# ------------------------------------------------------------------------------------ N = 1 is plain sampling


@needs_pipeline
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_n1_is_plain_diffusers_sampling_with_the_same_seed(unet, tmp_path, guidance):
    from mmalign.toyworld.sampling import load_pipeline, sample

    generate(unet, Redness(), PROMPTS[:2], 1, tmp_path, steps=4, guidance=guidance, resolution=32, seed=7)
    plain = sample(load_pipeline(), PROMPTS[:2], [7, 8], steps=4, guidance=guidance)  # the pipeline's DDIM, η = 0
    for i in range(2):
        ours = np.asarray(Image.open(tmp_path / f"images/{i:05d}_00.png").convert("RGB")).astype(int)
        assert np.abs(ours - plain[i].astype(int)).max() <= 1  # float rounding of a batch of 2 vs 1 at most


@needs_flow
def test_n1_is_plain_flow_sampling_with_the_same_seed(flow, tmp_path):
    from mmalign.toyworld.sampling import sample_flow

    generate(flow, Redness(), PROMPTS[:2], 1, tmp_path, steps=3, guidance=3.0, resolution=32, seed=11)
    plain = sample_flow(flow, PROMPTS[:2], [11, 12], steps=3, guidance=3.0, batch_size=1)
    for i in range(2):
        assert np.array_equal(np.asarray(Image.open(tmp_path / f"images/{i:05d}_00.png").convert("RGB")), plain[i])


# ----------------------------------------------------------------------------------------------- ReNO math


def test_chi_norm_regulariser_is_the_chi_negative_log_density_of_the_norm():
    z = torch.tensor([[[3.0, 4.0]], [[0.0, 2.0]]])  # two latents of d = 2 elements: norms 5 and 2
    expected = torch.tensor([0.5 * 25 - 1 * math.log(5), 0.5 * 4 - 1 * math.log(2)])
    assert torch.allclose(chi_norm_regulariser(z), expected)
    # its minimum is at ‖z‖ = √(d − 1): zero gradient there, and at any direction
    d = 64
    direction = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    at_min = (direction / direction.norm() * math.sqrt(d - 1)).requires_grad_()
    chi_norm_regulariser(at_min).sum().backward()
    assert at_min.grad.abs().max() < 1e-5
    # the χ_d log-density, constants included, differs from −regulariser by a constant
    norms = torch.tensor([2.0, 5.0, 8.0])
    log_chi = (d - 1) * norms.log() - norms**2 / 2 - (d / 2 - 1) * math.log(2) - math.lgamma(d / 2)
    reg = chi_norm_regulariser(norms.view(3, 1) * direction.flatten().div(direction.norm()).view(1, -1))
    assert torch.allclose(-reg - log_chi, (-reg - log_chi)[0].expand(3), atol=1e-4)


def test_noise_objective_and_its_gradient_equal_a_rederivation():
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(2, 3, 2, 2, generator=gen, dtype=torch.float64)
    a = torch.randn(2, 3, 2, 2, generator=gen, dtype=torch.float64)
    weight = 0.3
    zz = z.clone().requires_grad_()
    rewards = (a * zz).flatten(1).sum(1)  # a linear "reward" of the noise
    loss = noise_objective(rewards, zz, weight)
    loss.backward()
    d = 12
    norms = z.flatten(1).norm(dim=1)
    regulariser = 0.5 * norms**2 - (d - 1) * norms.log()
    assert torch.allclose(loss.double(), (-(a * z).flatten(1).sum(1) + weight * regulariser).sum())
    # ∂/∂z [−a·z + w(½‖z‖² − (d − 1)log‖z‖)] = −a + w(z − (d − 1)·z/‖z‖²)
    expected = -a + weight * (z - (d - 1) * z / norms.view(2, 1, 1, 1) ** 2)
    assert torch.allclose(zz.grad, expected, atol=1e-6)


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(3 * 4 * 4, 8, generator=torch.Generator().manual_seed(2)) * 0.3)


class _FakeSampler:
    """A 'generator' whose image is sigmoid(W·z): the optimiser's step is re-derivable by hand."""

    def __init__(self):
        self.generator = type("G", (), {})()
        self.generator.trainable = _Tiny()
        self.device = torch.device("cpu")

    def media(self, z, prompt):
        return torch.sigmoid(z.flatten(1) @ self.generator.trainable.weight.T).view(-1, 3, 4, 4)


@pytest.mark.parametrize("clip", [0.1, 100.0])
def test_optimise_noise_takes_renos_clipped_nesterov_sgd_steps(clip):
    sampler, reward = _FakeSampler(), Redness()
    z0 = torch.randn(1, 8, generator=torch.Generator().manual_seed(3))
    lr, reg = 2.0, 0.05
    result = optimise_noise(sampler, reward, "p", z0, steps=2, lr=lr, reg=reg, clip=clip)
    assert result.forward_chains == 3 and result.backward_chains == 2 and result.images.shape == (3, 3, 4, 4)
    assert torch.equal(result.noises[:1], z0)

    def gradient(z):
        z = z.clone().requires_grad_()
        image = torch.sigmoid(z.flatten(1) @ sampler.generator.trainable.weight.detach().T).view(-1, 3, 4, 4)
        r = reward(image, ["p"])
        loss = -r.sum() + reg * (0.5 * z.norm() ** 2 - (z.numel() - 1) * z.norm().log())
        (g,) = torch.autograd.grad(loss, z)
        if clip < 1:
            assert float(g.norm()) > clip  # the clip acts
        return g * min(1.0, clip / (float(g.norm()) + 1e-6)), float(r.detach())

    g0, r0 = gradient(z0)
    buf = g0
    z1 = z0 - lr * (g0 + 0.9 * buf)  # SGD, momentum 0.9, Nesterov: first step
    g1, r1 = gradient(z1)
    buf = 0.9 * buf + g1
    z2 = z1 - lr * (g1 + 0.9 * buf)
    assert torch.allclose(result.noises[1:2], z1, atol=1e-6) and torch.allclose(result.noises[2:], z2, atol=1e-6)
    assert result.rewards[:2] == pytest.approx([r0, r1], abs=1e-6)
    assert all(p.requires_grad for p in sampler.generator.trainable.parameters())  # weights left as they were
    assert sampler.generator.trainable.weight.grad is None


@needs_pipeline
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_the_gradient_through_the_sampler_chain_is_its_derivative(unet, guidance):
    """The chain the optimisation differentiates is the chain that samples: autograd's directional derivative of
    the reward through the DDIM steps and the VAE equals a central finite difference of the no-grad chain."""
    sampler, reward = NoiseSampler(unet, 3, guidance, 32), Redness()
    z = torch.randn(1, *sampler.latent_shape, generator=torch.Generator().manual_seed(0)).requires_grad_()
    (grad,) = torch.autograd.grad(reward(sampler.media(z, PROMPTS[0]), None).sum(), z)
    direction = torch.randn(z.shape, generator=torch.Generator().manual_seed(1))
    eps = 1e-2
    with torch.no_grad():
        plus = reward(sampler.media(z + eps * direction, PROMPTS[0]), None)
        minus = reward(sampler.media(z - eps * direction, PROMPTS[0]), None)
    numeric = float((plus - minus) / (2 * eps))
    assert float((grad * direction).sum()) == pytest.approx(numeric, rel=0.05, abs=1e-4)


@needs_pipeline
def test_noise_optimisation_writes_its_iterates_and_counts_its_chains(unet, tmp_path):
    reward = Redness()
    generate(unet, reward, PROMPTS[:1], 2, tmp_path / "n2", steps=2, guidance=1.0, resolution=32, noise_opt_steps=2)
    (row,) = rows(tmp_path / "n2")
    assert row["images"][2:] == ["images/00000_opt01.png", "images/00000_opt02.png"] and len(row["scores"]) == 4
    assert row["noise_opt"]["from"] == int(np.argmax(row["scores"][:2]))
    assert row["chosen"] == int(np.argmax(row["scores"]))
    assert len(row["noise_opt"]["objective_rewards"]) == 3  # z_0, z_1, z_2
    assert row["generator_calls"] == {"forward": 2 + 3, "backward": 2, "total": 7, "steps": 2}
    generate(unet, reward, PROMPTS[:1], 1, tmp_path / "n1", steps=2, guidance=1.0, resolution=32, noise_opt_steps=2)
    (row,) = rows(tmp_path / "n1")
    assert row["generator_calls"]["forward"] == 3  # the candidate is the optimisation's first chain


# ------------------------------------------------------------------------------------------------- refusals


def test_noise_optimisation_refuses_a_non_differentiable_reward_before_loading_anything(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("one red circle on the left\n")
    code = main(
        ["generate", "--model", str(tmp_path / "no-such-pipeline"), "--reward", "toyworld-judge", "--prompts",
         str(prompts), "--out", str(tmp_path / "o"), "--noise-opt-steps", "2"]
    )  # fmt: skip
    assert code == 2
    assert "'toyworld-judge' is not differentiable" in capsys.readouterr().err
    from mmalign.toyworld.reward import JudgeReward

    with pytest.raises(ConfigError, match="not differentiable"):
        generate(None, JudgeReward(), ["p"], 2, tmp_path / "o", noise_opt_steps=1)


def test_bad_arguments_are_refused_with_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="--n must be at least 1"):
        generate(None, Redness(), ["p"], 0, tmp_path)
    with pytest.raises(ConfigError, match="parametrisation 'edm'"):
        NoiseSampler(type("Other", (), {"parametrisation": "edm", "modality": "image"})(), 4, 1.0, 32)


@needs_pipeline
def test_the_command_line_contract(tmp_path, capsys):
    """``mmalign generate`` end to end on the toyworld: the learned reward (differentiable) selects and steers."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n")
    out = tmp_path / "out"
    argv = ["generate", "--model", str(ASSETS / "pipeline"), "--reward", "toyworld", "--prompts", str(prompts),
            "--n", "2", "--out", str(out), "--steps", "2", "--guidance", "3", "--resolution", "32",
            "--noise-opt-steps", "1"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert summary == {"out": str(out), "prompts": 2, "images": 6, "forward": 8, "backward": 2}
    assert [r["prompt"] for r in rows(out)] == PROMPTS[:2]
    assert sorted(p.name for p in (out / "best").iterdir()) == ["00000.png", "00001.png"]
    assert len(list((out / "images").iterdir())) == 6
    job = json.loads((out / "generate.json").read_text())
    assert job["reward"] == "toyworld|" and job["opt"] == {"steps": 1, "lr": 5.0, "reg": 0.01, "clip": 0.1}  # ReNO's
    assert main(argv) == 0  # a re-run: nothing left to do
    assert json.loads(capsys.readouterr().err.strip().splitlines()[-1])["forward"] == 0


@needs_pipeline
@pytest.mark.kernels
def test_two_processes_write_what_one_writes(tmp_path):
    """Under ``torchrun`` the prompts are split across processes (``mmalign.sharding``, as ``mmalign label``); each
    candidate's noise depends only on its prompt's index, so the folder is one process's, byte for byte."""
    from tests import processes

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")

    def args(out):
        return ["generate", "--model", str(ASSETS / "pipeline"), "--reward", "toyworld", "--prompts", str(prompts),
                "--num-candidates", "2", "--out", str(out), "--steps", "2", "--resolution", "32"]  # fmt: skip

    assert main(args(tmp_path / "one")) == 0
    processes.run(args(tmp_path / "two"), 2)

    def files(folder):
        return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    one, two = files(tmp_path / "one"), files(tmp_path / "two")
    assert sorted(one) == sorted(two) and "scores.jsonl" in one
    assert [k for k in one if one[k] != two[k]] == []
