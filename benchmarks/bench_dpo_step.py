"""Diffusion-DPO training step: time per step and peak memory of mmalign's trainer beside the reference scripts.

    .venv/bin/python benchmarks/bench_dpo_step.py                  # SD1.5 size, 256 px, every row (CPU: ~15 min)
    .venv/bin/python benchmarks/bench_dpo_step.py --size tiny      # tiny pipeline, 64 px: checks the script (~3 min)
    .venv/bin/python benchmarks/bench_dpo_step.py --configs lora   # LoRA rows only (groups: lora, full, baselines,
                                                                   # mmalign, all; or row names, comma-separated)
    .venv/bin/python benchmarks/bench_dpo_step.py --attention sdpa,xformers   # on a CUDA machine: 512 px, bf16

Writes ``benchmarks/results/dpo_step.json`` and ``dpo_step.md`` (``--size tiny`` writes to a temporary folder
unless ``--out`` is given, so it never overwrites the real table). Run it on a quiet machine: every row is timed
on the same cores; the CPU that other processes used during each row is recorded, and rows where it exceeds a
quarter of a core are flagged (oversubscribed OpenMP threads slow a step several-fold).

What is measured. An SD1.5-size pipeline with random weights (UNet2DConditionModel with SD1.5's config, 860 M
parameters; SD's AutoencoderKL; the CLIP ViT-L/14 text encoder; DDPMScheduler with SD's betas) is built once and
saved with ``save_pretrained`` in a cache folder (``--cache-dir``, ~4.3 GB), beside a small JSONL of random
image pairs at the training resolution, each with its own prompt. Each configuration (row) then runs in its
own subprocess with ``torch.set_num_threads(N)`` (default: every core): set-up (loading the pipeline from the
folder), 1 warm-up step, K timed steps (default 2), one pair per step, fp32 on CPU. Reported per row:

* s/step: the mean of the timed steps, split into encode (image decode, VAE and text encoder; mmalign: building
  the batch), forward (policy and reference forwards and the loss), backward and optimizer (gradient clipping,
  AdamW step, zero_grad);
* peak RSS: the process's own high-water mark (``VmHWM``; ``ru_maxrss`` where /proc is absent) over the whole
  run, loading included, and the high-water mark of the training steps alone (reset through
  ``/proc/self/clear_refs`` after set-up, so the load transients do not mask it); on CUDA the peak
  ``torch.cuda.max_memory_allocated`` instead;
* ratios of time and memory to the matching baseline (LoRA rows to the diffusers LoRA example without gradient
  checkpointing, full fine-tuning rows to the official full fine-tune) and whether mmalign's targets are met.

Rows. Baselines are written plainly here, as the reference scripts do it, not through mmalign:

* ``diffusers-lora`` (``-gc``): diffusers ``examples/research_projects/diffusion_dpo/train_diffusion_dpo.py``:
  peft LoRA rank 8 on to_q/to_k/to_v/to_out.0, every step decodes the pair, VAE-encodes both images
  (``latent_dist.sample() * scaling_factor``) and text-encodes the prompt, shared t and noise for winner and
  loser, one UNet forward on the concatenated pair, the reference forward with ``unet.disable_adapters()`` under
  no_grad, ``-logsigmoid(-0.5*beta*(model_diff - ref_diff))``, backward, clip, AdamW (torch's default
  implementation: the for-loop one on CPU, foreach on CUDA); with and without
  ``unet.enable_gradient_checkpointing()``.
* ``official-full``: SalesforceAIResearch/DiffusionDPO ``train.py``: the whole UNet trained, a separate frozen
  copy as the reference, VAE encode every step, default AdamW, no checkpointing.
* ``mmalign-*``: the real trainer, ``resolve_trainer_config(None, [model=..., data=..., lora_rank=8|0,
  gradient_checkpointing=..., cache_latents=...])`` and timed ``trainer._train_step()`` calls. With
  ``cache_latents=true`` the cache is primed before the warm-up (every pair's VAE posterior and every prompt's
  embedding computed once; the time is reported as ``prime s/pair``), so those rows are the steady state of a
  run's second and later epochs; ``mmalign-lora-nocache`` (``cache_latents=false``, every timed step a new pair
  and a new prompt) is a first-epoch step and attributes the gain of the cache.

Anchors measured on this kind of machine (random SD1.5 weights, 256 px, one pair per step, fp32, 2 threads):
the diffusers LoRA example 10.4 s/step and 6.4 GiB peak (13.2 s and 5.6 GiB with gradient checkpointing); an
official-style full fine-tune with a frozen reference copy 18.7 s/step and 18.5 GiB. The VAE encode alone is
3.0 s of each step and the optimizer 2.9 s of the full fine-tune. Targets: LoRA <= 0.75x the diffusers example's
step time at <= 1.0x its memory; full fine-tuning <= 1.0x the official-style step at <= 0.8x its memory.

On CUDA (``--device cuda``, the default when one is present) the resolution defaults to 512 and the precision to
bf16 (autocast; the baselines cast their frozen modules as the reference scripts do), and each row runs once per
``--attention`` backend (``sdpa``, ``xformers``); a backend that is not installed is reported as skipped.
Never a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from harness import (
    BUSY_CORES,
    GIB,
    REPO,
    RESULTS,
    SD_SIZES,
    Phases,
    backward_and_step,
    build_sd_pipeline,
    cpu_model,
    ensure_sd_pipeline,
    fmt,
    measure_steps,
    run_worker,
    time_trainer_phases,
    trainer_step,
    versions,
)

BUILD_VERSION = 1  # bump when the pipeline builder changes, so cached folders are rebuilt

ANCHORS = {
    "diffusers-lora": {"s_per_step": 10.4, "peak_gib": 6.4},
    "diffusers-lora-gc": {"s_per_step": 13.2, "peak_gib": 5.6},
    "official-full": {"s_per_step": 18.7, "peak_gib": 18.5},
}
ANCHOR_NOTE = (
    "random SD1.5 weights, 256 px, one pair per step, fp32, 2 threads; VAE encode 3.0 s of each step, "
    "optimizer 2.9 s of the full fine-tune"
)
# kind -> (baseline row, max time ratio, max memory ratio)
TARGETS = {"lora": ("diffusers-lora", 0.75, 1.0), "full": ("official-full", 1.0, 0.8)}

ROWS: dict[str, dict] = {
    "diffusers-lora": dict(impl="diffusers", kind="lora", gc=False, label="diffusers LoRA example"),
    "diffusers-lora-gc": dict(impl="diffusers", kind="lora", gc=True, label="diffusers LoRA example + GC"),
    "official-full": dict(impl="official", kind="full", gc=False, label="official full FT (frozen copy)"),
    "mmalign-lora": dict(impl="mmalign", kind="lora", gc=False, cache=True, label="mmalign LoRA"),
    "mmalign-lora-gc": dict(impl="mmalign", kind="lora", gc=True, cache=True, label="mmalign LoRA + GC"),
    "mmalign-lora-nocache": dict(
        impl="mmalign", kind="lora", gc=False, cache=False, label="mmalign LoRA, cache_latents=false"
    ),
    "mmalign-full": dict(impl="mmalign", kind="full", gc=False, cache=True, label="mmalign full FT"),
    "mmalign-full-gc": dict(impl="mmalign", kind="full", gc=True, cache=True, label="mmalign full FT + GC"),
    "mmalign-full-precomputed": dict(
        impl="mmalign",
        kind="full",
        gc=False,
        cache=True,
        reference="precomputed",
        label="mmalign full FT, reference=precomputed (no frozen copy)",
    ),
    "mmalign-full-precomputed-gc": dict(
        impl="mmalign",
        kind="full",
        gc=True,
        cache=True,
        reference="precomputed",
        label="mmalign full FT + GC, reference=precomputed (no frozen copy)",
    ),
}
GROUPS = {
    "all": list(ROWS),
    "lora": [n for n, r in ROWS.items() if r["kind"] == "lora"],
    "full": [n for n, r in ROWS.items() if r["kind"] == "full"],
    "baselines": [n for n, r in ROWS.items() if r["impl"] != "mmalign"],
    "mmalign": [n for n, r in ROWS.items() if r["impl"] == "mmalign"],
}

LORA_RANK = 8
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
BETA = 5000.0  # official convention (-0.5 * beta); diffusers' --beta_dpo 2500 is the same coefficient
LR = 1e-5

SIZES = SD_SIZES


# ==========================================================================================================
# Worker side (one subprocess per row; imports torch)
# ==========================================================================================================
def _build_pipeline(spec: dict) -> dict:
    return build_sd_pipeline(spec["size"], spec["folder"])


def _probe(spec: dict) -> dict:
    import importlib.util

    import torch

    cuda = torch.cuda.is_available()
    return {
        "cuda": cuda,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "xformers": importlib.util.find_spec("xformers") is not None,
        "torch_threads_default": torch.get_num_threads(),
    }


def _read_pairs(data: Path) -> list[dict]:
    rows = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    return [{**row, "chosen": data.parent / row["chosen"], "rejected": data.parent / row["rejected"]} for row in rows]


def _load_pixels(path: Path, resolution: int):
    """The reference scripts' transform without augmentation: resize the shorter side, centre crop, [-1, 1]."""
    import numpy as np
    import torch
    from PIL import Image

    image = Image.open(path).convert("RGB")
    scale = resolution / min(image.size)
    if scale != 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0


class BaselineStep:
    """The diffusers LoRA example (``impl='diffusers'``) or the official full fine-tune (``impl='official'``)."""

    def __init__(self, spec: dict, phases: Phases):
        import copy

        import torch
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        self.spec, self.phases = spec, phases
        self.device = torch.device(spec["device"])
        self.resolution = spec["resolution"]
        self.pairs = _read_pairs(Path(spec["data"]))
        self.index = 0
        folder = spec["model"]
        self.tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
        self.text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
        self.vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
        self.unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
        self.scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
        self.vae.requires_grad_(False)
        self.text_encoder.requires_grad_(False)
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[spec["precision"]]
        self.autocast_dtype = None if dtype == torch.float32 or self.device.type != "cuda" else dtype
        frozen_dtype = self.autocast_dtype or torch.float32
        self.vae.to(self.device, dtype=frozen_dtype)
        self.text_encoder.to(self.device, dtype=frozen_dtype)
        self.ref_unet = None
        if spec["impl"] == "diffusers":
            from peft import LoraConfig

            self.unet.requires_grad_(False)
            self.unet.to(self.device, dtype=frozen_dtype)
            self.unet.add_adapter(
                LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
            )
            for p in self.unet.parameters():  # diffusers' cast_training_params: trainable weights in fp32
                if p.requires_grad:
                    p.data = p.data.float()
        else:
            self.unet.to(self.device)
            self.ref_unet = copy.deepcopy(self.unet).requires_grad_(False).eval().to(dtype=frozen_dtype)
            self.unet.requires_grad_(True)
        if spec["gc"]:
            self.unet.enable_gradient_checkpointing()
        if spec["attention"] == "xformers":
            self.unet.enable_xformers_memory_efficient_attention()
            if self.ref_unet is not None:
                self.ref_unet.enable_xformers_memory_efficient_attention()
        self.unet.train()
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=LR, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        from torch.optim.optimizer import _default_to_fused_or_foreach

        fused, foreach = _default_to_fused_or_foreach(self.params, differentiable=False, use_fused=False)
        self.optimizer_impl = "AdamW " + ("fused" if fused else "foreach" if foreach else "for-loop")
        self.trainable_params = sum(p.numel() for p in self.params)
        self.losses: list[float] = []

    def _autocast(self):
        import torch

        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def step(self) -> None:
        import torch
        import torch.nn.functional as F

        phases, unet = self.phases, self.unet
        with phases("encode"):
            pair = self.pairs[self.index % len(self.pairs)]
            self.index += 1
            pixels = torch.stack([_load_pixels(pair[k], self.resolution) for k in ("chosen", "rejected")])
            pixels = pixels.to(self.device, dtype=self.vae.dtype)
            with torch.no_grad():
                latents = self.vae.encode(pixels).latent_dist.sample() * self.vae.config.scaling_factor
                ids = self.tokenizer(
                    [pair["prompt"]],
                    max_length=self.tokenizer.model_max_length,
                    padding="max_length",
                    truncation=True,
                    return_tensors="pt",
                ).input_ids.to(self.device)
                hidden = self.text_encoder(ids)[0].repeat(2, 1, 1)
        with phases("forward"), self._autocast():
            latents = latents.float()
            noise = torch.randn_like(latents).chunk(2)[0].repeat(2, 1, 1, 1)
            steps = self.scheduler.config.num_train_timesteps
            timesteps = torch.randint(0, steps, (1,), device=self.device).long().repeat(2)
            noisy = self.scheduler.add_noise(latents, noise, timesteps)
            pred = unet(noisy, timesteps, hidden).sample
            model_losses = F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=[1, 2, 3])
            model_w, model_l = model_losses.chunk(2)
            with torch.no_grad():
                if self.ref_unet is None:
                    unet.disable_adapters()
                    ref_pred = unet(noisy, timesteps, hidden).sample
                    unet.enable_adapters()
                else:
                    ref_pred = self.ref_unet(noisy, timesteps, hidden).sample
                ref_losses = F.mse_loss(ref_pred.float(), noise.float(), reduction="none").mean(dim=[1, 2, 3])
                ref_w, ref_l = ref_losses.chunk(2)
            inside = -0.5 * BETA * ((model_w - model_l) - (ref_w - ref_l))
            loss = -F.logsigmoid(inside).mean()
        self.losses.append(backward_and_step(loss, self.params, self.optimizer, phases))

    def info(self) -> dict:
        return {
            "optimizer": self.optimizer_impl,
            "trainable_params": self.trainable_params,
            "losses": self.losses,
            "skipped_steps": sum(1 for v in self.losses if v != v or v in (float("inf"), float("-inf"))),
        }


class MMAlignStep:
    """mmalign's DiffusionDPOTrainer built by ``resolve_trainer_config``; a step is ``trainer._train_step()``."""

    def __init__(self, spec: dict, phases: Phases):
        import torch

        from mmalign.commands.train import resolve_trainer_config

        self.spec, self.phases = spec, phases
        self.output_dir = tempfile.mkdtemp(prefix="mmalign-bench-dpo-")
        mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[spec["precision"]]
        if spec["device"] != "cuda":
            mixed = "no"
        overrides = [
            f"model={spec['model']}",
            f"data={spec['data']}",
            f"output_dir={self.output_dir}",
            "trainer=dpo",
            f"resolution={spec['resolution']}",
            "batch_size=1",
            "grad_accum=1",
            "tracker=none",
            "progress=false",
            "checkpoint_every=1000000",
            f"max_steps={spec['warmup'] + spec['steps'] if spec.get('reference') == 'precomputed' else 1000000}",
            f"reference={spec.get('reference', 'auto')}",
            f"lr={LR}",
            f"beta={BETA}",
            "seed=0",
            f"lora_rank={LORA_RANK if spec['kind'] == 'lora' else 0}",
            f"gradient_checkpointing={str(spec['gc']).lower()}",
            f"cache_latents={str(spec['cache']).lower()}",
            f"mixed_precision={mixed}",
            f"attention={spec['attention']}",
        ]
        trainer_class, config = resolve_trainer_config(None, overrides)
        self.trainer = trainer = trainer_class(config)
        torch.set_num_threads(spec["threads"])  # in case accelerate changed it
        self.prime_s = None
        if config.cache_latents:  # the steady state of later epochs: every pair encoded once, every prompt too
            start = time.perf_counter()
            for index in range(len(trainer.pairs)):
                trainer._item(0, index)
            trainer._embeds(list(dict.fromkeys(p.prompt for p in trainer.pairs)))
            self.prime_s = time.perf_counter() - start
        self.precompute_s = None
        if config.reference_mode == "precomputed":  # the reference forwards of every step, done up front
            start = time.perf_counter()
            trainer.precompute_reference()
            self.precompute_s = time.perf_counter() - start
        time_trainer_phases(trainer, phases, "encode")
        inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        group = inner.param_groups[0]
        impl = "fused" if group.get("fused") else "foreach" if group.get("foreach") else "for-loop"
        self.optimizer_impl = f"{type(inner).__name__} {impl}"
        self.losses: list[float] = []

    def step(self) -> None:
        self.losses.append(trainer_step(self.trainer))

    def info(self) -> dict:
        trainer = self.trainer
        return {
            "optimizer": self.optimizer_impl,
            "trainable_params": sum(p.numel() for p in trainer.trainable),
            "reference": trainer.config.reference_mode,
            "losses": self.losses,
            "skipped_steps": trainer.skipped_steps,
            "prime_s": self.prime_s,
            "prime_s_per_pair": None if self.prime_s is None else self.prime_s / len(trainer.pairs),
            # the reference forwards moved before training: their share per step belongs to the step time
            "precompute_s_per_step": None
            if self.precompute_s is None
            else self.precompute_s / trainer.config.max_steps,
        }

    def close(self) -> None:
        shutil.rmtree(self.output_dir, ignore_errors=True)


def _run_row(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    cuda = spec["device"] == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    phases = Phases(sync)
    start = time.perf_counter()
    runner = (MMAlignStep if spec["impl"] == "mmalign" else BaselineStep)(spec, phases)
    sync()
    setup_s = time.perf_counter() - start
    if cuda:
        gpu_setup_peak = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    measured = measure_steps(runner.step, phases, spec["warmup"], spec["steps"], sync)
    phase_means = {n: measured["phases"].get(n, 0.0) for n in ("encode", "forward", "backward", "optimizer")}
    phase_means["other"] = max(0.0, measured["s_per_step"] - sum(phase_means.values()))
    info = runner.info()
    result = {
        **measured,
        "s_per_step": measured["s_per_step"] + (info.get("precompute_s_per_step") or 0.0),
        "phases": phase_means,
        "setup_s": setup_s,
        "torch_threads": torch.get_num_threads(),
        **info,
    }
    if cuda:
        result["gpu_step_peak_gib"] = torch.cuda.max_memory_allocated() / GIB
        result["gpu_peak_gib"] = max(gpu_setup_peak, torch.cuda.max_memory_allocated()) / GIB
    if hasattr(runner, "close"):
        runner.close()
    return result


def worker_main(spec_path: str) -> int:
    sys.path.insert(0, str(REPO))
    spec = json.loads(Path(spec_path).read_text())
    task = spec["task"]
    if task == "build":
        result = _build_pipeline(spec)
    elif task == "probe":
        result = _probe(spec)
    else:
        result = _run_row(spec)
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


# ==========================================================================================================
# Parent side (no torch import: keeps this process small, since a child's ru_maxrss can include its parent's)
# ==========================================================================================================
def _subprocess(spec: dict, threads: int, timeout: float, stats: dict | None = None) -> tuple[dict | None, str]:
    return run_worker(__file__, spec, threads, timeout, stats)


def _random_image(rng, resolution: int):
    """A smooth random RGB image (a bilinear upsample of coarse noise plus fine noise)."""
    import numpy as np
    from PIL import Image

    coarse = rng.integers(0, 256, size=(max(resolution // 16, 2), max(resolution // 16, 2), 3), dtype=np.uint8)
    image = Image.fromarray(coarse, "RGB").resize((resolution, resolution), Image.BILINEAR)
    noise = rng.integers(-12, 13, size=(resolution, resolution, 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8), "RGB")


def make_pairs(folder: Path, count: int, resolution: int) -> Path:
    """``count`` random pairs at ``resolution`` px, each with its own prompt, as mmalign's JSONL."""
    import numpy as np

    path = folder / "pairs.jsonl"
    if path.is_file() and len(path.read_text().splitlines()) == count:
        return path
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    subjects = ["a red fox", "a lighthouse", "a bowl of ramen", "an old tram", "a glass teapot", "a snowy owl"]
    lines = []
    for i in range(count):
        for side in ("chosen", "rejected"):
            _random_image(rng, resolution).save(folder / f"{side}{i}.png")
        prompt = f"{subjects[i % len(subjects)]} in the style of painting number {i}, highly detailed"
        lines.append({"prompt": prompt, "chosen": f"chosen{i}.png", "rejected": f"rejected{i}.png"})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def ensure_pipeline(cache_dir: Path, size: str, threads: int, timeout: float) -> tuple[Path, dict]:
    return ensure_sd_pipeline(__file__, cache_dir, size, threads, timeout, BUILD_VERSION)


def merged_rows(paths: list[str], meta: dict, measured: set[tuple[str, str]]) -> list[dict]:
    """Rows of earlier reports (``--merge``) that this run does not measure; refused when the set-up differs."""
    carried: dict[tuple[str, str], dict] = {}
    for path in paths:
        report = json.loads(Path(path).read_text())
        for key in ("size", "resolution", "device", "precision", "threads"):
            if report["meta"].get(key) != meta[key]:
                raise SystemExit(
                    f"--merge {path}: {key} {report['meta'].get(key)!r} differs from this run's {meta[key]!r}"
                )
        for row in report["rows"]:
            if row["name"] in ROWS and row.get("ok"):
                row.setdefault("date", report["meta"]["date"])
                carried[(row["name"], row["attention"])] = row
    return [row for key, row in carried.items() if key not in measured]


def select_rows(spec: str) -> list[str]:
    names: list[str] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if part in GROUPS:
            names += GROUPS[part]
        elif part in ROWS:
            names.append(part)
        else:
            raise SystemExit(f"--configs: unknown {part!r}; rows: {', '.join(ROWS)}; groups: {', '.join(GROUPS)}")
    return [n for n in ROWS if n in names]  # canonical order, no repeats


def add_ratios(rows: list[dict], memory_key: str) -> None:
    """Time and memory ratios to the matching baseline (same attention), and the targets for mmalign rows."""
    by_name = {(r["name"], r["attention"]): r for r in rows if r.get("ok")}
    for row in rows:
        baseline_name, max_time, max_mem = TARGETS[row["kind"]]
        baseline = by_name.get((baseline_name, row["attention"]))
        row["baseline"] = baseline_name
        row["time_ratio"] = row["mem_ratio"] = row["meets_target"] = None
        if not row.get("ok") or baseline is None or row["name"] == baseline_name:
            continue
        row["time_ratio"] = row["s_per_step"] / baseline["s_per_step"]
        row["mem_ratio"] = row[memory_key] / baseline[memory_key]
        if row["impl"] == "mmalign":
            row["meets_time"] = row["time_ratio"] <= max_time
            row["meets_memory"] = row["mem_ratio"] <= max_mem
            row["meets_target"] = row["meets_time"] and row["meets_memory"] and not row.get("skipped_steps")


def render_markdown(report: dict) -> str:
    meta, rows = report["meta"], report["rows"]
    gpu = meta["device"] == "cuda"
    mem_label = "GPU peak GiB" if gpu else "peak RSS GiB"
    busy = [r["name"] for r in rows if (r.get("other_cores") or 0.0) > BUSY_CORES]
    lines = [
        "# Diffusion-DPO training step: mmalign vs the reference scripts",
        "",
        f"Generated by `{meta['command']}` on {meta['date']}.",
        "",
        f"- Model: {meta['size']} ({meta['unet_params'] / 1e6:.0f} M-parameter UNet, random weights); "
        f"{meta['resolution']} px; one pair per step; {meta['precision']}; device {meta['device_name']}; "
        f"{meta['threads']} thread{'s' if meta['threads'] != 1 else ''} ({meta['cpu']}).",
        f"- {meta['warmup']} warm-up step, then the mean of {meta['steps']} timed steps; each row in its own process.",
        *(
            [
                "- Rows measured in several runs on this machine (`--merge`), each quiet unless flagged below: "
                + "; ".join(f"`{r['name']}` {r['date']}" for r in rows if r.get("date"))
                + "."
            ]
            if len({r.get("date", meta["date"])[:13] for r in rows}) > 1
            else []
        ),
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v) + ".",
        "- mmalign rows with the latent cache were primed first (every pair's VAE posterior and prompt embedding "
        "computed once): they are the steady state of later epochs; `mmalign-lora-nocache` is a first-epoch step.",
        "- Peak RSS: the process's whole-run high-water mark (loading included); 'step peak' is the high-water mark "
        "of the training steps alone.",
        *(
            [
                f"- **Warning: other processes used more than {BUSY_CORES} cores during "
                + ", ".join(f"`{n}`" for n in busy)
                + ": those timings are unreliable (oversubscribed OpenMP threads can slow a step several-fold). "
                "Rerun on a quiet machine.**"
            ]
            if busy
            else []
        ),
        "",
        f"| configuration | s/step | x time | {mem_label} | x memory | step peak GiB | encode | forward | backward "
        "| optimizer | target |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    mem_key = "gpu_peak_gib" if gpu else "peak_rss_gib"
    step_key = "gpu_step_peak_gib" if gpu else "step_peak_rss_gib"
    for row in rows:
        name = row["name"] + (f" @{row['attention']}" if meta["multi_attention"] else "")
        if not row.get("ok"):
            reason = row.get("error", "").splitlines()[0][:100] if row.get("error") else "failed"
            lines.append(f"| {name} | {row.get('status', 'failed')}: {reason} | | | | | | | | | |")
            continue
        p = row["phases"]
        if row["impl"] != "mmalign":
            target = f"baseline ({row['kind']})" if row["name"] == row["baseline"] else "–"
        elif row["meets_target"] is None:
            target = "no baseline" if not row.get("skipped_steps") else "skipped steps!"
        else:
            _, max_time, max_mem = TARGETS[row["kind"]]
            yes = lambda flag: "yes" if flag else "no"  # noqa: E731
            target = (
                f"{'met' if row['meets_target'] else 'MISSED'} (time <= {max_time}: {yes(row['meets_time'])}, "
                f"memory <= {max_mem}: {yes(row['meets_memory'])})"
            )
        lines.append(
            f"| {name} | {row['s_per_step']:.2f} | {fmt(row['time_ratio'])} | {row[mem_key]:.2f} "
            f"| {fmt(row['mem_ratio'])} | {row[step_key]:.2f} | {p['encode']:.2f} | {p['forward']:.2f} "
            f"| {p['backward']:.2f} | {p['optimizer']:.2f} | {target} |"
        )
    lines += ["", "Per row: optimizer implementation, trainable parameters, set-up time, cache priming:", ""]
    for row in rows:
        if row.get("ok"):
            extra = ""
            if row.get("prime_s_per_pair") is not None:
                extra = f", cache primed at {row['prime_s_per_pair']:.2f} s/pair"
            lines.append(
                f"- `{row['name']}` ({row['label']}): {row['optimizer']}, {row['trainable_params'] / 1e6:.2f} M "
                f"trainable, set-up {row['setup_s']:.1f} s{extra}, other processes {row['other_cores']:.2f} cores, "
                f"losses {', '.join(f'{v:.4g}' for v in row['losses'])}."
            )
    lines += ["", f"Anchors ({ANCHOR_NOTE}):", ""]
    measured = {r["name"]: r for r in rows if r.get("ok") and r["attention"] == "sdpa"}
    for name, anchor in ANCHORS.items():
        got = measured.get(name)
        here = f"; here {got['s_per_step']:.2f} s, {got[mem_key]:.2f} GiB" if got else ""
        lines.append(f"- `{name}`: {anchor['s_per_step']} s/step, {anchor['peak_gib']} GiB{here}.")
    lines += [
        "",
        "Targets: LoRA <= 0.75x the diffusers example's step time at <= 1.0x its memory; full fine-tuning "
        "<= 1.0x the official step at <= 0.8x its memory.",
    ]
    for kind, summary in report["summary"].items():
        lines.append(f"- {kind}: {summary}")
    return "\n".join(lines) + "\n"


def summarize(rows: list[dict]) -> dict:
    out = {}
    for kind in ("lora", "full"):
        candidates = [r for r in rows if r["impl"] == "mmalign" and r["kind"] == kind and r.get("ok")]
        judged = [r for r in candidates if r.get("meets_target") is not None]
        if not judged:
            continue
        met = [f"{r['name']}@{r['attention']}" for r in judged if r["meets_target"]]
        out[kind] = "met by " + ", ".join(met) if met else "not met by any mmalign row"
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="sd15", help="sd15 (default) or tiny")
    parser.add_argument("--configs", default="all", help=f"rows or groups, comma-separated: {', '.join(ROWS)}")
    parser.add_argument("--resolution", type=int, default=None, help="default 256 on CPU, 512 on CUDA, 64 tiny")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up steps per row")
    parser.add_argument("--pairs", type=int, default=None, help="pairs in the JSONL (default warmup + steps)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every usable core)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--attention", default=None, help="sdpa,xformers (default: both on CUDA, sdpa on CPU)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None, help="CUDA default bf16")
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="where the pipeline and data are built once (default $MMALIGN_BENCH_CACHE or "
        "~/.cache/mmalign/bench_dpo_step)",
    )
    parser.add_argument("--out", default=None, help="output path without suffix (default benchmarks/results/dpo_step)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per row")
    parser.add_argument(
        "--merge",
        action="append",
        default=[],
        metavar="JSON",
        help="carry the rows of an earlier report (same model, resolution and device) that this run does not "
        "measure; repeatable, later files win; each carried row keeps its own date",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args.worker)

    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    rows_selected = select_rows(args.configs)
    if not rows_selected:
        parser.error("--configs selects no rows")
    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    cache_dir = Path(
        args.cache_dir
        or os.environ.get("MMALIGN_BENCH_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mmalign" / "bench_dpo_step"
    )
    probe, error = _subprocess({"task": "probe"}, threads, 600)
    if probe is None:
        raise SystemExit(f"probing torch failed: {error}")
    device = ("cuda" if probe["cuda"] else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not probe["cuda"]:
        raise SystemExit("--device cuda: no CUDA device is visible")
    attentions = [a.strip() for a in (args.attention or ("sdpa,xformers" if device == "cuda" else "sdpa")).split(",")]
    for attention in attentions:
        if attention not in ("sdpa", "xformers"):
            parser.error(f"--attention: unknown backend {attention!r} (sdpa, xformers)")
    precision = args.precision or ("bf16" if device == "cuda" else "fp32")
    if device == "cpu" and precision != "fp32":
        print(f"note: --precision {precision} applies on CUDA only; CPU rows run in fp32", flush=True)
        precision = "fp32"
    resolution = args.resolution or (64 if args.size == "tiny" else 512 if device == "cuda" else 256)
    pairs_count = args.pairs or max(args.warmup + args.steps, 1)
    if args.out:
        out = Path(args.out)
    elif args.size == "tiny":
        out = Path(tempfile.gettempdir()) / "mmalign-bench-dpo-step" / "dpo_step_tiny"
    else:
        out = RESULTS / "dpo_step"
    out = out.with_suffix("") if out.suffix in (".json", ".md") else out

    folder, build_info = ensure_pipeline(cache_dir, args.size, threads, max(args.timeout, 1800))
    data = make_pairs(cache_dir / f"data-r{resolution}-n{pairs_count}", pairs_count, resolution)
    command = "python benchmarks/bench_dpo_step.py " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = {
        "command": command.strip(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "size": args.size,
        "unet_params": build_info["unet_params"],
        "resolution": resolution,
        "steps": args.steps,
        "warmup": args.warmup,
        "pairs": pairs_count,
        "threads": threads,
        "device": device,
        "device_name": probe["gpu"] if device == "cuda" else "cpu",
        "precision": precision,
        "attentions": attentions,
        "multi_attention": len(attentions) > 1,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "versions": versions(),
        "model_folder": str(folder),
        "data": str(data),
    }
    print(
        f"{args.size}: {len(rows_selected)} rows x {len(attentions)} attention, {resolution} px, {precision}, "
        f"{device}, {threads} thread(s), {args.warmup}+{args.steps} steps -> {out}.json/.md",
        flush=True,
    )
    rows: list[dict] = []
    mem_key = "gpu_peak_gib" if device == "cuda" else "peak_rss_gib"
    carried = merged_rows(args.merge, meta, {(n, a) for n in rows_selected for a in attentions})

    def write_report() -> None:  # after every row, so an interrupted run keeps its partial results
        everything = sorted(carried + rows, key=lambda r: (r["attention"], list(ROWS).index(r["name"])))
        add_ratios(everything, mem_key)
        report = {
            "meta": meta,
            "anchors": ANCHORS,
            "targets": TARGETS,
            "rows": everything,
            "summary": summarize(everything),
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(report, indent=2))
        out.with_suffix(".md").write_text(render_markdown(report))

    for attention in attentions:
        for name in rows_selected:
            row = {"name": name, **ROWS[name], "attention": attention, "cache": ROWS[name].get("cache")}
            row["date"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
            if attention == "xformers" and (device != "cuda" or not probe["xformers"]):
                why = "xformers needs CUDA" if device != "cuda" else "xformers is not installed"
                row.update(ok=False, status="skipped", error=why)
                print(f"  {name} @{attention}: skipped ({why})", flush=True)
                rows.append(row)
                write_report()
                continue
            spec = {
                "task": "row",
                **row,
                "model": str(folder),
                "data": str(data),
                "resolution": resolution,
                "threads": threads,
                "warmup": args.warmup,
                "steps": args.steps,
                "device": device,
                "precision": precision,
            }
            stats: dict = {}
            result, error = _subprocess(spec, threads, args.timeout, stats)
            row["other_cores"] = stats.get("other_cores")
            busy = (stats.get("other_cores") or 0.0) > BUSY_CORES
            if result is None:
                row.update(ok=False, status="failed", error=error)
                print(f"  {name} @{attention}: FAILED {error}", flush=True)
            else:
                row.update(ok=True, **result)
                p = result["phases"]
                print(
                    f"  {name:<22} @{attention}: {result['s_per_step']:7.3f} s/step  peak {result[mem_key]:6.2f} GiB"
                    f"  (steps {result['step_peak_rss_gib']:.2f} GiB; encode {p['encode']:.2f}, forward "
                    f"{p['forward']:.2f}, backward {p['backward']:.2f}, optimizer {p['optimizer']:.2f} s; "
                    f"row took {stats['wall_s']:.0f} s; other processes used {stats['other_cores']:.1f} cores)",
                    flush=True,
                )
                if busy:
                    print("    warning: other processes were busy during this row: timings are unreliable", flush=True)
            rows.append(row)
            write_report()
    print()
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
