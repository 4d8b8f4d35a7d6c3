"""Train the shipped toy audio pipeline (``assets/toyworld/audio_pipeline``), a tiny ``StableAudioPipeline``, on a CPU.

    python -m mmalign.toyworld.train_audio_pipeline --out assets/toyworld/audio_pipeline --threads 1

A diffusers ``StableAudioPipeline`` of tiny parts for the toy audio world (:mod:`mmalign.toyworld.audio_world`: 1.024 s
mono clips of beeps at 4 kHz), loaded by :func:`mmalign.models.generator.load_generator` as a
:class:`~mmalign.models.stable_audio.StableAudioGenerator`:

* ``AutoencoderOobleck``: mono, 4 kHz, ``downsampling_ratios`` (4, 4, 4) (hop 64: 4096 samples <-> 64 latent frames
  of ``latent_channels`` channels), fitted to renders in stage 1 as a noise-augmented autoencoder (:func:`fit_vae`:
  waveform L1 + MSE plus an STFT log-magnitude L1); then its latents are rescaled to unit std (the encoder's mean
  rows divided, the decoder's input convolution multiplied by one scalar: Stable Audio has no latent scaling factor
  and its scheduler assumes ``sigma_data`` 1) and its posterior std fixed to the noise it was trained with;
* ``text_encoder``: a ``T5EncoderModel`` of width ``text_width`` (2 layers) on
  :func:`mmalign.models.builders.t5_tokenizer` over the world's words, ``model_max_length`` 6;
  ``StableAudioProjectionModel`` (identity text projection, seconds conditioners over [0, 2] s);
* ``StableAudioDiTModel``: 64 latent frames, ``layers`` blocks of width ``width`` (heads of 16, grouped-query
  attention), cross-attention on the projected T5 states plus the timing tokens;
* ``CosineDPMSolverMultistepScheduler`` with Stable Audio Open's settings (σ in [0.3, 500], σ_data 1, v-prediction).

Stage 2 trains the DiT and the text encoder together (EMA weights, the loop of the flow pipelines:
:func:`mmalign.toyworld.train_pipeline.train_rectified_flow`) on the generator's own v-diffusion objective
(:meth:`~mmalign.models.stable_audio.StableAudioGenerator.add_noise` / ``training_target``, ``t`` uniform as
stable-audio-tools) over latents of renders whose captions are noisy (each attribute wrong with probability
``caption_noise``; 10 % dropped to the pipeline's unconditional branch, zeros) so that the model follows prompts only
partly. Saved in fp16 safetensors (loaded back in fp32); the judge adherence
(:func:`mmalign.toyworld.audio_world.judge_audio`) of DPM-Solver++ ODE samples (:func:`~mmalign.toyworld.sampling.
evaluate_audio`, 10 steps) of the saved folder on the held-out prompts at guidance 1 and 3 is written to
``training.json`` beside it. A killed run resumes from its checkpoints (the VAE stage's and the DiT's) when rerun.

The shipped folder (this recipe's defaults, seed 0; 1.0 MB): 10.8 CPU-minutes on one thread (VAE 4.2, DiT and pool
6.5) and 18.6 minutes of wall clock on a shared 2-core Intel Xeon (AVX-512 and AVX2; load average 6-9 from other
jobs). Held-out adherence (6 prompts x 8 seeds, DPM-Solver++ ODE, 10 steps) **0.514 at guidance 1 and 0.708 at
guidance 3**; the VAE's reconstructions of renders score 0.698: it draws silence for the ``shrill`` pitch (1000 Hz)
and reproduces the other three exactly (no held-out prompt is shrill). Details: ``mmalign/toyworld/README.md``.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .audio_world import (
    SAMPLE_RATE,
    SAMPLES,
    all_audio_prompts,
    audio_words,
    corrupt_audio,
    random_audio_prompt,
    render_audio,
    split_audio_prompts,
)
from .save import folder_bytes, judge_saved, recipe_main, save_fp16, write_summary
from .train_pipeline import TokenCache, train_rectified_flow, warmup_cosine

#: guidance scales of ``training.json``'s held-out evaluation (DPM-Solver++ ODE, :data:`EVAL_STEPS` steps)
EVAL_GUIDANCE = (1.0, 3.0)
EVAL_STEPS = 10
HELDOUT = 6


@dataclass
class AudioPipelineRecipe:
    """Every knob of the shipped audio pipeline's training (the defaults made the shipped one)."""

    seed: int = 0
    vae_steps: int = 600
    vae_batch: int = 16
    vae_lr: float = 2e-3
    vae_noise: float = 0.05
    vae_width: int = 16
    latent_channels: int = 8
    pool: int = 4096
    steps: int = 3000
    batch: int = 32
    lr: float = 1e-3
    caption_noise: float = 0.25
    prompt_dropout: float = 0.1
    width: int = 64
    layers: int = 4
    text_width: int = 32
    max_sequence_length: int = 6
    ema_decay: float = 0.995
    eval_every: int = 1000
    eval_samples: int = 8
    checkpoint_every: int = 250
    threads: int = 0


def audio_tokenizer(max_sequence_length: int):
    """:func:`mmalign.models.builders.t5_tokenizer` over :func:`~mmalign.toyworld.audio_world.audio_words`."""
    from ..models.builders import t5_tokenizer

    tokenizer = t5_tokenizer(audio_words())
    tokenizer.model_max_length = max_sequence_length
    return tokenizer


def build_parts(recipe: AudioPipelineRecipe, tokenizer: Any) -> dict[str, Any]:
    """Freshly initialised VAE, text encoder, projection and DiT (seeded), and the scheduler's config."""
    from diffusers import AutoencoderOobleck, StableAudioDiTModel
    from diffusers.pipelines.stable_audio import StableAudioProjectionModel
    from transformers import T5Config, T5EncoderModel

    from ..models.builders import TINY_STABLE_AUDIO

    torch.manual_seed(recipe.seed)
    vae = AutoencoderOobleck(
        encoder_hidden_size=2 * recipe.latent_channels,
        downsampling_ratios=[4, 4, 4],
        channel_multiples=[1, 2, 4],
        decoder_channels=recipe.vae_width,
        decoder_input_channels=recipe.latent_channels,
        audio_channels=1,
        sampling_rate=SAMPLE_RATE,
    )
    text = recipe.text_width
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=text,
            d_kv=text // 4,
            d_ff=2 * text,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            dropout_rate=0.0,
        )
    )
    projection = StableAudioProjectionModel(text_encoder_dim=text, conditioning_dim=text, min_value=0, max_value=2)
    transformer = StableAudioDiTModel(
        sample_size=SAMPLES // 64,
        in_channels=recipe.latent_channels,
        num_layers=recipe.layers,
        attention_head_dim=16,
        num_attention_heads=recipe.width // 16,
        num_key_value_attention_heads=max(1, recipe.width // 32),
        out_channels=recipe.latent_channels,
        cross_attention_dim=recipe.width,
        time_proj_dim=32,
        global_states_input_dim=2 * text,
        cross_attention_input_dim=text,
    )
    scheduler = {"_class_name": "CosineDPMSolverMultistepScheduler", **TINY_STABLE_AUDIO["scheduler"]}
    return {
        "vae": vae,
        "text_encoder": text_encoder,
        "projection_model": projection,
        "transformer": transformer,
        "tokenizer": tokenizer,
        "scheduler_config": scheduler,
    }


def audio_batch(prompts: list, rng: random.Random) -> torch.Tensor:
    """Ground-truth clips of ``prompts`` as the VAE's ``[B, 1, S]`` in [-1, 1]."""
    return torch.from_numpy(np.stack([render_audio(p, rng) for p in prompts]))[:, None]


def stft_magnitude(wave: torch.Tensor) -> torch.Tensor:
    """``log(1 + |STFT|)`` of ``[B, 1, S]`` waveforms (256-point Hann frames, hop 64)."""
    spec = torch.stft(wave[:, 0], 256, 64, window=torch.hann_window(256), return_complex=True)
    return torch.log1p(spec.abs())


def fit_vae(vae: torch.nn.Module, recipe: AudioPipelineRecipe, log) -> None:
    """Fit the VAE to random clips as a noise-augmented autoencoder: the decoder reconstructs ``mean +
    vae_noise·ε`` of the encoder's posterior mean (waveform L1 + MSE, an STFT log-magnitude L1, and ``1e-4·mean²``
    to bound the latents' scale), as :func:`mmalign.toyworld.train_video_pipeline.fit_vae` fits the video VAE."""
    rng = random.Random(f"vae:{recipe.seed}")
    torch.manual_seed(recipe.seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    schedule = warmup_cosine(optimizer, recipe.vae_steps)
    vae.train()
    for step in range(recipe.vae_steps):
        wave = audio_batch([random_audio_prompt(rng) for _ in range(recipe.vae_batch)], rng)
        mean = vae.encode(wave).latent_dist.mean
        recon = vae.decode(mean + recipe.vae_noise * torch.randn_like(mean)).sample
        spectral = (stft_magnitude(recon) - stft_magnitude(wave)).abs().mean()
        loss = (recon - wave).abs().mean() + 2 * (recon - wave).pow(2).mean() + spectral + 1e-4 * mean.pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == recipe.vae_steps - 1:
            log(f"vae step {step + 1}/{recipe.vae_steps} loss {loss.item():.4f} spectral {spectral.item():.4f}")
    vae.eval()


@torch.no_grad()
def normalise_latents(vae: torch.nn.Module, recipe: AudioPipelineRecipe) -> float:
    """Rescale the VAE's latents to unit std (one scalar ``s``, measured on 256 renders): the encoder's mean rows
    (``conv2``: weight norm ``g`` and bias) divided by ``s``, the decoder's input convolution's ``g`` multiplied by
    it, so the autoencoder is unchanged; the posterior's std then fixed to ``vae_noise / s`` (the scale rows' ``g``
    0, their bias ``softplus⁻¹(vae_noise / s)``), so that ``latent_dist.sample()`` draws what the decoder was
    trained on. Returns ``s``."""
    rng = random.Random(f"scale:{recipe.seed}")
    mean = vae.encode(audio_batch([random_audio_prompt(rng) for _ in range(256)], rng)).latent_dist.mean
    scale = float(mean.std())
    c = recipe.latent_channels
    conv, first = vae.encoder.conv2, vae.decoder.conv1
    conv.weight_g[:c] /= scale
    conv.bias[:c] /= scale
    first.weight_g *= scale
    std = recipe.vae_noise / scale
    conv.weight_g[c:] = 0.0
    conv.bias[c:] = math.log(math.expm1(std))
    return scale


@torch.no_grad()
def latent_pool(vae: torch.nn.Module, size: int, seed: int) -> tuple[torch.Tensor, list]:
    """``size`` clips of random prompts as VAE latent means ``[N, C, 64]``, with their prompts."""
    rng = random.Random(f"pool:{seed}")
    prompts = [random_audio_prompt(rng) for _ in range(size)]
    latents = [vae.encode(audio_batch(prompts[i : i + 256], rng)).latent_dist.mean for i in range(0, size, 256)]
    return torch.cat(latents), prompts


@torch.no_grad()
def reconstruction_adherence(vae: torch.nn.Module, count: int = 96, seed: int = 1) -> dict[str, float]:
    """The judge of VAE reconstructions of ground-truth clips (1.0 for a perfect VAE)."""
    from .audio_world import judge_audios, mean_scores

    rng = random.Random(f"recon:{seed}")
    prompts = [random_audio_prompt(rng) for _ in range(count)]
    recon = vae.decode(vae.encode(audio_batch(prompts, rng)).latent_dist.mean).sample.clamp(-1, 1)
    return mean_scores(judge_audios(recon, prompts))


def encode(parts: dict[str, Any], ids: torch.Tensor, pad_id: int, end_seconds: float) -> dict[str, torch.Tensor]:
    """The conditions :meth:`~mmalign.models.stable_audio.StableAudioGenerator.encode_conditions` computes, with
    gradients into the text encoder: projected T5 states zeroed at the padding, then the start and end seconds
    tokens; the global states of the timing."""
    mask = ids.ne(pad_id).long()
    hidden = parts["text_encoder"](ids, attention_mask=mask).last_hidden_state
    projection = parts["projection_model"]
    text = projection(text_hidden_states=hidden).text_hidden_states * mask[..., None]
    count = len(ids)
    timing = projection(start_seconds=torch.zeros(count), end_seconds=torch.full((count,), end_seconds))
    start, end = timing.seconds_start_hidden_states, timing.seconds_end_hidden_states
    return {"encoder_hidden_states": torch.cat([text, start, end], dim=1), "global": torch.cat([start, end], dim=2)}


def generator_of(parts: dict[str, Any], modules=None):
    """A :class:`~mmalign.models.stable_audio.StableAudioGenerator` over ``parts`` (or over ``modules`` =
    [transformer, text_encoder], e.g. EMA copies; the generator freezes its text encoder)."""
    from ..models.stable_audio import StableAudioGenerator

    transformer, text_encoder = modules or [parts["transformer"], parts["text_encoder"]]
    return StableAudioGenerator(dict(parts, transformer=transformer, text_encoder=text_encoder))


def train_dit(
    parts: dict[str, Any],
    tokens: TokenCache,
    latents: torch.Tensor,
    prompts: list,
    recipe: AudioPipelineRecipe,
    log,
    evaluate=None,
    checkpoint: Path | None = None,
) -> list[dict[str, float]]:
    """The v-diffusion objective on noisy captions, in the flow pipelines' loop (EMA, exact resume). Returns the
    loss curve (mean loss per 100 steps)."""
    transformer, text_encoder = parts["transformer"], parts["text_encoder"]
    pad_id = int(tokens.tokenizer.pad_token_id)
    modules = torch.nn.ModuleList([transformer, text_encoder])
    policy = generator_of(parts)
    text_encoder.requires_grad_(True)
    end = policy.audio_end_in_s

    def batch_loss(rng: random.Random, gen: torch.Generator) -> torch.Tensor:
        index = torch.randint(0, len(prompts), (recipe.batch,), generator=gen)
        dropped = [rng.random() < recipe.prompt_dropout for _ in index.tolist()]
        captions = [corrupt_audio(prompts[i], rng, recipe.caption_noise).text for i in index.tolist()]
        conditions = encode(parts, tokens(captions), pad_id, end)
        keep = torch.tensor([0.0 if d else 1.0 for d in dropped]).view(-1, 1, 1)
        x0 = latents[index]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.rand(len(index), generator=gen)
        pred = transformer(
            policy.add_noise(x0, noise, t),
            t,
            encoder_hidden_states=conditions["encoder_hidden_states"] * keep,
            global_hidden_states=conditions["global"],
            rotary_embedding=policy.rotary_embedding(x0.shape[-1], x0.device),
            return_dict=False,
        )[0]
        return F.mse_loss(pred, policy.training_target(x0, noise, t))

    return train_rectified_flow(modules, recipe, log, batch_loss, evaluate, checkpoint)


def save_pipeline(parts: dict[str, Any], out: Path) -> None:
    """The ``StableAudioPipeline`` folder: fp16 safetensors of every model, the tokenizer, the scheduler's config
    and ``model_index.json`` (written without building the scheduler, which needs torchsde)."""
    from ..models.builders import build_stable_audio_pipeline  # noqa: F401  (the same folder layout)

    out.mkdir(parents=True, exist_ok=True)
    for name in ("transformer", "vae", "text_encoder", "projection_model"):
        save_fp16(parts[name], out / name)
    parts["tokenizer"].save_pretrained(str(out / "tokenizer"))
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(parts["scheduler_config"], indent=2) + "\n")
    index = {
        "_class_name": "StableAudioPipeline",
        "transformer": ["diffusers", "StableAudioDiTModel"],
        "vae": ["diffusers", "AutoencoderOobleck"],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "projection_model": ["stable_audio", "StableAudioProjectionModel"],
        "tokenizer": ["transformers", type(parts["tokenizer"]).__name__],
        "scheduler": ["diffusers", "CosineDPMSolverMultistepScheduler"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def train(recipe: AudioPipelineRecipe, out: Path, log=print) -> dict[str, Any]:
    """Build, train and save the pipeline folder ``out``; returns the summary written to training.json."""
    from diffusers import AutoencoderOobleck

    from .sampling import evaluate_audio, threads

    started, cpu = time.time(), time.process_time()
    _, heldout = split_audio_prompts(HELDOUT, seed=0)
    with threads(recipe.threads):
        tokenizer = audio_tokenizer(recipe.max_sequence_length)
        parts = build_parts(recipe, tokenizer)
        stage = out / ".vae-stage"
        if (stage / "config.json").is_file():
            parts["vae"] = AutoencoderOobleck.from_pretrained(str(stage)).eval()
            log(f"VAE stage reused from {stage}")
        else:
            fit_vae(parts["vae"], recipe, log)
            scale = normalise_latents(parts["vae"], recipe)
            log(f"latents rescaled by 1/{scale:.4f}")
            parts["vae"].save_pretrained(str(stage))
        vae = parts["vae"]
        vae_cpu = time.process_time() - cpu
        recon = reconstruction_adherence(vae)
        log(f"VAE reconstructions: {json.dumps({k: round(v, 3) for k, v in recon.items()})}")
        latents, prompts = latent_pool(vae, recipe.pool, recipe.seed)
        log(f"latent pool {tuple(latents.shape)}: std {float(latents.std()):.3f}, {time.time() - started:.0f} s")
        history = []

        def evaluate(ema, step):
            trial = generator_of(parts, modules=list(ema))
            for guidance in EVAL_GUIDANCE:
                scores = evaluate_audio(trial, heldout, 4, seed=1, steps=EVAL_STEPS, guidance=guidance).scores
                history.append({"step": step, "guidance": guidance, **scores})
                log(f"eval step {step} guidance {guidance}: {json.dumps({k: round(v, 3) for k, v in scores.items()})}")

        curve = train_dit(
            parts, TokenCache(tokenizer), latents, prompts, recipe, log, evaluate, checkpoint=out / ".dit-checkpoint.pt"
        )
        trained_seconds, trained_cpu = time.time() - started, time.process_time() - cpu
        save_pipeline(parts, out)
        (out / ".dit-checkpoint.pt").unlink(missing_ok=True)
        train_prompts = sorted(set(all_audio_prompts()) - set(heldout))
        groups = {"heldout": (heldout, recipe.eval_samples), "train": (train_prompts, 4)}
        judged = judge_saved(out, evaluate_audio, groups, EVAL_STEPS, EVAL_GUIDANCE)
        adherence, adherence_train = judged["heldout"], judged["train"]
    shutil.rmtree(stage, ignore_errors=True)
    size = folder_bytes(out)
    summary = write_summary(
        out,
        recipe,
        started,
        cpu,
        adherence_heldout=adherence,
        adherence_train_prompts=adherence_train,
        vae_reconstruction=recon,
        evaluation=f"judge (audio_world.judge_audio) of DPM-Solver++ ODE samples ({EVAL_STEPS} steps, "
        f"sampling.evaluate_audio) of the saved folder: heldout = split_audio_prompts({HELDOUT}, seed=0)'s held-out "
        f"prompts x {recipe.eval_samples} seeds; train = the {len(train_prompts)} training prompts x 4 seeds",
        loss_curve=curve,
        history=history,
        vae_cpu_seconds=round(vae_cpu, 1),
        training_seconds=round(trained_seconds, 1),
        training_cpu_seconds=round(trained_cpu, 1),
        folder_bytes=size,
        sample_rate=SAMPLE_RATE,
        samples=SAMPLES,
    )
    log(f"adherence (held-out): {json.dumps({k: round(v['overall'], 3) for k, v in adherence.items()})}")
    return summary


def main(argv: list[str] | None = None) -> int:
    return recipe_main(AudioPipelineRecipe, train, "assets/toyworld/audio_pipeline", __doc__.split("\n\n")[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
