"""Audiobox Aesthetics (Tjandra et al. 2025, arXiv:2502.05139; facebookresearch/audiobox-aesthetics, PyPI
``audiobox-aesthetics``): four per-axis scores of speech, music and sound, each on the raters' 1-10 scale:

* ``CE`` content enjoyment, ``CU`` content usefulness, ``PQ`` production quality: higher is better;
* ``PC`` production complexity: how many components the audio scene holds (a description, not a quality).

The model is a WavLM-Base encoder (7-layer convolutional front end, 12 post-LN transformer layers with gated
relative position bias) and, per axis, a softmax-weighted sum of the 13 hidden states, a masked mean over frames,
L2 normalisation and a linear head whose output is mapped back by the stored ``target_transform`` mean/std.

Written here from the package's description of the computation (``model/aes.py``, ``model/wavlm.py``,
``infer.py`` of 0.0.4), in plain torch; ``benchmarks/parity_audiobox.py`` runs the package itself on the same
weights. What the package does and this module repeats:

* audio is resampled to 16 kHz (windowed sinc, Hann, 6 zero crossings, roll-off 0.99: ``torchaudio``'s default;
  here :func:`mmalign.modalities.audio.resample`) and mixed to mono by the channel mean;
* it is cut into 10 s chunks starting every 10 s from 0; the last one is zero-padded to 10 s and its padding
  masked (frames whose samples are all padding are left out of attention keys and of the mean over frames);
* each axis is the mean of the chunk scores weighted by each chunk's valid length / 10 s.

Differences: the package scores under ``inference_mode``; here :meth:`AudioboxAestheticsReward.score_tensor`
is differentiable in the waveform (without the encoder's training-time gradient scaling ``feature_grad_mult``,
which only scales gradients). The package has no overall score; ``audiobox-aesthetics`` scores the mean of the
three quality axes CE, CU and PQ (PC is left out: more complex is not better), ``audiobox-ce`` etc. one axis;
every file score also records all four axes.

Checkpoints: the hub folder ``facebook/audiobox-aesthetics`` (``config.json`` + ``model.safetensors``, as the
package's ``AesMultiOutput.save_pretrained`` writes them) or the release's ``checkpoint.pt`` (``state_dict`` with a
``model.`` prefix, ``model_cfg``, ``target_transform``), opened with ``torch.load(weights_only=True)``. Loading is
strict: missing, unexpected and mis-shaped keys are all reported. ``config.json`` may carry a ``wavlm`` object
with encoder sizes (mmalign's tiny test models); the package ignores it and always builds WavLM-Base.
"""

from __future__ import annotations

import ast
import copy
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import WeightsError
from ..hub import load_into, load_state_dict, resolve_dir
from ..modalities.audio import Audio, check_audio, load_audio, resample, to_mono
from .base import Reward, resolve_dtype
from .lifted import AudioFileScoring, MediaScore

AUDIOBOX_REPO = "facebook/audiobox-aesthetics"
AXES = ("CE", "CU", "PC", "PQ")  # the package's order
QUALITY_AXES = ("CE", "CU", "PQ")
AXIS_NAMES = {
    "CE": "content enjoyment",
    "CU": "content usefulness",
    "PC": "production complexity",
    "PQ": "production quality",
}
OVERALL = "overall"
SAMPLE_RATE = 16_000
CHUNK_SECONDS = 10
CHUNK_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE
AGGREGATES = ("mean", "min", "max")
# the head's fields that the package reads from config.json / checkpoint.pt ``model_cfg``
HEAD_FIELDS = (
    "proj_num_layer",
    "proj_ln",
    "proj_act_fn",
    "proj_dropout",
    "nth_layer",
    "use_weighted_layer_sum",
    "precision",
    "normalize_embed",
    "output_dim",
)


@dataclass
class WavLMSettings:
    """The encoder sizes; defaults are the package's fixed ``DEFAULT_AUDIO_CFG`` (WavLM Base)."""

    conv_feature_layers: str = "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2"
    conv_bias: bool = False
    encoder_layers: int = 12
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    conv_pos: int = 128
    conv_pos_groups: int = 16
    num_buckets: int = 320
    max_distance: int = 800
    layer_norm_eps: float = 1e-5

    @property
    def conv_layers(self) -> list[tuple[int, int, int]]:
        # a Python list expression of (dim, kernel, stride) tuples: evaluated as literals, never as code
        tree = ast.parse(self.conv_feature_layers, mode="eval").body
        return [tuple(int(v) for v in item) for item in _literal_list(tree)]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> WavLMSettings:
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise WeightsError(f"unknown wavlm settings in config.json: {', '.join(unknown)}")
        return cls(**data)


def _literal_list(node: ast.AST) -> list:
    """``[(a,b,c)] + [(d,e,f)] * n`` -> the list, from literals only."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _literal_list(node.left) + _literal_list(node.right)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
        return _literal_list(node.left) * int(ast.literal_eval(node.right))
    value = ast.literal_eval(node)
    if not isinstance(value, list):
        raise WeightsError(f"conv_feature_layers: expected a list of (dim, kernel, stride), got {value!r}")
    return value


@dataclass
class HeadSettings:
    """``AesMultiOutput``'s fields (config.json); validated against what the package can actually run."""

    proj_num_layer: int = 1
    proj_ln: bool = False
    proj_act_fn: str = "gelu"
    proj_dropout: float = 0.0
    nth_layer: int = 13
    use_weighted_layer_sum: bool = True
    precision: str = "32"
    normalize_embed: bool = True
    output_dim: int = 1
    target_transform: dict[str, dict[str, float]] = field(default_factory=dict)

    def check(self, encoder_layers: int, source: str) -> None:
        if self.nth_layer != encoder_layers + 1:
            raise WeightsError(
                f"{source}: nth_layer {self.nth_layer} with {encoder_layers} encoder layers; the package's layer "
                f"sum needs nth_layer = layers + 1 = {encoder_layers + 1}"
            )
        if not self.use_weighted_layer_sum:
            raise WeightsError(
                f"{source}: use_weighted_layer_sum=false is not supported (the package's branch is broken)"
            )
        if self.output_dim != 1 or self.proj_act_fn != "gelu":
            raise WeightsError(f"{source}: only output_dim 1 and proj_act_fn gelu are supported")
        missing = [a for a in AXES if a not in (self.target_transform or {})]
        if missing:
            raise WeightsError(f"{source}: target_transform has no mean/std for {', '.join(missing)}")


# -- the model -------------------------------------------------------------------------------------------------
class _FloatGroupNorm(nn.GroupNorm):
    """Group norm computed in float32 (fairseq's ``Fp32GroupNorm``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps)
        return out.type_as(x)


class ConvFeatures(nn.Module):
    """Strided 1-D convolutions over the waveform; the first has a per-channel group norm ("default" mode).
    Submodule indices follow the checkpoint (``conv_layers.i.0`` conv, ``conv_layers.0.2`` norm)."""

    def __init__(self, layers: Sequence[tuple[int, int, int]], bias: bool):
        super().__init__()
        blocks, channels = [], 1
        for index, (dim, kernel, stride) in enumerate(layers):
            conv = nn.Conv1d(channels, dim, kernel, stride=stride, bias=bias)
            norm = _FloatGroupNorm(dim, dim, affine=True) if index == 0 else nn.Identity()
            blocks.append(nn.Sequential(conv, nn.Identity(), norm, nn.GELU()))
            channels = dim
        self.conv_layers = nn.ModuleList(blocks)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:  # [N, S] -> [N, C, T]
        x = wave[:, None]
        for block in self.conv_layers:
            x = block(x)
        return x


class WeightNormConv1d(nn.Module):
    """A grouped convolution stored as weight norm over dim 2 (``weight_g`` ``[1, 1, K]``, ``weight_v``)."""

    def __init__(self, channels: int, kernel: int, groups: int):
        super().__init__()
        self.groups, self.padding = groups, kernel // 2
        self.weight_g = nn.Parameter(torch.ones(1, 1, kernel))
        self.weight_v = nn.Parameter(torch.randn(channels, channels // groups, kernel) * 0.02)
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.weight_v.float().pow(2).sum(dim=(0, 1), keepdim=True).sqrt()
        weight = (self.weight_v.float() * (self.weight_g.float() / norm)).to(x.dtype)
        return F.conv1d(x, weight, self.bias, padding=self.padding, groups=self.groups)


class SelfAttention(nn.Module):
    """Multi-head self-attention with WavLM's gated relative position bias (the bias table lives in layer 0)."""

    def __init__(self, dim: int, heads: int, relative_bias: bool, num_buckets: int, max_distance: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.grep_linear = nn.Linear(self.head_dim, 8)
        self.grep_a = nn.Parameter(torch.ones(1, heads, 1, 1))
        if relative_bias:
            self.relative_attention_bias = nn.Embedding(num_buckets, heads)
        self._buckets: dict[tuple[int, str], torch.Tensor] = {}

    def buckets(self, length: int, device: torch.device) -> torch.Tensor:
        """``[T, T]`` bucket of each query-key offset (T5-style log buckets), cached per length and device."""
        key = (length, str(device))
        if key not in self._buckets:
            self._buckets[key] = self._compute_buckets(length, device)
        return self._buckets[key]

    def position_bias(self, length: int, device: torch.device) -> torch.Tensor:
        """``[H, T, T]``: the learned bias of each query-key offset's bucket."""
        return self.relative_attention_bias(self.buckets(length, device)).permute(2, 0, 1)

    def _compute_buckets(self, length: int, device: torch.device) -> torch.Tensor:
        positions = torch.arange(length, device=device)
        relative = positions[None, :] - positions[:, None]  # key - query
        half = self.num_buckets // 2
        buckets = (relative > 0).long() * half
        distance = relative.abs()
        exact = half // 2
        far = (
            exact
            + (
                torch.log(distance.clamp_min(1).float() / exact) / math.log(self.max_distance / exact) * (half - exact)
            ).long()
        )
        far = far.clamp_max(half - 1)
        return buckets + torch.where(distance < exact, distance, far)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, key_padding: torch.Tensor | None) -> torch.Tensor:
        batch, length, dim = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        gates = torch.sigmoid(self.grep_linear(split(x)).view(batch, self.heads, length, 2, 4).sum(-1))
        gate_a, gate_b = gates.chunk(2, dim=-1)  # [B, H, T, 1] each
        mask = (gate_a * (gate_b * self.grep_a - 1.0) + 2.0) * bias[None]  # [B, H, T, T]
        if key_padding is not None:
            mask = mask.masked_fill(key_padding[:, None, None, :], float("-inf"))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype))
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, dim))


class EncoderLayer(nn.Module):
    """Post-LN transformer layer: ``LN(x + attn(x))``, then ``LN(x + fc2(gelu(fc1(x))))``."""

    def __init__(self, settings: WavLMSettings, relative_bias: bool):
        super().__init__()
        dim, eps = settings.encoder_embed_dim, settings.layer_norm_eps
        self.self_attn = SelfAttention(
            dim, settings.encoder_attention_heads, relative_bias, settings.num_buckets, settings.max_distance
        )
        self.self_attn_layer_norm = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, settings.encoder_ffn_embed_dim)
        self.fc2 = nn.Linear(settings.encoder_ffn_embed_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, key_padding: torch.Tensor | None) -> torch.Tensor:
        x = self.self_attn_layer_norm(x + self.self_attn(x, bias, key_padding))
        hidden = F.gelu(self.fc1(x).float()).type_as(x)
        return self.final_layer_norm(x + self.fc2(hidden))


class Encoder(nn.Module):
    def __init__(self, settings: WavLMSettings):
        super().__init__()
        dim = settings.encoder_embed_dim
        self.pos_conv = nn.ModuleList([WeightNormConv1d(dim, settings.conv_pos, settings.conv_pos_groups)])
        self.trim = 1 if settings.conv_pos % 2 == 0 else 0
        self.layers = nn.ModuleList(EncoderLayer(settings, index == 0) for index in range(settings.encoder_layers))
        self.layer_norm = nn.LayerNorm(dim, eps=settings.layer_norm_eps)

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None) -> list[torch.Tensor]:
        """Hidden states ``[B, T, D]``: the input to layer 0 and each layer's output."""
        if padding is not None:
            x = x.masked_fill(padding[..., None], 0.0)
        conv = self.pos_conv[0](x.transpose(1, 2))
        if self.trim:
            conv = conv[..., : -self.trim]
        x = self.layer_norm(x + F.gelu(conv).transpose(1, 2))
        bias = self.layers[0].self_attn.position_bias(x.shape[1], x.device).to(x.dtype)
        states = [x]
        for layer in self.layers:
            x = layer(x, bias, padding)
            states.append(x)
        return states


class WavLMEncoder(nn.Module):
    """WavLM: convolutional features, layer norm, projection, transformer (names as the checkpoint's)."""

    def __init__(self, settings: WavLMSettings):
        super().__init__()
        layers = settings.conv_layers
        embed = layers[-1][0]
        self.feature_extractor = ConvFeatures(layers, settings.conv_bias)
        self.layer_norm = nn.LayerNorm(embed, eps=settings.layer_norm_eps)
        self.post_extract_proj = (
            nn.Linear(embed, settings.encoder_embed_dim) if embed != settings.encoder_embed_dim else None
        )
        self.mask_emb = nn.Parameter(torch.zeros(settings.encoder_embed_dim))  # pre-training only; kept to load
        self.encoder = Encoder(settings)

    @staticmethod
    def frame_padding(padding: torch.Tensor, frames: int) -> torch.Tensor:
        """Sample padding ``[N, S]`` -> frame padding ``[N, T]``: the trailing ``S mod T`` samples dropped, the
        rest split into T equal runs, a frame padded when every sample of its run is."""
        extra = padding.shape[1] % frames
        if extra:
            padding = padding[:, :-extra]
        return padding.reshape(padding.shape[0], frames, -1).all(dim=-1)

    def forward(self, wave: torch.Tensor, padding: torch.Tensor | None) -> tuple[list[torch.Tensor], Any]:
        features = self.layer_norm(self.feature_extractor(wave).transpose(1, 2))
        frames = None if padding is None else self.frame_padding(padding, features.shape[1])
        if self.post_extract_proj is not None:
            features = self.post_extract_proj(features)
        return self.encoder(features, frames), frames


def _mlp(dim: int, settings: HeadSettings) -> nn.Sequential:
    """The package's ``create_mlp_block``: (Linear, [LayerNorm], GELU, [Dropout]) x (n - 1), Linear(dim, 1)."""
    parts: list[nn.Module] = []
    for index in range(settings.proj_num_layer):
        if index == settings.proj_num_layer - 1:
            parts.append(nn.Linear(dim, settings.output_dim))
        else:
            parts.append(nn.Linear(dim, dim))
            if settings.proj_ln:
                parts.append(nn.LayerNorm(dim))
            parts.append(nn.GELU())
            if settings.proj_dropout != 0:
                parts.append(nn.Dropout(settings.proj_dropout))
    return nn.Sequential(*parts)


class AestheticsModel(nn.Module):
    """Encoder + per-axis heads; :meth:`forward` gives the four de-normalised axis scores of 16 kHz chunks."""

    def __init__(self, wavlm: WavLMSettings, head: HeadSettings):
        super().__init__()
        self.wavlm_settings, self.head_settings = wavlm, head
        dim = wavlm.encoder_embed_dim
        self.wavlm_model = WavLMEncoder(wavlm)
        self.proj_layer = nn.ModuleDict({axis: _mlp(dim, head) for axis in AXES})
        self.layer_weights = nn.ParameterDict(
            {axis: nn.Parameter(torch.ones(head.nth_layer) / head.nth_layer) for axis in AXES}
        )
        transform = head.target_transform or {a: {"mean": 0.0, "std": 1.0} for a in AXES}
        self.target_mean = {a: float(transform[a]["mean"]) for a in AXES}
        self.target_std = {a: float(transform[a]["std"]) for a in AXES}

    def forward(self, chunks: torch.Tensor, valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``chunks`` ``[N, S]`` at 16 kHz, ``valid`` ``[N, S]`` bool (``False`` = padding) -> ``{axis: [N]}``."""
        padding = None if valid is None else ~valid
        states, frame_padding = self.wavlm_model(chunks, padding)
        stacked = torch.stack(states, dim=-1)  # [N, T, D, L]
        keep = (
            torch.ones(stacked.shape[:2], dtype=stacked.dtype, device=stacked.device)
            if frame_padding is None
            else (~frame_padding).to(stacked.dtype)
        )[..., None]
        out = {}
        for axis in AXES:
            weights = torch.softmax(self.layer_weights[axis], dim=-1).to(stacked.dtype)
            embed = stacked @ weights  # [N, T, D]
            pooled = (embed * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1)
            if self.head_settings.normalize_embed:
                pooled = F.normalize(pooled, dim=-1)
            raw = self.proj_layer[axis](pooled).squeeze(-1).float()
            out[axis] = raw * self.target_std[axis] + self.target_mean[axis]
        return out


# -- chunking --------------------------------------------------------------------------------------------------
def chunk_bounds(num_samples: int, chunk: int = CHUNK_SAMPLES) -> list[tuple[int, int]]:
    """The package's ``make_inference_batch`` (hop = window = 10 s): ``(start, valid length)`` of each chunk."""
    if num_samples < 1:
        raise ValueError("no samples to score")
    return [(start, min(chunk, num_samples - start)) for start in range(0, num_samples, chunk)]


def chunk_batch(waves: Sequence[torch.Tensor], chunk: int = CHUNK_SAMPLES):
    """Mono 16 kHz waveforms ``[S_i]`` -> zero-padded chunks ``[N, chunk]``, their validity masks, the weights
    ``valid / chunk`` and the index of the waveform each came from."""
    pieces, masks, weights, owners = [], [], [], []
    for owner, wave in enumerate(waves):
        for start, length in chunk_bounds(wave.shape[-1], chunk):
            pieces.append(F.pad(wave[start : start + length], (0, chunk - length)))
            mask = torch.zeros(chunk, dtype=torch.bool, device=wave.device)
            mask[:length] = True
            masks.append(mask)
            weights.append(length / chunk)
            owners.append(owner)
    return torch.stack(pieces), torch.stack(masks), torch.tensor(weights, dtype=torch.float64), owners


# -- the reward --------------------------------------------------------------------------------------------------
class AudioboxAestheticsReward(AudioFileScoring, Reward):
    """Audiobox Aesthetics as a reward; ``axis``: ``CE`` | ``CU`` | ``PC`` | ``PQ`` | ``overall`` (the mean of
    CE, CU and PQ). ``aggregate`` over chunks: ``mean`` (the package's length-weighted mean) | ``min`` | ``max``."""

    modality: ClassVar[str] = "audio"
    unit: ClassVar[str] = "window"
    uses_prompt: ClassVar[bool] = False
    higher_is_better: ClassVar[bool] = True

    def __init__(
        self,
        model: AestheticsModel,
        *,
        axis: str = OVERALL,
        aggregate: str = "mean",
        normalize: str | None = None,
        chunk_batch_size: int = 16,
        name: str | None = None,
    ):
        super().__init__()
        if axis not in (*AXES, OVERALL):
            raise ValueError(f"unknown audiobox axis {axis!r}; use one of {', '.join(AXES)} or {OVERALL}")
        if aggregate not in AGGREGATES:
            raise ValueError(f"chunk aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")
        self.model = model.eval()
        self.axis, self.aggregate, self.normalize = axis, aggregate, normalize
        self.chunk_batch_size = int(chunk_batch_size)
        self.sample_rate = SAMPLE_RATE
        self.name = name or ("audiobox-aesthetics" if axis == OVERALL else f"audiobox-{axis.lower()}")
        described = "mean of CE, CU, PQ" if axis == OVERALL else f"{axis} ({AXIS_NAMES[axis]})"
        self.score_scale = f"Audiobox Aesthetics {described}: the raters' 1-10 scale (not clipped)" + (
            "; PC measures complexity, not quality" if axis == "PC" else ""
        )

    # -- loading -------------------------------------------------------------------------------------------
    @staticmethod
    def load_model(weights: str | os.PathLike | None = None) -> AestheticsModel:
        """A model from the hub folder layout (config.json + model.safetensors), a ``.safetensors`` file beside
        its config.json, or the release's ``checkpoint.pt``; strict (every key reported)."""
        path = Path(str(weights)).expanduser() if weights is not None else None
        if path is not None and path.is_file() and path.suffix != ".safetensors":
            return _load_release_checkpoint(path)
        if path is not None and path.is_file():
            folder, weights_file = path.parent, path
        else:
            folder = resolve_dir(
                weights,
                default_repo=AUDIOBOX_REPO,
                what="audiobox-aesthetics model",
                allow_patterns=["config.json", "model.safetensors"],
            )
            weights_file = folder / "model.safetensors"
            if not weights_file.is_file() and (folder / "checkpoint.pt").is_file():
                return _load_release_checkpoint(folder / "checkpoint.pt")
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise WeightsError(f"{folder}: no config.json beside the audiobox-aesthetics weights")
        config = json.loads(config_file.read_text())
        head = _head_settings(config, str(config_file))
        wavlm = WavLMSettings.from_dict(config.get("wavlm"))
        head.check(wavlm.encoder_layers, str(config_file))
        model = AestheticsModel(wavlm, head)
        load_into(model, _rename(load_state_dict(weights_file)), source=str(weights_file))
        return model

    @classmethod
    def from_pretrained(
        cls,
        weights: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "fp32",
        *,
        axis: str = OVERALL,
        aggregate: str = "mean",
        normalize: str | None = None,
        chunk_batch_size: int = 16,
        name: str | None = None,
        **_: Any,
    ) -> AudioboxAestheticsReward:
        """``weights``: a folder or hub id (default ``facebook/audiobox-aesthetics``) or ``checkpoint.pt``."""
        reward = cls(
            cls.load_model(weights),
            axis=axis,
            aggregate=aggregate,
            normalize=normalize,
            chunk_batch_size=chunk_batch_size,
            name=name,
        )
        return reward.to(device=device, dtype=resolve_dtype(dtype))

    # -- views (mmalign score / bench) ---------------------------------------------------------------------
    def with_windows(
        self,
        windows: str | None = None,
        window_seconds: float | None = None,
        hop_seconds: float | None = None,
        aggregate: str | None = None,
        normalize: str | None = None,
    ) -> AudioboxAestheticsReward:
        """A view sharing the model with another chunk ``aggregate`` / ``normalize``; the chunking itself is the
        package's (10 s tiles from 0), so only ``windows`` ``cover`` and a 10 s window are accepted."""
        if windows not in (None, "cover"):
            raise ValueError(f"audiobox-aesthetics tiles the whole track in 10 s chunks; windows={windows!r} is not it")
        if window_seconds not in (None, CHUNK_SECONDS) or hop_seconds not in (None, CHUNK_SECONDS):
            raise ValueError("audiobox-aesthetics scores fixed 10 s chunks every 10 s (its training setting)")
        aggregate = aggregate or self.aggregate
        if aggregate not in AGGREGATES:
            raise ValueError(f"chunk aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")
        view = copy.copy(self)
        view.aggregate = aggregate
        view.normalize = self.normalize if normalize is None else normalize
        return view

    @property
    def variant(self) -> str:
        parts = [self.axis, "10s", self.aggregate]
        if self.normalize:
            parts.append(self.normalize)
        return "/".join(parts)

    def info(self) -> dict[str, object]:
        return {**super().info(), "axis": self.axis, "aggregate": self.aggregate, "unit": self.unit}

    # -- scoring ----------------------------------------------------------------------------------------------
    def pick(self, axes: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.axis == OVERALL:
            return torch.stack([axes[a] for a in QUALITY_AXES]).mean(dim=0)
        return axes[self.axis]

    def _combine(self, chunk_scores: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Chunk scores ``[..., N]`` -> ``[...]`` by the package's length-weighted mean (or min / max)."""
        if self.aggregate == "min":
            return chunk_scores.amin(dim=-1)
        if self.aggregate == "max":
            return chunk_scores.amax(dim=-1)
        weights = weights.to(chunk_scores)
        return (chunk_scores * weights).sum(dim=-1) / weights.sum()

    def _run_chunks(self, chunks: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
        outs = []
        for begin in range(0, chunks.shape[0], max(1, self.chunk_batch_size)):
            piece = chunks[begin : begin + self.chunk_batch_size].to(device=self.device, dtype=self.dtype)
            outs.append(self.model(piece, valid[begin : begin + self.chunk_batch_size].to(self.device)))
        return {axis: torch.cat([o[axis] for o in outs]) for axis in AXES}

    def score_axes(self, audio: torch.Tensor, sample_rate: int | None = None) -> dict[str, torch.Tensor]:
        """Differentiable per-axis scores ``{axis: [B]}`` of a canonical batch ``[B, C, S]`` at ``sample_rate``
        (default 16 kHz), resampled and mixed to mono in torch as the package does (resample, then mean)."""
        audio = check_audio(audio)
        wave = resample(audio, sample_rate or SAMPLE_RATE, SAMPLE_RATE)
        wave = to_mono(wave)[:, 0]  # [B, S]
        chunks, valid, weights, owners = chunk_batch(list(wave))
        per_chunk = self._run_chunks(chunks, valid)
        count = len(owners) // wave.shape[0]
        return {
            axis: self._combine(scores.view(wave.shape[0], count), weights[:count])
            for axis, scores in per_chunk.items()
        }

    def score_tensor(
        self, audio: torch.Tensor, prompts: str | Sequence[str] | None = None, sample_rate: int | None = None
    ) -> torch.Tensor:
        """Differentiable scores ``[B]`` of audio ``[B, C, S]`` in [-1, 1] at ``sample_rate`` (16 kHz); prompts are
        ignored (the model hears audio only)."""
        return self.pick(self.score_axes(audio, sample_rate))

    def forward(self, audio: torch.Tensor, prompts: str | Sequence[str] | None = None) -> torch.Tensor:
        return self.score_tensor(audio, prompts)

    def decode(self, source: str | os.PathLike) -> Audio:
        """Decode, mix to mono, resample to 16 kHz (the package's file path: mono first), normalise if asked."""
        return load_audio(source, sample_rate=SAMPLE_RATE, mono=True, normalize=self.normalize)

    @torch.no_grad()
    def score_decoded(
        self, decoded: Sequence[Audio], prompts: Sequence[str] | None = None, batch_size: int = 32
    ) -> list[MediaScore]:
        """Chunks of every file batched together (``chunk_batch_size`` at a time); per-file axis scores."""
        waves = []
        for audio in decoded:
            wave = to_mono(audio.waveform)[0]
            if audio.sample_rate != SAMPLE_RATE:
                wave = resample(wave, audio.sample_rate, SAMPLE_RATE)
            waves.append(wave.float())
        if not waves:
            return []
        chunks, valid, weights, owners = chunk_batch(waves)
        per_chunk = {axis: scores.float().cpu() for axis, scores in self._run_chunks(chunks, valid).items()}
        owners_t = torch.tensor(owners)
        results = []
        for index, audio in enumerate(decoded):
            rows = (owners_t == index).nonzero().flatten()
            axes = {axis: self._combine(per_chunk[axis][rows], weights[rows]) for axis in AXES}
            units = self.pick({axis: per_chunk[axis][rows] for axis in AXES})
            results.append(
                MediaScore(
                    float(self.pick(axes)),
                    units.tolist(),
                    "window",
                    [CHUNK_SECONDS * n for n in range(len(rows))],
                    weights=weights[rows].tolist(),
                    extra={"axes": {axis: float(value) for axis, value in axes.items()}, "duration": audio.duration},
                )
            )
        return results


# -- checkpoint helpers ------------------------------------------------------------------------------------------
def _head_settings(config: Mapping[str, Any], source: str) -> HeadSettings:
    values = {key: config[key] for key in HEAD_FIELDS if key in config}
    values["target_transform"] = config.get("target_transform") or {}
    try:
        return HeadSettings(**values)
    except TypeError as error:
        raise WeightsError(f"{source}: {error}") from error


_PARAMETRIZED = {
    "parametrizations.weight.original0": "weight_g",
    "parametrizations.weight.original1": "weight_v",
}


def _rename(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The positional convolution saved by ``torch.nn.utils.parametrizations.weight_norm`` (``original0/1``)
    names the same tensors as the legacy ``weight_g`` / ``weight_v``; nothing else is renamed."""
    out = {}
    for key, value in state.items():
        for old, new in _PARAMETRIZED.items():
            if key.endswith("pos_conv.0." + old):
                key = key[: -len(old)] + new
        out[key] = value
    return out


def _load_release_checkpoint(path: Path) -> AestheticsModel:
    """``checkpoint.pt``: ``{"state_dict": {"model.<key>": tensor}, "model_cfg": {...}, "target_transform": ...}``,
    read with ``torch.load(weights_only=True)`` (a pickle needing code is refused by :mod:`mmalign.hub`)."""
    import pickle

    from ..errors import UnsafeCheckpointError
    from ..hub import CONVERT_HINT

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        hint = CONVERT_HINT.format(path=path, stem=path.with_suffix(""))
        raise UnsafeCheckpointError(f"{path}: refused, needs code execution to unpickle ({error}).\n{hint}") from error
    except (RuntimeError, EOFError, OSError) as error:
        raise WeightsError(f"{path}: not a readable torch checkpoint ({error})") from error
    if not isinstance(obj, Mapping) or not {"state_dict", "model_cfg", "target_transform"} <= set(obj):
        raise WeightsError(f"{path}: expected the release layout with state_dict, model_cfg and target_transform")
    config = {**dict(obj["model_cfg"]), "target_transform": obj["target_transform"]}
    head = _head_settings(config, str(path))
    wavlm = WavLMSettings.from_dict(obj["model_cfg"].get("wavlm"))
    head.check(wavlm.encoder_layers, str(path))
    state = {(k[len("model.") :] if k.startswith("model.") else k): v for k, v in obj["state_dict"].items()}
    model = AestheticsModel(wavlm, head)
    load_into(model, _rename(state), source=str(path))
    return model
