"""Pairs/s of a 10,000-pair reward benchmark: ``mmalign.bench`` vs a naive per-pair loop, in the same run.

Data: 1,000 prompts x 5 images (smooth random PNGs, 96-256 px) on disk; every C(5, 2) = 10 pairs of a prompt
becomes a JSONL line ``{prompt, chosen, rejected}`` -> 10,000 pairs over 5,000 distinct images.

Reward: the tiny PickScore-format CLIP of ``tests/tiny.py`` (transformers ``CLIPModel``, 2 + 2 layers, width
48/32, 224 px, patch 32; random weights), so the figure measures the benchmark machinery (decode, preprocess,
batching, caching) rather than a large tower; ``--size small`` uses a 6 + 6-layer, width-256 CLIP instead.

* mmalign: ``load_benchmark("pairs", ...)`` + ``run_rewards``: each distinct image decoded and encoded once,
  batches of ``--batch-size`` sorted by prompt, text features cached per prompt, bootstrap CI included.
* naive: PickScore's reference evaluation loop (``trainer/scripts/eval_preference_predictor.py``
  ``infer_example``): per pair, decode both images, encode both and the prompt, compare.

Both give the same accuracy (checked). Never a pass/fail test.

    .venv/bin/python benchmarks/bench_reward_protocols.py               # about 3 minutes on 2 cores
    .venv/bin/python benchmarks/bench_reward_protocols.py --pairs 1000  # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from itertools import combinations
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mmalign.bench import protocols as P  # noqa: E402
from mmalign.bench.runner import RewardSpec, load_benchmark, run_rewards  # noqa: E402
from mmalign.modalities.image import open_image  # noqa: E402
from tests.tiny import make_clip_model, random_image  # noqa: E402


def make_small_clip(folder: Path) -> Path:
    """A 6 + 6-layer, width-256 CLIP in the same save_pretrained layout as the tiny one."""
    from transformers import CLIPModel

    from mmalign.models.builders import clip_config

    make_clip_model(folder)  # tokenizer + processor files
    torch.manual_seed(0)
    config = clip_config(
        text=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4),
        vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4, patch_size=32),
        projection_dim=256,
    )
    CLIPModel(config).eval().save_pretrained(folder)
    return folder


def make_data(folder: Path, n_pairs: int, per_prompt: int = 5) -> Path:
    pairs_per_prompt = per_prompt * (per_prompt - 1) // 2
    n_prompts = -(-n_pairs // pairs_per_prompt)
    lines = []
    for p in range(n_prompts):
        names = []
        for i in range(per_prompt):
            name = f"images/{p:04d}_{i}.png"
            size = (96 + 32 * (i % 5), 96 + 32 * ((i + p) % 5))
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            random_image(p * per_prompt + i, size).save(folder / name)
            names.append(name)
        prompt = f"prompt number {p}: a {['red', 'green', 'blue'][p % 3]} object, {p % 7} of them"
        for a, b in combinations(names, 2):
            lines.append(json.dumps({"prompt": prompt, "chosen": a, "rejected": b}))
    path = folder / "pairs.jsonl"
    path.write_text("\n".join(lines[:n_pairs]) + "\n")
    return path


def naive_loop(reward, pairs_file: Path) -> list[float]:
    """Per pair: decode both images, preprocess, encode both images and the prompt (no cache), compare."""
    outcomes = []
    for line in pairs_file.read_text().splitlines():
        row = json.loads(line)
        images = [open_image(pairs_file.parent / row[k]) for k in ("chosen", "rejected")]
        pixels = torch.stack([reward.preprocess_reference(image) for image in images])
        with torch.no_grad():
            image_features = reward.encode_image(pixels)
            text = reward._encode_text([row["prompt"]]).float()
            text = text / text.norm(dim=-1, keepdim=True)
            scores = reward.similarity_to_score(image_features @ text[0])
        outcomes.append(1.0 if scores[0] > scores[1] else 0.0 if scores[0] < scores[1] else 0.5)
    return outcomes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--size", choices=["tiny", "small"], default="tiny")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import mmalign

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        model_dir = (make_small_clip if args.size == "small" else make_clip_model)(tmp / "clip")
        pairs_file = make_data(tmp / "data", args.pairs)
        print(f"data + model built in {time.perf_counter() - start:.1f} s", flush=True)
        reward = mmalign.load_reward("pickscore", weights=str(model_dir), processor=str(model_dir))
        n_images = len(list((tmp / "data" / "images").iterdir()))

        # warm-up both paths on a few pairs
        warm = tmp / "data" / "warm.jsonl"
        warm.write_text("\n".join(pairs_file.read_text().splitlines()[:8]) + "\n")
        naive_loop(reward, warm)

        start = time.perf_counter()
        benchmark = load_benchmark("pairs", pairs_file)
        results = run_rewards(
            benchmark,
            rewards=[RewardSpec("pickscore", weights=str(model_dir), processor=str(model_dir))],
            batch_size=args.batch_size,
            n_bootstrap=1000,
        )
        fast_seconds = time.perf_counter() - start
        fast_accuracy = results[0]["metrics"]["accuracy"]["value"]
        print(f"mmalign.bench: {args.pairs / fast_seconds:8.1f} pairs/s ({fast_seconds:.1f} s)", flush=True)

        start = time.perf_counter()
        outcomes = naive_loop(reward, pairs_file)
        naive_seconds = time.perf_counter() - start
        naive_accuracy = P.bootstrap_ratio(outcomes, n_resamples=0).value
        print(f"naive loop:    {args.pairs / naive_seconds:8.1f} pairs/s ({naive_seconds:.1f} s)", flush=True)

    agree = abs(fast_accuracy - naive_accuracy) < 1e-9
    result = {
        "command": "python benchmarks/bench_reward_protocols.py " + " ".join(argv or sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}",
        "reward": f"{args.size} PickScore-format CLIP (random weights)",
        "pairs": args.pairs,
        "distinct_images": n_images,
        "batch_size": args.batch_size,
        "mmalign": {"seconds": fast_seconds, "pairs_per_s": args.pairs / fast_seconds, "accuracy": fast_accuracy},
        "naive": {"seconds": naive_seconds, "pairs_per_s": args.pairs / naive_seconds, "accuracy": naive_accuracy},
        "speedup": naive_seconds / fast_seconds,
        "accuracies_agree": agree,
    }
    markdown = "\n".join(
        [
            f"# Reward-protocol throughput ({result['machine']})",
            "",
            f"Command: `{result['command']}`",
            "",
            f"{args.pairs} pairs over {n_images} images, reward: {result['reward']}, batch {args.batch_size}.",
            "",
            "| implementation | seconds | pairs/s | accuracy |",
            "|---|---|---|---|",
            f"| mmalign.bench (each image once, prompt cached, batched; with 1000-resample bootstrap) | "
            f"{fast_seconds:.1f} | {args.pairs / fast_seconds:.1f} | {fast_accuracy:.4f} |",
            f"| naive per-pair loop (PickScore's eval pattern) | {naive_seconds:.1f} | "
            f"{args.pairs / naive_seconds:.1f} | {naive_accuracy:.4f} |",
            "",
            f"Speed-up: **{result['speedup']:.2f}x**; accuracies agree: {agree}.",
            "",
        ]
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "reward_protocols.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "reward_protocols.md").write_text(markdown)
    print("\n" + markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
