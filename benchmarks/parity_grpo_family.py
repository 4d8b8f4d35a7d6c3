"""Parity of the GRPO-family sampler pieces (:mod:`mmalign.models.sde_windows`, :func:`dance_sde_step`,
:func:`flow_dpm2_step`) with the reference repositories' own functions, run on the same inputs.

    PYTHONPATH=. .venv/bin/python benchmarks/parity_grpo_family.py \\
        --flow-grpo /work/.mirror/zhtmike+flow_grpo/repo --mixgrpo /work/.mirror/Tencent-Hunyuan+MixGRPO/repo \\
        --dancegrpo /work/.mirror/XueZeyue+DanceGRPO/repo

Each path is a git directory (bare mirror or checkout's ``.git``; files are read with ``git show REV:path``) or
a plain checkout. Reference code is only *loaded* at run time, from single files whose imports are torch, numpy,
math, tqdm and diffusers; nothing is stubbed but the models: a fixed analytic "transformer" stands in for SD3 and
FLUX, and a minimal pipeline object gives flow_grpo's ``pipeline_with_logprob`` what it touches (no text
encoders, no VAE). DanceGRPO's ``flux_step`` lives in its training script (which imports its whole package), so
the one function is cut out of the file with ``ast`` and executed alone.

Compared (CPU, float32 unless said):

1. Flow-GRPO-Fast (flow_grpo ``sd3_pipeline_with_logprob_fast.pipeline_with_logprob``, 10 steps, both sde types):
   the window its global ``random`` draws vs :func:`fast_window` with ``random.Random`` on the same seed, and the
   whole chain (initial latents, ODE outside, SDE/CPS inside, recorded latents and log-probs) vs mmalign's step
   functions on the same noise.
2. MixGRPO windows: ``GRPOTrainingStates`` (progressive with/without roll back and overlap, Flash, Flash*,
   decay, exp_decay, random with per-call seeds) over 1500 iterations vs :func:`mixgrpo_window`.
3. MixGRPO / MixGRPO-Flash chains: ``run_sample_step`` (25 steps, shift 3, eta 0.7, flow_grpo_sampling, plain
   and DPM-Solver++(2M) "post" with compress ratios 0.4 and 0.2) vs :func:`mixgrpo_flash_sigmas`,
   :func:`reference_timesteps`, Euler / :func:`flow_sde_step` / :func:`flow_dpm2_step`.
4. MixGRPO's DPM-Solver++ updates (first and second order, midpoint and heun) vs :func:`flow_dpm2_step`.
5. DanceGRPO ``flux_step`` (16 steps, shift 3, eta 0.3; sampling and evaluation) vs :func:`dance_sde_step`;
   MixGRPO's ``dance_grpo_step`` (log-prob without its constants) and ``flow_grpo_step`` likewise.
6. DanceGRPO's per-sample step permutation: its two statements re-stated (torch.randperm from the global RNG)
   vs :func:`dance_train_steps` — not imported (they are inline in ``train_one_step``).

Prints max |Δ| per item and writes ``benchmarks/results/parity_grpo_family.json``; exits non-zero if any float
item exceeds ``--tol`` (1e-5) or any integer item differs.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import math
import random
import subprocess
import sys
import types
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from mmalign.models.flow_sampling import cps_step, dance_sde_step, flow_dpm2_step, flow_ode_step, flow_sde_step
from mmalign.models.sde_windows import (
    dance_train_steps,
    fast_window,
    mixgrpo_flash_sigmas,
    mixgrpo_window,
    reference_timesteps,
)

RESULTS = Path(__file__).parent / "results" / "parity_grpo_family.json"


# ------------------------------------------------------------------------------------------------ loading
def read_source(root: Path, path: str, rev: str = "HEAD") -> str:
    if (root / path).is_file():
        return (root / path).read_text()
    return subprocess.run(
        ["git", f"--git-dir={root}", "show", f"{rev}:{path}"], capture_output=True, text=True, check=True
    ).stdout


def revision(root: Path, rev: str = "HEAD") -> str:
    result = subprocess.run(["git", f"--git-dir={root}", "rev-parse", rev], capture_output=True, text=True)
    return result.stdout.strip() or "checkout"


def load_module(name: str, source: str, package: str | None = None) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__package__ = package
    sys.modules[name] = module
    exec(compile(source, f"<{name}>", "exec"), module.__dict__)
    return module


def extract_functions(source: str, names: set[str], namespace: dict) -> dict:
    """Execute only the top-level functions ``names`` of ``source`` (the rest of the file is not run)."""
    tree = ast.parse(source)
    body = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in names]
    if {node.name for node in body} != names:
        raise RuntimeError(f"functions {names} not all found")
    exec(compile(ast.Module(body=body, type_ignores=[]), "<extracted>", "exec"), namespace)
    return namespace


class Worst:
    def __init__(self):
        self.items: dict[str, float] = {}

    def __call__(self, name: str, ours, theirs) -> None:
        ours = torch.as_tensor(ours).double()
        theirs = torch.as_tensor(theirs).double()
        diff = (ours - theirs).abs().max().item() if ours.numel() else 0.0
        self.items[name] = max(self.items.get(name, 0.0), diff)


def velocity(x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """The stand-in model: a smooth, timestep-dependent function of the latent (float32)."""
    t = torch.as_tensor(t, dtype=torch.float32).flatten()[0]
    return 0.8 * torch.tanh(x) - 0.3 * x * (t / 1000.0) + 0.1


# ---------------------------------------------------------------------------------------- 1. Flow-GRPO-Fast
class _Bar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self):
        pass


class _StubTransformer:
    config = SimpleNamespace(in_channels=16)

    def __call__(self, hidden_states, timestep, **kwargs):
        return (velocity(hidden_states, timestep),)


class StubSD3Pipeline:
    """What flow_grpo's ``pipeline_with_logprob`` touches on ``self``, without models."""

    def __init__(self, latent_hw: int = 4):
        self.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
        self.transformer = _StubTransformer()
        self.vae = SimpleNamespace(config=SimpleNamespace(scaling_factor=1.0, shift_factor=0.0), dtype=torch.float32,
                                   decode=lambda latents, return_dict=False: (latents,))  # fmt: skip
        self.image_processor = SimpleNamespace(postprocess=lambda image, output_type=None: image)
        self._execution_device = torch.device("cpu")
        self.latent_hw = latent_hw

    guidance_scale = property(lambda self: self._guidance_scale)
    do_classifier_free_guidance = property(lambda self: self._guidance_scale > 1)
    clip_skip = property(lambda self: self._clip_skip)
    joint_attention_kwargs = property(lambda self: self._joint_attention_kwargs)

    def check_inputs(self, *args, **kwargs):
        pass

    def encode_prompt(self, prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
                      negative_pooled_prompt_embeds, **kwargs):  # fmt: skip
        return prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds

    def prepare_latents(self, batch, channels, height, width, dtype, device, generator, latents):
        return torch.randn((batch, channels, self.latent_hw, self.latent_hw), generator=generator)

    def progress_bar(self, total=None):
        return _Bar()

    def maybe_free_model_hooks(self):
        pass


def fast_parity(root: Path, worst: Worst, mismatches: dict) -> None:
    package = "flow_grpo_ref"
    sys.modules[package] = types.ModuleType(package)
    sys.modules[package].__path__ = []
    patch = "flow_grpo/diffusers_patch/"
    load_module(f"{package}.sd3_sde_with_logprob", read_source(root, patch + "sd3_sde_with_logprob.py"), package)
    fast = load_module(f"{package}.fast", read_source(root, patch + "sd3_pipeline_with_logprob_fast.py"), package)
    pipe = StubSD3Pipeline()
    batch, steps = 3, 10
    embeds = torch.zeros(batch, 2, 8)
    pooled = torch.zeros(batch, 8)
    windows = []
    for sde_type, size, window_range, level in (
        ("sde", 2, (0, 10), 0.7),
        ("cps", 3, (0, 5), 0.8),
        ("sde", 0, (0, 5), 0.7),
    ):
        for seed in range(8):
            random.seed(100 + seed)
            torch.manual_seed(seed)
            _, latents, log_probs, timesteps = fast.pipeline_with_logprob(
                pipe, prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=embeds,
                negative_pooled_prompt_embeds=pooled, num_inference_steps=steps, guidance_scale=1.0,
                output_type="pt", height=32, width=32, noise_level=level, sde_window_size=size,
                sde_window_range=window_range, sde_type=sde_type,
            )  # fmt: skip
            all_t = list(pipe.scheduler.timesteps)
            their_window = (all_t.index(timesteps[0]), all_t.index(timesteps[-1]) + 1)
            start, end = fast_window(steps, size, window_range, random.Random(100 + seed))
            windows.append(their_window)
            mismatches["fast_window"] = mismatches.get("fast_window", 0) + int((start, end) != their_window)
            # mmalign's chain on the same draws: initial latents, then one standard normal per step
            torch.manual_seed(seed)
            x = torch.randn(batch, 16, 4, 4)
            noises = [torch.randn(batch, 16, 4, 4) for _ in range(steps)]
            sigmas = pipe.scheduler.sigmas
            ours_latents, ours_log_probs = [], []
            for j, t in enumerate(pipe.scheduler.timesteps):
                v = velocity(x, t)
                if j == start:
                    ours_latents.append(x)
                if start <= j < end:
                    if sde_type == "sde":
                        step = flow_sde_step(x, v, sigmas[j], sigmas[j + 1], level, noise=noises[j],
                                             sigma_max=sigmas[1].item())  # fmt: skip
                    else:
                        step = cps_step(x, v, sigmas[j], sigmas[j + 1], level, noise=noises[j])
                    x = step.prev_sample
                    ours_latents.append(x)
                    ours_log_probs.append(step.log_prob)
                else:
                    x = flow_ode_step(x, v, sigmas[j], sigmas[j + 1])
            worst(f"fast chain latents ({sde_type})", torch.stack(ours_latents), torch.stack(latents))
            worst(f"fast chain log_prob ({sde_type})", torch.stack(ours_log_probs), torch.stack(log_probs))
    print(f"  flow_grpo fast windows drawn: {sorted(set(windows))}")


# ------------------------------------------------------------------------------------------ 2. MixGRPO windows
def mixgrpo_window_parity(root: Path, mismatches: dict) -> None:
    states_cls = load_module(
        "mixgrpo_grpo_states", read_source(root, "fastvideo/utils/grpo_states.py")
    ).GRPOTrainingStates
    overlap = {"prog_overlap": True, "prog_overlap_step": 1, "roll_back": True}
    configs = {  # name: (GRPOTrainingStates kwargs, mixgrpo_window kwargs)
        "MixGRPO (progressive, overlap 1, roll back)": (
            {"iters_per_group": 25, **overlap},
            {"shift_interval": 25, "stride": 1, "roll_back": True},
        ),
        "MixGRPO-Flash (interval 20)": (
            {"iters_per_group": 20, **overlap},
            {"shift_interval": 20, "stride": 1, "roll_back": True},
        ),
        "MixGRPO-Flash* (overlap step 0)": (
            {"iters_per_group": 20, **overlap, "prog_overlap_step": 0},
            {"shift_interval": 20, "stride": 0, "roll_back": True},
        ),
        "progressive, no overlap, clip": (
            {"iters_per_group": 7, "prog_overlap": False, "roll_back": False},
            {"shift_interval": 7, "stride": 4, "roll_back": False},
        ),
        "decay": (
            {"iters_per_group": 25, "sample_strategy": "decay", **overlap, "max_iters_per_group": 10,
             "min_iters_per_group": 1},
            {"strategy": "decay", "stride": 1, "roll_back": True},
        ),
        "exp_decay": (
            {"iters_per_group": 5, "sample_strategy": "exp_decay", **overlap},
            {"strategy": "exp_decay", "shift_interval": 5, "stride": 1, "roll_back": True},
        ),
    }  # fmt: skip
    for name, (theirs_kwargs, ours_kwargs) in configs.items():
        state = states_cls(group_size=4, max_timesteps=25 - 2, **theirs_kwargs)
        bad = 0
        for k in range(1500):
            theirs = state.get_current_timesteps()
            state.update_iteration()
            start, end = mixgrpo_window(k, 25, 4, **ours_kwargs)
            bad += int(list(range(start, end)) != theirs)
        mismatches[f"mixgrpo_window: {name}"] = bad
    state = states_cls(iters_per_group=25, group_size=4, max_timesteps=23, sample_strategy="random")
    bad = 0
    for k in range(1500):
        theirs = state.get_current_timesteps()
        state.update_iteration(seed=k)  # the window of iteration k + 1 is drawn with seed k
        rng = np.random.default_rng(k - 1) if k > 0 else None
        start, end = mixgrpo_window(k, 25, 4, strategy="random", rng=rng)
        bad += int(list(range(start, end)) != theirs)
    mismatches["mixgrpo_window: random (seeded per call)"] = bad


# ---------------------------------------------------------------------------------- 3./4. MixGRPO chains, DPM
def load_sampling_utils(root: Path) -> types.ModuleType:
    return load_module("mixgrpo_sampling_utils", read_source(root, "fastvideo/utils/sampling_utils.py"))


class StubFlux:
    def __call__(self, hidden_states, timestep, **kwargs):
        return [velocity(hidden_states, torch.round(timestep * 1000.0))]

    def eval(self):
        return self


def mixgrpo_args(dpm: str, ratio: float = 0.4, solver_type: str = "midpoint") -> SimpleNamespace:
    return SimpleNamespace(dpm_algorithm_type=dpm, dpm_apply_strategy="post", dpm_post_compress_ratio=ratio,
                           dpm_solver_order=2, dpm_solver_type=solver_type, sample_strategy="progressive",
                           flow_grpo_sampling=True, eta=0.7, shift=3.0, drop_last_sample=False)  # fmt: skip


def mixgrpo_chain_parity(su: types.ModuleType, worst: Worst, mismatches: dict) -> None:
    steps, shift, shape = 25, 3.0, (2, 16, 8)
    base = su.sd3_time_shift(shift, torch.linspace(1, 0, steps + 1))
    hidden = torch.zeros(2, 3, 4)
    for dpm, ratio in (("null", 0.4), ("dpmsolver++", 0.4), ("dpmsolver++", 0.2)):
        for start in (0, 5, 11, 19):
            end = start + 4
            deterministic = [not start <= i < end for i in range(steps)]
            torch.manual_seed(start)
            z0 = torch.randn(shape)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # autocast("cuda") on a CPU-only machine
                _, final, all_latents, all_log_probs = su.run_sample_step(
                    mixgrpo_args(dpm, ratio), z0.clone(), range(steps), base.clone(), StubFlux(), hidden, hidden[:, 0],
                    torch.zeros(1, 3), None, True, deterministic,
                )  # fmt: skip
            flash = dpm != "null"
            sigmas = mixgrpo_flash_sigmas(steps, end, shift, ratio) if flash else base
            timesteps = reference_timesteps(sigmas)
            torch.manual_seed(start)
            x = torch.randn(shape)
            latents, log_probs, prev_x0, before = [x], [], None, None
            for i in range(len(sigmas) - 1):
                v = velocity(x, timesteps[i])
                if flash and i >= end:
                    out = flow_dpm2_step(x, v, sigmas[i], sigmas[i + 1], prev_x0, before)
                    x, prev_x0, before = out.prev_sample, out.x0, sigmas[i]
                    latents.append(x)
                    continue
                noise = torch.randn(shape)  # the reference draws at every Euler/SDE step
                prev_x0, before = x - sigmas[i] * v, sigmas[i]
                if start <= i < end:
                    step = flow_sde_step(x, v, sigmas[i], sigmas[i + 1], 0.7, noise=noise, sigma_max=sigmas[1].item())
                    x = step.prev_sample
                    log_probs.append(step.log_prob)
                else:
                    x = flow_ode_step(x, v, sigmas[i], sigmas[i + 1])
                latents.append(x)
            tag = f"MixGRPO{'-Flash' if flash else ''} chain" + (f" (ratio {ratio})" if flash else "")
            mismatches[f"{tag}: number of steps"] = mismatches.get(f"{tag}: number of steps", 0) + int(
                all_latents.shape[1] != len(latents)
            )
            worst(f"{tag}: all latents", torch.stack(latents, 1), all_latents)
            worst(f"{tag}: final latents", x, final)
            worst(f"{tag}: window log_prob", torch.stack(log_probs, 1), all_log_probs[:, start:end])


def dpm_update_parity(su: types.ModuleType, worst: Worst) -> None:
    sigmas = su.sd3_time_shift(3.0, torch.linspace(1, 0, 26))
    gen = torch.Generator().manual_seed(7)
    for solver_type in ("midpoint", "heun"):
        args = mixgrpo_args("dpmsolver++", solver_type=solver_type)
        for i in range(2, 25):
            x, v, m1 = (torch.randn(4, 16, 8, generator=gen) for _ in range(3))
            m0 = x - sigmas[i] * v
            theirs = su.multistep_dpm_solver_second_order_update(args, [m1, m0], sigmas, i, x, None, False)[0]
            ours = flow_dpm2_step(x, v, sigmas[i], sigmas[i + 1], m1, sigmas[i - 1], solver_type).prev_sample
            if sigmas[i + 1] > 0:
                worst(f"DPM-Solver++ 2nd order ({solver_type})", ours, theirs)
            first = su.dpm_solver_first_order_update(args, m0, sigmas, i, x, None, False)[0]
            worst("DPM-Solver++ 1st order", flow_dpm2_step(x, v, sigmas[i], sigmas[i + 1]).prev_sample, first)


# ------------------------------------------------------------------------------------------------ 5./6. Dance
def dance_parity(dance_root: Path, su: types.ModuleType, worst: Worst, mismatches: dict) -> None:
    source = read_source(dance_root, "fastvideo/train_grpo_flux.py")
    ns = extract_functions(source, {"flux_step", "sd3_time_shift"}, {"math": math, "torch": torch})
    flux_step, shift_fn = ns["flux_step"], ns["sd3_time_shift"]
    sigmas = shift_fn(3.0, torch.linspace(1, 0, 17))
    gen = torch.Generator().manual_seed(3)
    shape = (4, 16, 8, 8)
    for i in range(16):
        x, v = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
        torch.manual_seed(500 + i)
        prev, _, log_prob = flux_step(v, x, 0.3, sigmas, i, None, grpo=True, sde_solver=True)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(500 + i))
        ours = dance_sde_step(x, v, sigmas[i], sigmas[i + 1], 0.3, noise=noise)
        worst("DanceGRPO flux_step: prev_sample", ours.prev_sample, prev)
        worst("DanceGRPO flux_step: log_prob", ours.log_prob, log_prob)
        v_eval = v + 0.05 * torch.randn(shape, generator=gen)
        _, _, log_prob_eval = flux_step(v_eval, x, 0.3, sigmas, i, prev, grpo=True, sde_solver=True)
        ours_eval = dance_sde_step(x, v_eval, sigmas[i], sigmas[i + 1], 0.3, prev_sample=prev)
        worst("DanceGRPO flux_step: log_prob (evaluate)", ours_eval.log_prob, log_prob_eval)
        # MixGRPO's copy drops the constants: add them back (s = eta·sqrt(σ − σ_next))
        _, _, log_prob_mix = su.dance_grpo_step(v_eval, x, 0.3, sigmas, i, prev, grpo=True, sde_solver=True)
        constant = math.log(0.3 * math.sqrt(float(sigmas[i] - sigmas[i + 1]))) + math.log(math.sqrt(2 * math.pi))
        worst("MixGRPO dance_grpo_step: log_prob + constants", ours_eval.log_prob, log_prob_mix - constant)
        if i > 0:
            sample, _, log_prob_fg, mean_fg, _ = su.flow_grpo_step(v_eval, x, 0.7, sigmas, i, prev)
            ours_fg = flow_sde_step(
                x, v_eval, sigmas[i], sigmas[i + 1], 0.7, prev_sample=prev, sigma_max=sigmas[1].item()
            )
            worst("MixGRPO flow_grpo_step: log_prob (evaluate)", ours_fg.log_prob, log_prob_fg)
            worst("MixGRPO flow_grpo_step: mean", ours_fg.mean, mean_fg)
    # 6. the per-sample permutations of train_one_step (lines 551-570), re-stated
    bad = 0
    for seed in range(20):
        torch.manual_seed(seed)
        theirs = torch.stack([torch.randperm(15) for _ in range(12)])[:, : int(15 * 0.6)]
        bad += int(not torch.equal(dance_train_steps(16, 12, 0.6, torch.Generator().manual_seed(seed)), theirs))
    mismatches["dance_train_steps (re-stated reference)"] = bad


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flow-grpo", type=Path, default=Path("/work/.mirror/zhtmike+flow_grpo/repo"))
    parser.add_argument("--mixgrpo", type=Path, default=Path("/work/.mirror/Tencent-Hunyuan+MixGRPO/repo"))
    parser.add_argument("--dancegrpo", type=Path, default=Path("/work/.mirror/XueZeyue+DanceGRPO/repo"))
    parser.add_argument("--tol", type=float, default=1e-5)
    args = parser.parse_args(argv)
    worst, mismatches = Worst(), {}
    with contextlib.redirect_stderr(sys.stdout):
        fast_parity(args.flow_grpo, worst, mismatches)
    mixgrpo_window_parity(args.mixgrpo, mismatches)
    su = load_sampling_utils(args.mixgrpo)
    mixgrpo_chain_parity(su, worst, mismatches)
    dpm_update_parity(su, worst)
    dance_parity(args.dancegrpo, su, worst, mismatches)

    failed = False
    print("max |Δ| (float32 unless said):")
    for name, diff in worst.items.items():
        print(f"  {name:52s} {diff:.3g}")
        failed |= not diff <= args.tol
    print("mismatching cases (integers; 0 = identical):")
    for name, count in mismatches.items():
        print(f"  {name:52s} {count}")
        failed |= count != 0
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "references": {"flow_grpo": revision(args.flow_grpo), "MixGRPO": revision(args.mixgrpo),
                       "DanceGRPO": revision(args.dancegrpo)},
        "torch": torch.__version__, "max_abs_diff": worst.items, "mismatches": mismatches, "tol": args.tol,
        "passed": not failed,
    }, indent=2) + "\n")  # fmt: skip
    print(f"wrote {RESULTS}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
