"""The toyworld loop: a short DPO run on the shipped models raises judge adherence (fixed seed), the report is
written, the CPU budget stops training, and the CLI commands parse."""

from __future__ import annotations

import json

import pytest

from mmalign.toyworld.config import DemoConfig
from mmalign.toyworld.sampling import ASSETS

needs_assets = pytest.mark.skipif(not (ASSETS / "pipeline").is_dir(), reason="assets/toyworld not built")

# Small enough for CI (~90 s): 32 training prompts x 8 samples (512 pairs a round), 12 held-out prompts x 4
# samples, 10 DDIM steps, two on-policy rounds of 100 DPO steps of 8 pairs; 0.453 -> 0.484 -> 0.536 here
CI_DEMO = dict(
    heldout=12,
    train_prompts=32,
    samples_per_prompt=8,
    eval_samples=4,
    sample_steps=10,
    steps=100,
    batch_size=8,
    eval_every=50,
    rounds=2,
    progress=False,
)


@needs_assets
def test_short_dpo_run_raises_adherence(tmp_path):
    from mmalign.toyworld.demo import run_demo

    report = run_demo(DemoConfig(out=str(tmp_path / "demo"), **CI_DEMO), log=lambda message: None)
    before, after = report["before"]["overall"], report["after"]["overall"]
    assert 0.0 <= before <= 1.0 and 0.0 <= after <= 1.0
    assert after >= before + 0.05, (before, after)
    on_disk = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert on_disk["before"]["overall"] == before and on_disk["after"]["overall"] == after
    for name in ("report.html", "report.md", "grid_before.png", "grid_after.png", "curves.png"):
        assert (tmp_path / "demo" / name).stat().st_size > 0
    for lora in ("lora", "lora-2"):  # one LoRA a round, the second trained on the first fused in
        assert (tmp_path / "demo" / lora / "pytorch_lora_weights.safetensors").is_file()
    assert [r["trained_from"].endswith("model-2") for r in report["rounds"]] == [False, True]
    assert [p["step"] for p in report["training"]["curve"]] == [50, 100, 150, 200]
    # the last curve point (the trainer's weights: round 1 fused + round 2's LoRA) equals "after" (both saved
    # LoRAs loaded as adapters onto a fresh pipeline)
    assert report["training"]["curve"][-1]["overall"] == after
    assert report["rounds"][0]["after_round"]["overall"] == report["training"]["curve"][1]["overall"]


@needs_assets
def test_cpu_budget_stops_training_and_bench_tabulates(tmp_path):
    from mmalign.toyworld.bench import bench_trainers, table_markdown

    config = DemoConfig(
        out=str(tmp_path),
        heldout=4,
        train_prompts=4,
        samples_per_prompt=2,
        eval_samples=1,
        sample_steps=4,
        batch_size=2,
        progress=False,
    )
    names = ["dpo", "sft", "draft", "d3po"]  # offline pairs and online trainers (prompts + the learned reward)
    result = bench_trainers([*names, "diffusionnft"], cpu_seconds=1.0, config=config, log=lambda message: None)
    assert [row["trainer"] for row in result["rows"]] == [*names, "diffusionnft"]
    # a flow-matching trainer runs on the flow pipeline, with the training reward's rise beside its held-out gain
    assert [row["generator"] for row in result["rows"]] == ["unet"] * 4 + ["flow"]
    assert all("reward_gain" in row for row in result["rows"]) and not result["skipped"]
    for row in result["rows"]:
        assert 1 <= row["steps"] < 1_000_000 and row["train_cpu_s"] >= 1.0
    assert "| dpo |" in table_markdown(result) and (tmp_path / "bench.md").is_file()


def test_cli_parses_demo_and_bench_trainers():
    from mmalign.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["demo", "--steps", "7", "--seed", "3", "--out", "x", "loss_type=hinge"])
    assert (args.steps, args.seed, args.out, args.overrides) == (7, 3, "x", ["loss_type=hinge"])
    args = parser.parse_args(["bench", "trainers", "--world", "toy", "--cpu-minutes", "0.5"])
    assert (args.world, args.cpu_minutes, args.trainers) == ("toy", 0.5, "all")


def test_demo_and_bench_command_lines_become_demo_configs():
    from mmalign.cli import build_parser
    from mmalign.toyworld.config import config_from_args

    parser = build_parser()
    args = parser.parse_args(["demo", "--steps", "7", "--timestep-range", "0.2", "0.9", "--quiet", "loss_type=hinge"])
    config = config_from_args(args)
    assert (config.steps, config.timestep_range, config.progress) == (7, (0.2, 0.9), False)
    assert config.overrides == ["loss_type=hinge"]
    assert config_from_args(parser.parse_args(["demo"])) == DemoConfig()
    config = config_from_args(parser.parse_args(["bench", "trainers", "--lr", "0.5"]))
    assert (config.lr, config.out, config.progress) == (0.5, "runs/bench-trainers", True)
