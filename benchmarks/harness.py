"""What every training benchmark here shares: one subprocess per row, its memory high-water marks, the CPU other
processes used meanwhile (so contended rows are flagged), per-phase wall time, the random-weight pipelines, and
the machine description. Imported by the scripts beside it (``python benchmarks/bench_*.py`` puts this folder
on ``sys.path``); the parent side imports no torch, so a child's peak RSS never includes a big parent."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mmalign.models.builders import SD15, TINY_SD

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
GIB = 1024**3
BUSY_CORES = 0.25  # other processes' mean CPU use during a row above which its timings are flagged

SD_SIZES = {"sd15": SD15, "tiny": TINY_SD}  # SD1.5's configs (random weights) and the tests' tiny pipeline


# ==========================================================================================================
# Worker side
# ==========================================================================================================
def vm_hwm() -> int | None:
    """This process's own peak RSS in bytes (Linux ``VmHWM``), or None."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_hwm() -> bool:
    """Reset the peak-RSS high-water mark to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def ru_maxrss() -> int:
    import resource

    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value if sys.platform == "darwin" else value * 1024


class RssSampler:
    """psutil RSS sampler (every ``interval`` s): a cross-check of the kernel's high-water mark."""

    def __init__(self, interval: float = 0.02):
        import threading

        import psutil

        self.interval, self.peak = interval, 0
        self._proc, self._stop = psutil.Process(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = self._proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


class Phases:
    """Wall time per named phase of the current step (synchronising CUDA around each phase)."""

    def __init__(self, sync):
        self.sync, self.current = sync, {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.current[name] = self.current.get(name, 0.0) + time.perf_counter() - start

    def wrap(self, fn, name: str):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            with self(name):
                return fn(*args, **kwargs)

        return wrapped


def backward_and_step(loss, params, optimizer, phases: Phases, max_norm: float = 1.0) -> float:
    """The plain training-step tail of the reference scripts: backward, clip to ``max_norm``, AdamW step,
    zero_grad (set to None), timed as the ``backward`` and ``optimizer`` phases; returns the loss value."""
    import torch

    with phases("backward"):
        loss.backward()
    with phases("optimizer"):
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def time_trainer_phases(trainer, phases: Phases, batch_phase: str) -> None:
    """Time an mmalign trainer's step by phase: building the batch (``batch_phase``), ``forward`` (the loss),
    ``backward``, and ``optimizer`` (clipping, step, zero_grad)."""
    trainer.make_batch = phases.wrap(trainer.make_batch, batch_phase)
    trainer.compute_loss = phases.wrap(trainer.compute_loss, "forward")
    acc = trainer.accelerator
    acc.backward = phases.wrap(acc.backward, "backward")
    acc.clip_grad_norm_ = phases.wrap(acc.clip_grad_norm_, "optimizer")
    trainer.optimizer.step = phases.wrap(trainer.optimizer.step, "optimizer")
    trainer.optimizer.zero_grad = phases.wrap(trainer.optimizer.zero_grad, "optimizer")


def trainer_step(trainer) -> float:
    """One optimizer step of an mmalign trainer, as its loop takes it; returns the loss (NaN when absent)."""
    metrics = trainer._train_step()
    trainer.step += 1
    return float(metrics.get("loss", float("nan")))


def measure_steps(step, phases: Phases, warmup: int, steps: int, sync=lambda: None) -> dict:
    """Run ``warmup + steps`` calls of ``step()`` (after set-up) and measure the timed ones: wall time per step
    and per phase, the peak RSS of the steps (``VmHWM`` reset first; the psutil sampler where that is not
    allowed) and the set-up's high-water mark."""
    setup_hwm, setup_ru = vm_hwm(), ru_maxrss()
    reset = reset_hwm()
    step_times, step_phases = [], []
    with RssSampler() as sampler:
        for i in range(warmup + steps):
            phases.current = {}
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            if i >= warmup:
                step_times.append(time.perf_counter() - t0)
                step_phases.append(dict(phases.current))
    end_hwm, end_ru = vm_hwm(), ru_maxrss()
    if setup_hwm is not None and end_hwm is not None:
        peak, step_peak = max(setup_hwm, end_hwm), (end_hwm if reset else sampler.peak)
    else:
        peak, step_peak = max(setup_ru, end_ru), sampler.peak
    names = sorted({name for p in step_phases for name in p})
    return {
        "step_times": step_times,
        "s_per_step": sum(step_times) / len(step_times),
        "phases": {n: sum(p.get(n, 0.0) for p in step_phases) / len(step_phases) for n in names},
        "peak_rss_gib": peak / GIB,
        "step_peak_rss_gib": step_peak / GIB,
        "setup_peak_rss_gib": (setup_hwm or setup_ru) / GIB,
        "sampled_step_peak_rss_gib": sampler.peak / GIB,
        "ru_maxrss_gib": max(setup_ru, end_ru) / GIB,
        "hwm_reset": reset,
    }


def build_sd_pipeline(size: str, folder: str | Path) -> dict:
    """Random-weight SD pipeline of ``SD_SIZES[size]`` saved with ``save_pretrained`` into ``folder``."""
    from mmalign.models.builders import build_sd_pipeline as build

    start = time.perf_counter()
    sizes = SD_SIZES[size]
    counts = build(folder, sizes["unet"], sizes["vae"], sizes["text"])
    return {**counts, "build_s": time.perf_counter() - start}


# ==========================================================================================================
# Parent side (no torch import)
# ==========================================================================================================
def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (every process)."""
    import psutil

    t = psutil.cpu_times()
    return sum(getattr(t, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq", "steal"))


def children_cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_worker(
    script: str | Path,
    spec: dict,
    threads: int,
    timeout: float,
    stats: dict | None = None,
    python: str | None = None,
    isolated: bool = False,
) -> tuple[dict | None, str]:
    """Run ``script --worker SPEC`` (one row or task) in a fresh process; ``(result, '')`` or ``(None, error)``.
    ``stats`` receives the wall time, the load average before and after, and ``other_cores``: the CPU that other
    processes used meanwhile (machine busy time minus the worker's), in cores. ``python``: the interpreter (another
    environment's, e.g. a reference repository's; default this one); ``isolated``: an empty ``PYTHONPATH`` (that
    environment must not see mmalign)."""
    with tempfile.TemporaryDirectory(prefix="mmalign-bench-spec-") as tmp:
        spec = {**spec, "result": str(Path(tmp) / "result.json")}
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        env = dict(os.environ)
        env.update(
            OMP_NUM_THREADS=str(threads),
            MKL_NUM_THREADS=str(threads),
            TOKENIZERS_PARALLELISM="false",
            HF_HUB_OFFLINE="1",
            PYTHONWARNINGS="ignore",
        )
        env["PYTHONPATH"] = "" if isolated else os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
        load0 = os.getloadavg()
        busy0, children0, wall0 = busy_cpu_seconds(), children_cpu_seconds(), time.perf_counter()
        try:
            proc = subprocess.run(
                [python or sys.executable, str(Path(script).resolve()), "--worker", str(spec_path)],
                capture_output=True,
                text=True,
                timeout=timeout,
                env=env,
                cwd=str(REPO),
            )
        except subprocess.TimeoutExpired:
            return None, f"timed out after {timeout:.0f} s"
        if stats is not None:
            wall = time.perf_counter() - wall0
            worker = children_cpu_seconds() - children0
            other = (busy_cpu_seconds() - busy0 - worker) / wall if wall > 0 else 0.0
            stats.update(wall_s=wall, other_cores=max(0.0, other))
            stats.update(load_before=list(load0), load_after=list(os.getloadavg()))
        result_path = Path(spec["result"])
        if proc.returncode != 0 or not result_path.is_file():
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-15:]
            signal = " (killed: out of memory?)" if proc.returncode in (-9, 137) else ""
            return None, f"exit status {proc.returncode}{signal}: " + "\n".join(tail)
        return json.loads(result_path.read_text()), ""


def ensure_sd_pipeline(script: str | Path, cache_dir: Path, size: str, threads: int, timeout: float, version: int):
    """The random pipeline of ``size`` built once (by ``script``'s worker task ``build``) under ``cache_dir``."""
    folder = cache_dir / f"{size}-v{version}"
    marker = folder / ".complete.json"
    if marker.is_file():
        return folder, json.loads(marker.read_text())
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    print(f"building the random {size} pipeline in {folder} (once) ...", flush=True)
    info, error = run_worker(script, {"task": "build", "size": size, "folder": str(folder)}, threads, timeout)
    if info is None:
        raise SystemExit(f"building the {size} pipeline failed: {error}")
    marker.write_text(json.dumps(info))
    print(f"  built in {info['build_s']:.0f} s (UNet {info['unet_params'] / 1e6:.0f} M parameters)", flush=True)
    return folder, info


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "peft", "accelerate", "xformers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def cpu_flags() -> str:
    """The CPU's feature flags (``/proc/cpuinfo``), empty when unknown."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].strip()
    return ""


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_line(threads: int) -> str:
    """The CPU, its AVX/AMX flags and the torch threads, for a result file's ``machine``."""
    flags = " ".join(f for f in cpu_flags().split() if f.startswith(("avx", "amx"))) or "no AVX"
    return f"{cpu_model()} ({flags}), {threads} torch thread{'s' * (threads != 1)} (a shared 2-core machine)"


def fmt(value, spec: str = ".2f", none: str = "–") -> str:
    return none if value is None else format(value, spec)
