"""Peak memory and time of a 7B VLM reward on the CPU: HPSv3's architecture (Qwen2-VL-7B-Instruct + its MLP head)
at full size with random weights (nothing is downloaded), in bf16, scoring one 448x448 image.

Each dtype runs in its own process, so its peak resident memory (``ru_maxrss``) is its own: first mmalign's fit
check (:func:`mmalign.rewards.qwen2vl.check_fits`, the parameters counted on the meta device against the free
memory of the moment), then, where it passes, the model built, one image scored, and the peak read. A dtype the
check refuses is reported with the check's message (that is the behaviour under test: a clear refusal instead of
an out-of-memory kill). The checkpoint-file read that a real load adds (HPSv3 reads its file whole first) is not
in the measured peak; the check counts it when a file is given.

    python benchmarks/bench_vlm_memory.py            # -> benchmarks/results/vlm_memory.{json,md}
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
GIB = 2**30

# Qwen/Qwen2-VL-7B-Instruct config.json (transformers 4.45 flat layout), the backbone HPSv3 fine-tunes
QWEN2VL_7B = dict(
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    max_position_embeddings=32768,
    rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
    vocab_size=152064,
    vision_config=dict(
        depth=32,
        embed_dim=1280,
        hidden_size=3584,
        hidden_act="quick_gelu",
        mlp_ratio=4,
        num_heads=16,
        in_channels=3,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
    ),
)


def worker(dtype_name: str, folder: Path) -> dict:
    import numpy as np
    import torch
    from PIL import Image
    from torch import nn

    from mmalign.errors import WeightsError
    from mmalign.rewards.base import resolve_dtype
    from mmalign.rewards.hpsv3 import HPSv3Reward
    from mmalign.rewards.qwen2vl import (
        build_backbone,
        check_fits,
        load_backbone_config,
        load_chat_template,
        load_tokenizer,
        read_pixel_stats,
    )

    torch.set_num_threads(2)
    dtype = resolve_dtype(dtype_name)
    config = load_backbone_config(folder)
    result: dict = {"dtype": dtype_name}
    try:
        result["parameters"] = check_fits("HPSv3-7B", lambda: build_backbone(config, dtype), dtype, "cpu")
    except WeightsError as error:
        result["refused"] = str(error)
        return result
    start = time.perf_counter()
    torch.manual_seed(0)
    backbone = build_backbone(config, dtype)  # transformers' own initialisation, in the dtype
    head = nn.Sequential(
        nn.Linear(3584, 1024), nn.ReLU(), nn.Dropout(0.05), nn.Linear(1024, 16), nn.ReLU(), nn.Linear(16, 2)
    )
    tokenizer = load_tokenizer(folder, ("<|Reward|>",))
    mean, std = read_pixel_stats(folder)
    reward = HPSv3Reward(backbone, head, tokenizer, load_chat_template(folder, tokenizer), mean, std).eval()
    result["build_seconds"] = time.perf_counter() - start
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (448, 448, 3), dtype=np.uint8))
    start = time.perf_counter()
    score = reward.score([image], "a photo of a cat")
    result["score_seconds"] = time.perf_counter() - start
    result["score_finite"] = bool(torch.isfinite(score).all())
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
    result["weights_gib"] = result["parameters"] * dtype.itemsize / GIB
    return result


def write_folder(folder: Path) -> Path:
    sys.path.insert(0, str(REPO))
    from tests import qwen2vl_tiny

    qwen2vl_tiny.write_backbone_folder(folder, corpus="a photo of a cat <|Reward|>")
    config = json.loads((folder / "config.json").read_text())
    config.update(QWEN2VL_7B)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def main() -> None:
    import tempfile

    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2], Path(sys.argv[3]))))
        return
    from harness import cpu_flags, cpu_model

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_folder(Path(tmp) / "qwen2vl-7b")
        for dtype in ("bf16", "fp32"):
            load = Path("/proc/loadavg").read_text().split()[:3]
            env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"}
            done = subprocess.run(
                [sys.executable, __file__, "--worker", dtype, str(folder)], capture_output=True, text=True, env=env
            )
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            row = json.loads(lines[-1]) if lines else {"dtype": dtype, "error": done.stderr[-1500:]}
            row["load_before"] = " ".join(load)
            rows.append(row)
            print(json.dumps(row), flush=True)
    report = {"machine": {"cpu": cpu_model(), "flags": cpu_flags(), "threads": 2}, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "vlm_memory.json").write_text(json.dumps(report, indent=2))
    lines = [
        "# A 7B VLM reward on the CPU: HPSv3's architecture (Qwen2-VL-7B + head), random weights",
        "",
        f"Command: `python benchmarks/bench_vlm_memory.py`. Machine: {report['machine']['cpu']}, flags "
        f"{report['machine']['flags']}, 2 torch threads; load average before each row in the table.",
        "",
        "| dtype | parameters | weights GiB | fit check | build s | score 1 image (448 px) s | peak RSS GiB | load |",
        "|---|---:|---:|---|---:|---:|---:|---|",
    ]
    for row in rows:
        check = "refused: " + row["refused"] if "refused" in row else ("passed" if "parameters" in row else "error")
        params = f"{row['parameters'] / 1e9:.2f}B" if "parameters" in row else ""
        lines.append(
            f"| {row['dtype']} | {params} | {row.get('weights_gib', float('nan')):.1f} | {check} | "
            f"{row.get('build_seconds', float('nan')):.0f} | {row.get('score_seconds', float('nan')):.1f} | "
            f"{row.get('peak_rss_gib', float('nan')):.1f} | {row['load_before']} |"
        )
    (RESULTS / "vlm_memory.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
