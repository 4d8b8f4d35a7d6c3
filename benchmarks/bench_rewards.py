"""Reward-model throughput, memory and compute efficiency, side by side with the reference usage patterns.

Full-size architectures with random weights (no downloads): HPSv2 (open_clip ViT-H-14), PickScore
(transformers CLIP-H/14) and ImageReward (BLIP ViT-L/16 + cross-attention BERT-base). For each:

* mmalign at several batch sizes and dtypes (text features cached per prompt; the cache is cleared before
  every timed run, so each run pays for its prompt once);
* the reference usage pattern in the same process, fp32: HPSv2's ``img_score.score`` (checkpoint reloaded on
  every call, prompt re-encoded per image, one image at a time) and the same without the reload; PickScore's
  README snippet (batched); ImageReward's ``inference_rank`` (one image at a time).

Reported: images/s, the ratio to the best reference row, peak RSS, executed GFLOP/s (FLOPs counted with
``torch.utils.flop_counter``) as a fraction of this machine's measured matmul peak, and bf16-vs-fp32 score
error and rank agreement. Never a pass/fail test.

    .venv/bin/python benchmarks/bench_rewards.py                # all three models (about 10 minutes on 2 cores)
    .venv/bin/python benchmarks/bench_rewards.py --models imagereward --batches 1,8
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import RssSampler  # noqa: E402

from mmalign.rewards.base import resolve_dtype  # noqa: E402
from mmalign.rewards.preprocess import hps_reference  # noqa: E402
from mmalign.tokenizers import write_clip_tokenizer  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"


# -- measurement helpers ---------------------------------------------------------------------------------
def count_flops(fn) -> int:
    """FLOPs of ``fn()``. nn.MultiheadAttention's inference fast path (open_clip's attention) is a fused kernel
    that ``FlopCounterMode`` cannot see, so it is switched off while counting (it would hide a third of
    ViT-H-14's FLOPs: its projections and attention products)."""
    from torch.utils.flop_counter import FlopCounterMode

    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            fn()
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return int(counter.get_total_flops())


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 3) -> float:
    """GFLOP/s of an n^3 product through ``F.linear`` (the path nn.Linear layers take; on a CPU without native
    bf16, MKL's bf16 ``a @ b`` is a far slower fallback, so it would not be a fair peak)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    F.linear(a, b)
    start = time.perf_counter()
    for _ in range(repeats):
        F.linear(a, b)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def sample_images(count: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        small = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
        images.append(Image.fromarray(small).resize((512, 512), Image.BICUBIC))
    return images


def timed(fn) -> tuple[float, int, object]:
    gc.collect()
    with RssSampler(interval=0.005) as rss:
        start = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - start
    return seconds, rss.peak, out


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


# -- models at full size, random weights -------------------------------------------------------------------
def build_hps(workdir: Path):
    import open_clip

    from mmalign.rewards.hps import HPSReward

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-H-14", pretrained=None)
    checkpoint = workdir / "HPS_v2.1_compressed.pt"  # fp16, as the published file
    torch.save({"state_dict": {k: v.half() for k, v in model.state_dict().items()}}, checkpoint)
    model.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    tokenizer = open_clip.get_tokenizer("ViT-H-14")
    reward = HPSReward(model, tokenizer)

    def reference_rows(images):
        """hpsv2/img_score.py: per call torch.load + load_state_dict; per image tokenise + forward."""

        def with_reload():
            out = []
            for image in images:  # the package's score() is called per image in its evaluation loops
                state = torch.load(checkpoint, map_location="cpu")["state_dict"]
                model.load_state_dict(state)
                with torch.no_grad():
                    text = tokenizer([PROMPT])
                    features = model(hps_reference(image).unsqueeze(0), text)
                    out.append(float(torch.diagonal(features[0] @ features[1].T)[0]))
            return out

        def kept():
            out = []
            for image in images:
                with torch.no_grad():
                    features = model(hps_reference(image).unsqueeze(0), tokenizer([PROMPT]))
                    out.append(float(torch.diagonal(features[0] @ features[1].T)[0]))
            return out

        return {"reference: reload per call, 1 image/call": with_reload, "reference: model kept, 1 image/call": kept}

    def one_image_flops():
        pixels = hps_reference(sample_images(1)[0]).unsqueeze(0)
        image = count_flops(lambda: model.encode_image(pixels))
        text = count_flops(lambda: model.encode_text(tokenizer([PROMPT])))
        return image, text

    return reward, reference_rows, one_image_flops


def build_pickscore(workdir: Path):
    from transformers import CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.models.clip import CLIPImageProcessorPil

    from mmalign.models.builders import clip_h14_config
    from mmalign.rewards.clip import PickScoreReward

    torch.manual_seed(0)
    config = clip_h14_config()
    model = CLIPModel(config).eval()
    tokenizer = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(workdir / "clip_tokenizer")))
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    reward = PickScoreReward(model, tokenizer, image_processor)

    def reference_rows(images):
        def snippet(batch):
            def run():
                out = []
                for start in range(0, len(images), batch):
                    with torch.no_grad():
                        image_inputs = processor(images=images[start : start + batch], return_tensors="pt")
                        text_inputs = processor(
                            text=PROMPT, padding=True, truncation=True, max_length=77, return_tensors="pt"
                        )
                        image_embs = model.get_image_features(**image_inputs).pooler_output
                        image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
                        text_embs = model.get_text_features(**text_inputs).pooler_output
                        text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
                        out += (model.logit_scale.exp() * (text_embs @ image_embs.T)[0]).tolist()
                return out

            return run

        return {
            "reference: README snippet, 1 image/call": snippet(1),
            "reference: README snippet, batched": snippet(len(images)),
        }

    def one_image_flops():
        pixels = reward.preprocess_reference(sample_images(1)[0]).unsqueeze(0)
        tokens = tokenizer([PROMPT], return_tensors="pt")
        return (
            count_flops(lambda: model.get_image_features(pixel_values=pixels)),
            count_flops(lambda: model.get_text_features(**tokens)),
        )

    return reward, reference_rows, one_image_flops


def build_imagereward(workdir: Path):
    from transformers import BertTokenizer, BlipVisionConfig

    from mmalign.rewards.imagereward import ImageReward, text_config_from_med_config

    torch.manual_seed(0)
    words = [f"w{i}" for i in range(30522 - 5)]
    (workdir / "bert").mkdir(exist_ok=True)
    (workdir / "bert" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words))
    tokenizer = BertTokenizer.from_pretrained(str(workdir / "bert"))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    vision = BlipVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=224,
        patch_size=16,
        layer_norm_eps=1e-6,
        attention_dropout=0.0,
    )
    med = {
        "vocab_size": 30524,
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "max_position_embeddings": 512,
        "layer_norm_eps": 1e-12,
    }
    reward = ImageReward(vision, text_config_from_med_config(med, 1024, "bench"), tokenizer).eval()

    def reference_rows(images):
        def inference_rank():
            out = []
            for image in images:  # ImageReward.inference_rank: one image per forward
                with torch.no_grad():
                    out.append(float(reward.score_pixels(reward.preprocess_reference(image).unsqueeze(0), [PROMPT])[0]))
            return out

        return {"reference: inference_rank, 1 image/forward": inference_rank}

    def one_image_flops():
        pixels = reward.preprocess_reference(sample_images(1)[0]).unsqueeze(0)
        count_flops(lambda: reward.vision(pixel_values=pixels))
        total = count_flops(lambda: reward.score_pixels(pixels, [PROMPT]))
        return total, 0  # the text tower cross-attends to each image: its cost is per image

    return reward, reference_rows, one_image_flops


BUILDERS = {"hpsv2": build_hps, "pickscore": build_pickscore, "imagereward": build_imagereward}


def set_dtype(reward, dtype: torch.dtype):
    if hasattr(reward, "mlp"):  # ImageReward: towers in dtype, head in float32
        reward.vision.to(dtype)
        reward.text.to(dtype)
    else:
        reward.to(dtype)
    if hasattr(reward, "_text_cache"):
        reward._text_cache.clear()


def bench_model(name, args, workdir, peaks) -> list[dict]:
    print(f"\n== {name}: building full-size model with random weights", flush=True)
    reward, reference_rows, one_image_flops = BUILDERS[name](workdir)
    image_flops, text_flops = one_image_flops()
    print(f"   FLOPs per image {image_flops / 1e9:.1f} G, per prompt {text_flops / 1e9:.1f} G", flush=True)
    rows = []
    n_ref = args.reference_images
    images_all = sample_images(max(max(args.batches), n_ref))
    for label, fn in reference_rows(images_all[:n_ref]).items():
        seconds, peak, _ = timed(fn)
        per_call_flops = image_flops + text_flops  # the reference encodes the prompt with every image
        rows.append(
            dict(
                model=name,
                impl=label,
                dtype="fp32",
                batch=1 if "1 image" in label else n_ref,
                images=n_ref,
                seconds=seconds,
                images_per_s=n_ref / seconds,
                peak_rss_gb=peak / 2**30,
                gflops=per_call_flops * n_ref / seconds / 1e9,
            )
        )
        print(f"   {label:<44} {n_ref / seconds:6.3f} img/s  peak {peak / 2**30:5.1f} GiB", flush=True)
    scores = {}
    for dtype_name in args.dtypes:
        dtype = resolve_dtype(dtype_name)
        set_dtype(reward, dtype)
        batches = args.batches if dtype == torch.float32 or args.bf16_full else args.low_precision_batches
        reward.score_images(images_all[:1], PROMPT, batch_size=1)  # warm-up
        for batch in batches:
            count = max(batch, args.min_images)
            images = images_all[:count] if count <= len(images_all) else sample_images(count)
            if hasattr(reward, "_text_cache"):
                reward._text_cache.clear()
            seconds, peak, out = timed(functools.partial(reward.score_images, images, PROMPT, batch_size=batch))
            executed = image_flops * count + text_flops
            peak_matmul = peaks[dtype_name]
            rows.append(
                dict(
                    model=name,
                    impl="mmalign",
                    dtype=dtype_name,
                    batch=batch,
                    images=count,
                    seconds=seconds,
                    images_per_s=count / seconds,
                    peak_rss_gb=peak / 2**30,
                    gflops=executed / seconds / 1e9,
                    fraction_of_peak=executed / seconds / 1e9 / peak_matmul,
                )
            )
            scores.setdefault(dtype_name, {})[batch] = out
            print(
                f"   mmalign {dtype_name} batch {batch:<3} ({count} images)          {count / seconds:6.3f} img/s  "
                f"peak {peak / 2**30:5.1f} GiB  {executed / seconds / 1e9:6.1f} GFLOP/s "
                f"({100 * executed / seconds / 1e9 / peak_matmul:4.1f}% of {dtype_name} peak)",
                flush=True,
            )
    if "fp32" in scores and len(scores) > 1:
        for dtype_name, by_batch in scores.items():
            if dtype_name == "fp32":
                continue
            common = sorted(set(by_batch) & set(scores["fp32"]), reverse=True)
            if common:
                lo, hi = by_batch[common[0]], scores["fp32"][common[0]]
                n = min(len(lo), len(hi))
                agreement = dict(
                    max_abs_error=float((lo[:n] - hi[:n]).abs().max()),
                    spearman=spearman(lo[:n], hi[:n]) if n > 1 else None,
                    ties=int(n - len(set(lo[:n].tolist()))),
                    n=n,
                )
                rows.append(dict(model=name, impl=f"{dtype_name} vs fp32 scores", dtype=dtype_name, **agreement))
                print(f"   {dtype_name} vs fp32: {agreement}", flush=True)
    return rows


def cpu_model_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def to_markdown(result) -> str:
    lines = [
        f"# Reward-model throughput ({result['machine']})",
        "",
        f"Command: `{result['command']}`",
        "",
        "Matmul peak (2048^3 through `F.linear`): "
        + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in result["matmul_peak_gflops"].items()),
        "",
    ]
    if "cpu" in result:
        load = result["load_average"]
        lines += [
            f"CPU: {result['cpu']} (flags: {', '.join(result['cpu_flags']) or 'none of avx2/avx512/amx'}); "
            f"1-minute load average {load[0]:.2f} at the start, {load[1]:.2f} at the end (the benchmark's own "
            f"threads included); {result['date']}.",
            "",
        ]
    peaks = result["matmul_peak_gflops"]
    if "bf16" in peaks and "fp32" in peaks and peaks["bf16"] < peaks["fp32"]:
        lines += [
            f"bf16 matmul runs at {peaks['bf16'] / peaks['fp32']:.2f}x fp32 on this CPU (avx512_bf16 without AMX: "
            "bf16 dot products but no tile units), so bf16 scoring cannot beat fp32 here; bf16 halves the weights' "
            "memory. Profile and whole-process figures: [pickscore_bf16.md](pickscore_bf16.md).",
            "",
        ]
    lines += [
        "| model | implementation | dtype | batch | images/s | vs best reference | peak RSS GiB | GFLOP/s "
        "| % of peak |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model in dict.fromkeys(r["model"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["model"] == model and "images_per_s" in r]
        best_ref = max((r["images_per_s"] for r in rows if r["impl"].startswith("reference")), default=None)
        for r in rows:
            ratio = f"{r['images_per_s'] / best_ref:.2f}x" if best_ref else ""
            frac = f"{100 * r['fraction_of_peak']:.0f}%" if "fraction_of_peak" in r else ""
            lines.append(
                f"| {model} | {r['impl']} | {r['dtype']} | {r['batch']} | {r['images_per_s']:.3f} | {ratio} | "
                f"{r['peak_rss_gb']:.1f} | {r['gflops']:.1f} | {frac} |"
            )
    agreement = [r for r in result["rows"] if "max_abs_error" in r]
    if agreement:
        lines += ["", "| model | comparison | max abs error | Spearman | exact ties | n |", "|---|---|---|---|---|---|"]
        for r in agreement:
            lines.append(
                f"| {r['model']} | {r['impl']} | {r['max_abs_error']:.4g} | {r['spearman']} | {r['ties']} | {r['n']} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="hpsv2,pickscore,imagereward")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument(
        "--low-precision-batches",
        default="1",
        help="batches for bf16/fp16 when the CPU has no native bf16 (see --bf16-full)",
    )
    parser.add_argument("--bf16-full", action="store_true", help="run every batch size in bf16/fp16 too")
    parser.add_argument("--min-images", type=int, default=2, help="images per timed run at least")
    parser.add_argument("--reference-images", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.low_precision_batches = [int(b) for b in args.low_precision_batches.split(",")]
    args.dtypes = args.dtypes.split(",")
    torch.set_num_threads(args.threads)
    peaks = {name: matmul_peak(resolve_dtype(name)) for name in args.dtypes}
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    native_bf16 = "avx512_bf16" in flags or "amx_bf16" in flags
    cpu_flags = sorted({f for f in flags.split() if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")})
    load_before = os.getloadavg()[0]
    if native_bf16:
        args.bf16_full = True
    print(
        f"threads {args.threads}; matmul peak "
        + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peaks.items())
        + f"; native bf16: {native_bf16}",
        flush=True,
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            rows += bench_model(name, args, Path(tmp), peaks)
    result = dict(
        machine=f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
        f"native bf16 {native_bf16}",
        command="python benchmarks/bench_rewards.py " + " ".join(argv or sys.argv[1:]),
        cpu=cpu_model_name(),
        cpu_flags=cpu_flags,
        load_average=[load_before, os.getloadavg()[0]],
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        matmul_peak_gflops=peaks,
        rows=rows,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rewards.json").write_text(json.dumps(result, indent=2))
    (out / "rewards.md").write_text(to_markdown(result))
    print("\n" + to_markdown(result))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
