"""The shipped toy video pipeline (``assets/toyworld/video_pipeline``, a tiny ``WanPipeline``): loads through the
trainers' loader as a Wan generator in fp32, samples ``[B, 5, 3, 32, 32]`` videos in [0, 1] that plain diffusers
reproduces and the video judge scores; and the pieces of its training script (prompt encoding with gradients,
exact resume)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmalign.toyworld.sampling import ASSETS, evaluate_video, sample_flow
from mmalign.toyworld.video_world import VIDEO_ATTRIBUTES, VideoPrompt, all_video_prompts, judge_clips

VIDEO = ASSETS / "video_pipeline"
needs_video = pytest.mark.skipif(
    not (VIDEO / "model_index.json").is_file(), reason="assets/toyworld/video_pipeline not built"
)
PROMPTS = ["two red circles moving right", "one blue square moving up", "three green triangles moving left"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def generator():
    from mmalign.models.generator import load_generator

    return load_generator(str(VIDEO))


@needs_video
def test_loads_as_a_wan_generator_in_fp32(generator):
    from safetensors import safe_open

    from mmalign.models.wan import WanGenerator

    assert isinstance(generator, WanGenerator) and generator.modality == "video"
    assert generator.num_frames == 5 and generator.max_sequence_length == 8
    assert generator.latent_shape(32, 32) == (8, 2, 8, 8)
    modules = [generator.transformer, generator.vae, generator.text_encoders[0]]
    assert {p.dtype for m in modules for p in m.parameters()} == {torch.float32}
    weights = sorted(VIDEO.rglob("*.safetensors"))
    assert len(weights) == 3 and not list(VIDEO.rglob("*.bin"))
    for path in weights:
        with safe_open(str(path), "pt") as handle:
            assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"F16"}, path  # noqa: SIM118
    assert sum(p.stat().st_size for p in VIDEO.rglob("*") if p.is_file()) <= 8 * 1024 * 1024
    summary = json.loads((VIDEO / "training.json").read_text())
    assert set(summary["adherence_heldout"]) == {"guidance_1", "guidance_3"}


@needs_video
def test_samples_videos_the_judge_scores_and_plain_diffusers_reproduces(generator):
    from diffusers import WanPipeline

    x = torch.randn((2, *generator.latent_shape(32, 32)), generator=torch.Generator().manual_seed(0))
    video = generator.decode(x)
    assert video.shape == (2, 5, 3, 32, 32) and 0.0 <= float(video.min()) <= float(video.max()) <= 1.0
    verdicts = judge_clips(video, PROMPTS[:2])
    assert all(0.0 <= v.overall <= 1.0 for v in verdicts)

    clips = sample_flow(generator, PROMPTS + PROMPTS[:1], [1, 2, 3, 1], steps=4)
    assert clips.shape == (4, 5, 32, 32, 3) and clips.dtype == np.uint8
    np.testing.assert_array_equal(clips[0], clips[3])  # one prompt and seed, one clip, whatever the batch
    pipe = WanPipeline.from_pretrained(str(VIDEO))
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(
        PROMPTS,
        height=32,
        width=32,
        num_frames=5,
        num_inference_steps=4,
        guidance_scale=1.0,
        generator=[torch.Generator().manual_seed(s) for s in (1, 2, 3)],
        max_sequence_length=generator.max_sequence_length,
        output_type="np",
    ).frames
    reference = np.clip(np.rint(reference * 255), 0, 255).astype(np.uint8)
    assert reference.shape == (3, 5, 32, 32, 3)
    assert np.abs(reference.astype(int) - clips[:3].astype(int)).max() <= 1


@needs_video
def test_judge_adherence_of_a_few_samples_is_a_number(generator):
    prompts = [VideoPrompt("red", "circle", 1, "left"), VideoPrompt("yellow", "square", 2, "down")]
    for guidance in (1.0, 3.0):
        scores = evaluate_video(generator, prompts, samples_per_prompt=2, steps=4, guidance=guidance).scores
        assert set(scores) == {*VIDEO_ATTRIBUTES, "overall", "exact"}
        assert all(np.isfinite(v) and 0.0 <= v <= 1.0 for v in scores.values()), scores


@needs_video
def test_training_encoding_equals_the_generator(generator):
    from mmalign.toyworld.train_pipeline import TokenCache
    from mmalign.toyworld.train_video_pipeline import encode

    texts = PROMPTS + [""]
    tokenizer = generator.tokenizers[0]
    with torch.no_grad():
        embeds = encode(generator.text_encoders[0], TokenCache(tokenizer)(texts), tokenizer.pad_token_id)
    torch.testing.assert_close(embeds, generator.encode_conditions(texts)["prompt_embeds"], rtol=0, atol=1e-6)


def test_tokenizer_gives_one_token_per_word():
    from mmalign.toyworld.train_video_pipeline import video_tokenizer

    tokenizer = video_tokenizer(8)
    for prompt in all_video_prompts():
        ids = tokenizer(prompt.text).input_ids
        assert len(ids) == 6 and tokenizer.unk_token_id not in ids, prompt.text


def test_training_resumes_exactly(tmp_path):
    """Four steps in one go (a checkpoint written at step 2) equal two more steps from that checkpoint."""
    from mmalign.toyworld.train_pipeline import TokenCache
    from mmalign.toyworld.train_video_pipeline import VideoPipelineRecipe, build_parts, train_flow, video_tokenizer

    tokenizer = video_tokenizer(8)
    recipe = VideoPipelineRecipe(steps=4, batch=4, checkpoint_every=2, width=32, layers=1)
    latents = torch.randn((16, 8, 2, 8, 8), generator=torch.Generator().manual_seed(0))
    prompts = all_video_prompts()[:16]
    runs = []
    for _ in range(2):  # the second run finds the first one's checkpoint
        parts = build_parts(recipe, tokenizer)
        train_flow(parts, TokenCache(tokenizer), latents, prompts, recipe, lambda m: None, tmp_path / "state.pt")
        runs.append({**parts["transformer"].state_dict(), **parts["text_encoder"].state_dict()})
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


@needs_video
def test_video_demo_trains_and_reports(tmp_path):
    from mmalign.toyworld.config import DemoConfig
    from mmalign.toyworld.video_demo import run_video_demo

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
    report = run_video_demo(config, log=lambda message: None)
    assert report["training"]["steps"] == 2 and report["trainer_config"]["reward"] == "toyworld-video-judge"
    assert report["trainer_config"]["sde_window"] == [0, 3] and report["trainer_config"]["timestep_fraction"] == 1.0
    assert set(report["after"]) == {*VIDEO_ATTRIBUTES, "overall", "exact"}
    assert (tmp_path / "report.md").is_file() and (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_demo_world_video_takes_the_video_defaults():
    from mmalign.cli import build_parser
    from mmalign.commands.demo import video_config
    from mmalign.toyworld.video_demo import VIDEO_DEMO_DEFAULTS

    parser = build_parser()
    config = video_config(parser.parse_args(["demo", "--world", "video"]))
    assert all(getattr(config, key) == value for key, value in VIDEO_DEMO_DEFAULTS.items())
    config = video_config(parser.parse_args(["demo", "--world", "video", "--trainer", "diffusionnft"]))
    assert (config.trainer, config.out) == ("diffusionnft", "runs/demo-video")
