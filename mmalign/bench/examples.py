"""Synthetic benchmark files for trying ``mmalign bench`` without datasets or weights (used by the README).

``python -m mmalign.bench.examples DIR`` writes, from a fixed seed:

* ``DIR/hpdv2_test.json`` (HPDv2 ``{prompt, image_path[], rank[]}``), ``DIR/imagereward_test.json``
  (ImageRewardDB ``{id, prompt, generations[], ranking[]}``) and ``DIR/pairs.jsonl`` over the same 200 prompts x
  4 images: ranks from a latent quality, with human ties;
* ``DIR/reward_scores.jsonl``: ``mmalign score`` records of three simulated rewards, ``sharp`` (quality + small
  noise), ``blurry`` (quality + large noise) and ``random``;
* ``DIR/videogen-rewardbench.csv`` (VideoGen-RewardBench's columns, labels A / B / same per VQ, MQ, TA and
  Overall) and ``DIR/hpdv3_test.json`` (HPDv3 ``{prompt, path1, path2}``, ``path1`` preferred), ``n_prompts`` pairs
  each, with ``DIR/media_scores.jsonl``: the same three rewards' scores of them (per-dimension ``dimensions`` for
  the videos, as VideoReward's records), drawn from a second seeded generator so the files above do not change;
* ``DIR/votes.jsonl``: 300 simulated 4-wise human votes over five generators, and
  ``DIR/generator_scores.jsonl``: a reward's scores of each generator's outputs (``outputs/<generator>/<n>.png``).

The image files do not exist: ``--scores`` runs need only their paths.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from .arena import simulate_votes

GENERATORS = {"flux-dev": 1.2, "sd3-medium": 0.8, "sdxl": 0.5, "pixart-sigma": 0.3, "sd-1.5": -0.4}


def write_examples(folder: str | os.PathLike, seed: int = 0, n_prompts: int = 200) -> dict[str, Path]:
    """Write the example files into ``folder``; returns their paths by name."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    hpd, ir, pairs, scores = [], [], [], []
    noise = {"sharp": 0.6, "blurry": 1.5}
    for p in range(n_prompts):
        prompt = f"example prompt {p}"
        names = [f"images/{p:03d}_{i}.png" for i in range(4)]
        quality = rng.normal(size=4)
        ranks = (1 + np.array([(np.round(quality * 2) > np.round(q * 2)).sum() for q in quality])).tolist()
        hpd.append({"prompt": prompt, "image_path": names, "rank": ranks})
        ir.append({"id": str(p), "prompt": prompt, "generations": names, "ranking": ranks})
        best, worst = int(np.argmin(ranks)), int(np.argmax(ranks))
        if ranks[best] != ranks[worst]:
            pairs.append({"prompt": prompt, "chosen": names[best], "rejected": names[worst]})
        for reward, sd in noise.items():
            values = quality + rng.normal(scale=sd, size=4)
            scores += [
                {"path": str(folder / n), "prompt": prompt, "reward": reward, "score": float(v)}
                for n, v in zip(names, values)
            ]
        scores += [
            {"path": str(folder / n), "prompt": prompt, "reward": "random", "score": float(v)}
            for n, v in zip(names, rng.normal(size=4))
        ]
    votes = [
        {"models": list(v.models), "ranks": list(v.ranks), "judge": "human"}
        for v in simulate_votes(GENERATORS, 300, 4, rng)
    ]
    generator_scores = [
        {"path": f"outputs/{g}/{p:03d}.png", "prompt": f"example prompt {p}", "reward": "sharp",
         "score": float(skill + rng.normal(scale=0.8))}
        for p in range(50)
        for g, skill in GENERATORS.items()
    ]  # fmt: skip
    paths = {
        "hpdv2": folder / "hpdv2_test.json",
        "imagereward": folder / "imagereward_test.json",
        "pairs": folder / "pairs.jsonl",
        "reward_scores": folder / "reward_scores.jsonl",
        "votes": folder / "votes.jsonl",
        "generator_scores": folder / "generator_scores.jsonl",
    }
    paths.update(_media_examples(folder, seed + 1, n_prompts))
    paths["hpdv2"].write_text(json.dumps(hpd) + "\n")
    paths["imagereward"].write_text(json.dumps(ir) + "\n")
    for name, rows in (
        ("pairs", pairs),
        ("reward_scores", scores),
        ("votes", votes),
        ("generator_scores", generator_scores),
    ):
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def _media_examples(folder: Path, seed: int, n_pairs: int) -> dict[str, Path]:
    """VideoGen-RewardBench and HPDv3 files and the simulated rewards' scores of them."""
    import csv

    rng = np.random.default_rng(seed)
    noise = {"sharp": 0.6, "blurry": 1.5, "random": None}
    rows, hpdv3, scores = [], [], []

    def score_records(path: str, prompt: str, quality: np.ndarray, dimensions: bool) -> None:
        for reward, sd in noise.items():
            value = rng.normal(size=quality.shape) if sd is None else quality + rng.normal(scale=sd, size=quality.shape)
            record = {"path": str(folder / path), "prompt": prompt, "reward": reward, "score": float(value.sum())}
            if dimensions:
                record["dimensions"] = {**dict(zip(("VQ", "MQ", "TA"), map(float, value))), "Overall": record["score"]}
            scores.append(record)

    for k in range(n_pairs):
        prompt = f"example video prompt {k}"
        videos = [f"videos/gen-a/gen-a_{k:05d}.mp4", f"videos/gen-b/gen-b_{k:05d}.mp4"]
        quality = rng.normal(size=(2, 3))
        labels = {}
        for name, a, b in zip(
            ("VQ", "MQ", "TA", "Overall"), [*quality[0], quality[0].sum()], [*quality[1], quality[1].sum()]
        ):
            labels[name] = "same" if abs(a - b) < 0.3 else ("A" if a > b else "B")
        rows.append({"path_A": videos[0], "path_B": videos[1], "A_model": "gen-a", "B_model": "gen-b",
                     "prompt": prompt, **labels})  # fmt: skip
        for path, q in zip(videos, quality):
            score_records(path, prompt, q, dimensions=True)
        prompt = f"example image prompt {k}"
        names = [f"images/hpdv3_{k:05d}_{i}.jpg" for i in range(2)]
        quality = np.sort(rng.normal(size=2))[::-1]
        hpdv3.append({"prompt": prompt, "path1": names[0], "path2": names[1], "confidence": 1.0})
        for name, q in zip(names, quality):
            score_records(name, prompt, np.array([q]), dimensions=False)
    paths = {
        "videogen": folder / "videogen-rewardbench.csv",
        "hpdv3": folder / "hpdv3_test.json",
        "media_scores": folder / "media_scores.jsonl",
    }
    with paths["videogen"].open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    paths["hpdv3"].write_text(json.dumps(hpdv3) + "\n")
    paths["media_scores"].write_text("".join(json.dumps(r) + "\n" for r in scores))
    return paths


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m mmalign.bench.examples DIR", file=sys.stderr)
        return 2
    for name, path in write_examples(args[0]).items():
        print(f"{name:17s} {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
