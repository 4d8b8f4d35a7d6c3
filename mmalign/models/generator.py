"""One generator protocol for every trainer: what an algorithm needs from a text-to-media model, whatever its
architecture (UNet or flow-matching transformer), its text encoders and its noise parametrisation.

A trainer written against :class:`Generator` runs on every family that implements it: it encodes prompts once
(:meth:`Generator.encode_conditions`, cacheable to disk with :meth:`Conditions.save` so that big text encoders
can be freed), builds noisy inputs and regression targets (:meth:`Generator.add_noise`,
:meth:`Generator.training_target`), calls the trainable network (:meth:`Generator.predict`), walks a sampling
schedule (:meth:`Generator.sampling_schedule` with the step functions of :mod:`mmalign.models.flow_sampling`)
and decodes to the canonical media tensor (:meth:`Generator.decode`).

Time convention: ``t`` is always the *model timestep*, the value the denoiser is conditioned on and that the
family's diffusers scheduler hands to it: DDPM's integer timesteps (0..999) for UNets, ``σ·num_train_timesteps``
(a float, σ in [0, 1]) for flow-matching families. :class:`Schedule` carries both the timesteps and the σ
(or ᾱ-derived) values a sampler step needs.

How the UNet :class:`mmalign.models.policy.DiffusionPolicy` maps onto this protocol (not rewritten yet):
``family`` = "sd"/"sdxl"; ``encode_conditions`` = ``encode_prompt`` (``PromptEmbeds.hidden`` → "prompt_embeds",
``pooled`` → "pooled_prompt_embeds"; SDXL time ids would be another named tensor); ``unconditional`` =
``unconditional(encode_prompt([""]))`` repeated; ``to_latents`` = ``latent_distribution`` + ``sample_latents``
(on images rescaled to [-1, 1]); ``add_noise`` / ``training_target`` = the two halves of ``noisy_and_target``
(epsilon, v-prediction or sample, chosen by the scheduler's ``prediction_type``); ``predict`` = ``predict``
(with ``time_ids``); ``decode`` = ``decode``; ``trainable`` = ``unet``; ``block_class`` = diffusers'
``BasicTransformerBlock``; its samplers are DDIM steps over ``DDIMScheduler`` timesteps. AnimateDiff
(:class:`mmalign.models.animatediff.AnimateDiffPolicy`) is a video subclass of it: ``modality`` "video",
``num_frames``, latents ``[B, C, F, h, w]``, ``decode`` to ``[B, T, 3, H, W]``; the DDIM chains and the UNet
trainers take its latent shape (``latent_shape``) and decoding (``decode(latents, grad=...)``) from the policy.
AudioLDM 2 (:class:`mmalign.models.audioldm2.AudioLDM2Policy`) is an audio subclass: ``modality`` "audio", mel
latents ``[B, C, T', M']``, ``decode`` to mono audio ``[B, 1, S]`` in [-1, 1], its second cross-attention input (T5
states and mask) in ``PromptEmbeds.extra``; offline audio is encoded through the reference's log-mel front end
(:mod:`mmalign.models.audioldm_mel`).

Families register in :data:`FAMILIES` under the diffusers pipeline class that ``model_index.json`` names, as
``"module:Class"`` strings imported on first use (``import mmalign`` stays light).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from ..errors import UnsupportedGeneratorError, WeightsError

if TYPE_CHECKING:
    import torch
    from torch import Tensor

__all__ = [
    "FAMILIES",
    "PARAMETRISATIONS",
    "Conditions",
    "Generator",
    "Schedule",
    "attention_projections",
    "check_parametrisation",
    "generator_class_of",
    "load_generator",
    "parametrisation_of",
    "pipeline_class_of",
    "read_model_index",
    "save_lora_weights",
]


@dataclass
class Conditions:
    """The conditioning of a batch as named tensors, all with the batch as their first dimension (SD3:
    ``prompt_embeds [B, L, D]`` and ``pooled_prompt_embeds [B, P]``; other families add time ids, attention
    masks, guidance...). A plain bag of tensors so that it can be sliced, concatenated, moved and written to disk
    without knowing the family; ``meta`` holds strings (the family, the model) saved alongside."""

    tensors: dict[str, Tensor]
    meta: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        sizes = {name: int(tensor.shape[0]) for name, tensor in self.tensors.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"Conditions tensors disagree on the batch size: {sizes}")

    def __getitem__(self, name: str) -> Tensor:
        return self.tensors[name]

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __len__(self) -> int:
        return int(next(iter(self.tensors.values())).shape[0]) if self.tensors else 0

    def select(self, rows: Tensor | slice | Sequence[int]) -> Conditions:
        """The rows ``rows`` (an index tensor, a list of ints or a slice) of every tensor."""
        import torch

        if not isinstance(rows, slice | torch.Tensor):
            rows = torch.as_tensor(list(rows), dtype=torch.long)
        return Conditions({name: tensor[rows] for name, tensor in self.tensors.items()}, dict(self.meta))

    def tile(self, times: int) -> Conditions:
        """The whole batch ``times`` times over (``[a, b, a, b]``): both halves of a preference pair."""
        return Conditions.cat([self] * times)

    def repeat(self, times: int) -> Conditions:
        """Every row repeated ``times`` times in a row (``[a, a, b, b]``), as ``num_images_per_prompt`` does."""
        return Conditions(
            {name: tensor.repeat_interleave(times, dim=0) for name, tensor in self.tensors.items()}, dict(self.meta)
        )

    @classmethod
    def cat(cls, parts: Sequence[Conditions]) -> Conditions:
        """Concatenate along the batch (e.g. ``[unconditional, conditional]`` for classifier-free guidance)."""
        import torch

        if not parts:
            raise ValueError("Conditions.cat needs at least one Conditions")
        names = list(parts[0].tensors)
        for part in parts[1:]:
            if list(part.tensors) != names:
                raise ValueError(f"Conditions.cat: tensor names differ: {names} vs {list(part.tensors)}")
        return cls({name: torch.cat([p.tensors[name] for p in parts]) for name in names}, dict(parts[0].meta))

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Conditions:
        """Moved (and floating tensors cast to ``dtype``, when given)."""
        moved = {}
        for name, tensor in self.tensors.items():
            cast = dtype if dtype is not None and tensor.is_floating_point() else None
            moved[name] = tensor.to(device=device, dtype=cast)
        return Conditions(moved, dict(self.meta))

    def save(self, path: str | Path) -> Path:
        """Write to a safetensors file (bit-exact; ``meta`` as its string metadata, plus the tensor order, which
        safetensors does not keep)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if _ORDER_KEY in self.meta:
            raise ValueError(f"Conditions.meta may not use the reserved key {_ORDER_KEY!r}")
        metadata = {**self.meta, _ORDER_KEY: json.dumps(list(self.tensors))}
        save_file({n: t.detach().contiguous().cpu() for n, t in self.tensors.items()}, str(path), metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> Conditions:
        """Read a file written by :meth:`save` (tensors in their saved order)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise WeightsError(f"{path}: no such conditions file")
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            meta = dict(handle.metadata() or {})
            names = json.loads(meta.pop(_ORDER_KEY, "null")) or sorted(handle.keys())  # noqa: SIM118
            tensors = {name: handle.get_tensor(name) for name in names}
        return cls(tensors, meta)


_ORDER_KEY = "mmalign.conditions.order"


@dataclass
class Schedule:
    """A sampling schedule of ``steps`` steps: ``timesteps [steps]`` (the model timesteps fed to
    :meth:`Generator.predict`) and ``sigmas [steps + 1]`` (the noise levels a step goes between, ending at the
    clean level: step ``i`` goes from ``sigmas[i]`` to ``sigmas[i + 1]``)."""

    timesteps: Tensor
    sigmas: Tensor

    def __len__(self) -> int:
        return int(self.timesteps.shape[0])


@runtime_checkable
class Generator(Protocol):
    """What every trainer needs from a generator family. Implementations hold the frozen components (text
    encoders, VAE, scheduler config) and the trainable network; they hold no optimiser and no training state.

    The flow-matching families derive from :class:`mmalign.models.flow_generator.FlowMatchingGenerator`, which
    implements the shared part of this protocol; they also have (outside the protocol, so that other
    implementations need not) ``guided_velocity(model, x, t, conditions, uncond, guidance)``, the pipeline's
    classifier-free guidance, which :func:`mmalign.models.flow_rollout.guided_velocity` uses when present."""

    family: ClassVar[str]
    """Family name ("sd3", "flux", "sd", ...): logs and checkpoints say which code path ran."""

    parametrisation: ClassVar[str]
    """"flow" (flow matching: velocity on σ in [0, 1]), "diffusion" (epsilon/v on a DDPM schedule) or "v-diffusion"
    (v-prediction on continuous σ with EDM preconditioning, Stable Audio: :mod:`mmalign.models.stable_audio`): trainers
    declare the ones their mathematics applies to (:data:`PARAMETRISATIONS`), checked before any weight loads."""

    lora_layers_key: ClassVar[str]
    """The keyword of the diffusers pipeline's ``save_lora_weights`` for :attr:`trainable`'s layers
    ("transformer_lora_layers", "unet_lora_layers")."""

    trainable: torch.nn.Module
    """The network that training updates (transformer or UNet), the one LoRA wraps and FSDP shards; passed
    explicitly to :meth:`predict` so that a wrapped or reference copy can be used instead."""

    lora_targets: ClassVar[tuple[str, ...]]
    """Default peft ``target_modules`` for this family (from its reference training scripts), so recipes do not
    repeat architecture knowledge."""

    block_class: ClassVar[str]
    """Class name of the repeated block of :attr:`trainable`: the unit FSDP wraps and gradient checkpointing
    recomputes."""

    def encode_conditions(self, prompts: Sequence[str]) -> Conditions:
        """Text → :class:`Conditions`, equal to the diffusers pipeline's own prompt encoding; computed once per
        prompt and cacheable (:meth:`Conditions.save`) so text encoders can leave memory while training."""
        ...

    def unconditional(self, count: int) -> Conditions:
        """The unconditional branch of classifier-free guidance for ``count`` samples, as the pipeline builds it
        without a negative prompt (encoded empty prompt, or zeros where the pipeline forces them)."""
        ...

    def latent_distribution(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """Images ``[B, 3, H, W]`` in [-1, 1] → the VAE posterior ``(mean, std)`` in float32 (a family whose
        training scripts take the posterior mode returns that mode and a zero std): what offline trainers cache,
        drawing a fresh latent per step with :meth:`sample_latents`."""
        ...

    def sample_latents(self, mean: Tensor, std: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A posterior sample ``mean + std·n`` (``n`` drawn on the CPU from ``generator``) turned into the latents
        the trainable network denoises (the family's scaling/shift, normalisation, patchify)."""
        ...

    def to_latents(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] → the latents the trainable network denoises, float32: equal to
        ``sample_latents(*latent_distribution(images * 2 - 1), generator)``. Offline data (DPO pairs, SFT) enters
        training through here."""
        ...

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        """``(C, h, w)`` of one latent of a ``height×width`` image, as :meth:`to_latents` returns it and samplers
        draw initial noise (always an image-shaped layout, whatever the network's token packing); video families
        add the latent frames, ``(C, F', h, w)`` (Wan: of its ``num_frames``). Samplers and losses treat latents
        as ``[B, *latent_shape]`` of any rank."""
        ...

    def decode(self, latents: Tensor, grad: bool = False) -> Tensor:
        """Latents → images ``[B, 3, H, W]`` in [0, 1] (video families: ``[B, T, 3, H, W]``; the generator's
        ``modality`` says which, "image" when it has none), the canonical tensor rewards read; ``grad=True``
        keeps the graph (reward backpropagation: ReFL, DRaFT, AlignProp)."""
        ...

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The forward process at model timesteps ``t [B]``: the noisy input of a training step."""
        ...

    def training_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What :meth:`predict` regresses on at ``t`` (epsilon, v or flow velocity): losses stay parametrisation
        free (Diffusion-DPO, SFT, KL terms compare predictions with this target)."""
        ...

    def predict(self, model: torch.nn.Module, x_t: Tensor, t: Tensor, conditions: Conditions) -> Tensor:
        """The output of ``model`` (:attr:`trainable`, possibly LoRA-wrapped or a reference copy) at ``x_t``,
        model timesteps ``t [B]`` and ``conditions``, in float32, in the parametrisation of
        :meth:`training_target`; the only place that knows the network's call signature."""
        ...

    def sampling_schedule(
        self, steps: int, latent_shape: Sequence[int] | None = None, device: str | torch.device | None = None
    ) -> Schedule:
        """The timesteps and noise levels of a ``steps``-step sampler, as the pipeline sets its scheduler:
        samplers and GRPO-family trainers walk this with the step functions of
        :mod:`mmalign.models.flow_sampling` (or DDIM for UNets). ``latent_shape`` (``(C, h, w)`` of
        :meth:`latent_shape`) is required by families whose schedule shifts with the resolution (dynamic
        shifting: FLUX.1-dev, FLUX.2, Qwen-Image), which count its image tokens; ``device`` defaults to the
        generator's."""
        ...


# pipeline class named by model_index.json -> "module:Class" of its family, imported on first use
FAMILIES: dict[str, str] = {
    "StableDiffusionPipeline": "mmalign.models.policy:DiffusionPolicy",
    "StableDiffusionXLPipeline": "mmalign.models.policy:DiffusionPolicy",
    "StableDiffusion3Pipeline": "mmalign.models.sd3:SD3Generator",
    "FluxPipeline": "mmalign.models.flux:FluxGenerator",
    "Flux2KleinPipeline": "mmalign.models.flux2:Flux2KleinGenerator",
    "QwenImagePipeline": "mmalign.models.qwen_image:QwenImageGenerator",
    "ZImagePipeline": "mmalign.models.z_image:ZImageGenerator",
    "WanPipeline": "mmalign.models.wan:WanGenerator",
    "AnimateDiffPipeline": "mmalign.models.animatediff:AnimateDiffPolicy",
    "StableAudioPipeline": "mmalign.models.stable_audio:StableAudioGenerator",
    "AudioLDM2Pipeline": "mmalign.models.audioldm2:AudioLDM2Policy",
}


def attention_projections(*attentions: str) -> tuple[str, ...]:
    """The q/k/v/out projections of diffusers ``Attention`` modules named ``attentions`` (peft target names):
    ``attention_projections("attn1")`` = ``("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0")``."""
    return tuple(f"{name}.{projection}" for name in attentions for projection in ("to_q", "to_k", "to_v", "to_out.0"))


#: what each parametrisation means for the trainers (the messages of :func:`check_parametrisation`)
PARAMETRISATIONS: dict[str, str] = {
    "diffusion": (
        "a DDPM-schedule UNet (SD 1.x/2.x, SDXL, AnimateDiff, AudioLDM 2: epsilon or v prediction, DDIM chains)"
    ),
    "flow": "a flow-matching transformer (SD3/3.5, FLUX, Qwen-Image, Z-Image, Wan: velocity on σ, Euler/SDE chains)",
    "v-diffusion": (
        "a v-objective diffusion model on continuous noise levels (Stable Audio: EDM-preconditioned v-prediction, "
        "t = (2/π)·atan(σ), DPM-Solver++ chains; neither a DDPM schedule nor flow matching)"
    ),
}


def read_model_index(folder: str | Path) -> dict[str, Any]:
    """A pipeline folder's ``model_index.json``, or a :class:`WeightsError` saying it is not one."""
    path = Path(folder) / "model_index.json"
    if not path.is_file():
        raise WeightsError(f"{folder}: not a diffusers pipeline folder (no model_index.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise WeightsError(f"{path}: not valid JSON ({error})") from error


def generator_class(class_name: str | None, source: str = "model_index.json") -> type:
    """The family class registered for a diffusers pipeline class name."""
    if class_name not in FAMILIES:
        raise UnsupportedGeneratorError(source, class_name, sorted(FAMILIES))
    module, _, name = FAMILIES[class_name].partition(":")
    return getattr(importlib.import_module(module), name)


def generator_class_of(model: str | Path) -> type:
    """The family class of a hub id or pipeline folder, from its ``model_index.json`` alone (no weights load):
    what :func:`check_parametrisation` reads when a config is read."""
    from ..hub import resolve_dir

    folder = resolve_dir(str(model), default_repo=str(model), what="diffusion pipeline")
    return generator_class(read_model_index(folder).get("_class_name"), source=str(folder))


def check_parametrisation(trainer: str, supported: Sequence[str], kind: str, model: object) -> None:
    """Raise :class:`~mmalign.errors.ConfigError` when ``trainer``'s mathematics does not apply to a generator
    of parametrisation ``kind`` (e.g. DDPO's DDIM log-probs on a flow-matching transformer), saying why and what
    would apply. ``model`` names the generator in the message."""
    from ..errors import ConfigError

    if kind not in supported:
        wanted = "; or ".join(PARAMETRISATIONS[k] for k in supported)
        raise ConfigError(
            f"trainer={trainer} does not apply to model={model}: it is {PARAMETRISATIONS[kind]}, and {trainer} "
            f"needs {wanted}"
        )


def parametrisation_of(model: str | Path) -> str:
    """ "flow", "diffusion" or "v-diffusion" for a hub id or pipeline folder, from its ``model_index.json`` alone
    (no weights load): what trainers check when their config is read."""
    return getattr(generator_class_of(model), "parametrisation", "diffusion")


def pipeline_class_of(generator: Any) -> type:
    """The diffusers pipeline class of a generator: its ``pipeline_class`` when it has one, else the class name
    it is registered under in :data:`FAMILIES`."""
    import diffusers

    if getattr(generator, "pipeline_class", None) is not None:
        return generator.pipeline_class
    target = f"{type(generator).__module__}:{type(generator).__name__}"
    for name, entry in FAMILIES.items():
        if entry == target:
            return getattr(diffusers, name)
    raise UnsupportedGeneratorError(type(generator).__name__, None, sorted(FAMILIES))


def save_lora_weights(
    generator: Any, folder: str | Path, layers: Mapping[str, Tensor], metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write peft LoRA ``layers`` of :attr:`Generator.trainable` as the family's diffusers pipeline does
    (``pytorch_lora_weights.safetensors``), so that ``pipe.load_lora_weights(folder)`` loads them. ``metadata``:
    the adapter's ``LoraConfig`` as a dict (``peft_config["default"].to_dict()``), stored in the file; without it
    diffusers assumes ``lora_alpha = r`` when loading, and a LoRA trained with another alpha comes back at the wrong
    strength."""
    if hasattr(generator, "save_lora"):  # a family whose pipeline has no LoRA saver (Stable Audio)
        return generator.save_lora(folder, dict(layers), None if metadata is None else dict(metadata))
    key = generator.lora_layers_key
    kwargs: dict[str, Any] = {key: layers}
    if metadata is not None:
        kwargs[key.replace("_layers", "_adapter_metadata")] = dict(metadata)
    pipeline_class_of(generator).save_lora_weights(str(folder), **kwargs)
    return Path(folder)


def load_generator(model: str | Path, device: str | torch.device = "cpu", **kwargs: Any) -> Generator:
    """Load a generator from a hub id or a diffusers pipeline folder, dispatching on ``model_index.json``'s
    ``_class_name`` through :data:`FAMILIES`; an unknown class raises :class:`UnsupportedGeneratorError` naming
    it and listing the supported ones. ``kwargs`` go to the family's ``from_pretrained`` (e.g. ``dtype``)."""
    from ..hub import resolve_dir

    folder = resolve_dir(str(model), default_repo=str(model), what="diffusion pipeline")
    index: Mapping[str, Any] = read_model_index(folder)
    cls = generator_class(index.get("_class_name"), source=str(folder))
    return cls.from_pretrained(folder, device=device, **kwargs)


def configure_output(
    generator: Any,
    frames: int = 0,
    duration: float = 0.0,
    views_grid: str = "",
    where: str = "model",
    experts: str = "",
    guidance_2: float | None = None,
) -> Any:
    """What a generator makes, set as the trainers' ``frames`` / ``duration`` / ``views_grid`` keys (and ``mmalign
    label`` / ``generate``'s flags) say: ``frames`` (0: the generator's own) onto a video generator's
    ``num_frames``, ``duration`` seconds (0: its own) onto an audio generator's ``audio_end_in_s``, and an image
    generator read as a ``views_grid`` ``"RxC"`` grid of views (:class:`~mmalign.models.view_grid.ViewGridGenerator`,
    returned in its place). A setting the generator cannot take raises :class:`~mmalign.errors.ConfigError` naming
    the setting and ``where`` (the model).

    ``experts`` ("both", "high", "low"; empty: the generator's own) and ``guidance_2`` (the low-noise stage's guidance
    scale; ``None``: the generator's own) apply to Wan 2.2 A14B's two experts (:mod:`mmalign.models.wan`) only."""
    from ..errors import ConfigError

    two_experts = bool(getattr(generator, "two_experts", False))
    for name, value in (("experts", experts), ("guidance_2", guidance_2)):
        if value not in ("", None):
            if not two_experts:
                raise ConfigError(f"{name}={value}: {where} is not a two-expert (Wan 2.2 A14B) pipeline")
            try:
                setattr(generator, "trained_experts" if name == "experts" else name, value)
            except ValueError as error:
                raise ConfigError(f"{name}={value}: {error}") from None

    modality = getattr(generator, "modality", "image")
    if duration:
        if modality != "audio":
            raise ConfigError(f"duration={duration}: {where} generates {modality}s")
        try:
            generator.audio_end_in_s = duration
        except ValueError as error:
            raise ConfigError(f"duration={duration}: {error}") from None
    if frames:
        if modality != "video":
            raise ConfigError(f"frames={frames}: {where} generates {modality}s, not videos")
        try:
            generator.num_frames = frames
        except ValueError as error:
            raise ConfigError(f"frames={frames}: {error}") from None
    if views_grid:
        from .view_grid import ViewGridGenerator

        try:
            return ViewGridGenerator(generator, views_grid)
        except ValueError as error:
            raise ConfigError(f"views_grid={views_grid}: {error}") from None
    return generator
