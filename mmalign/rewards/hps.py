"""HPSv2 / HPSv2.1: Human Preference Score (Wu et al. 2023, arXiv:2306.09341; tgxs002/HPSv2).

An open_clip ``ViT-H-14`` fine-tuned on HPDv2; the score is the cosine of the L2-normalised image and text
features (about 0.2-0.35; benchmark tables print 100x). Differences from ``hpsv2/img_score.py``:

* the checkpoint is loaded once, strictly, into an architecture-only model (the reference first downloads
  the LAION ViT-H weights only to overwrite them, and reloads the checkpoint on every ``score()`` call);
* the prompt is encoded once per distinct string, not once per image;
* RGBA/P/16-bit inputs are converted to RGB (the reference crashes on RGBA);
* scores are computed in float32 after the tower (the reference's CUDA fp16 autocast produces exact ties).
* an image whose longest side is already the model's size (224x100, say) is letterboxed like any other:
  the reference ``ResizeMaxSize`` (hpsv2's vendored open_clip transform) resizes and pads only when
  ``scale != 1``, so it passes such an image through unpadded and the tower then fails (positional embedding
  of 257 tokens against 113). mmalign deliberately pads it to 224x224, which is what the reference does for
  every other size, so its score equals that of the same image letterboxed by hand (tested).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from PIL import Image

from ..hub import load_into, load_state_dict, resolve_file
from .base import TwoTowerReward, resolve_dtype
from .preprocess import hps_reference, hps_tensor

HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
# The published checkpoints are plain open_clip ViT-H-14 state dicts. Every architecture switch is pinned
# by the arch name (GELU, not QuickGELU; 224 px; context 77): a checkpoint of another shape fails to load.
HPS_ARCH = "ViT-H-14"


class HPSReward(TwoTowerReward):
    """HPSv2.x on an open_clip CLIP; ``score_pixels`` expects letterboxed, normalised 224 px input."""

    score_scale: ClassVar[str] = "cosine in [-1, 1]; HPSv2 typically 0.2-0.35 (tables report 100x)"

    def __init__(self, model: torch.nn.Module, tokenizer: Any, version: str = "v2.1", image_size: int = 224):
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.version = version
        self.image_size = image_size
        self.name = "hpsv2" if version == "v2.0" else "hpsv2.1"

    @classmethod
    def from_pretrained(
        cls,
        weights: str | None = None,
        version: str = "v2.1",
        arch: str = HPS_ARCH,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "fp32",
        **_: Any,
    ) -> HPSReward:
        """Load ``HPS_v2[.1]_compressed.pt`` (or a safetensors copy) from a path, folder or the hub."""
        import open_clip

        if version not in HPS_FILES:
            raise ValueError(f"unknown HPS version {version!r}; use one of {', '.join(HPS_FILES)}")
        path = resolve_file(weights, default_repo=HPS_REPO, filename=HPS_FILES[version], what=f"HPS {version}")
        model = open_clip.create_model(arch, pretrained=None)
        load_into(model, load_state_dict(path), source=str(path))
        tokenizer = open_clip.get_tokenizer(arch)
        image_size = model.visual.image_size
        image_size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
        reward = cls(model, tokenizer, version=version, image_size=int(image_size))
        return reward.to(device=device, dtype=resolve_dtype(dtype))

    def preprocess_reference(self, image: Image.Image) -> torch.Tensor:
        return hps_reference(image, self.image_size)

    def preprocess_tensor(self, images: torch.Tensor) -> torch.Tensor:
        return hps_tensor(images, self.image_size)

    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts).to(self.device)
        return self.model.encode_text(tokens)

    def _encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)
