"""Offline preference trainers of the Diffusion-DPO family: a ``<Method>Config`` beside each trainer.

Each trainer only turns a batch of (winner, loser) latents into a loss from :mod:`mmalign.trainers.losses`;
the loop (:mod:`mmalign.trainers.loop`) does the rest. Winner and loser share the timestep and the noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from . import losses
from .loop import TrainConfig, Trainer


@dataclass
class DPOConfig(TrainConfig):
    """Diffusion-DPO (Wallace et al. 2023). ``beta`` in the official convention (5000 for SD1.5, i.e. the
    diffusers script's 2500); ``loss_type`` sigmoid (paper), hinge or ipo."""

    trainer: str = "dpo"
    beta: float = 5000.0
    loss_type: Literal["sigmoid", "hinge", "ipo"] = "sigmoid"


class DiffusionDPOTrainer(Trainer):
    """Diffusion-DPO on any generator: on a flow-matching family the per-sample errors are those of the
    velocity (``ε − x0``), which is Flow-DPO (VideoAlign's); on a v-diffusion one (Stable Audio) those of its
    v-prediction at continuous timesteps; the loss is the same function of the errors."""

    config_class: ClassVar[type[TrainConfig]] = DPOConfig
    parametrisations: ClassVar[tuple[str, ...]] = ("diffusion", "flow", "v-diffusion")

    def pair_mses(self, batch: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        """Per-sample denoising MSEs of the model and the reference for winners and losers ``[b]`` each."""
        timesteps, noise = self.draw_noise(batch)
        latents = torch.cat([batch["latents_w"], batch["latents_l"]])
        noise2, timesteps2 = torch.cat([noise[0], noise[0]]), torch.cat([timesteps, timesteps])
        noisy, target = self.noisy_and_target(latents, noise2, timesteps2)
        embeds = batch["embeds"].tile(2)
        time_ids = None if batch["time_ids"] is None else batch["time_ids"].repeat(2, 1)
        model_mse = losses.per_sample_mse(self.predict(noisy, timesteps2, embeds, time_ids), target)
        ref_mse = self.reference_mse("pair", batch, noisy, timesteps2, embeds, time_ids, target)
        model_w, model_l = model_mse.chunk(2)
        ref_w, ref_l = ref_mse.chunk(2)
        return model_w, model_l, ref_w, ref_l

    def compute_loss(self, batch: dict[str, Any]) -> losses.LossOutput:
        config = self.config
        return losses.diffusion_dpo_loss(*self.pair_mses(batch), beta=config.beta, loss_type=config.loss_type)


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning on the winners only (the official Diffusion-DPO script's ``--sft`` mode)."""

    trainer: str = "sft"


class SFTTrainer(Trainer):
    config_class: ClassVar[type[TrainConfig]] = SFTConfig
    parametrisations: ClassVar[tuple[str, ...]] = ("diffusion", "flow", "v-diffusion")
    uses_reference: ClassVar[bool] = False

    def compute_loss(self, batch: dict[str, Any]) -> losses.LossOutput:
        timesteps, noise = self.draw_noise(batch)
        noisy, target = self.noisy_and_target(batch["latents_w"], noise[0], timesteps)
        pred = self.predict(noisy, timesteps, batch["embeds"], batch["time_ids"])
        return losses.sft_loss(losses.per_sample_mse(pred, target))


@dataclass
class SmPOConfig(TrainConfig):
    """SmPO (Lu et al. 2025; JaydenLyh/SmPO): Diffusion-DPO scaled by a smoothed preference
    ``p = σ(n(s_w) − n(s_l))`` from reward scores in raw PickScore-cosine units. Scores come from the data
    (``score_chosen``/``score_rejected``) or are computed once with ``smpo_reward`` (a reward name; two-tower
    rewards give their cosine); pairs are re-ordered so the higher-scored image is the winner. ``renoise``: the
    noisy latents come from ReNoise inversion (:meth:`SmPOTrainer.renoise_invert`) on the fixed grid of
    ``renoise_steps`` points (5 for SD1.5 as the reference; it uses 10 for SDXL)."""

    trainer: str = "smpo"
    beta: float = 2000.0
    smpo_scale: float = 10.0
    renoise: bool = True
    renoise_steps: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.renoise and self.reference == "precomputed":
            raise ValueError(
                "ReNoise inverts with the current model, so its inputs cannot be precomputed: "
                "use reference=copy (or renoise=false)"
            )

    smpo_reward: str | None = None
    smpo_reward_weights: str | None = None
    smpo_reward_processor: str | None = None


class SmPOTrainer(DiffusionDPOTrainer):
    config_class: ClassVar[type[TrainConfig]] = SmPOConfig

    def check_generator(self, parametrisation: str, model: object) -> None:
        super().check_generator(parametrisation, model)
        if self.config.renoise and parametrisation != "diffusion":
            from ..errors import ConfigError

            raise ConfigError(
                f"trainer=smpo renoise=true does not apply to model={model}: ReNoise inverts with DDIM on a DDPM "
                "schedule; set renoise=false on a flow-matching generator (the SmPO loss itself applies)"
            )

    def _setup_data(self) -> None:
        super()._setup_data()
        config = self.config
        if config.smpo_reward:
            self._score_pairs_with_reward()
        missing = [i for i, p in enumerate(self.pairs) if p.score_chosen is None or p.score_rejected is None]
        if missing:
            from ..errors import ConfigError

            raise ConfigError(
                f"smpo needs reward scores for every pair ({len(missing)} pairs lack score_chosen/score_rejected, "
                f"e.g. {self.pairs[missing[0]].source}); add them to the data or set smpo_reward=pickscore"
            )
        self.pairs = [p if p.score_chosen >= p.score_rejected else p.swapped() for p in self.pairs]
        self.dataset.pairs = self.pairs
        self.preferences = losses.smpo_preference(
            torch.tensor([p.score_chosen for p in self.pairs], dtype=torch.float64),
            torch.tensor([p.score_rejected for p in self.pairs], dtype=torch.float64),
        ).float()

    @torch.no_grad()
    def _score_pairs_with_reward(self) -> None:
        import dataclasses

        from ..data.records import decode_image
        from ..rewards import load_reward

        config = self.config
        reward = load_reward(
            config.smpo_reward, weights=config.smpo_reward_weights, processor=config.smpo_reward_processor
        )
        if not hasattr(reward, "preprocess_reference"):  # a served reward or an ensemble (ensemble:FILE)
            from ..errors import ConfigError

            raise ConfigError(
                f"smpo_reward={config.smpo_reward}: SmPO orders pairs by one local image reward's raw score "
                "(PickScore's cosine); served rewards and ensembles are not accepted here"
            )
        scored = []
        for pair in self.pairs:
            images = [decode_image(pair.chosen, pair.source), decode_image(pair.rejected, pair.source)]
            pixels = torch.stack([reward.preprocess_reference(image) for image in images])
            if hasattr(reward, "encode_image"):  # two-tower: the raw cosine, as SmPO's PickScore scores
                cosine = reward.encode_image(pixels) @ reward.encode_text([pair.prompt])[0]
                values = cosine.tolist()
            else:
                values = reward.score_pixels(pixels, [pair.prompt] * 2).tolist()
            scored.append(dataclasses.replace(pair, score_chosen=values[0], score_rejected=values[1]))
        self.pairs = scored

    def renoise_grid(self):
        """The inversion scheduler and its grid: diffusers' ``DDIMInverseScheduler`` built from the policy's
        scheduler config with ``renoise_steps`` steps, as SmPO's script builds it from the pipeline's scheduler
        (SD1.5, leading spacing with ``steps_offset`` 1: ``[1, 201, 401, 601, 801]``; SDXL's 10: ``[1, 101, …]``)."""
        from diffusers import DDIMInverseScheduler

        inverse = DDIMInverseScheduler.from_config(self.policy.noise_scheduler.config)
        inverse.set_timesteps(self.config.renoise_steps)
        return inverse

    @torch.no_grad()
    def renoise_invert(self, x0, timesteps, embeds, time_ids) -> tuple[torch.Tensor, torch.Tensor]:
        """ReNoise inversion of clean latents ``x0`` ``[B, ...]`` for per-sample timesteps ``t0`` ``[B]``, with the
        current model under no_grad. Returns ``x`` and ``ε̂ = (x − √ᾱ_{t0}·x0)/√(1−ᾱ_{t0})``.

        As SmPO's inversion loop (JaydenLyh/SmPO ``train.py``, the ``for t in times`` loop before the loss): the
        steps are the points ``t`` of the fixed inversion grid (:meth:`renoise_grid`) strictly below ``t0``, in
        increasing order (0 to ``renoise_steps`` steps; none when ``t0`` ≤ the first point). A step to ``t``
        calls the model at the current point and then at ``guess = step(ε₁, t, x)``, BOTH calls labelled with the
        destination ``t``, and moves ``x`` with the average: ``x ← step((ε₁ + ε₂)/2, t, x)``, ``step`` being
        ``DDIMInverseScheduler.step`` (from ᾱ at ``t − 1000/renoise_steps``, or its initial ᾱ before the first
        point, to ᾱ at ``t``). ``x`` therefore ends at the noise level of the last grid point below ``t0``,
        while ``ε̂`` (and the model call of the loss) use ``t0`` itself, as the reference does. Samples of one
        batch may have different ``t0``: each step runs the model only on the samples whose ``t0`` lies above it.
        """
        inverse = self.renoise_grid()
        x = x0.clone()
        for t in inverse.timesteps.tolist():
            active = (timesteps > t).nonzero().flatten()
            if active.numel() == 0:  # the grid increases: no later step is active either
                break
            x_a = x[active]
            label = torch.full((active.numel(),), t, dtype=timesteps.dtype, device=timesteps.device)
            embeds_a = embeds.select(active) if embeds is not None else None
            time_ids_a = time_ids[active] if time_ids is not None else None
            first = self.predict(x_a, label, embeds_a, time_ids_a)
            guess = inverse.step(first, t, x_a).prev_sample
            second = self.predict(guess, label, embeds_a, time_ids_a)
            x[active] = inverse.step((first + second) / 2, t, x_a).prev_sample.to(x.dtype)
        alphas = self.policy.noise_scheduler.alphas_cumprod.to(x0.device, torch.float32)
        return x, losses.epsilon_from_x0(x, x0, alphas[timesteps])

    def pair_mses(self, batch: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        if not self.config.renoise:
            return super().pair_mses(batch)
        timesteps, _ = self.draw_noise(batch)
        embeds, time_ids = batch["embeds"], batch["time_ids"]
        noisy, targets = [], []
        for x0 in (batch["latents_w"], batch["latents_l"]):
            x_t, eps_hat = self.renoise_invert(x0, timesteps, embeds, time_ids)
            _, target = self.noisy_and_target(x0, eps_hat, timesteps)  # ε̂, or v from ε̂
            noisy.append(x_t)
            targets.append(target)
        noisy, target = torch.cat(noisy), torch.cat(targets)
        timesteps2 = torch.cat([timesteps, timesteps])
        embeds2 = embeds.tile(2)
        time_ids2 = None if time_ids is None else time_ids.repeat(2, 1)
        model_mse = losses.per_sample_mse(self.predict(noisy, timesteps2, embeds2, time_ids2), target)
        ref_mse = self.reference_mse("renoise", batch, noisy, timesteps2, embeds2, time_ids2, target)
        return (*model_mse.chunk(2), *ref_mse.chunk(2))

    def compute_loss(self, batch: dict[str, Any]) -> losses.LossOutput:
        preference = self.preferences[torch.tensor(batch["indices"])].to(batch["latents_w"].device)
        return losses.smpo_loss(
            *self.pair_mses(batch), preference=preference, beta=self.config.beta, scale=self.config.smpo_scale
        )


@dataclass
class AdaptiveDPOConfig(TrainConfig):
    """Adaptive-DPO (fanfanffff1/Adaptive-DPO): minority-aware weights and margins from the current model
    and two EMA copies of the trained weights (decays ``annotator_decays``)."""

    trainer: str = "adaptive-dpo"
    beta: float = 1000.0
    rho: float = 15.0
    annotator_decays: list[float] = field(default_factory=lambda: [0.9999, 0.5])


class AdaptiveDPOTrainer(DiffusionDPOTrainer):
    config_class: ClassVar[type[TrainConfig]] = AdaptiveDPOConfig

    def _setup_model(self) -> None:
        super()._setup_model()
        from diffusers.training_utils import EMAModel

        self.annotators = [EMAModel(self.trainable, decay=d) for d in self.config.annotator_decays]

    @torch.no_grad()
    def _annotator_logits(self, batch: dict[str, Any], ref: tuple[torch.Tensor, torch.Tensor]) -> list:
        timesteps, noise = self.draw_noise(batch)
        latents = torch.cat([batch["latents_w"], batch["latents_l"]])
        noisy, target = self.noisy_and_target(latents, torch.cat([noise[0], noise[0]]), timesteps.repeat(2))
        embeds = batch["embeds"].tile(2)
        time_ids = None if batch["time_ids"] is None else batch["time_ids"].repeat(2, 1)
        logits = []
        for annotator in self.annotators:
            annotator.store(self.trainable)
            annotator.copy_to(self.trainable)
            try:
                mse = losses.per_sample_mse(self.predict(noisy, timesteps.repeat(2), embeds, time_ids), target)
            finally:
                annotator.restore(self.trainable)
            logits.append(losses.dpo_logits(*mse.chunk(2), *ref))
        return logits

    def compute_loss(self, batch: dict[str, Any]) -> losses.LossOutput:
        model_w, model_l, ref_w, ref_l = self.pair_mses(batch)
        ema_logits = self._annotator_logits(batch, (ref_w, ref_l))
        logits = losses.dpo_logits(model_w, model_l, ref_w, ref_l)
        return losses.adaptive_dpo_loss(logits, ema_logits, beta=self.config.beta, rho=self.config.rho)

    def _train_step(self) -> dict[str, float]:
        metrics = super()._train_step()
        if metrics:
            for annotator in self.annotators:
                annotator.step(self.trainable)
        return metrics

    def save_extra_state(self, folder) -> None:
        import json

        from safetensors.torch import save_file

        for i, annotator in enumerate(self.annotators):
            state = annotator.state_dict()
            shadow = state.pop("shadow_params")
            save_file({str(j): t.contiguous() for j, t in enumerate(shadow)}, str(folder / f"annotator{i}.safetensors"))
            (folder / f"annotator{i}.json").write_text(json.dumps(state))

    def load_extra_state(self, folder) -> None:
        import json

        from safetensors.torch import load_file

        for i, annotator in enumerate(self.annotators):
            state = json.loads((folder / f"annotator{i}.json").read_text())
            shadow = load_file(str(folder / f"annotator{i}.safetensors"))
            state["shadow_params"] = [shadow[str(j)] for j in range(len(shadow))]
            annotator.load_state_dict(state)


@dataclass
class KTOConfig(TrainConfig):
    """Diffusion-KTO (Li et al. 2024; jacklishufan/diffusion-kto): unpaired; each pair's winner is a
    desirable sample and its loser an undesirable one, each with its own timestep and noise. The reference
    point (the KL estimate) is the mean of ``g = mse_ref − mse_θ`` over the GLOBAL batch, all processes
    together, as the reference script all-reduces it (``accelerator.reduce(kl, "mean")`` in
    ``train_kto_sd_v1.5.py``; the same value with equal per-process batches), then clamped at 0."""

    trainer: str = "kto"
    beta: float = 1000.0
    lambda_desirable: float = 1.0
    lambda_undesirable: float = 1.0


class KTOTrainer(Trainer):
    config_class: ClassVar[type[TrainConfig]] = KTOConfig
    parametrisations: ClassVar[tuple[str, ...]] = ("diffusion", "flow", "v-diffusion")

    def compute_loss(self, batch: dict[str, Any]) -> losses.LossOutput:
        timesteps_w, noise_w = self.draw_noise(batch, stream=2)
        timesteps_l, noise_l = self.draw_noise(batch, stream=3)
        latents = torch.cat([batch["latents_w"], batch["latents_l"]])
        timesteps2 = torch.cat([timesteps_w, timesteps_l])
        noisy, target = self.noisy_and_target(latents, torch.cat([noise_w[0], noise_l[0]]), timesteps2)
        embeds = batch["embeds"].tile(2)
        time_ids = None if batch["time_ids"] is None else batch["time_ids"].repeat(2, 1)
        model_mse = losses.per_sample_mse(self.predict(noisy, timesteps2, embeds, time_ids), target)
        ref_mse = self.reference_mse("kto", batch, noisy, timesteps2, embeds, time_ids, target)
        desirable = torch.cat([torch.ones_like(timesteps_w), torch.zeros_like(timesteps_l)]).bool()
        config = self.config
        return losses.diffusion_kto_loss(
            model_mse,
            ref_mse,
            desirable,
            beta=config.beta,
            lambda_d=config.lambda_desirable,
            lambda_u=config.lambda_undesirable,
            kl=self.global_mean(ref_mse - model_mse),  # the loss clamps it at 0 and detaches it
        )
