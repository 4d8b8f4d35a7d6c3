"""Online trainers on the tiny SD pipeline (32 px, a few DDIM steps): DDIM log-probs against an independent
Gaussian density, pairs sharing x_T, process-count independence of the sampler, DDPO / D3PO training every
parameter, exact resume, reward backprop raising a brightness reward, AlignProp checkpointing saving fewer
activation bytes, and the label -> train round trip."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mmalign.commands.train import resolve_trainer_config
from mmalign.models import sampling
from mmalign.models.policy import DiffusionPolicy
from mmalign.trainers import online
from tests.trainers.conftest import Brightness, make_online

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a red apple\na blue sky\n\na green field\nthe sun\n")
    return path


@pytest.fixture(scope="module")
def policy(sd_folder):
    return DiffusionPolicy.from_pretrained(str(sd_folder))


def make(trainer, model, data, out, *overrides, reward=None):
    return make_online(trainer, model, data, out, *overrides, reward=reward, defaults=("sample_steps=2",))


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
            f"gradient_checkpointing={str(checkpoint).lower()}",
            "sample_steps=3",
            "truncation_mean=25",  # int(25 * 3 / 50) = 1: steps 1 and 2 in the graph
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


def _reference_truncation_pmf(mean: float, std: float, steps: int) -> dict[int, float]:
    """mihirp1998/AlignProp ``sd_pipeline.py``: ``int(N(mean, std))`` redrawn until in [1, steps − 1]. ``int``
    truncates toward zero, so index k >= 1 comes from ``k <= x < k + 1``; the redraws renormalise."""
    cdf = [0.5 * (1 + math.erf((x - mean) / (std * math.sqrt(2)))) for x in range(steps + 1)]
    mass = {k: cdf[k + 1] - cdf[k] for k in range(1, steps)}
    total = sum(mass.values())
    return {k: m / total for k, m in mass.items()}


def test_alignprop_truncation_index_matches_the_reference_distribution():
    gen = torch.Generator().manual_seed(0)
    draws = [sampling.truncation_index(50, gen) for _ in range(20000)]
    assert min(draws) >= 1 and max(draws) <= 49 and all(isinstance(d, int) for d in draws)
    expected = _reference_truncation_pmf(42.0, 5.0, 50)
    observed = {k: draws.count(k) / len(draws) for k in expected}
    assert abs(observed[49] - expected[49]) < 0.006, (observed[49], expected[49])  # 2.7 %, not rounding's 9.6 %
    assert 0.5 * sum(abs(observed[k] - expected[k]) for k in expected) < 0.02  # total variation
    # truncation toward zero, not rounding: N(42.9, tiny) gives 42
    assert sampling.truncation_index(50, torch.Generator().manual_seed(1), 42.9, 1e-6) == 42
    # bounds follow the steps: 10 steps -> [1, 9] (the draw scaled by 10/50)
    small = [sampling.truncation_index(10, gen) for _ in range(2000)]
    assert min(small) >= 1 and max(small) <= 9
    with pytest.raises(ValueError, match="no index"):
        sampling.truncation_index(50, gen, mean=0.5, std=1e-6)  # int(0.5) = 0 is never allowed


def test_alignprop_one_truncation_index_per_batch(sd_folder, prompts_file, tmp_path):
    from mmalign.trainers.loop import _generator

    trainer = make("alignprop", sd_folder, prompts_file, tmp_path / "a", "sample_steps=6", reward=Brightness())
    seen = []
    original = trainer.chain

    def spy(batch, grad_from, checkpoint=False):
        seen.append(grad_from)
        return original(batch, grad_from, checkpoint)

    trainer.chain = spy
    for micro in range(3):
        out = trainer.compute_loss(trainer.make_batch(micro))
        expected = sampling.truncation_index(6, _generator(0, micro, 4), 42.0, 5.0)  # the truncation stream
        assert seen[-1] == expected and isinstance(seen[-1], int)  # one int for both samples of the batch
        assert float(out.metrics["truncation"]) == expected


def test_online_defaults_follow_the_references():
    from mmalign.commands.train import resolve_trainer_config

    for recipe, config_class in [
        ("train/alignprop", online.AlignPropConfig),
        ("train/d3po", online.D3POConfig),
        ("train/ddpo", online.DDPOConfig),
        ("train/refl", online.ReFLConfig),
    ]:
        default = config_class()
        _, loaded = resolve_trainer_config(recipe, [])
        assert loaded.adam_weight_decay == default.adam_weight_decay, recipe
        assert (loaded.guidance, loaded.eta, loaded.lr) == (default.guidance, default.eta, default.lr), recipe
        assert loaded.lora_rank == default.lora_rank, recipe
    # AlignProp at b22918a: CFG 5.0 with eta 1, lr 1e-3, weight decay 1e-4; D3PO and DDPO weight decay 1e-4
    align = online.AlignPropConfig()
    assert (align.guidance, align.eta, align.lr, align.adam_weight_decay) == (5.0, 1.0, 1e-3, 1e-4)
    assert online.D3POConfig().adam_weight_decay == 1e-4 and online.DDPOConfig().adam_weight_decay == 1e-4
    # ReFL: ImageReward's script, full fine-tuning with EMA at lr 1e-5
    refl = online.ReFLConfig()
    assert (refl.lora_rank, refl.ema_decay, refl.lr, refl.batch_size, refl.grad_accum) == (0, 0.9999, 1e-5, 2, 4)
    assert refl.gradient_checkpointing is True and refl.reference_mode == "copy"
    # the gradient_checkpointing choice; checkpoint_unet is its former name
    assert online.OnlineConfig().gradient_checkpointing == "auto"
    assert online.OnlineConfig(checkpoint_unet=False).gradient_checkpointing is False
    with pytest.raises(ValueError, match="timestep_fraction"):
        online.DDPOConfig(sample_steps=4, timestep_fraction=0.2)  # int(0.8) = 0 steps


def test_gradient_checkpointing_auto_picks_by_free_memory(monkeypatch):
    from mmalign.trainers import loop

    model = torch.nn.Linear(256, 256)  # ~257 kB of parameters
    weights = sum(p.numel() * 4 for p in model.parameters())
    device = torch.device("cpu")
    assert loop.resolve_gradient_checkpointing(True, model, device) is True
    assert loop.resolve_gradient_checkpointing(False, model, device) is False
    monkeypatch.setattr(loop, "free_device_memory", lambda d: 3 * weights)
    assert loop.resolve_gradient_checkpointing("auto", model, device, graph_calls=1.0) is True  # needs 5x
    monkeypatch.setattr(loop, "free_device_memory", lambda d: 100 * weights)
    assert loop.resolve_gradient_checkpointing("auto", model, device, graph_calls=1.0) is False
    assert loop.resolve_gradient_checkpointing("auto", model, device, graph_calls=200.0) is True
    monkeypatch.setattr(loop, "free_device_memory", lambda d: None)
    assert loop.resolve_gradient_checkpointing("auto", model, device) is False
    assert loop.free_device_memory.__name__  # the real one reads /proc/meminfo on the CPU


def test_ddpo_timestep_fraction_trains_a_subset_per_sample(sd_folder, prompts_file, tmp_path):
    """ddpo-pytorch ``scripts/train.py``: an independent permutation of the steps per sample, its first
    ``int(num_steps · timestep_fraction)`` trained, the PPO loss a batch mean per position k averaged over k."""
    from mmalign.trainers.loop import _generator

    steps = 5  # timestep_fraction 0.7: int(3.5) = 3 steps (round would give 4)
    trainer = make(
        "ddpo",
        sd_folder,
        prompts_file,
        tmp_path / "d",
        "reward=jpeg-compressibility",
        f"sample_steps={steps}",
        "timestep_fraction=0.7",
        "clip_range=10",
        "gradient_checkpointing=false",
    )
    batch = trainer.make_batch(0)
    chosen = trainer.train_steps(batch)
    assert chosen.shape == (2, int(steps * 0.7)) == (2, 3)
    gen = _generator(0, 0, 6)  # independent re-derivation: one permutation per global sample, in order
    perms = [torch.randperm(steps, generator=gen) for _ in range(2)]
    assert torch.equal(chosen, torch.stack(perms)[:, :3])
    # a second process of a two-process run (global batch 2, its slice 1..2) gets the second sample's steps
    assert torch.equal(trainer.train_steps({**batch, "slice": (1, 2)}), chosen[1:])
    # over micro-batches the two samples' subsets differ (independent), never sharing one list for the batch
    subsets = [trainer.train_steps({**batch, "micro_index": m}) for m in range(8)]
    assert any(set(s[0].tolist()) != set(s[1].tolist()) for s in subsets)
    # the loss: move the weights off the sampling policy so that each step's ratio differs, then re-derive
    with torch.no_grad():
        for p in trainer.trainable:
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    got = trainer.compute_loss(batch).loss
    traj, adv = batch["trajectory"], batch["advantages"].clamp(-5, 5)
    per_sample = []
    with torch.no_grad():
        for b in range(2):
            one = traj.select(slice(b, b + 1))
            terms = []
            for j in chosen[b].tolist():
                logp = sampling.step_log_prob(trainer.policy, trainer.predict, one, j)
                ratio = torch.exp(logp - traj.log_probs[b, j])
                terms.append(torch.maximum(-adv[b] * ratio, -adv[b] * ratio.clamp(1 - 10, 1 + 10)))
            per_sample.append(torch.stack(terms).mean())
    expected = torch.stack(per_sample).mean()
    torch.testing.assert_close(got.detach(), expected, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(expected, -adv.mean(), atol=1e-6)  # the ratios moved: the test can see steps


def test_sdxl_guidance_uses_zero_unconditional_embeddings(sdxl_folder, sd_folder, prompts_file, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(sdxl_folder))
    assert pipe.config.force_zeros_for_empty_prompt  # the fixture's config, as saved by diffusers
    _, neg, _, neg_pooled = pipe.encode_prompt("a red apple", device="cpu", do_classifier_free_guidance=True)
    assert not neg.any() and not neg_pooled.any()  # diffusers: zeros for both
    trainer = make("d3po", sdxl_folder, prompts_file, tmp_path / "xl", "guidance=5", reward=Brightness())
    batch = online.OnlineTrainer.make_batch(trainer, 0)
    uncond, embeds = batch["uncond"], batch["embeds"]
    assert uncond.hidden.shape == embeds.hidden.shape and uncond.pooled.shape == embeds.pooled.shape
    assert not uncond.hidden.any() and not uncond.pooled.any()
    assert neg.shape[1:] == uncond.hidden.shape[1:] and neg_pooled.shape[1:] == uncond.pooled.shape[1:]
    sd = DiffusionPolicy.from_pretrained(str(sd_folder))  # SD 1.x: the empty prompt is encoded
    assert not sd.force_zeros_for_empty_prompt
    assert sd.unconditional(sd.encode_prompt([""])).hidden.abs().sum() > 0


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
@pytest.mark.kernels
def test_two_processes_equal_one_with_the_same_global_batch(name, sd_folder, prompts_file, tmp_path):
    """The gradient norms and SGD updates agree to the measured tolerances of tests/trainers/distributed.py."""
    from tests.trainers import distributed

    args = [f"trainer={name}", f"model={sd_folder}", f"data={prompts_file}", "resolution=32", "tracker=none"]
    args += ["progress=false", "max_steps=2", "lr=1e-3", "optimizer=sgd", "sample_steps=2", "log_every=1"]
    args += ["reward=jpeg-compressibility", "d3po_clip=0.5" if name == "d3po" else "sample_batches=2"]
    runs = distributed.train_one_and_two(args, tmp_path)
    init = distributed.initial_lora(
        make(name, sd_folder, prompts_file, tmp_path / "init", "reward=jpeg-compressibility")
    )
    distributed.assert_two_processes_equal_one(runs, init)
