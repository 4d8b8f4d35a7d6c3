"""Parity of :mod:`mmalign.models.audioldm_mel` with the mel front end of the reference code (haoheliu/AudioLDM2).

    python3 -m venv /work/ref-audioldm2/venv
    /work/ref-audioldm2/venv/bin/pip install numpy scipy librosa torch==2.14.1
    # the reference's files only, e.g. from a clone of haoheliu/AudioLDM2 at COMMIT:
    mkdir -p /work/ref-audioldm2/src && git -C AudioLDM2 archive COMMIT audioldm2/utilities/audio \
        audioldm2/utilities/data/dataset.py | tar -x -C /work/ref-audioldm2/src
    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/parity_audioldm_mel.py \
        --reference-python /work/ref-audioldm2/venv/bin/python --reference-src /work/ref-audioldm2/src \
        --reference-commit COMMIT

librosa >= 0.10 takes ``filters.mel``'s and ``util.pad_center``'s arguments by keyword only, and the reference
passes them by position, so with a current librosa the scratch copy's ``stft.py`` needs its two calls written with
keywords (``pad_center(fft_window, size=filter_length)``, ``librosa_mel_fn(sr=sampling_rate, n_fft=filter_length,
n_mels=n_mel_channels, fmin=mel_fmin, fmax=mel_fmax)``; ``window_sumsquare`` in ``audio_processing.py`` has a
third, used only by the inverse STFT); the JSON records whether the copy was patched so. Nothing else is changed.

The reference runs as a subprocess in its own environment: this same file, started with ``--reference-side``,
imports only numpy, scipy, librosa, torch and the reference's ``audioldm2.utilities.audio`` (``stft.py``,
``audio_processing.py``, ``tools.py``) and ``audioldm2.utilities.data.dataset`` from ``--reference-src``; the
packages above them (``audioldm2``, ``audioldm2.utilities``, ``.data``, whose ``__init__`` would import the whole
model) are registered as bare packages, ``audioldm2.utilities.tools`` (``load_json``) is stubbed, and so are
``torchaudio`` and ``pandas`` when not installed (none of them is on this path). There an ``AudioDataset`` is made
without its ``__init__`` and set up by its own ``build_setting_parameters`` and ``build_dsp`` from the published
16 kHz config (``TacotronSTFT(1024, 160, 1024, 64, 16000, 0, 8000)``, ``target_length = int(duration * 16000 /
160)``); each clip (float32, as ``torchaudio.load`` gives) goes through what ``read_wav_file`` does after loading
(``normalize_wav``, ``pad_wav``) and ``wav_feature_extraction`` (``tools.get_mel_from_wav``, transpose,
``pad_spec``): a ``[target_length, 64]`` log-mel. mmalign's side (``/work/main/.venv``) runs
``normalize_waveform`` and ``audioldm_log_mel`` with ``MelSettings(16000, 1024, 160, 1024, 64, 0, 8000)`` and
``frames = target_length``, one clip at a time and all clips of one length as a batch.

Both sides compute in float32, as they run. A float32 DFT's rounding error scales with the frame's energy, so
log-mel entries far below their frame's loudest bin (a chirp's window sidelobes, ~1e-5 of the peak) differ by up
to ~1e-2 between any two float32 implementations, each as far from the exact value as the other. To tell that
from a difference of algorithm, both also run in float64: the reference's own ``normalize_wav``, ``pad_wav``,
``TacotronSTFT.mel_spectrogram`` and ``pad_spec`` with its two constant buffers rebuilt in float64 by the same
expressions as ``STFT.__init__`` and ``TacotronSTFT.__init__`` (Fourier basis times ``get_window("hann")``;
``librosa.filters.mel(dtype=float64)``), and mmalign's functions on the clip as float64.

Clips (16 kHz mono, seeded, each 1 s and 10.24 s): a 440 Hz tone plus noise, a logarithmic chirp 50 Hz - 7.9 kHz,
white noise, a harmonic mix with a DC offset scaled to 0.9 peak, and a 1 kHz tone burst in exact silence (much of
its log-mel at the floor). Reported per clip: max |difference| of the normalised waveform; of the float32 log-mel
over all entries and over those where the reference is above ``log(1e-5) + 1`` (the floor plus one), with where
the worst of the latter is and how far below its frame's loudest mel bin; the same with mmalign's mel fed the
reference's normalised waveform (the STFT/mel stage alone); batched against one by one; the float64 log-mel over
all entries; the frame counts; and the max |difference| of the two Slaney filter banks. CPU, one thread.

Writes benchmarks/results/parity_audioldm_mel.json; exits non-zero if the float64 log-mel |difference| (all
entries) exceeds --tol (1e-4). The float32 figures are reported, not gated (see above).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_RATE, N_FFT, HOP, WIN, N_MELS, FMIN, FMAX = 16_000, 1024, 160, 1024, 64, 0, 8000
DURATIONS = (1.0, 10.24)
KINDS = ("tone440_noise", "chirp", "white_noise", "peak0.9_dc", "burst_silence")
FLOOR = math.log(1e-5)


# ---------------------------------------------------------------------------------------------------------------
# the reference side (runs in the reference's venv: numpy, torch, the reference's files; nothing from mmalign)


def reference_side(src: str, items_json: str, out_npz: str, out_json: str) -> None:
    import importlib
    import inspect

    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, src)
    stubbed = []
    for name in ("audioldm2", "audioldm2.utilities", "audioldm2.utilities.data"):  # bare packages, no __init__ run
        package = types.ModuleType(name)
        package.__path__ = [str(Path(src, *name.split(".")))]
        sys.modules[name] = package
    tools = types.ModuleType("audioldm2.utilities.tools")  # dataset.py imports load_json from it; unused here
    tools.load_json = lambda path: json.loads(Path(path).read_text())
    sys.modules[tools.__name__] = tools
    stubbed.append("audioldm2.utilities.tools (load_json)")
    for name in ("torchaudio", "pandas"):  # imported at the top of tools.py / dataset.py; unused on this path
        try:
            importlib.import_module(name)
        except ImportError:
            sys.modules[name] = types.ModuleType(name)
            stubbed.append(name)
    Audio = importlib.import_module("audioldm2.utilities.audio")
    dataset = importlib.import_module("audioldm2.utilities.data.dataset")

    import librosa
    import scipy
    from scipy.signal import get_window

    items = json.loads(Path(items_json).read_text())
    arrays, info_items = {}, {}
    filter_bank = None
    for duration in sorted({item["duration"] for item in items}):
        ds = dataset.AudioDataset.__new__(dataset.AudioDataset)  # no __init__: no metadata, no files
        ds.split, ds.pad_wav_start_sample, ds.trim_wav = "test", 0, False
        ds.config = {
            "preprocessing": {
                "audio": {"sampling_rate": SAMPLE_RATE, "duration": duration},
                "stft": {"filter_length": N_FFT, "hop_length": HOP, "win_length": WIN},
                "mel": {"n_mel_channels": N_MELS, "mel_fmin": FMIN, "mel_fmax": FMAX},
            },
            "augmentation": {"mixup": 0.0},
        }
        ds.build_setting_parameters()
        ds.build_dsp()
        filter_bank = ds.STFT.mel_basis.numpy()
        # float64: the same module with its two constant buffers rebuilt in float64 by STFT.__init__'s and
        # TacotronSTFT.__init__'s own expressions (they are cast to float32 there)
        stft64 = Audio.stft.TacotronSTFT(N_FFT, HOP, WIN, N_MELS, SAMPLE_RATE, FMIN, FMAX).double()
        cutoff = N_FFT // 2 + 1
        basis = np.fft.fft(np.eye(N_FFT))
        basis = np.vstack([np.real(basis[:cutoff, :]), np.imag(basis[:cutoff, :])])[:, None, :]
        window = librosa.util.pad_center(get_window("hann", WIN, fftbins=True), size=N_FFT)
        stft64.stft_fn.forward_basis = torch.from_numpy(basis * window)
        stft64.mel_basis = torch.from_numpy(
            librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, fmin=FMIN, fmax=FMAX, dtype=np.float64)
        )
        for item in (i for i in items if i["duration"] == duration):
            raw = np.load(item["npy"])  # [S] float32, as torchaudio.load gives
            wave = ds.normalize_wav(raw)
            wave = ds.pad_wav(wave[None, ...], target_length=int(ds.sampling_rate * ds.duration))
            raw_mel, _, _ = Audio.tools.get_mel_from_wav(torch.FloatTensor(wave[0]), ds.STFT)  # before pad_spec
            log_mel, _ = ds.wav_feature_extraction(wave)
            wave64 = ds.normalize_wav(raw.astype(np.float64))
            wave64 = ds.pad_wav(wave64[None, ...], target_length=int(ds.sampling_rate * ds.duration))
            with torch.no_grad():
                mel64, _, _, _ = stft64.mel_spectrogram(torch.from_numpy(wave64))
            arrays[item["name"] + "/log_mel64"] = ds.pad_spec(mel64[0].T).numpy()
            arrays[item["name"] + "/wave"] = np.asarray(wave[0], dtype=np.float32)
            arrays[item["name"] + "/log_mel"] = log_mel.numpy()
            info_items[item["name"]] = {
                "target_length": ds.target_length,
                "stft_frames_before_pad_spec": int(raw_mel.shape[-1]),
                "log_mel_shape": list(log_mel.shape),
                "normalized_wave_dtype": str(np.asarray(wave).dtype),
            }
    arrays["filter_bank"] = filter_bank
    np.savez(out_npz, **arrays)
    stft_source = inspect.getsource(Audio.stft.TacotronSTFT.__init__) + inspect.getsource(Audio.stft.STFT.__init__)
    info = {
        "items": info_items,
        "stubbed_modules": stubbed,
        "keyword_patch_present": "sr=sampling_rate" in stft_source and "size=filter_length" in stft_source,
        "versions": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "scipy": scipy.__version__,
            "librosa": librosa.__version__,
            "torch": torch.__version__,
        },
        "src": str(Path(src).resolve()),
    }
    Path(out_json).write_text(json.dumps(info, indent=2))


# ---------------------------------------------------------------------------------------------------------------
# mmalign's side


def make_clips(folder: Path) -> list[dict]:
    rng = np.random.default_rng(0)
    items = []
    for duration in DURATIONS:
        n = round(duration * SAMPLE_RATE)
        t = np.arange(n) / SAMPLE_RATE
        for kind in KINDS:
            if kind == "tone440_noise":
                x = 0.5 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(n)
            elif kind == "chirp":  # logarithmic sweep 50 Hz -> 7.9 kHz over the clip
                f0, f1 = 50.0, 7900.0
                k = math.log(f1 / f0) / duration
                x = 0.3 * np.sin(2 * np.pi * f0 * (np.exp(k * t) - 1) / k)
            elif kind == "white_noise":
                x = 0.3 * rng.standard_normal(n)
            elif kind == "peak0.9_dc":  # harmonics under a slow envelope, noise, a DC offset; peak |x| = 0.9
                envelope = 0.6 + 0.4 * np.sin(2 * np.pi * 1.5 * t)
                x = envelope * sum(np.sin(2 * np.pi * 220 * h * t + h) / h for h in (1, 2, 3, 5))
                x = x + 0.02 * rng.standard_normal(n) + 0.2
                x = 0.9 * x / np.abs(x).max()
            else:  # burst_silence: a 1 kHz burst over the middle 40 %, exact zeros elsewhere
                x = np.zeros(n)
                a, b = int(0.3 * n), int(0.7 * n)
                x[a:b] = 0.4 * np.sin(2 * np.pi * 1000 * t[a:b])
            name = f"{kind}_{duration:g}s"
            path = folder / f"{name}.npy"
            np.save(path, x.astype(np.float32))
            items.append({"name": name, "kind": kind, "duration": duration, "npy": str(path)})
    return items


def run_mmalign(items: list[dict], reference: dict) -> dict:
    import torch

    from mmalign.models.audioldm_mel import MelSettings, audioldm_log_mel, normalize_waveform

    settings = MelSettings(SAMPLE_RATE, N_FFT, HOP, WIN, N_MELS, float(FMIN), float(FMAX))
    out = {"single": {}, "on_reference_wave": {}, "batched": {}, "waves": {}, "float64": {}}
    with torch.no_grad():
        for duration in DURATIONS:
            group = [item for item in items if item["duration"] == duration]
            frames = int(duration * SAMPLE_RATE / HOP)
            raws = [torch.from_numpy(np.load(item["npy"]))[None] for item in group]
            for item, raw in zip(group, raws):
                wave = normalize_waveform(raw)
                out["waves"][item["name"]] = wave[0].numpy()
                out["single"][item["name"]] = audioldm_log_mel(wave, settings, frames)[0, 0].numpy()
                theirs = torch.from_numpy(reference[item["name"] + "/wave"])[None]
                out["on_reference_wave"][item["name"]] = audioldm_log_mel(theirs, settings, frames)[0, 0].numpy()
                wave64 = normalize_waveform(raw.double())
                out["float64"][item["name"]] = audioldm_log_mel(wave64, settings, frames)[0, 0].numpy()
            batch = audioldm_log_mel(normalize_waveform(torch.cat(raws)), settings, frames)
            for index, item in enumerate(group):
                out["batched"][item["name"]] = batch[index, 0].numpy()
    out["filter_bank"] = settings.filter_bank().numpy()
    return out


def compare(ours: np.ndarray, theirs: np.ndarray) -> dict:
    if ours.shape != theirs.shape:
        return {"shape_mismatch": [list(ours.shape), list(theirs.shape)]}
    diff = np.abs(ours.astype(np.float64) - theirs.astype(np.float64))
    loud = theirs > FLOOR + 1
    out = {
        "max_abs_diff": float(diff.max()),
        "max_abs_diff_above_floor_plus_1": float(diff[loud].max()) if loud.any() else None,
        "entries_above_floor_plus_1": f"{int(loud.sum())}/{loud.size}",
    }
    if loud.any():
        where = np.unravel_index(int(np.where(loud, diff, -1.0).argmax()), diff.shape)
        out["worst_above_floor"] = {
            "frame_bin": [int(i) for i in where],
            "mmalign_reference": [float(ours[where]), float(theirs[where])],
            "mel_over_frame_max_mel": float(np.exp(theirs[where] - theirs[where[0]].max())),
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-python", default="/work/ref-audioldm2/venv/bin/python")
    parser.add_argument("--reference-src", default="/work/ref-audioldm2/src", help="holds audioldm2/utilities/...")
    parser.add_argument("--reference-commit", default="", help="the haoheliu/AudioLDM2 commit the files came from")
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/parity_audioldm_mel.json"))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch
    import transformers
    from harness import machine_line

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        items = make_clips(work)
        (work / "items.json").write_text(json.dumps(items))
        started = time.perf_counter()
        subprocess.run(
            [args.reference_python, str(Path(__file__).resolve()), "--reference-side", args.reference_src]
            + [str(work / "items.json"), str(work / "reference.npz"), str(work / "reference.json")],
            check=True,
            cwd=work,
            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""},
        )
        reference_seconds = time.perf_counter() - started
        info = json.loads((work / "reference.json").read_text())
        with np.load(work / "reference.npz") as npz:
            reference = {key: npz[key] for key in npz.files}
        started = time.perf_counter()
        ours = run_mmalign(items, reference)
        ours_seconds = time.perf_counter() - started

    clips = {}
    for item in items:
        name = item["name"]
        theirs = reference[name + "/log_mel"]
        clips[name] = {
            "frames": {
                "reference_stft_frames": info["items"][name]["stft_frames_before_pad_spec"],
                "reference_after_pad_spec": info["items"][name]["target_length"],
                "mmalign": int(ours["single"][name].shape[0]),
            },
            "normalized_wave_max_abs_diff": float(np.abs(ours["waves"][name] - reference[name + "/wave"]).max()),
            "log_mel": compare(ours["single"][name], theirs),
            "log_mel_mmalign_on_reference_wave": compare(ours["on_reference_wave"][name], theirs),
            "float64_log_mel_max_abs_diff": float(np.abs(ours["float64"][name] - reference[name + "/log_mel64"]).max()),
            "batched_vs_single_max_abs_diff": float(np.abs(ours["batched"][name] - ours["single"][name]).max()),
            "reference_entries_at_floor": int((theirs <= FLOOR + 1e-6).sum()),
        }
    bank_diff = np.abs(ours["filter_bank"].astype(np.float64) - reference["filter_bank"].astype(np.float64))
    above = [c["log_mel"].get("max_abs_diff_above_floor_plus_1") for c in clips.values()]
    worst_above = max((a for a in above if a is not None), default=float("inf"))
    worst = max(c["log_mel"].get("max_abs_diff", float("inf")) for c in clips.values())
    worst64 = max(c["float64_log_mel_max_abs_diff"] for c in clips.values())
    versions = info["versions"]
    result = {
        "reference": f"haoheliu/AudioLDM2 @ {args.reference_commit or 'unknown commit'}: AudioDataset.normalize_wav, "
        "pad_wav, wav_feature_extraction (tools.get_mel_from_wav on TacotronSTFT(1024, 160, 1024, 64, 16000, 0, "
        f"8000), pad_spec); numpy {versions['numpy']}, scipy {versions['scipy']}, librosa {versions['librosa']}, "
        f"torch {versions['torch']}, CPU fp32",
        "reference_files": info["src"],
        "reference_keyword_patch_for_librosa": info["keyword_patch_present"],
        "reference_stubbed_modules": info["stubbed_modules"],
        "mmalign": f"mmalign.models.audioldm_mel (normalize_waveform, audioldm_log_mel, MelSettings(16000, 1024, "
        f"160, 1024, 64, 0, 8000)), torch {torch.__version__}, numpy {np.__version__}, transformers "
        f"{transformers.__version__} (filter bank), CPU fp32",
        "machine": machine_line(torch.get_num_threads()),
        "floor": "log(1e-5); 'above floor' = entries where the reference log-mel > log(1e-5) + 1",
        "filter_bank_max_abs_diff": float(bank_diff.max()),
        "filter_bank_max_value": float(np.abs(reference["filter_bank"]).max()),
        "clips": clips,
        "worst_float64_log_mel_abs_diff": worst64,
        "worst_float32_log_mel_abs_diff": worst,
        "worst_float32_log_mel_abs_diff_above_floor_plus_1": worst_above,
        "tol": args.tol,
        "passed": worst64 <= args.tol,
        "gate": "float64 log-mel, all entries; float32 figures reported, not gated (rounding, see the docstring)",
        "seconds": {"reference_incl_import": round(reference_seconds, 1), "mmalign": round(ours_seconds, 1)},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "clips"}, indent=2))
    for name, clip in clips.items():
        log_mel, stage = clip["log_mel"], clip["log_mel_mmalign_on_reference_wave"]
        print(
            f"{name:24s} wave {clip['normalized_wave_max_abs_diff']:.2e}  log-mel all "
            f"{log_mel.get('max_abs_diff', float('nan')):.2e} above-floor "
            f"{log_mel.get('max_abs_diff_above_floor_plus_1') or float('nan'):.2e}  (on ref wave: all "
            f"{stage.get('max_abs_diff', float('nan')):.2e})  float64 {clip['float64_log_mel_max_abs_diff']:.2e}  "
            f"frames {list(clip['frames'].values())}"
        )
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--reference-side":
        reference_side(*sys.argv[2:6])
    else:
        sys.exit(main())
