"""What travels between ``mmalign serve`` and :class:`~mmalign.serve.client.HTTPReward`, encoded and checked in
one place so that the two sides cannot drift apart.

A tensor request is a safetensors file (``Content-Type: application/x-safetensors``): one tensor ``media`` and,
in the file's string metadata, ``prompts`` (a JSON list, one string per item) and the optional scoring options
``sample_rate`` (audio) and ``video_fps`` (video). Safetensors carries the floats bit for bit, and parsing it runs
no code (no pickle). Checks name the item at fault where one item is: ``item 3: values outside [0, 1]``.

This module imports nothing above :mod:`mmalign.rewards` (the client side lives at the rewards layer).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import MMAlignError

SAFETENSORS = "application/x-safetensors"
MULTIPART = "multipart/form-data"
MEDIA_KEY = "media"
PROMPTS_KEY = "prompts"
#: scoring options a tensor request may carry in its metadata, passed to ``score_tensor`` as keyword arguments
OPTIONS: dict[str, type] = {"sample_rate": int, "video_fps": float}
#: metadata keys that safetensors writers add on their own
IGNORED_METADATA = frozenset({"format"})
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: modality -> (layout, number of axes, axis that must hold 3 colour channels or None)
LAYOUTS: dict[str, tuple[str, int, int | None]] = {
    "image": ("[B, 3, H, W]", 4, 1),
    "video": ("[B, T, 3, H, W]", 5, 2),
    "multiview": ("[B, V, 3, H, W]", 5, 2),
    "audio": ("[B, C, S]", 3, None),
    "music": ("[B, C, S]", 3, None),
}


class RequestError(MMAlignError):
    """A request the server refuses with a 4xx status; ``item`` is the index of the item at fault, if one is."""

    def __init__(self, message: str, status: int = 422, item: int | None = None):
        super().__init__(message)
        self.status, self.item = status, item

    def payload(self) -> dict[str, Any]:
        return {"error": str(self), "item": self.item}


def encode_tensor_request(media: torch.Tensor, prompts: Sequence[str], **options: Any) -> bytes:
    """A safetensors body: ``media`` as it is (dtype and values kept exactly) plus prompts and options."""
    from safetensors.torch import save

    metadata = {PROMPTS_KEY: json.dumps(list(prompts), ensure_ascii=False)}
    for key, value in options.items():
        if key not in OPTIONS:
            raise TypeError(f"unknown scoring option {key!r}; a served reward takes {', '.join(OPTIONS)}")
        if value is not None:
            metadata[key] = json.dumps(value)
    return save({MEDIA_KEY: media.detach().to("cpu").contiguous()}, metadata=metadata)


def decode_tensor_request(body: bytes, modality: str) -> tuple[torch.Tensor, list[str], dict[str, Any]]:
    """Parse and check a tensor request for a reward of ``modality``: ``(media, prompts, options)``."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    if not body:
        raise RequestError("empty body: send a safetensors file holding the tensor 'media'", status=400)
    try:
        tensors = load(body)
        metadata = _metadata(body)
    except (SafetensorError, ValueError, OverflowError) as error:
        raise RequestError(f"the body is not a readable safetensors file ({error})", status=400) from None
    extra = sorted(set(tensors) - {MEDIA_KEY})
    if MEDIA_KEY not in tensors or extra:
        raise RequestError(
            f"expected exactly one tensor named 'media', got {sorted(tensors) or 'none'}", status=400, item=None
        )
    media = tensors[MEDIA_KEY]
    check_media(media, modality)
    unknown = sorted(set(metadata) - {PROMPTS_KEY, *OPTIONS, *IGNORED_METADATA})
    if unknown:
        raise RequestError(f"unknown metadata key(s) {unknown}; known: {PROMPTS_KEY}, {', '.join(OPTIONS)}")
    raw = metadata.get(PROMPTS_KEY)
    prompts = check_prompts(_json(raw, PROMPTS_KEY) if raw is not None else None, media.shape[0])
    options = {key: _option(key, metadata[key]) for key in OPTIONS if key in metadata}
    return media, prompts, options


def _metadata(body: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors header (``load`` returns the tensors only)."""
    size = int.from_bytes(body[:8], "little")
    header = json.loads(body[8 : 8 + size])
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise ValueError("__metadata__ is not an object")
    return metadata


def _json(text: str, key: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise RequestError(f"{key}: not valid JSON ({error.msg})") from None


def _option(key: str, text: str) -> Any:
    value = _json(text, key)
    kind = OPTIONS[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise RequestError(f"{key}: expected a positive {kind.__name__}, got {text!r}")
    if kind is int and value != int(value):
        raise RequestError(f"{key}: expected a whole number, got {text!r}")
    return kind(value)


def check_media(media: torch.Tensor, modality: str) -> None:
    """Layout, dtype and values of a batch for a reward of ``modality``; the first bad item is named."""
    layout, axes, channel_axis = LAYOUTS.get(modality, LAYOUTS["image"])
    if media.ndim != axes or (channel_axis is not None and media.shape[channel_axis] != 3):
        raise RequestError(f"media: {modality} rewards take {layout}, got shape {list(media.shape)}")
    if media.dtype not in FLOAT_DTYPES:
        raise RequestError(f"media: expected a float tensor (float32, bfloat16, float16), got {media.dtype}")
    if media.numel() == 0:
        raise RequestError(f"media: empty batch or axis, shape {list(media.shape)}")
    flat = media.reshape(media.shape[0], -1)
    finite = torch.isfinite(flat).all(dim=1)
    if not bool(finite.all()):
        item = int((~finite).nonzero()[0])
        raise RequestError(f"item {item}: values are not all finite (NaN or infinity)", item=item)
    if channel_axis is not None:  # visual media are canonical floats in [0, 1]
        low, high = flat.amin(dim=1), flat.amax(dim=1)
        outside = (low < 0) | (high > 1)
        if bool(outside.any()):
            item = int(outside.nonzero()[0])
            raise RequestError(
                f"item {item}: values outside [0, 1] (min {float(low[item]):.4g}, max {float(high[item]):.4g}); "
                "media are floats in [0, 1]",
                item=item,
            )


def check_prompts(prompts: Any, count: int) -> list[str]:
    """One prompt string per item; ``None`` (no prompts sent) means empty prompts, as in process."""
    if prompts is None:
        return [""] * count
    if not isinstance(prompts, list):
        raise RequestError(f"prompts: expected a JSON list of {count} strings, got {type(prompts).__name__}")
    if len(prompts) != count:
        raise RequestError(f"prompts: {len(prompts)} prompt(s) for {count} item(s); send one per item")
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise RequestError(f"item {index}: prompt is {type(prompt).__name__}, not a string", item=index)
    return prompts


def scores_payload(scores: Sequence[float]) -> list[float | None]:
    """Scores as JSON numbers; a non-finite score becomes ``null`` (strict JSON has no NaN)."""
    return [value if math.isfinite(value) else None for value in scores]
