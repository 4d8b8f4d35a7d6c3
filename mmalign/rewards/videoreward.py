# ruff: noqa: E501, W291  (the reference prompts are data: their long lines and trailing spaces are kept verbatim)
"""VideoReward (Liu et al. 2025, "Improving Video Generation with Human Feedback", arXiv:2501.13918;
KwaiVGI/VideoAlign, now KlingAIResearch/VideoAlign; weights ``KlingTeam/VideoReward``, formerly
``KwaiVGI/VideoReward``): a Qwen2-VL-2B-Instruct reward scoring a video's visual quality (VQ), motion quality
(MQ) and text alignment (TA); ``Overall = VQ + MQ + TA`` after per-dimension normalisation.

Read from the VideoAlign repository (``inference.py``, ``trainer.py::Qwen2VLRewardModelBT``,
``train_reward.py::create_model_and_processor``, ``prompt_template.py``, ``vision_process.py``, ``data.py``,
``utils.py::load_model_from_checkpoint``) and written here:

* the checkpoint folder holds ``model_config.json`` (``data_config``, ``model_config``, ``peft_lora_config``,
  ``inference_config``) and ``checkpoint-<step>/`` (the latest step unless ``step=``) with ``model.pth`` (a state
  dict of the peft-wrapped 4.45 class: ``base_model.model.*``, LoRA pairs; LoRA is merged here with
  ``lora_alpha / lora_r``, or ``/ sqrt(r)`` with rsLoRA) and ``tokenizer/`` (Qwen2-VL's with the three reward
  tokens). Every setting below is read from ``model_config.json``; the values named are the code's defaults;
* frames (``sample_type: uniform``): ``n = total / video_fps * fps`` (fps 2) clamped to [4, min(768, total)] and
  rounded to an even number (at most ``total``), indices ``linspace(0, total - 1, n).round()``; or ``num_frames``
  when the config sets it;
* resolution: every frame resized (torchvision bicubic, antialias, on uint8) to qwen-vl-utils' ``smart_resize``
  with ``min_pixels = 128*28*28`` and ``max_pixels = data_config.max_frame_pixels``; then the Qwen2-VL video
  processor (rescale, OpenAI-CLIP mean/std, frame pairs as temporal patches);
* prompt: ``build_prompt(prompt, eval_dim, prompt_template_type)``; the published model uses
  ``detailed_special``, whose text holds ``<|VQ_reward|>``, ``<|MQ_reward|>``, ``<|TA_reward|>``;
* head: ``Linear(H, output_dim, bias=False)`` read at those three tokens (``reward_token: special``), giving
  ``[B, 3]`` (``output_dim`` 1; with 3 the diagonal); the ``last`` variant reads the last non-pad token;
* normalisation (``use_norm=True``): ``(r_d - inference_config[d_mean]) / inference_config[d_std]`` for d in VQ,
  MQ, TA, then ``Overall = VQ + MQ + TA``.

Verified: the formulas above against an independent re-derivation on a tiny model (tests/rewards/
test_videoreward.py). NOT verified here: scores against the VideoAlign code itself (its repository is not a
package; no parity run was made), and the published ``model_config.json`` values (fps, ``max_frame_pixels``,
means and stds, LoRA r/alpha): they are read from the file at load time, never assumed. Only the full
``model.pth`` layout is loaded; the LoRA-only layout (``adapter_model.safetensors`` + ``non_lora_state_dict.pth``
over the base Qwen2-VL weights) is refused with a message. The tensor path (``score_tensor``) resizes float
frames without the uint8 rounding of the file path, and is differentiable.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..errors import WeightsError
from ..hub import load_state_dict, resolve_dir
from ..memory import auto_dtype, placed_device
from ..modalities.image import broadcast_prompts
from ..modalities.video import check_video, probe_video, read_frames
from .base import resolve_dtype
from .lifted import MediaScore
from .qwen2vl import (
    Qwen2VLRewardModel,
    build_backbone,
    check_fits,
    checkpoint_vocab_size,
    convert_reference_state_dict,
    load_backbone_config,
    load_chat_template,
    load_reward_weights,
    load_tokenizer,
    normalize,
    read_pixel_stats,
    resize_tensor,
    resolve_backbone_dir,
    smart_resize,
)

VIDEOREWARD_REPO = "KlingTeam/VideoReward"
VIDEOREWARD_BACKBONE = "Qwen/Qwen2-VL-2B-Instruct"
DIMENSIONS = ("VQ", "MQ", "TA")
REWARD_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
VIDEO_MIN_PIXELS = 128 * 28 * 28
FRAME_FACTOR = 2
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
CHECKPOINT_FILES = (
    "model_config.json",
    "checkpoint-*/model.pth",
    "checkpoint-*/model.safetensors",
    "checkpoint-*/tokenizer/*",
)

# VideoAlign prompt_template.py, verbatim (prompt data).
DIMENSION_DESCRIPTIONS = {
    "VQ": ["visual quality", "the quality of the video in terms of clearness, resolution, brightness, and color"],
    "TA": ["text-to-video alignment", "the alignment between the text prompt and the video content and motion"],
    "MQ": ["motion quality", "the quality of the motion in terms of consistency, smoothness, and completeness"],
    "Overall": [
        "Overall Performance",
        "the overall performance of the video in terms of visual quality, text-to-video alignment, and motion quality",
    ],
}
SIMPLE_PROMPT = """
Please evaluate the {dimension_name} of a generated video. Consider {dimension_description}.
The text prompt used for generation is "{text_prompt}".
"""
DETAILED_PROMPT_WITH_SPECIAL_TOKEN = """
You are tasked with evaluating a generated video based on three distinct criteria: Visual Quality, Motion Quality, and Text Alignment. Please provide a rating from 0 to 10 for each of the three categories, with 0 being the worst and 10 being the best. Each evaluation should be independent of the others.

**Visual Quality:**  
Evaluate the overall visual quality of the video, with a focus on static factors. The following sub-dimensions should be considered:
- **Reasonableness:** The video should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.
- **Clarity:** Evaluate the sharpness and visibility of the video. The image should be clear and easy to interpret, with no blurring or indistinct areas.
- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).
- **Aesthetic and Creativity:** Assess the artistic aspects of the video, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.
- **Safety:** The video should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. 

Please provide the ratings of Visual Quality: <|VQ_reward|>
END

**Motion Quality:**  
Assess the dynamic aspects of the video, with a focus on dynamic factors. Consider the following sub-dimensions:
- **Stability:** Evaluate the continuity and stability between frames. There should be no sudden, unnatural jumps, and the video should maintain stable attributes (e.g., no fluctuating colors, textures, or missing body parts).
- **Naturalness:** The movement should align with physical laws and be realistic. For example, clothing should flow naturally with motion, and facial expressions should change appropriately (e.g., blinking, mouth movements).
- **Aesthetic Quality:** The movement should be smooth and fluid. The transitions between different motions or camera angles should be seamless, and the overall dynamic feel should be visually pleasing.
- **Fusion:** Ensure that elements in motion (e.g., edges of the subject, hair, clothing) blend naturally with the background, without obvious artifacts or the feeling of cut-and-paste effects.
- **Clarity of Motion:** The video should be clear and smooth in motion. Pay attention to any areas where the video might have blurry or unsteady sections that hinder visual continuity.
- **Amplitude:** If the video is largely static or has little movement, assign a low score for motion quality.

Please provide the ratings of Motion Quality: <|MQ_reward|>
END

**Text Alignment:**  
Assess how well the video matches the textual prompt across the following sub-dimensions:
- **Subject Relevance** Evaluate how accurately the subject(s) in the video (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.
- **Motion Relevance:** Evaluate if the dynamic actions (e.g., gestures, posture, facial expressions like talking or blinking) align with the described prompt. The motion should match the prompt in terms of type, scale, and direction.
- **Environment Relevance:** Assess whether the background and scene fit the prompt. This includes checking if real-world locations or scenes are accurately represented, though some stylistic adaptation is acceptable.  
- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the video adheres to this style.
- **Camera Movement Relevance:** Check if the camera movements (e.g., following the subject, focus shifts) are consistent with the expected behavior from the prompt.

Textual prompt - {text_prompt}
Please provide the ratings of Text Alignment: <|TA_reward|>
END
"""  # noqa: W291, E501 - trailing spaces and long lines are part of the reference prompt


def build_prompt(prompt: str, dimension: str | Sequence[str], template_type: str) -> str:
    """VideoAlign ``build_prompt`` for the templates a reward can use (``none``, ``simple``,
    ``detailed_special``)."""
    if template_type == "none":
        return prompt
    if template_type == "detailed_special":
        return DETAILED_PROMPT_WITH_SPECIAL_TOKEN.format(text_prompt=prompt)
    if template_type == "simple":
        if isinstance(dimension, (list, tuple)) and len(dimension) > 1:
            names = ", ".join(DIMENSION_DESCRIPTIONS[d][0] for d in dimension)
            name, description = f"overall performance({names})", "the overall performance of the video"
        else:
            key = dimension[0] if isinstance(dimension, (list, tuple)) else dimension
            name, description = DIMENSION_DESCRIPTIONS[key]
        return SIMPLE_PROMPT.format(dimension_name=name, dimension_description=description, text_prompt=prompt)
    raise ValueError(f"prompt template {template_type!r} is not supported (none, simple, detailed_special)")


# -- frames ---------------------------------------------------------------------------------------------------
def _round_even(value: float) -> int:
    return round(value / FRAME_FACTOR) * FRAME_FACTOR


def sample_count(total_frames: int, video_fps: float, fps: float | None = 2.0, num_frames: int | None = None) -> int:
    """VideoAlign ``smart_nframes``: how many frames the model sees."""
    if num_frames is not None:
        count = _round_even(num_frames)
    else:
        low = math.ceil(FPS_MIN_FRAMES / FRAME_FACTOR) * FRAME_FACTOR
        high = math.floor(min(FPS_MAX_FRAMES, total_frames) / FRAME_FACTOR) * FRAME_FACTOR
        count = total_frames / video_fps * fps
        count = _round_even(min(max(count, low), high))
    count = min(count, total_frames)
    if not FRAME_FACTOR <= count <= total_frames:
        raise ValueError(f"a video of {total_frames} frames is too short: need at least {FRAME_FACTOR}")
    return count


def sample_indices(total_frames: int, video_fps: float, fps: float | None = 2.0, num_frames: int | None = None):
    """Uniform indices ``linspace(0, total - 1, n).round()`` (torch rounding: half to even)."""
    count = sample_count(total_frames, video_fps, fps, num_frames)
    return torch.linspace(0, total_frames - 1, count).round().long().tolist()


def frame_size(height: int, width: int, max_pixels: int, min_pixels: int = VIDEO_MIN_PIXELS) -> tuple[int, int]:
    return smart_resize(height, width, 28, min_pixels, max_pixels)


def resize_uint8_frames(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    """uint8 ``[T, H, W, 3]`` -> uint8 ``[T, 3, h, w]`` by torchvision bicubic antialias (the file path)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    return TF.resize(video, [height, width], interpolation=InterpolationMode.BICUBIC, antialias=True)


@dataclass
class VideoRewardScores:
    """Normalised (or raw) ``VQ``, ``MQ``, ``TA`` and ``Overall`` ``[B]`` each."""

    VQ: torch.Tensor
    MQ: torch.Tensor
    TA: torch.Tensor
    Overall: torch.Tensor

    def get(self, dimension: str) -> torch.Tensor:
        return getattr(self, dimension)


@dataclass
class DecodedClip:
    """uint8 frames ``[T, H, W, 3]`` at source ``indices`` of ``num_frames`` (rate ``fps``)."""

    frames: np.ndarray
    indices: list[int]
    num_frames: int
    fps: float


def _latest_checkpoint(folder: Path, step: int | None) -> Path:
    found = {}
    for path in folder.glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match and path.is_dir():
            found[int(match[1])] = path
    if not found:
        raise WeightsError(f"{folder}: no checkpoint-<step>/ folder (VideoReward's layout)")
    if step is not None and step != -1:
        if step not in found:
            raise WeightsError(f"{folder}: no checkpoint-{step}/ (found steps {sorted(found)})")
        return found[step]
    return found[max(found)]


class VideoAlignReward(Qwen2VLRewardModel):
    """VideoReward on transformers 5's Qwen2-VL; see the module docstring. ``dimension`` picks what
    :meth:`score` returns (``Overall`` by default); :meth:`score_detailed` returns all four."""

    name = "videoreward"
    modality: ClassVar[str] = "video"
    reward_tokens = REWARD_TOKENS
    unit: ClassVar[str] = "frame"
    #: how a clip's score is formed, as ``mmalign score`` records it: by the model over the sampled frames at once
    aggregate: ClassVar[str] = "native"

    def __init__(
        self,
        *args: Any,
        settings: Mapping[str, Any] | None = None,
        dimension: str = "Overall",
        use_norm: bool = True,
        **kwargs: Any,
    ):
        settings = dict(settings or {})
        data = settings.get("data_config", {})
        model = settings.get("model_config", {})
        self.fps = data.get("fps", 2.0)
        self.num_frames = data.get("num_frames")
        self.max_frame_pixels = int(data.get("max_frame_pixels", 240 * 320))
        self.eval_dim = data.get("eval_dim", list(DIMENSIONS))
        self.template = data.get("prompt_template_type", "detailed_special")
        if data.get("sample_type", "uniform") != "uniform":
            raise WeightsError(f"sample_type {data.get('sample_type')!r} is not supported (uniform only)")
        self.reward_token = model.get("reward_token", "special")
        self.output_dim = int(model.get("output_dim", 1))
        if self.reward_token != "special":
            self.reward_tokens = ()
        super().__init__(*args, **kwargs)
        self.inference_config = settings.get("inference_config")
        if dimension not in (*DIMENSIONS, "Overall"):
            raise ValueError(f"unknown VideoReward dimension {dimension!r}; use VQ, MQ, TA or Overall")
        self.dimension = dimension
        self.use_norm = use_norm
        self.name = "videoreward" if dimension == "Overall" else f"videoreward-{dimension.lower()}"
        self.score_scale = (
            f"VideoReward {dimension}: "
            + (
                "normalised by the release's means/stds (about N(0,1) per dimension; Overall their sum)"
                if use_norm and self.inference_config
                else "raw head output (unbounded)"
            )
            + ", higher is better"
        )

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
        dimension: str = "Overall",
        step: int | None = None,
        use_norm: bool = True,
        **_: Any,
    ) -> VideoAlignReward:
        """Load the VideoReward folder (local or hub id, default ``KlingTeam/VideoReward``: model_config.json +
        checkpoint-<step>/model.pth + tokenizer). ``backbone``: the Qwen2-VL folder or hub id whose config /
        processor files give the architecture (default: ``model_config.model_name_or_path``,
        ``Qwen/Qwen2-VL-2B-Instruct``; its weights are not needed). ``processor``: a tokenizer folder overriding
        the checkpoint's ``tokenizer/``.
        ``device_map`` (``"auto"``, ``"balanced"``, ``"sequential"`` or a dict; ``max_memory`` per device,
        ``offload_folder`` for modules sent to disk) spreads the loaded backbone over the GPUs, the CPU and disk
        (:meth:`~mmalign.rewards.qwen2vl.Qwen2VLRewardModel.place`); ``device`` is then unused."""
        folder = resolve_dir(
            weights, default_repo=VIDEOREWARD_REPO, what="VideoReward checkpoint", allow_patterns=CHECKPOINT_FILES
        )
        config_path = folder / "model_config.json"
        if not config_path.is_file():
            raise WeightsError(f"{folder}: no model_config.json (VideoReward's layout)")
        settings = json.loads(config_path.read_text())
        checkpoint = _latest_checkpoint(folder, step)
        files = [checkpoint / "model.safetensors", checkpoint / "model.pth"]
        path = next((f for f in files if f.is_file()), None)
        if path is None:
            lora_only = (checkpoint / "adapter_model.safetensors").is_file()
            hint = (
                " (a LoRA-only checkpoint over base weights: not supported, merge it into model.pth)"
                if lora_only
                else ""
            )
            raise WeightsError(f"{checkpoint}: no model.pth or model.safetensors{hint}")
        base_name = settings.get("model_config", {}).get("model_name_or_path") or VIDEOREWARD_BACKBONE
        backbone_folder = resolve_backbone_dir(backbone if backbone is not None else base_name, VIDEOREWARD_BACKBONE)
        torch_dtype = resolve_dtype(auto_dtype(dtype, placed_device(device, device_map)))
        architecture = load_backbone_config(backbone_folder)
        check_fits(
            f"VideoReward ({path})", lambda: build_backbone(architecture, torch_dtype), torch_dtype, device, path
        )
        raw = load_state_dict(path)
        lora = settings.get("peft_lora_config", {})
        scaling = None
        if lora.get("lora_enable"):
            r, alpha = float(lora.get("lora_r", 16)), float(lora.get("lora_alpha", 32))
            scaling = alpha / math.sqrt(r) if lora.get("use_rslora") else alpha / r
        state_dict = convert_reference_state_dict(raw, lora_scaling=scaling, source=str(path))
        if processor is not None:
            text_folder = resolve_backbone_dir(processor, VIDEOREWARD_BACKBONE)
        elif (checkpoint / "tokenizer").is_dir():
            text_folder = checkpoint / "tokenizer"
        else:
            text_folder = backbone_folder
        special = settings.get("model_config", {}).get("use_special_tokens", True)
        tokenizer = load_tokenizer(text_folder, REWARD_TOKENS if special else ())
        config = load_backbone_config(backbone_folder, checkpoint_vocab_size(state_dict, str(path)))
        model = build_backbone(config, torch_dtype)
        if "rm_head.weight" not in state_dict:
            raise WeightsError(f"{path}: no rm_head.weight (VideoReward's Linear head)")
        head = nn.Linear(config.text_config.hidden_size, state_dict["rm_head.weight"].shape[0], bias=False)
        try:
            template = load_chat_template(text_folder, tokenizer)
        except WeightsError:
            template = load_chat_template(backbone_folder, tokenizer)
        mean, std = read_pixel_stats(backbone_folder)
        reward = cls(
            model, head, tokenizer, template, mean, std, settings=settings, dimension=dimension, use_norm=use_norm
        )
        load_reward_weights(reward, state_dict, str(path))
        if device_map is not None:
            return reward.place(device_map, max_memory, offload_folder)
        return reward.to(device=device)

    # -- heads ----------------------------------------------------------------------------------------------
    def raw_rewards(self, frames: Sequence[torch.Tensor], prompts: Sequence[str]) -> torch.Tensor:
        """Normalised frames per video (``[T, 3, h, w]``) -> raw ``[B, 3]`` (VQ, MQ, TA)."""
        texts = [build_prompt(p, self.eval_dim, self.template) for p in prompts]
        if self.reward_token == "special":
            out = self.head_outputs(texts, frames, "video")  # [B, 3, output_dim]
            return out.diagonal(dim1=1, dim2=2) if self.output_dim == 3 else out.reshape(len(texts), -1)
        if self.reward_token == "last":
            return self._last_token_outputs(texts, frames)
        raise WeightsError(f"reward_token {self.reward_token!r} is not supported (special, last)")

    def _last_token_outputs(self, texts: Sequence[str], frames: Sequence[torch.Tensor]) -> torch.Tensor:
        from .qwen2vl import patchify

        pieces = [patchify(f, self.patch_size, self.merge_size, self.temporal_patch_size) for f in frames]
        chats = [self.chat_text(t, "video") for t in texts]
        ids, mask = self.tokenize(chats, [g for _, g in pieces], ["video"] * len(texts))
        hidden = self.hidden_states(
            ids, mask, torch.cat([p for p, _ in pieces]), torch.stack([g for _, g in pieces]), "video"
        )
        last = mask.sum(dim=1).to(hidden.device) - 1
        return self.rm_head(hidden[torch.arange(len(texts), device=hidden.device), last].float())

    def normalise(self, raw: torch.Tensor) -> VideoRewardScores:
        """``[B, 3]`` raw -> per-dimension ``(r - mean) / std`` (when the release gives them) and Overall."""
        values = {}
        for index, dim in enumerate(DIMENSIONS):
            value = raw[:, index]
            if self.use_norm and self.inference_config:
                value = (value - self.inference_config[f"{dim}_mean"]) / self.inference_config[f"{dim}_std"]
            values[dim] = value
        return VideoRewardScores(**values, Overall=values["VQ"] + values["MQ"] + values["TA"])

    # -- tensors ----------------------------------------------------------------------------------------------
    def preprocess_video_tensor(self, video: torch.Tensor, video_fps: float | None = None) -> torch.Tensor:
        """``[T, 3, H, W]`` in [0, 1] -> sampled (when ``video_fps`` is given), resized, normalised frames."""
        if video_fps is not None:
            video = video[sample_indices(video.shape[0], video_fps, self.fps, self.num_frames)]
        height, width = frame_size(video.shape[-2], video.shape[-1], self.max_frame_pixels)
        return normalize(resize_tensor(video.float(), height, width), self.image_mean, self.image_std)

    def score_detailed(
        self, videos: torch.Tensor, prompts: str | Sequence[str] | None = None, video_fps: float | None = None
    ) -> VideoRewardScores:
        """Differentiable scores of ``[B, T, 3, H, W]`` in [0, 1]. With ``video_fps`` (the clip's rate) frames are
        sampled as the reference samples a file; without it all ``T`` frames are used (already sampled)."""
        videos = check_video(videos)
        prompts = broadcast_prompts(prompts, videos.shape[0])
        frames = [self.preprocess_video_tensor(v.to(self.device), video_fps) for v in videos]
        return self.normalise(self.raw_rewards(frames, prompts))

    def score_tensor(self, videos: torch.Tensor, prompts: str | Sequence[str] | None = None, **kwargs: Any):
        return self.score_detailed(videos, prompts, **kwargs).get(self.dimension)

    def forward(self, videos: torch.Tensor, prompts: str | Sequence[str] | None = None, **kwargs: Any):
        return self.score_tensor(videos, prompts, **kwargs)

    # -- files ------------------------------------------------------------------------------------------------
    @property
    def variant(self) -> str:
        sampling = f"{self.num_frames}f" if self.num_frames is not None else f"{self.fps:g}fps"
        return f"{self.dimension}/{sampling}/{self.max_frame_pixels}px" + ("" if self.use_norm else "/raw")

    def decode(self, source: str | os.PathLike) -> DecodedClip:
        info = probe_video(source)
        indices = sample_indices(info.num_frames, info.fps, self.fps, self.num_frames)
        frames, indices, info = read_frames(source, indices, max_pixels=None)
        return DecodedClip(frames, list(indices), info.num_frames, info.fps)

    def preprocess_decoded(self, clip: DecodedClip) -> torch.Tensor:
        """The reference's file path: uint8 bicubic-antialias resize, then rescale and normalise."""
        height, width = frame_size(clip.frames.shape[1], clip.frames.shape[2], self.max_frame_pixels)
        resized = resize_uint8_frames(clip.frames, height, width).float() / 255.0
        return normalize(resized, self.image_mean, self.image_std)

    @torch.no_grad()
    def score_clips(
        self, decoded: Sequence[DecodedClip], prompts: Sequence[str], batch_size: int = 4
    ) -> VideoRewardScores:
        parts = []
        for start in range(0, len(decoded), batch_size):
            chunk = [self.preprocess_decoded(c) for c in decoded[start : start + batch_size]]
            parts.append(self.raw_rewards(chunk, prompts[start : start + batch_size]).float().cpu())
        return self.normalise(torch.cat(parts))

    def score_decoded(self, decoded: Sequence[DecodedClip], prompts: Sequence[str], batch_size: int = 4):
        """Scored decoded clips as :class:`~mmalign.rewards.lifted.MediaScore` (for ``mmalign score``)."""
        prompts = broadcast_prompts(list(prompts), len(decoded))
        scores = self.score_clips(decoded, prompts, batch_size)
        results = []
        for index, clip in enumerate(decoded):
            extra = {dim: float(scores.get(dim)[index]) for dim in (*DIMENSIONS, "Overall")}
            results.append(
                MediaScore(
                    total=float(scores.get(self.dimension)[index]),
                    units=[],
                    unit="frame",
                    positions=[float(i) for i in clip.indices],
                    extra={"dimensions": extra, "num_frames": clip.num_frames},
                )
            )
        return results

    def score_files(
        self, sources: Sequence[str | os.PathLike], prompts: str | Sequence[str] | None = None, batch_size: int = 4
    ) -> VideoRewardScores:
        prompts = broadcast_prompts(prompts, len(sources))
        return self.score_clips([self.decode(s) for s in sources], prompts, batch_size)

    def score(self, media: Any, prompts: str | Sequence[str] | None = None, batch_size: int = 4) -> torch.Tensor:
        """Scores ``[B]`` of the chosen dimension: differentiable on tensors, the reference path on files."""
        if isinstance(media, torch.Tensor):
            return self.score_tensor(media, prompts)
        if isinstance(media, (str, os.PathLike)):
            media = [media]
        return self.score_files(list(media), prompts, batch_size).get(self.dimension)
