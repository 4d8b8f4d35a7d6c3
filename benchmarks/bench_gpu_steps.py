"""Real-size step costs on one GPU: the measured inputs of docs/scaling.md.

The networks are the published architectures built from their configs with random weights (step time and memory
do not depend on the values; nothing is downloaded): SD3.5-Medium's MMDiT-X (2.5B), Wan 2.1's 1.3B and 14B video
transformers, and the ViT-H/14 image tower of HPSv2/PickScore. For each it times the calls a trainer makes, with
mmalign's default LoRA targets (flow_grpo's rank 32, alpha 64):

- Flow-GRPO on SD3.5-M at 512 px: one sampling call (CFG: a batch of 2 x 8 rows), one training call (forward and
  backward of 8 rows through the conditional branch) with each SDPA backend (flash, memory-efficient, math), with
  activation checkpointing, and a full fine-tuning step (fp32 master weights, bf16 autocast, fused AdamW);
  bf16 and fp16 sampling.
- Flow-DPO on Wan 2.1 (81 frames at 480x832: a latent of 21 x 60 x 104, 32,760 tokens, 512 text tokens): one step
  of a pair (policy forward and backward of 2 rows with activation checkpointing, reference forward of 2 rows with
  the adapters disabled), and one CFG sampling call; the 14B model when the time budget allows.
- The reward: ViT-H/14 at 224 px, images per second at batch 64.

Each figure is the median of ``--reps`` timed calls after warm-up calls, with CUDA synchronised around each;
peak memory is ``torch.cuda.max_memory_allocated`` of the section. Results go to ``--out`` (JSON, rewritten after
every section, so a run cut short keeps what it measured). ``--tiny`` runs the same code on toy configs on the CPU,
to check the script before a GPU is spent on it.

    python benchmarks/bench_gpu_steps.py --out gpu_steps.json --budget 420
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mmalign.models.builders import SD35_MEDIUM_TRANSFORMER, WAN21_TRANSFORMER

SD35_MEDIUM = SD35_MEDIUM_TRANSFORMER
VIT_H14 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, patch_size=14)

TINY_SD3 = dict(SD35_MEDIUM, num_layers=2, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                caption_projection_dim=16, pooled_projection_dim=16, dual_attention_layers=(0,), sample_size=32,
                pos_embed_max_size=96)  # fmt: skip
TINY_WAN = dict(num_attention_heads=2, attention_head_dim=8, ffn_dim=32, num_layers=2)
TINY_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=14)


class Bench:
    """Timing, peak memory and the incremental JSON of one run."""

    def __init__(self, out: Path, device: torch.device, budget: float, warmup: int, reps: int):
        self.out, self.device, self.warmup, self.reps = out, device, warmup, reps
        self.deadline = time.monotonic() + budget
        self.results: dict[str, Any] = {"machine": machine(device), "sections": {}}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None

    def time(self, fn: Callable[[], Any], warmup: int | None = None, reps: int | None = None) -> dict[str, Any]:
        """Median seconds of ``reps`` calls after ``warmup`` calls, and the peak memory of them all."""
        self.reset_peak()
        for _ in range(self.warmup if warmup is None else warmup):
            fn()
        self.sync()
        times = []
        for _ in range(self.reps if reps is None else reps):
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return {"seconds": statistics.median(times), "all_seconds": times, "peak_gib": self.peak_gib()}

    def record(self, section: str, key: str, value: Any) -> None:
        self.results["sections"].setdefault(section, {})[key] = value
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.results, indent=2))
        print(f"{section}/{key}: {json.dumps(value)[:300]}", flush=True)

    def attempt(self, section: str, key: str, fn: Callable[[], Any]) -> None:
        """Record ``fn()`` or the error that stopped it (out of memory is a result too)."""
        try:
            self.record(section, key, fn())
        except Exception as error:  # noqa: BLE001 - every failure is recorded and the run goes on
            self.record(section, key, {"error": f"{type(error).__name__}: {str(error)[:300]}"})
        finally:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


def machine(device: torch.device) -> dict[str, Any]:
    import diffusers
    import peft

    info = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    else:
        flags = (
            Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0] if Path("/proc/cpuinfo").exists() else ""
        )
        info.update(
            cpu_flags=sorted(f for f in flags.split() if f.startswith(("avx", "amx"))), threads=torch.get_num_threads()
        )
    return info


def add_lora(model: torch.nn.Module, targets: list[str], rank: int = 32, alpha: int = 64) -> int:
    """peft LoRA on ``targets`` (fp32 adapters on a low-precision base, as the trainers keep them); the count of
    LoRA parameters."""
    from peft import LoraConfig

    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets))
    count = 0
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
            param.requires_grad_(True)
            count += param.numel()
    return count


def sdpa(backend: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    return sdpa_kernel(chosen[backend])


def bench_sd35(bench: Bench, tiny: bool) -> None:
    from diffusers import SD3Transformer2DModel

    from mmalign.models.flow_generator import JOINT_ATTENTION_TARGETS

    section, dev = "sd35_medium_flow_grpo", bench.device
    config = TINY_SD3 if tiny else SD35_MEDIUM
    side, text, rows = (8, 12, 2) if tiny else (64, 333, 8)  # 512 px: a 64x64 latent; CLIP 77 + T5 256 tokens
    with torch.device(dev):
        model = SD3Transformer2DModel(**config)
    params = sum(p.numel() for p in model.parameters())
    bench.record(section, "setup", {"params": params, "latent": [16, side, side], "text_tokens": text, "rows": rows})

    def inputs(batch: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return dict(
            hidden_states=torch.randn(batch, 16, side, side, device=dev, dtype=dtype),
            encoder_hidden_states=torch.randn(batch, text, config["joint_attention_dim"], device=dev, dtype=dtype),
            pooled_projections=torch.randn(batch, config["pooled_projection_dim"], device=dev, dtype=dtype),
            timestep=torch.full((batch,), 500.0, device=dev),
        )

    for dtype_name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        model.to(dtype)
        feed = inputs(2 * rows, dtype)

        @torch.no_grad()
        def sample_call(feed=feed):
            return model(**feed, return_dict=False)[0]

        bench.attempt(section, f"sample_call_cfg_{2 * rows}rows_{dtype_name}", lambda: bench.time(sample_call))

    model.to(torch.bfloat16)
    lora = add_lora(model, list(JOINT_ATTENTION_TARGETS))
    bench.record(section, "lora_params", lora)
    feed = inputs(rows, torch.bfloat16)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16)

    def train_call():
        with autocast:
            out = model(**feed, return_dict=False)[0]
        out.float().pow(2).mean().backward()

    backends = ["flash", "efficient", "math"] if dev.type == "cuda" else ["math"]
    for backend in backends:

        def call(backend=backend):
            with sdpa(backend):
                train_call()

        bench.attempt(section, f"train_call_lora_{rows}rows_sdpa_{backend}", lambda call=call: bench.time(call))
    model.enable_gradient_checkpointing()
    bench.attempt(section, f"train_call_lora_{rows}rows_checkpointed", lambda: bench.time(train_call))
    model.disable_gradient_checkpointing()
    model = None  # free the LoRA model before the full fine-tuning one

    def full_step():
        with torch.device(dev):
            full = SD3Transformer2DModel(**config)  # fp32 master weights
        optimizer = torch.optim.AdamW(full.parameters(), lr=1e-6, fused=dev.type == "cuda")

        def step():
            with autocast:
                out = full(**feed, return_dict=False)[0]
            out.float().pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return bench.time(step)

    bench.attempt(section, f"full_finetune_step_{rows}rows_bf16_autocast", full_step)


def bench_wan(bench: Bench, size: str, tiny: bool, warmup: int, reps: int) -> None:
    from diffusers import WanTransformer3DModel

    from mmalign.models.wan import WAN_LORA_TARGETS

    section, dev = f"wan21_{size}_flow_dpo", bench.device
    config = dict(WAN21_TRANSFORMER["1.3B"], **TINY_WAN) if tiny else dict(WAN21_TRANSFORMER[size])
    if tiny:
        config["text_dim"] = 16
    frames, height, width, text = (2, 8, 8, 6) if tiny else (21, 60, 104, 512)  # 81 frames at 480x832
    with torch.device(dev):
        model = WanTransformer3DModel(**config).to(torch.bfloat16)
    tokens = frames * (height // 2) * (width // 2)
    setup = {"params": sum(p.numel() for p in model.parameters()), "latent": [16, frames, height, width]}
    bench.record(section, "setup", {**setup, "video_tokens": tokens, "text_tokens": text})

    def inputs(batch: int) -> dict[str, torch.Tensor]:
        return dict(
            hidden_states=torch.randn(batch, 16, frames, height, width, device=dev, dtype=torch.bfloat16),
            encoder_hidden_states=torch.randn(batch, text, config["text_dim"], device=dev, dtype=torch.bfloat16),
            timestep=torch.full((batch,), 500, device=dev),
        )

    pair = inputs(2)

    @torch.no_grad()
    def sample_call():
        return model(**pair, return_dict=False)[0]

    bench.attempt(section, "sample_call_cfg_2rows_bf16", lambda: bench.time(sample_call, warmup, reps))
    bench.record(section, "lora_params", add_lora(model, list(WAN_LORA_TARGETS)))
    model.enable_gradient_checkpointing()
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16)

    def dpo_step():
        with torch.no_grad(), autocast:  # the reference: the same network with its adapters disabled
            model.disable_adapters()
            model(**pair, return_dict=False)
            model.enable_adapters()
        with autocast:
            out = model(**pair, return_dict=False)[0]
        out.float().pow(2).mean().backward()

    bench.attempt(section, "flow_dpo_step_pair_lora_checkpointed", lambda: bench.time(dpo_step, warmup, reps))


def bench_reward(bench: Bench, tiny: bool) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    section, dev = "vit_h14_reward", bench.device
    config = CLIPVisionConfig(**(TINY_VIT if tiny else VIT_H14), image_size=224, projection_dim=1024)
    with torch.device(dev):
        model = CLIPVisionModelWithProjection(config).to(torch.bfloat16).eval()
    batch = 4 if tiny else 64
    pixels = torch.randn(batch, 3, 224, 224, device=dev, dtype=torch.bfloat16)

    @torch.no_grad()
    def score():
        return model(pixel_values=pixels).image_embeds

    result = bench.time(score)
    bench.record(section, f"image_tower_batch{batch}_bf16", {**result, "images_per_second": batch / result["seconds"]})


def use_xformers(model: torch.nn.Module) -> str:
    """Switch ``model``'s attention to xformers: diffusers' attention dispatcher where the model has one, else
    its xformers attention processors; returns which."""
    processors = [m.processor for m in model.modules() if hasattr(m, "processor")]
    if processors and all(hasattr(p, "_attention_backend") for p in processors):  # they call the dispatcher
        model.set_attention_backend("xformers")
        return "set_attention_backend"
    model.enable_xformers_memory_efficient_attention()
    return "enable_xformers_memory_efficient_attention"


def bench_xformers(bench: Bench, tiny: bool) -> None:
    """SDPA (PyTorch's own choice of kernel) against xformers on the same calls: SD3.5-M sampling and LoRA
    training at 512 px, Wan 2.1 1.3B sampling and a Flow-DPO pair step at 81 frames."""
    from diffusers import SD3Transformer2DModel, WanTransformer3DModel

    from mmalign.models.flow_generator import JOINT_ATTENTION_TARGETS
    from mmalign.models.wan import WAN_LORA_TARGETS

    section, dev = "attention_sdpa_vs_xformers", bench.device
    import xformers

    bench.record(section, "xformers", xformers.__version__)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16)
    config = TINY_SD3 if tiny else SD35_MEDIUM
    side, text, rows = (8, 12, 2) if tiny else (64, 333, 8)
    with torch.device(dev):
        sd3 = SD3Transformer2DModel(**config).to(torch.bfloat16)
    add_lora(sd3, list(JOINT_ATTENTION_TARGETS))

    def sd3_feed(batch: int) -> dict[str, torch.Tensor]:
        return dict(
            hidden_states=torch.randn(batch, 16, side, side, device=dev, dtype=torch.bfloat16),
            encoder_hidden_states=torch.randn(
                batch, text, config["joint_attention_dim"], device=dev, dtype=torch.bfloat16
            ),
            pooled_projections=torch.randn(batch, config["pooled_projection_dim"], device=dev, dtype=torch.bfloat16),
            timestep=torch.full((batch,), 500.0, device=dev),
        )

    sample, train = sd3_feed(2 * rows), sd3_feed(rows)

    def sd3_sample():
        with torch.no_grad():
            sd3(**sample, return_dict=False)

    def sd3_train():
        with autocast:
            out = sd3(**train, return_dict=False)[0]
        out.float().pow(2).mean().backward()

    for attention in ("sdpa", "xformers"):
        if attention == "xformers":
            bench.record(section, "sd35_switch", use_xformers(sd3))
        bench.attempt(section, f"sd35_sample_cfg_{2 * rows}rows_{attention}", lambda: bench.time(sd3_sample))
        bench.attempt(section, f"sd35_train_lora_{rows}rows_{attention}", lambda: bench.time(sd3_train))
    sd3 = sample = train = None  # free the SD3.5 model before Wan's
    wan_config = dict(WAN21_TRANSFORMER["1.3B"], **(TINY_WAN if tiny else {}))
    if tiny:
        wan_config["text_dim"] = 16
    frames, height, width, words = (2, 8, 8, 6) if tiny else (21, 60, 104, 512)
    with torch.device(dev):
        wan = WanTransformer3DModel(**wan_config).to(torch.bfloat16)
    add_lora(wan, list(WAN_LORA_TARGETS))
    wan.enable_gradient_checkpointing()
    pair = dict(
        hidden_states=torch.randn(2, 16, frames, height, width, device=dev, dtype=torch.bfloat16),
        encoder_hidden_states=torch.randn(2, words, wan_config["text_dim"], device=dev, dtype=torch.bfloat16),
        timestep=torch.full((2,), 500, device=dev),
    )

    def wan_sample():
        with torch.no_grad():
            wan(**pair, return_dict=False)

    def wan_train():
        with autocast:
            out = wan(**pair, return_dict=False)[0]
        out.float().pow(2).mean().backward()

    for attention in ("sdpa", "xformers"):
        if attention == "xformers":
            bench.record(section, "wan_switch", use_xformers(wan))
        bench.attempt(section, f"wan13_sample_cfg_2rows_{attention}", lambda: bench.time(wan_sample, 1, 3))
        bench.attempt(section, f"wan13_train_pair_checkpointed_{attention}", lambda: bench.time(wan_train, 1, 3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/gpu_steps.json")
    parser.add_argument("--tiny", action="store_true", help="toy configs on the CPU: check the script")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds; later sections are skipped past it")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--only", choices=["all", "xformers"], default="all", help="xformers: only SDPA vs xformers")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    bench = Bench(Path(args.out), device, args.budget, args.warmup, args.reps)
    started = time.monotonic()
    if args.only == "xformers":
        bench.attempt("run", "xformers", lambda: bench_xformers(bench, args.tiny) or "done")
        bench.record("run", "wall_seconds", time.monotonic() - started)
        return
    bench.attempt("run", "sd35", lambda: bench_sd35(bench, args.tiny) or "done")
    bench.attempt("run", "wan_1.3B", lambda: bench_wan(bench, "1.3B", args.tiny, 1, 3) or "done")
    bench.attempt("run", "reward", lambda: bench_reward(bench, args.tiny) or "done")
    if args.tiny or bench.left() > 150:
        bench.attempt("run", "wan_14B", lambda: bench_wan(bench, "14B", args.tiny, 1, 1) or "done")
    else:
        bench.record("run", "wan_14B", f"skipped: {bench.left():.0f} s of the budget left")
    bench.record("run", "wall_seconds", time.monotonic() - started)


if __name__ == "__main__":
    main()
