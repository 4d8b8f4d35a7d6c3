"""MPS: Multi-dimensional Preference Score (Zhang et al., CVPR 2024; Kwai-Kolors/MPS).

A CLIP ViT-H/14 (transformers ``CLIPModel``, architecture of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``)
followed by a fusion network, read from ``trainer/models/clip_model.py`` and ``trainer/models/cross_modeling.py``
and the inference function of ``eval_overall_mps_on_hpdv2.py``:

* image tokens: the vision encoder's output for all 257 positions BEFORE the post-LayerNorm (transformers'
  ``last_hidden_state``), each projected by ``visual_projection``;
* text tokens: all 77 positions of the prompt (padded to 77, no attention mask: the tower is only causal)
  after the final LayerNorm, each projected by ``text_projection``; the prompt feature is the projected
  end-of-text token (CLIP's pooled output);
* condition mask: the condition string (aspect words) is encoded the same way; for each prompt token, the
  largest dot product with any condition token, divided by the largest such value, keeps the token when it
  exceeds 0.3 (the inference threshold; ``CLIPModel.forward``, used in training, uses 0.01);
* fusion: 4 layers of [masked cross-attention from the image tokens to the text tokens (multi-query: one key/
  value head, SwiGLU feed-forward in parallel) + a parallel self-attention/feed-forward block with rotary
  positions (PaLM style)], each wrapped in a residual; LayerNorms have a gain and no bias;
* score = ``logit_scale.exp() * cos(prompt feature, fused image-CLS token)``.

**Per-sample normalisation (a deliberate fix).** The reference divides the prompt-token similarities by the
maximum over the WHOLE BATCH (``sim / sim.max()``), so a sample's mask, and its score, depend on which prompts
share its batch. mmalign divides by each sample's own maximum. The reference's inference function scores one
image at a time, where both are the same, so mmalign's scores equal the reference's published evaluation path;
they differ from the reference's batched ``forward`` only when several prompts share a batch.

**Dimensions.** The repository publishes one condition string, for the overall preference (22 aspect words,
below, verbatim) and one checkpoint, ``MPS_overall_checkpoint.pth`` (the multi-dimensional checkpoint was not
released, nor any per-dimension condition string). ``dimension="aesthetics" | "detail" | "semantic"`` scores with
one word group of the overall condition (light ... artistry, 7 words; shape ... texture, 8; quantity ... location,
5; in the same punctuation). The grouping is mmalign's reading of the paper's dimensions (a third-party
multi-condition variant groups the words the same way), not a published string; with the released overall
checkpoint it is the overall model focused on that group's prompt tokens, not the paper's per-dimension model.
Any other condition string may be passed as ``condition=``.

**Checkpoint.** The release is a pickled whole module (``torch.load`` needs ``weights_only=False`` and the
reference's ``trainer`` package). mmalign never unpickles it: convert once with
``mmalign convert --trust-pickle MPS_overall_checkpoint.pth MPS_overall_checkpoint.safetensors`` (it reads the
module's tensors without importing the reference code) and load the safetensors. A plain state dict saved with
``torch.save(model.state_dict())`` also loads (``torch.load(weights_only=True)``). Key names are the
module's own (``model.*`` = the CLIPModel, ``cross_model.layers.{i}.{0,1}.fn.*``); the two ``position_ids``
buffers that transformers 4.27 saved are the only extra keys accepted; any other missing or unexpected key
fails naming the keys.

Differences from the reference: float32 by default (the reference casts images and mask to float16 on CUDA);
the condition similarities are computed in float32; the tensor path (``score_tensor``) resizes with torch's
antialiased bicubic instead of PIL's, so it differs from file scores by resampling noise only.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..errors import UnsafeCheckpointError, WeightsError
from ..hub import load_into, load_state_dict, resolve_dir
from ..modalities.image import broadcast_prompts, check_image_batch
from .base import ImageLike, Reward, resolve_dtype
from .preprocess import clip_tensor

MPS_BACKBONE = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
MPS_FILES = ("MPS_overall_checkpoint.safetensors", "MPS_overall_checkpoint.pth")
MPS_THRESHOLD = 0.3

# Kwai-Kolors/MPS README and eval_overall_mps_on_hpdv2.py: the overall condition, verbatim.
OVERALL_CONDITION = (
    "light, color, clarity, tone, style, ambiance, artistry, shape, face, hair, hands, limbs, structure, "
    "instance, texture, quantity, attributes, position, number, location, word, things."
)
DIMENSION_WORDS = {
    "aesthetics": ("light", "color", "clarity", "tone", "style", "ambiance", "artistry"),
    "detail": ("shape", "face", "hair", "hands", "limbs", "structure", "instance", "texture"),
    "semantic": ("quantity", "attributes", "position", "number", "location"),
}
CONDITIONS = {"overall": OVERALL_CONDITION, **{k: ", ".join(v) + "." for k, v in DIMENSION_WORDS.items()}}

# transformers < 4.31 saved these buffers; they equal arange(n) and are rebuilt by the model.
POSITION_ID_KEYS = ("model.text_model.embeddings.position_ids", "model.vision_model.embeddings.position_ids")

CONVERT_MPS_HINT = (
    "The published MPS checkpoint is a pickled whole module. If you trust it, convert it once with\n"
    "    mmalign convert --trust-pickle {path} {stem}.safetensors\n"
    "(reads the tensors without importing the reference code) and pass the .safetensors file."
)


# -- the fusion network -------------------------------------------------------------------------------------
class GainLayerNorm(nn.Module):
    """LayerNorm with a learned gain and a constant zero bias (kept as a buffer: the checkpoint holds it)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.register_buffer("bias", torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias)


class SwiGLU(nn.Module):
    """``a * silu(gate)`` over the two halves of the last dimension (first half ``a``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = x.chunk(2, dim=-1)
        return a * F.silu(gate)


class Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor, *args: Any) -> torch.Tensor:
        return x + self.fn(x, *args)


class RotaryAngles(nn.Module):
    """Rotary angles ``[n, d]``: position times ``10000^(-2i/d)``, the ``d/2`` frequencies written twice."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim))

    def forward(self, n: int, device: torch.device) -> torch.Tensor:
        angles = torch.outer(torch.arange(n, device=device, dtype=self.inv_freq.dtype), self.inv_freq)
        return torch.cat((angles, angles), dim=-1)


def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotary embedding: ``x cos + (-x2, x1) sin`` with ``x1, x2`` the halves of the last dimension."""
    first, second = x.chunk(2, dim=-1)
    return x * angles.cos() + torch.cat((-second, first), dim=-1) * angles.sin()


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, n, _ = x.shape
    return x.view(batch, n, heads, -1).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    batch, heads, n, dim_head = x.shape
    return x.transpose(1, 2).reshape(batch, n, heads * dim_head)


class MaskedCrossAttention(nn.Module):
    """Queries from the image tokens (``heads`` heads), one key/value head from the text tokens, an additive
    mask ``[B, Nq, Nk]``, plus a SwiGLU feed-forward of the normalised queries in parallel."""

    def __init__(self, dim: int, dim_head: int, heads: int, ff_inner: int):
        super().__init__()
        self.heads, self.scale = heads, dim_head**-0.5
        self.norm = GainLayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)
        self.ff = nn.Sequential(
            nn.Linear(dim, 2 * ff_inner, bias=False), SwiGLU(), nn.Linear(ff_inner, dim, bias=False)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        q = _heads(self.to_q(h), self.heads) * self.scale
        k, v = self.to_kv(context).chunk(2, dim=-1)
        logits = q @ k.unsqueeze(1).transpose(-1, -2) + mask.unsqueeze(1)
        out = _merge(logits.softmax(dim=-1) @ v.unsqueeze(1))
        return self.to_out(out) + self.ff(h)


class ParallelSelfBlock(nn.Module):
    """Self-attention (``heads`` query heads, one rotary key/value head) and a SwiGLU feed-forward computed
    in parallel from one fused projection of the normalised input; their outputs are summed."""

    def __init__(self, dim: int, dim_head: int, heads: int, ff_inner: int):
        super().__init__()
        self.heads, self.scale = heads, dim_head**-0.5
        self.split = (heads * dim_head, dim_head, dim_head, 2 * ff_inner)
        self.norm = GainLayerNorm(dim)
        self.rotary_emb = RotaryAngles(dim_head)
        self.fused_attn_ff_proj = nn.Linear(dim, sum(self.split), bias=False)
        self.attn_out = nn.Linear(heads * dim_head, dim, bias=False)
        self.ff_out = nn.Sequential(SwiGLU(), nn.Linear(ff_inner, dim, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v, ff = self.fused_attn_ff_proj(self.norm(x)).split(self.split, dim=-1)
        angles = self.rotary_emb(x.shape[1], x.device).to(x.dtype)
        q = rotate(_heads(q, self.heads), angles) * self.scale
        k = rotate(k, angles)
        attn = (q @ k.unsqueeze(1).transpose(-1, -2)).softmax(dim=-1)
        return self.attn_out(_merge(attn @ v.unsqueeze(1))) + self.ff_out(ff)


class FusionNetwork(nn.Module):
    """``layers.{i}.0.fn``: masked cross-attention; ``layers.{i}.1.fn``: parallel self-attention block."""

    def __init__(self, dim: int = 1024, layers: int = 4, dim_head: int = 64, heads: int = 16, ff_mult: int = 4):
        super().__init__()
        ff_inner = ff_mult * dim
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    Residual(MaskedCrossAttention(dim, dim_head, heads, ff_inner)),
                    Residual(ParallelSelfBlock(dim, dim_head, heads, ff_inner)),
                ]
            )
            for _ in range(layers)
        )

    @classmethod
    def from_state_dict(
        cls, state_dict: Mapping[str, torch.Tensor], source: str, prefix: str = "cross_model."
    ) -> FusionNetwork:
        """The sizes the checkpoint's tensors imply (dim, layers, head size, heads, feed-forward width)."""
        try:
            q = state_dict[f"{prefix}layers.0.0.fn.to_q.weight"]
            kv = state_dict[f"{prefix}layers.0.0.fn.to_kv.weight"]
            ff_out = state_dict[f"{prefix}layers.0.0.fn.ff.2.weight"]
        except KeyError as error:
            raise WeightsError(f"{source}: not an MPS checkpoint (no {error.args[0]})") from None
        layers = 1 + max(int(k[len(prefix) :].split(".")[1]) for k in state_dict if k.startswith(prefix + "layers."))
        dim, dim_head = q.shape[1], kv.shape[0] // 2
        heads, ff_inner = q.shape[0] // dim_head, ff_out.shape[1]
        if ff_inner % dim:
            raise WeightsError(f"{source}: feed-forward width {ff_inner} is not a multiple of the width {dim}")
        return cls(dim=dim, layers=layers, dim_head=dim_head, heads=heads, ff_mult=ff_inner // dim)

    def forward(self, queries: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for cross, block in self.layers:
            queries = block(cross(queries, context, mask))
        return queries


class MPSModel(nn.Module):
    """The checkpoint's module layout: ``model`` (transformers ``CLIPModel``) and ``cross_model``."""

    def __init__(self, clip: nn.Module, cross_model: FusionNetwork):
        super().__init__()
        self.model = clip
        self.cross_model = cross_model

    def text_tokens(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected features of every token ``[B, L, D]`` and of the end-of-text token ``[B, D]``."""
        out = self.model.text_model(input_ids=input_ids)
        project = self.model.text_projection
        return project(out.last_hidden_state), project(out.pooler_output)

    def image_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected encoder output of every position, before the post-LayerNorm ``[B, 1 + patches, D]``."""
        return self.model.visual_projection(self.model.vision_model(pixel_values=pixel_values).last_hidden_state)


def condition_keep(
    text_tokens: torch.Tensor, condition_tokens: torch.Tensor, threshold: float = MPS_THRESHOLD
) -> torch.Tensor:
    """Which prompt tokens the fusion attends to, ``[B, L]`` bool: the largest dot product of each prompt token
    with any condition token, divided by the sample's own largest value (the reference divides by the batch's),
    above ``threshold``."""
    sim = torch.einsum("bld,bcd->blc", text_tokens.float(), condition_tokens.float()).amax(dim=-1)
    return sim / sim.amax(dim=-1, keepdim=True) > threshold


# -- the reward ----------------------------------------------------------------------------------------------
def _resolve_checkpoint(weights: str | os.PathLike | None) -> str:
    if weights is None:
        raise WeightsError(
            "MPS has no hub release: download MPS_overall_checkpoint.pth (Kwai-Kolors/MPS README, Google Drive), "
            "convert it with `mmalign convert --trust-pickle MPS_overall_checkpoint.pth "
            "MPS_overall_checkpoint.safetensors` and pass weights=<that file or its folder>"
        )
    path = os.path.expanduser(str(weights))
    if os.path.isdir(path):
        for name in MPS_FILES:
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise WeightsError(f"{path}: folder has none of {', '.join(MPS_FILES)} (MPS checkpoint)")
    if not os.path.isfile(path):
        raise WeightsError(f"{path}: no such file (MPS checkpoint)")
    return path


def load_mps_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """safetensors, or a plain tensor dict through ``torch.load(weights_only=True)``; the pickled module is
    refused with the conversion command."""
    try:
        return load_state_dict(path, unwrap=("state_dict",))
    except UnsafeCheckpointError as error:
        stem = os.path.splitext(str(path))[0]
        raise UnsafeCheckpointError(
            f"{path}: refused, a pickled module needs code execution to load.\n"
            + CONVERT_MPS_HINT.format(path=path, stem=stem)
        ) from error


class MPSReward(Reward):
    """MPS on transformers' CLIPModel + mmalign's fusion network; see the module docstring."""

    name = "mps"
    score_scale: ClassVar[str] = "logit_scale.exp() * cosine (logit scale 100 when trained: about -100..100)"
    text_cache_size: int = 4096

    def __init__(
        self,
        model: MPSModel,
        tokenizer: Any,
        image_processor: Any,
        dimension: str = "overall",
        condition: str | None = None,
        threshold: float = MPS_THRESHOLD,
    ):
        super().__init__()
        if condition is None and dimension not in CONDITIONS:
            raise ValueError(f"unknown MPS dimension {dimension!r}; use one of {', '.join(CONDITIONS)}")
        self.mps = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.dimension = dimension if condition is None else "custom"
        self.condition = CONDITIONS[dimension] if condition is None else condition
        self.threshold = float(threshold)
        self.name = "mps" if self.dimension == "overall" else f"mps-{self.dimension}"
        self.max_length = int(min(getattr(tokenizer, "model_max_length", 77), 77))
        size = image_processor.crop_size
        self.image_size = int(size if isinstance(size, int) else size["height"])
        self.image_mean, self.image_std = tuple(image_processor.image_mean), tuple(image_processor.image_std)
        self._text_cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    @classmethod
    def from_pretrained(
        cls,
        weights: str | os.PathLike | None = None,
        processor: str | os.PathLike | None = None,
        dimension: str = "overall",
        condition: str | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "fp32",
        **_: Any,
    ) -> MPSReward:
        """``weights``: the converted ``MPS_overall_checkpoint.safetensors`` (or its folder, or a plain state
        dict); ``processor``: a CLIP folder or hub id giving ``config.json`` (the architecture), the tokenizer
        and the image processor (default ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``, as the reference; only its
        small files are fetched)."""
        from transformers import CLIPConfig, CLIPModel

        from .clip import load_clip_processor

        torch_dtype = resolve_dtype(dtype)
        path = _resolve_checkpoint(weights)
        folder = resolve_dir(
            processor, default_repo=MPS_BACKBONE, what="MPS CLIP config/processor", allow_patterns=["*.json", "*.txt"]
        )
        state_dict = load_mps_state_dict(path)
        clip = CLIPModel(CLIPConfig.from_pretrained(str(folder)))
        model = MPSModel(clip, FusionNetwork.from_state_dict(state_dict, str(path)))
        load_into(model, state_dict, source=str(path), allow_unexpected=POSITION_ID_KEYS)
        tokenizer, image_processor = load_clip_processor(folder)
        reward = cls(model, tokenizer, image_processor, dimension=dimension, condition=condition)
        return reward.to(device=device, dtype=torch_dtype)

    def info(self) -> dict[str, object]:
        return {**super().info(), "dimension": self.dimension, "condition": self.condition}

    def _apply(self, fn, recurse=True):  # .to()/.half() change features: drop the cache
        self._text_cache.clear()
        return super()._apply(fn, recurse)

    # preprocessing ------------------------------------------------------------------------------------------
    def preprocess_reference(self, image: Image.Image) -> torch.Tensor:
        """The reference's ``CLIPImageProcessor`` (PIL: RGB, bicubic shortest side, centre crop, normalise)."""
        return self.image_processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]

    def preprocess_reference_batch(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.image_processor(images=[i.convert("RGB") for i in images], return_tensors="pt")["pixel_values"]

    def preprocess_tensor(self, images: torch.Tensor) -> torch.Tensor:
        return clip_tensor(images, self.image_size, self.image_mean, self.image_std)

    # towers -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token features ``[N, 77, D]`` and end-of-text features ``[N, D]`` (model dtype), each text encoded
        alone, padded to 77 as the reference, cached per string."""
        for text in dict.fromkeys(texts):
            if text in self._text_cache:
                continue
            ids = self.tokenizer(
                [text], max_length=self.max_length, padding="max_length", truncation=True, return_tensors="pt"
            ).input_ids.to(self.device)
            tokens, pooled = self.mps.text_tokens(ids)
            self._text_cache[text] = (tokens[0], pooled[0])
            if len(self._text_cache) > self.text_cache_size:
                self._text_cache.popitem(last=False)
        pairs = [self._text_cache[t] for t in texts]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Projected image tokens ``[B, 257, D]`` (differentiable)."""
        return self.mps.image_tokens(self._to_model(pixels))

    def score_tokens(self, image_tokens: torch.Tensor, prompts: Sequence[str], condition: str) -> torch.Tensor:
        """Float32 scores ``[B]`` of encoded images under one condition string (per-sample mask)."""
        text_tokens, pooled = self.encode_text(list(prompts))
        condition_tokens, _ = self.encode_text([condition])
        keep = condition_keep(text_tokens, condition_tokens.expand(len(prompts), -1, -1), self.threshold)
        mask = torch.zeros(keep.shape, dtype=image_tokens.dtype, device=image_tokens.device)
        mask = mask.masked_fill(~keep, float("-inf")).unsqueeze(1).expand(-1, image_tokens.shape[1], -1)
        fused = self.mps.cross_model(image_tokens, text_tokens.to(image_tokens.dtype), mask)[:, 0].float()
        cosine = (F.normalize(fused, dim=-1) * F.normalize(pooled.float(), dim=-1)).sum(dim=-1)
        return self.mps.model.logit_scale.detach().float().exp() * cosine

    def score_pixels(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.score_tokens(self.encode_image(pixels), prompts, self.condition)

    def score_detailed(
        self,
        images: torch.Tensor | Sequence[ImageLike] | ImageLike,
        prompts: str | Sequence[str] | None = None,
        conditions: Mapping[str, str] | None = None,
        batch_size: int = 32,
    ) -> dict[str, torch.Tensor]:
        """Scores under several conditions (default: overall, aesthetics, detail, semantic), the images
        encoded once: tensors differentiably, files / Pillow images with the reference preprocessing."""
        conditions = dict(conditions or CONDITIONS)
        if isinstance(images, torch.Tensor):
            images = check_image_batch(images)
            prompts = broadcast_prompts(prompts, images.shape[0])
            tokens = self.encode_image(self.preprocess_tensor(images.to(self.device)))
            return {k: self.score_tokens(tokens, prompts, c) for k, c in conditions.items()}
        if isinstance(images, (Image.Image, str, os.PathLike)):
            images = [images]
        images = list(images)
        prompts = broadcast_prompts(prompts, len(images))
        out: dict[str, list[torch.Tensor]] = {k: [] for k in conditions}
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                chunk = [self._decode(item) for item in images[start : start + batch_size]]
                tokens = self.encode_image(self.preprocess_reference_batch(chunk))
                for key, condition in conditions.items():
                    out[key].append(self.score_tokens(tokens, prompts[start : start + batch_size], condition).cpu())
        return {k: torch.cat(v) if v else torch.empty(0) for k, v in out.items()}
