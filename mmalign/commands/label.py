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

from ..errors import MMAlignError
from ..sharding import (
    Shard,
    close_part,
    current_shard,
    drop_other_jobs,
    fingerprint,
    job_rows,
    open_part,
    parts_dir,
    process_group,
    remove_parts,
    write_atomic,
)

RANKINGS_FILE, PAIRS_FILE = "rankings.jsonl", "pairs.jsonl"


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
    reward_id: str | None = None,
    shard: Shard | None = None,
) -> dict[str, int]:
    """Sample, score and write; prompt ``i`` uses generator seed ``seed + i`` (re-runs are identical, and so is
    prompt ``i`` whichever process samples it). ``reward``: a :class:`~mmalign.trainers.online.WeightedReward` or
    Reward (``score_images``), or any ``reward(images [K, 3, H, W] in [0, 1], prompts) -> [K]``; ``reward_id``
    names it in the job's identity (default: its name). Returns counts of prompts, images and pairs.
    ``trajectories``: the K chains of a prompt start from one x_T and are saved (:mod:`mmalign.data.feedback`).

    Each process (``shard``, default from the environment: :func:`mmalign.sharding.current_shard`) labels prompts
    ``i`` with ``i % processes == rank`` into its part file ``DIR/rankings.jsonl.parts/``; at the end process 0
    writes ``rankings.jsonl`` and ``pairs.jsonl`` in prompt order. A prompt in a part file of a killed run with the
    same settings, prompts and reward (any process count) is not sampled again; parts of other settings are dropped."""
    from ..data.feedback import LABEL_FILE

    if k < 2:
        raise ValueError(f"k must be at least 2 to form pairs, got {k}")
    shard = shard or current_shard()
    out = Path(out)
    rankings_file = out / RANKINGS_FILE
    settings = dict(model=model, k=k, steps=steps, guidance=guidance, eta=eta, resolution=resolution, seed=seed)
    job = fingerprint([settings, trajectories, reward_id or _reward_id(reward), prompts])
    with process_group(shard) as group:
        if shard.is_main:  # before the others pass check_same, so before any of them writes
            for name in (RANKINGS_FILE, PAIRS_FILE):  # as a single run always did: no stale rankings beside new images
                (out / name).unlink(missing_ok=True)
            drop_other_jobs(rankings_file, job)
        group.check_same(job, "the prompts and settings")
        (out / "images").mkdir(parents=True, exist_ok=True)
        if trajectories and shard.is_main:
            (out / LABEL_FILE).write_text(json.dumps(settings, indent=2) + "\n")
        done = _labelled(out, job)
        mine = shard.take(prompts)
        n_pairs = sum(len(done[i]["pairs"]) for i, _ in mine if i in done)
        handle = open_part(rankings_file, shard)
        try:
            for i, prompt in mine:
                if i in done:
                    continue
                ranking, pairs = _label_prompt(
                    policy, reward, prompt, i, k, out, steps, guidance, eta, resolution, seed, trajectories
                )
                handle.write(json.dumps({"job": job, "index": i, "ranking": ranking, "pairs": pairs}) + "\n")
                handle.flush()
                n_pairs += len(pairs)
        finally:
            close_part(handle)
        n_pairs = sum(group.gather(n_pairs))  # every process has finished its prompts after this
        if shard.is_main:
            _merge(out, job, len(prompts))
        group.gather(None)  # when any process returns, the two files are whole
    return {"prompts": len(prompts), "images": len(prompts) * k, "pairs": n_pairs}


def _reward_id(reward: Any) -> str:
    """A reward's name for the job's identity: ``name:weight,...`` for a weighted sum."""
    if hasattr(reward, "rewards") and hasattr(reward, "weights"):
        return ",".join(f"{_reward_id(r)}:{w}" for r, w in zip(reward.rewards, reward.weights))
    return str(getattr(reward, "name", type(reward).__qualname__))


def _labelled(out: Path, job: str) -> dict[int, dict[str, Any]]:
    """Prompts already labelled by this job in a part file (of any process count) whose files are all there."""
    done: dict[int, dict[str, Any]] = {}
    for part in job_rows(out / RANKINGS_FILE, job):
        row = part.row
        try:
            ranking, index = row["ranking"], int(row["index"])
            if not isinstance(row["pairs"], list):
                raise TypeError("pairs")
            files = [*ranking["images"], *([ranking["trajectory"]] if "trajectory" in ranking else [])]
            if all((out / name).is_file() for name in files):
                done.setdefault(index, row)
        except (KeyError, TypeError, ValueError):
            raise MMAlignError(f"{part.path}: line {part.line} is not a labelled prompt") from None
    return done


def _merge(out: Path, job: str, n_prompts: int) -> None:
    """``rankings.jsonl`` and ``pairs.jsonl`` from the part files, in prompt order, each written at once; then
    the part files go. A kill in between leaves the parts, and the re-run writes both files again from them."""
    done = _labelled(out, job)
    missing = [i for i in range(n_prompts) if i not in done]
    if missing:
        raise MMAlignError(
            f"{parts_dir(out / RANKINGS_FILE)}: no result for prompt(s) {missing[:10]} although every process "
            "finished; re-run the same command"
        )
    rows = [done[i] for i in range(n_prompts)]
    write_atomic(out / RANKINGS_FILE, [(json.dumps(row["ranking"]) + "\n").encode() for row in rows])
    write_atomic(out / PAIRS_FILE, [(json.dumps(pair) + "\n").encode() for row in rows for pair in row["pairs"]])
    remove_parts(out / RANKINGS_FILE)


def _label_prompt(
    policy: Any,
    reward: Any,
    prompt: str,
    i: int,
    k: int,
    out: Path,
    steps: int,
    guidance: float,
    eta: float,
    resolution: int,
    seed: int,
    trajectories: bool,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Prompt ``i``'s K samples (generator seed ``seed + i``), saved and scored: its rankings row and pair rows."""
    import torch

    from ..data.feedback import TRAJECTORY_DIR, save_trajectories
    from ..modalities.image import tensor_to_pil
    from ..models import sampling

    def predict(noisy, timesteps, embeds, time_ids):
        return policy.predict(policy.unet, noisy, timesteps, embeds, time_ids)

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
    ranking: dict[str, Any] = {"prompt": prompt, "images": names, "scores": scores, "ranking": order}
    if trajectories:
        ranking["trajectory"] = f"{TRAJECTORY_DIR}/{i:05d}.safetensors"
        save_trajectories(
            out / ranking["trajectory"],
            trajectory.latents,
            trajectory.log_probs,
            trajectory.schedule.timesteps,
            {"prompt": prompt},
        )
    pairs = []
    for a, b in itertools.combinations(range(k), 2):
        if scores[a] == scores[b]:
            continue
        w, l = (a, b) if scores[a] > scores[b] else (b, a)
        pairs.append(
            {
                "prompt": prompt,
                "chosen": names[w],
                "rejected": names[l],
                "score_chosen": scores[w],
                "score_rejected": scores[l],
            }
        )
    return ranking, pairs


def run(args: argparse.Namespace) -> int:
    from ..models.policy import DiffusionPolicy
    from ..trainers.online import build_reward, read_prompts

    shard = current_shard()  # under torchrun / accelerate launch: this process's share of the prompts
    reward = build_reward(args.reward, args.reward_weights)
    for member in reward.rewards:  # refused before any sampling: label samples images from an image pipeline
        if getattr(member, "modality", "image") != "image":
            raise MMAlignError(
                f"mmalign label samples images; {member.name} scores {member.modality}. Score generated "
                f"{member.modality} files with `mmalign score --reward {member.name}`, or train an audio generator "
                f"online with reward={member.name}"
            )
    policy = DiffusionPolicy.from_pretrained(args.model, device=shard.device(args.device))
    reward = reward.to(policy.device)
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
        reward_id=f"{args.reward}|{args.reward_weights or ''}",
        shard=shard,
    )
    if not shard.is_main:
        return 0  # process 0 reports the whole job
    print(json.dumps({"out": args.out, **summary}), file=sys.stderr)
    return 0
