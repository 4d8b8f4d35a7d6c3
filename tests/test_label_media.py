"""``mmalign label`` and ``mmalign generate`` for every modality: videos (the shipped tiny Wan pipeline, scored by
the exact video judge), audio (a tiny Stable Audio pipeline) and view grids (the tiny flow pipeline read as 2x2
views). The media are written losslessly (FFV1 .mkv, float WAV, PNG grids), read back equal to what was scored,
and the pairs load as preference data; the deterministic Stable Audio chain equals the pipeline's own sampler."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmalign.cli import main
from mmalign.commands.label import label
from mmalign.data import load_preferences
from mmalign.modalities.writers import MediaFiles, join_views, quantise
from mmalign.models.generator import configure_output, load_generator
from mmalign.models.noise_opt import NoiseSampler, candidate_seed, initial_noise
from mmalign.toyworld.sampling import ASSETS
from tests import tiny

pytestmark = pytest.mark.usefixtures("one_thread")
VIDEO_PROMPTS = ["two red circles moving right", "one blue square moving up"]
needs_video = pytest.mark.skipif(not (ASSETS / "video_pipeline").is_dir(), reason="assets/toyworld not built")
needs_flow = pytest.mark.skipif(not (ASSETS / "flow_pipeline").is_dir(), reason="assets/toyworld not built")


def test_writers_round_trip_every_modality(tmp_path):
    from mmalign.modalities.audio import read_audio
    from mmalign.modalities.image import open_image, pil_to_tensor
    from mmalign.modalities.multiview import split_grid
    from mmalign.modalities.video import load_video

    gen = torch.Generator().manual_seed(0)
    video = torch.rand(5, 3, 16, 24, generator=gen)
    audio = torch.rand(2, 800, generator=gen) * 2 - 1
    views = torch.rand(4, 3, 8, 8, generator=gen)
    MediaFiles("video", fps=4).write(tmp_path, ["v.mkv"], video[None])
    MediaFiles("audio", sample_rate=4000).write(tmp_path, ["a.wav"], audio[None])
    MediaFiles("multiview", grid=(2, 2)).write(tmp_path, ["m.png"], views[None])
    clip = load_video(tmp_path / "v.mkv")
    assert clip.fps == pytest.approx(4.0) and torch.equal(clip.frames, quantise(video, "video"))
    wave, rate = read_audio(tmp_path / "a.wav")
    assert rate == 4000 and np.array_equal(wave, audio.numpy())  # float WAV: exact
    tiles = [pil_to_tensor(view) for view in split_grid(open_image(tmp_path / "m.png"), 2, 2)]
    assert torch.equal(torch.stack(tiles), quantise(views, "multiview"))
    assert torch.equal(join_views(views, 2, 2)[:, :8, 8:], views[1])  # row-major


@pytest.fixture(scope="module")
def video_prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "video.txt"
    path.write_text("\n".join(VIDEO_PROMPTS) + "\n")
    return path


@needs_video
def test_label_videos_writes_lossless_clips_scored_as_read_back(video_prompts, tmp_path, capsys):
    from mmalign.modalities.video import load_video
    from mmalign.rewards import load_reward

    out = tmp_path / "labels"
    model = ASSETS / "video_pipeline"
    argv = ["label", "--model", str(model), "--reward", "toyworld-video-judge", "--prompts", str(video_prompts)]
    argv += ["--k", "3", "--steps", "3", "--guidance", "1", "--resolution", "32", "--out", str(out), "--fps", "4"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().err.strip().splitlines()[-1])["images"] == 6
    rows = [json.loads(line) for line in (out / "rankings.jsonl").read_text().splitlines()]
    judge = load_reward("toyworld-video-judge")
    for i, row in enumerate(rows):
        assert row["images"] == [f"videos/{i:05d}_{j:02d}.mkv" for j in range(3)]
        clips = torch.stack([load_video(out / name).frames for name in row["images"]])
        assert clips.shape == (3, 5, 3, 32, 32)
        assert row["scores"] == pytest.approx(judge.score_tensor(clips, [row["prompt"]] * 3).tolist(), abs=1e-6)
        # sample 0 is plain sampling from the noise of seed + i (as generate's candidate 0)
        generator = load_generator(str(model))
        sampler = NoiseSampler(generator, 3, 1.0, 32)
        with torch.no_grad():
            first = sampler.media(initial_noise(sampler.latent_shape, [candidate_seed(0, i, 0)]), row["prompt"])
        assert torch.equal(clips[0], quantise(first[0], "video"))
    pairs = (out / "pairs.jsonl").read_text().splitlines()
    loaded = load_preferences(str(out / "pairs.jsonl"))
    assert len(loaded) == len(pairs) and all(str(p.chosen).endswith(".mkv") for p in loaded)
    capsys.readouterr()


@needs_video
def test_frames_on_an_image_generator_and_bad_counts_are_refused(video_prompts, tmp_path):
    from mmalign.errors import ConfigError

    with pytest.raises(ConfigError, match="frames=4"):
        configure_output(load_generator(str(ASSETS / "video_pipeline")), frames=4)  # (4 - 1) % 4 != 0
    if (ASSETS / "flow_pipeline").is_dir():
        with pytest.raises(ConfigError, match="generates images, not videos"):
            configure_output(load_generator(str(ASSETS / "flow_pipeline")), frames=5)


@needs_video
def test_generate_best_of_n_on_videos(video_prompts, tmp_path):
    out = tmp_path / "best"
    argv = ["generate", "--model", str(ASSETS / "video_pipeline"), "--reward", "toyworld-video-judge"]
    argv += ["--prompts", str(video_prompts), "--n", "2", "--steps", "2", "--guidance", "1", "--resolution", "32"]
    assert main([*argv, "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        assert row["best"] == f"best/{i:05d}.mkv" and (out / row["best"]).is_file()
        chosen = out / row["images"][row["chosen"]]
        assert chosen.read_bytes() == (out / row["best"]).read_bytes()
        assert row["scores"][row["chosen"]] == max(row["scores"])


@pytest.fixture(scope="module")
def audio_folder(tmp_path_factory):
    return tiny.make_stable_audio_pipeline(tmp_path_factory.mktemp("stable_audio") / "pipe", seed=0)


class Loudness:
    """Mean waveform value, told the sample rate (an audio reward)."""

    name, modality, is_differentiable = "loudness", "audio", True

    def to(self, device):
        return self

    def score_tensor(self, audio, prompts, sample_rate=None):
        assert sample_rate == 4000
        return audio.float().mean(dim=(1, 2))


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_the_v_diffusion_chain_is_the_pipelines_ode(audio_folder, guidance):
    generator = load_generator(str(audio_folder))
    sampler = NoiseSampler(generator, 4, guidance, 0)
    x_T = initial_noise(sampler.latent_shape, [5, 6])
    conditions = generator.encode_conditions(["a dog barks"] * 2)
    expected = generator.sample(conditions, steps=4, guidance=guidance, latents=x_T, noise="none")
    assert torch.allclose(sampler.latents(x_T, "a dog barks"), expected, atol=1e-6)


def test_label_audio_writes_float_wavs_and_audio_pairs(audio_folder, tmp_path):
    from mmalign.modalities.audio import read_audio
    from mmalign.trainers.online import WeightedReward

    generator = load_generator(str(audio_folder))
    out = tmp_path / "audio"
    summary = label(generator, WeightedReward([Loudness()], [1.0]), ["a dog barks"], 3, out, steps=3, guidance=1.0)
    assert summary == {"prompts": 1, "images": 3, "pairs": 3}
    row = json.loads((out / "rankings.jsonl").read_text())
    waves = [read_audio(out / name) for name in row["images"]]
    assert all(rate == 4000 and name.startswith("audio/") for (_, rate), name in zip(waves, row["images"]))
    means = [float(np.mean(wave)) for wave, _ in waves]
    assert row["scores"] == pytest.approx(means, abs=1e-6)
    loaded = load_preferences(str(out / "pairs.jsonl"), decode=True)
    assert len(loaded) == 3 and all(str(p.chosen).endswith(".wav") for p in loaded)


def test_d3po_trajectories_are_refused_for_other_generators(audio_folder, tmp_path):
    from mmalign.errors import ConfigError

    with pytest.raises(ConfigError, match="--trajectories"):
        label(load_generator(str(audio_folder)), Loudness(), ["p"], 2, tmp_path, trajectories=True)


@needs_flow
def test_label_view_grids_scores_the_views_of_the_saved_grid(tmp_path):
    from mmalign.modalities.image import open_image, pil_to_tensor
    from mmalign.modalities.multiview import split_grid
    from mmalign.rewards import load_reward
    from mmalign.rewards.lifted import lift
    from mmalign.trainers.online import WeightedReward

    generator = configure_output(load_generator(str(ASSETS / "flow_pipeline")), views_grid="2x2")
    reward = WeightedReward([load_reward("jpeg-compressibility")], [1.0])
    out = tmp_path / "views"
    label(generator, reward, ["two red circles on the left"], 2, out, steps=2, guidance=1.0, resolution=32)
    row = json.loads((out / "rankings.jsonl").read_text())
    views = torch.stack(
        [torch.stack([pil_to_tensor(v) for v in split_grid(open_image(out / n), 2, 2)]) for n in row["images"]]
    )
    assert views.shape == (2, 4, 3, 16, 16)
    expected = lift(load_reward("jpeg-compressibility"), "multiview").score_tensor(views, [row["prompt"]] * 2)
    assert row["scores"] == pytest.approx(expected.tolist(), abs=1e-5)
