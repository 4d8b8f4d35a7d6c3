"""VQAScore (Lin et al. 2024, "Evaluating Text-to-Visual Generation with Image-to-Text Generation",
arXiv:2404.01291; linzhiqiu/t2v_metrics) on a Qwen2.5-VL or Qwen2-VL backbone: the probability that the VLM
answers "Yes" to ``Does this figure show "{prompt}"? Please answer Yes or No.`` about an image or a video.

Read from t2v_metrics (GitHub ``main``, v3.1: ``t2v_metrics/models/vqascore_models/qwen2vl_model.py``,
``Qwen2VLModel.forward``) and qwen-vl-utils 0.0.14 (``vision_process.py``), and written here:

* question: ``question_template.format(prompt)`` with ``'Does this figure show "{}"? Please answer Yes or No.'``
  (capital Yes/No in the Qwen class; the PyPI wheel t2v-metrics 3.0 used ``'Does this image show "{}"?'``,
  and CLIP-FlanT5 used ``... Please answer yes or no.``: both are a ``question_template=`` away); answer ``Yes``;
* one user turn ``[image|video, question]`` through the model's chat template with the generation prompt
  (the Qwen-VL default system turn included);
* readout: ``model.generate(max_new_tokens=1, do_sample=False, temperature=1.0, output_scores=True)`` and
  ``softmax(scores / temperature)[id("Yes")]``: the probability of the answer's token at the first generated
  position. ``output_scores`` are the PROCESSED logits: with greedy decoding the only processor left from the
  Qwen-VL ``generation_config.json`` is its ``repetition_penalty`` (logit / p when positive, * p when negative,
  for every token id that occurs in the prompt). That is reproduced: ``repetition_penalty`` is read from the
  model folder's ``generation_config.json`` (1.0 when absent; pass ``repetition_penalty=1.0`` for the plain
  P(Yes)). A multi-token answer is scored, as t2v_metrics does with one new token, by its first token only;
  t2v_metrics raises when the greedy token is EOS/BOS/PAD, this module does not;
* image (files): RGB (RGBA over white), PIL bicubic to ``smart_resize(h, w, 28, 4*28*28, 16384*28*28)``, then
  the processor (rescale, OpenAI-CLIP mean/std, 14-px patches; ``do_resize=False``);
* video (files): ``fps = 8`` (t2v_metrics' ``fps`` for the qwen models), ``n = total / video_fps * fps`` clamped
  to ``[4, min(768, total)]`` and floored to an even count, indices ``linspace(0, total - 1, n).round()``;
  frames resized (torchvision bicubic, antialias, on uint8) to ``smart_resize`` with ``min_pixels = 128*28*28``
  and ``max_pixels = min(360*420, max(min(768*28*28, 0.9*128000*28*28 / n * 2), 1.05*min_pixels))``; for
  Qwen2.5-VL the temporal M-RoPE step is ``second_per_grid_ts = 2 / sample_fps`` with
  ``sample_fps = n / total * video_fps`` (qwen-vl-utils' ``video_kwargs``, passed to the processor by
  t2v_metrics main; the 3.0 wheel does not pass it, so its processor uses its default 2 fps, i.e.
  ``second_per_grid_ts = 1``: ``video_position_fps=2.0`` reproduces that);
* the decoder runs with 3-D M-RoPE positions computed as the releases' (transformers 4.x) ``get_rope_index``
  does (:func:`mrope_positions`): transformers 5.24's own version starts the text after a video at a different
  position when the video's temporal extent passes its spatial one (long videos, or the 3.0 wheel's 2 fps step),
  which the parity run showed (up to 1.5e-3 in P(Yes) on a tiny model).

Scale: a probability in [0, 1], higher is better. Batches are right-padded and read at each item's last real
token, so a batch scores as its items one by one (t2v_metrics scores one at a time).

Differentiable: ``score_tensor`` on ``[B, 3, H, W]`` images or ``[B, T, 3, H, W]`` videos resizes with torch's
antialiased bicubic (float, no uint8 rounding) instead of PIL / torchvision-on-uint8, then the same patches and
model: gradients reach the pixels. ``score`` on files / Pillow images is the reference path (no gradient).
Videos as tensors are used as given (all ``T`` frames) unless ``video_fps`` is passed, when they are sampled as
files are; with all frames the Qwen2.5-VL temporal step uses qwen-vl-utils' default 2 fps for frame lists.

Verified (benchmarks/parity_vqascore.py, results/parity_vqascore.json): on tiny random Qwen2.5-VL and Qwen2-VL
releases, images and lossless videos, equal to t2v_metrics' own class to 4e-8 (GitHub main 6ecb74f; the 3.0
wheel with ``video_position_fps=2.0``), each run in its environment (transformers 4.49, qwen-vl-utils 0.0.14,
decord). Not verified: real weights (no download here), and compressed videos, which t2v_metrics decodes with
decord or torchcodec and this module with PyAV (the same indices; YUV -> RGB conversion may differ).

Not done: Qwen3-VL (t2v_metrics' ``qwen3vl_model.py``; transformers 5.24 has the classes, but its 16-px patches
and timestamps need their own processor path).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..errors import MediaError, StateDictMismatchError, WeightsError
from ..memory import auto_dtype, check_offload, infer_device_map, placed_device
from ..modalities.image import broadcast_prompts, open_image
from ..modalities.video import check_video, probe_video, read_frames
from .base import ImageLike, Reward, resolve_dtype
from .lifted import MediaScore
from .qwen2vl import (
    check_fits,
    image_to_tensor,
    load_chat_template,
    normalize,
    patchify,
    read_pixel_stats,
    resize_tensor,
)

VQASCORE_REPO = "Qwen/Qwen2.5-VL-7B-Instruct"  # t2v_metrics' default 'qwen2.5-vl-7b'
QUESTION_TEMPLATE = 'Does this figure show "{}"? Please answer Yes or No.'
ANSWER_TEMPLATE = "Yes"
# qwen-vl-utils 0.0.14 (image_patch_size 14, merge 2 -> factor 28)
IMAGE_MIN_PIXELS = 4 * 28 * 28
IMAGE_MAX_PIXELS = 16384 * 28 * 28
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_FRAME_MAX_PIXELS = 768 * 28 * 28
VIDEO_TOTAL_PIXELS = 128000 * 28 * 28 * 0.9
VIDEO_MAX_PIXELS = 360 * 420  # t2v_metrics' load_images
VIDEO_FPS = 8.0  # t2v_metrics' QWEN2_VL_MODELS[...]['fps']
FRAME_LIST_FPS = 2.0  # qwen-vl-utils' sample_fps for a list of frames
FRAME_FACTOR = 2
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")


def _smart_resize(height: int, width: int, factor: int, min_pixels: float, max_pixels: float) -> tuple[int, int]:
    """qwen-vl-utils 0.0.14 ``smart_resize`` (float pixel bounds allowed, as it computes them)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.1f} exceeds 200")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def image_size(height: int, width: int, factor: int = 28) -> tuple[int, int]:
    return _smart_resize(height, width, factor, IMAGE_MIN_PIXELS, IMAGE_MAX_PIXELS)


def video_frame_count(total_frames: int, video_fps: float, fps: float = VIDEO_FPS) -> int:
    """qwen-vl-utils 0.0.14 ``smart_nframes`` with ``fps``: clamp, then floor to an even count."""
    low = math.ceil(FPS_MIN_FRAMES / FRAME_FACTOR) * FRAME_FACTOR
    high = math.floor(min(FPS_MAX_FRAMES, total_frames) / FRAME_FACTOR) * FRAME_FACTOR
    count = total_frames / video_fps * fps
    count = min(min(max(count, low), high), total_frames)
    count = math.floor(count / FRAME_FACTOR) * FRAME_FACTOR
    if not FRAME_FACTOR <= count <= total_frames:
        raise ValueError(f"a video of {total_frames} frame(s) is too short: need at least {FRAME_FACTOR}")
    return count


def video_indices(total_frames: int, video_fps: float, fps: float = VIDEO_FPS) -> list[int]:
    count = video_frame_count(total_frames, video_fps, fps)
    return torch.linspace(0, total_frames - 1, count).round().long().tolist()


def video_size(
    height: int, width: int, num_frames: int, max_pixels: float = VIDEO_MAX_PIXELS, factor: int = 28
) -> tuple[int, int]:
    """qwen-vl-utils ``fetch_video``'s frame size for ``num_frames`` sampled frames."""
    limit = max(
        min(VIDEO_FRAME_MAX_PIXELS, VIDEO_TOTAL_PIXELS / num_frames * FRAME_FACTOR), int(VIDEO_MIN_PIXELS * 1.05)
    )
    return _smart_resize(height, width, factor, VIDEO_MIN_PIXELS, min(max_pixels, limit))


@dataclass
class DecodedVideo:
    """uint8 frames ``[T, H, W, 3]`` at source ``indices`` of ``num_frames`` (rate ``fps``)."""

    frames: np.ndarray
    indices: list[int]
    num_frames: int
    fps: float

    @property
    def sample_fps(self) -> float:
        return len(self.indices) / max(self.num_frames, 1e-6) * self.fps


@dataclass
class VisualInput:
    """One preprocessed item: normalised frames ``[T, 3, h, w]`` (an image is ``T = 1``), its kind and, for a
    video, the sampled frame rate (Qwen2.5-VL's temporal position step)."""

    frames: torch.Tensor
    kind: str
    sample_fps: float | None = None


def _item(index: int, source: Any = None) -> str:
    return f"item {index}" + (f" ({source})" if isinstance(source, (str, os.PathLike)) else "")


class VQAScoreReward(Reward):
    """P("Yes" | media, question) from a Qwen2.5-VL / Qwen2-VL chat model; see the module docstring.

    ``modality`` is ``"image"`` (registered as ``vqascore``) or ``"video"`` (``vqascore-video``): the same
    model, scoring images or whole videos natively (not frame by frame)."""

    name = "vqascore"
    higher_is_better = True
    is_differentiable = True
    aggregate = "native"
    score_scale = "probability of the answer 'Yes' in [0, 1] (VQAScore), higher is better"

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        chat_template: str,
        *,
        modality: str = "image",
        question_template: str = QUESTION_TEMPLATE,
        answer_template: str = ANSWER_TEMPLATE,
        repetition_penalty: float = 1.0,
        temperature: float = 1.0,
        video_fps: float = VIDEO_FPS,
        video_max_pixels: int = VIDEO_MAX_PIXELS,
        video_position_fps: float | None = None,
        image_mean: Sequence[float] = (0.48145466, 0.4578275, 0.40821073),
        image_std: Sequence[float] = (0.26862954, 0.26130258, 0.27577711),
    ):
        super().__init__()
        if modality not in ("image", "video"):
            raise ValueError(f"VQAScore scores images or videos, not {modality!r}")
        if "{}" not in question_template:
            raise ValueError(f"question_template {question_template!r} has no '{{}}' for the prompt")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.modality = modality
        self.name = "vqascore" if modality == "image" else "vqascore-video"
        self.question_template = question_template
        self.answer_template = answer_template
        self.repetition_penalty = float(repetition_penalty)
        self.temperature = float(temperature)
        self.video_fps = float(video_fps)
        self.video_max_pixels = int(video_max_pixels)
        self.video_position_fps = None if video_position_fps is None else float(video_position_fps)
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        config = model.config
        self.model_type = config.model_type
        vision = config.vision_config
        self.patch_size = int(vision.patch_size)
        self.merge_size = int(vision.spatial_merge_size)
        self.temporal_patch_size = int(vision.temporal_patch_size)
        self.image_token_id = int(config.image_token_id)
        self.video_token_id = int(config.video_token_id)
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @property
    def variant(self) -> str:
        penalty = "" if self.repetition_penalty == 1.0 else f"/rp{self.repetition_penalty:g}"
        return f"{self.model_type}/{self.video_fps:g}fps/{self.video_max_pixels}px{penalty}"

    # -- loading ------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        weights: str | os.PathLike | None = None,
        processor: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "fp32",
        modality: str = "image",
        repetition_penalty: float | None = None,
        device_map: str | dict | None = None,
        max_memory: str | dict | None = None,
        offload_folder: str | os.PathLike | None = None,
        **options: Any,
    ) -> VQAScoreReward:
        """Load a Qwen2.5-VL / Qwen2-VL chat model folder or hub id (default ``Qwen/Qwen2.5-VL-7B-Instruct``):
        config.json, safetensors weights, tokenizer, chat template, preprocessor and generation configs.
        ``processor`` overrides where the tokenizer / chat template / pixel statistics come from.
        ``repetition_penalty``: ``None`` reads ``generation_config.json`` (what ``generate`` applies).
        Other keywords (``question_template``, ``answer_template``, ``temperature``, ``video_fps``,
        ``video_max_pixels``, ``video_position_fps``) go to the constructor; ``backbone`` is ignored (the
        weights folder is the model).

        ``device_map`` (``"auto"``, ``"balanced"``, ``"sequential"`` or a dict) spreads the model over the GPUs, the
        CPU and disk as transformers loads it (:func:`mmalign.memory.infer_device_map`, ``max_memory`` per device,
        e.g. ``"0=20GiB,cpu=60GiB"``; modules sent to disk go to ``offload_folder``); ``device`` is then unused."""
        from transformers import (
            AutoConfig,
            AutoTokenizer,
            Qwen2_5_VLForConditionalGeneration,
            Qwen2VLForConditionalGeneration,
        )

        from ..hub import resolve_dir

        options.pop("backbone", None)
        folder = resolve_dir(weights, default_repo=VQASCORE_REPO, what="Qwen-VL model for VQAScore")
        if not (folder / "config.json").is_file():
            raise WeightsError(f"{folder}: no config.json (a Qwen2.5-VL / Qwen2-VL model folder is needed)")
        config = AutoConfig.from_pretrained(str(folder))
        classes = {"qwen2_vl": Qwen2VLForConditionalGeneration, "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration}
        if config.model_type not in classes:
            raise WeightsError(
                f"{folder}: model_type {config.model_type!r} is not supported by VQAScore here "
                f"(use one of {', '.join(MODEL_TYPES)})"
            )
        if not any(folder.glob("*.safetensors")):
            raise WeightsError(f"{folder}: no *.safetensors weights (torch pickles are not loaded)")
        torch_dtype = resolve_dtype(auto_dtype(dtype, placed_device(device, device_map)))
        model_class = classes[config.model_type]
        placing: dict[str, Any] = {}
        if device_map is None:
            check_fits(f"VQAScore ({folder})", lambda: model_class._from_config(config), torch_dtype, device)
        else:
            from accelerate import init_empty_weights

            with init_empty_weights():
                empty = model_class._from_config(config, dtype=torch_dtype)
            placing["device_map"] = infer_device_map(empty, device_map, max_memory, torch_dtype)
            check_offload(placing["device_map"], offload_folder)
            if offload_folder is not None:
                placing["offload_folder"] = str(offload_folder)
        model, info = model_class.from_pretrained(
            str(folder), dtype=torch_dtype, attn_implementation="sdpa", output_loading_info=True, **placing
        )
        tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
        missing = [k for k in info.get("missing_keys", []) if k not in tied]
        unexpected = list(info.get("unexpected_keys", []))
        mismatched = [str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys", [])]
        if missing or unexpected or mismatched:
            raise StateDictMismatchError(str(folder), sorted(missing), sorted(unexpected), mismatched)
        text_folder = (
            folder if processor is None else resolve_dir(processor, default_repo=VQASCORE_REPO, what="tokenizer folder")
        )
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(text_folder), padding_side="right")
        except Exception as error:  # noqa: BLE001 - name the folder
            raise WeightsError(f"{text_folder}: cannot load the tokenizer ({type(error).__name__}: {error})") from error
        if repetition_penalty is None:
            repetition_penalty = read_repetition_penalty(folder)
        mean, std = read_pixel_stats(text_folder)
        reward = cls(
            model,
            tokenizer,
            load_chat_template(text_folder, tokenizer),
            modality=modality,
            repetition_penalty=repetition_penalty,
            image_mean=mean,
            image_std=std,
            **options,
        )
        if placing:
            reward.placement = dict(getattr(model, "hf_device_map", None) or placing["device_map"])
            return reward
        return reward.to(device=device)

    # -- text -----------------------------------------------------------------------------------------------
    def question(self, prompt: str) -> str:
        return self.question_template.format(prompt)

    def chat_text(self, prompt: str, kind: str) -> str:
        messages = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": self.question(prompt)}]}]
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True
        )

    @property
    def answer_token_id(self) -> int:
        ids = self.tokenizer.encode(self.answer_template, add_special_tokens=False)
        if not ids:
            raise ValueError(f"answer {self.answer_template!r} tokenizes to nothing")
        return int(ids[0])

    # -- preprocessing ----------------------------------------------------------------------------------------
    def preprocess_image_file(self, image: Image.Image) -> torch.Tensor:
        """qwen-vl-utils ``fetch_image``: RGB (RGBA over white), PIL bicubic to the smart size; normalised."""
        if image.mode == "RGBA":
            background = Image.new("RGB", image.size, (255, 255, 255))
            background.paste(image, mask=image.split()[3])
            image = background
        image = image.convert("RGB")
        height, width = image_size(image.height, image.width, self.factor)
        resized = image.resize((width, height), Image.BICUBIC)
        return normalize(image_to_tensor(resized), self.image_mean, self.image_std).unsqueeze(0)

    def preprocess_image_tensor(self, image: torch.Tensor) -> torch.Tensor:
        """Differentiable: ``[3, H, W]`` in [0, 1] -> ``[1, 3, h, w]`` normalised at the smart size."""
        height, width = image_size(image.shape[-2], image.shape[-1], self.factor)
        return normalize(resize_tensor(image.float().unsqueeze(0), height, width), self.image_mean, self.image_std)

    def decode(self, source: str | os.PathLike) -> DecodedVideo:
        """Decode the frames t2v_metrics' qwen path samples (``fps`` 8, uniform, even count)."""
        info = probe_video(source)
        try:
            indices = video_indices(info.num_frames, info.fps, self.video_fps)
        except ValueError as error:
            raise MediaError(source, str(error)) from error
        frames, indices, info = read_frames(source, indices, max_pixels=None)
        return DecodedVideo(frames, list(indices), info.num_frames, info.fps)

    def preprocess_video_file(self, clip: DecodedVideo) -> VisualInput:
        """qwen-vl-utils ``fetch_video``: torchvision bicubic antialias on uint8, rescale, normalise."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        count, height, width = clip.frames.shape[:3]
        size = video_size(height, width, count, self.video_max_pixels, self.factor)
        video = torch.from_numpy(np.ascontiguousarray(clip.frames)).permute(0, 3, 1, 2)
        video = TF.resize(video, list(size), interpolation=InterpolationMode.BICUBIC, antialias=True)
        frames = normalize(video.float() / 255.0, self.image_mean, self.image_std)
        return VisualInput(frames, "video", clip.sample_fps)

    def preprocess_video_tensor(self, video: torch.Tensor, video_fps: float | None = None) -> VisualInput:
        """Differentiable: ``[T, 3, H, W]`` in [0, 1] -> sampled (with ``video_fps``), resized, normalised."""
        if video_fps is not None:
            indices = video_indices(video.shape[0], video_fps, self.video_fps)
            video, sample_fps = video[indices], len(indices) / video.shape[0] * video_fps
        else:
            sample_fps = FRAME_LIST_FPS
            if video.shape[0] % FRAME_FACTOR:  # qwen-vl-utils pads a frame list to an even count
                video = torch.cat([video, video[-1:]])
        size = video_size(video.shape[-2], video.shape[-1], video.shape[0], self.video_max_pixels, self.factor)
        frames = normalize(resize_tensor(video.float(), *size), self.image_mean, self.image_std)
        return VisualInput(frames, "video", sample_fps)

    # -- the score --------------------------------------------------------------------------------------------
    def answer_logits(self, inputs: Sequence[VisualInput], prompts: Sequence[str]) -> torch.Tensor:
        """Float32 next-token logits ``[B, V]`` after the generation prompt, for one kind of media."""
        kinds = {item.kind for item in inputs}
        if len(kinds) != 1:
            raise ValueError("a batch must hold only images or only videos")
        kind = kinds.pop()
        device = self.device
        pieces = [patchify(item.frames, self.patch_size, self.merge_size, self.temporal_patch_size) for item in inputs]
        token = "<|image_pad|>" if kind == "image" else "<|video_pad|>"
        texts = []
        for index, ((_, grid), prompt) in enumerate(zip(pieces, prompts)):
            text = self.chat_text(prompt, kind)
            if text.count(token) != 1:
                raise ValueError(f"{_item(index)}: the chat template gave {text.count(token)} {token}, expected 1")
            texts.append(text.replace(token, token * (int(grid.prod()) // self.merge_size**2)))
        encoded = self.tokenizer(texts, padding=True, return_tensors="pt")
        input_ids = encoded["input_ids"].to(device)
        attention_mask = encoded["attention_mask"].to(device)
        patches = torch.cat([p for p, _ in pieces]).to(device=device, dtype=self.dtype)
        grids = torch.stack([g for _, g in pieces]).to(device)
        types = torch.zeros_like(input_ids, dtype=torch.int)
        types[input_ids == self.image_token_id] = 1
        types[input_ids == self.video_token_id] = 2
        backbone = self.model.model
        vision: dict[str, Any]
        if kind == "image":
            vision = {"pixel_values": patches, "image_grid_thw": grids}
            seconds = None
        else:
            vision = {"pixel_values_videos": patches, "video_grid_thw": grids}
            seconds = None
            if self.model_type == "qwen2_5_vl":
                rates = [self.video_position_fps or item.sample_fps for item in inputs]
                seconds = [self.temporal_patch_size / rate for rate in rates]
        tokens_per_second = getattr(self.model.config.vision_config, "tokens_per_second", 1)
        positions = mrope_positions(
            input_ids, attention_mask, grids, types, self.merge_size, seconds, tokens_per_second
        )
        output = backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            use_cache=False,
            mm_token_type_ids=types,
            **vision,
        )
        last = attention_mask.sum(dim=1) - 1
        states = output.last_hidden_state  # (on the last block's device when the model is spread over several)
        hidden = states[torch.arange(len(texts), device=states.device), last.to(states.device)]
        logits = self.model.lm_head(hidden).float().to(device)
        if self.repetition_penalty != 1.0:  # generate's RepetitionPenaltyLogitsProcessor over the prompt ids
            ids = input_ids.masked_fill(attention_mask == 0, self.vocab_size)
            seen = torch.zeros(logits.shape[0], self.vocab_size + 1, dtype=torch.bool, device=device)
            seen.scatter_(1, ids, True)
            penalised = torch.where(logits < 0, logits * self.repetition_penalty, logits / self.repetition_penalty)
            logits = torch.where(seen[:, : self.vocab_size], penalised, logits)
        return logits

    def score_inputs(self, inputs: Sequence[VisualInput], prompts: Sequence[str]) -> torch.Tensor:
        logits = self.answer_logits(inputs, prompts)
        return torch.softmax(logits / self.temperature, dim=-1)[:, self.answer_token_id]

    # -- tensors (differentiable) -------------------------------------------------------------------------------
    def score_tensor(
        self, media: torch.Tensor, prompts: str | Sequence[str] | None = None, video_fps: float | None = None
    ) -> torch.Tensor:
        """``[B, 3, H, W]`` images or ``[B, T, 3, H, W]`` videos in [0, 1] -> P(Yes) ``[B]``, differentiable."""
        if not media.is_floating_point():
            raise ValueError(f"media: expected a float tensor in [0, 1], got dtype {media.dtype}")
        if media.ndim == 4 and self.modality == "image":  # [B, 3, H, W]; a video reward reads [T, 3, H, W]
            if media.shape[1] != 3:
                raise ValueError(f"images: expected a float tensor [B, 3, H, W], got {tuple(media.shape)}")
            batch = []
            for index, image in enumerate(media):
                try:
                    batch.append(self.preprocess_image_tensor(image.to(self.device)))
                except ValueError as error:
                    raise ValueError(f"{_item(index)}: {error}") from error
            inputs = [VisualInput(frames, "image") for frames in batch]
        else:
            videos = check_video(media)
            inputs = []
            for index, video in enumerate(videos):
                try:
                    inputs.append(self.preprocess_video_tensor(video.to(self.device), video_fps))
                except ValueError as error:
                    raise ValueError(f"{_item(index)}: {error}") from error
        prompts = broadcast_prompts(prompts, len(inputs))
        return self.score_inputs(inputs, prompts)

    def forward(self, media: torch.Tensor, prompts: str | Sequence[str] | None = None, **kwargs: Any):
        return self.score_tensor(media, prompts, **kwargs)

    # -- files ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def score_images(
        self, images: Sequence[ImageLike], prompts: str | Sequence[str] | None = None, batch_size: int = 8
    ) -> torch.Tensor:
        """P(Yes) of image files / Pillow images, preprocessed as qwen-vl-utils does."""
        images = list(images)
        prompts = broadcast_prompts(prompts, len(images))
        inputs = []
        for index, item in enumerate(images):
            image = item if isinstance(item, Image.Image) else open_image(item)
            try:
                inputs.append(VisualInput(self.preprocess_image_file(image), "image"))
            except ValueError as error:
                raise ValueError(f"{_item(index, item)}: {error}") from error
        parts = [
            self.score_inputs(inputs[start : start + batch_size], prompts[start : start + batch_size]).cpu()
            for start in range(0, len(inputs), batch_size)
        ]
        return torch.cat(parts) if parts else torch.empty(0)

    @torch.no_grad()
    def score_clips(self, clips: Sequence[DecodedVideo], prompts: Sequence[str], batch_size: int = 4) -> torch.Tensor:
        inputs = [self.preprocess_video_file(clip) for clip in clips]
        parts = [
            self.score_inputs(inputs[start : start + batch_size], prompts[start : start + batch_size]).cpu()
            for start in range(0, len(inputs), batch_size)
        ]
        return torch.cat(parts) if parts else torch.empty(0)

    def score_decoded(self, decoded: Sequence[DecodedVideo], prompts: Sequence[str], batch_size: int = 4):
        """Scored decoded clips as :class:`~mmalign.rewards.lifted.MediaScore` (for ``mmalign score``)."""
        prompts = broadcast_prompts(list(prompts), len(decoded))
        scores = self.score_clips(decoded, prompts, batch_size)
        return [
            MediaScore(
                total=float(score),
                units=[],
                unit="frame",
                positions=[float(i) for i in clip.indices],
                extra={"num_frames": clip.num_frames, "sample_fps": clip.sample_fps},
            )
            for score, clip in zip(scores, decoded)
        ]

    def score_videos(
        self, sources: Sequence[str | os.PathLike], prompts: str | Sequence[str] | None = None, batch_size: int = 4
    ) -> torch.Tensor:
        sources = list(sources)
        prompts = broadcast_prompts(prompts, len(sources))
        clips = []
        for index, source in enumerate(sources):
            try:
                clips.append(self.decode(source))
            except MediaError:
                raise
            except ValueError as error:
                raise ValueError(f"{_item(index, source)}: {error}") from error
        return self.score_clips(clips, prompts, batch_size)

    def score(self, media: Any, prompts: str | Sequence[str] | None = None, batch_size: int = 8) -> torch.Tensor:
        """P(Yes) ``[B]``: differentiable on tensors; on files, images or videos by this reward's modality."""
        if isinstance(media, torch.Tensor):
            return self.score_tensor(media, prompts)
        if isinstance(media, (Image.Image, str, os.PathLike)):
            media = [media]
        if self.modality == "video":
            return self.score_videos(media, prompts, batch_size)
        return self.score_images(media, prompts, batch_size)


def mrope_positions(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    grids: torch.Tensor,
    types: torch.Tensor,
    merge_size: int,
    second_per_grid: Sequence[float] | None = None,
    tokens_per_second: float = 1,
) -> torch.Tensor:
    """Qwen2-VL / Qwen2.5-VL 3-D M-RoPE positions ``[3, B, L]`` of sequences holding ONE image or video each, as
    the releases' code computes them (transformers 4.x ``get_rope_index``, the environment of t2v_metrics):
    text tokens count on from the largest position so far plus one on all three axes; the vision block starts
    at ``s`` (the text before it) with temporal index ``floor(t * second_per_grid[b] * tokens_per_second) + s``
    (Qwen2.5-VL videos, in float32 as 4.x; ``t + s`` otherwise) and row / column ``+ s``; the text after it starts
    at the block's largest position plus one. transformers 5.24 instead restarts that text at
    ``s + max(h, w) / merge``, which differs once a video's temporal extent passes its spatial one.
    Padding positions are 1 (as 4.x)."""
    batch, length = input_ids.shape
    positions = torch.ones(3, batch, length, dtype=torch.long, device=input_ids.device)
    for row in range(batch):
        keep = attention_mask[row].bool()
        vision = (types[row][keep] != 0).nonzero().flatten()
        real = int(keep.sum())
        start, stop = int(vision[0]), int(vision[-1]) + 1
        grid_t, grid_h, grid_w = (int(v) for v in grids[row])
        grid_h, grid_w = grid_h // merge_size, grid_w // merge_size
        if stop - start != grid_t * grid_h * grid_w:
            raise ValueError(f"item {row}: {stop - start} vision tokens for a grid of {grid_t * grid_h * grid_w}")
        device = input_ids.device
        t = torch.arange(grid_t, device=device)
        if second_per_grid is not None:
            seconds = torch.tensor(second_per_grid[row], dtype=torch.float32, device=device)
            t = (t * seconds * tokens_per_second).long()
        t = t.view(-1, 1, 1).expand(-1, grid_h, grid_w).flatten()
        h = torch.arange(grid_h, device=device).view(1, -1, 1).expand(grid_t, -1, grid_w).flatten()
        w = torch.arange(grid_w, device=device).view(1, 1, -1).expand(grid_t, grid_h, -1).flatten()
        block = torch.stack([t, h, w]) + start
        after = torch.arange(real - stop, device=device) + int(block.max()) + 1
        pieces = [torch.arange(start, device=device).expand(3, -1), block, after.expand(3, -1)]
        where = keep.nonzero().flatten()
        positions[:, row, where] = torch.cat(pieces, dim=1)
    return positions


def read_repetition_penalty(folder: Path) -> float:
    """``repetition_penalty`` of the folder's ``generation_config.json`` (1.0 when there is none)."""
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return 1.0
    value = json.loads(path.read_text()).get("repetition_penalty")
    return 1.0 if value is None else float(value)
