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
