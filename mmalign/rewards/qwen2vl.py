"""Shared plumbing of the Qwen2-VL preference rewards (HPSv3, VideoReward): a Qwen2-VL backbone whose hidden
state at special reward tokens feeds a small head.

Both references subclass transformers 4.45's ``Qwen2VLForConditionalGeneration`` (``Qwen2VLRewardModelBT``:
MizzenAI/HPSv3 ``hpsv3/model/qwen2vl_trainer.py``, KwaiVGI/VideoAlign ``trainer.py``) and share these details,
which this module reproduces on transformers 5's ``Qwen2VLModel`` (read there, written here):

* the forward pass embeds the tokens, scatters the vision tower's merged patch features into the
  ``<|image_pad|>`` / ``<|video_pad|>`` slots and calls the language model with ``position_ids=None``, so the
  decoder uses plain sequential positions ``0..L-1`` on all three M-RoPE axes (the 3-D vision positions of
  ``get_rope_index`` are NOT used by either reward); :meth:`Qwen2VLRewardModel.hidden_states` passes those
  sequential positions explicitly, because transformers 5 would otherwise compute 3-D ones;
* the head is applied in float32 to every position and read at the positions of the special reward tokens
  (``<|Reward|>`` for HPSv3, ``<|VQ_reward|>``/``<|MQ_reward|>``/``<|TA_reward|>`` for VideoReward), which the
  references add to the tokenizer and for which they resize the embedding table to ``len(tokenizer)``;
* sequences are right-padded (``padding_side="right"``); with the causal mask the padding never reaches the
  reward tokens, so a batch scores as its items one by one;
* pixels: qwen-vl-utils' ``smart_resize`` (sides multiples of 28, pixel count clamped to [min, max]), rescale
  to [0, 1], OpenAI-CLIP mean/std, then Qwen2VLImageProcessor's patch layout (frames grouped by
  ``temporal_patch_size``; an image is its own frame repeated; 14-px patches ordered by 2x2 merge windows).

Checkpoints of both are state dicts of the 4.45 class (``visual.*``, ``model.*``, ``lm_head.*``, ``rm_head.*``),
possibly wrapped by peft (``base_model.model.`` prefix, LoRA ``lora_A``/``lora_B`` pairs, ``modules_to_save``);
:func:`convert_reference_state_dict` maps them onto this module and merges LoRA into the base weights.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..errors import StateDictMismatchError, WeightsError
from ..hub import load_into
from .base import Reward

IMAGE_FACTOR = 28
MAX_RATIO = 200
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Files of a Qwen2-VL model folder that the reward needs (never the multi-GB backbone weights).
BACKBONE_FILES = ("*.json", "*.txt", "*.jinja", "*.model")

# Keys of the published reward checkpoints that are not part of this module: the LM head (unused by a reward).
ALLOW_UNEXPECTED = ("lm_head.*",)


# -- qwen-vl-utils sizing ----------------------------------------------------------------------------------
def _round_by(number: float, factor: int) -> int:
    return round(number / factor) * factor


def _ceil_by(number: float, factor: int) -> int:
    return math.ceil(number / factor) * factor


def _floor_by(number: float, factor: int) -> int:
    return math.floor(number / factor) * factor


def smart_resize(
    height: int,
    width: int,
    factor: int = IMAGE_FACTOR,
    min_pixels: int = 4 * 28 * 28,
    max_pixels: int = 16384 * 28 * 28,
) -> tuple[int, int]:
    """qwen-vl-utils ``smart_resize``: sides rounded to multiples of ``factor``, area clamped to
    ``[min_pixels, max_pixels]`` keeping the aspect ratio (floor when shrinking, ceil when growing)."""
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.1f} exceeds {MAX_RATIO}")
    h_bar = max(factor, _round_by(height, factor))
    w_bar = max(factor, _round_by(width, factor))
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = _floor_by(height / beta, factor)
        w_bar = _floor_by(width / beta, factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = _ceil_by(height * beta, factor)
        w_bar = _ceil_by(width * beta, factor)
    return h_bar, w_bar


# -- pixels -> Qwen2-VL patches ---------------------------------------------------------------------------------
def normalize(
    pixels: torch.Tensor, mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD
) -> torch.Tensor:
    """``[..., 3, H, W]`` in [0, 1] -> normalised (the processor's rescale + normalize, in torch)."""
    mean_t = torch.tensor(mean, dtype=pixels.dtype, device=pixels.device).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=pixels.dtype, device=pixels.device).view(3, 1, 1)
    return (pixels - mean_t) / std_t


def patchify(
    frames: torch.Tensor, patch_size: int = 14, merge_size: int = 2, temporal_patch_size: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised frames ``[T, 3, H, W]`` of ONE image/video -> flat patches ``[t*h*w, 3*tp*p*p]`` and
    ``grid_thw [3]``, in Qwen2VLImageProcessor's order. ``T`` is padded to a multiple of ``temporal_patch_size``
    by repeating the last frame (an image, ``T = 1``, becomes its own frame twice). Differentiable."""
    count, channels, height, width = frames.shape
    if height % (patch_size * merge_size) or width % (patch_size * merge_size):
        raise ValueError(f"frame size {height}x{width} is not a multiple of {patch_size * merge_size}")
    if count % temporal_patch_size:
        pad = temporal_patch_size - count % temporal_patch_size
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
    grid_t = frames.shape[0] // temporal_patch_size
    grid_h, grid_w = height // patch_size, width // patch_size
    x = frames.reshape(
        grid_t,
        temporal_patch_size,
        channels,
        grid_h // merge_size,
        merge_size,
        patch_size,
        grid_w // merge_size,
        merge_size,
        patch_size,
    )
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    patches = x.reshape(grid_t * grid_h * grid_w, channels * temporal_patch_size * patch_size * patch_size)
    return patches, torch.tensor([grid_t, grid_h, grid_w], dtype=torch.long)


def resize_tensor(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Differentiable bicubic resize with antialiasing of ``[N, 3, H, W]`` (identity at the same size)."""
    if pixels.shape[-2:] == (height, width):
        return pixels
    return F.interpolate(pixels, size=(height, width), mode="bicubic", antialias=True, align_corners=False)


def pil_resize(image: Image.Image, height: int, width: int) -> Image.Image:
    """qwen-vl-utils' image path: RGB, then PIL bicubic to the smart size."""
    image = image.convert("RGB")
    return image.resize((width, height), Image.BICUBIC)


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float ``[3, H, W]`` in [0, 1] (uint8 / 255, as the processor's rescale)."""
    import numpy as np

    array = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy())
    return array.permute(2, 0, 1).float() / 255.0


# -- checkpoints ------------------------------------------------------------------------------------------------
_PEFT_PREFIX = "base_model.model."
_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


def _reference_to_module_key(key: str) -> str:
    if key.startswith("model."):
        return "backbone.language_model." + key[len("model.") :]
    if key.startswith("visual."):
        return "backbone.visual." + key[len("visual.") :]
    return key  # rm_head.*, lm_head.*


def convert_reference_state_dict(
    state_dict: Mapping[str, torch.Tensor], lora_scaling: float | None = None, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """A 4.45 ``Qwen2VLRewardModelBT`` state dict (plain, or a peft ``PeftModel``'s) -> this module's keys.

    peft: ``base_model.model.`` is stripped; ``X.base_layer.weight`` is the base weight of ``X``; LoRA pairs are
    merged as ``W + scaling * B @ A`` (``scaling = lora_alpha / r``, which the caller reads from the
    checkpoint's config); ``X.modules_to_save.<adapter>.*`` replaces ``X.original_module.*``.
    """
    flat: dict[str, torch.Tensor] = {}
    lora: dict[str, dict[str, torch.Tensor]] = {}
    saved: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        key = key[len(_PEFT_PREFIX) :] if key.startswith(_PEFT_PREFIX) else key
        match = _LORA.match(key)
        if match:
            lora.setdefault(match["module"], {})[match["which"]] = value
            continue
        if ".modules_to_save." in key:
            module, _, rest = key.partition(".modules_to_save.")
            saved[module + "." + rest.split(".", 1)[1]] = value
            continue
        if ".original_module." in key:
            continue
        flat[key.replace(".base_layer.", ".")] = value
    flat.update(saved)
    if lora:
        if lora_scaling is None:
            raise WeightsError(f"{source}: holds LoRA weights but no LoRA scaling (lora_alpha / r) was given")
        for module, pair in lora.items():
            if set(pair) != {"A", "B"} or f"{module}.weight" not in flat:
                raise WeightsError(f"{source}: incomplete LoRA pair or missing base weight for {module}")
            base = flat[f"{module}.weight"]
            delta = (pair["B"].float() @ pair["A"].float()) * lora_scaling
            flat[f"{module}.weight"] = (base.float() + delta).to(base.dtype)
    return {_reference_to_module_key(key): value for key, value in flat.items()}


def load_backbone_config(folder: Path, vocab_size: int | None = None) -> Any:
    """The Qwen2-VL config of a model folder, with the text vocabulary resized to the checkpoint's embedding."""
    from transformers import Qwen2VLConfig

    if not (folder / "config.json").is_file():
        raise WeightsError(f"{folder}: no config.json (a Qwen2-VL model folder is needed for its architecture)")
    config = Qwen2VLConfig.from_pretrained(str(folder))
    if vocab_size is not None:
        config.text_config.vocab_size = int(vocab_size)
        config.vocab_size = int(vocab_size)
    return config


def read_pixel_stats(folder: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``image_mean`` / ``image_std`` from ``preprocessor_config.json`` (OpenAI-CLIP values when absent)."""
    path = folder / "preprocessor_config.json"
    if path.is_file():
        data = json.loads(path.read_text())
        return tuple(data.get("image_mean", OPENAI_CLIP_MEAN)), tuple(data.get("image_std", OPENAI_CLIP_STD))
    return OPENAI_CLIP_MEAN, OPENAI_CLIP_STD


def load_chat_template(folder: Path, tokenizer: Any) -> str:
    """The chat template that ships with the processor (``chat_template.json`` / ``.jinja``) or tokenizer."""
    for name in ("chat_template.jinja", "chat_template.json"):
        path = folder / name
        if path.is_file():
            text = path.read_text()
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise WeightsError(f"{folder}: no chat template (chat_template.json/.jinja or in the tokenizer)")
    return template


def load_tokenizer(folder: Path, special_tokens: Sequence[str]) -> Any:
    """A right-padding tokenizer with the reward's special tokens added (as the references do)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), padding_side="right")
    except Exception as error:  # noqa: BLE001 - report which folder lacks a usable tokenizer
        raise WeightsError(f"{folder}: cannot load the Qwen2-VL tokenizer ({type(error).__name__}: {error})") from error
    missing = [token for token in special_tokens if token not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": list(special_tokens)})
    return tokenizer


# -- the model ------------------------------------------------------------------------------------------------
class Qwen2VLRewardModel(Reward):
    """A Qwen2-VL backbone + ``rm_head`` read at special tokens. Subclasses set the prompt and the media path.

    ``backbone`` is transformers' ``Qwen2VLModel`` (vision tower + language model, no LM head).
    """

    reward_tokens: tuple[str, ...] = ()

    def __init__(
        self,
        backbone: nn.Module,
        rm_head: nn.Module,
        tokenizer: Any,
        chat_template: str,
        image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
        image_std: Sequence[float] = OPENAI_CLIP_STD,
    ):
        super().__init__()
        self.backbone = backbone.eval()
        self.rm_head = rm_head.eval()
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.image_mean = tuple(image_mean)
        self.image_std = tuple(image_std)
        vision = backbone.config.vision_config
        self.patch_size = int(vision.patch_size)
        self.merge_size = int(vision.spatial_merge_size)
        self.temporal_patch_size = int(vision.temporal_patch_size)
        self.image_token_id = int(backbone.config.image_token_id)
        self.video_token_id = int(backbone.config.video_token_id)
        ids = tokenizer.convert_tokens_to_ids(list(self.reward_tokens))
        self.reward_token_ids = [int(i) for i in ids]
        embeddings = backbone.get_input_embeddings().weight.shape[0]
        if len(tokenizer) > embeddings or max(self.reward_token_ids, default=0) >= embeddings:
            raise WeightsError(
                f"tokenizer has {len(tokenizer)} tokens (reward tokens {self.reward_token_ids}) but the checkpoint's "
                f"embedding has {embeddings} rows: the tokenizer does not belong to this checkpoint"
            )

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def place(
        self,
        device_map: str | dict,
        max_memory: str | dict | None = None,
        offload_folder: str | os.PathLike | None = None,
    ) -> Qwen2VLRewardModel:
        """Spread the loaded backbone over the GPUs, the CPU and disk (:func:`mmalign.memory.place_module`:
        ``device_map`` a strategy or a dict, ``max_memory`` per device, ``offload_folder`` for modules sent to
        disk); the head goes to the execution device, where the inputs go too."""
        from ..memory import execution_device, place_module

        self.placement = place_module(self.backbone, device_map, max_memory, offload_folder, self.dtype)
        nn.Module.to(self.rm_head, execution_device(self.placement))
        return self

    # text ------------------------------------------------------------------------------------------------
    def chat_text(self, text: str, kind: str) -> str:
        """One user turn holding one image or video and ``text``, with the generation prompt (the references'
        ``apply_chat_template(..., add_generation_prompt=True)``)."""
        messages = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": text}]}]
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True
        )

    def tokenize(self, texts: Sequence[str], grids: Sequence[torch.Tensor], kinds: Sequence[str]):
        """Chat strings with each vision placeholder expanded to its merged-patch count; right-padded ids."""
        pad_tokens = {"image": "<|image_pad|>", "video": "<|video_pad|>"}
        expanded = []
        for text, grid, kind in zip(texts, grids, kinds):
            token = pad_tokens[kind]
            if text.count(token) != 1:
                raise ValueError(f"the chat template produced {text.count(token)} {token} placeholders, expected 1")
            count = int(grid.prod()) // self.merge_size**2
            expanded.append(text.replace(token, token * count))
        encoded = self.tokenizer(expanded, padding=True, return_tensors="pt")
        return encoded["input_ids"], encoded["attention_mask"]

    # forward ----------------------------------------------------------------------------------------------
    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        patches: torch.Tensor,
        grids: torch.Tensor,
        kind: str,
    ) -> torch.Tensor:
        """Last hidden states ``[B, L, D]`` with sequential positions on all three M-RoPE axes."""
        device = self.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        batch, length = input_ids.shape
        positions = torch.arange(length, device=device).view(1, 1, -1).expand(3, batch, -1)
        vision = (
            {"pixel_values": patches, "image_grid_thw": grids}
            if kind == "image"
            else {"pixel_values_videos": patches, "video_grid_thw": grids}
        )
        vision = {
            k: v.to(device=device, dtype=self.dtype) if v.is_floating_point() else v.to(device)
            for k, v in vision.items()
        }
        output = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False, **vision
        )
        return output.last_hidden_state.to(device)  # (from the last block's device when placed over several)

    def head_outputs(self, texts: Sequence[str], frames: Sequence[torch.Tensor], kind: str) -> torch.Tensor:
        """Head outputs at the reward tokens, ``[B, K, out]`` (K reward tokens per sequence), float32.

        ``frames``: per item, normalised frames ``[T, 3, H, W]`` at a size that is a multiple of 28."""
        pieces = [patchify(f, self.patch_size, self.merge_size, self.temporal_patch_size) for f in frames]
        patches = torch.cat([p for p, _ in pieces])
        grids = torch.stack([g for _, g in pieces])
        chats = [self.chat_text(text, kind) for text in texts]
        input_ids, attention_mask = self.tokenize(chats, [g for _, g in pieces], [kind] * len(texts))
        hidden = self.hidden_states(input_ids, attention_mask, patches, grids, kind)
        input_ids = input_ids.to(hidden.device)
        mask = torch.zeros_like(input_ids, dtype=torch.bool)
        for token_id in self.reward_token_ids:
            mask |= input_ids == token_id
        counts = mask.sum(dim=1)
        want = len(self.reward_token_ids)
        if bool((counts != want).any()):
            raise ValueError(
                f"each sequence must hold the {want} reward token(s) {self.reward_tokens} once; "
                f"found {counts.tolist()} (the prompt may contain one, or it was truncated)"
            )
        selected = hidden[mask].float()  # row-major: tokens in sequence order within each item
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            out = self.rm_head(selected)
        return out.view(len(texts), want, -1)


def build_backbone(config: Any, dtype: torch.dtype) -> nn.Module:
    from transformers import Qwen2VLModel

    config._attn_implementation = "sdpa"
    if hasattr(config, "text_config"):
        config.text_config._attn_implementation = "sdpa"
        config.vision_config._attn_implementation = "sdpa"
    return Qwen2VLModel._from_config(config, dtype=dtype)


def check_fits(
    what: str, build: Any, dtype: torch.dtype, device: str | torch.device, checkpoint: Path | None = None
) -> int:
    """Before a 2B-7B VLM reward is loaded: its parameters, counted on the meta device from ``build()``, must fit
    in ``dtype`` on ``device``, and on the CPU together with the ``checkpoint`` file read whole before it is copied
    in (the HPSv3 / VideoReward formats); a :class:`WeightsError` with the figures otherwise. Returns the count."""
    from ..memory import ensure_fits, meta_parameter_count

    parameters = meta_parameter_count(build)
    extra = checkpoint.stat().st_size if checkpoint is not None else 0
    ensure_fits(what, parameters, dtype, "cpu", extra=extra)  # built (and the checkpoint read) on the CPU first
    if torch.device(device).type != "cpu":
        ensure_fits(what, parameters, dtype, device)
    return parameters


def load_reward_weights(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Strict load (``lm_head`` allowed unexpected); every other mismatch raises, naming the checkpoint."""
    try:
        load_into(module, state_dict, source=source, allow_unexpected=ALLOW_UNEXPECTED)
    except StateDictMismatchError:
        raise


def checkpoint_vocab_size(state_dict: Mapping[str, torch.Tensor], source: str) -> int:
    for key in ("backbone.language_model.embed_tokens.weight",):
        if key in state_dict:
            return int(state_dict[key].shape[0])
    raise WeightsError(
        f"{source}: no embed_tokens weight (model.embed_tokens.weight): not a Qwen2-VL reward checkpoint"
    )


def resolve_backbone_dir(spec: str | os.PathLike | None, default_repo: str) -> Path:
    """A Qwen2-VL folder (config, tokenizer, processor files only) from a path or hub id."""
    from ..hub import resolve_dir

    return resolve_dir(spec, default_repo=default_repo, what="Qwen2-VL config/tokenizer", allow_patterns=BACKBONE_FILES)
