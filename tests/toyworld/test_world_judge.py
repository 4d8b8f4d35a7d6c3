"""The toyworld grammar, renderer and judge: ground truth scores 1.0, wrong renders score less."""

from __future__ import annotations

import random

import numpy as np
import pytest

from mmalign.toyworld.judge import classify_shape, detect, judge, mean_scores
from mmalign.toyworld.render import Item, draw, render, shape_mask
from mmalign.toyworld.world import ATTRIBUTES, Prompt, all_prompts, corrupt, parse_prompt, perturb, split_prompts


def test_grammar_round_trip():
    prompts = all_prompts()
    assert len(prompts) == 144 == len({p.text for p in prompts})
    for prompt in prompts:
        assert parse_prompt(prompt.text) == prompt
    assert Prompt("red", "circle", 2, "left").text == "two red circles on the left"
    assert Prompt("blue", "square", 1, "top").text == "one blue square at the top"
    for bad in ("two red circle on the left", "four red circles on the left", "one red circle in the middle"):
        with pytest.raises(ValueError):
            parse_prompt(bad)


def test_split_is_seeded_and_disjoint():
    train, heldout = split_prompts(32, seed=0)
    assert (train, heldout) == split_prompts(32, seed=0)
    assert len(heldout) == 32 and len(train) == 112 and not set(train) & set(heldout)


def test_perturb_changes_exactly_the_named_attributes():
    rng = random.Random(0)
    prompt = Prompt("red", "circle", 2, "left")
    for name in ATTRIBUTES:
        changed = perturb(prompt, rng, [name])
        assert [a for a in ATTRIBUTES if getattr(changed, a) != getattr(prompt, a)] == [name]
    assert corrupt(prompt, rng, 0.0) == prompt


def test_shape_templates_match_rendered_shapes_exactly():
    for size in (7, 8, 9, 10):
        for shape in ("circle", "square", "triangle"):
            assert classify_shape(shape_mask(shape, size)) == (shape, 1.0)


def test_rounded_square_is_a_square_and_a_smear_is_a_blob():
    rounded = shape_mask("square", 8).copy()
    rounded[0, 0] = rounded[0, -1] = rounded[-1, 0] = rounded[-1, -1] = False
    assert classify_shape(rounded)[0] == "square"
    smear = np.zeros((8, 8), dtype=bool)
    smear[np.arange(8), np.arange(8)] = True
    smear[np.arange(7), np.arange(1, 8)] = True
    assert classify_shape(smear)[0] == "blob"


def test_judge_scores_ground_truth_one():
    verdicts = []
    for seed, prompt in enumerate(all_prompts() * 3):
        image = render(prompt, seed)
        verdict = judge(image, prompt)
        assert verdict.overall == 1.0 and verdict.exact == 1.0, (prompt.text, seed, verdict)
        assert len(verdict.objects) == prompt.count
        verdicts.append(verdict)
    assert mean_scores(verdicts)["overall"] == 1.0
    assert render(all_prompts()[5], 3).tobytes() == render(all_prompts()[5], 3).tobytes()  # deterministic


@pytest.mark.parametrize("attribute", ["color", "shape", "count"])
def test_judge_scores_wrong_renders_less(attribute):
    rng = random.Random(1)
    for prompt in all_prompts()[::7]:
        wrong = perturb(prompt, rng, [attribute])
        verdict = judge(render(wrong, rng), prompt)
        assert getattr(verdict, attribute) == 0.0
        assert verdict.overall == 0.75
        assert {a: getattr(verdict, a) for a in ATTRIBUTES if a != attribute} == dict.fromkeys(
            [a for a in ATTRIBUTES if a != attribute], 1.0
        )


def test_judge_position_and_empty_canvas():
    prompt = Prompt("green", "square", 1, "left")
    right = render(Prompt("green", "square", 1, "right"), 0)
    assert judge(right, prompt).position == 0.0 and judge(right, prompt).overall == 0.75
    blank = np.full((32, 32, 3), 255, dtype=np.uint8)
    assert judge(blank, prompt).overall == 0.0 and detect(blank) == ()


def test_judge_accepts_text_float_and_chw_inputs():
    prompt = Prompt("yellow", "triangle", 3, "bottom")
    image = render(prompt, 4)
    as_float_chw = image.transpose(2, 0, 1).astype(np.float32) / 255
    assert judge(as_float_chw, prompt.text).overall == 1.0


def test_merged_objects_are_one_blob():
    items = [Item("circle", "red", 4, 10, 9), Item("circle", "red", 11, 10, 9)]  # overlapping discs
    verdict = judge(draw(items), Prompt("red", "circle", 2, "left"))
    assert verdict.count == 0.0 and verdict.shape == 0.0 and verdict.objects[0].shape == "blob"
