"""Flow-matching trainers on the tiny SD3 pipeline (32 px, 3 sampling steps): every trainable parameter changes,
the first step of a round is on-policy, windows and shared noise as configured, per-reward advantages, held-out
evaluation with its early stop, DiffusionNFT's old policy, trainer/model combinations refused when the config is
read, Flow-DPO, and the LoRA that training writes loading into diffusers' StableDiffusion3Pipeline."""

from __future__ import annotations

import json

import pytest
import torch

from mmalign.errors import ConfigError
from mmalign.trainers import losses
from tests.trainers.conftest import Brightness, make_flow

FLOW = ["flow-grpo", "flow-grpo-fast", "dance-grpo", "mix-grpo", "diffusionnft"]
#: the last SD3 block is ``context_pre_only``: its context-stream query feeds attention outputs that are thrown
#: away, so its LoRA gets no gradient (flow_grpo targets it all the same)
DEAD = {"transformer_blocks.1.attn.add_q_proj.lora_B.default.weight"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a red apple\na blue sky\na green field\n")
    return path


def assert_lora_reproduces_the_trained_model(trainer, pipe) -> None:
    """The pipeline's transformer, with the LoRA the trainer wrote loaded into it, predicts what the trained model
    predicts (at one noisy latent, t = 700, on "a red apple")."""
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    conditions = trainer._embeds(["a red apple"])
    x = torch.randn((1, *trainer.latent_shape), generator=torch.Generator().manual_seed(3))
    t = torch.tensor([700.0])
    with torch.no_grad():
        trained = trainer.policy.predict(model, x, t, conditions)
        loaded = trainer.policy.predict(pipe.transformer, x, t, conditions)
    torch.testing.assert_close(loaded, trained, rtol=1e-5, atol=1e-5)


EXTRA = {
    "flow-grpo": ["beta=0.04", "guidance=2.0"],
    "flow-grpo-fast": ["window_range=[0,3]", "window_size=1"],
    "dance-grpo": [],
    "mix-grpo": ["sample_steps=4", "window_size=1", "window_shift_interval=1"],
    "diffusionnft": [],
}


@pytest.mark.parametrize("name", FLOW)
def test_every_trainable_parameter_changes(name, sd3_folder, prompts, tmp_path):
    trainer = make_flow(name, sd3_folder, prompts, tmp_path, *EXTRA[name])
    before = {k: v.clone() for k, v in trainer._trainable_state().items()}
    summary = trainer.train()
    after = trainer._trainable_state()
    unchanged = sorted(k for k in before if torch.equal(before[k], after[k]))
    assert set(unchanged) <= DEAD, unchanged
    assert summary["steps"] == 2 and summary["skipped_steps"] == 0
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in summary["history"])
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()


def test_first_step_of_a_round_is_on_policy_and_the_second_is_not(sd3_folder, prompts, tmp_path):
    """Sampling and the recomputed log-probs agree at the round's first optimizer step (ratio 1: approx_kl and
    clipfrac 0), then the clip acts on the round's second step, taken after an update."""
    trainer = make_flow(
        "flow-grpo", sd3_folder, prompts, tmp_path, "guidance=2.0", "sample_batches=2", "clip_range=1e-6"
    )
    first, second = trainer.train()["history"]
    assert first["approx_kl"] < 1e-10 and first["clipfrac"] == 0.0
    assert second["approx_kl"] > first["approx_kl"] and second["clipfrac"] > 0.0


def test_round_first_step_reuses_the_rollouts_unconditional_branch(sd3_folder, prompts, tmp_path):
    """With CFG, the detached unconditional branch of the round's first optimizer step comes from the rollout
    (the weights have not changed since sampling): no unconditional call at all, and the same losses and update
    as recomputing it; the round's second step, after an update, recomputes it."""
    runs = {}
    for reuse in (True, False):
        trainer = make_flow(
            "flow-grpo", sd3_folder, prompts, tmp_path / str(reuse), "guidance=2.0", "sample_batches=2",
            f"reuse_uncond={str(reuse).lower()}",
        )  # fmt: skip
        calls: list[tuple[int, bool, int]] = []
        predict = trainer.policy.predict

        def counting(model, x, t, conditions, predict=predict, calls=calls, trainer=trainer):
            calls.append((trainer.step, torch.is_grad_enabled(), len(x)))
            return predict(model, x, t, conditions)

        trainer.policy.predict = counting
        before = {k: v.clone() for k, v in trainer._trainable_state().items()}
        history = trainer.train()["history"]
        runs[reuse] = (history, calls, trainer._trainable_state())
    rows = 2  # batch_size
    for reuse, (_, calls, _) in runs.items():
        uncond_calls = [step for step, grad, n in calls if not grad and n == rows]  # sampling calls have 2·rows
        cond_calls = [step for step, grad, n in calls if grad]
        assert cond_calls.count(0) == cond_calls.count(1) == 2  # int(3 · 0.99) trained steps
        assert uncond_calls == ([1, 1] if reuse else [0, 0, 1, 1])
    (reused, _, after_reuse), (recomputed, _, after_recompute) = runs[True], runs[False]
    for a, b in zip(reused, recomputed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-7)  # ≈ 0 at a ratio of 1
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    # Adam turns rounding-level gradient differences of near-zero elements into visible ones: compare the updates
    # as a whole (they are of size lr = 1e-2 per element)
    gap = torch.cat([(after_reuse[k] - after_recompute[k]).flatten() for k in after_reuse]).norm()
    update = torch.cat([(after_recompute[k] - before[k]).flatten() for k in before]).norm()
    assert gap < 1e-3 * update, (float(gap), float(update))


def test_kl_term_is_zero_at_the_start_and_grows(sd3_folder, prompts, tmp_path):
    trainer = make_flow("flow-grpo", sd3_folder, prompts, tmp_path, "beta=0.04", "max_steps=3", "sample_batches=1")
    history = trainer.train()["history"]
    # LoRA B starts at zero: the trained model is the reference (up to the rounding of its unconditional branch,
    # taken from the rollout's batched call, where the reference computes it apart)
    assert history[0]["kl_loss"] < 1e-10
    assert history[-1]["kl_loss"] > 0.0


def test_group_rows_share_a_prompt_and_dance_shares_their_initial_noise(sd3_folder, prompts, tmp_path):
    trainer = make_flow("dance-grpo", sd3_folder, prompts, tmp_path, "batch_size=4", "sample_batches=1")
    batch = trainer.make_batch(0)
    assert batch["prompts"][0] == batch["prompts"][1] and batch["prompts"][2] == batch["prompts"][3]
    x_T = batch["trajectory"].latents[:, 0]
    assert torch.equal(x_T[0], x_T[1]) and torch.equal(x_T[2], x_T[3]) and not torch.equal(x_T[0], x_T[2])
    steps = trainer.train_steps(batch)
    assert steps.shape == (4, int(3 * 0.6)) and len({tuple(row.tolist()) for row in steps}) > 1
    flow = make_flow("flow-grpo", sd3_folder, prompts, tmp_path / "grpo", "batch_size=4", "sample_batches=1")
    x_T = flow.make_batch(0)["trajectory"].latents[:, 0]
    assert not torch.equal(x_T[0], x_T[1])  # Flow-GRPO: independent initial noise


def test_windows_fast_and_mixgrpo(sd3_folder, prompts, tmp_path):
    fast = make_flow("flow-grpo-fast", sd3_folder, prompts, tmp_path, "sample_steps=6", "window_range=[0,5]")
    windows = {tuple(fast.make_batch(m)["trajectory"].sde_steps) for m in range(8)}
    assert all(len(w) == 2 and w[1] == w[0] + 1 for w in windows) and len(windows) > 1
    assert fast.train_steps(fast.make_batch(0)).shape == (2, 2)  # every window step trains
    mix = make_flow(
        "mix-grpo", sd3_folder, prompts, tmp_path / "mix", "sample_steps=5", "window_size=2", "window_shift_interval=2"
    )
    # the window moves by one step every two optimizer steps (one round of sample_batches=2)
    starts = [mix.make_batch(round_index * 2)["trajectory"].sde_steps for round_index in range(3)]
    assert starts == [[0, 1], [1, 2], [2]]


def test_per_reward_advantages_normalise_each_reward_before_the_weighted_sum(sd3_folder, prompts, tmp_path):
    from mmalign.trainers.online import WeightedReward

    reward = WeightedReward([Brightness(), Brightness()], [1.0, 0.5])
    trainer = make_flow("flow-grpo", sd3_folder, prompts, tmp_path, reward=reward)
    components = torch.tensor([[1.0, 100.0], [3.0, 100.0], [0.0, -50.0], [2.0, 250.0]])
    groups = ["a", "a", "b", "b"]
    expected = losses.group_advantages(components[:, 0], groups) + 0.5 * losses.group_advantages(
        components[:, 1], groups
    )
    torch.testing.assert_close(trainer.advantages(components, groups), expected)
    trainer.config.advantage = "sum"
    summed = losses.group_advantages(components[:, 0] + 0.5 * components[:, 1], groups)
    torch.testing.assert_close(trainer.advantages(components, groups), summed)
    # a reward with a large spread drowns one with a small spread in the sum, not per reward: here they disagree
    # and weigh the same, so per reward the two samples tie while the sum follows the large one
    trainer.reward.weights = [1.0, 1.0]
    opposed = torch.tensor([[0.0, 100.0], [1.0, 90.0]])
    assert trainer.advantages(opposed, ["a", "a"])[0] > 0.99
    trainer.config.advantage = "per_reward"
    assert trainer.advantages(opposed, ["a", "a"]).abs().max() < 1e-3
    metrics = trainer.reward_metrics(trainer.make_batch(0))
    assert {"reward", "reward/brightness0", "reward/brightness1"} <= set(metrics)


class Falling(Brightness):
    """A held-out "judge" whose score falls with every evaluation (a reward-hacking stand-in)."""

    name = "falling"

    def __init__(self):
        super().__init__()
        self.calls = 0

    def score_pixels(self, pixels, prompts):
        self.calls += 1
        return torch.full((pixels.shape[0],), -float(self.calls))


def test_held_out_evaluation_is_logged_and_stops_training_when_it_falls(sd3_folder, prompts, tmp_path):
    from mmalign.trainers.online import WeightedReward

    held_out = tmp_path / "held_out.txt"
    held_out.write_text("a yellow star\n")
    trainer = make_flow(
        "flow-grpo",
        sd3_folder,
        prompts,
        tmp_path / "run",
        f"eval_prompts={held_out}",
        "eval_every=1",
        "eval_stop_drop=1.5",
        "max_steps=6",
    )
    trainer._eval_reward = WeightedReward([Falling()], [1.0])
    summary = trainer.train()
    assert summary["steps"] == 3 and "held-out reward" in summary["stop_reason"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    evals = [row["eval/reward"] for row in rows if "eval/reward" in row]
    assert evals == [-1.0, -2.0, -3.0]
    assert all("eval/train_reward" in row for row in rows if "eval/reward" in row)
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()  # stopped, and saved


def test_diffusionnft_old_policy_moves_toward_the_trained_weights(sd3_folder, prompts, tmp_path):
    trainer = make_flow("diffusionnft", sd3_folder, prompts, tmp_path, "sample_batches=1", "max_steps=3")
    initial = [p.clone() for p in trainer.old_params]
    trainer.train()
    assert trainer._old_round == 2  # rounds 1 and 2 started after an update each
    # old_2 = d2·(d1·old_0 + (1 − d1)·θ1) + (1 − d2)·θ2 with d1 = 0.001, d2 = 0.002: not the initial weights,
    # and (decays are small) close to the trained ones
    assert any(not torch.equal(a, b) for a, b in zip(initial, trainer.old_params))
    for old, current in zip(trainer.old_params, trainer.trainable):
        assert (old - current.detach()).abs().max() <= (current.detach() - old).abs().max()


def test_nft_optimality_is_one_half_for_equal_rewards(sd3_folder, prompts, tmp_path):
    trainer = make_flow("diffusionnft", sd3_folder, prompts, tmp_path)
    r = trainer.advantages(torch.tensor([[1.0], [1.0], [0.0], [2.0]]), ["a", "a", "b", "b"])
    assert r[0] == r[1] == 0.5 and r[2] < 0.5 < r[3] and ((r >= 0) & (r <= 1)).all()


# ----------------------------------------------------------------------------------------------------------
# Which trainer applies to which generator: refused when the config is read
# ----------------------------------------------------------------------------------------------------------
def test_flow_trainer_on_a_unet_model_is_refused(sd_folder, prompts, tmp_path):
    with pytest.raises(ConfigError, match="flow-grpo does not apply.*DDPM-schedule UNet.*needs a flow-matching"):
        make_flow("flow-grpo", sd_folder, prompts, tmp_path)


def test_ddim_trainer_on_a_flow_model_is_refused(sd3_folder, prompts, tmp_path):
    from tests.trainers.test_online import make

    with pytest.raises(ConfigError, match="ddpo does not apply.*flow-matching transformer"):
        make("ddpo", sd3_folder, prompts, tmp_path, reward=Brightness())


def test_smpo_renoise_is_refused_on_flow_models_but_dpo_trains(sd3_folder, pairs_file, tmp_path):
    from tests.trainers.test_training import make_trainer

    with pytest.raises(ConfigError, match="ReNoise inverts with DDIM"):
        make_trainer(sd3_folder, pairs_file, tmp_path / "smpo", "trainer=smpo", "resolution=32")
    # Flow-DPO: Diffusion-DPO on the velocity errors, every parameter trained
    trainer = make_trainer(
        sd3_folder, pairs_file, tmp_path / "dpo", "trainer=dpo", "resolution=32", "lr=1e-2", "beta=100"
    )
    before = {k: v.clone() for k, v in trainer._trainable_state().items()}
    trainer.train()
    unchanged = {k for k, v in trainer._trainable_state().items() if torch.equal(before[k], v)}
    assert unchanged <= DEAD, unchanged


# ----------------------------------------------------------------------------------------------------------
# The LoRA written by training loads into diffusers' pipeline
# ----------------------------------------------------------------------------------------------------------
def test_trained_lora_loads_into_the_diffusers_pipeline(sd3_folder, prompts, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    trainer = make_flow("flow-grpo", sd3_folder, prompts, tmp_path, "lora_alpha=16")
    trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    pipe = StableDiffusion3Pipeline.from_pretrained(str(sd3_folder))
    pipe.load_lora_weights(str(tmp_path))
    conditions = trainer._embeds(["a red apple"])
    x = torch.randn((1, *trainer.latent_shape), generator=torch.Generator().manual_seed(3))
    t = torch.tensor([700.0])
    with torch.no_grad():
        trained = trainer.policy.predict(model, x, t, conditions)
        loaded = trainer.policy.predict(pipe.transformer, x, t, conditions)
        with torch.no_grad():
            pipe.transformer.disable_lora()
            base = trainer.policy.predict(pipe.transformer, x, t, conditions)
    torch.testing.assert_close(loaded, trained, rtol=1e-5, atol=1e-6)
    assert (loaded - base).abs().max() > 1e-4  # the LoRA (alpha 16, rank 4: scale 4) is not a no-op


# ----------------------------------------------------------------------------------------------------------
# Two processes equal one on the same global batch
# ----------------------------------------------------------------------------------------------------------
TWO_PROCESSES = {
    "flow-grpo": ["beta=0.04", "guidance=2.0"],
    "diffusionnft": ["sample_batches=1", "max_steps=3"],
}


@pytest.mark.kernels
@pytest.mark.parametrize("name", ["flow-grpo", pytest.param("diffusionnft", marks=pytest.mark.slow)])
def test_two_processes_equal_one_with_the_same_global_batch(name, sd3_folder, prompts, tmp_path):
    """Groups spread over processes (one sample of each prompt's group per process), rewards gathered for the
    advantages, gradients all-reduced: the gradient norms and SGD updates agree to the measured tolerances of
    tests/trainers/distributed.py."""
    from tests.trainers import distributed

    args = [f"trainer={name}", f"model={sd3_folder}", f"data={prompts}", "resolution=32", "tracker=none"]
    args += ["progress=false", "max_steps=2", "lr=1e-2", "optimizer=sgd", "sample_steps=3", "log_every=1"]
    args += ["reward=jpeg-compressibility", "group_size=2", "lora_rank=4", "lora_alpha=8", *TWO_PROCESSES[name]]
    runs = distributed.train_one_and_two(args, tmp_path)
    init = distributed.initial_lora(make_flow(name, sd3_folder, prompts, tmp_path / "init"))
    distributed.assert_two_processes_equal_one(runs, init)


def test_flow_training_timesteps_follow_the_scheduler_table(sd3_folder, pairs_file, tmp_path):
    """Flow-DPO's timesteps: entries of the shifted training table; logit-normal equals diffusers'
    ``compute_density_for_timestep_sampling`` on the same generator (flow_grpo's train_sd3_dpo.py)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling

    from tests.trainers.test_training import make_trainer

    trainer = make_trainer(sd3_folder, pairs_file, tmp_path / "u", "trainer=dpo", "timestep_range=[0.5,1.0]")
    table = FlowMatchEulerDiscreteScheduler.from_pretrained(str(sd3_folder), subfolder="scheduler").timesteps
    drawn = trainer._draw_timesteps(torch.Generator().manual_seed(0))
    assert all(t in table for t in drawn) and (drawn >= table[len(table) // 2]).all()  # the noisier half
    trainer = make_trainer(sd3_folder, pairs_file, tmp_path / "l", "trainer=dpo", "timestep_density=logit_normal")
    drawn = trainer._draw_timesteps(torch.Generator().manual_seed(1))
    u = compute_density_for_timestep_sampling(
        "logit_normal", len(drawn), logit_mean=0.0, logit_std=1.0, generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(drawn, table[(u * 1000).long()], rtol=0, atol=0)


def test_logit_normal_density_is_refused_on_unets(sd_folder, pairs_file, tmp_path):
    from tests.trainers.test_training import make_trainer

    with pytest.raises(ConfigError, match="flow-matching training density"):
        make_trainer(sd_folder, pairs_file, tmp_path, "trainer=dpo", "timestep_density=logit_normal")


def test_conditions_cache_and_freed_text_encoders(sd3_folder, prompts, tmp_path):
    """Prompts encoded once into ``conditions_cache`` (one file each, bit-exact), text encoders freed before
    training: the run equals one that kept them, and validation grids still render from the cache."""
    cache = tmp_path / "conditions"
    kept = make_flow("flow-grpo", sd3_folder, prompts, tmp_path / "kept", "max_steps=1", "sample_batches=1")
    kept.train()
    freed = make_flow(
        "flow-grpo",
        sd3_folder,
        prompts,
        tmp_path / "freed",
        "max_steps=1",
        "sample_batches=1",
        f"conditions_cache={cache}",
        "free_text_encoders=true",
        "validation_prompts=[a yellow star]",
    )
    assert freed.policy.text_encoders is None and len(list(cache.glob("*.safetensors"))) == 4  # 3 + 1
    freed.train()
    expected, got = kept._trainable_state(), freed._trainable_state()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert (tmp_path / "freed" / "samples" / "step-0000001.png").is_file()
    again = make_flow("flow-grpo", sd3_folder, prompts, tmp_path / "again", f"conditions_cache={cache}")
    cached = again._embeds(["a blue sky"])
    assert torch.equal(cached["prompt_embeds"], kept._embeds(["a blue sky"])["prompt_embeds"])


def test_free_text_encoders_is_refused_for_unets(sd_folder, prompts, tmp_path):
    from tests.trainers.test_online import make

    with pytest.raises(ConfigError, match="keeps its text encoders"):
        make("ddpo", sd_folder, prompts, tmp_path, "free_text_encoders=true", reward=Brightness())


# ----------------------------------------------------------------------------------------------------------
# Reward backpropagation on a flow family (Euler ODE chains)
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, extra",
    [
        ("refl", ["refl_min_step=1", "refl_max_step=2", "lora_rank=4", "ema_decay=0", "grad_accum=1"]),
        ("draft", ["draft_mode=k", "draft_k=2", "guidance=2.0"]),
        ("draft", ["draft_mode=lv"]),
        ("alignprop", ["gradient_checkpointing=true"]),
    ],
)
def test_reward_backprop_trains_a_flow_model(name, extra, sd3_folder, prompts, tmp_path):
    from tests.trainers.test_online import make

    trainer = make(name, sd3_folder, prompts, tmp_path, "sample_steps=3", "lr=1e-2", *extra, reward=Brightness())
    before = {k: v.clone() for k, v in trainer._trainable_state().items()}
    history = trainer.train()["history"]
    unchanged = {k for k, v in trainer._trainable_state().items() if torch.equal(before[k], v)}
    assert unchanged <= DEAD, unchanged
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in history)


def test_flow_chain_keeps_gradients_only_from_its_start(sd3_folder, prompts, tmp_path):
    """DRaFT-K's chain on a flow family equals the no-grad Euler ODE chain (the same rollout with sde_window
    (0, 0)), and only the last K velocities carry gradients."""
    from mmalign.models.flow_rollout import sample_flow_trajectories
    from mmalign.trainers.loop import _generator
    from tests.trainers.test_online import make

    trainer = make("draft", sd3_folder, prompts, tmp_path, "sample_steps=3", "guidance=1.0", reward=Brightness())
    batch = trainer.make_batch(0)
    x0 = trainer.flow_chain(batch, 2)
    lo, hi = batch["slice"]
    reference = sample_flow_trajectories(
        trainer.policy,
        trainer.accelerator.unwrap_model(trainer.model),
        batch["embeds"],
        None,
        _generator(0, 0, 3),  # the micro-batch's sampling stream: the same x_T
        3,
        1.0,
        latent_shape=trainer.latent_shape,
        sde_window=(0, 0),
        global_batch=trainer.global_batch,
        offset=lo,
    )
    torch.testing.assert_close(x0.detach(), reference.final, rtol=1e-5, atol=1e-6)
    assert x0.requires_grad


# ----------------------------------------------------------------------------------------------------------
# Any algorithm on any generator: every flow family trains, and its LoRA loads into its diffusers pipeline
# ----------------------------------------------------------------------------------------------------------
FAMILY_MAKERS = ["make_flux_pipeline", "make_flux2_klein_pipeline", "make_qwen_image_pipeline", "make_z_image_pipeline"]


@pytest.mark.parametrize("maker", FAMILY_MAKERS)
def test_every_flow_family_trains_and_its_lora_loads_into_its_pipeline(maker, prompts, tmp_path):
    import diffusers

    from mmalign.models.generator import read_model_index
    from tests import tiny

    folder = getattr(tiny, maker)(tmp_path / "pipe")
    trainer = make_flow("flow-grpo", folder, prompts, tmp_path / "run", "sample_steps=2", "guidance=1.0")
    before = {k: v.clone() for k, v in trainer._trainable_state().items()}
    trainer.train()
    changed = [k for k, v in trainer._trainable_state().items() if not torch.equal(before[k], v)]
    assert len(changed) >= len(before) // 2, f"only {len(changed)} of {len(before)} LoRA tensors trained"
    pipeline_class = getattr(diffusers, read_model_index(folder)["_class_name"])
    pipe = pipeline_class.from_pretrained(str(folder))
    pipe.load_lora_weights(str(tmp_path / "run"))
    assert_lora_reproduces_the_trained_model(trainer, pipe)


def test_mixgrpo_flash_samples_a_compressed_dpm_tail_after_its_window(sd3_folder, prompts, tmp_path):
    from mmalign.models import sde_windows

    trainer = make_flow(
        "mix-grpo",
        sd3_folder,
        prompts,
        tmp_path,
        "sample_steps=8",
        "window_size=2",
        "schedule=shifted_linear",
        "ode_solver=dpm2",
        "flash_compress_ratio=0.4",
    )
    trajectory = trainer.make_batch(0)["trajectory"]
    expected = sde_windows.mixgrpo_flash_sigmas(8, 2, 3.0, 0.4)  # window (0, 2), then int(7·0.4) = 2 tail points
    torch.testing.assert_close(trajectory.sigmas, expected)
    assert trajectory.sde_steps == [0, 1] and trajectory.steps == len(expected) - 1
    trainer.train()
    with pytest.raises(ConfigError, match="MixGRPO-Flash"):
        make_flow("mix-grpo", sd3_folder, prompts, tmp_path / "bad", "flash_compress_ratio=0.4")


def test_dpm2_rollout_composes_dpm_solver_steps_with_the_previous_data_prediction(sd3_folder, prompts, tmp_path):
    """All-ODE rollout with ode_solver=dpm2 = Euler from σ = 1, then DPM-Solver++(2M) steps fed with the previous
    step's x̂0 = x − σ·v (MixGRPO's history rule), on the tiny SD3."""
    from mmalign.models.flow_rollout import guided_velocity, sample_flow_trajectories
    from mmalign.models.flow_sampling import flow_dpm2_step, flow_ode_step

    trainer = make_flow("diffusionnft", sd3_folder, prompts, tmp_path, "ode_solver=dpm2")
    model, policy = trainer.sampling_model, trainer.policy
    conditions = trainer._embeds(["a red apple"])
    args = (policy, model, conditions, None, torch.Generator().manual_seed(0), 4, 1.0)
    got = sample_flow_trajectories(*args, latent_shape=trainer.latent_shape, sde_window=(0, 0), ode_solver="dpm2")
    sigmas, timesteps = got.sigmas, got.timesteps
    x, history = got.latents[:, 0], None
    with torch.no_grad():
        for j in range(4):
            v = guided_velocity(policy, model, x, timesteps[j], conditions, None, 1.0)
            x0 = x - sigmas[j] * v
            if float(sigmas[j]) < 1.0:
                x = flow_dpm2_step(x, v, sigmas[j], sigmas[j + 1], *(history or (None, None))).prev_sample
            else:
                x = flow_ode_step(x, v, sigmas[j], sigmas[j + 1])
            history = (x0, sigmas[j])
    torch.testing.assert_close(got.final, x, rtol=0, atol=0)
    euler = sample_flow_trajectories(
        *args[:4], torch.Generator().manual_seed(0), 4, 1.0, latent_shape=trainer.latent_shape, sde_window=(0, 0)
    )
    assert not torch.equal(euler.final, got.final)


# ----------------------------------------------------------------------------------------------------------
# Video: Wan (latents [B, C, F', h, w], image rewards lifted to its videos), through the normal loading path
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    from tests import tiny

    return tiny.make_wan_pipeline(tmp_path_factory.mktemp("wan") / "pipe", seed=0)  # 5 frames, 16 text tokens


def test_wan_trains_with_flow_grpo_and_its_lora_loads_into_wan_pipeline(wan_folder, prompts, tmp_path):
    from diffusers import WanPipeline

    from mmalign.rewards.lifted import VideoReward

    trainer = make_flow(
        "flow-grpo", wan_folder, prompts, tmp_path, "guidance=2.0", "beta=0.04", "sample_steps=2", "frames=5",
        "validation_prompts=[a red apple]",
    )  # fmt: skip
    assert trainer.latent_shape == (16, 2, 4, 4) and isinstance(trainer.reward.rewards[0], VideoReward)
    before = {k: v.clone() for k, v in trainer._trainable_state().items()}
    summary = trainer.train()
    unchanged = sorted(k for k, v in trainer._trainable_state().items() if torch.equal(before[k], v))
    assert not unchanged, unchanged
    assert summary["steps"] == 2 and all(torch.isfinite(torch.tensor(row["loss"])) for row in summary["history"])
    grid = trainer.sample_grid()  # a row of the 5 frames
    from PIL import Image

    assert Image.open(grid).size == (5 * 32, 32)
    pipe = WanPipeline.from_pretrained(str(wan_folder))
    pipe.load_lora_weights(str(tmp_path))
    assert_lora_reproduces_the_trained_model(trainer, pipe)


def test_wan_flow_dpo_trains_on_image_pairs_as_one_frame_clips(wan_folder, pairs_file, tmp_path):
    from PIL import Image

    from tests.trainers.test_training import make_trainer

    trainer = make_trainer(
        wan_folder, pairs_file, tmp_path, "trainer=dpo", "lr=1e-2", "beta=100", "validation_prompts=[a red apple]",
        "sample_steps=2", "guidance=2.0",
    )  # fmt: skip
    assert trainer.make_batch(0)["latents_w"].shape == (2, 16, 1, 4, 4)
    before = {k: v.clone() for k, v in trainer._trainable_state().items()}
    trainer.train()
    unchanged = sorted(k for k, v in trainer._trainable_state().items() if torch.equal(before[k], v))
    assert not unchanged, unchanged
    assert Image.open(trainer.sample_grid()).size == (5 * 32, 32)  # WanPipeline's 5 frames in a row


def test_wan_reward_backprop_goes_through_the_video_decoder(wan_folder, prompts, tmp_path):
    from tests.trainers.test_online import make

    trainer = make(
        "draft", wan_folder, prompts, tmp_path, "sample_steps=2", "lr=1e-2", "draft_mode=lv", reward=Brightness()
    )
    before = {k: v.clone() for k, v in trainer._trainable_state().items()}
    trainer.train()
    unchanged = sorted(k for k, v in trainer._trainable_state().items() if torch.equal(before[k], v))
    assert not unchanged, unchanged


def test_wan_trains_with_diffusionnft(wan_folder, prompts, tmp_path):
    trainer = make_flow("diffusionnft", wan_folder, prompts, tmp_path, "sample_steps=2")
    before = {k: v.clone() for k, v in trainer._trainable_state().items()}
    trainer.train()
    assert not [k for k, v in trainer._trainable_state().items() if torch.equal(before[k], v)]


def test_frames_are_checked_against_the_generator(wan_folder, sd3_folder, prompts, tmp_path):
    with pytest.raises(ConfigError, match=r"frames=6: Wan needs a frame count with \(frames - 1\) % 4 == 0"):
        make_flow("flow-grpo", wan_folder, prompts, tmp_path / "wan", "frames=6")
    with pytest.raises(ConfigError, match="frames=5: .* generates images, not videos"):
        make_flow("flow-grpo", sd3_folder, prompts, tmp_path / "sd3", "frames=5")


@pytest.fixture(scope="module")
def video_pairs(tmp_path_factory):
    from tests.data.test_media_pairs import write_video_pairs

    return write_video_pairs(tmp_path_factory.mktemp("video-pairs"))[0]


def test_wan_flow_dpo_trains_on_video_pairs(wan_folder, video_pairs, tmp_path):
    from tests.trainers.test_training import make_trainer

    trainer = make_trainer(wan_folder, video_pairs, tmp_path, "trainer=dpo", "lr=1e-2", "beta=100", "frames=5")
    assert trainer.make_batch(0)["latents_w"].shape == (2, 16, 2, 4, 4)  # (5 - 1) // 4 + 1 latent frames
    before = {k: v.clone() for k, v in trainer._trainable_state().items()}
    trainer.train()
    unchanged = sorted(k for k, v in trainer._trainable_state().items() if torch.equal(before[k], v))
    assert not unchanged, unchanged


def test_video_pairs_for_an_image_model_are_refused(video_pairs, sd3_folder, tmp_path):
    from tests.trainers.test_training import make_trainer

    with pytest.raises(ConfigError, match="holds videos .* generates images"):
        make_trainer(sd3_folder, video_pairs, tmp_path, "trainer=dpo")
