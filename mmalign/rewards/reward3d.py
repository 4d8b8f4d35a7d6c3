"""Reward3D (Ye et al. 2024, "DreamReward: Text-to-3D Generation with Human Preference", ECCV;
liuff19/DreamReward ``Reward3D/Reward3D.py``): a text-to-3D reward over 4 rendered views of one object.

Each view is encoded with its prompt exactly as ImageReward encodes an image (BLIP ViT-L/16 image tokens feeding
the cross-attention of a BERT-base text encoder; the text ``[CLS]`` feature, :class:`ImageReward.text_features`),
then the 4 view features are fused. Two published checkpoints (hub ``yejunliang23/Reward3D``), told apart by
their keys:

* ``Reward3D_Scorer.pt`` (the paper's model, class ``Reward3D_``): each view's feature goes through ImageReward's
  head up to its 128-d intermediate (``mlp.layers[0..2]``), the 4 vectors are concatenated in view order
  (``[B, 512]``) and a linear scorer ``Scorer.fc1/fc2/fc3`` (512 -> 256 -> 64 -> 1, dropouts, no activations)
  gives the reward; normalised ``(r - 0.16717362830052426) / 1.0333394966054072``.
* ``Reward3D_CrossViewFusion.pt`` (class ``Reward3D``): the 4 features attend to each other
  (``cross_view_adapter.self_attn``, 12-head ``nn.MultiheadAttention``), a sigmoid gate
  ``g = sigmoid(W [f, attn(f)] + b)`` (``cross_view_adapter.fusion_gate.0``) mixes ``g * attn + (1 - g) * f``,
  the mean over views goes through ImageReward's full head; normalised ``(r - 0.16717362830052426) / 5``.
  It does not depend on the order of the views.

Prompts: DreamReward tokenises with ``padding="max_length", max_length=100`` (not ImageReward's 35) and gives each
view threestudio's view-dependent prompt (``"<prompt>, front view"``, ``side``, ``back``, ``overhead``; front and
back within 30 degrees of azimuth 0 / 180, overhead above 60 degrees of elevation: :func:`view_prompts`). Here a
view set's prompt is used as it is unless cameras are known (``azimuth`` / ``elevation`` on the tensor path, a
``cameras.json`` beside the views on the file path) and ``view_dependent=True`` (the default), or the caller
gives one prompt per view.

Differences from the reference: the model always runs in eval mode, so scores are deterministic (inside
DreamReward's training the reward is a submodule of the trained system and never set to eval, so its dropouts are
active there; the parity benchmark compares both in eval mode); the checkpoint is loaded strictly (the reference
uses ``strict=False``); ``med_config.json`` falls back to a built-in copy of DreamReward's
``scripts/med_config.json`` when none is beside the weights. Preprocessing: the reference's
``_transform(224)`` (bicubic resize of the shorter side, centre crop, OpenAI mean/std) on files; on tensors the
differentiable :func:`mmalign.rewards.preprocess.clip_tensor`, which is DreamReward's own tensor transform of its
renders (torchvision ``Resize(224, bicubic)``, ``CenterCrop``, ``Normalize``) under torchvision >= 0.17; the
torchvision 0.16 of DreamReward's install notes did not antialias tensor resizes by default, so renders larger
than 224 px were resized slightly differently there.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn

from ..errors import MediaError, StateDictMismatchError, WeightsError
from ..hub import load_into, load_state_dict, resolve_file
from ..modalities.image import DEFAULT_MAX_PIXELS, broadcast_prompts
from ..modalities.multiview import check_multiview, parse_grid, read_views, split_grid
from .base import Reward, resolve_dtype
from .imagereward import (
    SCORE_MEAN,
    ImageReward,
    load_tokenizer,
    read_med_config,
    text_config_from_med_config,
    vision_config_from_state_dict,
)
from .lifted import MediaScore

DEFAULT_REPO = "yejunliang23/Reward3D"
NUM_VIEWS = 4
MAX_TEXT_LENGTH = 100  # DreamReward_guidance*.py: tokenizer(..., padding="max_length", max_length=100)
FEATURE_DIM = 128  # MLP(768).forward(get_feature=128): the output of mlp.layers[2]
MED_CONFIG_FILE = "med_config.json"

# DreamReward's scripts/med_config.json (BERT-base; encoder_width is overridden by the vision width, 1024)
DEFAULT_MED_CONFIG: dict[str, Any] = {
    "architectures": ["BertModel"],
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 768,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512,
    "model_type": "bert",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 0,
    "type_vocab_size": 2,
    "vocab_size": 30524,
    "encoder_width": 768,
    "add_cross_attention": True,
}

VARIANTS: dict[str, dict[str, Any]] = {
    # the published prefix of the fusion weights, the checkpoint file, the normalisation std
    "scorer": {"prefix": "Scorer.", "file": "Reward3D_Scorer", "std": 1.0333394966054072},
    "crossviewfusion": {"prefix": "cross_view_adapter.", "file": "Reward3D_CrossViewFusion", "std": 5.0},
}
VIEW_SUFFIXES = {"side": ", side view", "front": ", front view", "back": ", back view", "overhead": ", overhead view"}
FRONT_THRESHOLD, BACK_THRESHOLD, OVERHEAD_THRESHOLD = 30.0, 30.0, 60.0  # configs/dreamreward*.yaml, threestudio


def view_directions(
    azimuth: Sequence[float] | torch.Tensor,
    elevation: Sequence[float] | torch.Tensor,
    front: float = FRONT_THRESHOLD,
    back: float = BACK_THRESHOLD,
    overhead: float = OVERHEAD_THRESHOLD,
) -> list[str]:
    """threestudio's direction of each camera (degrees): ``overhead`` above ``overhead`` elevation, else ``front``
    within ``front`` of azimuth 0, ``back`` within ``back`` of 180, else ``side``."""
    out = []
    for azi, ele in zip(torch.as_tensor(azimuth).tolist(), torch.as_tensor(elevation).tolist()):
        shifted = (azi + 180.0) % 360.0 - 180.0
        name = "side"
        if -front < shifted < front:
            name = "front"
        if shifted > 180.0 - back or shifted < -180.0 + back:
            name = "back"
        if ele > overhead:
            name = "overhead"
        out.append(name)
    return out


def view_prompts(
    prompt: str, azimuth: Sequence[float] | torch.Tensor, elevation: Sequence[float] | torch.Tensor
) -> list[str]:
    """DreamReward's per-view prompts: ``"<prompt>, <direction> view"`` for each camera (:func:`view_directions`)."""
    return [prompt + VIEW_SUFFIXES[name] for name in view_directions(azimuth, elevation)]


def detect_variant(state_dict: Mapping[str, torch.Tensor], source: str) -> str:
    """``scorer`` or ``crossviewfusion`` from the fusion keys of a published checkpoint: detected, never guessed."""
    found = [name for name, spec in VARIANTS.items() if any(k.startswith(spec["prefix"]) for k in state_dict)]
    if len(found) != 1:
        what = "both" if found else "neither"
        raise WeightsError(
            f"{source}: not a Reward3D checkpoint: it holds {what} of Scorer.* (Reward3D_Scorer.pt) and "
            "cross_view_adapter.* (Reward3D_CrossViewFusion.pt)"
        )
    return found[0]


class ViewScorer(nn.Module):
    """The Scorer of ``Reward3D_``: Linear 512 -> 256 -> 64 -> 1 with dropouts and no activations."""

    def __init__(self, in_dim: int = NUM_VIEWS * FEATURE_DIM):
        super().__init__()
        self.fc1, self.dropout1 = nn.Linear(in_dim, 256), nn.Dropout(0.2)
        self.fc2, self.dropout2 = nn.Linear(256, 64), nn.Dropout(0.2)
        self.fc3 = nn.Linear(64, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.dropout2(self.fc2(self.dropout1(self.fc1(features))))).squeeze(-1)


class CrossViewFusion(nn.Module):
    """Self-attention across the views of a set, a sigmoid gate between each feature and its attended value,
    then the mean over views: ``[B, V, D] -> [B, D]``."""

    def __init__(self, dim: int = 768, heads: int = 12):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=0.1)
        self.fusion_gate = nn.Sequential(nn.Linear(2 * dim, dim), nn.Sigmoid())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        sequence = features.transpose(0, 1)  # [V, B, D]: nn.MultiheadAttention's (L, N, E)
        attended = self.self_attn(sequence, sequence, sequence, need_weights=False)[0]
        gate = self.fusion_gate(torch.cat([sequence, attended], dim=-1))
        return (gate * attended + (1 - gate) * sequence).mean(dim=0)


class Reward3D(Reward):
    """DreamReward's Reward3D over sets of 4 views ``[B, 4, 3, H, W]``; see the module docstring.

    ``imagereward`` is an :class:`ImageReward` (BLIP + head) that encodes each view with its prompt; ``fusion`` a
    :class:`ViewScorer` (``variant="scorer"``) or :class:`CrossViewFusion` (``variant="crossviewfusion"``).
    ``grid="RxC"`` reads each file or Pillow image as a grid of views (``2x2`` for 4 views).
    """

    modality: ClassVar[str] = "multiview"
    higher_is_better: ClassVar[bool] = True
    is_differentiable: ClassVar[bool] = True
    num_views: ClassVar[int] = NUM_VIEWS
    aggregate: ClassVar[str] = "fused"  # the views are fused by the model, not aggregated (score records say so)

    def __init__(
        self,
        vision_config: Any,
        text_config: Any,
        tokenizer: Any,
        variant: str = "scorer",
        *,
        fusion_heads: int = 12,
        grid: str | None = None,
        view_dependent: bool = True,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        initialize: bool = True,
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown Reward3D variant {variant!r}; use one of {', '.join(VARIANTS)}")
        self.variant_name = variant
        self.name = "reward3d" if variant == "scorer" else "reward3d-cvf"
        self.imagereward = ImageReward(
            vision_config, text_config, tokenizer, max_length=MAX_TEXT_LENGTH, initialize=initialize
        )
        hidden = int(text_config.hidden_size)
        self.fusion = ViewScorer() if variant == "scorer" else CrossViewFusion(hidden, fusion_heads)
        self.score_mean, self.score_std = SCORE_MEAN, float(VARIANTS[variant]["std"])
        self.score_scale = (
            f"Reward3D ({'Scorer' if variant == 'scorer' else 'CrossViewFusion'}) over {NUM_VIEWS} views, "
            f"(r - {SCORE_MEAN}) / {self.score_std}; higher is better"
        )
        self.grid = _check_grid(self.name, grid)
        self.view_dependent = view_dependent
        self.max_pixels = max_pixels
        self.eval()

    # -- loading ------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        weights: str | os.PathLike | None = None,
        processor: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "fp32",
        variant: str = "scorer",
        med_config: str | os.PathLike | None = None,
        vision_heads: int | None = None,
        fusion_heads: int = 12,
        grid: str | None = None,
        view_dependent: bool = True,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        **ignored_common: Any,
    ) -> Reward3D:
        """Load a published checkpoint.

        ``weights``: the ``.pt`` / ``.safetensors`` file (same keys), a folder holding
        ``Reward3D_Scorer.*`` or ``Reward3D_CrossViewFusion.*`` (by ``variant``), a hub id, or ``None`` for
        ``yejunliang23/Reward3D``. The file's keys decide the variant; a ``variant`` that disagrees is an error.
        ``med_config``: BLIP's text config (default: ``med_config.json`` beside the weights, else DreamReward's
        ``scripts/med_config.json``, built in). ``processor``: the BERT tokenizer folder or hub id (default
        ``bert-base-uncased``). A torch pickle is opened with ``weights_only=True`` only.
        """
        ignored = {key: value for key, value in ignored_common.items() if value is not None}
        if ignored:
            import warnings

            warnings.warn(f"reward3d ignores {', '.join(sorted(ignored))}", stacklevel=2)
        if variant not in VARIANTS:
            raise ValueError(f"unknown Reward3D variant {variant!r}; use one of {', '.join(VARIANTS)}")
        checkpoint = _resolve_checkpoint(weights, variant)
        state_dict = load_state_dict(checkpoint)
        found = detect_variant(state_dict, str(checkpoint))
        if found != variant:
            other = "reward3d" if found == "scorer" else "reward3d-cvf"
            raise WeightsError(
                f"{checkpoint}: a {VARIANTS[found]['file']} checkpoint, but variant {variant!r} was asked for "
                f"(load it as {other!r}, or pass variant={found!r})"
            )
        config_path = Path(med_config) if med_config is not None else checkpoint.parent / MED_CONFIG_FILE
        if med_config is not None or config_path.is_file():
            med, med_source = read_med_config(config_path), str(config_path)
        else:
            med, med_source = dict(DEFAULT_MED_CONFIG), "DreamReward scripts/med_config.json (built in)"
        vision_config = vision_config_from_state_dict(state_dict, str(checkpoint), heads=vision_heads)
        text_config = text_config_from_med_config(med, vision_config.hidden_size, med_source)
        tokenizer = load_tokenizer(processor, vocab_size=text_config.vocab_size)
        reward = cls(
            vision_config,
            text_config,
            tokenizer,
            variant,
            fusion_heads=fusion_heads,
            grid=grid,
            view_dependent=view_dependent,
            max_pixels=max_pixels,
            initialize=False,
        )
        reward.load_original(state_dict, source=str(checkpoint))
        torch_dtype = resolve_dtype(dtype)
        reward.to(device=device)
        reward.imagereward.vision.to(dtype=torch_dtype)
        reward.imagereward.text.to(dtype=torch_dtype)
        return reward.eval()

    def load_original(self, state_dict: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
        """Load a state dict in the published key layout, strictly: ``blip.*`` and ``mlp.*`` as ImageReward's
        (:meth:`ImageReward.load_original`, with its allow-list), ``Scorer.*`` or ``cross_view_adapter.*`` into
        the fusion. Every missing, unexpected or mis-shaped key is reported at once, by its published name."""
        prefix = VARIANTS[self.variant_name]["prefix"]
        blip = {k: v for k, v in state_dict.items() if k.startswith(("blip.", "mlp."))}
        fusion = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        stray = [k for k in state_dict if k not in blip and not k.startswith(prefix)]
        missing: list[str] = []
        unexpected: list[str] = list(stray)
        mismatched: list[str] = []
        for load, part in ((self.imagereward.load_original, blip), (self._load_fusion, fusion)):
            try:
                load(part, source=source)
            except StateDictMismatchError as error:
                missing += error.missing
                unexpected += error.unexpected
                mismatched += error.mismatched
        if missing or unexpected or mismatched:
            raise StateDictMismatchError(source, missing=missing, unexpected=unexpected, mismatched=mismatched)

    def _load_fusion(self, part: Mapping[str, torch.Tensor], source: str) -> None:
        prefix = VARIANTS[self.variant_name]["prefix"]
        try:
            load_into(self.fusion, part, source=source)
        except StateDictMismatchError as error:
            raise StateDictMismatchError(
                source,
                missing=[prefix + k for k in error.missing],
                unexpected=[prefix + k for k in error.unexpected],
                mismatched=[prefix + k for k in error.mismatched],
            ) from None

    def state_dict_original(self) -> dict[str, torch.Tensor]:
        """This model's weights in the published key layout (what :meth:`load_original` reads)."""
        from .imagereward import module_to_original_key

        out = {module_to_original_key(k): v for k, v in self.imagereward.state_dict().items()}
        prefix = VARIANTS[self.variant_name]["prefix"]
        out.update({prefix + k: v for k, v in self.fusion.state_dict().items()})
        return out

    def info(self) -> dict[str, object]:
        return {**super().info(), "views": NUM_VIEWS, "variant": self.variant_name}

    def with_grid(self, grid: str | None) -> Reward3D:
        """The same model (weights shared) reading each file or Pillow image as a ``grid`` of views."""
        other = copy.copy(self)
        other.grid = _check_grid(self.name, grid)
        return other

    # -- prompts ------------------------------------------------------------------------------------------
    def set_prompts(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[str]] | None,
        batch: int,
        azimuth: torch.Tensor | Sequence[Any] | None = None,
        elevation: torch.Tensor | Sequence[Any] | None = None,
    ) -> list[list[str]]:
        """The prompt of each view ``[B][4]``: one prompt per set (or one for all), made view-dependent from the
        cameras when given (``azimuth`` / ``elevation`` ``[B, 4]`` or ``[4]`` degrees) and ``view_dependent``;
        or one list of 4 prompts per set, used as given."""
        if prompts is not None and not isinstance(prompts, str):
            listed = list(prompts)
            if listed and all(not isinstance(p, str) for p in listed):
                per_view = [list(p) for p in listed]
                if len(per_view) == 1:
                    per_view = per_view * batch
                if len(per_view) != batch or any(len(p) != NUM_VIEWS for p in per_view):
                    raise ValueError(f"per-view prompts must be {batch} lists of {NUM_VIEWS} prompts")
                return per_view
        flat = broadcast_prompts(prompts, batch)
        if azimuth is None or not self.view_dependent:
            return [[p] * NUM_VIEWS for p in flat]
        azimuth = torch.as_tensor(azimuth, dtype=torch.float64).reshape(-1, NUM_VIEWS).expand(batch, -1)
        elevation = (
            torch.zeros_like(azimuth)
            if elevation is None
            else torch.as_tensor(elevation, dtype=torch.float64).reshape(-1, NUM_VIEWS).expand(batch, -1)
        )
        return [view_prompts(p, a, e) for p, a, e in zip(flat, azimuth, elevation)]

    # -- scoring ------------------------------------------------------------------------------------------
    def preprocess_reference(self, image: Image.Image) -> torch.Tensor:
        """The reference ``_transform(224)`` of one view (as ImageReward's)."""
        return self.imagereward.preprocess_reference(image)

    def preprocess_tensor(self, images: torch.Tensor) -> torch.Tensor:
        return self.imagereward.preprocess_tensor(images)

    def check_views(self, count: int, what: str = "a view set") -> None:
        if count != NUM_VIEWS:
            raise ValueError(
                f"{self.name} scores sets of exactly {NUM_VIEWS} views (DreamReward's 4 cameras, 90 degrees "
                f"apart); {what} has {count}"
            )

    def score_sets(self, pixels: torch.Tensor, prompts: Sequence[Sequence[str]]) -> torch.Tensor:
        """Preprocessed views ``[B, 4, 3, h, w]`` and per-view prompts ``[B][4]`` -> normalised scores ``[B]``."""
        batch, count = pixels.shape[:2]
        self.check_views(count)
        flat = [p for row in prompts for p in row]
        features = self.imagereward.text_features(pixels.flatten(0, 1), flat)  # float32 [B*4, D]
        head = self.imagereward.mlp.layers
        features = features.to(head[0].weight.dtype)
        if self.variant_name == "scorer":
            intermediate = head[:3](features)  # mlp.layers 0 (Linear), 1 (Dropout), 2 (Linear): [B*4, 128]
            raw = self.fusion(intermediate.reshape(batch, count * intermediate.shape[-1]))
        else:
            raw = self.imagereward.mlp(self.fusion(features.view(batch, count, -1)))
        return (raw.float() - self.score_mean) / self.score_std

    def score_pixels(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Preprocessed views ``[B * 4, 3, h, w]`` (sets in order, one prompt per view) -> scores ``[B]``."""
        if pixels.shape[0] % NUM_VIEWS:
            self.check_views(pixels.shape[0], "the batch")
        batch = pixels.shape[0] // NUM_VIEWS
        rows = [list(prompts[i * NUM_VIEWS : (i + 1) * NUM_VIEWS]) for i in range(batch)]
        return self.score_sets(pixels.view(batch, NUM_VIEWS, *pixels.shape[1:]), rows)

    def score_tensor(
        self,
        views: torch.Tensor,
        prompts: str | Sequence[str] | Sequence[Sequence[str]] | None = None,
        azimuth: torch.Tensor | Sequence[Any] | None = None,
        elevation: torch.Tensor | Sequence[Any] | None = None,
    ) -> torch.Tensor:
        """Differentiable scores ``[B]`` of a canonical multi-view batch ``[B, 4, 3, H, W]`` in [0, 1]."""
        views = check_multiview(views)
        batch, count = views.shape[:2]
        self.check_views(count)
        rows = self.set_prompts(prompts, batch, azimuth, elevation)
        pixels = self.preprocess_tensor(views.flatten(0, 1).to(self.device))
        return self.score_sets(pixels.view(batch, count, *pixels.shape[1:]), rows)

    def forward(self, views: torch.Tensor, prompts: Any = None, **kwargs: Any) -> torch.Tensor:
        return self.score_tensor(views, prompts, **kwargs)

    # -- files ---------------------------------------------------------------------------------------------
    @property
    def variant(self) -> str:
        """What changes the scores besides the reward (``mmalign score`` keeps runs apart by it)."""
        parts = [self.variant_name] + ([f"grid{self.grid}"] if self.grid else [])
        return "/".join(parts + ([] if self.view_dependent else ["plain-prompts"]))

    def decode(self, source: Any) -> tuple[list[Image.Image], list[str], Any]:
        """A views folder (``cameras.json`` beside them gives the cameras), a grid file or Pillow grid image
        (with ``grid``), or a sequence of 4 Pillow images -> (views, names, cameras or ``None``)."""
        if isinstance(source, Image.Image):
            if self.grid is None:
                raise ValueError(f"{self.name}: one image is a view set only as a grid; load it with grid='2x2'")
            rows, cols = parse_grid(self.grid)
            return (
                split_grid(source.convert("RGB"), rows, cols),
                [f"[{r},{c}]" for r in range(rows) for c in range(cols)],
                None,
            )
        if isinstance(source, (str, os.PathLike)):
            images, names, cameras = read_views(source, self.grid, max_pixels=self.max_pixels)
            if len(images) != NUM_VIEWS:  # a MediaError: `mmalign score --skip-bad` skips and reports it
                raise MediaError(source, f"{self.name} scores sets of exactly {NUM_VIEWS} views; this one has "
                                 f"{len(images)}")  # fmt: skip
            return images, names, cameras
        images = [image.convert("RGB") for image in source]
        return images, [str(i) for i in range(len(images))], None

    @torch.no_grad()
    def score_decoded(self, decoded: Sequence[Any], prompts: Sequence[str], batch_size: int = 8) -> list[MediaScore]:
        """Decoded view sets -> :class:`MediaScore` (for ``mmalign score`` / ``bench``), reference preprocessing,
        ``batch_size`` sets at a time."""
        prompts = broadcast_prompts(prompts, len(decoded))
        results: list[MediaScore] = []
        for start in range(0, len(decoded), batch_size):
            chunk = decoded[start : start + batch_size]
            rows = []
            for (images, _, cameras), prompt in zip(chunk, prompts[start : start + batch_size]):
                self.check_views(len(images))
                azimuth, elevation = (None, None) if cameras is None else cameras
                rows.append(self.set_prompts(prompt, 1, azimuth, elevation)[0])
            pixels = torch.stack(
                [torch.stack([self.preprocess_reference(im) for im in images]) for images, _, _ in chunk]
            )
            scores = self.score_sets(self._to_model(pixels), rows).cpu()
            for (images, names, _), row, value in zip(chunk, rows, scores.tolist()):
                results.append(
                    MediaScore(value, [], "view", list(range(len(images))), extra={"views": names, "view_prompts": row})
                )
        return results

    def score_files(self, sources: Sequence[Any], prompts: str | Sequence[str] | None = None, batch_size: int = 8):
        prompts = broadcast_prompts(prompts, len(sources))
        return self.score_decoded([self.decode(source) for source in sources], prompts, batch_size)

    @torch.no_grad()
    def score_images(self, images: Sequence[Any], prompts: str | Sequence[str] | None = None, batch_size: int = 8):
        """Scores ``[B]`` of view sets given as folders, grid files / Pillow grid images (``grid="2x2"``) or
        sequences of 4 Pillow images, with the reference preprocessing (what ``label`` and the trainers' file
        path call)."""
        results = self.score_files(list(images), prompts, batch_size)
        return torch.tensor([r.total for r in results], dtype=torch.float32)

    def score(self, media: Any, prompts: Any = None, batch_size: int = 8) -> torch.Tensor:
        """Scores ``[B]``: differentiable on tensors ``[B, 4, 3, H, W]``, the reference path on files."""
        if isinstance(media, torch.Tensor):
            return self.score_tensor(media, prompts)
        if isinstance(media, (str, os.PathLike, Image.Image)):
            media = [media]
        return self.score_images(list(media), prompts, batch_size)


def _check_grid(name: str, grid: str | None) -> str | None:
    if grid is not None:
        rows, cols = parse_grid(grid)
        if rows * cols != NUM_VIEWS:
            raise ValueError(f"{name} scores sets of exactly {NUM_VIEWS} views; a {grid} grid holds {rows * cols}")
    return grid


def _resolve_checkpoint(weights: str | os.PathLike | None, variant: str) -> Path:
    stem = VARIANTS[variant]["file"]
    what = f"Reward3D checkpoint ({stem})"
    if weights is None:
        return resolve_file(None, default_repo=DEFAULT_REPO, filename=stem + ".pt", what=what)
    path = Path(str(weights)).expanduser()
    if path.is_dir():
        for name in (stem + ".safetensors", stem + ".pt"):
            if (path / name).is_file():
                return path / name
        raise WeightsError(f"{path}: folder has neither {stem}.safetensors nor {stem}.pt ({what})")
    return resolve_file(weights, default_repo=DEFAULT_REPO, filename=stem + ".pt", what=what)


__all__ = [
    "CrossViewFusion",
    "Reward3D",
    "ViewScorer",
    "detect_variant",
    "view_directions",
    "view_prompts",
]
