"""Diffusion-DPO on a text-to-audio DiT at real size on a CPU: seconds per step and peak memory of mmalign's trainer
(cached text conditions and latents, gradient checkpointing) beside a straightforward step (the pipeline's
components used directly: T5, the projection model and the VAE run every step, no checkpointing), in the same run.

    .venv/bin/python benchmarks/bench_audio_memory.py --size tiny-audio   # checks the script (~1 min)
    .venv/bin/python benchmarks/bench_audio_memory.py                     # Stable Audio Open 1.0 size, 10 s clips

Writes ``benchmarks/results/audio_memory.json`` and ``audio_memory.md`` (``--size tiny-audio`` writes to a temporary
folder unless ``--out`` is given). Never a test: nothing here asserts. The rows, the subprocesses and the report are
``real_size_dpo.py``'s, shared with ``bench_video_memory.py`` (the same hyper-parameters: LoRA rank 32, alpha 64,
β 100, AdamW lr 1e-4, clipping to 1, one pair per step).

The model (``--size stable-audio-open``): ``StableAudioDiTModel`` with diffusers' default config, which is Stable
Audio Open 1.0's (24 layers, 24 heads × 64, 12 key/value heads, 64 latent channels in and out, cross-attention 768,
global states 1536, ``sample_size`` 1024 latent frames; 1.06 B parameters), ``AutoencoderOobleck`` with its default
config (Stable Audio Open's: stereo, 44.1 kHz, hop 2 · 4 · 4 · 8 · 8 = 2048; 156 M parameters), a
``StableAudioProjectionModel`` of T5-base's width (768 → 768, seconds in [0, 512]) and a ``T5EncoderModel`` of
T5-base's shape (d_model 768, 12 layers, d_ff 3072, 12 heads; prompts padded to 128 tokens as Stable Audio Open
does), random weights, fp32. Shrunk: only the T5 vocabulary (:func:`mmalign.models.builders.t5_tokenizer`, letters
and digits, 94 entries instead of T5's 32 128), since the tokenizer is built offline; that drops 24.6 M embedding
parameters (94 MiB in fp32) from the straightforward row, which keeps T5 in memory, and nothing from mmalign's step,
which works from cached conditions and frees T5. Unlike the video benchmark, the pipeline is not saved: each row
builds it in memory (:func:`mmalign.models.builders.stable_audio_components`, seed 0: both rows get the same weights;
the building time is part of the set-up, not of the steps), since its 5.2 GB in fp32 did not fit in the 2.4 GB left
on the disk of the machine this ran on; mmalign's trainer is handed it as its ``policy`` (``StableAudioGenerator``
over the components).

The data: 2 pairs of random 10 s stereo 44.1 kHz WAV files (a few tones plus noise, 16-bit), each pair with its own
prompt, as mmalign's JSONL of audio pairs. One pair per step; the pairs alternate. As ``StableAudioPipeline`` does,
the latents always have the DiT's ``sample_size`` frames (47.55 s): the 10 s waveforms are zero-padded to
``1024 · 2048`` samples before the VAE, and the timing conditions say 0 → 10 s (mmalign's ``duration=10``).

Rows, each in its own process, ``--threads`` torch threads, 1 warm-up step then ``--steps`` timed steps:

* ``plain``: the pipeline's components (built as above); peft LoRA (``get_peft_model``, gaussian
  init) on the DiT projections mmalign's Stable Audio family trains (every block's ``attn1`` / ``attn2`` q, k, v, out
  and ``ff``); every step reads both WAV files, zero-pads them, VAE-encodes them (``latent_dist.sample()``, no
  scaling), encodes the prompt (T5 padded to 128 tokens, the projection, zeros at the padding) and the timing
  (``seconds_start`` 0, ``seconds_end`` 10 through the projection's number conditioners), draws t uniform in [0, 1)
  (mmalign's v-diffusion default, stable-audio-tools' ``uniform`` sampler), noises the pair as stable-audio-tools'
  "v" objective does (``cos(πt/2)·x0 + sin(πt/2)·ε``, target ``cos(πt/2)·ε − sin(πt/2)·x0``), runs the DiT on the
  pair with gradients and again with the adapters disabled under ``no_grad`` (the reference), takes the
  Diffusion-DPO loss of the v-prediction errors, backward, clip, AdamW.
* ``mmalign``: the real trainer, ``resolve_trainer_config(None, [trainer=dpo, model=..., data=..., duration=10,
  beta=100, lora_rank=32, lora_alpha=64, gradient_checkpointing=true, cache_latents=true, conditions_cache=...,
  free_text_encoders=true])`` with the components as its policy, its pairs' latents and prompts primed first (the
  priming time is reported), then ``trainer._train_step()``.

Reported: s/step (mean of the timed steps) split into phases, the training steps' own peak RSS (``VmHWM`` reset after
set-up), and the whole process's peak (loading and priming included). Target (issue #14): mmalign's step at most
20 GB.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from harness import REPO, Phases, backward_and_step
from real_size_dpo import LORA_ALPHA, LORA_RANK, LR, Family, dpo_loss, main

from mmalign.models.builders import TINY_STABLE_AUDIO

BUILD_VERSION = 1
STABLE_AUDIO_OPEN = {
    # diffusers' StableAudioDiTModel / AutoencoderOobleck defaults, written out: Stable Audio Open 1.0's configs
    "transformer": dict(
        sample_size=1024,
        in_channels=64,
        num_layers=24,
        attention_head_dim=64,
        num_attention_heads=24,
        num_key_value_attention_heads=12,
        out_channels=64,
        cross_attention_dim=768,
        time_proj_dim=256,
        global_states_input_dim=1536,
        cross_attention_input_dim=768,
    ),
    "vae": dict(
        encoder_hidden_size=128,
        downsampling_ratios=[2, 4, 4, 8, 8],
        channel_multiples=[1, 2, 4, 8, 16],
        decoder_channels=128,
        decoder_input_channels=64,
        audio_channels=2,
        sampling_rate=44100,
    ),
    # T5-base's shape (its vocabulary shrunk: the tokenizer is t5_tokenizer's)
    "text": dict(d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12, relative_attention_num_buckets=32),
    "projection": dict(text_encoder_dim=768, conditioning_dim=768, min_value=0, max_value=512),
    "scheduler": TINY_STABLE_AUDIO["scheduler"],  # Stable Audio Open 1.0's values
}
CONFIGS = {"stable-audio-open": STABLE_AUDIO_OPEN, "tiny-audio": TINY_STABLE_AUDIO}


def _size(config: dict, seconds: float, text_length: int) -> dict:
    vae = config["vae"]
    return {
        "seconds": seconds,
        "sample_rate": vae["sampling_rate"],
        "channels": vae["audio_channels"],
        "hop": math.prod(vae["downsampling_ratios"]),
        "latent_frames": config["transformer"]["sample_size"],
        "text_length": text_length,
    }


SIZES = {
    "stable-audio-open": _size(STABLE_AUDIO_OPEN, 10.0, 128),
    "tiny-audio": _size(TINY_STABLE_AUDIO, 0.01, 12),
}
PROMPTS = ["a dog barks near a busy road", "rain on a piano loop"]


# ==========================================================================================================
# Worker side (one subprocess per task; imports torch)
# ==========================================================================================================
def _components(spec: dict) -> dict:
    """The random pipeline's components of ``spec["size"]`` (seed 0), built in memory."""
    from mmalign.models.builders import stable_audio_components

    return stable_audio_components(0, CONFIGS[spec["size"]], SIZES[spec["size"]]["text_length"])


def _build(spec: dict) -> dict:
    """Nothing saved (see the module docstring): the parameter counts, from the components on the meta device."""
    import torch

    start = time.perf_counter()
    with torch.device("meta"):
        components = _components(spec)
    Path(spec["folder"]).mkdir(parents=True, exist_ok=True)
    count = lambda name: sum(p.numel() for p in components[name].parameters())  # noqa: E731
    return {
        "build_s": time.perf_counter() - start,
        **{f"{name}_params": count(name) for name in ("transformer", "vae", "text_encoder", "projection_model")},
    }


def _policy(spec: dict):
    """mmalign's generator over the components (the scheduler as Stable Audio Open's config)."""
    from mmalign.models.stable_audio import StableAudioGenerator

    scheduler = {"_class_name": "CosineDPMSolverMultistepScheduler", **CONFIGS[spec["size"]]["scheduler"]}
    return StableAudioGenerator({**_components(spec), "scheduler_config": scheduler})


def _waveform(path: Path, length: int):
    """A WAV file as ``[C, length]`` float32 in [-1, 1], zero-padded (or cropped) at the end."""
    import soundfile as sf
    import torch

    data, _ = sf.read(str(path), dtype="float32", always_2d=True)
    audio = torch.from_numpy(data.T.copy())
    out = torch.zeros(audio.shape[0], length)
    keep = min(length, audio.shape[1])
    out[:, :keep] = audio[:, :keep]
    return out


class PlainStep:
    """The straightforward Diffusion-DPO step on ``StableAudioPipeline``'s components (see the module docstring)."""

    def __init__(self, spec: dict, phases: Phases):
        import torch
        from diffusers.models.embeddings import get_1d_rotary_pos_embed
        from peft import LoraConfig, get_peft_model

        from mmalign.models.stable_audio import STABLE_AUDIO_LORA_TARGETS

        self.spec, self.phases = spec, phases
        data = Path(spec["data"])
        rows = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
        self.pairs = [{**r, "chosen": data.parent / r["chosen"], "rejected": data.parent / r["rejected"]} for r in rows]
        self.index = 0
        components = _components(spec)
        self.tokenizer = components["tokenizer"]
        self.text_encoder = components["text_encoder"].eval()
        self.projection = components["projection_model"].eval()
        self.vae = components["vae"].eval()
        transformer = components["transformer"]
        for module in (self.text_encoder, self.projection, self.vae, transformer):
            module.requires_grad_(False)
        config = LoraConfig(
            r=LORA_RANK,
            lora_alpha=LORA_ALPHA,
            init_lora_weights="gaussian",
            target_modules=list(STABLE_AUDIO_LORA_TARGETS),
        )
        self.transformer = get_peft_model(transformer, config)
        self.transformer.train()
        self.params = [p for p in self.transformer.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=LR, weight_decay=1e-4)
        self.length = spec["latent_frames"] * spec["hop"]  # the pipeline's waveform_length
        head_dim = transformer.config.attention_head_dim
        self.rotary = get_1d_rotary_pos_embed(
            head_dim // 2, spec["latent_frames"] + 1, use_real=True, repeat_interleave_real=False
        )
        self.losses: list[float] = []

    def _conditions(self, prompt: str):
        """``encoder_hidden_states [1, L + 2, D]`` and ``global_hidden_states [1, 1, 2D]`` of the prompt and the
        timing, as ``StableAudioPipeline`` builds them."""
        import torch

        tokens = self.tokenizer(
            [prompt], padding="max_length", max_length=self.spec["text_length"], truncation=True, return_tensors="pt"
        )
        hidden = self.text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
        text = self.projection(text_hidden_states=hidden).text_hidden_states
        text = text * tokens.attention_mask.unsqueeze(-1).to(text.dtype)
        timing = self.projection(
            start_seconds=torch.tensor([0.0]), end_seconds=torch.tensor([float(self.spec["seconds"])])
        )
        start, end = timing.seconds_start_hidden_states, timing.seconds_end_hidden_states
        return torch.cat([text, start, end], dim=1), torch.cat([start, end], dim=2)

    def _predict(self, noisy, t, text, global_states):
        return self.transformer(
            noisy,
            t.expand(noisy.shape[0]),
            encoder_hidden_states=text,
            global_hidden_states=global_states,
            rotary_embedding=self.rotary,
            return_dict=False,
        )[0]

    def step(self) -> None:
        import torch
        import torch.nn.functional as F

        phases = self.phases
        pair = self.pairs[self.index % len(self.pairs)]
        self.index += 1
        with phases("encode"), torch.no_grad():
            audio = torch.stack([_waveform(pair[k], self.length) for k in ("chosen", "rejected")])
            latents = self.vae.encode(audio).latent_dist.sample()
            text, global_states = self._conditions(pair["prompt"])
            text, global_states = text.repeat(2, 1, 1), global_states.repeat(2, 1, 1)
        with phases("forward"):
            noise = torch.randn_like(latents[:1]).repeat(2, 1, 1)
            t = torch.rand(())
            alpha, sigma = torch.cos(t * math.pi / 2), torch.sin(t * math.pi / 2)
            noisy = alpha * latents + sigma * noise
            target = alpha * noise - sigma * latents
            pred = self._predict(noisy, t, text, global_states)
            model_w, model_l = F.mse_loss(pred, target, reduction="none").mean(dim=[1, 2]).chunk(2)
            with torch.no_grad(), self.transformer.disable_adapter():
                ref = self._predict(noisy, t, text, global_states)
                ref_w, ref_l = F.mse_loss(ref, target, reduction="none").mean(dim=[1, 2]).chunk(2)
            loss = dpo_loss(model_w, model_l, ref_w, ref_l)
        self.losses.append(backward_and_step(loss, self.params, self.optimizer, phases))

    def info(self) -> dict:
        return {"trainable_params": sum(p.numel() for p in self.params), "losses": self.losses}


# ==========================================================================================================
# Parent side (no torch import)
# ==========================================================================================================
def make_audio_pairs(folder: Path, size: dict) -> Path:
    """Two pairs of random ``seconds``-long WAV files (a few tones plus noise, 16-bit) at the model's rate and
    channel count, as mmalign's JSONL of audio pairs."""
    import numpy as np
    import soundfile as sf

    sys.path.insert(0, str(REPO))
    path = folder / "pairs.jsonl"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    rate, channels = size["sample_rate"], size["channels"]
    time_axis = np.arange(int(round(size["seconds"] * rate))) / rate
    lines = []
    for i, prompt in enumerate(PROMPTS):
        for side, seed in (("chosen", 2 * i), ("rejected", 2 * i + 1)):
            rng = np.random.default_rng(seed)
            tones = sum(np.sin(2 * np.pi * f * time_axis + p) for f, p in rng.uniform([50, 0], [2000, 6], (4, 2)))
            wave = 0.1 * tones[:, None] + 0.05 * rng.standard_normal((len(time_axis), channels))
            sf.write(str(folder / f"{side}{i}.wav"), np.clip(wave, -1, 1), rate, subtype="PCM_16")
        lines.append({"prompt": prompt, "chosen": f"chosen{i}.wav", "rejected": f"rejected{i}.wav"})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _overrides(spec: dict) -> list[str]:
    return [f"duration={spec['seconds']}"]


def _model_line(meta: dict) -> str:
    latent_seconds = meta["latent_frames"] * meta["hop"] / meta["sample_rate"]
    return (
        f"- Model: {meta['size']} (`StableAudioDiTModel`, {meta['transformer_params'] / 1e9:.2f} B parameters, "
        f"`AutoencoderOobleck` hop {meta['hop']} at {meta['sample_rate']} Hz, {meta['channels']} channels; random "
        f"weights, fp32); {meta['seconds']:g} s clips (the latents keep the DiT's {meta['latent_frames']} frames, "
        f"{latent_seconds:.2f} s, as the pipeline's: the waveforms are zero-padded and the timing says "
        f"{meta['seconds']:g} s); prompts padded to {meta['text_length']} tokens; one pair per step; LoRA rank 32 on "
        "the attention and FFN projections."
    )


FAMILY = Family(
    name="audio",
    script=__file__,
    doc=__doc__,
    title="Diffusion-DPO on a text-to-audio DiT at real size, on a CPU",
    sizes=SIZES,
    real="stable-audio-open",
    build_version=BUILD_VERSION,
    build=_build,
    make_pairs=make_audio_pairs,
    plain_step=PlainStep,
    overrides=_overrides,
    model_line=_model_line,
    policy=_policy,
    memory_note="At stable-audio-open size the text encoder is T5-base's shape with a 94-entry vocabulary instead of "
    "its 32 128 (module docstring).",
)

if __name__ == "__main__":
    raise SystemExit(main(FAMILY))
