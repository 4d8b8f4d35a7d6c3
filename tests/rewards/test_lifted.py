"""Lifted rewards: video (mean, SegVR, TAR, min, temporal consistency) and multi-view (mean, min, cross-view)
against hand computations with tiny image rewards; file and tensor paths."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

import mmalign
from mmalign.modalities.image import pil_to_tensor
from mmalign.rewards import lifted as L
from tests import tiny
from tests.modalities.tiny_media import random_frames, write_video
from tests.tolerances import KERNEL_ATOL, KERNEL_RTOL, kernel_approx

pytestmark = pytest.mark.kernels

PROMPT = "a cat on a mat"


@pytest.fixture(scope="module")
def hps(hps_checkpoint):
    return mmalign.load_reward("hpsv2.1", weights=str(hps_checkpoint), arch=tiny.TINY_OPEN_CLIP)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """A clip of one repeated frame (with that frame as a PNG) and a clip of distinct frames (lossless)."""
    folder = tmp_path_factory.mktemp("clips")
    frame = random_frames(1, 48, 64, seed=5)
    write_video(folder / "still.mkv", np.repeat(frame, 8, axis=0))
    Image.fromarray(frame[0]).save(folder / "still.png")
    distinct = random_frames(16, 48, 64, seed=6)
    write_video(folder / "moving.mkv", distinct)
    return folder, distinct


# -- pure functions ---------------------------------------------------------------------------------------------
def test_tar_weights_and_aggregates_by_hand():
    idx = torch.tensor([0, 2, 4, 6, 8, 10, 12, 14])
    expected = [math.exp(-abs(i - 8)) for i in idx.tolist()]
    assert L.tar_weights(idx, 16).tolist() == pytest.approx(expected)
    assert L.tar_weights(idx, 17, lam=0.5).tolist() == pytest.approx([math.exp(-0.5 * abs(i - 8)) for i in idx])
    scores = torch.tensor([[1.0, 2.0, 4.0], [0.0, -1.0, 1.0]])
    weights = torch.tensor([0.5, 1.0, 0.25])
    assert L.aggregate_scores(scores, "mean").tolist() == pytest.approx([7 / 3, 0.0])
    assert L.aggregate_scores(scores, "segmental").tolist() == pytest.approx([7 / 3, 0.0])
    assert L.aggregate_scores(scores, "tar", weights).tolist() == pytest.approx([(0.5 + 2 + 1) / 3, (-1 + 0.25) / 3])
    assert L.aggregate_scores(scores, "min").tolist() == [1.0, -1.0]
    with pytest.raises(ValueError):
        L.aggregate_scores(scores, "tar")


def test_consistency_terms_by_hand():
    features = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]]])
    half = 1 / math.sqrt(2)
    assert L.temporal_consistency(features).item() == pytest.approx((0 + half) / 2)
    assert L.cross_view_consistency(features).item() == pytest.approx((0 + half + half) / 3)
    assert L.temporal_consistency(features[:, :1]).item() == 1.0


# -- video ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("aggregate", ["mean", "segmental", "min"])
def test_repeated_frame_scores_as_its_image(hps, clips, aggregate):
    folder, _ = clips
    image_score = hps.score([folder / "still.png"], PROMPT)
    video = L.VideoReward(hps, aggregate, frames=4)
    result = video.score_files([folder / "still.mkv"], PROMPT)[0]
    assert result.total == kernel_approx(image_score.item())
    assert result.units == kernel_approx([image_score.item()] * 4)
    assert result.unit == "frame" and result.extra["num_frames"] == 8
    expected_positions = [0, 2, 4, 6] if aggregate == "segmental" else [0, 2, 5, 7]
    assert result.positions == expected_positions
    assert video.score(folder / "still.mkv", PROMPT).item() == kernel_approx(image_score.item())


def test_repeated_frame_tensor_path_and_tar(hps, clips):
    folder, _ = clips
    frame = pil_to_tensor(Image.open(folder / "still.png"))
    still = frame.expand(8, -1, -1, -1).clone().requires_grad_(True)
    image = hps.score_tensor(frame[None], PROMPT)
    mean = L.VideoReward(hps, "mean", 8).score_tensor(still[None], PROMPT)
    torch.testing.assert_close(mean, image, atol=KERNEL_ATOL, rtol=KERNEL_RTOL)
    tar = L.VideoReward(hps, "tar", 4)
    detailed = tar.score_detailed(still[None], PROMPT)
    weights = torch.tensor([math.exp(-abs(i - 4)) for i in (0, 2, 4, 6)])
    assert detailed.positions.tolist() == [[0, 2, 4, 6]]
    torch.testing.assert_close(detailed.weights[0], weights)
    torch.testing.assert_close(detailed.total, image * weights.mean(), atol=KERNEL_ATOL, rtol=KERNEL_RTOL)
    detailed.total.sum().backward()
    assert still.grad is not None and still.grad.abs().sum() > 0
    file_result = tar.score_files([folder / "still.mkv"], PROMPT)[0]
    assert file_result.weights == pytest.approx(weights.tolist())
    assert file_result.total == kernel_approx(float(image.detach() * weights.mean()))


def test_aggregations_match_hand_computation(hps):
    torch.manual_seed(0)
    videos = torch.rand(2, 16, 3, 32, 40)
    prompts = ["a red car", "a blue boat"]
    per_frame = torch.stack(
        [torch.stack([hps.score_tensor(videos[b, i][None], prompts[b])[0] for i in range(16)]) for b in range(2)]
    ).detach()
    with torch.no_grad():
        seg = L.VideoReward(hps, "segmental", 8).score_detailed(videos, prompts)
        torch.testing.assert_close(seg.units, per_frame[:, ::2], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(seg.total, per_frame[:, ::2].mean(dim=1), atol=1e-5, rtol=1e-5)
        tar = L.VideoReward(hps, "tar", 8).score_tensor(videos, prompts)
        weights = torch.exp(-(torch.arange(0, 16, 2) - 8).abs().float())
        torch.testing.assert_close(tar, (weights * per_frame[:, ::2]).mean(dim=1), atol=1e-5, rtol=1e-5)
        low = L.VideoReward(hps, "min", 16).score_tensor(videos, prompts)
        torch.testing.assert_close(low, per_frame.min(dim=1).values, atol=1e-5, rtol=1e-5)
        mean = L.VideoReward(hps, "mean", 4).score_detailed(videos, prompts)
        assert mean.positions.tolist() == [[0, 5, 10, 15]] * 2
        torch.testing.assert_close(mean.total, per_frame[:, [0, 5, 10, 15]].mean(dim=1), atol=1e-5, rtol=1e-5)
        # TSN: a random frame per segment, drawn per clip
        rnd = L.VideoReward(hps, "segmental", 8, pick="random").score_detailed(
            videos, prompts, generator=torch.Generator().manual_seed(1)
        )
        for b in range(2):
            assert all(2 * s <= i < 2 * s + 2 for s, i in enumerate(rnd.positions[b].tolist()))
            torch.testing.assert_close(rnd.units[b], per_frame[b, rnd.positions[b]], atol=1e-5, rtol=1e-5)
        # frames sampled elsewhere: positions given, TAR centred on the source clip
        given = L.VideoReward(hps, "tar", 4).score_detailed(
            videos[:, [0, 5, 10, 15]], prompts, indices=[0, 5, 10, 15], num_frames=16
        )
        w = torch.exp(-(torch.tensor([0, 5, 10, 15]) - 8).abs().float())
        torch.testing.assert_close(given.total, (w * per_frame[:, [0, 5, 10, 15]]).mean(dim=1), atol=1e-5, rtol=1e-5)


def test_temporal_consistency_term(hps):
    torch.manual_seed(1)
    videos = torch.rand(1, 4, 3, 32, 32)
    reward = L.VideoReward(hps, "mean", 4, consistency_weight=0.5)
    with torch.no_grad():
        out = reward.score_detailed(videos, PROMPT)
        features = hps.encode_image(hps.preprocess_tensor(videos[0]))
        cos = [(features[i] @ features[i + 1]).item() for i in range(3)]
        plain = L.VideoReward(hps, "mean", 4).score_tensor(videos, PROMPT)
    assert out.consistency.item() == pytest.approx(sum(cos) / 3, abs=1e-5)
    assert out.total.item() == pytest.approx(plain.item() + 0.5 * sum(cos) / 3, abs=1e-5)


def test_file_units_equal_image_scores_of_decoded_frames(hps, clips):
    folder, distinct = clips
    result = L.VideoReward(hps, "segmental", 4).score_files([folder / "moving.mkv"], PROMPT)[0]
    assert result.positions == [0, 4, 8, 12]
    images = [Image.fromarray(distinct[i]) for i in result.positions]
    assert result.units == kernel_approx(hps.score(images, PROMPT).tolist())


def test_prompt_free_non_differentiable_reward(clips):
    folder, distinct = clips
    jpeg = mmalign.load_reward("jpeg-incompressibility")
    video = L.VideoReward(jpeg, "mean", 3)
    assert not video.uses_prompt and not video.is_differentiable
    result = video.score_files([folder / "moving.mkv"])[0]
    expected = jpeg.score([Image.fromarray(distinct[i]) for i in (0, 8, 15)]).tolist()
    assert result.units == pytest.approx(expected) and result.total == pytest.approx(np.mean(expected))
    with pytest.raises(ValueError, match="consistency"):
        L.VideoReward(jpeg, "mean", 3, consistency_weight=1.0).score_tensor(torch.rand(1, 3, 3, 16, 16))


# -- multi-view --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def view_sets(tmp_path_factory):
    folder = tmp_path_factory.mktemp("views")
    tiles = [tiny.random_image(10 + n, (40, 32)) for n in range(4)]
    views = folder / "set"
    views.mkdir()
    for n, tile in enumerate(tiles):
        tile.save(views / f"view_{n}.png")
    grid = Image.new("RGB", (80, 64))
    for n, tile in enumerate(tiles):
        grid.paste(tile, ((n % 2) * 40, (n // 2) * 32))
    grid.save(folder / "grid.png")
    return views, folder / "grid.png", tiles


def test_multiview_mean_min_and_grid(hps, view_sets):
    views, grid, tiles = view_sets
    per_view = hps.score(tiles, PROMPT)
    mean = L.MultiviewReward(hps, "mean").score_files([views], PROMPT)[0]
    assert mean.units == kernel_approx(per_view.tolist())
    assert mean.total == kernel_approx(per_view.mean().item()) and mean.positions == [
        0,
        1,
        2,
        3,
    ]
    low = L.MultiviewReward(hps, "min", grid="2x2").score_files([grid], PROMPT)[0]
    assert low.units == kernel_approx(per_view.tolist())
    assert low.total == kernel_approx(per_view.min().item())
    tensor = torch.stack([pil_to_tensor(t) for t in tiles])[None]
    torch.testing.assert_close(
        L.MultiviewReward(hps, "mean").score_tensor(tensor, PROMPT),
        hps.score_tensor(tensor[0], PROMPT).mean()[None],
        atol=KERNEL_ATOL,
        rtol=KERNEL_RTOL,
    )


def test_cross_view_consistency(clip_folder, view_sets):
    views, _, tiles = view_sets
    pick = mmalign.load_reward("pickscore", weights=str(clip_folder))
    reward = L.MultiviewReward(pick, "mean", consistency_weight=2.0)
    result = reward.score_files([views], PROMPT)[0]
    with torch.no_grad():
        features = pick.encode_image(torch.stack([pick.preprocess_reference(t) for t in tiles]))
    pairs = [(features[i] @ features[j]).item() for i in range(4) for j in range(i + 1, 4)]
    assert result.consistency == pytest.approx(np.mean(pairs), abs=1e-5)
    plain = pick.score(tiles, PROMPT).mean().item()
    assert result.total == pytest.approx(plain + 2.0 * np.mean(pairs), rel=1e-5)


def test_lifting_errors(hps):
    with pytest.raises(ValueError, match="video or multiview"):
        L.lift(hps, "audio")
    with pytest.raises(ValueError, match="tar"):
        L.MultiviewReward(hps, "tar")
    assert isinstance(L.lift(hps, "video", aggregate="tar"), L.VideoReward)
    lifted = L.lift(hps, "multiview", aggregate="min")
    assert lifted.info()["aggregate"] == "min" and lifted.info()["modality"] == "multiview"
    with pytest.raises(ValueError, match="only image rewards"):
        L.VideoReward(lifted)
