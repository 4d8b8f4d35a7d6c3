"""Writing generated media to files that the readers of :mod:`mmalign.modalities` and :mod:`mmalign.data` read back
as they were written: what ``mmalign label`` and ``mmalign generate`` save for every modality.

* images: PNG (8 bits a channel);
* videos ``[T, 3, H, W]``: FFV1 in Matroska (``.mkv``, pixel format ``bgr0``): lossless RGB, so the frames read
  back are the uint8 frames written (an H.264 ``.mp4`` would shift colours by its YUV 4:2:0 conversion);
* audio ``[C, S]``: WAV of 32-bit floats (no quantisation: the samples read back are those written);
* multi-view sets ``[V, 3, h, w]``: one PNG of the ``rows x cols`` grid they were split from
  (:func:`mmalign.modalities.multiview.split_grid` and ``mmalign score --grid RxC`` read it back).

:func:`quantise` gives the tensor a file will hold (uint8 levels for pixels), so that a score computed on it is the
score of the saved file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

SUFFIXES = {"image": ".png", "video": ".mkv", "audio": ".wav", "multiview": ".png"}
#: the folder of an output directory that ``mmalign label`` / ``generate`` write media of each modality to
FOLDERS = {"image": "images", "video": "videos", "audio": "audio", "multiview": "images"}
DEFAULT_FPS = 8


def media_suffix(modality: str) -> str:
    """The file suffix media of ``modality`` are written with."""
    try:
        return SUFFIXES[modality]
    except KeyError:
        raise ValueError(f"unknown modality {modality!r}; expected one of {sorted(SUFFIXES)}") from None


def media_folder(modality: str) -> str:
    """The folder (relative to an output directory) media of ``modality`` are written to."""
    media_suffix(modality)
    return FOLDERS[modality]


def quantise(media: torch.Tensor, modality: str) -> torch.Tensor:
    """``media`` as its file will hold it: pixels (images, videos, views) rounded to uint8 levels in [0, 1], audio
    clamped to [-1, 1] in float32 (a float WAV stores it exactly)."""
    media = media.detach().float().cpu()
    if modality == "audio":
        return media.clamp(-1, 1)
    media_suffix(modality)
    return (media.clamp(0, 1) * 255).round() / 255


def _uint8(pixels: torch.Tensor) -> np.ndarray:
    """``[..., 3, H, W]`` in [0, 1] -> uint8 ``[..., H, W, 3]`` (the rounding of :func:`quantise`)."""
    return (pixels.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).movedim(-3, -1).numpy()


def write_png(path: Path, image: torch.Tensor) -> Path:
    """An image ``[3, H, W]`` in [0, 1] as an 8-bit PNG."""
    from PIL import Image

    Image.fromarray(_uint8(image)).save(path)
    return path


def write_video(path: Path, video: torch.Tensor, fps: int = DEFAULT_FPS) -> Path:
    """A video ``[T, 3, H, W]`` in [0, 1] as lossless FFV1 RGB in Matroska (PyAV)."""
    import av

    frames = _uint8(video)
    with av.open(str(path), "w", format="matroska") as container:
        stream = container.add_stream("ffv1", rate=int(fps))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "bgr0"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def write_wav(path: Path, audio: torch.Tensor, sample_rate: int, subtype: str = "FLOAT") -> Path:
    """A waveform ``[C, S]`` in [-1, 1] as a WAV file (soundfile; ``subtype`` "FLOAT" by default, lossless;
    "PCM_16" for players that want integers)."""
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), audio.detach().float().clamp(-1, 1).cpu().numpy().T, int(sample_rate), subtype=subtype)
    return path


def join_views(views: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Views ``[V, 3, h, w]`` (row-major) -> the ``[3, rows·h, cols·w]`` grid image they split from."""
    count, channels, height, width = views.shape
    if count != rows * cols:
        raise ValueError(f"{count} views do not fill a {rows}x{cols} grid")
    grid = views.reshape(rows, cols, channels, height, width).permute(2, 0, 3, 1, 4)
    return grid.reshape(channels, rows * height, cols * width)


def write_media(
    path: Path,
    media: torch.Tensor,
    modality: str,
    sample_rate: int | None = None,
    fps: int = DEFAULT_FPS,
    grid: tuple[int, int] | None = None,
) -> Path:
    """One item of ``modality`` written to ``path`` (whose suffix should be :func:`media_suffix`'s): an image
    ``[3, H, W]``, a video ``[T, 3, H, W]`` (``fps``), audio ``[C, S]`` (``sample_rate`` needed) or views
    ``[V, 3, h, w]`` (``grid`` = (rows, cols) needed)."""
    if modality == "image":
        return write_png(path, media)
    if modality == "video":
        return write_video(path, media, fps)
    if modality == "audio":
        if sample_rate is None:
            raise ValueError("writing audio needs its sample rate")
        return write_wav(path, media, sample_rate)
    if modality == "multiview":
        if grid is None:
            raise ValueError("writing a multi-view set needs its grid (rows, cols)")
        return write_png(path, join_views(media, *grid))
    raise ValueError(f"unknown modality {modality!r}; expected one of {sorted(SUFFIXES)}")


@dataclass(frozen=True)
class MediaFiles:
    """How one generator's media are named and written: its ``modality`` and what writing needs (the audio's
    ``sample_rate``, a video's ``fps``, a view set's ``grid``). :meth:`of` reads them off a generator."""

    modality: str = "image"
    sample_rate: int | None = None
    fps: int = DEFAULT_FPS
    grid: tuple[int, int] | None = None

    @classmethod
    def of(cls, generator: Any, fps: int = DEFAULT_FPS) -> MediaFiles:
        modality = getattr(generator, "modality", "image")
        media_suffix(modality)
        rate = getattr(generator, "sample_rate", None) if modality == "audio" else None
        grid = (int(generator.rows), int(generator.cols)) if modality == "multiview" else None
        return cls(modality, None if rate is None else int(rate), int(fps), grid)

    def settings(self, generator: Any) -> dict[str, Any]:
        """What a job of this generator's media depends on beyond the sampler (frames, seconds, grid, rates)."""
        return {
            "modality": self.modality,
            "frames": getattr(generator, "num_frames", None) if self.modality == "video" else None,
            "seconds": getattr(generator, "audio_end_in_s", None) if self.modality == "audio" else None,
            "sample_rate": self.sample_rate,
            "fps": self.fps if self.modality == "video" else None,
            "grid": self.grid,
        }

    @property
    def suffix(self) -> str:
        return media_suffix(self.modality)

    def name(self, stem: str, folder: str | None = None) -> str:
        """``FOLDER/STEM.SUFFIX`` (default folder: the modality's, :func:`media_folder`)."""
        return f"{media_folder(self.modality) if folder is None else folder}/{stem}{self.suffix}"

    def write(self, out: Path, names: list[str], media: torch.Tensor) -> torch.Tensor:
        """Item ``k`` of ``media`` written to ``out / names[k]``; returns the media as the files hold them
        (:func:`quantise`)."""
        for name, item in zip(names, media):
            path = out / name
            path.parent.mkdir(parents=True, exist_ok=True)
            write_media(path, item, self.modality, self.sample_rate, self.fps, self.grid)
        return quantise(media, self.modality)


__all__ = [
    "MediaFiles",
    "DEFAULT_FPS",
    "FOLDERS",
    "media_folder",
    "SUFFIXES",
    "join_views",
    "media_suffix",
    "quantise",
    "write_media",
    "write_png",
    "write_video",
    "write_wav",
]
