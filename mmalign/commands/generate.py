"""``mmalign generate``: best-of-N sampling and reward-guided noise optimisation at inference.

``mmalign generate --model PIPELINE --reward SPEC --prompts FILE --n 4 --out DIR`` samples N candidates per prompt
from any generator of the project (:func:`mmalign.models.generator.load_generator`: SD/SDXL UNets and AnimateDiff
by DDIM with η = 0, flow-matching transformers and Wan by the Euler ODE, Stable Audio by its DPM-Solver++ without
step noise; ``--frames``, ``--duration`` and ``--views-grid RxC`` as the trainers' keys;
:class:`mmalign.models.noise_opt.NoiseSampler`), scores
them with the reward (a name, a weighted list ``hpsv2.1:1.0,aesthetic:0.5`` or a served ``http://HOST:PORT/NAME``,
as ``mmalign label`` reads it) and keeps the best. ``--noise-opt-steps K`` then optimises the best candidate's
initial noise by K gradient steps of ReNO (:func:`mmalign.models.noise_opt.optimise_noise`; differentiable rewards
only) and keeps the best of all images. Writes

* ``DIR/images/IIIII_JJ.png``: every candidate (``JJ`` < N), and ``DIR/images/IIIII_optKK.png`` the noise
  optimisation's iterates (``KK`` = 1 … K); videos go to ``DIR/videos/…mkv`` (lossless FFV1, ``--fps``), audio to
  ``DIR/audio/…wav`` (32-bit float), view sets to ``DIR/images/`` as their grid PNG
  (:mod:`mmalign.modalities.writers`); image rewards are lifted to videos and view sets, audio rewards told the
  sample rate (:func:`~mmalign.trainers.online.for_modality`), and other media are scored on what the files hold;
* ``DIR/best/IIIII.png`` (``.mkv``, ``.wav``): the chosen candidate of prompt ``IIIII``;
* ``DIR/scores.jsonl``: one line per prompt, in prompt order: ``{"prompt", "images", "scores", "seeds",
  "chosen", "best", "n", "noise_opt", "generator_calls"}``. ``images`` / ``scores`` list the N candidates then
  the K iterates (all scored the same way: the reward's reference preprocessing of the saved PNG, as ``mmalign
  label`` scores, when the reward has one, else its tensor path); ``chosen`` is the index of the best in them
  (the first on ties); ``seeds`` the candidates' noise seeds (:func:`~mmalign.models.noise_opt.candidate_seed`);
  ``noise_opt`` ``null`` or ``{"steps", "from", "lr", "reg", "clip", "objective_rewards", "losses"}`` (``from``:
  the candidate optimised; the objective's reward, tensor path, per iterate z_0 … z_K); ``generator_calls``
  ``{"forward": F, "backward": B, "total": F + B, "steps": S}``: whole sampler chains of S network evaluations each
  (a backward chain costs about twice a forward one).

Resumable like ``mmalign label`` (:mod:`mmalign.sharding`): each process appends finished prompts to its part file
``DIR/scores.jsonl.parts/``; a re-run with the same settings, prompts and reward skips the prompts whose files are
all there, whether a killed run left them in part files or a finished run in ``scores.jsonl`` (whose job, the
settings and the reward, ``DIR/generate.json`` records); process 0 merges the parts into ``scores.jsonl`` at the
end; under ``torchrun`` / ``accelerate launch``
the prompts are split across processes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
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
from .label import _reward_id

SCORES_FILE, JOB_FILE = "scores.jsonl", "generate.json"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="best-of-N sampling by a reward, optionally with reward-guided noise optimisation (ReNO)",
        description="`mmalign generate --model PIPELINE --reward SPEC --prompts FILE --n 4 --out DIR`: N candidates "
        "per prompt, all scored; the best in DIR/best/, every score in DIR/scores.jsonl. Re-running skips finished "
        "prompts.",
    )
    add_generator_args(p, "sampler steps (DDIM η=0 for UNets, Euler ODE for flow, DPM-Solver++ for Stable Audio)")
    p.add_argument(
        "--n",
        "--num-candidates",
        dest="n",
        type=int,
        default=4,
        help="candidates per prompt (at least 1); under torchrun write --num-candidates (its parser reads --n as an "
        "abbreviation of its own options)",
    )
    p.add_argument("--batch-size", type=int, default=16, help="candidates sampled in one batch")
    p.add_argument(
        "--noise-opt-steps",
        type=int,
        default=0,
        help="ReNO gradient steps on the best candidate's initial noise (0: off; needs a differentiable reward)",
    )
    # defaults (None): ReNO's, mmalign.models.noise_opt.RENO_LR / RENO_REG / RENO_CLIP (torch is not imported here)
    p.add_argument("--noise-opt-lr", type=float, help="SGD learning rate (default: ReNO's 5)")
    p.add_argument("--noise-opt-reg", type=float, help="weight of ReNO's noise-norm regulariser (default 0.01)")
    p.add_argument("--noise-opt-clip", type=float, help="gradient-norm clip on the noise (default: ReNO's 0.1)")
    p.set_defaults(func=run)


def check_reward(reward: Any, noise_opt_steps: int, spec: str | None = None) -> None:
    """Refuse noise optimisation with a reward that is not differentiable (a verifiable judge, a served reward)."""
    if noise_opt_steps > 0 and not bool(getattr(reward, "is_differentiable", False)):
        what = spec or _reward_id(reward)
        raise ConfigError(
            f"--noise-opt-steps {noise_opt_steps}: noise optimisation backpropagates through the reward, and "
            f"{what!r} is not differentiable (a judge, a served http:// reward or a reward without gradients); "
            "use a differentiable reward, or best-of-N alone (--noise-opt-steps 0)"
        )


def generate(
    generator: Any,
    reward: Any,
    prompts: list[str],
    n: int,
    out: str | Path,
    steps: int = 50,
    guidance: float = 7.5,
    resolution: int = 512,
    seed: int = 0,
    noise_opt_steps: int = 0,
    noise_opt_lr: float | None = None,
    noise_opt_reg: float | None = None,
    noise_opt_clip: float | None = None,
    batch_size: int = 16,
    fps: int = 8,
    model: str = "",
    reward_id: str | None = None,
    shard: Shard | None = None,
) -> dict[str, int]:
    """Best-of-``n`` (and optionally ReNO) for every prompt; writes the files of the module docstring and returns
    ``{"prompts", "images", "forward", "backward"}`` (the chains of this call, skipped prompts not counted).

    ``generator``: an image generator (:class:`~mmalign.models.policy.DiffusionPolicy` or a flow-matching one);
    ``reward``: a :class:`~mmalign.trainers.online.WeightedReward` or Reward (``score_images`` and a tensor path),
    or any ``reward(images [K, 3, H, W] in [0, 1], prompts) -> [K]`` (with ``is_differentiable`` for noise
    optimisation). Candidate ``j`` of prompt ``i`` starts from the noise of seed ``seed + i + j·1000003``, so
    candidate 0 is plain sampling with seed ``seed + i``, whichever process samples it."""
    from ..models.noise_opt import RENO_CLIP, RENO_LR, RENO_REG, NoiseSampler

    if n < 1:
        raise ConfigError(f"--n must be at least 1, got {n}")
    if noise_opt_steps < 0:
        raise ConfigError(f"--noise-opt-steps must be 0 (off) or more, got {noise_opt_steps}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    check_reward(reward, noise_opt_steps, reward_id)
    opt = {
        "steps": int(noise_opt_steps),
        "lr": float(RENO_LR if noise_opt_lr is None else noise_opt_lr),
        "reg": float(RENO_REG if noise_opt_reg is None else noise_opt_reg),
        "clip": float(RENO_CLIP if noise_opt_clip is None else noise_opt_clip),
    }
    from ..modalities.writers import MediaFiles, media_folder

    sampler = NoiseSampler(generator, steps, guidance, resolution)
    files = MediaFiles.of(generator, fps)
    reward_id = reward_id or _reward_id(reward)
    reward = for_generator(reward, files)
    shard = shard or current_shard()
    out = Path(out)
    scores_file = out / SCORES_FILE
    settings = dict(model=model, n=n, steps=steps, guidance=guidance, resolution=resolution, seed=seed, opt=opt)
    if files.modality != "image":  # (image jobs keep the identity they had before other modalities)
        settings["media"] = files.settings(generator)
    job = fingerprint([settings, reward_id, prompts])
    counts = {"forward": 0, "backward": 0}
    with process_group(shard) as group:
        if shard.is_main:  # before the others pass check_same, so before any of them writes
            if _job_of(out) != job:  # a finished output of other settings: not this job's
                scores_file.unlink(missing_ok=True)
                (out / JOB_FILE).unlink(missing_ok=True)
            drop_other_jobs(scores_file, job)
        group.check_same(job, "the prompts and settings")
        (out / media_folder(files.modality)).mkdir(parents=True, exist_ok=True)
        (out / "best").mkdir(parents=True, exist_ok=True)
        done = _finished(out, job)
        handle = open_part(scores_file, shard)
        try:
            for i, prompt in shard.take(prompts):
                if i in done:
                    continue
                row = _generate_prompt(sampler, reward, prompt, i, n, out, seed, opt, batch_size, files)
                for key in counts:
                    counts[key] += row["generator_calls"][key]
                handle.write(json.dumps({"job": job, "index": i, "row": row}) + "\n")
                handle.flush()
        finally:
            close_part(handle)
        totals = group.gather(counts)  # every process has finished its prompts after this
        if shard.is_main:
            _merge(out, job, len(prompts), {**settings, "reward": reward_id})
        group.gather(None)  # when any process returns, scores.jsonl is whole
    images = len(prompts) * (n + noise_opt_steps)
    return {"prompts": len(prompts), "images": images, **{k: sum(t[k] for t in totals) for k in counts}}


def for_generator(reward: Any, files: Any) -> Any:
    """A weighted reward spec made to score what the generator makes (:func:`~mmalign.trainers.online.for_modality`:
    image rewards lifted to videos and view sets, audio rewards told the sample rate; a reward of another modality
    refused by name); plain callables as they are."""
    if not (hasattr(reward, "rewards") and hasattr(reward, "weights")):
        return reward
    from ..trainers.online import for_modality

    return for_modality(reward, files.modality, files.sample_rate)


def save_media(media: Any, names: list[str], out: Path, files: Any = None) -> Any:
    """Write the media (``files``: a :class:`~mmalign.modalities.writers.MediaFiles`; None: images); returns what
    scores them: the saved Pillow images for images (so a reward scores them with its reference preprocessing),
    else the tensor the files hold."""
    if files is not None and files.modality != "image":
        return files.write(out, names, media)
    from ..modalities.image import tensor_to_pil

    pictures = [tensor_to_pil(image.cpu()) for image in media]
    for name, picture in zip(names, pictures):
        picture.save(out / name)
    return pictures


def score_saved(reward: Any, media: Any, saved: Any, prompt: str) -> list[float]:
    """Scores of saved media: the reward's reference preprocessing of the saved pictures when it has one (images),
    else its tensor path on what the files hold (``saved``, or ``media`` for pictures without it)."""
    import torch

    count = len(saved)
    with torch.no_grad():
        if isinstance(saved, list) and hasattr(reward, "score_images"):
            raw = reward.score_images(saved, [prompt] * count)
        else:
            raw = reward(media if isinstance(saved, list) else saved, [prompt] * count)
    return [float(s) for s in raw]


def _generate_prompt(
    sampler: Any,
    reward: Any,
    prompt: str,
    i: int,
    n: int,
    out: Path,
    seed: int,
    opt: dict[str, Any],
    batch_size: int,
    files: Any,
) -> dict[str, Any]:
    """Prompt ``i``: its N candidates (and the noise optimisation's iterates), saved, scored, the best copied."""
    import torch

    from ..models.noise_opt import candidate_seed, initial_noise, optimise_noise

    seeds = [candidate_seed(seed, i, j) for j in range(n)]
    noise = initial_noise(sampler.latent_shape, seeds)
    names = [files.name(f"{i:05d}_{j:02d}") for j in range(n)]
    forward = backward = 0
    result = None
    if opt["steps"] and n == 1:  # the optimisation's first forward chain is the candidate: not run twice
        result = optimise_noise(sampler, reward, prompt, noise, opt["steps"], opt["lr"], opt["reg"], opt["clip"])
        candidates = result.images[:1]
    else:
        parts = []
        with torch.no_grad():
            for start in range(0, n, batch_size):
                parts.append(sampler.media(noise[start : start + batch_size], prompt).cpu())
        candidates = torch.cat(parts)
        forward += n
    scores = score_saved(reward, candidates, save_media(candidates, names, out, files), prompt)
    start = max(range(n), key=lambda j: scores[j])
    noise_opt = None
    if opt["steps"]:
        if result is None:
            result = optimise_noise(
                sampler, reward, prompt, noise[start : start + 1], opt["steps"], opt["lr"], opt["reg"], opt["clip"]
            )
        forward, backward = forward + result.forward_chains, backward + result.backward_chains
        iterate_names = [files.name(f"{i:05d}_opt{k:02d}") for k in range(1, opt["steps"] + 1)]
        iterates = result.images[1:]
        scores += score_saved(reward, iterates, save_media(iterates, iterate_names, out, files), prompt)
        names += iterate_names
        noise_opt = {**opt, "from": start, "objective_rewards": result.rewards, "losses": result.losses}
    chosen = max(range(len(scores)), key=lambda j: scores[j])
    best = files.name(f"{i:05d}", "best")
    shutil.copyfile(out / names[chosen], out / best)
    return {
        "prompt": prompt,
        "images": names,
        "scores": scores,
        "seeds": seeds,
        "chosen": chosen,
        "best": best,
        "n": n,
        "noise_opt": noise_opt,
        "generator_calls": {
            "forward": forward,
            "backward": backward,
            "total": forward + backward,
            "steps": sampler.steps,
        },
    }


def _job_of(out: Path) -> str | None:
    """The job whose ``scores.jsonl`` the folder holds (``DIR/generate.json``), or None."""
    try:
        return json.loads((out / JOB_FILE).read_text()).get("job")
    except (OSError, ValueError, AttributeError):
        return None


def _finished(out: Path, job: str) -> dict[int, dict[str, Any]]:
    """Prompts already done by this job, in ``scores.jsonl`` (a finished run of the same job) or in a part file
    (of any process count), whose files are all there."""
    done: dict[int, dict[str, Any]] = {}
    if _job_of(out) == job and (out / SCORES_FILE).is_file():
        for index, line in enumerate((out / SCORES_FILE).read_text().splitlines()):
            result = json.loads(line)
            if all((out / name).is_file() for name in [*result["images"], result["best"]]):
                done[index] = result
    for part in job_rows(out / SCORES_FILE, job):
        row = part.row
        try:
            result, index = row["row"], int(row["index"])
            files = [*result["images"], result["best"]]
            if all((out / name).is_file() for name in files):
                done.setdefault(index, result)
        except (KeyError, TypeError, ValueError):
            raise MMAlignError(f"{part.path}: line {part.line} is not a generated prompt") from None
    return done


def _merge(out: Path, job: str, n_prompts: int, settings: dict[str, Any]) -> None:
    """``scores.jsonl`` from the part files, in prompt order, written at once; then the part files go."""
    done = _finished(out, job)
    missing = [i for i in range(n_prompts) if i not in done]
    if missing:
        raise MMAlignError(
            f"{parts_dir(out / SCORES_FILE)}: no result for prompt(s) {missing[:10]} although every process "
            "finished; re-run the same command"
        )
    # the job first: a kill before scores.jsonl is whole leaves an older scores.jsonl of this same job (the start
    # of a job deletes any other job's), never another job's under this one's name
    write_atomic(out / JOB_FILE, [json.dumps({"job": job, **settings}, indent=2).encode() + b"\n"])
    write_atomic(out / SCORES_FILE, [(json.dumps(done[i]) + "\n").encode() for i in range(n_prompts)])
    remove_parts(out / SCORES_FILE)


def run(args: argparse.Namespace) -> int:
    from ..trainers.online import build_reward, read_prompts

    shard = current_shard()  # under torchrun / accelerate launch: this process's share of the prompts
    prompts = read_prompts(args.prompts)
    reward = build_reward(args.reward, args.reward_weights)
    check_reward(reward, args.noise_opt_steps, args.reward)  # before the generator loads
    generator = load_generator_from_args(args, shard.device(args.device))
    reward.to(generator.device)
    summary = generate(
        generator,
        reward,
        prompts,
        args.n,
        args.out,
        steps=args.steps,
        guidance=args.guidance,
        resolution=args.resolution,
        seed=args.seed,
        noise_opt_steps=args.noise_opt_steps,
        noise_opt_lr=args.noise_opt_lr,
        noise_opt_reg=args.noise_opt_reg,
        noise_opt_clip=args.noise_opt_clip,
        batch_size=args.batch_size,
        fps=args.fps,
        model=args.model,
        reward_id=f"{args.reward}|{args.reward_weights or ''}",
        shard=shard,
    )
    if not shard.is_main:
        return 0  # process 0 reports the whole job
    print(json.dumps({"out": args.out, **summary}), file=sys.stderr)
    return 0
