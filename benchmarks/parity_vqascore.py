"""Parity of :class:`mmalign.rewards.vqascore.VQAScoreReward` with t2v_metrics' own Qwen-VL VQAScore code.

    python -m venv /work/venv-t2v
    echo /work/main/.venv/lib/python3.11/site-packages > /work/venv-t2v/lib/python3.11/site-packages/zz_main_venv.pth
    /work/venv-t2v/bin/pip install --no-deps t2v-metrics==3.0 qwen-vl-utils==0.0.14
    /work/venv-t2v/bin/pip install "transformers==4.49.0" "tokenizers>=0.21,<0.22" "huggingface-hub<1.0" decord
    PYTHONPATH=. .venv/bin/python benchmarks/parity_vqascore.py --reference-python /work/venv-t2v/bin/python \\
        [--head-source PATH/TO/t2v_metrics/models/vqascore_models/qwen2vl_model.py --head-commit SHA]

t2v-metrics 3.0 (the only release on PyPI) pins torch 2.5.1 and transformers 4.49.0 and imports every model family
at ``import t2v_metrics``; its environment therefore reuses mmalign's torch (the .pth line) with its own
transformers 4.49, and the reference side (``benchmarks/_vqascore_reference_side.py``) loads only the Qwen-VL file
of the package. GitHub main (v3.1, not on PyPI) changed that file (template, ``do_resize=False``, the video's
sampled fps passed to the processor): give its copy with ``--head-source`` to compare with it too.

Here: tiny Qwen2.5-VL and Qwen2-VL chat models are written in the releases' layout (tests/qwen2vl_tiny.py;
generation_config.json with repetition_penalty 1.05, as the Instruct releases), with synthetic PNG images of
several sizes and lossless FFV1 videos; both sides score every (media, prompt) pair with the question template of
mmalign's default (``Does this figure show "{}"? Please answer Yes or No.``), on CPU in float32.

Writes benchmarks/results/parity_vqascore.json (max |delta| per model, media kind and reference).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image

import mmalign
from mmalign.rewards.vqascore import QUESTION_TEMPLATE
from tests import qwen2vl_tiny

MODELS = {"qwen2_5_vl": "qwen2.5-vl-7b", "qwen2_vl": "qwen2-vl-2b"}
IMAGE_SIZES = [(300, 400), (64, 64), (200, 640), (512, 512)]
VIDEOS = [(12, 12, 40, 60), (30, 10, 72, 128), (9, 3, 100, 100)]  # frames, fps, height, width
PROMPTS = ["a red circle", "two blue squares", "a cat walking in snow", "camera"]


def write_media(root: Path) -> tuple[list[Path], list[Path]]:
    import av

    rng = np.random.default_rng(0)
    images = []
    for index, (height, width) in enumerate(IMAGE_SIZES):
        path = root / f"image{index}.png"
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
        images.append(path)
    videos = []
    for index, (count, rate, height, width) in enumerate(VIDEOS):
        path = root / f"clip{index}.mkv"
        frames = rng.integers(0, 255, (count, height, width, 3), dtype=np.uint8)
        with av.open(str(path), "w") as container:
            stream = container.add_stream("ffv1", rate=rate)
            stream.width, stream.height, stream.pix_fmt = width, height, "bgr0"
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        videos.append(path)
    return images, videos


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-python", required=True, help="python of the env with t2v-metrics installed")
    parser.add_argument("--head-source", default=None, help="GitHub main's qwen2vl_model.py, compared as well")
    parser.add_argument("--head-commit", default=None, help="the t2v_metrics commit that --head-source is from")
    parser.add_argument("--out", default="benchmarks/results/parity_vqascore.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        images, videos = write_media(root)
        folders = {kind: qwen2vl_tiny.write_chat_model(root / kind, kind) for kind in MODELS}
        cases = [(p, PROMPTS[i % len(PROMPTS)], "image") for i, p in enumerate(images)]
        cases += [(p, PROMPTS[(i + 1) % len(PROMPTS)], "video") for i, p in enumerate(videos)]
        ours: dict[str, list[float]] = {}
        at_2fps: dict[str, list[float]] = {}  # video_position_fps=2: the 3.0 wheel's temporal positions
        for kind, folder in folders.items():
            image_reward = mmalign.load_reward("vqascore", weights=str(folder))
            video_reward = mmalign.load_reward("vqascore-video", weights=str(folder))
            wheel_like = mmalign.load_reward("vqascore-video", weights=str(folder), video_position_fps=2.0)
            ours[kind] = [
                float((image_reward if media == "image" else video_reward).score([path], prompt)[0])
                for path, prompt, media in cases
            ]
            at_2fps[kind] = [
                float(wheel_like.score([path], prompt)[0]) if media == "video" else math.nan
                for path, prompt, media in cases
            ]
        references = {"t2v-metrics 3.0 (PyPI)": None}
        if args.head_source:
            references["t2v_metrics main (GitHub)"] = args.head_source
        report: dict = {
            "question_template": QUESTION_TEMPLATE,
            "answer": "Yes",
            "cases": [{"media": Path(p).name, "kind": k, "prompt": q} for p, q, k in cases],
            "mmalign": ours,
            "mmalign_video_position_fps_2": {k: [v for v in vs if not math.isnan(v)] for k, vs in at_2fps.items()},
            "references": {},
            "head_commit": args.head_commit,
            "mmalign_env": {"transformers": transformers.__version__, "torch": torch.__version__},
            "note": (
                "t2v-metrics 3.0 does not pass the sampled fps to the Qwen2.5-VL processor (temporal M-RoPE step "
                "from its default 2 fps); GitHub main does, as mmalign's default. Both load the tiny models in "
                "transformers 4.49, whose get_rope_index mmalign follows (transformers 5.24's differs for videos "
                "whose temporal extent passes the spatial one: clip1 at the 2 fps step)."
            ),
        }
        for label, source in references.items():
            job = {
                "source": source,
                "module_name": "qwen2vl_model" if source is None else "qwen2vl_model_main",
                "models": [
                    {
                        "model_name": MODELS[kind],
                        "folder": str(folder),
                        "cases": [
                            {"path": str(p), "prompt": q, "question_template": QUESTION_TEMPLATE} for p, q, _ in cases
                        ],
                    }
                    for kind, folder in folders.items()
                ],
            }
            job_path, out_path = root / "job.json", root / "reference.json"
            job_path.write_text(json.dumps(job))
            run = subprocess.run(
                [args.reference_python, "benchmarks/_vqascore_reference_side.py", str(job_path), str(out_path)],
                capture_output=True,
                text=True,
                env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
            )
            if run.returncode != 0:
                report["references"][label] = {"error": run.stderr[-3000:]}
                print(f"{label}: failed\n{run.stderr[-3000:]}", file=sys.stderr)
                continue
            reference_out = json.loads(out_path.read_text())
            theirs = reference_out["models"]
            entry: dict = {"versions": reference_out["versions"], "scores": {}, "max_abs_delta": {}}
            for kind in MODELS:
                values = theirs[MODELS[kind]]
                entry["scores"][kind] = values
                for media in ("image", "video"):
                    deltas = [abs(a - b) for a, b, c in zip(ours[kind], values, cases) if c[2] == media]
                    entry["max_abs_delta"][f"{kind}/{media}"] = max(deltas)
                deltas = [abs(a - b) for a, b, c in zip(at_2fps[kind], values, cases) if c[2] == "video"]
                entry["max_abs_delta"][f"{kind}/video, mmalign video_position_fps=2"] = max(deltas)
            report["references"][label] = entry
            print(f"{label}: max |delta| {json.dumps(entry['max_abs_delta'])}")
    report["seconds"] = round(time.time() - started, 1)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
