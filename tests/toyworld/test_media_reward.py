"""The toy worlds' learned media rewards (``toyworld-video``, ``toyworld-audio``, ``toyworld-multiview``): the inputs
their vision towers see, a saved folder loaded back through the registry's classes and differentiable in the media,
the training script's pieces (near misses, judged groups, the ranking loss against its formula), and the shipped
rewards preferring ground truth to near misses."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from mmalign.toyworld.media_reward import CONFIG_NAME, media_pixels, spectrogram_pixels, stack_pixels
from mmalign.toyworld.sampling import ASSETS
from mmalign.toyworld.train_media_reward import (
    GROUP,
    build_model,
    judge_groups,
    near_miss_group,
    pair_loss,
    reward_world,
    world_words,
)

pytestmark = pytest.mark.usefixtures("one_thread")
needs_base = pytest.mark.skipif(not (ASSETS / "pipeline").is_dir(), reason="assets/toyworld not built")


def test_stacked_frames_and_views():
    media = torch.rand(2, 5, 3, 32, 32)
    pixels = stack_pixels(media, 5)
    assert pixels.shape == (2, 15, 32, 32)
    assert torch.equal(pixels[1, 6:9], media[1, 2] * 2 - 1)  # frame 2 of clip 1: channels 6-8, in [-1, 1]
    assert stack_pixels(torch.rand(1, 4, 3, 64, 64), 4).shape == (1, 12, 32, 32)  # resized to 32 px
    with pytest.raises(ValueError, match=r"\[B, 5, 3, H, W\]"):
        stack_pixels(torch.rand(2, 4, 3, 32, 32), 5)


def test_spectrogram_finds_the_pitch_at_any_rate():
    from mmalign.toyworld.audio_world import AudioPrompt, render_audio

    wave = torch.from_numpy(render_audio(AudioPrompt("high", 1, "slow"), 0))  # 625 Hz = STFT bin 20
    pixels = spectrogram_pixels(wave[None, None], 4000, 4000)
    assert pixels.shape == (1, 1, 32, 32)
    loudest = pixels[0, 0].max(dim=1).values.argmax().item()
    assert loudest == 20 - 2  # bins from the second: row 18
    t = torch.arange(8192) / 8000
    tone = torch.sin(2 * math.pi * 625 * t)[None, None].repeat(1, 2, 1)  # stereo at 8 kHz
    resampled = spectrogram_pixels(tone, 8000, 4000)
    assert resampled[0, 0].max(dim=1).values.argmax().item() == 18
    config = {"input": "spectrogram", "sample_rate": 4000}
    assert torch.equal(media_pixels(wave[None, None], config), pixels)


def test_near_miss_groups_and_judged_groups():
    for name in ("video", "audio", "multiview"):
        world = reward_world(name)
        rng = random.Random(0)
        anchor = world.random_prompt(rng)
        group = near_miss_group(world, anchor, rng)
        assert len(group) == GROUP and group[0] == anchor
        for prompt, name_ in zip(group[1:], world.attributes):  # one near miss per attribute changes it
            assert getattr(prompt, name_) != getattr(anchor, name_)
        media = np.stack([world.render(p, random.Random(i)) for i, p in enumerate(group)])
        judged = judge_groups(world, media, [anchor], group)
        assert judged.shape == (1, GROUP, GROUP)
        assert np.all(np.diagonal(judged[0]) == 1.0)  # every render is exact under its own prompt
        assert judged[0, 1 : 1 + len(world.attributes), 0].max() < 1.0  # near misses fall short of the anchor


def test_pair_loss_is_bradley_terry_over_judged_pairs():
    gen = torch.Generator().manual_seed(0)
    cosine = torch.randn(3, 4, generator=gen)
    judged = torch.tensor([[1.0, 0.5, 0.5, 0.0], [0.2, 0.2, 0.2, 0.2], [0.0, 1.0, 0.25, 0.75]])
    scale = torch.tensor(7.0)
    terms = [
        math.log1p(math.exp(-7.0 * (cosine[r, i] - cosine[r, j]).item()))
        for r in range(3)
        for i in range(4)
        for j in range(4)
        if judged[r, i] > judged[r, j]
    ]
    assert len(terms) == 5 + 0 + 6
    assert pair_loss(cosine, judged, scale).item() == pytest.approx(sum(terms) / len(terms), rel=1e-6)


@pytest.fixture(scope="module")
def saved_video_reward(tmp_path_factory):
    from transformers import CLIPTokenizer

    from mmalign.toyworld.save import save_fp16
    from mmalign.toyworld.train_flow_pipeline import write_small_tokenizer

    if not (ASSETS / "pipeline" / "tokenizer").is_dir():
        pytest.skip("assets/toyworld not built")
    folder = tmp_path_factory.mktemp("video_reward")
    world = reward_world("video")
    write_small_tokenizer(folder, ASSETS / "pipeline" / "tokenizer", world_words(world))
    model = build_model(world, CLIPTokenizer.from_pretrained(str(folder)), seed=3)
    save_fp16(model, folder)
    write_small_tokenizer(folder, ASSETS / "pipeline" / "tokenizer", world_words(world))
    (folder / CONFIG_NAME).write_text(json.dumps({"world": "video", **world.input}))
    return folder, model


def test_saved_reward_loads_scores_and_backpropagates(saved_video_reward):
    from mmalign.errors import ConfigError
    from mmalign.rewards import load_reward
    from mmalign.toyworld.media_reward import MultiViewMediaReward

    folder, model = saved_video_reward
    reward = load_reward("toyworld-video", weights=str(folder))
    assert reward.modality == "video" and reward.is_differentiable
    tokenizer = reward.tokenizer
    prompt = "two red circles moving right"
    assert tokenizer.unk_token_id not in tokenizer(prompt).input_ids[1:-1]
    videos = torch.rand(3, 5, 3, 32, 32, requires_grad=True)
    scores = reward(videos, prompt)
    assert scores.shape == (3,) and scores.abs().max() <= 1.0 + 1e-6
    scores.sum().backward()
    assert videos.grad is not None and videos.grad.abs().sum() > 0
    # the same cosine as the model (fp16 weights loaded back) computes by hand
    model = model.half().float().eval()
    tokens = tokenizer([prompt], return_tensors="pt")
    with torch.no_grad():
        image = model.get_image_features(pixel_values=stack_pixels(videos, 5)).pooler_output
        text = model.get_text_features(input_ids=tokens.input_ids).pooler_output
    expected = torch.nn.functional.cosine_similarity(image, text.expand_as(image))
    torch.testing.assert_close(reward.score(videos.detach(), prompt), expected, atol=1e-5, rtol=1e-5)
    batched = reward.score(videos.detach(), prompt, batch_size=2)
    torch.testing.assert_close(batched, reward.score(videos.detach(), prompt), atol=1e-6, rtol=1e-5)
    with pytest.raises(ConfigError, match="video world's reward, not the multiview"):
        MultiViewMediaReward.from_pretrained(str(folder))
    with pytest.raises(ConfigError, match=CONFIG_NAME):
        MultiViewMediaReward.from_pretrained(str(folder.parent))


@pytest.mark.parametrize(("name", "share"), [("video", 0.65), ("audio", 0.75), ("multiview", 0.75)])
def test_shipped_reward_prefers_ground_truth(name, share):
    """A render of the prompt beats a render with one attribute changed for most prompts and attributes. The video
    reward least (67 of 96 when measured: colour 16, shape 11, count 18, direction 22 of 24): it learnt from the toy
    Wan VAE's reconstructions, which blur shapes (the judge scores them 0.70), and on clean renders it tells shapes
    apart at chance; the audio reward 66 of 72."""
    from mmalign.rewards import load_reward

    if not (ASSETS / f"{name}_reward" / CONFIG_NAME).is_file():
        pytest.skip(f"assets/toyworld/{name}_reward not built")
    reward = load_reward(f"toyworld-{name}")
    world = reward_world(name)
    rng = random.Random(0)
    prompts = random.Random(1).sample(world.all_prompts(), min(24, len(world.all_prompts())))
    wins = total = 0
    for prompt in prompts:
        for attribute in world.attributes:
            wrong = world.perturb(prompt, rng, [attribute])
            media = world.canonical(np.stack([world.render(prompt, rng), world.render(wrong, rng)]))
            scores = reward.score(media, prompt.text)
            wins += int(scores[0] > scores[1])
            total += 1
    assert wins >= share * total, (wins, total)
