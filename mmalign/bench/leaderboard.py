"""Leaderboards: several rewards x datasets from ``mmalign bench rewards`` result files into one markdown table,
one HTML page and one plot (matplotlib's Agg canvas, no pyplot state), every cell with its bootstrap CI."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import MMAlignError
from .runner import format_estimate, json_safe

Result = Mapping[str, Any]


def load_results(paths: Iterable[str | os.PathLike]) -> list[dict[str, Any]]:
    """Result JSONs from files or folders (every ``*.json`` with ``protocol`` and ``metrics`` inside a folder)."""
    results: list[dict[str, Any]] = []
    for item in paths:
        path = Path(item)
        if path.is_dir():
            files = sorted(path.glob("*.json"))
        elif path.is_file():
            files = [path]
        else:
            raise MMAlignError(f"{path}: no such result file or folder")
        for file in files:
            try:
                data = json.loads(file.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                if path.is_dir():
                    continue
                raise MMAlignError(f"{file}: not a JSON result file ({error})") from None
            rows = data if isinstance(data, list) else [data]
            found = [r for r in rows if isinstance(r, dict) and {"protocol", "metrics", "reward", "dataset"} <= set(r)]
            if not found and not path.is_dir():
                raise MMAlignError(f"{file}: not a `mmalign bench rewards` result (needs protocol, reward, metrics)")
            results.extend(found)
    if not results:
        raise MMAlignError("no results found in " + ", ".join(map(str, paths)))
    return results


def _grid(results: Sequence[Result], metric: str) -> tuple[list[str], list[str], dict[tuple[str, str], Result]]:
    cells: dict[tuple[str, str], Result] = {}
    for r in results:
        cells[(r["reward"], r["dataset"])] = r  # a later file replaces an earlier one
    datasets = list(dict.fromkeys(r["dataset"] for r in results))

    def mean_value(reward: str) -> float:
        values = [cells[(reward, d)]["metrics"].get(metric, {}).get("value") for d in datasets if (reward, d) in cells]
        values = [v for v in values if v is not None and not math.isnan(v)]
        return sum(values) / len(values) if values else -math.inf

    rewards = sorted(dict.fromkeys(r["reward"] for r in results), key=lambda w: (-mean_value(w), w))
    return rewards, datasets, cells


def _cell(result: Result | None, metric: str) -> str:
    if result is None:
        return "–"
    text = format_estimate(result["metrics"].get(metric), percent=metric.endswith("accuracy"))
    if metric == "accuracy" and result.get("published") is not None:
        text += f" (paper {100 * result['published']:.1f})"
    return text


SECONDARY = ("pairwise_accuracy", "spearman", "kendall", "ece")


def modality(result: Result) -> str:
    """The modality a result was measured on (``image`` for results written before the field existed)."""
    return str(result.get("modality") or "image")


def reward_modalities(results: Sequence[Result], reward: str) -> str:
    """The modalities of one reward's results, comma-separated in first-seen order."""
    return ", ".join(dict.fromkeys(modality(r) for r in results if r["reward"] == reward))


def leaderboard_markdown(results: Sequence[Result], metric: str = "accuracy") -> str:
    """Rewards (rows, best mean first) x datasets (columns): the protocol's figure in %, 95% CI in brackets; the
    last column is the modality (or modalities) the reward was measured on."""
    rewards, datasets, cells = _grid(results, metric)
    lines = [
        "| reward | " + " | ".join(datasets) + " | modality |",
        "|---|" + "---|" * (len(datasets) + 1),
    ]
    for reward in rewards:
        row = " | ".join(_cell(cells.get((reward, d)), metric) for d in datasets)
        lines.append(f"| {reward} | {row} | {reward_modalities(results, reward)} |")
    protocols = {r["dataset"]: r.get("main_metric", r["protocol"]) for r in results}
    lines += ["", "Columns: " + "; ".join(f"`{d}`: {protocols[d]}" for d in datasets) + "."]
    boot = next(iter(results))["settings"].get("bootstrap", {})
    lines.append(
        f"Brackets: {100 * boot.get('level', 0.95):.0f}% percentile bootstrap CI "
        f"({boot.get('n_resamples', '?')} resamples, seed {boot.get('seed', '?')})."
    )
    lines += [
        "",
        "| reward | dataset | pairwise % | Spearman | Kendall | ECE (BT) | modality |",
        "|---|---|---|---|---|---|---|",
    ]
    for reward in rewards:
        for d in datasets:
            r = cells.get((reward, d))
            if r is not None:
                cells_text = " | ".join(_cell(r, m) for m in SECONDARY)
                lines.append(f"| {reward} | {d} | {cells_text} | {modality(r)} |")
    return "\n".join(lines) + "\n"


def leaderboard_html(results: Sequence[Result], metric: str = "accuracy", title: str = "Reward leaderboard") -> str:
    """A self-contained HTML page with the same two tables as :func:`leaderboard_markdown`."""
    from ..templates import render

    rewards, datasets, cells = _grid(results, metric)
    main = [
        (w, [_cell(cells.get((w, d)), metric) for d in datasets] + [reward_modalities(results, w)]) for w in rewards
    ]
    secondary = [
        (w, d, [_cell(cells[(w, d)], m) for m in SECONDARY] + [modality(cells[(w, d)])])
        for w in rewards
        for d in datasets
        if (w, d) in cells
    ]
    return render("leaderboard.html.j2", title=title, datasets=datasets, main=main, secondary=secondary)


def leaderboard_plot(results: Sequence[Result], path: str | os.PathLike, metric: str = "accuracy") -> Path:
    """Grouped bars (datasets x rewards) with CI error bars and published values as markers."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rewards, datasets, cells = _grid(results, metric)
    factor = 100.0 if metric.endswith("accuracy") else 1.0
    width = 0.8 / max(len(rewards), 1)
    fig = Figure(figsize=(max(4.0, 1.6 * len(datasets) * max(1, len(rewards)) ** 0.5 + 2), 3.6))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for k, reward in enumerate(rewards):
        xs, ys, errs, published = [], [], [[], []], []
        for i, d in enumerate(datasets):
            estimate = cells.get((reward, d), {}).get("metrics", {}).get(metric)
            if not estimate or estimate["value"] is None or math.isnan(estimate["value"]):
                continue
            x = i - 0.4 + width * (k + 0.5)
            value, low, high = (
                math.nan if estimate.get(key) is None else estimate[key] * factor for key in ("value", "low", "high")
            )
            xs.append(x)
            ys.append(value)
            errs[0].append(0.0 if math.isnan(low) else value - low)
            errs[1].append(0.0 if math.isnan(high) else high - value)
            if cells[(reward, d)].get("published") is not None and metric == "accuracy":
                published.append((x, 100.0 * cells[(reward, d)]["published"]))
        bars = ax.bar(xs, ys, width * 0.9, yerr=errs, capsize=3, label=reward)
        if published:
            ax.scatter(*zip(*published), marker="_", s=200, color=bars.patches[0].get_facecolor(), edgecolors="k")
    ax.set_xticks(range(len(datasets)))
    ax.set_xticklabels(datasets)
    ax.set_ylabel(f"{metric} (%)" if factor == 100.0 else metric)
    if factor == 100.0:
        ax.axhline(50.0, color="grey", lw=0.8, ls="--")
        ax.set_ylim(0.0, 115.0)  # room for the legend above 100 %
    ax.legend(fontsize="small", ncol=min(max(len(rewards), 1), 5), loc="upper right")
    ax.set_title("reward models: protocol accuracy, 95% bootstrap CI (dash: published)", fontsize="small")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


def write_leaderboard(results: Sequence[Result], out: str | os.PathLike, metric: str = "accuracy") -> dict[str, Path]:
    """``leaderboard.md``, ``leaderboard.html``, ``leaderboard.png`` and ``leaderboard.json`` in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "markdown": out / "leaderboard.md",
        "html": out / "leaderboard.html",
        "plot": out / "leaderboard.png",
        "json": out / "leaderboard.json",
    }
    paths["markdown"].write_text(leaderboard_markdown(results, metric), encoding="utf-8")
    paths["html"].write_text(leaderboard_html(results, metric), encoding="utf-8")
    leaderboard_plot(results, paths["plot"], metric)
    paths["json"].write_text(
        json.dumps(json_safe(list(results)), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return paths
