"""Tiny models of the real architectures, built from config and saved in the published formats.

Nothing here downloads: the CLIP tokenizer files come from :func:`mmalign.tokenizers.write_clip_tokenizer`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmalign.tokenizers import write_clip_tokenizer

TINY_OPEN_CLIP = "mmalign-tiny-ViT"
TINY_OPEN_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def register_tiny_open_clip(folder: Path) -> str:
    import open_clip

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{TINY_OPEN_CLIP}.json"
    path.write_text(json.dumps(TINY_OPEN_CLIP_CONFIG))
    open_clip.add_model_config(path)
    return TINY_OPEN_CLIP


def make_hps_checkpoint(folder: Path, seed: int = 0, filename: str = "HPS_v2.1_compressed.pt") -> Path:
    """A tiny open_clip CLIP saved like HPSv2's release: ``torch.save({'state_dict': ...})``."""
    import open_clip

    register_tiny_open_clip(folder / "configs")
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_OPEN_CLIP, pretrained=None)
    path = folder / filename
    torch.save({"state_dict": model.state_dict()}, path)
    return path


def make_clip_model(
    folder: Path,
    seed: int = 0,
    image_size: int = 224,
    projection_dim: int = 32,
    text: dict | None = None,
    vision: dict | None = None,
) -> Path:
    """A tiny transformers CLIPModel + CLIPProcessor folder (``save_pretrained`` layout); ``text`` / ``vision``
    override the towers' sizes (a benchmark builds ViT-B/32 so)."""
    from transformers import CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.models.clip import CLIPImageProcessorPil

    from mmalign.models.builders import clip_config

    torch.manual_seed(seed)
    config = clip_config(
        text={**dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2), **(text or {})},
        vision={
            **dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, patch_size=32),
            "image_size": image_size,
            **(vision or {}),
        },
        projection_dim=projection_dim,
        logit_scale_init_value=4.6052,
    )
    model = CLIPModel(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(folder / "_tok")))
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        ),
        tokenizer=tokenizer,
    )
    processor.save_pretrained(folder)
    return folder


def random_image(seed: int, size: tuple[int, int] = (320, 256), mode: str = "RGB") -> Image.Image:
    """A smooth random image (width, height), so resizes are not dominated by noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    small = rng.integers(0, 256, size=(max(h // 16, 2), max(w // 16, 2), 3), dtype=np.uint8)
    image = Image.fromarray(small, "RGB").resize((w, h), Image.BILINEAR)
    noise = rng.integers(-12, 13, size=(h, w, 3))
    array = np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(array, "RGB").convert(mode)


def make_sd_pipeline(folder: Path, sdxl: bool = False, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """A tiny StableDiffusion(XL)Pipeline folder (``save_pretrained`` layout), as diffusers' own tests build."""
    from mmalign.models.builders import TINY_SD, TINY_SDXL_UNET, build_sd_pipeline

    unet = dict(TINY_SD["unet"], **(TINY_SDXL_UNET if sdxl else {}))
    build_sd_pipeline(folder, unet, TINY_SD["vae"], TINY_SD["text"], seed, prediction_type, sdxl=sdxl)
    return Path(folder)


def make_sd3_pipeline(folder: Path, seed: int = 0) -> Path:
    """A tiny StableDiffusion3Pipeline folder (``save_pretrained`` layout): real classes, random weights."""
    from mmalign.models.builders import build_sd3_pipeline

    return build_sd3_pipeline(folder, seed)


def make_flux_pipeline(folder: Path, seed: int = 0) -> Path:
    """A tiny FluxPipeline folder (FLUX.1-dev layout, ``save_pretrained``): real classes, random weights."""
    from mmalign.models.builders import build_flux_pipeline

    return build_flux_pipeline(folder, seed)


def make_flux2_klein_pipeline(folder: Path, seed: int = 0) -> Path:
    """A tiny Flux2KleinPipeline folder (FLUX.2-klein base layout, ``save_pretrained``): real classes, random
    weights, a byte-level Qwen tokenizer."""
    from mmalign.models.builders import build_flux2_klein_pipeline

    return build_flux2_klein_pipeline(folder, seed)


def make_qwen_image_pipeline(folder: Path, seed: int = 0) -> Path:
    """A tiny QwenImagePipeline folder (``save_pretrained`` layout): real classes, random weights, an offline
    Qwen2 tokenizer."""
    from mmalign.models.builders import build_qwen_image_pipeline

    return build_qwen_image_pipeline(folder, seed)


def make_z_image_pipeline(folder: Path, seed: int = 0) -> Path:
    """A tiny ZImagePipeline folder (``save_pretrained`` layout): real classes, random weights, an offline Qwen2
    tokenizer with a chat template."""
    from mmalign.models.builders import build_z_image_pipeline

    return build_z_image_pipeline(folder, seed)


def make_wan_pipeline(folder: Path, seed: int = 0, **options) -> Path:
    """A tiny WanPipeline folder (Wan 2.1 layout with its UniPC flow-sigma scheduler, ``save_pretrained``): real
    classes, random weights, 5 frames and 16 text tokens recorded in its generator config."""
    from mmalign.models.builders import build_wan_pipeline

    return build_wan_pipeline(folder, seed, **options)


def make_animatediff_pipeline(folder: Path, seed: int = 0, **options) -> Path:
    """A tiny AnimateDiffPipeline folder (``save_pretrained`` layout: a ``UNetMotionModel`` with random motion
    modules, the SD VAE and CLIP text tower, DDIM): real classes, random weights, 4 frames recorded in its generator
    config."""
    from mmalign.models.builders import build_animatediff_pipeline

    return build_animatediff_pipeline(folder, seed, **options)


def make_stable_audio_pipeline(folder: Path, seed: int = 0, **options) -> Path:
    """A tiny StableAudioPipeline folder (model_index.json, every component's ``save_pretrained``): real classes,
    random weights, 16 latent frames of hop 4 at 4000 Hz, 12 text tokens."""
    from mmalign.models.builders import build_stable_audio_pipeline

    return build_stable_audio_pipeline(folder, seed, **options)


TINY_AUDIOBOX_WAVLM = {
    "conv_feature_layers": "[(16,10,5)] + [(16,3,2)] * 4 + [(16,2,2)] * 4",  # published: * 2 (320 samples a frame)
    "encoder_layers": 2,
    "encoder_embed_dim": 32,
    "encoder_ffn_embed_dim": 64,
    "encoder_attention_heads": 2,
    "conv_pos": 16,
    "conv_pos_groups": 4,
    "num_buckets": 32,  # published 320 / 800: these reach the exact, log and clamped buckets within 124 frames
    "max_distance": 64,
}


def make_audiobox_model(folder: Path, seed: int = 0, wavlm: dict | None = None, release: bool = False) -> Path:
    """An Audiobox Aesthetics model with every weight random (seeded) in the published layout: the hub folder
    (``config.json`` with ``AesMultiOutput``'s fields + ``model.safetensors``), or with ``release`` the
    ``checkpoint.pt`` of the S3 release (``state_dict`` with a ``model.`` prefix, ``model_cfg``,
    ``target_transform``). ``wavlm``: encoder sizes (default tiny; ``{}`` = the package's WavLM Base), written to
    config.json's ``wavlm`` key, which the package ignores (it always builds WavLM Base)."""
    from safetensors.torch import save_file

    from mmalign.rewards.audiobox import AXES, AestheticsModel, HeadSettings, WavLMSettings

    wavlm = dict(TINY_AUDIOBOX_WAVLM if wavlm is None else wavlm)
    settings = WavLMSettings.from_dict(wavlm)
    generator = torch.Generator().manual_seed(seed)
    transform = {
        axis: {
            "mean": float(5.0 + torch.rand((), generator=generator)),
            "std": float(1.0 + torch.rand((), generator=generator)),
        }
        for axis in AXES
    }
    head = HeadSettings(nth_layer=settings.encoder_layers + 1, target_transform=transform)
    model = AestheticsModel(settings, head)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight") or ".2.weight" in name and "conv_layers.0" in name:
                parameter.copy_(1.0 + 0.1 * torch.randn(parameter.shape, generator=generator))
            elif name.endswith("weight_g"):
                parameter.copy_(0.5 + torch.rand(parameter.shape, generator=generator))
            elif "layer_weights" in name or name.endswith("grep_a"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
            else:
                fan_in = parameter[0].numel() if parameter.ndim > 1 else 1
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / max(fan_in, 1) ** 0.5)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    config = {
        "proj_num_layer": 1,
        "proj_ln": False,
        "proj_act_fn": "gelu",
        "proj_dropout": 0,
        "nth_layer": head.nth_layer,
        "use_weighted_layer_sum": True,
        "precision": "32",
        "normalize_embed": True,
        "output_dim": 1,
        "target_transform": transform,
        "freeze_encoder": True,
    }
    if wavlm:
        config["wavlm"] = wavlm
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if release:
        cfg = {k: v for k, v in config.items() if k != "target_transform"}
        path = folder / "checkpoint.pt"
        torch.save(
            {
                "state_dict": {f"model.{k}": v for k, v in state.items()},
                "model_cfg": cfg,
                "target_transform": transform,
            },
            path,
        )
        return path
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(state, str(folder / "model.safetensors"))
    return folder


def make_audioldm2_pipeline(folder: Path, seed: int = 0, **options) -> Path:
    """A tiny AudioLDM2Pipeline folder (``save_pretrained``): real classes, random weights, a 16 kHz vocoder of hop
    4 on 8 mel bins, latents [4, 8, 4] (0.004 s), 12 text tokens, 8 generated GPT-2 states."""
    from mmalign.models.builders import build_audioldm2_pipeline

    return build_audioldm2_pipeline(folder, seed, **options)
