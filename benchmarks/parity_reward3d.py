"""Parity of :class:`mmalign.rewards.reward3d.Reward3D` with DreamReward's own ``Reward3D`` code (liuff19/DreamReward).

    /root/.pyenv/versions/3.11.7/bin/python -m venv /work/ref-r3d
    /work/ref-r3d/bin/pip install torch==2.14.1 torchvision==0.29.1 transformers==4.28.1 timm==0.6.13 "numpy<2" \\
        pillow safetensors && /work/ref-r3d/bin/pip install --no-build-isolation fairscale==0.4.13
    # DreamReward's Reward3D/ and scripts/med_config.json (git archive of the repo) under /work/ref-r3d/src
    PYTHONPATH=. .venv/bin/python benchmarks/parity_reward3d.py --reference-python /work/ref-r3d/bin/python \\
        --reference-src /work/ref-r3d/src

Depth: ``--vision-depth`` ViT-L blocks (default 4 of 24) and ``--text-layers`` BERT layers (default 2 of 12), built
by the reference's own classes (BLIP's ``VisionTransformer`` in place of ``create_vit('large')``, a copy of
DreamReward's med_config.json); every width is the published one. Two full-size checkpoints (1.8 GB each) did not
fit this machine's disk (nor, in /dev/shm beside other jobs, its memory); ``--vision-depth 24 --text-layers 12``
runs the published size where they do.

The reference cannot share mmalign's environment: its BLIP (``models/BLIP/med.py``) imports
``transformers.modeling_utils.apply_chunking_to_forward`` & co., gone from transformers 5, and ``vit.py`` imports
timm-0.6-era modules (timm 0.6.13 here) and fairscale; DreamReward pins transformers 4.28.1. So it runs as a
subprocess (``benchmarks/_reward3d_reference_side.py``): both published classes are built, every weight randomised
(seeded), saved with ``torch.save`` as ``Reward3D_Scorer.pt`` / ``Reward3D_CrossViewFusion.pt``, and three view sets
scored by the reference forward on CPU in float32. mmalign loads the same files through ``load_reward("reward3d" /
"reward3d-cvf")`` (``torch.load(weights_only=True)``) and scores the same view folders: the file path
(``score_files``: views read from each folder, per-view prompts made from its ``cameras.json``), set by set, and the
tensor path (``score_tensor`` on the decoded views) against the guidance's tensor transform.

The view sets: 256x256 views with cameras at elevation 15 and azimuths -10, 80, 170, 260 (front, side, back,
side); 200x300 views without cameras (the plain prompt for every view); 320x320 views from above (elevation 70:
overhead). The reference side receives the per-view prompts as literal strings written here.

Writes benchmarks/results/parity_reward3d.json; exits non-zero if any |difference| > --tol (1e-4).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
WORDS = [
    "a",
    "an",
    "the",
    "of",
    "on",
    "in",
    "with",
    "at",
    "and",
    "red",
    "blue",
    "green",
    "wooden",
    "chair",
    "teapot",
    "porcelain",
    "painted",
    "flowers",
    "dragon",
    "stone",
    "fountain",
    "marble",
    "bust",
    "mouse",
    "view",
    "side",
    "front",
    "back",
    "overhead",
    "small",
    "big",
]
SETS = [
    {
        "prompt": "a red wooden chair",
        "size": (256, 256),
        "cameras": {"azimuth": [-10, 80, 170, 260], "elevation": [15, 15, 15, 15]},
        "directions": ["front", "side", "back", "side"],
    },
    {"prompt": "a porcelain teapot painted with flowers", "size": (200, 300), "cameras": None, "directions": None},
    {
        "prompt": "a marble bust of a mouse",
        "size": (320, 320),
        "cameras": {"azimuth": [0, 90, 180, 270], "elevation": [70, 70, 70, 70]},
        "directions": ["overhead"] * 4,
    },
]


def write_tokenizer(folder: Path) -> Path:
    """A BERT vocabulary of bert-base-uncased's size (30522 + [DEC] + [ENC] = the checkpoint's 30524 rows)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", ".", *WORDS, "##s"]
    vocab += [f"[unused{i}]" for i in range(30522 - len(vocab))]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    return folder


def write_sets(folder: Path) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for index, spec in enumerate(SETS):
        views = folder / f"set{index}"
        views.mkdir(parents=True)
        height, width = spec["size"]
        paths = []
        for view in range(4):
            y, x = np.mgrid[0:height, 0:width]
            array = np.stack(
                [(x * 255 // width + 60 * view) % 256, y * 255 // height, rng.integers(0, 255, (height, width))], -1
            )
            path = views / f"view_{view}.png"
            Image.fromarray(array.astype(np.uint8)).save(path)
            paths.append(str(path))
        if spec["cameras"]:
            (views / "cameras.json").write_text(json.dumps(spec["cameras"]))
        directions = spec["directions"]
        view_prompts = [spec["prompt"] + (f", {d} view" if directions else "") for d in (directions or [None] * 4)]
        out.append({"folder": str(views), "views": paths, "prompt": spec["prompt"], "view_prompts": view_prompts})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-python", default="/work/ref-r3d/bin/python")
    parser.add_argument("--reference-src", default="/work/ref-r3d/src")
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--vision-depth", type=int, default=4, help="ViT-L blocks (published: 24)")
    parser.add_argument("--text-layers", type=int, default=2, help="BERT layers (published: 12)")
    parser.add_argument("--tmp", default="/dev/shm" if Path("/dev/shm").is_dir() else None, help="work folder")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/parity_reward3d.json"))
    args = parser.parse_args()

    import transformers

    import mmalign
    from mmalign.modalities.image import pil_to_tensor
    from mmalign.modalities.multiview import read_views

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        work = Path(tmp)
        tokenizer = write_tokenizer(work / "bert-base-uncased")
        sets = write_sets(work / "sets")
        (work / "sets.json").write_text(json.dumps(sets))
        started = time.perf_counter()
        subprocess.run(
            [
                args.reference_python,
                str(ROOT / "benchmarks/_reward3d_reference_side.py"),
                args.reference_src,
                str(work),
                str(work / "sets.json"),
                str(work / "reference.json"),
                str(args.vision_depth),
                str(args.text_layers),
            ],
            check=True,
            cwd=work,
        )
        reference_seconds = time.perf_counter() - started
        reference = json.loads((work / "reference.json").read_text())
        ours: dict[str, dict] = {}
        started = time.perf_counter()
        for name, variant, file in (
            ("reward3d", "scorer", "Reward3D_Scorer.pt"),
            ("reward3d-cvf", "crossviewfusion", "Reward3D_CrossViewFusion.pt"),
        ):
            reward = mmalign.load_reward(name, weights=str(work / file), processor=str(tokenizer))
            folders = [s["folder"] for s in sets]
            results = reward.score_files(folders, [s["prompt"] for s in sets])
            single = [reward.score_files([s["folder"]], s["prompt"])[0].total for s in sets]
            with torch.no_grad():
                tensor = []
                for s in sets:
                    images, _, cameras = read_views(s["folder"])
                    views = torch.stack([pil_to_tensor(image) for image in images])[None]
                    azimuth, elevation = cameras if cameras else (None, None)
                    tensor.append(reward.score_tensor(views, s["prompt"], azimuth, elevation).item())
            tokens = reward.imagereward.tokenize([p for s in sets for p in s["view_prompts"]])[0][:, :12].tolist()
            ours[variant] = {
                "files": [r.total for r in results],
                "one_by_one": single,
                "tensor": tensor,
                "view_prompts": [r.extra["view_prompts"] for r in results],
                "tokens_equal": tokens == reference[variant]["tokens"],
            }
            del reward
        ours_seconds = time.perf_counter() - started
    diffs, spreads = {}, {}
    for variant in ("scorer", "crossviewfusion"):
        ref, got = reference[variant], ours[variant]
        for path in ("files", "one_by_one", "tensor"):
            diffs[f"{variant}/{path}"] = float(np.abs(np.array(ref[path]) - np.array(got[path])).max())
        spreads[variant] = float(np.ptp(ref["files"]))
    prompts_equal = all(ours[v]["view_prompts"] == [s["view_prompts"] for s in sets] for v in ours)
    tokens_equal = all(ours[v]["tokens_equal"] for v in ours)
    result = {
        "reference": (
            f"liuff19/DreamReward Reward3D/Reward3D.py (Reward3D_ = Scorer, Reward3D = CrossViewFusion), torch "
            f"{reference['versions']['torch']}, transformers {reference['versions']['transformers']}, timm 0.6.13, "
            "fairscale 0.4.13, CPU fp32, eval mode"
        ),
        "mmalign": f"mmalign.rewards.reward3d on torch {torch.__version__}, transformers {transformers.__version__}, "
        "CPU fp32",
        "machine": f"{platform.machine()} CPU, {platform.system()}, 2 threads",
        "model": f"published widths (BLIP ViT-L/16 width 1024, 16 heads; BERT-base width 768 with cross-attention; "
        f"MLP(768); Scorer 512-256-64-1 / CrossViewFusion 12 heads), {args.vision_depth} of 24 ViT blocks and "
        f"{args.text_layers} of 12 BERT layers; every weight random (seeded), saved by the reference classes with "
        "torch.save as the published .pt files",
        "view_sets": [f"{s['size'][0]}x{s['size'][1]} x4, {'cameras' if s['cameras'] else 'no cameras'}" for s in SETS],
        "reference_scores": {v: reference[v] for v in ("scorer", "crossviewfusion")},
        "mmalign_scores": ours,
        "max_abs_diff": diffs,
        "score_spread_across_sets": spreads,
        "view_prompts_equal": prompts_equal,
        "tokens_equal": tokens_equal,
        "tol": args.tol,
        "passed": all(value <= args.tol for value in diffs.values()) and prompts_equal and tokens_equal,
        "seconds": {"reference_incl_setup": round(reference_seconds, 1), "mmalign_incl_load": round(ours_seconds, 1)},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps({k: result[k] for k in ("max_abs_diff", "score_spread_across_sets", "passed", "seconds")}, indent=2)
    )
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
