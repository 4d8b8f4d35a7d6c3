"""CLAP score for audio and music: cosine of CLAP's text and audio embeddings (Wu et al. 2023,
arXiv:2211.06687; LAION-AI/CLAP; transformers ``ClapModel`` / ``ClapFeatureExtractor``).

Audio is mixed to mono and resampled to 48 kHz (:mod:`mmalign.modalities.audio`), cut into deterministic windows
of at most the model's 10 s, each window repeat-padded to 10 s (``repeatpad``) and turned into a 64-bin log-mel
spectrogram (n_fft 1024, hop 480, 50-14000 Hz). Differences from the reference usage:

* the unfused model crops audio longer than 10 s at random (``rand_trunc``); here windows are deterministic:
  ``center`` (one window in the middle, the ``clap`` default), ``first``, or ``cover`` (windows over the whole
  track, aggregated by mean or min: ``clap-music``);
* for fused models the feature extractor marks a random clip of a batch as "longer"; here every window is
  featurised on its own, as a single clip is by the extractor (which then always marks it);
* the text is truncated at 77 tokens as LAION-AI/CLAP's tokenizer call does.

``score_tensor`` computes the same log-mel in torch (``torch.stft``, the extractor's own mel filters), so the
score is differentiable in the waveform; it matches the extractor's numpy features to float32 rounding (tested).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from ..hub import resolve_dir
from ..modalities.audio import WINDOW_MODES, Audio, check_audio, load_audio, pad_to, resample, to_mono, window_starts
from ..modalities.image import broadcast_prompts
from .base import TwoTowerReward, resolve_dtype
from .lifted import AudioFileScoring, MediaScore, aggregate_scores

CLAP_REPO = "laion/clap-htsat-unfused"
CLAP_MUSIC_REPO = "laion/larger_clap_music"
WINDOW_AGGREGATES = ("mean", "min", "max")
TEXT_MAX_LENGTH = 77  # LAION-AI/CLAP tokenises with max_length=77


def _features(output: Any) -> torch.Tensor:
    """transformers 5 returns an output object from ``get_*_features``; 4.x returned the tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClapReward(AudioFileScoring, TwoTowerReward):
    """CLAP text-audio cosine. ``windows``: ``center`` | ``first`` | ``cover``; ``window_seconds`` (at most the
    model's 10 s); ``hop_seconds`` for ``cover``; ``aggregate`` over windows: ``mean`` | ``min`` | ``max``."""

    name = "clap"
    modality: ClassVar[str] = "audio"
    unit: ClassVar[str] = "window"
    score_scale: ClassVar[str] = "cosine of CLAP text and audio embeddings, in [-1, 1]"

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        feature_extractor: Any,
        *,
        windows: str = "center",
        window_seconds: float | None = None,
        hop_seconds: float | None = None,
        aggregate: str = "mean",
        name: str = "clap",
        normalize: str | None = None,
    ):
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.feature_extractor = feature_extractor
        self.name = name
        self.sample_rate = int(feature_extractor.sampling_rate)
        self.max_samples = int(feature_extractor.nb_max_samples)
        self.n_fft = int(feature_extractor.fft_window_size)
        self.hop_length = int(feature_extractor.hop_length)
        self.padding = feature_extractor.padding
        self.fusion = feature_extractor.truncation == "fusion"
        filters = feature_extractor.mel_filters if self.fusion else feature_extractor.mel_filters_slaney
        # float64 constants kept off the module's buffers, so .to(dtype=bf16) cannot round them
        self.mel_filters = torch.tensor(np.asarray(filters), dtype=torch.float64)
        self.stft_window = torch.hann_window(self.n_fft, periodic=True, dtype=torch.float64)
        self.normalize = normalize
        self.configure(windows, window_seconds, hop_seconds, aggregate)

    def configure(
        self,
        windows: str | None = None,
        window_seconds: float | None = None,
        hop_seconds: float | None = None,
        aggregate: str | None = None,
    ) -> ClapReward:
        """Set the windowing (``None`` keeps the current value; ``window_seconds`` ``None`` = the model's 10 s)."""
        windows = windows or getattr(self, "windows", "center")
        aggregate = aggregate or getattr(self, "aggregate", "mean")
        if windows not in WINDOW_MODES:
            raise ValueError(f"windows must be one of {', '.join(WINDOW_MODES)}, got {windows!r}")
        if aggregate not in WINDOW_AGGREGATES:
            raise ValueError(f"window aggregate must be one of {', '.join(WINDOW_AGGREGATES)}, got {aggregate!r}")
        max_seconds = self.max_samples / self.sample_rate
        seconds = max_seconds if window_seconds is None else float(window_seconds)
        if not 0 < seconds <= max_seconds:
            raise ValueError(f"window_seconds must be in (0, {max_seconds:g}] for this model, got {seconds:g}")
        self.windows, self.aggregate, self.window_seconds, self.hop_seconds = windows, aggregate, seconds, hop_seconds
        return self

    def with_windows(
        self,
        windows: str | None = None,
        window_seconds: float | None = None,
        hop_seconds: float | None = None,
        aggregate: str | None = None,
        normalize: str | None = None,
    ) -> ClapReward:
        """A view of this reward (sharing the model and text cache) with other windowing; ``None`` keeps."""
        view = copy.copy(self)
        view.configure(
            windows,
            self.window_seconds if window_seconds is None else window_seconds,
            self.hop_seconds if hop_seconds is None else hop_seconds,
            aggregate,
        )
        view.normalize = self.normalize if normalize is None else normalize
        return view

    @property
    def variant(self) -> str:
        parts = [self.windows, f"{self.window_seconds:g}s", self.aggregate]
        if self.hop_seconds is not None and self.windows == "cover":
            parts.append(f"hop{self.hop_seconds:g}s")
        if self.normalize:
            parts.append(self.normalize)
        return "/".join(parts)

    def info(self) -> dict[str, object]:
        return {**super().info(), "aggregate": self.aggregate, "unit": self.unit, "windows": self.windows}

    @classmethod
    def from_pretrained(
        cls,
        weights: str | None = None,
        processor: str | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "fp32",
        *,
        default_repo: str = CLAP_REPO,
        name: str = "clap",
        windows: str = "center",
        window_seconds: float | None = None,
        hop_seconds: float | None = None,
        aggregate: str = "mean",
        normalize: str | None = None,
        **_: Any,
    ) -> ClapReward:
        """``weights``: a ``ClapModel`` folder or hub id (default ``laion/clap-htsat-unfused``); ``processor``:
        the folder with the tokenizer and ``ClapFeatureExtractor`` config (default: the weights folder)."""
        from transformers import AutoTokenizer, ClapFeatureExtractor, ClapModel

        model_dir = resolve_dir(weights, default_repo=default_repo, what=f"{name} model")
        proc_dir = (
            model_dir if processor is None else resolve_dir(processor, default_repo=default_repo, what="CLAP processor")
        )
        tokenizer = AutoTokenizer.from_pretrained(str(proc_dir))
        extractor = ClapFeatureExtractor.from_pretrained(str(proc_dir))
        model = ClapModel.from_pretrained(str(model_dir))
        reward = cls(
            model,
            tokenizer,
            extractor,
            windows=windows,
            window_seconds=window_seconds,
            hop_seconds=hop_seconds,
            aggregate=aggregate,
            name=name,
            normalize=normalize,
        )
        return reward.to(device=device, dtype=resolve_dtype(dtype))

    # -- towers ------------------------------------------------------------------------------------------------
    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        limit = min(TEXT_MAX_LENGTH, getattr(self.tokenizer, "model_max_length", TEXT_MAX_LENGTH))
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=limit, return_tensors="pt")
        tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        return _features(self.model.get_text_features(**tokens))

    def encode_audio(self, input_features: torch.Tensor, is_longer: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalised float32 audio features ``[N, D]`` of log-mel inputs ``[N, 1 or 4, T, 64]``."""
        if is_longer is None:
            is_longer = torch.full((input_features.shape[0], 1), self.fusion, dtype=torch.bool)
        output = self.model.get_audio_features(
            input_features=input_features.to(device=self.device, dtype=self.dtype), is_longer=is_longer.to(self.device)
        )
        features = _features(output).float()
        return features / features.norm(dim=-1, keepdim=True)

    def preprocess_reference(self, image: Any) -> torch.Tensor:
        raise TypeError("CLAP scores audio: use score_audio / score_tensor")

    def preprocess_tensor(self, images: torch.Tensor) -> torch.Tensor:
        raise TypeError("CLAP scores audio: use score_tensor(audio, prompts, sample_rate=...)")

    # -- features ------------------------------------------------------------------------------------------------
    def log_mel(self, clips: torch.Tensor) -> torch.Tensor:
        """Model inputs ``[N, 1 or 4, T, n_mels]`` of 48 kHz clips ``[N, 10 s]`` (differentiable): power STFT
        (Hann, centred, reflect padding), the extractor's mel filters, ``10 log10(max(mel, 1e-10))``; computed in
        float64 and returned in float32, as the extractor does."""
        spec = torch.stft(
            clips.double(),
            n_fft=self.n_fft,
            hop_length=self.hop_length,
            window=self.stft_window.to(clips.device),
            center=True,
            pad_mode="reflect",
            return_complex=True,
        )
        power = spec.real.square() + spec.imag.square()  # [N, bins, T]
        mel = power.transpose(1, 2) @ self.mel_filters.to(clips.device)
        features = (10.0 * torch.log10(mel.clamp_min(1e-10))).float()[:, None]
        return features.expand(-1, 4, -1, -1) if self.fusion else features

    def _window_bounds(self, num_samples: int) -> tuple[int, list[int]]:
        window = max(1, round(self.window_seconds * self.sample_rate))
        hop = None if self.hop_seconds is None else max(1, round(self.hop_seconds * self.sample_rate))
        return window, window_starts(num_samples, window, hop, self.windows)

    def _reference_inputs(self, waveform: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.feature_extractor(waveform, sampling_rate=self.sample_rate, return_tensors="pt")
        return out["input_features"][0], out["is_longer"][0]

    # -- scoring -------------------------------------------------------------------------------------------------
    def score_detailed(
        self, audio: torch.Tensor, prompts: str | Sequence[str] | None = None, sample_rate: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Differentiable totals ``[B]``, window scores ``[B, N]`` and window starts (samples at 48 kHz) of a
        canonical batch ``[B, C, S]`` at ``sample_rate`` (default 48 kHz)."""
        audio = check_audio(audio)
        batch = audio.shape[0]
        prompts = broadcast_prompts(prompts, batch)
        wave = to_mono(audio)[:, 0]
        wave = resample(wave, sample_rate or self.sample_rate, self.sample_rate)
        window, starts = self._window_bounds(wave.shape[-1])
        clips = torch.stack([pad_to(wave[:, s : s + window], self.max_samples, self.padding) for s in starts], dim=1)
        features = self.encode_audio(self.log_mel(clips.flatten(0, 1).to(self.device)))
        text = self.encode_text(prompts).to(features.device)
        scores = (features.view(batch, len(starts), -1) * text[:, None]).sum(dim=-1)
        return aggregate_scores(scores, self.aggregate), scores, starts

    def score_tensor(
        self, audio: torch.Tensor, prompts: str | Sequence[str] | None = None, sample_rate: int | None = None
    ) -> torch.Tensor:
        """Differentiable CLAP scores ``[B]`` of audio ``[B, C, S]`` in [-1, 1] at ``sample_rate`` (48 kHz)."""
        return self.score_detailed(audio, prompts, sample_rate)[0]

    def decode(self, source: str | os.PathLike) -> Audio:
        """Decode, mix to mono, resample to 48 kHz (and normalise when configured)."""
        return load_audio(source, sample_rate=self.sample_rate, mono=True, normalize=self.normalize)

    @torch.no_grad()
    def score_decoded(self, decoded: Sequence[Audio], prompts: Sequence[str], batch_size: int = 32) -> list[MediaScore]:
        """Reference features (the transformers feature extractor on each window), batched across files."""
        prompts = broadcast_prompts(prompts, len(decoded))
        inputs, owners, starts_of = [], [], []
        for n, audio in enumerate(decoded):
            if audio.sample_rate != self.sample_rate:
                audio = Audio(
                    resample(audio.waveform, audio.sample_rate, self.sample_rate), self.sample_rate, audio.path
                )
            wave = to_mono(audio.waveform)[0].double().numpy()
            window, starts = self._window_bounds(wave.shape[-1])
            starts_of.append(starts)
            for start in starts:
                inputs.append(self._reference_inputs(wave[start : start + window]))
                owners.append(n)
        scores = torch.empty(len(inputs))
        for begin in range(0, len(inputs), batch_size):
            chunk = inputs[begin : begin + batch_size]
            features = self.encode_audio(torch.stack([f for f, _ in chunk]), torch.stack([c for _, c in chunk]))
            text = self.encode_text([prompts[owners[i]] for i in range(begin, begin + len(chunk))]).to(features.device)
            scores[begin : begin + len(chunk)] = (features * text).sum(dim=-1).cpu()
        results, offset = [], 0
        for audio, starts in zip(decoded, starts_of):
            units = scores[offset : offset + len(starts)]
            offset += len(starts)
            results.append(
                MediaScore(
                    float(aggregate_scores(units, self.aggregate)),
                    units.tolist(),
                    "window",
                    [s / self.sample_rate for s in starts],
                    extra={"duration": audio.duration},
                )
            )
        return results
