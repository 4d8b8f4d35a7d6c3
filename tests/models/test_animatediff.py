"""The AnimateDiff policy against diffusers' AnimateDiffPipeline on a tiny pipeline of the real classes (the tiny SD
UNet with a MotionAdapter merged into a UNetMotionModel, the SD VAE, CLIP, DDIM with linspace spacing; 4 frames of
32x32): prompt encoding, the DDIM chain with guidance (η 0 and 1; max |Δ| printed), decoding to the canonical video
tensor (all frames or some), per-frame encoding, the separate-adapter layout, the LoRA scopes, and refusals."""

from __future__ import annotations

import pytest
import torch

from mmalign.models import sampling
from mmalign.models.animatediff import AnimateDiffPolicy, lora_modules
from mmalign.models.generator import load_generator, parametrisation_of
from tests import tiny

PROMPTS = ["a red apple", "a blue sky"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny.make_animatediff_pipeline(tmp_path_factory.mktemp("animatediff") / "pipe", seed=0)


@pytest.fixture(scope="module")
def policy(folder):
    return load_generator(str(folder))


@pytest.fixture(scope="module")
def pipe(folder):
    from diffusers import AnimateDiffPipeline

    pipe = AnimateDiffPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _predict(policy, unet=None):
    unet = unet if unet is not None else policy.unet
    return lambda noisy, t, embeds, time_ids: policy.predict(unet, noisy, t, embeds, time_ids)


def test_loads_as_a_video_unet_policy(folder, policy):
    assert isinstance(policy, AnimateDiffPolicy) and parametrisation_of(folder) == "diffusion"
    assert policy.modality == "video" and policy.num_frames == 4  # from the folder's generator config
    assert policy.latent_shape(32, 32) == (4, 4, 16, 16)
    assert policy.pipeline_class.__name__ == "AnimateDiffPipeline"


def test_prompt_encoding_equals_the_pipelines(policy, pipe):
    with torch.no_grad():
        embeds = policy.encode_prompt(PROMPTS).hidden
        positive, negative = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
        empty = policy.unconditional(policy.encode_prompt([""] * 2)).hidden
    torch.testing.assert_close(embeds, positive, rtol=0, atol=0)
    torch.testing.assert_close(empty, negative, rtol=0, atol=0)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_chain_equals_the_pipeline(policy, pipe, eta):
    """The DDIM chain of mmalign.models.sampling (CFG 7.5, 3 steps) and AnimateDiffPipeline(output_type="latent")
    from the same seed: the same x_T, and (η = 1) the same step noise draws."""
    with torch.no_grad():
        embeds, uncond = policy.encode_prompt(PROMPTS[:1]), policy.encode_prompt([""])
        trajectory = sampling.sample_trajectories(
            policy, _predict(policy), embeds, uncond, torch.Generator().manual_seed(0), 3, 7.5, eta, 32
        )
        reference = pipe(
            PROMPTS[0], num_frames=4, height=32, width=32, num_inference_steps=3, guidance_scale=7.5, eta=eta,
            generator=torch.Generator().manual_seed(0), output_type="latent",
        ).frames  # fmt: skip
    assert trajectory.final.shape == reference.shape == (1, 4, 4, 16, 16)
    delta = float((trajectory.final - reference).abs().max())
    print(f"DDIM chain vs AnimateDiffPipeline (eta={eta}): max |Δ| = {delta:.3g} (latents up to "
          f"{float(reference.abs().max()):.3g})")  # fmt: skip
    torch.testing.assert_close(trajectory.final, reference, rtol=1e-4, atol=1e-4)


def test_decode_gives_the_canonical_video(policy, pipe):
    latents = torch.randn((2, 4, 4, 16, 16), generator=torch.Generator().manual_seed(1))
    video = policy.decode(latents)
    assert video.shape == (2, 4, 3, 32, 32) and float(video.min()) >= 0.0 and float(video.max()) <= 1.0
    with torch.no_grad():
        reference = pipe.video_processor.postprocess_video(pipe.decode_latents(latents), output_type="pt")
    delta = float((video - reference).abs().max())
    print(f"decode vs decode_latents + postprocess_video: max |Δ| = {delta:.3g}")
    torch.testing.assert_close(video, reference, rtol=1e-5, atol=1e-5)
    some = policy.decode(latents, frames=[0, 3])
    torch.testing.assert_close(some, video[:, [0, 3]], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[B, C, F, h, w\]"):
        policy.decode(latents[:, :, 0])
    grad = latents.clone().requires_grad_(True)
    policy.decode(grad, grad=True, frames=[1]).mean().backward()
    assert grad.grad[:, :, 1].abs().sum() > 0 and grad.grad[:, :, [0, 2, 3]].abs().sum() == 0


def test_videos_are_encoded_frame_by_frame_and_images_as_one_frame_clips(policy):
    pixels = torch.rand((2, 4, 3, 32, 32), generator=torch.Generator().manual_seed(2)) * 2 - 1
    mean, std = policy.latent_distribution(pixels)
    assert mean.shape == std.shape == (2, 4, 4, 16, 16)
    with torch.no_grad():
        frame = policy.vae.encode(pixels[1, 2:3]).latent_dist.mean
    torch.testing.assert_close(mean[1:2, :, 2], frame, rtol=1e-5, atol=1e-5)
    image_mean, _ = policy.latent_distribution(pixels[:, 0])
    assert image_mean.shape == (2, 4, 1, 16, 16)
    torch.testing.assert_close(image_mean[:, :, 0], mean[:, :, 0], rtol=1e-5, atol=1e-5)


def test_separate_motion_adapter_layout_loads_the_same_model(folder, policy, tmp_path):
    """A folder holding the SD UNet and the MotionAdapter apart: merged on load into the same UNetMotionModel."""
    separate = tiny.make_animatediff_pipeline(tmp_path / "separate", seed=0, separate_adapter=True)
    other = load_generator(str(separate))
    x = torch.randn((1, 4, 4, 16, 16), generator=torch.Generator().manual_seed(3))
    embeds = policy.encode_prompt(PROMPTS[:1])
    with torch.no_grad():
        a = policy.predict(policy.unet, x, torch.tensor([500]), embeds)
        b = other.predict(other.unet, x, torch.tensor([500]), embeds)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_lora_scopes(policy):
    motion = policy.lora_targets
    spatial = policy.resolve_lora_targets(["spatial"])
    assert motion and all(".motion_modules." in name for name in motion)
    assert spatial and not any("motion_modules" in name for name in spatial)
    assert all(name.endswith(("to_q", "to_k", "to_v", "to_out.0")) for name in motion + tuple(spatial))
    assert set(policy.resolve_lora_targets(["all"])) == set(motion) | set(spatial)
    assert policy.resolve_lora_targets(["motion", "conv1"]) == [*motion, "conv1"]
    assert lora_modules(policy.unet, "all") == policy.resolve_lora_targets(["all"])


def test_frame_counts_are_checked(policy):
    with pytest.raises(ValueError, match="1 to 32 frames"):
        policy.num_frames = 33
    with pytest.raises(ValueError, match="1 to 32 frames"):
        policy.latent_shape(32, 32, frames=0)
    assert policy.latent_shape(32, 32, frames=8) == (4, 8, 16, 16) and policy.num_frames == 4


def test_sd_folder_plus_motion_adapter(tmp_path):
    """``from_pretrained(sd_folder, motion_adapter=...)``: an SD 1.x pipeline and a MotionAdapter folder merged."""
    from diffusers import MotionAdapter

    from mmalign.errors import WeightsError
    from mmalign.models.builders import TINY_ANIMATEDIFF_MOTION

    sd = tiny.make_sd_pipeline(tmp_path / "sd")
    MotionAdapter(**TINY_ANIMATEDIFF_MOTION).save_pretrained(str(tmp_path / "adapter"))
    policy = AnimateDiffPolicy.from_pretrained(sd, motion_adapter=tmp_path / "adapter", num_frames=3)
    assert type(policy.unet).__name__ == "UNetMotionModel" and policy.latent_shape(16, 16) == (4, 3, 8, 8)
    with pytest.raises(WeightsError, match="needs motion_adapter="):
        AnimateDiffPolicy.from_pretrained(sd)
