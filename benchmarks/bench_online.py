"""Online trainers: time and peak memory per sample of mmalign's D3PO, DRaFT-K and AlignProp beside
straightforward implementations of the same updates, in the same run.

    .venv/bin/python benchmarks/bench_online.py                   # SD1.5-size UNet, 128 px, 8 DDIM steps (CPU)
    .venv/bin/python benchmarks/bench_online.py --size tiny       # tiny pipeline: checks the script (~1 min)
    .venv/bin/python benchmarks/bench_online.py --rows d3po       # one trainer (d3po, draft-k, alignprop) or rows

Writes ``benchmarks/results/online.json`` and ``online.md`` (``--size tiny`` writes to a temporary folder unless
``--out`` is given). Run it on a quiet machine: the CPU other processes used during each row is recorded and
rows above a quarter of a core are flagged.

What is measured. The random-weight SD1.5-size pipeline of ``bench_dpo_step.py`` (shared cache folder) with a
LoRA (rank 4 on to_q/to_k/to_v/to_out.0), one prompt per step, DDIM with η 1 (DRaFT: η 0), classifier-free
guidance 5, fp32. The reward is the mean pixel value of the decoded image: differentiable and nearly free, so
the rows measure the trainers, not a reward model. Each row runs in its own process: set-up, a warm-up step,
timed steps; per row the mean step time, split into sample (chains without gradients), forward (calls with
gradients and the loss), backward and optimizer, the peak RSS of the steps (``VmHWM`` reset after set-up), and
per generated image (D3PO makes two per prompt). Ratios are to the straightforward row of the same trainer.

Rows (``plain`` = the update written the direct way, without mmalign, as the reference repositories do):

Each mmalign trainer is measured twice, ``gradient_checkpointing=false`` (``-gc-off``) and ``true`` (``-gc-on``:
each UNet call of the graph recomputed in backward); targets: off ≤ 1.0x the plain row's time, on ≤ 0.6x its
memory.

* ``d3po-plain``: yk7333/d3po's structure: a frozen deep copy of the UNet as the reference, both trajectories of
  the pair sampled from one x_T, then every step's log-prob under the policy (with gradients) and the copy, the
  D3PO loss summed over the whole trajectory and one backward (every step's activations kept).
  ``d3po-gc-*``: ``D3POTrainer`` with the reference = the same UNet with its adapters disabled (no copy).
* ``draft-k-plain``: the chain run with autograd on from x_T, ``x.detach()`` before the last K steps (the graph
  of the earlier steps is held until then). ``draft-k-gc-*``: ``DRaFTTrainer``: the first T − K steps under
  ``no_grad``.
* ``alignprop-plain``: backpropagation through the chain from step 1 (AlignProp's earliest truncation index:
  step 0 is always detached) without checkpointing. ``alignprop-gc-*``: ``AlignPropTrainer`` with its truncation
  index pinned to 1, the same chain.

Never a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from harness import (
    BUSY_CORES,
    RESULTS,
    Phases,
    backward_and_step,
    build_sd_pipeline,
    cpu_model,
    default_threads,
    ensure_sd_pipeline,
    fmt,
    measure_steps,
    run_worker,
    time_trainer_phases,
    trainer_step,
    versions,
)

PIPELINE_VERSION = 1  # the cache of bench_dpo_step.py (same builder, same folder names)
LORA_RANK = 4
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
GUIDANCE = 5.0
LR = 1e-4
D3PO_BETA, D3PO_CLIP = 0.1, 0.1

ROWS: dict[str, dict] = {
    "d3po-plain": dict(trainer="d3po", impl="plain", label="D3PO, frozen copy, whole trajectory in one backward"),
    "d3po-gc-off": dict(
        trainer="d3po", impl="mmalign", gc=False, label="D3POTrainer (adapters-off reference), checkpointing off"
    ),
    "d3po-gc-on": dict(
        trainer="d3po",
        impl="mmalign",
        gc=True,
        label="D3POTrainer (adapters-off reference), each UNet call checkpointed",
    ),
    "draft-k-plain": dict(trainer="draft-k", impl="plain", label="DRaFT-K, autograd on from x_T, detach at T-K"),
    "draft-k-gc-off": dict(trainer="draft-k", impl="mmalign", gc=False, label="DRaFTTrainer (no_grad to T-K)"),
    "draft-k-gc-on": dict(
        trainer="draft-k", impl="mmalign", gc=True, label="DRaFTTrainer (no_grad to T-K, the K calls checkpointed)"
    ),
    "alignprop-plain": dict(
        trainer="alignprop", impl="plain", label="AlignProp, chain from step 1 (step 0 detached), no checkpointing"
    ),
    "alignprop-gc-off": dict(trainer="alignprop", impl="mmalign", gc=False, label="AlignPropTrainer, no checkpointing"),
    "alignprop-gc-on": dict(
        trainer="alignprop", impl="mmalign", gc=True, label="AlignPropTrainer, each UNet call checkpointed"
    ),
}
SAMPLES_PER_PROMPT = {"d3po": 2, "draft-k": 1, "alignprop": 1}
PROMPTS = ["a red fox in the snow", "a lighthouse at dusk", "a bowl of ramen", "an old tram in the rain"]


# ==========================================================================================================
# Worker side
# ==========================================================================================================
def _brightness_reward():
    from mmalign.modalities.image import pil_to_tensor
    from mmalign.rewards.base import Reward

    class Brightness(Reward):
        """Mean pixel value in [0, 1]: differentiable and nearly free."""

        name = "brightness"
        uses_prompt = False

        def preprocess_reference(self, image):
            return pil_to_tensor(image)

        def preprocess_tensor(self, images):
            return images

        def score_pixels(self, pixels, prompts):
            return pixels.float().mean(dim=(1, 2, 3))

    return Brightness()


class MMAlignRow:
    """The real trainer; a step is ``trainer._train_step()``."""

    def __init__(self, spec: dict, phases: Phases):
        from mmalign.commands.train import resolve_trainer_config

        self.output_dir = tempfile.mkdtemp(prefix="mmalign-bench-online-")
        prompts = Path(self.output_dir) / "prompts.txt"
        prompts.write_text("\n".join(PROMPTS) + "\n")
        trainer = {"d3po": "d3po", "draft-k": "draft", "alignprop": "alignprop"}[spec["trainer"]]
        overrides = [
            f"trainer={trainer}",
            f"model={spec['model']}",
            f"data={prompts}",
            f"output_dir={self.output_dir}",
            f"resolution={spec['resolution']}",
            "batch_size=1",
            "tracker=none",
            "progress=false",
            "checkpoint_every=1000000",
            "max_steps=1000000",
            f"sample_steps={spec['sample_steps']}",
            f"guidance={GUIDANCE}",
            f"lora_rank={LORA_RANK}",
            f"lr={LR}",
            "seed=0",
            f"gradient_checkpointing={str(spec['gc']).lower()}",
        ]
        if trainer == "d3po":
            overrides += [f"beta={D3PO_BETA}", f"d3po_clip={D3PO_CLIP}", "reference=adapters"]
        elif trainer == "draft":
            overrides += ["draft_mode=k", f"draft_k={spec['draft_k']}"]
        else:
            # the earliest truncation index AlignProp allows (1: only step 0 detached), as the plain row
            mean = 1.5 * 50 / spec["sample_steps"]
            overrides += [f"truncation_mean={mean}", "truncation_std=0", "loss_target=null", "loss_scale=1"]
        cls, config = resolve_trainer_config(None, overrides)
        self.trainer = trainer = cls(config, reward=_brightness_reward())
        time_trainer_phases(trainer, phases, "sample")
        self.losses: list[float] = []

    def step(self) -> None:
        self.losses.append(trainer_step(self.trainer))

    def info(self) -> dict:
        return {"trainable_params": sum(p.numel() for p in self.trainer.trainable), "losses": self.losses}

    def close(self) -> None:
        import shutil

        shutil.rmtree(self.output_dir, ignore_errors=True)


class PlainRow:
    """The same updates written directly with diffusers and peft, as the reference repositories do."""

    def __init__(self, spec: dict, phases: Phases):
        import copy

        import torch
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from peft import LoraConfig
        from transformers import CLIPTextModel, CLIPTokenizer

        self.spec, self.phases = spec, phases
        folder = spec["model"]
        tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").requires_grad_(False)
        self.vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").requires_grad_(False)
        self.unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").requires_grad_(False)
        self.ref = copy.deepcopy(self.unet).eval() if spec["trainer"] == "d3po" else None
        self.unet.add_adapter(
            LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
        )
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=LR, weight_decay=1e-4)
        scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler", set_alpha_to_one=False)  # as SD
        scheduler.set_timesteps(spec["sample_steps"])
        self.timesteps = scheduler.timesteps
        alphas = scheduler.alphas_cumprod
        step = scheduler.config.num_train_timesteps // spec["sample_steps"]
        self.alpha = [alphas[t] for t in self.timesteps]
        self.alpha_prev = [alphas[t - step] if t - step >= 0 else scheduler.final_alpha_cumprod for t in self.timesteps]

        def encode(texts):
            ids = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
            with torch.no_grad():
                return text_encoder(ids.input_ids)[0]

        self.embeds = {p: encode([p]) for p in PROMPTS}
        self.uncond = encode([""])
        self.scale = self.vae.config.scaling_factor
        self.latent = spec["resolution"] // 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.index = 0
        self.losses: list[float] = []

    # the DDIM step as d3po/ddpo-pytorch write it (REFERENCES.md): mean, std and the Gaussian log-density
    def _eps(self, unet, x, t, prompt):
        import torch

        n = x.shape[0]
        hidden = torch.cat([self.uncond.expand(n, -1, -1), self.embeds[prompt].expand(n, -1, -1)])
        out = unet(torch.cat([x, x]), t, hidden).sample
        uncond, cond = out.chunk(2)
        return uncond + GUIDANCE * (cond - uncond)

    def _step(self, x, eps, j, eta):
        a, ap = self.alpha[j], self.alpha_prev[j]
        std = eta * ((1 - ap) / (1 - a) * (1 - a / ap)) ** 0.5
        x0 = (x - (1 - a) ** 0.5 * eps) / a**0.5
        mean = ap**0.5 * x0 + (1 - ap - std**2) ** 0.5 * eps
        return mean, std

    @staticmethod
    def _log_prob(prev, mean, std):
        import math

        import torch

        std = torch.as_tensor(std)
        return (-((prev - mean) ** 2) / (2 * std**2) - std.log() - math.log(math.sqrt(2 * math.pi))).mean(dim=(1, 2, 3))

    def _decode(self, x):
        return (self.vae.decode(x / self.scale).sample / 2 + 0.5).clamp(0, 1)

    def step(self) -> None:
        import torch
        import torch.nn.functional as F

        phases, spec = self.phases, self.spec
        prompt = PROMPTS[self.index % len(PROMPTS)]
        self.index += 1
        gen = torch.Generator().manual_seed(self.index)
        shape = (1, 4, self.latent, self.latent)
        steps = len(self.timesteps)
        if spec["trainer"] == "d3po":
            with phases("sample"), torch.no_grad():
                x = torch.randn(shape, generator=gen).repeat(2, 1, 1, 1)  # both chains from one x_T
                chain = [x]
                for j, t in enumerate(self.timesteps):
                    mean, std = self._step(x, self._eps(self.unet, x, t, prompt), j, 1.0)
                    x = mean + std * torch.randn(x.shape, generator=gen)
                    chain.append(x)
                a_wins = bool(self._decode(x[:1]).mean() > self._decode(x[1:]).mean())
            with phases("forward"):
                total = 0.0
                for j, t in enumerate(self.timesteps):
                    mean, std = self._step(chain[j], self._eps(self.unet, chain[j], t, prompt), j, 1.0)
                    logp = self._log_prob(chain[j + 1], mean, std)
                    with torch.no_grad():
                        ref_mean, _ = self._step(chain[j], self._eps(self.ref, chain[j], t, prompt), j, 1.0)
                        ref = self._log_prob(chain[j + 1], ref_mean, std)
                    ratio = torch.clamp(torch.exp(logp - ref), 1 - D3PO_CLIP, 1 + D3PO_CLIP)
                    w, l = (0, 1) if a_wins else (1, 0)
                    total = total - F.logsigmoid(D3PO_BETA * (ratio[w].log() - ratio[l].log())) / steps
                loss = total
        else:
            with phases("forward"):
                x = torch.randn(shape, generator=gen)
                eta = 0.0 if spec["trainer"] == "draft-k" else 1.0
                for j, t in enumerate(self.timesteps):
                    if spec["trainer"] == "draft-k" and j == steps - spec["draft_k"]:
                        x = x.detach()
                    if spec["trainer"] == "alignprop" and j == 0:  # AlignProp's index >= 1: step 0 detached
                        with torch.no_grad():
                            mean, std = self._step(x, self._eps(self.unet, x, t, prompt), j, eta)
                        x = mean + std * torch.randn(x.shape, generator=gen)
                        continue
                    mean, std = self._step(x, self._eps(self.unet, x, t, prompt), j, eta)
                    x = mean + std * torch.randn(x.shape, generator=gen)
                loss = -self._decode(x).mean(dim=(1, 2, 3)).mean()
        self.losses.append(backward_and_step(loss, self.params, self.optimizer, phases))

    def info(self) -> dict:
        return {"trainable_params": sum(p.numel() for p in self.params), "losses": self.losses}


def _run_row(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    phases = Phases(lambda: None)
    start = time.perf_counter()
    runner = (MMAlignRow if spec["impl"] == "mmalign" else PlainRow)(spec, phases)
    setup_s = time.perf_counter() - start
    measured = measure_steps(runner.step, phases, spec["warmup"], spec["steps"])
    per_step_samples = SAMPLES_PER_PROMPT[spec["trainer"]]
    result = {
        **measured,
        "phases": {n: measured["phases"].get(n, 0.0) for n in ("sample", "forward", "backward", "optimizer")},
        "s_per_sample": measured["s_per_step"] / per_step_samples,
        "samples_per_step": per_step_samples,
        "setup_s": setup_s,
        "torch_threads": torch.get_num_threads(),
        **runner.info(),
    }
    if hasattr(runner, "close"):
        runner.close()
    return result


def worker_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    result = build_sd_pipeline(spec["size"], spec["folder"]) if spec["task"] == "build" else _run_row(spec)
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


# ==========================================================================================================
# Parent side (no torch import)
# ==========================================================================================================
def select_rows(spec: str) -> list[str]:
    names: list[str] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if part in ROWS:
            names.append(part)
        elif part == "all" or part in {r["trainer"] for r in ROWS.values()}:
            names += [n for n, r in ROWS.items() if part == "all" or r["trainer"] == part]
        else:
            raise SystemExit(f"--rows: unknown {part!r}; rows: {', '.join(ROWS)}; or d3po, draft-k, alignprop, all")
    return [n for n in ROWS if n in names]


def add_ratios(rows: list[dict]) -> None:
    by_name = {r["name"]: r for r in rows if r.get("ok")}
    for row in rows:
        base = by_name.get(f"{row['trainer']}-plain")
        row["time_ratio"] = row["mem_ratio"] = None
        if row.get("ok") and base is not None and row["impl"] == "mmalign":
            row["time_ratio"] = row["s_per_sample"] / base["s_per_sample"]
            row["mem_ratio"] = row["step_peak_rss_gib"] / base["step_peak_rss_gib"]


def render_markdown(report: dict) -> str:
    meta, rows = report["meta"], report["rows"]
    lines = [
        "# Online trainers: time and peak memory per sample, mmalign vs straightforward implementations",
        "",
        f"Generated by `{meta['command']}` on {meta['date']}.",
        "",
        f"- Model: {meta['size']} UNet ({meta['unet_params'] / 1e6:.0f} M parameters, random weights) with LoRA rank "
        f"{LORA_RANK}; {meta['resolution']} px; {meta['sample_steps']} DDIM steps; CFG {GUIDANCE}; one prompt per "
        f"step; DRaFT K = {meta['draft_k']}; fp32; {meta['threads']} threads ({meta['cpu']}).",
        f"- {meta['warmup']} warm-up step(s), then the mean of {meta['steps']} timed step(s); each row in its own "
        "process. Memory: the peak RSS of the steps (VmHWM reset after set-up; model weights included).",
        "- Reward: the decoded image's mean pixel value (differentiable, nearly free), so rows measure the trainer.",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v) + ".",
    ]
    busy = [r["name"] for r in rows if (r.get("other_cores") or 0.0) > BUSY_CORES]
    if busy:
        lines.append(
            f"- **Warning: other processes used more than {BUSY_CORES} cores during {', '.join(busy)}: "
            "those timings are unreliable.**"
        )
    lines += [
        "",
        "| row | s/step | s/sample | x time | step peak GiB | x memory | sample | forward | backward | optimizer |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if not r.get("ok"):
            lines.append(f"| {r['name']} | {r.get('status', 'failed')}: {r.get('error', '')[:80]} |||||||||")
            continue
        p = r["phases"]
        lines.append(
            f"| {r['name']} | {r['s_per_step']:.2f} | {r['s_per_sample']:.2f} | {fmt(r['time_ratio'])} | "
            f"{r['step_peak_rss_gib']:.2f} | {fmt(r['mem_ratio'])} | {p['sample']:.2f} | {p['forward']:.2f} | "
            f"{p['backward']:.2f} | {p['optimizer']:.2f} |"
        )
    lines += ["", "Rows:", ""]
    for r in rows:
        extra = ""
        if r.get("ok"):
            extra = (
                f" {r['trainable_params'] / 1e6:.2f} M trainable, set-up {r['setup_s']:.0f} s, other processes "
                f"{fmt(r.get('other_cores'), '.2f')} cores, losses {', '.join(f'{v:.4g}' for v in r['losses'])}."
            )
        lines.append(f"- `{r['name']}`: {r['label']}.{extra}")
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["sd15", "tiny"], default="sd15")
    parser.add_argument("--rows", default="all", help=f"rows or trainers, comma-separated: {', '.join(ROWS)}")
    parser.add_argument("--resolution", type=int, default=None, help="default 128 (tiny: 32)")
    parser.add_argument("--sample-steps", type=int, default=8, help="DDIM steps of every chain")
    parser.add_argument("--draft-k", type=int, default=2, help="DRaFT-K: steps with gradients")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up steps per row")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every usable core)")
    parser.add_argument("--cache-dir", default=None, help="default ~/.cache/mmalign/bench_dpo_step (shared)")
    parser.add_argument("--out", default=None, help="output path without suffix (default benchmarks/results/online)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per row")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    import os

    rows_selected = select_rows(args.rows)
    threads = args.threads or default_threads()
    cache_dir = Path(
        args.cache_dir
        or os.environ.get("MMALIGN_BENCH_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mmalign" / "bench_dpo_step"
    )
    resolution = args.resolution or (32 if args.size == "tiny" else 128)
    if args.out:
        out = Path(args.out)
    elif args.size == "tiny":
        out = Path(tempfile.gettempdir()) / "mmalign-bench-online" / "online_tiny"
    else:
        out = RESULTS / "online"
    out = out.with_suffix("") if out.suffix in (".json", ".md") else out
    folder, build_info = ensure_sd_pipeline(__file__, cache_dir, args.size, threads, 1800, PIPELINE_VERSION)
    command = "python benchmarks/bench_online.py " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = {
        "command": command.strip(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "size": args.size,
        "unet_params": build_info["unet_params"],
        "resolution": resolution,
        "sample_steps": args.sample_steps,
        "draft_k": args.draft_k,
        "steps": args.steps,
        "warmup": args.warmup,
        "threads": threads,
        "cpu": cpu_model(),
        "platform": platform.platform(),
        "versions": versions(),
    }
    print(f"{args.size}: {len(rows_selected)} rows, {resolution} px, {args.sample_steps} steps -> {out}.md", flush=True)
    rows: list[dict] = []
    for name in rows_selected:
        row = {"name": name, **ROWS[name]}
        spec = {
            "task": "row",
            **row,
            "model": str(folder),
            "resolution": resolution,
            "sample_steps": args.sample_steps,
            "draft_k": args.draft_k,
            "threads": threads,
            "warmup": args.warmup,
            "steps": args.steps,
        }
        stats: dict = {}
        result, error = run_worker(__file__, spec, threads, args.timeout, stats)
        row["other_cores"] = stats.get("other_cores")
        if result is None:
            row.update(ok=False, status="failed", error=error)
            print(f"  {name}: FAILED {error}", flush=True)
        else:
            row.update(ok=True, **result)
            print(
                f"  {name:<18} {result['s_per_step']:7.2f} s/step {result['s_per_sample']:7.2f} s/sample  "
                f"step peak {result['step_peak_rss_gib']:.2f} GiB  (row {stats['wall_s']:.0f} s, other processes "
                f"{stats['other_cores']:.2f} cores)",
                flush=True,
            )
        rows.append(row)
        add_ratios(rows)
        out.parent.mkdir(parents=True, exist_ok=True)
        report = {"meta": meta, "rows": rows}
        out.with_suffix(".json").write_text(json.dumps(report, indent=2))
        out.with_suffix(".md").write_text(render_markdown(report))
    print()
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
