"""The SD3 generator family against diffusers' own ``StableDiffusion3Pipeline`` on a tiny random pipeline of the
real classes, saved with ``save_pretrained`` and loaded back through :func:`mmalign.models.generator.load_generator`
(the reference pipeline is loaded separately with ``StableDiffusion3Pipeline.from_pretrained``)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from mmalign.errors import UnsupportedGeneratorError
from mmalign.models.flow_sampling import flow_ode_step
from mmalign.models.generator import FAMILIES, Conditions, Generator, load_generator
from mmalign.models.sd3 import SD3Generator

PROMPTS = ["a photo of a red cat", "blue cube on the dog"]


@pytest.fixture(scope="module")
def pipe(folder):
    from diffusers import StableDiffusion3Pipeline

    pipeline = StableDiffusion3Pipeline.from_pretrained(str(folder))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def latents(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn((batch, 16, 16, 16), generator=torch.Generator().manual_seed(seed))


def test_load_generator_recognises_sd3(generator, folder):
    assert isinstance(generator, SD3Generator)
    assert isinstance(generator, Generator)
    assert generator.family == "sd3"
    assert generator.trainable is generator.transformer
    assert type(generator.trainable.transformer_blocks[0]).__name__ == generator.block_class
    assert generator.vae.config.latent_channels == 16
    assert generator.scheduler.config.shift == 3.0


def test_unsupported_class_names_it_and_the_supported_ones(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FancyVideoPipeline"}))
    with pytest.raises(UnsupportedGeneratorError) as info:
        load_generator(str(tmp_path))
    message = str(info.value)
    assert "FancyVideoPipeline" in message
    for name in FAMILIES:
        assert name in message


def test_encode_conditions_equals_pipeline_encode_prompt(generator, pipe):
    conditions = generator.encode_conditions(PROMPTS)
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            PROMPTS, None, None, do_classifier_free_guidance=True
        )
    assert conditions["prompt_embeds"].shape == (2, 77 + 256, 64)
    assert torch.equal(conditions["prompt_embeds"], embeds)
    assert torch.equal(conditions["pooled_prompt_embeds"], pooled)
    # the unconditional branch is encoded once at batch 1 (the pipeline: at batch 2): float rounding only
    empty = generator.unconditional(2)
    torch.testing.assert_close(empty["prompt_embeds"], negative, atol=1e-6, rtol=0)
    torch.testing.assert_close(empty["pooled_prompt_embeds"], negative_pooled, atol=1e-6, rtol=0)
    # the CLIP part is zero-padded to T5's width
    assert not conditions["prompt_embeds"][:, :77, 48:].any()


def test_conditions_select_cat_save_load(generator, tmp_path):
    conditions = generator.encode_conditions(PROMPTS)
    path = conditions.save(tmp_path / "cache" / "embeds.safetensors")
    loaded = Conditions.load(path)
    assert list(loaded.tensors) == list(conditions.tensors)
    for name, tensor in conditions.tensors.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor)
    assert loaded.meta == {"family": "sd3"}
    both = Conditions.cat([loaded.select([1]), loaded.select(slice(0, 1))])
    assert len(both) == 2
    assert torch.equal(both["prompt_embeds"][0], conditions["prompt_embeds"][1])
    assert torch.equal(both.select(torch.tensor([1]))["pooled_prompt_embeds"][0], conditions["pooled_prompt_embeds"][0])
    assert torch.equal(loaded.repeat(2)["prompt_embeds"][1], conditions["prompt_embeds"][0])


def test_predict_equals_the_transformer(generator):
    conditions = generator.encode_conditions(PROMPTS)
    x = latents(2)
    t = torch.tensor([750.0, 125.5])
    with torch.no_grad():
        direct = generator.transformer(
            hidden_states=x,
            timestep=t,
            encoder_hidden_states=conditions["prompt_embeds"],
            pooled_projections=conditions["pooled_prompt_embeds"],
        ).sample
        assert torch.equal(generator.predict(generator.trainable, x, t, conditions), direct)


def test_noise_and_target_follow_the_scheduler(generator):
    x0, noise = latents(2, seed=2), latents(2, seed=3)
    schedule = generator.sampling_schedule(4)
    assert len(schedule) == 4 and schedule.sigmas.shape == (5,) and schedule.sigmas[-1] == 0
    torch.testing.assert_close(schedule.timesteps, schedule.sigmas[:-1] * 1000)
    t = schedule.timesteps[[0, 2]]
    sigma = schedule.sigmas[[0, 2]].reshape(2, 1, 1, 1)
    torch.testing.assert_close(generator.add_noise(x0, noise, t), (1 - sigma) * x0 + sigma * noise)
    torch.testing.assert_close(generator.training_target(x0, noise, t), noise - x0)
    # the scheduler's own forward process at its timesteps
    scheduler = copy.deepcopy(generator.scheduler)
    scheduler.set_timesteps(4)
    expected = torch.cat([scheduler.scale_noise(x0[i : i + 1], t[i : i + 1], noise[i : i + 1]) for i in range(2)])
    torch.testing.assert_close(generator.add_noise(x0, noise, t), expected, atol=1e-6, rtol=0)


def sample(generator, prompts, initial, steps, guidance=1.0):
    conditions = generator.encode_conditions(prompts)
    if guidance > 1.0:
        conditions = Conditions.cat([generator.unconditional(len(prompts)), conditions])
    schedule = generator.sampling_schedule(steps)
    x = initial.clone()
    with torch.no_grad():
        for i, t in enumerate(schedule.timesteps):
            model_input = torch.cat([x, x]) if guidance > 1.0 else x
            v = generator.predict(generator.trainable, model_input, t, conditions)
            if guidance > 1.0:
                uncond, cond = v.chunk(2)
                v = uncond + guidance * (cond - uncond)
            x = flow_ode_step(x, v, schedule.sigmas[i], schedule.sigmas[i + 1])
    return x


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_ode_sampling_equals_the_pipeline(generator, pipe, guidance):
    initial = latents(2, seed=4)
    ours = sample(generator, PROMPTS, initial, 4, guidance)
    with torch.no_grad():
        reference = pipe(
            PROMPTS,
            latents=initial.clone(),
            num_inference_steps=4,
            guidance_scale=guidance,
            height=32,
            width=32,
            output_type="latent",
        ).images
    assert not torch.equal(ours, initial)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


def test_lora_changes_predict_only_once_b_is_nonzero(generator):
    from peft import LoraConfig, get_peft_model

    conditions = generator.encode_conditions(PROMPTS[:1])
    x, t = latents(1, seed=5), torch.tensor([500.0])
    with torch.no_grad():
        base = generator.predict(generator.trainable, x, t, conditions)
        model = get_peft_model(
            copy.deepcopy(generator.trainable),
            LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
        )
        lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
        assert lora_b and all(not p.any() for p in lora_b)
        assert torch.equal(generator.predict(model, x, t, conditions), base)
        for p in lora_b:
            p.normal_(std=0.1, generator=torch.Generator().manual_seed(6))
        assert not torch.allclose(generator.predict(model, x, t, conditions), base, atol=1e-4)
    # the defaults of the family cover the same projections and load into peft
    assert {"attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"} <= set(generator.lora_targets)
    get_peft_model(copy.deepcopy(generator.trainable), LoraConfig(r=2, target_modules=list(generator.lora_targets)))


def test_to_latents_and_decode(generator):
    images = torch.rand((2, 3, 32, 32), generator=torch.Generator().manual_seed(7))
    z = generator.to_latents(images, generator=torch.Generator().manual_seed(8))
    assert z.shape == (2, 16, 16, 16) and z.dtype == torch.float32
    assert generator.latent_shape(32, 32) == tuple(z.shape[1:])
    assert generator.latent_shape(512, 256) == (16, 256, 128)  # the tiny VAE downsamples by 2, not 8
    with pytest.raises(ValueError, match="multiples of 4"):
        generator.latent_shape(34, 32)
    decoded = generator.decode(z)
    assert decoded.shape == (2, 3, 32, 32) and not decoded.requires_grad
    assert decoded.min() >= 0 and decoded.max() <= 1
    z = z.clone().requires_grad_(True)
    generator.decode(z, grad=True).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_generator_module_is_light():
    import subprocess
    import sys

    code = "import sys, mmalign.models.generator; print('torch' in sys.modules, 'diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# -- without T5 (text_encoder_3=None): the pipeline puts zeros [B, max_sequence_length, joint_attention_dim] there


@pytest.fixture(scope="module")
def no_t5_folder(tmp_path_factory):
    from mmalign.models.builders import build_sd3_pipeline

    return build_sd3_pipeline(tmp_path_factory.mktemp("sd3-no-t5") / "pipe", seed=0, t5=False, max_sequence_length=8)


@pytest.fixture(scope="module")
def no_t5(no_t5_folder):
    return load_generator(str(no_t5_folder))


@pytest.fixture(scope="module")
def no_t5_pipe(no_t5_folder):
    from diffusers import StableDiffusion3Pipeline

    # diffusers loads a T5-less folder only when told so (its model_index.json has text_encoder_3 [null, null])
    with pytest.raises(ValueError, match="expected"):
        StableDiffusion3Pipeline.from_pretrained(str(no_t5_folder))
    pipeline = StableDiffusion3Pipeline.from_pretrained(str(no_t5_folder), text_encoder_3=None, tokenizer_3=None)
    pipeline.set_progress_bar_config(disable=True)
    assert pipeline.text_encoder_3 is None and pipeline.tokenizer_3 is None
    return pipeline


def test_no_t5_reads_its_max_sequence_length_from_the_folder(no_t5, no_t5_folder):
    from mmalign.models.sd3 import GENERATOR_CONFIG

    assert isinstance(no_t5, SD3Generator) and not no_t5.has_t5
    assert no_t5.max_sequence_length == 8
    assert json.loads((no_t5_folder / GENERATOR_CONFIG).read_text()) == {"max_sequence_length": 8}
    assert load_generator(str(no_t5_folder), max_sequence_length=4).max_sequence_length == 4  # an argument wins


def test_no_t5_without_generator_config_uses_the_pipeline_default(no_t5_folder, tmp_path):
    import shutil

    from mmalign.models.sd3 import GENERATOR_CONFIG

    copy_dir = tmp_path / "pipe"
    shutil.copytree(no_t5_folder, copy_dir)
    (copy_dir / GENERATOR_CONFIG).unlink()
    assert load_generator(str(copy_dir)).max_sequence_length == 256


@pytest.mark.parametrize("length", [8, 3])
def test_no_t5_encode_conditions_equals_pipeline_encode_prompt(no_t5, no_t5_pipe, length):
    generator = no_t5 if length == 8 else SD3Generator.from_pretrained(no_t5.folder, max_sequence_length=length)
    conditions = generator.encode_conditions(PROMPTS)
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = no_t5_pipe.encode_prompt(
            PROMPTS, None, None, do_classifier_free_guidance=True, max_sequence_length=length
        )
    assert conditions["prompt_embeds"].shape == (2, 77 + length, 64)
    assert torch.equal(conditions["prompt_embeds"], embeds)
    assert torch.equal(conditions["pooled_prompt_embeds"], pooled)
    assert not conditions["prompt_embeds"][:, 77:].any()  # T5's place: zeros
    empty = generator.unconditional(2)
    torch.testing.assert_close(empty["prompt_embeds"], negative, atol=1e-6, rtol=0)
    torch.testing.assert_close(empty["pooled_prompt_embeds"], negative_pooled, atol=1e-6, rtol=0)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_no_t5_ode_sampling_equals_the_pipeline(no_t5, no_t5_pipe, guidance):
    initial = latents(2, seed=4)
    ours = sample(no_t5, PROMPTS, initial, 4, guidance)
    with torch.no_grad():
        reference = no_t5_pipe(
            PROMPTS,
            latents=initial.clone(),
            num_inference_steps=4,
            guidance_scale=guidance,
            height=32,
            width=32,
            output_type="latent",
            max_sequence_length=no_t5.max_sequence_length,
        ).images
        # the pipeline's default length (256) is another model input: a different sample
        default = no_t5_pipe(
            PROMPTS, latents=initial.clone(), num_inference_steps=4, guidance_scale=guidance, output_type="latent"
        ).images
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    assert not torch.allclose(default, reference, atol=1e-4)


def test_no_t5_pipeline_and_free_text_encoders(no_t5_folder):
    generator = SD3Generator.from_pretrained(no_t5_folder)
    assert generator.pipeline().text_encoder_3 is None
    generator.to("cpu")
    expected = generator.unconditional(1)
    generator.free_text_encoders()
    assert torch.equal(generator.unconditional(1)["prompt_embeds"], expected["prompt_embeds"])
