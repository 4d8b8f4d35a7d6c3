"""Multi-view generators as image grids (mmalign/models/view_grid.py): the views are the grid's tiles as
``mmalign score --grid`` reads them, image rewards are lifted to the views, and an online trainer trains."""

from __future__ import annotations

import types

import pytest
import torch
from torchvision.transforms.functional import to_pil_image

from mmalign.modalities.image import pil_to_tensor
from mmalign.modalities.multiview import split_grid
from mmalign.models.view_grid import ViewGridGenerator, split_views
from mmalign.rewards.lifted import MultiviewReward
from tests.trainers.conftest import make_flow

pytestmark = pytest.mark.usefixtures("one_thread")


def test_views_are_the_tiles_the_scorer_reads_and_gradients_pass():
    images = torch.rand(2, 3, 8, 12, requires_grad=True)
    views = split_views(images, 2, 3)
    assert views.shape == (2, 6, 3, 4, 4)
    for b in range(2):
        tiles = split_grid(to_pil_image(images[b].detach()), 2, 3)
        for v, tile in enumerate(tiles):  # to_pil_image truncates to 8 bits
            assert (pil_to_tensor(tile) - views[b, v].detach()).abs().max() <= 1 / 255 + 1e-6
    views[:, 5].sum().backward()  # the last view is the bottom-right tile
    assert images.grad[:, :, 4:, 8:].eq(1).all() and images.grad[:, :, :4].eq(0).all()
    with pytest.raises(ValueError, match="do not split into a 3x3 grid"):
        split_views(images, 3, 3)


def test_only_image_generators_make_view_grids():
    with pytest.raises(ValueError, match="needs an image generator"):
        ViewGridGenerator(types.SimpleNamespace(modality="video"), "2x2")
    with pytest.raises(ValueError, match="RxC"):
        ViewGridGenerator(types.SimpleNamespace(modality="image"), "four")


def test_flow_grpo_trains_a_view_grid_with_a_lifted_reward(sd3_folder, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red chair\na blue car\n")
    trainer = make_flow("flow-grpo", sd3_folder, prompts, tmp_path / "run", "views_grid=2x2")
    policy = trainer.policy
    assert policy.modality == "multiview" and policy.views == 4 and policy.grid == "2x2"
    assert isinstance(trainer.reward.rewards[0], MultiviewReward)  # the image reward, lifted to the views
    latents = torch.randn(1, *trainer.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        views, grid = policy.decode(latents), policy.generator.decode(latents)
    assert views.shape == (1, 4, 3, 16, 16) and torch.equal(views[0, 1], grid[0, :, :16, 16:])
    before = {k: v.clone() for k, v in trainer._trainable_state().items()}
    summary = trainer.train()
    after = trainer._trainable_state()
    assert summary["steps"] == 2 and sum(not torch.equal(before[k], after[k]) for k in before) > len(before) // 2
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()
