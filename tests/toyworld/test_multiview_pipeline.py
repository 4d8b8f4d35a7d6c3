"""The shipped toy multi-view pipeline (``assets/toyworld/multiview_pipeline``, a T5-less ``StableDiffusion3Pipeline``
drawing 2x2 grids of 32 px views): loads through the trainers' loader, its 64 px images split into the world's four
views as the trainers split them, the multi-view judge scores them; the multi-view world in the flow pipeline's
training script (latent grids, the transformer's size); the demo trains and reports."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from mmalign.toyworld.multiview_world import MULTIVIEW_ATTRIBUTES, MultiViewPrompt, render_views
from mmalign.toyworld.sampling import ASSETS, evaluate_multiview, sample_flow

MULTIVIEW = ASSETS / "multiview_pipeline"
needs_multiview = pytest.mark.skipif(
    not (MULTIVIEW / "model_index.json").is_file(), reason="assets/toyworld/multiview_pipeline not built"
)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def generator():
    from mmalign.models.generator import load_generator

    return load_generator(str(MULTIVIEW))


@needs_multiview
def test_samples_split_into_the_judged_views(generator):
    from mmalign.models.generator import configure_output
    from mmalign.models.sd3 import SD3Generator
    from mmalign.rewards import load_reward

    assert isinstance(generator, SD3Generator) and generator.latent_shape(64, 64) == (8, 16, 16)
    summary = json.loads((MULTIVIEW / "training.json").read_text())
    assert summary["recipe"]["world"] == "multiview" and "reconstruction" in summary
    # sampling uses the σ shift it was trained with (the dot is decided above σ 0.9: mmalign/toyworld/README.md)
    assert generator.scheduler.config.shift == summary["recipe"]["shift"] > 1
    views = configure_output(generator, views_grid="2x2")
    prompts = ["a red circle with a blue dot on its left", "a green square with a yellow dot on its front"]
    sets = sample_flow(views, prompts, [3, 4], steps=3)
    assert sets.shape == (2, 4, 32, 32, 3) and sets.dtype == np.uint8
    result = evaluate_multiview(generator, [MultiViewPrompt("red", "circle", "blue", "left")], 2, seed=0, steps=3)
    assert result.clips.shape == (2, 4, 32, 32, 3) and result.images.shape == (2, 64, 64, 3)
    assert set(result.scores) == {*MULTIVIEW_ATTRIBUTES, "overall", "exact"}
    # the registered judge reward scores the trainers' view tensors as the evaluation's judge does
    tensor = torch.from_numpy(result.clips).permute(0, 1, 4, 2, 3).float() / 255
    judged = load_reward("toyworld-multiview-judge").score(tensor, [p.text for p in result.prompts])
    assert judged.tolist() == [v.overall for v in result.verdicts]


def test_training_script_draws_the_multiview_world(tmp_path):
    """The flow pipeline script with ``world=multiview``: latents of 2x2 grid renders, a transformer of the latent
    grid's size that trains on them, noisy captions of the world's grammar, reconstructions judged."""
    from transformers import CLIPTokenizer

    from mmalign.toyworld.multiview_world import parse_multiview_prompt
    from mmalign.toyworld.train_flow_pipeline import (
        FlowPipelineRecipe,
        build_parts,
        flow_world,
        reconstruction_scores,
        train_flow,
        write_small_tokenizer,
    )
    from mmalign.toyworld.train_pipeline import TokenCache, latent_pool

    world = flow_world("multiview")
    source = ASSETS / "pipeline" / "tokenizer"
    if not source.is_dir():
        pytest.skip("assets/toyworld not built")
    tokenizers = [CLIPTokenizer.from_pretrained(str(source))]
    tokenizers.append(CLIPTokenizer.from_pretrained(str(write_small_tokenizer(tmp_path / "t2", source, world.words()))))
    for text in ("a red circle with a blue dot on its back", "a yellow triangle with a green dot on its right"):
        assert tokenizers[1].unk_token_id not in tokenizers[1](text).input_ids[1:-1]
    recipe = FlowPipelineRecipe(
        world="multiview", steps=2, batch=4, width=32, layers=1, patch_size=2, vae_steps=1, vae_batch=2
    )
    parts = build_parts(recipe, tokenizers[1])
    assert parts["transformer"].config.sample_size == 16 and parts["transformer"].config.pos_embed_max_size == 8
    vae = parts["vae"].eval()
    latents, prompts = latent_pool(vae, 6, 0, world.random_prompt, world.render)
    assert latents.shape == (6, 8, 16, 16) and all(isinstance(p, MultiViewPrompt) for p in prompts)
    captions = []
    corrupt = lambda p, rng, rate: captions.append(world.corrupt(p, rng, rate)) or captions[-1]  # noqa: E731
    before = parts["transformer"].proj_out.weight.clone()
    train_flow(parts, [TokenCache(t) for t in tokenizers], latents, prompts, recipe, lambda m: None, corrupt=corrupt)
    assert not torch.equal(before, parts["transformer"].proj_out.weight)
    assert captions and all(parse_multiview_prompt(c.text) == c for c in captions)
    scores = reconstruction_scores(vae, world, seed=0, count=2)
    assert set(scores) == {*MULTIVIEW_ATTRIBUTES, "overall", "exact"}
    assert world.judge(world.render(prompts[0], random.Random(0)), prompts[0]).exact == 1.0


@needs_multiview
def test_multiview_demo_trains_and_reports(tmp_path):
    from mmalign.toyworld.config import DemoConfig
    from mmalign.toyworld.multiview_demo import run_multiview_demo

    config = DemoConfig(
        out=str(tmp_path), trainer="flow-grpo", heldout=2, train_prompts=2, eval_samples=1, sample_steps=4, steps=2,
        batch_size=8, lr=1e-4, lora_rank=4, eval_every=2, progress=False,
    )  # fmt: skip
    report = run_multiview_demo(config, log=lambda message: None)
    assert report["training"]["steps"] == 2 and report["trainer_config"]["reward"] == "toyworld-multiview-judge"
    assert report["trainer_config"]["views_grid"] == "2x2" and report["trainer_config"]["resolution"] == 64
    # the SDE on the first 3 steps, the ODE after them, all 3 trained
    assert report["trainer_config"]["sde_window"] == [0, 3] and report["trainer_config"]["timestep_fraction"] == 1.0
    assert set(report["after"]) == {*MULTIVIEW_ATTRIBUTES, "overall", "exact"}
    for name in ("report.md", "report.json", "grid_before.png", "lora/pytorch_lora_weights.safetensors"):
        assert (tmp_path / name).is_file(), name


def test_demo_world_multiview_takes_its_defaults():
    from mmalign.cli import build_parser
    from mmalign.commands.demo import multiview_config
    from mmalign.toyworld.multiview_demo import MULTIVIEW_DEMO_DEFAULTS

    parser = build_parser()
    config = multiview_config(parser.parse_args(["demo", "--world", "multiview"]))
    assert all(getattr(config, key) == value for key, value in MULTIVIEW_DEMO_DEFAULTS.items())
    config = multiview_config(parser.parse_args(["demo", "--world", "multiview", "--trainer", "diffusionnft"]))
    assert (config.trainer, config.out) == ("diffusionnft", "runs/demo-multiview")
    assert render_views(MultiViewPrompt("red", "circle", "blue", "left"), 0).shape == (4, 32, 32, 3)


def test_trained_step_options_window_only_where_the_trainer_has_a_fixed_one():
    """``sde_steps`` gives Flow-GRPO a fixed SDE window, every step of it trained (``timestep_fraction`` 1: with 0.3
    a 3-step window would train int(0.9) -> 1 step); trainers without a fixed window keep the noisiest 30 %."""
    from mmalign.toyworld.flow_demo import trained_step_options

    assert trained_step_options("flow-grpo", 3) == ["sde_window=[0,3]", "timestep_fraction=1.0"]
    assert trained_step_options("flow-grpo") == ["timestep_fraction=0.3"]
    for trainer in ("diffusionnft", "flow-grpo-fast", "mix-grpo"):
        assert trained_step_options(trainer, 3) == ["timestep_fraction=0.3"], trainer


def test_dot_masks_lie_over_the_pool_renders():
    """``pool_masks`` with the world's ``dot_mask_grid`` marks exactly the dot-coloured pixels of the renders that
    ``latent_pool`` encodes (same prompts, same draws); the loss weights cover those pixels' latent cells."""
    from mmalign.toyworld.train_flow_pipeline import feature_weights, flow_world
    from mmalign.toyworld.train_pipeline import latent_pool, pool_masks
    from mmalign.toyworld.world import COLORS

    class Recorder:  # a VAE stand-in that keeps what latent_pool encodes
        config = type("Config", (), {"scaling_factor": 1.0})
        pixels: list = []

        def encode(self, pixels):
            self.pixels.append(pixels)
            return type("Out", (), {"latent_dist": type("Dist", (), {"mean": pixels[:, :, ::4, ::4]})})

    world = flow_world("multiview")
    _, prompts = latent_pool(Recorder(), 12, 3, world.random_prompt, world.render)
    renders = ((torch.cat(Recorder.pixels) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    masks = pool_masks(12, 3, world.random_prompt, world.feature_mask)
    assert masks.shape == (12, 64, 64) and masks.dtype == torch.bool
    for render, mask, prompt in zip(renders, masks.numpy(), prompts):
        dot = (render == np.array(COLORS[prompt.dot])).all(-1)
        assert dot.sum() == 3 * 16 and np.array_equal(mask, dot)  # three views show the 4x4 dot
    weights = feature_weights(masks, 16, 8.0)
    assert weights.shape == (12, 1, 16, 16) and set(weights.unique().tolist()) == {1.0, 9.0}
    cells = torch.nn.functional.interpolate(weights, scale_factor=4)[:, 0] == 9.0  # each cell's 4x4 pixels
    assert bool(cells[masks].all())  # every dot pixel lies in a weighted cell ...
    assert int(cells.sum()) <= 4 * 16 * int(masks.sum()) // 16  # ... and no more cells than the dots touch


def test_feature_weighted_loss_is_the_weighted_mean_square():
    """The loss of ``feature_weight``: mean over cells and channels of w · (v̂ − (ε − x0))², written out per
    element; no weights is the plain MSE."""
    from mmalign.toyworld.train_pipeline import rectified_flow_loss

    gen = torch.Generator().manual_seed(0)
    pred, noise, x0 = (torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    weights = 1 + 5 * (torch.rand(2, 1, 4, 4, generator=gen, dtype=torch.float64) > 0.8)
    total = 0.0
    for b, c, y, x in np.ndindex(2, 3, 4, 4):
        total += float(weights[b, 0, y, x]) * float(pred[b, c, y, x] - (noise[b, c, y, x] - x0[b, c, y, x])) ** 2
    assert float(rectified_flow_loss(pred, noise, x0, weights)) == pytest.approx(total / 96, rel=1e-12)
    plain = sum(float(pred[i] - (noise[i] - x0[i])) ** 2 for i in np.ndindex(2, 3, 4, 4)) / 96
    assert float(rectified_flow_loss(pred, noise, x0)) == pytest.approx(plain, rel=1e-12)


@needs_multiview
def test_init_continues_from_the_saved_pipeline(generator):
    """``init``: the parts are the saved pipeline's, in fp32 (its fp16 weights exactly); a recipe that does not
    describe the saved transformer is refused (training.json records it)."""
    from mmalign.toyworld.train_flow_pipeline import FlowPipelineRecipe, build_parts

    parts = build_parts(FlowPipelineRecipe(world="multiview", init=str(MULTIVIEW), patch_size=2), tokenizer_2=None)
    for name, module in (("transformer", generator.transformer), ("text_encoder_2", generator.text_encoders[1])):
        saved = module.state_dict()
        assert all(
            v.dtype == torch.float32 and torch.equal(v, saved[k]) for k, v in parts[name].state_dict().items()
        ), name
    assert parts["vae"].config.shift_factor == generator.vae.config.shift_factor
    with pytest.raises(ValueError, match="patch_size 1 .the saved transformer's: 2."):
        build_parts(FlowPipelineRecipe(world="multiview", init=str(MULTIVIEW), patch_size=1), tokenizer_2=None)
