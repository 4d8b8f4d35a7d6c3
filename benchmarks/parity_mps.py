"""Parity of :class:`mmalign.rewards.mps.MPSReward` with the reference code of Kwai-Kolors/MPS.

    python3 -m venv /work/ref-mps
    echo /work/main/.venv/lib/python3.11/site-packages > /work/ref-mps/lib/python3.11/site-packages/zz_main_venv.pth
    /work/ref-mps/bin/pip install transformers==4.27.3 tokenizers==0.13.3 einops "huggingface_hub<0.30"
    # the repository, e.g. from a clone: git -C MPS archive HEAD | tar -x -C /work/ref-mps/MPS
    PYTHONPATH=. .venv/bin/python benchmarks/parity_mps.py --reference-python /work/ref-mps/bin/python \
        --reference-repo /work/ref-mps/MPS --reference-commit COMMIT

The reference pins transformers 4.27.3 (requirements.txt) and its model code needs it (``CLIPModel.forward`` of
4.27's ``get_text_features`` layout), so it runs as a subprocess (``benchmarks/_mps_reference_side.py``) with its
own transformers and the main environment's torch. There the reference's own constructor builds the model on a
tiny random CLIP (text width 32, vision width 48, patch 16 at 64 px, projection 1024) with the published fusion
network (``Cross_model(dim=1024, layer_num=4, heads=16)``), with the common direction of the random text features
projected out of ``text_projection`` (else the 0.3 mask keeps every token and the conditions cannot differ),
pickles the whole module as the release does, and
scores four images x four prompts with ``eval_overall_mps_on_hpdv2.infer_one_sample`` under the four conditions.
mmalign then converts that pickle as a user would (``mmalign convert --trust-pickle``: read structurally, the
reference package not importable here), loads the safetensors through ``load_reward("mps")`` and scores the same
files, as a batch (per-sample normalisation makes it equal to one by one).

Writes benchmarks/results/parity_mps.json; exits non-zero if an fp32 |difference| > --tol (1e-4).
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
# Prompts that open with words of one condition: on random weights only tokens whose causal prefix matches the
# condition's come near the start token's self-similarity, so these make the condition masks differ.
PROMPTS = [
    "light, color and a red circle on the left",
    "shape, face, hair of a person with two hands",
    "quantity, attributes: three cats in the snow",
    "camera",
]
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
    parser.add_argument("--reference-python", default="/work/ref-mps/bin/python")
    parser.add_argument("--reference-repo", default="/work/ref-mps/MPS")
    parser.add_argument("--reference-commit", default="", help="the repository's commit when it is not a git checkout")
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/parity_mps.json"))
    args = parser.parse_args()

    import transformers

    import mmalign
    from mmalign.hub import convert_pickle_to_safetensors
    from mmalign.rewards.mps import CONDITIONS
    from mmalign.tokenizers import write_clip_tokenizer

    commit = (
        subprocess.run(
            ["git", "-C", args.reference_repo, "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        or args.reference_commit
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        items = make_images(work)
        write_clip_tokenizer(work / "tokenizer")
        (work / "items.json").write_text(json.dumps(items))
        (work / "conditions.json").write_text(json.dumps(CONDITIONS))
        started = time.perf_counter()
        subprocess.run(
            [
                args.reference_python,
                str(ROOT / "benchmarks/_mps_reference_side.py"),
                args.reference_repo,
                str(work),
                str(work / "items.json"),
                str(work / "conditions.json"),
                str(work / "reference.json"),
            ],
            check=True,
            cwd=ROOT,
        )
        reference_seconds = time.perf_counter() - started
        reference = json.loads((work / "reference.json").read_text())
        started = time.perf_counter()
        weights = convert_pickle_to_safetensors(
            work / "MPS_overall_checkpoint.pth", work / "MPS_overall_checkpoint.safetensors"
        )
        paths, prompts = [i["path"] for i in items], [i["prompt"] for i in items]
        ours = {}
        for precision in ("fp32", "fp16"):
            reward = mmalign.load_reward("mps", weights=str(weights), processor=str(work / "clip"), dtype=precision)
            ours[precision] = {k: v.tolist() for k, v in reward.score_detailed(paths, prompts).items()}
        ours_seconds = time.perf_counter() - started

    def max_diff(a: dict, b: dict) -> float:
        return max(float((torch.tensor(a[k]) - torch.tensor(b[k])).abs().max()) for k in CONDITIONS)

    diffs = {
        "fp32_vs_reference_fp32": max_diff(ours["fp32"], reference["fp32"]),
        "fp16_vs_reference_fp16": max_diff(ours["fp16"], reference["fp16"]),
        "fp32_vs_reference_fp16": max_diff(ours["fp32"], reference["fp16"]),
    }
    overall = torch.tensor(reference["fp32"]["overall"])
    by_condition = torch.tensor([reference["fp32"][k] for k in CONDITIONS])
    result = {
        "reference": (
            f"Kwai-Kolors/MPS @ {commit or 'unknown'}: eval_overall_mps_on_hpdv2.infer_one_sample on the "
            f"pickled trainer.models.clip_model.CLIPModel, transformers {reference['transformers']}, "
            f"torch {reference['torch']}, CPU"
        ),
        "mmalign": f"mmalign.rewards.mps on transformers {transformers.__version__}, torch {torch.__version__}, CPU",
        "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
        "model": "tiny CLIP (text 32x2, vision 48x2, patch 16, 64 px, projection 1024) + Cross_model(1024, 4, 16)",
        "checkpoint": "torch.save(model) of the reference module, converted by mmalign convert's structural path",
        "images": [f"{h}x{w}" for h, w in SIZES],
        "conditions": list(CONDITIONS),
        "reference_scores": {p: reference[p] for p in ("fp32", "fp16")},
        "mmalign_scores": ours,
        "max_abs_diff": diffs,
        "overall_spread_across_images": float(overall.max() - overall.min()),
        "max_spread_across_conditions": float((by_condition.max(0).values - by_condition.min(0).values).max()),
        "tol_fp32": args.tol,
        "passed": diffs["fp32_vs_reference_fp32"] <= args.tol,
        "seconds": {"reference_incl_setup": round(reference_seconds, 1), "mmalign_incl_load": round(ours_seconds, 1)},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
