"""Parity of :mod:`mmalign.rewards.audiobox` with the ``audiobox-aesthetics`` package (PyPI 0.0.4).

    python3 -m venv /work/ref-abx
    /work/ref-abx/bin/pip install torch==2.14.1 torchvision==0.29.1 audiobox-aesthetics requests torchcodec
    PYTHONPATH=. .venv/bin/python benchmarks/parity_audiobox.py --reference-python /work/ref-abx/bin/python

(``requests`` is imported by the package's ``utils.py`` but not declared as a dependency.) The reference runs in its
own environment as a subprocess (``benchmarks/_audiobox_reference_side.py``). mmalign's side writes a model with
every weight random (seeded) in both published layouts: the hub folder (``config.json`` + ``model.safetensors``)
and the release ``checkpoint.pt``. Two sizes: ``base``, the package's own WavLM Base encoder (94.4 M parameters,
nothing patched), and ``tiny`` (tests/tiny.py sizes, patched into the package's fixed encoder config). The
reference scores the exact samples of each WAV as tensors with ``AesPredictor.forward`` and the WAV files
themselves (its ``torchaudio.load`` needs ``pip install torchcodec`` and FFmpeg's shared libraries, e.g. Debian's
``libavutil57 libavcodec59 libavformat59 ...``; without them the JSON says why the file path did not run); mmalign
scores the same tensors (``score_axes``) and the WAV files (``score_audio``: mono first, then resampling, as the
package's file path does). Clips: 3 s 16 kHz mono, 12.5 s 44.1 kHz stereo, 7 s 22.05 kHz stereo, 25 s 48 kHz
mono (1, 2, 1 and 3 chunks of 10 s). CPU, float32.

Writes benchmarks/results/parity_audiobox.json; exits non-zero if any |difference| > --tol (1e-4).
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
import soundfile as sf
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CLIPS = [("mono16k_3s", 16_000, 3.0, 1), ("stereo44k_12.5s", 44_100, 12.5, 2), ("stereo22k_7s", 22_050, 7.0, 2)]
CLIPS.append(("mono48k_25s", 48_000, 25.0, 1))
AXES = ("CE", "CU", "PC", "PQ")


def make_clips(folder: Path) -> list[dict]:
    rng = np.random.default_rng(0)
    items = []
    for index, (name, rate, seconds, channels) in enumerate(CLIPS):
        t = np.arange(round(rate * seconds)) / rate
        envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 0.3 * t + index)
        rows = [
            0.3 * envelope * np.sin(2 * np.pi * (180 + 90 * index + 50 * c) * t) + 0.05 * rng.standard_normal(t.size)
            for c in range(channels)
        ]
        wave = np.stack(rows).astype(np.float32)
        wav, npy = folder / f"{name}.wav", folder / f"{name}.npy"
        sf.write(wav, wave.T, rate, subtype="FLOAT")
        np.save(npy, sf.read(wav, dtype="float32", always_2d=True)[0].T.copy())
        items.append({"name": name, "wav": str(wav), "npy": str(npy), "sample_rate": rate})
    return items


def max_diff(ours: dict, theirs: dict) -> dict[str, float]:
    return {axis: max(abs(ours[name][axis] - theirs[name][axis]) for name in theirs) for axis in AXES}


def run_size(size: str, work: Path, items: list[dict], reference_python: str) -> dict:
    import mmalign
    from tests.tiny import make_audiobox_model

    folder = work / size
    wavlm = {} if size == "base" else None
    make_audiobox_model(folder, seed=0, wavlm=wavlm)
    make_audiobox_model(folder, seed=0, wavlm=wavlm, release=True)
    started = time.perf_counter()
    subprocess.run(
        [reference_python, str(ROOT / "benchmarks/_audiobox_reference_side.py"), str(folder), str(work / "items.json")]
        + [str(work / f"reference_{size}.json")],
        check=True,
        cwd=ROOT,
    )
    reference_seconds = time.perf_counter() - started
    reference = json.loads((work / f"reference_{size}.json").read_text())
    started = time.perf_counter()
    reward = mmalign.load_reward("audiobox-aesthetics", weights=str(folder))
    release = mmalign.load_reward("audiobox-aesthetics", weights=str(folder / "checkpoint.pt"))
    same_weights = all(
        torch.equal(a, b) for a, b in zip(reward.state_dict().values(), release.state_dict().values())
    ) and list(reward.state_dict()) == list(release.state_dict())
    tensors, files = {}, {}
    with torch.no_grad():
        for item in items:
            wave = torch.from_numpy(np.load(item["npy"]))[None]
            axes = reward.score_axes(wave, item["sample_rate"])
            tensors[item["name"]] = {axis: float(value) for axis, value in axes.items()}
        for item, result in zip(items, reward.score_audio([i["wav"] for i in items])):
            files[item["name"]] = result.extra["axes"]
    ours_seconds = time.perf_counter() - started
    diffs = {
        "tensors_vs_reference_hub_folder": max_diff(tensors, reference["hub_folder"]),
        "tensors_vs_reference_release_checkpoint": max_diff(tensors, reference["release_checkpoint"]),
        "files_vs_reference_tensors": max_diff(files, reference["hub_folder"]),
    }
    if reference.get("files"):
        diffs["files_vs_reference_files"] = max_diff(files, reference["files"])
    spread = {axis: max(v[axis] for v in tensors.values()) - min(v[axis] for v in tensors.values()) for axis in AXES}
    return {
        "model": "WavLM Base (the package's fixed config), random weights"
        if size == "base"
        else "tiny WavLM (tests/tiny.py sizes patched into the package's config), random weights",
        "parameters": reference["info"]["parameters"],
        "release_checkpoint_loads_same_weights": same_weights,
        "max_abs_diff": diffs,
        "score_spread_across_clips": spread,
        "reference_scores": reference["hub_folder"],
        "mmalign_tensor_scores": tensors,
        "mmalign_file_scores": files,
        "reference_file_path": "ran" if reference.get("files") else str(reference.get("files_error")).splitlines()[0],
        "reference_info": reference["info"],
        "seconds": {"reference_incl_load": round(reference_seconds, 1), "mmalign_incl_load": round(ours_seconds, 1)},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-python", default="/work/ref-abx/bin/python")
    parser.add_argument("--sizes", default="tiny,base", help="comma list of tiny, base")
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/parity_audiobox.json"))
    args = parser.parse_args()
    import transformers
    from harness import machine_line

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        items = make_clips(work)
        (work / "items.json").write_text(json.dumps(items))
        for size in args.sizes.split(","):
            results[size] = run_size(size, work, items, args.reference_python)
    worst = max(value for r in results.values() for d in r["max_abs_diff"].values() for value in d.values())
    result = {
        "reference": "audiobox-aesthetics 0.0.4 (PyPI), AesPredictor.forward, CPU fp32",
        "mmalign": f"mmalign.rewards.audiobox, torch {torch.__version__}, transformers {transformers.__version__}, "
        "CPU fp32",
        "machine": machine_line(torch.get_num_threads()),
        "clips": [f"{name}: {seconds:g} s, {rate} Hz, {channels} ch" for name, rate, seconds, channels in CLIPS],
        "sizes": results,
        "worst_abs_diff": worst,
        "tol": args.tol,
        "passed": worst <= args.tol and all(r["release_checkpoint_loads_same_weights"] for r in results.values()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "sizes"}, indent=2))
    for size, r in results.items():
        print(size, json.dumps(r["max_abs_diff"]))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
