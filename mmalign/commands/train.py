"""``mmalign train CONFIG.yaml [key=value ...]``: fine-tune a diffusion model (also under ``accelerate launch``
or ``torchrun``). Command line beats YAML beats the trainer config's defaults."""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune a diffusion model on preferences",
        description="Train with a YAML recipe (a file or a packaged recipe name such as train/sd15-dpo) and "
        "key=value overrides, e.g. `mmalign train train/sd15-dpo model=./my-sd data=pairs.jsonl max_steps=100`.",
    )
    p.add_argument("config", nargs="?", help="recipe YAML file or packaged recipe name (optional)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=run)


def resolve_trainer_config(config: str | None, overrides: list[str]):
    """The trainer class and its typed config from a recipe and overrides (``trainer`` picks the class)."""
    from ..config import find_recipe, load_config, load_yaml, parse_overrides
    from ..registry import TRAINERS

    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        overrides, config = [config, *overrides], None
    path = find_recipe(config) if config else None
    cli = parse_overrides(overrides)
    name = cli.get("trainer") or (load_yaml(path).get("trainer") if path else None) or "dpo"
    trainer_class = TRAINERS.entry(str(name)).load()
    return trainer_class, load_config(trainer_class.config_class, path, overrides)


def run(args: argparse.Namespace) -> int:
    trainer_class, config = resolve_trainer_config(args.config, list(args.overrides))
    trainer = trainer_class(config)
    summary = trainer.train()
    if trainer.accelerator.is_main_process:
        last = summary["history"][-1] if summary["history"] else {}
        print(
            json.dumps(
                {
                    "output_dir": config.output_dir,
                    "steps": summary["steps"],
                    "skipped_steps": summary["skipped_steps"],
                    "last": last,
                }
            ),
            file=sys.stderr,
        )
    return 0
