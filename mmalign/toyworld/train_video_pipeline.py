"""Train the shipped toy video pipeline (``assets/toyworld/video_pipeline``), a tiny ``WanPipeline``, on a CPU.

    python -m mmalign.toyworld.train_video_pipeline --out assets/toyworld/video_pipeline --threads 1

A diffusers ``WanPipeline`` of tiny parts for the flow-matching trainers on the toy video world
(:mod:`mmalign.toyworld.video_world`: 5-frame 32 px clips of moving shapes), loaded by
:func:`mmalign.models.generator.load_generator` as a :class:`~mmalign.models.wan.WanGenerator`:

* ``AutoencoderKLWan``: Wan's causal 3D VAE at ``base_dim`` 8, ``z_dim`` 8, ``dim_mult`` (1, 2, 2), temporal
  downsampling in both stages: 32 px x 5 frames <-> 8 channels x 2 latent frames x 8 x 8 (``scale_factor_spatial``
  4, ``scale_factor_temporal`` 4, as Wan's 4x temporal compression keeps ``(frames − 1) % 4 == 0``), fitted to
  renders in stage 1 as a noise-augmented autoencoder (:func:`train_vae`: L1 + MSE; its posterior std then fixed to
  the noise it was trained with; the decoder's output clamp passing gradients while it trains, without which it
  stalls on white clips); ``latents_mean`` / ``latents_std`` are set per channel to the statistics of the latent
  means of renders, so that the latents the transformer sees have mean 0 and std 1;
* ``text_encoder``: a ``UMT5EncoderModel`` of width 32 (2 layers) on :func:`mmalign.models.builders.t5_tokenizer`
  over the world's words (every prompt word one token), ``max_sequence_length`` 8 (recorded in
  ``mmalign_generator.json`` with ``num_frames`` 5);
* ``WanTransformer3DModel``: patch (1, 2, 2) (2 x 4 x 4 = 32 tokens), ``layers`` blocks of width ``width`` (heads
  of 16, Wan's 3-axis RoPE), ``rms_norm_across_heads`` query/key norm, cross-attention on the UMT5 states;
* ``FlowMatchEulerDiscreteScheduler`` with ``shift`` 1 (as the image flow pipeline,
  :mod:`mmalign.toyworld.train_flow_pipeline`, and for the same reason: tiny latents have no redundancy).

Stage 2 is the image flow pipeline's: rectified flow ``x_σ = (1 − σ)·x0 + σ·ε``, target ``ε − x0``, σ logit-normal,
the transformer and the text encoder learning together with EMA weights, on latents of renders whose captions are
noisy (each attribute wrong with probability ``caption_noise``; 10 % dropped, encoded ``""`` as the generator's
unconditional branch) so that the model follows prompts only partly. Saved in fp16 safetensors (loaded back in
fp32); the judge adherence (:func:`mmalign.toyworld.video_world.judge_clip`) of Euler-ODE samples of the saved
folder on the held-out prompts (:func:`~mmalign.toyworld.video_world.split_video_prompts`) at guidance 1 and 3 is
written to ``training.json`` beside it. A killed run resumes from its checkpoints (the VAE stage's and the
transformer's) when rerun.

The shipped folder (this recipe's defaults, seed 0; 1.5 MB): 16.8 CPU-minutes on one thread (VAE 6.7, transformer
and pool 9.9, evaluation the rest; 28 minutes of wall clock on a busy 2-core machine). Held-out adherence (32
prompts x 8 seeds, Euler 10 steps) **0.262 at guidance 1 and 0.339 at guidance 3** (colour 0.20 / 0.33, shape 0.12 /
0.09, count 0.37 / 0.36, direction 0.36 / 0.58; 32 training prompts: 0.299 / 0.431), below the 0.4-0.6 the image
pipelines reach. The VAE limits it: its own reconstructions of ground-truth clips score only 0.676 (colour 0.68,
shape 0.29, count 0.73, direction 1.0); a wider VAE (``--vae-base-dim 16 --vae-dim-mult 1,1,2``) reconstructed no
better (0.637 after the same 800 steps). The transformer was still learning (held-out adherence at guidance 3:
0.18 / 0.24 / 0.31 / 0.33 at 1500 / 3000 / 4500 / 6000 steps, 2 seeds a prompt).
"""

from __future__ import annotations

import json
import math
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .save import folder_bytes, judge_saved, recipe_main, save_fp16, write_summary
from .train_pipeline import TokenCache, rectified_flow_loss, train_rectified_flow, warmup_cosine
from .video_world import (
    DIRECTIONS,
    FRAMES,
    all_video_prompts,
    corrupt_video,
    random_video_prompt,
    render_clip,
    split_video_prompts,
)
from .world import CANVAS, COLORS, COUNT_WORDS, SHAPES

#: guidance scales of ``training.json``'s held-out evaluation (Euler, :data:`EVAL_STEPS` steps)
EVAL_GUIDANCE = (1.0, 3.0)
EVAL_STEPS = 10


@dataclass
class VideoPipelineRecipe:
    """Every knob of the shipped video pipeline's training (the defaults made the shipped one)."""

    seed: int = 0
    vae_steps: int = 800
    vae_batch: int = 16
    vae_lr: float = 2e-3
    vae_noise: float = 0.1
    vae_base_dim: int = 8
    vae_dim_mult: str = "1,2,2"
    z_dim: int = 8
    pool: int = 8192
    steps: int = 6000
    batch: int = 32
    lr: float = 1e-3
    caption_noise: float = 0.25
    prompt_dropout: float = 0.1
    logit_mean: float = 0.0
    logit_std: float = 1.0
    width: int = 96
    layers: int = 4
    text_width: int = 32
    max_sequence_length: int = 8
    ema_decay: float = 0.995
    eval_every: int = 1500
    eval_samples: int = 8
    checkpoint_every: int = 250
    threads: int = 0


def video_words() -> tuple[str, ...]:
    """Every word of every toy video prompt (counts, colours, shapes and their plurals, "moving", directions)."""
    return tuple(sorted({*COUNT_WORDS.values(), *COLORS, *SHAPES, *(s + "s" for s in SHAPES), "moving", *DIRECTIONS}))


def video_tokenizer(max_sequence_length: int):
    """:func:`mmalign.models.builders.t5_tokenizer` over :func:`video_words`, ``model_max_length`` cut."""
    from ..models.builders import t5_tokenizer

    tokenizer = t5_tokenizer(video_words())
    tokenizer.model_max_length = max_sequence_length
    return tokenizer


def build_parts(recipe: VideoPipelineRecipe, tokenizer: Any) -> dict[str, Any]:
    """Freshly initialised VAE, text encoder, transformer and scheduler (seeded)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(recipe.seed)
    vae = AutoencoderKLWan(
        base_dim=recipe.vae_base_dim,
        z_dim=recipe.z_dim,
        dim_mult=[int(m) for m in recipe.vae_dim_mult.split(",")],
        num_res_blocks=1,
        temperal_downsample=[True, True],
        scale_factor_spatial=4,
        scale_factor_temporal=4,
        latents_mean=[0.0] * recipe.z_dim,
        latents_std=[1.0] * recipe.z_dim,
    )
    width = recipe.text_width
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=width,
            d_kv=width // 4,
            d_ff=2 * width,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            dropout_rate=0.0,
        )
    )
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=recipe.width // 16,
        attention_head_dim=16,
        in_channels=recipe.z_dim,
        out_channels=recipe.z_dim,
        text_dim=width,
        freq_dim=64,
        ffn_dim=2 * recipe.width,
        num_layers=recipe.layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    return {"vae": vae, "text_encoder": text_encoder, "transformer": transformer, "scheduler": scheduler}


def clip_batch(prompts: list, rng: random.Random) -> torch.Tensor:
    """Ground-truth clips of ``prompts`` as the VAE's ``[B, 3, T, H, W]`` in [-1, 1]."""
    array = np.stack([render_clip(p, rng) for p in prompts])
    return torch.from_numpy(array).permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)


class _PassingClamp:
    """The ``torch`` module as ``autoencoder_kl_wan`` sees it while the VAE trains, with ``clamp`` passing gradients
    (straight through): ``AutoencoderKLWan.decode`` clamps its output to [-1, 1], which stops the gradient at every
    pixel beyond that range; a decoder that starts out above 1 everywhere (white) then never learns the coloured
    pixels under it."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def clamp(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x + (torch.clamp(x, *args, **kwargs) - x).detach()


@contextmanager
def passing_clamp():
    """Within the block, the Wan VAE's output clamp passes gradients (:class:`_PassingClamp`)."""
    from diffusers.models.autoencoders import autoencoder_kl_wan

    original = autoencoder_kl_wan.torch
    autoencoder_kl_wan.torch = _PassingClamp()
    try:
        yield
    finally:
        autoencoder_kl_wan.torch = original


def train_vae(vae: torch.nn.Module, recipe: VideoPipelineRecipe, log) -> None:
    """:func:`fit_vae` with the VAE's output clamp passing gradients (:func:`passing_clamp`)."""
    with passing_clamp():
        fit_vae(vae, recipe, log)


def fit_vae(vae: torch.nn.Module, recipe: VideoPipelineRecipe, log) -> None:
    """Fit the VAE to random clips as a noise-augmented autoencoder: the decoder reconstructs ``mean + vae_noise·ε``
    of the encoder's posterior mean (L1 + 2·MSE, plus ``1e-4·mean²`` to bound the latents' scale); afterwards the
    posterior's log-variance is fixed to that noise (``quant_conv``'s log-variance rows: weights 0, bias
    ``2·ln(vae_noise)``), so that ``latent_dist.sample()`` draws what the decoder was trained on. Sampling the
    posterior as a VAE from the start collapses it: at initialisation its std is 1 and its mean ~0.02, the decoder
    learns to ignore the latent and draws the average clip (all white), and nothing pulls it out again."""
    rng = random.Random(f"vae:{recipe.seed}")
    torch.manual_seed(recipe.seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    schedule = warmup_cosine(optimizer, recipe.vae_steps)
    vae.train()
    for step in range(recipe.vae_steps):
        pixels = clip_batch([random_video_prompt(rng) for _ in range(recipe.vae_batch)], rng)
        mean = vae.encode(pixels).latent_dist.mean
        recon = vae.decode(mean + recipe.vae_noise * torch.randn_like(mean)).sample
        loss = (recon - pixels).abs().mean() + 2 * (recon - pixels).pow(2).mean() + 1e-4 * mean.pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == recipe.vae_steps - 1:
            spread = float(mean.detach().std())
            log(f"vae step {step + 1}/{recipe.vae_steps} loss {loss.item():.4f} latent std {spread:.3f}")
    vae.eval()
    with torch.no_grad():
        z = recipe.z_dim
        vae.quant_conv.weight[z:] = 0.0
        vae.quant_conv.bias[z:] = 2 * math.log(recipe.vae_noise)


@torch.no_grad()
def latent_pool(vae: torch.nn.Module, size: int, seed: int) -> tuple[torch.Tensor, list]:
    """``size`` clips of random prompts as VAE latent means ``[N, C, 2, 8, 8]`` (unnormalised), with their prompts."""
    rng = random.Random(f"pool:{seed}")
    prompts = [random_video_prompt(rng) for _ in range(size)]
    latents = [vae.encode(clip_batch(prompts[i : i + 128], rng)).latent_dist.mean for i in range(0, size, 128)]
    return torch.cat(latents), prompts


@torch.no_grad()
def reconstruction_adherence(vae: torch.nn.Module, count: int = 128, seed: int = 1) -> dict[str, float]:
    """The judge of VAE reconstructions of ground-truth clips (1.0 for a perfect VAE)."""
    from .video_world import judge_clips, mean_scores

    rng = random.Random(f"recon:{seed}")
    prompts = [random_video_prompt(rng) for _ in range(count)]
    recon = vae.decode(vae.encode(clip_batch(prompts, rng)).latent_dist.mean).sample
    clips = (recon / 2 + 0.5).clamp(0, 1).transpose(1, 2)
    return mean_scores(judge_clips(clips, prompts))


def encode(text_encoder: torch.nn.Module, ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """``prompt_embeds`` of token ids with gradients, as :meth:`~mmalign.models.wan.WanGenerator.encode_conditions`
    computes them: UMT5's last hidden state under the attention mask, zeros after the real tokens."""
    mask = ids.ne(pad_id).long()
    hidden = text_encoder(ids, attention_mask=mask).last_hidden_state
    return hidden * mask[..., None]


def sample_sigmas(count: int, recipe: VideoPipelineRecipe, gen: torch.Generator) -> torch.Tensor:
    """σ ~ logit-normal(``logit_mean``, ``logit_std``) (shift 1)."""
    return torch.sigmoid(recipe.logit_mean + recipe.logit_std * torch.randn(count, generator=gen))


def train_flow(
    parts: dict[str, Any],
    tokens: TokenCache,
    latents: torch.Tensor,
    prompts: list,
    recipe: VideoPipelineRecipe,
    log,
    evaluate=None,
    checkpoint: Path | None = None,
) -> list[dict[str, float]]:
    """Rectified flow on noisy captions; the transformer and the text encoder keep EMA weights (copied in at the
    end). With ``checkpoint``, the whole state is written there every ``checkpoint_every`` steps and a run resumes
    from it exactly. Returns the loss curve (mean loss per 100 steps)."""
    transformer, text_encoder = parts["transformer"], parts["text_encoder"]
    pad_id = int(tokens.tokenizer.pad_token_id)
    modules = torch.nn.ModuleList([transformer, text_encoder])

    def batch_loss(rng: random.Random, gen: torch.Generator) -> torch.Tensor:
        index = torch.randint(0, len(prompts), (recipe.batch,), generator=gen)
        captions = [
            "" if rng.random() < recipe.prompt_dropout else corrupt_video(prompts[i], rng, recipe.caption_noise).text
            for i in index.tolist()
        ]
        x0 = latents[index]
        noise = torch.randn(x0.shape, generator=gen)
        sigma = sample_sigmas(len(index), recipe, gen)
        s = sigma.view(-1, 1, 1, 1, 1)
        pred = transformer(
            hidden_states=(1 - s) * x0 + s * noise,
            timestep=sigma * 1000,
            encoder_hidden_states=encode(text_encoder, tokens(captions), pad_id),
            return_dict=False,
        )[0]
        return rectified_flow_loss(pred, noise, x0)

    return train_rectified_flow(modules, recipe, log, batch_loss, evaluate, checkpoint)


def generator_of(parts: dict[str, Any], tokenizer: Any, recipe: VideoPipelineRecipe, modules=None):
    """A :class:`~mmalign.models.wan.WanGenerator` over ``parts`` (or over ``modules`` = [transformer,
    text_encoder], e.g. EMA copies; the generator freezes its text encoder)."""
    from ..models.wan import WanGenerator

    transformer, text_encoder = modules or [parts["transformer"], parts["text_encoder"]]
    components = dict(parts, transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer)
    return WanGenerator(components, max_sequence_length=recipe.max_sequence_length, num_frames=FRAMES)


def train(recipe: VideoPipelineRecipe, out: Path, log=print) -> dict[str, Any]:
    """Build, train and save the pipeline folder ``out``; returns the summary written to training.json."""
    from diffusers import AutoencoderKLWan, WanPipeline

    from ..models.sd3 import write_generator_config
    from .sampling import evaluate_video, threads

    started, cpu = time.time(), time.process_time()
    _, heldout = split_video_prompts(32, seed=0)
    with threads(recipe.threads):
        tokenizer = video_tokenizer(recipe.max_sequence_length)
        parts = build_parts(recipe, tokenizer)
        stage = out / ".vae-stage"
        if (stage / "config.json").is_file():
            parts["vae"] = AutoencoderKLWan.from_pretrained(str(stage)).eval()
            log(f"VAE stage reused from {stage}")
        else:
            train_vae(parts["vae"], recipe, log)
            parts["vae"].save_pretrained(str(stage))
        vae = parts["vae"]
        vae_cpu = time.process_time() - cpu
        recon = reconstruction_adherence(vae)
        log(f"VAE reconstructions: {json.dumps({k: round(v, 3) for k, v in recon.items()})}")
        raw, prompts = latent_pool(vae, recipe.pool, recipe.seed)
        dims = (0, 2, 3, 4)
        mean, std = raw.mean(dim=dims), raw.std(dim=dims)
        vae.register_to_config(
            latents_mean=[round(float(m), 5) for m in mean], latents_std=[round(float(s), 5) for s in std]
        )
        view = (1, -1, 1, 1, 1)
        latents = (raw - torch.tensor(vae.config.latents_mean).view(view)) / torch.tensor(vae.config.latents_std).view(
            view
        )
        log(f"latent pool {tuple(latents.shape)}: std {float(latents.std()):.3f}, {time.time() - started:.0f} s")
        history = []

        def evaluate(ema, step):
            trial = generator_of(parts, tokenizer, recipe, modules=list(ema))
            for guidance in EVAL_GUIDANCE:
                scores = evaluate_video(trial, heldout, 2, seed=1, steps=EVAL_STEPS, guidance=guidance).scores
                history.append({"step": step, "guidance": guidance, **scores})
                log(f"eval step {step} guidance {guidance}: {json.dumps({k: round(v, 3) for k, v in scores.items()})}")

        curve = train_flow(
            parts,
            TokenCache(tokenizer),
            latents,
            prompts,
            recipe,
            log,
            evaluate,
            checkpoint=out / ".flow-checkpoint.pt",
        )
        trained_seconds, trained_cpu = time.time() - started, time.process_time() - cpu
        pipe = WanPipeline(
            tokenizer=tokenizer,
            text_encoder=parts["text_encoder"],
            vae=vae,
            scheduler=parts["scheduler"],
            transformer=parts["transformer"],
        )
        save_fp16(pipe, out)
        write_generator_config(out, max_sequence_length=recipe.max_sequence_length, num_frames=FRAMES)
        (out / ".flow-checkpoint.pt").unlink(missing_ok=True)
        train_prompts = sorted(set(all_video_prompts()) - set(heldout))[:32]
        groups = {"heldout": (heldout, recipe.eval_samples), "train": (train_prompts, 2)}
        judged = judge_saved(out, evaluate_video, groups, EVAL_STEPS, EVAL_GUIDANCE)
        adherence, adherence_train = judged["heldout"], judged["train"]
    import shutil

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
        evaluation=f"judge (video_world.judge_clip) of Euler-ODE samples ({EVAL_STEPS} steps, "
        f"sampling.evaluate_video) of the saved folder: heldout = split_video_prompts(32, seed=0)'s 32 held-out "
        f"prompts x {recipe.eval_samples} seeds; train = the first 32 training prompts x 2 seeds",
        loss_curve=curve,
        history=history,
        vae_cpu_seconds=round(vae_cpu, 1),
        training_seconds=round(trained_seconds, 1),
        training_cpu_seconds=round(trained_cpu, 1),
        folder_bytes=size,
        canvas=CANVAS,
        frames=FRAMES,
    )
    log(f"adherence (held-out): {json.dumps({k: round(v['overall'], 3) for k, v in adherence.items()})}")
    return summary


def main(argv: list[str] | None = None) -> int:
    return recipe_main(VideoPipelineRecipe, train, "assets/toyworld/video_pipeline", __doc__.split("\n\n")[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
