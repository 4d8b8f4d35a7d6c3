"""The waveform → log-mel front end AudioLDM and AudioLDM 2 train their VAE on, for offline audio pairs.

diffusers' ``AudioLDM2Pipeline`` only decodes (VAE → mel → HiFi-GAN); encoding a recorded clip into its latents
needs the mel transform of the reference training code (haoheliu/AudioLDM2, ``utilities/data/dataset.py`` and
``utilities/audio/stft.py``; Liu et al. 2023, arXiv:2308.05734), re-derived here in torch:

1. the clip, at the vocoder's rate, mono, is centred and peak-normalised to 0.5 (``normalize_wav``: ``x − mean``,
   ``/ (max|x| + 1e-8)``, ``· 0.5``), then zero-padded or cropped at the end to the sample's length;
2. the magnitude STFT (periodic Hann window of ``win_length`` zero-padded to ``n_fft``, hop ``hop_length``, the
   signal reflect-padded by ``n_fft / 2`` on both sides: ``torch.stft(center=True)``);
3. a Slaney mel filter bank (librosa's default: Slaney mel scale, area-normalised filters) from ``fmin`` to
   ``fmax``, then ``log(clamp(mel, 1e-5))``;
4. the first ``frames`` frames, as ``[B, 1, T, M]`` (time by mel bin: the VAE's image layout).

The settings are not in the checkpoint's configs, only in the reference's training config, but three of them are:
the vocoder's ``sampling_rate``, ``model_in_dim`` (mel bins) and the product of its ``upsample_rates`` (the hop).
:func:`mel_settings_for` derives the rest: ``fmin`` 0, ``fmax`` the Nyquist frequency and ``n_fft = win_length``
the smallest power of two of at least four hops, which gives both published settings — 16 kHz: n_fft 1024, hop
160, 64 bins, 0–8000 Hz (every AudioLDM 2 checkpoint); 48 kHz: 2048, 480, 256 bins, 0–24000 Hz (AudioLDM 48k).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["MelSettings", "audioldm_log_mel", "mel_settings_for", "normalize_waveform"]

#: the floor of the log compression (``dynamic_range_compression``'s ``clip_val``)
LOG_FLOOR = 1e-5


@dataclass(frozen=True)
class MelSettings:
    """One AudioLDM mel front end (see this module)."""

    sample_rate: int
    n_fft: int
    hop_length: int
    win_length: int
    n_mels: int
    fmin: float
    fmax: float

    @functools.cache  # noqa: B019 - frozen settings, a handful per process: built once, not once per clip
    def filter_bank(self) -> Tensor:
        """``[n_mels, n_fft // 2 + 1]`` Slaney filters (librosa's ``filters.mel`` defaults), float32."""
        from transformers.audio_utils import mel_filter_bank

        bank = mel_filter_bank(
            num_frequency_bins=self.n_fft // 2 + 1,
            num_mel_filters=self.n_mels,
            min_frequency=self.fmin,
            max_frequency=self.fmax,
            sampling_rate=self.sample_rate,
            norm="slaney",
            mel_scale="slaney",
        )
        return torch.from_numpy(bank.T.copy()).float()


def mel_settings_for(vocoder_config: Any) -> MelSettings:
    """The front end of a checkpoint, from its ``SpeechT5HifiGan`` config (see this module for the rule)."""
    rate = int(vocoder_config.sampling_rate)
    hop = int(math.prod(vocoder_config.upsample_rates))
    n_fft = 1 << max(0, math.ceil(math.log2(4 * hop)))
    return MelSettings(rate, n_fft, hop, n_fft, int(vocoder_config.model_in_dim), 0.0, rate / 2)


def normalize_waveform(waveform: Tensor) -> Tensor:
    """The reference's ``normalize_wav`` per clip (last axis): ``0.5 · (x − mean) / (max|x − mean| + 1e-8)``."""
    centred = waveform - waveform.mean(-1, keepdim=True)
    return 0.5 * centred / (centred.abs().amax(-1, keepdim=True) + 1e-8)


def audioldm_log_mel(waveform: Tensor, settings: MelSettings, frames: int) -> Tensor:
    """Mono waveforms ``[B, S]`` (already normalised and of the sample's length) → log-mel ``[B, 1, frames, M]``.

    The clip is zero-padded to ``frames · hop`` samples first if shorter, so that every requested frame sees
    signal or silence (the reference pads its log-mel with zeros instead, i.e. with a loud constant, when a clip is
    short of ``duration``: never the case for clips padded to the sample's length, as here)."""
    if waveform.ndim != 2:
        raise ValueError(f"expected mono waveforms [B, S], got {tuple(waveform.shape)}")
    short = frames * settings.hop_length - waveform.shape[-1]
    if short > 0:
        waveform = torch.nn.functional.pad(waveform, (0, short))
    window = torch.hann_window(settings.win_length, periodic=True, dtype=waveform.dtype, device=waveform.device)
    spectrum = torch.stft(
        waveform,
        settings.n_fft,
        hop_length=settings.hop_length,
        win_length=settings.win_length,
        window=window,
        center=True,
        pad_mode="reflect",
        return_complex=True,
    ).abs()
    mel = settings.filter_bank().to(waveform.device, waveform.dtype) @ spectrum
    return torch.log(mel.clamp(min=LOG_FLOOR))[..., :frames].transpose(1, 2).unsqueeze(1)
