"""Stable Audio Open as a :class:`mmalign.models.generator.Generator` (text-to-audio, parametrisation "v-diffusion").

Components, as diffusers' ``StableAudioPipeline`` holds them: ``StableAudioDiTModel`` (trainable: a 1-D DiT over
the latent frames, self-attention ``attn1``, cross-attention ``attn2`` on the text, a GELU ``ff`` in every
``StableAudioDiTBlock``, rotary positions, a global token of the timing conditioning plus the timestep),
``T5EncoderModel`` (``text_encoder``) with its tokenizer, ``StableAudioProjectionModel`` (the text projection and
the ``seconds_start`` / ``seconds_end`` number conditioners), ``AutoencoderOobleck`` (``vae``: waveform ``[B, C, S]``
↔ latents ``[B, 64, S / hop]``, no scaling factor) and ``CosineDPMSolverMultistepScheduler``.

Re-implemented from ``diffusers/pipelines/stable_audio/pipeline_stable_audio.py`` and
``diffusers/schedulers/scheduling_cosine_dpmsolver_multistep.py`` (diffusers 0.42.1; no code copied):

* Prompts: tokenised padded to the tokenizer's ``model_max_length`` with truncation, T5's last hidden state
  under the attention mask, the projection's ``text_projection``, zeros at the padding; then the timing
  ``seconds_start`` (0) and ``seconds_end`` (:attr:`StableAudioGenerator.audio_end_in_s`) through the number
  conditioners: :class:`~mmalign.models.generator.Conditions` ``encoder_hidden_states [B, L + 2, D]`` (text tokens,
  start, end: the pipeline's ``text_audio_duration_embeds``) and ``global_hidden_states [B, 1, 2D]`` (start and end
  side by side: ``audio_duration_embeds``). The unconditional branch (:meth:`StableAudioGenerator.unconditional`)
  is what the pipeline uses without a negative prompt: zeros for ``encoder_hidden_states`` and the same timing
  ``global_hidden_states``.
* Duration: the latents always have the transformer's ``sample_size`` frames (the pipeline's
  ``waveform_length``); ``audio_end_in_s`` (default: the model's maximum, ``sample_size · hop / sampling_rate``,
  47.55 s for Stable Audio Open 1.0; from the constructor, a folder's ``mmalign_generator.json`` or the trainers'
  ``duration`` option) conditions the model and crops the decoded waveform to ``int(audio_end_in_s ·
  sampling_rate)`` samples, as the pipeline does. Offline audio is padded with zeros or cropped to the
  ``sample_size · hop`` samples the VAE encodes into ``sample_size`` frames.
* Parametrisation ("v-diffusion": neither DDPM's discrete schedule nor flow matching). The scheduler is an EDM
  (Karras et al. 2022) preconditioning of a v-prediction network on continuous noise levels σ: the network sees
  ``x_in = c_in·x_σ`` with ``x_σ = x0 + σ·ε`` and ``c_in = 1/√(σ² + σ_d²)``, is conditioned on the model timestep
  ``t = (2/π)·atan(σ)`` ∈ [0, 1) and its output ``F`` gives ``x̂0 = c_skip·x_σ + c_out·F`` with ``c_skip = σ_d² /
  (σ² + σ_d²)``, ``c_out = −σ·σ_d/√(σ² + σ_d²)``. With σ_d = 1 (Stable Audio Open) this is exactly the "v"
  objective of stable-audio-tools (``DiffusionCondTrainingWrapper``): ``α = cos(πt/2)``, ``s = sin(πt/2)``, input
  ``α·x0 + s·ε`` and target ``v = α·ε − s·x0``. The protocol's ``x_t`` is the network's input ``x_in``
  (:meth:`StableAudioGenerator.add_noise`), ``t`` the continuous model timestep, the target
  ``(σ_d·ε − σ·x0/σ_d)/√(σ² + σ_d²)`` (:meth:`StableAudioGenerator.training_target`).
* Training timestep density (what :meth:`mmalign.trainers.loop.Trainer._draw_timesteps` draws for "v-diffusion"):
  ``t`` uniform in [0, 1) (within ``timestep_range``), stable-audio-tools' default ``timestep_sampler="uniform"``
  (a Sobol sequence there, i.i.d. uniform here), with ``timestep_density=logit_normal`` its ``"logit_normal"``
  option ``sigmoid(N(logit_mean, logit_std))``. The sampler only visits σ ∈ [σ_min, σ_max] = [0.3, 500]
  (t ∈ [0.186, 0.9987]); training covers all of [0, 1) as the reference did.
* Sampling (:meth:`StableAudioGenerator.sample`): the pipeline's CosineDPMSolverMultistep, i.e. SDE-DPM-Solver++
  (2M) in σ (first order at the first and last steps, ``midpoint`` or ``heun`` second order between), on
  ``steps`` exponential (or Karras) σ from σ_max to σ_min then 0, from ``x_T = ε·√(σ_max² + 1)``, CFG
  ``F_u + g·(F_c − F_u)`` on one batched call. Its step noise: ``"brownian"`` is the scheduler's own Brownian tree
  (torchsde, seeded with ``generator.initial_seed()``: the pipeline's samples exactly), ``"gaussian"`` i.i.d.
  normal draws per step (the same distribution, no torchsde), ``"none"`` the deterministic DPM-Solver++(2M) ODE of
  the same schedule. :meth:`StableAudioGenerator.chain_step` is one differentiable step (reward backpropagation:
  ReFL, DRaFT, AlignProp walk it). The GRPO family trains it through :class:`StableAudioFlowView`: the same
  network seen as a rectified flow by a change of variables, sampled with the flow trainers' SDE.
* LoRA: the DiT is not a diffusers ``PeftAdapterMixin`` model, and ``StableAudioPipeline`` has no LoRA loader.
  The loaded transformer is given the mixin (:func:`with_peft`: its class is a subclass that reports itself as
  ``StableAudioDiTModel``, so saved folders stay diffusers'), :meth:`StableAudioGenerator.save_lora` writes the
  diffusers LoRA file (``pytorch_lora_weights.safetensors``, ``transformer.``-prefixed keys, the adapter config as
  metadata) and :meth:`StableAudioGenerator.load_lora_weights` loads it back (``load_lora_adapter``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..errors import WeightsError
from ..tensors import left_broadcast
from .flow_generator import cfg_branches, check_guidance
from .generator import Conditions, Schedule, attention_projections, read_model_index

__all__ = [
    "STABLE_AUDIO_LORA_TARGETS",
    "StableAudioFlowView",
    "StableAudioGenerator",
    "dpm_solver_step",
    "with_peft",
]

#: every StableAudioDiTBlock's self-attention (attn1) and text cross-attention (attn2) q/k/v/out projections and
#: its feed-forward layers (GELU projection and output)
STABLE_AUDIO_LORA_TARGETS: tuple[str, ...] = (*attention_projections("attn1", "attn2"), "ff.net.0.proj", "ff.net.2")

#: CosineDPMSolverMultistepScheduler's defaults (the keys a scheduler_config.json may leave out)
SCHEDULER_DEFAULTS: dict[str, Any] = {
    "sigma_min": 0.3,
    "sigma_max": 500.0,
    "sigma_data": 1.0,
    "sigma_schedule": "exponential",
    "num_train_timesteps": 1000,
    "solver_order": 2,
    "prediction_type": "v_prediction",
    "rho": 7.0,
    "solver_type": "midpoint",
    "lower_order_final": True,
    "euler_at_final": False,
    "final_sigmas_type": "zero",
}

NOISE_MODES = ("brownian", "gaussian", "none")

_PEFT_CLASSES: dict[type, type] = {}


def with_peft(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` (a ``StableAudioDiTModel``) with diffusers' ``PeftAdapterMixin`` (``add_adapter``,
    ``disable_adapters``, ``load_lora_adapter``...), which the class lacks: its class becomes a subclass with the
    same name and module, so that pipelines saving it still write ``("diffusers", "StableAudioDiTModel")``."""
    from diffusers.loaders.peft import PeftAdapterMixin

    base = type(model)
    if isinstance(model, PeftAdapterMixin):
        return model
    if base not in _PEFT_CLASSES:
        _PEFT_CLASSES[base] = type(base.__name__, (base, PeftAdapterMixin), {"__module__": base.__module__})
        _PEFT_CLASSES[base].__qualname__ = base.__qualname__
    model.__class__ = _PEFT_CLASSES[base]
    return model


def _log_sigmas_schedule(config: dict[str, Any], steps: int) -> Tensor:
    """The scheduler's ``steps`` σ from σ_max down to σ_min (exponential: log-linear; karras: ρ-spaced)."""
    ramp = torch.linspace(0, 1, steps)
    sigma_min, sigma_max = float(config["sigma_min"]), float(config["sigma_max"])
    if config["sigma_schedule"] == "karras":
        rho = float(config["rho"])
        low, high = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        return (high + ramp * (low - high)) ** rho
    if config["sigma_schedule"] == "exponential":
        return torch.linspace(math.log(sigma_min), math.log(sigma_max), len(ramp)).exp().flip(0)
    raise WeightsError(f"sigma_schedule must be 'exponential' or 'karras', got {config['sigma_schedule']!r}")


def dpm_solver_step(
    x: Tensor,
    denoised: Tensor,
    previous: Tensor | None,
    sigmas: Tensor,
    i: int,
    noise: Tensor | None,
    first_order: bool,
    solver_type: str = "midpoint",
) -> Tensor:
    """One step of CosineDPMSolverMultistepScheduler from ``sigmas[i]`` to ``sigmas[i + 1]`` (α = 1, λ = −log σ,
    ``h = λ_{i+1} − λ_i``) on the state ``x`` (``x0 + σ·ε`` scale), from the denoised estimates ``D = denoised``
    and ``previous`` (the step before's; ``None`` or ``first_order`` for the first-order update). With ``noise``:
    the scheduler's SDE-DPM-Solver++ update (``x_{i+1} = (σ_{i+1}/σ_i)e^{−h}·x + (1 − e^{−2h})·(D0 + D1/2) +
    σ_{i+1}√(1 − e^{−2h})·noise``, midpoint); ``noise=None``: the deterministic DPM-Solver++(2M) update
    (``(σ_{i+1}/σ_i)·x + (1 − e^{−h})·(D0 + D1/2)``). Differentiable in ``x``, ``denoised`` and ``previous``."""
    sigma_t, sigma_s = sigmas[i + 1], sigmas[i]
    one = torch.tensor(1)
    lambda_t = torch.log(one) - torch.log(sigma_t)
    lambda_s = torch.log(one) - torch.log(sigma_s)
    h = lambda_t - lambda_s
    second = not first_order and previous is not None
    if second:
        lambda_s1 = torch.log(one) - torch.log(sigmas[i - 1])
        r0 = (lambda_s - lambda_s1) / h
        d0, d1 = denoised, (1.0 / r0) * (denoised - previous)
    if noise is not None:  # the scheduler's SDE update, term by term in its order
        if not second:
            return (
                (sigma_t / sigma_s * torch.exp(-h)) * x
                + (one * (1 - torch.exp(-2.0 * h))) * denoised
                + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise
            )
        if solver_type == "midpoint":
            return (
                (sigma_t / sigma_s * torch.exp(-h)) * x
                + (one * (1 - torch.exp(-2.0 * h))) * d0
                + 0.5 * (one * (1 - torch.exp(-2.0 * h))) * d1
                + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise
            )
        return (
            (sigma_t / sigma_s * torch.exp(-h)) * x
            + (one * (1 - torch.exp(-2.0 * h))) * d0
            + (one * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * d1
            + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise
        )
    if float(sigma_t) == 0.0:  # the last step to σ = 0 is the denoised estimate
        return denoised + 0.0 * x
    ratio = sigma_t / sigma_s
    if not second:
        return ratio * x + (1.0 - torch.exp(-h)) * denoised
    if solver_type == "midpoint":
        return ratio * x + (1.0 - torch.exp(-h)) * d0 + 0.5 * (1.0 - torch.exp(-h)) * d1
    return ratio * x + (1.0 - torch.exp(-h)) * d0 + ((1.0 - torch.exp(-h)) / h - 1.0) * d1


class StableAudioGenerator:
    """Stable Audio Open components behind the generator protocol (see :mod:`mmalign.models.generator` and this
    module). Latents are 3-D ``[B, C, L]``; :meth:`decode` gives audio ``[B, C, S]`` in [-1, 1] at
    :attr:`sample_rate`."""

    family: ClassVar[str] = "stable-audio"
    parametrisation: ClassVar[str] = "v-diffusion"
    modality: ClassVar[str] = "audio"
    lora_layers_key: ClassVar[str] = "transformer_lora_layers"
    lora_targets: ClassVar[tuple[str, ...]] = STABLE_AUDIO_LORA_TARGETS
    block_class: ClassVar[str] = "StableAudioDiTBlock"
    pipeline_name: ClassVar[str] = "StableAudioPipeline"
    display_name: ClassVar[str] = "Stable Audio"
    negative_prompt: ClassVar[str | None] = None
    """No negative prompt: the unconditional branch is the pipeline's zeros."""

    def __init__(self, components: dict[str, Any], folder: Path | None = None, audio_end_in_s: float | None = None):
        missing = [
            name
            for name in ("transformer", "vae", "text_encoder", "tokenizer", "projection_model", "scheduler_config")
            if components.get(name) is None
        ]
        if missing:
            raise ValueError(f"Stable Audio components without {', '.join(missing)}")
        self.folder = folder
        self.transformer = with_peft(components["transformer"])
        self.vae = components["vae"]
        self.text_encoder_module = components["text_encoder"]
        self.tokenizer = components["tokenizer"]
        self.projection_model = components["projection_model"]
        self.scheduler_config = {**SCHEDULER_DEFAULTS, **components["scheduler_config"]}
        self.scheduler_class_name = str(self.scheduler_config.get("_class_name", "CosineDPMSolverMultistepScheduler"))
        self.check_scheduler(self.scheduler_config, folder)
        self.text_encoders: list[torch.nn.Module] | None = [self.text_encoder_module]
        self._unconditional: Conditions | None = None
        self._global_cache: dict[float, Tensor] = {}
        for module in (self.vae, self.text_encoder_module, self.projection_model):
            module.requires_grad_(False)
            module.eval()
        self.audio_end_in_s = self.max_duration if audio_end_in_s is None else audio_end_in_s

    @staticmethod
    def check_scheduler(config: dict[str, Any], folder: Any = None) -> None:
        """Refuse scheduler settings this module does not reproduce (epsilon prediction is reproduced too)."""
        if config["prediction_type"] not in ("v_prediction", "epsilon"):
            raise WeightsError(f"{folder}: prediction_type {config['prediction_type']!r} is not supported")
        if config["solver_type"] not in ("midpoint", "heun", "logrho", "bh1", "bh2"):
            raise WeightsError(f"{folder}: solver_type {config['solver_type']!r} is not supported")
        if int(config["solver_order"]) not in (1, 2):
            raise WeightsError(f"{folder}: solver_order {config['solver_order']} (1 or 2 are)")
        if config["final_sigmas_type"] not in ("zero", "sigma_min"):
            raise WeightsError(f"{folder}: final_sigmas_type {config['final_sigmas_type']!r} is not supported")

    # -- loading -------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, **options: Any
    ) -> StableAudioGenerator:
        """Load a ``StableAudioPipeline`` folder (``save_pretrained`` layout) without torchsde: the scheduler is
        read as its config. ``options`` (``audio_end_in_s``) override the folder's ``mmalign_generator.json``."""
        import diffusers
        from diffusers.pipelines.stable_audio import StableAudioProjectionModel
        from transformers import AutoTokenizer, T5EncoderModel

        from .sd3 import read_generator_config

        folder = Path(folder)
        index = read_model_index(folder)
        needed = ("transformer", "vae", "text_encoder", "tokenizer", "projection_model", "scheduler")
        missing = [name for name in needed if not index.get(name) or index[name][0] is None]
        if missing:
            raise WeightsError(f"{folder}: Stable Audio pipeline without {', '.join(missing)}")
        path = folder / "scheduler" / "scheduler_config.json"
        try:
            scheduler_config = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise WeightsError(f"{path}: cannot read the scheduler config ({error})") from error
        name = scheduler_config.get("_class_name")
        if name not in ("CosineDPMSolverMultistepScheduler", None):
            raise WeightsError(f"{folder}: Stable Audio with scheduler {name} (CosineDPMSolverMultistepScheduler is)")
        typed = {} if dtype is None else {"torch_dtype": dtype}
        components = {
            "transformer": diffusers.StableAudioDiTModel.from_pretrained(folder, subfolder="transformer", **typed),
            "vae": diffusers.AutoencoderOobleck.from_pretrained(folder, subfolder="vae", **typed),
            "projection_model": StableAudioProjectionModel.from_pretrained(
                folder, subfolder="projection_model", **typed
            ),
            "text_encoder": T5EncoderModel.from_pretrained(
                folder, subfolder="text_encoder", **({} if dtype is None else {"dtype": dtype})
            ),
            "tokenizer": AutoTokenizer.from_pretrained(str(folder), subfolder="tokenizer"),
            "scheduler_config": scheduler_config,
        }
        settings = read_generator_config(folder)
        if "audio_end_in_s" in settings:
            options.setdefault("audio_end_in_s", float(settings["audio_end_in_s"]))
        return cls(components, folder, **options).to(device)

    def to(self, device: str | torch.device) -> StableAudioGenerator:
        for module in (self.transformer, self.vae, self.projection_model, *(self.text_encoders or [])):
            module.to(device)
        self._global_cache.clear()
        if self._unconditional is not None:
            self._unconditional = self._unconditional.to(device)
        return self

    @property
    def trainable(self) -> torch.nn.Module:
        return self.transformer

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def text_encoder(self) -> torch.nn.Module | None:
        return None if self.text_encoders is None else self.text_encoders[0]

    # -- duration ------------------------------------------------------------------------------------------
    @property
    def sample_rate(self) -> int:
        """The waveform's sample rate (the VAE's ``sampling_rate``; 44100 Hz for Stable Audio Open 1.0)."""
        return int(self.vae.config.sampling_rate)

    @property
    def hop_length(self) -> int:
        """Waveform samples per latent frame (the product of the VAE's downsampling ratios; 2048)."""
        return int(math.prod(self.vae.config.downsampling_ratios))

    @property
    def audio_channels(self) -> int:
        return int(self.vae.config.audio_channels)

    @property
    def latent_frames(self) -> int:
        """Latent frames of every sample (the transformer's ``sample_size``, the pipeline's ``waveform_length``)."""
        return int(self.transformer.config.sample_size)

    @property
    def max_duration(self) -> float:
        """The longest audio in seconds: ``sample_size · hop / sampling_rate`` (the pipeline's default end)."""
        return self.latent_frames * self.hop_length / self.sample_rate

    @property
    def audio_end_in_s(self) -> float:
        """Seconds of audio sampled (the ``seconds_end`` conditioning and the crop of :meth:`decode`)."""
        return self._audio_end_in_s

    @audio_end_in_s.setter
    def audio_end_in_s(self, seconds: float) -> None:
        seconds = float(seconds)
        config = self.projection_model.config
        if not 0 < seconds <= self.max_duration + 1e-9:
            raise ValueError(f"audio_end_in_s must be in (0, {self.max_duration:g}] seconds, got {seconds:g}")
        if not config.min_value <= seconds <= config.max_value:
            raise ValueError(
                f"audio_end_in_s must be within the projection model's [{config.min_value}, {config.max_value}]"
                f" seconds, got {seconds:g}"
            )
        self._audio_end_in_s = seconds
        self._unconditional = None

    @property
    def num_samples(self) -> int:
        """Samples of a decoded waveform: ``int(audio_end_in_s · sample_rate)``."""
        return int(self.audio_end_in_s * self.sample_rate)

    def latent_shape(self, height: int = 0, width: int = 0) -> tuple[int, int]:
        """``(C, L)`` of one latent: the VAE's latent channels and the transformer's ``sample_size`` frames,
        whatever the duration (the protocol's ``height`` and ``width`` do not apply to audio and are ignored)."""
        return int(self.transformer.config.in_channels), self.latent_frames

    # -- conditioning ----------------------------------------------------------------------------------
    def _prompt_list(self, prompts: Sequence[str]) -> list[str]:
        if self.text_encoders is None:
            raise RuntimeError("the text encoders were freed (free_text_encoders); load cached Conditions instead")
        return [prompts] if isinstance(prompts, str) else list(prompts)

    def _timing(self, count: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """The projection's ``seconds_start`` (0) and ``seconds_end`` embeddings ``[count, 1, D]`` each."""
        start = torch.tensor([0.0] * count).to(device)
        end = torch.tensor([float(self.audio_end_in_s)] * count).to(device)
        out = self.projection_model(start_seconds=start, end_seconds=end)
        return out.seconds_start_hidden_states, out.seconds_end_hidden_states

    @torch.no_grad()
    def encode_conditions(self, prompts: Sequence[str]) -> Conditions:
        """``encoder_hidden_states [B, L + 2, D]`` (projected T5 states zeroed at the padding, then the start and end
        seconds) and ``global_hidden_states [B, 1, 2D]``: the conditional half of what ``StableAudioPipeline``
        feeds its transformer (``text_audio_duration_embeds`` and ``audio_duration_embeds``)."""
        prompts = self._prompt_list(prompts)
        encoder = self.text_encoder
        device = encoder.device
        tokens = self.tokenizer(
            prompts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        )  # fmt: skip
        mask = tokens.attention_mask.to(device)
        hidden = encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
        text = self.projection_model(text_hidden_states=hidden).text_hidden_states
        text = text * mask.unsqueeze(-1).to(text.dtype)
        text = text * mask.unsqueeze(-1).to(text.dtype)
        start, end = self._timing(len(prompts), device)
        return Conditions(
            {
                "encoder_hidden_states": torch.cat([text, start, end], dim=1),
                "global_hidden_states": torch.cat([start, end], dim=2),
            },
            {"family": self.family, "audio_end_in_s": repr(self.audio_end_in_s)},
        )

    @torch.no_grad()
    def unconditional(self, count: int) -> Conditions:
        """The pipeline's unconditional branch without a negative prompt: zeros for ``encoder_hidden_states`` and
        the same timing ``global_hidden_states``. Built without the text encoder (kept after
        :meth:`free_text_encoders`)."""
        if self._unconditional is None:
            device = self.projection_model.device
            start, end = self._timing(1, device)
            width = self.projection_model.config.conditioning_dim
            length = int(self.tokenizer.model_max_length) + 2
            zeros = torch.zeros((1, length, width), device=device, dtype=start.dtype)
            self._unconditional = Conditions(
                {"encoder_hidden_states": zeros, "global_hidden_states": torch.cat([start, end], dim=2)},
                {"family": self.family, "audio_end_in_s": repr(self.audio_end_in_s)},
            )
        return self._unconditional.repeat(count)

    def free_text_encoders(self) -> None:
        """Drop T5 (the unconditional branch needs none): training then runs on cached :class:`Conditions`."""
        self.unconditional(1)
        self.text_encoders = None

    # -- latents -------------------------------------------------------------------------------------------
    @property
    def waveform_length(self) -> int:
        """Waveform samples the VAE encodes into :attr:`latent_frames` frames (``sample_size · hop``)."""
        return self.latent_frames * self.hop_length

    def fit_audio(self, audio: Tensor) -> Tensor:
        """Canonical audio ``[B, C, S]`` at :attr:`sample_rate` → the VAE's input ``[B, audio_channels,
        sample_size·hop]``: mono duplicated to stereo or stereo mixed to mono (the pipeline's rule for
        ``initial_audio_waveforms``), then zero-padded or cropped at the end."""
        if audio.ndim == 2:
            audio = audio.unsqueeze(1)
        if audio.ndim != 3:
            raise ValueError(f"expected audio [B, C, S], got {tuple(audio.shape)}")
        channels = self.audio_channels
        if audio.shape[1] == 1 and channels == 2:
            audio = audio.repeat(1, 2, 1)
        elif audio.shape[1] == 2 and channels == 1:
            audio = audio.mean(1, keepdim=True)
        if audio.shape[1] != channels:
            raise ValueError(f"audio with {audio.shape[1]} channels; the VAE takes {channels}")
        length = self.waveform_length
        out = audio.new_zeros((audio.shape[0], channels, length))
        keep = min(length, audio.shape[-1])
        out[:, :, :keep] = audio[:, :, :keep]
        return out

    @torch.no_grad()
    def latent_distribution(self, audio: Tensor) -> tuple[Tensor, Tensor]:
        """The Oobleck posterior ``(mean, std)`` (float32, ``[B, C, L]``) of canonical audio ``[B, C, S]`` in
        [-1, 1] at :attr:`sample_rate` (fitted by :meth:`fit_audio`)."""
        dist = self.vae.encode(self.fit_audio(audio).to(self.vae.device, self.vae.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def sample_latents(self, mean: Tensor, std: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``mean + std·n`` (``n`` drawn on the CPU from ``generator``): Stable Audio has no latent scaling."""
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
        return mean + std * noise

    def to_latents(self, audio: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Canonical audio ``[B, C, S]`` in [-1, 1] → latents ``[B, C', L]``, float32."""
        return self.sample_latents(*self.latent_distribution(audio), generator).float()

    def decode(self, latents: Tensor, grad: bool = False) -> Tensor:
        """Latents ``[B, C', L]`` → audio ``[B, C, S]`` at :attr:`sample_rate`, ``S = int(audio_end_in_s ·
        sample_rate)``: the pipeline's VAE decode and crop (its ``output_type="pt"``), clamped to the canonical
        [-1, 1]; ``grad=True`` keeps the graph."""
        if latents.ndim != 3:
            raise ValueError(f"Stable Audio latents are [B, C, L], got {tuple(latents.shape)}")
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            audio = self.vae.decode(latents.to(self.vae.dtype)).sample
            return audio[:, :, : self.num_samples].float().clamp(-1.0, 1.0)

    # -- v-diffusion ---------------------------------------------------------------------------------------
    @property
    def sigma_data(self) -> float:
        return float(self.scheduler_config["sigma_data"])

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler_config["num_train_timesteps"])

    @staticmethod
    def timestep_of(sigma: Tensor) -> Tensor:
        """The model timestep of σ: ``(2/π)·atan(σ)`` (the scheduler's ``precondition_noise``)."""
        return sigma.atan() / math.pi * 2

    @staticmethod
    def sigma_of(t: Tensor | float, like: Tensor) -> Tensor:
        """σ = ``tan(π·t/2)`` of model timesteps ``t`` (scalar or ``[B]``), broadcastable to ``like``."""
        t = torch.as_tensor(t, device=like.device, dtype=torch.float32)
        return left_broadcast(torch.tan(t * (math.pi / 2)), like.float(), "t")

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The network's input at model timesteps ``t``: ``(x0 + σ·ε)/√(σ² + σ_d²)`` with σ = tan(πt/2) (σ_d = 1:
        ``cos(πt/2)·x0 + sin(πt/2)·ε``, stable-audio-tools' noised input)."""
        sigma, data = self.sigma_of(t, x0), self.sigma_data
        return (x0 + sigma * noise) / torch.sqrt(sigma**2 + data**2)

    def training_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The network's output that the preconditioning turns into ``x0``: ``(σ_d·ε − σ·x0/σ_d)/√(σ² + σ_d²)``
        (σ_d = 1: ``v = cos·ε − sin·x0``; epsilon-prediction checkpoints: ``ε`` scaled by the same ``c_out``)."""
        sigma, data = self.sigma_of(t, x0), self.sigma_data
        target = (data * noise - sigma * x0 / data) / torch.sqrt(sigma**2 + data**2)
        # epsilon prediction: c_out = +σ·σ_d/√(σ² + σ_d²), the same output with the sign flipped
        return target if self.scheduler_config["prediction_type"] == "v_prediction" else -target

    def rotary_embedding(self, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """The pipeline's rotary embedding over ``length`` latent frames plus the global token."""
        from diffusers.models.embeddings import get_1d_rotary_pos_embed

        dim = int(self.transformer.config.attention_head_dim) // 2
        cos, sin = get_1d_rotary_pos_embed(dim, length + 1, use_real=True, repeat_interleave_real=False)
        return cos.to(device), sin.to(device)

    @staticmethod
    def batch_timesteps(t: Tensor | float, like: Tensor) -> Tensor:
        timestep = torch.as_tensor(t, device=like.device)
        return timestep.expand(like.shape[0]) if timestep.ndim == 0 else timestep

    def predict(self, model: torch.nn.Module, x_t: Tensor, t: Tensor | float, conditions: Conditions) -> Tensor:
        """``model(x_t, t, encoder_hidden_states, global_hidden_states, rotary_embedding)`` in the model's dtype,
        returned in float32 (the v-prediction of :meth:`training_target`); ``x_t`` is the preconditioned input
        (:meth:`add_noise`), ``t`` the continuous model timestep (scalar or ``[B]``)."""
        if x_t.ndim != 3:
            raise ValueError(f"Stable Audio latents are [B, C, L], got {tuple(x_t.shape)}")
        dtype = next(model.parameters()).dtype
        out = model(
            x_t.to(dtype),
            self.batch_timesteps(t, x_t),
            encoder_hidden_states=conditions["encoder_hidden_states"].to(x_t.device, dtype),
            global_hidden_states=conditions["global_hidden_states"].to(x_t.device, dtype),
            rotary_embedding=self.rotary_embedding(x_t.shape[-1], x_t.device),
            return_dict=False,
        )[0]
        return out.float()

    def guided_velocity(
        self,
        model: torch.nn.Module,
        x: Tensor,
        t: Tensor | float,
        conditions: Conditions,
        uncond: Conditions | None,
        guidance: float,
    ) -> Tensor:
        """The pipeline's guided network output at the preconditioned input ``x``: ``F_u + g·(F_c − F_u)`` from one
        batched call on ``cat([uncond, conditions])`` (guidance enabled when ``g > 1``, as the pipeline)."""
        if guidance <= 1.0:
            return self.predict(model, x, t, conditions)
        check_guidance(conditions, uncond, guidance)
        f_uncond, f_cond = cfg_branches(self, model, x, t, conditions, uncond)
        return f_uncond + guidance * (f_cond - f_uncond)

    def denoised(self, x: Tensor, output: Tensor, sigma: Tensor) -> Tensor:
        """``x̂0 = c_skip·x + c_out·F`` at noise level σ (a 0-d tensor) from the state ``x = x0 + σ·ε`` (the
        scheduler's ``precondition_outputs``)."""
        data = self.sigma_data
        c_skip = data**2 / (sigma**2 + data**2)
        sign = -1.0 if self.scheduler_config["prediction_type"] == "v_prediction" else 1.0
        c_out = sign * sigma * data / (sigma**2 + data**2) ** 0.5
        return c_skip * x + c_out * output

    def model_input(self, x: Tensor, sigma: Tensor) -> Tensor:
        """The scheduler's ``scale_model_input``: ``x / √(σ² + σ_d²)``."""
        return x * (1 / ((sigma**2 + self.sigma_data**2) ** 0.5))

    # -- sampling ------------------------------------------------------------------------------------------
    def sampling_schedule(self, steps: int, latent_shape: Sequence[int] | None = None, device: Any = None) -> Schedule:
        """The pipeline's ``set_timesteps(steps)``: ``sigmas [steps + 1]`` (float32, CPU: exponential from σ_max to
        σ_min, then 0 or σ_min) and ``timesteps [steps]`` = ``(2/π)·atan(σ)`` on ``device``."""
        config = self.scheduler_config
        sigmas = _log_sigmas_schedule(config, int(steps)).to(torch.float32)
        last = float(config["sigma_min"]) if config["final_sigmas_type"] == "sigma_min" else 0.0
        timesteps = self.timestep_of(sigmas.to(device or self.device))
        return Schedule(timesteps, torch.cat([sigmas, torch.tensor([last], dtype=torch.float32)]))

    @property
    def init_noise_sigma(self) -> float:
        """The scale of x_T: ``√(σ_max² + 1)`` (the scheduler's ``init_noise_sigma``)."""
        return (float(self.scheduler_config["sigma_max"]) ** 2 + 1) ** 0.5

    def first_order(self, i: int, steps: int) -> bool:
        """Whether step ``i`` of ``steps`` is first order: the first step, every step at ``solver_order`` 1, and the
        last one under the scheduler's ``euler_at_final`` / ``lower_order_final`` (< 15 steps) / ``final_sigmas_type
        = "zero"``."""
        config = self.scheduler_config
        last = i == steps - 1 and (
            config["euler_at_final"]
            or (config["lower_order_final"] and steps < 15)
            or config["final_sigmas_type"] == "zero"
        )
        return int(config["solver_order"]) == 1 or i == 0 or last

    def chain_step(
        self,
        x: Tensor,
        output: Tensor,
        schedule: Schedule,
        i: int,
        state: dict[str, Any],
        noise: Tensor | None = None,
    ) -> Tensor:
        """One sampler step from ``schedule.sigmas[i]`` given the (guided) network output at
        ``model_input(x, σ_i)``: the denoised estimate, then :func:`dpm_solver_step` (``noise`` None: the ODE);
        ``state`` (a dict, empty at the first step) carries the previous denoised estimate. Differentiable."""
        sigmas = schedule.sigmas
        sigma = sigmas[i]
        denoised = self.denoised(x, output, sigma.to(x.device))
        previous = state.get("denoised")
        first = self.first_order(i, len(schedule))
        solver = self.scheduler_config["solver_type"]
        solver = solver if solver in ("midpoint", "heun") else "midpoint"
        moved = sigmas.to(x.device)
        x = dpm_solver_step(x, denoised, previous, moved, i, noise, first, solver)
        state["denoised"] = denoised
        return x

    def noise_source(
        self, mode: str, like: Tensor, generator: torch.Generator | None
    ) -> Callable[[Tensor, Tensor], Tensor | None]:
        """The step noise of :meth:`sample`: ``"brownian"`` (the scheduler's Brownian tree seeded with
        ``generator.initial_seed()``; needs torchsde), ``"gaussian"`` (``randn`` from ``generator`` per step) or
        ``"none"``."""
        if mode not in NOISE_MODES:
            raise ValueError(f"noise must be one of {NOISE_MODES}, got {mode!r}")
        if mode == "none":
            return lambda sigma, sigma_next: None
        if mode == "gaussian":
            return lambda sigma, sigma_next: torch.randn(like.shape, generator=generator).to(like.device, like.dtype)
        from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler

        config = self.scheduler_config
        seed = None if generator is None else generator.initial_seed()
        tree = BrownianTreeNoiseSampler(like, sigma_min=config["sigma_min"], sigma_max=config["sigma_max"], seed=seed)
        return lambda sigma, sigma_next: tree(sigma, sigma_next).to(like.device)

    @torch.no_grad()
    def sample(
        self,
        conditions: Conditions,
        steps: int = 100,
        guidance: float = 7.0,
        generator: torch.Generator | None = None,
        latents: Tensor | None = None,
        noise: str = "brownian",
        model: torch.nn.Module | None = None,
    ) -> Tensor:
        """Latents ``[B, C, L]`` sampled as ``StableAudioPipeline(..., output_type="latent")``: x_T =
        ``latents`` (or ``randn`` from ``generator``) times :attr:`init_noise_sigma`, then ``steps`` steps of
        :meth:`chain_step` on the CFG output (:meth:`guided_velocity`) with the step noise of ``noise``
        (:meth:`noise_source`; "brownian" with the pipeline's generator reproduces its samples)."""
        model = self.transformer if model is None else model
        count = len(conditions)
        shape = (count, *self.latent_shape())
        dtype = conditions["encoder_hidden_states"].dtype
        if latents is None:
            latents = torch.randn(shape, generator=generator, dtype=dtype).to(self.device)
        x = latents.to(self.device) * self.init_noise_sigma
        uncond = self.unconditional(count).to(self.device) if guidance > 1.0 else None
        schedule = self.sampling_schedule(steps, device=self.device)
        draw = self.noise_source(noise, x, generator)
        state: dict[str, Any] = {}
        for i, t in enumerate(schedule.timesteps):
            sigma = schedule.sigmas[i]
            output = self.guided_velocity(model, self.model_input(x, sigma), t, conditions, uncond, guidance)
            step_noise = draw(schedule.sigmas[i], schedule.sigmas[i + 1])
            x = self.chain_step(x, output.to(x.dtype), schedule, i, state, step_noise)
        return x

    # -- LoRA and pipelines -----------------------------------------------------------------------------
    def save_lora(self, folder: str | Path, layers: dict[str, Tensor], metadata: dict[str, Any] | None) -> Path:
        """The diffusers LoRA file of the transformer's peft ``layers`` (``pytorch_lora_weights.safetensors``,
        ``transformer.``-prefixed keys, ``metadata`` the adapter's ``LoraConfig`` dict): what
        :meth:`load_lora_weights` reads (``StableAudioPipeline`` has no ``load_lora_weights`` of its own)."""
        from diffusers.loaders.lora_base import LoraBaseMixin

        Path(folder).mkdir(parents=True, exist_ok=True)
        LoraBaseMixin._save_lora_weights(
            save_directory=str(folder),
            lora_layers={"transformer": layers},
            lora_metadata={"transformer": None if metadata is None else dict(metadata)},
            weight_name="pytorch_lora_weights.safetensors",
        )
        return Path(folder)

    def load_lora_weights(self, folder: str | Path, adapter_name: str | None = None) -> None:
        """Load a LoRA file written by :meth:`save_lora` into :attr:`transformer` (diffusers'
        ``load_lora_adapter``, the adapter's alpha from the file's metadata)."""
        self.transformer.load_lora_adapter(
            str(folder), prefix="transformer", weight_name="pytorch_lora_weights.safetensors",
            adapter_name=adapter_name,
        )  # fmt: skip

    @property
    def pipeline_class(self) -> type:
        import diffusers

        return getattr(diffusers, self.pipeline_name)

    def pipeline_call_options(self) -> dict[str, Any]:
        """Keyword arguments of ``StableAudioPipeline.__call__`` that make it sample what this generator does."""
        return {"audio_end_in_s": self.audio_end_in_s}

    def pipeline(self, transformer: torch.nn.Module | None = None):
        """A ``StableAudioPipeline`` over these components with a fresh ``CosineDPMSolverMultistepScheduler``
        (needs torchsde) and ``transformer`` in place of :attr:`trainable` when given."""
        from diffusers import CosineDPMSolverMultistepScheduler

        if self.text_encoders is None:
            raise RuntimeError("the text encoders were freed (free_text_encoders)")
        return self.pipeline_class(
            vae=self.vae,
            text_encoder=self.text_encoder,
            projection_model=self.projection_model,
            tokenizer=self.tokenizer,
            transformer=transformer if transformer is not None else self.transformer,
            scheduler=CosineDPMSolverMultistepScheduler.from_config(self.scheduler_config),
        )

    def save_pipeline(self, folder: str | Path, transformer: torch.nn.Module | None = None) -> Path:
        """:meth:`pipeline` saved with ``save_pretrained``, plus ``mmalign_generator.json`` when
        ``audio_end_in_s`` is not the model's maximum."""
        from .sd3 import write_generator_config

        self.pipeline(transformer).save_pretrained(str(folder))
        if abs(self.audio_end_in_s - self.max_duration) > 1e-9:
            write_generator_config(folder, audio_end_in_s=self.audio_end_in_s)
        return Path(folder)


class StableAudioFlowView:
    """A :class:`StableAudioGenerator` seen as a flow-matching generator (parametrisation "flow"), so that the
    trainers of flow models (Flow-GRPO and its variants: their SDE, log-probs and CPS) train it.

    The change of variables: the v-diffusion state ``x_σ = x0 + σ·ε`` scaled by ``1/(1 + σ)`` is the rectified-flow
    state ``x_s = (1 − s)·x0 + s·ε`` at ``s = σ/(1 + σ)`` (every Gaussian diffusion path is one of the others up to
    a scaling of the state and a change of time; Kingma & Gao 2023, "Understanding Diffusion Objectives as the ELBO
    with Simple Data Augmentation", sec. 2). From the network's output ``F`` at ``x_in = x_s/√(s² + σ_d²(1 − s)²)``
    and model timestep ``(2/π)·atan2(s, 1 − s)`` (the same ``x_in`` and timestep as at ``x_σ``, σ), the denoised
    estimate is ``x̂0 = σ_d²(1 − s)·x_s/D ∓ s·σ_d·F/√D`` (``D = s² + σ_d²(1 − s)²``; minus for v-prediction) and
    the flow velocity ``v = ε̂ − x̂0 = (x_s − x̂0)/s`` (finite at s = 1 too: ``x_in = x_s``, ``x̂0 = ∓σ_d·F``).
    Timesteps are ``s·1000`` as the flow families'. :meth:`sampling_schedule` is linear in ``s`` from 1 to 0 (after
    ``shift`` as ``FlowMatchEulerDiscreteScheduler``'s), not the pipeline's σ schedule, which spends half its steps
    at s > 0.95. Everything else (conditions, decoding, LoRA files, the pipeline itself) is the wrapped generator's,
    :attr:`base`."""

    parametrisation: ClassVar[str] = "flow"

    def __init__(self, base: StableAudioGenerator, shift: float = 1.0):
        object.__setattr__(self, "base", base)
        object.__setattr__(self, "shift", float(shift))

    def __getattr__(self, name: str) -> Any:
        if name == "base":  # not yet set (copying, unpickling)
            raise AttributeError(name)
        return getattr(self.base, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.base, name, value)

    def __repr__(self) -> str:
        return f"StableAudioFlowView({self.base.folder})"

    def to(self, device: str | torch.device) -> StableAudioFlowView:
        self.base.to(device)
        return self

    def latent_frames(self) -> int:
        """What the flow trainers ask a video generator (its latent frames, a memory estimate's factor): 1, the
        audio latents being one sequence (the base's :attr:`StableAudioGenerator.latent_frames` is its length)."""
        return 1

    def _denoised(
        self, model: torch.nn.Module, x: Tensor, t: Tensor | float, conditions: Conditions
    ) -> tuple[Tensor, Tensor]:
        """``(x̂0, s)`` at the flow state ``x`` and flow timesteps ``t = s·1000`` (``s`` shaped to broadcast)."""
        s = torch.as_tensor(t, device=x.device, dtype=torch.float32).flatten() / 1000
        s = s.expand(x.shape[0]) if s.numel() == 1 else s
        data = self.base.sigma_data
        d = (s**2 + data**2 * (1 - s) ** 2).view(-1, *([1] * (x.ndim - 1)))
        output = self.base.predict(model, x / d.sqrt(), torch.atan2(s, 1 - s) / math.pi * 2, conditions)
        s = s.view(-1, *([1] * (x.ndim - 1)))
        sign = -1.0 if self.base.scheduler_config["prediction_type"] == "v_prediction" else 1.0
        return data**2 * (1 - s) * x.float() / d + sign * s * data * output / d.sqrt(), s

    def predict(self, model: torch.nn.Module, x_t: Tensor, t: Tensor | float, conditions: Conditions) -> Tensor:
        """The flow velocity ``(x_s − x̂0)/s`` at flow timesteps ``t = s·1000`` (scalar or ``[B]``), float32."""
        denoised, s = self._denoised(model, x_t, t, conditions)
        return (x_t.float() - denoised) / s

    def guided_velocity(
        self,
        model: torch.nn.Module,
        x: Tensor,
        t: Tensor | float,
        conditions: Conditions,
        uncond: Conditions | None,
        guidance: float,
    ) -> Tensor:
        """``v_u + g·(v_c − v_u)`` from one batched call (the velocity is affine in the network's output, so this is
        the pipeline's CFG on ``F``); plain :meth:`predict` at ``g <= 1``."""
        if guidance <= 1.0:
            return self.predict(model, x, t, conditions)
        check_guidance(conditions, uncond, guidance)
        v_uncond, v_cond = cfg_branches(self, model, x, t, conditions, uncond)
        return v_uncond + guidance * (v_cond - v_uncond)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """``(1 − s)·x0 + s·ε`` at ``t = s·1000``."""
        s = left_broadcast(torch.as_tensor(t, device=x0.device, dtype=torch.float32) / 1000, x0.float(), "t")
        return (1 - s) * x0 + s * noise

    def training_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The flow velocity ``ε − x0``."""
        return noise - x0

    def sampling_schedule(self, steps: int, latent_shape: Sequence[int] | None = None, device: Any = None) -> Schedule:
        """``steps`` Euler steps linear in ``s`` from 1 to 0 (shifted by :attr:`shift`): ``timesteps = s·1000``."""
        s = torch.linspace(1.0, 0.0, int(steps) + 1)
        s = self.shift * s / (1 + (self.shift - 1) * s)
        return Schedule((s[:-1] * 1000).to(device or self.base.device), s)
