"""LAION aesthetic predictor (both head variants) and DDPO's JPEG rewards, against their formulas."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

import mmalign
from mmalign.errors import WeightsError
from mmalign.rewards.heads import MLPHead
from tests import tiny


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return tiny.make_clip_model(tmp_path_factory.mktemp("clip768"), projection_dim=768)


def save_head(path, relu: bool, seed: int = 0):
    torch.manual_seed(seed)
    head = MLPHead(768, relu=relu)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.05)
    torch.save(head.state_dict(), path)
    return {k: v.numpy().astype(np.float64) for k, v in head.state_dict().items()}


def reference_aesthetic(backbone, weights, image_paths, relu):
    """simple_inference.py: clip preprocess -> encode_image -> numpy L2 normalise -> MLP (numpy here)."""
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(str(backbone)).eval()
    transform = T.Compose(
        [
            T.Resize(224, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(224),
            lambda im: im.convert("RGB"),
            T.ToTensor(),
            T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
        ]
    )
    with torch.no_grad():
        out = model.get_image_features(pixel_values=torch.stack([transform(Image.open(p)) for p in image_paths]))
    x = (out if isinstance(out, torch.Tensor) else out.pooler_output).numpy().astype(np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    layers = (0, 3, 6, 9, 11) if relu else (0, 2, 4, 6, 7)
    for n, i in enumerate(layers):
        x = x @ weights[f"layers.{i}.weight"].T + weights[f"layers.{i}.bias"]
        if relu and n < 4:
            x = np.maximum(x, 0)
    return torch.from_numpy(x[:, 0]).float()


@pytest.mark.parametrize("relu", [False, True])
def test_aesthetic_equals_reference(backbone, tmp_path, image_files, relu):
    weights = save_head(tmp_path / "head.pth", relu)
    reward = mmalign.load_reward("aesthetic", weights=str(tmp_path / "head.pth"), backbone=str(backbone))
    assert reward.head.relu is relu
    torch.testing.assert_close(
        reward.score(image_files), reference_aesthetic(backbone, weights, image_files, relu), atol=1e-5, rtol=1e-5
    )
    x = torch.rand(2, 3, 256, 256, requires_grad=True)
    reward(x).sum().backward()
    assert x.grad.abs().sum() > 0


def test_aesthetic_unknown_head_layout(backbone, tmp_path):
    torch.save({"fc.weight": torch.zeros(1, 768)}, tmp_path / "odd.pth")
    with pytest.raises(WeightsError, match="layers"):
        mmalign.load_reward("aesthetic", weights=str(tmp_path / "odd.pth"), backbone=str(backbone))
    with pytest.raises(WeightsError, match="weights"):
        mmalign.load_reward("aesthetic", backbone=str(backbone))


def ddpo_jpeg_kb(images: torch.Tensor) -> list[float]:
    """ddpo-pytorch rewards.jpeg_incompressibility, written out."""
    arrays = (images * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy().transpose(0, 2, 3, 1)
    sizes = []
    for array in arrays:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=95)
        sizes.append(buffer.tell() / 1000)
    return sizes


def test_jpeg_rewards_match_ddpo(image_files):
    torch.manual_seed(0)
    images = torch.rand(3, 3, 64, 48)
    expected = torch.tensor(ddpo_jpeg_kb(images))
    incompressible = mmalign.load_reward("jpeg-incompressibility")
    compressible = mmalign.load_reward("jpeg-compressibility")
    torch.testing.assert_close(incompressible.score(images), expected)
    torch.testing.assert_close(compressible.score(images), -expected)
    assert not compressible.is_differentiable
    # files: decoded RGB, same formula; images of different sizes in one call
    pil = [Image.open(p).convert("RGB") for p in image_files]
    from_files = incompressible.score(image_files)
    assert from_files.shape == (len(image_files),)
    torch.testing.assert_close(from_files, torch.tensor(ddpo_jpeg_kb_pil(pil)))
    with pytest.raises(WeightsError):
        mmalign.load_reward("jpeg-compressibility", weights="x.pt")


def ddpo_jpeg_kb_pil(images):
    out = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=95)
        out.append(buffer.tell() / 1000)
    return out
