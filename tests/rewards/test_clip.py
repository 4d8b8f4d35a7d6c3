"""PickScore and CLIPScore on a tiny CLIPModel folder, against the references' own computations."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

import mmalign
from mmalign.rewards.clip import TorchmetricsCLIPScoreReward


@pytest.fixture(scope="module")
def reference_model(clip_folder):
    from transformers import CLIPModel, CLIPProcessor

    return CLIPModel.from_pretrained(str(clip_folder)).eval(), CLIPProcessor.from_pretrained(str(clip_folder))


def _feat(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def pickscore_reference(model, processor, images, prompt):
    """PickScore's README snippet: processor -> get_*_features -> normalise -> logit_scale.exp() * cos."""
    from transformers.models.clip import CLIPImageProcessorPil

    pil_processor = CLIPImageProcessorPil(**processor.image_processor.to_dict())
    with torch.no_grad():
        image_inputs = pil_processor(images=images, return_tensors="pt")
        text_inputs = processor.tokenizer(prompt, padding=True, truncation=True, max_length=77, return_tensors="pt")
        image_embs = _feat(model.get_image_features(**image_inputs))
        image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
        text_embs = _feat(model.get_text_features(**text_inputs))
        text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
        return model.logit_scale.exp() * (text_embs @ image_embs.T)[0]


def hessel_reference(model, processor, images, captions):
    """jmhessel/clipscore: OpenAI CLIP transform, 'A photo depicts ' prefix, 2.5 * max(cos, 0)."""
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
        pixels = torch.stack([transform(im) for im in images])
        img = _feat(model.get_image_features(pixel_values=pixels)).numpy()
        tokens = processor.tokenizer(
            ["A photo depicts " + c for c in captions],
            padding=True,
            truncation=True,
            max_length=77,
            return_tensors="pt",
        )
        txt = _feat(model.get_text_features(**tokens)).numpy()
    import numpy as np

    img = img / np.sqrt((img**2).sum(axis=1, keepdims=True))
    txt = txt / np.sqrt((txt**2).sum(axis=1, keepdims=True))
    return torch.from_numpy(2.5 * np.clip((img * txt).sum(axis=1), 0, None)).float()


def test_pickscore_equals_reference(clip_folder, reference_model, image_files):
    reward = mmalign.load_reward("pickscore", weights=str(clip_folder), processor=str(clip_folder))
    images = [Image.open(p).convert("RGB") for p in image_files]
    ours = reward.score(image_files, "a cat wearing a hat")
    ref = pickscore_reference(*reference_model, images, "a cat wearing a hat")
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    probs = reward.probabilities(image_files, "a cat wearing a hat")
    torch.testing.assert_close(probs, torch.softmax(ref, dim=-1), atol=1e-6, rtol=1e-5)
    assert reward.info()["higher_is_better"] is True


def test_pickscore_batch_equals_single_and_tensor_path(clip_folder, image_files):
    reward = mmalign.load_reward("pickscore", weights=str(clip_folder))
    batched = reward.score(image_files, "p", batch_size=8)
    single = torch.cat([reward.score([p], "p") for p in image_files])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)
    images = torch.stack([T.functional.to_tensor(Image.open(p).convert("RGB").resize((224, 224))) for p in image_files])
    images.requires_grad_(True)
    tensor_scores = reward(images, "p")
    tensor_scores.sum().backward()
    assert images.grad.abs().sum() > 0
    file_scores = reward.score([T.functional.to_pil_image(im) for im in images.detach()], "p")
    # float resize vs uint8 PIL resize: documented tolerance in logit units (100 x cosine scale)
    assert (tensor_scores.detach() - file_scores).abs().max() < 0.05


def test_batched_image_processor_equals_one_by_one(clip_folder, image_files):
    """score_images runs the image processor once per batch: bit-identical to one call per image."""
    reward = mmalign.load_reward("pickscore", weights=str(clip_folder))
    images = [Image.open(p).convert("RGB") for p in image_files]
    one_by_one = torch.stack([reward.preprocess_reference(image) for image in images])
    torch.testing.assert_close(reward.preprocess_reference_batch(images), one_by_one, atol=0, rtol=0)


def test_bf16_loads_in_bf16(clip_folder, image_files):
    reward = mmalign.load_reward("pickscore", weights=str(clip_folder), dtype="bf16")
    assert {p.dtype for p in reward.parameters()} == {torch.bfloat16}
    fp32 = mmalign.load_reward("pickscore", weights=str(clip_folder))
    assert {p.dtype for p in fp32.parameters()} == {torch.float32}
    assert (reward.score(image_files, "p") - fp32.score(image_files, "p")).abs().max() < 0.5


def test_clipscore_hessel_equals_reference(clip_folder, reference_model, image_files):
    reward = mmalign.load_reward("clipscore", weights=str(clip_folder))
    captions = ["a dog", "two red circles", "a dog", "text", "a very long caption " * 30]
    images = [Image.open(p) for p in image_files]
    torch.testing.assert_close(
        reward.score(image_files, captions), hessel_reference(*reference_model, images, captions), atol=1e-5, rtol=1e-5
    )
    assert (reward.score(image_files, captions) >= 0).all()


def test_clipscore_torchmetrics_convention(clip_folder, reference_model, image_files):
    reward = mmalign.load_reward("clipscore-tm", weights=str(clip_folder))
    model, processor = reference_model
    images = [Image.open(p).convert("RGB") for p in image_files]
    from transformers.models.clip import CLIPImageProcessorPil

    pil_processor = CLIPImageProcessorPil(**processor.image_processor.to_dict())
    with torch.no_grad():
        img = _feat(model.get_image_features(**pil_processor(images=images, return_tensors="pt")))
        txt = _feat(model.get_text_features(**processor.tokenizer(["a b c"] * 5, padding=True, return_tensors="pt")))
    expected = 100 * torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    scores = reward.score(image_files, "a b c")
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-5)
    assert TorchmetricsCLIPScoreReward.corpus_score(torch.tensor([-3.0, 1.0])) == 0.0
    assert TorchmetricsCLIPScoreReward.corpus_score(torch.tensor([3.0, 1.0])) == 2.0


def test_long_prompt_keeps_end_of_text(clip_folder):
    reward = mmalign.load_reward("clipscore-tm", weights=str(clip_folder))
    tokens = reward.tokenizer(["word " * 200], truncation=True, max_length=reward.max_length)["input_ids"][0]
    assert len(tokens) == 77 and tokens[-1] == reward.tokenizer.eos_token_id
