"""Best-of-N and ReNO noise optimisation at inference on the toyworld: held-out judge adherence against the cost in
generator calls.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_best_of_n.py --prompts 32 --threads 1

Every row runs :func:`mmalign.commands.generate.generate` (what ``mmalign generate`` runs) on the shipped toyworld
pipelines over the 32 held-out prompts (never trained on), and the exact judge (:mod:`mmalign.toyworld.judge`)
measures the chosen image of each prompt. Selection (and the noise optimisation's objective) is the learned,
differentiable toyworld reward (``toyworld``, a tiny CLIP; agreement 0.92 with the judge on held-out pairs), never
the judge itself, except in the ``oracle`` rows, where the judge both selects and measures (an upper bound of
best-of-N with a perfect reward: there the selection reward IS the measure).

Best-of-N for N = 1, 4, 16 is read from one N = 16 run: candidate ``j`` of a prompt has the same seed whatever N
(:func:`mmalign.models.noise_opt.candidate_seed`), so the first N candidates of the N = 16 run are the candidates
of an N run (``tests/test_generate.py`` checks the nesting); its cost is counted as N forward chains. Noise
optimisation rows are their own runs (N = 1 or 4, then K steps of ReNO). Costs are whole sampler chains per prompt
(forward; backward through the chain, about twice a forward's time) and the CPU seconds they took.

Writes benchmarks/results/best_of_n.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from harness import cpu_flags, cpu_model, versions
from PIL import Image

from mmalign.commands.generate import generate
from mmalign.toyworld.judge import judge
from mmalign.toyworld.world import split_prompts

RESULTS = Path(__file__).resolve().parent / "results"
PIPELINES = {"unet": ("pipeline", 20), "flow": ("flow_pipeline", 10)}  # asset folder, sampler steps
SIMD = ("avx512f", "avx512_bf16", "amx_tile", "avx2", "fma")


def load_generator(kind: str):
    from mmalign.models.generator import load_generator as load
    from mmalign.toyworld.sampling import asset_dir

    return load(asset_dir(PIPELINES[kind][0]))


def judged(out: Path, prompts: list[str]) -> list[dict]:
    """Per prompt: the judge's overall score of every written image, and the rows of scores.jsonl."""
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    for row, prompt in zip(rows, prompts):
        assert row["prompt"] == prompt
        row["judge"] = [
            judge(np.asarray(Image.open(out / name).convert("RGB")), prompt).overall for name in row["images"]
        ]
    return rows


def attribute_means(images: list[np.ndarray], prompts: list[str]) -> dict[str, float]:
    verdicts = [judge(image, prompt) for image, prompt in zip(images, prompts)]
    return {name: float(np.mean([v.scores[name] for v in verdicts])) for name in verdicts[0].scores}


def run_generate(generator, reward, prompts, out, n, steps, guidance, k=0, lr=None) -> tuple[list[dict], dict]:
    cpu, wall = time.process_time(), time.perf_counter()
    summary = generate(
        generator, reward, prompts, n, out, steps=steps, guidance=guidance, resolution=32, seed=0,
        noise_opt_steps=k, noise_opt_lr=lr, batch_size=16,
    )  # fmt: skip
    timing = {"cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall, **summary}
    return judged(out, prompts), timing


def best_of(rows: list[dict], n: int, by: str) -> tuple[float, list[int]]:
    """Mean judge score of the best of the first ``n`` candidates by ``by`` ("reward" or "judge")."""
    picks = []
    for row in rows:
        keys = row["scores"][:n] if by == "reward" else row["judge"][:n]
        picks.append(int(np.argmax(keys)))
    return float(np.mean([row["judge"][j] for row, j in zip(rows, picks)])), picks


def bench_pipeline(kind: str, prompts: list[str], guidance: float, ks: list[int], lrs: list[float], work: Path):
    from mmalign.trainers.online import build_reward

    generator = load_generator(kind)
    reward = build_reward("toyworld").to(generator.device)
    steps = PIPELINES[kind][1]
    rows16, timing16 = run_generate(generator, reward, prompts, work / f"{kind}-n16", 16, steps, guidance)
    per_chain_cpu = timing16["cpu_s"] / (16 * len(prompts))
    results = []
    for n in (1, 4, 16):
        for by in ("reward", "judge"):
            if by == "judge" and n == 1:
                continue
            adherence, _ = best_of(rows16, n, by)
            results.append(
                {
                    "pipeline": kind,
                    "method": f"best-of-{n}" if by == "reward" else f"best-of-{n} (oracle: the judge selects)",
                    "selection": "toyworld (learned)" if by == "reward" else "toyworld-judge (= the measure)",
                    "n": n, "k": 0, "lr": None,
                    "forward": n, "backward": 0,
                    "cpu_s_per_prompt": per_chain_cpu * n,
                    "adherence": adherence,
                }
            )  # fmt: skip
    mean_reward = float(np.mean([np.mean(r["judge"]) for r in rows16]))
    for n in (1, 4):
        for k in ks:
            for lr in lrs:
                out = work / f"{kind}-n{n}-k{k}-lr{lr}"
                rows, timing = run_generate(generator, reward, prompts, out, n, steps, guidance, k=k, lr=lr)
                chosen = [row["judge"][row["chosen"]] for row in rows]
                objective = [row["noise_opt"]["objective_rewards"] for row in rows]
                final = [row["judge"][-1] for row in rows]  # the last iterate z_K, whatever its reward
                start = [row["judge"][row["noise_opt"]["from"]] for row in rows]
                results.append(
                    {
                        "pipeline": kind,
                        "method": f"best-of-{n} + ReNO {k} steps (lr {lr})",
                        "selection": "toyworld (learned)",
                        "n": n, "k": k, "lr": lr,
                        "forward": timing["forward"] / len(prompts),
                        "backward": timing["backward"] / len(prompts),
                        "cpu_s_per_prompt": timing["cpu_s"] / len(prompts),
                        "adherence": float(np.mean(chosen)),
                        "adherence_start": float(np.mean(start)),
                        "adherence_last_iterate": float(np.mean(final)),
                        "objective_reward_start": float(np.mean([o[0] for o in objective])),
                        "objective_reward_best": float(np.mean([max(o) for o in objective])),
                        "chosen_is_an_iterate": float(np.mean([row["chosen"] >= n for row in rows])),
                    }
                )  # fmt: skip
                print(json.dumps(results[-1]), flush=True)
    return {
        "pipeline": kind,
        "asset": PIPELINES[kind][0],
        "steps": steps,
        "sampler": "DDIM eta=0" if kind == "unet" else "Euler ODE",
        "mean_candidate_adherence": mean_reward,
        "n16_cpu_s": timing16["cpu_s"],
        "n16_wall_s": timing16["wall_s"],
        "rows": results,
    }


def machine(threads: int) -> dict:
    flags = cpu_flags().split()
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return {
        "cpu": cpu_model(),
        "simd": [f for f in SIMD if f in flags],
        "cores": os.cpu_count(),
        "threads": threads,
        "uptime_before": load,
        "platform": platform.platform(),
        "versions": versions(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32, help="held-out prompts (of the 32)")
    parser.add_argument("--pipelines", default="unet,flow")
    parser.add_argument("--guidance", type=float, default=1.0, help="the demo's (no guidance): adherence ≈ 0.5")
    parser.add_argument("--ks", default="3,15", help="ReNO steps")
    parser.add_argument("--lrs", default="5.0", help="ReNO learning rates (ReNO's: 5)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    _, heldout = split_prompts()
    prompts = [p.text for p in heldout[: args.prompts]]
    report = {"machine": machine(args.threads), "prompts": len(prompts), "guidance": args.guidance, "pipelines": []}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        for kind in args.pipelines.split(","):
            ks, lrs = [int(k) for k in args.ks.split(",")], [float(x) for x in args.lrs.split(",")]
            report["pipelines"].append(bench_pipeline(kind, prompts, args.guidance, ks, lrs, Path(folder)))
    report["machine"]["uptime_after"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    report["wall_s"] = time.perf_counter() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "best_of_n.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "best_of_n.md").write_text(markdown(report, args))
    print(markdown(report, args))


def markdown(report: dict, args: argparse.Namespace) -> str:
    m = report["machine"]
    lines = [
        "# Best-of-N and ReNO noise optimisation on the toyworld",
        "",
        f"`PYTHONPATH=. OMP_NUM_THREADS={m['threads']} python benchmarks/bench_best_of_n.py --prompts "
        f"{report['prompts']} --pipelines {args.pipelines} --guidance {args.guidance} --ks {args.ks} --lrs {args.lrs} "
        f"--threads {m['threads']}`",
        "",
        f"Machine: {m['cpu']} ({', '.join(m['simd']) or 'no AVX flags'}), {m['cores']} cores shared with other "
        f"jobs, {m['threads']} torch thread; load before: `{m['uptime_before']}`; after: `{m['uptime_after']}`; "
        f"{report['wall_s']:.0f} s in all. CPU seconds are this process's (`time.process_time`), so other jobs' "
        "load slows the wall clock more than them.",
        "",
        f"{report['prompts']} held-out prompts, guidance {report['guidance']}, seed 0. Adherence: the exact judge's "
        "overall score of the chosen image, mean over prompts. Selection by the learned `toyworld` reward (a tiny "
        "CLIP) unless the row says *oracle*, where the judge selects and measures (the selection reward IS the "
        "measure: an upper bound, not a method). Calls: whole sampler chains per prompt (a backward chain costs "
        "about twice a forward one).",
    ]
    for p in report["pipelines"]:
        lines += [
            "",
            f"## {p['pipeline']} (`assets/toyworld/{p['asset']}`, {p['sampler']}, {p['steps']} steps)",
            "",
            f"Mean adherence of all 16 candidates: {p['mean_candidate_adherence']:.3f}.",
            "",
            "| method | forward chains | backward chains | CPU s / prompt | judge adherence |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in p["rows"]:
            lines.append(
                f"| {r['method']} | {r['forward']:g} | {r['backward']:g} | {r['cpu_s_per_prompt']:.2f} | "
                f"{r['adherence']:.3f} |"
            )
        reno = [r for r in p["rows"] if r["k"]]
        if reno:
            lines += [
                "",
                "| ReNO run | adherence of z_0's image | of the last iterate z_K | of the chosen | objective reward "
                "z_0 → best | chosen is an iterate |",
                "|---|---:|---:|---:|---:|---:|",
            ]
            for r in reno:
                lines.append(
                    f"| {r['method']} | {r['adherence_start']:.3f} | {r['adherence_last_iterate']:.3f} | "
                    f"{r['adherence']:.3f} | {r['objective_reward_start']:.3f} → {r['objective_reward_best']:.3f} | "
                    f"{r['chosen_is_an_iterate']:.2f} |"
                )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
