"""Audio: decode into float ``[C, S]`` in [-1, 1] plus sample rate; resample, mix down and normalise in torch.

* Decoding: soundfile (libsndfile) for wav/flac/ogg/aiff, PyAV (FFmpeg) for mp3/m4a/aac/opus and the rest.
  Empty, header-only, corrupt and undecodable files raise :class:`~mmalign.errors.MediaError` naming the file.
* :func:`resample`: windowed-sinc band-limited interpolation (Hann window, 6 zero crossings, roll-off 0.99),
  the method of ``torchaudio.functional.resample`` and julius, written in plain torch (differentiable, no
  torchaudio dependency).
* :func:`to_mono`: the channel mean. Normalisation: peak (dBFS), RMS (dBFS) or integrated loudness (LUFS,
  ITU-R BS.1770-4 K-weighting with the 400 ms / -70 LUFS absolute / -10 LU relative gates).
* :func:`window_starts` / :func:`split_windows`: deterministic windows over long audio (``first``, ``center``,
  or ``cover``: evenly spread full windows whose union is the whole track), and CLAP's ``repeatpad`` for short
  clips (LAION-AI/CLAP; transformers ``ClapFeatureExtractor``: tile ``floor(L / n)`` times, then zero-pad).
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import MediaError

SOUNDFILE_EXTENSIONS = frozenset({".wav", ".flac", ".ogg", ".oga", ".aiff", ".aif"})
AUDIO_EXTENSIONS = SOUNDFILE_EXTENSIONS | frozenset({".mp3", ".m4a", ".aac", ".opus", ".wma"})
NORMALIZATIONS = ("peak", "rms", "lufs")
DEFAULT_LEVELS = {"peak": 0.0, "rms": -20.0, "lufs": -23.0}  # dBFS, dBFS, LUFS (EBU R 128)
WINDOW_MODES = ("first", "center", "cover")
PAD_MODES = ("repeatpad", "repeat", "pad")


@dataclass
class Audio:
    """``waveform`` float ``[C, S]`` in [-1, 1] at ``sample_rate`` Hz."""

    waveform: torch.Tensor
    sample_rate: int
    path: str | None = None

    @property
    def num_samples(self) -> int:
        return int(self.waveform.shape[-1])

    @property
    def duration(self) -> float:
        return self.num_samples / float(self.sample_rate)


def is_audio_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in AUDIO_EXTENSIONS


# -- decoding ----------------------------------------------------------------------------------------------
def is_audio_bytes(data: bytes) -> bool:
    """Whether encoded bytes (a dataset's audio column, such as Audio-Alpaca's) start as an audio container does:
    WAV (``RIFF``…``WAVE``), FLAC, Ogg, AIFF, or MP3 (an ID3 tag or a frame sync)."""
    head = bytes(data[:12])
    return (
        (head[:4] == b"RIFF" and head[8:12] == b"WAVE")
        or head[:4] in (b"fLaC", b"OggS")
        or (head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"))
        or head[:3] == b"ID3"
        or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0)
    )


def _soundfile_bytes(data: bytes) -> bool:
    """Bytes libsndfile reads (WAV, FLAC, Ogg, AIFF); MP3 and the rest go to PyAV."""
    head = bytes(data[:12])
    return head[:4] in (b"RIFF", b"fLaC", b"OggS", b"FORM")


def _read_soundfile(source: Path | io.BytesIO, path: str | Path) -> tuple[np.ndarray, int]:
    import soundfile as sf

    try:
        data, rate = sf.read(source if isinstance(source, io.BytesIO) else str(source), dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError, OSError, ValueError, EOFError) as error:
        raise MediaError(path, f"cannot decode audio ({error}); the file may be truncated or corrupt") from error
    return np.ascontiguousarray(data.T), int(rate)


def _read_pyav(source: Path | io.BytesIO, path: str | Path) -> tuple[np.ndarray, int]:
    import av

    errors = (av.FFmpegError, OSError, ValueError, RuntimeError, EOFError)
    try:
        container = av.open(source if isinstance(source, io.BytesIO) else str(source))
    except errors as error:
        raise MediaError(path, f"cannot open as audio ({error}); the file may be truncated or corrupt") from error
    chunks: list[np.ndarray] = []
    with container:
        if not container.streams.audio:
            raise MediaError(path, "no audio stream in the file")
        stream = container.streams.audio[0]
        rate = int(stream.codec_context.sample_rate or stream.rate or 0)
        resampler = av.AudioResampler(format="fltp")  # float planar, same layout and rate
        try:
            for frame in container.decode(stream):
                chunks.extend(out.to_ndarray() for out in resampler.resample(frame))
            chunks.extend(out.to_ndarray() for out in resampler.resample(None))
        except errors as error:
            raise MediaError(path, f"cannot decode audio ({error}); the file may be truncated or corrupt") from error
    if not chunks:
        return np.zeros((1, 0), dtype=np.float32), rate
    if len({chunk.shape[0] for chunk in chunks}) > 1:
        raise MediaError(path, "the channel count changes within the stream")
    return np.concatenate(chunks, axis=1).astype(np.float32, copy=False), rate


def read_audio(source: str | os.PathLike | bytes, name: str | None = None) -> tuple[np.ndarray, int]:
    """Decode a file, or encoded bytes (a dataset's audio column: WAV, FLAC, Ogg or AIFF by soundfile, the rest by
    PyAV), into float32 ``[C, S]`` (values as stored, nominally [-1, 1]) and its sample rate. Errors name the
    file, or ``name`` (e.g. the dataset row) for bytes."""
    path: str | Path
    if isinstance(source, (bytes, bytearray)):
        path = name or f"audio bytes ({len(source)} B)"
        if not source:
            raise MediaError(path, "empty audio bytes")
        reader = _read_soundfile if _soundfile_bytes(source) else _read_pyav
        data, rate = reader(io.BytesIO(bytes(source)), path)
    else:
        path = Path(source)
        if not path.is_file():
            raise MediaError(path, "no such file" if not path.exists() else "not a regular file")
        if path.stat().st_size == 0:
            raise MediaError(path, "empty file (0 bytes)")
        reader = _read_soundfile if path.suffix.lower() in SOUNDFILE_EXTENSIONS else _read_pyav
        data, rate = reader(path, path)
    if data.shape[-1] == 0 or data.shape[0] == 0:
        raise MediaError(path, "no audio samples (an empty or header-only file)")
    if rate <= 0:
        raise MediaError(path, "the stream has no sample rate")
    if not np.isfinite(data).all():
        raise MediaError(path, "the audio holds NaN or infinite samples")
    return data, rate


# -- pure signal functions ---------------------------------------------------------------------------------
def to_mono(waveform: torch.Tensor) -> torch.Tensor:
    """Mix ``[..., C, S]`` down to ``[..., 1, S]`` by the channel mean."""
    return waveform.mean(dim=-2, keepdim=True)


def _sinc_kernel(orig: int, new: int, width_zeros: int, rolloff: float, dtype: torch.dtype, device) -> tuple:
    base = min(orig, new) * rolloff
    width = math.ceil(width_zeros * orig / base)
    idx = torch.arange(-width, width + orig, dtype=torch.float64, device=device)[None, None] / orig
    t = (torch.arange(0, -new, -1, dtype=torch.float64, device=device)[:, None, None] / new + idx) * base
    t = t.clamp(-width_zeros, width_zeros)
    window = torch.cos(t * math.pi / width_zeros / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / torch.where(t == 0, torch.ones_like(t), t))
    return (sinc * window * (base / orig)).to(dtype), width


def resample(
    waveform: torch.Tensor, orig_rate: int, new_rate: int, *, zero_crossings: int = 6, rolloff: float = 0.99
) -> torch.Tensor:
    """Resample the last axis from ``orig_rate`` to ``new_rate`` Hz by windowed-sinc interpolation.

    The output has ``ceil(S * new / orig)`` samples. Polyphase kernels after dividing both rates by their gcd;
    differentiable. Rates whose reduced ratio needs an enormous kernel fall back to ``scipy.signal.resample_poly``
    (not differentiable).
    """
    if orig_rate <= 0 or new_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_rate} and {new_rate}")
    if orig_rate == new_rate:
        return waveform
    gcd = math.gcd(orig_rate, new_rate)
    orig, new = orig_rate // gcd, new_rate // gcd
    shape = waveform.shape
    length = shape[-1]
    target = math.ceil(new * length / orig)
    width = math.ceil(zero_crossings * orig / (min(orig, new) * rolloff))
    if new * (2 * width + orig) > 20_000_000:  # kernel elements; e.g. 44099 -> 48000 Hz
        from scipy.signal import resample_poly

        array = resample_poly(waveform.detach().cpu().double().numpy(), new, orig, axis=-1)[..., :target]
        return torch.from_numpy(np.ascontiguousarray(array)).to(waveform.dtype)
    dtype = waveform.dtype if waveform.is_floating_point() else torch.float32
    kernel, width = _sinc_kernel(orig, new, zero_crossings, rolloff, dtype, waveform.device)  # [new, 1, taps]
    flat = waveform.reshape(-1, length).to(dtype)
    padded = F.pad(flat, (width, width + orig))
    out = F.conv1d(padded[:, None], kernel, stride=orig)  # [N, new, frames]
    out = out.transpose(1, 2).reshape(flat.shape[0], -1)[:, :target]
    return out.reshape(*shape[:-1], target)


def peak_normalize(waveform: torch.Tensor, peak_db: float = 0.0) -> torch.Tensor:
    """Scale so the largest absolute sample is ``peak_db`` dBFS (0 dB = 1.0)."""
    peak = waveform.abs().max()
    if peak <= 0:
        raise ValueError("silent audio (all samples zero) cannot be peak-normalised")
    return waveform * (10.0 ** (peak_db / 20.0) / peak)


def rms_normalize(waveform: torch.Tensor, rms_db: float = -20.0) -> torch.Tensor:
    """Scale so the root-mean-square over all samples is ``rms_db`` dBFS."""
    rms = waveform.pow(2).mean().sqrt()
    if rms <= 0:
        raise ValueError("silent audio (all samples zero) cannot be RMS-normalised")
    return waveform * (10.0 ** (rms_db / 20.0) / rms)


# ITU-R BS.1770-4, Table 1 and 2: the K-weighting pre-filter (high shelf) and RLB high-pass at 48 kHz.
_K_SHELF = ([1.53512485958697, -2.69169618940638, 1.19839281085285], [1.0, -1.69065929318241, 0.73248077421585])
_K_HIGHPASS = ([1.0, -2.0, 1.0], [1.0, -1.99004745483398, 0.99007225036621])


def loudness(waveform: torch.Tensor, sample_rate: int) -> float:
    """Integrated loudness in LUFS of ``[C, S]`` (ITU-R BS.1770-4): K-weighting (at 48 kHz, resampling first),
    mean square per 400 ms block with 75 % overlap, absolute gate -70 LUFS, relative gate -10 LU. Every channel
    has weight 1 (no surround channels). ``-inf`` for silence.

    Not pyloudnorm's meter: that one reads 0.043 LU low everywhere (it normalises the RLB high-pass numerator,
    so the standard's 997 Hz check sine reads -3.05 instead of -3.01 LKFS), caps at five channels and gives the
    4th and 5th surround gains. tests/modalities/test_audio.py checks this function against it."""
    from scipy.signal import lfilter

    if waveform.ndim == 1:
        waveform = waveform[None]
    signal = resample(waveform.detach().double().cpu(), sample_rate, 48_000).numpy()
    block, step = 19_200, 4_800  # 400 ms and 100 ms at 48 kHz
    if signal.shape[-1] < block:
        raise ValueError(f"loudness needs at least 0.4 s of audio, got {waveform.shape[-1] / sample_rate:.3f} s")
    weighted = lfilter(*_K_HIGHPASS, lfilter(*_K_SHELF, signal, axis=-1), axis=-1)
    count = (weighted.shape[-1] - block) // step + 1
    squares = np.cumsum(np.pad(weighted**2, ((0, 0), (1, 0))), axis=-1)
    starts = np.arange(count) * step
    means = (squares[:, starts + block] - squares[:, starts]) / block  # [C, blocks]
    power = means.sum(axis=0)
    with np.errstate(divide="ignore"):
        block_loudness = -0.691 + 10.0 * np.log10(power)
    gated = block_loudness > -70.0
    if not gated.any():
        return float("-inf")
    relative = -0.691 + 10.0 * np.log10(means[:, gated].mean(axis=1).sum()) - 10.0
    keep = gated & (block_loudness > relative)
    return float(-0.691 + 10.0 * np.log10(means[:, keep].mean(axis=1).sum()))


def loudness_normalize(waveform: torch.Tensor, sample_rate: int, lufs: float = -23.0) -> torch.Tensor:
    """Scale to an integrated loudness of ``lufs`` (EBU R 128's -23 by default). Peaks may exceed 1."""
    measured = loudness(waveform, sample_rate)
    if not math.isfinite(measured):
        raise ValueError("silent audio (below the -70 LUFS gate) cannot be loudness-normalised")
    return waveform * 10.0 ** ((lufs - measured) / 20.0)


def normalize_audio(waveform: torch.Tensor, sample_rate: int, mode: str, level: float | None = None) -> torch.Tensor:
    """``mode``: ``peak`` (dBFS), ``rms`` (dBFS) or ``lufs``; ``level`` defaults to 0 dBFS, -20 dBFS, -23 LUFS."""
    if mode not in NORMALIZATIONS:
        raise ValueError(f"normalisation must be one of {', '.join(NORMALIZATIONS)}, got {mode!r}")
    level = DEFAULT_LEVELS[mode] if level is None else level
    if mode == "peak":
        return peak_normalize(waveform, level)
    if mode == "rms":
        return rms_normalize(waveform, level)
    return loudness_normalize(waveform, sample_rate, level)


def window_starts(num_samples: int, window: int, hop: int | None = None, mode: str = "cover") -> list[int]:
    """Start samples of deterministic windows of ``window`` samples.

    ``first``: ``[0]``; ``center``: the middle window; ``cover``: ``N = ceil((S - W) / hop) + 1`` full windows,
    starts ``round(linspace(0, S - W, N))``, so the first starts at 0, the last ends at ``S`` and no gap exceeds
    ``hop`` (default ``W``: windows tile the track, overlapping just enough to end flush). Audio no longer than
    one window gives ``[0]``.
    """
    if num_samples < 1:
        raise ValueError("no samples to window")
    if window < 1:
        raise ValueError(f"window must be at least one sample, got {window}")
    if mode not in WINDOW_MODES:
        raise ValueError(f"window mode must be one of {', '.join(WINDOW_MODES)}, got {mode!r}")
    if num_samples <= window or mode == "first":
        return [0]
    if mode == "center":
        return [(num_samples - window) // 2]
    hop = window if hop is None else hop
    if hop < 1:
        raise ValueError(f"hop must be at least one sample, got {hop}")
    count = math.ceil((num_samples - window) / hop) + 1
    return [int(s) for s in np.round(np.linspace(0, num_samples - window, count))]


def pad_to(waveform: torch.Tensor, length: int, mode: str = "repeatpad") -> torch.Tensor:
    """Fit the last axis to ``length``: longer input is cut; shorter is padded as CLAP does: ``repeatpad`` tiles
    ``floor(length / n)`` copies then zero-pads, ``repeat`` tiles and cuts, ``pad`` zero-pads."""
    if mode not in PAD_MODES:
        raise ValueError(f"padding must be one of {', '.join(PAD_MODES)}, got {mode!r}")
    size = waveform.shape[-1]
    if size >= length:
        return waveform[..., :length]
    if size == 0:
        raise ValueError("cannot pad an empty waveform")
    if mode == "repeatpad":
        waveform = waveform.repeat(*([1] * (waveform.ndim - 1)), length // size)
    elif mode == "repeat":
        waveform = waveform.repeat(*([1] * (waveform.ndim - 1)), length // size + 1)[..., :length]
    return F.pad(waveform, (0, length - waveform.shape[-1]))


def split_windows(
    waveform: torch.Tensor, window: int, hop: int | None = None, mode: str = "cover", pad: str = "repeatpad"
) -> tuple[torch.Tensor, list[int]]:
    """``[..., S]`` -> ``[..., N, window]`` windows at :func:`window_starts` (short audio padded by ``pad``),
    and their start samples."""
    starts = window_starts(waveform.shape[-1], window, hop, mode)
    pieces = [pad_to(waveform[..., start : start + window], window, pad) for start in starts]
    return torch.stack(pieces, dim=-2), starts


# -- loading -------------------------------------------------------------------------------------------------
def check_audio(audio: torch.Tensor, name: str = "audio") -> torch.Tensor:
    """Validate a canonical audio batch ``[B, C, S]`` (``[C, S]`` gains a batch axis, ``[S]`` two)."""
    if audio.ndim == 1:
        audio = audio[None, None]
    elif audio.ndim == 2:
        audio = audio[None]
    if audio.ndim != 3:
        raise ValueError(f"{name}: expected a float tensor [B, C, S] in [-1, 1], got {tuple(audio.shape)}")
    if not audio.is_floating_point():
        raise ValueError(f"{name}: expected a float tensor in [-1, 1], got dtype {audio.dtype}")
    if audio.shape[-1] == 0 or audio.shape[-2] == 0:
        raise ValueError(f"{name}: no samples")
    return audio


def load_audio(
    source: str | os.PathLike | bytes | torch.Tensor,
    *,
    sample_rate: int | None = None,
    mono: bool = False,
    normalize: str | None = None,
    level: float | None = None,
    source_rate: int | None = None,
) -> Audio:
    """A canonical :class:`Audio` from a file, encoded bytes or a ``[C, S]`` tensor (at ``source_rate``), resampled
    to ``sample_rate`` (default: keep), mixed to mono if asked, and normalised (``peak`` / ``rms`` / ``lufs``)."""
    path: str | None = None
    if isinstance(source, torch.Tensor):
        if source_rate is None:
            raise ValueError("a tensor needs its source_rate")
        waveform, rate = check_audio(source)[0], int(source_rate)
    elif isinstance(source, (bytes, bytearray)):
        data, rate = read_audio(source)
        waveform = torch.from_numpy(data)
    else:
        data, rate = read_audio(source)
        waveform, path = torch.from_numpy(data), str(source)
    if mono:
        waveform = to_mono(waveform)
    if sample_rate is not None and sample_rate != rate:
        waveform, rate = resample(waveform, rate, sample_rate), int(sample_rate)
    if normalize is not None:
        try:
            waveform = normalize_audio(waveform, rate, normalize, level)
        except ValueError as error:
            if path is None:
                raise
            raise MediaError(path, str(error)) from error
    return Audio(waveform, rate, path)
