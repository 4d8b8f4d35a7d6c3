"""Torch datasets over preference pairs: decoded, resized, cropped, in [-1, 1] (diffusers' VAE input).

Transforms follow the Diffusion-DPO training scripts (SalesforceAIResearch/DiffusionDPO ``train.py``;
diffusers ``train_diffusion_dpo*.py``): bilinear resize of the shorter side to ``resolution`` (the longer
side truncated as torchvision's ``Resize``), then a random or centre crop (``random_crop``: by default random
for training and central for evaluation; the trainers pass their own option, whose default is the scripts'
centre crop), an optional horizontal flip for training (independent of the crop, as in the scripts), then
``x / 127.5 - 1``. Both images of a pair share the crop position
(as a fraction of the free space) and the flip, as in diffusers' SDXL DPO script, so the pair stays aligned
(the official SD1.5 script draws them per image). Augmentation is deterministic: item ``i`` in epoch ``e``
draws from ``random.Random(f"{seed}:{e}:{i}")``, whatever the worker or the order of fetches.

Decode failures at fetch time: the pair is reported (a warning naming its ``source`` and the error, once
per worker), recorded in ``failed`` and replaced by the next pair (``i + 1``, wrapping); a dataset where
no pair decodes raises :class:`~mmalign.errors.DataError`. The streaming dataset simply skips such pairs.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from ..errors import DataError, MediaError
from .records import PreferencePair, decode_image

logger = logging.getLogger("mmalign.data")


class PairTransform:
    """Decode and transform one pair into tensors ``[3, R, R]`` in [-1, 1]."""

    def __init__(
        self,
        resolution: int = 512,
        *,
        train: bool = True,
        hflip: bool = True,
        seed: int = 0,
        random_crop: bool | None = None,
    ):
        if resolution < 1:
            raise ValueError(f"resolution must be positive, got {resolution}")
        self.resolution = int(resolution)
        self.train = train
        self.random_crop = train if random_crop is None else bool(random_crop)
        self.hflip = hflip
        self.seed = seed

    def _draws(self, index: int, epoch: int) -> tuple[float, float, bool]:
        """The crop position (fractions of the free space) and the flip of item ``index`` in ``epoch``."""
        rng = random.Random(f"{self.seed}:{epoch}:{index}")
        fx, fy, coin = rng.random(), rng.random(), rng.random()
        return fx, fy, self.train and self.hflip and coin < 0.5

    def __call__(self, pair: PreferencePair, index: int, epoch: int = 0) -> dict[str, Any]:
        """Raise :class:`~mmalign.errors.MediaError` naming ``pair.source`` when an image fails to decode."""
        fx, fy, flip = self._draws(index, epoch)
        source = pair.source or f"pair {index}"
        chosen = decode_image(pair.chosen, f"{source} chosen")
        rejected = decode_image(pair.rejected, f"{source} rejected")
        chosen_pixels, top_left = self._apply(chosen, fx, fy, flip)
        rejected_pixels, _ = self._apply(rejected, fx, fy, flip)
        return {
            "chosen_pixels": chosen_pixels,
            "rejected_pixels": rejected_pixels,
            "prompt": pair.prompt,
            "label": torch.tensor(pair.label, dtype=torch.float32),
            "original_size": torch.tensor((chosen.height, chosen.width)),
            "crop_top_left": torch.tensor(top_left),
            "index": index,
        }

    def _apply(self, image: Image.Image, fx: float, fy: float, flip: bool) -> tuple[torch.Tensor, tuple[int, int]]:
        size = self.resolution
        width, height = image.size
        if width <= height:
            new_w, new_h = size, max(size, int(size * height / width))
        else:
            new_w, new_h = max(size, int(size * width / height)), size
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
        if self.random_crop:
            left = min(int(fx * (new_w - size + 1)), new_w - size)
            top = min(int(fy * (new_h - size + 1)), new_h - size)
        else:  # torchvision CenterCrop
            left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
        image = image.crop((left, top, left + size, top + size))
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = np.asarray(image, dtype=np.uint8)
        pixels = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)
        return pixels, (top, left)


class VideoPairTransform(PairTransform):
    """Decode and transform a pair of videos into tensors ``[T, 3, R, R]`` in [-1, 1] (VideoDPO / VideoAlign
    Flow-DPO pairs for a video generator): ``frames`` frames evenly spaced from each clip's first to its last
    (:func:`~mmalign.modalities.video.uniform_indices`, as the video rewards sample), each resized and cropped
    as :class:`PairTransform` does an image, with one crop position and one flip for every frame of both clips.
    A clip that cannot be read or has fewer than ``frames`` frames raises :class:`~mmalign.errors.MediaError`
    naming the pair's source (file and line) and side."""

    def __init__(self, resolution: int = 512, frames: int = 1, **options: Any):
        super().__init__(resolution, **options)
        if frames < 1:
            raise ValueError(f"frames must be positive, got {frames}")
        self.frames = int(frames)

    def __call__(self, pair: PreferencePair, index: int, epoch: int = 0) -> dict[str, Any]:
        fx, fy, flip = self._draws(index, epoch)
        source = pair.source or f"pair {index}"
        chosen = self._clip(pair.chosen, f"{source} chosen")
        rejected = self._clip(pair.rejected, f"{source} rejected")
        chosen_frames = [self._apply(frame, fx, fy, flip) for frame in chosen]
        rejected_frames = [self._apply(frame, fx, fy, flip)[0] for frame in rejected]
        return {
            "chosen_pixels": torch.stack([pixels for pixels, _ in chosen_frames]),
            "rejected_pixels": torch.stack(rejected_frames),
            "prompt": pair.prompt,
            "label": torch.tensor(pair.label, dtype=torch.float32),
            "original_size": torch.tensor((chosen[0].height, chosen[0].width)),
            "crop_top_left": torch.tensor(chosen_frames[0][1]),
            "index": index,
        }

    def _clip(self, video: Any, where: str) -> list[Image.Image]:
        from ..modalities.video import is_video_file, probe_video, read_frames, uniform_indices

        if not isinstance(video, (str, os.PathLike)) or not is_video_file(video, include_gif=True):
            raise MediaError(where, f"expected a video file, got {str(video)[:80]!r}")
        try:
            info = probe_video(video)
            if info.num_frames < self.frames:
                raise MediaError(video, f"{info.num_frames} frames, fewer than the {self.frames} the model trains on")
            array, _, _ = read_frames(video, uniform_indices(info.num_frames, self.frames))
        except MediaError as error:
            raise MediaError(where, f"{error.path}: {error.reason}") from error
        except (OSError, ValueError) as error:
            raise MediaError(where, f"{video}: {error}") from error
        return [Image.fromarray(frame) for frame in array]


def pair_transform(resolution: int, frames: int | None = None, **options: Any) -> PairTransform:
    """The transform of a dataset: images (``frames`` None) or videos of ``frames`` frames."""
    if frames:
        return VideoPairTransform(resolution, frames, **options)
    return PairTransform(resolution, **options)


class PreferenceDataset(Dataset):
    """Map-style dataset over a sequence of pairs (a :class:`PreferenceList`, or any list of pairs).

    Items: ``chosen_pixels``, ``rejected_pixels`` float ``[3, R, R]`` (videos, with ``frames``:
    ``[frames, 3, R, R]``, :class:`VideoPairTransform`) in [-1, 1], ``prompt``, ``label``
    (float32 scalar), ``original_size`` (h, w of ``chosen``), ``crop_top_left`` (top, left; SDXL micro-
    conditioning) and ``index`` (the pair actually returned, after any replacement). Call :meth:`set_epoch`
    to draw new augmentations each epoch.
    """

    def __init__(
        self,
        pairs: Sequence[PreferencePair],
        resolution: int = 512,
        *,
        train: bool = True,
        hflip: bool = True,
        seed: int = 0,
        random_crop: bool | None = None,
        frames: int | None = None,
    ):
        self.pairs = pairs
        self.transform = pair_transform(
            resolution, frames, train=train, hflip=hflip, seed=seed, random_crop=random_crop
        )
        self.epoch = 0
        self.failed: dict[int, str] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.pairs)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} pairs")
        index %= n
        for step in range(n):
            current = (index + step) % n
            pair = self.pairs[current]
            try:
                return self.transform(pair, current, self.epoch)
            except MediaError as error:
                if current not in self.failed:
                    self.failed[current] = str(error)
                    logger.warning("pair %d (%s): %s; using the next pair instead", current, pair.source or "?", error)
        raise DataError("PreferenceDataset", f"none of its {n} pairs could be decoded")


class AudioPairTransform:
    """Decode one pair of audio files or encoded bytes (Audio-Alpaca's parquet; wav/flac/ogg by soundfile,
    compressed formats by PyAV) into canonical waveforms ``[C, S]`` in [-1, 1] at ``sample_rate`` with
    ``channels`` channels (mono duplicated, stereo mixed down), the shorter one zero-padded to the longer one's
    length so that the two stack. No augmentation. Audio that fails to decode raises
    :class:`~mmalign.errors.MediaError` naming the pair's ``source`` (file and line or row) and the file."""

    def __init__(self, sample_rate: int, channels: int):
        self.sample_rate, self.channels = int(sample_rate), int(channels)

    def _load(self, media: Any, where: str) -> torch.Tensor:
        from ..modalities.audio import load_audio

        if not isinstance(media, (str, bytes)):
            raise MediaError(where, f"audio pairs hold file paths or encoded bytes, got {type(media).__name__}")
        try:
            waveform = load_audio(media, sample_rate=self.sample_rate).waveform
        except MediaError as error:
            raise MediaError(where, str(error)) from error
        if waveform.shape[0] == 1 and self.channels > 1:
            waveform = waveform.repeat(self.channels, 1)
        elif waveform.shape[0] != self.channels:
            waveform = waveform.mean(0, keepdim=True).repeat(self.channels, 1)
        return waveform.clamp(-1, 1)

    def __call__(self, pair: PreferencePair, index: int, epoch: int = 0) -> dict[str, Any]:
        source = pair.source or f"pair {index}"
        chosen = self._load(pair.chosen, f"{source} chosen")
        rejected = self._load(pair.rejected, f"{source} rejected")
        length = max(chosen.shape[-1], rejected.shape[-1])
        chosen, rejected = (torch.nn.functional.pad(w, (0, length - w.shape[-1])) for w in (chosen, rejected))
        return {
            "chosen_pixels": chosen,
            "rejected_pixels": rejected,
            "prompt": pair.prompt,
            "label": torch.tensor(pair.label, dtype=torch.float32),
            "index": index,
        }


class AudioPreferenceDataset(PreferenceDataset):
    """:class:`PreferenceDataset` over pairs of audio files (JSONL ``{"prompt", "chosen": "a.wav", "rejected":
    "b.wav"}``, paths relative to the file) or of encoded audio (Audio-Alpaca's parquet): items hold waveforms
    ``[C, S]`` in [-1, 1] (under the image keys ``chosen_pixels`` / ``rejected_pixels`` that the training loop
    reads) at the generator's ``sample_rate`` and ``channels`` (:class:`AudioPairTransform`). Unreadable audio is
    reported and replaced as for images: a warning and ``failed`` name the pair's file and line or row."""

    def __init__(self, pairs: Sequence[PreferencePair], sample_rate: int, channels: int):
        self.pairs = pairs
        self.transform = AudioPairTransform(sample_rate, channels)
        self.epoch = 0
        self.failed: dict[int, str] = {}


class IterablePreferenceDataset(IterableDataset):
    """Streaming dataset over an iterable of pairs (e.g. a :class:`PreferenceStream` of Pick-a-Pic).

    With several DataLoader workers, worker ``w`` of ``W`` keeps the pairs whose position ``k`` satisfies
    ``k % W == w`` (each worker reads the source; only the decoding is split). Pairs that fail to decode are
    logged and skipped. Augmentation is seeded by ``(seed, epoch, k)``.
    """

    def __init__(
        self,
        pairs: Iterable[PreferencePair],
        resolution: int = 512,
        *,
        train: bool = True,
        hflip: bool = True,
        seed: int = 0,
        random_crop: bool | None = None,
        frames: int | None = None,
    ):
        self.pairs = pairs
        self.transform = pair_transform(
            resolution, frames, train=train, hflip=hflip, seed=seed, random_crop=random_crop
        )
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for position, pair in enumerate(self.pairs):
            if position % workers != worker:
                continue
            try:
                yield self.transform(pair, position, self.epoch)
            except MediaError as error:
                logger.warning("pair %d (%s): %s; skipping it", position, pair.source or "?", error)
