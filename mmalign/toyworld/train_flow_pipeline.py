"""Train the shipped toyworld flow-matching pipeline (``assets/toyworld/flow_pipeline``) on a CPU.

    python -m mmalign.toyworld.train_flow_pipeline --out assets/toyworld/flow_pipeline --threads 1  # ~20 CPU-min

A diffusers ``StableDiffusion3Pipeline`` without T5 (``text_encoder_3=None``), of tiny parts, for the flow-matching
trainers (Flow-GRPO, DiffusionNFT, ...: :mod:`mmalign.trainers.flow`) on the toyworld:

* the VAE of the shipped UNet pipeline (``assets/toyworld/pipeline/vae``: 32 px RGB <-> 8 x 8 x 8 latents),
  reused as it is, with SD3's latent normalisation ``(z − shift_factor)·scaling_factor``: ``scaling_factor`` stays
  the UNet pipeline's (1 / std of the latent means of renders), ``shift_factor`` is set to their mean, so that
  the latents the transformer sees have mean 0 and std 1;
* ``text_encoder``: the UNet pipeline's CLIP text encoder (width 32, 2 layers, real CLIP tokenizer cut to 16
  tokens) as a ``CLIPTextModelWithProjection``, its weights reused and a projection (32 -> 32) added;
* ``text_encoder_2``: a fresh CLIP of width 16 on a tokenizer of the same BPE reduced to the toyworld's words
  (:func:`write_small_tokenizer`: 572 tokens instead of 49408, identical tokens on every toyworld prompt, so
  the embedding table stays small);
* ``SD3Transformer2DModel``: patch 1 (64 image tokens), 4 joint blocks of width 64 (4 heads of 16), RMS
  query/key norm, ``joint_attention_dim`` = 32 + 16 (the two CLIPs' widths: no padding), pooled 32 + 16;
* ``FlowMatchEulerDiscreteScheduler`` with ``shift`` 1 (see below); the T5 part of the prompt embedding is the
  pipeline's zeros of length ``max_sequence_length`` (16, recorded in ``mmalign_generator.json`` beside
  ``model_index.json``, read by :class:`mmalign.models.sd3.SD3Generator`).

Training (stage 2 of :mod:`mmalign.toyworld.train_pipeline`, for flow matching): rectified flow ``x_σ = (1 − σ)·x0
+ σ·ε``, target ``ε − x0`` (MSE, unweighted), σ drawn from a logit-normal density (``logit_mean`` 0,
``logit_std`` 1: SD3's "rf/lognorm(0.00, 1.00)", the best of the densities Esser et al. 2024 compared), mapped
through the scheduler's shift ``σ ← shift·σ / (1 + (shift − 1)·σ)`` as diffusers' ``train_dreambooth_sd3.py``
draws its timesteps from the shifted scheduler. Shift 1: SD3's shift 3 moves the density towards noise for
1024 px images, whose many redundant pixels keep the image recognisable under noise; an 8 x 8 latent has none
of that redundancy, and the resolution rule of the SD3 paper (shift ∝ √(pixels)) gives a shift below 1 at 32 px.
The transformer and both text encoders learn together (EMA weights kept), on the VAE latents of renders whose
captions are noisy exactly as for the UNet pipeline: each attribute replaced by a wrong value with probability
``caption_noise``, and 10 % of captions dropped (encoded ``""``, the pipeline's unconditional prompt) for
classifier-free guidance; the model then follows prompts only partly, which leaves room for preference training.
``feature_weight`` w > 0 (a world with small features: the multi-view dot, 4 px, one latent cell) weighs the squared
error of the latent cells over those features (1 + w)-fold, so that a pipeline learns to place them rather than
spend its capacity on the large body; ``init`` continues training a saved pipeline (its parts, with a fresh
optimiser and warm-up) instead of building one. The pipeline is saved in fp16 safetensors (loaded back in fp32), and
the judge adherence of Euler-ODE samples (:func:`mmalign.toyworld.sampling.evaluate_flow`) on the held-out prompts
of the demo's split, at several guidance scales and step counts, is written to ``training.json`` beside it. A killed
run resumes from its checkpoint when rerun.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .save import recipe_main, save_fp16, write_summary
from .train_pipeline import (
    MAX_TOKENS,
    TokenCache,
    latent_pool,
    pool_masks,
    rectified_flow_loss,
    render_batch,
    train_rectified_flow,
    train_vae,
    write_tokenizer,
)
from .world import COLORS, COUNT_WORDS, POSITION_PHRASES, SHAPES, all_prompts, corrupt, split_prompts

#: evaluation grid of ``training.json``: guidance scales x Euler steps, on the demo's held-out prompts
EVAL_GUIDANCE = (1.0, 1.5, 3.0, 4.5)
EVAL_STEPS = (10, 20)


@dataclass
class FlowPipelineRecipe:
    """Every knob of the shipped flow pipeline's training (the defaults made the shipped one)."""

    seed: int = 0
    base: str = ""  # the UNet pipeline whose VAE and text encoder are reused ("": assets/toyworld/pipeline)
    pool: int = 16384
    steps: int = 7000
    batch: int = 32
    lr: float = 1e-3
    caption_noise: float = 0.25
    prompt_dropout: float = 0.1
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0
    width: int = 64
    layers: int = 4
    patch_size: int = 1
    clip2_width: int = 16
    max_sequence_length: int = 16
    ema_decay: float = 0.995
    eval_every: int = 1750
    eval_samples: int = 8
    checkpoint_every: int = 250
    threads: int = 0
    world: str = "image"  # the world drawn (:data:`WORLDS`): "image" or "multiview" (2x2 view grids)
    vae_steps: int = 0  # 0: the base pipeline's VAE as it is; N: a VAE of its architecture fitted N steps here
    vae_batch: int = 32
    vae_lr: float = 2e-3
    feature_weight: float = 0.0  # extra loss weight on latent cells over the world's small features (its mask)
    init: str = ""  # a saved flow pipeline of the same world to continue training ("": build a fresh one)


@dataclass(frozen=True)
class FlowWorld:
    """What the pipeline is trained to draw: the prompts, their noisy captions, the ground-truth renders (one uint8
    ``[H, W, 3]`` image each: a 2x2 grid of views for the multi-view world), the words its small tokenizer keeps,
    and the judged evaluation of samples (:mod:`mmalign.toyworld.sampling`)."""

    all_prompts: Callable[[], list]
    split: Callable[..., tuple[list, list]]
    random_prompt: Callable[[random.Random], Any]
    corrupt: Callable[[Any, random.Random, float], Any]
    render: Callable[[Any, random.Random], Any]
    words: Callable[[], list[str]]
    judge: Callable[[Any, Any], Any]  # (image, prompt) -> verdict with .scores()
    evaluate: Callable[..., Any]
    size: int  # pixels per side of what the generator draws
    feature_mask: Callable[[Any, Any], Any] | None = None  # (prompt, rng) -> bool [H, W] of the small features


def flow_world(name: str) -> FlowWorld:
    """The :class:`FlowWorld` of ``name`` (``"image"``: :mod:`~mmalign.toyworld.world`; ``"multiview"``:
    :mod:`~mmalign.toyworld.multiview_world`)."""
    from . import multiview_world as mv
    from .judge import judge
    from .render import render
    from .sampling import evaluate_flow, evaluate_multiview
    from .world import CANVAS, random_prompt

    worlds = {
        "image": FlowWorld(all_prompts, split_prompts, random_prompt, corrupt, render, toyworld_words, judge,
                           evaluate_flow,
                           CANVAS),
        "multiview": FlowWorld(mv.all_multiview_prompts, mv.split_multiview_prompts, mv.random_multiview_prompt,
                               mv.corrupt_multiview, mv.render_grid, mv.multiview_words, mv.judge_views,
                               evaluate_multiview,
                               2 * CANVAS, feature_mask=mv.dot_mask_grid),
    }  # fmt: skip
    if name not in worlds:
        raise ValueError(f"unknown world {name!r}; known: {', '.join(worlds)}")
    return worlds[name]


def toyworld_words() -> list[str]:
    """Every word of every toyworld prompt (counts, colours, shapes and their plurals, position phrases)."""
    words = {*COUNT_WORDS.values(), *COLORS, *SHAPES, *(s + "s" for s in SHAPES)}
    for phrase in POSITION_PHRASES.values():
        words.update(phrase.split())
    return sorted(words)


def _bpe_merges(word: str, ranks: dict[tuple[str, str], int]) -> list[tuple[str, str]]:
    """The merges CLIP's BPE applies to ``word``, in order (the lowest-ranked adjacent pair first, every
    occurrence of it merged left to right; the last symbol carries ``</w>``)."""
    parts = [*word[:-1], word[-1] + "</w>"]
    used = []
    while len(parts) > 1:
        rank, pair = min((ranks.get(p, math.inf), p) for p in zip(parts, parts[1:]))
        if rank == math.inf:
            break
        used.append(pair)
        merged, i = [], 0
        while i < len(parts):
            if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                merged.append(pair[0] + pair[1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return used


def write_small_tokenizer(folder: Path, source: Path, words: list[str] | None = None) -> Path:
    """CLIP's BPE (``vocab.json`` and ``merges.txt`` of the CLIP tokenizer in ``source``) reduced to ``words``
    (default :func:`toyworld_words`): the 512 byte symbols (with and without ``</w>``), the merges those words use
    (in CLIP's order) and their results, and the two special tokens, ``model_max_length`` :data:`MAX_TOKENS`. It
    splits those words into the same tokens as the full tokenizer (BPE takes the lowest-ranked pair present, and
    keeping ranks in order keeps every choice); other text falls back to shorter pieces. Ids differ from CLIP's:
    the text encoder using it takes the ids from ``vocab.json``."""
    vocab = json.loads((source / "vocab.json").read_text(encoding="utf-8"))
    lines = (source / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    merges = [tuple(line.split()) for line in lines if line]
    ranks = {pair: i for i, pair in enumerate(merges)}
    used = {pair for word in (words or toyworld_words()) for pair in _bpe_merges(word, ranks)}
    kept = sorted(used, key=ranks.__getitem__)
    symbols = sorted(vocab, key=vocab.__getitem__)[:512]
    tokens = symbols + ["".join(pair) for pair in kept] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in kept), encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_TOKENS,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


def base_dir(recipe: FlowPipelineRecipe) -> Path:
    from .sampling import asset_dir

    return Path(recipe.base) if recipe.base else asset_dir("pipeline")


def load_parts(folder: str | Path) -> dict[str, Any]:
    """The parts of a saved flow pipeline (fp16 on disk) in fp32, to continue training them (``init``)."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(
        str(folder), dtype=torch.float32, text_encoder_3=None, tokenizer_3=None
    )
    parts = {
        name: getattr(pipe, name) for name in ("vae", "text_encoder", "text_encoder_2", "transformer", "scheduler")
    }
    parts["vae"].register_to_config(_name_or_path="")  # no path in the saved config
    return parts


def build_parts(recipe: FlowPipelineRecipe, tokenizer_2: Any) -> dict[str, Any]:
    """The reused VAE and text encoder (with a fresh projection), a fresh second CLIP, transformer and scheduler
    (seeded); with ``init``, the parts of that saved pipeline instead."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ..models.builders import clip_text_config

    if recipe.init:
        parts = load_parts(recipe.init)
        config = parts["transformer"].config
        saved = {"width": config.num_attention_heads * config.attention_head_dim, "layers": config.num_layers,
                 "patch_size": config.patch_size}  # fmt: skip
        wrong = [f"{k} {getattr(recipe, k)} (the saved transformer's: {v})" for k, v in saved.items()
                 if getattr(recipe, k) != v]  # fmt: skip
        if wrong:  # training.json records the recipe: it must describe what is trained
            raise ValueError(f"init={recipe.init}: the recipe says " + ", ".join(wrong))
        return parts
    base = base_dir(recipe)
    torch.manual_seed(recipe.seed)
    vae = AutoencoderKL.from_pretrained(str(base), subfolder="vae", dtype=torch.float32)
    vae.register_to_config(_name_or_path=recipe.base or "assets/toyworld/pipeline")  # no absolute path in config
    if recipe.vae_steps:  # the same architecture, fresh weights (fitted to the world's renders by train)
        vae = AutoencoderKL.from_config(vae.config)
        vae.register_to_config(_name_or_path="")  # not the base pipeline's VAE any more
    world = flow_world(recipe.world)
    latent = world.size // 2 ** (len(vae.config.block_out_channels) - 1)
    clip = CLIPTextModel.from_pretrained(str(base), subfolder="text_encoder", dtype=torch.float32)
    config = CLIPTextConfig(**{**clip.config.to_dict(), "architectures": ["CLIPTextModelWithProjection"]})
    text_encoder = CLIPTextModelWithProjection(config)
    text_encoder.text_model.load_state_dict(clip.state_dict())  # all but the new text_projection
    vocab = tokenizer_2.get_vocab()
    special = {
        "vocab_size": len(vocab),
        "bos_token_id": vocab["<|startoftext|>"],
        "eos_token_id": vocab["<|endoftext|>"],
        "pad_token_id": vocab["<|endoftext|>"],
    }
    width2 = recipe.clip2_width
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(
            **clip_text_config(
                width2, 2 * width2, 2, 2, max_position_embeddings=MAX_TOKENS, projection_dim=width2, **special
            )
        )
    )
    text_width = text_encoder.config.hidden_size + width2
    transformer = SD3Transformer2DModel(
        sample_size=latent,
        patch_size=recipe.patch_size,
        in_channels=vae.config.latent_channels,
        out_channels=vae.config.latent_channels,
        num_layers=recipe.layers,
        attention_head_dim=16,
        num_attention_heads=recipe.width // 16,
        joint_attention_dim=text_width,
        caption_projection_dim=recipe.width,
        pooled_projection_dim=text_encoder.config.projection_dim + width2,
        pos_embed_max_size=latent // recipe.patch_size,
        qk_norm="rms_norm",
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=recipe.shift)
    return {
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "transformer": transformer,
        "scheduler": scheduler,
    }


def encode(
    text_encoders: list[torch.nn.Module], ids: list[torch.Tensor], max_sequence_length: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prompt_embeds, pooled_prompt_embeds)`` of token ids, with gradients: ``SD3Generator.encode_conditions``
    (= ``StableDiffusion3Pipeline.encode_prompt``) without T5 - both CLIPs' penultimate hidden states side by side,
    padded to ``width``, then ``max_sequence_length`` zero tokens; pooled = both projected pooled outputs."""
    hidden, pooled = [], []
    for encoder, tokens in zip(text_encoders, ids):
        out = encoder(tokens, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled.append(out[0])
    clip = F.pad(torch.cat(hidden, dim=-1), (0, width - sum(h.shape[-1] for h in hidden)))
    zeros = clip.new_zeros(clip.shape[0], max_sequence_length, width)
    return torch.cat([clip, zeros], dim=-2), torch.cat(pooled, dim=-1)


def sample_sigmas(count: int, recipe: FlowPipelineRecipe, gen: torch.Generator) -> torch.Tensor:
    """σ ~ logit-normal(``logit_mean``, ``logit_std``), shifted as the scheduler shifts its sigmas."""
    sigma = torch.sigmoid(recipe.logit_mean + recipe.logit_std * torch.randn(count, generator=gen))
    return recipe.shift * sigma / (1 + (recipe.shift - 1) * sigma)


def train_flow(
    parts: dict[str, Any],
    tokens: list[TokenCache],
    latents: torch.Tensor,
    prompts: list,
    recipe: FlowPipelineRecipe,
    log,
    evaluate=None,
    checkpoint: Path | None = None,
    corrupt: Callable[[Any, random.Random, float], Any] = corrupt,
    weights: torch.Tensor | None = None,
) -> list[dict[str, float]]:
    """Rectified flow on noisy captions; the transformer and both text encoders keep EMA weights (copied in at
    the end). ``weights`` (``[N, 1, h, w]``, one per latent cell of each latent): the squared error weighted by
    them (:func:`feature_weights`). With ``checkpoint``, the whole state is written there every
    ``checkpoint_every`` steps and a run resumes from it exactly. Returns the loss curve (mean loss per 100
    steps)."""
    transformer = parts["transformer"]
    encoders = [parts["text_encoder"], parts["text_encoder_2"]]
    width = int(transformer.config.joint_attention_dim)
    modules = torch.nn.ModuleList([transformer, *encoders])

    def batch_loss(rng: random.Random, gen: torch.Generator) -> torch.Tensor:
        index = torch.randint(0, len(prompts), (recipe.batch,), generator=gen)
        captions = [
            "" if rng.random() < recipe.prompt_dropout else corrupt(prompts[i], rng, recipe.caption_noise).text
            for i in index.tolist()
        ]
        x0 = latents[index]
        noise = torch.randn(x0.shape, generator=gen)
        sigma = sample_sigmas(len(index), recipe, gen)
        s = sigma.view(-1, 1, 1, 1)
        noisy = (1 - s) * x0 + s * noise
        embeds, pooled = encode(encoders, [cache(captions) for cache in tokens], recipe.max_sequence_length, width)
        pred = transformer(
            hidden_states=noisy,
            timestep=sigma * 1000,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
        return rectified_flow_loss(pred, noise, x0, None if weights is None else weights[index])

    return train_rectified_flow(modules, recipe, log, batch_loss, evaluate, checkpoint)


def feature_weights(masks: torch.Tensor, latent_size: int, weight: float) -> torch.Tensor:
    """``[N, 1, h, w]`` loss weights from pixel masks ``bool [N, H, W]``: 1 + ``weight`` on every latent cell whose
    pixels (``H / h`` square) touch the mask, 1 elsewhere."""
    cells = F.adaptive_max_pool2d(masks[:, None].float(), latent_size)
    return 1.0 + weight * cells


def generator_of(parts: dict[str, Any], tokenizers: list[Any], recipe: FlowPipelineRecipe, modules=None):
    """An :class:`~mmalign.models.sd3.SD3Generator` over ``parts`` (or over ``modules`` = [transformer,
    text_encoder, text_encoder_2], e.g. EMA copies; the generator freezes its text encoders)."""
    from ..models.sd3 import SD3Generator

    transformer, text_encoder, text_encoder_2 = modules or [
        parts["transformer"],
        parts["text_encoder"],
        parts["text_encoder_2"],
    ]
    components = dict(
        parts,
        transformer=transformer,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
    )
    return SD3Generator(components, max_sequence_length=recipe.max_sequence_length)


def adherence_grid(
    generator: Any, prompts: list, samples: int, seed: int, evaluate: Callable[..., Any] | None = None
) -> dict[str, dict[str, float]]:
    """Judge scores of Euler-ODE samples at every guidance of :data:`EVAL_GUIDANCE` x steps of :data:`EVAL_STEPS`
    (``evaluate``: :func:`~mmalign.toyworld.sampling.evaluate_flow` by default)."""
    from .sampling import evaluate_flow

    evaluate = evaluate or evaluate_flow
    return {
        f"guidance_{g:g}_steps_{n}": evaluate(generator, prompts, samples, seed=seed, steps=n, guidance=g).scores
        for g in EVAL_GUIDANCE
        for n in EVAL_STEPS
    }


@torch.no_grad()
def reconstruction_scores(vae: torch.nn.Module, world: FlowWorld, seed: int, count: int = 128) -> dict[str, float]:
    """Judge scores of VAE reconstructions of ``count`` renders: the ceiling a pipeline on this VAE can reach."""
    rng = random.Random(f"reconstruction:{seed}")
    prompts = [world.random_prompt(rng) for _ in range(count)]
    decoded = vae.decode(vae.encode(render_batch(prompts, rng, world.render)).latent_dist.mean).sample
    images = ((decoded.clamp(-1, 1) + 1) / 2).movedim(1, -1).numpy()
    from .judge import mean_scores

    return mean_scores([world.judge(image, p) for image, p in zip(images, prompts)])


def train(recipe: FlowPipelineRecipe, out: Path, log=print) -> dict[str, Any]:
    """Build, train and save the pipeline folder ``out``; returns the summary written to training.json."""
    from diffusers import StableDiffusion3Pipeline
    from transformers import CLIPTokenizer

    from ..models.generator import load_generator
    from ..models.sd3 import write_generator_config
    from .sampling import threads

    started, cpu = time.time(), time.process_time()
    world = flow_world(recipe.world)
    evaluate_world = world.evaluate
    _, heldout = world.split(32, seed=0)
    with threads(recipe.threads):
        source = base_dir(recipe) / "tokenizer"
        words = world.words()
        tokenizer = CLIPTokenizer.from_pretrained(str(source))
        tokenizer_2 = CLIPTokenizer.from_pretrained(str(write_small_tokenizer(out / "tokenizer_2", source, words)))
        parts = build_parts(recipe, tokenizer_2)
        vae = parts["vae"]
        if recipe.vae_steps and not recipe.init:
            train_vae(vae, recipe, log, world.random_prompt, world.render)
        vae.requires_grad_(False).eval()
        reconstruction = reconstruction_scores(vae, world, recipe.seed)
        log(f"judge of the VAE's reconstructions of renders: {json.dumps(reconstruction)}")
        # scaled latent means, shift 0
        latents, prompts = latent_pool(vae, recipe.pool, recipe.seed, world.random_prompt, world.render)
        shift = float(latents.mean())
        vae.register_to_config(shift_factor=shift / vae.config.scaling_factor)
        latents = latents - shift
        weights = None
        if recipe.feature_weight:
            if world.feature_mask is None:
                raise ValueError(f"feature_weight: the {recipe.world!r} world marks no small features")
            masks = pool_masks(recipe.pool, recipe.seed, world.random_prompt, world.feature_mask)
            weights = feature_weights(masks, latents.shape[-1], recipe.feature_weight)
            log(
                f"feature weight {recipe.feature_weight:g} on {float((weights > 1).float().mean()):.1%} of latent cells"
            )
        log(
            f"latent pool {tuple(latents.shape)}: shift_factor {vae.config.shift_factor:.4f}, scaling_factor "
            f"{vae.config.scaling_factor:.4f}, std {float(latents.std()):.3f}, {time.time() - started:.0f} s"
        )
        tokenizers = [tokenizer, tokenizer_2]
        history = []

        def evaluate(ema, step):
            trial = generator_of(parts, tokenizers, recipe, modules=list(ema))
            for guidance in (1.0, 3.0):
                scores = evaluate_world(trial, heldout, 2, seed=1, steps=10, guidance=guidance).scores
                history.append({"step": step, "guidance": guidance, **scores})
                log(f"eval step {step} guidance {guidance}: {json.dumps({k: round(v, 3) for k, v in scores.items()})}")

        curve = train_flow(
            parts,
            [TokenCache(t) for t in tokenizers],
            latents,
            prompts,
            recipe,
            log,
            evaluate,
            checkpoint=out / ".flow-checkpoint.pt",
            corrupt=world.corrupt,
            weights=weights,
        )
        trained_seconds = time.time() - started
        pipe = StableDiffusion3Pipeline(
            transformer=parts["transformer"],
            scheduler=parts["scheduler"],
            vae=vae,
            text_encoder=parts["text_encoder"],
            tokenizer=tokenizer,
            text_encoder_2=parts["text_encoder_2"],
            tokenizer_2=tokenizer_2,
            text_encoder_3=None,
            tokenizer_3=None,
        )
        save_fp16(pipe, out)
        # save_pretrained adds a tokenizer.json (3.6 MB for the full vocabulary); vocab + merges suffice
        shutil.rmtree(out / "tokenizer")
        write_tokenizer(out / "tokenizer")
        shutil.rmtree(out / "tokenizer_2")
        write_small_tokenizer(out / "tokenizer_2", source, words)
        write_generator_config(out, max_sequence_length=recipe.max_sequence_length)
        (out / ".flow-checkpoint.pt").unlink(missing_ok=True)
        # judged as shipped: the saved folder (fp16 weights) loaded back in fp32 by the trainers' loader
        shipped = load_generator(str(out))
        grid = adherence_grid(shipped, heldout, recipe.eval_samples, seed=12345, evaluate=evaluate_world)
        everything = {
            f"guidance_{g:g}": evaluate_world(shipped, world.all_prompts(), 2, seed=12345, steps=20, guidance=g).scores
            for g in (1.0, 3.0)
        }
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    summary = write_summary(
        out,
        recipe,
        started,
        cpu,
        adherence_heldout=grid,
        adherence_all_prompts=everything,
        reconstruction=reconstruction,
        evaluation=f"judge of Euler-ODE samples (sampling.{evaluate_world.__name__}): heldout = the demo's 32 "
        f"held-out prompts ({world.split.__name__}(32, seed=0)) x {recipe.eval_samples} seeds; all_prompts = "
        f"{len(world.all_prompts())} x 2 seeds, 20 steps",
        loss_curve=curve,
        history=history,
        training_seconds=round(trained_seconds, 1),
        folder_bytes=size,
    )
    log(f"adherence (held-out): {json.dumps({k: round(v['overall'], 3) for k, v in grid.items()})}")
    return summary


def main(argv: list[str] | None = None) -> int:
    return recipe_main(FlowPipelineRecipe, train, "assets/toyworld/flow_pipeline", __doc__.split("\n\n")[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
