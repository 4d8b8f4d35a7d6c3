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

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
GIB = 1024**3
BUSY_CORES = 0.25  # other processes' mean CPU use during a row above which its timings are flagged

SD_SIZES = {
    # SD1.5 (stable-diffusion-v1-5 unet/vae/text_encoder config.json), random weights
    "sd15": dict(
        unet=dict(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768,
            attention_head_dim=8,
            norm_num_groups=32,
        ),
        vae=dict(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            norm_num_groups=32,
            sample_size=512,
        ),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    ),
    # as tests/tiny.py: seconds per step
    "tiny": dict(
        unet=dict(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=(2, 4),
            norm_num_groups=8,
        ),
        vae=dict(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            block_out_channels=(16, 32),
            layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            norm_num_groups=8,
            sample_size=32,
        ),
        text=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4),
    ),
}


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


def build_sd_pipeline(size: str, folder: str | Path) -> dict:
    """Random-weight SD pipeline of ``SD_SIZES[size]`` saved with ``save_pretrained`` into ``folder``."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from mmalign.tokenizers import write_clip_tokenizer

    sizes = SD_SIZES[size]
    start = time.perf_counter()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**sizes["unet"])
    vae = AutoencoderKL(**sizes["vae"])
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=sizes["text"]["hidden_size"],
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
            **sizes["text"],
        )
    )
    scheduler = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )
    with tempfile.TemporaryDirectory() as tok:
        tokenizer = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(Path(tok) / "tokenizer")))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {
        "unet_params": count(unet),
        "vae_params": count(vae),
        "text_encoder_params": count(text_encoder),
        "build_s": time.perf_counter() - start,
    }


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
    script: str | Path, spec: dict, threads: int, timeout: float, stats: dict | None = None
) -> tuple[dict | None, str]:
    """Run ``script --worker SPEC`` (one row or task) in a fresh process; ``(result, '')`` or ``(None, error)``.
    ``stats`` receives the wall time and ``other_cores``: the CPU that other processes used meanwhile (machine
    busy time minus the worker's), in cores."""
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
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
        busy0, children0, wall0 = busy_cpu_seconds(), children_cpu_seconds(), time.perf_counter()
        try:
            proc = subprocess.run(
                [sys.executable, str(Path(script).resolve()), "--worker", str(spec_path)],
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


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def fmt(value, spec: str = ".2f", none: str = "–") -> str:
    return none if value is None else format(value, spec)
