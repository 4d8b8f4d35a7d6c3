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


class _FakeTrainer:
    """The parts of a trainer that :func:`budget_schedule` touches: an optimizer, a cosine scheduler over 10 steps,
    the step count and the CPU seconds used (set by the test, as ``hooked_trainer`` counts them)."""

    def __init__(self, config=None):
        from types import SimpleNamespace

        from diffusers.optimization import get_scheduler

        self.config = SimpleNamespace(max_steps=10)
        self.optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        self.lr_scheduler = get_scheduler("cosine", optimizer=self.optimizer, num_warmup_steps=0, num_training_steps=10)
        self.step, self.cpu_used, self.used = 0, 0.0, []

    def _train_step(self):
        self.used.append(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        self.lr_scheduler.step()
        self.step += 1
        return {"lr": self.lr_scheduler.get_last_lr()[0]}


def test_budget_schedule_ends_the_lr_schedule_by_the_cpu_budget():
    import math

    from mmalign.toyworld.flow_demo import budget_schedule

    cosine = [0.5 * (1 + math.cos(math.pi * step / 10)) for step in range(10)]
    # the steps run out first (1 CPU s a step, budget 100 s): the scheduler's own lr
    trainer = budget_schedule(_FakeTrainer, cpu_budget=100.0)()
    for step in range(10):
        trainer.cpu_used = float(step)
        trainer._train_step()
    assert trainer.used == pytest.approx(cosine)
    # 25 CPU s a step, budget 100 s: the budget ends first, so the schedule runs on its fraction and is at its
    # end (lr 0) when the budget is spent, at step 4 of 10
    trainer = budget_schedule(_FakeTrainer, cpu_budget=100.0)()
    metrics = [None]
    for step in range(5):
        trainer.cpu_used = 25.0 * step
        metrics.append(trainer._train_step())
    expected = [cosine[0]] + [0.5 * (1 + math.cos(math.pi * min(1.0, 0.25 * step))) for step in range(1, 5)]
    assert trainer.used == pytest.approx(expected, abs=1e-12) and trainer.used[-1] == pytest.approx(0.0, abs=1e-12)
    assert metrics[2]["lr"] == pytest.approx(expected[1])  # the lr the step used
    # no budget: the scheduler alone
    trainer = budget_schedule(_FakeTrainer, cpu_budget=0.0)()
    trainer.cpu_used = 1e6
    trainer._train_step(), trainer._train_step()
    assert trainer.used == pytest.approx(cosine[:2])
