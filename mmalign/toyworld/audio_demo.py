"""The toyworld demo on the toy audio world: an online trainer of the GRPO family (Flow-GRPO by default) fine-tunes
the shipped tiny ``StableAudioPipeline`` (``assets/toyworld/audio_pipeline``) on the training prompts of
:mod:`mmalign.toyworld.audio_world` with its exact judge as the reward (``toyworld-audio-judge``), and the judge
measures held-out adherence before and after.

``mmalign demo --world audio`` (``make demo-audio``) runs it: the flow demo's loop (:mod:`mmalign.toyworld.flow_demo`:
groups of 8, the SDE on the first 3 of 10 steps, all trained, the ODE after them, EMA, the best weights on the
validation prompts kept) with :data:`AUDIO_DEMO_DEFAULTS`. Stable Audio is a v-diffusion generator; the flow trainers
train it through :class:`~mmalign.models.stable_audio.StableAudioFlowView` (the same network seen as a rectified flow),
and the held-out evaluation samples with the pipeline's own DPM-Solver++
(:func:`~mmalign.toyworld.sampling.evaluate_audio`). The report (``report.json``, ``report.md``, ``report.html`` with
audio players, the WAV files beside it and before/after spectrograms) goes to ``--out``. Training stops after
``cpu_budget`` CPU seconds (evaluation excluded). Measured (one thread, two or three runs at once on a 2-core Intel
Xeon, AVX2 + AVX-512 incl. bf16 + AMX): held-out adherence 0.438 -> 0.625 (+0.187; pitch +0.35, tempo +0.44, count
-0.23) with seed 0, +0.229 and +0.132 with seeds 1 and 2, each in 400 steps, ~395 CPU s.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..models.stable_audio import STABLE_AUDIO_LORA_TARGETS
from .audio_world import AUDIO_ATTRIBUTES, PITCHES, split_audio_prompts
from .config import DemoConfig
from .flow_demo import run_world_demo
from .sampling import AudioEvaluation, evaluate_audio

#: the audio demo's defaults where they differ from the UNet demo's (``mmalign demo --world audio``): the video demo's
#: (constant lr 5e-4, groups of 8, 4 prompts a step) with all 6 held-out prompts x 8 clips. Measured (one thread)
#: with the SDE on the first 3 steps (:data:`~mmalign.toyworld.flow_demo.WORLD_SDE_STEPS`): +0.187 / +0.229 / +0.132
#: held-out (seeds 0 / 1 / 2) in ~395 CPU s; with the SDE on every step: +0.132 / +0.097 / +0.104 (seed 0: 0.438 ->
#: 0.569 at the CPU budget, step 340; the curve peaked at step 40, 0.618). With 18 training prompts no validation
#: prompts are set aside (the flow demo keeps 16 only when there are more than 32), so the final EMA weights are the
#: ones evaluated
AUDIO_DEMO_DEFAULTS: dict[str, Any] = {
    "trainer": "flow-grpo",
    "out": "runs/demo-audio",
    "steps": 400,
    "cpu_budget": 480.0,
    "batch_size": 32,
    "lr": 5e-4,
    "lora_rank": 16,
    "sample_steps": 10,
    "eval_every": 40,
    "eval_samples": 8,
    "heldout": 6,
}
#: every DiT block's self- and cross-attention projections and feed-forward layers
AUDIO_LORA_TARGETS = STABLE_AUDIO_LORA_TARGETS
AUDIO_LR_SCHEDULER = "constant"
#: held-out clips of each evaluation written as WAV files and drawn as spectrograms in the report
REPORT_CLIPS = 6


def flow_policy(model: Path):
    """The shipped audio pipeline as the flow trainers see it (:class:`~mmalign.models.stable_audio.
    StableAudioFlowView` over :func:`~mmalign.models.generator.load_generator`)."""
    from ..models.generator import load_generator
    from ..models.stable_audio import StableAudioFlowView

    return StableAudioFlowView(load_generator(str(model)))


def run_audio_demo(config: DemoConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train and evaluate on the audio world; write the report; return the ``report.json`` content."""
    report, before, after, _ = run_world_demo(
        config,
        log,
        "audio",
        split_audio_prompts,
        evaluate_audio,
        "clips",
        policy=flow_policy,
        reward="toyworld-audio-judge",
        lora_targets=AUDIO_LORA_TARGETS,
        lr_scheduler=AUDIO_LR_SCHEDULER,
    )
    out = Path(config.out)
    report["files"] = write_audio_report(report, before, after, config, out)
    return report


def write_wav(path: Path, clip: np.ndarray, rate: int) -> str:
    import soundfile

    soundfile.write(str(path), np.clip(clip, -1.0, 1.0), rate, subtype="PCM_16")
    return path.name


def spectrogram_figure(result: AudioEvaluation, title: str, path: Path, count: int = REPORT_CLIPS) -> Path:
    """Spectrograms of the first ``count`` clips of ``result`` with their prompts and judge scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = min(count, len(result.clips))
    fig, axes = plt.subplots(1, count, figsize=(2.4 * count, 2.6), squeeze=False)
    for ax, clip, prompt, verdict in zip(axes[0], result.clips, result.prompts, result.verdicts):
        ax.specgram(clip, NFFT=256, Fs=result.sample_rate, noverlap=192, cmap="magma")
        ax.set_title(f"{prompt.text}\njudge {verdict.overall:.2f}", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks(sorted(PITCHES.values()))
        ax.tick_params(labelsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def first_of_each(result: AudioEvaluation, stride: int) -> AudioEvaluation:
    """Every ``stride``-th clip of ``result`` (the first of each prompt when ``stride`` is the clips per prompt)."""
    return AudioEvaluation(
        result.prompts[::stride], result.seeds[::stride], result.clips[::stride], result.verdicts[::stride],
        result.sample_rate,
    )  # fmt: skip


def report_clips(before: AudioEvaluation, after: AudioEvaluation, out: Path, count: int = REPORT_CLIPS) -> list:
    """One clip of each of the first ``count`` held-out prompts, before and after (the same seed), as WAV files in
    ``out/audio``; rows of (prompt, before file, before score, after file, after score)."""
    folder = out / "audio"
    folder.mkdir(parents=True, exist_ok=True)
    per_prompt = max(1, len(before.clips) // max(1, len({p.text for p in before.prompts})))
    rows = []
    for k in range(0, min(len(before.clips), count * per_prompt), per_prompt):
        prompt = before.prompts[k].text
        name = prompt.replace(" ", "_")
        b = write_wav(folder / f"before_{name}_{k}.wav", before.clips[k], before.sample_rate)
        a = write_wav(folder / f"after_{name}_{k}.wav", after.clips[k], after.sample_rate)
        rows.append((prompt, f"audio/{b}", before.verdicts[k].overall, f"audio/{a}", after.verdicts[k].overall))
    return rows


def write_audio_report(
    report: dict[str, Any], before: AudioEvaluation, after: AudioEvaluation, config: DemoConfig, out: Path
) -> dict[str, str]:
    """``report.md``, ``report.json``, ``report.html`` (audio players), the WAV files and the spectrograms."""
    rows = ["overall", "exact", *AUDIO_ATTRIBUTES]
    training = report["training"]
    stride = max(1, len(before.clips) // max(1, report["heldout"]["prompts"]))
    files = {
        f"spectrogram_{name}": str(
            spectrogram_figure(first_of_each(result, stride), f"{name} (held-out)", out / f"spectrogram_{name}.png")
        )
        for name, result in (("before", before), ("after", after))
    }
    clips = report_clips(before, after, out)
    kept = f"step {training['best_step']}" if training.get("best_step") else "the final (EMA) ones"
    summary = (
        f"Held-out judge adherence, {report['heldout']['prompts']} prompts x {config.eval_samples} clips (seed "
        f"{config.seed}); training {training['steps']} steps in {training['train_cpu_seconds']:.0f} CPU s "
        f"({report['torch_threads']} thread(s)); reward: {report['trainer_config']['reward']} on the training "
        f"prompts; weights kept: {kept}."
    )
    table = [f"| {n} | {report['before'][n]:.3f} | {report['after'][n]:.3f} | {report['gain'][n]:+.3f} |" for n in rows]
    lines = [
        f"# Toy audio demo: {config.trainer} on the tiny Stable Audio pipeline",
        "",
        summary,
        "",
        "| | before | after | gain |",
        "|---|---:|---:|---:|",
        *table,
        "",
        "| step | CPU s | held-out adherence | training reward |",
        "|---:|---:|---:|---:|",
        *[
            f"| {p['step']} | {p['train_cpu_s']:.0f} | {p['overall']:.3f} | {p['train_reward']:.3f} |"
            for p in training["curve"]
        ],
        "",
        "![before](spectrogram_before.png) ![after](spectrogram_after.png)",
        "",
        "| prompt | before | after |",
        "|---|---|---|",
        *[f"| {p} | [{b}]({b}) ({sb:.2f}) | [{a}]({a}) ({sa:.2f}) |" for p, b, sb, a, sa in clips],
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    files["markdown"] = str(out / "report.md")
    cells = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{report['before'][n]:.3f}</td><td>{report['after'][n]:.3f}</td>"
        f"<td>{report['gain'][n]:+.3f}</td></tr>"
        for n in rows
    )
    players = "".join(
        f"<tr><td>{html.escape(p)}</td><td><audio controls src='{b}'></audio> {sb:.2f}</td>"
        f"<td><audio controls src='{a}'></audio> {sa:.2f}</td></tr>"
        for p, b, sb, a, sa in clips
    )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>Toy audio demo</title></head><body>"
        f"<h1>Toy audio demo: {html.escape(config.trainer)}</h1><p>{html.escape(summary)}</p>"
        f"<table border='1'><tr><th></th><th>before</th><th>after</th><th>gain</th></tr>{cells}</table>"
        "<h2>Held-out clips (the same seeds)</h2>"
        f"<table border='1'><tr><th>prompt</th><th>before</th><th>after</th></tr>{players}</table>"
        "<p><img src='spectrogram_before.png'><br><img src='spectrogram_after.png'></p></body></html>\n"
    )
    (out / "report.html").write_text(page)
    files["html"] = str(out / "report.html")
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    files["json"] = str(out / "report.json")
    return files


__all__ = ["AUDIO_DEMO_DEFAULTS", "AUDIO_LORA_TARGETS", "flow_policy", "run_audio_demo", "write_audio_report"]
