"""Music: audio with music defaults, mono at 48 kHz (CLAP's rate) and windows covering the whole track.

A song is longer than any audio encoder's context (CLAP: 10 s), so it is scored window by window and the
window scores are aggregated (:class:`mmalign.rewards.clap.ClapReward` with ``windows="cover"``; the
``clap-music`` registry entry uses LAION's ``larger_clap_music``).
"""

from __future__ import annotations

import os

import torch

from .audio import Audio, load_audio, split_windows

MUSIC_SAMPLE_RATE = 48_000
MUSIC_WINDOW_SECONDS = 10.0


def load_music(
    source: str | os.PathLike | torch.Tensor,
    *,
    sample_rate: int = MUSIC_SAMPLE_RATE,
    normalize: str | None = None,
    level: float | None = None,
    source_rate: int | None = None,
) -> Audio:
    """A track as mono :class:`~mmalign.modalities.audio.Audio` at ``sample_rate`` (48 kHz)."""
    return load_audio(
        source, sample_rate=sample_rate, mono=True, normalize=normalize, level=level, source_rate=source_rate
    )


def music_windows(
    audio: Audio, window_seconds: float = MUSIC_WINDOW_SECONDS, hop_seconds: float | None = None
) -> tuple[torch.Tensor, list[float]]:
    """Windows ``[C, N, W]`` covering the whole track (short tracks repeat-padded) and their start times (s)."""
    window = max(1, round(window_seconds * audio.sample_rate))
    hop = None if hop_seconds is None else max(1, round(hop_seconds * audio.sample_rate))
    windows, starts = split_windows(audio.waveform, window, hop, mode="cover")
    return windows, [start / audio.sample_rate for start in starts]
