"""Video samplers (published schemes), seeking decode equal to full decode, GIFs, frame folders, bad files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmalign.errors import MediaError
from mmalign.modalities import video as V
from tests.modalities.tiny_media import random_frames, sine, write_audio_av, write_video


# -- samplers ---------------------------------------------------------------------------------------------------
def test_uniform_indices_follow_linspace_round():
    assert V.uniform_indices(10, 4) == [0, 3, 6, 9]
    assert V.uniform_indices(48, 4) == torch.linspace(0, 47, 4).round().long().tolist()  # qwen-vl-utils
    assert V.uniform_indices(5, 8) == [0, 1, 2, 3, 4]  # never more frames than the clip has
    assert V.uniform_indices(7, 1) == [0]
    with pytest.raises(ValueError):
        V.uniform_indices(0, 3)


def test_fps_indices():
    # 48 frames at 24 fps = 2 s; 2 fps -> 4 frames spread uniformly
    assert V.fps_indices(48, 24.0, 2.0) == V.uniform_indices(48, 4)
    assert V.fps_indices(48, 24.0, 2.0, max_frames=3) == V.uniform_indices(48, 3)
    assert V.fps_indices(5, 24.0, 2.0) == [0]  # shorter than one sampling period: one frame


def vgen_fixed_first(num_frames: int, segments: int) -> list[int]:
    """VGen reward.py: ``video[:, ::segment_span]`` with ``segment_span = frame_num // segments``."""
    span = num_frames // segments
    return list(range(num_frames))[::span]


def test_segment_indices_follow_vgen():
    assert V.segment_indices(16, 8) == [0, 2, 4, 6, 8, 10, 12, 14] == vgen_fixed_first(16, 8)
    assert V.segment_indices(24, 4) == vgen_fixed_first(24, 4)
    # F not divisible by S: VGen's slice yields one extra frame; its first S frames are the segments
    assert V.segment_indices(17, 8) == vgen_fixed_first(17, 8)[:8]
    assert V.segment_indices(5, 8) == [0, 1, 2, 3, 4]
    # TSN: local index uniform in the segment, global = local + s * span
    gen = torch.Generator().manual_seed(0)
    picks = V.segment_indices(17, 8, "random", gen)
    assert all(2 * s <= i < 2 * s + 2 for s, i in enumerate(picks)) and 16 not in picks
    again = V.segment_indices(17, 8, "random", torch.Generator().manual_seed(0))
    assert picks == again
    torch.manual_seed(0)
    local = torch.randint(2, (8,))
    assert picks == (local + torch.arange(8) * 2).tolist()  # the same draw as VGen's torch.randint


def test_frame_sampler():
    assert V.FrameSampler("uniform", 4).indices(10, 8.0) == [0, 3, 6, 9]
    assert V.FrameSampler("segmental", 4).indices(16, 8.0) == [0, 4, 8, 12]
    assert V.FrameSampler("all").indices(3, 8.0) == [0, 1, 2]
    assert V.FrameSampler("fps", 100, fps=1.0).indices(16, 8.0) == [0, 15]
    seeded = V.FrameSampler("segmental", 4, pick="random", seed=3)
    assert seeded.indices(40, 8.0) == seeded.indices(40, 8.0)
    with pytest.raises(ValueError):
        V.FrameSampler("bogus")


# -- decoding ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lossless(tmp_path_factory):
    frames = random_frames(12, seed=1)
    return write_video(tmp_path_factory.mktemp("v") / "clip.mkv", frames), frames


@pytest.fixture(scope="module")
def mpeg4(tmp_path_factory):
    """Inter-coded video with B-frames and several GOPs: the seeking path matters here."""
    frames = random_frames(40, 64, 96, seed=2)
    path = write_video(
        tmp_path_factory.mktemp("v") / "clip.mp4", frames, fps=24, codec="mpeg4", pix_fmt="yuv420p", gop=8, bframes=2
    )
    return path, frames


def test_ffv1_round_trip_is_exact(lossless):
    path, frames = lossless
    got, indices, info = V.read_frames(path)
    assert indices == list(range(12)) and info.num_frames == 12 and info.fps == pytest.approx(8.0)
    assert np.array_equal(got, frames)
    got, indices, _ = V.read_frames(path, [11, 0, 5, 5])
    assert indices == [11, 0, 5, 5] and np.array_equal(got, frames[[11, 0, 5, 5]])
    video = V.load_video(path, V.FrameSampler("uniform", 4))
    assert video.frames.shape == (4, 3, 48, 64) and video.indices == [0, 4, 7, 11]
    assert torch.equal(video.frames, torch.from_numpy(frames[[0, 4, 7, 11]]).permute(0, 3, 1, 2).float() / 255)
    assert video.timestamps == [0.0, 0.5, 0.875, 1.375]


def _all_frames_pyav(path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_seeking_decode_equals_full_decode_and_converts_only_wanted(mpeg4, monkeypatch):
    path, _ = mpeg4
    info = V.probe_video(path)
    assert info.num_frames == 40 and len(info.keyframes) >= 4 and info.keyframes[0] == 0
    reference = _all_frames_pyav(path)
    assert reference.shape[0] == 40
    converted = []
    original = V._rgb
    monkeypatch.setattr(V, "_rgb", lambda frame: converted.append(frame.pts) or original(frame))
    wanted = [3, 17, 18, 39, 30]
    got, _, _ = V.read_frames(path, wanted)
    assert np.array_equal(got, reference[wanted])
    assert len(converted) == len(wanted)  # only the asked-for frames became RGB
    converted.clear()
    got, _, _ = V.read_frames(path, wanted, seek=False)
    assert np.array_equal(got, reference[wanted])
    for sampler in (V.FrameSampler("uniform", 16), V.FrameSampler("segmental", 8, pick="random", seed=1)):
        got, indices, _ = V.read_frames(path, sampler)
        assert np.array_equal(got, reference[indices])


def test_gif_and_frame_folder(tmp_path):
    frames = random_frames(6, 32, 32, seed=3)
    images = [Image.fromarray(f) for f in frames]
    gif = tmp_path / "anim.gif"
    images[0].save(gif, save_all=True, append_images=images[1:], duration=250, loop=0)  # GIF delays are in 1/100 s
    got, indices, info = V.read_frames(gif, V.FrameSampler("uniform", 3))
    assert indices == [0, 2, 5] and info.num_frames == 6 and info.fps == pytest.approx(4.0)
    with Image.open(gif) as reopened:
        reopened.seek(2)
        assert np.array_equal(got[1], np.asarray(reopened.convert("RGB")))
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, image in enumerate(images):
        image.save(folder / f"frame_{i}.png")  # frame_10 must not sort before frame_2
    for i in range(6, 11):
        images[0].save(folder / f"frame_{i}.png")
    got, indices, info = V.read_frames(folder, [2, 10], fps=4)
    assert info.num_frames == 11 and info.fps == 4 and np.array_equal(got, frames[[2, 0]])


def test_tensor_input_and_checks():
    clip = torch.rand(10, 3, 8, 8)
    video = V.load_video(clip, V.FrameSampler("segmental", 5), fps=5)
    assert video.indices == [0, 2, 4, 6, 8] and torch.equal(video.frames, clip[::2])
    assert V.check_video(clip).shape == (1, 10, 3, 8, 8)
    with pytest.raises(ValueError):
        V.check_video(torch.rand(2, 3, 8, 8, 4))


def test_bad_videos_name_the_file(tmp_path, lossless, mpeg4):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.webm"
    garbage.write_bytes(b"\x1a\x45\xdf\xa3 not really a webm" * 4)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(mpeg4[0].read_bytes()[:2000])  # the moov index is at the end: gone
    header_only = tmp_path / "header_only.mkv"
    header_only.write_bytes(lossless[0].read_bytes()[:300])
    audio_only = write_audio_av(tmp_path / "sound.m4a", sine(440, 0.5, 16000), 16000, "aac")
    for path in (empty, garbage, truncated, header_only, audio_only, tmp_path / "missing.mp4"):
        with pytest.raises(MediaError) as info:
            V.read_frames(path, V.FrameSampler("uniform", 4))
        assert path.name in str(info.value)
    with pytest.raises(MediaError, match="zero frames|truncated|cannot"):
        V.read_frames(header_only)
    with pytest.raises(MediaError, match="asked for"):
        V.read_frames(lossless[0], [12])


def test_decord_backend_missing_is_clear(lossless):
    try:
        import decord  # noqa: F401
    except ImportError:
        with pytest.raises(V.BackendMissingError, match=r"mmalign\[video\]"):
            V.read_frames(lossless[0], [0], backend="decord")
    else:
        got, _, _ = V.read_frames(lossless[0], [0, 3], backend="decord")
        assert got.shape == (2, 48, 64, 3)


@pytest.mark.parametrize(
    ("codec", "suffix", "options"),
    [
        ("libx264", ".mp4", {"gop": 8, "bframes": 3}),
        ("libvpx-vp9", ".webm", {"gop": 8}),
        ("mpeg4", ".mov", {"gop": 8, "bframes": 2}),
        ("mpeg4", ".avi", {"gop": 8, "bframes": 2}),
    ],
)
def test_containers_and_codecs_seek_exactly(tmp_path, monkeypatch, codec, suffix, options):
    import av

    if codec not in av.codecs_available:
        pytest.skip(f"this FFmpeg build has no {codec} encoder")
    path = write_video(tmp_path / f"clip{suffix}", random_frames(30, 64, 96, seed=4), 24, codec, "yuv420p", **options)
    reference = _all_frames_pyav(path)
    info = V.probe_video(path)
    assert info.num_frames == len(reference) == 30 and info.fps == pytest.approx(24.0) and len(info.keyframes) > 1
    wanted = [29, 3, 17, 18, 11]
    fallbacks = []
    sequential = V._decode_sequential
    monkeypatch.setattr(V, "_decode_sequential", lambda *a: fallbacks.append(a) or sequential(*a))
    assert np.array_equal(V.read_frames(path, wanted)[0], reference[wanted])
    assert not fallbacks  # the seeking path reached every frame by itself
