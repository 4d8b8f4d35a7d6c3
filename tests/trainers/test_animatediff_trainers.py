"""The UNet trainers on the tiny AnimateDiff pipeline (latents [B, C, F, h, w], 4 frames of 16x16, motion-module
LoRA): Diffusion-DPO on video pairs, DDPO on its DDIM chains (with leading spacing: AnimateDiff's linspace
schedule ends with a deterministic step, refused), DRaFT through the per-frame decoder on a subset of the frames
(VADER-style), each changing every trainable parameter; the LoRA written loads into AnimateDiffPipeline."""

from __future__ import annotations

import pytest
import torch

from mmalign.errors import ConfigError
from tests.trainers.conftest import Brightness

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def animatediff_folder(tmp_path_factory):
    from tests import tiny

    return tiny.make_animatediff_pipeline(tmp_path_factory.mktemp("animatediff") / "pipe", seed=0)  # 4 frames


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a red apple\na blue sky\n")
    return path


@pytest.fixture(scope="module")
def video_pairs(tmp_path_factory):
    from tests.data.test_media_pairs import write_video_pairs

    return write_video_pairs(tmp_path_factory.mktemp("video-pairs"), count=2, frames=4)[0]


def _unchanged(trainer, before):
    return sorted(k for k, v in trainer._trainable_state().items() if torch.equal(before[k], v))


def test_diffusion_dpo_trains_animatediff_on_video_pairs(animatediff_folder, video_pairs, tmp_path):
    from PIL import Image

    from tests.trainers.test_training import make_trainer

    trainer = make_trainer(
        animatediff_folder, video_pairs, tmp_path, "trainer=dpo", "lr=1e-2", "beta=100", "resolution=16",
        "validation_prompts=[a red apple]", "sample_steps=2", "guidance=2.0",
    )  # fmt: skip
    assert trainer.make_batch(0)["latents_w"].shape == (2, 4, 4, 8, 8)  # [B, C, F, h, w]
    assert all(".motion_modules." in name for name in trainer.trainable_names)
    before = {k: v.clone() for k, v in trainer._trainable_state().items()}
    summary = trainer.train()
    assert not _unchanged(trainer, before)
    assert summary["skipped_steps"] == 0
    assert Image.open(trainer.sample_grid()).size == (4 * 16, 16)  # the 4 frames in a row


def test_ddpo_trains_animatediff_with_leading_spacing(animatediff_folder, prompts, tmp_path):
    from tests.trainers.test_online import make

    with pytest.raises(ConfigError, match=r"step\(s\) \[1\] .*\(linspace spacing.*timestep_spacing=leading"):
        make("ddpo", animatediff_folder, prompts, tmp_path / "refused", "resolution=16", reward=Brightness())
    trainer = make(
        "ddpo", animatediff_folder, prompts, tmp_path / "ddpo", "resolution=16", "lr=1e-2", "timestep_spacing=leading",
        reward=Brightness(),
    )  # fmt: skip
    assert trainer.latent_shape == (4, 4, 8, 8)
    before = {k: v.clone() for k, v in trainer._trainable_state().items()}
    summary = trainer.train()
    assert not _unchanged(trainer, before)
    assert summary["skipped_steps"] == 0 and all(torch.isfinite(torch.tensor(r["loss"])) for r in summary["history"])


def test_draft_trains_animatediff_on_some_frames_and_its_lora_loads_into_the_pipeline(
    animatediff_folder, prompts, tmp_path
):
    from diffusers import AnimateDiffPipeline

    from tests.trainers.test_online import make

    trainer = make(
        "draft", animatediff_folder, prompts, tmp_path, "resolution=16", "lr=1e-2", "reward_frames=2",
        reward=Brightness(),
    )  # fmt: skip
    decoded = []
    original = trainer.policy.decode

    def recording(latents, **options):
        decoded.append(options.get("frames"))
        return original(latents, **options)

    trainer.policy.decode = recording
    before = {k: v.clone() for k, v in trainer._trainable_state().items()}
    trainer.train()
    assert decoded and all(frames == [0, 3] for frames in decoded)  # first and last of 4 frames
    assert not _unchanged(trainer, before)
    pipe = AnimateDiffPipeline.from_pretrained(str(animatediff_folder))
    pipe.load_lora_weights(str(tmp_path))
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    embeds = trainer._embeds(["a red apple"])
    x = torch.randn((1, 4, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    t = torch.tensor([700])
    with torch.no_grad():
        trained = trainer.policy.predict(model, x, t, embeds)
        loaded = trainer.policy.predict(pipe.unet, x, t, embeds)
        base = trainer.policy.predict(AnimateDiffPipeline.from_pretrained(str(animatediff_folder)).unet, x, t, embeds)
    moved, error = float((trained - base).abs().max()), float((loaded - trained).abs().max())
    assert error < 1e-5 and moved > 100 * error, (moved, error)  # the trained UNet's outputs, not the base's


def test_spatial_lora_scope_and_frame_options(animatediff_folder, prompts, video_pairs, tmp_path):
    from tests.trainers.test_online import make

    trainer = make(
        "draft", animatediff_folder, prompts, tmp_path / "s", "resolution=16", "lora_targets=[spatial]", "frames=2",
        reward=Brightness(),
    )  # fmt: skip
    assert trainer.trainable_names and not any("motion_modules" in n for n in trainer.trainable_names)
    assert trainer.latent_shape == (4, 2, 8, 8)
    with pytest.raises(ConfigError, match="frames=33: AnimateDiff makes 1 to 32 frames"):
        make("draft", animatediff_folder, prompts, tmp_path / "f", "frames=33", reward=Brightness())
