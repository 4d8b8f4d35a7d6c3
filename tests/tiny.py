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


def make_clip_model(folder: Path, seed: int = 0, image_size: int = 224, projection_dim: int = 32) -> Path:
    """A tiny transformers CLIPModel + CLIPProcessor folder (``save_pretrained`` layout)."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.models.clip import CLIPImageProcessorPil

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        ),
        vision_config=dict(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=32,
        ),
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
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    text_kwargs = dict(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        projection_dim=32,
    )
    unet_kwargs = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=(2, 4),
    )
    if sdxl:
        unet_kwargs.update(
            cross_attention_dim=64,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,
            use_linear_projection=True,
            transformer_layers_per_block=(1, 1),
        )
    else:
        unet_kwargs.update(cross_attention_dim=32)
    unet = UNet2DConditionModel(**unet_kwargs)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        norm_num_groups=8,
        sample_size=32,
    )
    scheduler = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type=prediction_type,
        clip_sample=False,
        steps_offset=1,
    )
    tokenizer = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(Path(folder) / "_tok")))
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_kwargs))
    if sdxl:
        from diffusers import StableDiffusionXLPipeline

        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_kwargs))
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            unet=unet,
            scheduler=scheduler,
        )
    else:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.save_pretrained(folder)
    return Path(folder)
