"""CLAP on a tiny ClapModel saved in the transformers layout: scores are the cosine of independently computed
text and audio embeddings; deterministic windows; the differentiable torch log-mel matches the extractor."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import soundfile as sf
import torch

import mmalign
from mmalign.modalities.audio import pad_to
from mmalign.rewards.clap import ClapReward
from tests.modalities.tiny_media import make_clap_model, sine

PROMPT = "a dog barking"


@pytest.fixture(scope="module")
def clap_dir(tmp_path_factory):
    return make_clap_model(tmp_path_factory.mktemp("clap"))


@pytest.fixture(scope="module")
def clap(clap_dir):
    return mmalign.load_reward("clap", weights=str(clap_dir))


@functools.cache
def _reference_parts(folder: str):
    from transformers import AutoTokenizer, ClapFeatureExtractor, ClapModel

    model = ClapModel.from_pretrained(folder).eval()
    return model, AutoTokenizer.from_pretrained(folder), ClapFeatureExtractor.from_pretrained(folder)


def independent_cosine(folder, waves: list[np.ndarray], prompt: str) -> list[float]:
    """transformers' documented usage: processor features -> get_audio_features / get_text_features."""
    model, tokenizer, extractor = _reference_parts(str(folder))
    out = []
    with torch.no_grad():
        text = model.get_text_features(**tokenizer([prompt], return_tensors="pt")).pooler_output
        for wave in waves:
            inputs = extractor(wave, sampling_rate=48000, return_tensors="pt")
            audio = model.get_audio_features(**inputs).pooler_output
            out.append(torch.nn.functional.cosine_similarity(text, audio).item())
    return out


def test_tiny_tokenizer_is_complete(clap):
    assert len(clap.tokenizer) == 269
    ids = clap.tokenizer(" a dog")["input_ids"]
    assert ids[0] == 0 and ids[-1] == 2 and len(ids) == 4  # <s> Ġa Ġdog </s>


def test_file_score_is_cosine_of_independent_embeddings(clap, clap_dir, tmp_path):
    wave = sine(440, 3.0, 48000, amplitude=0.3)[0] + 0.05 * np.random.default_rng(0).standard_normal(144000)
    wave = wave.astype(np.float32)
    path = tmp_path / "bark.wav"
    sf.write(path, wave, 48000)
    result = clap.score_audio([path], PROMPT)[0]
    expected = independent_cosine(clap_dir, [wave.astype(np.float64)], PROMPT)[0]
    assert result.total == pytest.approx(expected, abs=1e-5)
    assert result.units == pytest.approx([expected], abs=1e-5) and result.positions == [0.0]
    assert clap.score(path, PROMPT).item() == pytest.approx(expected, abs=1e-5)
    assert clap.info()["modality"] == "audio" and clap.variant == "center/10s/mean"


def test_long_track_windows_cover_and_center(clap, clap_dir, tmp_path):
    rng = np.random.default_rng(1)
    wave = (0.2 * rng.standard_normal(48000 * 25)).astype(np.float32)
    path = tmp_path / "song.flac"
    sf.write(path, wave, 48000)  # 16-bit FLAC; the stored values are read back below
    stored = sf.read(path, dtype="float32")[0].astype(np.float64)
    music = clap.with_windows("cover")
    result = music.score_audio([path], PROMPT)[0]
    starts = [0, 360000, 720000]  # round(linspace(0, 25 s - 10 s, 3)) at 48 kHz
    assert result.positions == pytest.approx([s / 48000 for s in starts])
    expected = independent_cosine(clap_dir, [stored[s : s + 480000] for s in starts], PROMPT)
    assert result.units == pytest.approx(expected, abs=1e-5)
    assert result.total == pytest.approx(np.mean(expected), abs=1e-5)
    centre = clap.score_audio([path], PROMPT)[0]
    assert centre.positions == [7.5] and centre.units == pytest.approx([expected[1]], abs=1e-5)
    low = clap.with_windows("cover", aggregate="min").score_audio([path], PROMPT)[0]
    assert low.total == pytest.approx(min(expected), abs=1e-5)
    short = clap.with_windows("cover", window_seconds=5.0).score_audio([path], PROMPT)[0]
    assert len(short.units) == 5  # ceil(20 / 5) + 1 windows of 5 s, each repeat-padded to 10 s
    assert clap.windows == "center"  # views never change the shared reward
    with pytest.raises(ValueError, match="window_seconds"):
        clap.with_windows(window_seconds=12.0)


def test_tensor_path_matches_extractor_and_is_differentiable(clap, clap_dir):
    rng = np.random.default_rng(2)
    wave = (0.3 * rng.standard_normal(48000 * 2)).astype(np.float32)
    padded = pad_to(torch.from_numpy(wave).double(), 480000).numpy()
    with torch.no_grad():
        ours = clap.log_mel(torch.from_numpy(padded).float()[None])
    reference = clap.feature_extractor(wave.astype(np.float64), sampling_rate=48000, return_tensors="pt")
    assert ours.shape == reference["input_features"].shape
    torch.testing.assert_close(ours, reference["input_features"], atol=1e-4, rtol=1e-5)
    stereo = torch.from_numpy(np.stack([wave, wave]))[None].requires_grad_(True)
    score = clap.score_tensor(stereo, PROMPT)
    expected = independent_cosine(clap_dir, [wave.astype(np.float64)], PROMPT)[0]
    assert score.item() == pytest.approx(expected, abs=1e-4)
    score.sum().backward()
    assert stereo.grad is not None and stereo.grad.abs().sum() > 0
    # another rate: resampled in torch first
    at_16k = clap.score_tensor(torch.from_numpy(sine(300, 1.0, 16000))[None], PROMPT, sample_rate=16000)
    assert at_16k.shape == (1,) and torch.isfinite(at_16k).all()


def test_text_cache_and_batching(clap, tmp_path):
    paths = []
    for n, freq in enumerate([220, 330, 440]):
        paths.append(tmp_path / f"t{n}.wav")
        sf.write(paths[-1], sine(freq, 1.5, 22050)[0], 22050)
    one_by_one = [clap.score_audio([p], "a cat", batch_size=1)[0].total for p in paths]
    batched = [r.total for r in clap.score_audio(paths, "a cat", batch_size=8)]
    assert batched == pytest.approx(one_by_one, abs=1e-5)
    assert "a cat" in clap._text_cache


def test_fused_model_is_deterministic(tmp_path):
    folder = make_clap_model(tmp_path / "fused", seed=3, fusion=True)
    reward = ClapReward.from_pretrained(str(folder))
    assert reward.fusion
    wave = sine(500, 2.0, 48000)[0].astype(np.float64)
    path = tmp_path / "x.wav"
    sf.write(path, wave, 48000, subtype="DOUBLE")
    first = reward.score_audio([path], PROMPT)[0].total
    assert reward.score_audio([path], PROMPT)[0].total == first
    assert first == pytest.approx(independent_cosine(folder, [wave], PROMPT)[0], abs=1e-5)
    tensor = reward.score_tensor(torch.from_numpy(wave).float()[None, None], PROMPT)
    assert tensor.item() == pytest.approx(first, abs=1e-4)
