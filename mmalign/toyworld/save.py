"""The edges of the toyworld's training scripts: saving models, their ``training.json``, and their command line.

Models are saved with fp16 safetensors weights that load back in fp32 everywhere:

transformers 5 loads a model in the ``dtype`` its ``config.json`` names, and diffusers loads its own models in
fp32 by default; a pipeline folder whose text encoder says float16 would then mix dtypes. The weights are
therefore stored in fp16 (half the bytes) and every config says float32, so plain ``from_pretrained`` calls
upcast them on load.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch


def _float32_configs(folder: Path) -> None:
    for path in folder.rglob("config.json"):
        config = json.loads(path.read_text())
        changed = False
        for key in ("dtype", "torch_dtype"):
            if config.get(key) == "float16":
                config[key] = "float32"
                changed = True
        if changed:
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_fp16(model: Any, folder: str | Path) -> None:
    """``model.save_pretrained(folder)`` (a transformers/diffusers model or a diffusers pipeline) with fp16
    weights and float32 configs; ``model`` is fp32 again afterwards."""
    folder = Path(folder)
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:  # silence "modules that should be kept in float32: []" notices
        logger.setLevel(logging.ERROR)
    try:
        model.to(torch.float16)
        model.save_pretrained(str(folder), safe_serialization=True)
    finally:
        model.to(torch.float32)
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    _float32_configs(folder)


def write_summary(out: Path, recipe: Any, started: float, cpu: float, **figures: Any) -> dict[str, Any]:
    """Write ``out/training.json``: the recipe (a dataclass), the run's figures, wall and CPU seconds since
    ``started`` / ``cpu`` (``time.time()`` / ``time.process_time()``) and the torch threads; returns it."""
    summary = {
        "recipe": asdict(recipe),
        **figures,
        "wall_seconds": round(time.time() - started, 1),
        "cpu_seconds": round(time.process_time() - cpu, 1),
        "torch_threads": recipe.threads or torch.get_num_threads(),
    }
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def folder_bytes(out: Path) -> int:
    """Bytes of a saved model folder, its ``training.json`` excluded."""
    return sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and p.name != "training.json")


def judge_saved(
    out: Path,
    evaluate: Callable[..., Any],
    groups: dict[str, tuple[list[str], int]],
    steps: int,
    guidances: tuple[float, ...],
) -> dict[str, dict[str, dict[str, float]]]:
    """The judge's adherence of a saved pipeline folder as shipped (fp16 weights loaded back in fp32 by the trainers'
    loader): for each named group ``(prompts, samples per prompt)`` and each guidance, ``evaluate(generator, prompts,
    samples, seed=12345, steps=steps, guidance=g).scores`` under ``"guidance_G"``."""
    from ..models.generator import load_generator

    shipped = load_generator(str(out))
    return {
        name: {
            f"guidance_{g:g}": evaluate(shipped, prompts, samples, seed=12345, steps=steps, guidance=g).scores
            for g in guidances
        }
        for name, (prompts, samples) in groups.items()
    }


def recipe_main(
    recipe_class: type, train: Callable[..., Any], default_out: str, description: str, argv: list[str] | None
) -> int:
    """``--out`` plus one ``--flag`` per recipe field (booleans read 1/true/yes), then ``train(recipe, out)``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=Path(default_out))
    for name, value in asdict(recipe_class()).items():
        kind = (lambda text: text.lower() in ("1", "true", "yes")) if isinstance(value, bool) else type(value)
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=value)
    args = parser.parse_args(argv)
    recipe = recipe_class(**{k: getattr(args, k) for k in asdict(recipe_class())})
    args.out.mkdir(parents=True, exist_ok=True)
    train(recipe, args.out, log=lambda m: print(m, flush=True))
    return 0
