"""Multi-view sets: digit ordering, grids, cameras, tensors, bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmalign.errors import MediaError
from mmalign.modalities import multiview as M
from mmalign.modalities.image import pil_to_tensor

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]


def solid(colour, size=(16, 12)) -> Image.Image:
    return Image.new("RGB", size, colour)


def test_folder_ordered_by_digits_with_cameras(tmp_path):
    for number, colour in zip([10, 2, 1], COLOURS):
        solid(colour).save(tmp_path / f"view_{number}.png")
    (tmp_path / "notes.txt").write_text("ignored")
    cams = [{"azimuth": a, "elevation": 15} for a in (0, 90, 180)]
    (tmp_path / M.CAMERAS_FILE).write_text(json.dumps(cams))
    mv = M.load_multiview(tmp_path)
    assert mv.names == ["view_1.png", "view_2.png", "view_10.png"]
    assert mv.views.shape == (3, 3, 12, 16)
    assert mv.views[0, :, 0, 0].tolist() == [0.0, 0.0, 1.0]  # view_1 is blue
    assert mv.azimuth.tolist() == [0, 90, 180] and mv.elevation.tolist() == [15, 15, 15]
    by_name = {n: {"azimuth": i * 10.0} for i, n in enumerate(mv.names)}
    (tmp_path / M.CAMERAS_FILE).write_text(json.dumps(by_name))
    assert M.load_multiview(tmp_path).azimuth.tolist() == [0, 10, 20]
    (tmp_path / M.CAMERAS_FILE).write_text(json.dumps({"azimuth": [1, 2], "elevation": [0, 0]}))
    with pytest.raises(MediaError, match="cameras.json.*2 cameras for 3 views"):
        M.load_multiview(tmp_path)
    explicit = M.load_multiview(tmp_path, azimuth=[5, 6, 7])
    assert explicit.azimuth.tolist() == [5, 6, 7] and explicit.elevation.tolist() == [0, 0, 0]


def test_grid_split_row_major(tmp_path):
    grid = Image.new("RGB", (48, 24))
    tiles = [solid(c, (16, 12)) for c in COLOURS]
    for n, tile in enumerate(tiles):
        grid.paste(tile, ((n % 3) * 16, (n // 3) * 12))
    path = tmp_path / "grid.png"
    grid.save(path)
    assert M.parse_grid("2x3") == (2, 3) and M.parse_grid(" 2 X 3 ") == (2, 3)
    mv = M.load_multiview(path, "2x3")
    assert mv.views.shape == (6, 3, 12, 16) and mv.azimuth is None
    for view, tile in zip(mv.views, tiles):
        assert torch.equal(view, pil_to_tensor(tile))
    whole = pil_to_tensor(grid)
    assert torch.equal(M.load_multiview(whole, "2x3").views, mv.views)
    with pytest.raises(MediaError, match=r"grid\.png.*4x5 grid"):
        M.load_multiview(path, "4x5")
    with pytest.raises(MediaError, match="grid="):
        M.load_multiview(path)
    with pytest.raises(ValueError):
        M.parse_grid("2by3")


def test_bad_sets_name_the_file(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MediaError, match="empty"):
        M.load_multiview(empty)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    solid(COLOURS[0], (16, 12)).save(mixed / "0.png")
    solid(COLOURS[1], (20, 12)).save(mixed / "1.png")
    with pytest.raises(MediaError, match="1.png"):
        M.load_multiview(mixed)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(MediaError, match="0.png"):
        M.load_multiview(broken)
    (mixed / M.CAMERAS_FILE).write_text("{not json")
    with pytest.raises(MediaError, match="cameras.json"):
        M.read_views(mixed)


def test_tensor_sets():
    views = torch.rand(4, 3, 8, 8)
    mv = M.load_multiview(views, azimuth=np.arange(4) * 90.0, elevation=[0] * 4)
    assert torch.equal(mv.views, views) and mv.azimuth.tolist() == [0, 90, 180, 270]
    assert M.check_multiview(views).shape == (1, 4, 3, 8, 8)
    with pytest.raises(ValueError):
        M.check_multiview(torch.rand(4, 8, 8))
