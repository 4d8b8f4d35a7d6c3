"""The toy multi-view world: grammar, split, views that move the dot as the camera circles the object, grids that
split as the generator's views split, and a judge that gives ground truth 1.0 and wrong view sets less."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest
import torch

from mmalign.toyworld.multiview_world import (
    AZIMUTHS,
    MULTIVIEW_ATTRIBUTES,
    SIDES,
    VIEWS,
    MultiViewPrompt,
    all_multiview_prompts,
    corrupt_multiview,
    dot_place,
    join_grid,
    judge_views,
    parse_multiview_prompt,
    render_grid,
    render_views,
    split_grid_views,
    split_multiview_prompts,
)
from mmalign.toyworld.world import CANVAS


def test_grammar_round_trip():
    prompts = all_multiview_prompts()
    assert len(prompts) == 144 == len({p.text for p in prompts})
    assert all(parse_multiview_prompt(p.text) == p and p.dot != p.color for p in prompts)
    assert MultiViewPrompt("red", "circle", "blue", "left").text == "a red circle with a blue dot on its left"
    for bad in ("a red circle with a blue dot on its top", "a red circle with blue dot on its left", "red circle"):
        with pytest.raises(ValueError):
            parse_multiview_prompt(bad)
    with pytest.raises(ValueError, match="another colour"):
        MultiViewPrompt("red", "circle", "red", "left")


def test_split_is_seeded_and_disjoint():
    train, heldout = split_multiview_prompts(32, seed=0)
    assert (train, heldout) == split_multiview_prompts(32, seed=0)
    assert len(heldout) == 32 and len(train) == 112 and not set(train) & set(heldout)
    assert set(train) | set(heldout) == set(all_multiview_prompts())


def test_corrupt_keeps_the_grammar():
    rng = random.Random(0)
    prompt = MultiViewPrompt("red", "circle", "blue", "front")
    assert corrupt_multiview(prompt, rng, 0.0) == prompt
    for _ in range(50):
        changed = corrupt_multiview(prompt, rng, 1.0)  # every attribute replaced, the dot never the body's colour
        assert all(getattr(changed, a) != getattr(prompt, a) for a in ("color", "shape", "dot", "side"))


def test_the_dot_goes_round_as_the_camera_circles():
    # a view facing the dot's side shows it centred, the views 90° away at the edges, the opposite view not at all
    assert [dot_place("front", a) for a in AZIMUTHS] == ["centre", "left", None, "right"]
    assert [dot_place("right", a) for a in AZIMUTHS] == ["right", "centre", "left", None]
    for side in SIDES:
        assert sum(dot_place(side, a) is None for a in AZIMUTHS) == 1
    views = render_views(MultiViewPrompt("green", "square", "red", "front"), seed=3)
    assert views.shape == (VIEWS, CANVAS, CANVAS, 3) and views.dtype == np.uint8
    red = [np.argwhere((v == (220, 30, 30)).all(-1)) for v in views]
    green = [np.argwhere((v == (30, 160, 50)).all(-1)) for v in views]
    assert len(red[2]) == 0 and all(len(r) == 16 for r in (red[0], red[1], red[3]))
    assert all(np.array_equal(green[0], g) for g in green)  # the same body in every view
    centre = green[0][:, 1].mean()
    assert (
        red[1][:, 1].mean() < centre - 3 and red[3][:, 1].mean() > centre + 3 and abs(red[0][:, 1].mean() - centre) < 1
    )


def test_ground_truth_is_judged_exact_and_wrong_sets_less():
    for i, prompt in enumerate(all_multiview_prompts()):
        assert judge_views(render_views(prompt, i), prompt).exact == 1.0, prompt.text
    prompt = MultiViewPrompt("blue", "triangle", "yellow", "left")
    views = render_views(prompt, 1)
    assert judge_views(views, replace(prompt, side="right")).scores()["dot"] == 0.0
    assert judge_views(views, replace(prompt, color="red", dot="yellow")).scores() == {
        "color": 0.0, "shape": 1.0, "dot": 1.0, "consistency": 1.0, "overall": 0.75, "exact": 0.0,
    }  # fmt: skip
    mixed = views.copy()
    mixed[2] = render_views(replace(prompt, shape="square"), 1)[2]  # one view of another object
    scores = judge_views(mixed, prompt).scores()
    assert (scores["shape"], scores["consistency"]) == (0.75, 0.75)
    assert judge_views(np.full_like(views, 255), prompt).overall == 0.0
    with pytest.raises(ValueError, match="4 views"):
        judge_views(views[:3], prompt)
    assert set(judge_views(views, prompt).scores()) == {*MULTIVIEW_ATTRIBUTES, "overall", "exact"}


def test_grids_split_as_the_generator_splits_its_images():
    from mmalign.models.view_grid import split_views

    prompt = MultiViewPrompt("yellow", "circle", "green", "back")
    views = render_views(prompt, 7)
    grid = render_grid(prompt, 7)
    assert grid.shape == (2 * CANVAS, 2 * CANVAS, 3) and np.array_equal(split_grid_views(grid), views)
    assert np.array_equal(join_grid(views), grid)
    tensor = torch.from_numpy(grid).permute(2, 0, 1)[None]
    assert torch.equal(split_views(tensor, 2, 2)[0], torch.from_numpy(views).permute(0, 3, 1, 2))
    assert judge_views(grid, prompt).exact == 1.0  # a grid image is judged as its views


def test_multiview_judge_reward_is_registered():
    from mmalign.rewards import load_reward

    reward = load_reward("toyworld-multiview-judge")
    assert reward.modality == "multiview" and not reward.is_differentiable
    prompt = MultiViewPrompt("red", "square", "blue", "right")
    sets = [render_views(prompt, 0), render_views(replace(prompt, color="green"), 0)]
    tensor = torch.from_numpy(np.stack(sets)).permute(0, 1, 4, 2, 3).float() / 255
    assert reward.score(tensor, prompt.text).tolist() == [1.0, 0.75]
    big = torch.nn.functional.interpolate(tensor.flatten(0, 1), scale_factor=2, mode="nearest").view(2, 4, 3, 64, 64)
    assert reward.score(big, prompt.text).tolist() == [1.0, 0.75]  # resized to the world's 32 px
    with pytest.raises(ValueError, match="view sets"):
        reward.score(tensor[0], prompt.text)
