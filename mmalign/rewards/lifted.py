"""Image rewards lifted to videos and multi-view sets: score each unit (frame, view), then aggregate.

Video (InstructVideo, Yuan et al. 2024, arXiv:2312.12490; ali-vilab/VGen ``utils/reward/reward.py``):

* ``mean``: the mean over uniformly sampled frames;
* ``segmental`` (SegVR): ``S`` segments of ``span = F // S`` frames, one frame per segment (the first, or a
  random one with ``pick="random"``: VGen's ``fixed_first`` / ``TSN``), reward = mean over segments;
* ``tar`` (Temporally Attenuated Reward): segmental frames weighted by ``exp(-lambda * |i - F // 2|)`` with
  ``i`` the frame's index in the clip of ``F`` frames and ``lambda = 1`` as released; reward = mean over segments
  of weight x frame reward (VGen computes ``F // 2``; REFERENCES' ``F / 2`` is the same for even ``F``). The
  weights are not renormalised, as there; VGen's loss is ``1 - R``;
* ``min``: the worst frame;
* optional temporal consistency: ``+ w * mean cos(f_t, f_{t+1})`` of consecutive frames' image features.

Multi-view: any image reward applied per view, aggregated by ``mean`` or ``min``, plus an optional cross-view
consistency ``+ w * mean_{i<j} cos(f_i, f_j)``. (DreamReward's Reward3D, Ye et al. 2024, arXiv:2403.14613, and
MVReward, Wang et al. 2025, arXiv:2412.06614, instead fuse the views with trained heads: Reward3D is the native
multi-view reward :mod:`mmalign.rewards.reward3d`; MVReward is not included.)

Both paths exist, as for images: ``score_tensor`` on canonical tensors is differentiable (the image reward's
tensor preprocessing), and ``score_files`` decodes files and uses the image reward's reference preprocessing,
so a video of one repeated frame scores as that frame does.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from ..modalities.image import DEFAULT_MAX_PIXELS, broadcast_prompts
from ..modalities.multiview import check_multiview, read_views
from ..modalities.video import FrameSampler, check_video, read_frames, segment_indices, uniform_indices
from .base import Reward, TwoTowerReward

AGGREGATES = ("mean", "segmental", "tar", "min")
MULTIVIEW_AGGREGATES = ("mean", "min")
TAR_LAMBDA = 1.0  # InstructVideo's released setting


# -- pure aggregation functions ----------------------------------------------------------------------------
def tar_weights(indices: torch.Tensor, num_frames: int, lam: float = TAR_LAMBDA) -> torch.Tensor:
    """InstructVideo's TAR weights ``exp(-lam * |i - F // 2|)`` for frame indices ``i`` of an ``F``-frame clip."""
    indices = torch.as_tensor(indices)
    return torch.exp(-lam * (indices.to(torch.float64) - (num_frames // 2)).abs()).to(torch.float32)


def aggregate_scores(scores: torch.Tensor, aggregate: str, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Unit scores ``[..., U]`` -> ``[...]``: ``mean`` / ``segmental`` the mean, ``tar`` the mean of
    ``weights * scores``, ``min`` the minimum."""
    if aggregate in ("mean", "segmental"):
        return scores.mean(dim=-1)
    if aggregate == "tar":
        if weights is None:
            raise ValueError("tar aggregation needs weights")
        return (weights.to(scores) * scores).mean(dim=-1)
    if aggregate == "min":
        return scores.amin(dim=-1)
    if aggregate == "max":
        return scores.amax(dim=-1)
    raise ValueError(f"unknown aggregate {aggregate!r}; use one of {', '.join(AGGREGATES)}")


def _normalised(features: torch.Tensor) -> torch.Tensor:
    return features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def temporal_consistency(features: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity of consecutive frames' features ``[B, T, D]`` -> ``[B]`` (1 for one frame)."""
    if features.shape[1] < 2:
        return features.new_ones(features.shape[0])
    unit = _normalised(features)
    return (unit[:, 1:] * unit[:, :-1]).sum(dim=-1).mean(dim=-1)


def cross_view_consistency(features: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity over all pairs of views' features ``[B, V, D]`` -> ``[B]`` (1 for one view)."""
    count = features.shape[1]
    if count < 2:
        return features.new_ones(features.shape[0])
    unit = _normalised(features)
    gram = unit @ unit.transpose(1, 2)
    upper = torch.triu_indices(count, count, offset=1, device=features.device)
    return gram[:, upper[0], upper[1]].mean(dim=-1)


# -- results -----------------------------------------------------------------------------------------------------
@dataclass
class LiftedScores:
    """Tensor results: ``total [B]``, ``units [B, U]`` at ``positions [B, U]`` (frame or view indices),
    TAR ``weights [B, U]`` and the ``consistency [B]`` term when used."""

    total: torch.Tensor
    units: torch.Tensor
    positions: torch.Tensor
    weights: torch.Tensor | None = None
    consistency: torch.Tensor | None = None


@dataclass
class MediaScore:
    """One scored file: the total, each unit's score and position (frame index, view number, window start in
    seconds), TAR weights and the consistency term when used, and decode facts (``extra``)."""

    total: float
    units: list[float]
    unit: str
    positions: list[float]
    weights: list[float] | None = None
    consistency: float | None = None
    extra: dict[str, Any] | None = None

    def record(self) -> dict[str, Any]:
        """The JSONL fields added to a score record (``units`` and friends)."""
        row: dict[str, Any] = {"units": self.units, "unit": self.unit, "unit_positions": self.positions}
        if self.weights is not None:
            row["unit_weights"] = self.weights
        if self.consistency is not None:
            row["consistency"] = self.consistency
        row.update(self.extra or {})
        return row


class AudioFileScoring:
    """``score_audio`` / ``score`` of an audio reward that decodes its files itself (``decode(path) -> Audio``) and
    scores decoded audio (``score_decoded(decoded, prompts, batch_size) -> [MediaScore]``): CLAP, Audiobox
    Aesthetics. Prompts are passed on when the reward ``uses_prompt``."""

    def score_audio(self, sources: Sequence[Any], prompts: str | Sequence[str] | None = None, batch_size: int = 32):
        """Scores of files (or decoded :class:`~mmalign.modalities.audio.Audio`) as :class:`MediaScore`, with
        each reward's per-window (per-chunk) scores."""
        from ..modalities.audio import Audio

        prompts = broadcast_prompts(prompts, len(sources))
        decoded = [s if isinstance(s, Audio) else self.decode(s) for s in sources]
        return self.score_decoded(decoded, prompts if self.uses_prompt else None, batch_size)

    def score(self, media: Any, prompts: str | Sequence[str] | None = None, batch_size: int = 32) -> torch.Tensor:
        """Totals ``[B]``: differentiable on waveform tensors (at the reward's own rate), the reference path on
        files."""
        from ..modalities.audio import Audio

        if isinstance(media, torch.Tensor):
            return self.score_tensor(media, prompts)
        if isinstance(media, (str, os.PathLike, Audio)):
            media = [media]
        return torch.tensor([r.total for r in self.score_audio(list(media), prompts, batch_size)])

    def score_images(self, images: Any, prompts: Any = None, batch_size: int = 32) -> torch.Tensor:
        raise TypeError(f"{self.name} scores audio, not images: use score_audio")


# -- unit scoring ------------------------------------------------------------------------------------------------
def unit_scores(
    reward: Reward, pixels: torch.Tensor, prompts: list[str], features: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scores ``[N]`` of preprocessed unit pixels and, when asked, their L2-normalised image features ``[N, D]``
    (two-tower rewards compute both in one image-tower pass)."""
    if not features:
        return reward.score_pixels(pixels, prompts), None
    if isinstance(reward, TwoTowerReward):
        image = reward.encode_image(pixels)
        text = reward.encode_text(prompts).to(image.device)
        return reward.similarity_to_score((image * text).sum(dim=-1)), image
    embed = getattr(reward, "embed", None)
    if embed is None:
        raise ValueError(
            f"{reward.name}: a consistency term needs image features; this reward exposes none "
            "(use a CLIP-family reward or consistency weight 0)"
        )
    return reward.score_pixels(pixels, prompts), _normalised(embed(pixels).float())


class LiftedReward(Reward):
    """An image reward applied per unit and aggregated; see the module docstring."""

    unit: ClassVar[str] = "unit"
    aggregates: ClassVar[tuple[str, ...]] = AGGREGATES

    def __init__(self, reward: Reward, aggregate: str = "mean", consistency_weight: float = 0.0):
        super().__init__()
        if reward.modality != "image":
            raise ValueError(f"{reward.name} scores {reward.modality}, not images: only image rewards lift")
        if aggregate not in self.aggregates:
            raise ValueError(
                f"aggregate {aggregate!r} does not apply to {self.modality}; use one of {', '.join(self.aggregates)}"
            )
        self.image_reward = reward
        self.aggregate = aggregate
        self.consistency_weight = float(consistency_weight)
        self.name = reward.name
        self.uses_prompt = reward.uses_prompt
        self.is_differentiable = reward.is_differentiable
        self.higher_is_better = reward.higher_is_better
        self.score_scale = f"{self.aggregate} over {self.unit}s of: {reward.score_scale}"

    def info(self) -> dict[str, object]:
        return {**super().info(), "aggregate": self.aggregate, "unit": self.unit}

    # the image reward's paths, per unit
    def preprocess_reference(self, image: Image.Image) -> torch.Tensor:
        return self.image_reward.preprocess_reference(image)

    def preprocess_tensor(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_reward.preprocess_tensor(images)

    def score_pixels(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.image_reward.score_pixels(pixels, prompts)

    def _consistency(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _combine(
        self, scores: torch.Tensor, weights: torch.Tensor | None, features: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        total = aggregate_scores(scores, self.aggregate, weights)
        if features is None:
            return total, None
        consistency = self._consistency(features)
        return total + self.consistency_weight * consistency, consistency

    def _score_units_tensor(self, units: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[B, U, 3, H, W]`` -> scores ``[B, U]`` (and features ``[B, U, D]``), differentiably."""
        batch, count = units.shape[:2]
        pixels = self.preprocess_tensor(units.flatten(0, 1).to(self.device))
        scores, features = unit_scores(
            self.image_reward, pixels, [p for p in prompts for _ in range(count)], self.consistency_weight != 0
        )
        features = None if features is None else features.view(batch, count, -1)
        return scores.float().view(batch, count), features

    @torch.no_grad()
    def _score_units_reference(
        self, items: Sequence[Sequence[Image.Image]], prompts: list[str], batch_size: int
    ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Reference-preprocessed units of several items, batched across items (equal shapes together)."""
        want = self.consistency_weight != 0
        flat = [(n, self.preprocess_reference(image)) for n, units in enumerate(items) for image in units]
        scores: list[torch.Tensor] = []
        features: list[torch.Tensor] = []
        start = 0
        while start < len(flat):
            stop = start + 1
            while stop < len(flat) and stop - start < batch_size and flat[stop][1].shape == flat[start][1].shape:
                stop += 1
            chunk = flat[start:stop]
            pixels = torch.stack([pixel for _, pixel in chunk])
            s, f = unit_scores(self.image_reward, self._to_model(pixels), [prompts[n] for n, _ in chunk], want)
            scores.append(s.float().cpu())
            if f is not None:
                features.append(f.float().cpu())
            start = stop
        all_scores = torch.cat(scores) if scores else torch.empty(0)
        all_features = torch.cat(features) if features else None
        out, offset = [], 0
        for units in items:
            end = offset + len(units)
            out.append((all_scores[offset:end], None if all_features is None else all_features[offset:end]))
            offset = end
        return out

    # the file path: decode each source, then score them together
    def decode(self, source: str | os.PathLike) -> Any:
        raise NotImplementedError

    def score_decoded(self, decoded: Sequence[Any], prompts: Sequence[str], batch_size: int = 32) -> list[MediaScore]:
        raise NotImplementedError

    def score_files(
        self, sources: Sequence[str | os.PathLike], prompts: str | Sequence[str] | None = None, batch_size: int = 32
    ) -> list[MediaScore]:
        """Decode and score files; per-unit scores alongside each total."""
        prompts = broadcast_prompts(prompts, len(sources))
        return self.score_decoded([self.decode(source) for source in sources], prompts, batch_size)

    def score(self, media: Any, prompts: str | Sequence[str] | None = None, batch_size: int = 32) -> torch.Tensor:
        """Totals ``[B]``: differentiable on tensors, reference preprocessing on files."""
        if isinstance(media, torch.Tensor):
            return self.score_tensor(media, prompts)
        if isinstance(media, (str, os.PathLike)):
            media = [media]
        results = self.score_files(list(media), prompts, batch_size)
        return torch.tensor([r.total for r in results], dtype=torch.float32)


@dataclass
class DecodedVideo:
    """Frames of one video as decoded for scoring: uint8 ``[T, H, W, 3]`` at source ``indices`` of ``num_frames``."""

    frames: np.ndarray
    indices: list[int]
    num_frames: int
    fps: float


class VideoReward(LiftedReward):
    """An image reward over a video's frames (InstructVideo's SegVR / TAR, or mean / min over uniform frames).

    ``frames``: frames sampled uniformly for ``mean`` / ``min`` (all of a shorter clip), or the number of
    segments for ``segmental`` / ``tar``; ``sample_fps`` samples at a fixed rate instead (at most ``frames``).
    """

    modality: ClassVar[str] = "video"
    unit: ClassVar[str] = "frame"

    def __init__(
        self,
        reward: Reward,
        aggregate: str = "mean",
        frames: int = 8,
        *,
        pick: str = "first",
        tar_lambda: float = TAR_LAMBDA,
        consistency_weight: float = 0.0,
        sample_fps: float | None = None,
        seed: int | None = 0,
        backend: str = "pyav",
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ):
        super().__init__(reward, aggregate, consistency_weight)
        self.max_pixels = max_pixels
        if frames < 1:
            raise ValueError(f"frames must be at least 1, got {frames}")
        self.frames = frames
        self.pick = pick
        self.tar_lambda = float(tar_lambda)
        self.sample_fps = sample_fps
        self.seed = seed
        self.backend = backend

    @property
    def segmental(self) -> bool:
        return self.aggregate in ("segmental", "tar")

    @property
    def sampler(self) -> FrameSampler:
        """The frame sampler the file path decodes with."""
        if self.segmental:
            return FrameSampler("segmental", self.frames, pick=self.pick, seed=self.seed)
        if self.sample_fps is not None:
            return FrameSampler("fps", self.frames, fps=self.sample_fps)
        return FrameSampler("uniform", self.frames)

    @property
    def variant(self) -> str:
        """What changes the scores besides the reward: used to tell runs apart in a shared output file."""
        parts = [self.aggregate, f"{self.frames}f" if self.sample_fps is None else f"{self.sample_fps:g}fps"]
        if self.segmental and self.pick != "first":
            parts.append(f"{self.pick}{self.seed}")
        if self.aggregate == "tar" and self.tar_lambda != TAR_LAMBDA:
            parts.append(f"lambda{self.tar_lambda:g}")
        if self.consistency_weight:
            parts.append(f"consistency{self.consistency_weight:g}")
        return "/".join(parts)

    def _consistency(self, features: torch.Tensor) -> torch.Tensor:
        return temporal_consistency(features)

    def _weights(self, positions: torch.Tensor, num_frames: int) -> torch.Tensor | None:
        return tar_weights(positions, num_frames, self.tar_lambda) if self.aggregate == "tar" else None

    def select(self, num_frames: int, batch: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
        """Frame positions ``[B, U]`` chosen from clips of ``num_frames`` frames (random picks differ per clip)."""
        if self.segmental:
            if self.pick == "random":
                rows = [segment_indices(num_frames, self.frames, "random", generator) for _ in range(batch)]
                return torch.tensor(rows, dtype=torch.long)
            row = segment_indices(num_frames, self.frames, "first")
        else:
            row = uniform_indices(num_frames, self.frames)
        return torch.tensor([row] * batch, dtype=torch.long)

    def score_detailed(
        self,
        videos: torch.Tensor,
        prompts: str | Sequence[str] | None = None,
        *,
        indices: Sequence[int] | torch.Tensor | None = None,
        num_frames: int | None = None,
        generator: torch.Generator | None = None,
    ) -> LiftedScores:
        """Differentiable scores of a canonical batch ``[B, T, 3, H, W]`` in [0, 1].

        Without ``indices`` the ``T`` frames are the whole clip and the aggregate's frames are chosen from them
        (``generator`` drives random segment picks). With ``indices`` (``[T]`` or ``[B, T]``) the frames were
        already sampled at those positions of a clip of ``num_frames`` frames, and all are scored.
        """
        videos = check_video(videos)
        batch, count = videos.shape[:2]
        prompts = broadcast_prompts(prompts, batch)
        if indices is None:
            positions = self.select(count, batch, generator).to(videos.device)
            total_frames = count
            units = videos[torch.arange(batch, device=videos.device)[:, None], positions]
        else:
            positions = torch.as_tensor(indices, dtype=torch.long, device=videos.device)
            positions = positions.expand(batch, -1) if positions.ndim == 1 else positions
            if positions.shape != (batch, count):
                raise ValueError(f"indices {tuple(positions.shape)} do not match the videos' [B, T] = {batch, count}")
            total_frames = num_frames if num_frames is not None else int(positions.max()) + 1
            units = videos
        scores, features = self._score_units_tensor(units, prompts)
        weights = self._weights(positions, total_frames)
        weights = None if weights is None else weights.to(scores.device)
        total, consistency = self._combine(scores, weights, features)
        return LiftedScores(total, scores, positions, weights, consistency)

    def score_tensor(self, videos: torch.Tensor, prompts: str | Sequence[str] | None = None, **kwargs) -> torch.Tensor:
        """Differentiable totals ``[B]`` (see :meth:`score_detailed`)."""
        return self.score_detailed(videos, prompts, **kwargs).total

    def decode(self, source: str | os.PathLike) -> DecodedVideo:
        frames, indices, info = read_frames(source, self.sampler, backend=self.backend, max_pixels=self.max_pixels)
        return DecodedVideo(frames, indices, info.num_frames, info.fps)

    def score_decoded(
        self, decoded: Sequence[DecodedVideo], prompts: Sequence[str], batch_size: int = 32
    ) -> list[MediaScore]:
        prompts = broadcast_prompts(prompts, len(decoded))
        units = [[Image.fromarray(frame) for frame in video.frames] for video in decoded]
        results = []
        for video, (scores, features) in zip(decoded, self._score_units_reference(units, list(prompts), batch_size)):
            positions = torch.tensor(video.indices)
            weights = self._weights(positions, video.num_frames)
            total, consistency = self._combine(
                scores[None], None if weights is None else weights[None], None if features is None else features[None]
            )
            results.append(
                MediaScore(
                    float(total[0]),
                    scores.tolist(),
                    "frame",
                    list(video.indices),
                    None if weights is None else weights.tolist(),
                    None if consistency is None else float(consistency[0]),
                    {"num_frames": video.num_frames, "fps": video.fps},
                )
            )
        return results


class MultiviewReward(LiftedReward):
    """An image reward over the views of a 3D object, aggregated by ``mean`` or ``min`` (+ cross-view
    consistency). ``grid="RxC"`` reads each file as a grid of views."""

    modality: ClassVar[str] = "multiview"
    unit: ClassVar[str] = "view"
    aggregates: ClassVar[tuple[str, ...]] = MULTIVIEW_AGGREGATES

    def __init__(
        self,
        reward: Reward,
        aggregate: str = "mean",
        *,
        consistency_weight: float = 0.0,
        grid: str | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ):
        super().__init__(reward, aggregate, consistency_weight)
        self.grid = grid
        self.max_pixels = max_pixels

    @property
    def variant(self) -> str:
        parts = [self.aggregate] + ([f"grid{self.grid}"] if self.grid else [])
        if self.consistency_weight:
            parts.append(f"consistency{self.consistency_weight:g}")
        return "/".join(parts)

    def _consistency(self, features: torch.Tensor) -> torch.Tensor:
        return cross_view_consistency(features)

    def score_detailed(self, views: torch.Tensor, prompts: str | Sequence[str] | None = None) -> LiftedScores:
        """Differentiable scores of a canonical batch ``[B, V, 3, H, W]`` in [0, 1]."""
        views = check_multiview(views)
        batch, count = views.shape[:2]
        scores, features = self._score_units_tensor(views, broadcast_prompts(prompts, batch))
        positions = torch.arange(count, device=views.device).expand(batch, -1)
        total, consistency = self._combine(scores, None, features)
        return LiftedScores(total, scores, positions, None, consistency)

    def score_tensor(self, views: torch.Tensor, prompts: str | Sequence[str] | None = None) -> torch.Tensor:
        return self.score_detailed(views, prompts).total

    def decode(self, source: str | os.PathLike) -> tuple[list[Image.Image], list[str]]:
        images, names, _ = read_views(source, self.grid, max_pixels=self.max_pixels)
        return images, names

    def score_decoded(
        self, decoded: Sequence[tuple[list[Image.Image], list[str]]], prompts: Sequence[str], batch_size: int = 32
    ) -> list[MediaScore]:
        prompts = broadcast_prompts(prompts, len(decoded))
        units = [images for images, _ in decoded]
        results = []
        for (images, names), (scores, features) in zip(
            decoded, self._score_units_reference(units, list(prompts), batch_size)
        ):
            total, consistency = self._combine(scores[None], None, None if features is None else features[None])
            results.append(
                MediaScore(
                    float(total[0]),
                    scores.tolist(),
                    "view",
                    list(range(len(images))),
                    None,
                    None if consistency is None else float(consistency[0]),
                    {"views": names},
                )
            )
        return results


def lift(reward: Reward, modality: str, **options: Any) -> LiftedReward:
    """Lift an image reward to ``video`` (:class:`VideoReward`) or ``multiview`` (:class:`MultiviewReward`)."""
    if modality == "video":
        return VideoReward(reward, **options)
    if modality == "multiview":
        return MultiviewReward(reward, **options)
    raise ValueError(f"image rewards lift to video or multiview, not {modality!r} (audio needs an audio reward)")
