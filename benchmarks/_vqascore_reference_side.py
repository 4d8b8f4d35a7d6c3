"""The t2v_metrics side of benchmarks/parity_vqascore.py; runs in t2v_metrics' own environment (transformers 4.49).

    /work/venv-t2v/bin/python benchmarks/_vqascore_reference_side.py JOB.json OUT.json

Imports t2v_metrics' Qwen-VL VQAScore class (``t2v_metrics/models/vqascore_models/qwen2vl_model.py`` of the
installed wheel, or another copy of that file, e.g. GitHub main's, given in the job) WITHOUT running the
package's ``__init__`` (which imports every other model family and their dependencies): the parent packages are
stubbed with their real ``__path__`` so the file's own relative imports (``.vqa_model``, ``..model``,
``...constants``) load the real files. Its model table is pointed at the local tiny folder (tokenizer path,
float32, sdpa instead of flash-attention-2, which needs CUDA); nothing else is changed. Scores are its
``forward`` on CPU, one call per (media, prompt).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path


def load_reference(package_root: Path, source: Path, name: str):
    for package in ("t2v_metrics", "t2v_metrics.models", "t2v_metrics.models.vqascore_models"):
        if package not in sys.modules:
            module = types.ModuleType(package)
            module.__path__ = [str(package_root.joinpath(*package.split(".")[1:]))]
            sys.modules[package] = module
    full = f"t2v_metrics.models.vqascore_models.{name}"
    spec = importlib.util.spec_from_file_location(full, source)
    module = importlib.util.module_from_spec(spec)
    sys.modules[full] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    import torch

    torch.set_num_threads(1)
    job = json.loads(Path(sys.argv[1]).read_text())
    root = Path(importlib.util.find_spec("t2v_metrics").submodule_search_locations[0])  # not imported
    source = Path(job.get("source") or root / "models" / "vqascore_models" / "qwen2vl_model.py")
    reference = load_reference(root, source, job.get("module_name", "qwen2vl_model"))
    from importlib.metadata import version

    packages = ("t2v-metrics", "transformers", "qwen-vl-utils", "decord", "torch")
    results = {"source": str(source), "versions": {name: version(name) for name in packages}, "models": {}}
    for entry in job["models"]:
        name = entry["model_name"]
        if name not in reference.QWEN2_VL_MODELS:  # GitHub main comments its Qwen2-VL entries out ("Legacy")
            template = next(iter(reference.QWEN2_VL_MODELS.values()))
            reference.QWEN2_VL_MODELS[name] = json.loads(json.dumps(template, default=str))
        info = reference.QWEN2_VL_MODELS[name]
        info["tokenizer"]["path"] = entry["folder"]
        info["model"]["torch_dtype"] = torch.float32
        info["model"]["attn_implementation"] = "sdpa"
        model = reference.Qwen2VLModel(name, device="cpu", checkpoint=entry["folder"])
        scores = []
        for case in entry["cases"]:
            kwargs = {"question_template": case["question_template"]} if case.get("question_template") else {}
            value = model.forward([case["path"]], [case["prompt"]], **kwargs)
            scores.append(float(value[0]))
        results["models"][name] = scores
    Path(sys.argv[2]).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
