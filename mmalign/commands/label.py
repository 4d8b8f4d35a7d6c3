"""``mmalign label``: AI-feedback labelling. K samples per prompt from a pipeline, scored by a reward; writes
the images, ``rankings.jsonl`` (one line per prompt) and ``pairs.jsonl`` (every pair of differing scores,
``{"prompt", "chosen", "rejected", "score_chosen", "score_rejected"}``, paths relative to DIR) that
``mmalign train data=DIR/pairs.jsonl`` reads directly (the RLAIF recipe of D3PO/Diffusion-DPO style pairs).

With ``--trajectories`` the K samples of a prompt share x_T (D3PO's sampling protocol) and each prompt's DDIM
chains are kept in ``DIR/trajectories/`` with the sampler settings in ``DIR/label.json``: ``mmalign train
trainer=d3po feedback=DIR [human=SCORES]`` then trains D3PO on them from human scores (or from the reward's);
formats in :mod:`mmalign.data.feedback`.

Every generator labels (:func:`mmalign.models.generator.load_generator`; ``--frames``, ``--duration``,
``--views-grid RxC`` as the trainers' keys): UNet image generators by stochastic DDIM (``--eta``) as above, the
others (flow matching, Wan and AnimateDiff videos, Stable Audio, view grids) by their deterministic sampler from K
noise seeds (sample ``j`` of prompt ``i``: seed ``seed + i + j·1000003``, as ``mmalign generate``'s candidates).
Videos are written to ``DIR/videos/`` (lossless FFV1 ``.mkv``), audio to ``DIR/audio/`` (float ``.wav``), view sets
as grid PNGs; image rewards are lifted to videos and view sets, audio rewards told the sample rate, and each file
is scored as it was saved. The pairs are the video / audio pairs ``mmalign train`` reads (Flow-DPO on Wan,
Diffusion-DPO on Stable Audio)."""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from functools import partial
from pathlib import Path
from typing import Any

from ..errors import ConfigError, MMAlignError
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
from ._generator_args import add_generator_args, load_generator_from_args

RANKINGS_FILE, PAIRS_FILE = "rankings.jsonl", "pairs.jsonl"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "label",
        help="sample K images per prompt, score them with a reward, write rankings and preference pairs",
        description="AI feedback: `mmalign label --model PIPELINE --reward NAME --prompts FILE --k 4 --out DIR`, "
        "then `mmalign train data=DIR/pairs.jsonl`.",
    )
    add_generator_args(
        p, "sampler steps (DDIM for UNet image generators; the deterministic sampler of the others, from K seeds)"
    )
    p.add_argument("--k", type=int, default=4, help="samples per prompt (at least 2)")
    p.add_argument("--eta", type=float, default=1.0, help="DDIM η of UNet image generators")
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
    fps: int = 8,
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
    from ..modalities.writers import MediaFiles, media_folder

    if k < 2:
        raise ValueError(f"k must be at least 2 to form pairs, got {k}")
    files = MediaFiles.of(policy, fps)
    unet_images = is_unet_image_generator(policy)
    if trajectories and not unet_images:
        raise ConfigError(
            f"--trajectories keeps DDIM chains for D3PO, which trains UNet image generators; "
            f"{type(policy).__name__} makes {files.modality} by parametrisation "
            f"{getattr(policy, 'parametrisation', 'diffusion')!r}"
        )
    shard = shard or current_shard()
    out = Path(out)
    rankings_file = out / RANKINGS_FILE
    settings: dict[str, Any] = dict(
        model=model, k=k, steps=steps, guidance=guidance, eta=eta, resolution=resolution, seed=seed
    )
    if not unet_images:  # (the UNet image jobs keep the identity they had before other generators)
        settings.update(eta=None, sampler=getattr(policy, "parametrisation", "diffusion"))
        settings["media"] = files.settings(policy)
    reward_id = reward_id or _reward_id(reward)
    job = fingerprint([settings, trajectories, reward_id, prompts])
    if unet_images:
        label_prompt = partial(
            _label_prompt,
            policy,
            reward,
            k=k,
            out=out,
            steps=steps,
            guidance=guidance,
            eta=eta,
            resolution=resolution,
            seed=seed,
            trajectories=trajectories,
        )
    else:
        from ..models.noise_opt import NoiseSampler
        from .generate import for_generator

        label_prompt = partial(
            _label_media_prompt,
            NoiseSampler(policy, steps, guidance, resolution),
            for_generator(reward, files),
            k=k,
            out=out,
            seed=seed,
            files=files,
        )
    with process_group(shard) as group:
        if shard.is_main:  # before the others pass check_same, so before any of them writes
            for name in (RANKINGS_FILE, PAIRS_FILE):  # as a single run always did: no stale rankings beside new images
                (out / name).unlink(missing_ok=True)
            drop_other_jobs(rankings_file, job)
        group.check_same(job, "the prompts and settings")
        (out / media_folder(files.modality)).mkdir(parents=True, exist_ok=True)
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
                ranking, pairs = label_prompt(prompt, i)
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


def is_unet_image_generator(policy: Any) -> bool:
    """Whether ``policy`` is a UNet image generator (SD 1.x/2.x, SDXL): those label by stochastic DDIM (``eta``)
    and can keep their chains for D3PO; every other generator labels by :class:`~mmalign.models.noise_opt.
    NoiseSampler`'s deterministic sampler from K seeds."""
    return (
        getattr(policy, "parametrisation", "diffusion") == "diffusion"
        and getattr(policy, "modality", "image") == "image"
        and hasattr(policy, "unet")
    )


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
    """Prompt ``i``'s K samples of a UNet image generator (generator seed ``seed + i``), saved and scored: its
    rankings row and pair rows."""
    import torch

    from ..data.feedback import TRAJECTORY_DIR, save_trajectories
    from ..models import sampling
    from .generate import save_media, score_saved

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
    names = [f"images/{i:05d}_{j:02d}.png" for j in range(k)]
    # score what was saved, with each reward's reference preprocessing when it has one
    scores = score_saved(reward, images, save_media(images, names, out), prompt)
    ranking, pairs = rank(prompt, names, scores)
    if trajectories:
        ranking["trajectory"] = f"{TRAJECTORY_DIR}/{i:05d}.safetensors"
        save_trajectories(
            out / ranking["trajectory"],
            trajectory.latents,
            trajectory.log_probs,
            trajectory.schedule.timesteps,
            {"prompt": prompt},
        )
    return ranking, pairs


def _label_media_prompt(
    sampler: Any, reward: Any, prompt: str, i: int, k: int, out: Path, seed: int, files: Any
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Prompt ``i``'s K samples of any other generator: the deterministic sampler from the noise of candidate seeds
    ``seed + i + j·1000003`` (sample 0 is plain sampling with seed ``seed + i``, as ``mmalign generate``'s
    candidates), saved in the modality's format and scored on what the files hold."""
    import torch

    from ..models.noise_opt import candidate_seed, initial_noise
    from .generate import save_media, score_saved

    noise = initial_noise(sampler.latent_shape, [candidate_seed(seed, i, j) for j in range(k)])
    with torch.no_grad():
        media = sampler.media(noise, prompt).cpu()
    names = [files.name(f"{i:05d}_{j:02d}") for j in range(k)]
    return rank(prompt, names, score_saved(reward, media, save_media(media, names, out, files), prompt))


def rank(prompt: str, names: list[str], scores: list[float]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A prompt's rankings row (best first) and its pairs: every two samples of different scores, the higher
    chosen."""
    k = len(names)
    order = sorted(range(k), key=lambda j: -scores[j])
    ranking: dict[str, Any] = {"prompt": prompt, "images": names, "scores": scores, "ranking": order}
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
    from ..trainers.online import build_reward, read_prompts

    shard = current_shard()  # under torchrun / accelerate launch: this process's share of the prompts
    policy = load_generator_from_args(args, shard.device(args.device))
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
        reward_id=f"{args.reward}|{args.reward_weights or ''}",
        shard=shard,
        fps=args.fps,
    )
    if not shard.is_main:
        return 0  # process 0 reports the whole job
    print(json.dumps({"out": args.out, **summary}), file=sys.stderr)
    return 0
