"""The Qwen-Image generator family against diffusers' own ``QwenImagePipeline`` on a tiny random pipeline of the
real classes (Qwen2.5-VL text encoder, 3D Qwen-Image VAE, an offline Qwen2 tokenizer), saved with
``save_pretrained`` and loaded back through :func:`mmalign.models.generator.load_generator` (the reference pipeline
is loaded separately with ``QwenImagePipeline.from_pretrained``)."""

from __future__ import annotations

import copy

import pytest
import torch

from mmalign.models.flow_rollout import guided_velocity, sample_flow_trajectories
from mmalign.models.flow_sampling import flow_ode_step
from mmalign.models.generator import Conditions, Generator, load_generator
from mmalign.models.qwen_image import (
    PROMPT_TEMPLATE,
    PROMPT_TEMPLATE_START_IDX,
    QwenImageGenerator,
    pack_latents,
    unpack_latents,
)
from tests import tiny

# prompts of different lengths (padding and a mask) and of equal lengths (no mask)
PROMPTS = ["a photo of a red cat", "blue cube on the dog"]
EQUAL = ["a red cat", "a blue dog"]
HEIGHT, WIDTH = 32, 64  # non-square: latents [B, 16, 4, 8], 2 x 4 packed tokens


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny.make_qwen_image_pipeline(tmp_path_factory.mktemp("qwen_image") / "pipe", seed=0)


@pytest.fixture(scope="module")
def generator(folder):
    return load_generator(str(folder))


@pytest.fixture(scope="module")
def pipe(folder):
    from diffusers import QwenImagePipeline

    pipeline = QwenImagePipeline.from_pretrained(str(folder))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def latents(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn((batch, 16, HEIGHT // 8, WIDTH // 8), generator=torch.Generator().manual_seed(seed))


def test_load_generator_recognises_qwen_image(generator):
    assert isinstance(generator, QwenImageGenerator)
    assert isinstance(generator, Generator)
    assert generator.family == "qwen_image"
    assert generator.trainable is generator.transformer
    assert type(generator.trainable.transformer_blocks[0]).__name__ == generator.block_class
    assert generator.vae.config.z_dim == 16 and len(generator.vae.config.latents_std) == 16
    assert generator.scheduler.config.use_dynamic_shifting


def test_tokenizer_round_trips_and_drops_the_template_prefix(generator, tmp_path):
    from transformers import Qwen2Tokenizer

    tokenizer = generator.tokenizer
    assert isinstance(tokenizer, Qwen2Tokenizer)
    text = PROMPT_TEMPLATE.format("a photo of a red cat")
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == text
    # the system turn and the user header are the 34 tokens the pipeline drops, as with the real tokenizer
    prefix = PROMPT_TEMPLATE.split("{}")[0]
    assert len(tokenizer(prefix).input_ids) == PROMPT_TEMPLATE_START_IDX
    assert tokenizer.convert_ids_to_tokens(ids[PROMPT_TEMPLATE_START_IDX]) == "a"
    # unknown words and non-ASCII text fall back to byte pieces and still round-trip; save/load keeps it all
    odd = "Zebra xylophone, ünïcode 123"
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = Qwen2Tokenizer.from_pretrained(str(tmp_path / "tok"))
    assert loaded(text).input_ids == ids
    assert loaded.decode(loaded(odd).input_ids) == odd


def test_encode_conditions_equals_pipeline_encode_prompt(generator, pipe):
    conditions = generator.encode_conditions(PROMPTS)
    with torch.no_grad():
        embeds, mask = pipe.encode_prompt(PROMPTS, max_sequence_length=512)
    length = embeds.shape[1]
    assert conditions["prompt_embeds"].shape == (2, 512, 32)
    assert mask is not None and not mask.all()
    assert torch.equal(conditions["prompt_embeds"][:, :length], embeds)
    assert torch.equal(conditions["prompt_embeds_mask"][:, :length], mask)
    assert not conditions["prompt_embeds"][:, length:].any() and not conditions["prompt_embeds_mask"][:, length:].any()
    # padding under the mask is zero, as the pipeline pads
    assert not conditions["prompt_embeds"][1][conditions["prompt_embeds_mask"][1] == 0].any()
    # equal lengths: the pipeline drops the all-ones mask
    with torch.no_grad():
        equal, equal_mask = pipe.encode_prompt(EQUAL)
    assert equal_mask is None
    assert torch.equal(generator.encode_conditions(EQUAL)["prompt_embeds"][:, : equal.shape[1]], equal)
    # the unconditional branch is the encoded " " (encoded once at batch 1)
    with torch.no_grad():
        negative, negative_mask = pipe.encode_prompt([" ", " "])
    empty = generator.unconditional(2)
    assert negative_mask is None
    assert int(empty["prompt_embeds_mask"].sum()) == 2 * negative.shape[1]
    torch.testing.assert_close(empty["prompt_embeds"][:, : negative.shape[1]], negative, atol=1e-6, rtol=0)


def test_conditions_of_any_prompts_concatenate_and_round_trip(generator, tmp_path):
    conditions = generator.encode_conditions(PROMPTS)
    both = Conditions.cat([generator.unconditional(2), conditions])
    assert len(both) == 4 and both["prompt_embeds"].shape[1] == 512
    path = conditions.save(tmp_path / "embeds.safetensors")
    loaded = Conditions.load(path)
    assert loaded["prompt_embeds_mask"].dtype == torch.long
    for name, tensor in conditions.tensors.items():
        assert torch.equal(loaded[name], tensor)
    assert loaded.to(dtype=torch.bfloat16)["prompt_embeds_mask"].dtype == torch.long


def test_pack_unpack_are_the_pipeline_permutations(pipe):
    x = latents(2)
    packed = pipe._pack_latents(x, 2, 16, HEIGHT // 8, WIDTH // 8)
    assert torch.equal(pack_latents(x), packed)
    assert torch.equal(unpack_latents(packed, HEIGHT // 8, WIDTH // 8), x)
    assert torch.equal(pipe._unpack_latents(packed, HEIGHT, WIDTH, 8)[:, :, 0], x)


def test_predict_equals_the_transformer(generator, pipe):
    conditions = generator.encode_conditions(PROMPTS)
    with torch.no_grad():
        embeds, mask = pipe.encode_prompt(PROMPTS)
    x = latents(2)
    t = torch.tensor([750.0, 125.5])
    with torch.no_grad():
        direct = generator.transformer(
            hidden_states=pack_latents(x),
            timestep=t / 1000,
            encoder_hidden_states=embeds,
            encoder_hidden_states_mask=mask,
            img_shapes=[[(1, HEIGHT // 16, WIDTH // 16)]] * 2,
        ).sample
        ours = generator.predict(generator.trainable, x, t, conditions)
    assert ours.shape == x.shape and ours.dtype == torch.float32
    assert torch.equal(pack_latents(ours), direct)


def test_noise_and_target_follow_the_scheduler(generator):
    x0, noise = latents(2, seed=2), latents(2, seed=3)
    schedule = generator.sampling_schedule(4, latent_shape=x0.shape)
    assert len(schedule) == 4 and schedule.sigmas.shape == (5,) and schedule.sigmas[-1] == 0
    torch.testing.assert_close(schedule.timesteps, schedule.sigmas[:-1] * 1000)
    t = schedule.timesteps[[0, 2]]
    sigma = schedule.sigmas[[0, 2]].reshape(2, 1, 1, 1)
    torch.testing.assert_close(generator.add_noise(x0, noise, t), (1 - sigma) * x0 + sigma * noise)
    torch.testing.assert_close(generator.training_target(x0, noise, t), noise - x0)
    with pytest.raises(ValueError, match="latent_shape"):
        generator.sampling_schedule(4)


def sample(generator, prompts, initial, steps, guidance=1.0, cfg="family"):
    conditions = generator.encode_conditions(prompts)
    uncond = generator.unconditional(len(prompts)) if guidance > 1.0 else None
    schedule = generator.sampling_schedule(steps, latent_shape=initial.shape[1:])
    x = initial.clone()
    with torch.no_grad():
        for i, t in enumerate(schedule.timesteps):
            if cfg == "family":
                v = generator.guided_velocity(generator.trainable, x, t, conditions, uncond, guidance)
            elif cfg == "rollout":
                v = guided_velocity(generator, generator.trainable, x, t, conditions, uncond, guidance)
            else:  # the plain combination v_u + g (v_c - v_u)
                v = generator.guided_velocity(generator.trainable, x, t, conditions, uncond, guidance, rescale=False)
            x = flow_ode_step(x, v, schedule.sigmas[i], schedule.sigmas[i + 1])
    return x, schedule


def run_pipe(pipe, initial, steps, guidance, output_type="latent"):
    cfg = dict(negative_prompt=" ", true_cfg_scale=guidance) if guidance > 1.0 else dict(true_cfg_scale=1.0)
    with torch.no_grad():
        return pipe(
            PROMPTS,
            latents=pack_latents(initial),
            num_inference_steps=steps,
            height=HEIGHT,
            width=WIDTH,
            output_type=output_type,
            **cfg,
        ).images


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_ode_sampling_equals_the_pipeline(generator, pipe, guidance):
    initial = latents(2, seed=4)
    ours, schedule = sample(generator, PROMPTS, initial, 4, guidance)
    reference = unpack_latents(run_pipe(pipe, initial, 4, guidance), HEIGHT // 8, WIDTH // 8)
    # the schedule is the pipeline's (read back from its scheduler after the call)
    assert torch.equal(schedule.timesteps, pipe.scheduler.timesteps)
    assert torch.equal(schedule.sigmas, pipe.scheduler.sigmas)
    assert not torch.equal(ours, initial)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    if guidance > 1.0:
        # the rollouts' guided_velocity is the family's CFG, norm rescaling included
        rollout, _ = sample(generator, PROMPTS, initial, 4, guidance, cfg="rollout")
        torch.testing.assert_close(rollout, reference, atol=1e-5, rtol=0)
        # the plain combination (no norm rescaling) is a different sampler
        plain, _ = sample(generator, PROMPTS, initial, 4, guidance, cfg="plain")
        assert (plain - reference).abs().max() > 1e-3
    else:
        # decode is the pipeline's own decoding of its final latents
        images = run_pipe(pipe, initial, 4, guidance, output_type="pt")
        torch.testing.assert_close(generator.decode(ours), images, atol=1e-5, rtol=0)


def test_schedule_shifts_with_the_sequence_length(generator):
    assert generator.image_seq_len((16, 8, 8)) == 16 and generator.image_seq_len((16, 128, 128)) == 4096
    small = generator.sampling_schedule(8, latent_shape=(16, 8, 8))
    large = generator.sampling_schedule(8, latent_shape=(16, 128, 128))
    assert (large.sigmas[1:-2] > small.sigmas[1:-2]).all()
    # Qwen-Image's shift_terminal: the last non-zero sigma is stretched to 0.02
    torch.testing.assert_close(large.sigmas[-2], torch.tensor(0.02), atol=1e-6, rtol=0)


def test_lora_saved_for_the_pipeline_reproduces_the_peft_model(generator, folder, tmp_path):
    from diffusers import QwenImagePipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    conditions = generator.encode_conditions(PROMPTS)
    x, t = latents(2, seed=5), torch.tensor([500.0, 300.0])
    # a peft LoRA attached as the trainers and diffusers' training scripts attach it (add_adapter)
    model = copy.deepcopy(generator.trainable)
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=list(generator.lora_targets)))
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert len(lora_b) == 4 * 2  # four projections in each of the two blocks
    with torch.no_grad():
        base = generator.predict(generator.trainable, x, t, conditions)
        for i, p in enumerate(lora_b):
            p.normal_(std=0.1, generator=torch.Generator().manual_seed(6 + i))
        tuned = generator.predict(model, x, t, conditions)
    assert (tuned - base).abs().max() > 1e-3
    layers = get_peft_model_state_dict(model)
    # with the adapter's config as metadata: without it diffusers assumes lora_alpha = r (a scale of 1, not 2)
    QwenImagePipeline.save_lora_weights(
        str(tmp_path / "lora"),
        transformer_lora_layers=layers,
        transformer_lora_adapter_metadata=model.peft_config["default"].to_dict(),
    )
    fresh = QwenImagePipeline.from_pretrained(str(folder))
    fresh.load_lora_weights(str(tmp_path / "lora"))
    with torch.no_grad():
        loaded = generator.predict(fresh.transformer, x, t, conditions)
    torch.testing.assert_close(loaded, tuned, atol=1e-6, rtol=0)


def test_to_latents_and_decode(generator):
    images = torch.rand((2, 3, HEIGHT, WIDTH), generator=torch.Generator().manual_seed(7))
    z = generator.to_latents(images, generator=torch.Generator().manual_seed(8))
    assert z.shape == (2, 16, HEIGHT // 8, WIDTH // 8) and z.dtype == torch.float32
    # the normalisation: the VAE's posterior sample standardised per channel
    with torch.no_grad():
        raw = generator.vae.encode((images * 2 - 1).unsqueeze(2)).latent_dist.sample(torch.Generator().manual_seed(8))
    mean = torch.tensor(generator.vae.config.latents_mean).view(1, 16, 1, 1)
    std = torch.tensor(generator.vae.config.latents_std).view(1, 16, 1, 1)
    torch.testing.assert_close(z, (raw[:, :, 0] - mean) / std, atol=1e-5, rtol=1e-5)
    decoded = generator.decode(z)
    assert decoded.shape == (2, 3, HEIGHT, WIDTH) and not decoded.requires_grad
    assert decoded.min() >= 0 and decoded.max() <= 1
    z = z.clone().requires_grad_(True)
    generator.decode(z, grad=True).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_pipeline_uses_the_given_transformer(generator):
    pipeline = generator.pipeline()
    assert pipeline.transformer is generator.transformer and pipeline.text_encoder is generator.text_encoder
    other = copy.deepcopy(generator.transformer)
    assert generator.pipeline(other).transformer is other


def test_rollouts_use_the_family_cfg_and_equal_the_pipeline(generator, pipe):
    """An ODE-only rollout with guidance is the pipeline's true-CFG sampling (norm rescaling included), its
    schedule shifted for the rollout's latent shape."""
    conditions, uncond = generator.encode_conditions(PROMPTS), generator.unconditional(2)
    shape = generator.latent_shape(HEIGHT, WIDTH)
    assert shape == (16, HEIGHT // 8, WIDTH // 8)
    trajectory = sample_flow_trajectories(
        generator,
        generator.trainable,
        conditions,
        uncond,
        torch.Generator().manual_seed(0),
        4,
        4.0,
        latent_shape=shape,
        sde_window=(0, 0),
    )
    reference = unpack_latents(run_pipe(pipe, trajectory.latents[:, 0], 4, 4.0), HEIGHT // 8, WIDTH // 8)
    assert torch.equal(trajectory.sigmas, pipe.scheduler.sigmas.cpu())
    assert not torch.equal(reference, trajectory.latents[:, 0])
    torch.testing.assert_close(trajectory.final, reference, atol=1e-5, rtol=0)
