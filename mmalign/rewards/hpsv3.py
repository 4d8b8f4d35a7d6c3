# ruff: noqa: E501, W291  (the reference prompts are data: their long lines and trailing spaces are kept verbatim)
"""HPSv3: Human Preference Score v3 (Ma et al. 2025, arXiv:2508.03789; MizzenAI/HPSv3, PyPI ``hpsv3`` 1.0.0).

A Qwen2-VL-7B-Instruct fine-tuned as an uncertainty-aware reward: a head on the hidden state of an added
``<|Reward|>`` token outputs ``(mu, sigma)``; the score is ``mu`` (``hpsv3/inference.py``: "miu and sigma. we
select miu as the final output"). Read from the reference package (``hpsv3/inference.py``,
``hpsv3/train.py::create_model_and_processor``, ``hpsv3/model/qwen2vl_trainer.py::Qwen2VLRewardModelBT``,
``hpsv3/dataset/data_collator_qwen.py``, ``hpsv3/dataset/utils.py``, ``hpsv3/config/HPSv3_7B.yaml``):

* prompt: one user turn ``[image, INSTRUCTION.format(text_prompt=prompt) + prompt_with_special_token]`` through
  the Qwen2-VL chat template with the generation prompt; the processor's tokenizer gets ``<|Reward|>`` added as
  a special token and the embedding is resized to ``len(tokenizer)``;
* image: RGB, PIL bicubic resize to qwen-vl-utils ``smart_resize(h, w, 28, min_pixels=max_pixels=256*28*28)``
  (about 448x448 whatever the input: 256 merged vision tokens), then the Qwen2-VL processor (rescale,
  OpenAI-CLIP mean/std, 14-px patches, the image repeated over the 2-frame temporal patch);
* head (``rm_head_type: ranknet`` without kwargs): ``Linear(H, 1024) -> ReLU -> Dropout(0.05) -> Linear(1024, 16)
  -> ReLU -> Linear(16, 2)`` in float32, keys ``rm_head.{0,3,5}``; ``output_dim: 2``;
* decoder positions: sequential, see :mod:`mmalign.rewards.qwen2vl`;
* checkpoint: hub ``MizzenAI/HPSv3`` file ``HPSv3.safetensors`` (a full state dict of the 4.45 class, loaded
  strictly by the reference; ``{'model': ...}`` pickles are unwrapped too). The architecture, tokenizer, chat
  template and processor settings come from ``Qwen/Qwen2-VL-7B-Instruct`` (only its small files are fetched).

Scale: ``mu`` is unbounded (a Bradley-Terry-style utility trained with an uncertainty-aware ranking loss; the
paper's examples fall roughly in 0-15, higher is better); ``sigma`` is the predicted spread (not a probability).

Differences from the reference (none changes a score): the checkpoint is loaded by name-mapped keys onto
transformers 5's ``Qwen2VLModel`` without the unused LM head; images of a batch are scored together at any
size (the reference does the same); the head runs in float32 whatever the backbone dtype (as the reference's
``rm_head.to(float32)``). The tensor path (``score_tensor``) resizes with torch's antialiased bicubic instead
of PIL's, so it differs from ``score`` on files by resampling noise only; it is differentiable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn

from ..errors import WeightsError
from ..hub import load_state_dict, resolve_file
from ..memory import auto_dtype, placed_device
from ..modalities.image import broadcast_prompts, check_image_batch
from .base import ImageLike, resolve_dtype
from .qwen2vl import (
    Qwen2VLRewardModel,
    build_backbone,
    check_fits,
    checkpoint_vocab_size,
    convert_reference_state_dict,
    image_to_tensor,
    load_backbone_config,
    load_chat_template,
    load_reward_weights,
    load_tokenizer,
    normalize,
    pil_resize,
    read_pixel_stats,
    resize_tensor,
    resolve_backbone_dir,
    smart_resize,
)

HPSV3_REPO = "MizzenAI/HPSv3"
HPSV3_FILE = "HPSv3.safetensors"
HPSV3_BACKBONE = "Qwen/Qwen2-VL-7B-Instruct"
REWARD_TOKEN = "<|Reward|>"
IMAGE_PIXELS = 256 * 28 * 28  # min_pixels = max_pixels in hpsv3/inference.py::prepare_batch

# hpsv3/dataset/data_collator_qwen.py: the instruction and the reward-token suffix, verbatim (prompt data).
INSTRUCTION = """
You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 being the best. 

**Visual Quality:**  
Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:
- **Reasonableness:** The image should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.
- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to interpret, with no blurring or indistinct areas.
- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).
- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.
- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. 

**Text Alignment:**  
Assess how well the image matches the textual prompt across the following sub-dimensions:
- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.
- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the image adheres to this style.
- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image logically fit the scenario described in the prompt. The environment should support and enhance the subject without contradictions.
- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, but critical attributes should be preserved.
- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the image. The generated content should not introduce elements that conflict with or distort the original description.
Textual prompt - {text_prompt}


"""  # noqa: W291 - trailing spaces are part of the reference prompt
PROMPT_WITH_REWARD_TOKEN = """
Please provide the overall ratings of this image: <|Reward|>

END
"""


def build_hpsv3_text(prompt: str) -> str:
    """The user text of one HPSv3 query (``INSTRUCTION.format(text_prompt=prompt) + prompt_with_special_token``)."""
    return INSTRUCTION.format(text_prompt=prompt) + PROMPT_WITH_REWARD_TOKEN


def build_hpsv3_head(state_dict: Mapping[str, torch.Tensor], hidden_size: int, source: str) -> nn.Module:
    """The reward head the checkpoint holds: HPSv3's default ``ranknet`` MLP (``rm_head.{0,3,5}``) or a single
    bias-free Linear (``rm_head.weight``, ``rm_head_type: default``)."""
    if "rm_head.weight" in state_dict:
        out = state_dict["rm_head.weight"].shape[0]
        return nn.Linear(hidden_size, out, bias=False)
    needed = ("rm_head.0.weight", "rm_head.3.weight", "rm_head.5.weight")
    if all(key in state_dict for key in needed):
        first, second, last = (state_dict[key].shape for key in needed)
        return nn.Sequential(
            nn.Linear(hidden_size, first[0]),
            nn.ReLU(),
            nn.Dropout(0.05),
            nn.Linear(first[0], second[0]),
            nn.ReLU(),
            nn.Linear(second[0], last[0], bias="rm_head.5.bias" in state_dict),
        )
    found = sorted(key for key in state_dict if key.startswith("rm_head."))
    raise WeightsError(
        f"{source}: no HPSv3 reward head (expected rm_head.0/3/5 or rm_head.weight; found {found or 'none'})"
    )


@dataclass
class HPSv3Scores:
    """``mu`` (the score) and ``sigma`` ``[B]`` each, float32."""

    mu: torch.Tensor
    sigma: torch.Tensor


class HPSv3Reward(Qwen2VLRewardModel):
    """HPSv3 on transformers 5's Qwen2-VL; see the module docstring."""

    name = "hpsv3"
    modality: ClassVar[str] = "image"
    reward_tokens = (REWARD_TOKEN,)
    score_scale: ClassVar[str] = "HPSv3 mu (unbounded utility, higher is better; roughly 0-15 on real images)"

    def __init__(self, *args: Any, image_pixels: int = IMAGE_PIXELS, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.image_pixels = int(image_pixels)

    @classmethod
    def from_pretrained(
        cls,
        weights: str | os.PathLike | None = None,
        backbone: str | os.PathLike | None = None,
        processor: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "fp32",
        device_map: str | dict | None = None,
        max_memory: str | dict | None = None,
        offload_folder: str | os.PathLike | None = None,
        **_: Any,
    ) -> HPSv3Reward:
        """Load ``HPSv3.safetensors`` (path, folder or hub id; default ``MizzenAI/HPSv3``) onto the Qwen2-VL
        architecture of ``backbone`` (a folder or hub id with config.json, tokenizer and processor files;
        default ``Qwen/Qwen2-VL-7B-Instruct``, whose weights are NOT downloaded). ``processor`` overrides
        where the tokenizer / chat template / preprocessor config come from (default: ``backbone``).
        ``device_map`` (``"auto"``, ``"balanced"``, ``"sequential"`` or a dict; ``max_memory`` per device,
        ``offload_folder`` for modules sent to disk) spreads the loaded backbone over the GPUs, the CPU and disk
        (:meth:`~mmalign.rewards.qwen2vl.Qwen2VLRewardModel.place`); ``device`` is then unused."""
        path = resolve_file(weights, default_repo=HPSV3_REPO, filename=HPSV3_FILE, what="HPSv3 checkpoint")
        folder = resolve_backbone_dir(backbone, HPSV3_BACKBONE)
        torch_dtype = resolve_dtype(auto_dtype(dtype, placed_device(device, device_map)))
        architecture = load_backbone_config(folder)
        check_fits(
            f"HPSv3 ({path})",
            lambda: build_backbone(architecture, torch_dtype),
            torch_dtype,
            device if device_map is None else "cpu",
            path,
        )
        raw = load_state_dict(path, unwrap=("model", "state_dict"))
        state_dict = convert_reference_state_dict(raw, source=str(path))
        text_folder = resolve_backbone_dir(processor, HPSV3_BACKBONE) if processor is not None else folder
        config = load_backbone_config(folder, checkpoint_vocab_size(state_dict, str(path)))
        model = build_backbone(config, torch_dtype)
        head = build_hpsv3_head(state_dict, config.text_config.hidden_size, str(path))
        tokenizer = load_tokenizer(text_folder, (REWARD_TOKEN,))
        mean, std = read_pixel_stats(text_folder)
        reward = cls(model, head, tokenizer, load_chat_template(text_folder, tokenizer), mean, std)
        load_reward_weights(reward, state_dict, str(path))
        reward.rm_head.float()
        if device_map is not None:
            return reward.place(device_map, max_memory, offload_folder)
        return reward.to(device=device)

    def _apply(self, fn, recurse=True):  # keep the head in float32 (the reference's rm_head.to(float32))
        result = super()._apply(fn, recurse)
        for parameter in self.rm_head.parameters():
            parameter.data = parameter.data.float()
        return result

    @property
    def dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

    # preprocessing ----------------------------------------------------------------------------------------
    def target_size(self, height: int, width: int) -> tuple[int, int]:
        return smart_resize(height, width, self.factor, self.image_pixels, self.image_pixels)

    def preprocess_reference(self, image: Image.Image) -> torch.Tensor:
        """The reference path: RGB, PIL bicubic to the smart size, rescale, normalise -> ``[3, h, w]``."""
        height, width = self.target_size(image.height, image.width)
        return normalize(image_to_tensor(pil_resize(image, height, width)), self.image_mean, self.image_std)

    def preprocess_tensor(self, images: torch.Tensor) -> torch.Tensor:
        """Differentiable: ``[B, 3, H, W]`` in [0, 1] -> antialiased bicubic to the smart size, normalised."""
        height, width = self.target_size(images.shape[-2], images.shape[-1])
        return normalize(resize_tensor(images.float(), height, width), self.image_mean, self.image_std)

    # scoring ----------------------------------------------------------------------------------------------
    def score_frames(self, pixels: Sequence[torch.Tensor], prompts: Sequence[str]) -> HPSv3Scores:
        """Preprocessed images (each ``[3, h, w]``, sizes may differ) -> ``mu`` and ``sigma``."""
        out = self.head_outputs([build_hpsv3_text(p) for p in prompts], [p.unsqueeze(0) for p in pixels], "image")
        return HPSv3Scores(out[:, 0, 0], out[:, 0, 1])

    def score_pixels(self, pixels: torch.Tensor | Sequence[torch.Tensor], prompts: list[str]) -> torch.Tensor:
        return self.score_frames(list(pixels), prompts).mu

    def score_detailed(
        self,
        images: torch.Tensor | Sequence[ImageLike],
        prompts: str | Sequence[str] | None = None,
        batch_size: int = 8,
    ) -> HPSv3Scores:
        """``mu`` and ``sigma`` of tensors (differentiable) or files / Pillow images (reference preprocessing)."""
        if isinstance(images, torch.Tensor):
            images = check_image_batch(images)
            prompts = broadcast_prompts(prompts, images.shape[0])
            return self.score_frames(list(self.preprocess_tensor(images.to(self.device))), prompts)
        if isinstance(images, (Image.Image, str, os.PathLike)):
            images = [images]
        prompts = broadcast_prompts(prompts, len(images))
        mus, sigmas = [], []
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                chunk = [self.preprocess_reference(self._decode(item)) for item in images[start : start + batch_size]]
                result = self.score_frames(chunk, prompts[start : start + batch_size])
                mus.append(result.mu.cpu())
                sigmas.append(result.sigma.cpu())
        return HPSv3Scores(torch.cat(mus), torch.cat(sigmas))

    @torch.no_grad()
    def score_images(
        self, images: Sequence[ImageLike], prompts: str | Sequence[str] | None = None, batch_size: int = 8
    ) -> torch.Tensor:
        return self.score_detailed(list(images), prompts, batch_size).mu

    def score_tensor(self, images: torch.Tensor, prompts: str | Sequence[str] | None = None) -> torch.Tensor:
        return self.score_detailed(images, prompts).mu
