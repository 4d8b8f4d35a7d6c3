"""Train the shipped toyworld text-to-image pipeline (``assets/toyworld/pipeline``) from nothing, on a CPU.

    python -m mmalign.toyworld.train_pipeline --out assets/toyworld/pipeline --threads 1   # seeded; ~40 min

A diffusers ``StableDiffusionPipeline`` of tiny parts: a VAE (32 px RGB <-> 8 x 8 x 8 latents), a 2-layer
CLIP text encoder of width 32 on the real CLIP tokenizer (16 tokens), a three-level UNet with cross-attention
and an attention-pooled text embedding added to the time embedding, and a DDIM scheduler. Stages:

1. the VAE learns to reconstruct ground-truth renders (L1 + MSE, a small KL term);
2. the UNet and the text encoder learn epsilon-prediction (min-SNR weighting; ``--prediction v_prediction
   --zero-snr true`` trains v-prediction on a zero-terminal-SNR schedule instead) on the VAE latents of renders
   whose captions are noisy: each attribute of the caption is replaced by a wrong value with probability
   ``caption_noise`` (like web alt-text), and 10 % of captions are dropped for classifier-free guidance. Trained
   long enough to draw clean objects and to know the attributes, the model still hedges as its captions taught
   it: sampled without guidance it follows prompts only partly, which leaves room for preference training
   (guidance also removes much of the hedging);
3. the parts are saved as one pipeline folder, in fp16 safetensors (loaded back in fp32), and the judge
   adherence of the result on every prompt is written to ``training.json`` beside it.

The defaults are the shipped pipeline's recipe (its ``training.json``: 9000 UNet steps, caption noise 0.25,
one thread; its VAE came from an earlier run of the same VAE stage, ``vae_from``, which this seeded stage
reproduces: scaling factor 1.2946 both times). A killed run resumes from its checkpoint when rerun.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .render import render
from .save import recipe_main, save_fp16, write_summary
from .world import all_prompts, corrupt, random_prompt

LATENT_CHANNELS = 8
MAX_TOKENS = 16


@dataclass
class PipelineRecipe:
    """Every knob of the shipped pipeline's training (the defaults made the shipped one)."""

    seed: int = 0
    vae_steps: int = 600
    vae_batch: int = 32
    vae_lr: float = 2e-3
    pool: int = 16384
    unet_steps: int = 9000
    unet_batch: int = 32
    unet_lr: float = 2e-3
    caption_noise: float = 0.25
    prompt_dropout: float = 0.1
    min_snr: float = 5.0
    ema_decay: float = 0.995
    global_text: bool = True
    film: bool = True
    prediction: str = "epsilon"
    zero_snr: bool = False
    vae_from: str = ""
    eval_every: int = 0
    checkpoint_every: int = 250
    threads: int = 0


def build_parts(recipe: PipelineRecipe) -> dict[str, Any]:
    """Freshly initialised VAE, text encoder, UNet and scheduler (seeded). With ``global_text`` the UNet also
    gets an attention-pooled text embedding added to its time embedding (diffusers' ``addition_embed_type=
    "text"``), with ``film`` applied as scale and shift in every ResNet block: global attributes (colour,
    shape, count) are learnt much faster than through cross-attention alone."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..models.builders import clip_text_config, sd_scheduler_config

    torch.manual_seed(recipe.seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=LATENT_CHANNELS,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=8,
        sample_size=32,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(**clip_text_config(32, 64, 2, 2, max_position_embeddings=MAX_TOKENS, projection_dim=32))
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=(4, 4, 4),
        cross_attention_dim=32,
        addition_embed_type="text" if recipe.global_text else None,
        addition_embed_type_num_heads=4,
        resnet_time_scale_shift="scale_shift" if recipe.film else "default",
    )
    scheduler = DDIMScheduler(
        **sd_scheduler_config(recipe.prediction),
        set_alpha_to_one=False,
        rescale_betas_zero_snr=recipe.zero_snr,
        timestep_spacing="trailing" if recipe.zero_snr else "leading",
    )
    return {"vae": vae, "text_encoder": text_encoder, "unet": unet, "scheduler": scheduler}


def write_tokenizer(folder: Path) -> Path:
    """The real CLIP tokenizer files, with ``model_max_length`` cut to :data:`MAX_TOKENS`."""
    from ..tokenizers import write_clip_tokenizer

    write_clip_tokenizer(folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["model_max_length"] = MAX_TOKENS
    config_path.write_text(json.dumps(config, indent=2))
    return folder


def warmup_cosine(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over the first 5 % of ``steps``, then a cosine decay to 0."""
    warmup = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + float(np.cos(np.pi * min(1.0, s / steps))))
    )


def step_with_ema(loss, params, optimizer, schedule, ema: torch.nn.Module, modules: torch.nn.Module, decay: float):
    """One optimizer step of the toyworld training scripts: backward, gradients clipped to 1, the step and the lr
    schedule's, then ``ema ← decay·ema + (1 − decay)·modules``."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    schedule.step()
    with torch.no_grad():
        for e, p in zip(ema.parameters(), modules.parameters()):
            e.lerp_(p, 1 - decay)


def render_batch(prompts: list, rng: random.Random, draw: Callable[..., np.ndarray] = render) -> torch.Tensor:
    """Ground-truth renders (``draw(prompt, rng)``: uint8 ``[H, W, 3]``; the image world's :func:`render` by
    default) of ``prompts`` as ``[B, 3, H, W]`` in [-1, 1]."""
    array = np.stack([draw(p, rng) for p in prompts])
    return torch.from_numpy(array).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def train_vae(
    vae: torch.nn.Module,
    recipe: Any,
    log,
    draw_prompt: Callable[[random.Random], Any] = random_prompt,
    draw: Callable[..., np.ndarray] = render,
) -> None:
    """Fit the VAE to renders of random prompts (the image world's by default; ``recipe``: ``seed``,
    ``vae_steps``, ``vae_batch``, ``vae_lr``); set its ``scaling_factor`` to 1 / std of the latent means."""
    rng = random.Random(f"vae:{recipe.seed}")
    torch.manual_seed(recipe.seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    schedule = warmup_cosine(optimizer, recipe.vae_steps)
    vae.train()
    for step in range(recipe.vae_steps):
        pixels = render_batch([draw_prompt(rng) for _ in range(recipe.vae_batch)], rng, draw)
        posterior = vae.encode(pixels).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = (recon - pixels).abs().mean() + 2 * (recon - pixels).pow(2).mean() + 1e-5 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == recipe.vae_steps - 1:
            log(f"vae step {step + 1}/{recipe.vae_steps} loss {loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        pixels = render_batch([draw_prompt(rng) for _ in range(512)], rng, draw)
        std = float(vae.encode(pixels).latent_dist.mean.std())
    vae.register_to_config(scaling_factor=1.0 / std)


@torch.no_grad()
def latent_pool(
    vae: torch.nn.Module,
    size: int,
    seed: int,
    draw_prompt: Callable[[random.Random], Any] = random_prompt,
    draw: Callable[..., np.ndarray] = render,
) -> tuple[torch.Tensor, list]:
    """``size`` renders of random prompts (the image world's by default) as scaled VAE latent means, with their
    (true) prompts."""
    rng, prompts = _pool_prompts(size, seed, draw_prompt)
    latents = []
    for start in range(0, size, 256):
        pixels = render_batch(prompts[start : start + 256], rng, draw)
        latents.append(vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor)
    return torch.cat(latents), prompts


def _pool_prompts(size: int, seed: int, draw_prompt: Callable[[random.Random], Any]) -> tuple[random.Random, list]:
    """The pool's prompts and the generator, drawn that far, that its renders then draw from (one per prompt)."""
    rng = random.Random(f"pool:{seed}")
    return rng, [draw_prompt(rng) for _ in range(size)]


def pool_masks(
    size: int, seed: int, draw_prompt: Callable[[random.Random], Any], mask: Callable[..., np.ndarray]
) -> torch.Tensor:
    """``bool [size, H, W]``: ``mask(prompt, rng)`` of every render of :func:`latent_pool` (same size and seed; the
    same draws, so each mask lies over its render: e.g. the multi-view dot's pixels)."""
    rng, prompts = _pool_prompts(size, seed, draw_prompt)
    return torch.from_numpy(np.stack([mask(p, rng) for p in prompts]))


class TokenCache:
    """Token ids per caption string (a handful of distinct captions, tokenised once)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, texts: list[str]) -> torch.Tensor:
        for text in texts:
            if text not in self.cache:
                self.cache[text] = self.tokenizer(
                    text, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True
                ).input_ids
        return torch.tensor([self.cache[t] for t in texts])


def save_training_state(path: Path, stateful: dict[str, Any], rng: Any, gen: torch.Generator, **extra: Any) -> None:
    """An exact-resume checkpoint, written atomically: the ``state_dict`` of each of ``stateful`` (modules, EMA,
    optimizer, schedule), both random streams, and ``extra`` (the step, a loss curve)."""
    state = {name: obj.state_dict() for name, obj in stateful.items()}
    state.update(rng=rng.getstate(), gen=gen.get_state(), **extra)
    torch.save(state, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)


def load_training_state(path: Path, stateful: dict[str, Any], rng: Any, gen: torch.Generator) -> dict[str, Any]:
    """Restore what :func:`save_training_state` wrote into ``stateful``, ``rng`` and ``gen``; returns the whole
    state (for its step and extras)."""
    state = torch.load(path, weights_only=True)
    for name, obj in stateful.items():
        obj.load_state_dict(state[name])
    rng.setstate(_tuples(state["rng"]))
    gen.set_state(state["gen"])
    return state


def adopt_ema(modules: torch.nn.Module, ema: torch.nn.Module) -> None:
    """The trained modules take their EMA's weights (what is shipped), in eval mode."""
    with torch.no_grad():
        for p, e in zip(modules.parameters(), ema.parameters()):
            p.copy_(e)
    modules.eval()


def train_unet(
    parts: dict[str, Any],
    tokens: TokenCache,
    recipe: PipelineRecipe,
    log,
    evaluate=None,
    checkpoint: Path | None = None,
) -> None:
    """Epsilon-prediction with min-SNR weighting on noisy captions; the UNet and text encoder keep EMA weights.
    With ``checkpoint``, the whole state (weights, EMA, optimizer, schedule, random streams) is written there every
    ``checkpoint_every`` steps and a run resumes from it exactly."""
    unet, text_encoder, scheduler = parts["unet"], parts["text_encoder"], parts["scheduler"]
    latents, prompts = latent_pool(parts["vae"], recipe.pool, recipe.seed)
    rng = random.Random(f"unet:{recipe.seed}")
    gen = torch.Generator().manual_seed(recipe.seed)
    modules = torch.nn.ModuleList([unet, text_encoder])
    ema = copy.deepcopy(modules).requires_grad_(False)
    params = [p for p in modules.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.unet_lr, weight_decay=0.0)
    schedule = warmup_cosine(optimizer, recipe.unet_steps)
    alphas = scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    # epsilon: min-SNR-gamma weighting (Hang et al. 2023); v-prediction: the plain v loss (x0 loss weighted by
    # SNR + 1), which also trains the zero-SNR step
    weights = torch.clamp(snr, max=recipe.min_snr) / snr if recipe.prediction == "epsilon" else torch.ones_like(snr)
    stateful = {"modules": modules, "ema": ema, "optimizer": optimizer, "schedule": schedule}
    start = 0
    if checkpoint is not None and checkpoint.is_file():
        state = load_training_state(checkpoint, stateful, rng, gen)
        start = int(state["step"])
        log(f"resumed from {checkpoint} at step {start}")
    modules.train()
    for step in range(start, recipe.unet_steps):
        index = torch.randint(0, len(prompts), (recipe.unet_batch,), generator=gen)
        captions = [
            "" if rng.random() < recipe.prompt_dropout else corrupt(prompts[i], rng, recipe.caption_noise).text
            for i in index.tolist()
        ]
        x0 = latents[index]
        noise = torch.randn(x0.shape, generator=gen)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(index),), generator=gen)
        noisy = scheduler.add_noise(x0, noise, timesteps)
        hidden = text_encoder(tokens(captions))[0]
        pred = unet(noisy, timesteps, encoder_hidden_states=hidden).sample
        target = noise if recipe.prediction == "epsilon" else scheduler.get_velocity(x0, noise, timesteps)
        loss = (F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3)) * weights[timesteps]).mean()
        step_with_ema(loss, params, optimizer, schedule, ema, modules, min(recipe.ema_decay, (step + 1) / (step + 10)))
        if step % 100 == 0 or step == recipe.unet_steps - 1:
            log(f"unet step {step + 1}/{recipe.unet_steps} loss {loss.item():.4f} lr {schedule.get_last_lr()[0]:.2e}")
        if evaluate is not None and recipe.eval_every and (step + 1) % recipe.eval_every == 0:
            evaluate(ema, step + 1)
        if checkpoint is not None and (step + 1) % recipe.checkpoint_every == 0 and step + 1 < recipe.unet_steps:
            save_training_state(checkpoint, stateful, rng, gen, step=step + 1)
    adopt_ema(modules, ema)


def rectified_flow_loss(
    pred: torch.Tensor, noise: torch.Tensor, x0: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """The velocity loss of :func:`train_rectified_flow`'s batches, mean((v̂ − (ε − x0))²); with ``weights``
    (``[B, 1, h, w]``, broadcast over channels) each latent cell's squared error times its weight."""
    if weights is None:
        return F.mse_loss(pred, noise - x0)
    return (weights * (pred - (noise - x0)).square()).mean()


def train_rectified_flow(
    modules: torch.nn.ModuleList,
    recipe: Any,
    log,
    batch_loss,
    evaluate=None,
    checkpoint: Path | None = None,
) -> list[dict[str, float]]:
    """The loop the flow pipelines' scripts share (:mod:`mmalign.toyworld.train_flow_pipeline`,
    :mod:`mmalign.toyworld.train_video_pipeline`): ``batch_loss(rng, gen)`` draws a batch from the loop's seeded
    Python and torch generators and returns its rectified-flow loss; AdamW (no weight decay) with
    :func:`warmup_cosine` over ``recipe.steps``, gradients clipped to 1, EMA weights (decay ramping up to
    ``recipe.ema_decay``; copied in at the end), the mean loss per 100 steps, ``evaluate(ema, step)`` every
    ``recipe.eval_every`` steps. With ``checkpoint``, the whole state is written there every
    ``recipe.checkpoint_every`` steps and a run resumes from it exactly. Returns the loss curve."""
    rng = random.Random(f"flow:{recipe.seed}")
    gen = torch.Generator().manual_seed(recipe.seed)
    ema = copy.deepcopy(modules).requires_grad_(False)
    params = [p for p in modules.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    schedule = warmup_cosine(optimizer, recipe.steps)
    stateful = {"modules": modules, "ema": ema, "optimizer": optimizer, "schedule": schedule}
    start, curve, window = 0, [], []
    if checkpoint is not None and checkpoint.is_file():
        state = load_training_state(checkpoint, stateful, rng, gen)
        start, curve = int(state["step"]), list(state["curve"])
        log(f"resumed from {checkpoint} at step {start}")
    modules.train()
    for step in range(start, recipe.steps):
        loss = batch_loss(rng, gen)
        step_with_ema(loss, params, optimizer, schedule, ema, modules, min(recipe.ema_decay, (step + 1) / (step + 10)))
        window.append(loss.item())
        if (step + 1) % 100 == 0 or step == recipe.steps - 1:
            curve.append({"step": step + 1, "loss": round(sum(window) / len(window), 4)})
            window = []
            log(f"flow step {step + 1}/{recipe.steps} loss {curve[-1]['loss']:.4f} lr {schedule.get_last_lr()[0]:.2e}")
        if evaluate is not None and recipe.eval_every and (step + 1) % recipe.eval_every == 0:
            evaluate(ema, step + 1)
            modules.train()
        if checkpoint is not None and (step + 1) % recipe.checkpoint_every == 0 and step + 1 < recipe.steps:
            save_training_state(checkpoint, stateful, rng, gen, step=step + 1, curve=curve)
    adopt_ema(modules, ema)
    return curve


def _tuples(value: Any) -> Any:
    """``random.Random`` state read back from a checkpoint (lists -> the tuples ``setstate`` wants)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def assemble(parts: dict[str, Any], tokenizer: Any):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        tokenizer=tokenizer,
        unet=parts["unet"],
        scheduler=parts["scheduler"],
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def train(recipe: PipelineRecipe, out: Path, log=print) -> dict[str, Any]:
    """Run every stage and write the pipeline folder to ``out``; returns the summary written to training.json."""
    from transformers import CLIPTokenizer

    from .sampling import evaluate as judge_pipeline
    from .sampling import threads

    started, cpu = time.time(), time.process_time()
    with threads(recipe.threads):
        parts = build_parts(recipe)
        tokenizer_dir = write_tokenizer(out / "tokenizer")
        tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
        from diffusers import AutoencoderKL

        stage = out / ".vae-stage"  # the trained VAE, kept until the run completes (a killed run resumes)
        if recipe.vae_from:
            parts["vae"] = AutoencoderKL.from_pretrained(recipe.vae_from, subfolder="vae", dtype=torch.float32)
        elif (stage / "config.json").is_file():
            parts["vae"] = AutoencoderKL.from_pretrained(str(stage), dtype=torch.float32)
            log(f"resumed the trained VAE from {stage}")
        else:
            train_vae(parts["vae"], recipe, log)
            parts["vae"].save_pretrained(str(stage))
        log(f"vae done: scaling_factor {parts['vae'].config.scaling_factor:.4f}, {time.time() - started:.0f} s")
        history = []

        def evaluate(ema, step):
            trial = assemble(dict(parts, unet=ema[0], text_encoder=ema[1]), tokenizer)
            for guidance in (1.0, 1.5, 3.0):
                scores = judge_pipeline(trial, all_prompts(), 1, seed=1, guidance=guidance).scores
                history.append({"step": step, "guidance": guidance, **scores})
                log(f"eval step {step} guidance {guidance}: {json.dumps({k: round(v, 3) for k, v in scores.items()})}")

        train_unet(parts, TokenCache(tokenizer), recipe, log, evaluate, checkpoint=out / ".unet-checkpoint.pt")
        pipe = assemble(parts, tokenizer)
        final = {
            f"guidance_{g:g}": judge_pipeline(pipe, all_prompts(), 2, seed=12345, guidance=g).scores for g in (1, 3)
        }
        save_fp16(pipe, out)
        shutil.rmtree(out / "tokenizer")  # save_pretrained adds a 3.6 MB tokenizer.json; vocab + merges suffice
        write_tokenizer(out / "tokenizer")
        shutil.rmtree(stage, ignore_errors=True)
        (out / ".unet-checkpoint.pt").unlink(missing_ok=True)
    summary = write_summary(out, recipe, started, cpu, adherence_all_prompts=final, history=history)
    log(f"adherence (all 144 prompts x 2, DDIM 20 steps): {json.dumps(final)}")
    return summary


def main(argv: list[str] | None = None) -> int:
    return recipe_main(PipelineRecipe, train, "assets/toyworld/pipeline", __doc__.split("\n\n")[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
