"""Audiobox Aesthetics on a tiny random model saved in both published layouts (hub folder, release
checkpoint.pt) and loaded through the real loader: scores equal an independent plain-torch re-derivation from the
state dict; the package's 10 s chunking and length weighting; resampling and mono mixing; gradients; strict keys;
registry names; ``mmalign score`` on a WAV folder; the trainers' audio adapter."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import mmalign
from mmalign.errors import StateDictMismatchError, UnsafeCheckpointError, WeightsError
from mmalign.modalities.audio import Audio, resample
from mmalign.rewards.audiobox import AXES, chunk_bounds
from tests.tiny import make_audiobox_model

RATE = 16_000
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_audiobox_model(tmp_path_factory.mktemp("audiobox"), seed=0)


@pytest.fixture(scope="module")
def reward(folder):
    return mmalign.load_reward("audiobox-aesthetics", weights=str(folder))


def noise_tone(seconds: float, rate: int, channels: int = 1, seed: int = 0, freq: float = 330.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * rate)) / rate
    rows = [0.3 * np.sin(2 * np.pi * freq * (c + 1) * t) + 0.1 * rng.standard_normal(t.size) for c in range(channels)]
    return np.stack(rows).astype(np.float32)


# -- an independent re-derivation: the fairseq WavLM computation written out from the state dict ------------------
def _bucket(offset: int, num_buckets: int, max_distance: int) -> int:
    half = num_buckets // 2
    bucket = half if offset > 0 else 0
    distance, exact = abs(offset), half // 2
    if distance < exact:
        return bucket + distance
    large = exact + int(math.log(distance / exact) / math.log(max_distance / exact) * (half - exact))
    return bucket + min(large, half - 1)


def independent_chunk(sd: dict, cfg: dict, chunk: torch.Tensor, valid: int) -> dict[str, float]:
    """One zero-padded 10 s chunk ``[S]`` with ``valid`` real samples -> the four de-normalised axis scores."""
    wavlm = cfg["wavlm"]
    p = "wavlm_model."
    layers = eval(wavlm["conv_feature_layers"])  # noqa: S307 - the test's own constant
    x = chunk[None, None].float()
    for i, (_, _, stride) in enumerate(layers):
        x = F.conv1d(x, sd[f"{p}feature_extractor.conv_layers.{i}.0.weight"].float(), stride=stride)
        if i == 0:
            w, b = sd[f"{p}feature_extractor.conv_layers.0.2.weight"], sd[f"{p}feature_extractor.conv_layers.0.2.bias"]
            mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
            x = (x - mean) / torch.sqrt(var + 1e-5) * w.float()[:, None] + b.float()[:, None]
        x = 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
    x = x[0].T  # [T, 16]
    frames = x.shape[0]
    x = F.layer_norm(x, x.shape[-1:], sd[f"{p}layer_norm.weight"].float(), sd[f"{p}layer_norm.bias"].float())
    x = x @ sd[f"{p}post_extract_proj.weight"].float().T + sd[f"{p}post_extract_proj.bias"].float()
    run = chunk.shape[0] // frames  # samples per frame, trailing remainder dropped
    padded = torch.tensor([t * run >= valid for t in range(frames)])
    x = torch.where(padded[:, None], torch.zeros_like(x), x)
    g, v = sd[f"{p}encoder.pos_conv.0.weight_g"].float(), sd[f"{p}encoder.pos_conv.0.weight_v"].float()
    weight = g * v / v.norm(dim=(0, 1), keepdim=True)
    k = wavlm["conv_pos"]
    conv = F.conv1d(
        x.T[None], weight, sd[f"{p}encoder.pos_conv.0.bias"].float(), padding=k // 2, groups=wavlm["conv_pos_groups"]
    )
    conv = conv[0, :, :frames].T
    x = x + 0.5 * conv * (1 + torch.erf(conv / math.sqrt(2)))

    def ln(t, name):
        return F.layer_norm(t, t.shape[-1:], sd[name + ".weight"].float(), sd[name + ".bias"].float())

    def lin(t, name):
        return t @ sd[name + ".weight"].float().T + sd[name + ".bias"].float()

    x = ln(x, f"{p}encoder.layer_norm")
    heads = wavlm["encoder_attention_heads"]
    dim = x.shape[-1]
    hd = dim // heads
    table = sd[f"{p}encoder.layers.0.self_attn.relative_attention_bias.weight"].float()
    by_offset = {d: _bucket(d, wavlm["num_buckets"], wavlm["max_distance"]) for d in range(-frames + 1, frames)}
    buckets = torch.tensor([[by_offset[j - i] for j in range(frames)] for i in range(frames)])
    bias = table[buckets].permute(2, 0, 1)  # [H, T, T]
    states = [x]
    for n in range(wavlm["encoder_layers"]):
        a = f"{p}encoder.layers.{n}.self_attn"
        q = lin(x, a + ".q_proj").view(frames, heads, hd).transpose(0, 1) / math.sqrt(hd)
        kk = lin(x, a + ".k_proj").view(frames, heads, hd).transpose(0, 1)
        vv = lin(x, a + ".v_proj").view(frames, heads, hd).transpose(0, 1)
        gates = torch.sigmoid(
            lin(x.view(frames, heads, hd).transpose(0, 1), a + ".grep_linear").view(heads, frames, 2, 4).sum(-1)
        )
        gate = gates[..., :1] * (gates[..., 1:] * sd[a + ".grep_a"].float()[0] - 1.0) + 2.0
        logits = q @ kk.transpose(1, 2) + gate * bias
        logits = logits.masked_fill(padded[None, None, :], float("-inf"))
        attn = (torch.softmax(logits, -1) @ vv).transpose(0, 1).reshape(frames, dim)
        x = ln(x + lin(attn, a + ".out_proj"), f"{p}encoder.layers.{n}.self_attn_layer_norm")
        h = lin(x, f"{p}encoder.layers.{n}.fc1")
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
        x = ln(x + lin(h, f"{p}encoder.layers.{n}.fc2"), f"{p}encoder.layers.{n}.final_layer_norm")
        states.append(x)
    out = {}
    for axis in AXES:
        mix = torch.softmax(sd[f"layer_weights.{axis}"].float(), 0)
        embed = sum(w * s for w, s in zip(mix, states))[~padded].mean(0)
        embed = embed / embed.norm()
        raw = (embed @ sd[f"proj_layer.{axis}.0.weight"].float().T + sd[f"proj_layer.{axis}.0.bias"].float()).item()
        out[axis] = raw * cfg["target_transform"][axis]["std"] + cfg["target_transform"][axis]["mean"]
    return out


def independent_scores(folder, wave: np.ndarray) -> tuple[dict[str, float], list[dict[str, float]], list[float]]:
    """The package's rule written out: 10 s chunks every 10 s from 0, zero-padded, weighted by valid length."""
    sd = load_file(str(folder / "model.safetensors"))
    cfg = json.loads((folder / "config.json").read_text())
    chunks, weights = [], []
    with torch.no_grad():
        for start in range(0, wave.shape[-1], 10 * RATE):
            piece = torch.from_numpy(wave[start : start + 10 * RATE]).float()
            valid = piece.shape[0]
            piece = torch.cat([piece, torch.zeros(10 * RATE - valid)])
            chunks.append(independent_chunk(sd, cfg, piece, valid))
            weights.append(valid / (10 * RATE))
    totals = {a: sum(c[a] * w for c, w in zip(chunks, weights)) / sum(weights) for a in AXES}
    return totals, chunks, weights


# -- tests ---------------------------------------------------------------------------------------------------------
def test_scores_equal_independent_derivation(reward, folder):
    long = noise_tone(13.0, RATE, seed=1)[0]  # chunks of 10 and 3 s
    short = noise_tone(4.0, RATE, seed=2, freq=523.0)[0]
    results = reward.score_audio([Audio(torch.from_numpy(w)[None], RATE) for w in (long, short)])
    for wave, result in zip((long, short), results):
        totals, chunks, weights = independent_scores(folder, wave)
        assert result.extra["axes"] == pytest.approx(totals, abs=1e-5)
        assert result.total == pytest.approx(np.mean([totals[a] for a in ("CE", "CU", "PQ")]), abs=1e-5)
        assert result.weights == pytest.approx(weights)
        assert result.positions == [10 * n for n in range(len(chunks))]
        assert result.units == pytest.approx([np.mean([c[a] for a in ("CE", "CU", "PQ")]) for c in chunks], abs=1e-5)
    assert results[0].weights == pytest.approx([1.0, 0.3])
    spread = max(abs(results[0].extra["axes"][a] - results[1].extra["axes"][a]) for a in AXES)
    assert spread > 1e-3  # the tiny model tells the two clips apart, so the comparison means something
    # the tensor path gives the same numbers
    axes = reward.score_axes(torch.from_numpy(short)[None, None])
    assert {a: v.item() for a, v in axes.items()} == pytest.approx(results[1].extra["axes"], abs=1e-5)


def test_chunking_rule():
    chunk = 10 * RATE
    assert chunk_bounds(25 * RATE) == [(0, chunk), (chunk, chunk), (2 * chunk, 5 * RATE)]
    assert chunk_bounds(20 * RATE) == [(0, chunk), (chunk, chunk)]  # no empty third chunk
    assert chunk_bounds(20 * RATE + 1) == [(0, chunk), (chunk, chunk), (2 * chunk, 1)]
    assert chunk_bounds(7) == [(0, 7)]
    with pytest.raises(ValueError):
        chunk_bounds(0)


def test_resampling_mono_and_files(reward, tmp_path):
    stereo = noise_tone(3.0, 44_100, channels=2, seed=3)
    tensor = torch.from_numpy(stereo)[None]
    batch = reward.score_tensor(torch.cat([tensor, tensor.flip(-1)]), sample_rate=44_100)
    ours = batch[:1]
    assert batch[0].item() != batch[1].item()
    by_hand = resample(tensor, 44_100, RATE).mean(dim=1, keepdim=True)  # the package: resample, then mean
    assert ours.item() == pytest.approx(reward.score_tensor(by_hand).item(), abs=1e-6)
    path = tmp_path / "stereo.wav"
    sf.write(path, stereo.T, 44_100, subtype="FLOAT")
    from_file = reward.score_audio([path])[0]  # the package's file path: mono first, then resample
    assert from_file.total == pytest.approx(ours.item(), abs=1e-4)
    assert from_file.extra["duration"] == pytest.approx(3.0, abs=1e-3)


def test_gradient_reaches_waveform(reward):
    wave = torch.from_numpy(noise_tone(1.5, 22_050, channels=2, seed=4))[None].requires_grad_(True)
    reward.score_tensor(wave, ["ignored prompt"], sample_rate=22_050).sum().backward()
    assert wave.grad is not None and torch.isfinite(wave.grad).all() and wave.grad.abs().sum() > 0


def test_release_checkpoint_loads_the_same(reward, tmp_path):
    path = make_audiobox_model(tmp_path / "release", seed=0, release=True)
    release = mmalign.load_reward("audiobox-aesthetics", weights=str(path))
    wave = torch.from_numpy(noise_tone(2.0, RATE, seed=5))[None]
    assert release.score_tensor(wave).item() == reward.score_tensor(wave).item()


def test_bad_keys_and_configs_raise(folder, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((folder / "config.json").read_text())
    state = load_file(str(folder / "model.safetensors"))
    state.pop("proj_layer.PQ.0.weight")
    state["proj_layer.XX.0.weight"] = torch.zeros(1, 32)
    state["layer_weights.CE"] = torch.zeros(5)
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(StateDictMismatchError) as caught:
        mmalign.load_reward("audiobox-pq", weights=str(bad))
    message = str(caught.value)
    assert "proj_layer.PQ.0.weight" in message and "proj_layer.XX.0.weight" in message
    assert "layer_weights.CE (5,) vs (3,)" in message
    config = json.loads((folder / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "nth_layer": 2}))
    with pytest.raises(WeightsError, match="nth_layer"):
        mmalign.load_reward("audiobox-pq", weights=str(bad))
    unsafe = tmp_path / "checkpoint.pt"
    torch.save({"state_dict": {}, "model_cfg": {}, "target_transform": {}, "x": argparse.Namespace(a=1)}, unsafe)
    with pytest.raises(UnsafeCheckpointError):
        mmalign.load_reward("audiobox-pq", weights=str(unsafe))
    with pytest.raises(ValueError, match="axis"):
        mmalign.load_reward("audiobox-pq", weights=str(folder), axis="XY")


def test_registry_names(reward, folder):
    wave = torch.from_numpy(noise_tone(2.0, RATE, seed=6))[None]
    axes = reward.score_axes(wave)
    pq = mmalign.load_reward("audiobox-pq", weights=str(folder))
    assert pq.score_tensor(wave).item() == pytest.approx(axes["PQ"].item(), abs=1e-6)
    assert reward.name == "audiobox-aesthetics" and reward.modality == "audio" and not reward.uses_prompt
    assert reward.score_tensor(wave).item() == pytest.approx((axes["CE"] + axes["CU"] + axes["PQ"]).item() / 3)
    for axis in AXES:
        one = mmalign.load_reward(f"audiobox-{axis.lower()}", weights=str(folder))
        assert one.name == f"audiobox-{axis.lower()}" and one.axis == axis
        assert one.pick(axes) is axes[axis]
        info = one.info()
        assert info["modality"] == "audio" and info["higher_is_better"] and "1-10" in info["scale"]
    with pytest.raises(ValueError, match="10 s"):
        reward.with_windows(window_seconds=5.0)


def test_cli_score_wav_folder(folder, reward, tmp_path):
    from mmalign.cli import main

    clips = tmp_path / "clips"
    clips.mkdir()
    for n, (seconds, rate) in enumerate([(1.0, 16_000), (12.0, 22_050)]):
        sf.write(clips / f"c{n}.wav", noise_tone(seconds, rate, seed=10 + n).T, rate)
    out = tmp_path / "scores.jsonl"
    argv = [
        "score",
        "--reward",
        "audiobox-pq",
        "--weights",
        str(folder),
        "--out",
        str(out),
        "--no-progress",
        str(clips),
    ]
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["reward"] for r in rows] == ["audiobox-pq"] * 2 and all(r["modality"] == "audio" for r in rows)
    expected = reward.with_windows().score_audio([r["path"] for r in rows])
    assert [r["score"] for r in rows] == pytest.approx([e.extra["axes"]["PQ"] for e in expected], abs=1e-5)
    assert len(rows[1]["units"]) == 2 and rows[1]["unit_weights"] == pytest.approx([1.0, 0.2], abs=1e-4)
    assert set(rows[0]["axes"]) == set(AXES)


def test_trainer_audio_adapter(reward):
    from mmalign.trainers.online import WeightedReward, for_modality

    adapted = for_modality(WeightedReward([reward], [1.0]), "audio", sample_rate=44_100)
    audio = torch.from_numpy(noise_tone(1.0, 44_100, channels=2, seed=7))[None].requires_grad_(True)
    total = adapted(audio, ["a prompt"])
    assert total.item() == pytest.approx(reward.score_tensor(audio, sample_rate=44_100).item(), abs=1e-6)
    total.sum().backward()
    assert audio.grad.abs().sum() > 0


def test_bench_audio_pairs(folder, reward, tmp_path):
    from mmalign.bench import protocols as P
    from mmalign.cli import main

    lines = []
    for n, (good, bad) in enumerate([(220.0, 3000.0), (440.0, 1500.0)]):
        for name, freq in (("c", good), ("r", bad)):
            sf.write(tmp_path / f"{n}{name}.wav", noise_tone(0.5, 22_050, seed=n, freq=freq)[0], 22_050)
        lines.append({"prompt": f"tone {n}", "chosen": f"{n}c.wav", "rejected": f"{n}r.wav"})
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "bench"
    argv = ["bench", "rewards", "--protocol", "pairs", "--data", str(tmp_path / "pairs.jsonl"), "--reward"]
    argv += ["audiobox-aesthetics", "--weights", str(folder), "--bootstrap", "0", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    result = json.loads((out / "audiobox-aesthetics.pairs.json").read_text())
    scores = reward.score([str(tmp_path / f"{n}{k}.wav") for n in range(2) for k in "cr"]).tolist()
    assert result["modality"] == "audio"
    assert result["metrics"]["accuracy"]["value"] == pytest.approx(P.pairwise_accuracy(scores[0::2], scores[1::2]))


def test_label_scores_stable_audio_samples_and_refuses_it_on_images(folder, tmp_path, capsys):
    """``mmalign label`` on a tiny Stable Audio pipeline with ``audiobox-pq``: float WAVs, each scored as saved
    (the reward told the generator's 4 kHz rate); on an image generator the audio reward is refused by name."""
    from mmalign.cli import main
    from mmalign.modalities.audio import read_audio
    from mmalign.toyworld.sampling import ASSETS
    from tests import tiny

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a dog barks\n")
    pipe = tiny.make_stable_audio_pipeline(tmp_path / "pipe", seed=0)
    argv = ["label", "--reward", "audiobox-pq", "--reward-weights", str(folder), "--prompts", str(prompts)]
    argv += ["--k", "2", "--steps", "2", "--guidance", "1"]
    assert main([*argv, "--model", str(pipe), "--out", str(tmp_path / "out")]) == 0
    row = json.loads((tmp_path / "out" / "rankings.jsonl").read_text())
    reward = mmalign.load_reward("audiobox-pq", weights=str(folder))
    for name, score in zip(row["images"], row["scores"]):
        wave, rate = read_audio(tmp_path / "out" / name)
        expected = reward.score_tensor(torch.from_numpy(wave)[None], sample_rate=rate)
        assert rate == 4000 and score == pytest.approx(float(expected[0]), abs=1e-5)
    if (ASSETS / "flow_pipeline").is_dir():
        assert main([*argv, "--model", str(ASSETS / "flow_pipeline"), "--out", str(tmp_path / "img")]) == 2
        assert "reward audiobox-pq scores audio; the generator makes image" in capsys.readouterr().err


@pytest.mark.slow  # about 10 s more (diffusers, a tiny Stable Audio pipeline): MMALIGN_SLOW=1
def test_draft_trains_an_audio_generator_on_it(folder, tmp_path):
    """``reward=audiobox-pq`` by name in a DRaFT recipe on a tiny Stable Audio Open pipeline (4 kHz stereo): the
    reward's gradient, through the torch resampling to 16 kHz, changes the LoRA weights."""
    from mmalign.commands.train import resolve_trainer_config
    from tests import tiny

    pipe = tiny.make_stable_audio_pipeline(tmp_path / "pipe", seed=0)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a dog barks\nrain on a piano loop\n")
    overrides = [
        "trainer=draft", f"model={pipe}", f"data={prompts}", f"output_dir={tmp_path / 'run'}", "batch_size=2",
        "tracker=none", "progress=false", "log_every=1", "max_steps=1", "lora_rank=4", "lr=1e-2",
        "sample_steps=2", "guidance=3.0", "eta=0", "reward=audiobox-pq", f"reward_weights={folder}",
    ]  # fmt: skip
    cls, config = resolve_trainer_config(None, overrides)
    trainer = cls(config)
    before = {k: v.clone() for k, v in trainer._trainable_state().items()}
    summary = trainer.train()
    assert summary["steps"] == 1 and math.isfinite(summary["history"][0]["loss"])
    after = trainer._trainable_state()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the reward's gradient reached the LoRA
