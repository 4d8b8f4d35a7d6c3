"""The toy video world: grammar, split, deterministic clips, and a judge that gives ground truth 1.0 and wrong
clips less."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from mmalign.toyworld.render import Item
from mmalign.toyworld.video_world import (
    DIRECTIONS,
    FRAMES,
    VIDEO_ATTRIBUTES,
    VideoPrompt,
    all_video_prompts,
    corrupt_video,
    draw_clip,
    judge_clip,
    judge_clips,
    mean_scores,
    parse_video_prompt,
    perturb_video,
    render_clip,
    split_video_prompts,
)
from mmalign.toyworld.world import CANVAS


def test_grammar_round_trip():
    prompts = all_video_prompts()
    assert len(prompts) == 144 == len({p.text for p in prompts})
    for prompt in prompts:
        assert parse_video_prompt(prompt.text) == prompt
    assert VideoPrompt("red", "circle", 2, "right").text == "two red circles moving right"
    assert VideoPrompt("blue", "square", 1, "up").text == "one blue square moving up"
    for bad in ("two red circle moving right", "one red circle moving around", "one red circle on the left"):
        with pytest.raises(ValueError):
            parse_video_prompt(bad)
    with pytest.raises(ValueError):
        VideoPrompt("purple", "circle", 1, "up")


def test_split_is_seeded_and_disjoint():
    train, heldout = split_video_prompts(32, seed=0)
    assert (train, heldout) == split_video_prompts(32, seed=0)
    assert len(heldout) == 32 and len(train) == 112 and not set(train) & set(heldout)
    assert set(train) | set(heldout) == set(all_video_prompts())


def test_perturb_changes_exactly_the_named_attributes():
    rng = random.Random(0)
    prompt = VideoPrompt("red", "circle", 2, "left")
    for name in VIDEO_ATTRIBUTES:
        changed = perturb_video(prompt, rng, [name])
        assert [a for a in VIDEO_ATTRIBUTES if getattr(changed, a) != getattr(prompt, a)] == [name]
    assert corrupt_video(prompt, rng, 0.0) == prompt


def test_rendering_is_deterministic_and_moves():
    prompt = VideoPrompt("green", "triangle", 3, "down")
    clip = render_clip(prompt, 7)
    assert clip.shape == (FRAMES, CANVAS, CANVAS, 3) and clip.dtype == np.uint8
    np.testing.assert_array_equal(clip, render_clip(prompt.text, random.Random(7)))
    assert not np.array_equal(clip[0], clip[-1])
    assert any(not np.array_equal(clip, render_clip(prompt, seed)) for seed in range(1, 4))


def test_judge_scores_ground_truth_one_for_every_prompt():
    verdicts = [judge_clip(render_clip(p, seed), p) for seed, p in enumerate(all_video_prompts())]
    assert mean_scores(verdicts) == {name: 1.0 for name in (*VIDEO_ATTRIBUTES, "overall", "exact")}


def test_judge_scores_wrong_attributes_lower():
    rng = random.Random(0)
    prompts = random.Random(1).sample(all_video_prompts(), 24)
    for name in VIDEO_ATTRIBUTES:
        for seed, prompt in enumerate(prompts):
            verdict = judge_clip(render_clip(perturb_video(prompt, rng, [name]), seed), prompt)
            assert verdict.scores()[name] == 0.0 and verdict.overall == 0.75, (name, prompt)


def test_judge_reads_canonical_video_tensors_and_still_or_empty_clips():
    prompts = ["one red square moving left", "two blue circles moving up"]
    clips = torch.from_numpy(np.stack([render_clip(p, 3) for p in prompts])).permute(0, 1, 4, 2, 3).float() / 255
    assert [v.overall for v in judge_clips(clips, prompts)] == [1.0, 1.0]
    still = draw_clip([Item("square", "red", 10, 10, 8)], (0, 0))  # right objects, no motion
    assert judge_clip(still, prompts[0]).scores() == {
        "color": 1.0,
        "shape": 1.0,
        "count": 1.0,
        "direction": 0.0,
        "overall": 0.75,
        "exact": 0.0,
    }
    empty = np.full((FRAMES, CANVAS, CANVAS, 3), 255, dtype=np.uint8)
    assert judge_clip(empty, prompts[0]).overall == 0.0
    for direction in DIRECTIONS:  # a lone square moving each way is judged so
        prompt = VideoPrompt("red", "square", 1, direction)
        assert judge_clip(render_clip(prompt, 0), prompt).direction == 1.0


def test_video_judge_reward_is_registered():
    from mmalign.rewards import load_reward

    reward = load_reward("toyworld-video-judge")
    assert reward.modality == "video" and not reward.is_differentiable
    prompt = VideoPrompt("yellow", "circle", 2, "up")
    clips = [render_clip(prompt, 0), render_clip(perturb_video(prompt, random.Random(0), ["direction"]), 0)]
    videos = torch.from_numpy(np.stack(clips)).permute(0, 1, 4, 2, 3).float() / 255
    assert reward.score(videos, prompt.text).tolist() == [1.0, 0.75]
