"""The interface every flow-matching family shares (:class:`mmalign.models.flow_generator.FlowMatchingGenerator`),
checked on each family's tiny pipeline of the real classes against diffusers' own pipeline."""

from __future__ import annotations

import copy

import pytest
import torch

from mmalign.models.flow_generator import FlowMatchingGenerator
from mmalign.models.flow_rollout import guided_velocity
from mmalign.models.generator import (
    FAMILIES,
    Generator,
    generator_class,
    load_generator,
    parametrisation_of,
    pipeline_class_of,
)
from tests import tiny

# family -> (tiny pipeline maker, a (height, width) of whole patches, pipeline kwargs that sample without CFG)
SPECS = {
    "sd3": (tiny.make_sd3_pipeline, (32, 48), {"guidance_scale": 1.0}),
    "flux": (tiny.make_flux_pipeline, (32, 64), {}),
    "flux2": (tiny.make_flux2_klein_pipeline, (32, 64), {"guidance_scale": 1.0}),
    "qwen_image": (tiny.make_qwen_image_pipeline, (32, 64), {}),
    "z_image": (tiny.make_z_image_pipeline, (32, 48), {"guidance_scale": 0.0}),
    "wan": (tiny.make_wan_pipeline, (32, 48), {"guidance_scale": 1.0, "num_frames": 5, "max_sequence_length": 16}),
}
PROMPTS = ["a photo of a red cat", "blue cube on the dog"]


@pytest.fixture(scope="module", params=list(SPECS))
def family(request, tmp_path_factory):
    make, size, call = SPECS[request.param]
    folder = make(tmp_path_factory.mktemp(request.param) / "pipe", seed=0)
    return load_generator(str(folder)), folder, size, call


def test_the_flow_families_of_the_registry_are_all_tested():
    flow = {name for name in FAMILIES if generator_class(name).parametrisation == "flow"}
    assert {generator_class(name).family for name in flow} == set(SPECS)
    for name in flow:
        assert issubclass(generator_class(name), FlowMatchingGenerator)


def test_every_flow_family_is_a_generator(family):
    import diffusers

    generator, folder, _, _ = family
    assert isinstance(generator, Generator) and isinstance(generator, FlowMatchingGenerator)
    assert generator.parametrisation == "flow" and parametrisation_of(str(folder)) == "flow"
    assert generator.lora_layers_key == "transformer_lora_layers"
    assert generator.trainable is generator.transformer
    # the pipeline class is the one the family is registered under, and the one pipeline() builds
    registered = [name for name, entry in FAMILIES.items() if entry.endswith(f":{type(generator).__name__}")]
    assert pipeline_class_of(generator) is getattr(diffusers, registered[0])
    assert type(generator.pipeline()) is generator.pipeline_class


def test_to_latents_is_sample_latents_of_latent_distribution(family):
    generator, _, (height, width), _ = family
    frames = (generator.num_frames,) if generator.modality == "video" else ()  # videos [B, T, 3, H, W]
    images = torch.rand((2, *frames, 3, height, width), generator=torch.Generator().manual_seed(7))
    mean, std = generator.latent_distribution(images * 2 - 1)
    assert mean.dtype == std.dtype == torch.float32 and mean.shape == std.shape
    latents = generator.to_latents(images, generator=torch.Generator().manual_seed(8))
    assert latents.dtype == torch.float32 and tuple(latents.shape) == (2, *generator.latent_shape(height, width))
    again = generator.sample_latents(mean, std, torch.Generator().manual_seed(8))
    assert torch.equal(latents, again)
    other = generator.sample_latents(mean, std, torch.Generator().manual_seed(9))
    if generator.family == "flux2":
        # the posterior mode (the klein training script's): std is zero, and to_latents draws nothing
        assert not std.any() and torch.equal(other, latents)
        rng = torch.Generator().manual_seed(8)
        state = rng.get_state()
        generator.to_latents(images, generator=rng)
        assert torch.equal(rng.get_state(), state)
    else:
        assert (std > 0).all() and not torch.equal(other, latents)
    # decode inverts the normalisation: the pipeline's decoding of the same latents
    assert generator.decode(latents).shape == images.shape


def schedule_variants(generator):
    """The published scheduler and, for families without it, the same with dynamic shifting."""
    yield generator
    # WanPipeline passes no μ: its scheduler cannot shift dynamically
    if not generator.scheduler.config.get("use_dynamic_shifting", False) and generator.family != "wan":
        dynamic = copy.copy(generator)
        dynamic.scheduler = type(generator.scheduler).from_config(generator.scheduler.config, use_dynamic_shifting=True)
        yield dynamic


@pytest.mark.parametrize("steps", [3, 6])
def test_sampling_schedule_of_a_latent_shape_equals_the_pipeline(family, steps):
    generator, folder, (height, width), call = family
    pipe = generator.pipeline_class.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    shape = generator.latent_shape(height, width)
    for variant in schedule_variants(generator):
        pipe.scheduler = type(variant.scheduler).from_config(variant.scheduler.config)
        with torch.no_grad():
            pipe(prompt=PROMPTS[0], num_inference_steps=steps, height=height, width=width, output_type="latent", **call)
        schedule = variant.sampling_schedule(steps, latent_shape=shape)
        assert torch.equal(schedule.timesteps, pipe.scheduler.timesteps)
        assert torch.equal(schedule.sigmas, pipe.scheduler.sigmas)
        # a latents' full shape counts the same image tokens
        assert torch.equal(variant.sampling_schedule(steps, latent_shape=(2, *shape)).sigmas, schedule.sigmas)
        if variant.scheduler.config.get("use_dynamic_shifting", False):
            with pytest.raises(ValueError, match="latent_shape"):
                variant.sampling_schedule(steps)
        else:
            assert torch.equal(variant.sampling_schedule(steps).sigmas, schedule.sigmas)


def test_guided_velocity_takes_per_sample_timesteps(family):
    generator, _, (height, width), _ = family
    conditions, uncond = generator.encode_conditions(PROMPTS), generator.unconditional(2)
    x = torch.randn((2, *generator.latent_shape(height, width)), generator=torch.Generator().manual_seed(3))
    t = torch.tensor([700.0, 300.0])
    model = generator.trainable
    with torch.no_grad():
        batched = guided_velocity(generator, model, x, t, conditions, uncond, 3.0)
        assert torch.equal(batched, generator.guided_velocity(model, x, t, conditions, uncond, 3.0))
        rows = [
            guided_velocity(generator, model, x[i : i + 1], t[i], conditions.select([i]), uncond.select([i]), 3.0)
            for i in range(2)
        ]
        # batch-size rounding only
        torch.testing.assert_close(batched, torch.cat(rows), atol=1e-5, rtol=0)
        # a [B] of equal timesteps is the scalar
        same = guided_velocity(generator, model, x, torch.full((2,), 500.0), conditions, uncond, 3.0)
        assert torch.equal(same, guided_velocity(generator, model, x, torch.tensor(500.0), conditions, uncond, 3.0))
        # guidance 1 is the conditional prediction
        assert torch.equal(
            guided_velocity(generator, model, x, t, conditions, None, 1.0), generator.predict(model, x, t, conditions)
        )
    assert not torch.allclose(batched, generator.predict(model, x, t, conditions), atol=1e-4)
    with pytest.raises(ValueError, match="unconditional"):
        guided_velocity(generator, model, x, t, conditions, None, 3.0)
