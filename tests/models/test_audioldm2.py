"""AudioLDM 2 (AudioLDM2Pipeline) behind the UNet policy, on a tiny random pipeline of the real classes saved with
``save_pretrained`` and loaded back: prompt encoding equal to the pipeline's ``encode_prompt``, DDIM sampling and
decoding equal to the pipeline's (``output_type="latent"``, ``"pt"``, ``"np"``), mono audio of the documented shape
and range, LoRA files that load into diffusers' pipeline, and the online trainers (DRaFT, DDPO) on an audio reward,
with an exact resume; offline audio pairs encoded through the reference's waveform -> log-mel front end (tested
against its formula) for the DPO family."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mmalign.errors import ConfigError
from mmalign.models.generator import load_generator, parametrisation_of, save_lora_weights
from tests import tiny

PROMPTS = ["a dog barks", "rain on a piano loop"]

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # the tiny vocoder's 8 mel bins over a 16-point FFT leave some filters empty (not so at real sizes)
    pytest.mark.filterwarnings("ignore:At least one mel filter has all zero values"),
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny.make_audioldm2_pipeline(tmp_path_factory.mktemp("audioldm2") / "pipe", seed=0)


@pytest.fixture(scope="module")
def policy(folder):
    return load_generator(str(folder))


@pytest.fixture(scope="module")
def pipe(folder):
    from diffusers import AudioLDM2Pipeline

    pipe = AudioLDM2Pipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_loads_as_a_unet_audio_policy(policy, folder):
    assert type(policy).__name__ == "AudioLDM2Policy" and parametrisation_of(folder) == "diffusion"
    assert policy.modality == "audio" and policy.family == "audioldm2" and policy.prediction_type == "epsilon"
    assert policy.sample_rate == 16000 and policy.hop_length == 4 and policy.max_new_tokens == 8
    assert policy.audio_length_in_s == pytest.approx(0.004) and policy.num_samples == 64
    assert policy.latent_shape() == (4, 8, 4)
    assert type(policy.unet).__name__ == "AudioLDM2UNet2DConditionModel" and hasattr(policy.unet, "add_adapter")


def test_prompt_encoding_equals_the_pipeline(policy, pipe):
    """Each prompt alone: the GPT-2 states and the (unpadded part of the) T5 states and mask are the pipeline's;
    the unconditional branch is the empty prompt's, as the pipeline's negative branch for a one-token prompt."""
    ours = policy.encode_prompt(PROMPTS)
    assert ours.hidden.shape == (2, 8, 16) and ours.extra["text_embeds"].shape == (2, 12, 32)
    for i, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            text, mask, generated = pipe.encode_prompt(prompt, "cpu", 1, False)
        length = text.shape[1]
        torch.testing.assert_close(ours.hidden[i : i + 1], generated, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ours.extra["text_embeds"][i : i + 1, :length], text, atol=1e-6, rtol=1e-5)
        assert torch.equal(ours.extra["attention_mask"][i : i + 1, :length], mask)
        assert not ours.extra["attention_mask"][i, length:].any() and not ours.extra["text_embeds"][i, length:].any()
    with torch.no_grad():
        text, mask, generated = pipe.encode_prompt([""], "cpu", 1, True)  # the empty prompt: one T5 token
    empty = policy.empty_prompt()
    torch.testing.assert_close(empty.hidden, generated[:1], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(empty.extra["text_embeds"][:, :1], text[:1], atol=1e-6, rtol=1e-5)


def pipeline_inputs(policy, embeds, guidance):
    kwargs = dict(
        prompt_embeds=embeds.extra["text_embeds"],
        attention_mask=embeds.extra["attention_mask"],
        generated_prompt_embeds=embeds.hidden,
    )
    if guidance > 1.0:
        empty = policy.empty_prompt().repeat(len(embeds.hidden))
        kwargs.update(
            negative_prompt_embeds=empty.extra["text_embeds"],
            negative_attention_mask=empty.extra["attention_mask"],
            negative_generated_prompt_embeds=empty.hidden,
        )
    return kwargs


@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_ddim_sampling_and_decoding_equal_the_pipeline(policy, pipe, guidance):
    """η = 0 DDIM with the folder's scheduler on the same x_T and embeddings: the pipeline's latents, and its
    waveforms (``"pt"`` and ``"np"``) as the decoded mono audio ``[B, 1, S]``."""
    embeds = policy.encode_prompt(PROMPTS)
    x_T = torch.randn((2, 4, 8, 4), generator=torch.Generator().manual_seed(1))
    kwargs = dict(num_inference_steps=4, guidance_scale=guidance, **pipeline_inputs(policy, embeds, guidance))
    expected = pipe(latents=x_T.clone(), output_type="latent", **kwargs).audios
    ours = policy.sample(embeds, steps=4, guidance=guidance, latents=x_T.clone())
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)
    audio = policy.decode(ours)
    assert audio.shape == (2, 1, policy.num_samples) and audio.dtype == torch.float32
    assert audio.abs().max() <= 1.0
    waveforms = pipe(latents=x_T.clone(), output_type="pt", **kwargs).audios
    torch.testing.assert_close(audio[:, 0], waveforms.clamp(-1, 1), atol=1e-6, rtol=1e-5)
    if guidance == 1.0:
        array = pipe(latents=x_T.clone(), output_type="np", **kwargs).audios
        np.testing.assert_allclose(audio[:, 0].numpy(), np.clip(array, -1, 1), atol=1e-6)


def test_duration_sets_the_latent_rows_and_the_crop(folder):
    policy = load_generator(str(folder), audio_length_in_s=0.005)  # 20 mel frames -> 20 (multiple of 2)
    assert policy.latent_shape() == (4, 10, 4) and policy.num_samples == 80
    latents = torch.randn(1, 4, 10, 4, requires_grad=True)
    audio = policy.decode(latents, grad=True)
    assert audio.shape == (1, 1, 80) and audio.abs().max() <= 1
    audio.sum().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="at least"):
        policy.audio_end_in_s = 0.0001
    from mmalign.models.generator import configure_output

    assert configure_output(policy, duration=0.003) is policy  # the trainers' duration= option
    assert policy.audio_length_in_s == 0.003 and policy.latent_shape() == (4, 6, 4) and policy.num_samples == 48
    with pytest.raises(ConfigError, match="duration=0.0001"):
        configure_output(policy, duration=0.0001)
    with pytest.raises(ValueError, match=r"\[B, C, T', M'\]"):
        policy.decode(torch.randn(1, 4, 8))


def test_lora_loads_into_the_diffusers_pipeline(folder, policy, tmp_path):
    """AudioLDM2Pipeline has no ``load_lora_weights``: the file mmalign writes (diffusers' LoRA format, ``unet.``
    keys) loads into a diffusers pipeline's UNet (``load_lora_into_unet``) and gives the trained UNet's output."""
    from diffusers import AudioLDM2Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from mmalign.models.audioldm2 import load_lora_into_unet

    assert not hasattr(AudioLDM2Pipeline, "load_lora_weights")
    trained = load_generator(str(folder))
    unet = trained.unet
    targets = list(trained.lora_targets)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=targets))
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    save_lora_weights(trained, tmp_path, get_peft_model_state_dict(unet), unet.peft_config["default"].to_dict())
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    embeds = policy.encode_prompt(PROMPTS)
    x, t = torch.randn(2, 4, 8, 4, generator=torch.Generator().manual_seed(3)), torch.tensor([10, 700])
    pipe = AudioLDM2Pipeline.from_pretrained(str(folder))
    with torch.no_grad():
        expected = trained.predict(unet, x, t, embeds)
        base = policy.predict(pipe.unet, x, t, embeds)
        load_lora_into_unet(pipe.unet, tmp_path)
        reloaded = policy.predict(pipe.unet, x, t, embeds)
    assert (expected - base).abs().max() > 1e-3
    torch.testing.assert_close(reloaded, expected, atol=1e-6, rtol=1e-5)


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
        assert sample_rate == 16000 and audio.shape[1:] == (1, 64)  # the vocoder's rate, mono, cropped
        return audio.float().mean(dim=(1, 2)) * 100


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


def test_reward_gradient_reaches_every_lora_parameter(folder, prompt_file, tmp_path):
    """One DRaFT loss (a 2-step η = 0 chain with CFG, decoded to audio, scored) backpropagated: every LoRA ``B``
    matrix of the UNet gets a non-zero gradient (the ``A`` ones get none while ``B`` is peft's zero init: they
    change from the second step on, see the next test)."""
    trainer = make("draft", folder, prompt_file, tmp_path, "sample_steps=2", "guidance=2.0", "eta=0", reward=Loudness())
    trainer.compute_loss(trainer.make_batch(0)).loss.backward()
    grads = {n: p.grad for n, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters() if "lora_B" in n}
    # q/k/v/out of attn1 and attn2 in each of an attention block's 3 transformers (self, GPT-2 and T5 attention);
    # 4 attention blocks (down, mid, 2 up)
    assert len(grads) == 4 * 2 * 3 * 4
    dead = [n for n, g in grads.items() if g is None or not g.abs().sum() > 0]
    assert not dead, dead


@pytest.mark.parametrize("name", ["draft", "ddpo", "refl", "alignprop", "d3po"])
def test_online_trainers_change_every_lora_parameter(name, folder, prompt_file, tmp_path):
    extra = {
        "draft": ["eta=0"],
        "ddpo": ["eta=1.0"],
        "refl": ["refl_min_step=1", "gradient_checkpointing=true"],  # diffusers' block checkpointing, repaired
        "alignprop": ["eta=0"],
        "d3po": ["eta=1.0"],
    }[name] + ["sample_steps=2", "guidance=2.0"]
    trainer = make(name, folder, prompt_file, tmp_path, *extra, "sample_every=2", "validation_prompts=[a dog barks]",
                   reward=Loudness())  # fmt: skip
    assert_all_changed(trainer)
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    import soundfile as sf

    data, rate = sf.read(str(tmp_path / "samples" / "step-0000002" / "prompt-0.wav"), always_2d=True)
    assert rate == 16000 and data.shape == (64, 1)


def test_draft_resumes_exactly(folder, prompt_file, tmp_path, monkeypatch):
    from tests.trainers.conftest import interrupt_then_resume

    def build(out, *extra):
        common = ["max_steps=3", "checkpoint_every=2", "sample_steps=2", "guidance=2.0", "eta=0", *extra]
        return make("draft", folder, prompt_file, out, *common, reward=Loudness())

    full, resumed = interrupt_then_resume(build, tmp_path, monkeypatch)
    expected, got = full._trainable_state(), resumed._trainable_state()
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_image_rewards_are_refused(folder, prompt_file, tmp_path):
    from tests.trainers.conftest import Brightness

    with pytest.raises(ConfigError, match="reward brightness scores images; the generator makes audio"):
        make("draft", folder, prompt_file, tmp_path, "sample_steps=2", "eta=0", reward=Brightness())


def slaney_filters(rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """librosa's ``filters.mel`` defaults written out: the Slaney mel scale (linear, 200/3 Hz per mel, below 1 kHz;
    logarithmic, ln(6.4)/27 per mel, above), triangles between ``n_mels + 2`` equally spaced mel points over the
    FFT bin frequencies, each scaled by ``2 / (upper − lower)`` Hz (equal area)."""

    def to_mel(hz):
        hz = np.asarray(hz, dtype=np.float64)
        linear = hz / (200.0 / 3)
        return np.where(hz >= 1000.0, 15.0 + np.log(np.maximum(hz, 1e-9) / 1000.0) / (np.log(6.4) / 27), linear)

    def to_hz(mel):
        mel = np.asarray(mel, dtype=np.float64)
        return np.where(mel >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27) * (mel - 15.0)), mel * 200.0 / 3)

    points = to_hz(np.linspace(to_mel(fmin), to_mel(fmax), n_mels + 2))
    bins = np.linspace(0, rate / 2, n_fft // 2 + 1)
    filters = np.zeros((n_mels, len(bins)))
    for m in range(n_mels):
        lower, centre, upper = points[m], points[m + 1], points[m + 2]
        rising = (bins - lower) / (centre - lower)
        falling = (upper - bins) / (upper - centre)
        filters[m] = np.maximum(0, np.minimum(rising, falling)) * 2.0 / (upper - lower)
    return filters


def reference_log_mel(wave: np.ndarray, rate: int, n_fft: int, hop: int, n_mels: int, fmax: float) -> np.ndarray:
    """The AudioLDM front end from its formula, one frame at a time: reflect-pad by n_fft / 2, periodic Hann,
    |DFT| of each hop, Slaney mel, log(max(·, 1e-5)); ``[frames, n_mels]``."""
    padded = np.pad(wave.astype(np.float64), n_fft // 2, mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    frames = 1 + (len(padded) - n_fft) // hop
    k = np.arange(n_fft // 2 + 1)[:, None]
    basis = np.exp(-2j * np.pi * k * np.arange(n_fft)[None] / n_fft)
    magnitude = np.stack([np.abs(basis @ (padded[i * hop : i * hop + n_fft] * window)) for i in range(frames)], 1)
    mel = slaney_filters(rate, n_fft, n_mels, 0.0, fmax) @ magnitude
    return np.log(np.maximum(mel, 1e-5)).T


def test_mel_settings_are_the_published_ones():
    """From the vocoder config alone: AudioLDM 2's 16 kHz front end (n_fft 1024, hop 160, 64 bins, 0-8 kHz) and
    AudioLDM 48k's (2048, 480, 256 bins, 0-24 kHz), as the reference training configs give them."""
    from types import SimpleNamespace

    from mmalign.models.audioldm_mel import MelSettings, mel_settings_for

    audioldm2 = SimpleNamespace(sampling_rate=16000, upsample_rates=[5, 4, 2, 2, 2], model_in_dim=64)
    assert mel_settings_for(audioldm2) == MelSettings(16000, 1024, 160, 1024, 64, 0.0, 8000.0)
    audioldm_48k = SimpleNamespace(sampling_rate=48000, upsample_rates=[6, 5, 4, 2, 2], model_in_dim=256)
    assert mel_settings_for(audioldm_48k) == MelSettings(48000, 2048, 480, 2048, 256, 0.0, 24000.0)


def test_log_mel_equals_the_published_front_end():
    """At AudioLDM 2's settings, on noise plus a 440 Hz tone: the torch front end equals the formula computed frame
    by frame in float64 (1e-4 in log units, where the mel energy is above the floor), and the tone's mel bin is
    the loudest."""
    from mmalign.models.audioldm_mel import MelSettings, audioldm_log_mel

    settings = MelSettings(16000, 1024, 160, 1024, 64, 0.0, 8000.0)
    rng = np.random.default_rng(0)
    wave = 0.3 * np.sin(2 * np.pi * 440 * np.arange(3200) / 16000) + 0.01 * rng.standard_normal(3200)
    got = audioldm_log_mel(torch.tensor(wave, dtype=torch.float32)[None], settings, frames=20)
    assert got.shape == (1, 1, 20, 64)
    expected = reference_log_mel(wave, 16000, 1024, 160, 64, 8000.0)[:20]
    np.testing.assert_allclose(got[0, 0].double().numpy(), expected, atol=1e-4, rtol=0)
    filters = slaney_filters(16000, 1024, 64, 0, 8000)
    centre_hz = filters @ np.linspace(0, 8000, 513) / filters.sum(1)
    assert abs(centre_hz[int(got[0, 0, 10].argmax())] - 440) < 60
    # frames beyond the clip see silence: the floor
    padded = audioldm_log_mel(torch.zeros(1, 100), settings, frames=4)
    torch.testing.assert_close(padded, torch.full_like(padded, math.log(1e-5)), atol=1e-6, rtol=0)


def test_offline_audio_is_encoded_through_the_mel_front_end(policy):
    """``latent_distribution``: channels averaged, peak-normalised to 0.5 (so loudness does not change the latent),
    padded or cropped to the sample's length, the reference's log-mel, the VAE posterior of the latent shape."""
    from mmalign.models.audioldm_mel import audioldm_log_mel, normalize_waveform

    rng = torch.Generator().manual_seed(0)
    audio = torch.rand(2, 2, 50, generator=rng) - 0.5  # stereo, shorter than the 64 samples of a tiny sample
    mean, std = policy.latent_distribution(audio)
    assert mean.shape == std.shape == (2, *policy.latent_shape())
    mono = torch.nn.functional.pad(normalize_waveform(audio.mean(1)), (0, 14))
    mel = audioldm_log_mel(mono, policy.mel_settings, policy.mel_frames)
    expected = policy.vae.encode(mel).latent_dist
    torch.testing.assert_close(mean, expected.mean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(std, expected.std, atol=1e-6, rtol=1e-5)
    louder, _ = policy.latent_distribution(3 * audio)
    torch.testing.assert_close(louder, mean, atol=1e-5, rtol=1e-4)
    longer, _ = policy.latent_distribution(torch.cat([audio, audio, audio], -1))
    assert longer.shape == mean.shape


@pytest.mark.parametrize("name", ["dpo", "sft"])
def test_offline_trainers_change_every_lora_parameter_on_audio_pairs(name, folder, tmp_path):
    """Diffusion-DPO and SFT on a JSONL of wav pairs of another rate, length and channel count than the model's."""
    import soundfile as sf

    from tests.modalities.tiny_media import sine

    rows = []
    for i, prompt in enumerate(PROMPTS):
        sf.write(str(tmp_path / f"c{i}.wav"), sine(300 + 100 * i, 0.01, 8000).T, 8000)
        sf.write(str(tmp_path / f"r{i}.wav"), sine(2000, 0.002, 22050, channels=2).T, 22050)
        rows.append({"prompt": prompt, "chosen": f"c{i}.wav", "rejected": f"r{i}.wav"})
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    trainer = make(name, folder, pairs, tmp_path / "out", "beta=100")
    assert trainer.make_batch(0)["latents_w"].shape == (2, *trainer.policy.latent_shape())
    assert_all_changed(trainer)


def test_label_samples_scores_and_writes_mono_wavs(policy, tmp_path):
    """``mmalign label``'s sampler (DDIM η = 0 from candidate seeds) is the policy's sampler, and the K samples are
    written as 16 kHz mono WAVs, scored as read back."""
    from mmalign.commands.label import label
    from mmalign.modalities.audio import read_audio
    from mmalign.models.noise_opt import NoiseSampler, initial_noise
    from mmalign.trainers.online import WeightedReward

    sampler = NoiseSampler(policy, 3, 2.5, 0)
    x_T = initial_noise(sampler.latent_shape, [5, 6])
    expected = policy.sample(policy.encode_prompt(["a dog barks"] * 2), steps=3, guidance=2.5, latents=x_T)
    torch.testing.assert_close(sampler.latents(x_T, "a dog barks"), expected, atol=1e-6, rtol=1e-5)
    out = tmp_path / "labels"
    summary = label(policy, WeightedReward([Loudness()], [1.0]), ["a dog barks"], 3, out, steps=2, guidance=2.5)
    assert summary == {"prompts": 1, "images": 3, "pairs": 3}
    row = json.loads((out / "rankings.jsonl").read_text())
    waves = [read_audio(out / name) for name in row["images"]]
    assert all(rate == 16000 and wave.shape == (1, 64) for wave, rate in waves)
    assert row["scores"] == pytest.approx([float(np.mean(wave)) * 100 for wave, _ in waves], abs=1e-5)


def test_saved_pipeline_reloads_with_its_duration(folder, tmp_path):
    """A full fine-tuning's output: :meth:`save_pipeline` writes an ``AudioLDM2Pipeline`` folder (and the duration
    when it is not the default) that diffusers and ``load_generator`` load back."""
    from diffusers import AudioLDM2Pipeline

    policy = load_generator(str(folder), audio_length_in_s=0.005)
    policy.save_pipeline(tmp_path / "saved")
    again = load_generator(str(tmp_path / "saved"))
    assert again.audio_length_in_s == 0.005 and again.latent_shape() == (4, 10, 4)
    assert (
        type(AudioLDM2Pipeline.from_pretrained(str(tmp_path / "saved")).unet).__name__
        == "AudioLDM2UNet2DConditionModel"
    )
    for name, tensor in policy.unet.state_dict().items():
        assert torch.equal(again.unet.state_dict()[name], tensor), name
