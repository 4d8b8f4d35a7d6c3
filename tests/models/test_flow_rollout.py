"""Flow-matching rollouts (:mod:`mmalign.models.flow_rollout`) on the tiny SD3 pipeline (32 px, 16×16 latents)."""

from __future__ import annotations

import copy

import pytest
import torch

from mmalign.models.flow_rollout import (
    flow_step_log_prob,
    guided_velocity,
    sample_flow_trajectories,
)
from mmalign.models.flow_sampling import flow_ode_step

PROMPTS = ["a photo of a red cat", "blue cube on the dog", "a green tree", "two birds"]
SHAPE = (16, 16, 16)
STEPS = 3


@pytest.fixture(scope="module")
def conds(generator):
    return generator.encode_conditions(PROMPTS), generator.unconditional(len(PROMPTS))


def rollout(generator, conditions, uncond, seed=0, **kwargs):
    kwargs.setdefault("guidance", 3.0)
    return sample_flow_trajectories(
        generator,
        generator.trainable,
        conditions,
        uncond,
        torch.Generator().manual_seed(seed),
        STEPS,
        latent_shape=SHAPE,
        **kwargs,
    )


@pytest.mark.parametrize("sampler", ["sde", "cps", "dance"])
def test_recorded_log_probs_equal_the_recomputed_ones(generator, conds, sampler):
    cond, uncond = conds[0].select(slice(0, 2)), conds[1].select(slice(0, 2))
    traj = rollout(generator, cond, uncond, sampler=sampler)
    assert traj.latents.shape == (2, STEPS + 1, *SHAPE) and traj.log_probs.shape == (2, STEPS)
    assert traj.sigmas.shape == (STEPS + 1,) and traj.timesteps.shape == (STEPS,)
    assert traj.sde.tolist() == [True] * STEPS and not traj.latents.requires_grad
    for j in range(STEPS):
        step = flow_step_log_prob(generator, generator.trainable, traj, j)
        torch.testing.assert_close(step.log_prob, traj.log_probs[:, j], atol=1e-5, rtol=0)
        torch.testing.assert_close(step.prev_sample, traj.latents[:, j + 1], atol=0, rtol=0)
    # a micro-batch of rows, with gradients reaching the model
    step = flow_step_log_prob(generator, generator.trainable, traj, 1, rows=slice(1, 2))
    torch.testing.assert_close(step.log_prob, traj.log_probs[1:, 1], atol=1e-5, rtol=0)
    assert step.log_prob.requires_grad
    # a window: SDE on step 1 only, ODE steps have log-prob 0 and no density
    window = rollout(generator, cond, uncond, sampler=sampler, sde_window=(1, 2))
    assert window.sde_steps == [1] and not window.log_probs[:, [0, 2]].any()
    recomputed = flow_step_log_prob(generator, generator.trainable, window, 1).log_prob
    torch.testing.assert_close(recomputed, window.log_probs[:, 1], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="ODE step"):
        flow_step_log_prob(generator, generator.trainable, window, 0)


def test_ode_window_equals_an_euler_loop_and_the_pipeline(generator, conds, folder):
    from diffusers import StableDiffusion3Pipeline

    cond, uncond = conds[0].select(slice(0, 2)), conds[1].select(slice(0, 2))
    traj = rollout(generator, cond, uncond, sde_window=(0, 0))
    assert not traj.sde.any() and not traj.log_probs.any()
    initial = traj.latents[:, 0]
    schedule = generator.sampling_schedule(STEPS)
    x = initial.clone()
    with torch.no_grad():
        for j, t in enumerate(schedule.timesteps):
            v = guided_velocity(generator, generator.trainable, x, t, cond, uncond, 3.0)
            x = flow_ode_step(x, v, schedule.sigmas[j], schedule.sigmas[j + 1])
    torch.testing.assert_close(traj.final, x, atol=1e-6, rtol=0)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        reference = pipe(
            prompt_embeds=cond["prompt_embeds"],
            pooled_prompt_embeds=cond["pooled_prompt_embeds"],
            negative_prompt_embeds=uncond["prompt_embeds"],
            negative_pooled_prompt_embeds=uncond["pooled_prompt_embeds"],
            latents=initial.clone(),
            num_inference_steps=STEPS,
            guidance_scale=3.0,
            height=32,
            width=32,
            output_type="latent",
        ).images
    assert not torch.equal(reference, initial)
    torch.testing.assert_close(traj.final, reference, atol=1e-5, rtol=0)


def test_results_do_not_depend_on_the_process_count(generator, conds):
    cond, uncond = conds
    whole = rollout(generator, cond, uncond, seed=3)
    parts = [
        rollout(generator, cond.select(rows), uncond.select(rows), seed=3, global_batch=4, offset=rows.start)
        for rows in (slice(0, 2), slice(2, 4))
    ]
    # the draws are identical; the model at batch 2 and batch 4 (x2 for guidance) rounds differently
    assert torch.equal(torch.cat([p.latents[:, 0] for p in parts]), whole.latents[:, 0])
    torch.testing.assert_close(torch.cat([p.latents for p in parts]), whole.latents, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat([p.log_probs for p in parts]), whole.log_probs, atol=1e-5, rtol=0)


def test_shared_noise_per_group(generator, conds):
    cond, uncond = conds
    traj = rollout(generator, cond, uncond, seed=4, shared_noise_per=2, guidance=1.0, sde_window=(0, 1))
    x0 = traj.latents[:, 0]
    assert torch.equal(x0[0], x0[1]) and torch.equal(x0[2], x0[3])
    assert not torch.equal(x0[0], x0[2])
    # the step noise is not shared: the same prompt and start give different samples
    same_prompt = rollout(
        generator, cond.select([0, 0]), None, seed=4, shared_noise_per=2, guidance=1.0, global_batch=4
    )
    assert torch.equal(same_prompt.latents[0, 0], same_prompt.latents[1, 0])
    assert not torch.allclose(same_prompt.final[0], same_prompt.final[1])
    # a slice of the global batch keeps its groups
    half = rollout(
        generator, cond.select(slice(2, 4)), None, seed=4, shared_noise_per=2, guidance=1.0, global_batch=4, offset=2
    )
    assert torch.equal(half.latents[:, 0], x0[2:])
    with pytest.raises(ValueError, match="multiple"):
        rollout(generator, cond.select(slice(0, 3)), None, shared_noise_per=2, guidance=1.0)


def test_guidance_combines_two_separate_predict_calls(generator, conds):
    cond, uncond = conds[0].select(slice(0, 2)), conds[1].select(slice(0, 2))
    traj = rollout(generator, cond, uncond, guidance=3.0, sde_window=(0, 0))
    x, t = traj.latents[:, 1], traj.timesteps[1]
    with torch.no_grad():
        v_cond = generator.predict(generator.trainable, x, t, cond)
        v_uncond = generator.predict(generator.trainable, x, t, uncond)
    by_hand = v_uncond + 3.0 * (v_cond - v_uncond)
    # the ODE step's velocity, read back from the recorded latents
    velocity = (traj.latents[:, 2] - x) / (traj.sigmas[2] - traj.sigmas[1])
    torch.testing.assert_close(velocity, by_hand, atol=1e-4, rtol=0)
    with torch.no_grad():
        batched = guided_velocity(generator, generator.trainable, x, t, cond, uncond, 3.0)
    torch.testing.assert_close(batched, by_hand, atol=1e-5, rtol=0)
    assert not torch.allclose(v_cond, by_hand, atol=1e-3)


class PredictOnly:
    """A generator with a predict and no guided_velocity of its own: the family-free CFG path."""

    def __init__(self, generator):
        self.predict = generator.predict


def test_guided_velocity_takes_per_sample_timesteps(generator, conds):
    cond, uncond = conds[0].select(slice(0, 2)), conds[1].select(slice(0, 2))
    x = torch.randn((2, *SHAPE), generator=torch.Generator().manual_seed(6))
    t = torch.tensor([800.0, 200.0])
    with torch.no_grad():
        batched = guided_velocity(generator, generator.trainable, x, t, cond, uncond, 3.0)
        # the family-free path (one batched predict on [uncond, cond] at [t, t]) is the family's standard CFG
        plain = guided_velocity(PredictOnly(generator), generator.trainable, x, t, cond, uncond, 3.0)
        v_cond = generator.predict(generator.trainable, x, t, cond)
        v_uncond = generator.predict(generator.trainable, x, t, uncond)
    assert torch.equal(plain, batched)
    torch.testing.assert_close(batched, v_uncond + 3.0 * (v_cond - v_uncond), atol=1e-5, rtol=0)
    for i in range(2):
        with torch.no_grad():
            row = guided_velocity(
                generator, generator.trainable, x[i : i + 1], t[i], cond.select([i]), uncond.select([i]), 3.0
            )
        torch.testing.assert_close(batched[i : i + 1], row, atol=1e-5, rtol=0)


def test_rollouts_shift_the_schedule_for_their_latent_shape(generator, conds):
    dynamic = copy.copy(generator)
    dynamic.scheduler = type(generator.scheduler).from_config(generator.scheduler.config, use_dynamic_shifting=True)
    with pytest.raises(ValueError, match="latent_shape"):
        dynamic.sampling_schedule(STEPS)
    cond = conds[0].select(slice(0, 2))
    traj = rollout(dynamic, cond, None, guidance=1.0, sde_window=(0, 0))
    expected = dynamic.sampling_schedule(STEPS, latent_shape=SHAPE)
    assert torch.equal(traj.sigmas, expected.sigmas) and torch.equal(traj.timesteps, expected.timesteps)
    assert not torch.equal(traj.sigmas, generator.sampling_schedule(STEPS).sigmas)


def test_detached_uncond_velocity_has_flow_grpos_values_and_gradient(generator):
    """flow_grpo's training velocity: the value of the pipeline's guided velocity, and the gradient of
    g·v_cond alone (``noise_pred_uncond.detach()``), with the unconditional branch run without a graph."""
    from mmalign.models.flow_rollout import guided_velocity, velocity_with_detached_uncond

    model = generator.trainable
    conditions, uncond = generator.encode_conditions(["a red apple"]), generator.unconditional(1)
    x = torch.randn((1, *generator.latent_shape(32, 32)), generator=torch.Generator().manual_seed(0))
    t, g = torch.tensor([600.0]), 3.0
    weight = next(p for p in model.parameters() if p.ndim == 2)
    weight.requires_grad_(True)
    try:
        v = velocity_with_detached_uncond(generator, model, x, t, conditions, uncond, g)
        with torch.no_grad():
            torch.testing.assert_close(
                v, guided_velocity(generator, model, x, t, conditions, uncond, g), rtol=1e-5, atol=1e-5
            )
        (got,) = torch.autograd.grad(v.sum(), weight)
        (expected,) = torch.autograd.grad(g * generator.predict(model, x, t, conditions).sum(), weight)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    finally:
        weight.requires_grad_(False)


def test_rollout_keeps_the_unconditional_branch_and_training_reuses_it(generator, conds):
    """``keep_uncond`` records each step's unconditional velocity without changing the chains (the same batched
    call, bitwise); a training step that reuses it has the recomputed step's log-prob, mean and gradient."""
    from mmalign.models.flow_rollout import guided_velocity_and_uncond

    cond, uncond = conds[0].select(slice(0, 2)), conds[1].select(slice(0, 2))
    plain, kept = rollout(generator, cond, uncond), rollout(generator, cond, uncond, keep_uncond=True)
    assert plain.uncond_velocities is None and kept.uncond_velocities.shape == (2, STEPS, *SHAPE)
    assert torch.equal(plain.latents, kept.latents) and torch.equal(plain.log_probs, kept.log_probs)
    x, t = kept.latents[:, 1], kept.timesteps[1]
    with torch.no_grad():
        v, v_uncond = guided_velocity_and_uncond(generator, generator.trainable, x, t, cond, uncond, 3.0)
        assert torch.equal(v, guided_velocity(generator, generator.trainable, x, t, cond, uncond, 3.0))
        torch.testing.assert_close(v_uncond, generator.predict(generator.trainable, x, t, uncond), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(kept.uncond_velocities[:, 1], v_uncond, rtol=0, atol=0)
    weight = next(p for p in generator.trainable.parameters() if p.ndim == 2)
    weight.requires_grad_(True)
    try:
        results = []
        for reuse in (False, True):
            step = flow_step_log_prob(generator, generator.trainable, kept, 1, detach_uncond=True, reuse_uncond=reuse)
            (grad,) = torch.autograd.grad(step.log_prob.sum(), weight)
            results.append((step.log_prob.detach(), step.mean.detach(), grad))
        for recomputed, reused in zip(*results):
            torch.testing.assert_close(reused, recomputed, rtol=1e-4, atol=1e-6)
    finally:
        weight.requires_grad_(False)
    with pytest.raises(ValueError, match="keep_uncond"):
        flow_step_log_prob(generator, generator.trainable, plain, 1, detach_uncond=True, reuse_uncond=True)
