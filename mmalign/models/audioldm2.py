"""AudioLDM 2 (text-to-audio on a mel-spectrogram UNet) as a UNet policy: the DDPM-schedule ("diffusion") online
trainers — DDPO / D3PO on DDIM chains, ReFL / DRaFT / AlignProp by reward backpropagation — train it as they train
SD, with an audio reward (CLAP).

Components, as diffusers' ``AudioLDM2Pipeline`` holds them: ``AudioLDM2UNet2DConditionModel`` (trainable: each
attention block holds a self-attention and two cross-attentions, on the GPT-2 states and on the T5 states),
``ClapModel`` (``text_encoder``, RoBERTa tokenizer), ``T5EncoderModel`` (``text_encoder_2``, Flan-T5 tokenizer),
``AudioLDM2ProjectionModel``, a GPT-2 ``language_model``, ``AutoencoderKL`` (a one-channel mel spectrogram ↔
latents ``[B, C, T/f, M/f]``), ``SpeechT5HifiGan`` (``vocoder``: mel → waveform) and a DDPM-family scheduler (DDIM).
Re-implemented from ``diffusers/pipelines/audioldm2/pipeline_audioldm2.py`` (diffusers 0.42.1; no code copied):

* Prompts (:meth:`AudioLDM2Policy.encode_prompt`, no gradients, each prompt encoded alone): CLAP's text features
  (``get_text_features``, one token), T5's last hidden state (unpadded), both through the projection model (its
  learned start/end tokens), then ``max_new_tokens`` (the language model config's, 8 by default) GPT-2 hidden
  states generated autoregressively from them (the pipeline's ``generate_language_model``; recomputed without a
  key/value cache here, so any GPT-2 class works). The conditioning is a ``PromptEmbeds``: ``hidden`` the
  generated states ``[B, 8, D_gpt]`` (the UNet's ``encoder_hidden_states``) and ``extra`` the T5 states
  ``text_embeds [B, L, D_t5]`` zero-padded to the T5 tokenizer's ``model_max_length`` with their
  ``attention_mask [B, L]`` (``encoder_hidden_states_1`` / ``encoder_attention_mask_1``): the padding is masked
  out of the cross-attention, so a prompt's output does not depend on the others in its batch.
* Unconditional branch: the empty prompt encoded alone, what the pipeline builds for a batch of prompts whose T5
  tokenisation is one token long. The pipeline pads the empty prompt's T5 tokens to the conditional prompts'
  length before the GPT-2 generation, and GPT-2 numbers the padded positions too, so its unconditional GPT-2
  states change slightly with the prompt's length; this module's do not (a fixed branch, cached per run).
* Duration: ``audio_length_in_s`` (default the pipeline's ``sample_size · vae_scale_factor · hop /
  sampling_rate``; the trainers' ``duration`` option sets it as :attr:`audio_end_in_s`) gives the mel frames
  ``int(s / (hop / rate))`` rounded up to a multiple of the VAE factor, hence the latent rows; the decoded
  waveform is cropped to ``int(s · rate)`` samples, as the pipeline does.
* Decoding (:meth:`AudioLDM2Policy.decode`): ``latents / scaling_factor`` → VAE → mel ``[B, 1, T, M]`` →
  vocoder → waveform, cropped, clamped to the canonical [-1, 1] and returned as mono audio ``[B, 1, S]`` at the
  vocoder's ``sampling_rate`` (16 kHz for cvssp/audioldm2); differentiable with ``grad=True``.
* Offline pairs (Diffusion-DPO, SFT, ...): the pipeline has no audio → mel path, so
  :meth:`AudioLDM2Policy.latent_distribution` applies the reference's training front end
  (:mod:`mmalign.models.audioldm_mel`: peak-normalised mono, magnitude STFT, Slaney mel, log; the settings the
  checkpoint does not record derived from its vocoder so that they equal the published ones) and encodes the
  mel spectrogram with the VAE.
* Gradient checkpointing: diffusers 0.42.1's ``AudioLDM2UNet2DConditionModel`` passes its blocks' arguments in the
  wrong order under checkpointing (the T5 mask becomes the self-attention mask and the call fails): the loaded UNet
  checkpoints them with :func:`checkpoint_block`, which passes them by name (:func:`with_block_checkpointing`).
* LoRA: on the UNet's attention projections (``to_q/to_k/to_v/to_out.0`` of every self- and cross-attention).
  ``AudioLDM2UNet2DConditionModel`` lacks diffusers' ``PeftAdapterMixin`` and ``AudioLDM2Pipeline`` has no LoRA
  loader: the UNet is given the mixin (:func:`mmalign.models.stable_audio.with_peft`, the class keeps its name),
  :meth:`AudioLDM2Policy.save_lora` writes diffusers' LoRA file (``pytorch_lora_weights.safetensors``,
  ``unet.``-prefixed keys, the adapter config as metadata) and :meth:`AudioLDM2Policy.load_lora_weights` loads it
  (``load_lora_adapter``), also into a diffusers pipeline's UNet: ``load_lora_into_unet(pipe.unet, folder)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import WeightsError
from .policy import DiffusionPolicy, PromptEmbeds

__all__ = ["AudioLDM2Policy", "load_lora_into_unet"]

NEEDED = (
    "unet", "vae", "vocoder", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "projection_model",
    "language_model", "scheduler",
)  # fmt: skip


def checkpoint_block(module: torch.nn.Module, *args: Any) -> Any:
    """The gradient-checkpointing function of :func:`with_block_checkpointing`: a ``Transformer2DModel`` called as
    ``AudioLDM2UNet2DConditionModel``'s blocks call it under checkpointing (diffusers 0.42.1,
    ``modeling_audioldm2.py``: ``hidden_states, encoder_hidden_states, None, None, cross_attention_kwargs,
    attention_mask, encoder_attention_mask`` positionally, one place off ``Transformer2DModel.forward``'s order, so
    the T5 mask lands on ``attention_mask`` and the call fails) is called with those arguments by name; any other
    module as diffusers' default does (``torch.utils.checkpoint``, non-reentrant)."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    if isinstance(module, Transformer2DModel) and len(args) == 7:
        hidden, encoder, _timestep, _labels, cross_kwargs, mask, encoder_mask = args

        def run(hidden: Tensor, encoder: Tensor | None, encoder_mask: Tensor | None) -> Any:
            return module(
                hidden, encoder_hidden_states=encoder, cross_attention_kwargs=cross_kwargs, attention_mask=mask,
                encoder_attention_mask=encoder_mask, return_dict=False,
            )  # fmt: skip

        return torch.utils.checkpoint.checkpoint(run, hidden, encoder, encoder_mask, use_reentrant=False)
    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)


_CHECKPOINTING_CLASSES: dict[type, type] = {}


def with_block_checkpointing(unet: torch.nn.Module) -> torch.nn.Module:
    """``unet`` whose ``enable_gradient_checkpointing()`` uses :func:`checkpoint_block` (its class becomes a
    subclass of the same name and module, as :func:`~mmalign.models.stable_audio.with_peft` does)."""
    base = type(unet)
    if getattr(base, "_mmalign_block_checkpointing", False):
        return unet
    if base not in _CHECKPOINTING_CLASSES:

        def enable_gradient_checkpointing(self, gradient_checkpointing_func=None) -> None:
            base.enable_gradient_checkpointing(self, gradient_checkpointing_func or checkpoint_block)

        namespace = {
            "__module__": base.__module__,
            "_mmalign_block_checkpointing": True,
            "enable_gradient_checkpointing": enable_gradient_checkpointing,
        }
        _CHECKPOINTING_CLASSES[base] = type(base.__name__, (base,), namespace)
        _CHECKPOINTING_CLASSES[base].__qualname__ = base.__qualname__
    unet.__class__ = _CHECKPOINTING_CLASSES[base]
    return unet


def load_lora_into_unet(unet: torch.nn.Module, folder: str | Path, adapter_name: str | None = None) -> None:
    """Load a LoRA file written by :meth:`AudioLDM2Policy.save_lora` into an ``AudioLDM2UNet2DConditionModel``
    (e.g. ``AudioLDM2Pipeline.from_pretrained(...).unet``), giving it diffusers' ``PeftAdapterMixin`` first."""
    from .stable_audio import with_peft

    with_peft(unet).load_lora_adapter(
        str(folder), prefix="unet", weight_name="pytorch_lora_weights.safetensors", adapter_name=adapter_name
    )


class AudioLDM2Policy(DiffusionPolicy):
    """AudioLDM 2 components behind the UNet policy (see this module and :class:`DiffusionPolicy`): latents
    ``[B, C, T', M']`` of a mel spectrogram, audio ``[B, 1, S]`` (mono) in [-1, 1] at :attr:`sample_rate`."""

    modality = "audio"
    parametrisation = "diffusion"
    lora_targets = ("to_k", "to_q", "to_v", "to_out.0")
    lora_layers_key = "unet_lora_layers"
    block_class = "BasicTransformerBlock"
    pipeline_name = "AudioLDM2Pipeline"
    display_name = "AudioLDM 2"
    audio_channels = 1

    def __init__(self, components: dict[str, Any], folder: Path | None = None, audio_length_in_s: float | None = None):
        from .stable_audio import with_peft

        missing = [name for name in NEEDED if components.get(name) is None]
        if missing:
            raise WeightsError(f"{folder}: AudioLDM 2 components without {', '.join(missing)}")
        self.folder = folder
        self.unet = with_block_checkpointing(with_peft(components["unet"]))
        self.vae = components["vae"]
        self.vocoder = components["vocoder"]
        self.clap = components["text_encoder"]
        self.t5 = components["text_encoder_2"]
        if type(self.t5).__name__ == "VitsModel":
            raise WeightsError(f"{folder}: AudioLDM 2 text-to-speech (a VITS second encoder) is not supported")
        self.projection_model = components["projection_model"]
        self.language_model = components["language_model"]
        self.tokenizers = [components["tokenizer"], components["tokenizer_2"]]
        self.feature_extractor = components.get("feature_extractor")
        self.scheduler = components["scheduler"]
        from diffusers import DDPMScheduler

        self.noise_scheduler = DDPMScheduler.from_config(self.scheduler.config)
        self.text_encoders: list[torch.nn.Module] | None = [self.clap, self.t5]
        self.is_sdxl = False
        self.force_zeros_for_empty_prompt = False
        self.prediction_type = self.noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise WeightsError(f"{folder}: unsupported prediction_type {self.prediction_type!r}")
        self.max_new_tokens = int(getattr(self.language_model.config, "max_new_tokens", None) or 8)
        for module in (self.vae, self.vocoder, self.clap, self.t5, self.projection_model, self.language_model):
            module.requires_grad_(False)
            module.eval()
        self._empty: PromptEmbeds | None = None
        self.audio_length_in_s = self.default_duration if audio_length_in_s is None else audio_length_in_s

    # -- loading -------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        model: str | Path,
        device: str | torch.device = "cpu",
        audio_length_in_s: float | None = None,
        dtype: torch.dtype | None = None,
    ) -> AudioLDM2Policy:
        """An ``AudioLDM2Pipeline`` folder or hub id (``save_pretrained`` layout), every component through its own
        class's ``from_pretrained`` (then cast to ``dtype`` when given); ``audio_length_in_s`` default: the folder's
        ``mmalign_generator.json``, else the pipeline's default."""
        import diffusers
        import transformers
        from diffusers.pipelines.audioldm2 import AudioLDM2ProjectionModel, AudioLDM2UNet2DConditionModel

        from ..hub import resolve_dir
        from .generator import read_model_index
        from .sd3 import read_generator_config

        folder = resolve_dir(str(model), default_repo=str(model), what="diffusion pipeline")
        index = read_model_index(folder)
        missing = [name for name in NEEDED if not index.get(name) or index[name][1] is None]
        if missing:
            raise WeightsError(f"{folder}: AudioLDM 2 pipeline without {', '.join(missing)}")

        def library_class(name: str) -> type:
            library, class_name = index[name]
            module = diffusers if library in ("diffusers", "audioldm2") else transformers
            found = getattr(module, class_name, None)
            if found is None:
                raise WeightsError(f"{folder}: unknown {name} class {library}.{class_name}")
            return found

        components: dict[str, Any] = {
            "unet": AudioLDM2UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
            "projection_model": AudioLDM2ProjectionModel.from_pretrained(folder, subfolder="projection_model"),
            "scheduler": library_class("scheduler").from_pretrained(folder, subfolder="scheduler"),
        }
        for name in ("vae", "vocoder", "text_encoder", "text_encoder_2", "language_model"):
            components[name] = library_class(name).from_pretrained(str(folder / name))
        for name in ("tokenizer", "tokenizer_2"):
            components[name] = transformers.AutoTokenizer.from_pretrained(str(folder / name))
        if (index.get("feature_extractor") or [None, None])[1] is not None:  # kept for the pipelines it saves
            components["feature_extractor"] = library_class("feature_extractor").from_pretrained(
                str(folder / "feature_extractor")
            )
        if audio_length_in_s is None and "audio_length_in_s" in (settings := read_generator_config(folder)):
            audio_length_in_s = float(settings["audio_length_in_s"])
        if dtype is not None:
            for name in (
                "unet",
                "projection_model",
                "vae",
                "vocoder",
                "text_encoder",
                "text_encoder_2",
                "language_model",
            ):
                components[name].to(dtype)
        return cls(components, folder, audio_length_in_s=audio_length_in_s).to(device)

    def to(self, device: str | torch.device) -> AudioLDM2Policy:
        for module in (self.unet, self.vae, self.vocoder, self.projection_model, self.language_model):
            if module is not None:
                module.to(device)
        for module in self.text_encoders or []:
            module.to(device)
        if self._empty is not None:
            self._empty = self._empty.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def family(self) -> str:
        return "audioldm2"

    @property
    def pipeline_class(self) -> type:
        import diffusers

        return diffusers.AudioLDM2Pipeline

    # -- duration ------------------------------------------------------------------------------------------
    @property
    def sample_rate(self) -> int:
        """The waveform's sample rate: the vocoder's ``sampling_rate`` (16 kHz for cvssp/audioldm2)."""
        return int(self.vocoder.config.sampling_rate)

    @property
    def hop_length(self) -> int:
        """Waveform samples per mel frame: the product of the vocoder's ``upsample_rates``."""
        return int(math.prod(self.vocoder.config.upsample_rates))

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_duration(self) -> float:
        """The pipeline's default ``audio_length_in_s``: ``sample_size · vae_scale_factor · hop / rate``."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor * self.hop_length / self.sample_rate

    @property
    def audio_length_in_s(self) -> float:
        """Seconds of audio sampled (the pipeline's ``audio_length_in_s``)."""
        return self._audio_length_in_s

    @audio_length_in_s.setter
    def audio_length_in_s(self, seconds: float) -> None:
        seconds = float(seconds)
        shortest = self.vae_scale_factor * self.hop_length / self.sample_rate
        if seconds < shortest:
            raise ValueError(f"audio_length_in_s must be at least {shortest:g} s (one latent row), got {seconds:g}")
        self._audio_length_in_s = seconds

    audio_end_in_s = audio_length_in_s  # the name the trainers' ``duration`` option sets (Stable Audio's)

    @property
    def mel_frames(self) -> int:
        """Mel frames of a sample: ``int(s / (hop / rate))`` rounded up to a multiple of the VAE factor."""
        frames = int(self.audio_length_in_s / (self.hop_length / self.sample_rate))
        return math.ceil(frames / self.vae_scale_factor) * self.vae_scale_factor

    @property
    def num_samples(self) -> int:
        """Samples of a decoded waveform: ``int(audio_length_in_s · sampling_rate)``."""
        return int(self.audio_length_in_s * self.sample_rate)

    def latent_shape(self, height: int = 0, width: int = 0) -> tuple[int, int, int]:
        """``(C, T', M')`` of one latent: the UNet's channels, the mel frames and the vocoder's mel bins over the VAE
        factor (the protocol's ``height`` / ``width`` do not apply to audio and are ignored)."""
        factor = self.vae_scale_factor
        bins = int(self.vocoder.config.model_in_dim)
        return int(self.unet.config.in_channels), self.mel_frames // factor, bins // factor

    # -- conditioning --------------------------------------------------------------------------------------
    def _generate(self, embeds: Tensor, mask: Tensor) -> Tensor:
        """``max_new_tokens`` GPT-2 hidden states generated from ``embeds [1, L, D]``: each step runs the
        language model on the sequence so far (mask extended with ones) and appends its last hidden state."""
        for _ in range(self.max_new_tokens):
            out = self.language_model(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True)
            embeds = torch.cat([embeds, out.hidden_states[-1][:, -1:]], dim=1)
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        return embeds[:, -self.max_new_tokens :]

    @torch.no_grad()
    def _encode_one(self, prompt: str) -> PromptEmbeds:
        if self.text_encoders is None:
            raise RuntimeError("the text encoders were freed (free_text_encoders)")
        device = self.device
        roberta, t5_tokenizer = self.tokenizers
        tokens = roberta(prompt, padding="max_length", max_length=roberta.model_max_length, truncation=True,
                         return_tensors="pt")  # fmt: skip
        features = self.clap.get_text_features(
            tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device)
        )
        features = getattr(features, "pooler_output", features)[:, None, :]
        tokens_2 = t5_tokenizer(prompt, padding=True, max_length=t5_tokenizer.model_max_length, truncation=True,
                                return_tensors="pt")  # fmt: skip
        mask_2 = tokens_2.attention_mask.to(device)
        text = self.t5(tokens_2.input_ids.to(device), attention_mask=mask_2)[0]
        projected = self.projection_model(
            hidden_states=features,
            hidden_states_1=text,
            attention_mask=torch.ones((1, 1), dtype=mask_2.dtype, device=device),
            attention_mask_1=mask_2,
        )
        generated = self._generate(projected.hidden_states, projected.attention_mask)
        length = int(t5_tokenizer.model_max_length)
        padded = text.new_zeros((1, length, text.shape[-1]))
        padded[:, : text.shape[1]] = text
        mask = mask_2.new_zeros((1, length))
        mask[:, : text.shape[1]] = mask_2
        return PromptEmbeds(generated, None, {"text_embeds": padded, "attention_mask": mask})

    def encode_prompt(self, prompts: Sequence[str]) -> PromptEmbeds:
        """The UNet's two cross-attention inputs for ``prompts`` (each encoded alone, no gradients): ``hidden``
        the generated GPT-2 states, ``extra`` the padded T5 states and their mask (see this module)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return PromptEmbeds.cat([self._encode_one(p) for p in prompts])

    def empty_prompt(self) -> PromptEmbeds:
        """The empty prompt's embeddings (one row), encoded once."""
        if self._empty is None:
            self._empty = self.encode_prompt([""])
        return self._empty

    def unconditional(self, empty: PromptEmbeds) -> PromptEmbeds:
        """The unconditional branch: the empty prompt's embeddings ``empty`` as they are."""
        return empty

    def free_text_encoders(self) -> None:
        """Drop CLAP, T5 and GPT-2 (training then runs on the trainer's cached prompt embeddings; the empty
        prompt's, which :meth:`sample` guides with, is kept)."""
        self.empty_prompt()
        self.text_encoders = None
        self.language_model = None

    # -- the network ---------------------------------------------------------------------------------------
    def predict(
        self,
        unet: torch.nn.Module,
        noisy: Tensor,
        timesteps: Tensor,
        embeds: PromptEmbeds,
        time_ids: Tensor | None = None,
    ) -> Tensor:
        """The UNet's output at ``noisy [B, C, T', M']`` with the GPT-2 states as ``encoder_hidden_states`` and the
        T5 states (masked) as ``encoder_hidden_states_1``, in float32."""
        if noisy.ndim != 4:
            raise ValueError(f"AudioLDM 2 latents are [B, C, T', M'], got {tuple(noisy.shape)}")
        dtype = next(unet.parameters()).dtype
        device = noisy.device
        return unet(
            noisy.to(dtype),
            timesteps,
            encoder_hidden_states=embeds.hidden.to(device, dtype),
            encoder_hidden_states_1=embeds.extra["text_embeds"].to(device, dtype),
            encoder_attention_mask_1=embeds.extra["attention_mask"].to(device),
            return_dict=False,
        )[0].float()

    # -- latents and audio ---------------------------------------------------------------------------------
    @property
    def mel_settings(self):
        """The waveform → mel front end of the VAE's training (:mod:`mmalign.models.audioldm_mel`)."""
        from .audioldm_mel import mel_settings_for

        return mel_settings_for(self.vocoder.config)

    def fit_audio(self, audio: Tensor) -> Tensor:
        """Canonical audio ``[B, C, S]`` at :attr:`sample_rate` → mono ``[B, num_samples]`` as the reference trains
        on it: channels averaged, centred and peak-normalised to 0.5, zero-padded or cropped at the end."""
        from .audioldm_mel import normalize_waveform

        if audio.ndim == 2:
            audio = audio.unsqueeze(1)
        if audio.ndim != 3:
            raise ValueError(f"expected audio [B, C, S], got {tuple(audio.shape)}")
        mono = normalize_waveform(audio.float().mean(1))
        length = self.num_samples
        return torch.nn.functional.pad(mono, (0, max(0, length - mono.shape[-1])))[:, :length]

    @torch.no_grad()
    def latent_distribution(self, audio: Tensor) -> tuple[Tensor, Tensor]:
        """The VAE posterior ``(mean, std)`` (float32, ``[B, C, T', M']``) of canonical audio ``[B, C, S]`` at
        :attr:`sample_rate`: :meth:`fit_audio`, the reference's log-mel of :attr:`mel_frames` frames, encoded."""
        from .audioldm_mel import audioldm_log_mel

        mel = audioldm_log_mel(self.fit_audio(audio).to(self.vae.device), self.mel_settings, self.mel_frames)
        dist = self.vae.encode(mel.to(self.vae.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def decode(self, latents: Tensor, grad: bool = False) -> Tensor:
        """Latents ``[B, C, T', M']`` → mono audio ``[B, 1, S]`` in [-1, 1] at :attr:`sample_rate`, ``S =
        int(audio_length_in_s · rate)``: VAE decode of ``latents / scaling_factor`` to a mel spectrogram, the
        vocoder, the pipeline's crop, clamped; ``grad=True`` keeps the graph."""
        if latents.ndim != 4:
            raise ValueError(f"AudioLDM 2 latents are [B, C, T', M'], got {tuple(latents.shape)}")
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            mel = self.vae.decode(latents.to(self.vae.dtype) / self.scaling_factor).sample
            waveform = self.vocoder(mel.squeeze(1).to(self.vocoder.dtype)).float()
            if waveform.ndim == 1:
                waveform = waveform.unsqueeze(0)
            return waveform[:, None, : self.num_samples].clamp(-1.0, 1.0)

    # -- sampling ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        conditions: PromptEmbeds,
        steps: int = 200,
        guidance: float = 3.5,
        generator: torch.Generator | None = None,
        latents: Tensor | None = None,
        noise: str = "none",
        model: torch.nn.Module | None = None,
    ) -> Tensor:
        """Latents ``[B, C, T', M']`` sampled as ``AudioLDM2Pipeline(..., output_type="latent")`` with its
        scheduler (DDIM: the folder's settings): x_T = ``latents`` (or ``randn`` from ``generator``) times the
        scheduler's ``init_noise_sigma``, CFG ``ε_u + g·(ε_c − ε_u)`` on one batched call when ``g > 1`` (the
        unconditional branch: the empty prompt, :meth:`unconditional`). ``noise``: "none" (η = 0, the pipeline's
        default) or "gaussian" (η = 1, the step noise drawn from ``generator``)."""
        if noise not in ("none", "gaussian"):
            raise ValueError(f"noise must be 'none' or 'gaussian', got {noise!r}")
        unet = self.unet if model is None else model
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        scheduler.set_timesteps(steps, device=self.device)
        count = conditions.hidden.shape[0]
        if latents is None:
            latents = torch.randn((count, *self.latent_shape()), generator=generator)
        x = latents.to(self.device, torch.float32) * scheduler.init_noise_sigma
        embeds = conditions
        if guidance > 1.0:
            embeds = PromptEmbeds.cat([self.empty_prompt().repeat(count), conditions])
        options = {"eta": 1.0, "generator": generator} if noise == "gaussian" else {"eta": 0.0}
        for t in scheduler.timesteps:
            model_input = torch.cat([x, x]) if guidance > 1.0 else x
            model_input = scheduler.scale_model_input(model_input, t)
            out = self.predict(unet, model_input, t, embeds)
            if guidance > 1.0:
                uncond, cond = out.chunk(2)
                out = uncond + guidance * (cond - uncond)
            x = scheduler.step(out, t, x, **options).prev_sample
        return x

    # -- LoRA and pipelines --------------------------------------------------------------------------------
    def save_lora(self, folder: str | Path, layers: dict[str, Tensor], metadata: dict[str, Any] | None) -> Path:
        """Diffusers' LoRA file of the UNet's peft ``layers`` (``pytorch_lora_weights.safetensors``, ``unet.``
        keys, ``metadata`` the adapter's ``LoraConfig``): what :func:`load_lora_into_unet` reads
        (``AudioLDM2Pipeline`` has no ``load_lora_weights``)."""
        from diffusers.loaders.lora_base import LoraBaseMixin

        Path(folder).mkdir(parents=True, exist_ok=True)
        LoraBaseMixin._save_lora_weights(
            save_directory=str(folder),
            lora_layers={"unet": layers},
            lora_metadata={"unet": None if metadata is None else dict(metadata)},
            weight_name="pytorch_lora_weights.safetensors",
        )
        return Path(folder)

    def load_lora_weights(self, folder: str | Path, adapter_name: str | None = None) -> None:
        """Load a LoRA file written by :meth:`save_lora` into :attr:`unet`."""
        load_lora_into_unet(self.unet, folder, adapter_name)

    def pipeline_call_options(self) -> dict[str, Any]:
        """Keyword arguments of ``AudioLDM2Pipeline.__call__`` that make it sample what this policy samples."""
        return {"audio_length_in_s": self.audio_length_in_s}

    def pipeline(self, unet: torch.nn.Module | None = None):
        """An ``AudioLDM2Pipeline`` over these components (the folder's scheduler) with ``unet`` in place of
        :attr:`unet` when given."""
        if self.text_encoders is None or self.language_model is None:
            raise RuntimeError("the text encoders were freed (free_text_encoders)")
        return self.pipeline_class(
            vae=self.vae,
            text_encoder=self.clap,
            text_encoder_2=self.t5,
            projection_model=self.projection_model,
            language_model=self.language_model,
            tokenizer=self.tokenizers[0],
            tokenizer_2=self.tokenizers[1],
            feature_extractor=self.feature_extractor,
            unet=unet if unet is not None else self.unet,
            scheduler=type(self.scheduler).from_config(self.scheduler.config),
            vocoder=self.vocoder,
        )

    def save_pipeline(self, folder: str | Path, unet: torch.nn.Module | None = None) -> Path:
        """:meth:`pipeline` saved with ``save_pretrained``, plus ``mmalign_generator.json`` when
        ``audio_length_in_s`` is not the pipeline's default."""
        from .sd3 import write_generator_config

        self.pipeline(unet).save_pretrained(str(folder))
        if abs(self.audio_length_in_s - self.default_duration) > 1e-9:
            write_generator_config(folder, audio_length_in_s=self.audio_length_in_s)
        return Path(folder)
