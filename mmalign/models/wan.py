"""Wan 2.1, Wan 2.2 TI2V-5B (as text-to-video) and Wan 2.2 A14B (two experts) as a
:class:`mmalign.models.generator.Generator` (flow matching, video).

Components, as diffusers' ``WanPipeline`` holds them: ``WanTransformer3DModel`` (trainable: 3D patches of
``patch_size`` (1, 2, 2), self-attention ``attn1``, cross-attention ``attn2`` on the text, a GELU ``ffn`` in every
``WanTransformerBlock``), ``UMT5EncoderModel`` (``text_encoder``) with its T5 tokenizer, the causal 3D
``AutoencoderKLWan`` (per-channel ``latents_mean`` / ``latents_std``; ``scale_factor_temporal`` 4,
``scale_factor_spatial`` 8 in Wan 2.1) and a flow-matching scheduler.

Re-implemented from ``diffusers/pipelines/wan/pipeline_wan.py`` (diffusers 0.42.1; no code copied):

* Prompts: each prompt cleaned as the pipeline's ``prompt_clean`` does (``ftfy.fix_text`` when ftfy is installed,
  HTML entities unescaped twice, runs of white space collapsed, stripped), tokenised padded to
  ``max_sequence_length`` (the pipeline's ``__call__`` default, 512) with truncation, encoded by UMT5 under the
  attention mask, and the last hidden state kept at the real tokens with zeros after them:
  :class:`~mmalign.models.generator.Conditions` ``prompt_embeds [B, max_sequence_length, D]``. The transformer
  gets the zero rows as they are (no mask), as in the pipeline. :meth:`WanGenerator.unconditional` is the encoded
  ``""`` (the pipeline's negative prompt when none is given).
* Video latents: ``[B, 16, F', H/8, W/8]`` with ``F' = (frames − 1) // 4 + 1``; ``frames − 1`` must be a multiple
  of 4 (the pipeline rounds other counts with a warning; here they are refused) and ``H``, ``W`` multiples of
  ``8 · 2`` (the pipeline's ``check_inputs``). The frame count of the protocol's :meth:`WanGenerator.latent_shape`
  (which takes a height and width) is :attr:`WanGenerator.num_frames` (default 81, the pipeline's; a folder's
  ``mmalign_generator.json`` or the trainers' ``frames`` option set it). Normalised per channel as the pipeline
  inverts it: ``(z − mean)·(1/std)``. :meth:`WanGenerator.decode` returns the canonical video
  ``[B, T, 3, H, W]`` in [0, 1] (:mod:`mmalign.modalities.video`), what ``postprocess_video(output_type="pt")``
  returns. Images ``[B, 3, H, W]`` given to :meth:`WanGenerator.latent_distribution` / ``to_latents`` are one-frame
  clips (``F' = 1``), as Wan trains on images: offline preference pairs of images (Flow-DPO) train it so.
* Time: the transformer is conditioned on the scheduler's timestep ``t = σ·1000`` (per sample; Wan 2.2 TI2V-5B's
  ``expand_timesteps``: the same ``t`` for every latent token, as its pipeline passes it without an image).
* Guidance: ``v_u + g·(v_c − v_u)`` (the pipeline runs the two branches apart; here one batched call: equal up to
  rounding).
* Schedule: WanPipeline calls ``scheduler.set_timesteps(steps)``; the Euler case is ``FlowMatchEulerDiscreteScheduler``
  with the checkpoint's shift. The published checkpoints ship ``UniPCMultistepScheduler`` with
  ``use_flow_sigmas=True`` and ``flow_shift`` (3.0 for Wan2.1-T2V at 480p): the generator then samples with
  ``FlowMatchEulerDiscreteScheduler(shift=flow_shift)``, the flow-matching Euler schedule of the same shift (what
  ``WanPipeline`` with that scheduler swapped in samples), since the GRPO family needs single-step Euler/SDE
  transitions; UniPC's multistep corrector itself is not reproduced. :meth:`WanGenerator.save_pipeline` keeps the
  shipped scheduler.

Wan 2.2 A14B's two experts (``transformer_2`` with ``boundary_ratio`` in ``model_index.json``), as ``WanPipeline``
runs them: the high-noise ``transformer`` at model timesteps ``t ≥ boundary_ratio·num_train_timesteps`` (inclusive,
the pipeline's ``t >= boundary_timestep``), the low-noise ``transformer_2`` below, and the low-noise stage guided at
:attr:`WanGenerator.guidance_2` (the pipeline's ``guidance_scale_2``; ``None``: the guidance of the high-noise stage,
the pipeline's default). The trainable network is then :class:`WanExperts`, one module over both experts that routes
each batch row to the expert of that row's timestep (training batches mix timesteps), so that
:meth:`WanGenerator.predict`, the samplers and every trainer (Flow-DPO and the DPO family, the GRPO family, reward
backprop) run unchanged, and peft LoRA targets wrap both experts' projections (``high.blocks.0.attn1.to_q``,
``low.blocks.0.attn1.to_q``, ...). :attr:`WanGenerator.trained_experts` (the trainers' ``experts`` key: "both",
"high" or "low") trains one expert only: the other gets no adapter and no gradient. Guidance switches per row by
``t`` (:meth:`WanGenerator.combine_guidance`), so Flow-GRPO's detached-unconditional training, the rollouts and
reward backprop all guide as the pipeline does. A LoRA is saved as diffusers loads it: the high-noise expert's in
the folder (``pipe.load_lora_weights(folder)``), the low-noise expert's in its ``transformer_2/`` subfolder
(``pipe.load_lora_weights(folder / "transformer_2", load_into_transformer_2=True)``: diffusers' Wan LoRA saver has
no second transformer, and its loader reads ``transformer.``-prefixed keys into ``transformer_2``);
:meth:`WanGenerator.save_pipeline` writes both experts and ``boundary_ratio``. Memory: both experts are held (two
14B transformers, ~28 GB each in bf16) on the generator's device; nothing offloads the idle expert.

Not supported (refused with a :class:`~mmalign.errors.WeightsError` naming it): a ``transformer_2`` without
``boundary_ratio`` or the reverse (the pipeline would never, or could not, switch); image-conditioned transformers
(``image_dim``: Wan 2.1 I2V, which is ``WanImageToVideoPipeline`` anyway). FSDP full fine-tuning (``lora_rank=0``
under FSDP) of the two experts is not wired: the gathered copy rebuilds one diffusers model.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..errors import WeightsError
from .flow_generator import FlowMatchingGenerator, PerChannelLatentStats
from .generator import Conditions, attention_projections

__all__ = [
    "DEFAULT_NUM_FRAMES",
    "EXPERTS",
    "WAN_LORA_TARGETS",
    "WanExperts",
    "WanGenerator",
    "check_num_frames",
    "prompt_clean",
]

DEFAULT_NUM_FRAMES = 81  # WanPipeline.__call__'s num_frames
DEFAULT_MAX_SEQUENCE_LENGTH = 512  # WanPipeline.__call__'s max_sequence_length

#: every WanTransformerBlock's self-attention (attn1) and text cross-attention (attn2) q/k/v/out projections and
#: its feed-forward layers: DiffSynth-Studio's Wan LoRA default ``q,k,v,o,ffn.0,ffn.2`` in diffusers' names
WAN_LORA_TARGETS: tuple[str, ...] = (*attention_projections("attn1", "attn2"), "ffn.net.0.proj", "ffn.net.2")

#: which of Wan 2.2 A14B's experts train: both, the high-noise ``transformer`` or the low-noise ``transformer_2``
EXPERTS: tuple[str, ...] = ("both", "high", "low")

#: flow-matching schedulers a Wan folder may ship (their flow shift key), replaced by the Euler schedule of that shift
_FLOW_SIGMA_SCHEDULERS = ("UniPCMultistepScheduler", "DPMSolverMultistepScheduler")


def prompt_clean(text: str) -> str:
    """The pipeline's prompt cleaning: ``ftfy.fix_text`` (when installed), HTML entities unescaped twice,
    stripped, white space runs collapsed to one space."""
    try:
        import ftfy
    except ImportError:
        ftfy = None
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def check_num_frames(frames: int, temporal: int = 4) -> int:
    """``frames`` when ``(frames − 1) % temporal == 0`` (Wan's causal VAE: one first frame, then groups of 4), else a
    :class:`ValueError` naming the nearest valid counts."""
    frames = int(frames)
    if frames < 1 or (frames - 1) % temporal:
        below = max(1, (frames - 1) // temporal * temporal + 1)
        raise ValueError(
            f"Wan needs a frame count with (frames - 1) % {temporal} == 0 (1, 5, 9, ..., 81); got {frames} "
            f"(nearest: {below} or {below + temporal})"
        )
    return frames


class WanExperts(torch.nn.Module):
    """Wan 2.2 A14B's two experts as one trainable module: ``high`` (the pipeline's ``transformer``) for rows at
    model timesteps ``t ≥ boundary_timestep`` and ``low`` (``transformer_2``) below, as ``WanPipeline`` switches
    (``t >= boundary_ratio·num_train_timesteps``: the boundary belongs to the high-noise expert). :meth:`forward`
    takes the transformer's arguments and routes each ROW by its own timestep (``[B]``, or ``[B, tokens]`` with
    ``expand_timesteps``: the row's largest), calling each expert once on its rows, so a batch that mixes noise
    levels (DPO draws ``t`` per row) gives what each expert gives alone.

    ``trained``: the experts that train (``("high", "low")``, or one of them): :meth:`add_adapter` wraps only
    those (peft target names then carry the prefix, ``high.blocks.0.attn1.to_q``), :meth:`requires_grad_` never
    unfreezes the other. Both experts are held in memory (2×14B parameters for A14B).

    With gradients on, a batch whose rows all go to frozen parameters still leaves a graph through a trained one
    (its sum times 0 is added: zero gradients, so a loss never lacks a ``grad_fn``). ``sync_experts`` (the training
    loop sets it under several processes): every forward calls both experts, high then low, an expert without rows
    on the batch's first row with its output added times 0, so that every process gathers the same expert's shards
    at the same time (FSDP and ZeRO-3 gather collectively: with rows routed apart, two processes would otherwise
    gather different experts of the same shapes and compute with mixed weights) and DDP sees every trained parameter
    take part; it costs one row of the idle expert per forward."""

    def __init__(
        self,
        high: torch.nn.Module,
        low: torch.nn.Module,
        boundary_timestep: float,
        trained: Sequence[str] = ("high", "low"),
    ):
        super().__init__()
        self.high = high
        self.low = low
        self.boundary_timestep = float(boundary_timestep)
        self.trained = tuple(trained)
        self.sync_experts = False

    @property
    def trained(self) -> tuple[str, ...]:
        """The experts that train: ``("high", "low")``, ``("high",)`` or ``("low",)``."""
        return self._trained

    @trained.setter
    def trained(self, names: Sequence[str]) -> None:
        names = tuple(names)
        if not names or any(name not in ("high", "low") for name in names) or len(set(names)) != len(names):
            raise ValueError(f"trained experts must be 'high' and/or 'low', got {names}")
        if any(getattr(expert, "peft_config", None) for expert in self.experts.values()):
            raise ValueError("the trained experts are fixed once an adapter is added")
        self._trained = names

    @property
    def experts(self) -> dict[str, torch.nn.Module]:
        return {"high": self.high, "low": self.low}

    @classmethod
    def from_config(cls, config: Any) -> WanExperts:
        """Not wired: the training loop's unsharded copy of an FSDP full fine-tuning rebuilds one diffusers model
        from its config; train the experts with LoRA (or without FSDP) instead."""
        raise NotImplementedError(
            "FSDP full fine-tuning (lora_rank=0) of Wan 2.2 A14B's two experts is not supported: use LoRA "
            "(lora_rank > 0) or DDP"
        )

    @property
    def config(self) -> Any:
        """The high-noise expert's config (both experts share the architecture: ``patch_size``...)."""
        return self.high.config

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def is_high(self, timestep: Tensor) -> Tensor:
        """``[B]`` bool: the rows the high-noise expert takes (``t ≥ boundary_timestep``)."""
        row = timestep if timestep.ndim <= 1 else timestep.flatten(1).amax(dim=1)
        return row >= self.boundary_timestep

    def forward(
        self,
        hidden_states: Tensor,
        timestep: Tensor,
        encoder_hidden_states: Tensor,
        return_dict: bool = False,
        **kwargs: Any,
    ) -> Any:
        """The experts' output ``(sample,)`` (``return_dict``: diffusers' ``Transformer2DModelOutput``): each row
        from the expert of its timestep."""
        timestep = torch.as_tensor(timestep, device=hidden_states.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(hidden_states.shape[0])
        high = self.is_high(timestep)
        grad = torch.is_grad_enabled()

        def call(expert: torch.nn.Module, rows: Tensor | slice) -> Tensor:
            return expert(
                hidden_states=hidden_states[rows],
                timestep=timestep[rows],
                encoder_hidden_states=encoder_hidden_states[rows],
                return_dict=False,
                **kwargs,
            )[0]

        if not self.sync_experts and (bool(high.all()) or not bool(high.any())):
            sample = call(self.high if bool(high.all()) else self.low, slice(None))
        else:  # each expert on its rows, high then low (sync_experts: an idle one on row 0, times 0)
            sample, idle = None, []
            for mask, expert in ((high, self.high), (~high, self.low)):
                rows = torch.nonzero(mask).flatten()
                if rows.numel() == 0:
                    if self.sync_experts:
                        idle.append(call(expert, slice(0, 1)))
                    continue
                part = call(expert, rows)
                if sample is None:
                    sample = part.new_zeros((hidden_states.shape[0], *part.shape[1:]))
                sample = sample.index_copy(0, rows, part)
            for part in idle:
                sample = torch.cat([sample[:1] + 0 * part, sample[1:]])
        if grad and not sample.requires_grad:  # every row went to a frozen expert: a zero-gradient graph
            trained = next((p for p in self.parameters() if p.requires_grad), None)
            if trained is not None:
                local = trained.to_local() if hasattr(trained, "to_local") else trained
                sample = sample + 0 * local.sum().to(sample.dtype)
        if return_dict:
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=sample)
        return (sample,)

    # -- what the training loop asks of a diffusers model (peft, checkpointing, attention) ------------------
    def requires_grad_(self, requires_grad: bool = True) -> WanExperts:
        """Gradients for the trained experts only (the other stays frozen whatever is asked)."""
        for name, expert in self.experts.items():
            expert.requires_grad_(bool(requires_grad) and name in self.trained)
        return self

    def add_adapter(self, adapter_config: Any, adapter_name: str = "default") -> None:
        """diffusers' ``add_adapter`` on each trained expert (the frozen one gets no LoRA)."""
        for name in self.trained:
            self.experts[name].add_adapter(adapter_config, adapter_name=adapter_name)

    @property
    def peft_config(self) -> dict[str, Any]:
        """The trained experts' peft configs (the same for both: :meth:`add_adapter` gives them one)."""
        return self.experts[self.trained[0]].peft_config

    def _adapted(self) -> list[torch.nn.Module]:
        return [self.experts[name] for name in self.trained if getattr(self.experts[name], "peft_config", None)]

    def disable_adapters(self) -> None:
        for expert in self._adapted():
            expert.disable_adapters()

    def enable_adapters(self) -> None:
        for expert in self._adapted():
            expert.enable_adapters()

    def enable_gradient_checkpointing(self) -> None:
        """Both experts (the frozen one too: reward backprop differentiates through it to the latents)."""
        for expert in self.experts.values():
            expert.enable_gradient_checkpointing()

    def enable_xformers_memory_efficient_attention(self) -> None:
        for expert in self.experts.values():
            expert.enable_xformers_memory_efficient_attention()

    def save_pretrained(self, folder: str | Path, **kwargs: Any) -> None:
        """``high`` into ``folder`` and ``low`` into its sibling ``<folder>_2`` (``transformer`` →
        ``transformer_2``: the pipeline's layout)."""
        folder = Path(folder)
        self.high.save_pretrained(str(folder), **kwargs)
        self.low.save_pretrained(str(folder.with_name(folder.name + "_2")), **kwargs)


class WanGenerator(PerChannelLatentStats, FlowMatchingGenerator):
    """Wan text-to-video components behind the generator protocol (see :mod:`mmalign.models.generator`,
    :class:`~mmalign.models.flow_generator.FlowMatchingGenerator` and this module). Latents are 5-D
    ``[B, C, F', h, w]``; :meth:`decode` gives videos ``[B, T, 3, H, W]`` in [0, 1]."""

    latent_rank: ClassVar[int] = 4  # [C, F', h, w]
    family: ClassVar[str] = "wan"
    modality: ClassVar[str] = "video"
    lora_targets: ClassVar[tuple[str, ...]] = WAN_LORA_TARGETS
    block_class: ClassVar[str] = "WanTransformerBlock"
    pipeline_name: ClassVar[str] = "WanPipeline"
    display_name: ClassVar[str] = "Wan"
    transformer_class: ClassVar[str] = "WanTransformer3DModel"
    vae_class: ClassVar[str] = "AutoencoderKLWan"
    text_encoder_classes: ClassVar[dict[str, str]] = {"text_encoder": "UMT5EncoderModel"}
    exact_sizes: ClassVar[bool] = True

    def __init__(
        self,
        components: dict[str, Any],
        folder: Path | None = None,
        max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
        num_frames: int = DEFAULT_NUM_FRAMES,
        expand_timesteps: bool = False,
        boundary_ratio: float | None = None,
        experts: str = "both",
        guidance_2: float | None = None,
    ):
        second = components.get("transformer_2")
        if (second is None) != (boundary_ratio is None):
            raise WeightsError(
                f"{folder}: Wan 2.2 two-expert pipelines need both transformer_2 and boundary_ratio (got "
                f"transformer_2={'set' if second is not None else None}, boundary_ratio={boundary_ratio})"
            )
        if boundary_ratio is not None and not 0.0 < float(boundary_ratio) < 1.0:
            raise WeightsError(f"{folder}: boundary_ratio must be in (0, 1), got {boundary_ratio}")
        for transformer in (components["transformer"], second):
            if transformer is not None and transformer.config.get("image_dim") is not None:
                raise WeightsError(f"{folder}: an image-conditioned Wan transformer (image_dim): not text-to-video")
        if not 0 < int(max_sequence_length) <= 4096:
            raise ValueError(f"max_sequence_length must be in 1..4096, got {max_sequence_length}")
        super().__init__(components, folder)
        self.shipped_scheduler = components.get("shipped_scheduler", self.scheduler)
        self.max_sequence_length = int(max_sequence_length)
        self.expand_timesteps = bool(expand_timesteps)
        self.num_frames = num_frames
        self.transformer_2 = second
        self.boundary_ratio = None if boundary_ratio is None else float(boundary_ratio)
        self.experts: WanExperts | None = None
        if second is not None:
            self.experts = WanExperts(self.transformer, second, self.boundary_timestep)
            self.trained_experts = experts
        elif experts != "both":
            raise ValueError(f"experts={experts}: {folder} has one transformer (not Wan 2.2 A14B's two experts)")
        self.guidance_2 = guidance_2

    # -- Wan 2.2 A14B's two experts --------------------------------------------------------------------------
    @property
    def two_experts(self) -> bool:
        """Whether this is a two-expert (Wan 2.2 A14B) pipeline."""
        return self.experts is not None

    @property
    def boundary_timestep(self) -> float | None:
        """``boundary_ratio·num_train_timesteps`` (the pipeline's ``boundary_timestep``), ``None`` for one expert."""
        return None if self.boundary_ratio is None else self.boundary_ratio * self.num_train_timesteps

    @property
    def trained_experts(self) -> str:
        """Which experts train: "both", "high" (``transformer``) or "low" (``transformer_2``); set before LoRA is
        added (the trainers' ``experts`` key)."""
        if self.experts is None:
            return "both"
        trained = self.experts.trained
        return "both" if len(trained) == 2 else trained[0]

    @trained_experts.setter
    def trained_experts(self, experts: str) -> None:
        if experts not in EXPERTS:
            raise ValueError(f"experts must be one of {EXPERTS}, got {experts!r}")
        if self.experts is None:
            if experts != "both":
                raise ValueError(f"experts={experts}: {self.folder} has one transformer (not Wan 2.2 A14B's experts)")
            return
        self.experts.trained = ("high", "low") if experts == "both" else (experts,)

    @property
    def guidance_2(self) -> float | None:
        """The low-noise stage's guidance scale (``WanPipeline``'s ``guidance_scale_2``): used where ``t <
        boundary_timestep`` whenever guidance is on; ``None``: the same scale as the high-noise stage."""
        return self._guidance_2

    @guidance_2.setter
    def guidance_2(self, scale: float | None) -> None:
        if scale is not None and self.experts is None:
            raise ValueError(f"guidance_2={scale}: only a two-expert (Wan 2.2 A14B) pipeline has a low-noise stage")
        self._guidance_2 = None if scale is None else float(scale)

    @property
    def trainable(self) -> torch.nn.Module:
        """The transformer, or for two experts the :class:`WanExperts` over both."""
        return self.experts if self.experts is not None else self.transformer

    def to(self, device: str | torch.device) -> WanGenerator:
        super().to(device)
        if self.transformer_2 is not None:
            self.transformer_2.to(device)
        return self

    @property
    def num_frames(self) -> int:
        """Frames per video of :meth:`latent_shape` (``(frames − 1) % 4 == 0``)."""
        return self._num_frames

    @num_frames.setter
    def num_frames(self, frames: int) -> None:
        self._num_frames = check_num_frames(frames, self.vae_scale_factor_temporal)

    # -- loading -------------------------------------------------------------------------------------------
    @staticmethod
    def _has_second(index: dict[str, Any]) -> bool:
        second = index.get("transformer_2")
        return bool(second) and second[0] is not None

    @classmethod
    def check_index(cls, folder: Path, index: dict[str, Any]) -> None:
        """Refuse, before any weight loads, a ``transformer_2`` without ``boundary_ratio`` or the reverse."""
        if cls._has_second(index) != (index.get("boundary_ratio") is not None):
            raise WeightsError(
                f"{folder}: Wan 2.2 two-expert pipelines need both transformer_2 and boundary_ratio (model_index.json: "
                f"transformer_2={index.get('transformer_2')}, boundary_ratio={index.get('boundary_ratio')})"
            )
        super().check_index(folder, index)

    @classmethod
    def load_scheduler(cls, folder: Path, index: dict[str, Any]) -> Any:
        """The Euler scheduler of the shipped one (:meth:`euler_scheduler`)."""
        return cls.euler_scheduler(cls._shipped_scheduler(folder, index).config, folder)

    @classmethod
    def load_components(cls, folder: Path, index: dict[str, Any], dtype: torch.dtype | None) -> dict[str, Any]:
        """The pipeline's components, the scheduler as :meth:`load_scheduler` converts it and the shipped one as
        ``shipped_scheduler`` (what :meth:`save_pipeline` writes back)."""
        import diffusers

        components = super().load_components(folder, index, dtype)
        components["shipped_scheduler"] = cls._shipped_scheduler(folder, index)
        if cls._has_second(index):
            typed = {} if dtype is None else {"torch_dtype": dtype}
            components["transformer_2"] = getattr(diffusers, cls.transformer_class).from_pretrained(
                folder, subfolder="transformer_2", **typed
            )
        return components

    @staticmethod
    def _shipped_scheduler(folder: Path, index: dict[str, Any]) -> Any:
        import diffusers

        name = (index.get("scheduler") or [None, None])[1]
        scheduler_class = getattr(diffusers, name, None) if name else None
        if scheduler_class is None:
            raise WeightsError(f"{folder}: Wan pipeline without a known scheduler (model_index.json: {name!r})")
        return scheduler_class.from_pretrained(folder, subfolder="scheduler")

    @staticmethod
    def euler_scheduler(config: Any, folder: Any = None):
        """The ``FlowMatchEulerDiscreteScheduler`` of a scheduler config: itself, or for a flow-sigma multistep
        scheduler (UniPC / DPM-Solver with ``use_flow_sigmas``, as Wan ships) the Euler scheduler with its
        ``flow_shift``; other schedulers are refused."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        name = config.get("_class_name", "FlowMatchEulerDiscreteScheduler")
        if name == "FlowMatchEulerDiscreteScheduler":
            return FlowMatchEulerDiscreteScheduler.from_config(config)
        if name in _FLOW_SIGMA_SCHEDULERS and config.get("use_flow_sigmas", False):
            return FlowMatchEulerDiscreteScheduler(
                num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
                shift=float(config.get("flow_shift", 1.0)),
            )
        raise WeightsError(
            f"{folder}: Wan scheduler {name} is not a flow-matching one (FlowMatchEulerDiscreteScheduler, or "
            f"{' / '.join(_FLOW_SIGMA_SCHEDULERS)} with use_flow_sigmas)"
        )

    @classmethod
    def index_options(cls, folder: Path, index: dict[str, Any]) -> dict[str, Any]:
        """``expand_timesteps`` and ``boundary_ratio`` from ``model_index.json``; ``max_sequence_length``,
        ``num_frames`` and ``guidance_2`` from the folder's ``mmalign_generator.json`` when it has them."""
        from .sd3 import read_generator_config

        config = read_generator_config(folder)
        options: dict[str, Any] = {
            "expand_timesteps": bool(index.get("expand_timesteps", False)),
            "boundary_ratio": index.get("boundary_ratio"),
        }
        for key in ("max_sequence_length", "num_frames"):
            if key in config:
                options[key] = int(config[key])
        if config.get("guidance_2") is not None:
            options["guidance_2"] = float(config["guidance_2"])
        return options

    # -- conditioning ----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_conditions(self, prompts: Sequence[str]) -> Conditions:
        """``prompt_embeds [B, max_sequence_length, D]``: UMT5's last hidden state at the real tokens, zeros after
        them; equal to ``WanPipeline.encode_prompt(prompts, do_classifier_free_guidance=False,
        max_sequence_length=...)[0]``."""
        prompts = [prompt_clean(prompt) for prompt in self._prompt_list(prompts)]
        encoder = self.text_encoder
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        mask = tokens.attention_mask.to(encoder.device)
        hidden = encoder(tokens.input_ids.to(encoder.device), mask).last_hidden_state
        keep = torch.arange(hidden.shape[1], device=hidden.device)[None] < mask.gt(0).sum(dim=1)[:, None]
        embeds = torch.where(keep[..., None], hidden, torch.zeros_like(hidden))
        return Conditions({"prompt_embeds": embeds.to(encoder.dtype)}, {"family": self.family})

    # -- latents -------------------------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent along height and width (``scale_factor_spatial``: 8 in Wan 2.1, 16 in Wan 2.2)."""
        return int(self.vae.config.get("scale_factor_spatial") or 8)

    @property
    def vae_scale_factor_temporal(self) -> int:
        """Frames per latent frame after the first (``scale_factor_temporal``, 4)."""
        return int(self.vae.config.get("scale_factor_temporal") or 4)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.z_dim)

    @property
    def patch_size(self) -> int:
        """Latents per side of one transformer token (``patch_size[1]``, 2)."""
        return int(self.transformer.config.patch_size[1])

    def latent_frames(self, frames: int | None = None) -> int:
        """``F' = (frames − 1) // 4 + 1`` latent frames of ``frames`` (default :attr:`num_frames`) frames."""
        frames = self.num_frames if frames is None else check_num_frames(frames, self.vae_scale_factor_temporal)
        return (frames - 1) // self.vae_scale_factor_temporal + 1

    def latent_shape(self, height: int, width: int, frames: int | None = None) -> tuple[int, int, int, int]:
        """``(C, F', h, w)`` of the latent of a ``frames``-frame (default :attr:`num_frames`) ``height×width``
        video: ``F' = (frames − 1) // 4 + 1``, ``h = height // 8``; heights and widths must be multiples of 16
        and ``(frames − 1) % 4 == 0``."""
        channels, h, w = super().latent_shape(height, width)
        return channels, self.latent_frames(frames), h, w

    def _as_clips(self, pixels: Tensor) -> Tensor:
        """Images ``[B, 3, H, W]`` or videos ``[B, T, 3, H, W]`` → the VAE's ``[B, 3, T, H, W]`` (images: ``T = 1``)."""
        if pixels.ndim == 4:
            return pixels.unsqueeze(2)
        if pixels.ndim == 5:
            check_num_frames(pixels.shape[1], self.vae_scale_factor_temporal)
            return pixels.transpose(1, 2)
        raise ValueError(f"expected images [B, 3, H, W] or videos [B, T, 3, H, W], got {tuple(pixels.shape)}")

    @torch.no_grad()
    def latent_distribution(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """The VAE posterior ``(mean, std)`` (float32, ``[B, C, F', h, w]`` each) of images ``[B, 3, H, W]`` (one-frame
        clips) or videos ``[B, T, 3, H, W]`` in [-1, 1]."""
        return super().latent_distribution(self._as_clips(pixels))

    def decode(self, latents: Tensor, grad: bool = False) -> Tensor:
        """Latents ``[B, C, F', h, w]`` → videos ``[B, T, 3, H, W]`` in [0, 1] (``T = 4·(F' − 1) + 1``): the
        pipeline's denormalisation, VAE decode and ``postprocess_video`` (``x/2 + 0.5`` clamped, frames first);
        ``grad=True`` keeps the graph."""
        if latents.ndim != 5:
            raise ValueError(f"Wan latents are [B, C, F', h, w], got {tuple(latents.shape)}")
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            video = self.vae.decode(self.denormalise_latents(latents.to(self.vae.dtype))).sample
            return (video.float() / 2 + 0.5).clamp(0, 1).transpose(1, 2)

    # -- flow matching -----------------------------------------------------------------------------------
    def predict(self, model: torch.nn.Module, x_t: Tensor, t: Tensor | float, conditions: Conditions) -> Tensor:
        """``model(hidden_states=x_t, timestep=t, encoder_hidden_states=prompt_embeds)`` in the model's dtype
        (``expand_timesteps``: ``t`` repeated over the ``F'·(h/2)·(w/2)`` latent tokens), returned in float32."""
        if x_t.ndim != 5:
            raise ValueError(f"Wan latents are [B, C, F', h, w], got {tuple(x_t.shape)}")
        dtype = next(model.parameters()).dtype
        timestep = self.batch_timesteps(t, x_t)
        if self.expand_timesteps:
            _, _, frames, height, width = x_t.shape
            patch = model.config.patch_size if hasattr(model, "config") else (1, 2, 2)
            tokens = (frames // patch[0]) * (height // patch[1]) * (width // patch[2])
            timestep = timestep[:, None].expand(-1, tokens)
        out = model(
            hidden_states=x_t.to(dtype),
            timestep=timestep,
            encoder_hidden_states=conditions["prompt_embeds"].to(x_t.device, dtype),
            return_dict=False,
        )[0]
        return out.float()

    def guidance_scale(self, guidance: float, t: Tensor | float, like: Tensor) -> float | Tensor:
        """The guidance scale at model timesteps ``t``: ``guidance``, or for two experts with :attr:`guidance_2` set
        that scale at ``t < boundary_timestep`` (``WanPipeline``'s ``current_guidance_scale``): a float when every
        row is on one side, else a per-row tensor broadcastable to ``like``."""
        if self.guidance_2 is None or self.boundary_timestep is None:
            return guidance
        low = self.batch_timesteps(t, like) < self.boundary_timestep
        if low.ndim > 1:
            low = low.flatten(1).all(dim=1)
        if bool(low.all()) or not bool(low.any()):
            return self.guidance_2 if bool(low.all()) else guidance
        scales = torch.where(low, self.guidance_2, guidance).to(like.device, like.dtype)
        return scales.reshape(-1, *([1] * (like.ndim - 1)))

    def combine_guidance(self, v_uncond: Tensor, v_cond: Tensor, guidance: float, t: Tensor | float) -> Tensor:
        """``v_u + g·(v_c − v_u)`` with ``g`` from :meth:`guidance_scale` (per row by its timestep)."""
        return v_uncond + self.guidance_scale(guidance, t, v_cond) * (v_cond - v_uncond)

    def schedule_sigmas(self, steps: int) -> None:
        """The scheduler's own σ (``WanPipeline`` calls ``set_timesteps(steps)``)."""
        return None

    # -- pipelines ------------------------------------------------------------------------------------------
    def pipeline_call_options(self) -> dict[str, Any]:
        """Keyword arguments of ``WanPipeline.__call__`` that make it sample what this generator samples."""
        options: dict[str, Any] = {"num_frames": self.num_frames, "max_sequence_length": self.max_sequence_length}
        if self.guidance_2 is not None:
            options["guidance_scale_2"] = self.guidance_2
        return options

    def pipeline_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"expand_timesteps": True} if self.expand_timesteps else {}
        if self.boundary_ratio is not None:
            options["boundary_ratio"] = self.boundary_ratio
        return options

    def pipeline(self, transformer: torch.nn.Module | None = None):
        """The ``WanPipeline`` over these components; ``transformer`` (default :attr:`trainable`) may be a
        :class:`WanExperts`, whose experts become ``transformer`` and ``transformer_2``."""
        model = self.trainable if transformer is None else transformer
        high, low = (model.high, model.low) if isinstance(model, WanExperts) else (model, None)
        if self.two_experts and low is None:
            low = self.transformer_2
        pipe = super().pipeline(high)
        if low is not None:
            pipe.register_modules(transformer_2=low)
        return pipe

    def save_lora(self, folder: str | Path, layers: dict[str, Tensor], metadata: dict[str, Any] | None) -> Path:
        """peft LoRA ``layers`` of :attr:`trainable` as ``WanPipeline.save_lora_weights`` writes them
        (``pytorch_lora_weights.safetensors``). Two experts: the ``high.``-prefixed layers (``transformer``) into
        ``folder`` (``pipe.load_lora_weights(folder)``), the ``low.`` ones (``transformer_2``) into
        ``folder/transformer_2`` (``pipe.load_lora_weights(folder / "transformer_2", load_into_transformer_2=True)``);
        an expert that did not train writes nothing."""
        from diffusers import WanPipeline

        def write(target: Path, state: dict[str, Tensor]) -> None:
            kwargs: dict[str, Any] = {"transformer_lora_layers": state}
            if metadata is not None:
                kwargs["transformer_lora_adapter_metadata"] = dict(metadata)
            WanPipeline.save_lora_weights(str(target), **kwargs)

        folder = Path(folder)
        if not self.two_experts:
            write(folder, layers)
            return folder
        parts: dict[str, dict[str, Tensor]] = {"high": {}, "low": {}}
        for key, value in layers.items():
            expert, dot, rest = key.partition(".")
            if expert not in parts or not dot:
                raise ValueError(f"LoRA key {key!r} belongs to neither expert (high. / low.)")
            parts[expert][rest] = value
        for expert, target in (("high", folder), ("low", folder / "transformer_2")):
            if parts[expert]:
                write(target, parts[expert])
        return folder

    def save_pipeline(self, folder: str | Path, transformer: torch.nn.Module | None = None) -> Path:
        """The pipeline folder with the scheduler it shipped with (UniPC for the published checkpoints), both
        experts and ``boundary_ratio`` for Wan 2.2 A14B (``transformer`` a :class:`WanExperts` or the high-noise
        expert), and ``mmalign_generator.json`` when ``max_sequence_length`` or ``num_frames`` are not the
        pipeline's or :attr:`guidance_2` is set."""
        from .sd3 import write_generator_config

        pipe = self.pipeline(transformer)
        pipe.register_modules(scheduler=self.shipped_scheduler)
        pipe.save_pretrained(str(folder))
        settings = {}
        if self.max_sequence_length != DEFAULT_MAX_SEQUENCE_LENGTH:
            settings["max_sequence_length"] = self.max_sequence_length
        if self.num_frames != DEFAULT_NUM_FRAMES:
            settings["num_frames"] = self.num_frames
        if self.guidance_2 is not None:
            settings["guidance_2"] = self.guidance_2
        if settings:
            write_generator_config(folder, **settings)
        return Path(folder)
