"""The Wan generator against diffusers' WanPipeline on a tiny pipeline of the real classes (UMT5, the Wan DiT, the
causal 3D VAE, the UniPC flow-sigma scheduler as Wan 2.1 ships it; 5 frames of 32x32, 16 text tokens): prompt
encoding, the Euler schedule and chain (max |Δ| printed), decoding to the canonical video tensor, the LoRA it
writes, Wan 2.2 TI2V's per-token timesteps, and the frame counts and layouts it refuses (Wan 2.2 A14B's two experts:
test_wan22.py)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from mmalign.errors import WeightsError
from mmalign.models.flow_rollout import sample_flow_trajectories
from mmalign.models.generator import load_generator
from mmalign.models.wan import WAN_LORA_TARGETS, WanGenerator
from tests import tiny

PROMPTS = ["a red apple", "  a   blue sky &amp; a green field video  "]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    return tiny.make_wan_pipeline(tmp_path_factory.mktemp("wan") / "pipe", seed=0)


@pytest.fixture(scope="module")
def wan(wan_folder):
    return load_generator(str(wan_folder))


def euler_pipeline(folder):
    """WanPipeline from the folder with its shipped UniPC scheduler swapped for the flow-matching Euler one of the
    same shift (the Euler case the generator reproduces)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    pipe = WanPipeline.from_pretrained(str(folder))
    shift = pipe.scheduler.config.flow_shift
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_loads_as_wan_with_the_folder_settings(wan, wan_folder):
    assert isinstance(wan, WanGenerator) and wan.modality == "video" and wan.parametrisation == "flow"
    assert (wan.num_frames, wan.max_sequence_length) == (5, 16)
    assert type(wan.shipped_scheduler).__name__ == "UniPCMultistepScheduler"
    assert type(wan.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and wan.scheduler.config.shift == 3.0
    assert wan.latent_shape(32, 48) == (16, 2, 4, 6)  # F' = (5 - 1) // 4 + 1
    assert wan.latent_shape(32, 32, frames=81) == (16, 21, 4, 4)
    assert wan.block_class == "WanTransformerBlock" and wan.lora_layers_key == "transformer_lora_layers"


def test_encode_conditions_equals_the_pipeline(wan, wan_folder):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(str(wan_folder))
    with torch.no_grad():  # as the pipeline's __call__ (SDPA picks another CPU kernel with autograd on)
        expected, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, max_sequence_length=16)
        uncond, _ = pipe.encode_prompt("", do_classifier_free_guidance=False, max_sequence_length=16)
    embeds = wan.encode_conditions(PROMPTS)["prompt_embeds"]
    assert embeds.shape == expected.shape == (2, 16, 32)
    torch.testing.assert_close(embeds, expected, rtol=0, atol=0)
    real = (embeds.abs().sum(dim=-1) > 0).sum(dim=1)
    assert real.tolist()[0] < 16 and bool((embeds[0, real[0] :] == 0).all())  # zeros after the real tokens
    torch.testing.assert_close(wan.unconditional(2)["prompt_embeds"], uncond.repeat(2, 1, 1), rtol=0, atol=0)


def test_schedule_equals_the_pipelines_euler_schedule(wan, wan_folder):
    pipe = euler_pipeline(wan_folder)
    for steps in (3, 10):
        pipe.scheduler.set_timesteps(steps)
        schedule = wan.sampling_schedule(steps)
        torch.testing.assert_close(schedule.timesteps, pipe.scheduler.timesteps, rtol=0, atol=0)
        torch.testing.assert_close(schedule.sigmas, pipe.scheduler.sigmas, rtol=0, atol=0)
    assert float(schedule.sigmas[0]) == 1.0 and float(schedule.sigmas[-1]) == 0.0


def test_euler_chain_and_decode_equal_the_pipeline(wan, wan_folder):
    """Three Euler steps with CFG 5 from the same initial latents: the rollout (ODE steps) against
    ``WanPipeline(..., output_type="latent")``, and the decoded video against its ``output_type="pt"`` frames."""
    steps, guidance = 3, 5.0
    shape = wan.latent_shape(32, 32)
    conditions, uncond = wan.encode_conditions(PROMPTS), wan.unconditional(len(PROMPTS))
    trajectory = sample_flow_trajectories(
        wan, wan.transformer, conditions, uncond, torch.Generator().manual_seed(7), steps, guidance,
        latent_shape=shape, sde_window=(0, 0),
    )  # fmt: skip
    assert trajectory.latents.shape == (2, steps + 1, *shape)
    pipe = euler_pipeline(wan_folder)
    seen = []

    def record(pipe, i, t, kwargs):
        seen.append(float(t))
        return {}

    common = dict(
        prompt=PROMPTS, height=32, width=32, num_frames=5, num_inference_steps=steps, guidance_scale=guidance,
        max_sequence_length=16, latents=trajectory.latents[:, 0].clone(),
    )  # fmt: skip
    latents = pipe(**common, output_type="latent", callback_on_step_end=record).frames
    delta = (trajectory.final - latents).abs().max().item()
    print(f"Wan Euler chain (3 steps, CFG 5) vs WanPipeline latents: max |delta| = {delta:.3g}")
    assert seen == trajectory.timesteps.tolist()
    torch.testing.assert_close(trajectory.final, latents, rtol=1e-5, atol=1e-5)

    video = wan.decode(trajectory.final)
    frames = pipe(**common, output_type="pt").frames
    assert video.shape == frames.shape == (2, 5, 3, 32, 32)
    assert float(video.min()) >= 0.0 and float(video.max()) <= 1.0 and video.dtype == torch.float32
    decode_delta = (video - frames).abs().max().item()
    print(f"Wan decode vs WanPipeline output_type='pt': max |delta| = {decode_delta:.3g}")
    torch.testing.assert_close(video, frames, rtol=1e-5, atol=1e-5)


def test_decode_keeps_the_graph_and_images_are_one_frame_clips(wan):
    latents = torch.randn((1, *wan.latent_shape(32, 32)), requires_grad=True)
    wan.decode(latents, grad=True).mean().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    images = torch.rand(2, 3, 32, 32)
    assert wan.to_latents(images, torch.Generator().manual_seed(0)).shape == (2, 16, 1, 4, 4)
    videos = torch.rand(1, 5, 3, 32, 32)
    assert wan.to_latents(videos, torch.Generator().manual_seed(0)).shape == (1, 16, 2, 4, 4)


def test_unsupported_frame_counts_and_sizes_are_refused(wan):
    for frames in (0, 4, 6, 80):
        with pytest.raises(ValueError, match=r"\(frames - 1\) % 4 == 0"):
            wan.latent_shape(32, 32, frames=frames)
    with pytest.raises(ValueError, match=r"got 6 \(nearest: 5 or 9\)"):
        wan.num_frames = 6
    assert wan.num_frames == 5
    with pytest.raises(ValueError, match=r"\(frames - 1\) % 4 == 0"):
        wan.to_latents(torch.rand(1, 4, 3, 32, 32))
    with pytest.raises(ValueError, match="multiples of 16"):
        wan.latent_shape(40, 32)


def test_a_second_transformer_without_boundary_ratio_is_refused_before_loading(wan_folder, tmp_path):
    """Wan 2.2 A14B's two experts load (tests/models/test_wan22.py); a transformer_2 the pipeline would never switch
    to (no boundary_ratio) is refused."""
    folder = tmp_path / "a14b"
    shutil.copytree(wan_folder, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index.update(transformer_2=["diffusers", "WanTransformer3DModel"])
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsError, match="need both transformer_2 and boundary_ratio"):
        load_generator(str(folder))
    assert not load_generator(str(wan_folder)).two_experts


def test_lora_written_by_mmalign_loads_into_wan_pipeline(wan_folder, tmp_path):
    from diffusers import WanPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from mmalign.models.generator import save_lora_weights

    generator = load_generator(str(wan_folder))  # its own copy: the adapter stays out of the shared one
    model = generator.transformer
    model.add_adapter(
        LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=list(WAN_LORA_TARGETS))
    )
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    wrapped = {n.split(".lora_")[0] for n, _ in model.named_parameters() if "lora_A" in n}
    assert len(wrapped) == len(WAN_LORA_TARGETS) * 2  # every target in both blocks
    save_lora_weights(generator, tmp_path, get_peft_model_state_dict(model), model.peft_config["default"].to_dict())
    pipe = WanPipeline.from_pretrained(str(wan_folder))
    pipe.load_lora_weights(str(tmp_path))
    conditions = generator.encode_conditions(["a red apple"])
    x = torch.randn((1, *generator.latent_shape(32, 32)), generator=torch.Generator().manual_seed(3))
    t = torch.tensor([700.0])
    with torch.no_grad():
        trained = generator.predict(model, x, t, conditions)
        loaded = generator.predict(pipe.transformer, x, t, conditions)
        pipe.transformer.disable_lora()
        base = generator.predict(pipe.transformer, x, t, conditions)
    torch.testing.assert_close(loaded, trained, rtol=1e-5, atol=1e-5)
    assert (loaded - base).abs().max() > 1e-3


def test_wan22_ti2v_per_token_timesteps_and_an_euler_folder(tmp_path):
    """A folder shipping FlowMatchEulerDiscreteScheduler with ``expand_timesteps`` (Wan 2.2 TI2V-5B's text-to-video
    mode): the same t on every latent token, equal to the pipeline's Euler chain."""
    folder = tiny.make_wan_pipeline(tmp_path / "ti2v", euler=True, expand_timesteps=True)
    generator = load_generator(str(folder))
    assert generator.expand_timesteps and type(generator.shipped_scheduler) is type(generator.scheduler)
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    conditions, uncond = generator.encode_conditions(PROMPTS[:1]), generator.unconditional(1)
    trajectory = sample_flow_trajectories(
        generator, generator.transformer, conditions, uncond, torch.Generator().manual_seed(1), 2, 4.0,
        latent_shape=generator.latent_shape(32, 32), sde_window=(0, 0),
    )  # fmt: skip
    latents = pipe(
        prompt=PROMPTS[:1], height=32, width=32, num_frames=5, num_inference_steps=2, guidance_scale=4.0,
        max_sequence_length=16, latents=trajectory.latents[:, 0].clone(), output_type="latent",
    ).frames  # fmt: skip
    delta = (trajectory.final - latents).abs().max().item()
    print(f"Wan 2.2 TI2V (expand_timesteps) Euler chain vs WanPipeline: max |delta| = {delta:.3g}")
    torch.testing.assert_close(trajectory.final, latents, rtol=1e-5, atol=1e-5)


def test_save_pipeline_keeps_the_shipped_scheduler_and_settings(wan, tmp_path):
    wan.save_pipeline(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "UniPCMultistepScheduler"]
    again = load_generator(str(tmp_path / "saved"))
    assert (again.num_frames, again.max_sequence_length) == (5, 16)
    torch.testing.assert_close(again.sampling_schedule(4).sigmas, wan.sampling_schedule(4).sigmas, rtol=0, atol=0)
