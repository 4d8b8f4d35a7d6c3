"""Flow-DPO on a text-to-video transformer at real size on a CPU: seconds per step and peak memory of mmalign's
trainer (cached text embeddings and latents, gradient checkpointing) beside a straightforward step (the pipeline's
components used directly: the text encoder and the VAE run every step, no checkpointing), in the same run.

    .venv/bin/python benchmarks/bench_video_memory.py --size tiny     # checks the script (~1 min)
    .venv/bin/python benchmarks/bench_video_memory.py                 # Wan 2.1-1.3B size, 17 frames, 256 px

Writes ``benchmarks/results/video_memory.json`` and ``video_memory.md`` (``--size tiny`` writes to a temporary folder
unless ``--out`` is given). Never a test: nothing here asserts. The rows, the subprocesses and the report are
``real_size_dpo.py``'s, shared with ``bench_audio_memory.py`` (Stable Audio Open on 10 s of audio).

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

import json
import sys
import time
from pathlib import Path

from harness import REPO, Phases, backward_and_step
from real_size_dpo import LORA_ALPHA, LORA_RANK, LR, Family, dpo_loss, main

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
            loss = dpo_loss(model_w, model_l, ref_w, ref_l)
        self.losses.append(backward_and_step(loss, self.params, self.optimizer, phases))

    def info(self) -> dict:
        return {"trainable_params": sum(p.numel() for p in self.params), "losses": self.losses}


# ==========================================================================================================
# Parent side (no torch import)
# ==========================================================================================================
def make_video_pairs(folder: Path, size: dict) -> Path:
    """Two pairs of random smooth clips (lossless FFV1 .mkv), ``resolution`` square, as mmalign's JSONL."""
    import numpy as np

    frames, resolution = size["frames"], size["resolution"]

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


def _overrides(spec: dict) -> list[str]:
    return [f"frames={spec['frames']}", f"resolution={spec['resolution']}", "timestep_density=logit_normal"]


def _model_line(meta: dict) -> str:
    return (
        f"- Model: {meta['size']} (`WanTransformer3DModel`, {meta['transformer_params'] / 1e9:.2f} B parameters, "
        f"random weights, fp32); {meta['frames']} frames at {meta['resolution']} px; prompts padded to "
        f"{meta['text_length']} tokens; one pair per step; LoRA rank 32 on the attention and FFN projections."
    )


FAMILY = Family(
    name="video",
    script=__file__,
    doc=__doc__,
    title="Flow-DPO on a text-to-video transformer at real size, on a CPU",
    sizes=SIZES,
    real="wan-1.3b",
    build_version=BUILD_VERSION,
    build=_build,
    make_pairs=make_video_pairs,
    plain_step=PlainStep,
    overrides=_overrides,
    model_line=_model_line,
    memory_note="The text encoder is UMT5-XXL's width with 2 of its 24 layers (module docstring).",
)

if __name__ == "__main__":
    raise SystemExit(main(FAMILY))
