"""Parity of :class:`mmalign.rewards.hpsv3.HPSv3Reward` with the ``hpsv3`` package (PyPI 1.0.0, MizzenAI/HPSv3).

    python -m venv /work/venv-hpsv3 && /work/venv-hpsv3/bin/pip install hpsv3   # its own env (transformers 4.45)
    PYTHONPATH=. .venv/bin/python benchmarks/parity_hpsv3.py --reference-python /work/venv-hpsv3/bin/python

The reference cannot share mmalign's environment (it pins transformers==4.45.2), so it runs as a subprocess
(``benchmarks/_hpsv3_reference_side.py``): in its env a tiny Qwen2-VL folder is written (tests/qwen2vl_tiny.py),
a ``Qwen2VLRewardModelBT`` is built by the package's own ``create_model_and_processor`` (ranknet head,
``<|Reward|>`` added, embedding resized), every weight randomised (seeded), the state dict saved as
``HPSv3.safetensors`` (the published layout), and images scored by ``HPSv3RewardInferencer.reward`` on CPU in
float32, as a batch and one by one. mmalign then loads the same file and folder through ``load_reward("hpsv3")``
and scores the same files and prompts. Images: four synthetic RGB PNGs of different sizes and aspect ratios
(300x400, 512x512, 200x640, 640x360), so the smart resize, padding of the batch and the patch layout all matter.

Writes benchmarks/results/parity_hpsv3.json; exits non-zero if any |difference| > --tol (1e-4).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle on the left", "two blue squares", "a cat walking in snow", "camera"]
SIZES = [(300, 400), (512, 512), (200, 640), (640, 360)]


def make_images(folder: Path) -> list[dict[str, str]]:
    rng = np.random.default_rng(0)
    items = []
    for index, ((height, width), prompt) in enumerate(zip(SIZES, PROMPTS)):
        y, x = np.mgrid[0:height, 0:width]
        array = np.stack([x * 255 // width, y * 255 // height, rng.integers(0, 255, (height, width))], -1)
        path = folder / f"image{index}.png"
        Image.fromarray(array.astype(np.uint8)).save(path)
        items.append({"path": str(path), "prompt": prompt})
    return items


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-python", default="/work/venv-hpsv3/bin/python")
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/parity_hpsv3.json"))
    args = parser.parse_args()

    import mmalign

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        items = make_images(work)
        (work / "images.json").write_text(json.dumps(items))
        started = time.perf_counter()
        subprocess.run(
            [
                args.reference_python,
                str(ROOT / "benchmarks/_hpsv3_reference_side.py"),
                str(work),
                str(work / "images.json"),
                str(work / "reference.json"),
            ],
            check=True,
            cwd=ROOT,
        )
        reference_seconds = time.perf_counter() - started
        reference = json.loads((work / "reference.json").read_text())
        started = time.perf_counter()
        reward = mmalign.load_reward("hpsv3", weights=str(work / "HPSv3.safetensors"), backbone=str(work / "backbone"))
        scores = reward.score_detailed([i["path"] for i in items], [i["prompt"] for i in items])
        single = torch.cat([reward.score([i["path"]], [i["prompt"]]) for i in items])
        ours_seconds = time.perf_counter() - started
    ref_mu, ref_sigma = torch.tensor(reference["mu"]), torch.tensor(reference["sigma"])
    diffs = {
        "mu": (scores.mu - ref_mu).abs().max().item(),
        "sigma": (scores.sigma - ref_sigma).abs().max().item(),
        "mu_one_by_one_vs_reference_one_by_one": (single - torch.tensor(reference["mu_one_by_one"])).abs().max().item(),
    }
    result = {
        "reference": "hpsv3 1.0.0 (PyPI), HPSv3RewardInferencer.reward, transformers 4.45.2, CPU fp32",
        "mmalign": f"mmalign.rewards.hpsv3 on transformers {__import__('transformers').__version__}, CPU fp32",
        "model": "tiny Qwen2-VL (hidden 32, 2 layers, vision depth 1, patch 14, merge 2), ranknet head 32-1024-16-2",
        "images": [f"{h}x{w}" for h, w in SIZES],
        "reference_mu": reference["mu"],
        "mmalign_mu": scores.mu.tolist(),
        "reference_sigma": reference["sigma"],
        "mmalign_sigma": scores.sigma.tolist(),
        "max_abs_diff": diffs,
        "mu_spread_across_images": (ref_mu.max() - ref_mu.min()).item(),
        "tol": args.tol,
        "passed": all(value <= args.tol for value in diffs.values()),
        "seconds": {"reference_incl_setup": round(reference_seconds, 1), "mmalign_incl_load": round(ours_seconds, 1)},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
