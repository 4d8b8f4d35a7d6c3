"""Random-weight models of the published architectures, built from configs: what the tests, the benchmarks and
the toyworld's training scripts build instead of downloading (nothing here touches the network).

The CLIP text towers use the real 49408-token vocabulary and its special ids (the tokenizer files come from
:func:`mmalign.tokenizers.write_clip_tokenizer`); the noise schedulers use Stable Diffusion's betas.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

CLIP_TEXT_IDS = dict(vocab_size=49408, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)

# Stable Diffusion 1.5's UNet / VAE / text-encoder configs (stable-diffusion-v1-5 config.json files)
SD15: dict[str, dict[str, Any]] = dict(
    unet=dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    ),
    vae=dict(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=32,
        sample_size=512,
    ),
    text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
)
# a tiny pipeline of the same architecture (as diffusers' own tests build): seconds per training step on a CPU
# The published transformers at full size (random weights in benchmarks; nothing is downloaded):
# stabilityai/stable-diffusion-3.5-medium transformer/config.json (SD3Transformer2DModel, 2.24B parameters) and
# Wan-AI/Wan2.1-T2V-1.3B-Diffusers / -14B-Diffusers transformer/config.json (WanTransformer3DModel)
SD35_MEDIUM_TRANSFORMER: dict[str, Any] = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),
    qk_norm="rms_norm",
)
_WAN21_COMMON: dict[str, Any] = dict(
    patch_size=(1, 2, 2),
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
WAN21_TRANSFORMER: dict[str, dict[str, Any]] = {
    "1.3B": dict(_WAN21_COMMON, num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30),
    "14B": dict(_WAN21_COMMON, num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40),
}

TINY_SD: dict[str, dict[str, Any]] = dict(
    unet=dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        norm_num_groups=8,
    ),
    vae=dict(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8,
        sample_size=32,
    ),
    text=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4),
)
# the SDXL-style additions to the tiny UNet: a bigger cross-attention input and micro-conditioning time ids
TINY_SDXL_UNET: dict[str, Any] = dict(
    cross_attention_dim=64,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 32,
    use_linear_projection=True,
    transformer_layers_per_block=(1, 1),
)

# a tiny StableDiffusion3Pipeline of the real classes (as diffusers' SD3 tests build it, with SD3's 16-channel VAE):
# CLIP-L and CLIP-G of different widths whose concatenation (16 + 32) is narrower than T5 (64), as in the real model
TINY_SD3: dict[str, dict[str, Any]] = dict(
    transformer=dict(
        sample_size=16,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=64,
        caption_projection_dim=16,
        pooled_projection_dim=16 + 32,
        pos_embed_max_size=32,
    ),
    vae=dict(  # the tiny SD VAE with SD3's 16 latent channels, scaling and shift factors, and no quant convs
        TINY_SD["vae"],
        latent_channels=16,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ),
    clip_l=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, projection_dim=16),
    clip_g=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32),
    t5=dict(
        vocab_size=128,
        d_model=64,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    ),
    # stable-diffusion-3-medium's scheduler config
    scheduler=dict(num_train_timesteps=1000, shift=3.0),
)

__all__ = [
    "CLIP_TEXT_IDS",
    "SD15",
    "SD_BETAS",
    "TINY_SD",
    "TINY_SD3",
    "TINY_SDXL_UNET",
    "ANIMATEDIFF_SCHEDULER",
    "TINY_ANIMATEDIFF_MOTION",
    "build_animatediff_pipeline",
    "build_sd3_pipeline",
    "build_sd_pipeline",
    "clip_config",
    "clip_text_config",
    "clip_h14_config",
    "clip_tokenizer",
    "sd_scheduler_config",
    "t5_tokenizer",
]


def clip_text_config(
    hidden_size: int,
    intermediate_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    max_position_embeddings: int = 77,
    **extra: Any,
) -> dict[str, Any]:
    """Keyword arguments of a ``CLIPTextConfig`` with CLIP's vocabulary and special token ids."""
    return dict(
        CLIP_TEXT_IDS,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        max_position_embeddings=max_position_embeddings,
        **extra,
    )


def clip_config(text: dict[str, Any], vision: dict[str, Any], projection_dim: int, **extra: Any):
    """A transformers ``CLIPConfig``: ``text`` = :func:`clip_text_config` arguments, ``vision`` = a
    ``CLIPVisionConfig``'s."""
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=clip_text_config(**text), vision_config=vision, projection_dim=projection_dim, **extra
    )


def clip_h14_config():
    """CLIP ViT-H/14 (laion/CLIP-ViT-H-14-laion2B-s32B-b79K, PickScore_v1's architecture) as a transformers
    ``CLIPConfig``: for full-size benchmarks with random weights."""
    text = dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, hidden_act="gelu"
    )
    vision = dict(
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=16,
        patch_size=14,
        image_size=224,
        hidden_act="gelu",
    )
    return clip_config(text, vision, projection_dim=1024)


def sd_scheduler_config(prediction_type: str = "epsilon", **extra: Any) -> dict[str, Any]:
    """Stable Diffusion's noise-scheduler settings (scaled-linear betas 0.00085-0.012, 1000 steps, offset 1)."""
    return dict(SD_BETAS, prediction_type=prediction_type, clip_sample=False, steps_offset=1, **extra)


def clip_tokenizer(folder: str | Path | None = None):
    """The real CLIP tokenizer, written offline into ``folder`` (default: a temporary folder) and loaded."""
    from transformers import CLIPTokenizer

    from ..tokenizers import write_clip_tokenizer

    if folder is not None:
        return CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(Path(folder))))
    with tempfile.TemporaryDirectory() as tmp:
        return CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(Path(tmp) / "tokenizer")))


def build_sd_pipeline(
    folder: str | Path,
    unet: dict[str, Any],
    vae: dict[str, Any],
    text: dict[str, Any],
    seed: int = 0,
    prediction_type: str = "epsilon",
    sdxl: bool = False,
) -> dict[str, int]:
    """A random-weight ``StableDiffusionPipeline`` (``sdxl``: ``StableDiffusionXLPipeline``, two text encoders)
    from UNet, VAE and text-tower configs (``text``: :func:`clip_text_config` arguments), saved with
    ``save_pretrained`` into ``folder``; returns the parameter counts."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet_model = UNet2DConditionModel(**unet)
    vae_model = AutoencoderKL(**vae)
    text_config = CLIPTextConfig(**clip_text_config(**{"projection_dim": text["hidden_size"], **text}))
    text_encoder = CLIPTextModel(text_config)
    scheduler = DDPMScheduler(**sd_scheduler_config(prediction_type))
    tokenizer = clip_tokenizer()
    if sdxl:
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(
            vae=vae_model,
            text_encoder=text_encoder,
            text_encoder_2=CLIPTextModelWithProjection(text_config),
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            unet=unet_model,
            scheduler=scheduler,
        )
    else:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=vae_model,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet_model,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {
        "unet_params": count(unet_model),
        "vae_params": count(vae_model),
        "text_encoder_params": count(text_encoder),
    }


def t5_tokenizer(words: tuple[str, ...] = ()):
    """A small T5 (Unigram, sentencepiece-style) tokenizer built offline: T5's special ids (``<pad>`` 0, ``</s>``
    1, ``<unk>`` 2), the word boundary ``▁``, single letters and digits (with and without ``▁``) and ``words``;
    any lowercase ASCII text tokenises without ``<unk>``. 4 + 72 + 2·len(words) entries, no sentinel tokens."""
    import string

    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    for char in string.ascii_lowercase + string.digits:
        vocab += [("\u2581" + char, -8.0), (char, -9.0)]
    for word in words:
        vocab += [("\u2581" + word, -4.0), (word, -5.0)]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)


def build_sd3_pipeline(
    folder: str | Path,
    seed: int = 0,
    config: dict[str, dict[str, Any]] | None = None,
    t5: bool = True,
    max_sequence_length: int | None = None,
) -> Path:
    """A random-weight ``StableDiffusion3Pipeline`` (``SD3Transformer2DModel``, CLIP-L and CLIP-G
    ``CLIPTextModelWithProjection``, ``T5EncoderModel``, 16-channel ``AutoencoderKL``,
    ``FlowMatchEulerDiscreteScheduler``) from :data:`TINY_SD3`-shaped ``config``, saved with
    ``StableDiffusion3Pipeline.save_pretrained`` into ``folder``. ``t5=False``: without T5 (``text_encoder_3``
    and ``tokenizer_3`` None); ``max_sequence_length``: recorded in the folder's generator config
    (:func:`mmalign.models.sd3.write_generator_config`)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    config = config or TINY_SD3
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**config["transformer"])
    vae = AutoencoderKL(**config["vae"])
    clip_l = CLIPTextModelWithProjection(CLIPTextConfig(**clip_text_config(**config["clip_l"])))
    clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**clip_text_config(**config["clip_g"])))
    t5_encoder = T5EncoderModel(T5Config(**config["t5"]))
    tokenizer = clip_tokenizer()
    words = ("a", "photo", "of", "cat", "dog", "red", "blue", "cube", "on", "the", "and")
    tokenizer_3 = t5_tokenizer(words)
    if len(tokenizer_3) > config["t5"]["vocab_size"]:
        raise ValueError(f"T5 vocab_size {config['t5']['vocab_size']} < tokenizer size {len(tokenizer_3)}")
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**config["scheduler"]),
        vae=vae,
        text_encoder=clip_l,
        tokenizer=tokenizer,
        text_encoder_2=clip_g,
        tokenizer_2=tokenizer,
        text_encoder_3=t5_encoder if t5 else None,
        tokenizer_3=tokenizer_3 if t5 else None,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    if max_sequence_length is not None:
        from .sd3 import write_generator_config

        write_generator_config(folder, max_sequence_length=max_sequence_length)
    return Path(folder)


# a tiny FluxPipeline (FLUX.1-dev layout) of the real classes: the tiny SD3 VAE with FLUX.1's scaling and shift
# factors, a CLIP-L text tower without projection (FLUX reads its pooled output) and the tiny SD3 T5; the
# transformer takes 2x2-packed latents (in_channels = 4 x 16) and embeds the guidance scale (guidance_embeds: dev;
# schnell has none); the rotary axes (4, 6, 6) sum to attention_head_dim as FLUX.1's (16, 56, 56) sum to 128
TINY_FLUX: dict[str, dict[str, Any]] = dict(
    transformer=dict(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=64,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ),
    vae=dict(TINY_SD3["vae"], scaling_factor=0.3611, shift_factor=0.1159),
    clip_l=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
    t5=TINY_SD3["t5"],
    # FLUX.1-dev's scheduler config (resolution-dependent shift between 256 and 4096 latent tokens)
    scheduler=dict(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    ),
)

__all__ += ["TINY_FLUX", "build_flux_pipeline"]


def build_flux_pipeline(folder: str | Path, seed: int = 0, config: dict[str, dict[str, Any]] | None = None) -> Path:
    """A random-weight ``FluxPipeline`` (``FluxTransformer2DModel``, CLIP-L ``CLIPTextModel``, ``T5EncoderModel``,
    16-channel ``AutoencoderKL``, ``FlowMatchEulerDiscreteScheduler``) from :data:`TINY_FLUX`-shaped ``config``,
    saved with ``FluxPipeline.save_pretrained`` into ``folder``."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    config = config or TINY_FLUX
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**config["transformer"])
    vae = AutoencoderKL(**config["vae"])
    clip_l = CLIPTextModel(CLIPTextConfig(**clip_text_config(**config["clip_l"])))
    t5 = T5EncoderModel(T5Config(**config["t5"]))
    words = ("a", "photo", "of", "cat", "dog", "red", "blue", "cube", "on", "the", "and")
    tokenizer_2 = t5_tokenizer(words)
    if len(tokenizer_2) > config["t5"]["vocab_size"]:
        raise ValueError(f"T5 vocab_size {config['t5']['vocab_size']} < tokenizer size {len(tokenizer_2)}")
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**config["scheduler"]),
        vae=vae,
        text_encoder=clip_l,
        tokenizer=clip_tokenizer(),
        text_encoder_2=t5,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)


# a tiny Flux2KleinPipeline (FLUX.2-klein layout) of the real classes: the FLUX.2 VAE (32 latent channels, 2x2
# patchified and batch-norm normalised: the transformer reads 4 x 32 = 128 channels per token) at the tiny SD VAE's
# widths; a Qwen3 text model as deep as Qwen3-4B's first 28 layers (the pipeline stacks hidden states 9, 18 and 27)
# but 16 wide, so the transformer's text input is 3 x 16; klein's transformer has no guidance embedding
TINY_FLUX2_KLEIN: dict[str, dict[str, Any]] = dict(
    transformer=dict(
        patch_size=1,
        in_channels=128,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * 16,
        timestep_guidance_channels=32,
        mlp_ratio=3.0,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False,
    ),
    vae=dict(
        in_channels=3,
        out_channels=3,
        latent_channels=32,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8,
        sample_size=32,
        patch_size=(2, 2),
    ),
    qwen3=dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=28,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    ),
    # resolution- and step-dependent shift (the pipeline's compute_empirical_mu)
    scheduler=dict(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    ),
)

__all__ += ["TINY_FLUX2_KLEIN", "build_flux2_klein_pipeline", "qwen3_byte_tokenizer"]

QWEN3_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<think>", "</think>")
# Qwen3's chat template reduced to what prompt encoding renders: turns between <|im_start|> and <|im_end|>, the
# assistant header, and the empty think block that enable_thinking=False adds
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def qwen3_byte_tokenizer():
    """A byte-level BPE tokenizer of Qwen's kind built offline (transformers' ``Qwen2Tokenizer``): the 256
    byte symbols without merges (ids 0-255), ``<|endoftext|>`` (256, also the padding) and Qwen's chat special
    tokens, with a Qwen3-style chat template; 261 entries, any text tokenises."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    from ..tokenizers import _bytes_to_unicode

    vocab = {symbol: index for index, symbol in enumerate(_bytes_to_unicode().values())}
    vocab["<|endoftext|>"] = len(vocab)
    for token in QWEN3_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.add_tokens([AddedToken(token, special=True) for token in QWEN3_SPECIAL_TOKENS])
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


def build_flux2_klein_pipeline(
    folder: str | Path, seed: int = 0, config: dict[str, dict[str, Any]] | None = None, is_distilled: bool = False
) -> Path:
    """A random-weight ``Flux2KleinPipeline`` (``Flux2Transformer2DModel``, ``Qwen3ForCausalLM``,
    ``AutoencoderKLFlux2`` with random batch-norm statistics, ``FlowMatchEulerDiscreteScheduler``) from
    :data:`TINY_FLUX2_KLEIN`-shaped ``config``, saved with ``save_pretrained`` into ``folder``; ``is_distilled``:
    the step-distilled variant's flag (no classifier-free guidance)."""
    import torch
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = config or TINY_FLUX2_KLEIN
    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(**config["transformer"])
    vae = AutoencoderKLFlux2(**config["vae"])
    with torch.no_grad():  # non-trivial normalisation, as the trained VAE's statistics are
        vae.bn.running_mean.normal_(std=0.2)
        vae.bn.running_var.uniform_(0.5, 2.0)
    tokenizer = qwen3_byte_tokenizer()
    text_encoder = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tokenizer), **config["qwen3"]))
    pipe = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**config["scheduler"]),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=is_distilled,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)


# -- Qwen-Image and Z-Image -------------------------------------------------------------------------------------
# words the tiny Qwen tokenizers hold as single tokens (besides every byte): QwenImagePipeline's prompt template
# (its system prefix must tokenise into the 34 tokens the pipeline drops, as it does with Qwen2.5-VL's real
# tokenizer), the chat roles, and the words of the tests' prompts
QWEN_IMAGE_TEMPLATE_TEXT = (
    "system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships "
    "of the objects and background:\nuser\nassistant\n"
)
QWEN_WORDS = ("a", "photo", "of", "cat", "dog", "red", "blue", "cube", "on", "the", "and", "user", "assistant")
# Qwen's chat special tokens (the ids are the tiny vocabulary's, not the published 151643...)
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# a chat template written for the tiny tokenizer (not Qwen3's published template): for plain text messages it
# renders what Qwen3's does, "<|im_start|>{role}\n{content}<|im_end|>\n" per message, then with
# add_generation_prompt "<|im_start|>assistant\n" (and "<think>\n\n</think>\n\n" when enable_thinking is False)
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif -%}"
    "{%- endif -%}"
)

# a tiny QwenImagePipeline of the real classes: Qwen2.5-VL (text tower 32 wide, multimodal RoPE sections summing
# to half its head width, a one-block vision tower), the 3D Qwen-Image VAE with the published 16 latent channels
# and per-channel latents_mean / latents_std (the class defaults), and Qwen-Image's scheduler settings
TINY_QWEN_IMAGE: dict[str, dict[str, Any]] = dict(
    transformer=dict(
        patch_size=2,
        in_channels=64,  # 16 latent channels in 2x2 patches
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(4, 6, 6),
    ),
    vae=dict(base_dim=16, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True]),
    text=dict(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        rope_scaling=dict(type="mrope", mrope_section=[2, 3, 3]),
    ),
    vision=dict(
        depth=1,
        hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        out_hidden_size=32,
        patch_size=14,
        window_size=112,
        fullatt_block_indexes=[0],
    ),
    # Qwen/Qwen-Image's scheduler_config.json (dynamic shifting with an exponential time shift, terminal σ 0.02)
    scheduler=dict(
        base_image_seq_len=256,
        base_shift=0.5,
        max_image_seq_len=8192,
        max_shift=0.9,
        num_train_timesteps=1000,
        shift=1.0,
        shift_terminal=0.02,
        time_shift_type="exponential",
        use_dynamic_shifting=True,
    ),
)

__all__ += [
    "QWEN_CHAT_TEMPLATE",
    "QWEN_SPECIAL_TOKENS",
    "QWEN_WORDS",
    "TINY_QWEN_IMAGE",
    "build_qwen_image_pipeline",
    "qwen_tokenizer",
]


def qwen_tokenizer(words: tuple[str, ...] = QWEN_WORDS, text: str = QWEN_IMAGE_TEMPLATE_TEXT, chat_template=None):
    """A small Qwen2 tokenizer (transformers' ``Qwen2Tokenizer``: byte-level BPE behind Qwen's pre-tokenisation
    regex) built offline: byte-level BPE merges trained with ``tokenizers``' ``BpeTrainer`` until every
    pre-token of ``text`` and of ``words`` (with and without a leading space) is one token, over the 256-byte
    alphabet (any text round-trips, unknown words fall back to smaller pieces); ``<|endoftext|>`` (0, also pad and
    eos), ``<|im_start|>`` (1) and ``<|im_end|>`` (2) as special tokens; ``chat_template`` stored with it."""
    import json

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    corpus = [text, *words, *(" " + word for word in words)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=1 << 16,
        min_frequency=1,
        special_tokens=list(QWEN_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer)
    model = json.loads(bpe.to_str())["model"]
    extra = {} if chat_template is None else {"chat_template": chat_template}
    return Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=[tuple(pair) for pair in model["merges"]],
        additional_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
        **extra,
    )


def build_qwen_image_pipeline(
    folder: str | Path, seed: int = 0, config: dict[str, dict[str, Any]] | None = None
) -> Path:
    """A random-weight ``QwenImagePipeline`` (``QwenImageTransformer2DModel``, ``Qwen2_5_VLForConditionalGeneration``,
    ``AutoencoderKLQwenImage``, ``FlowMatchEulerDiscreteScheduler``, :func:`qwen_tokenizer`) from
    :data:`TINY_QWEN_IMAGE`-shaped ``config``, saved with ``QwenImagePipeline.save_pretrained`` into ``folder``."""
    import torch
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = config or TINY_QWEN_IMAGE
    tokenizer = qwen_tokenizer()
    if len(tokenizer) > config["text"]["vocab_size"]:
        raise ValueError(f"Qwen2.5-VL vocab_size {config['text']['vocab_size']} < tokenizer size {len(tokenizer)}")
    special = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(**config["transformer"])
    vae = AutoencoderKLQwenImage(**config["vae"])
    text_config = dict(
        config["text"],
        bos_token_id=special["<|endoftext|>"],
        eos_token_id=special["<|im_end|>"],
        pad_token_id=special["<|endoftext|>"],
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(
            text_config=text_config,
            vision_config=config["vision"],
            # no image tokens in text-to-image prompts: the vision ids point past the tiny vocabulary's words
            image_token_id=config["text"]["vocab_size"] - 1,
            video_token_id=config["text"]["vocab_size"] - 2,
            vision_start_token_id=config["text"]["vocab_size"] - 3,
            vision_end_token_id=config["text"]["vocab_size"] - 4,
        )
    ).eval()
    pipe = QwenImagePipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**config["scheduler"]),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)


# a tiny ZImagePipeline of the real classes: the single-stream Z-Image DiT (noise and context refiners, 3-axis
# RoPE summing to its head width), a Qwen3 text model (Qwen3Model, its second-to-last hidden state is the
# caption), the tiny SD VAE with Z-Image's 16 latent channels and its (FLUX) scaling and shift factors, and
# Z-Image-Turbo's static-shift scheduler
TINY_Z_IMAGE: dict[str, dict[str, Any]] = dict(
    transformer=dict(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=32,
        axes_dims=[4, 6, 6],
        axes_lens=[1024, 64, 64],
    ),
    vae=dict(
        TINY_SD["vae"],
        latent_channels=16,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ),
    text=dict(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=1024,
    ),
    scheduler=dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False),
)

__all__ += ["TINY_Z_IMAGE", "build_z_image_pipeline"]


def build_z_image_pipeline(folder: str | Path, seed: int = 0, config: dict[str, dict[str, Any]] | None = None) -> Path:
    """A random-weight ``ZImagePipeline`` (``ZImageTransformer2DModel``, ``Qwen3Model``, 16-channel
    ``AutoencoderKL``, ``FlowMatchEulerDiscreteScheduler``, :func:`qwen_tokenizer` with
    :data:`QWEN_CHAT_TEMPLATE`) from :data:`TINY_Z_IMAGE`-shaped ``config``, saved with
    ``ZImagePipeline.save_pretrained`` into ``folder``."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    config = config or TINY_Z_IMAGE
    tokenizer = qwen_tokenizer(text="user\nassistant\n", chat_template=QWEN_CHAT_TEMPLATE)
    if len(tokenizer) > config["text"]["vocab_size"]:
        raise ValueError(f"Qwen3 vocab_size {config['text']['vocab_size']} < tokenizer size {len(tokenizer)}")
    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(**config["transformer"])
    vae = AutoencoderKL(**config["vae"])
    text_encoder = Qwen3Model(
        Qwen3Config(
            **config["text"],
            bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
            pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        )
    ).eval()
    pipe = ZImagePipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**config["scheduler"]),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)


# a tiny WanPipeline of the real classes: the Wan DiT (3D patches, self- and cross-attention, head width 12 split
# by its 3-axis RoPE), a UMT5 encoder, the causal 3D Wan VAE (4x temporal, 8x spatial compression) and the
# UniPC flow-sigma scheduler with shift 3 that the published Wan 2.1 checkpoints ship
TINY_WAN: dict[str, dict[str, Any]] = dict(
    transformer=dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ),
    vae=dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]),
    text=dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8),
    scheduler=dict(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0),
)

__all__ += ["TINY_WAN", "build_wan_pipeline"]


def build_wan_pipeline(
    folder: str | Path,
    seed: int = 0,
    config: dict[str, dict[str, Any]] | None = None,
    max_sequence_length: int | None = 16,
    num_frames: int | None = 5,
    euler: bool = False,
    expand_timesteps: bool = False,
    boundary_ratio: float | None = None,
) -> Path:
    """A random-weight ``WanPipeline`` (``WanTransformer3DModel``, ``UMT5EncoderModel`` with :func:`t5_tokenizer`,
    ``AutoencoderKLWan``, ``UniPCMultistepScheduler`` with flow sigmas as shipped, or ``euler``:
    ``FlowMatchEulerDiscreteScheduler`` of the same shift) from :data:`TINY_WAN`-shaped ``config``, saved with
    ``WanPipeline.save_pretrained`` into ``folder``; ``max_sequence_length`` and ``num_frames`` (when given) are
    recorded in the folder's generator config (:func:`mmalign.models.sd3.write_generator_config`);
    ``expand_timesteps``: Wan 2.2 TI2V's per-token timesteps; ``boundary_ratio``: Wan 2.2 A14B's layout, a second
    transformer of the same config (``transformer_2``, the low-noise expert, with other random weights) switched to
    below ``boundary_ratio·1000``."""
    import torch
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        UniPCMultistepScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    from .sd3 import write_generator_config

    config = config or TINY_WAN
    tokenizer = t5_tokenizer(("a", "red", "apple", "blue", "sky", "green", "field", "cat", "video"))
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(**config["transformer"])
    transformer_2 = None if boundary_ratio is None else WanTransformer3DModel(**config["transformer"])
    vae = AutoencoderKLWan(**config["vae"]).eval()
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), **config["text"])).eval()
    if euler:
        shift = config["scheduler"]["flow_shift"]
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    else:
        scheduler = UniPCMultistepScheduler(**config["scheduler"])
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=scheduler,
        transformer=transformer,
        expand_timesteps=expand_timesteps,
        transformer_2=transformer_2,
        boundary_ratio=boundary_ratio,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    settings = {}
    if max_sequence_length is not None:
        settings["max_sequence_length"] = int(max_sequence_length)
    if num_frames is not None:
        settings["num_frames"] = int(num_frames)
    if settings:
        write_generator_config(folder, **settings)
    return Path(folder)


# a tiny AnimateDiffPipeline (as diffusers' AnimateDiff tests build it): the tiny SD UNet, VAE and text tower plus a
# MotionAdapter of the same block widths (one temporal transformer per resnet, 2 heads); AnimateDiff's DDIM scheduler
TINY_ANIMATEDIFF_MOTION: dict[str, Any] = dict(
    block_out_channels=TINY_SD["unet"]["block_out_channels"],
    motion_layers_per_block=TINY_SD["unet"]["layers_per_block"],
    motion_norm_num_groups=8,
    motion_num_attention_heads=2,
    motion_max_seq_length=32,
)
# the DDIM settings diffusers' AnimateDiff docs load over an SD 1.5 scheduler (linear betas 0.00085-0.012, steps
# offset 1, linspace spacing, no clipping; SD's set_alpha_to_one=False)
ANIMATEDIFF_SCHEDULER: dict[str, Any] = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="linear",
    num_train_timesteps=1000,
    clip_sample=False,
    steps_offset=1,
    timestep_spacing="linspace",
    prediction_type="epsilon",
    set_alpha_to_one=False,
)


def build_animatediff_pipeline(
    folder: str | Path,
    seed: int = 0,
    num_frames: int | None = 4,
    separate_adapter: bool = False,
    motion: dict[str, Any] | None = None,
) -> Path:
    """A random-weight ``AnimateDiffPipeline`` (tiny SD 1.x UNet, VAE and CLIP text tower of :data:`TINY_SD` with a
    ``MotionAdapter`` of :data:`TINY_ANIMATEDIFF_MOTION`, merged into a ``UNetMotionModel``; a ``DDIMScheduler`` of
    :data:`ANIMATEDIFF_SCHEDULER`), saved with ``AnimateDiffPipeline.save_pretrained`` into ``folder``. The motion
    modules' last projections are re-drawn (diffusers zero-initialises ``proj_out``, which would make them an
    identity). ``separate_adapter``: the folder holds the SD ``UNet2DConditionModel`` and the ``motion_adapter``
    apart (the layout of a pipeline built from a base model and an adapter); ``num_frames`` (when given) goes into
    the folder's generator config."""
    import torch
    from diffusers import (
        AnimateDiffPipeline,
        AutoencoderKL,
        DDIMScheduler,
        MotionAdapter,
        UNet2DConditionModel,
        UNetMotionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from .sd3 import write_generator_config

    torch.manual_seed(seed)
    unet2d = UNet2DConditionModel(**TINY_SD["unet"])
    adapter = MotionAdapter(**(motion or TINY_ANIMATEDIFF_MOTION))
    with torch.no_grad():
        for name, parameter in adapter.named_parameters():
            if "proj_out" in name:
                parameter.normal_(0.0, 0.05)
    vae = AutoencoderKL(**TINY_SD["vae"])
    text = TINY_SD["text"]
    text_encoder = CLIPTextModel(CLIPTextConfig(**clip_text_config(**{"projection_dim": text["hidden_size"], **text})))
    pipe = AnimateDiffPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        unet=UNetMotionModel.from_unet2d(unet2d, adapter),
        motion_adapter=adapter,
        scheduler=DDIMScheduler(**ANIMATEDIFF_SCHEDULER),
    )
    if separate_adapter:  # the pipeline merged them: register the 2D UNet again so that the folder keeps it apart
        pipe.register_modules(unet=unet2d)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    if num_frames is not None:
        write_generator_config(folder, num_frames=int(num_frames))
    return Path(folder)


# a Stable Audio Open-shaped pipeline at toy size: 4 latent channels, 16 latent frames, hop 4 at 4000 Hz (64
# samples, 0.016 s), a 2-block DiT with grouped-query attention, stereo Oobleck VAE
TINY_STABLE_AUDIO: dict[str, dict[str, Any]] = dict(
    transformer=dict(
        sample_size=16,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        num_key_value_attention_heads=1,
        out_channels=4,
        cross_attention_dim=16,
        time_proj_dim=8,
        global_states_input_dim=32,
        cross_attention_input_dim=16,
    ),
    vae=dict(
        encoder_hidden_size=8,
        downsampling_ratios=[2, 2],
        decoder_channels=4,
        decoder_input_channels=4,
        audio_channels=2,
        channel_multiples=[1, 2],
        sampling_rate=4000,
    ),
    text=dict(d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, relative_attention_num_buckets=8),
    projection=dict(text_encoder_dim=16, conditioning_dim=16, min_value=0, max_value=512),
    # Stable Audio Open 1.0's scheduler_config.json values (CosineDPMSolverMultistepScheduler)
    scheduler=dict(
        sigma_min=0.3,
        sigma_max=500,
        sigma_data=1.0,
        sigma_schedule="exponential",
        solver_order=2,
        prediction_type="v_prediction",
        rho=7.0,
        solver_type="midpoint",
        lower_order_final=True,
        euler_at_final=False,
        final_sigmas_type="zero",
        num_train_timesteps=1000,
    ),
)


def stable_audio_components(
    seed: int = 0, config: dict[str, dict[str, Any]] | None = None, max_length: int = 12
) -> dict[str, Any]:
    """Random-weight ``StableAudioPipeline`` components in memory, seeded with ``seed``: ``StableAudioDiTModel``,
    ``AutoencoderOobleck``, ``T5EncoderModel`` with :func:`t5_tokenizer` of ``model_max_length`` ``max_length``,
    ``StableAudioProjectionModel``, from :data:`TINY_STABLE_AUDIO`-shaped ``config`` (its ``scheduler`` entry is
    not used here)."""
    import torch
    from diffusers import AutoencoderOobleck, StableAudioDiTModel
    from diffusers.pipelines.stable_audio import StableAudioProjectionModel
    from transformers import T5Config, T5EncoderModel

    config = config or TINY_STABLE_AUDIO
    tokenizer = t5_tokenizer(("a", "dog", "barks", "rain", "piano", "drum", "loop", "bird", "sings"))
    tokenizer.model_max_length = int(max_length)
    torch.manual_seed(seed)
    transformer = StableAudioDiTModel(**config["transformer"])
    vae = AutoencoderOobleck(**config["vae"]).eval()
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), **config["text"])).eval()
    projection = StableAudioProjectionModel(**config["projection"]).eval()
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": text_encoder,
        "projection_model": projection,
        "tokenizer": tokenizer,
    }


def build_stable_audio_pipeline(
    folder: str | Path,
    seed: int = 0,
    config: dict[str, dict[str, Any]] | None = None,
    max_length: int = 12,
    audio_end_in_s: float | None = None,
) -> Path:
    """A random-weight ``StableAudioPipeline`` (:func:`stable_audio_components` of ``seed``, ``config`` and
    ``max_length``, and a ``CosineDPMSolverMultistepScheduler``), saved with ``save_pretrained`` into ``folder`` (the
    scheduler as its config file: writing it needs no torchsde); ``audio_end_in_s`` (when given) is recorded in the
    folder's generator config."""
    import json

    from .sd3 import write_generator_config

    config = config or TINY_STABLE_AUDIO
    folder = Path(folder)
    components = stable_audio_components(seed, config, max_length)
    for name, component in components.items():
        component.save_pretrained(str(folder / name))
    scheduler = {"_class_name": "CosineDPMSolverMultistepScheduler", **config["scheduler"]}
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")
    index = {
        "_class_name": "StableAudioPipeline",
        "transformer": ["diffusers", "StableAudioDiTModel"],
        "vae": ["diffusers", "AutoencoderOobleck"],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "projection_model": ["stable_audio", "StableAudioProjectionModel"],
        "tokenizer": ["transformers", type(components["tokenizer"]).__name__],
        "scheduler": ["diffusers", "CosineDPMSolverMultistepScheduler"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    if audio_end_in_s is not None:
        write_generator_config(folder, audio_end_in_s=float(audio_end_in_s))
    return folder


# -- AudioLDM 2 ------------------------------------------------------------------------------------------------
def roberta_tokenizer(folder: str | Path | None = None, words: tuple[str, ...] = (), model_max_length: int = 12):
    """A byte-level BPE tokenizer in RoBERTa's format (CLAP's text tokenizer), built offline: the special tokens
    ``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3, the 256 byte symbols of the GPT-2 byte-to-unicode table, the
    word-start merges of ``words`` (``Ġ`` + each letter, then the letters joined) and ``<mask>``; any text
    tokenises. Written into ``folder`` (default: a temporary folder) as ``vocab.json`` + ``merges.txt``."""
    import json

    from transformers import RobertaTokenizer

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in printable}
    table.update({byte: chr(256 + n) for n, byte in enumerate(b for b in range(256) if b not in table)})
    merges: list[tuple[str, str]] = []
    for word in words:
        symbol = "Ġ"
        for char in word:
            pair = (symbol, char)
            if pair not in merges:
                merges.append(pair)
            symbol += char
    vocab = ["<s>", "<pad>", "</s>", "<unk>", *(table[b] for b in range(256))]
    vocab += list(dict.fromkeys("".join(m) for m in merges if "".join(m) not in vocab)) + ["<mask>"]

    def write(target: Path):
        target.mkdir(parents=True, exist_ok=True)
        (target / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
        (target / "merges.txt").write_text(
            "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
        )
        return RobertaTokenizer.from_pretrained(str(target), model_max_length=model_max_length)

    if folder is not None:
        return write(Path(folder))
    with tempfile.TemporaryDirectory() as tmp:
        return write(Path(tmp) / "tokenizer")


AUDIOLDM2_WORDS = ("a", "dog", "barks", "rain", "piano", "drum", "loop", "bird", "sings")

#: a tiny AudioLDM 2: 16 kHz vocoder of hop 4 (2·2) on 8 mel bins, a 2-level VAE (latents [4, T/2, 4]), a UNet of
#: two levels whose attention blocks hold a self-attention and two cross-attentions (GPT-2 states, then T5 states:
#: ``cross_attention_dim [[None, 16, 32], ...]``, the layout of cvssp/audioldm2), 8 latent rows (0.004 s)
TINY_AUDIOLDM2: dict[str, dict[str, Any]] = dict(
    unet=dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=[[None, 16, 32], [None, 16, 32]],
    ),
    vae=dict(
        in_channels=1,
        out_channels=1,
        latent_channels=4,
        block_out_channels=[8, 16],
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        norm_num_groups=8,
        layers_per_block=1,
    ),
    clap_text=dict(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    ),
    clap_audio=dict(
        window_size=4,
        num_mel_bins=8,
        spec_size=8,
        patch_size=2,
        patch_stride=[2, 2],
        hidden_size=16,
        patch_embeds_hidden_size=8,
        depths=[1, 1],
        num_attention_heads=[1, 1],
    ),
    clap=dict(projection_dim=16),
    t5=dict(d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2, relative_attention_num_buckets=8),
    gpt2=dict(n_embd=16, n_head=2, n_layer=1, vocab_size=16, n_positions=64, bos_token_id=0, eos_token_id=0),
    projection=dict(text_encoder_dim=16, text_encoder_1_dim=32, langauge_model_dim=16),
    vocoder=dict(
        model_in_dim=8,
        sampling_rate=16000,
        upsample_initial_channel=16,
        upsample_rates=[2, 2],
        upsample_kernel_sizes=[4, 4],
        resblock_kernel_sizes=[3],
        resblock_dilation_sizes=[[1, 3]],
        normalize_before=False,
    ),
    scheduler=sd_scheduler_config(set_alpha_to_one=False),
)


def build_audioldm2_pipeline(
    folder: str | Path,
    seed: int = 0,
    config: dict[str, dict[str, Any]] | None = None,
    max_length: int = 12,
    max_new_tokens: int = 8,
) -> Path:
    """A random-weight ``AudioLDM2Pipeline`` from :data:`TINY_AUDIOLDM2`-shaped ``config``: ``ClapModel`` with
    :func:`roberta_tokenizer`, ``T5EncoderModel`` with :func:`t5_tokenizer` (both of ``model_max_length``
    ``max_length``), ``GPT2LMHeadModel`` (``max_new_tokens`` in its config, the pipeline's default),
    ``AudioLDM2ProjectionModel``, ``AudioLDM2UNet2DConditionModel``, ``AutoencoderKL``, ``SpeechT5HifiGan``, a
    default ``ClapFeatureExtractor`` and ``DDIMScheduler``, saved with ``save_pretrained`` into ``folder``."""
    import torch
    from diffusers import AudioLDM2Pipeline, AutoencoderKL, DDIMScheduler
    from diffusers.pipelines.audioldm2 import AudioLDM2ProjectionModel, AudioLDM2UNet2DConditionModel
    from transformers import (
        ClapConfig,
        ClapFeatureExtractor,
        ClapModel,
        GPT2Config,
        GPT2LMHeadModel,
        SpeechT5HifiGan,
        SpeechT5HifiGanConfig,
        T5Config,
        T5EncoderModel,
    )

    config = config or TINY_AUDIOLDM2
    folder = Path(folder)
    tokenizer = roberta_tokenizer(words=AUDIOLDM2_WORDS, model_max_length=max_length)
    tokenizer_2 = t5_tokenizer(AUDIOLDM2_WORDS)
    tokenizer_2.model_max_length = int(max_length)
    torch.manual_seed(seed)
    clap = ClapConfig(
        text_config=dict(vocab_size=len(tokenizer), **config["clap_text"]),
        audio_config=dict(config["clap_audio"]),
        **config["clap"],
    )
    language_model = GPT2LMHeadModel(GPT2Config(**config["gpt2"])).eval()
    language_model.config.max_new_tokens = int(max_new_tokens)
    pipe = AudioLDM2Pipeline(
        vae=AutoencoderKL(**config["vae"]).eval(),
        text_encoder=ClapModel(clap).eval(),
        text_encoder_2=T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), **config["t5"])).eval(),
        projection_model=AudioLDM2ProjectionModel(**config["projection"]).eval(),
        language_model=language_model,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        feature_extractor=ClapFeatureExtractor(),
        unet=AudioLDM2UNet2DConditionModel(**config["unet"]),
        scheduler=DDIMScheduler(**config["scheduler"]),
        vocoder=SpeechT5HifiGan(SpeechT5HifiGanConfig(**config["vocoder"])).eval(),
    )
    pipe.save_pretrained(str(folder))
    return folder


__all__ += ["AUDIOLDM2_WORDS", "TINY_AUDIOLDM2", "build_audioldm2_pipeline", "roberta_tokenizer"]
