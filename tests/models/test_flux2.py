"""The FLUX.2-klein generator family against diffusers' own ``Flux2KleinPipeline`` on a tiny random pipeline of
the real classes (Qwen3 text model, FLUX.2 VAE with batch-norm statistics, base variant with CFG), saved with
``save_pretrained`` and loaded back through :func:`mmalign.models.generator.load_generator` (the reference pipeline
is loaded separately with ``Flux2KleinPipeline.from_pretrained``)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from mmalign.models.flow_sampling import flow_ode_step
from mmalign.models.flux2 import Flux2KleinGenerator, compute_empirical_mu, patchify_latents, unpatchify_latents
from mmalign.models.generator import FAMILIES, Conditions, Generator, load_generator
from tests import tiny

PROMPTS = ["a photo of a red cat", "blue cube on the dog"]
SIZE = 32  # pixels: 16x16 VAE latents (tiny VAE: factor 2), patchified to 128 x 8 x 8 = 64 tokens


@pytest.fixture(scope="module")
def klein_folder(tmp_path_factory):
    return tiny.make_flux2_klein_pipeline(tmp_path_factory.mktemp("flux2") / "pipe", seed=0)


@pytest.fixture(scope="module")
def klein(klein_folder):
    return load_generator(str(klein_folder))


@pytest.fixture(scope="module")
def klein_pipe(klein_folder):
    from diffusers import Flux2KleinPipeline

    pipeline = Flux2KleinPipeline.from_pretrained(str(klein_folder))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def latents(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn((batch, 128, 8, 8), generator=torch.Generator().manual_seed(seed))


def test_load_generator_recognises_flux2_klein(klein):
    assert isinstance(klein, Flux2KleinGenerator)
    assert isinstance(klein, Generator)
    assert klein.family == "flux2" and not klein.is_distilled
    assert klein.trainable is klein.transformer
    assert type(klein.trainable.transformer_blocks[0]).__name__ == klein.block_class
    assert klein.latent_shape(SIZE, SIZE) == (128, 8, 8) and klein.image_seq_len(klein.latent_shape(SIZE, SIZE)) == 64
    assert "Flux2KleinPipeline" in FAMILIES


def test_encode_conditions_equals_pipeline_encode_prompt(klein, klein_pipe):
    conditions = klein.encode_conditions(PROMPTS)
    with torch.no_grad():
        embeds, text_ids = klein_pipe.encode_prompt(PROMPTS)
        empty, _ = klein_pipe.encode_prompt(["", ""])
    assert list(conditions.tensors) == ["prompt_embeds"]
    assert conditions["prompt_embeds"].shape == (2, 512, 3 * 16)
    assert torch.equal(conditions["prompt_embeds"], embeds)
    assert torch.equal(text_ids[0, :, 3], torch.arange(512)) and not text_ids[..., :3].any()  # rebuilt by predict
    torch.testing.assert_close(klein.unconditional(2)["prompt_embeds"], empty, atol=1e-6, rtol=0)


def test_patchify_and_token_layout_equal_the_pipeline(klein, klein_pipe):
    z = torch.randn((2, 32, 6, 10), generator=torch.Generator().manual_seed(2))
    patched = patchify_latents(z)
    assert torch.equal(patched, klein_pipe._patchify_latents(z))
    assert torch.equal(unpatchify_latents(patched), klein_pipe._unpatchify_latents(patched))
    assert torch.equal(unpatchify_latents(patched), z)
    # vae_latents is the pipeline's post-processing of its final latents (de-normalise, unpatchify)
    x = latents(2, seed=3)
    mean = klein.vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(klein.vae.bn.running_var.view(1, -1, 1, 1) + klein.vae.config.batch_norm_eps)
    assert torch.equal(klein.vae_latents(x), klein_pipe._unpatchify_latents(x * std + mean))


def test_predict_equals_the_transformer_on_packed_tokens(klein, klein_pipe):
    conditions = klein.encode_conditions(PROMPTS)
    x, t = latents(2), torch.tensor([750.0, 125.5])
    with torch.no_grad():
        ours = klein.predict(klein.trainable, x, t, conditions)
        packed, ids = klein_pipe._pack_latents(x), klein_pipe._prepare_latent_ids(x)
        out = klein.transformer(
            hidden_states=packed,
            timestep=t / 1000,
            guidance=None,
            encoder_hidden_states=conditions["prompt_embeds"],
            txt_ids=klein_pipe._prepare_text_ids(conditions["prompt_embeds"]),
            img_ids=ids,
            return_dict=False,
        )[0]
        expected = klein_pipe._unpack_latents_with_ids(out, ids, 8, 8)
    assert ours.shape == x.shape and ours.dtype == torch.float32
    assert torch.equal(ours, expected)


def test_noise_target_and_schedule(klein):
    x0, noise = latents(2, seed=2), latents(2, seed=3)
    with pytest.raises(ValueError, match="latent_shape"):
        klein.sampling_schedule(4)
    schedule = klein.sampling_schedule(4, latent_shape=(128, 8, 8))
    assert len(schedule) == 4 and schedule.sigmas.shape == (5,) and schedule.sigmas[-1] == 0
    torch.testing.assert_close(schedule.timesteps, schedule.sigmas[:-1] * 1000)
    t = schedule.timesteps[[0, 2]]
    sigma = schedule.sigmas[[0, 2]].reshape(2, 1, 1, 1)
    torch.testing.assert_close(klein.add_noise(x0, noise, t), (1 - sigma) * x0 + sigma * noise)
    torch.testing.assert_close(klein.training_target(x0, noise, t), noise - x0)
    # μ depends on the steps below 4300 tokens, not above
    assert compute_empirical_mu(4096, 4) != compute_empirical_mu(4096, 50)
    assert compute_empirical_mu(8192, 4) == compute_empirical_mu(8192, 50)


def sample(klein, prompts, initial, steps, guidance):
    conditions = klein.encode_conditions(prompts)
    if guidance > 1.0:
        conditions = Conditions.cat([klein.unconditional(len(prompts)), conditions])
    schedule = klein.sampling_schedule(steps, latent_shape=klein.latent_shape(SIZE, SIZE))
    x = initial.clone()
    with torch.no_grad():
        for i, t in enumerate(schedule.timesteps):
            model_input = torch.cat([x, x]) if guidance > 1.0 else x
            v = klein.predict(klein.trainable, model_input, t, conditions)
            if guidance > 1.0:
                uncond, cond = v.chunk(2)
                v = uncond + guidance * (cond - uncond)
            x = flow_ode_step(x, v, schedule.sigmas[i], schedule.sigmas[i + 1])
    return x, schedule


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_ode_sampling_equals_the_pipeline(klein, klein_pipe, guidance):
    initial = latents(2, seed=4)
    ours, schedule = sample(klein, PROMPTS, initial, 4, guidance)
    with torch.no_grad():
        reference = klein_pipe(
            prompt=PROMPTS,
            latents=initial.clone(),
            num_inference_steps=4,
            guidance_scale=guidance,
            height=SIZE,
            width=SIZE,
            output_type="latent",
        ).images
    assert torch.equal(schedule.timesteps, klein_pipe.scheduler.timesteps)
    assert torch.equal(schedule.sigmas, klein_pipe.scheduler.sigmas)
    assert not torch.equal(ours, initial)
    torch.testing.assert_close(klein.vae_latents(ours), reference, atol=1e-5, rtol=0)


def test_lora_changes_predict_and_loads_into_the_pipeline(klein, tmp_path):
    from diffusers import Flux2KleinPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    conditions = klein.encode_conditions(PROMPTS[:1])
    x, t = latents(1, seed=5), torch.tensor([500.0])
    model = copy.deepcopy(klein.trainable)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(klein.lora_targets)))
    lora_b = {name: p for name, p in model.named_parameters() if "lora_B" in name}
    assert any("single_transformer_blocks.0.attn.to_out.lora_B" in name for name in lora_b)
    assert any("single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_B" in name for name in lora_b)
    assert any("transformer_blocks.0.attn.to_out.0.lora_B" in name for name in lora_b)
    with torch.no_grad():
        base = klein.predict(klein.trainable, x, t, conditions)
        assert torch.equal(klein.predict(model, x, t, conditions), base)
        for p in lora_b.values():
            p.normal_(std=0.1, generator=torch.Generator().manual_seed(6))
        tuned = klein.predict(model, x, t, conditions)
    assert not torch.allclose(tuned, base, atol=1e-4)
    Flux2KleinPipeline.save_lora_weights(
        str(tmp_path / "lora"), transformer_lora_layers=get_peft_model_state_dict(model)
    )
    pipe = klein.pipeline(transformer=copy.deepcopy(klein.transformer))
    pipe.load_lora_weights(str(tmp_path / "lora"))
    with torch.no_grad():
        torch.testing.assert_close(klein.predict(pipe.transformer, x, t, conditions), tuned, atol=1e-6, rtol=0)


def test_pipeline_saves_a_folder_that_loads_back(klein, tmp_path):
    klein.pipeline().save_pretrained(str(tmp_path / "saved"))
    assert json.loads((tmp_path / "saved" / "model_index.json").read_text())["is_distilled"] is False
    again = load_generator(str(tmp_path / "saved"))
    conditions = klein.encode_conditions(PROMPTS[:1])
    assert torch.equal(again.encode_conditions(PROMPTS[:1])["prompt_embeds"], conditions["prompt_embeds"])
    x, t = latents(1, seed=9), torch.tensor([300.0])
    with torch.no_grad():
        assert torch.equal(
            again.predict(again.trainable, x, t, conditions), klein.predict(klein.trainable, x, t, conditions)
        )


def test_to_latents_and_decode(klein):
    images = torch.rand((2, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(7))
    z = klein.to_latents(images)
    assert tuple(z.shape) == (2, *klein.latent_shape(SIZE, SIZE)) and z.dtype == torch.float32
    # back to the VAE's posterior mode exactly (normalisation and patchify are inverted)
    with torch.no_grad():
        mode = klein.vae.encode(images * 2 - 1).latent_dist.mode()
    torch.testing.assert_close(klein.vae_latents(z), mode, atol=1e-5, rtol=1e-5)
    decoded = klein.decode(z)
    assert decoded.shape == (2, 3, SIZE, SIZE) and not decoded.requires_grad
    assert decoded.min() >= 0 and decoded.max() <= 1
    z = z.clone().requires_grad_(True)
    klein.decode(z, grad=True).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
