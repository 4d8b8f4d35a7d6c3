"""``mmalign label``: AI-feedback labelling. K samples per prompt from a pipeline, scored by a reward; writes
the images, ``rankings.jsonl`` (one line per prompt) and ``pairs.jsonl`` (every pair of differing scores,
``{"prompt", "chosen", "rejected", "score_chosen", "score_rejected"}``, paths relative to DIR) that
``mmalign train data=DIR/pairs.jsonl`` reads directly (the RLAIF recipe of D3PO/Diffusion-DPO style pairs).

With ``--trajectories`` the K samples of a prompt share x_T (D3PO's sampling protocol) and each prompt's DDIM
chains are kept in ``DIR/trajectories/`` with the sampler settings in ``DIR/label.json``: ``mmalign train
trainer=d3po feedback=DIR [human=SCORES]`` then trains D3PO on them from human scores (or from the reward's);
formats in :mod:`mmalign.data.feedback`."""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "label",
        help="sample K images per prompt, score them with a reward, write rankings and preference pairs",
        description="AI feedback: `mmalign label --model PIPELINE --reward NAME --prompts FILE --k 4 --out DIR`, "
        "then `mmalign train data=DIR/pairs.jsonl`.",
    )
    p.add_argument("--model", required=True, help="diffusers pipeline folder or hub id")
    p.add_argument("--reward", required=True, help="reward name or weighted list 'hpsv2.1:1.0,aesthetic:0.5'")
    p.add_argument("--reward-weights", help="reward checkpoint path (comma list, one per reward)")
    p.add_argument("--prompts", required=True, help="prompt file: .txt (one per line) or .jsonl with 'prompt'")
    p.add_argument("--k", type=int, default=4, help="samples per prompt (at least 2)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--eta", type=float, default=1.0)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--trajectories",
        action="store_true",
        help="K samples per prompt from one x_T, chains kept for D3PO's human-feedback training (feedback=DIR)",
    )
    p.set_defaults(func=run)


def label(
    policy: Any,
    reward: Any,
    prompts: list[str],
    k: int,
    out: str | Path,
    steps: int = 50,
    guidance: float = 7.5,
    eta: float = 1.0,
    resolution: int = 512,
    seed: int = 0,
    trajectories: bool = False,
    model: str = "",
) -> dict[str, int]:
    """Sample, score and write; prompt ``i`` uses generator seed ``seed + i`` (re-runs are identical).
    ``reward``: a :class:`~mmalign.trainers.online.WeightedReward` or Reward (``score_images``), or any
    ``reward(images [K, 3, H, W] in [0, 1], prompts) -> [K]``. Returns counts of prompts, images and pairs.
    ``trajectories``: the K chains of a prompt start from one x_T and are saved (:mod:`mmalign.data.feedback`)."""
    import torch

    from ..data.feedback import LABEL_FILE, TRAJECTORY_DIR, save_trajectories
    from ..modalities.image import tensor_to_pil
    from ..models import sampling

    if k < 2:
        raise ValueError(f"k must be at least 2 to form pairs, got {k}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    if trajectories:
        settings = dict(model=model, k=k, steps=steps, guidance=guidance, eta=eta, resolution=resolution, seed=seed)
        (out / LABEL_FILE).write_text(json.dumps(settings, indent=2) + "\n")

    def predict(noisy, timesteps, embeds, time_ids):
        return policy.predict(policy.unet, noisy, timesteps, embeds, time_ids)

    n_pairs = 0
    with (out / "rankings.jsonl").open("w") as rankings, (out / "pairs.jsonl").open("w") as pairs:
        for i, prompt in enumerate(prompts):
            embeds = policy.encode_prompt([prompt] * k)
            uncond = policy.unconditional(policy.encode_prompt([""] * k)) if guidance != 1.0 else None
            time_ids = None
            if policy.is_sdxl:
                sizes = torch.tensor([[resolution, resolution]] * k)
                time_ids = policy.time_ids(sizes, torch.zeros_like(sizes), resolution)
            generator = torch.Generator().manual_seed(seed + i)
            trajectory = sampling.sample_trajectories(
                policy,
                predict,
                embeds,
                uncond,
                generator,
                steps,
                guidance,
                eta,
                resolution,
                time_ids,
                shared_start=trajectories,
            )
            with torch.no_grad():
                images = policy.decode(trajectory.final)
            pictures = [tensor_to_pil(image.cpu()) for image in images]
            names = [f"images/{i:05d}_{j:02d}.png" for j in range(k)]
            for name, picture in zip(names, pictures):
                picture.save(out / name)
            with torch.no_grad():  # score what was saved, with each reward's reference preprocessing when it has one
                if hasattr(reward, "score_images"):
                    raw = reward.score_images(pictures, [prompt] * k)
                else:
                    raw = reward(images, [prompt] * k)
            scores = [float(s) for s in raw]
            order = sorted(range(k), key=lambda j: -scores[j])
            row = {"prompt": prompt, "images": names, "scores": scores, "ranking": order}
            if trajectories:
                row["trajectory"] = f"{TRAJECTORY_DIR}/{i:05d}.safetensors"
                save_trajectories(
                    out / row["trajectory"],
                    trajectory.latents,
                    trajectory.log_probs,
                    trajectory.schedule.timesteps,
                    {"prompt": prompt},
                )
            rankings.write(json.dumps(row) + "\n")
            for a, b in itertools.combinations(range(k), 2):
                if scores[a] == scores[b]:
                    continue
                w, l = (a, b) if scores[a] > scores[b] else (b, a)
                row = {
                    "prompt": prompt,
                    "chosen": names[w],
                    "rejected": names[l],
                    "score_chosen": scores[w],
                    "score_rejected": scores[l],
                }
                pairs.write(json.dumps(row) + "\n")
                n_pairs += 1
    return {"prompts": len(prompts), "images": len(prompts) * k, "pairs": n_pairs}


def run(args: argparse.Namespace) -> int:
    from ..models.policy import DiffusionPolicy
    from ..trainers.online import build_reward, read_prompts

    policy = DiffusionPolicy.from_pretrained(args.model, device=args.device)
    reward = build_reward(args.reward, args.reward_weights).to(policy.device)
    summary = label(
        policy,
        reward,
        read_prompts(args.prompts),
        args.k,
        args.out,
        steps=args.steps,
        guidance=args.guidance,
        eta=args.eta,
        resolution=args.resolution,
        seed=args.seed,
        trajectories=args.trajectories,
        model=args.model,
    )
    print(json.dumps({"out": args.out, **summary}), file=sys.stderr)
    return 0
