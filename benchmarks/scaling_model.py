"""The arithmetic behind docs/scaling.md: per-GPU step costs measured on one H200 (``gpu_steps.json`` of
``bench_gpu_steps.py``) combined with the recipes' batch shapes and the links' bandwidths into throughput for 1 to 4
nodes of 8 GPUs, and the communication each distributed setting adds per optimizer step.

Measured: every per-call time and peak memory (one H200). Stated, not measured here (one GPU cannot measure
collectives): the links' bandwidths, ``NVLINK_BUS_GBPS`` and ``IB_BUS_GBPS`` below, NCCL bus bandwidths typical
of H100/H200 HGX nodes with NVLink 4 and 8 x 400 Gb/s InfiniBand NDR. Ring collectives move ``2 (n-1)/n · bytes``
per GPU for an all-reduce and ``(n-1)/n · bytes`` for an all-gather or reduce-scatter. Not counted: VAE decoding,
text encoding (cached by the trainers), optimizer steps of LoRA (tiny), and any overlap of communication with
compute (FSDP prefetches, DDP buckets overlap the backward), so the communication shares are upper bounds.

    python benchmarks/scaling_model.py benchmarks/results/gpu_steps.json > tables.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

NVLINK_BUS_GBPS = 360.0  # NCCL all-reduce bus bandwidth within an 8-GPU NVLink-4 node, GB/s
IB_BUS_GBPS = 40.0  # per GPU across nodes over 400 Gb/s NDR (50 GB/s line rate), GB/s
NODES = (1, 2, 4)
GPUS_PER_NODE = 8


def seconds(results: dict, section: str, key: str) -> float:
    return float(results["sections"][section][key]["seconds"])


def collective_seconds(bytes_: float, gpus: int, kind: str) -> float:
    """Ring time of one collective over ``gpus`` GPUs: NVLink within a node, InfiniBand once it spans nodes."""
    if gpus == 1:
        return 0.0
    bandwidth = (NVLINK_BUS_GBPS if gpus <= GPUS_PER_NODE else IB_BUS_GBPS) * 1e9
    factor = 2.0 if kind == "all-reduce" else 1.0
    return factor * (gpus - 1) / gpus * bytes_ / bandwidth


def flow_grpo_sd35(results: dict) -> list[str]:
    """train/sd35-flow-grpo per GPU and round: batch 9 x grad_accum 2 x sample_batches 2 = 36 images, 10 SDE steps
    with CFG 4.5, the first 9 steps trained (conditional branch with gradients; the unconditional one reused from the
    rollout in the round's first optimizer step, recomputed without gradients in the second; beta 0.01: the
    adapters-off model's guided velocity without gradients), 2 optimizer steps."""
    section = "sd35_medium_flow_grpo"
    per_image_step = seconds(results, section, "sample_call_cfg_16rows_bf16") / 8  # 8 images x (cond, uncond)
    train_row = seconds(results, section, "train_call_lora_8rows_sdpa_flash") / 8
    uncond_row = per_image_step / 2
    images, steps, trained, optimizer_steps = 36, 10, 9, 2
    sampling = images * steps * per_image_step
    training = images * trained * (train_row + 0.5 * uncond_row + per_image_step)
    reward = images / results["sections"]["vit_h14_reward"]["image_tower_batch64_bf16"]["images_per_second"]
    lora_bytes = results["sections"][section]["lora_params"] * 4  # fp32 LoRA gradients
    full_bytes = results["sections"][section]["setup"]["params"] * 4
    compute = sampling + training + reward
    rows = [
        "| GPUs | round (s) | sampling / reward / training (s) | images/s | LoRA all-reduce per round (ms) | "
        "share | full-weight all-reduce per round (s) | share |",
        "|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for nodes in NODES:
        gpus = nodes * GPUS_PER_NODE
        lora = optimizer_steps * collective_seconds(lora_bytes, gpus, "all-reduce")
        full = optimizer_steps * collective_seconds(full_bytes, gpus, "all-reduce")
        total = compute + lora
        rows.append(
            f"| {gpus} ({nodes} node{'s' if nodes > 1 else ''}) | {total:.1f} | {sampling:.1f} / {reward:.2f} / "
            f"{training:.1f} | {images * gpus / total:.1f} | {lora * 1e3:.1f} | {lora / compute:.2%} | {full:.2f} | "
            f"{full / compute:.1%} |"
        )
    return rows


def flow_dpo_wan(results: dict) -> list[str]:
    """A Flow-DPO step per GPU: one pair of 81-frame 480x832 videos (policy forward+backward of 2 rows with
    activation checkpointing, reference forward of 2 rows), one optimizer step per pair."""
    rows = [
        "| model | GPUs | step (s) | pairs/s | peak GiB (LoRA) | LoRA all-reduce (ms) | share | full fine-tuning "
        "state per GPU, FSDP2 full shard (GiB) | FSDP2 traffic per step, full shard (s) | hybrid shard (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size in ("1.3B", "14B"):
        section = f"wan21_{size}_flow_dpo"
        data = results["sections"][section]
        step = float(data["flow_dpo_step_pair_lora_checkpointed"]["seconds"])
        peak = float(data["flow_dpo_step_pair_lora_checkpointed"]["peak_gib"])
        params = data["setup"]["params"]
        for nodes in NODES:
            gpus = nodes * GPUS_PER_NODE
            lora = collective_seconds(data["lora_params"] * 4, gpus, "all-reduce")
            state = params * 16 / gpus / 2**30  # fp32 weights, gradients, two Adam moments, sharded
            # full shard: all-gather the bf16 weights for forward and again for backward, reduce-scatter fp32 grads
            full = 2 * collective_seconds(params * 2, gpus, "all-gather") + collective_seconds(
                params * 4, gpus, "reduce-scatter"
            )
            # hybrid: those collectives within the node, then an all-reduce of each GPU's gradient shard across nodes
            hybrid = 2 * collective_seconds(params * 2, GPUS_PER_NODE, "all-gather") + collective_seconds(
                params * 4, GPUS_PER_NODE, "reduce-scatter"
            )
            if nodes > 1:
                shard = params * 4 / GPUS_PER_NODE
                hybrid += 2 * (nodes - 1) / nodes * shard / (IB_BUS_GBPS * 1e9)
            rows.append(
                f"| Wan 2.1 {size} | {gpus} | {step + lora:.2f} | {gpus / (step + lora):.2f} | {peak:.1f} | "
                f"{lora * 1e3:.1f} | {lora / step:.2%} | {state:.1f} | {full:.2f} | {hybrid:.2f} |"
            )
    return rows


def main() -> None:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/gpu_steps.json")
    results = json.loads(path.read_text())
    print("Flow-GRPO, SD3.5-Medium (train/sd35-flow-grpo), per round of 36 images per GPU:\n")
    print("\n".join(flow_grpo_sd35(results)))
    print("\nFlow-DPO, Wan 2.1 (81 frames, 480x832), one pair per GPU and step:\n")
    print("\n".join(flow_dpo_wan(results)))


if __name__ == "__main__":
    main()
