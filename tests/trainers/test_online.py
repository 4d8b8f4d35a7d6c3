"""Online trainers on the tiny SD pipeline (32 px, a few DDIM steps): DDIM log-probs against an independent
Gaussian density, pairs sharing x_T, process-count independence of the sampler, DDPO / D3PO training every
parameter, exact resume, reward backprop raising a brightness reward, AlignProp checkpointing saving fewer
activation bytes, and the label -> train round trip."""

from __future__ import annotations

import json

import pytest
import torch

from mmalign.commands.train import resolve_trainer_config
from mmalign.modalities.image import pil_to_tensor
from mmalign.models import sampling
from mmalign.models.policy import DiffusionPolicy
from mmalign.rewards.base import Reward
from mmalign.trainers import online


class Brightness(Reward):
    """Mean pixel value: a tiny differentiable reward."""

    name = "brightness"
    uses_prompt = False

    def preprocess_reference(self, image):
        return pil_to_tensor(image)

    def preprocess_tensor(self, images):
        return images

    def score_pixels(self, pixels, prompts):
        return pixels.float().mean(dim=(1, 2, 3))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: the tiny models are faster so, and far faster on a shared, loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a red apple\na blue sky\n\na green field\nthe sun\n")
    return path


@pytest.fixture(scope="module")
def policy(sd_folder):
    return DiffusionPolicy.from_pretrained(str(sd_folder))


def make(trainer, model, data, out, *overrides, reward=None):
    base = [
        f"trainer={trainer}",
        f"model={model}",
        f"data={data}",
        f"output_dir={out}",
        "resolution=32",
        "batch_size=2",
        "tracker=none",
        "progress=false",
        "log_every=1",
        "max_steps=2",
        "sample_steps=2",
        "lora_rank=4",
    ]
    cls, config = resolve_trainer_config(None, base + list(overrides))
    return cls(config, reward=reward)


def trainable(trainer):
    return {k: v.clone() for k, v in trainer._trainable_state().items()}


def _predict(policy):
    return lambda noisy, t, embeds, time_ids: policy.predict(policy.unet, noisy, t, embeds, time_ids)


# ----------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------
def test_sampled_step_log_prob_equals_independent_gaussian_density(policy):
    from diffusers import DDIMScheduler

    torch.manual_seed(0)
    embeds, uncond = policy.encode_prompt(["a cat", "a dog"]), policy.encode_prompt(["", ""])
    steps, guidance, eta = 3, 4.0, 1.0
    traj = sampling.sample_trajectories(
        policy, _predict(policy), embeds, uncond, torch.Generator().manual_seed(1), steps, guidance, eta, 32
    )
    assert traj.latents.shape == (2, steps + 1, 4, 16, 16) and traj.log_probs.shape == (2, steps)
    scheduler = DDIMScheduler.from_config({**policy.noise_scheduler.config, "set_alpha_to_one": False})
    scheduler.set_timesteps(steps)
    alphas = scheduler.alphas_cumprod.double()
    for j, t in enumerate(scheduler.timesteps):
        prev_t = int(t) - 1000 // steps
        a_t = alphas[int(t)]
        a_prev = alphas[prev_t] if prev_t >= 0 else alphas[0]  # set_alpha_to_one=False: final = alphas[0]
        x_t, x_prev = traj.latents[:, j].double(), traj.latents[:, j + 1].double()
        with torch.no_grad():
            e_u = policy.unet(x_t.float(), t, encoder_hidden_states=uncond.hidden).sample.double()
            e_c = policy.unet(x_t.float(), t, encoder_hidden_states=embeds.hidden).sample.double()
        eps = e_u + guidance * (e_c - e_u)
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()  # DDIM eq. 16
        x0 = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        mu = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).sqrt() * eps  # DDIM eq. 12
        expected = torch.distributions.Normal(mu, sigma).log_prob(x_prev).mean(dim=(1, 2, 3))
        torch.testing.assert_close(traj.log_probs[:, j].double(), expected, rtol=1e-4, atol=1e-4)
        again = sampling.step_log_prob(policy, _predict(policy), traj, j)
        torch.testing.assert_close(again, traj.log_probs[:, j], rtol=1e-5, atol=1e-5)


def test_v_prediction_step_matches_diffusers_ddim():
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="v_prediction",
        clip_sample=False,
    )
    scheduler.set_timesteps(10)
    schedule = sampling.ddim_schedule(scheduler, 10)
    g = torch.Generator().manual_seed(0)
    x_t, v = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    j, t = 3, scheduler.timesteps[3]
    eps = sampling.model_output_to_eps(v, x_t, schedule.alpha_bar[j], "v_prediction")
    mean, _ = sampling.ddim_mean_std(x_t, eps, schedule.alpha_bar[j], schedule.alpha_bar_prev[j], eta=0.0)
    expected = scheduler.step(v, t, x_t, eta=0.0).prev_sample
    torch.testing.assert_close(mean, expected, rtol=1e-4, atol=1e-5)


def test_pairs_share_x_T_and_sampling_is_independent_of_the_process_split(policy):
    embeds, uncond = policy.encode_prompt(["a", "b"]), policy.encode_prompt(["", ""])
    args = dict(steps=2, guidance=3.0, eta=1.0, resolution=32)
    pair = sampling.sample_trajectories(
        policy, _predict(policy), embeds, uncond, torch.Generator().manual_seed(3), pairs=True, **args
    )
    assert pair.latents.shape[0] == 4
    assert torch.equal(pair.latents[:2, 0], pair.latents[2:, 0])
    assert not torch.allclose(pair.latents[:2, -1], pair.latents[2:, -1])
    full = sampling.sample_trajectories(
        policy, _predict(policy), embeds, uncond, torch.Generator().manual_seed(3), **args
    )
    second = sampling.sample_trajectories(
        policy,
        _predict(policy),
        embeds.select(slice(1, 2)),
        uncond.select(slice(1, 2)),
        torch.Generator().manual_seed(3),
        global_batch=2,
        offset=1,
        **args,
    )
    torch.testing.assert_close(second.latents[0], full.latents[1], rtol=1e-4, atol=1e-5)


def test_reward_spec_pareto_and_stat_tracker():
    assert online.parse_reward_spec("hpsv2.1:1.0,aesthetic:0.5") == [("hpsv2.1", 1.0), ("aesthetic", 0.5)]
    assert online.parse_reward_spec("jpeg-compressibility") == [("jpeg-compressibility", 1.0)]
    a = torch.tensor([[1.0, 2.0], [1.0, 1.0], [0.0, 3.0]])
    b = torch.tensor([[0.0, 2.0], [2.0, 1.0], [1.0, 1.0]])
    a_wins, tie = online.pareto_preference(a, b)
    assert a_wins.tolist() == [True, False, False] and tie.tolist() == [False, False, True]
    tracker = online.PerPromptStatTracker(buffer_size=4, min_count=2)
    adv = tracker.update(["x", "y"], torch.tensor([1.0, 3.0]))  # too few: normalised over the batch
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0]), rtol=1e-5, atol=1e-5)
    adv = tracker.update(["x"], torch.tensor([3.0]))  # x has [1, 3]: mean 2, std 1
    torch.testing.assert_close(adv, torch.tensor([1.0]), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# DDPO and D3PO
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ddpo", "d3po"])
def test_policy_gradient_trainers_change_every_parameter(name, sd_folder, prompts_file, tmp_path):
    reward = None if name == "ddpo" else Brightness()
    extra = ["reward=jpeg-compressibility"] if name == "ddpo" else ["d3po_clip=0.5"]
    trainer = make(name, sd_folder, prompts_file, tmp_path / name, "lr=1e-2", *extra, reward=reward)
    before = trainable(trainer)
    summary = trainer.train()
    after = trainable(trainer)
    assert not [k for k in before if torch.equal(before[k], after[k])]
    assert all(torch.isfinite(v).all() for v in after.values())
    assert summary["steps"] == 2 and summary["skipped_steps"] == 0
    assert "reward" in summary["history"][-1]
    if name == "ddpo":  # two optimizer steps per sampling round: the second is off-policy, the ratio moved
        assert summary["history"][0]["approx_kl"] == 0.0 and summary["history"][1]["approx_kl"] > 0.0
    assert (tmp_path / name / "pytorch_lora_weights.safetensors").is_file()


def test_ddpo_resume_equals_uninterrupted_with_the_stat_tracker(sd_folder, prompts_file, tmp_path, monkeypatch):
    common = ["reward=jpeg-compressibility", "max_steps=3", "checkpoint_every=2", "stat_min_count=2", "lr=1e-2"]
    full = make("ddpo", sd_folder, prompts_file, tmp_path / "a", *common)
    full.train()
    interrupted = make("ddpo", sd_folder, prompts_file, tmp_path / "b", *common)
    original, calls = interrupted._train_step, {"n": 0}

    def crash_on_third():
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original()

    monkeypatch.setattr(interrupted, "_train_step", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    checkpoint = tmp_path / "b" / "checkpoints" / "step-0000002"
    assert json.loads((checkpoint / "stat_tracker.json").read_text())
    resumed = make("ddpo", sd_folder, prompts_file, tmp_path / "b", *common, "resume=latest")
    resumed.train()
    assert resumed.tracker.state_dict() == full.tracker.state_dict()
    expected, got = trainable(full), trainable(resumed)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


# ----------------------------------------------------------------------------------------------------------
# Reward backprop
# ----------------------------------------------------------------------------------------------------------
def test_configuration_errors(sd_folder, prompts_file, tmp_path):
    from mmalign.errors import ConfigError

    with pytest.raises(ConfigError, match="backpropagates through the reward"):
        make("refl", sd_folder, prompts_file, tmp_path / "r", "reward=jpeg-compressibility")
    with pytest.raises(ConfigError, match="cannot precompute the reference"):
        make("d3po", sd_folder, prompts_file, tmp_path / "p", "lora_rank=0", "reference=precomputed")
    with pytest.raises(ConfigError, match="multiple of sample_batches"):
        make("ddpo", sd_folder, prompts_file, tmp_path / "d", "checkpoint_every=3", "sample_batches=2")


@pytest.mark.parametrize(
    "name,extra",
    [
        ("refl", ["sample_steps=4", "refl_min_step=2", "refl_max_step=3", "refl_scale=1.0", "refl_target=5"]),
        ("draft", ["draft_mode=k", "draft_k=2", "loss_scale=1.0"]),
        ("draft", ["draft_mode=lv", "loss_scale=1.0"]),
        ("alignprop", ["loss_target=none", "loss_scale=1.0", "truncation_mean=42"]),
    ],
)
def test_reward_backprop_raises_brightness(name, extra, sd_folder, prompts_file, tmp_path):
    trainer = make(
        name, sd_folder, prompts_file, tmp_path / name, "lr=3e-2", "max_steps=4", *extra, reward=Brightness()
    )

    def mean_reward():
        with torch.no_grad():
            return sum(float(trainer.compute_loss(trainer.make_batch(i)).reward) for i in range(2)) / 2

    before = mean_reward()
    trainer.train()
    after = mean_reward()
    assert after > before + 1e-4, (before, after)


def test_alignprop_checkpointing_saves_fewer_activation_bytes(sd_folder, prompts_file, tmp_path):
    def saved_bytes(checkpoint: bool) -> int:
        trainer = make(
            "alignprop",
            sd_folder,
            prompts_file,
            tmp_path / str(checkpoint),
            f"checkpoint_unet={str(checkpoint).lower()}",
            "truncation_mean=0",
            "truncation_std=0.01",
            reward=Brightness(),
        )
        batch = trainer.make_batch(0)
        total = {"bytes": 0}

        def pack(tensor):
            total["bytes"] += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = trainer.compute_loss(batch)
        out.loss.backward()
        return total["bytes"]

    with_ckpt, without = saved_bytes(True), saved_bytes(False)
    assert with_ckpt < 0.5 * without, (with_ckpt, without)


# ----------------------------------------------------------------------------------------------------------
# Labelling
# ----------------------------------------------------------------------------------------------------------
def test_label_then_train_round_trip(sd_folder, prompts_file, tmp_path):
    from mmalign.cli import main

    out = tmp_path / "labels"
    argv = ["label", "--model", str(sd_folder), "--reward", "jpeg-compressibility", "--prompts", str(prompts_file)]
    argv += ["--k", "3", "--out", str(out), "--steps", "2", "--resolution", "32"]
    assert main(argv) == 0
    rankings = [json.loads(line) for line in (out / "rankings.jsonl").read_text().splitlines()]
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(rankings) == 4 and all(len(r["images"]) == 3 for r in rankings)
    assert pairs and all(p["score_chosen"] > p["score_rejected"] for p in pairs)
    assert set(pairs[0]) == {"prompt", "chosen", "rejected", "score_chosen", "score_rejected"}
    cls, config = resolve_trainer_config(
        None,
        [
            f"model={sd_folder}",
            f"data={out / 'pairs.jsonl'}",
            f"output_dir={tmp_path / 'dpo'}",
            "resolution=32",
            "tracker=none",
            "progress=false",
            "max_steps=1",
            "lora_rank=4",
        ],
    )
    summary = cls(config).train()
    assert summary["steps"] == 1 and summary["pairs"] == len(pairs)


@pytest.mark.slow  # three extra Python processes (~50 s on a loaded 2-core machine); MMALIGN_SLOW=1 runs it
@pytest.mark.parametrize("name", ["d3po", "ddpo"])
def test_two_processes_equal_one_with_the_same_global_batch(name, sd_folder, prompts_file, tmp_path):
    """The gradient norms and SGD updates agree to the measured tolerances of tests/trainers/distributed.py."""
    from tests.trainers import distributed

    args = [f"trainer={name}", f"model={sd_folder}", f"data={prompts_file}", "resolution=32", "tracker=none"]
    args += ["progress=false", "max_steps=2", "lr=1e-3", "optimizer=sgd", "sample_steps=2", "log_every=1"]
    args += ["reward=jpeg-compressibility", "d3po_clip=0.5" if name == "d3po" else "sample_batches=2"]
    runs = distributed.train_one_and_two(args, tmp_path, port=29533 + (name == "ddpo"))
    init = distributed.initial_lora(
        make(name, sd_folder, prompts_file, tmp_path / "init", "reward=jpeg-compressibility")
    )
    distributed.assert_two_processes_equal_one(runs, init)
