"""Save the shipped toyworld models with fp16 safetensors weights that load back in fp32 everywhere.

transformers 5 loads a model in the ``dtype`` its ``config.json`` names, and diffusers loads its own models in
fp32 by default; a pipeline folder whose text encoder says float16 would then mix dtypes. The weights are
therefore stored in fp16 (half the bytes) and every config says float32, so plain ``from_pretrained`` calls
upcast them on load.
"""

from __future__ import annotations

import json
import logging
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
