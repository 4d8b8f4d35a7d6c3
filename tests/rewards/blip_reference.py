"""An independent ImageReward v1.0 forward in plain functional torch, for the tests.

Written from the published architecture (THUDM/ImageReward ``ImageReward/ImageReward.py`` with BLIP's
``models/vit.py`` and ``models/med.py``) and reading the ORIGINAL key layout of ``ImageReward.pt``; it uses
none of transformers' BLIP classes, so it checks mmalign's key renaming and module choices.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

MEAN = 0.16717362830052426
STD = 1.0333394966054072


def reference_transform(image: Image.Image, size: int = 224) -> torch.Tensor:
    """ImageReward's ``_transform(224)``, written with torchvision's own Compose."""
    pipeline = transforms.Compose(
        [
            transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(size),
            lambda im: im.convert("RGB"),
            transforms.ToTensor(),
            transforms.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
        ]
    )
    return pipeline(image)


def _linear(x: torch.Tensor, sd: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    return F.linear(x, sd[name + ".weight"], sd[name + ".bias"])


def _layer_norm(x: torch.Tensor, sd: Mapping[str, torch.Tensor], name: str, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps)


def _heads_split(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, length, width = x.shape
    return x.view(batch, length, heads, width // heads).transpose(1, 2)


def vit_forward(sd: Mapping[str, torch.Tensor], pixels: torch.Tensor, heads: int) -> torch.Tensor:
    """BLIP ``VisionTransformer.forward``: patch conv, cls token, pos embed, pre-norm blocks, final norm."""
    p = "blip.visual_encoder."
    weight = sd[p + "patch_embed.proj.weight"]
    x = F.conv2d(pixels, weight, sd[p + "patch_embed.proj.bias"], stride=weight.shape[-1])
    x = x.flatten(2).transpose(1, 2)
    cls = sd[p + "cls_token"].expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1) + sd[p + "pos_embed"][:, : x.shape[1] + 1]
    batch, length, width = x.shape
    depth = 1 + max(int(k[len(p) :].split(".")[1]) for k in sd if k.startswith(p + "blocks."))
    for i in range(depth):
        b = f"{p}blocks.{i}."
        h = _layer_norm(x, sd, b + "norm1", 1e-6)
        qkv = _linear(h, sd, b + "attn.qkv").reshape(batch, length, 3, heads, width // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) * (width // heads) ** -0.5
        h = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, length, width)
        x = x + _linear(h, sd, b + "attn.proj")
        h = _layer_norm(x, sd, b + "norm2", 1e-6)
        x = x + _linear(F.gelu(_linear(h, sd, b + "mlp.fc1")), sd, b + "mlp.fc2")
    return _layer_norm(x, sd, p + "norm", 1e-6)


def _attention(
    sd: Mapping[str, torch.Tensor],
    name: str,
    hidden: torch.Tensor,
    context: torch.Tensor,
    additive_mask: torch.Tensor | None,
    heads: int,
) -> torch.Tensor:
    q = _heads_split(_linear(hidden, sd, name + ".self.query"), heads)
    k = _heads_split(_linear(context, sd, name + ".self.key"), heads)
    v = _heads_split(_linear(context, sd, name + ".self.value"), heads)
    scores = q @ k.transpose(-2, -1) / (q.shape[-1] ** 0.5)
    if additive_mask is not None:
        scores = scores + additive_mask
    out = (scores.softmax(dim=-1) @ v).transpose(1, 2).flatten(2)
    return _linear(out, sd, name + ".output.dense")


def bert_forward(
    sd: Mapping[str, torch.Tensor],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_embeds: torch.Tensor,
    config: Mapping[str, object],
) -> torch.Tensor:
    """med.py ``BertModel`` in 'multimodal' mode, bidirectional: the last hidden state ``[B, L, H]``."""
    p = "blip.text_encoder."
    eps = float(config.get("layer_norm_eps", 1e-12))
    heads = int(config["num_attention_heads"])
    positions = torch.arange(input_ids.shape[1])
    x = sd[p + "embeddings.word_embeddings.weight"][input_ids]
    x = x + sd[p + "embeddings.position_embeddings.weight"][positions]
    x = _layer_norm(x, sd, p + "embeddings.LayerNorm", eps)
    mask = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0  # med.py's extended mask
    for i in range(int(config["num_hidden_layers"])):
        b = f"{p}encoder.layer.{i}."
        a = _attention(sd, b + "attention", x, x, mask, heads)
        x = _layer_norm(a + x, sd, b + "attention.output.LayerNorm", eps)
        c = _attention(sd, b + "crossattention", x, image_embeds, None, heads)  # image mask is all ones
        x = _layer_norm(c + x, sd, b + "crossattention.output.LayerNorm", eps)
        f = _linear(F.gelu(_linear(x, sd, b + "intermediate.dense")), sd, b + "output.dense")
        x = _layer_norm(f + x, sd, b + "output.LayerNorm", eps)
    return x


def head_forward(sd: Mapping[str, torch.Tensor], features: torch.Tensor) -> torch.Tensor:
    """The MLP of ImageReward.py at eval: Linear layers 0, 2, 4, 6, 7 without activations."""
    x = features
    for index in (0, 2, 4, 6, 7):
        x = _linear(x, sd, f"mlp.layers.{index}")
    return x.squeeze(-1)


@torch.no_grad()
def imagereward_scores(
    sd: Mapping[str, torch.Tensor],
    config: Mapping[str, object],
    pixels: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    vision_heads: int,
) -> torch.Tensor:
    """``(mlp(text_cls) - mean) / std`` for preprocessed ``pixels`` ``[B, 3, 224, 224]`` and tokens."""
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    image_embeds = vit_forward(sd, pixels.float(), vision_heads)
    hidden = bert_forward(sd, input_ids, attention_mask, image_embeds, config)
    return (head_forward(sd, hidden[:, 0]) - MEAN) / STD
