"""Hybrid human/AI labelling on the toyworld (the exact judge stands in for people).

    PYTHONPATH=. python benchmarks/annotate_routing.py --items 200 --budget 50

Writes benchmarks/results/annotate_routing.{json,md}: accuracy of all-human, all-AI and routed labels at the same
number of human judgements (mmalign.toyworld.routing).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from mmalign.toyworld.routing import run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--budget", type=int, default=50)
    parser.add_argument("--rate", type=float, default=0.4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        report = run(folder, n=args.items, budget=args.budget, rate=args.rate, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "annotate_routing.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# Hybrid labelling on the toyworld: {report['items']} pairs, {report['budget']} human judgements",
        "",
        "`PYTHONPATH=. python benchmarks/annotate_routing.py "
        f"--items {args.items} --budget {args.budget} --rate {args.rate} --seed {args.seed}`",
        "",
        "| labelling | human judgements | labelled | accuracy (all items) | accuracy (labelled) |",
        "|---|---:|---:|---:|---:|",
    ]
    for mode, r in report["results"].items():
        labelled = "–" if r["accuracy_labelled"] is None else f"{r['accuracy_labelled']:.3f}"
        lines.append(
            f"| {mode} | {r['human_judgements']} | {r['labelled']} | {r['accuracy_all_items']:.3f} | {labelled} |"
        )
    (out / "annotate_routing.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
