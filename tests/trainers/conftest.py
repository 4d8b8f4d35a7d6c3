"""Tiny SD / SDXL pipelines and small preference datasets for trainer tests."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mmalign.modalities.image import pil_to_tensor
from mmalign.rewards.base import Reward
from tests import tiny


@pytest.fixture(scope="session")
def sd_folder(tmp_path_factory):
    return tiny.make_sd_pipeline(tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="session")
def sd3_folder(tmp_path_factory):
    return tiny.make_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "pipe", seed=0)


@pytest.fixture(scope="session")
def sdxl_folder(tmp_path_factory):
    return tiny.make_sd_pipeline(tmp_path_factory.mktemp("sdxl"), sdxl=True)


def write_pairs(folder, count: int = 8, size: int = 40, bad_rows: bool = False):
    """Pairs whose winner is a bright image and loser a dark one, with two prompts."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(count):
        bright = rng.integers(150, 256, size=(size, size, 3), dtype=np.uint8)
        dark = rng.integers(0, 100, size=(size, size, 3), dtype=np.uint8)
        Image.fromarray(bright).save(folder / f"w{i}.png")
        Image.fromarray(dark).save(folder / f"l{i}.png")
        lines.append({"prompt": ["a bright image", "light"][i % 2], "chosen": f"w{i}.png", "rejected": f"l{i}.png"})
    if bad_rows:
        lines.append({"prompt": "missing rejected", "chosen": "w0.png"})
        lines.append({"prompt": "no such image", "chosen": "w0.png", "rejected": "nope.png"})
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("pairs"))


def interrupt_then_resume(build, tmp_path, monkeypatch, steps: int = 3):
    """Train ``steps`` steps uninterrupted (``build(out, *overrides)`` makes a trainer whose checkpoint_every is
    2); train again, crash in the last step after the step-2 checkpoint, resume; return (uninterrupted, resumed)."""
    full = build(tmp_path / "a")
    full.train()
    interrupted = build(tmp_path / "b")
    original, calls = interrupted._train_step, {"n": 0}

    def crash_in_last():
        calls["n"] += 1
        if calls["n"] == steps:
            raise KeyboardInterrupt
        return original()

    monkeypatch.setattr(interrupted, "_train_step", crash_in_last)
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    # atomic: the one checkpoint, no temporary folder left behind
    assert [c.name for c in (tmp_path / "b" / "checkpoints").iterdir()] == ["step-0000002"]
    resumed = build(tmp_path / "b", "resume=latest")
    resumed.train()
    assert resumed.step == steps
    return full, resumed


class Brightness(Reward):
    """Mean pixel value: a tiny differentiable reward."""

    name = "brightness"
    uses_prompt = False

    def preprocess_reference(self, image):
        return pil_to_tensor(image)

    def preprocess_tensor(self, images):
        return images

    def score_pixels(self, pixels, prompts):
        return pixels.float().mean(dim=(1, 2, 3))


def make_online(trainer, model, data, out, *overrides, reward=None, defaults=()):
    """An online trainer on a tiny pipeline: 32 px, batches of 2, LoRA rank 4, two steps, no tracker."""
    from mmalign.commands.train import resolve_trainer_config

    base = [
        f"trainer={trainer}",
        f"model={model}",
        f"data={data}",
        f"output_dir={out}",
        "resolution=32",
        "batch_size=2",
        "tracker=none",
        "progress=false",
        "log_every=1",
        "max_steps=2",
        "lora_rank=4",
        *defaults,
    ]
    cls, config = resolve_trainer_config(None, base + list(overrides))
    return cls(config, reward=reward)


def make_flow(trainer, model, data, out, *overrides, reward=None):
    """A flow-matching online trainer: groups of 2, 3 sampling steps, LoRA alpha 8, lr 1e-2, a brightness reward."""
    defaults = ("group_size=2", "sample_steps=3", "lora_alpha=8", "lr=1e-2")
    reward = reward if reward is not None else Brightness()
    return make_online(trainer, model, data, out, *overrides, reward=reward, defaults=defaults)
