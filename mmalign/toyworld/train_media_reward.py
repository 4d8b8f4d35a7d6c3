"""Train the learned reward of a toy video, audio or multi-view world (``assets/toyworld/<world>_reward``) on a CPU.

    python -m mmalign.toyworld.train_media_reward --world video --out assets/toyworld/video_reward --threads 1

The image world's recipe (:mod:`mmalign.toyworld.train_reward`) for the other modalities: a tiny ``CLIPModel``
(:mod:`mmalign.toyworld.media_reward`: frames or views stacked on the channel axis, or the spectrogram, as a 32 px
input; a text tower on a tokenizer reduced to the world's words) learns to rank media of one prompt as the world's
exact judge ranks them. Data, in groups of 8 that share an anchor prompt:

* the shipped pipeline's samples (``samples_per_prompt`` of every prompt, its own sampler at the demo's guidance),
  judged under their prompt: the failures the demos' generators make;
* ground-truth renders of a random prompt and of its near misses (each attribute changed once, two changed twice, a
  random prompt) passed through the pipeline's VAE (``to_latents`` then ``decode``: the generator's artefacts),
  judged under the anchor, and every one of them under all 8 prompts of its group.

Each step takes ``sample_groups`` + ``recon_groups_per_step`` groups and minimises a pairwise Bradley-Terry loss on
``logit_scale · cosine`` over every pair of one group that the judge orders under the group's prompt, plus half the
same loss over the prompts of each render group for each of its media (which prompt fits the media better).

Reported in ``training.json``: agreement with the judge on held-out pairs (fresh pipeline samples, new seeds: two
media of one prompt that the judge scores differently; the share the reward orders the same way), the judge's mean
score of the reward's best and worst of ``heldout_samples`` per prompt, and the same on held-out render groups.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import GUIDANCE
from .media_reward import CONFIG_NAME, media_pixels
from .save import recipe_main, save_fp16, write_summary
from .train_reward import GROUP, agreement, ranking_loss, reward_step

#: the vision tower of every toy media reward (32 px input of ``3·N`` or 1 channels, patch 4)
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, patch_size=4)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


@dataclass
class MediaRewardRecipe:
    """Every knob of a shipped toy media reward's training (the defaults made the shipped ones)."""

    world: str = "video"
    seed: int = 0
    pipeline: str = ""  # the world's pipeline ("": assets/toyworld/<world>_pipeline)
    samples_per_prompt: int = 8
    recon_groups: int = 256
    steps: int = 1200
    sample_groups: int = 6
    recon_groups_per_step: int = 6
    lr: float = 1e-3
    heldout_samples: int = 4
    sample_steps: int = 10
    guidance: float = GUIDANCE
    threads: int = 0


@dataclass(frozen=True)
class RewardWorld:
    """A toy world as the reward trainer sees it: prompts and near misses, renders and the judge (media as the
    world's evaluation holds them: uint8 frames / views, float waveforms), the pipeline's evaluation, and the
    conversions between those arrays, the canonical tensors rewards score and the VAE's input."""

    all_prompts: Callable[[], list]
    random_prompt: Callable[[random.Random], Any]
    perturb: Callable[[Any, random.Random, list[str]], Any]
    attributes: tuple[str, ...]
    render: Callable[[Any, random.Random], np.ndarray]
    judge: Callable[[np.ndarray, Any], Any]
    evaluate: Callable[..., Any]
    canonical: Callable[[np.ndarray], torch.Tensor]  # media arrays -> the modality's canonical tensor
    to_vae: Callable[[torch.Tensor], torch.Tensor]  # canonical -> what the generator's to_latents takes
    from_vae: Callable[[torch.Tensor], np.ndarray]  # the generator's decode -> media arrays
    input: dict[str, Any]  # mmalign_reward.json's input settings


def _frames(array: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, K, H, W, 3]`` -> float ``[N, K, 3, H, W]`` in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 1, 4, 2, 3).float() / 255


def _uint8_frames(tensor: torch.Tensor) -> np.ndarray:
    """float ``[N, K, 3, H, W]`` in [0, 1] -> uint8 ``[N, K, H, W, 3]``."""
    return (tensor.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2).numpy()


def reward_world(name: str) -> RewardWorld:
    """The :class:`RewardWorld` of ``"video"``, ``"audio"`` or ``"multiview"``."""
    from ..models.view_grid import split_views
    from . import audio_world as au
    from . import multiview_world as mv
    from . import video_world as vw
    from .sampling import evaluate_audio, evaluate_multiview, evaluate_video

    def join(views: torch.Tensor) -> torch.Tensor:  # [N, 4, 3, h, w] -> the 2x2 grid [N, 3, 2h, 2w]
        n, _, c, h, w = views.shape
        return views.reshape(n, 2, 2, c, h, w).permute(0, 3, 1, 4, 2, 5).reshape(n, c, 2 * h, 2 * w)

    worlds = {
        "video": RewardWorld(
            vw.all_video_prompts, vw.random_video_prompt, vw.perturb_video, vw.VIDEO_ATTRIBUTES, vw.render_clip,
            vw.judge_clip, evaluate_video, _frames, lambda x: x, lambda x: _uint8_frames(x),
            {"input": "stack", "count": vw.FRAMES},
        ),
        "multiview": RewardWorld(
            mv.all_multiview_prompts, mv.random_multiview_prompt, mv.perturb_multiview, mv.PROMPT_ATTRIBUTES,
            mv.render_views, mv.judge_views, evaluate_multiview, _frames, join,
            lambda x: _uint8_frames(split_views(x, 2, 2)), {"input": "stack", "count": mv.VIEWS},
        ),
        "audio": RewardWorld(
            au.all_audio_prompts, au.random_audio_prompt, au.perturb_audio, au.AUDIO_ATTRIBUTES, au.render_audio,
            au.judge_audio, evaluate_audio, lambda a: torch.from_numpy(np.asarray(a, dtype=np.float32))[:, None],
            lambda x: x, lambda x: x.float().mean(dim=1).numpy(),
            {"input": "spectrogram", "sample_rate": au.SAMPLE_RATE},
        ),
    }  # fmt: skip
    if name not in worlds:
        raise ValueError(f"unknown world {name!r}; known: {', '.join(worlds)}")
    return worlds[name]


def world_words(world: RewardWorld) -> list[str]:
    """Every word of every prompt of the world (what its reward's tokenizer keeps)."""
    return sorted({word for prompt in world.all_prompts() for word in prompt.text.split()})


def build_model(world: RewardWorld, tokenizer: Any, seed: int = 0):
    """A freshly initialised tiny ``CLIPModel``: :data:`TEXT` on ``tokenizer``'s vocabulary (16 tokens),
    :data:`VISION` on the world's input channels (32 px, patch 4)."""
    from transformers import CLIPModel

    from ..models.builders import clip_config

    vocab = tokenizer.get_vocab()
    special = {
        "vocab_size": len(vocab),
        "bos_token_id": vocab["<|startoftext|>"],
        "eos_token_id": vocab["<|endoftext|>"],
        "pad_token_id": vocab["<|endoftext|>"],
    }
    channels = 3 * int(world.input["count"]) if world.input["input"] == "stack" else 1
    torch.manual_seed(seed)
    config = clip_config(
        text=dict(**TEXT, max_position_embeddings=16, **special),
        vision=dict(**VISION, image_size=32, num_channels=channels),
        projection_dim=32,
    )
    return CLIPModel(config)


def near_miss_group(world: RewardWorld, prompt: Any, rng: random.Random) -> list[Any]:
    """``prompt``, one near miss per attribute, two with two attributes changed, and random prompts (8 in all)."""
    misses = [world.perturb(prompt, rng, [name]) for name in world.attributes]
    doubles = [world.perturb(prompt, rng, rng.sample(world.attributes, 2)) for _ in range(2)]
    group = [prompt, *misses, *doubles]
    return group + [world.random_prompt(rng) for _ in range(GROUP - len(group))]


@torch.no_grad()
def reconstructions(world: RewardWorld, generator: Any, groups: int, seed: int) -> tuple[np.ndarray, list, list]:
    """Renders of ``groups`` near-miss groups passed through the generator's VAE (a posterior sample each); returns
    the media (as the world's evaluation holds them), the prompts they show, and each group's anchor."""
    rng = random.Random(f"recon:{seed}")
    gen = torch.Generator().manual_seed(seed)
    anchors = [world.random_prompt(rng) for _ in range(groups)]
    prompts = [p for anchor in anchors for p in near_miss_group(world, anchor, rng)]
    out = []
    for start in range(0, len(prompts), 64):
        media = world.canonical(np.stack([world.render(p, rng) for p in prompts[start : start + 64]]))
        latents = generator.to_latents(world.to_vae(media), generator=gen)
        out.append(world.from_vae(generator.decode(latents)))
    return np.concatenate(out), prompts, anchors


def judge_groups(world: RewardWorld, media: np.ndarray, anchors: list, prompts: list) -> np.ndarray:
    """``[G, 8, 8]``: the judge's ``overall`` of every medium of each render group under every prompt of the group
    (the group's own prompts, anchor first)."""
    out = np.zeros((len(anchors), GROUP, GROUP), dtype=np.float32)
    for g in range(len(anchors)):
        texts = prompts[g * GROUP : (g + 1) * GROUP]
        for i in range(GROUP):
            out[g, i] = [world.judge(media[g * GROUP + i], p).overall for p in texts]
    return out


def pair_loss(cosine: torch.Tensor, judged: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry over every pair within each row of ``[R, K]`` that the judge orders (K candidates of one
    prompt, or K prompts of one medium): the image reward's :func:`~mmalign.toyworld.train_reward.ranking_loss`,
    whose pairs run down the columns, on the transposes."""
    return ranking_loss(cosine.T, judged.T, scale)


def train(recipe: MediaRewardRecipe, out: Path, log=print) -> dict[str, Any]:
    """Build the data, train, measure held-out agreement, save the reward folder and ``training.json``."""
    import torch.nn.functional as F
    from transformers import CLIPTokenizer

    from ..models.generator import load_generator
    from .sampling import asset_dir, threads
    from .train_flow_pipeline import write_small_tokenizer
    from .train_pipeline import warmup_cosine

    started, cpu = time.time(), time.process_time()
    world = reward_world(recipe.world)
    prompts = world.all_prompts()
    with threads(recipe.threads):
        generator = load_generator(recipe.pipeline or str(asset_dir(f"{recipe.world}_pipeline")))
        options = dict(steps=recipe.sample_steps, guidance=recipe.guidance)
        samples = world.evaluate(generator, prompts, recipe.samples_per_prompt, seed=7, **options)
        heldout = world.evaluate(generator, prompts, recipe.heldout_samples, seed=9, **options)
        recon, recon_prompts, anchors = reconstructions(world, generator, recipe.recon_groups, recipe.seed)
        held_recon, _, held_anchors = reconstructions(world, generator, 32, recipe.seed + 1)
        judged_recon = torch.from_numpy(judge_groups(world, recon, anchors, recon_prompts))
        sample_judged = torch.tensor([v.overall for v in samples.verdicts]).view(len(prompts), -1)
        log(
            f"data: {len(samples.verdicts)} samples (judge {samples.scores['overall']:.3f}), {len(recon)} "
            f"reconstructions (judge under their own prompts {float(judged_recon.diagonal(0, 1, 2).mean()):.3f}), "
            f"{time.time() - started:.0f} s"
        )
        source = asset_dir("pipeline") / "tokenizer"
        write_small_tokenizer(out, source, world_words(world))
        tokenizer = CLIPTokenizer.from_pretrained(str(out))
        model = build_model(world, tokenizer, recipe.seed)
        sample_pixels = media_pixels(world.canonical(samples.clips), world.input)
        sample_pixels = sample_pixels.view(len(prompts), recipe.samples_per_prompt, *sample_pixels.shape[1:])
        recon_pixels = media_pixels(world.canonical(recon), world.input).view(recipe.recon_groups, GROUP, -1, 32, 32)
        texts = [p.text for p in prompts]
        recon_texts = [p.text for p in recon_prompts]

        def encode(pixels: torch.Tensor, words: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
            from ..rewards.clip import _features

            tokens = tokenizer(words, padding=True, return_tensors="pt")
            image = _features(model.get_image_features(pixel_values=pixels))
            text = _features(model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask))
            return F.normalize(image, dim=-1), F.normalize(text, dim=-1)

        optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
        schedule = warmup_cosine(optimizer, recipe.steps)
        gen = torch.Generator().manual_seed(recipe.seed)
        model.train()
        for step in range(recipe.steps):
            chosen = torch.randperm(len(prompts), generator=gen)[: recipe.sample_groups]
            groups = torch.randperm(recipe.recon_groups, generator=gen)[: recipe.recon_groups_per_step]
            k = recipe.samples_per_prompt
            pixels = torch.cat([sample_pixels[chosen].flatten(0, 1), recon_pixels[groups].flatten(0, 1)])
            words = [texts[i] for i in chosen.tolist()]
            words += [recon_texts[g * GROUP + j] for g in groups.tolist() for j in range(GROUP)]
            image, text = encode(pixels, words)
            scale = model.logit_scale.exp().clamp(max=100.0)
            n = len(chosen)
            # samples of each prompt under it; renders of each group under its anchor; each render under its
            # group's prompts
            sample_cos = (image[: n * k].view(n, k, -1) * text[:n, None]).sum(-1)
            recon_image = image[n * k :].view(len(groups), GROUP, -1)
            recon_text = text[n:].view(len(groups), GROUP, -1)
            recon_cos = recon_image @ recon_text.transpose(1, 2)  # [G, media, prompts]
            recon_judged = judged_recon[groups]
            loss = (
                pair_loss(sample_cos, sample_judged[chosen], scale)
                + pair_loss(recon_cos[:, :, 0], recon_judged[:, :, 0], scale)
                + 0.5 * pair_loss(recon_cos.flatten(0, 1), recon_judged.flatten(0, 1), scale)
            )
            reward_step(loss, model, optimizer, schedule, step, recipe.steps, scale, log)
        model.eval()
        save_fp16(model, out)
        write_small_tokenizer(out, source, world_words(world))
        (out / CONFIG_NAME).write_text(json.dumps({"world": recipe.world, **world.input}, indent=2) + "\n")
        report = evaluate_reward(world, out, heldout, held_recon, held_anchors)
    summary = write_summary(out, recipe, started, cpu, **report)
    log(f"held-out agreement with the judge: {json.dumps(report)}")
    return summary


@torch.no_grad()
def evaluate_reward(world: RewardWorld, folder: Path, heldout: Any, recon: np.ndarray, anchors: list) -> dict:
    """The saved reward (loaded back through the registry's class) against the judge: agreement on held-out
    samples of every prompt, and on held-out render groups under their anchors."""
    from .media_reward import ToyMediaReward

    reward = ToyMediaReward.from_pretrained(str(folder))
    texts = [p.text for p in heldout.prompts]
    scores = reward.score(world.canonical(heldout.clips), texts).numpy()
    truth = np.array([v.overall for v in heldout.verdicts])
    groups = [t for t in texts]
    index = {t: i for i, t in enumerate(dict.fromkeys(groups))}
    samples = agreement(scores, truth, [index[t] for t in groups])
    anchor_texts = [a.text for a in anchors for _ in range(GROUP)]
    recon_scores = reward.score(world.canonical(recon), anchor_texts).numpy()
    recon_truth = np.array(
        [world.judge(m, a).overall for m, a in zip(recon, [a for a in anchors for _ in range(GROUP)])]
    )
    renders = agreement(recon_scores, recon_truth, [i // GROUP for i in range(len(recon))])
    return {"heldout": samples, "heldout_renders": renders}


def main(argv: list[str] | None = None) -> int:
    return recipe_main(MediaRewardRecipe, train, "assets/toyworld/video_reward", __doc__.split("\n\n")[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
