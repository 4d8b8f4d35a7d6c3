"""LAION aesthetic predictor v2 (christophschuhmann/improved-aesthetic-predictor, ``simple_inference.py``).

OpenAI CLIP ViT-L/14 image embedding (768-d, projected), L2-normalised, then an MLP head; about 1-10.
The head file ``sac+logos+ava1-l14-linearMSE.pth`` has no activations; ``ava+logos-l14-reluMSE.pth`` has
ReLUs. The variant is detected from the keys. Prompts are ignored.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from PIL import Image

from ..errors import WeightsError
from ..hub import load_into, load_state_dict, resolve_dir, resolve_file
from .base import Reward, resolve_dtype
from .heads import MLPHead, detect_head
from .preprocess import clip_reference, clip_tensor

BACKBONE_REPO = "openai/clip-vit-large-patch14"
HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"


def _vision_config(folder):
    """The vision config of a full CLIP folder, carrying the top-level ``projection_dim`` (768 for ViT-L/14)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(folder))
    vision = getattr(config, "vision_config", config)
    vision.projection_dim = getattr(config, "projection_dim", vision.projection_dim)
    return vision


class AestheticReward(Reward):
    name = "aesthetic"
    uses_prompt: ClassVar[bool] = False
    score_scale: ClassVar[str] = "predicted mean rating, about 1-10"

    def __init__(self, vision: torch.nn.Module, head: MLPHead, image_size: int = 224):
        super().__init__()
        self.vision = vision.eval()
        self.head = head.eval()
        self.image_size = image_size

    @classmethod
    def from_pretrained(
        cls,
        weights: str | None = None,
        backbone: str | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "fp32",
        **_: Any,
    ) -> AestheticReward:
        """``weights``: the head ``.pth``/``.safetensors`` (or ``org/repo/file`` on the hub);
        ``backbone``: a CLIP ViT-L/14 model folder or hub id (default ``openai/clip-vit-large-patch14``)."""
        from transformers import CLIPVisionModelWithProjection

        if weights is None:
            raise WeightsError(
                f"aesthetic: pass weights= (--weights) pointing to {HEAD_FILE} from "
                "christophschuhmann/improved-aesthetic-predictor (a local file or org/repo/file on the hub)"
            )
        head_path = resolve_file(weights, default_repo="", filename=HEAD_FILE, what="aesthetic head")
        state = load_state_dict(head_path)
        head = MLPHead(in_dim=768, relu=detect_head(state, str(head_path)))
        load_into(head, state, source=str(head_path))
        vision_dir = resolve_dir(backbone, default_repo=BACKBONE_REPO, what="aesthetic CLIP backbone")
        vision = CLIPVisionModelWithProjection.from_pretrained(str(vision_dir), config=_vision_config(vision_dir))
        reward = cls(vision, head, image_size=int(vision.config.image_size))
        reward = reward.to(device=device, dtype=resolve_dtype(dtype))
        reward.head.float()  # the head runs in float32 on normalised features
        return reward

    def preprocess_reference(self, image: Image.Image) -> torch.Tensor:
        return clip_reference(image, self.image_size)

    def preprocess_tensor(self, images: torch.Tensor) -> torch.Tensor:
        return clip_tensor(images, self.image_size)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised float32 CLIP image embeddings ``[B, 768]``."""
        features = self.vision(pixel_values=self._to_model(pixels)).image_embeds.float()
        return features / features.norm(dim=-1, keepdim=True)

    def score_pixels(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.head(self.embed(pixels))
