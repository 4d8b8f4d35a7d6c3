"""``mmalign bench``: reward-model accuracy with the published protocols, leaderboards, generator arenas.

Sub-subcommands are listed in :data:`SUBCOMMANDS` as ``"module:function"`` strings, each function adding its
parser to the ``bench`` subparsers (``mmalign bench trainers`` can be added by naming its module here).
Heavy imports stay inside the ``run_*`` functions.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
from pathlib import Path

from ..errors import MMAlignError
from ._reward_args import add_reward_file_options

SUBCOMMANDS: dict[str, str] = {
    "rewards": "mmalign.commands.bench:add_rewards",
    "leaderboard": "mmalign.commands.bench:add_leaderboard",
    "generators": "mmalign.commands.bench:add_generators",
    # toyworld trainer comparison (issue 5): parser and runner live in mmalign/toyworld/bench.py
    "trainers": "mmalign.toyworld.bench:add_trainers",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark reward models (published protocols) and generators (arenas)",
        description="Benchmarks: `bench rewards`, `bench leaderboard`, `bench generators`.",
    )
    bench = p.add_subparsers(dest="bench_command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for target in SUBCOMMANDS.values():
        module, _, function = target.partition(":")
        getattr(importlib.import_module(module), function)(bench)


# ---------------------------------------------------------------- shared options


def _add_reward_options(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("reward models (each --reward may be followed by its own files)")
    add_reward_file_options(group, "reward name or http://HOST:PORT/NAME (repeat to compare)")
    group.add_argument("--batch-size", type=int, default=32)
    group.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    group.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.set_defaults(rewards=[])


def _add_bootstrap_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="bootstrap resamples (0: no CI)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and of any split")
    p.add_argument("--level", type=float, default=0.95, help="confidence level of the intervals")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _label_duplicates(rewards) -> None:
    seen: dict[str, int] = {}
    for spec in rewards:
        seen[spec.name] = seen.get(spec.name, 0) + 1
    for spec in rewards:
        if seen[spec.name] > 1:
            spec.label = f"{spec.name}@{Path(spec.weights).stem if spec.weights else 'default'}"


def _check_common(args: argparse.Namespace) -> None:
    if args.bootstrap < 0:
        raise MMAlignError("--bootstrap must be 0 or more")
    if not 0.0 < args.level < 1.0:
        raise MMAlignError("--level must be in (0, 1)")
    if getattr(args, "batch_size", 1) < 1:
        raise MMAlignError("--batch-size must be at least 1")


# ---------------------------------------------------------------- bench rewards


def add_rewards(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rewards",
        help="accuracy of reward models on a preference dataset, with the published protocol",
        description="Score a dataset with reward models (--reward, repeatable) or take precomputed scores "
        "(--scores, the JSONL of `mmalign score`), and report the protocol's accuracy with bootstrap CIs.",
    )
    p.add_argument(
        "--protocol",
        required=True,
        choices=["pickapic", "hpdv2", "imagereward", "pairs", "videogen", "hpdv3"],
        help="videogen: VideoGen-RewardBench's videogen-rewardbench.csv; hpdv3: HPDv3's {prompt, path1, path2} test "
        "JSON; pairs: JSONL {prompt, chosen, rejected} of images, videos or audio",
    )
    p.add_argument(
        "--data", required=True, metavar="PATH", help="test data (parquet, JSON, JSONL, CSV or dataset folder)"
    )
    p.add_argument("--val-data", metavar="PATH", help="validation data (Pick-a-Pic threshold, temperature fit)")
    p.add_argument(
        "--val-fraction", type=float, default=0.5, help="Pick-a-Pic without validation data: prompts held out"
    )
    p.add_argument("--image-root", metavar="DIR", help="folder the dataset's image / video paths are relative to")
    p.add_argument("--name", help="dataset label in results and leaderboards (default protocol:file-stem)")
    p.add_argument("--scores", metavar="FILE.jsonl", help="precomputed scores {path, prompt, reward, score}")
    _add_reward_options(p)
    p.add_argument("--logit-scale", type=float, help="a in sigmoid(a (s_a - s_b)) (default: per reward)")
    p.add_argument(
        "--thresholds",
        default="reference",
        help="Pick-a-Pic tie thresholds: 'reference' (0, 0.1, ..., 1), 'exhaustive', or a comma list",
    )
    p.add_argument("--predicted-ties", choices=["index", "half"], default="index", help="HPDv2 equal scores")
    p.add_argument(
        "--videogen-thresholds",
        choices=["reference", "distinct"],
        default="reference",
        help="VideoGen-RewardBench w/ ties: every split of the |m|-sorted pairs (VideoAlign's) or only real "
        "thresholds (where |m| changes)",
    )
    p.add_argument("--out", metavar="DIR", help="write one JSON per reward and results.md here")
    ens = p.add_argument_group("calibrated ensemble (MetaMetrics-style; needs two or more --reward)")
    ens.add_argument(
        "--fit-ensemble",
        action="store_true",
        help="fit non-negative weights over the rewards' standardised scores (Bradley-Terry likelihood) on the "
        "validation split (--val-data, Pick-a-Pic's) or on --fit-fraction of the prompts (seeded by --seed), and "
        "report every reward and the ensemble on the held-out rest",
    )
    ens.add_argument(
        "--ensemble-out",
        metavar="FILE.json",
        help="save the ensemble here (default OUT/ensemble.json with --out); use it as reward=ensemble:FILE.json",
    )
    ens.add_argument(
        "--fit-fraction", type=float, default=0.5, help="prompts to fit on when there is no validation split"
    )
    ens.add_argument("--ensemble-l2", type=float, default=1e-3, help="lambda of the (lambda/2)||w||^2 term")
    _add_bootstrap_options(p)
    p.set_defaults(func=run_rewards)


def _thresholds(text: str):
    from ..bench.protocols import PICKAPIC_THRESHOLDS

    if text == "reference":
        return PICKAPIC_THRESHOLDS
    if text == "exhaustive":
        return "exhaustive"
    try:
        values = tuple(float(t) for t in text.split(","))
    except ValueError:
        raise MMAlignError(f"--thresholds: expected 'reference', 'exhaustive' or numbers, got {text!r}") from None
    if not values:
        raise MMAlignError("--thresholds is empty")
    return values


def run_rewards(args: argparse.Namespace) -> int:
    from ..bench.runner import load_benchmark, results_markdown, write_results
    from ..bench.runner import run_rewards as run

    _check_common(args)
    if not args.rewards and not args.scores:
        raise MMAlignError("give --reward NAME (repeatable) or --scores FILE.jsonl")
    if not args.fit_ensemble and args.ensemble_out:
        raise MMAlignError("--ensemble-out goes with --fit-ensemble")
    if args.fit_ensemble:
        if args.scores:
            raise MMAlignError("--fit-ensemble fits rewards it can save and reload: give --reward, not --scores")
        if len(args.rewards) < 2:
            raise MMAlignError("--fit-ensemble needs at least two --reward")
        if args.ensemble_l2 < 0:
            raise MMAlignError("--ensemble-l2 must be 0 or more")
    _label_duplicates(args.rewards)
    if args.device.startswith("cuda"):
        from ..scoring import device_and_threads

        device_and_threads(args.device)
    benchmark = load_benchmark(
        args.protocol,
        args.data,
        val_data=args.val_data,
        image_root=args.image_root,
        val_fraction=args.val_fraction,
        seed=args.seed,
        name=args.name,
        check_files=bool(args.rewards),  # scores files need only the paths
    )
    options = dict(
        logit_scale=args.logit_scale,
        thresholds=_thresholds(args.thresholds),
        predicted_ties=args.predicted_ties,
        videogen_thresholds=args.videogen_thresholds,
        n_bootstrap=args.bootstrap,
        seed=args.seed,
        level=args.level,
    )
    common = dict(batch_size=args.batch_size, device=args.device, dtype=args.dtype, progress=not args.no_progress)
    if args.fit_ensemble:
        return _run_ensemble(args, benchmark, common, options)
    results = run(benchmark, rewards=args.rewards, scores=args.scores, **common, **options)
    sys.stdout.write(results_markdown(results))
    if benchmark.skipped:
        print(
            f"mmalign bench rewards: skipped {len(benchmark.skipped)} bad row(s), first: {benchmark.skipped[0]}",
            file=sys.stderr,
        )
    if args.out:
        paths = write_results(results, args.out)
        print(f"mmalign bench rewards: wrote {len(paths)} result file(s) and results.md to {args.out}", file=sys.stderr)
    return 0


def _run_ensemble(args: argparse.Namespace, benchmark, common: dict, options: dict) -> int:
    from ..bench.ensemble import ensemble_markdown, run_ensemble, save_ensemble
    from ..bench.runner import results_markdown, write_results

    settings = dict(fit_fraction=args.fit_fraction, l2=args.ensemble_l2, split_seed=args.seed)
    results, fit = run_ensemble(benchmark, args.rewards, **settings, **common, **options)
    sys.stdout.write(results_markdown(results))
    sys.stdout.write("\n" + ensemble_markdown(fit))
    print(
        f"mmalign bench rewards: ensemble fitted on {fit.info['fitting_split']} ({fit.info['pairs']} pairs); "
        f"the table above is held out",
        file=sys.stderr,
    )
    if args.out:
        paths = write_results(results, args.out)
        print(f"mmalign bench rewards: wrote {len(paths)} result file(s) and results.md to {args.out}", file=sys.stderr)
    target = args.ensemble_out or (Path(args.out) / "ensemble.json" if args.out else None)
    if target is None:
        print("mmalign bench rewards: ensemble not saved (give --ensemble-out FILE.json or --out DIR)", file=sys.stderr)
    else:
        extra = {"protocol": benchmark.protocol, "dataset": benchmark.name, "data": benchmark.data, "seed": args.seed}
        save_ensemble(target, args.rewards, fit, extra)
        print(f"mmalign bench rewards: saved the ensemble to {target} (reward=ensemble:{target})", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- bench leaderboard


def add_leaderboard(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "leaderboard",
        help="merge `bench rewards` results into markdown + HTML tables and a plot",
        description="Rewards x datasets from result JSON files (or folders of them).",
    )
    p.add_argument("results", nargs="+", metavar="RESULTS", help="result JSON files or folders")
    p.add_argument("--out", required=True, metavar="DIR", help="leaderboard.{md,html,png,json} go here")
    p.add_argument("--metric", default="accuracy", help="figure of the main table (accuracy, pairwise_accuracy, ...)")
    p.set_defaults(func=run_leaderboard)


def run_leaderboard(args: argparse.Namespace) -> int:
    from ..bench.leaderboard import leaderboard_markdown, load_results, write_leaderboard

    results = load_results(args.results)
    paths = write_leaderboard(results, args.out, metric=args.metric)
    sys.stdout.write(leaderboard_markdown(results, args.metric))
    print(
        f"mmalign bench leaderboard: wrote {', '.join(p.name for p in paths.values())} to {args.out}", file=sys.stderr
    )
    return 0


# ---------------------------------------------------------------- bench generators


def add_generators(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generators",
        help="rank generators from votes or reward scores: win rates, Elo, Bradley-Terry, K-wise",
        description="Votes (JSONL: {models, ranks} K-wise or {model_a, model_b, winner}) and/or reward scores of "
        "each generator's outputs (the JSONL of `mmalign score`, generator = 'generator' key or image folder; or "
        "--outputs scored here with --reward) -> win-rate matrix and rankings.",
    )
    p.add_argument("--votes", action="append", default=[], metavar="FILE.jsonl", help="vote file (repeatable)")
    p.add_argument("--scores", action="append", default=[], metavar="FILE.jsonl", help="scores file (repeatable)")
    p.add_argument(
        "--outputs",
        metavar="FILE.jsonl",
        help='generator outputs to score with --reward: lines {"prompt", "image", "generator"}',
    )
    _add_reward_options(p)
    p.add_argument("--method", choices=["elo", "bt", "kwise", "all"], default="all")
    p.add_argument("--k-factor", type=float, default=32.0, help="Elo K-factor")
    p.add_argument(
        "--bt-prior",
        type=float,
        default=0.1,
        help="Bradley-Terry pseudo-games added to every pair, half won by each side (default 0.1: a regularised "
        "fit, finite when a model never loses); 0 for the plain maximum-likelihood fit, which needs every model "
        "to win and lose, in every bootstrap resample too (use --bootstrap 0 with few votes)",
    )
    p.add_argument(
        "--kwise-pairing", choices=["mean", "weng-lin"], default="mean", help="K-wise: average or sum pair updates"
    )
    p.add_argument("--out", metavar="DIR", help="generators.{json,md} and win_rates.png go here")
    _add_bootstrap_options(p)
    p.set_defaults(func=run_generators)


def _read_outputs(path: Path) -> tuple[list, dict[str, str]]:
    from ..scoring import ScoreItem

    if not path.is_file():
        raise MMAlignError(f"{path}: no such file")
    items, generators = [], {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            image = Path(str(row["image"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise MMAlignError(f'{path}:{number}: expected {{"prompt", "image", "generator"}}') from None
        image = image if image.is_absolute() else path.parent / image
        items.append(ScoreItem(str(image), str(row.get("prompt", ""))))
        generators[str(image)] = str(row.get("generator") or image.parent.name)
    return items, generators


def run_generators(args: argparse.Namespace) -> int:
    from ..bench.arena import (
        METHODS,
        generator_report,
        read_generator_scores,
        read_votes,
        report_markdown,
        votes_from_scores,
        write_generator_report,
    )

    _check_common(args)
    if not (args.votes or args.scores or args.outputs):
        raise MMAlignError("give --votes FILE.jsonl, --scores FILE.jsonl or --outputs FILE.jsonl with --reward")
    if args.outputs and not args.rewards:
        raise MMAlignError("--outputs needs at least one --reward to score them with")
    if args.rewards and not args.outputs:
        raise MMAlignError("--reward here scores --outputs FILE.jsonl; give it")
    votes = [vote for path in args.votes for vote in read_votes(path)]
    scores: dict = {}
    for path in args.scores:
        for reward, table in read_generator_scores(path).items():
            scores.setdefault(reward, {}).update(table)
    if args.outputs:
        from ..rewards import load_reward
        from ..scoring import device_and_threads, run_scoring
        from ..sharding import Shard

        items, generators = _read_outputs(Path(args.outputs))
        _label_duplicates(args.rewards)
        with tempfile.TemporaryDirectory() as tmp:
            scores_file = Path(args.out or tmp) / "scores.jsonl"
            device = device_and_threads(args.device)
            for spec in args.rewards:
                reward = load_reward(
                    spec.name,
                    weights=spec.weights,
                    processor=spec.processor,
                    backbone=spec.backbone,
                    device=device,
                    dtype=args.dtype,
                )
                reward.name = spec.label or spec.name
                run_scoring(  # not split across processes: each process of a launch benchmarks alone, as before
                    reward,
                    items,
                    out=scores_file,
                    batch_size=args.batch_size,
                    progress=not args.no_progress,
                    shard=Shard(),
                )
            for reward, table in read_generator_scores(scores_file, generators).items():
                scores.setdefault(reward, {}).update(table)
    votes += votes_from_scores(scores)
    methods = METHODS if args.method == "all" else (args.method,)
    report = generator_report(
        votes,
        scores=scores or None,
        methods=methods,
        n_resamples=args.bootstrap,
        seed=args.seed,
        level=args.level,
        elo_options={"k_factor": args.k_factor},
        bt_options={"prior": args.bt_prior},
        kwise_options={"pairing": args.kwise_pairing},
    )
    sys.stdout.write(report_markdown(report))
    if args.out:
        paths = write_generator_report(report, args.out)
        print(
            f"mmalign bench generators: wrote {', '.join(p.name for p in paths.values())} to {args.out}",
            file=sys.stderr,
        )
    return 0
