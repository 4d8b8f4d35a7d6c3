"""ImageReward v1.0 (Xu et al. 2023, "ImageReward: Learning and Evaluating Human Preferences for
Text-to-Image Generation", NeurIPS; THUDM/ImageReward ``ImageReward/ImageReward.py``).

BLIP ViT-L/16 image tokens (``models/BLIP/blip_pretrain.py``) feed the cross-attention of a BERT-base text
encoder (``models/BLIP/med.py``, bidirectional, cross-attention in every layer); the ``[CLS]`` feature goes
through an affine MLP head and is normalised: ``(mlp(cls) - 0.16717362830052426) / 1.0333394966054072``.

Built from transformers' ``BlipVisionModel`` and ``BlipTextModel``; the published ``ImageReward.pt`` (original
BLIP key layout) is renamed onto them here. Differences from the reference, none of which change a score:
images are encoded in batches (the reference encodes one at a time), tokenisations are cached per prompt,
and the checkpoint is loaded strictly (the reference uses ``strict=False``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image

from ..errors import StateDictMismatchError, WeightsError
from ..hub import load_into, load_state_dict, resolve_dir, resolve_file
from .base import ImageLike, Reward, resolve_dtype
from .heads import MLPHead
from .preprocess import clip_reference, clip_tensor

DEFAULT_REPO = "THUDM/ImageReward"
DEFAULT_TOKENIZER = "bert-base-uncased"
CHECKPOINT_FILE = "ImageReward.pt"
CHECKPOINT_CANDIDATES = ("ImageReward.safetensors", "ImageReward.pt")
MED_CONFIG_FILE = "med_config.json"

SCORE_MEAN = 0.16717362830052426
SCORE_STD = 1.0333394966054072
MAX_TEXT_LENGTH = 35
VISION_LAYER_NORM_EPS = 1e-6  # BLIP's vit.py: partial(nn.LayerNorm, eps=1e-6)

# Keys of the published checkpoint that are not part of this model (see ``ImageReward.load_original``).
ALLOW_UNEXPECTED = ("*position_ids", "blip.vision_proj.*", "blip.text_proj.*")
ALLOW_MISSING = ("*position_ids",)

# Original prefix -> this module's prefix, and whether the BLIP ViT renaming table applies below it.
_PREFIXES = (
    ("blip.visual_encoder.", "vision.", True),
    ("blip.text_encoder.", "text.", False),
    ("mlp.", "mlp.", False),
)
# BLIP ViT (timm layout) -> transformers BlipVisionModel; {n} = block index, {p} = weight/bias.
_VISION_NAMES = (
    ("cls_token", "embeddings.class_embedding"),
    ("pos_embed", "embeddings.position_embedding"),
    ("patch_embed.proj.{p}", "embeddings.patch_embedding.{p}"),
    ("blocks.{n}.norm1.{p}", "encoder.layers.{n}.layer_norm1.{p}"),
    ("blocks.{n}.attn.qkv.{p}", "encoder.layers.{n}.self_attn.qkv.{p}"),
    ("blocks.{n}.attn.proj.{p}", "encoder.layers.{n}.self_attn.projection.{p}"),
    ("blocks.{n}.norm2.{p}", "encoder.layers.{n}.layer_norm2.{p}"),
    ("blocks.{n}.mlp.fc1.{p}", "encoder.layers.{n}.mlp.fc1.{p}"),
    ("blocks.{n}.mlp.fc2.{p}", "encoder.layers.{n}.mlp.fc2.{p}"),
    ("norm.{p}", "post_layernorm.{p}"),
)


def _template_regex(template: str) -> re.Pattern[str]:
    pattern = re.escape(template).replace(r"\{n\}", r"(?P<n>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(pattern)


_TO_MODULE = (
    tuple((source, target, vit) for source, target, vit in _PREFIXES),
    tuple((_template_regex(orig), ours) for orig, ours in _VISION_NAMES),
)
_TO_ORIGINAL = (
    tuple((target, source, vit) for source, target, vit in _PREFIXES),
    tuple((_template_regex(ours), orig) for orig, ours in _VISION_NAMES),
)


def _rename(key: str, table: tuple[tuple[tuple[str, str, bool], ...], tuple[tuple[re.Pattern[str], str], ...]]) -> str:
    prefixes, rules = table
    for source, target, vit in prefixes:
        if not key.startswith(source):
            continue
        rest = key[len(source) :]
        if not vit:
            return target + rest
        for pattern, template in rules:
            match = pattern.fullmatch(rest)
            if match:
                return target + template.format(**match.groupdict())
        return key  # an unknown ViT key keeps its name and is reported as unexpected
    return key


def original_to_module_key(key: str) -> str:
    """Published ImageReward key -> this module's key (unknown keys are returned unchanged)."""
    return _rename(key, _TO_MODULE)


def module_to_original_key(key: str) -> str:
    """This module's key -> the published ImageReward key (for error messages)."""
    return _rename(key, _TO_ORIGINAL)


def convert_original_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a published ``ImageReward.pt`` state dict onto :class:`ImageReward`'s modules."""
    return {original_to_module_key(key): value for key, value in state_dict.items()}


def vision_config_from_state_dict(state_dict: Mapping[str, torch.Tensor], source: str, heads: int | None = None) -> Any:
    """Infer the BLIP ViT architecture from an original-layout state dict (ViT-L/16 at 224 for v1.0)."""
    from transformers import BlipVisionConfig

    prefix = "blip.visual_encoder."
    needed = [prefix + k for k in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight")]
    missing = [key for key in needed if key not in state_dict]
    if missing:
        raise StateDictMismatchError(source, missing=missing)
    width = int(state_dict[prefix + "cls_token"].shape[-1])
    patch = int(state_dict[prefix + "patch_embed.proj.weight"].shape[-1])
    positions = int(state_dict[prefix + "pos_embed"].shape[1])
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1:
        raise WeightsError(f"{source}: pos_embed has {positions} positions, not 1 + a square grid")
    block_ids = {int(m.group(1)) for k in state_dict if (m := re.match(re.escape(prefix) + r"blocks\.(\d+)\.", k))}
    depth = max(block_ids) + 1
    heads = heads if heads is not None else max(width // 64, 1)
    if width % heads:
        raise WeightsError(f"{source}: vision width {width} is not divisible by {heads} heads")
    return BlipVisionConfig(
        hidden_size=width,
        intermediate_size=int(state_dict[prefix + "blocks.0.mlp.fc1.weight"].shape[0]),
        num_hidden_layers=depth,
        num_attention_heads=heads,
        image_size=grid * patch,
        patch_size=patch,
        hidden_act="gelu",
        layer_norm_eps=VISION_LAYER_NORM_EPS,
        attention_dropout=0.0,
    )


def text_config_from_med_config(med: Mapping[str, Any], encoder_width: int, source: str) -> Any:
    """``BlipTextConfig`` from BLIP's ``med_config.json`` (BERT keys). ``encoder_width`` is the vision width,
    as the reference overrides med_config's ``encoder_width`` with it."""
    from transformers import BlipTextConfig

    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    absent = [key for key in required if key not in med]
    if absent:
        raise WeightsError(f"{source}: med_config lacks {', '.join(absent)}")
    if not med.get("add_cross_attention", True):
        raise WeightsError(f"{source}: add_cross_attention is false; ImageReward cross-attends in every layer")
    if med.get("position_embedding_type", "absolute") != "absolute":
        raise WeightsError(f"{source}: only absolute position embeddings are supported")
    config = BlipTextConfig(
        vocab_size=int(med["vocab_size"]),
        hidden_size=int(med["hidden_size"]),
        encoder_hidden_size=int(encoder_width),
        intermediate_size=int(med["intermediate_size"]),
        num_hidden_layers=int(med["num_hidden_layers"]),
        num_attention_heads=int(med["num_attention_heads"]),
        max_position_embeddings=int(med.get("max_position_embeddings", 512)),
        hidden_act=str(med.get("hidden_act", "gelu")),
        layer_norm_eps=float(med.get("layer_norm_eps", 1e-12)),
        hidden_dropout_prob=float(med.get("hidden_dropout_prob", 0.1)),
        attention_probs_dropout_prob=float(med.get("attention_probs_dropout_prob", 0.1)),
        pad_token_id=int(med.get("pad_token_id", 0)),
        bos_token_id=None,
        eos_token_id=None,
        sep_token_id=None,
        is_decoder=True,  # builds the cross-attention layers; forward() runs it bidirectionally
        use_cache=False,
    )
    config._attn_implementation = "eager"  # BlipTextSelfAttention adds a float mask to its scores
    return config


def load_tokenizer(processor: str | os.PathLike | None, vocab_size: int | None = None) -> Any:
    """BLIP's ``init_tokenizer``: ``BertTokenizer`` + ``[DEC]`` as bos + ``[ENC]`` as an extra special token.

    ``processor``: a tokenizer folder, or a hub id (default ``bert-base-uncased``; only ``vocab.txt`` and
    ``tokenizer_config.json`` are fetched).
    """
    from transformers import BertTokenizer

    path = None if processor is None else Path(str(processor)).expanduser()
    if path is not None and path.is_dir():
        folder = resolve_dir(path, default_repo=DEFAULT_TOKENIZER, what="ImageReward tokenizer")
    elif path is not None and path.is_file():
        folder = path.parent
    else:
        repo = DEFAULT_TOKENIZER if processor is None else str(processor).removeprefix("hf-hub:")
        parts = repo.split("/")
        if repo.startswith((".", "/", "~")) or len(parts) > 2 or not all(parts):
            raise WeightsError(f"{processor}: no such folder (ImageReward tokenizer)")
        what = "ImageReward tokenizer (BERT vocabulary)"
        folder = resolve_file(None, default_repo=repo, filename="vocab.txt", what=what).parent
        with contextlib.suppress(WeightsError):  # optional: bert-base-uncased lower-cases by default anyway
            resolve_file(None, default_repo=repo, filename="tokenizer_config.json", what=what)
    try:
        tokenizer = BertTokenizer.from_pretrained(str(folder))
    except Exception as error:
        raise WeightsError(f"{folder}: cannot load a BertTokenizer ({type(error).__name__}: {error})") from error
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    if vocab_size is not None and len(tokenizer) != vocab_size:
        raise WeightsError(
            f"{folder}: the tokenizer has {len(tokenizer)} tokens with [DEC] and [ENC] added, but the text "
            f"encoder's vocab_size is {vocab_size}; ImageReward v1.0 needs bert-base-uncased's vocabulary "
            "(30522 + 2 = 30524). Pass processor= a bert-base-uncased tokenizer folder."
        )
    return tokenizer


def _resolve_weights(weights: str | os.PathLike | None, med_config: str | os.PathLike | None) -> tuple[Path, Path]:
    """(checkpoint, med_config.json) from a folder, a file, a hub id or ``None`` (THUDM/ImageReward)."""
    what = "ImageReward checkpoint"
    cfg_what = "ImageReward med_config.json"
    beside: Path | None = None
    if weights is None:
        checkpoint = resolve_file(None, default_repo=DEFAULT_REPO, filename=CHECKPOINT_FILE, what=what)
        repo = DEFAULT_REPO
    else:
        path = Path(str(weights)).expanduser()
        repo = None
        if path.is_dir():
            found = [path / name for name in CHECKPOINT_CANDIDATES if (path / name).is_file()]
            if not found:
                raise WeightsError(f"{path}: folder has none of {', '.join(CHECKPOINT_CANDIDATES)} ({what})")
            checkpoint, beside = found[0], path / MED_CONFIG_FILE
        elif path.is_file():
            checkpoint, beside = path, path.parent / MED_CONFIG_FILE
        else:
            checkpoint = resolve_file(weights, default_repo=DEFAULT_REPO, filename=CHECKPOINT_FILE, what=what)
            repo = "/".join(str(weights).removeprefix("hf-hub:").split("/")[:2])
    if med_config is not None:
        config = resolve_file(med_config, default_repo=DEFAULT_REPO, filename=MED_CONFIG_FILE, what=cfg_what)
    elif beside is not None:
        if not beside.is_file():
            raise WeightsError(f"{beside}: not found; put {MED_CONFIG_FILE} beside the weights or pass med_config=")
        config = beside
    else:
        config = resolve_file(None, default_repo=repo or DEFAULT_REPO, filename=MED_CONFIG_FILE, what=cfg_what)
    return checkpoint, config


def read_med_config(path: Path) -> dict[str, Any]:
    """BLIP's ``med_config.json`` (BERT keys) as a dict; an unreadable file is a :class:`WeightsError`."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError) as error:
        raise WeightsError(f"{path}: not a readable med_config.json ({error})") from error
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: med_config.json must hold a JSON object")
    return data


def _no_init() -> contextlib.AbstractContextManager[Any]:
    """Skip random initialisation: every parameter is then loaded (strictly) from the checkpoint."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        return contextlib.nullcontext()
    return no_init_weights()


class ImageReward(Reward):
    """ImageReward v1.0: BLIP ViT + cross-attention BERT + affine head, normalised to about N(0, 1).

    ``vision`` is a transformers ``BlipVisionModel`` (its ``last_hidden_state`` is BLIP's
    ``visual_encoder(image)``), ``text`` a ``BlipTextModel(add_pooling_layer=False)`` with cross-attention
    layers, ``mlp`` the published head (keys ``mlp.layers.{0,2,4,6,7}``, run in float32).
    """

    name = "imagereward"
    higher_is_better: ClassVar[bool] = True
    is_differentiable: ClassVar[bool] = True
    score_scale: ClassVar[str] = (
        "normalised ImageReward (head - 0.1672) / 1.0333, about N(0, 1) over the ImageReward training "
        "prompts; higher is better"
    )
    token_cache_size: int = 4096

    def __init__(
        self,
        vision_config: Any,
        text_config: Any,
        tokenizer: Any,
        max_length: int = MAX_TEXT_LENGTH,
        initialize: bool = True,
    ):
        """``initialize=False`` skips random initialisation (for weights loaded right after)."""
        from transformers import BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        super().__init__()
        with contextlib.nullcontext() if initialize else _no_init():
            self.vision = BlipVisionModel(vision_config)
            self.text = BlipTextModel(text_config, add_pooling_layer=False)
            self.mlp = MLPHead(in_dim=text_config.hidden_size, relu=False)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.image_size = int(vision_config.image_size)
        self._tokens: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.eval()

    # -- loading ------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        weights: str | os.PathLike | None = None,
        processor: str | os.PathLike | None = None,
        backbone: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "fp32",
        vision_heads: int | None = None,
        med_config: str | os.PathLike | None = None,
        **ignored_common: Any,
    ) -> ImageReward:
        """Load the published weights.

        ``weights``: a folder holding ``ImageReward.pt`` (or ``ImageReward.safetensors``, same keys) and
        ``med_config.json``; the checkpoint file itself (``med_config.json`` beside it, or ``med_config=``);
        a hub id; or ``None`` for ``THUDM/ImageReward``. ``processor``: the BERT tokenizer folder or hub id
        (default ``bert-base-uncased``). The vision architecture is read from the checkpoint's shapes
        (heads = width // 64 unless ``vision_heads``). ``backbone`` does not apply and is ignored.
        Loading is strict; see :meth:`load_original` for the keys allowed to differ.
        """
        ignored = {key: value for key, value in ignored_common.items() if value is not None}
        if backbone is not None:
            ignored["backbone"] = backbone
        if ignored:
            warnings.warn(f"imagereward ignores {', '.join(sorted(ignored))}", stacklevel=2)
        checkpoint, config_path = _resolve_weights(weights, med_config)
        med = read_med_config(config_path)
        state_dict = load_state_dict(checkpoint)
        vision_config = vision_config_from_state_dict(state_dict, str(checkpoint), heads=vision_heads)
        text_config = text_config_from_med_config(med, vision_config.hidden_size, str(config_path))
        tokenizer = load_tokenizer(processor, vocab_size=text_config.vocab_size)
        reward = cls(vision_config, text_config, tokenizer, initialize=False)
        reward.load_original(state_dict, source=str(checkpoint))
        torch_dtype = resolve_dtype(dtype)
        reward.to(device=device)
        reward.vision.to(dtype=torch_dtype)
        reward.text.to(dtype=torch_dtype)
        return reward.eval()

    def load_original(self, state_dict: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
        """Load a state dict in the published (BLIP) key layout, strictly.

        Allowed to differ, and nothing else: ``*position_ids`` (BERT's position-index buffer, saved by old
        transformers and rebuilt here); ``blip.vision_proj.*`` and ``blip.text_proj.*`` (BLIP's contrastive
        projections, kept frozen in the published checkpoint and unused by the score). Errors name keys in
        the published layout.
        """
        converted = convert_original_state_dict(state_dict)  # the allow-listed keys keep their names
        try:
            load_into(
                self,
                converted,
                source=source,
                allow_missing=ALLOW_MISSING,
                allow_unexpected=ALLOW_UNEXPECTED,
            )
        except StateDictMismatchError as error:
            mismatched = []
            for entry in error.mismatched:
                key, _, shapes = entry.partition(" ")
                mismatched.append(f"{module_to_original_key(key)} {shapes}")
            raise StateDictMismatchError(
                source,
                missing=[module_to_original_key(k) for k in error.missing],
                unexpected=[module_to_original_key(k) for k in error.unexpected],
                mismatched=mismatched,
            ) from None
        self._tokens.clear()

    # -- the Reward protocol ----------------------------------------------------------------------------
    def preprocess_reference(self, image: Image.Image) -> torch.Tensor:
        """The reference ``_transform(224)``: PIL bicubic resize, centre crop, OpenAI mean/std."""
        return clip_reference(image, self.image_size)

    def preprocess_tensor(self, images: torch.Tensor) -> torch.Tensor:
        return clip_tensor(images, self.image_size)

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)`` ``[B, 35]``: padded to max_length, truncated, cached per prompt."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._tokens))
        if missing:
            encoded = self.tokenizer(
                missing,
                padding="max_length",
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            for prompt, ids, mask in zip(missing, encoded["input_ids"], encoded["attention_mask"]):
                self._tokens[prompt] = (ids, mask)
                if len(self._tokens) > self.token_cache_size:
                    self._tokens.popitem(last=False)
        ids = torch.stack([self._tokens[p][0] for p in prompts])
        mask = torch.stack([self._tokens[p][1] for p in prompts])
        return ids, mask

    def text_features(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """The text encoder's ``[CLS]`` output cross-attending to the image tokens, float32 ``[B, H]``."""
        image_embeds = self.vision(pixel_values=self._to_model(pixels)).last_hidden_state
        ids, mask = self.tokenize(prompts)
        device = image_embeds.device
        # As the reference: every image token is attended to. (transformers' BlipTextAttention does not pass
        # this mask on to the cross-attention scores; with all ones that changes nothing.)
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=device)
        output = self.text(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
            is_decoder=False,
            use_cache=False,
        )
        return output.last_hidden_state[:, 0].float()

    def score_pixels(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if len(prompts) != pixels.shape[0]:
            raise ValueError(f"got {len(prompts)} prompts for {pixels.shape[0]} images")
        features = self.text_features(pixels, prompts)
        head_dtype = self.mlp.layers[0].weight.dtype
        raw = self.mlp(features.to(head_dtype)).float()
        return (raw - SCORE_MEAN) / SCORE_STD

    @torch.no_grad()
    def rank(
        self, prompt: str, images: torch.Tensor | Sequence[ImageLike], batch_size: int = 32
    ) -> tuple[list[int], torch.Tensor]:
        """The reference ``inference_rank``: 1-based ranks (1 = best) and the scores of one prompt's images.

        Ties keep the input order (a stable sort; the reference's sort leaves tie order unspecified).
        """
        scores = self.score(images, prompt, batch_size=batch_size).detach().float().cpu()
        order = torch.sort(scores, descending=True, stable=True).indices
        ranks = torch.empty_like(order)
        ranks[order] = torch.arange(1, len(order) + 1)
        return ranks.tolist(), scores


__all__ = [
    "ImageReward",
    "convert_original_state_dict",
    "load_tokenizer",
    "module_to_original_key",
    "original_to_module_key",
    "read_med_config",
    "text_config_from_med_config",
    "vision_config_from_state_dict",
]
