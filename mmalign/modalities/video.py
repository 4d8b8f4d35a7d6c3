"""Videos: sample frame indices, then decode only those frames, into float ``[T, 3, H, W]`` in [0, 1] plus fps.

Samplers are pure functions of the frame count (and rate):

* :func:`uniform_indices`: ``round(linspace(0, F - 1, N))``, the rule of qwen-vl-utils used by VideoAlign /
  VideoReward (KwaiVGI);
* :func:`fps_indices`: a fixed sampling rate (VideoAlign samples at 2 fps), uniform over the clip;
* :func:`segment_indices`: InstructVideo's segmental sampling (ali-vilab/VGen ``utils/reward/reward.py``):
  ``span = F // S``; segment ``s`` covers frames ``[s * span, (s + 1) * span)``; one frame per segment, its
  first (``fixed_first``) or a random one (``TSN``).

Decoding (PyAV by default, decord as an optional extra) reads the packet index first (no decoding), then seeks
to the keyframe before each wanted frame and decodes forward, skipping non-reference frames that are not
wanted and converting only wanted frames to RGB. GIFs and folders of frames are read with Pillow. Every
unusable input raises :class:`~mmalign.errors.MediaError` naming the file.
"""

from __future__ import annotations

import bisect
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import MediaError, MMAlignError
from . import files_with_suffix
from .image import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, open_image

VIDEO_EXTENSIONS = frozenset({".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v", ".mpg", ".mpeg", ".ogv", ".gif"})
DEFAULT_FOLDER_FPS = 8.0  # a folder of frames carries no rate; pass fps= to say what it is
SAMPLERS = ("uniform", "fps", "segmental", "all")
PICKS = ("first", "random")


class BackendMissingError(MMAlignError, ImportError):
    """An optional decoding backend (decord) was asked for but is not installed."""


# -- samplers (pure) ---------------------------------------------------------------------------------------
def _check_count(num_frames: int) -> None:
    if num_frames < 1:
        raise ValueError(f"a video needs at least one frame, got {num_frames}")


def uniform_indices(num_frames: int, count: int) -> list[int]:
    """``count`` frames evenly spaced from the first to the last: ``round(linspace(0, F - 1, count))``
    (qwen-vl-utils, VideoAlign). Every frame, once, when ``count >= F``."""
    _check_count(num_frames)
    if count < 1:
        raise ValueError(f"frame count must be at least 1, got {count}")
    if count >= num_frames:
        return list(range(num_frames))
    return [int(i) for i in np.round(np.linspace(0.0, num_frames - 1.0, count))]


def fps_indices(num_frames: int, video_fps: float, sample_fps: float = 2.0, max_frames: int | None = None) -> list[int]:
    """Frames at ``sample_fps``: ``N = max(1, floor(F / video_fps * sample_fps))`` (capped at ``max_frames``),
    spread uniformly as :func:`uniform_indices` (VideoAlign's 2 fps sampling through qwen-vl-utils)."""
    _check_count(num_frames)
    if video_fps <= 0 or sample_fps <= 0:
        raise ValueError(f"frame rates must be positive (video {video_fps}, sampling {sample_fps})")
    count = max(1, math.floor(num_frames / video_fps * sample_fps + 1e-9))
    if max_frames is not None:
        count = min(count, max_frames)
    return uniform_indices(num_frames, count)


def segment_indices(
    num_frames: int, segments: int, pick: str = "first", generator: torch.Generator | None = None
) -> list[int]:
    """InstructVideo's segmental frame selection (VGen ``reward.py``): ``span = F // S``, segment ``s`` holds
    frames ``[s * span, (s + 1) * span)``; ``pick="first"`` takes ``s * span`` (VGen ``fixed_first``, whose
    ``frames[::span]`` also equals this for its first ``S`` entries), ``pick="random"`` takes
    ``s * span + randint(span)`` (VGen ``TSN``). The last ``F mod S`` frames are never chosen, as there.
    With fewer frames than segments, every frame is its own segment."""
    _check_count(num_frames)
    if segments < 1:
        raise ValueError(f"segments must be at least 1, got {segments}")
    if pick not in PICKS:
        raise ValueError(f"pick must be one of {', '.join(PICKS)}, got {pick!r}")
    segments = min(segments, num_frames)
    span = num_frames // segments
    starts = [s * span for s in range(segments)]
    if pick == "first" or span == 1:
        return starts
    offsets = torch.randint(span, (segments,), generator=generator).tolist()
    return [start + int(offset) for start, offset in zip(starts, offsets)]


@dataclass(frozen=True)
class FrameSampler:
    """Which frames to decode: ``uniform`` (``frames`` of them), ``fps`` (at ``fps``, at most ``frames``),
    ``segmental`` (``frames`` segments, ``pick`` first/random with ``seed``) or ``all``."""

    kind: str = "uniform"
    frames: int = 8
    fps: float = 2.0
    pick: str = "first"
    seed: int | None = 0

    def __post_init__(self) -> None:
        if self.kind not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.kind!r}")
        if self.frames < 1:
            raise ValueError(f"frames must be at least 1, got {self.frames}")
        if self.pick not in PICKS:
            raise ValueError(f"pick must be one of {', '.join(PICKS)}, got {self.pick!r}")

    def indices(self, num_frames: int, video_fps: float) -> list[int]:
        if self.kind == "all":
            _check_count(num_frames)
            return list(range(num_frames))
        if self.kind == "uniform":
            return uniform_indices(num_frames, self.frames)
        if self.kind == "fps":
            return fps_indices(num_frames, video_fps, self.fps, max_frames=self.frames)
        generator = None if self.seed is None else torch.Generator().manual_seed(self.seed)
        return segment_indices(num_frames, self.frames, self.pick, generator)


# -- containers ----------------------------------------------------------------------------------------------
@dataclass
class VideoInfo:
    """What the packet index says about a video: frame count, rate, size and keyframe positions."""

    num_frames: int
    fps: float
    width: int
    height: int
    keyframes: list[int] = field(default_factory=list)


@dataclass
class Video:
    """A decoded clip: ``frames`` float ``[T, 3, H, W]`` in [0, 1], at source positions ``indices`` of
    ``num_frames``, source rate ``fps``."""

    frames: torch.Tensor
    fps: float
    indices: list[int]
    num_frames: int
    path: str | None = None

    @property
    def timestamps(self) -> list[float]:
        """Seconds from the start of each decoded frame."""
        return [i / self.fps for i in self.indices] if self.fps > 0 else [0.0] * len(self.indices)


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 ``[T, H, W, 3]`` -> float ``[T, 3, H, W]`` in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float().div(255.0)


def is_video_file(path: str | os.PathLike, include_gif: bool = False) -> bool:
    suffix = Path(path).suffix.lower()
    return suffix in VIDEO_EXTENSIONS and (include_gif or suffix != ".gif")


# -- PyAV ------------------------------------------------------------------------------------------------------
def _av_error_types() -> tuple[type[BaseException], ...]:
    import av

    return (av.FFmpegError, OSError, ValueError, RuntimeError, EOFError)


def _open_av(path: Path):
    import av

    try:
        container = av.open(str(path))
    except _av_error_types() as error:
        raise MediaError(path, f"cannot open as a video ({error}); the file may be truncated or corrupt") from error
    if not container.streams.video:
        container.close()
        raise MediaError(path, "no video stream in the file")
    return container


def _stream_fps(stream, frame_pts: list[int]) -> float:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate:
            return float(rate)
    if len(frame_pts) > 1 and stream.time_base:
        span = (frame_pts[-1] - frame_pts[0]) * float(stream.time_base)
        if span > 0:
            return (len(frame_pts) - 1) / span
    return 0.0


def _index(path: Path, container, stream) -> tuple[VideoInfo, list[int] | None]:
    """Demux every packet (no decoding): presentation timestamps in order and keyframe positions.
    The timestamps are ``None`` when some packet has none (the caller then decodes sequentially)."""
    pts: list[int] = []
    key_pts: list[int] = []
    complete = True
    count = 0
    try:
        for packet in container.demux(stream):
            if packet.size == 0:  # the flush packet at the end
                continue
            count += 1
            if packet.pts is None:
                complete = False
                continue
            pts.append(packet.pts)
            if packet.is_keyframe:
                key_pts.append(packet.pts)
    except _av_error_types() as error:
        raise MediaError(path, f"cannot read the video packets ({error}); the file may be truncated") from error
    if count == 0:
        raise MediaError(path, "the video has zero frames")
    frame_pts = sorted(set(pts)) if complete else None
    num_frames = len(frame_pts) if frame_pts is not None else count
    position = {p: i for i, p in enumerate(frame_pts or [])}
    keyframes = sorted({position[p] for p in key_pts if p in position})
    codec = stream.codec_context
    info = VideoInfo(num_frames, _stream_fps(stream, frame_pts or []), codec.width, codec.height, keyframes)
    return info, frame_pts


def _rgb(frame) -> np.ndarray:
    return frame.to_ndarray(format="rgb24")


def _decode_sequential(path: Path, container, stream, wanted: set[int]) -> dict[int, np.ndarray]:
    """Decode from the start, converting only wanted frames; stop after the last wanted one."""
    out: dict[int, np.ndarray] = {}
    last = max(wanted)
    container.seek(0)
    stream.codec_context.skip_frame = "DEFAULT"
    try:
        for position, frame in enumerate(container.decode(stream)):
            if position in wanted:
                out[position] = _rgb(frame)
            if position >= last:
                break
    except _av_error_types() as error:
        raise MediaError(path, f"cannot decode frame {len(out)} ({error}); the file may be truncated") from error
    return out


def _decode_seeking(
    path: Path, container, stream, info: VideoInfo, frame_pts: list[int], wanted: list[int]
) -> dict[int, np.ndarray]:
    """Seek to the keyframe before the next wanted frame whenever that skips frames, decode forward with
    non-reference frames skipped (``skip_frame=NONREF``) for packets whose frame is not wanted, and convert only
    wanted frames. Returns what it got; a frame it cannot reach is left to the caller's sequential fallback."""
    codec = stream.codec_context
    position_of = {p: i for i, p in enumerate(frame_pts)}
    wanted_pts = {frame_pts[i] for i in wanted}
    keyframes = info.keyframes or [0]

    def key_before(position: int) -> int:
        return keyframes[max(bisect.bisect_right(keyframes, position) - 1, 0)]

    def collect(frames) -> int:
        last = -1
        for frame in frames:
            position = position_of.get(frame.pts)
            if position is None:
                continue
            last = max(last, position)
            if position in pending:
                out[position] = _rgb(frame)
                pending.discard(position)
        return last

    out: dict[int, np.ndarray] = {}
    pending = set(wanted)
    try:
        while pending:
            target = min(pending)
            key = key_before(target)
            container.seek(frame_pts[key], stream=stream, backward=True)  # also flushes the decoder
            last_output = key - 1
            at_end, drained = True, False
            for packet in container.demux(stream):
                final = packet.size == 0
                if not final:
                    codec.skip_frame = "DEFAULT" if packet.pts in wanted_pts else "NONREF"
                last_output = max(last_output, collect(codec.decode(None if final else packet)))
                if final or not pending:
                    at_end = drained = final
                    break
                following = min(pending)
                if following == target and last_output >= target:
                    at_end = False
                    break  # passed without being returned
                if following != target and key_before(following) > last_output + 1:
                    at_end = False
                    break  # cheaper to seek than to decode on
            if at_end:
                if not drained:
                    codec.skip_frame = "DEFAULT"
                    collect(codec.decode(None))
                break
            if target in pending:
                break  # unreachable by seeking: the caller decodes sequentially
    except _av_error_types() as error:
        raise MediaError(path, f"cannot decode the video ({error}); the file may be truncated or corrupt") from error
    finally:
        codec.skip_frame = "DEFAULT"
    return out


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Frame count, rate, size and keyframes of a video file from its packet index (nothing is decoded)."""
    path = _existing(path)
    if path.suffix.lower() == ".gif":
        frames, fps = _gif_meta(path)
        image = open_image(path)
        return VideoInfo(frames, fps, image.width, image.height, list(range(frames)))
    with _open_av(path) as container:
        info, _ = _index(path, container, container.streams.video[0])
    return info


def _read_pyav(
    path: Path, sampler: FrameSampler | Sequence[int] | None, seek: bool, max_pixels: int | None
) -> tuple[np.ndarray, list[int], VideoInfo]:
    with _open_av(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        info, frame_pts = _index(path, container, stream)
        if max_pixels is not None and info.width * info.height > max_pixels:
            raise MediaError(
                path, f"{info.width}x{info.height} frames exceed the limit of {max_pixels} pixels (raise max_pixels)"
            )
        indices = _resolve_indices(path, sampler, info)
        wanted = sorted(set(indices))
        out: dict[int, np.ndarray] = {}
        if seek and frame_pts is not None:
            out = _decode_seeking(path, container, stream, info, frame_pts, wanted)
        if len(out) < len(wanted):  # no timestamps, or a frame seeking could not reach: decode from the start
            out = _decode_sequential(path, container, stream, set(wanted))
        missing = [i for i in wanted if i not in out]
        if missing:
            raise MediaError(
                path,
                f"frame {missing[0]} of {info.num_frames} could not be decoded (only {len(out)} of {len(wanted)} "
                "wanted frames came out); the file may be truncated or corrupt",
            )
    return np.stack([out[i] for i in indices]), indices, info


def _read_decord(path: Path, sampler: FrameSampler | Sequence[int] | None) -> tuple[np.ndarray, list[int], VideoInfo]:
    try:
        import decord
    except ImportError as error:
        raise BackendMissingError(
            "the decord video backend is not installed: pip install 'mmalign[video]' (or use backend='pyav')"
        ) from error
    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
        num_frames = len(reader)
    except Exception as error:  # decord raises its own DECORDError (a RuntimeError) and others
        raise MediaError(path, f"decord cannot open the video ({error})") from error
    if num_frames == 0:
        raise MediaError(path, "the video has zero frames")
    height, width = reader[0].shape[:2]
    info = VideoInfo(num_frames, float(reader.get_avg_fps()), width, height)
    indices = _resolve_indices(path, sampler, info)
    try:
        frames = reader.get_batch(indices).asnumpy()
    except Exception as error:
        raise MediaError(path, f"decord cannot decode the frames ({error}); the file may be truncated") from error
    return frames, indices, info


# -- GIFs and folders of frames ------------------------------------------------------------------------------
def _gif_meta(path: Path) -> tuple[int, float]:
    from PIL import Image

    try:
        with Image.open(path) as image:
            frames = getattr(image, "n_frames", 1)
            duration = image.info.get("duration") or 100  # ms per frame; browsers use 100 ms when unset
    except Exception as error:
        raise MediaError(path, f"cannot read the GIF ({error})") from error
    return frames, 1000.0 / float(duration)


def _read_gif(path: Path, sampler: FrameSampler | Sequence[int] | None) -> tuple[np.ndarray, list[int], VideoInfo]:
    from PIL import Image

    open_image(path)  # validates size limits and the first frame, with the image module's messages
    num_frames, fps = _gif_meta(path)
    info = VideoInfo(num_frames, fps, 0, 0, list(range(num_frames)))
    indices = _resolve_indices(path, sampler, info)
    out: dict[int, np.ndarray] = {}
    try:
        with Image.open(path) as image:
            for index in sorted(set(indices)):
                image.seek(index)
                out[index] = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, EOFError, ValueError) as error:
        raise MediaError(path, f"cannot decode GIF frame ({error}); the file may be truncated") from error
    first = out[indices[0]]
    info.height, info.width = first.shape[:2]
    return np.stack([out[i] for i in indices]), indices, info


def frame_files(folder: Path) -> list[Path]:
    """The image files of a folder of frames, ordered by the numbers in their names."""
    return files_with_suffix(folder, IMAGE_EXTENSIONS)


def _read_folder(
    folder: Path, sampler: FrameSampler | Sequence[int] | None, fps: float | None, max_pixels: int | None
) -> tuple[np.ndarray, list[int], VideoInfo]:
    files = frame_files(folder)
    if not files:
        raise MediaError(folder, "the folder holds no image frames")
    info = VideoInfo(len(files), fps or DEFAULT_FOLDER_FPS, 0, 0, list(range(len(files))))
    indices = _resolve_indices(folder, sampler, info)
    out: dict[int, np.ndarray] = {}
    for index in sorted(set(indices)):
        out[index] = np.asarray(open_image(files[index], max_pixels=max_pixels), dtype=np.uint8)
    first = out[indices[0]].shape
    odd = next((i for i in sorted(out) if out[i].shape != first), None)
    if odd is not None:
        size = out[odd].shape
        raise MediaError(files[odd], f"frame is {size[1]}x{size[0]}, unlike the others ({first[1]}x{first[0]})")
    info.height, info.width = first[:2]
    return np.stack([out[i] for i in indices]), indices, info


# -- public readers --------------------------------------------------------------------------------------------
def _existing(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise MediaError(path, "no such file or folder")
    return path


def _resolve_indices(path: Path, sampler: FrameSampler | Sequence[int] | None, info: VideoInfo) -> list[int]:
    if sampler is None:
        sampler = FrameSampler("all")
    if isinstance(sampler, FrameSampler):
        return sampler.indices(info.num_frames, info.fps)
    indices = [int(i) for i in sampler]
    if not indices:
        raise ValueError("no frame indices were asked for")
    bad = [i for i in indices if not 0 <= i < info.num_frames]
    if bad:
        raise MediaError(path, f"frame {bad[0]} asked for, but the video has {info.num_frames} frames")
    return indices


def read_frames(
    source: str | os.PathLike,
    sampler: FrameSampler | Sequence[int] | None = None,
    *,
    backend: str = "pyav",
    seek: bool = True,
    fps: float | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> tuple[np.ndarray, list[int], VideoInfo]:
    """Decode the frames a sampler (or explicit indices; all frames when ``None``) asks for.

    Returns uint8 RGB ``[T, H, W, 3]``, the source frame indices (in the order asked) and the
    :class:`VideoInfo`. ``source``: a video file, a GIF, or a folder of frames (``fps`` names its rate).
    ``seek=False`` decodes sequentially from the start (still converting only the wanted frames).
    """
    path = _existing(source)
    if path.is_dir():
        return _read_folder(path, sampler, fps, max_pixels)
    if path.suffix.lower() == ".gif":
        return _read_gif(path, sampler)
    if backend == "decord":
        return _read_decord(path, sampler)
    if backend != "pyav":
        raise ValueError(f"unknown video backend {backend!r}; use pyav or decord")
    return _read_pyav(path, sampler, seek, max_pixels)


def load_video(
    source: str | os.PathLike | torch.Tensor,
    sampler: FrameSampler | Sequence[int] | None = None,
    *,
    backend: str = "pyav",
    fps: float | None = None,
) -> Video:
    """A canonical :class:`Video` from a file, GIF, folder of frames, or a float ``[T, 3, H, W]`` tensor
    (``fps`` then names its rate; the sampler picks frames from it)."""
    if isinstance(source, torch.Tensor):
        frames = check_video(source, "video")
        if frames.shape[0] != 1:
            raise ValueError(f"load_video takes one clip [T, 3, H, W], got a batch of {frames.shape[0]}")
        frames = frames[0]
        rate = fps or DEFAULT_FOLDER_FPS
        info = VideoInfo(frames.shape[0], rate, frames.shape[-1], frames.shape[-2])
        indices = _resolve_indices(Path("<tensor>"), sampler, info)
        return Video(frames[indices], rate, indices, frames.shape[0])
    array, indices, info = read_frames(source, sampler, backend=backend, fps=fps)
    return Video(frames_to_tensor(array), info.fps, indices, info.num_frames, str(source))


def check_video(videos: torch.Tensor, name: str = "videos") -> torch.Tensor:
    """Validate a canonical video batch ``[B, T, 3, H, W]`` (a single ``[T, 3, H, W]`` gains a batch axis)."""
    if videos.ndim == 4:
        videos = videos.unsqueeze(0)
    if videos.ndim != 5 or videos.shape[2] != 3:
        raise ValueError(f"{name}: expected a float tensor [B, T, 3, H, W] in [0, 1], got {tuple(videos.shape)}")
    if not videos.is_floating_point():
        raise ValueError(f"{name}: expected a float tensor in [0, 1], got dtype {videos.dtype}")
    if videos.shape[1] < 1:
        raise ValueError(f"{name}: a video needs at least one frame")
    return videos
