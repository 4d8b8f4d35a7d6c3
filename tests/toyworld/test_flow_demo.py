"""The flow demo: a short DiffusionNFT run on the shipped flow-matching pipeline writes its report with a curve
of held-out judge adherence, and ``mmalign demo --generator flow`` takes the flow defaults."""

from __future__ import annotations

import json

import pytest
import torch

from mmalign.toyworld.config import DemoConfig
from mmalign.toyworld.sampling import ASSETS

needs_flow_assets = pytest.mark.skipif(not (ASSETS / "flow_pipeline").is_dir(), reason="flow pipeline not built")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@needs_flow_assets
@pytest.mark.parametrize("trainer", ["diffusionnft", "flow-grpo"])
def test_flow_demo_trains_and_reports(trainer, tmp_path):
    from mmalign.toyworld.flow_demo import run_flow_demo

    config = DemoConfig(
        out=str(tmp_path),
        trainer=trainer,
        heldout=4,
        train_prompts=4,
        eval_samples=2,
        sample_steps=4,
        steps=3,
        batch_size=8,
        lr=1e-4,
        lora_rank=4,
        eval_every=2,
        cpu_budget=0.0,
        progress=False,
        overrides=["guidance=1.0"] if trainer == "flow-grpo" else [],
    )
    report = run_flow_demo(config, log=lambda message: None)
    assert report["training"]["steps"] == 3 and [p["step"] for p in report["training"]["curve"]] == [2, 3]
    assert report["trainer_config"]["trainer"] == trainer and report["trainer_config"]["reward"] == "toyworld-judge"
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["gain"]["overall"] == pytest.approx(saved["after"]["overall"] - saved["before"]["overall"])
    assert (tmp_path / "report.md").is_file() and (tmp_path / "grid_after.png").is_file()
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_demo_generator_flow_takes_the_flow_defaults():
    from mmalign.cli import build_parser
    from mmalign.commands.demo import flow_config
    from mmalign.toyworld.flow_demo import FLOW_DEMO_DEFAULTS

    parser = build_parser()
    config = flow_config(parser.parse_args(["demo", "--generator", "flow"]))
    assert all(getattr(config, key) == value for key, value in FLOW_DEMO_DEFAULTS.items())
    config = flow_config(parser.parse_args(["demo", "--generator", "flow", "--trainer", "flow-grpo", "--lr", "0.01"]))
    assert (config.trainer, config.lr, config.cpu_budget) == ("flow-grpo", 0.01, FLOW_DEMO_DEFAULTS["cpu_budget"])
