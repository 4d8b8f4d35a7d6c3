"""The Z-Image generator family against diffusers' own ``ZImagePipeline`` on a tiny random pipeline of the real
classes (Qwen3 text model, an offline Qwen2 tokenizer with a chat template), saved with ``save_pretrained`` and
loaded back through :func:`mmalign.models.generator.load_generator` (the reference pipeline is loaded separately
with ``ZImagePipeline.from_pretrained``). The pipeline's ``encode_prompt`` rewrites the prompt list it is given
in place, so it always gets a copy."""

from __future__ import annotations

import copy

import pytest
import torch

from mmalign.models.flow_generator import cfg_velocity
from mmalign.models.flow_rollout import guided_velocity
from mmalign.models.flow_sampling import flow_ode_step
from mmalign.models.generator import Conditions, Generator, load_generator
from mmalign.models.z_image import ZImageGenerator
from tests import tiny

PROMPTS = ("a photo of a red cat", "blue cube on the dog")
HEIGHT, WIDTH = 32, 48  # the tiny VAE halves: latents [B, 16, 16, 24]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny.make_z_image_pipeline(tmp_path_factory.mktemp("z_image") / "pipe", seed=0)


@pytest.fixture(scope="module")
def generator(folder):
    return load_generator(str(folder))


@pytest.fixture(scope="module")
def pipe(folder):
    from diffusers import ZImagePipeline

    pipeline = ZImagePipeline.from_pretrained(str(folder))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def latents(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn((batch, 16, HEIGHT // 2, WIDTH // 2), generator=torch.Generator().manual_seed(seed))


def test_load_generator_recognises_z_image(generator):
    assert isinstance(generator, ZImageGenerator)
    assert isinstance(generator, Generator)
    assert generator.family == "z_image"
    assert generator.trainable is generator.transformer
    assert type(generator.trainable.layers[0]).__name__ == generator.block_class
    assert type(generator.text_encoder).__name__ == "Qwen3Model"
    assert generator.vae.config.latent_channels == 16 and generator.shift_factor == pytest.approx(0.1159)


def test_tokenizer_chat_template_and_round_trip(generator, tmp_path):
    from transformers import Qwen2Tokenizer

    tokenizer = generator.tokenizer
    messages = [{"role": "user", "content": "a red cat"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert text == "<|im_start|>user\na red cat<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(text).input_ids
    assert tokenizer.convert_ids_to_tokens(ids[:3]) == ["<|im_start|>", "user", "\u010a"]
    assert tokenizer.decode(ids) == text
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = Qwen2Tokenizer.from_pretrained(str(tmp_path / "tok"))
    assert loaded(text).input_ids == ids
    again = loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert again == text


def test_encode_conditions_equals_pipeline_encode_prompt(generator, pipe):
    conditions = generator.encode_conditions(PROMPTS)
    with torch.no_grad():
        embeds, negative = pipe.encode_prompt(list(PROMPTS), do_classifier_free_guidance=True)
    assert conditions["prompt_embeds"].shape == (2, 512, 32)
    captions = generator.caption_list(conditions)
    assert [c.shape[0] for c in captions] == [e.shape[0] for e in embeds] and embeds[0].shape != embeds[1].shape
    for ours, theirs in zip(captions, embeds, strict=True):
        assert torch.equal(ours, theirs)
    # zeros beyond each prompt
    assert not conditions["prompt_embeds"][conditions["prompt_embeds_mask"] == 0].any()
    # the unconditional branch is the encoded "" (encoded once at batch 1)
    for ours, theirs in zip(generator.caption_list(generator.unconditional(2)), negative, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_conditions_concatenate_and_round_trip(generator, tmp_path):
    conditions = generator.encode_conditions(PROMPTS)
    both = Conditions.cat([conditions, generator.unconditional(2)])
    assert len(both) == 4 and len(generator.caption_list(both)) == 4
    loaded = Conditions.load(conditions.save(tmp_path / "embeds.safetensors"))
    for name, tensor in conditions.tensors.items():
        assert torch.equal(loaded[name], tensor)
    assert loaded["prompt_embeds_mask"].dtype == torch.long


def test_predict_is_the_negated_transformer_output(generator, pipe):
    conditions = generator.encode_conditions(PROMPTS)
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(list(PROMPTS), do_classifier_free_guidance=False)
        x = latents(2)
        t = torch.tensor([750.0, 125.5])
        direct = generator.transformer(list(x.unsqueeze(2).unbind(0)), (1000 - t) / 1000, embeds).sample
        ours = generator.predict(generator.trainable, x, t, conditions)
    assert ours.shape == x.shape and ours.dtype == torch.float32
    assert torch.equal(ours, -torch.stack(direct).squeeze(2))


def test_noise_and_target_follow_the_scheduler(generator):
    x0, noise = latents(2, seed=2), latents(2, seed=3)
    schedule = generator.sampling_schedule(4)
    assert len(schedule) == 4 and schedule.sigmas.shape == (5,) and schedule.sigmas[-1] == 0
    torch.testing.assert_close(schedule.timesteps, schedule.sigmas[:-1] * 1000)
    # the static shift 3 on linspace(1, 1/4, 4)
    base = torch.linspace(1.0, 0.25, 4)
    torch.testing.assert_close(schedule.sigmas[:-1], 3 * base / (1 + 2 * base))
    t = schedule.timesteps[[0, 2]]
    sigma = schedule.sigmas[[0, 2]].reshape(2, 1, 1, 1)
    torch.testing.assert_close(generator.add_noise(x0, noise, t), (1 - sigma) * x0 + sigma * noise)
    torch.testing.assert_close(generator.training_target(x0, noise, t), noise - x0)


def sample(generator, initial, steps, guidance=1.0, way="family", **cfg):
    conditions = generator.encode_conditions(PROMPTS)
    uncond = generator.unconditional(len(PROMPTS)) if guidance > 1.0 else None
    schedule = generator.sampling_schedule(steps, latent_shape=initial.shape[1:])
    x = initial.clone()
    with torch.no_grad():
        for i, t in enumerate(schedule.timesteps):
            if way == "family":
                v = generator.guided_velocity(generator.trainable, x, t, conditions, uncond, guidance, **cfg)
            elif way == "rollout":
                v = guided_velocity(generator, generator.trainable, x, t, conditions, uncond, guidance)
            else:  # standard CFG from one batched predict on [uncond, cond]
                v = cfg_velocity(generator, generator.trainable, x, t, conditions, uncond, guidance)
            x = flow_ode_step(x, v, schedule.sigmas[i], schedule.sigmas[i + 1])
    return x, schedule


def run_pipe(pipe, initial, steps, guidance, output_type="latent", **cfg):
    with torch.no_grad():
        return pipe(
            list(PROMPTS),
            latents=initial.clone(),
            num_inference_steps=steps,
            guidance_scale=guidance - 1.0,  # the pipeline's scale g is the ordinary CFG scale w - 1
            height=HEIGHT,
            width=WIDTH,
            output_type=output_type,
            **cfg,
        ).images


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_ode_sampling_equals_the_pipeline(generator, pipe, guidance):
    initial = latents(2, seed=4)
    ours, schedule = sample(generator, initial, 4, guidance)
    reference = run_pipe(pipe, initial, 4, guidance)
    assert torch.equal(schedule.timesteps, pipe.scheduler.timesteps)
    assert torch.equal(schedule.sigmas, pipe.scheduler.sigmas)
    assert not torch.equal(ours, initial)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    if guidance > 1.0:
        # the rollouts' guided_velocity is the family's CFG
        rollout, _ = sample(generator, initial, 4, guidance, way="rollout")
        torch.testing.assert_close(rollout, reference, atol=1e-5, rtol=0)
        # standard CFG is the same guidance, written v_u + w (v_c - v_u): equal up to rounding
        plain, _ = sample(generator, initial, 4, guidance, way="plain")
        torch.testing.assert_close(plain, reference, atol=1e-5, rtol=0)
    else:
        images = run_pipe(pipe, initial, 4, guidance, output_type="pt")
        torch.testing.assert_close(generator.decode(ours), images, atol=1e-5, rtol=0)


def test_cfg_normalization_and_truncation_follow_the_pipeline(generator, pipe):
    initial = latents(2, seed=9)
    cfg = dict(cfg_normalization=1.05, cfg_truncation=0.2)  # truncated: the last two of 4 steps
    ours, _ = sample(generator, initial, 4, 6.0, **cfg)
    reference = run_pipe(pipe, initial, 4, 6.0, **cfg)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    unguarded, _ = sample(generator, initial, 4, 6.0)
    assert (unguarded - reference).abs().max() > 1e-3


def test_lora_saved_for_the_pipeline_reproduces_the_peft_model(generator, folder, tmp_path):
    from diffusers import ZImagePipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    conditions = generator.encode_conditions(PROMPTS)
    x, t = latents(2, seed=5), torch.tensor([500.0, 300.0])
    model = copy.deepcopy(generator.trainable)
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=list(generator.lora_targets)))
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert len(lora_b) == 4 * (2 + 1 + 1)  # main layers, noise refiner, context refiner
    with torch.no_grad():
        base = generator.predict(generator.trainable, x, t, conditions)
        for i, p in enumerate(lora_b):
            p.normal_(std=0.1, generator=torch.Generator().manual_seed(6 + i))
        tuned = generator.predict(model, x, t, conditions)
    assert (tuned - base).abs().max() > 1e-3
    ZImagePipeline.save_lora_weights(
        str(tmp_path / "lora"),
        transformer_lora_layers=get_peft_model_state_dict(model),
        transformer_lora_adapter_metadata=model.peft_config["default"].to_dict(),
    )
    fresh = ZImagePipeline.from_pretrained(str(folder))
    fresh.load_lora_weights(str(tmp_path / "lora"))
    with torch.no_grad():
        loaded = generator.predict(fresh.transformer, x, t, conditions)
    torch.testing.assert_close(loaded, tuned, atol=1e-6, rtol=0)


def test_to_latents_and_decode(generator):
    images = torch.rand((2, 3, HEIGHT, WIDTH), generator=torch.Generator().manual_seed(7))
    z = generator.to_latents(images, generator=torch.Generator().manual_seed(8))
    assert z.shape == (2, 16, HEIGHT // 2, WIDTH // 2) and z.dtype == torch.float32
    decoded = generator.decode(z)
    assert decoded.shape == (2, 3, HEIGHT, WIDTH) and not decoded.requires_grad
    assert decoded.min() >= 0 and decoded.max() <= 1
    z = z.clone().requires_grad_(True)
    generator.decode(z, grad=True).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_pipeline_uses_the_given_transformer(generator):
    assert generator.pipeline().transformer is generator.transformer
    other = copy.deepcopy(generator.transformer)
    assert generator.pipeline(other).transformer is other


def test_guidance_truncation_is_per_sample_with_per_sample_timesteps(generator):
    conditions, uncond = generator.encode_conditions(PROMPTS), generator.unconditional(2)
    x, t = latents(2, seed=10), torch.tensor([900.0, 100.0])  # 1 − σ = 0.1 and 0.9
    model = generator.trainable
    with torch.no_grad():
        both = guided_velocity(generator, model, x, t, conditions, uncond, 4.0)
        truncated = generator.guided_velocity(model, x, t, conditions, uncond, 4.0, cfg_truncation=0.5)
        first = generator.guided_velocity(model, x[:1], t[0], conditions.select([0]), uncond.select([0]), 4.0)
        conditional = generator.predict(model, x[1:], t[1], conditions.select([1]))
    # the second sample is past the truncation: its conditional velocity alone; the first is guided
    torch.testing.assert_close(truncated[1:], conditional, atol=1e-5, rtol=0)
    torch.testing.assert_close(truncated[:1], first, atol=1e-5, rtol=0)
    assert torch.equal(truncated[:1], both[:1]) and not torch.allclose(truncated[1:], both[1:], atol=1e-3)
