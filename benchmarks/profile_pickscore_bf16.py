"""Where PickScore's bf16 time goes, at real size (CLIP-H/14, random weights, no downloads).

    PYTHONPATH=. .venv/bin/python benchmarks/profile_pickscore_bf16.py --images 16 --batches 8,16

Phases, each timed in this one process (the load average is printed beside every figure, since the machine
may be shared): the machine's matmul peak (``torch.mm`` of 4096^2 in fp32 and bf16, and the ViT-H MLP shape
through ``F.linear``); loading the saved fp32 checkpoint (``from_pretrained`` in fp32, then ``.to(bf16)``, versus
``from_pretrained(dtype=bf16)``); the image processor on 16 decoded 512 px images; the image tower at batch 8 and
16 in fp32 and bf16 under ``torch.profiler`` (top ops by self time); and which ops of the bf16 forward see fp32
tensors (a dispatch-mode census on one image). The checkpoint is written once to ``--workdir`` and reused.
"""

from __future__ import annotations

import argparse
import collections
import functools
import gc
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_rewards import PROMPT, sample_images  # noqa: E402

from mmalign.models.builders import clip_h14_config  # noqa: E402
from mmalign.tokenizers import write_clip_tokenizer  # noqa: E402


def load() -> str:
    return f"load {os.getloadavg()[0]:.2f}"


def say(*parts) -> None:
    print(*parts, f"[{load()}]", flush=True)


def ensure_checkpoint(folder: Path) -> Path:
    """A PickScore-shaped folder: fp32 safetensors (as PickScore_v1 is published), tokenizer, PIL processor."""
    if (folder / "model.safetensors").exists():
        return folder
    from transformers import CLIPModel
    from transformers.models.clip import CLIPImageProcessorPil

    torch.manual_seed(0)
    model = CLIPModel(clip_h14_config()).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    write_clip_tokenizer(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(
        str(folder)
    )
    del model
    gc.collect()
    return folder


def matmul_peaks() -> None:
    for dtype in (torch.float32, torch.bfloat16):
        n = 4096
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        torch.mm(a, b)
        start = time.perf_counter()
        for _ in range(3):
            torch.mm(a, b)
        mm = 2 * n**3 * 3 / (time.perf_counter() - start) / 1e12
        x, w = torch.randn(8 * 257, 1280, dtype=dtype), torch.randn(5120, 1280, dtype=dtype)
        F.linear(x, w)
        start = time.perf_counter()
        for _ in range(5):
            F.linear(x, w)
        lin = 2 * x.shape[0] * 1280 * 5120 * 5 / (time.perf_counter() - start) / 1e12
        say(
            f"peak {str(dtype):15} torch.mm 4096^3 {mm:.3f} TFLOP/s; F.linear [2056x1280]x[1280x5120] {lin:.3f} TFLOP/s"
        )


def interleaved_layer(batch: int = 8, rounds: int = 3) -> None:
    """One CLIP-H/14 vision encoder layer at ``batch`` images (257 tokens each), fp32 and bf16 alternated, so
    that both dtypes see the same load: the least load-sensitive bf16/fp32 ratio of the model's own work."""
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer

    torch.manual_seed(0)
    layer = CLIPEncoderLayer(clip_h14_config().vision_config).eval()
    x = torch.randn(batch, 257, 1280)
    times = {torch.float32: [], torch.bfloat16: []}
    with torch.inference_mode():
        for dtype in times:
            layer.to(dtype)(x.to(dtype), None)  # warm-up
        for _ in range(rounds):
            for dtype in times:
                layer.to(dtype)
                start = time.perf_counter()
                layer(x.to(dtype), None)
                times[dtype].append(time.perf_counter() - start)
    fp32, bf16 = min(times[torch.float32]), min(times[torch.bfloat16])
    say(
        f"one vision layer, batch {batch}, best of {rounds} interleaved: fp32 {fp32:.3f} s, bf16 {bf16:.3f} s, "
        f"bf16 speed = {fp32 / bf16:.2f}x fp32"
    )


def timed(label, fn):
    gc.collect()
    start = time.perf_counter()
    out = fn()
    say(f"{label:<58} {time.perf_counter() - start:7.2f} s")
    return out


def dtype_census(model, pixels) -> None:
    """Ops of one forward whose floating inputs are not all the model's dtype."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counts: collections.Counter = collections.Counter()

    class Census(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            dtypes = sorted(
                {
                    str(a.dtype).replace("torch.", "")
                    for a in torch.utils._pytree.tree_leaves((args, kwargs or {}))
                    if isinstance(a, torch.Tensor) and a.is_floating_point()
                }
            )
            counts[(str(func.overloadpacket.__name__), ",".join(dtypes))] += 1
            return func(*args, **(kwargs or {}))

    with torch.inference_mode(), Census():
        model.get_image_features(pixel_values=pixels)
    odd = {k: v for k, v in counts.items() if k[1] and k[1] != "bfloat16"}
    say("bf16 forward, ops by input dtype:", dict(sorted(counts.items(), key=lambda kv: -kv[1])))
    say("ops with non-bf16 float inputs:", odd or "none")


def profile_forward(model, pixels, label, rows=12) -> None:
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        model.get_image_features(pixel_values=pixels[:1])  # warm-up
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model.get_image_features(pixel_values=pixels)
        seconds = time.perf_counter() - start
    say(f"{label}: image tower {seconds:.2f} s for {pixels.shape[0]} images ({pixels.shape[0] / seconds:.3f} img/s)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batches", default="8,16")
    parser.add_argument("--workdir", default="/tmp/mmalign_pickscore_h14")
    parser.add_argument("--skip-fp32", action="store_true")
    parser.add_argument("--layer-only", action="store_true", help="only the peaks and the interleaved layer")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    say(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpu capability "
        f"{torch.backends.cpu.get_cpu_capability()}"
    )
    matmul_peaks()
    for batch in batches:
        interleaved_layer(batch)
    if args.layer_only:
        return 0
    folder = timed("write the fp32 checkpoint (once)", lambda: ensure_checkpoint(Path(args.workdir)))

    from transformers import CLIPModel

    from mmalign.rewards.clip import PickScoreReward, load_clip_processor

    model = timed("from_pretrained fp32", lambda: CLIPModel.from_pretrained(str(folder)).eval())
    timed(".to(bf16) after an fp32 load", functools.partial(model.to, torch.bfloat16))
    del model
    gc.collect()
    model = timed("from_pretrained(dtype=bf16)", lambda: CLIPModel.from_pretrained(str(folder), dtype=torch.bfloat16))
    del model
    gc.collect()
    reward = timed(
        "PickScoreReward.from_pretrained(dtype='bf16')",
        lambda: PickScoreReward.from_pretrained(str(folder), dtype="bf16"),
    )

    images = sample_images(args.images)
    _, image_processor = load_clip_processor(folder)
    timed(
        f"image processor, {args.images} images, one call", lambda: image_processor(images=images, return_tensors="pt")
    )
    pixels = timed(
        f"preprocess_reference, {args.images} images one by one",
        lambda: torch.stack([reward.preprocess_reference(im) for im in images]),
    )
    tokens = reward.tokenizer([PROMPT], return_tensors="pt")
    with torch.inference_mode():
        timed("text tower bf16, 1 prompt", lambda: reward.model.get_text_features(**tokens))

    dtype_census(reward.model, pixels[:1].to(torch.bfloat16))
    for batch in batches:
        profile_forward(reward.model, pixels[:batch].to(torch.bfloat16), f"bf16 batch {batch}")
    if not args.skip_fp32:
        reward.model.float()
        for batch in batches:
            profile_forward(reward.model, pixels[:batch], f"fp32 batch {batch}", rows=6)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
