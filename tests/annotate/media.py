"""Small media folders for the annotation tests: a `mmalign label`-style folder, a manifest, generator outputs."""

from __future__ import annotations

import json
import wave
from pathlib import Path

import numpy as np
from PIL import Image


def png(path: Path, seed: int, size: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def wav(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(8000)
        handle.writeframes((rng.standard_normal(800) * 1000).astype(np.int16).tobytes())
    return path


def label_folder(root: Path, prompts: int = 3, k: int = 3) -> Path:
    """What `mmalign label --trajectories` writes, without the chains: label.json, rankings.jsonl, images."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "label.json").write_text(json.dumps({"k": k, "steps": 2}))
    with (root / "rankings.jsonl").open("w") as handle:
        for i in range(prompts):
            names = [f"images/{i:05d}_{j:02d}.png" for j in range(k)]
            for j, name in enumerate(names):
                png(root / name, 100 * i + j)
            scores = [float(j) for j in range(k)]
            handle.write(
                json.dumps({"prompt": f"prompt {i}", "images": names, "scores": scores, "ranking": [2, 1, 0]}) + "\n"
            )
    return root


def manifest_folder(
    root: Path, items: int = 4, kind: str = "image", models=("sd15", "sdxl"), gold: dict | None = None
) -> Path:
    """``manifest.jsonl`` with ``items`` rows of len(models) options each, of media ``kind``."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(items):
        media = []
        for j, model in enumerate(models):
            if kind == "image":
                media.append(png(root / model / f"{i}.png", 10 * i + j).relative_to(root).as_posix())
            elif kind == "audio":
                media.append(wav(root / model / f"{i}.wav", 10 * i + j).relative_to(root).as_posix())
            elif kind == "video":
                path = root / model / f"{i}.mp4"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(b"\x00\x00\x00\x18ftypmp42")  # served as bytes, never decoded here
                media.append(path.relative_to(root).as_posix())
            else:  # multiview
                media.append(
                    [
                        png(root / model / f"{i}" / f"view{v}.png", 100 * i + 10 * j + v).relative_to(root).as_posix()
                        for v in range(3)
                    ]
                )
        row = {"prompt": f"prompt <b>{i}</b>", "media": media, "models": list(models)}
        if gold and i in gold:
            row["gold"] = gold[i]
        rows.append(row)
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root
