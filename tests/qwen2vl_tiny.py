"""A tiny Qwen2-VL model folder in the published layout (config.json in transformers 4.45's flat form, a
byte-level BPE tokenizer, the Qwen2-VL chat template, preprocessor_config.json), and reward checkpoints of the
4.45 ``Qwen2VLRewardModelBT`` key layout. Nothing is downloaded.

This module must import under transformers 4.45 as well as 5 (the HPSv3 parity benchmark uses it in the
reference's own environment), so it touches only ``tokenizers`` and ``PreTrainedTokenizerFast``.
"""

from __future__ import annotations

import json
from pathlib import Path

# Qwen2-VL-*-Instruct's chat template (chat_template.json of the Qwen release), as data.
QWEN2VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
CORPUS = (
    "You are tasked with evaluating a generated image or video based on Visual Quality, Motion Quality and Text "
    "Alignment. Please provide a rating from 0 to 10. system user assistant helpful a red circle on the left, "
    "two blue squares, camera, girl, cat walking in snow. **Reasonableness:** Clarity Detail Richness Aesthetic "
    "Creativity Safety Subject Style Relevance Contextual Consistency Attribute Fidelity Semantic Coherence END"
)
HIDDEN = 32


def write_tokenizer(folder: Path, vocab_size: int = 400, corpus: str = "") -> dict[str, int]:
    """A byte-level BPE tokenizer with Qwen2-VL's special tokens; returns their ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
    )
    backend.train_from_iterator([CORPUS + corpus], trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="right"
    )
    tokenizer.save_pretrained(str(folder))
    return {token: backend.token_to_id(token) for token in SPECIAL_TOKENS} | {"__len__": backend.get_vocab_size()}


def write_backbone_folder(folder: Path, layers: int = 2, vision_depth: int = 1, corpus: str = "") -> Path:
    """config.json (4.45 flat layout), tokenizer, chat template and preprocessor config of a tiny Qwen2-VL.
    ``corpus``: extra BPE training text (the reward prompts make sequences short and tests fast)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ids = write_tokenizer(folder, 1200 if corpus else 400, corpus)
    config = {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        "hidden_size": HIDDEN,
        "intermediate_size": 64,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "hidden_act": "silu",
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "vocab_size": ids["__len__"],
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "torch_dtype": "float32",
        "vision_config": {
            "depth": vision_depth,
            "embed_dim": 32,
            "hidden_size": HIDDEN,
            "hidden_act": "quick_gelu",
            "mlp_ratio": 2,
            "num_heads": 2,
            "in_channels": 3,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": QWEN2VL_CHAT_TEMPLATE}))
    preprocessor = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor",
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_convert_rgb": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "min_pixels": 3136,
        "max_pixels": 12845056,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    return folder


def reference_keys_from_module(state_dict: dict) -> dict:
    """mmalign's module keys -> the 4.45 ``Qwen2VLRewardModelBT`` layout (``visual.*``, ``model.*``)."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("backbone.language_model."):
            key = "model." + key[len("backbone.language_model.") :]
        elif key.startswith("backbone.visual."):
            key = "visual." + key[len("backbone.visual.") :]
        out[key] = value.detach().clone().contiguous()
    return out


# -- a tiny Qwen2.5-VL / Qwen2-VL CHAT model folder (VQAScore): the published Hub layout ----------------------
VQA_CORPUS = (
    'Does this figure show "a red circle"? Please answer Yes or No. Does this figure show "two blue squares"? '
    "Please answer Yes or No.\nYes\nYes\nYes\nNo\nNo\n"
)


def write_chat_model_folder(folder: Path, model_type: str = "qwen2_5_vl", repetition_penalty: float = 1.05) -> Path:
    """config.json in the flat layout of the Qwen2.5-VL / Qwen2-VL Instruct releases (transformers 4.49), tokenizer,
    chat template, preprocessor and generation configs. The weights are written by the caller
    (:func:`published_chat_keys` gives the release's key names)."""
    folder = Path(folder)
    backbone = write_backbone_folder(folder, layers=2, corpus=VQA_CORPUS * 4)
    config = json.loads((backbone / "config.json").read_text())
    if model_type == "qwen2_5_vl":
        config["architectures"] = ["Qwen2_5_VLForConditionalGeneration"]
        config["model_type"] = "qwen2_5_vl"
        config["vision_config"] = {
            "depth": 2,
            "hidden_size": HIDDEN,
            "hidden_act": "silu",
            "intermediate_size": 64,
            "num_heads": 2,
            "in_chans": 3,
            "out_hidden_size": HIDDEN,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [1],
            "tokens_per_second": 2,
        }
    elif model_type != "qwen2_vl":
        raise ValueError(model_type)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    preprocessor = json.loads((folder / "preprocessor_config.json").read_text())
    preprocessor["processor_class"] = "Qwen2_5_VLProcessor" if model_type == "qwen2_5_vl" else "Qwen2VLProcessor"
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    generation = {
        "bos_token_id": config["bos_token_id"],
        "pad_token_id": config["bos_token_id"],
        "do_sample": True,
        "eos_token_id": [config["eos_token_id"], config["bos_token_id"]],
        "repetition_penalty": repetition_penalty,
        "temperature": 0.1,
        "top_p": 0.001,
        "top_k": 1,
    }
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return folder


def published_chat_keys(state_dict: dict) -> dict:
    """transformers 5 ``*ForConditionalGeneration`` keys -> the releases' (``model.*``, ``visual.*``, ``lm_head.*``)."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("model.language_model."):
            key = "model." + key[len("model.language_model.") :]
        elif key.startswith("model.visual."):
            key = "visual." + key[len("model.visual.") :]
        out[key] = value.detach().clone().contiguous()
    return out


def write_chat_model(folder: Path, model_type: str = "qwen2_5_vl", seed: int = 0) -> Path:
    """:func:`write_chat_model_folder` plus seeded random weights in ``model.safetensors`` (the releases' keys).
    Needs transformers 5 (the classes are built from the folder's config)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    write_chat_model_folder(folder, model_type)
    config = AutoConfig.from_pretrained(str(folder))
    cls = Qwen2_5_VLForConditionalGeneration if model_type == "qwen2_5_vl" else Qwen2VLForConditionalGeneration
    model = cls(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator) / max(1, parameter.shape[-1]) ** 0.5
            parameter.copy_(noise + (1.0 if "norm" in name and parameter.ndim == 1 else 0.0))
    save_file(published_chat_keys(model.state_dict()), str(Path(folder) / "model.safetensors"))
    return Path(folder)
