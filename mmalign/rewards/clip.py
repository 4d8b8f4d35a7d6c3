"""CLIP-family rewards on transformers' ``CLIPModel``: PickScore and two CLIPScore conventions.

* PickScore v1 (Kirstain et al. 2023, arXiv:2305.01569; yuvalkirstain/PickScore): CLIP-H/14 fine-tuned on
  Pick-a-Pic; score = ``logit_scale.exp() * cos`` (about 18-23); probabilities = softmax over the images of
  one prompt. Model and processor live in two hub repos, as published.
* CLIPScore (Hessel et al. 2021, arXiv:2104.08718; jmhessel/clipscore): ViT-B/32, caption prefixed with
  "A photo depicts ", per sample ``2.5 * max(cos, 0)``; preprocessing is OpenAI CLIP's torchvision transform.
* ``clipscore-tm``: torchmetrics' ``CLIPScore``: ``100 * cos`` per sample with ViT-L/14 and the CLIP processor.
  torchmetrics clamps the *mean* over a batch at 0 (``max(mean(100 cos), 0)``), Hessel clamps each sample:
  :meth:`TorchmetricsCLIPScoreReward.corpus_score` gives the torchmetrics aggregate. A deliberate difference on
  prompts over 77 tokens: mmalign truncates with the tokenizer, which keeps the end-of-text token (76 tokens +
  EOT), while torchmetrics cuts the first 77 ids and so drops it. CLIP pools the text feature at end-of-text;
  without it transformers pools at the largest token id (configs with ``eos_token_id = 2``, as
  ``openai/clip-vit-large-patch14``: some word of the prompt) or at position 0 (newer configs: the start token,
  which a causal tower sees alone, so the score no longer depends on the prompt). torchmetrics' scores of such
  prompts are therefore not prompt scores; mmalign's are those of the prompt's first 76 tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image

from ..hub import resolve_dir
from .base import TwoTowerReward, resolve_dtype
from .preprocess import clip_reference, clip_tensor


def _features(output: Any) -> torch.Tensor:
    """transformers 5 returns an output object from ``get_*_features``; 4.x returned the tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def load_clip_processor(folder: Path):
    """CLIP tokenizer and the PIL image processor (the references' path; the torchvision backend differs
    by up to one uint8 level)."""
    from transformers import AutoTokenizer

    try:
        from transformers.models.clip import CLIPImageProcessorPil as ImageProcessor
    except ImportError:  # transformers 4.x: the default class is the PIL one
        from transformers import CLIPImageProcessor as ImageProcessor
    return AutoTokenizer.from_pretrained(str(folder)), ImageProcessor.from_pretrained(str(folder))


class CLIPReward(TwoTowerReward):
    """A ``CLIPModel`` scored by cosine; subclasses choose the processor path and the score map."""

    default_repo: ClassVar[str] = "openai/clip-vit-large-patch14"
    default_processor_repo: ClassVar[str | None] = None
    prompt_prefix: ClassVar[str] = ""
    use_image_processor: ClassVar[bool] = True  # False: OpenAI CLIP's torchvision transform

    def __init__(self, model: torch.nn.Module, tokenizer: Any, image_processor: Any, max_length: int = 77):
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.max_length = max_length
        size = image_processor.crop_size
        self.image_size = int(size if isinstance(size, int) else size["height"])
        self.image_mean = tuple(image_processor.image_mean)
        self.image_std = tuple(image_processor.image_std)

    @classmethod
    def from_pretrained(
        cls,
        weights: str | None = None,
        processor: str | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "fp32",
        **_: Any,
    ) -> CLIPReward:
        """``weights``: a CLIPModel folder or hub id; ``processor``: its processor folder (default: the
        weights folder, or the published processor repo)."""
        from transformers import CLIPModel

        model_dir = resolve_dir(weights, default_repo=cls.default_repo, what=f"{cls.name} model")
        if processor is None and weights is None:
            processor = cls.default_processor_repo
        proc_dir = (
            model_dir
            if processor is None
            else resolve_dir(processor, default_repo=cls.default_repo, what=f"{cls.name} processor")
        )
        tokenizer, image_processor = load_clip_processor(proc_dir)
        # Loaded in the target dtype: no full-precision copy of the weights is built and then converted.
        model = CLIPModel.from_pretrained(str(model_dir), dtype=resolve_dtype(dtype))
        max_length = min(getattr(model.config.text_config, "max_position_embeddings", 77), 77)
        reward = cls(model, tokenizer, image_processor, max_length=max_length)
        return reward.to(device=device, dtype=resolve_dtype(dtype))

    # preprocessing
    def preprocess_reference(self, image: Image.Image) -> torch.Tensor:
        if self.use_image_processor:
            out = self.image_processor(images=image, return_tensors="pt")
            return out["pixel_values"][0]
        return clip_reference(image, self.image_size)

    def preprocess_reference_batch(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """One image-processor call per batch (the same per-image ops, without the per-call overhead)."""
        if self.use_image_processor:
            return self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        return super().preprocess_reference_batch(images)

    def preprocess_tensor(self, images: torch.Tensor) -> torch.Tensor:
        return clip_tensor(images, self.image_size, self.image_mean, self.image_std)

    # towers
    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        texts = [self.prompt_prefix + p for p in prompts]
        tokens = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        return _features(self.model.get_text_features(**tokens))

    def _encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return _features(self.model.get_image_features(pixel_values=pixels))


class PickScoreReward(CLIPReward):
    name = "pickscore"
    default_repo = "yuvalkirstain/PickScore_v1"
    default_processor_repo = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    score_scale: ClassVar[str] = "logit_scale.exp() * cosine; about 18-23 for PickScore v1"

    def similarity_to_score(self, cosine: torch.Tensor) -> torch.Tensor:
        return self.model.logit_scale.detach().float().exp() * cosine

    def probabilities(self, images: Any, prompt: str) -> torch.Tensor:
        """Softmax of the scores over the candidate images of one prompt (PickScore's ``probs``)."""
        return torch.softmax(self.score(images, prompt), dim=-1)


class CLIPScoreReward(CLIPReward):
    name = "clipscore"
    default_repo = "openai/clip-vit-base-patch32"
    prompt_prefix = "A photo depicts "
    use_image_processor = False
    score_scale: ClassVar[str] = "2.5 * max(cosine, 0), in [0, 2.5] (Hessel et al.)"
    weight: float = 2.5

    def similarity_to_score(self, cosine: torch.Tensor) -> torch.Tensor:
        return self.weight * cosine.clamp(min=0)


class TorchmetricsCLIPScoreReward(CLIPReward):
    """torchmetrics' ``CLIPScore`` convention (``100 * cos``), except that prompts over 77 tokens keep their
    end-of-text token (torchmetrics drops it; see the module docstring)."""

    name = "clipscore-tm"
    default_repo = "openai/clip-vit-large-patch14"
    score_scale: ClassVar[str] = "100 * cosine per sample (torchmetrics; its aggregate clamps the mean at 0)"

    def similarity_to_score(self, cosine: torch.Tensor) -> torch.Tensor:
        return 100.0 * cosine

    @staticmethod
    def corpus_score(scores: Sequence[float] | torch.Tensor) -> float:
        """torchmetrics' aggregate: ``max(mean(100 cos), 0)``."""
        return max(float(torch.as_tensor(scores, dtype=torch.float64).mean()), 0.0)
