"""Flow-DPO on a text-to-video transformer at real size on a CPU: seconds per step and peak memory of mmalign's
trainer (cached text embeddings and latents, gradient checkpointing) beside a straightforward step (the pipeline's
components used directly: the text encoder and the VAE run every step, no checkpointing), in the same run.

    .venv/bin/python benchmarks/bench_video_memory.py --size tiny     # checks the script (~1 min)
    .venv/bin/python benchmarks/bench_video_memory.py                 # Wan 2.1-1.3B size, 17 frames, 256 px

Writes ``benchmarks/results/video_memory.json`` and ``video_memory.md`` (``--size tiny`` writes to a temporary folder
unless ``--out`` is given). Never a test: nothing here asserts.

The model (``--size wan-1.3b``): ``WanTransformer3DModel`` with Wan-AI/Wan2.1-T2V-1.3B-Diffusers' transformer config
(30 layers, 12 heads × 128 = 1536 wide, FFN 8960, text width 4096, patch 1×2×2; 1.42 B parameters) and the Wan 2.1
``AutoencoderKLWan`` (its default config, 127 M parameters), random weights, fp32; the text encoder is a UMT5 of
UMT5-XXL's width (d_model 4096, 64 heads, FFN 10240) with 2 of its 24 layers and a small vocabulary: the full
5.7 B-parameter encoder would add about 11 GB (bf16, as shipped) to the straightforward row, which keeps it in
memory, and nothing to mmalign's training step, which works from cached embeddings and frees it. Prompts are
padded to 512 tokens (Wan's ``max_sequence_length``). Built once with ``save_pretrained`` in ``--cache-dir``.

The data: 2 pairs of random 17-frame 256×256 videos (lossless FFV1), each pair with its own prompt, as mmalign's
JSONL of video pairs. One pair per step; the pairs alternate.

Rows, each in its own process, ``--threads`` torch threads, 1 warm-up step then ``--steps`` timed steps:

* ``plain``: ``WanPipeline``'s components loaded with ``from_pretrained``; peft LoRA (rank 32, alpha 64, gaussian
  init) on the attention and FFN projections mmalign's Wan family trains; every step reads and resizes both clips,
  VAE-encodes them (``latent_dist.sample()``, per-channel normalisation), encodes the prompt (UMT5, zeros after the
  real tokens as ``WanPipeline`` does), draws σ from a logit-normal density, runs the transformer on the pair with
  gradients and again with the adapters disabled under ``no_grad`` (the reference), takes the Diffusion-DPO loss of
  the velocity errors (β 100), backward, clips to 1, AdamW.
* ``mmalign``: the real trainer, ``resolve_trainer_config(None, [trainer=dpo, model=..., data=..., frames=17,
  resolution=256, timestep_density=logit_normal, beta=100, lora_rank=32, lora_alpha=64,
  gradient_checkpointing=true, cache_latents=true, conditions_cache=..., free_text_encoders=true])``, its pairs'
  latents and prompts primed first (the steady state of a run's later epochs; the priming time is reported), then
  ``trainer._train_step()``.

Reported: s/step (mean of the timed steps) split into phases, the training steps' own peak RSS (``VmHWM`` reset after
set-up), and the whole process's peak (loading and priming included). Target (issue #14): mmalign's step at most
20 GB.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
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
    Phases,
    backward_and_step,
    cpu_flags,
    cpu_model,
    fmt,
    measure_steps,
    run_worker,
    time_trainer_phases,
    trainer_step,
    versions,
)

from mmalign.models.builders import WAN21_TRANSFORMER

BUILD_VERSION = 1
WAN_13B = {
    "transformer": WAN21_TRANSFORMER["1.3B"],
    "vae": dict(
        base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True]
    ),
    "text": dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=2, num_heads=64, relative_attention_num_buckets=32),
    "scheduler": dict(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0
    ),
}
SIZES = {
    "wan-1.3b": {"frames": 17, "resolution": 256, "text_length": 512},
    "tiny": {"frames": 5, "resolution": 32, "text_length": 16},
}
ROWS = ("plain", "mmalign")
LORA_RANK, LORA_ALPHA, BETA, LR = 32, 64, 100.0, 1e-4
PROMPTS = ["a red fox running through snow", "an old tram crossing a bridge at night"]


# ==========================================================================================================
# Worker side (one subprocess per task; imports torch)
# ==========================================================================================================
def _build(spec: dict) -> dict:
    import torch

    from mmalign.models.builders import TINY_WAN, build_wan_pipeline

    size = SIZES[spec["size"]]
    config = WAN_13B if spec["size"] == "wan-1.3b" else TINY_WAN
    start = time.perf_counter()
    folder = build_wan_pipeline(
        spec["folder"], seed=0, config=config, max_sequence_length=size["text_length"], num_frames=size["frames"]
    )
    from diffusers import WanTransformer3DModel

    transformer = WanTransformer3DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=torch.float32)
    return {
        "build_s": time.perf_counter() - start,
        "transformer_params": sum(p.numel() for p in transformer.parameters()),
    }


def _clip(path: Path, frames: int, resolution: int):
    """``frames`` evenly spaced frames of a clip, shorter side resized to ``resolution`` (bilinear), centre crop,
    ``[3, T, R, R]`` in [-1, 1] (the VAE's layout)."""
    import numpy as np
    import torch
    from PIL import Image

    from mmalign.modalities.video import probe_video, read_frames, uniform_indices

    info = probe_video(path)
    array, _, _ = read_frames(path, uniform_indices(info.num_frames, frames))
    out = []
    for frame in array:
        image = Image.fromarray(frame)
        scale = resolution / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
        out.append(torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0)
    return torch.stack(out, dim=1)


class PlainStep:
    """The straightforward Flow-DPO step on ``WanPipeline``'s components (see the module docstring)."""

    def __init__(self, spec: dict, phases: Phases):
        import torch
        from diffusers import AutoencoderKLWan, WanTransformer3DModel
        from peft import LoraConfig
        from transformers import AutoTokenizer, UMT5EncoderModel

        from mmalign.models.wan import WanGenerator

        self.spec, self.phases = spec, phases
        folder = spec["model"]
        data = Path(spec["data"])
        rows = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
        self.pairs = [{**r, "chosen": data.parent / r["chosen"], "rejected": data.parent / r["rejected"]} for r in rows]
        self.index = 0
        self.tokenizer = AutoTokenizer.from_pretrained(folder, subfolder="tokenizer")
        self.text_encoder = UMT5EncoderModel.from_pretrained(folder, subfolder="text_encoder").eval()
        self.vae = AutoencoderKLWan.from_pretrained(folder, subfolder="vae").eval()
        self.transformer = WanTransformer3DModel.from_pretrained(folder, subfolder="transformer")
        for module in (self.text_encoder, self.vae, self.transformer):
            module.requires_grad_(False)
        self.transformer.add_adapter(
            LoraConfig(
                r=LORA_RANK,
                lora_alpha=LORA_ALPHA,
                init_lora_weights="gaussian",
                target_modules=list(WanGenerator.lora_targets),
            )
        )
        self.transformer.train()
        self.params = [p for p in self.transformer.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=LR, weight_decay=1e-4)
        config = self.vae.config
        self.latent_mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1, 1)
        self.latent_std = torch.tensor(config.latents_std).view(1, -1, 1, 1, 1)
        self.losses: list[float] = []

    def _embed(self, prompt: str):
        import torch

        length = self.spec["text_length"]
        tokens = self.tokenizer([prompt], padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        mask = tokens.attention_mask
        hidden = self.text_encoder(tokens.input_ids, mask).last_hidden_state
        return torch.where(mask.bool()[..., None], hidden, torch.zeros_like(hidden))

    def step(self) -> None:
        import torch
        import torch.nn.functional as F

        phases, spec = self.phases, self.spec
        pair = self.pairs[self.index % len(self.pairs)]
        self.index += 1
        with phases("encode"), torch.no_grad():
            pixels = torch.stack([_clip(pair[k], spec["frames"], spec["resolution"]) for k in ("chosen", "rejected")])
            z = self.vae.encode(pixels).latent_dist.sample()
            latents = (z - self.latent_mean) / self.latent_std
            embeds = self._embed(pair["prompt"]).repeat(2, 1, 1)
        with phases("forward"):
            noise = torch.randn_like(latents[:1]).repeat(2, 1, 1, 1, 1)
            sigma = torch.sigmoid(torch.randn(()))
            noisy = (1 - sigma) * latents + sigma * noise
            target = noise - latents
            timestep = (sigma * 1000).expand(2)
            pred = self.transformer(hidden_states=noisy, timestep=timestep, encoder_hidden_states=embeds).sample
            model_w, model_l = F.mse_loss(pred, target, reduction="none").mean(dim=[1, 2, 3, 4]).chunk(2)
            with torch.no_grad():
                self.transformer.disable_adapters()
                ref = self.transformer(hidden_states=noisy, timestep=timestep, encoder_hidden_states=embeds).sample
                self.transformer.enable_adapters()
                ref_w, ref_l = F.mse_loss(ref, target, reduction="none").mean(dim=[1, 2, 3, 4]).chunk(2)
            loss = -F.logsigmoid(-0.5 * BETA * ((model_w - model_l) - (ref_w - ref_l))).mean()
        self.losses.append(backward_and_step(loss, self.params, self.optimizer, phases))

    def info(self) -> dict:
        return {"trainable_params": sum(p.numel() for p in self.params), "losses": self.losses}


class MMAlignStep:
    """mmalign's DPO trainer on the Wan folder (see the module docstring)."""

    def __init__(self, spec: dict, phases: Phases):
        import torch

        from mmalign.commands.train import resolve_trainer_config

        self.phases = phases
        self.output_dir = tempfile.mkdtemp(prefix="mmalign-bench-video-")
        overrides = [
            "trainer=dpo",
            f"model={spec['model']}",
            f"data={spec['data']}",
            f"output_dir={self.output_dir}",
            f"frames={spec['frames']}",
            f"resolution={spec['resolution']}",
            "timestep_density=logit_normal",
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
        self.trainer = trainer = trainer_class(config)
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


def _run_row(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    phases = Phases(lambda: None)
    start = time.perf_counter()
    runner = (MMAlignStep if spec["row"] == "mmalign" else PlainStep)(spec, phases)
    setup_s = time.perf_counter() - start
    release_freed_memory()  # what loading and priming freed is not the steps' memory: hand it back before VmHWM resets
    measured = measure_steps(runner.step, phases, spec["warmup"], spec["steps"])
    phase_means = {n: measured["phases"].get(n, 0.0) for n in ("encode", "forward", "backward", "optimizer")}
    phase_means["other"] = max(0.0, measured["s_per_step"] - sum(phase_means.values()))
    result = {**measured, "phases": phase_means, "setup_s": setup_s, **runner.info()}
    if hasattr(runner, "close"):
        runner.close()
    return result


def worker_main(spec_path: str) -> int:
    sys.path.insert(0, str(REPO))
    spec = json.loads(Path(spec_path).read_text())
    result = _build(spec) if spec["task"] == "build" else _run_row(spec)
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


# ==========================================================================================================
# Parent side (no torch import)
# ==========================================================================================================
def make_video_pairs(folder: Path, frames: int, resolution: int) -> Path:
    """Two pairs of random smooth clips (lossless FFV1 .mkv), ``resolution`` square, as mmalign's JSONL."""
    import numpy as np

    sys.path.insert(0, str(REPO))
    from tests.modalities.tiny_media import random_frames, write_video

    path = folder / "pairs.jsonl"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, prompt in enumerate(PROMPTS):
        for side, seed in (("chosen", 2 * i), ("rejected", 2 * i + 1)):
            clip = random_frames(frames, resolution, resolution, seed=seed)
            write_video(folder / f"{side}{i}.mkv", np.ascontiguousarray(clip))
        lines.append({"prompt": prompt, "chosen": f"chosen{i}.mkv", "rejected": f"rejected{i}.mkv"})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def ensure_model(cache_dir: Path, size: str, threads: int, timeout: float) -> tuple[Path, dict]:
    folder = cache_dir / f"{size}-v{BUILD_VERSION}"
    marker = folder / ".complete.json"
    if marker.is_file():
        return folder, json.loads(marker.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    print(f"building the random {size} Wan pipeline in {folder} (once) ...", flush=True)
    info, error = run_worker(__file__, {"task": "build", "size": size, "folder": str(folder)}, threads, timeout)
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


def render_markdown(report: dict) -> str:
    meta, rows = report["meta"], report["rows"]
    by_name = {row["name"]: row for row in rows if row.get("ok")}
    plain = by_name.get("plain")
    lines = [
        "# Flow-DPO on a text-to-video transformer at real size, on a CPU",
        "",
        f"Generated by `{meta['command']}` on {meta['date']}.",
        "",
        f"- Model: {meta['size']} (`WanTransformer3DModel`, {meta['transformer_params'] / 1e9:.2f} B parameters, "
        f"random weights, fp32); {meta['frames']} frames at {meta['resolution']} px; prompts padded to "
        f"{meta['text_length']} tokens; one pair per step; LoRA rank 32 on the attention and FFN projections.",
        f"- Machine: {meta['cpu']}, {meta['threads']} torch threads per row; CPU flags: {meta['cpu_flags']}.",
        f"- {meta['warmup']} warm-up step, then the mean of {meta['steps']} timed steps; each row in its own process.",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v) + ".",
        f"- Memory: {meta.get('memory_gib', 0):.1f} GiB on the machine. Step peak: the training steps' own high-water "
        "mark (VmHWM reset after set-up); process peak: loading and priming included; a killed row shows the largest "
        "resident set the parent sampled (every 0.25 s) before the kill. The text encoder is UMT5-XXL's width with 2 "
        "of its 24 layers (module docstring).",
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--size", choices=sorted(SIZES), default="wan-1.3b")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "mmalign-bench-video")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--timeout", type=float, default=7200)
    parser.add_argument("--note", action="append", default=[])
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; rows: {', '.join(ROWS)}")
    size = SIZES[args.size]
    out = args.out or (RESULTS if args.size == "wan-1.3b" else Path(tempfile.mkdtemp(prefix="bench-video-")))
    folder, built = ensure_model(args.cache_dir, args.size, args.threads, args.timeout)
    data = make_video_pairs(args.cache_dir / f"pairs-{args.size}", size["frames"], size["resolution"])
    results = []
    for name in rows:
        spec = {"task": "row", "row": name, "model": str(folder), "data": str(data), "threads": args.threads}
        spec.update(size, steps=args.steps, warmup=args.warmup)
        print(f"{name}: running (load {os.getloadavg()[0]:.2f}) ...", flush=True)
        stats: dict = {}
        with ChildRss() as sampled:
            result, error = run_worker(__file__, spec, args.threads, args.timeout, stats)
        stats["sampled_peak_gib"] = sampled.peak / GIB
        row = {"name": name, **stats, **({"ok": True, **result} if result else {"ok": False, "error": error})}
        results.append(row)
        if result:
            print(f"  {result['s_per_step']:.1f} s/step, step peak {result['step_peak_rss_gib']:.2f} GiB, process peak "
                  f"{result['peak_rss_gib']:.2f} GiB")  # fmt: skip
        else:
            print(f"  failed: {error}")
    meta = {
        "command": "python benchmarks/bench_video_memory.py " + " ".join(argv or sys.argv[1:]),
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
    (out / "video_memory.json").write_text(json.dumps(report, indent=1))
    (out / "video_memory.md").write_text(render_markdown(report))
    print(f"wrote {out / 'video_memory.json'} and {out / 'video_memory.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
