"""The shipped toy audio pipeline (``assets/toyworld/audio_pipeline``, a tiny ``StableAudioPipeline``): loads through
the trainers' loader as a Stable Audio generator in fp32, samples ``[B, 1, 4096]`` audio in [-1, 1] at 4 kHz that
plain diffusers reproduces and the audio judge scores; its flow view (what the GRPO family trains); the pieces of
its training script (prompt encoding with gradients, exact resume); and the audio demo end to end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mmalign.toyworld.audio_world import AUDIO_ATTRIBUTES, AudioPrompt, all_audio_prompts, judge_audios
from mmalign.toyworld.sampling import ASSETS, evaluate_audio, sample_audio

AUDIO = Path(os.environ.get("MMALIGN_TOYWORLD_ASSETS", ASSETS)) / "audio_pipeline"
needs_audio = pytest.mark.skipif(
    not (AUDIO / "model_index.json").is_file(), reason="assets/toyworld/audio_pipeline not built"
)
PROMPTS = ["two high beeps fast", "one deep beep slow", "three shrill beeps slow"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def generator():
    from mmalign.models.generator import load_generator

    return load_generator(str(AUDIO))


@needs_audio
def test_loads_as_a_stable_audio_generator_in_fp32(generator):
    from safetensors import safe_open

    from mmalign.models.stable_audio import StableAudioGenerator

    assert isinstance(generator, StableAudioGenerator) and generator.modality == "audio"
    assert generator.sample_rate == 4000 and generator.num_samples == 4096 and generator.audio_channels == 1
    assert generator.latent_shape() == (8, 64)
    modules = [generator.transformer, generator.vae, generator.text_encoder, generator.projection_model]
    assert {p.dtype for m in modules for p in m.parameters()} == {torch.float32}
    weights = sorted(AUDIO.rglob("*.safetensors"))
    assert len(weights) == 4 and not list(AUDIO.rglob("*.bin"))
    for path in weights:
        with safe_open(str(path), "pt") as handle:
            assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"F16"}, path  # noqa: SIM118
    assert sum(p.stat().st_size for p in AUDIO.rglob("*") if p.is_file()) <= 3 * 1024 * 1024
    summary = json.loads((AUDIO / "training.json").read_text())
    assert set(summary["adherence_heldout"]) == {"guidance_1", "guidance_3"}


@needs_audio
def test_samples_audio_the_judge_scores_and_plain_diffusers_reproduces(generator):
    pytest.importorskip("torchsde")  # CosineDPMSolverMultistepScheduler's Brownian tree
    from diffusers import StableAudioPipeline

    x_T = torch.randn((3, *generator.latent_shape()), generator=torch.Generator().manual_seed(0))
    pipe = StableAudioPipeline.from_pretrained(str(AUDIO))
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(
        PROMPTS, num_inference_steps=4, guidance_scale=1.0, latents=x_T.clone(),
        generator=torch.Generator().manual_seed(5), output_type="pt",
    ).audios  # fmt: skip
    conditions = generator.encode_conditions(PROMPTS)
    ours = generator.sample(conditions, 4, 1.0, generator=torch.Generator().manual_seed(5), latents=x_T.clone())
    audio = generator.decode(ours)
    assert audio.shape == reference.shape == (3, 1, 4096)
    assert float(audio.abs().max()) <= 1.0
    assert float((audio - reference.clamp(-1, 1)).abs().max()) < 1e-4
    verdicts = judge_audios(audio, PROMPTS, generator.sample_rate)
    assert all(0.0 <= v.overall <= 1.0 for v in verdicts)

    clips = sample_audio(generator, PROMPTS + PROMPTS[:1], [1, 2, 3, 1], steps=4)
    assert clips.shape == (4, 4096) and clips.dtype == np.float32
    np.testing.assert_allclose(clips[0], clips[3], atol=1e-5)  # one prompt and seed, one clip, whatever the batch
    scores = evaluate_audio(generator, [AudioPrompt("high", 2, "fast")], 2, steps=4, guidance=3.0).scores
    assert set(scores) == {*AUDIO_ATTRIBUTES, "overall", "exact"}
    assert all(np.isfinite(v) and 0.0 <= v <= 1.0 for v in scores.values()), scores


@needs_audio
def test_flow_view_is_the_same_network_as_a_rectified_flow(generator):
    """At ``x_s = (1 − s)·x0 + s·ε`` the view's denoised estimate is the v-diffusion one at ``x_σ = x_s/(1 − s)``,
    σ = s/(1 − s), and its velocity is ``(x_s − x̂0)/s``; at s = 1 it stays finite."""
    from mmalign.models.stable_audio import StableAudioFlowView

    view = StableAudioFlowView(generator)
    assert view.parametrisation == "flow" and view.sample_rate == 4000 and view.base is generator
    conditions = generator.encode_conditions(PROMPTS[:2])
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn((2, 8, 64), generator=gen), torch.randn((2, 8, 64), generator=gen)
    with torch.no_grad():
        for s in (0.25, 0.8, 0.995):
            x_s = (1 - s) * x0 + s * eps
            sigma = torch.tensor(s / (1 - s))
            x_sigma = x_s / (1 - s)
            output = generator.predict(
                generator.transformer, generator.model_input(x_sigma, sigma), generator.timestep_of(sigma), conditions
            )
            denoised = generator.denoised(x_sigma, output, sigma)
            v = view.predict(view.trainable, x_s, torch.full((2,), s * 1000), conditions)
            torch.testing.assert_close(v, (x_s - denoised) / s, rtol=1e-4, atol=1e-4)
        assert torch.isfinite(view.predict(view.trainable, eps, 1000.0, conditions)).all()
    schedule = view.sampling_schedule(4)
    assert torch.allclose(schedule.sigmas, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    assert torch.allclose(schedule.timesteps, schedule.sigmas[:-1] * 1000)


@needs_audio
def test_training_encoding_equals_the_generator(generator):
    from mmalign.toyworld.train_audio_pipeline import encode
    from mmalign.toyworld.train_pipeline import TokenCache

    tokenizer = generator.tokenizer
    parts = {"text_encoder": generator.text_encoder, "projection_model": generator.projection_model}
    with torch.no_grad():
        ours = encode(parts, TokenCache(tokenizer)(PROMPTS), tokenizer.pad_token_id, generator.audio_end_in_s)
    expected = generator.encode_conditions(PROMPTS)
    torch.testing.assert_close(ours["encoder_hidden_states"], expected["encoder_hidden_states"], rtol=0, atol=1e-6)
    torch.testing.assert_close(ours["global"], expected["global_hidden_states"], rtol=0, atol=1e-6)


def test_tokenizer_gives_one_token_per_word():
    from mmalign.toyworld.train_audio_pipeline import audio_tokenizer

    tokenizer = audio_tokenizer(6)
    for prompt in all_audio_prompts():
        ids = tokenizer(prompt.text).input_ids
        assert len(ids) == 5 and tokenizer.unk_token_id not in ids, prompt.text


def test_training_resumes_exactly(tmp_path):
    """Four steps in one go (a checkpoint written at step 2) equal two more steps from that checkpoint."""
    from mmalign.toyworld.train_audio_pipeline import AudioPipelineRecipe, audio_tokenizer, build_parts, train_dit
    from mmalign.toyworld.train_pipeline import TokenCache

    tokenizer = audio_tokenizer(6)
    recipe = AudioPipelineRecipe(steps=4, batch=4, checkpoint_every=2, width=32, layers=1, eval_every=0)
    latents = torch.randn((16, 8, 64), generator=torch.Generator().manual_seed(0))
    prompts = all_audio_prompts()[:16]
    runs = []
    for _ in range(2):  # the second run finds the first one's checkpoint
        parts = build_parts(recipe, tokenizer)
        train_dit(parts, TokenCache(tokenizer), latents, prompts, recipe, lambda m: None, None, tmp_path / "state.pt")
        runs.append({**parts["transformer"].state_dict(), **parts["text_encoder"].state_dict()})
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


@needs_audio
def test_audio_demo_trains_and_reports(tmp_path):
    from mmalign.toyworld.audio_demo import run_audio_demo
    from mmalign.toyworld.config import DemoConfig

    config = DemoConfig(
        out=str(tmp_path),
        trainer="flow-grpo",
        heldout=2,
        train_prompts=2,
        eval_samples=1,
        sample_steps=4,
        steps=2,
        batch_size=8,
        lr=1e-4,
        lora_rank=4,
        eval_every=2,
        progress=False,
    )
    report = run_audio_demo(config, log=lambda message: None)
    assert report["training"]["steps"] == 2 and report["trainer_config"]["reward"] == "toyworld-audio-judge"
    assert report["trainer_config"]["sde_window"] == [0, 3] and report["trainer_config"]["timestep_fraction"] == 1.0
    assert set(report["after"]) == {*AUDIO_ATTRIBUTES, "overall", "exact"}
    for name in ("report.md", "report.json", "report.html", "spectrogram_before.png", "spectrogram_after.png"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    wavs = sorted((tmp_path / "audio").glob("*.wav"))
    assert len(wavs) == 4 and "audio/" in (tmp_path / "report.html").read_text()


def test_demo_world_audio_takes_the_audio_defaults():
    from mmalign.cli import build_parser
    from mmalign.commands.demo import audio_config
    from mmalign.toyworld.audio_demo import AUDIO_DEMO_DEFAULTS

    parser = build_parser()
    config = audio_config(parser.parse_args(["demo", "--world", "audio"]))
    assert all(getattr(config, key) == value for key, value in AUDIO_DEMO_DEFAULTS.items())
    config = audio_config(parser.parse_args(["demo", "--world", "audio", "--lr", "2e-3"]))
    assert (config.lr, config.out) == (2e-3, "runs/demo-audio")
