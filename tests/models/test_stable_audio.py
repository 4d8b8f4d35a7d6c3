"""Stable Audio Open (StableAudioPipeline) behind the generator protocol, on a tiny random pipeline of the real
classes: prompt and timing conditioning, the schedule and the SDE-DPM-Solver++ chain equal to the pipeline's
(``output_type="latent"`` and ``"pt"``), audio decoding, the v-diffusion algebra, LoRA saving and reloading, and
the trainers that apply (Diffusion-DPO on audio pairs, DRaFT / ReFL) or do not (the GRPO family)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mmalign.errors import ConfigError
from mmalign.models.generator import Conditions, load_generator, parametrisation_of, save_lora_weights
from tests import tiny

PROMPTS = ["a dog barks", "rain on a piano loop"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny.make_stable_audio_pipeline(tmp_path_factory.mktemp("stable_audio") / "pipe", seed=0)


@pytest.fixture(scope="module")
def audio_gen(folder):
    return load_generator(str(folder))


def diffusers_pipeline(folder):
    pytest.importorskip("torchsde")  # CosineDPMSolverMultistepScheduler's Brownian tree
    from diffusers import StableAudioPipeline

    pipe = StableAudioPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_loads_as_stable_audio_with_3d_latents(audio_gen, folder):
    assert type(audio_gen).__name__ == "StableAudioGenerator" and parametrisation_of(folder) == "v-diffusion"
    assert audio_gen.modality == "audio" and audio_gen.block_class == "StableAudioDiTBlock"
    assert audio_gen.sample_rate == 4000 and audio_gen.hop_length == 4
    assert audio_gen.latent_shape() == (4, 16) and audio_gen.max_duration == pytest.approx(0.016)
    assert type(audio_gen.transformer).__name__ == "StableAudioDiTModel"  # with PeftAdapterMixin added
    assert hasattr(audio_gen.transformer, "add_adapter")


def test_encode_conditions_equals_the_pipeline(audio_gen, folder):
    pipe = diffusers_pipeline(folder)
    ours = audio_gen.encode_conditions(PROMPTS)
    with torch.no_grad():
        text = pipe.encode_prompt(PROMPTS, "cpu", False)
        start, end = pipe.encode_duration(0.0, audio_gen.audio_end_in_s, "cpu", False, len(PROMPTS))
    expected = torch.cat([text, start, end], dim=1)
    delta = (ours["encoder_hidden_states"] - expected).abs().max().item()
    assert delta < 1e-5, delta
    assert torch.equal(ours["global_hidden_states"], torch.cat([start, end], dim=2))
    uncond = audio_gen.unconditional(2)  # the pipeline's zeros, the same timing
    assert not uncond["encoder_hidden_states"].any()
    torch.testing.assert_close(uncond["global_hidden_states"], ours["global_hidden_states"])  # batch 1 vs 2


def test_schedule_equals_the_scheduler(audio_gen, folder):
    pipe = diffusers_pipeline(folder)
    pipe.scheduler.set_timesteps(7)
    schedule = audio_gen.sampling_schedule(7)
    assert torch.equal(schedule.timesteps, pipe.scheduler.timesteps)
    assert torch.equal(schedule.sigmas, pipe.scheduler.sigmas)
    assert audio_gen.init_noise_sigma == pipe.scheduler.init_noise_sigma


@pytest.mark.parametrize("guidance", [1.0, 7.0])
def test_sampling_equals_the_pipeline(audio_gen, folder, guidance):
    """The Brownian-tree step noise seeded as the pipeline seeds it: the pipeline's latents and audio."""
    pipe = diffusers_pipeline(folder)
    x_T = torch.randn((2, 4, 16), generator=torch.Generator().manual_seed(1))

    def seeded():
        return torch.Generator().manual_seed(5)

    kwargs = dict(num_inference_steps=8, guidance_scale=guidance, latents=x_T.clone())
    expected = pipe(PROMPTS, generator=seeded(), output_type="latent", **kwargs).audios
    conditions = audio_gen.encode_conditions(PROMPTS)
    ours = audio_gen.sample(conditions, steps=8, guidance=guidance, generator=seeded(), latents=x_T.clone())
    delta = (ours - expected).abs().max().item()
    print(f"max |Δ| latents (guidance {guidance}): {delta:.2e}")
    assert delta < 1e-5, delta
    audio = pipe(PROMPTS, generator=seeded(), output_type="pt", **kwargs).audios
    decoded = audio_gen.decode(ours)
    assert decoded.shape == audio.shape == (2, 2, audio_gen.num_samples)
    delta = (decoded - audio.clamp(-1, 1)).abs().max().item()
    print(f"max |Δ| audio (guidance {guidance}): {delta:.2e}")
    assert delta < 1e-5, delta
    assert decoded.abs().max() <= 1.0


def test_decode_crops_to_the_duration_and_keeps_the_graph(folder):
    generator = load_generator(str(folder), audio_end_in_s=0.01)
    assert generator.num_samples == 40 and generator.latent_shape() == (4, 16)
    latents = torch.randn(1, 4, 16, requires_grad=True)
    audio = generator.decode(latents, grad=True)
    assert audio.shape == (1, 2, 40) and audio.dtype == torch.float32 and audio.abs().max() <= 1
    audio.sum().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="audio_end_in_s must be in"):
        generator.audio_end_in_s = 1.0
    with pytest.raises(ValueError, match=r"\[B, C, L\]"):
        generator.decode(torch.randn(1, 4, 4, 4))


def test_v_diffusion_algebra(audio_gen):
    """The network's input and target at t are stable-audio-tools' ``cos·x0 + sin·ε`` and ``cos·ε − sin·x0``
    (σ_d = 1), and the scheduler's preconditioning turns the target back into x0 at σ = tan(πt/2)."""
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 16, generator=gen), torch.randn(3, 4, 16, generator=gen)
    t = torch.tensor([0.1, 0.5, 0.93])
    alpha, sigma_vp = torch.cos(t * math.pi / 2)[:, None, None], torch.sin(t * math.pi / 2)[:, None, None]
    torch.testing.assert_close(audio_gen.add_noise(x0, noise, t), alpha * x0 + sigma_vp * noise)
    target = audio_gen.training_target(x0, noise, t)
    torch.testing.assert_close(target, alpha * noise - sigma_vp * x0)
    for i in range(3):
        sigma = torch.tan(t[i] * math.pi / 2)
        x_sigma = x0[i] + sigma * noise[i]
        torch.testing.assert_close(audio_gen.model_input(x_sigma, sigma), audio_gen.add_noise(x0, noise, t)[i])
        torch.testing.assert_close(audio_gen.denoised(x_sigma, target[i], sigma), x0[i], atol=1e-5, rtol=1e-5)
        assert audio_gen.timestep_of(sigma).item() == pytest.approx(t[i].item(), abs=1e-6)


def test_ode_and_gaussian_chains_run_and_are_differentiable(audio_gen):
    conditions = audio_gen.encode_conditions(PROMPTS[:1])
    for noise in ("none", "gaussian"):
        first = audio_gen.sample(conditions, 4, 3.0, torch.Generator().manual_seed(0), noise=noise)
        again = audio_gen.sample(conditions, 4, 3.0, torch.Generator().manual_seed(0), noise=noise)
        assert first.shape == (1, 4, 16) and torch.isfinite(first).all() and torch.equal(first, again)
    schedule, state = audio_gen.sampling_schedule(3), {}
    x = (torch.randn(1, 4, 16) * audio_gen.init_noise_sigma).requires_grad_(True)
    y = x
    for i in range(3):
        out = audio_gen.predict(audio_gen.transformer, audio_gen.model_input(y, schedule.sigmas[i]),
                                schedule.timesteps[i], conditions)  # fmt: skip
        y = audio_gen.chain_step(y, out, schedule, i, state)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_lora_written_by_mmalign_reloads_through_mmalign(folder, tmp_path):
    """StableAudioPipeline has no ``load_lora_weights`` (no LoRA loader mixin in diffusers 0.42): the file mmalign
    writes (diffusers' LoRA format) reloads through the generator and gives the trained model's outputs."""
    from diffusers import StableAudioPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    assert not hasattr(StableAudioPipeline, "load_lora_weights")
    generator = load_generator(str(folder))
    model = generator.transformer
    model.add_adapter(
        LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=list(generator.lora_targets))
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    metadata = model.peft_config["default"].to_dict()
    save_lora_weights(generator, tmp_path, get_peft_model_state_dict(model), metadata)
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    conditions = generator.encode_conditions(PROMPTS)
    x, t = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(3)), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        trained = generator.predict(model, x, t, conditions)
        fresh = load_generator(str(folder))
        base = fresh.predict(fresh.transformer, x, t, conditions)
        fresh.load_lora_weights(tmp_path)
        reloaded = fresh.predict(fresh.transformer, x, t, conditions)
    assert (trained - base).abs().max() > 1e-3
    torch.testing.assert_close(reloaded, trained, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Trainers
# ----------------------------------------------------------------------------------------------------------
class Loudness:
    """Mean waveform value: a tiny differentiable audio reward (scores audio at any sample rate)."""

    name = "loudness"
    modality = "audio"
    is_differentiable = True

    def to(self, device):
        return self

    def score_tensor(self, audio, prompts, sample_rate=None):
        assert sample_rate == 4000  # told the generator's rate (for_modality)
        return audio.float().mean(dim=(1, 2))


def write_wav(path, seconds, rate, freq, channels=1):
    import soundfile as sf

    time = np.arange(int(seconds * rate)) / rate
    wave = 0.5 * np.sin(2 * np.pi * freq * time)
    sf.write(str(path), np.stack([wave] * channels, axis=1), rate)
    return path.name


@pytest.fixture(scope="module")
def audio_pairs(tmp_path_factory):
    """JSONL audio pairs: wav files of other rates, lengths and channel counts than the model's."""
    root = tmp_path_factory.mktemp("audio_pairs")
    rows = []
    for i, prompt in enumerate(["a dog barks", "a bird sings", "a drum loop"]):
        chosen = write_wav(root / f"c{i}.wav", 0.02, 8000, 300 + 50 * i, channels=1)
        rejected = write_wav(root / f"r{i}.wav", 0.01, 4000, 900, channels=2)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    path = root / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("audio_prompts") / "prompts.txt"
    path.write_text("a dog barks\nrain on a piano loop\n")
    return path


def make(name, folder, data, out, *overrides, reward=None):
    from mmalign.commands.train import resolve_trainer_config

    base = [
        f"trainer={name}", f"model={folder}", f"data={data}", f"output_dir={out}", "batch_size=2",
        "tracker=none", "progress=false", "log_every=1", "max_steps=2", "lora_rank=4", "lr=1e-2",
    ]  # fmt: skip
    cls, config = resolve_trainer_config(None, base + list(overrides))
    return cls(config) if reward is None else cls(config, reward=reward)


def assert_all_changed(trainer):
    before = {k: v.clone() for k, v in trainer._trainable_state().items()}
    summary = trainer.train()
    after = trainer._trainable_state()
    unchanged = sorted(k for k in before if torch.equal(before[k], after[k]))
    assert not unchanged, unchanged
    assert summary["steps"] == 2 and summary["skipped_steps"] == 0
    assert all(math.isfinite(row["loss"]) for row in summary["history"])
    return summary


def test_diffusion_dpo_trains_on_audio_pairs(folder, audio_pairs, tmp_path):
    trainer = make(
        "dpo", folder, audio_pairs, tmp_path, "beta=100", "sample_every=2", "sample_steps=3", "guidance=3.0",
        "validation_prompts=[a dog barks]",
    )  # fmt: skip
    batch = trainer.make_batch(0)
    assert batch["latents_w"].shape == (2, 4, 16)
    timesteps, _ = trainer.draw_noise(batch)
    assert timesteps.is_floating_point() and ((timesteps >= 0) & (timesteps < 1)).all()
    assert_all_changed(trainer)
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    import soundfile as sf

    wav = tmp_path / "samples" / "step-0000002" / "prompt-0.wav"
    data, rate = sf.read(str(wav), always_2d=True)
    assert rate == 4000 and data.shape == (64, 2)


def test_diffusion_dpo_reads_audio_alpaca_parquet(folder, audio_pairs, tmp_path):
    """The same pairs in Audio-Alpaca's layout (parquet, the audio as ``datasets`` structs of encoded bytes): the
    trainer detects it, decodes the bytes at the model's rate and encodes the batch as from the JSONL's files."""
    from tests.data.test_media_pairs import write_audio_alpaca

    rows = []
    for line in audio_pairs.read_text().splitlines():
        row = json.loads(line)
        sides = {k: {"bytes": (audio_pairs.parent / row[k]).read_bytes(), "path": None} for k in ("chosen", "rejected")}
        rows.append({"prompt": row["prompt"], **sides, "strategy": "test"})
    write_audio_alpaca(tmp_path / "alpaca", rows)
    from_files = make("dpo", folder, audio_pairs, tmp_path / "a", "beta=100").make_batch(0)
    from_bytes = make("dpo", folder, tmp_path / "alpaca", tmp_path / "b", "beta=100").make_batch(0)
    assert from_bytes["prompts"] == from_files["prompts"]
    torch.testing.assert_close(from_bytes["latents_w"], from_files["latents_w"])
    torch.testing.assert_close(from_bytes["latents_l"], from_files["latents_l"])


def test_unreadable_audio_is_reported_with_its_line(folder, audio_pairs, tmp_path):
    from mmalign.data import AudioPreferenceDataset, load_preferences

    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF0000WAVEfmt garbage")
    path = audio_pairs.parent / "with_broken.jsonl"
    path.write_text(
        audio_pairs.read_text() + json.dumps({"prompt": "noise", "chosen": str(broken), "rejected": str(broken)}) + "\n"
    )
    pairs = list(load_preferences(path))
    dataset = AudioPreferenceDataset(pairs, 4000, 2)
    item = dataset[3]  # replaced by the next readable pair, and reported
    assert item["index"] == 0 and f"{path} line 4 chosen" in dataset.failed[3]


@pytest.mark.parametrize("name", ["draft", "refl"])
def test_reward_backpropagation_trains(name, folder, prompt_file, tmp_path):
    extra = ["sample_steps=3", "guidance=3.0", "eta=0"] if name == "draft" else ["sample_steps=3", "refl_min_step=1"]
    trainer = make(name, folder, prompt_file, tmp_path, *extra, reward=Loudness())
    assert_all_changed(trainer)


@pytest.mark.parametrize("name", ["ddpo", "d3po"])
def test_ddim_trainers_are_refused(name, folder, prompt_file, tmp_path):
    with pytest.raises(ConfigError, match=rf"{name} does not apply.*v-objective diffusion model.*needs"):
        make(name, folder, prompt_file, tmp_path, reward=Loudness())


@pytest.mark.parametrize("name", ["flow-grpo", "diffusionnft"])
def test_the_grpo_family_trains_it_as_a_flow(name, folder, prompt_file, tmp_path):
    """``mmalign train`` of a GRPO-family trainer on Stable Audio goes through the flow view
    (:class:`~mmalign.models.stable_audio.StableAudioFlowView`): every LoRA parameter changes, and the LoRA is saved
    for the Stable Audio pipeline."""
    from mmalign.models.stable_audio import StableAudioFlowView

    extra = ["sample_steps=3", "group_size=2", "sample_batches=1", "checkpoint_every=2"]
    trainer = make(name, folder, prompt_file, tmp_path, *extra, reward=Loudness())
    assert isinstance(trainer.policy, StableAudioFlowView) and trainer.policy.parametrisation == "flow"
    assert_all_changed(trainer)
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()


def test_image_rewards_are_refused_on_audio(folder, prompt_file, tmp_path):
    from tests.trainers.conftest import Brightness

    with pytest.raises(ConfigError, match="reward brightness scores images; the generator makes audio"):
        make("draft", folder, prompt_file, tmp_path, "sample_steps=2", "eta=0", reward=Brightness())


def test_duration_and_eta_options(folder, prompt_file, tmp_path):
    trainer = make("draft", folder, prompt_file, tmp_path, "duration=0.01", "eta=0", reward=Loudness())
    assert trainer.policy.audio_end_in_s == 0.01 and trainer.policy.num_samples == 40
    with pytest.raises(ConfigError, match="duration=1.0"):
        make("draft", folder, prompt_file, tmp_path, "duration=1.0", "eta=0", reward=Loudness())
    with pytest.raises(ConfigError, match="eta=0.5"):
        make("draft", folder, prompt_file, tmp_path, "eta=0.5", reward=Loudness())


def test_conditions_round_trip(audio_gen, tmp_path):
    conditions = audio_gen.encode_conditions(PROMPTS)
    loaded = Conditions.load(conditions.save(tmp_path / "c.safetensors"))
    assert list(loaded.tensors) == ["encoder_hidden_states", "global_hidden_states"]
    assert all(torch.equal(loaded[k], conditions[k]) for k in conditions.tensors)
