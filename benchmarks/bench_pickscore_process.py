"""PickScore whole-process and steady-state time, mmalign fp32/bf16 against the README's fp32 code.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_pickscore_process.py --images 16 --batches 8,16

Each row is one fresh Python process (CLIP-H/14 with random weights, saved once as fp32 safetensors like
``yuvalkirstain/PickScore_v1``, page cache warm) that imports its library, loads the model and scores
``--images`` 512 px images of one prompt ``batch`` at a time. Reported per row: whole-process wall time (from
spawn to exit), the phases inside (import, load, score) and the load average at its start and end, since the
machine may be shared. "Steady state" is the score phase alone (preprocessing + both towers). Ratios are against
the README row at the same batch, in the same run. ``--before DIR`` adds mmalign rows from another checkout
(``git archive <commit> | tar -x -C DIR``) to measure a change.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
impl, dtype, batch, n, folder = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
import numpy as np
import torch
from PIL import Image
PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"
rng = np.random.default_rng(0)
images = [Image.fromarray(rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)).resize((512, 512), Image.BICUBIC)
          for _ in range(n)]
if impl == "readme":
    from transformers import AutoProcessor, CLIPModel
    t1 = time.perf_counter()
    processor = AutoProcessor.from_pretrained(folder, backend="pil")
    model = CLIPModel.from_pretrained(folder).eval()
    t2 = time.perf_counter()
    out = []
    for start in range(0, n, batch):  # PickScore README: calc_probs(prompt, images)
        with torch.no_grad():
            image_inputs = processor(images=images[start:start + batch], return_tensors="pt")
            text_inputs = processor(text=PROMPT, padding=True, truncation=True, max_length=77, return_tensors="pt")
            image_embs = model.get_image_features(**image_inputs).pooler_output
            image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
            text_embs = model.get_text_features(**text_inputs).pooler_output
            text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
            out += (model.logit_scale.exp() * (text_embs @ image_embs.T)[0]).tolist()
else:
    import mmalign
    t1 = time.perf_counter()
    reward = mmalign.load_reward("pickscore", weights=folder, processor=folder, dtype=dtype)
    t2 = time.perf_counter()
    out = reward.score(images, PROMPT, batch_size=batch).tolist()
t3 = time.perf_counter()
print("RESULT " + json.dumps(dict(import_s=t1 - t0, load_s=t2 - t1, score_s=t3 - t2, scores=out)))
"""


def loadavg() -> float:
    return os.getloadavg()[0]


def run_row(impl: str, dtype: str, batch: int, args, pythonpath: str) -> dict:
    env = dict(os.environ, PYTHONPATH=pythonpath, TQDM_DISABLE="1")
    before = loadavg()
    start = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            "readme" if impl == "readme" else "mmalign",
            dtype,
            str(batch),
            str(args.images),
            args.workdir,
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{impl} {dtype} batch {batch} failed:\n{proc.stderr[-3000:]}")
    row = dict(
        impl=impl,
        dtype=dtype,
        batch=batch,
        images=args.images,
        process_s=wall,
        load_before=before,
        load_after=loadavg(),
        **json.loads(lines[-1][7:]),
    )
    print(
        f"{impl:<15} {dtype} batch {batch:<3} process {wall:7.1f} s  import {row['import_s']:5.1f}  load "
        f"{row['load_s']:5.1f}  score {row['score_s']:7.1f} s   [load avg {before:.2f} -> {row['load_after']:.2f}]",
        flush=True,
    )
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batches", default="8,16")
    parser.add_argument("--workdir", default="/tmp/mmalign_pickscore_h14")
    parser.add_argument("--before", help="another mmalign checkout: adds its bf16 rows as 'mmalign-before'")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "pickscore_process.json"))
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).parent))
    from profile_pickscore_bf16 import ensure_checkpoint

    ensure_checkpoint(Path(args.workdir))
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = sorted({f for f in flags.split() if f.startswith(("avx512_bf16", "amx", "avx512_fp16"))})
    print(f"cpu bf16 flags {cpu}, {os.cpu_count()} cpus", flush=True)
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        rows.append(run_row("readme", "fp32", batch, args, str(REPO)))
        rows.append(run_row("mmalign", "fp32", batch, args, str(REPO)))
        rows.append(run_row("mmalign", "bf16", batch, args, str(REPO)))
        if args.before:
            rows.append(run_row("mmalign-before", "bf16", batch, args, args.before))
    print(
        "\n| impl | dtype | batch | process s | x README (process) | score s | x README (steady) | load s | load avg |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        ref = next(r for r in rows if r["impl"] == "readme" and r["batch"] == row["batch"])
        print(
            f"| {row['impl']} | {row['dtype']} | {row['batch']} | {row['process_s']:.1f} | "
            f"{ref['process_s'] / row['process_s']:.2f}x | {row['score_s']:.1f} | "
            f"{ref['score_s'] / row['score_s']:.2f}x "
            f"| {row['load_s']:.1f} | {row['load_before']:.1f}-{row['load_after']:.1f} |"
        )
    Path(args.out).write_text(json.dumps(dict(cpu_flags=cpu, command=" ".join(sys.argv), rows=rows), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
