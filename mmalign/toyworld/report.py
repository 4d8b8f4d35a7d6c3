"""The demo's report: ``report.json``, ``report.md``, ``report.html``, image grids and curves (matplotlib, Agg)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .sampling import Evaluation
from .world import ATTRIBUTES

ROWS = ("overall", "exact", *ATTRIBUTES, "reward")
GRID_PROMPTS = 8


def _score_colour(score: float) -> str:
    return "#1a9850" if score >= 1.0 else "#fdae61" if score >= 0.75 else "#f46d43" if score >= 0.5 else "#a50026"


def grid_figure(result: Evaluation, title: str, path: Path, prompts: int = GRID_PROMPTS) -> Path:
    """The first ``prompts`` distinct prompts of ``result``, one row each, every sample with its judge score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order: dict[str, list[int]] = {}
    for index, prompt in enumerate(result.prompts):
        order.setdefault(prompt.text, []).append(index)
    rows = list(order.items())[:prompts]
    cols = max(len(indices) for _, indices in rows)
    label_inches, width = 2.4, 1.0 * cols + 2.6
    fig, axes = plt.subplots(len(rows), cols, figsize=(width, 1.1 * len(rows) + 0.4), squeeze=False)
    for r, (text, indices) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(indices):
                ax.axis("off")
                continue
            score = result.verdicts[indices[c]].overall
            ax.imshow(result.images[indices[c]], interpolation="nearest")
            for spine in ax.spines.values():
                spine.set_edgecolor(_score_colour(score))
                spine.set_linewidth(2.5)
            ax.set_title(f"{score:.2f}", fontsize=7, color=_score_colour(score), pad=2)
            if c == 0:
                ax.text(-0.12, 0.5, text, transform=ax.transAxes, ha="right", va="center", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=label_inches / width, right=0.99, top=0.92, bottom=0.02, wspace=0.08, hspace=0.35)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def curves_figure(report: dict[str, Any], path: Path) -> Path:
    """Held-out adherence (overall and per attribute), learned reward, and the training loss over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = [{"step": 0, **report["before"]}] + list(report["training"]["curve"])
    steps = [p["step"] for p in curve]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    ax = axes[0]
    ax.plot(steps, [p["overall"] for p in curve], "o-", color="black", lw=2, label="overall")
    ax.plot(steps, [p["exact"] for p in curve], "s--", color="grey", label="exact")
    for name in ATTRIBUTES:
        ax.plot(steps, [p[name] for p in curve], ".-", alpha=0.7, label=name)
    ax.set(title="held-out judge adherence", xlabel="training step", ylim=(0, 1.02))
    ax.legend(fontsize=7, ncol=2)
    ax = axes[1]
    ax.plot(steps, [p["reward"] for p in curve], "o-", color="tab:purple")
    ax.set(title="learned reward (mean cosine, held-out samples)", xlabel="training step")
    ax = axes[2]
    history = report["training"]["history"]
    if history:
        ax.plot([h["step"] for h in history], [h["loss"] for h in history], color="tab:red", label="loss")
        ax.set(title=f"{report['trainer_config']['trainer']} training", xlabel="training step", ylabel="loss")
        if "implicit_acc" in history[0]:
            twin = ax.twinx()
            twin.plot([h["step"] for h in history], [h["implicit_acc"] for h in history], color="tab:blue", alpha=0.6)
            twin.set_ylabel("implicit accuracy", color="tab:blue")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


PAIRING_TEXT = {"extremes": "best vs worst", "halves": "every better-half vs worse-half sample"}


def _table(report: dict[str, Any]) -> list[tuple[str, float, float, float]]:
    return [(name, report["before"][name], report["after"][name], report["gain"][name]) for name in ROWS]


def _rounds_lines(report: dict[str, Any]) -> list[str]:
    """Per on-policy round: its pairs and the held-out adherence after it (nothing for a single round)."""
    rounds = report.get("rounds", [])
    if len(rounds) < 2:
        return []
    lines = [f"On-policy rounds: {len(rounds)}; each samples and labels new pairs from the model so far.", ""]
    lines += [
        "| round | pairs | judge of samples | chosen | rejected | held-out adherence after |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for i, entry in enumerate(rounds, 1):
        pairs, after = entry["pairs"], entry.get("after_round", {}).get("overall", float("nan"))
        lines.append(
            f"| {i} | {pairs['pairs']} | {pairs['judge_of_samples']:.3f} | {pairs['judge_of_chosen']:.3f} | "
            f"{pairs['judge_of_rejected']:.3f} | {after:.3f} |"
        )
    return [*lines, ""]


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown (images referenced by relative path)."""
    t, pairs, held = report["timing"], report["pairs"], report["heldout"]
    lines = [
        "# mmalign demo: toyworld preference alignment",
        "",
        f"Held-out prompts: {held['prompts']} x {held['samples_per_prompt']} samples, seed {held['seed']}; the judge "
        "is exact (colour segmentation + connected components + shape/position tests); `overall` is the mean of "
        "the four attribute checks, `exact` the share of images passing all four; `reward` is the learned reward.",
        "",
        "| score | before | after | gain |",
        "|---|---:|---:|---:|",
        *[f"| {name} | {b:.3f} | {a:.3f} | {g:+.3f} |" for name, b, a, g in _table(report)],
        "",
        f"Pairs: {pairs['pairs']} ({PAIRING_TEXT[pairs.get('pairing', 'extremes')]} of "
        f"{report['demo_config']['samples_per_prompt']} samples per training prompt, by the learned reward); "
        f"judge of chosen {pairs['judge_of_chosen']:.3f} vs rejected {pairs['judge_of_rejected']:.3f};"
        f" the reward's label agrees with the judge on {pairs['label_agreement_with_judge']:.1%} of the "
        f"{pairs['pairs_the_judge_orders']} pairs the judge orders.",
        "",
        *_rounds_lines(report),
        f"Training: {report['trainer_config']['trainer']}, LoRA rank {report['trainer_config']['lora_rank']}, "
        f"{report['training']['steps']} steps x {report['trainer_config']['batch_size']} pairs, lr "
        f"{report['trainer_config']['lr']}, beta {report['trainer_config']['beta']}: {t['train_s']:.0f} s wall, "
        f"{t['train_cpu_s']:.0f} CPU s ({report['torch_threads']} torch threads).",
        "",
        f"Timing (s): {', '.join(f'{k} {v}' for k, v in t.items())}.",
        "",
        "![before](grid_before.png)",
        "",
        "![after](grid_after.png)",
        "",
        "![curves](curves.png)",
        "",
    ]
    return "\n".join(lines)


def html_page(report: dict[str, Any]) -> str:
    """The report as a standalone HTML page (images referenced by relative path)."""
    from ..templates import render

    paragraphs = [line for line in markdown(report).split("\n\n")[1:] if not line.startswith(("|", "!["))]
    return render("toyworld_report.html.j2", rows=_table(report), paragraphs=paragraphs)


def write_report(report: dict[str, Any], before: Evaluation, after: Evaluation, out: Path) -> dict[str, str]:
    """Write every report file into ``out``; returns their names."""
    out.mkdir(parents=True, exist_ok=True)
    grid_figure(before, f"before: held-out adherence {report['before']['overall']:.3f}", out / "grid_before.png")
    grid_figure(after, f"after: held-out adherence {report['after']['overall']:.3f}", out / "grid_after.png")
    curves_figure(report, out / "curves.png")
    np.savez_compressed(out / "heldout_images.npz", before=before.images, after=after.images)
    files = {
        "json": "report.json",
        "markdown": "report.md",
        "html": "report.html",
        "grids": "grid_before.png, grid_after.png",
        "curves": "curves.png",
    }
    (out / "report.md").write_text(markdown(report))
    (out / "report.html").write_text(html_page(report))
    (out / "report.json").write_text(json.dumps({**report, "files": files}, indent=2, default=float) + "\n")
    return files
