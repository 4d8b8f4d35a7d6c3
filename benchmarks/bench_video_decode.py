"""Video decode-and-score throughput: seeking decode of the sampled frames vs decoding every frame.

    .venv/bin/python benchmarks/bench_video_decode.py            # 2 clips per codec, 3 repeats (~4 min on 2 cores)
    .venv/bin/python benchmarks/bench_video_decode.py --clips 1 --repeats 1

Clips are generated here (no downloads): 10 s of 1280x720 at 24 fps (moving gradients, a moving disc, per-frame
block noise like sensor grain), encoded with PyAV in two codecs with a keyframe every 48 frames (2 s) and up to 2
B-frames between references, as camera and web files are:

* H.264 (libx264, preset veryfast, crf 23, keyint 48, bframes 2; its default B-pyramid makes most B-frames
  references);
* MPEG-4 Part 2 (FFmpeg ``mpeg4``, qscale 4, GOP 48, 2 B-frames, which are never references).

Each clip is decoded to 16 uniformly sampled frames and scored by a CLIPScore-architecture reward (transformers
``CLIPModel``, ViT-B/32 layout shrunk to 2 layers, random weights; OpenAI CLIP's PIL preprocessing) through
:class:`mmalign.rewards.lifted.VideoReward`. Compared in the same process on the same files:

* ``decode every frame``: decode every frame and convert each to RGB, then pick the 16 (the pattern of
  ``torchvision.io.read_video`` and of loaders that read a clip into memory first);
* ``decode every frame, convert 16``: decode every frame but convert only the 16 (a stronger baseline);
* ``mmalign seeking``: :func:`mmalign.modalities.video.read_frames` (packet index; seek to the keyframe before
  a wanted frame when that skips frames; non-reference frames of unwanted packets skipped; only wanted frames
  converted).

All three return identical frames (checked). Reported per codec: seconds per clip for decode alone and decode +
score, and how many times faster seeking is. Results: ``benchmarks/results/video_decode.{json,md}``. Never a
pass/fail test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mmalign.modalities.video import FrameSampler, read_frames, uniform_indices  # noqa: E402
from mmalign.rewards.lifted import DecodedVideo, VideoReward  # noqa: E402

WIDTH, HEIGHT, FPS, SECONDS, GOP, BFRAMES, SAMPLED = 1280, 720, 24, 10, 48, 2, 16
PROMPT = "a red ball bouncing across a sunny room"
CODECS = {
    "h264": ("libx264", {"preset": "veryfast", "crf": "23", "keyint": str(GOP), "bf": str(BFRAMES)}),
    "mpeg4": ("mpeg4", {"qscale": "4"}),
}


def make_clip(path: Path, seed: int, codec: str) -> None:
    """10 s of moving content at 720p in ``codec`` (a key of :data:`CODECS`)."""
    import av

    name, options = CODECS[codec]
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    base = rng.uniform(0, 1, size=3)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(name, rate=FPS, options=options)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.codec_context.gop_size = GOP
        stream.codec_context.max_b_frames = BFRAMES
        for n in range(FPS * SECONDS):
            t = n / FPS
            frame = np.empty((HEIGHT, WIDTH, 3), dtype=np.float32)
            for c in range(3):
                frame[..., c] = 0.5 + 0.5 * np.sin(xs / (90 + 30 * c) + ys / 140 + t * (1 + c) + base[c] * 6)
            cx, cy = WIDTH * (0.5 + 0.4 * np.sin(t)), HEIGHT * (0.5 + 0.3 * np.cos(1.3 * t))
            frame[(xs - cx) ** 2 + (ys - cy) ** 2 < 90**2] = (1.0, 0.1, 0.1)
            frame += rng.normal(0, 0.02, size=(HEIGHT // 8, WIDTH // 8, 1)).repeat(8, 0).repeat(8, 1)
            rgb = (np.clip(frame, 0, 1) * 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def decode_every_frame(path: Path, indices: list[int], convert_all: bool) -> np.ndarray:
    import av

    wanted = set(indices)
    kept: dict[int, np.ndarray] = {}
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = []
        for n, frame in enumerate(container.decode(stream)):
            if convert_all:
                frames.append(frame.to_ndarray(format="rgb24"))
            elif n in wanted:
                kept[n] = frame.to_ndarray(format="rgb24")
        if convert_all:
            kept = {i: frames[i] for i in wanted}
    return np.stack([kept[i] for i in indices])


def build_scorer() -> VideoReward:
    """CLIPScore on a small random CLIPModel (ViT-B/32 patching, 2 layers), OpenAI CLIP's PIL preprocessing."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    from mmalign.rewards.clip import CLIPScoreReward
    from mmalign.tokenizers import write_clip_tokenizer

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2},
        vision_config={
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 224,
            "patch_size": 32,
        },
        projection_dim=64,
    )
    tokenizer = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(Path(tempfile.mkdtemp()))))
    processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    reward = CLIPScoreReward(CLIPModel(config).eval(), tokenizer, processor)
    return VideoReward(reward, "mean", SAMPLED)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_codec(codec: str, clips: list[Path], scorer: VideoReward, repeats: int) -> list[dict]:
    num_frames = FPS * SECONDS
    indices = uniform_indices(num_frames, SAMPLED)
    sampler = FrameSampler("uniform", SAMPLED)

    def score(frames: np.ndarray) -> float:
        return scorer.score_decoded([DecodedVideo(frames, indices, num_frames, float(FPS))], [PROMPT])[0].total

    methods = {
        "decode every frame": lambda p: decode_every_frame(p, indices, convert_all=True),
        "decode every frame, convert 16": lambda p: decode_every_frame(p, indices, convert_all=False),
        "mmalign seeking": lambda p: read_frames(p, sampler)[0],
    }
    for path in clips:  # identical frames from every method (and a warm-up)
        reference = methods["decode every frame"](path)
        for name, fn in methods.items():
            assert np.array_equal(fn(path), reference), f"{name} decoded different frames from {path}"
        score(reference)
    decode: dict[str, list[list[float]]] = {name: [[] for _ in clips] for name in methods}
    total: dict[str, list[list[float]]] = {name: [[] for _ in clips] for name in methods}
    for _ in range(repeats):  # methods interleaved, so a change in machine load hits them alike
        for c, path in enumerate(clips):
            for name, fn in methods.items():
                decode[name][c].append(timed(lambda p=path, fn=fn: fn(p)))
                total[name][c].append(timed(lambda p=path, fn=fn: score(fn(p))))
    rows = []
    for name in methods:
        decode_s = statistics.mean(statistics.median(times) for times in decode[name])
        total_s = statistics.mean(statistics.median(times) for times in total[name])
        rows.append({"codec": codec, "method": name, "decode_s_per_clip": decode_s, "total_s_per_clip": total_s})
        print(f"{codec:<6} {name:<32} decode {decode_s:7.3f} s/clip   decode+score {total_s:7.3f} s/clip", flush=True)
    seek = rows[-1]
    for row in rows:
        row["clips_per_s"] = 1 / row["total_s_per_clip"]
        row["seeking_speedup"] = row["total_s_per_clip"] / seek["total_s_per_clip"]
        row["seeking_decode_speedup"] = row["decode_s_per_clip"] / seek["decode_s_per_clip"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=2, help="clips per codec")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--codecs", default="h264,mpeg4")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    import av

    codecs = [c for c in args.codecs.split(",") if c]
    missing = [c for c in codecs if CODECS[c][0] not in av.codecs_available]
    if missing:
        print(f"skipping codecs this FFmpeg build cannot encode: {', '.join(missing)}")
        codecs = [c for c in codecs if c not in missing]
    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="mmalign-bench-video-"))
    scorer = build_scorer()
    rows = []
    for codec in codecs:
        print(
            f"writing {args.clips} {codec} clips of {SECONDS} s {WIDTH}x{HEIGHT} @ {FPS} fps to {work} ...", flush=True
        )
        clips = [work / f"{codec}_{n}.mp4" for n in range(args.clips)]
        for n, path in enumerate(clips):
            make_clip(path, n, codec)
        rows += bench_codec(codec, clips, scorer, args.repeats)

    setup = {
        "clips": f"{args.clips} per codec; per clip the median of {args.repeats} runs, methods interleaved",
        "clip": f"{SECONDS} s, {WIDTH}x{HEIGHT}, {FPS} fps ({FPS * SECONDS} frames), yuv420p, keyframe every {GOP} "
        f"frames, up to {BFRAMES} B-frames",
        "codecs": "; ".join(f"{c}: {CODECS[c][0]} {CODECS[c][1]}" for c in codecs),
        "sampled_frames": f"{SAMPLED}, uniform round(linspace(0, F - 1, {SAMPLED}))",
        "scorer": "CLIPScore architecture (CLIPModel, 2-layer ViT-B/32 layout, random weights), OpenAI CLIP PIL "
        "preprocessing, mean over frames",
        "decoder threads": "PyAV thread_type AUTO in every method",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
        f"1-min load average {load_before:.2f} before and {os.getloadavg()[0]:.2f} after",
        "pyav": av.__version__,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "video_decode.json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=2) + "\n")
    lines = [
        "# Video decode-and-score throughput",
        "",
        f"Command: `.venv/bin/python benchmarks/bench_video_decode.py --clips {args.clips} --repeats {args.repeats}`",
        "",
        *(f"- {key}: {value}" for key, value in setup.items()),
        "",
        "| codec | method | decode s/clip | decode+score s/clip | clips/s | seeking faster by (decode+score) "
        "| (decode alone) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['codec']} | {row['method']} | {row['decode_s_per_clip']:.3f} | {row['total_s_per_clip']:.3f} | "
            f"{row['clips_per_s']:.2f} | {row['seeking_speedup']:.2f}x | {row['seeking_decode_speedup']:.2f}x |"
        )
    (out / "video_decode.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
