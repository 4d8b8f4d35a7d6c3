"""Train the shipped toyworld reward (``assets/toyworld/reward``): a tiny CLIP that ranks images as the judge does.

    python -m mmalign.toyworld.train_reward --out assets/toyworld/reward   # after train_pipeline; seeded

Data, in groups of images that share an anchor prompt: the shipped pipeline's samples of each prompt
(``samples_per_prompt`` per prompt, all 144 prompts), and VAE reconstructions of ground-truth renders of a
random prompt and of its near misses (one attribute changed, each attribute once; two changed; a random prompt).
The judge scores every image against every prompt (one detection pass per image). Each step takes
``sample_groups`` + ``recon_groups`` groups and minimises a pairwise Bradley-Terry loss on ``logit_scale *
cosine`` over every pair of one group that the judge orders under the group's prompt (the demo's use: ranking
samples of one prompt), plus half the same loss over the whole batch under all 144 prompts.

Reported in ``training.json``: agreement with the judge on held-out pairs (fresh pipeline samples, new seeds:
two images of one prompt that the judge scores differently; the share the reward orders the same way), and the
judge's mean score of the reward's best and worst of 4 samples per prompt.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .config import GUIDANCE
from .judge import detect, score_objects
from .save import recipe_main, save_fp16, write_summary
from .world import CANVAS, Prompt, all_prompts, random_prompt

GROUP = 8
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class RewardRecipe:
    """Every knob of the shipped reward's training (the defaults made the shipped one)."""

    seed: int = 0
    pipeline: str = ""
    samples_per_prompt: int = 12
    recon_pool: int = 4096
    steps: int = 1500
    sample_groups: int = 6
    recon_groups: int = 8
    lr: float = 1e-3
    heldout_samples: int = 4
    guidance: float = GUIDANCE  # of the pipeline's samples: the demo's
    threads: int = 0


def build_model(seed: int = 0):
    """A freshly initialised tiny ``CLIPModel``: 2-layer text tower (width 32, 16 tokens), ViT 32 px / patch 4."""
    from transformers import CLIPModel

    from ..models.builders import clip_config

    torch.manual_seed(seed)
    config = clip_config(
        text=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16
        ),
        vision=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=CANVAS,
            patch_size=4,
        ),
        projection_dim=32,
    )
    return CLIPModel(config)


def judge_matrix(images: np.ndarray, prompts: list[Prompt]) -> np.ndarray:
    """``[N, P]`` judge ``overall`` of every image under every prompt (one detection pass per image)."""
    height, width = images.shape[1:3]
    out = np.zeros((len(images), len(prompts)), dtype=np.float32)
    for i, image in enumerate(images):
        objects = detect(image)
        out[i] = [score_objects(objects, p, width, height).overall for p in prompts]
    return out


def near_miss_group(prompt: Prompt, rng: random.Random) -> list[Prompt]:
    """``prompt``, one near miss per attribute, two with two attributes changed, and a random prompt (8)."""
    from .world import ATTRIBUTES, perturb

    misses = [perturb(prompt, rng, [name]) for name in ATTRIBUTES]
    doubles = [perturb(prompt, rng, rng.sample(ATTRIBUTES, 2)) for _ in range(2)]
    return [prompt, *misses, *doubles, random_prompt(rng)]


@torch.no_grad()
def vae_reconstructions(pipe: Any, count: int, seed: int) -> tuple[np.ndarray, list[Prompt], list[Prompt]]:
    """Renders of near-miss groups (:func:`near_miss_group`, ``count // 8`` groups) passed through the pipeline's
    VAE (a posterior sample each); returns the images, the prompts they show, and each group's anchor."""
    from .train_pipeline import render_batch

    rng = random.Random(f"recon:{seed}")
    gen = torch.Generator().manual_seed(seed)
    anchors = [random_prompt(rng) for _ in range(count // GROUP)]
    prompts = [p for anchor in anchors for p in near_miss_group(anchor, rng)]
    out = []
    for start in range(0, len(prompts), 256):
        pixels = render_batch(prompts[start : start + 256], rng)
        posterior = pipe.vae.encode(pixels).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        decoded = (pipe.vae.decode(latents).sample / 2 + 0.5).clamp(0, 1)
        out.append((decoded.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8))
    return np.concatenate(out), prompts, anchors


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` -> CLIP-normalised ``[N, 3, H, W]`` (the processor's path for 32 px images)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def features(model: Any, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor):
    from ..rewards.clip import _features

    image = F.normalize(_features(model.get_image_features(pixel_values=pixels)), dim=-1)
    text = F.normalize(_features(model.get_text_features(input_ids=ids, attention_mask=mask)), dim=-1)
    return image, text


def ranking_loss(cosine: torch.Tensor, judged: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry over every image pair the judge orders, per prompt (column); ``cosine``, ``judged``:
    ``[B, P]``. Every ordered pair weighs the same, so near misses count as much as wrong images."""
    better = (judged[:, None, :] > judged[None, :, :]).float()  # [B, B, P]: i better than j under prompt p
    logits = scale * (cosine[:, None, :] - cosine[None, :, :])
    return (F.softplus(-logits) * better).sum() / better.sum().clamp(min=1.0)


def group_loss(cosine: torch.Tensor, judged: torch.Tensor, groups: list[tuple[int, list[int]]], scale) -> torch.Tensor:
    """:func:`ranking_loss` within each group under its own prompt; ``groups``: ``(prompt column, rows)``."""
    terms = [
        ranking_loss(cosine[rows, column][:, None], judged[rows, column][:, None], scale) for column, rows in groups
    ]
    return torch.stack(terms).mean()


def reward_step(loss, model, optimizer, schedule, step: int, steps: int, scale: torch.Tensor, log) -> None:
    """One optimizer step of a toy reward (gradients clipped to norm 1, the lr schedule stepped), logged every 100
    steps (:mod:`~mmalign.toyworld.train_reward`, :mod:`~mmalign.toyworld.train_media_reward`)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    schedule.step()
    if step % 100 == 0 or step == steps - 1:
        log(f"reward step {step + 1}/{steps} loss {loss.item():.4f} scale {scale.item():.1f}")


def agreement(scores: np.ndarray, judged: np.ndarray, groups: list[int]) -> dict[str, float]:
    """Pairwise agreement within groups (one prompt's samples), over pairs the judge scores differently."""
    agree = total = 0
    by_group: dict[int, list[int]] = {}
    for index, group in enumerate(groups):
        by_group.setdefault(group, []).append(index)
    best, worst, mean = [], [], []
    for members in by_group.values():
        for a in range(len(members)):
            for b in range(a + 1, len(members)):
                i, j = members[a], members[b]
                if judged[i] != judged[j]:
                    total += 1
                    agree += (scores[i] - scores[j]) * (judged[i] - judged[j]) > 0
        ranked = sorted(members, key=lambda k: scores[k])
        best.append(judged[ranked[-1]])
        worst.append(judged[ranked[0]])
        mean.append(float(np.mean(judged[members])))
    return {
        "pairs": total,
        "agreement": float(agree / max(total, 1)),
        "judge_of_reward_best": float(np.mean(best)),
        "judge_of_reward_worst": float(np.mean(worst)),
        "judge_mean": float(np.mean(mean)),
    }


def write_processor(folder: Path) -> None:
    """CLIP tokenizer (16 tokens) and a 32 px CLIP image processor, as ``CLIPReward`` loads them."""
    from transformers.models.clip import CLIPImageProcessorPil

    from .train_pipeline import write_tokenizer

    write_tokenizer(folder)
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": CANVAS},
        crop_size={"height": CANVAS, "width": CANVAS},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    processor.save_pretrained(str(folder))


def train(recipe: RewardRecipe, out: Path, log=print) -> dict[str, Any]:
    """Build the data, train, measure held-out agreement, save the reward folder and ``training.json``."""
    from transformers import CLIPTokenizer

    from .sampling import load_pipeline, sample, threads

    started, cpu = time.time(), time.process_time()
    prompts = all_prompts()
    with threads(recipe.threads):
        heldout_prompts = [p for p in prompts for _ in range(recipe.heldout_samples)]
        cache = out / ".data.npz"  # the sampled images, kept until the run completes (a killed run reuses them)
        data_keys = ("seed", "pipeline", "samples_per_prompt", "recon_pool", "heldout_samples", "guidance")
        key = json.dumps({name: getattr(recipe, name) for name in data_keys}, sort_keys=True)
        lookup = {p: i for i, p in enumerate(prompts)}
        if cache.is_file() and str(np.load(cache)["key"]) == key:
            data = np.load(cache)
            generated, recon, heldout = data["generated"], data["recon"], data["heldout"]
            anchors = [prompts[i] for i in data["anchors"]]
            log(f"reusing the sampled images of {cache}")
        else:
            pipe = load_pipeline(recipe.pipeline or None)
            expanded = [p for p in prompts for _ in range(recipe.samples_per_prompt)]
            generated = sample(pipe, expanded, [7_000_000 + i for i in range(len(expanded))], guidance=recipe.guidance)
            recon, _, anchors = vae_reconstructions(pipe, recipe.recon_pool, recipe.seed)
            heldout = sample(
                pipe, heldout_prompts, [9_000_000 + i for i in range(len(heldout_prompts))], guidance=recipe.guidance
            )
            out.mkdir(parents=True, exist_ok=True)
            ids = np.array([lookup[a] for a in anchors])
            np.savez(cache, generated=generated, recon=recon, heldout=heldout, anchors=ids, key=np.array(key))
        log(f"data: {len(generated)} samples, {len(recon)} reconstructions, {len(heldout)} held out")
        images = np.concatenate([generated, recon])
        judged = torch.from_numpy(judge_matrix(images, prompts))
        pixels = to_pixels(images)
        k, offset = recipe.samples_per_prompt, len(generated)
        sample_groups = [(i, list(range(i * k, (i + 1) * k))) for i in range(len(prompts))]
        recon_groups = [
            (lookup[a], list(range(offset + g * GROUP, offset + (g + 1) * GROUP))) for g, a in enumerate(anchors)
        ]
        log(f"judged {len(images)} images x {len(prompts)} prompts ({time.time() - started:.0f} s)")

        write_processor(out)
        tokenizer = CLIPTokenizer.from_pretrained(str(out))
        tokens = tokenizer([p.text for p in prompts], padding=True, return_tensors="pt")
        model = build_model(recipe.seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
        from .train_pipeline import warmup_cosine

        schedule = warmup_cosine(optimizer, recipe.steps)
        gen = torch.Generator().manual_seed(recipe.seed)
        model.train()
        for step in range(recipe.steps):
            chosen = [
                sample_groups[i] for i in torch.randperm(len(sample_groups), generator=gen)[: recipe.sample_groups]
            ]
            chosen += [recon_groups[i] for i in torch.randperm(len(recon_groups), generator=gen)[: recipe.recon_groups]]
            index, local, start = [], [], 0
            for column, rows in chosen:
                index += rows
                local.append((column, list(range(start, start + len(rows)))))
                start += len(rows)
            index = torch.tensor(index)
            image_features, text_features = features(model, pixels[index], tokens.input_ids, tokens.attention_mask)
            scale = model.logit_scale.exp().clamp(max=100.0)
            cosine = image_features @ text_features.T
            loss = group_loss(cosine, judged[index], local, scale) + 0.5 * ranking_loss(cosine, judged[index], scale)
            reward_step(loss, model, optimizer, schedule, step, recipe.steps, scale, log)
        model.eval()
        with torch.no_grad():
            image_features, text_features = features(model, to_pixels(heldout), tokens.input_ids, tokens.attention_mask)
            columns = torch.tensor([lookup[p] for p in heldout_prompts])
            scores = (image_features * text_features[columns]).sum(-1).numpy()
        truth = judge_matrix(heldout, prompts)[np.arange(len(heldout)), columns.numpy()]
        groups = [lookup[p] for p in heldout_prompts]
        heldout_report = agreement(scores, truth, groups)
        save_fp16(model, out)
        cache.unlink(missing_ok=True)
    summary = write_summary(out, recipe, started, cpu, heldout=heldout_report)
    log(f"held-out agreement with the judge: {json.dumps(heldout_report)}")
    return summary


def main(argv: list[str] | None = None) -> int:
    return recipe_main(RewardRecipe, train, "assets/toyworld/reward", __doc__.split("\n\n")[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
