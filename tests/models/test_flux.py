"""The FLUX.1 generator family against diffusers' own ``FluxPipeline`` on a tiny random pipeline of the real
classes (FLUX.1-dev layout: guidance embedding, dynamic shifting), saved with ``save_pretrained`` and loaded back
through :func:`mmalign.models.generator.load_generator` (the reference pipeline is loaded separately with
``FluxPipeline.from_pretrained``)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from mmalign.errors import UnsupportedGeneratorError
from mmalign.models.flow_sampling import flow_ode_step
from mmalign.models.flux import FluxGenerator, latent_image_ids, pack_latents, unpack_latents
from mmalign.models.generator import Conditions, Generator, load_generator
from tests import tiny

PROMPTS = ["a photo of a red cat", "blue cube on the dog"]
SIZE = 32  # pixels: the tiny VAE downsamples by 2, so 16x16 latents, 8x8 = 64 packed tokens


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    return tiny.make_flux_pipeline(tmp_path_factory.mktemp("flux") / "pipe", seed=0)


@pytest.fixture(scope="module")
def flux(flux_folder):
    return load_generator(str(flux_folder))


@pytest.fixture(scope="module")
def flux_pipe(flux_folder):
    from diffusers import FluxPipeline

    pipeline = FluxPipeline.from_pretrained(str(flux_folder))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def latents(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn((batch, 16, 16, 16), generator=torch.Generator().manual_seed(seed))


def direct(transformer, x, t, conditions, guidance):
    """The transformer called on packed latents as FluxPipeline.__call__ calls it, output unpacked."""
    embeds = conditions["prompt_embeds"]
    out = transformer(
        hidden_states=pack_latents(x),
        timestep=t / 1000,
        guidance=guidance,
        pooled_projections=conditions["pooled_prompt_embeds"],
        encoder_hidden_states=embeds,
        txt_ids=torch.zeros(embeds.shape[1], 3),
        img_ids=latent_image_ids(x.shape[2], x.shape[3]),
    ).sample
    return unpack_latents(out, x.shape[2], x.shape[3])


def test_load_generator_recognises_flux(flux):
    assert isinstance(flux, FluxGenerator)
    assert isinstance(flux, Generator)
    assert flux.family == "flux"
    assert flux.trainable is flux.transformer
    assert type(flux.trainable.transformer_blocks[0]).__name__ == flux.block_class
    assert flux.transformer.config.guidance_embeds and flux.embedded_guidance == 3.5
    assert flux.max_sequence_length == 512
    assert flux.latent_shape(SIZE, SIZE) == (16, 16, 16)
    assert flux.latent_shape(34, 38) == (16, 16, 18)  # rounded down to whole 2x2 patches, as the pipeline
    assert flux.image_seq_len(flux.latent_shape(SIZE, SIZE)) == 64
    with pytest.raises(ValueError, match="greater than 512"):
        FluxGenerator.from_pretrained(flux.folder, max_sequence_length=513)


def test_unsupported_class_lists_flux(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FancyVideoPipeline"}))
    with pytest.raises(UnsupportedGeneratorError) as info:
        load_generator(str(tmp_path))
    assert "FancyVideoPipeline" in str(info.value)
    assert "FluxPipeline" in str(info.value) and "StableDiffusion3Pipeline" in str(info.value)


def test_encode_conditions_equals_pipeline_encode_prompt(flux, flux_pipe):
    conditions = flux.encode_conditions(PROMPTS)
    with torch.no_grad():
        embeds, pooled, text_ids = flux_pipe.encode_prompt(PROMPTS, None)
        empty_embeds, empty_pooled, _ = flux_pipe.encode_prompt(["", ""], None)
    assert list(conditions.tensors) == ["prompt_embeds", "pooled_prompt_embeds"]
    assert conditions["prompt_embeds"].shape == (2, 512, 64)
    assert conditions["pooled_prompt_embeds"].shape == (2, 32)
    assert torch.equal(conditions["prompt_embeds"], embeds)
    assert torch.equal(conditions["pooled_prompt_embeds"], pooled)
    assert text_ids.shape == (512, 3) and not text_ids.any()  # what predict rebuilds
    # the unconditional branch is encoded once at batch 1 (the pipeline: at batch 2): float rounding only
    empty = flux.unconditional(2)
    torch.testing.assert_close(empty["prompt_embeds"], empty_embeds, atol=1e-6, rtol=0)
    torch.testing.assert_close(empty["pooled_prompt_embeds"], empty_pooled, atol=1e-6, rtol=0)


def test_packing_equals_the_pipeline(flux_pipe):
    x = torch.randn((2, 16, 6, 10), generator=torch.Generator().manual_seed(2))
    packed = pack_latents(x)
    assert torch.equal(packed, flux_pipe._pack_latents(x, 2, 16, 6, 10))
    # the pipeline's unpack takes pixel sizes (latent size × vae_scale_factor)
    assert torch.equal(unpack_latents(packed, 6, 10), flux_pipe._unpack_latents(packed, 12, 20, 2))
    assert torch.equal(unpack_latents(packed, 6, 10), x)
    assert torch.equal(latent_image_ids(6, 10), flux_pipe._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32))
    with pytest.raises(ValueError, match="even"):
        pack_latents(x[:, :, :5])


def test_predict_equals_the_transformer_on_packed_latents(flux):
    from diffusers import FluxTransformer2DModel

    conditions = flux.encode_conditions(PROMPTS)
    x, t = latents(2), torch.tensor([750.0, 125.5])
    with torch.no_grad():
        dev = flux.predict(flux.trainable, x, t, conditions)
        assert dev.shape == x.shape and dev.dtype == torch.float32
        assert torch.equal(dev, direct(flux.transformer, x, t, conditions, torch.full((2,), 3.5)))
        # the embedded guidance scale is an input of the distilled transformer
        other = copy.copy(flux)
        other.embedded_guidance = 1.0
        assert not torch.allclose(other.predict(flux.trainable, x, t, conditions), dev, atol=1e-4)
        # schnell: no guidance embedding, guidance=None
        torch.manual_seed(3)
        schnell = FluxTransformer2DModel(**dict(flux.transformer.config, guidance_embeds=False)).eval()
        assert torch.equal(flux.predict(schnell, x, t, conditions), direct(schnell, x, t, conditions, None))


def test_noise_and_target_follow_the_scheduler(flux):
    x0, noise = latents(2, seed=2), latents(2, seed=3)
    schedule = flux.sampling_schedule(4, latent_shape=(16, 16, 16))
    assert len(schedule) == 4 and schedule.sigmas.shape == (5,) and schedule.sigmas[-1] == 0
    torch.testing.assert_close(schedule.timesteps, schedule.sigmas[:-1] * 1000)
    t = schedule.timesteps[[0, 2]]
    sigma = schedule.sigmas[[0, 2]].reshape(2, 1, 1, 1)
    torch.testing.assert_close(flux.add_noise(x0, noise, t), (1 - sigma) * x0 + sigma * noise)
    torch.testing.assert_close(flux.training_target(x0, noise, t), noise - x0)


def test_sampling_schedule_shifts_by_resolution(flux):
    with pytest.raises(ValueError, match="latent_shape"):
        flux.sampling_schedule(4)
    # at 1024² (4096 tokens) μ = max_shift: σ' = e^μ / (e^μ + 1/σ − 1) on σ = linspace(1, 1/N, N)
    sigmas = torch.linspace(1.0, 0.25, 4, dtype=torch.float64)
    mu = 1.15
    expected = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
    schedule = flux.sampling_schedule(4, latent_shape=(16, 128, 128))
    torch.testing.assert_close(schedule.sigmas[:-1].double(), expected, atol=1e-6, rtol=0)
    # schnell's scheduler: no dynamic shifting, shift 1 -> the plain linspace, latent_shape optional
    schnell = copy.copy(flux)
    schnell.scheduler = type(flux.scheduler).from_config(flux.scheduler.config, use_dynamic_shifting=False, shift=1.0)
    torch.testing.assert_close(schnell.sampling_schedule(4).sigmas[:-1].double(), sigmas, atol=1e-7, rtol=0)


def sample(flux, prompts, initial, steps, true_cfg=1.0):
    conditions = flux.encode_conditions(prompts)
    if true_cfg > 1.0:
        conditions = Conditions.cat([flux.unconditional(len(prompts)), conditions])
    schedule = flux.sampling_schedule(steps, latent_shape=flux.latent_shape(SIZE, SIZE))
    x = initial.clone()
    with torch.no_grad():
        for i, t in enumerate(schedule.timesteps):
            model_input = torch.cat([x, x]) if true_cfg > 1.0 else x
            v = flux.predict(flux.trainable, model_input, t, conditions)
            if true_cfg > 1.0:
                uncond, cond = v.chunk(2)
                v = uncond + true_cfg * (cond - uncond)
            x = flow_ode_step(x, v, schedule.sigmas[i], schedule.sigmas[i + 1])
    return x, schedule


@pytest.mark.parametrize("true_cfg", [1.0, 2.0])
def test_ode_sampling_equals_the_pipeline(flux, flux_pipe, true_cfg):
    initial = latents(2, seed=4)
    ours, schedule = sample(flux, PROMPTS, initial, 4, true_cfg)
    negative = {"negative_prompt": "", "true_cfg_scale": true_cfg} if true_cfg > 1.0 else {}
    with torch.no_grad():
        packed = flux_pipe(
            PROMPTS,
            latents=pack_latents(initial),
            num_inference_steps=4,
            guidance_scale=flux.embedded_guidance,
            height=SIZE,
            width=SIZE,
            output_type="latent",
            **negative,
        ).images
    # the schedule is the pipeline's (its scheduler keeps the last one set)
    assert torch.equal(schedule.timesteps, flux_pipe.scheduler.timesteps)
    assert torch.equal(schedule.sigmas, flux_pipe.scheduler.sigmas)
    reference = unpack_latents(packed, 16, 16)
    assert not torch.equal(ours, initial)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


def test_lora_changes_predict_and_loads_into_the_pipeline(flux, tmp_path):
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    conditions = flux.encode_conditions(PROMPTS[:1])
    x, t = latents(1, seed=5), torch.tensor([500.0])
    model = copy.deepcopy(flux.trainable)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(flux.lora_targets)))
    lora_b = {name: p for name, p in model.named_parameters() if "lora_B" in name}
    # every target exists in the double-stream blocks (attention of both streams and both feed-forwards)
    for target in flux.lora_targets:
        assert any(f"transformer_blocks.0.{target}.lora_B" in name for name in lora_b), target
    with torch.no_grad():
        base = flux.predict(flux.trainable, x, t, conditions)
        assert torch.equal(flux.predict(model, x, t, conditions), base)
        for p in lora_b.values():
            p.normal_(std=0.1, generator=torch.Generator().manual_seed(6))
        tuned = flux.predict(model, x, t, conditions)
    assert not torch.allclose(tuned, base, atol=1e-4)
    # diffusers' LoRA format round trip: the pipeline loads what training saved
    FluxPipeline.save_lora_weights(str(tmp_path / "lora"), transformer_lora_layers=get_peft_model_state_dict(model))
    pipe = flux.pipeline(transformer=copy.deepcopy(flux.transformer))
    pipe.load_lora_weights(str(tmp_path / "lora"))
    with torch.no_grad():
        loaded = flux.predict(pipe.transformer, x, t, conditions)
    torch.testing.assert_close(loaded, tuned, atol=1e-6, rtol=0)
    assert torch.equal(flux.predict(flux.trainable, x, t, conditions), base)  # the generator is untouched


def test_pipeline_saves_a_folder_that_loads_back(flux, tmp_path):
    flux.pipeline().save_pretrained(str(tmp_path / "saved"))
    again = load_generator(str(tmp_path / "saved"))
    assert isinstance(again, FluxGenerator)
    conditions = flux.encode_conditions(PROMPTS[:1])
    assert torch.equal(again.encode_conditions(PROMPTS[:1])["prompt_embeds"], conditions["prompt_embeds"])
    x, t = latents(1, seed=9), torch.tensor([300.0])
    with torch.no_grad():
        assert torch.equal(
            again.predict(again.trainable, x, t, conditions), flux.predict(flux.trainable, x, t, conditions)
        )


def test_to_latents_and_decode(flux):
    images = torch.rand((2, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(7))
    z = flux.to_latents(images, generator=torch.Generator().manual_seed(8))
    assert tuple(z.shape) == (2, *flux.latent_shape(SIZE, SIZE)) and z.dtype == torch.float32
    # the pipeline's scaling: z = (posterior sample − shift) · scaling
    raw = flux.vae.encode(images * 2 - 1).latent_dist.sample(torch.Generator().manual_seed(8))
    torch.testing.assert_close(z, (raw - 0.1159) * 0.3611)
    decoded = flux.decode(z)
    assert decoded.shape == (2, 3, SIZE, SIZE) and not decoded.requires_grad
    assert decoded.min() >= 0 and decoded.max() <= 1
    z = z.clone().requires_grad_(True)
    flux.decode(z, grad=True).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
