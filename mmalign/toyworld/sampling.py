"""Sample a toyworld pipeline with per-image seeds and score the samples with the judge."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import GUIDANCE, SAMPLE_STEPS
from .judge import Verdict, judge, mean_scores
from .world import Prompt

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "toyworld"


def asset_dir(name: str) -> Path:
    """``assets/toyworld/<name>`` of the checkout, or of ``$MMALIGN_TOYWORLD_ASSETS`` when set."""
    root = Path(os.environ.get("MMALIGN_TOYWORLD_ASSETS", ASSETS))
    path = root / name
    if not path.is_dir():
        from ..errors import WeightsError

        raise WeightsError(
            f"{path}: toyworld asset folder not found; run from a checkout of mmalign, set "
            "MMALIGN_TOYWORLD_ASSETS to the folder holding pipeline/, flow_pipeline/ and reward/, or rebuild them "
            "with `python -m mmalign.toyworld.train_pipeline`, `python -m mmalign.toyworld.train_flow_pipeline` "
            "and `python -m mmalign.toyworld.train_reward`"
        )
    return path


@contextmanager
def threads(count: int):
    """Run torch with ``count`` intra-op threads (0: leave as is)."""
    previous = torch.get_num_threads()
    if count > 0:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def load_pipeline(
    folder: str | os.PathLike | None = None, lora: str | os.PathLike | Sequence[str | os.PathLike] | None = None
):
    """The shipped toyworld ``StableDiffusionPipeline`` (fp32, CPU, no progress bars), optionally with a LoRA, or
    with several LoRAs active together (the demo's rounds: each trained on the previous ones fused in; LoRA
    updates add, so stacking them equals fusing them)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        str(folder or asset_dir("pipeline")), dtype=torch.float32, safety_checker=None
    )
    pipe.set_progress_bar_config(disable=True)
    if lora:
        from diffusers.utils import logging as diffusers_logging

        level = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # "no LoRA keys for CLIPTextModel": this LoRA is UNet-only
        try:
            if isinstance(lora, (str, os.PathLike)):
                pipe.load_lora_weights(str(lora))
            else:
                names = [f"round-{i}" for i in range(len(lora))]
                with warnings.catch_warnings():  # peft: "multiple adapters in the model" - that is the intent
                    warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                    for name, path in zip(names, lora):
                        pipe.load_lora_weights(str(path), adapter_name=name)
                pipe.set_adapters(names, [1.0] * len(names))
        finally:
            diffusers_logging.set_verbosity(level)
    return pipe


@torch.no_grad()
def sample(
    pipe: Any,
    prompts: Sequence[str | Prompt],
    seeds: Sequence[int],
    steps: int = SAMPLE_STEPS,
    guidance: float = GUIDANCE,
    batch_size: int = 64,
) -> np.ndarray:
    """``uint8 [N, H, W, 3]`` images; image ``i`` depends only on ``prompts[i]``, ``seeds[i]`` and the model."""
    texts = [p.text if isinstance(p, Prompt) else str(p) for p in prompts]
    if len(texts) != len(seeds):
        raise ValueError(f"{len(texts)} prompts but {len(seeds)} seeds")
    out = []
    for start in range(0, len(texts), batch_size):
        chunk = slice(start, start + batch_size)
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds[chunk]]
        images = pipe(
            texts[chunk],
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generators,
            output_type="np",
        ).images
        out.append(np.clip(np.rint(images * 255), 0, 255).astype(np.uint8))
    return np.concatenate(out) if out else np.empty((0, 0, 0, 3), dtype=np.uint8)


def evaluation_seeds(prompts: Sequence, samples_per_prompt: int, seed: int) -> tuple[list, list[int]]:
    """Every prompt ``samples_per_prompt`` times, and the fixed seed ``seed * 100003 + i`` of sample ``i``: what
    every evaluation of the toy worlds samples."""
    expanded = [p for p in prompts for _ in range(samples_per_prompt)]
    return expanded, [seed * 100_003 + i for i in range(len(expanded))]


@dataclass
class Evaluation:
    """Judge scores of ``images`` (``uint8 [N, H, W, 3]``) sampled for ``prompts``."""

    prompts: list[Prompt]
    seeds: list[int]
    images: np.ndarray
    verdicts: list[Verdict]

    @property
    def scores(self) -> dict[str, float]:
        return mean_scores(self.verdicts)


def evaluate(
    pipe: Any,
    prompts: Sequence[Prompt],
    samples_per_prompt: int = 4,
    seed: int = 0,
    steps: int = SAMPLE_STEPS,
    guidance: float = GUIDANCE,
) -> Evaluation:
    """Sample every prompt ``samples_per_prompt`` times with fixed seeds (``seed * 100003 + i``) and judge."""
    expanded, seeds = evaluation_seeds(prompts, samples_per_prompt, seed)
    images = sample(pipe, expanded, seeds, steps=steps, guidance=guidance)
    return Evaluation(expanded, seeds, images, [judge(image, p) for image, p in zip(images, expanded)])


# -------------------------------------------------------------------------------- flow-matching generators


def load_flow_generator(folder: str | os.PathLike | None = None):
    """The shipped toyworld flow-matching pipeline (``assets/toyworld/flow_pipeline``, a T5-less
    ``StableDiffusion3Pipeline``) as a :class:`mmalign.models.sd3.SD3Generator` (fp32, CPU), through
    :func:`mmalign.models.generator.load_generator`: the loader the flow trainers use."""
    from ..models.generator import load_generator

    return load_generator(str(folder or asset_dir("flow_pipeline")))


@torch.no_grad()
def sample_flow(
    generator: Any,
    prompts: Sequence[str | Prompt],
    seeds: Sequence[int],
    steps: int = SAMPLE_STEPS,
    guidance: float = GUIDANCE,
    batch_size: int = 64,
    model: torch.nn.Module | None = None,
) -> np.ndarray:
    """``uint8 [N, H, W, 3]`` Euler-ODE samples of a flow-matching generator (videos of a video generator such as
    Wan: ``uint8 [N, T, H, W, 3]``, its :attr:`num_frames` frames) (``model``: its trainable module by
    default, or e.g. a LoRA-wrapped copy); image ``i`` starts from ``torch.randn`` of the generator seeded with
    ``seeds[i]``, as the diffusers pipeline draws it for a list of generators, and depends only on ``prompts[i]``,
    ``seeds[i]`` and the model. The steps are those of the GRPO trainers' rollouts outside their SDE window
    (:func:`mmalign.models.flow_rollout.guided_velocity`, :func:`mmalign.models.flow_sampling.flow_ode_step`)."""
    from ..models.flow_rollout import guided_velocity
    from ..models.flow_sampling import flow_ode_step
    from .world import CANVAS

    texts = [p.text if isinstance(p, Prompt) else str(p) for p in prompts]
    if len(texts) != len(seeds):
        raise ValueError(f"{len(texts)} prompts but {len(seeds)} seeds")
    model = generator.trainable if model is None else model
    # a view-grid generator (ViewGridGenerator) draws rows x cols views of the canvas as one image
    shape = generator.latent_shape(CANVAS * getattr(generator, "rows", 1), CANVAS * getattr(generator, "cols", 1))
    schedule = generator.sampling_schedule(steps)
    out = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        draws = [
            torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds[start:][: len(chunk)]
        ]
        x = torch.stack(draws).to(generator.device)
        conditions = generator.encode_conditions(chunk)
        uncond = None if guidance == 1.0 else generator.unconditional(len(chunk))
        for j, t in enumerate(schedule.timesteps):
            v = guided_velocity(generator, model, x, t, conditions, uncond, guidance)
            x = flow_ode_step(x, v, schedule.sigmas[j], schedule.sigmas[j + 1])
        # images [N, H, W, 3], videos [N, T, H, W, 3], view sets [N, V, h, w, 3]
        images = generator.decode(x).movedim(-3, -1).cpu().numpy()
        out.append(np.clip(np.rint(images * 255), 0, 255).astype(np.uint8))
    return np.concatenate(out) if out else np.empty((0, 0, 0, 3), dtype=np.uint8)


def evaluate_flow(
    generator: Any,
    prompts: Sequence[Prompt],
    samples_per_prompt: int = 4,
    seed: int = 0,
    steps: int = SAMPLE_STEPS,
    guidance: float = GUIDANCE,
    model: torch.nn.Module | None = None,
) -> Evaluation:
    """:func:`evaluate` for a flow-matching generator: :func:`sample_flow` with the same seeds, then the judge."""
    return judged_samples(generator, prompts, samples_per_prompt, seed, steps, guidance, model, judge, Evaluation)


def judged_samples(
    generator: Any,
    prompts: Sequence,
    samples_per_prompt: int,
    seed: int,
    steps: int,
    guidance: float,
    model: torch.nn.Module | None,
    judge_one: Callable[[Any, Any], Any],
    result: type,
) -> Any:
    """The flow generators' evaluation: every prompt ``samples_per_prompt`` times with the fixed seeds of
    :func:`evaluation_seeds`, :func:`sample_flow`, ``judge_one(sample, prompt)`` on each; returned as
    ``result(prompts, seeds, samples, verdicts)``."""
    expanded, seeds = evaluation_seeds(prompts, samples_per_prompt, seed)
    samples = sample_flow(generator, expanded, seeds, steps=steps, guidance=guidance, model=model)
    return result(expanded, seeds, samples, [judge_one(s, p) for s, p in zip(samples, expanded)])


@dataclass
class ClipEvaluation:
    """Judge verdicts of ``clips`` sampled for ``prompts`` with ``seeds``; :attr:`scores` their means."""

    prompts: list
    seeds: list[int]
    clips: np.ndarray
    verdicts: list

    @property
    def scores(self) -> dict[str, float]:
        return mean_scores(self.verdicts)


@dataclass
class VideoEvaluation(ClipEvaluation):
    """Judge scores (:func:`mmalign.toyworld.video_world.judge_clip`) of ``clips`` (``uint8 [N, T, H, W, 3]``)
    sampled for ``prompts``."""


def evaluate_video(
    generator: Any,
    prompts: Sequence,
    samples_per_prompt: int = 4,
    seed: int = 0,
    steps: int = 10,
    guidance: float = GUIDANCE,
    model: torch.nn.Module | None = None,
) -> VideoEvaluation:
    """:func:`evaluate_flow` for a video generator (the toy video pipeline) and prompts of the toy video world: the
    same seeds, :func:`sample_flow`, then the video judge."""
    from .video_world import judge_clip

    return judged_samples(
        generator, prompts, samples_per_prompt, seed, steps, guidance, model, judge_clip, VideoEvaluation
    )


@dataclass
class MultiViewEvaluation(ClipEvaluation):
    """Judge scores (:func:`mmalign.toyworld.multiview_world.judge_views`) of view sets (``clips``: ``uint8 [N, V,
    h, w, 3]``) sampled for ``prompts``."""

    @property
    def images(self) -> np.ndarray:
        """The view sets as the 2x2 grid images the generator drew (``uint8 [N, 2h, 2w, 3]``: report figures)."""
        from .multiview_world import join_grid

        return np.stack([join_grid(views) for views in self.clips])


def evaluate_multiview(
    generator: Any,
    prompts: Sequence,
    samples_per_prompt: int = 4,
    seed: int = 0,
    steps: int = 10,
    guidance: float = GUIDANCE,
    model: torch.nn.Module | None = None,
) -> MultiViewEvaluation:
    """:func:`evaluate_flow` for the toy multi-view world: the generator's images read as its 2x2 grid of views (an
    image generator is wrapped in a :class:`~mmalign.models.view_grid.ViewGridGenerator`), the same seeds,
    :func:`sample_flow`, then the multi-view judge."""
    from ..models.view_grid import ViewGridGenerator
    from .multiview_world import GRID, judge_views

    if getattr(generator, "modality", "image") == "image":
        generator = ViewGridGenerator(generator, GRID)
    return judged_samples(
        generator, prompts, samples_per_prompt, seed, steps, guidance, model, judge_views, MultiViewEvaluation
    )


# -------------------------------------------------------------------------------- audio generators


@torch.no_grad()
def sample_audio(
    generator: Any,
    prompts: Sequence,
    seeds: Sequence[int],
    steps: int = 10,
    guidance: float = GUIDANCE,
    batch_size: int = 64,
    model: torch.nn.Module | None = None,
) -> np.ndarray:
    """``float32 [N, S]`` mono waveforms (channels averaged) in [-1, 1] at the generator's sample rate: the
    pipeline's own sampler (:meth:`mmalign.models.stable_audio.StableAudioGenerator.sample`) as its deterministic
    DPM-Solver++(2M) ODE (``noise="none"``) over ``steps`` steps from ``torch.randn`` of the generator seeded with
    ``seeds[i]`` (``model``: its transformer by default, or e.g. a LoRA-wrapped copy); clip ``i`` depends only on
    ``prompts[i]``, ``seeds[i]`` and the model."""
    texts = [getattr(p, "text", str(p)) for p in prompts]
    if len(texts) != len(seeds):
        raise ValueError(f"{len(texts)} prompts but {len(seeds)} seeds")
    shape = generator.latent_shape()
    out = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        draws = [
            torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds[start:][: len(chunk)]
        ]
        conditions = generator.encode_conditions(chunk).to(generator.device)
        latents = generator.sample(
            conditions, steps=steps, guidance=guidance, latents=torch.stack(draws), noise="none", model=model
        )
        out.append(generator.decode(latents).mean(dim=1).cpu().numpy().astype(np.float32))
    return np.concatenate(out) if out else np.empty((0, 0), dtype=np.float32)


@dataclass
class AudioEvaluation(ClipEvaluation):
    """Judge scores (:func:`mmalign.toyworld.audio_world.judge_audio`) of ``clips`` (``float32 [N, S]`` at
    ``sample_rate``) sampled for ``prompts``."""

    sample_rate: int


def evaluate_audio(
    generator: Any,
    prompts: Sequence,
    samples_per_prompt: int = 4,
    seed: int = 0,
    steps: int = 10,
    guidance: float = GUIDANCE,
    model: torch.nn.Module | None = None,
) -> AudioEvaluation:
    """:func:`evaluate_video` for an audio generator (the toy audio pipeline) and prompts of the toy audio world:
    the same seeds, :func:`sample_audio`, then the audio judge."""
    from .audio_world import judge_audio

    base = getattr(generator, "base", generator)  # a flow view (StableAudioFlowView) samples with its base
    expanded, seeds = evaluation_seeds(prompts, samples_per_prompt, seed)
    clips = sample_audio(base, expanded, seeds, steps=steps, guidance=guidance, model=model)
    rate = int(base.sample_rate)
    verdicts = [judge_audio(clip, p, rate) for clip, p in zip(clips, expanded)]
    return AudioEvaluation(expanded, seeds, clips, verdicts, rate)
