"""The default crop of the trainers is the Diffusion-DPO scripts' centre crop (their ``--random_crop`` is off by
default: diffusers ``train_diffusion_dpo.py``, SalesforceAIResearch/DiffusionDPO ``train.py``), with random
horizontal flips still on (their ``--no_hflip`` is off)."""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

from mmalign.trainers.loop import TrainConfig
from tests.trainers.test_training import make_trainer


def wide_pairs(folder, count=4):
    """48x32 (w x h) images: at resolution 32 no resize, and 16 free columns for the crop."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(count):
        for name in (f"w{i}.png", f"l{i}.png"):
            Image.fromarray(rng.integers(0, 256, size=(32, 48, 3), dtype=np.uint8)).save(folder / name)
        lines.append({"prompt": "p", "chosen": f"w{i}.png", "rejected": f"l{i}.png"})
    (folder / "pairs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder / "pairs.jsonl"


def test_default_is_a_centre_crop_with_flips(sd_folder, tmp_path):
    assert TrainConfig().random_crop is False and TrainConfig().hflip is True
    data = wide_pairs(tmp_path / "d")
    trainer = make_trainer(sd_folder, data, tmp_path / "o")  # no random_crop / hflip overrides
    assert trainer.config.random_crop is False
    centre = (0, 8)  # (top, left): 48 - 32 = 16 free columns, half on each side
    flipped = 0
    for epoch in range(4):
        trainer.dataset.set_epoch(epoch)
        for i in range(4):
            item = trainer.dataset[i]
            assert tuple(item["crop_top_left"].tolist()) == centre
            image = np.asarray(Image.open(tmp_path / "d" / f"w{i}.png"), dtype=np.float32)
            crop = torch.from_numpy(image[:, 8:40].copy()).permute(2, 0, 1) / 127.5 - 1
            if torch.allclose(item["chosen_pixels"], crop.flip(-1)):
                flipped += 1
            else:
                torch.testing.assert_close(item["chosen_pixels"], crop)
    assert 0 < flipped < 16  # flips still drawn, per item and epoch

    random = make_trainer(sd_folder, data, tmp_path / "r", "random_crop=true")
    tops = set()
    for epoch in range(4):
        random.dataset.set_epoch(epoch)
        tops |= {tuple(random.dataset[i]["crop_top_left"].tolist()) for i in range(4)}
    assert len(tops) > 1  # random_crop=true still crops at random
