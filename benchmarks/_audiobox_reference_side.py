"""Reference side of benchmarks/parity_audiobox.py: runs in the ``audiobox-aesthetics`` package's own environment.

Loads the model that mmalign's side saved, in both published layouts, through the package's own code: the hub
folder by ``AesMultiOutput.from_pretrained`` and the release ``checkpoint.pt`` by ``AesPredictor`` (which reads it
with its own ``torch.load``), then scores every item with ``AesPredictor.forward`` (torchaudio resampling to
16 kHz, mono mix, 10 s chunks, length-weighted mean, ``target_transform`` inverse) on CPU in float32. Items are
given as tensors (``{"path": wav [C, S], "sample_rate": sr}``, the package's in-memory input) and, where
``torchaudio.load`` can read them, as files. A ``wavlm`` object in config.json (tiny models) patches the
package's fixed encoder config before the model is built; without it the package builds WavLM Base unchanged.

    /work/ref-abx/bin/python benchmarks/_audiobox_reference_side.py FOLDER ITEMS.json OUT.json
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch


def main(folder: str, items_json: str, out_json: str) -> None:
    import audiobox_aesthetics
    from audiobox_aesthetics import infer
    from audiobox_aesthetics.model import aes

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    if config.get("wavlm"):
        aes.DEFAULT_AUDIO_CFG.update(config["wavlm"])  # tiny sizes; every code path stays the package's
    predictor = infer.AesPredictor(checkpoint_pth=str(folder / "checkpoint.pt"), batch_size=1)
    hub_model = aes.AesMultiOutput.from_pretrained(str(folder)).eval()
    items = json.loads(Path(items_json).read_text())
    out = {"release_checkpoint": {}, "hub_folder": {}, "files": {}, "info": {}}
    tensors = []
    for item in items:
        data = np.load(item["npy"])  # [C, S] float32, the exact samples of the WAV file
        tensors.append({"path": torch.from_numpy(data), "sample_rate": item["sample_rate"]})
    with torch.no_grad():
        rows = predictor.forward(tensors)  # all items in one batch, as main_predict does
        out["release_checkpoint"] = {item["name"]: row for item, row in zip(items, rows)}
        release_model = predictor.model
        predictor.model = hub_model
        rows = predictor.forward(tensors)
        out["hub_folder"] = {item["name"]: row for item, row in zip(items, rows)}
        try:
            rows = predictor.forward([{"path": item["wav"]} for item in items])
            out["files"] = {item["name"]: row for item, row in zip(items, rows)}
        except Exception as error:  # torchaudio.load may need torchcodec / ffmpeg
            out["files_error"] = f"{type(error).__name__}: {error}"
        predictor.model = release_model
    out["info"] = {
        "audiobox_aesthetics": getattr(audiobox_aesthetics, "__version__", None)
        or _dist_version("audiobox_aesthetics"),
        "torch": torch.__version__,
        "torchaudio": _dist_version("torchaudio"),
        "huggingface_hub": _dist_version("huggingface_hub"),
        "device": str(predictor.device),
        "parameters": sum(p.numel() for p in hub_model.parameters()),
    }
    Path(out_json).write_text(json.dumps(out, indent=2))


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main(*sys.argv[1:4])
