"""What the real-size Diffusion-DPO memory benchmarks share (``bench_video_memory.py``: Wan 2.1-1.3B on 17 frames;
``bench_audio_memory.py``: Stable Audio Open on 10 s): a :class:`Family` says how to build its random pipeline,
write its pairs, take the straightforward step and configure mmalign's trainer; this module runs the rows (each in
its own process: a straightforward step beside mmalign's, 1 warm-up then timed steps), samples the children's
memory from the parent, and writes ``<family>_memory.json`` and ``.md``. Never a test: nothing here asserts."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from harness import (
    BUSY_CORES,
    GIB,
    REPO,
    RESULTS,
    Phases,
    cpu_flags,
    cpu_model,
    fmt,
    measure_steps,
    run_worker,
    time_trainer_phases,
    trainer_step,
    versions,
)

ROWS = ("plain", "mmalign")
LORA_RANK, LORA_ALPHA, BETA, LR = 32, 64, 100.0, 1e-4  # both families, both rows


@dataclass
class Family:
    """One family's side of the benchmark. ``sizes``: size name → the row settings every worker gets (JSON);
    ``real``: the size whose results go to ``benchmarks/results/`` (the others to a temporary folder)."""

    name: str  # "video" → video_memory.json / .md
    script: str  # the entry script (its ``--worker`` runs the rows)
    doc: str  # the entry script's docstring (its first line is the command's description)
    title: str  # the markdown heading
    sizes: dict[str, dict]
    real: str
    build_version: int
    build: Callable[[dict], dict]  # worker: spec (size, folder) → {"build_s", "transformer_params", ...}
    make_pairs: Callable[[Path, dict], Path]  # parent: (folder, size settings) → the pairs' JSONL
    plain_step: type  # worker: PlainStep(spec, phases) with .step() and .info()
    overrides: Callable[[dict], list[str]]  # the family's own mmalign options for a row's spec
    model_line: Callable[[dict], str]  # markdown: the model bullet from the report's meta
    memory_note: str  # markdown: the last sentence of the memory bullet (what was shrunk)
    policy: Callable[[dict], Any] | None = None  # worker: the generator built in memory (None: loaded from the folder)


# ==========================================================================================================
# Worker side (one subprocess per task; imports torch)
# ==========================================================================================================
class MMAlignStep:
    """mmalign's DPO trainer: LoRA, gradient checkpointing, cached latents and text conditions, text encoders
    freed; its pairs' latents and prompts primed first (the steady state of a run's later epochs), then
    ``trainer._train_step()``."""

    def __init__(self, spec: dict, phases: Phases, family_overrides: list[str], policy: Any = None):
        import torch

        from mmalign.commands.train import resolve_trainer_config

        self.phases = phases
        self.output_dir = tempfile.mkdtemp(prefix="mmalign-bench-memory-")
        overrides = [
            "trainer=dpo",
            f"model={spec['model']}",
            f"data={spec['data']}",
            f"output_dir={self.output_dir}",
            *family_overrides,
            f"beta={BETA}",
            f"lr={LR}",
            f"lora_rank={LORA_RANK}",
            f"lora_alpha={LORA_ALPHA}",
            "gradient_checkpointing=true",
            "cache_latents=true",
            f"conditions_cache={Path(self.output_dir) / 'conditions'}",
            "free_text_encoders=true",
            "batch_size=1",
            "tracker=none",
            "progress=false",
            "checkpoint_every=1000000",
            "max_steps=1000000",
            "seed=0",
        ]
        trainer_class, config = resolve_trainer_config(None, overrides)
        start = time.perf_counter()
        self.trainer = trainer = trainer_class(config) if policy is None else trainer_class(config, policy=policy(spec))
        torch.set_num_threads(spec["threads"])
        for index in range(len(trainer.pairs)):  # every pair's VAE posteriors once (the later epochs' state)
            trainer._item(0, index)
        self.prime_s = time.perf_counter() - start
        time_trainer_phases(trainer, phases, "encode")
        self.losses: list[float] = []

    def step(self) -> None:
        self.losses.append(trainer_step(self.trainer))

    def info(self) -> dict:
        trainer = self.trainer
        return {
            "trainable_params": sum(p.numel() for p in trainer.trainable),
            "losses": self.losses,
            "prime_s": self.prime_s,
            "text_encoders_freed": all(getattr(trainer.policy, name, None) is None for name in ("text_encoder",)),
        }

    def close(self) -> None:
        shutil.rmtree(self.output_dir, ignore_errors=True)


def release_freed_memory() -> None:
    """Collect garbage and return the allocator's free pages to the system (glibc ``malloc_trim``), so that the
    resident set counts live memory only."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def dpo_loss(model_w, model_l, ref_w, ref_l):
    """Diffusion-DPO on the per-sample prediction errors (β :data:`BETA`)."""
    import torch.nn.functional as F

    return -F.logsigmoid(-0.5 * BETA * ((model_w - model_l) - (ref_w - ref_l))).mean()


def _run_row(family: Family, spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    phases = Phases(lambda: None)
    start = time.perf_counter()
    if spec["row"] == "mmalign":
        runner = MMAlignStep(spec, phases, family.overrides(spec), family.policy)
    else:
        runner = family.plain_step(spec, phases)
    setup_s = time.perf_counter() - start
    release_freed_memory()  # what loading and priming freed is not the steps' memory: hand it back before VmHWM resets
    measured = measure_steps(runner.step, phases, spec["warmup"], spec["steps"])
    phase_means = {n: measured["phases"].get(n, 0.0) for n in ("encode", "forward", "backward", "optimizer")}
    phase_means["other"] = max(0.0, measured["s_per_step"] - sum(phase_means.values()))
    result = {**measured, "phases": phase_means, "setup_s": setup_s, **runner.info()}
    if hasattr(runner, "close"):
        runner.close()
    return result


def worker_main(family: Family, spec_path: str) -> int:
    sys.path.insert(0, str(REPO))
    spec = json.loads(Path(spec_path).read_text())
    result = family.build(spec) if spec["task"] == "build" else _run_row(family, spec)
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


# ==========================================================================================================
# Parent side (no torch import)
# ==========================================================================================================
def ensure_model(family: Family, cache_dir: Path, size: str, threads: int, timeout: float) -> tuple[Path, dict]:
    folder = cache_dir / f"{size}-v{family.build_version}"
    marker = folder / ".complete.json"
    if marker.is_file():
        return folder, json.loads(marker.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    print(f"building the random {size} pipeline in {folder} (once) ...", flush=True)
    info, error = run_worker(family.script, {"task": "build", "size": size, "folder": str(folder)}, threads, timeout)
    if info is None:
        raise SystemExit(f"building the {size} pipeline failed: {error}")
    marker.write_text(json.dumps(info))
    print(f"  built in {info['build_s']:.0f} s ({info['transformer_params'] / 1e9:.2f} B transformer parameters)")
    return folder, info


class ChildRss:
    """The largest resident set of this process's children, sampled every ``interval`` seconds from the parent: a
    row killed for memory has no high-water mark of its own to report, this one survives it."""

    def __init__(self, interval: float = 0.25):
        import threading

        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.wait(self.interval):
            try:
                total = sum(child.memory_info().rss for child in me.children(recursive=True))
            except psutil.Error:
                continue
            self.peak = max(self.peak, total)

    def __enter__(self) -> ChildRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def render_markdown(family: Family, report: dict) -> str:
    meta, rows = report["meta"], report["rows"]
    by_name = {row["name"]: row for row in rows if row.get("ok")}
    plain = by_name.get("plain")
    lines = [
        f"# {family.title}",
        "",
        f"Generated by `{meta['command']}` on {meta['date']}.",
        "",
        family.model_line(meta),
        f"- Machine: {meta['cpu']}, {meta['threads']} torch threads per row; CPU flags: {meta['cpu_flags']}.",
        f"- {meta['warmup']} warm-up step, then the mean of {meta['steps']} timed steps; each row in its own process.",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v) + ".",
        f"- Memory: {meta.get('memory_gib', 0):.1f} GiB on the machine. Step peak: the training steps' own high-water "
        "mark (VmHWM reset after set-up); process peak: loading and priming included; a killed row shows the largest "
        f"resident set the parent sampled (every 0.25 s) before the kill. {family.memory_note}",
        "",
        "| row | s/step | encode | forward | backward | optimizer | step peak GiB | process peak GiB | x time "
        "| x step peak | other cores |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if not row.get("ok"):
            error = row.get("error", "?")
            reason = "killed (out of memory)" if "-9" in error else f"failed: {error[:80]}"
            lines.append(
                f"| {row['name']} | {reason} | | | | | | ≥ {row.get('sampled_peak_gib', 0.0):.2f} (sampled) | | | "
                f"{row.get('other_cores', 0.0):.2f} |"
            )
            continue
        phases = row["phases"]
        time_ratio = row["s_per_step"] / plain["s_per_step"] if plain else None
        mem_ratio = row["step_peak_rss_gib"] / plain["step_peak_rss_gib"] if plain else None
        busy = " (busy)" if (row.get("other_cores") or 0.0) > BUSY_CORES else ""
        lines.append(
            f"| {row['name']} | {row['s_per_step']:.1f} | {phases['encode']:.1f} | {phases['forward']:.1f} | "
            f"{phases['backward']:.1f} | {phases['optimizer']:.1f} | {row['step_peak_rss_gib']:.2f} | "
            f"{row['peak_rss_gib']:.2f} | {fmt(time_ratio)} | {fmt(mem_ratio)} | "
            f"{row.get('other_cores', 0.0):.2f}{busy} |"
        )
    mmalign = by_name.get("mmalign")
    if mmalign:
        verdict = "met" if mmalign["step_peak_rss_gib"] <= 20.0 else "NOT met"
        lines += [
            "",
            f"mmalign's step peak {mmalign['step_peak_rss_gib']:.2f} GiB: the 20 GB target is {verdict}; its pairs "
            f"were primed in {mmalign['prime_s']:.0f} s (set-up included), text encoders freed: "
            f"{mmalign.get('text_encoders_freed')}.",
        ]
    lines += [f"- {note}" for note in meta.get("notes", [])]
    return "\n".join(lines) + "\n"


def main(family: Family, argv=None) -> int:
    parser = argparse.ArgumentParser(description=family.doc.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--size", choices=sorted(family.sizes), default=family.real)
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / f"mmalign-bench-{family.name}")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--timeout", type=float, default=7200)
    parser.add_argument("--note", action="append", default=[])
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(family, args.worker)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; rows: {', '.join(ROWS)}")
    size = family.sizes[args.size]
    out = args.out or (RESULTS if args.size == family.real else Path(tempfile.mkdtemp(prefix=f"bench-{family.name}-")))
    folder, built = ensure_model(family, args.cache_dir, args.size, args.threads, args.timeout)
    data = family.make_pairs(args.cache_dir / f"pairs-{args.size}", size)
    results = []
    for name in rows:
        spec = {"task": "row", "row": name, "size": args.size, "model": str(folder), "data": str(data)}
        spec["threads"] = args.threads
        spec.update(size, steps=args.steps, warmup=args.warmup)
        print(f"{name}: running (load {os.getloadavg()[0]:.2f}) ...", flush=True)
        stats: dict = {}
        with ChildRss() as sampled:
            result, error = run_worker(family.script, spec, args.threads, args.timeout, stats)
        stats["sampled_peak_gib"] = sampled.peak / GIB
        row = {"name": name, **stats, **({"ok": True, **result} if result else {"ok": False, "error": error})}
        results.append(row)
        if result:
            print(f"  {result['s_per_step']:.1f} s/step, step peak {result['step_peak_rss_gib']:.2f} GiB, process peak "
                  f"{result['peak_rss_gib']:.2f} GiB", flush=True)  # fmt: skip
        else:
            print(f"  failed: {error}", flush=True)
    meta = {
        "command": f"python benchmarks/{Path(family.script).name} " + " ".join(argv or sys.argv[1:]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "size": args.size,
        **size,
        "transformer_params": built["transformer_params"],
        "threads": args.threads,
        "steps": args.steps,
        "warmup": args.warmup,
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "memory_gib": __import__("psutil").virtual_memory().total / GIB,
        "versions": versions(),
        "notes": args.note,
    }
    report = {"meta": meta, "rows": results}
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{family.name}_memory"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    (out / f"{stem}.md").write_text(render_markdown(family, report))
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.md')}")
    return 0
