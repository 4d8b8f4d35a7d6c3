"""One Flow-GRPO iteration on SD3.5-Medium-shaped weights: mmalign's trainer beside yifan123/flow_grpo's own
functions, and mmalign's DiffusionNFT iteration on the same shapes. Time and peak memory per phase.

    .venv/bin/python benchmarks/bench_flow_grpo.py --layers 1 --resolution 64            # checks the script (~3 min)
    .venv/bin/python benchmarks/bench_flow_grpo.py --layers 1 --resolution 256           # the table (2 cores: ~17 min)
    .venv/bin/python benchmarks/bench_flow_grpo.py --flow-grpo-src /tmp/flow_grpo_src \\
        --flow-grpo-python /work/venv-flowgrpo/bin/python --dtypes fp32,bf16 --rows mmalign,flow_grpo,nft

Needs an extracted checkout of yifan123/flow_grpo (``--flow-grpo-src``; commit ac4c86e) and a second virtual
environment with the versions it pins (``--flow-grpo-python``; see "The reference's environment" below). Writes
``benchmarks/results/flow_grpo.json`` and ``flow_grpo.md`` (a run at another resolution than 256 writes to a
temporary folder unless ``--out`` is given, so a check never overwrites the table). Never a test: nothing here
asserts, and the test suite does not depend on flow_grpo.

The iteration (the issue's spec). One group of G = 4 images of one prompt; 10 SDE sampling steps (Flow-GRPO's
``sde_step_with_logprob``, noise level 0.7, shift-3 schedule) with classifier-free guidance 4.5, one batched
transformer call (uncond + cond, 8 rows) per step; then the first 9 steps trained (``timestep_fraction`` 0.99),
each: the log-probability of the recorded step recomputed with CFG (8 rows, with gradients), the PPO-clipped
ratio (clip 1e-4, advantages clipped to 5), the KL (beta 0.04) to the reference = the same transformer with its
adapters disabled (8 rows, no gradients), backward of loss/9; after the 9th, gradient clipping to 1.0 and one
AdamW step (lr 3e-4, weight decay 1e-4). LoRA rank 32, alpha 64, gaussian init, on the 8 attention projections
of both streams (flow_grpo's ``target_modules``). Rewards: a fixed vector (no reward model), normalised per
prompt with the global std (both sides' own trackers). Text encoders are never loaded: cached random embeddings
of SD3's shapes (``prompt_embeds [1, 77 + 128, 4096]``: flow_grpo encodes with ``max_sequence_length=128``;
pooled ``[1, 2048]``; the empty prompt's likewise), the same tensors on both sides.

The model. ``SD3Transformer2DModel`` with stabilityai/stable-diffusion-3.5-medium's ``transformer/config.json``
(24 layers, 24 heads × 64 = 1536 wide, ``joint_attention_dim`` 4096, ``caption_projection_dim`` 1536, pooled 2048,
patch 2, 16 channels, ``pos_embed_max_size`` 384, ``dual_attention_layers`` 0-12, ``qk_norm`` rms_norm) and
random weights (seed 0), with ``--layers N`` blocks (the first N of the real stack: every block below 13 has the
dual attention, so a shallow stack is a little heavier per block than the 24-block average). The transformer
dominates every timed phase, so the mmalign/flow_grpo *ratios* are independent of the depth to first order
(both sides run the same blocks the same number of times; only the fixed per-call overhead and the embedders
weigh more at small depth). A tiny 16-channel ``AutoencoderKL`` (four 16-wide blocks: SD3's factor 8, so 256 px
is a 16×32×32 latent) decodes the 4 final latents in both implementations' sampling phase (≪ 1 % of it).
Built once, saved with ``save_pretrained`` in ``--cache-dir`` and loaded by both environments.

Same draws on both sides. mmalign's trainer draws the initial latents and each step's noise from one CPU
generator seeded ``_generator(seed, micro-batch 0, sample stream)``; flow_grpo's pipeline draws the initial
latents in ``prepare_latents`` and each step's noise in ``sde_step_with_logprob`` from the global CPU generator
(``generator=None``), in the same order and shapes, so the reference row seeds the global generator with the
same seed. LoRA weights: both sides re-initialise every ``lora_A`` from a generator seeded by the parameter's
name (peft's gaussian init, std 1/r) and ``lora_B`` to zeros, so the adapters are equal. The reference row
reports the max |Δ| of its sampled latents and log-probabilities from mmalign's (same dtype), and both report the
loss and the gradient norm before clipping.

Rows (each in its own process; ``--rows``):

* ``mmalign``: the real trainer, ``FlowGRPOTrainer(FlowGRPOConfig(batch_size=4, group_size=4, sample_batches=1,
  beta=0.04, ...), policy=SD3Generator(...), reward=<fixed>)``; the sampling phase is ``trainer.make_batch(0)``
  (sampling, decode, reward, advantages), the training phase ``trainer._train_step()`` (its 9 loss parts, one
  backward each, clip, fused AdamW). ``gradient_checkpointing=false`` (the reference has none).
* ``flow_grpo``: in the reference's environment, ``flow_grpo.diffusers_patch.sd3_pipeline_with_logprob.
  pipeline_with_logprob`` and ``scripts/train_sd3.py``'s own ``compute_log_prob`` (loaded from the file with
  ``ast``: its module-level imports - wandb, absl, the reward servers - are not needed by that function), and
  ``flow_grpo/stat_tracking.py``'s ``PerPromptStatTracker``; the per-timestep loss of ``main`` (lines 868-939 of
  ac4c86e) is transcribed below as it stands, inside ``accelerate.Accelerator(gradient_accumulation_steps=9)``
  exactly as the script sets it up (one process, CPU). What had to change to run it here, and nothing else:
  (1) no text encoders: ``StableDiffusion3Pipeline`` built with ``text_encoder*``/``tokenizer*`` = None and the
  cached embeddings passed (``compute_text_embeddings`` is not called); (2) one process: ``transformer.module.
  disable_adapter()`` (the DDP wrapper's ``.module``) becomes ``transformer.disable_adapter()``; (3) no wandb,
  no eval, no checkpointing, no EMA (``config.train.ema`` is off in the SD3 configs' default), no dataloader (the
  one prompt, 4 times); (4) the reward is the fixed vector instead of ``executor.submit(reward_fn, ...)``;
  (5) sampling seeds the global generator (above). The script's zero-advantage filter keeps all 4 samples here.
* ``nft``: mmalign's ``DiffusionNFTTrainer`` on the same shapes: ODE sampling without CFG (4 rows per call),
  10 steps; 9 trained timesteps per sample with fresh noise, each: the old policy's and the reference's
  velocities (no gradients) and the trained one's, KL weight 1e-4, backward; clip, AdamW.

Precision (``--dtypes``): ``fp32``, and ``bf16`` = fp32 weights with bf16 autocast on both sides (flow_grpo with
LoRA sets ``autocast = nullcontext`` but ``accelerator.prepare`` wraps the transformer's forward in autocast when
``mixed_precision="bf16"``; mmalign's trainer runs its parts and sampling under ``accelerator.autocast()``).

Measured per row and phase (set-up = loading the weights, adding the adapters, the optimizer; sampling;
training): wall seconds, and the peak RSS of that phase: ``/proc/self/clear_refs`` (5) resets the kernel's
high-water mark to the current RSS at the phase start and ``VmHWM`` is read at its end, so each phase's peak is
its own (the report also gives the peak minus the RSS at the phase start: what the phase itself added). One
iteration per row, no warm-up (a training run does exactly this once per round; the first transformer call of
each phase carries oneDNN's set-up in both rows alike). The machine's load (``os.getloadavg``) before and after
each row and the CPU that other processes used during it (cores) are recorded beside it: on a shared machine a
row's time is only comparable to rows measured under the same load.

The reference's environment. ``python3 -m venv /work/venv-flowgrpo``; ``pip install torch==2.14.1
torchvision==0.29.1`` (the same torch as mmalign's, so that only the code differs); then flow_grpo's pins
``diffusers==0.33.1 transformers==4.40.0 peft==0.10.0 accelerate==1.4.0`` and ``psutil safetensors``. The
versions actually used are recorded in the results.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import zlib
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
GIB = 1024**3
CACHE_VERSION = 1

TINY_VAE = dict(  # SD3's 16 latent channels and factors, factor 8 (four blocks), 16 wide
    in_channels=3,
    out_channels=3,
    latent_channels=16,
    block_out_channels=(16, 16, 16, 16),
    layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=8,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
TEXT_TOKENS = 77 + 128  # CLIP (77) + T5 at flow_grpo's max_sequence_length=128
PROMPT = "a photo of a cat"
GROUP = 4
REWARDS = (0.9, 0.1, 0.6, 0.3)  # the fixed reward vector of the group
SAMPLE_STEPS, TRAIN_STEPS = 10, 9  # int(10 * 0.99)
GUIDANCE, NOISE_LEVEL, KL_BETA, NFT_KL_BETA = 4.5, 0.7, 0.04, 1e-4
LORA_RANK, LORA_ALPHA = 32, 64
LR, WEIGHT_DECAY = 3e-4, 1e-4
LORA_TARGETS = (
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn.to_k",
    "attn.to_out.0",
    "attn.to_q",
    "attn.to_v",
)
ROWS = {
    "mmalign": "mmalign Flow-GRPO (FlowGRPOTrainer)",
    "flow_grpo": "flow_grpo (pipeline_with_logprob + train_sd3.py step)",
    "nft": "mmalign DiffusionNFT (DiffusionNFTTrainer)",
}
PHASES = ("setup", "sampling", "training")


# ==========================================================================================================
# Worker side (runs in either environment: imports neither mmalign nor harness at module level)
# ==========================================================================================================
def _status(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


class PhaseMeter:
    """Wall time and the peak RSS (VmHWM, reset at the start) of each phase of a worker."""

    def __init__(self):
        self.phases: dict[str, dict] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start_rss = _status("VmRSS")
        reset = _reset_hwm()
        t0 = time.perf_counter()
        yield
        seconds = time.perf_counter() - t0
        peak = _status("VmHWM")
        self.phases[name] = {
            "seconds": seconds,
            "peak_gib": peak / GIB,
            "start_gib": start_rss / GIB,
            "added_gib": (peak - start_rss) / GIB,
            "hwm_reset": reset,
        }


def _lora_key(name: str) -> str:
    """A LoRA parameter's name without the wrapper's prefix (peft's ``base_model.model.``, DDP's ``module.``)."""
    for prefix in ("module.", "base_model.model."):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return name


def reinit_lora(model) -> int:
    """Every ``lora_A`` from a generator seeded by its name (std 1/r: peft's gaussian init), ``lora_B`` zeros:
    equal adapters in both implementations whatever order they were created in. Returns the count."""
    import torch

    count = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_A." in name:
                gen = torch.Generator().manual_seed(zlib.crc32(_lora_key(name).encode()))
                param.copy_(torch.randn(param.shape, generator=gen) / LORA_RANK)
                count += 1
            elif ".lora_B." in name:
                param.zero_()
                count += 1
    return count


def _versions(names=("torch", "diffusers", "transformers", "peft", "accelerate")) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _load_embeds(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "embeds.safetensors"))


def task_build(spec: dict) -> dict:
    """The random transformer (``layers`` blocks), the tiny VAE, the scheduler and the cached embeddings."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from safetensors.torch import save_file

    from mmalign.models.builders import SD35_MEDIUM_TRANSFORMER
    from mmalign.trainers.flow import _FLOW_SAMPLE_STREAM
    from mmalign.trainers.loop import _generator

    folder, layers = Path(spec["folder"]), int(spec["layers"])
    t0 = time.perf_counter()
    torch.manual_seed(0)
    config = dict(SD35_MEDIUM_TRANSFORMER, num_layers=layers, dual_attention_layers=tuple(range(min(13, layers))))
    transformer = SD3Transformer2DModel(**config)
    transformer.save_pretrained(str(folder / "transformer"), safe_serialization=True)
    AutoencoderKL(**TINY_VAE).save_pretrained(str(folder / "vae"), safe_serialization=True)
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).save_pretrained(str(folder / "scheduler"))
    gen = torch.Generator().manual_seed(1)
    embeds = {
        "prompt_embeds": torch.randn(1, TEXT_TOKENS, 4096, generator=gen),
        "pooled_prompt_embeds": torch.randn(1, 2048, generator=gen),
        "negative_prompt_embeds": torch.randn(1, TEXT_TOKENS, 4096, generator=gen),
        "negative_pooled_prompt_embeds": torch.randn(1, 2048, generator=gen),
    }
    save_file(embeds, str(folder / "embeds.safetensors"))
    return {
        "build_s": time.perf_counter() - t0,
        "transformer_params": sum(p.numel() for p in transformer.parameters()),
        "transformer_config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
        "sample_seed": _generator(0, 0, _FLOW_SAMPLE_STREAM).initial_seed(),
        "versions": _versions(),
    }


class FixedReward:
    """The group's fixed reward vector (no reward model)."""

    name = "fixed"
    is_differentiable = False

    def to(self, device):
        return self

    def score_tensor(self, images, prompts):
        import torch

        return torch.tensor(REWARDS[: len(images)], dtype=torch.float32)


def task_mmalign(spec: dict) -> dict:
    """mmalign's trainer (Flow-GRPO or DiffusionNFT): set-up, ``make_batch(0)`` (sampling), ``_train_step()``."""
    import torch

    torch.set_num_threads(int(spec["threads"]))
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from mmalign.models.generator import Conditions
    from mmalign.models.sd3 import SD3Generator
    from mmalign.trainers.flow import DiffusionNFTConfig, DiffusionNFTTrainer, FlowGRPOConfig, FlowGRPOTrainer

    folder, work = Path(spec["folder"]), Path(spec["work"])
    meter, algo = PhaseMeter(), spec["algo"]
    with meter("setup"):
        embeds = _load_embeds(folder)
        components = {
            "transformer": SD3Transformer2DModel.from_pretrained(str(folder), subfolder="transformer"),
            "vae": AutoencoderKL.from_pretrained(str(folder), subfolder="vae"),
            "scheduler": FlowMatchEulerDiscreteScheduler.from_pretrained(str(folder), subfolder="scheduler"),
            # stand-ins: the text encoders are dropped below (cached conditions only); no T5 pair at all
            **{f"tokenizer{s}": torch.nn.Identity() for s in ("", "_2")},
            **{f"text_encoder{s}": torch.nn.Identity() for s in ("", "_2")},
        }
        policy = SD3Generator(components, folder)
        policy.text_encoders = None  # cached conditions only: the encoders are never in memory
        meta = {"family": "sd3"}
        policy._unconditional = Conditions(
            {
                "prompt_embeds": embeds["negative_prompt_embeds"],
                "pooled_prompt_embeds": embeds["negative_pooled_prompt_embeds"],
            },
            meta,
        )
        prompts = work / "prompts.txt"
        prompts.write_text(PROMPT + "\n")
        common = dict(
            model=str(folder),
            data=str(prompts),
            output_dir=str(work / f"out-{algo}-{spec['dtype']}"),
            resolution=int(spec["resolution"]),
            batch_size=GROUP,
            group_size=GROUP,
            sample_batches=1,
            grad_accum=1,
            max_steps=1,
            sample_steps=SAMPLE_STEPS,
            lr=LR,
            adam_weight_decay=WEIGHT_DECAY,
            lora_rank=LORA_RANK,
            lora_alpha=float(LORA_ALPHA),
            mixed_precision="bf16" if spec["dtype"] == "bf16" else "no",
            gradient_checkpointing=False,
            tracker="none",
            progress=False,
        )
        if algo == "grpo":
            config = FlowGRPOConfig(**common, guidance=GUIDANCE, noise_level=NOISE_LEVEL, beta=KL_BETA)
            trainer = FlowGRPOTrainer(config, policy=policy, reward=FixedReward())
        else:
            config = DiffusionNFTConfig(**common, kl_beta=NFT_KL_BETA)
            trainer = DiffusionNFTTrainer(config, policy=policy, reward=FixedReward())
        trainer._prompt_cache[PROMPT] = Conditions(
            {"prompt_embeds": embeds["prompt_embeds"], "pooled_prompt_embeds": embeds["pooled_prompt_embeds"]}, meta
        )
        lora = reinit_lora(trainer.policy.transformer)
        if algo == "nft":  # the old policy starts as a copy of the (re-initialised) trained adapters
            trainer.old_params = [p.detach().clone() for p in trainer.trainable]
        del embeds
    with meter("sampling"):
        batch = trainer.make_batch(0)
    trajectory = batch["trajectory"]
    if algo == "grpo":
        torch.save(
            {"latents": trajectory.latents, "log_probs": trajectory.log_probs},
            work / f"mmalign-{spec['dtype']}-trajectory.pt",
        )
    with meter("training"):
        metrics = trainer._train_step()
    return {
        "phases": meter.phases,
        "loss": metrics.get("loss"),
        "grad_norm": metrics.get("grad_norm"),
        "kl": metrics.get("kl_loss", metrics.get("kl_div")),
        "policy_loss": metrics.get("policy_loss"),
        "lora_tensors": lora,
        "trainable_params": sum(p.numel() for p in trainer.trainable),
        "optimizer": "AdamW fused" if trainer.optimizer.param_groups[0].get("fused") else "AdamW",
        "gradient_checkpointing": bool(trainer.gradient_checkpointing),
        "advantages": [float(a) for a in batch["advantages"].flatten()],
        "versions": _versions(),
        "threads": torch.get_num_threads(),
    }


def _reference_compute_log_prob(src: Path, sde_step_with_logprob):
    """``compute_log_prob`` of flow_grpo's ``scripts/train_sd3.py``, compiled from its own source (the file's
    module-level imports - wandb, absl, ml_collections, the reward modules - are not needed by the function)."""
    import ast

    import torch

    path = src / "scripts" / "train_sd3.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "compute_log_prob"]
    if len(nodes) != 1:
        raise RuntimeError(f"{path}: no single compute_log_prob")
    namespace = {"torch": torch, "sde_step_with_logprob": sde_step_with_logprob}
    exec(compile(ast.Module(body=nodes, type_ignores=[]), str(path), "exec"), namespace)
    return namespace["compute_log_prob"]


def task_flow_grpo(spec: dict) -> dict:
    """flow_grpo's own sampling and training step (see the module docstring for what was changed)."""
    import importlib
    from types import SimpleNamespace

    import torch

    torch.set_num_threads(int(spec["threads"]))
    src = Path(spec["flow_grpo_src"])
    sys.path.insert(0, str(src))
    from accelerate import Accelerator
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from peft import LoraConfig, get_peft_model

    pipeline_with_logprob = importlib.import_module(
        "flow_grpo.diffusers_patch.sd3_pipeline_with_logprob"
    ).pipeline_with_logprob
    sde_step_with_logprob = importlib.import_module(
        "flow_grpo.diffusers_patch.sd3_sde_with_logprob"
    ).sde_step_with_logprob
    PerPromptStatTracker = importlib.import_module("flow_grpo.stat_tracking").PerPromptStatTracker  # noqa: N806
    compute_log_prob = _reference_compute_log_prob(src, sde_step_with_logprob)

    folder, work = Path(spec["folder"]), Path(spec["work"])
    resolution, batch = int(spec["resolution"]), GROUP
    num_train_timesteps = int(SAMPLE_STEPS * 0.99)
    config = SimpleNamespace(  # config/base.py + config/grpo.py (SD3 GenEval) values the step reads
        train=SimpleNamespace(
            cfg=True,
            beta=KL_BETA,
            adv_clip_max=5,
            clip_range=1e-4,
            max_grad_norm=1.0,
            gradient_accumulation_steps=1,
            num_inner_epochs=1,
        ),
        sample=SimpleNamespace(guidance_scale=GUIDANCE, noise_level=NOISE_LEVEL, num_steps=SAMPLE_STEPS),
    )
    meter = PhaseMeter()
    with meter("setup"):
        accelerator = Accelerator(
            mixed_precision="bf16" if spec["dtype"] == "bf16" else "no",
            cpu=True,
            gradient_accumulation_steps=config.train.gradient_accumulation_steps * num_train_timesteps,
        )
        embeds = _load_embeds(folder)
        pipeline = StableDiffusion3Pipeline(
            transformer=SD3Transformer2DModel.from_pretrained(str(folder), subfolder="transformer"),
            scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(str(folder), subfolder="scheduler"),
            vae=AutoencoderKL.from_pretrained(str(folder), subfolder="vae"),
            text_encoder=None,
            tokenizer=None,
            text_encoder_2=None,
            tokenizer_2=None,
            text_encoder_3=None,
            tokenizer_3=None,
        )
        # train_sd3.py lines 385-443 (text encoders absent)
        pipeline.vae.requires_grad_(False)
        pipeline.transformer.requires_grad_(False)
        pipeline.vae.to(accelerator.device, dtype=torch.float32)
        pipeline.transformer.to(accelerator.device)
        transformer_lora_config = LoraConfig(
            r=LORA_RANK, lora_alpha=LORA_ALPHA, init_lora_weights="gaussian", target_modules=list(LORA_TARGETS)
        )
        pipeline.transformer = get_peft_model(pipeline.transformer, transformer_lora_config)
        transformer = pipeline.transformer
        lora = reinit_lora(transformer)
        transformer_trainable_parameters = list(filter(lambda p: p.requires_grad, transformer.parameters()))
        optimizer = torch.optim.AdamW(
            transformer_trainable_parameters, lr=LR, betas=(0.9, 0.999), weight_decay=WEIGHT_DECAY, eps=1e-8
        )
        autocast = contextlib.nullcontext  # use_lora (line 555)
        transformer, optimizer = accelerator.prepare(transformer, optimizer)
        # cached embeddings of the group (compute_text_embeddings and the negative prompt's, lines 535-541)
        prompt_embeds = embeds["prompt_embeds"].repeat(batch, 1, 1)
        pooled_prompt_embeds = embeds["pooled_prompt_embeds"].repeat(batch, 1)
        sample_neg_prompt_embeds = embeds["negative_prompt_embeds"].repeat(batch, 1, 1)
        sample_neg_pooled_prompt_embeds = embeds["negative_pooled_prompt_embeds"].repeat(batch, 1)
        train_neg_prompt_embeds, train_neg_pooled_prompt_embeds = (
            sample_neg_prompt_embeds,
            sample_neg_pooled_prompt_embeds,
        )
        del embeds

    with meter("sampling"):  # lines 611-690, 717-787
        pipeline.transformer.eval()
        torch.manual_seed(int(spec["sample_seed"]))  # = mmalign's sampling generator: same latents and noise
        with autocast(), torch.no_grad():
            images, latents, log_probs = pipeline_with_logprob(
                pipeline,
                prompt_embeds=prompt_embeds,
                pooled_prompt_embeds=pooled_prompt_embeds,
                negative_prompt_embeds=sample_neg_prompt_embeds,
                negative_pooled_prompt_embeds=sample_neg_pooled_prompt_embeds,
                num_inference_steps=SAMPLE_STEPS,
                guidance_scale=GUIDANCE,
                output_type="pt",
                height=resolution,
                width=resolution,
                noise_level=NOISE_LEVEL,
            )
        latents = torch.stack(latents, dim=1)
        log_probs = torch.stack(log_probs, dim=1)
        timesteps = pipeline.scheduler.timesteps.repeat(batch, 1)
        prompts = [PROMPT] * batch
        rewards = torch.tensor(REWARDS[:batch], dtype=torch.float32)  # the fixed reward vector (no reward_fn)
        samples = {
            "prompt_embeds": prompt_embeds,
            "pooled_prompt_embeds": pooled_prompt_embeds,
            "timesteps": timesteps,
            "latents": latents[:, :-1],
            "next_latents": latents[:, 1:],
            "log_probs": log_probs,
        }
        avg = rewards.unsqueeze(1).repeat(1, num_train_timesteps).numpy()
        stat_tracker = PerPromptStatTracker(True)  # config.sample.global_std = True
        advantages = stat_tracker.update(prompts, avg)
        stat_tracker.clear()
        samples["advantages"] = torch.as_tensor(advantages).reshape(1, -1, advantages.shape[-1])[0]
        mask = samples["advantages"].abs().sum(dim=1) != 0
        samples = {k: v[mask] for k, v in samples.items()}
        total_batch_size, num_timesteps = samples["timesteps"].shape

    parity = {}
    theirs_path = work / f"mmalign-{spec['dtype']}-trajectory.pt"
    if theirs_path.is_file():
        mm = torch.load(theirs_path)
        parity = {
            "latents_max_abs_diff": float((mm["latents"].float() - latents.float()).abs().max()),
            "latents_max_abs": float(latents.float().abs().max()),
            "log_probs_max_abs_diff": float((mm["log_probs"].float() - log_probs.float()).abs().max()),
        }

    with meter("training"):  # lines 796-939
        perm = torch.randperm(total_batch_size, device=accelerator.device)
        samples = {k: v[perm] for k, v in samples.items()}
        samples_batched = {k: v.reshape(-1, total_batch_size // 1, *v.shape[1:]) for k, v in samples.items()}
        samples_batched = [dict(zip(samples_batched, x)) for x in zip(*samples_batched.values())]
        pipeline.transformer.train()
        info = {"loss": [], "policy_loss": [], "kl_loss": [], "approx_kl": [], "clipfrac": []}
        grad_norm = None
        for sample in samples_batched:
            embeds = torch.cat([train_neg_prompt_embeds[: len(sample["prompt_embeds"])], sample["prompt_embeds"]])
            pooled_embeds = torch.cat(
                [train_neg_pooled_prompt_embeds[: len(sample["pooled_prompt_embeds"])], sample["pooled_prompt_embeds"]]
            )
            for j in range(num_train_timesteps):
                with accelerator.accumulate(transformer):
                    with autocast():
                        prev_sample, log_prob, prev_sample_mean, std_dev_t = compute_log_prob(
                            transformer, pipeline, sample, j, embeds, pooled_embeds, config
                        )
                        if config.train.beta > 0:
                            with torch.no_grad():  # noqa: SIM117 (as train_sd3.py nests them)
                                with transformer.disable_adapter():  # was transformer.module (DDP)
                                    _, _, prev_sample_mean_ref, _ = compute_log_prob(
                                        transformer, pipeline, sample, j, embeds, pooled_embeds, config
                                    )
                    advantages = torch.clamp(
                        sample["advantages"][:, j], -config.train.adv_clip_max, config.train.adv_clip_max
                    )
                    ratio = torch.exp(log_prob - sample["log_probs"][:, j])
                    unclipped_loss = -advantages * ratio
                    clipped_loss = -advantages * torch.clamp(
                        ratio, 1.0 - config.train.clip_range, 1.0 + config.train.clip_range
                    )
                    policy_loss = torch.mean(torch.maximum(unclipped_loss, clipped_loss))
                    if config.train.beta > 0:
                        kl_loss = ((prev_sample_mean - prev_sample_mean_ref) ** 2).mean(dim=(1, 2, 3), keepdim=True) / (
                            2 * std_dev_t**2
                        )
                        kl_loss = torch.mean(kl_loss)
                        loss = policy_loss + config.train.beta * kl_loss
                    else:
                        loss = policy_loss
                    info["approx_kl"].append(0.5 * torch.mean((log_prob - sample["log_probs"][:, j]) ** 2))
                    info["clipfrac"].append(torch.mean((torch.abs(ratio - 1.0) > config.train.clip_range).float()))
                    info["policy_loss"].append(policy_loss)
                    if config.train.beta > 0:
                        info["kl_loss"].append(kl_loss)
                    info["loss"].append(loss)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(transformer.parameters(), config.train.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad()
    summary = {k: float(torch.mean(torch.stack(v).detach())) for k, v in info.items() if v}
    return {
        "phases": meter.phases,
        "loss": summary.get("loss"),
        "policy_loss": summary.get("policy_loss"),
        "kl": summary.get("kl_loss"),
        "grad_norm": None if grad_norm is None else float(grad_norm),
        "optimizer_steps": 1 if grad_norm is not None else 0,
        "lora_tensors": lora,
        "trainable_params": sum(p.numel() for p in transformer_trainable_parameters),
        "optimizer": "AdamW (default: for-loop on CPU)",
        "gradient_checkpointing": False,
        "advantages": [float(a) for a in samples["advantages"][:, 0]],
        "parity": parity,
        "versions": _versions(),
        "threads": torch.get_num_threads(),
    }


def worker_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    task = spec["task"]
    if task == "build":
        result = task_build(spec)
    elif task == "flow_grpo":
        result = task_flow_grpo(spec)
    else:
        result = task_mmalign(spec)
    result["process_peak_gib"] = _status("VmHWM") / GIB  # since the last reset (the training phase)
    Path(spec["result"]).write_text(json.dumps(result))


# ==========================================================================================================
# Parent side (no torch import)
# ==========================================================================================================
def run_worker(python: str, spec: dict, threads: int, timeout: float) -> tuple[dict | None, str, dict]:
    """``python THIS --worker SPEC`` in a fresh process (:func:`harness.run_worker`; the reference's environment
    sees no mmalign): ``(result, error, stats)``; stats: wall seconds, the load average before and after, and the
    CPU other processes used meanwhile (cores)."""
    from harness import run_worker as run_in_process  # parent side only: the worker may run in flow_grpo's venv

    stats: dict = {}
    result, error = run_in_process(
        __file__, spec, threads, timeout, stats, python=python, isolated=spec["task"] == "flow_grpo"
    )
    return result, error, stats


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def ensure_model(cache_dir: Path, layers: int, threads: int, timeout: float) -> tuple[Path, dict]:
    folder = cache_dir / f"sd35m-{layers}l-v{CACHE_VERSION}"
    marker = folder / ".complete.json"
    if marker.is_file():
        return folder, json.loads(marker.read_text())
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    print(f"building the random {layers}-block SD3.5-Medium transformer in {folder} (once) ...", flush=True)
    info, error, _ = run_worker(
        sys.executable, {"task": "build", "folder": str(folder), "layers": layers}, threads, timeout
    )
    if info is None:
        raise SystemExit(f"building failed: {error}")
    marker.write_text(json.dumps(info))
    print(f"  built in {info['build_s']:.0f} s ({info['transformer_params'] / 1e6:.1f} M parameters)", flush=True)
    return folder, info


def ratio(a, b) -> float | None:
    return None if a is None or b in (None, 0) else a / b


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "flow_grpo.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "flow_grpo.md").write_text(markdown(report))


def markdown(report: dict) -> str:
    from harness import fmt

    m = report["machine"]
    lines = [
        "# One Flow-GRPO iteration: mmalign vs yifan123/flow_grpo (+ mmalign DiffusionNFT)",
        "",
        f"Generated by `python benchmarks/bench_flow_grpo.py {' '.join(report['argv'])}` on {report['date']}.",
        "",
        f"- Model: SD3.5-Medium's transformer config with **{report['layers']} of its 24 blocks** "
        f"({report['model']['transformer_params'] / 1e6:.1f} M parameters, random weights), tiny 16-channel VAE, "
        f"{report['resolution']} px (latent 16×{report['resolution'] // 8}×{report['resolution'] // 8}), cached "
        f"random text embeddings [1, {TEXT_TOKENS}, 4096] / [1, 2048].",
        f"- Iteration: group of {GROUP} images of one prompt, {SAMPLE_STEPS} SDE steps (noise 0.7, CFG {GUIDANCE}, "
        f"one batched call of {2 * GROUP} rows per step), {TRAIN_STEPS} trained steps (log-prob with CFG + "
        f"adapters-off reference, KL β {KL_BETA}, one backward each), LoRA r{LORA_RANK}/α{LORA_ALPHA}, one AdamW step. "
        f"DiffusionNFT: ODE sampling without CFG, {TRAIN_STEPS} trained timesteps (old policy, reference, KL "
        f"{NFT_KL_BETA}).",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads per row; AVX-512 BF16: "
        f"{m['avx512_bf16']}, AMX: {m['amx']}. Shared with other work: see the load per row.",
        f"- Load: `uptime` at start `{report['uptime_start']}`; at end `{report['uptime_end']}`.",
        f"- mmalign env: {report['versions'].get('mmalign_env')}; "
        f"flow_grpo env: {report['versions'].get('flow_grpo_env')}.",
        "- Peak: the phase's own peak RSS (VmHWM reset at its start); 'added': peak minus the RSS at the phase start. "
        "One iteration per row, each row in its own process; ratios are mmalign / flow_grpo (target from the issue: "
        "time <= 0.8x, memory <= 1.0x).",
        "",
    ]
    for dtype in report["dtypes"]:
        rows = {name: r for name, r in report["rows"].items() if r.get("dtype") == dtype}
        mm, fg, nft = (rows.get(f"{name}@{dtype}") for name in ("mmalign", "flow_grpo", "nft"))
        lines += [
            f"## {dtype}",
            "",
            "| phase | mmalign s | flow_grpo s | x time | mmalign peak GiB (added) | flow_grpo peak GiB (added) "
            "| x peak | x added | NFT s | NFT peak GiB (added) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]

        def get(row, phase, key):
            if not row or "phases" not in row:
                return None
            if phase == "iteration":
                if key == "seconds":
                    return row["phases"]["sampling"]["seconds"] + row["phases"]["training"]["seconds"]
                return max(row["phases"]["sampling"][key], row["phases"]["training"][key])
            return row["phases"][phase][key]

        for phase in (*PHASES, "iteration"):
            ms, fs, ns = (get(r, phase, "seconds") for r in (mm, fg, nft))
            mp, fp, np_ = (get(r, phase, "peak_gib") for r in (mm, fg, nft))
            ma, fa, na = (get(r, phase, "added_gib") for r in (mm, fg, nft))
            lines.append(
                f"| {phase} | {fmt(ms, '.1f')} | {fmt(fs, '.1f')} | {fmt(ratio(ms, fs))} | {fmt(mp)} ({fmt(ma)}) "
                f"| {fmt(fp)} ({fmt(fa)}) | {fmt(ratio(mp, fp))} | {fmt(ratio(ma, fa))} | {fmt(ns, '.1f')} "
                f"| {fmt(np_)} ({fmt(na)}) |"
            )
        lines.append("")
        for key in (f"mmalign@{dtype}", f"flow_grpo@{dtype}", f"nft@{dtype}"):
            row = report["rows"].get(key)
            if row is None:
                continue
            if "error" in row:
                lines.append(f"- `{key}`: FAILED: {row['error'].splitlines()[-1] if row['error'] else ''}")
                continue
            s = row["stats"]
            extra = ""
            if row.get("parity"):
                p = row["parity"]
                extra = (
                    f"; sampled latents vs mmalign's max |Δ| {p['latents_max_abs_diff']:.3g} (of max |x| "
                    f"{p['latents_max_abs']:.3g}), log-probs max |Δ| {p['log_probs_max_abs_diff']:.3g}"
                )
            lines.append(
                f"- `{key}`: loss {fmt(row.get('loss'), '.5g')}, KL {fmt(row.get('kl'), '.3g')}, grad norm "
                f"{fmt(row.get('grad_norm'), '.4g')}, {row['optimizer']}, {row['trainable_params'] / 1e6:.2f} M "
                f"trainable; load {s['load_before'][0]:.2f} -> {s['load_after'][0]:.2f}, other processes "
                f"{s['other_cores']:.2f} cores, wall {s['wall_s']:.0f} s{extra}."
            )
        lines.append("")
    lines += [f"{note}" for note in report.get("notes", [])]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=1, help="transformer blocks (SD3.5-Medium has 24)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--rows", default="mmalign,flow_grpo,nft")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--flow-grpo-src", type=Path, default=Path("/tmp/flow_grpo_src"))
    parser.add_argument("--flow-grpo-python", default="/work/venv-flowgrpo/bin/python")
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "mmalign-bench-flow-grpo")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--note", action="append", default=[], help="a line appended to the markdown")
    parser.add_argument("--render", type=Path, help="re-render a saved flow_grpo.json (with --note lines) into --out")
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return 0
    from harness import cpu_flags, cpu_model, fmt  # parent side only: the worker may run in flow_grpo's venv

    if args.render:
        report = json.loads(args.render.read_text())
        report["notes"] = list(report.get("notes", [])) + list(args.note)
        write_report(report, args.out or RESULTS)
        return 0
    out = args.out or (RESULTS if args.resolution == 256 else Path(tempfile.mkdtemp(prefix="bench-flow-grpo-")))
    dtypes = [d for d in args.dtypes.split(",") if d]
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS] + [d for d in dtypes if d not in ("fp32", "bf16")]
    if unknown:
        raise SystemExit(f"unknown rows/dtypes: {unknown}")
    flags = cpu_flags().split()
    report = {
        "argv": sys.argv[1:] if argv is None else list(argv),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "layers": args.layers,
        "resolution": args.resolution,
        "dtypes": dtypes,
        "uptime_start": uptime(),
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "threads": args.threads,
            "avx512_bf16": "avx512_bf16" in flags,
            "amx": any(f.startswith("amx") for f in flags),
            "flags": " ".join(flags),
        },
        "rows": {},
        "notes": list(args.note),
    }
    t_start = time.perf_counter()
    folder, model = ensure_model(args.cache_dir, args.layers, args.threads, args.timeout)
    report["model"] = model
    report["versions"] = {"mmalign_env": model["versions"]}
    with tempfile.TemporaryDirectory(prefix="mmalign-bench-flow-work-") as work:
        for dtype in dtypes:
            for row in rows:
                key = f"{row}@{dtype}"
                spec = {
                    "task": "flow_grpo" if row == "flow_grpo" else "mmalign",
                    "algo": "nft" if row == "nft" else "grpo",
                    "dtype": dtype,
                    "folder": str(folder),
                    "work": work,
                    "resolution": args.resolution,
                    "threads": args.threads,
                    "sample_seed": model["sample_seed"],
                    "flow_grpo_src": str(args.flow_grpo_src),
                }
                python = args.flow_grpo_python if row == "flow_grpo" else sys.executable
                print(f"{key}: running (load {os.getloadavg()[0]:.2f}) ...", flush=True)
                result, error, stats = run_worker(python, spec, args.threads, args.timeout)
                if result is None:
                    print(f"  FAILED: {error}", flush=True)
                    report["rows"][key] = {"dtype": dtype, "error": error, "stats": stats}
                else:
                    report["rows"][key] = {"dtype": dtype, "row": row, **result, "stats": stats}
                    if row == "flow_grpo":
                        report["versions"]["flow_grpo_env"] = result["versions"]
                    p = result["phases"]
                    print(
                        "  "
                        + ", ".join(f"{n} {p[n]['seconds']:.1f} s / {p[n]['peak_gib']:.2f} GiB" for n in PHASES)
                        + f"; loss {fmt(result.get('loss'), '.5g')}, grad norm {fmt(result.get('grad_norm'), '.4g')}"
                        + (f"; parity {result['parity']}" if result.get("parity") else ""),
                        flush=True,
                    )
                report["uptime_end"] = uptime()
                report["total_s"] = time.perf_counter() - t_start
                write_report(report, out)
    print(f"wrote {out / 'flow_grpo.json'} and {out / 'flow_grpo.md'} ({report['total_s']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
