"""Parity of :mod:`mmalign.trainers.losses.nft` with NVlabs/DiffusionNFT's own code.

    PYTHONPATH=. .venv/bin/python benchmarks/parity_diffusionnft.py [--mirror /path/to/DiffusionNFT/git-dir]

The reference is read from a bare git mirror of NVlabs/DiffusionNFT (default ``/work/.mirror/NVlabs+DiffusionNFT/
repo``, the ``fetch`` tool's copy; ``git show <rev>:<path>``) at run time; nothing of it is copied into mmalign:

* the loss is inline in ``scripts/train_nft_sd3.py``'s training loop, so the exact lines from
  ``advantages_clip = torch.clamp(`` to ``loss_terms["total_loss"] = loss.detach()`` (lines 910-980 at commit
  24af5554) are cut out of the file, dedented and compiled as the body of a function whose arguments are the
  names those lines read (``train_sample_batch``, ``j_idx``, ``config``, ``x0``, ``xt``, ``t_expanded``,
  ``forward_prediction``, ``old_prediction``, ``ref_forward_prediction``); ``config`` is a namespace with the
  ``config/nft.py`` values;
* the per-sample timestep permutation is cut out the same way (the statement ``perms_time = torch.stack(...)``,
  lines 810-812) and run on the global RNG; mmalign's :func:`nft_timestep_indices` gets a ``torch.Generator``
  with the same seed (the same CPU stream);
* ``return_decay`` (the old policy's decay schedule) is taken from the same file with ``ast``;
* ``flow_grpo/stat_tracking.py`` (numpy only) is loaded with ``importlib`` from a temporary copy and fed the
  rewards repeated over the 9 trained timesteps, as the script does (``[N, num_train_timesteps]``).

On fixed seeded tensors (latents ``[6, 16, 32, 32]``, σ drawn from SD3's shift-3 10-step schedule, r from a
reward batch of 48 prompts × 24 images) it compares the loss, every logged term and the gradient with respect to
the trained velocity, in float32 and float64, for β = 1 and β = 0.1. (The reference's logged ``policy_loss``
is the total loss: ``loss = policy_loss; loss += β·KL`` adds in place to the tensor it logged; it is compared
with mmalign's ``loss``, and mmalign's ``policy_loss`` with it minus 1e-4·KL.) Prints the max |Δ| per
quantity, saves them to ``benchmarks/results/parity_diffusionnft.json`` and exits non-zero if a float64
difference exceeds 1e-12 or a float32 one 1e-5 (relative), or an index or decay differs. Used by hand: the
test suite does not depend on it.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from types import SimpleNamespace

import torch

from mmalign.trainers.losses import (
    diffusion_nft_loss,
    nft_old_decay,
    nft_optimality,
    nft_optimality_from_advantages,
    nft_timestep_indices,
)

MIRROR = Path("/work/.mirror/NVlabs+DiffusionNFT/repo")
SCRIPT = "scripts/train_nft_sd3.py"
RESULTS = Path(__file__).resolve().parent / "results" / "parity_diffusionnft.json"
LOSS_ARGS = (
    "train_sample_batch",
    "j_idx",
    "config",
    "x0",
    "xt",
    "t_expanded",
    "forward_prediction",
    "old_prediction",
    "ref_forward_prediction",
)


def git_show(mirror: Path, rev: str, path: str) -> str:
    return subprocess.run(
        ["git", "--git-dir", str(mirror), "show", f"{rev}:{path}"], check=True, capture_output=True, text=True
    ).stdout


def cut(source: str, first: str, last: str | None = None) -> tuple[str, int, int]:
    """The lines from the one containing ``first`` to the next containing ``last`` (inclusive; without ``last``:
    to the line where the statement's brackets close), dedented; also their 1-based first and last line."""
    lines = source.splitlines()
    start = next(i for i, line in enumerate(lines) if first in line)
    if last is not None:
        end = next(i for i in range(start, len(lines)) if last in lines[i])
    else:
        depth, end = 0, start
        for end in range(start, len(lines)):
            depth += sum(lines[end].count(c) for c in "([{") - sum(lines[end].count(c) for c in ")]}")
            if depth == 0:
                break
    return textwrap.dedent("\n".join(lines[start : end + 1])), start + 1, end + 1


def compile_function(name: str, args: tuple[str, ...], body: str, returns: str, namespace: dict):
    code = f"def {name}({', '.join(args)}):\n" + textwrap.indent(body, "    ") + f"\n    return {returns}\n"
    exec(compile(code, f"<{SCRIPT}:{name}>", "exec"), namespace)
    return namespace[name]


def load_reference(mirror: Path, rev: str) -> dict:
    source = git_show(mirror, rev, SCRIPT)
    namespace = {"torch": torch}
    body, first, last = cut(source, "advantages_clip = torch.clamp(", 'loss_terms["total_loss"] = loss.detach()')
    loss_fn = compile_function(
        "reference_loss", LOSS_ARGS, "loss_terms = {}\n" + body, "loss, loss_terms, r", namespace
    )
    perm_body, perm_first, perm_last = cut(source, "perms_time = torch.stack(")
    perm_fn = compile_function(
        "reference_perms",
        ("num_timesteps_filtered", "total_batch_size_filtered", "device"),
        perm_body,
        "perms_time",
        namespace,
    )
    tree = ast.parse(source)
    decay_def = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "return_decay")
    exec(compile(ast.Module(body=[decay_def], type_ignores=[]), f"<{SCRIPT}:return_decay>", "exec"), namespace)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "stat_tracking.py"
        path.write_text(git_show(mirror, rev, "flow_grpo/stat_tracking.py"))
        spec = importlib.util.spec_from_file_location("diffusionnft_stat_tracking", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return {
        "loss": loss_fn,
        "loss_lines": f"{SCRIPT}:{first}-{last}",
        "perms": perm_fn,
        "perm_lines": f"{SCRIPT}:{perm_first}-{perm_last}",
        "decay": namespace["return_decay"],
        "tracker": module.PerPromptStatTracker,
    }


def sd3_sigmas(num_steps: int = 10, shift: float = 3.0) -> torch.Tensor:
    """The 10 sampling σ of SD3's FlowMatchEulerDiscreteScheduler (shift 3), as ``timesteps / 1000``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(num_steps)
    return scheduler.timesteps.double() / 1000.0


def rel_diff(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[float, float]:
    ours, theirs = torch.as_tensor(ours).double(), torch.as_tensor(theirs).double()
    diff = (ours - theirs).abs().max().item()
    return diff, diff / max(theirs.abs().max().item(), 1e-30)


def optimality_parity(ref: dict, results: dict) -> None:
    gen = torch.Generator().manual_seed(1)
    prompts = [f"prompt {i % 48}" for i in range(48 * 24)]
    rewards = torch.rand(len(prompts), generator=gen, dtype=torch.float64) ** 3
    k = 9
    for global_std in (True, False):
        advantages = ref["tracker"](global_std).update(prompts, rewards[:, None].repeat(1, k).numpy())
        batch = {"advantages": torch.from_numpy(advantages)}
        for mode in ("all", "positive_only", "negative_only", "one_only", "binary"):
            config = SimpleNamespace(beta=1.0, train=SimpleNamespace(adv_clip_max=5, adv_mode=mode, beta=1e-4))
            x = torch.zeros(len(prompts), 1, 1, 1, dtype=torch.float64)
            worst = 0.0
            for j in range(k):
                _, _, r_ref = ref["loss"](batch, j, config, x, x, x + 0.5, x, x, x)
                ours = nft_optimality(rewards, prompts, global_std=global_std, adv_mode=mode)
                worst = max(worst, rel_diff(ours, r_ref)[0])
            results[f"optimality r (global_std={global_std}, adv_mode={mode}, float64)"] = {"max_abs": worst}
    advantages = torch.linspace(-8, 8, 161, dtype=torch.float64)
    config = SimpleNamespace(beta=1.0, train=SimpleNamespace(adv_clip_max=5, adv_mode="all", beta=1e-4))
    x = torch.zeros(161, 1, dtype=torch.float64)
    _, _, r_ref = ref["loss"]({"advantages": advantages[:, None]}, 0, config, x, x, x, x, x, x)
    results["optimality r from advantages in [-8, 8]"] = {
        "max_abs": rel_diff(nft_optimality_from_advantages(advantages), r_ref)[0]
    }


def loss_parity(ref: dict, results: dict) -> None:
    sigmas = sd3_sigmas()
    gen = torch.Generator().manual_seed(0)
    batch, shape = 6, (16, 32, 32)
    rewards = torch.rand(48 * 24, generator=gen, dtype=torch.float64)
    prompts = [i // 24 for i in range(48 * 24)]
    r_all = nft_optimality(rewards, torch.tensor(prompts))
    # advantages whose r are those of the first samples of the reward batch, incl. a clipped one
    advantages = torch.cat([(r_all[: batch - 1] - 0.5) * 10.0, torch.tensor([7.5], dtype=torch.float64)])
    for dtype in (torch.float64, torch.float32):
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        for beta in (1.0, 0.1):
            x0 = torch.randn(batch, *shape, generator=gen, dtype=torch.float64).to(dtype)
            noise = torch.randn(batch, *shape, generator=gen, dtype=torch.float64).to(dtype)
            index = torch.randint(0, len(sigmas), (batch,), generator=gen)
            t = sigmas[index].to(dtype)
            t_expanded = t.view(-1, 1, 1, 1)
            xt = (1 - t_expanded) * x0 + t_expanded * noise
            v_old = (noise - x0) + 0.5 * torch.randn(batch, *shape, generator=gen, dtype=torch.float64).to(dtype)
            v_theta = v_old + 0.05 * torch.randn(batch, *shape, generator=gen, dtype=torch.float64).to(dtype)
            v_ref = v_old + 0.1 * torch.randn(batch, *shape, generator=gen, dtype=torch.float64).to(dtype)

            config = SimpleNamespace(beta=beta, train=SimpleNamespace(adv_clip_max=5, adv_mode="all", beta=1e-4))
            theirs_v = v_theta.clone().requires_grad_(True)
            loss_ref, terms, r_ref = ref["loss"](
                {"advantages": advantages[:, None]}, 0, config, x0, xt, t_expanded, theirs_v, v_old, v_ref
            )
            loss_ref.backward()

            ours_v = v_theta.clone().requires_grad_(True)
            r = nft_optimality_from_advantages(advantages)
            out = diffusion_nft_loss(ours_v, v_old, x0, xt, t, r, beta=beta, v_ref=v_ref, kl_beta=1e-4)
            out.loss.backward()

            pairs = {
                "r": (r, r_ref),
                "loss": (out.loss, loss_ref),
                "grad wrt v_theta": (ours_v.grad, theirs_v.grad),
            }
            # the reference logs policy_loss after ``loss = policy_loss; loss += β·KL`` (in place, same tensor):
            # its logged value is the total loss
            pairs["policy_loss as logged (= total loss)"] = (out.loss, terms["policy_loss"])
            pairs["policy term"] = (out.policy_loss, terms["policy_loss"] - 1e-4 * terms["kl_div_loss"])
            for name in (
                "unweighted_policy_loss",
                "kl_div_loss",
                "kl_div",
                "old_kl_div",
                "old_deviate",
                "old_deviate_max",
                "x0_norm",
                "x0_norm_max",
            ):
                pairs[name] = (out.metrics[name], terms[name])
            case = f"beta={beta}, {str(dtype).removeprefix('torch.')}"
            for name, (ours, theirs) in pairs.items():
                diff, rel = rel_diff(ours, theirs)
                results[f"loss: {name} ({case})"] = {"max_abs": diff, "max_rel": rel, "rel_tol": tol}


def schedule_parity(ref: dict, results: dict) -> None:
    worst = 0.0
    for decay_type in (0, 1, 2):
        for step in range(0, 3000):
            worst = max(worst, abs(nft_old_decay(step, decay_type) - ref["decay"](step, decay_type)))
    results["old-policy decay (types 0-2, steps 0-2999)"] = {"max_abs": worst}
    mismatches = 0
    for seed in range(5):
        torch.manual_seed(seed)
        theirs = ref["perms"](10, 72, "cpu")[:, : int(10 * 0.99)]
        ours = nft_timestep_indices(72, 10, 0.99, generator=torch.Generator().manual_seed(seed))
        mismatches += int((ours != theirs).sum())
    results["timestep indices (72 samples x 9 of 10, 5 seeds): differing entries"] = {"max_abs": float(mismatches)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mirror", type=Path, default=MIRROR, help="bare git dir of NVlabs/DiffusionNFT")
    parser.add_argument("--rev", default="HEAD")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    commit = subprocess.run(
        ["git", "--git-dir", str(args.mirror), "rev-parse", args.rev], check=True, capture_output=True, text=True
    ).stdout.strip()
    ref = load_reference(args.mirror, commit)
    results: dict[str, dict] = {}
    optimality_parity(ref, results)
    loss_parity(ref, results)
    schedule_parity(ref, results)

    print(f"NVlabs/DiffusionNFT {commit}: loss {ref['loss_lines']}, permutation {ref['perm_lines']}")
    failed = False
    for name, value in results.items():
        rel = value.get("max_rel")
        tol = value.get("rel_tol", 1e-12)
        measured = rel if rel is not None else value["max_abs"]
        bad = measured > tol if "entries" not in name else value["max_abs"] > 0
        failed |= bad
        extra = f"   max rel {rel:.3g}" if rel is not None else ""
        print(f"  {name:70s} max |Δ| {value['max_abs']:.3g}{extra}{'   FAIL' if bad else ''}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "reference": {
                    "repo": "NVlabs/DiffusionNFT",
                    "commit": commit,
                    "loss_lines": ref["loss_lines"],
                    "perm_lines": ref["perm_lines"],
                    "stat_tracker": "flow_grpo/stat_tracking.py",
                },
                "torch": torch.__version__,
                "results": results,
                "passed": not failed,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"saved {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
