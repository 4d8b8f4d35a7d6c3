"""The toy audio world: grammar, split, deterministic clips, and a judge that gives ground truth 1.0 and clips of
another prompt 0 on exactly the attributes that differ."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from mmalign.toyworld.audio_world import (
    AUDIO_ATTRIBUTES,
    SAMPLES,
    AudioPrompt,
    all_audio_prompts,
    corrupt_audio,
    judge_audio,
    judge_audios,
    mean_scores,
    parse_audio_prompt,
    perturb_audio,
    render_audio,
    split_audio_prompts,
)


def test_grammar_round_trip():
    prompts = all_audio_prompts()
    assert len(prompts) == 24 == len({p.text for p in prompts})
    for prompt in prompts:
        assert parse_audio_prompt(prompt.text) == prompt
    assert AudioPrompt("high", 2, "fast").text == "two high beeps fast"
    assert AudioPrompt("deep", 1, "slow").text == "one deep beep slow"
    for bad in ("two high beep fast", "one high beeps fast", "one purple beep fast", "one high beep", "x"):
        with pytest.raises(ValueError):
            parse_audio_prompt(bad)
    with pytest.raises(ValueError):
        AudioPrompt("high", 4, "fast")


def test_split_is_seeded_and_disjoint():
    train, heldout = split_audio_prompts(6, seed=0)
    assert (train, heldout) == split_audio_prompts(6, seed=0)
    assert len(heldout) == 6 and len(train) == 18 and not set(train) & set(heldout)
    assert set(train) | set(heldout) == set(all_audio_prompts())


def test_perturb_changes_exactly_the_named_attributes():
    rng = random.Random(0)
    prompt = AudioPrompt("low", 2, "slow")
    for name in AUDIO_ATTRIBUTES:
        changed = perturb_audio(prompt, rng, [name])
        assert [a for a in AUDIO_ATTRIBUTES if getattr(changed, a) != getattr(prompt, a)] == [name]
    assert corrupt_audio(prompt, rng, 0.0) == prompt


def test_renders_are_deterministic_and_in_range():
    clip = render_audio("three shrill beeps slow", seed=3)
    assert clip.shape == (SAMPLES,) and clip.dtype == np.float32
    assert np.abs(clip).max() <= 1.0
    assert np.array_equal(clip, render_audio("three shrill beeps slow", seed=3))
    assert not np.array_equal(clip, render_audio("three shrill beeps slow", seed=4))


def test_ground_truth_is_judged_exact_on_every_prompt():
    for prompt in all_audio_prompts():
        for seed in range(5):
            verdict = judge_audio(render_audio(prompt, seed), prompt)
            assert verdict.scores() == {**dict.fromkeys(AUDIO_ATTRIBUTES, 1.0), "overall": 1.0, "exact": 1.0}
            assert len(verdict.segments) == prompt.count and verdict.heard_pitch == prompt.pitch


@pytest.mark.parametrize("name", AUDIO_ATTRIBUTES)
def test_a_corrupted_attribute_is_judged_wrong_and_only_it(name):
    rng = random.Random(name)
    for prompt in all_audio_prompts():
        wrong = perturb_audio(prompt, rng, [name])
        scores = judge_audio(render_audio(wrong, 7), prompt).scores()
        assert scores[name] == 0.0
        assert all(scores[other] == 1.0 for other in AUDIO_ATTRIBUTES if other != name)
        assert scores["exact"] == 0.0


def test_silence_noise_and_canonical_tensors():
    prompt = AudioPrompt("high", 1, "fast")
    assert judge_audio(np.zeros(SAMPLES), prompt).overall == 0.0
    noise = np.random.default_rng(0).normal(0, 0.3, SAMPLES)
    assert judge_audio(noise, prompt).pitch == 0.0  # no pitch band dominates white noise
    clips = torch.from_numpy(np.stack([render_audio(prompt, s) for s in range(3)]))[:, None].repeat(1, 2, 1)
    verdicts = judge_audios(clips, [prompt] * 3)  # [B, C, S] stereo tensors
    assert mean_scores(verdicts)["overall"] == 1.0


def test_the_judge_is_a_registered_audio_reward():
    from mmalign import load_reward

    reward = load_reward("toyworld-audio-judge")
    assert reward.modality == "audio" and not reward.is_differentiable
    prompts = ["two high beeps fast", "one deep beep slow"]
    clips = torch.from_numpy(np.stack([render_audio(p, 0) for p in prompts]))[:, None]
    assert reward.score_tensor(clips, prompts).tolist() == [1.0, 1.0]
    assert reward.score_tensor(clips, prompts[::-1]).tolist() == [0.0, 0.0]  # every attribute differs
    upsampled = torch.nn.functional.interpolate(clips, scale_factor=2, mode="linear")  # the same clips at 8 kHz
    assert reward.score_tensor(upsampled, prompts, sample_rate=8000).tolist() == [1.0, 1.0]
