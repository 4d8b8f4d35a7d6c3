"""Image decoding: every unusable file gives an error naming it; odd modes are converted."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mmalign.errors import MediaError
from mmalign.modalities.image import list_images, open_image, pil_to_tensor
from tests import tiny


def test_modes_are_converted_to_rgb(tmp_path):
    base = tiny.random_image(0, (40, 30))
    cases = {
        "rgba.png": base.convert("RGBA"),
        "la.png": base.convert("LA"),
        "p.png": base.convert("P"),
        "l.png": base.convert("L"),
        "one.png": base.convert("1"),
        "cmyk.jpg": base.convert("CMYK"),
        "tiny.png": Image.new("RGB", (1, 1), (10, 20, 30)),
    }
    for name, image in cases.items():
        image.save(tmp_path / name)
        out = open_image(tmp_path / name)
        assert out.mode == "RGB", name
    assert open_image(tmp_path / "tiny.png").getpixel((0, 0)) == (10, 20, 30)
    assert open_image(tmp_path / "rgba.png").tobytes() == base.tobytes()


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    out = np.asarray(open_image(tmp_path / "deep.png"))
    assert out[0, :, 0].tolist() == [0, 100, 255]


def test_bad_files_name_the_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    tiny.random_image(1, (300, 300)).save(tmp_path / "good.jpg", quality=90)
    data = (tmp_path / "good.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 3])
    tiny.random_image(1, (64, 64)).save(tmp_path / "good.png")
    png = (tmp_path / "good.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(png[: len(png) // 2])
    for name in ["empty.png", "text.jpg", "truncated.jpg", "truncated.png", "missing.png"]:
        with pytest.raises(MediaError) as info:
            open_image(tmp_path / name)
        assert name in str(info.value)


def test_decompression_bomb_refused_before_decoding(tmp_path):
    Image.new("1", (12000, 12000)).save(tmp_path / "bomb.png")  # 144 Mpx, a few kB on disk
    assert (tmp_path / "bomb.png").stat().st_size < 200_000
    with pytest.raises(MediaError, match="bomb.png.*exceeds the limit"):
        open_image(tmp_path / "bomb.png")
    with pytest.raises(MediaError, match="exceeds"):
        open_image(tmp_path / "bomb.png", max_pixels=1000)


def test_list_images_and_tensor(tmp_path):
    for name in ["b.png", "a.jpg", "notes.txt"]:
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in list_images([tmp_path])] == ["a.jpg", "b.png"]
    with pytest.raises(MediaError, match="nope"):
        list_images([tmp_path / "nope"])
    x = pil_to_tensor(Image.new("RGB", (3, 2), (255, 0, 51)))
    assert x.shape == (3, 2, 3) and x[0].eq(1).all() and abs(float(x[2, 0, 0]) - 0.2) < 1e-6
