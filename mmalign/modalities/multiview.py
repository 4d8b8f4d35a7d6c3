"""Multi-view sets (renders of one 3D object): float ``[V, 3, H, W]`` in [0, 1] plus optional cameras.

Sources: a folder of views ordered by the numbers in their names (``view_2`` before ``view_10``), a grid image
of ``rows x cols`` views (row-major, as text-to-3D papers tile their renders), or tensors. Cameras (azimuth and
elevation in degrees) come from a ``cameras.json`` next to the views (``<grid>.cameras.json`` beside a grid) or
from arguments. Image rewards are lifted to view sets by :class:`mmalign.rewards.lifted.MultiviewReward`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..errors import MediaError
from . import files_with_suffix
from .image import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, open_image, pil_to_tensor

CAMERAS_FILE = "cameras.json"
_GRID = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")


@dataclass
class MultiView:
    """``views`` float ``[V, 3, H, W]``; ``azimuth`` / ``elevation`` ``[V]`` degrees when known."""

    views: torch.Tensor
    names: list[str]
    azimuth: torch.Tensor | None = None
    elevation: torch.Tensor | None = None
    path: str | None = None


def parse_grid(spec: str | tuple[int, int]) -> tuple[int, int]:
    """``"2x3"`` -> ``(2, 3)`` (rows, cols)."""
    if isinstance(spec, tuple):
        rows, cols = spec
    else:
        match = _GRID.match(str(spec))
        if not match:
            raise ValueError(f"grid must look like RxC (e.g. 2x2), got {spec!r}")
        rows, cols = int(match.group(1)), int(match.group(2))
    if rows < 1 or cols < 1:
        raise ValueError(f"grid needs at least one row and column, got {rows}x{cols}")
    return rows, cols


def split_grid(image: Image.Image, rows: int, cols: int, path: str | os.PathLike = "<image>") -> list[Image.Image]:
    """Cut a grid image into ``rows * cols`` equal tiles, row-major; the size must divide exactly."""
    width, height = image.size
    if width % cols or height % rows:
        raise MediaError(path, f"a {width}x{height} image does not split into a {rows}x{cols} grid of equal views")
    tile_w, tile_h = width // cols, height // rows
    return [
        image.crop((c * tile_w, r * tile_h, (c + 1) * tile_w, (r + 1) * tile_h))
        for r in range(rows)
        for c in range(cols)
    ]


def view_files(folder: str | os.PathLike) -> list[Path]:
    """The image files of a views folder ordered by the numbers in their names (then by name)."""
    return files_with_suffix(Path(folder), IMAGE_EXTENSIONS)


def read_cameras(file: str | os.PathLike, names: Sequence[str]) -> tuple[list[float], list[float]]:
    """Azimuth and elevation per view from JSON: a list of ``{"azimuth", "elevation"}`` in view order, an object
    ``{"azimuth": [...], "elevation": [...]}``, or an object mapping file names to ``{"azimuth", "elevation"}``."""
    file = Path(file)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MediaError(file, f"cannot read cameras ({error})") from error
    try:
        if isinstance(data, list):
            rows = data
        elif isinstance(data, dict) and "azimuth" in data:
            rows = [{"azimuth": a, "elevation": e} for a, e in zip(data["azimuth"], data["elevation"])]
            if len(data["azimuth"]) != len(data["elevation"]):
                raise MediaError(file, "azimuth and elevation lists differ in length")
        elif isinstance(data, dict):
            missing = [n for n in names if n not in data]
            if missing:
                raise MediaError(file, f"no camera for view {missing[0]}")
            rows = [data[n] for n in names]
        else:
            raise MediaError(file, "expected a list or an object of cameras")
        azimuth = [float(row["azimuth"]) for row in rows]
        elevation = [float(row.get("elevation", 0.0)) for row in rows]
    except (KeyError, TypeError, ValueError) as error:
        if isinstance(error, MediaError):
            raise
        raise MediaError(file, f'each camera needs a numeric "azimuth" (and "elevation"): {error}') from error
    if len(azimuth) != len(names):
        raise MediaError(file, f"{len(azimuth)} cameras for {len(names)} views")
    return azimuth, elevation


def read_views(
    source: str | os.PathLike,
    grid: str | tuple[int, int] | None = None,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    cameras: bool = True,
) -> tuple[list[Image.Image], list[str], tuple[list[float], list[float]] | None]:
    """Decode a views folder (or a grid image with ``grid="RxC"``) into RGB images, their names, and the cameras
    of a ``cameras.json`` beside them (``<grid>.cameras.json`` for a grid; ``None`` when there is none or
    ``cameras=False``). With ``grid``, a folder holding one image is split too."""
    path = Path(source)
    if not path.exists():
        raise MediaError(path, "no such file or folder")
    if path.is_dir():
        files = view_files(path)
        if not files:
            raise MediaError(path, "the folder holds no view images")
        if grid is not None:
            if len(files) != 1:
                raise MediaError(path, f"a grid ({grid}) splits one image, but the folder holds {len(files)}")
            return read_views(files[0], grid, max_pixels=max_pixels, cameras=cameras)
        images = [open_image(f, max_pixels=max_pixels) for f in files]
        names = [f.name for f in files]
        camera_file = path / CAMERAS_FILE
        found = read_cameras(camera_file, names) if cameras and camera_file.is_file() else None
        return images, names, found
    if grid is None:
        raise MediaError(path, "a single image is a multi-view set only as a grid: pass grid='RxC' (--grid RxC)")
    rows, cols = parse_grid(grid)
    images = split_grid(open_image(path, max_pixels=max_pixels), rows, cols, path)
    names = [f"{path.name}[{r},{c}]" for r in range(rows) for c in range(cols)]
    camera_file = path.with_suffix(".cameras.json")
    found = read_cameras(camera_file, names) if cameras and camera_file.is_file() else None
    return images, names, found


def check_multiview(views: torch.Tensor, name: str = "views") -> torch.Tensor:
    """Validate a canonical multi-view batch ``[B, V, 3, H, W]`` (a single ``[V, 3, H, W]`` gains a batch axis)."""
    if views.ndim == 4:
        views = views.unsqueeze(0)
    if views.ndim != 5 or views.shape[2] != 3:
        raise ValueError(f"{name}: expected a float tensor [B, V, 3, H, W] in [0, 1], got {tuple(views.shape)}")
    if not views.is_floating_point():
        raise ValueError(f"{name}: expected a float tensor in [0, 1], got dtype {views.dtype}")
    return views


def load_multiview(
    source: str | os.PathLike | torch.Tensor,
    grid: str | tuple[int, int] | None = None,
    *,
    azimuth: Sequence[float] | None = None,
    elevation: Sequence[float] | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> MultiView:
    """A canonical :class:`MultiView` from a views folder, a grid image, or a ``[V, 3, H, W]`` tensor (a
    ``[3, H, W]`` tensor with ``grid`` is split). Explicit ``azimuth`` / ``elevation`` override a cameras file.
    All views must share one size."""
    if isinstance(source, torch.Tensor):
        if source.ndim == 3 and grid is not None:
            rows, cols = parse_grid(grid)
            _, height, width = source.shape
            if height % rows or width % cols:
                raise ValueError(f"a {width}x{height} tensor does not split into a {rows}x{cols} grid")
            th, tw = height // rows, width // cols
            views = torch.stack(
                [source[:, r * th : (r + 1) * th, c * tw : (c + 1) * tw] for r in range(rows) for c in range(cols)]
            )
        else:
            views = check_multiview(source)[0] if source.ndim in (4, 5) else check_multiview(source)
            if source.ndim == 5 and source.shape[0] != 1:
                raise ValueError("load_multiview takes one set [V, 3, H, W]")
        names = [f"view_{i}" for i in range(views.shape[0])]
        path, cameras = None, None
    else:
        images, names, cameras = read_views(source, grid, max_pixels=max_pixels, cameras=azimuth is None)
        first = images[0].size
        odd = next(((n, image.size) for n, image in zip(names, images) if image.size != first), None)
        if odd is not None:
            raise MediaError(
                source, f"view {odd[0]} is {odd[1][0]}x{odd[1][1]}, unlike the first view ({first[0]}x{first[1]})"
            )
        views = torch.stack([pil_to_tensor(image) for image in images])
        path = str(source)
    if azimuth is not None:
        elevation = list(elevation) if elevation is not None else [0.0] * len(azimuth)
        cameras = (list(azimuth), elevation)
    az = el = None
    if cameras is not None:
        if len(cameras[0]) != views.shape[0]:
            raise ValueError(f"{len(cameras[0])} cameras for {views.shape[0]} views")
        az = torch.tensor(cameras[0], dtype=torch.float32)
        el = torch.tensor(cameras[1], dtype=torch.float32)
    return MultiView(views, names, az, el, path)
