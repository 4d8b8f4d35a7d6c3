"""D3PO from human feedback: ``mmalign label --trajectories`` keeps each prompt's chains (K samples from one x_T),
people's scores are read in the reference's one-JSON-per-annotator format or a JSONL, and D3PO trains on every
pair of differently scored images of a prompt, recomputing the stored steps' log-probs."""

from __future__ import annotations

import json

import pytest
import torch

from mmalign.commands.train import resolve_trainer_config
from mmalign.data.feedback import feedback_pairs, load_trajectories, read_human_scores, read_labelled_samples
from mmalign.errors import DataError
from mmalign.models import sampling
from mmalign.models.policy import DiffusionPolicy

K, STEPS = 3, 2


@pytest.fixture(scope="module")
def labelled(sd_folder, tmp_path_factory):
    from mmalign.cli import main

    root = tmp_path_factory.mktemp("feedback")
    prompts = root / "prompts.txt"
    prompts.write_text("a red apple\na blue sky\n")
    out = root / "labels"
    argv = ["label", "--model", str(sd_folder), "--reward", "jpeg-compressibility", "--prompts", str(prompts)]
    argv += ["--k", str(K), "--out", str(out), "--steps", str(STEPS), "--resolution", "32", "--trajectories"]
    assert main(argv) == 0
    return out


def test_stored_chains_share_x_T_and_their_log_probs_recompute(labelled, sd_folder):
    samples = read_labelled_samples(labelled)
    assert samples.settings["steps"] == STEPS and samples.settings["k"] == K
    assert [g.prompt for g in samples.groups] == ["a red apple", "a blue sky"]
    policy = DiffusionPolicy.from_pretrained(str(sd_folder))
    for group in samples.groups:
        chains = load_trajectories(group.trajectory)
        latents = chains["latents"]
        assert tuple(latents.shape[:2]) == (K, STEPS + 1)
        assert all(torch.equal(latents[0, 0], latents[i, 0]) for i in range(K))  # one x_T per prompt
        assert not torch.equal(latents[0, -1], latents[1, -1])  # independent step noise
        embeds = policy.encode_prompt([group.prompt] * K)
        uncond = policy.encode_prompt([""] * K)
        schedule = sampling.ddim_schedule(policy.noise_scheduler, STEPS)
        assert torch.equal(chains["timesteps"], schedule.timesteps)
        trajectory = sampling.Trajectory(latents, chains["log_probs"], schedule, embeds, uncond, None, 7.5, 1.0)

        def predict(noisy, t, e, ids):
            return policy.predict(policy.unet, noisy, t, e, ids)

        for j in range(STEPS):
            with torch.no_grad():
                again = sampling.step_log_prob(policy, predict, trajectory, j)
            torch.testing.assert_close(again, chains["log_probs"][:, j], rtol=1e-4, atol=1e-4)


def test_human_scores_both_formats_and_errors(labelled, tmp_path):
    groups = read_labelled_samples(labelled).groups
    annotators = tmp_path / "annotators"
    annotators.mkdir()
    (annotators / "alice.json").write_text(json.dumps([[1, 2, 3], [3, 3, 0]]))
    (annotators / "bob.json").write_text(json.dumps([[3, 2, 1]]))  # scored the first prompt only
    scores = read_human_scores(annotators, groups)
    assert scores == [[2.0, 2.0, 2.0], None]  # mean over annotators; prompts every annotator scored
    assert feedback_pairs(groups, scores) == []  # all tied

    lines = tmp_path / "human.jsonl"
    rows = [
        {"prompt": "a blue sky", "scores": [0, 1, 5]},
        {"index": 1, "scores": [2, 1, 5]},
        {"index": 0, "scores": [1, 1, 2]},
    ]
    lines.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scores = read_human_scores(lines, groups)
    assert scores == [[1.0, 1.0, 2.0], [1.0, 1.0, 5.0]]
    pairs = feedback_pairs(groups, scores)
    assert [(p.group, p.a, p.b, p.a_wins) for p in pairs] == [
        (0, 0, 2, False),
        (0, 1, 2, False),
        (1, 0, 2, False),
        (1, 1, 2, False),
    ]

    bad = tmp_path / "bad.jsonl"
    for row, message in [
        ({"index": 0, "scores": [1, 2]}, "want a list of 3 scores"),
        ({"index": 7, "scores": [1, 2, 3]}, "index 7 outside"),
        ({"prompt": "unknown", "scores": [1, 2, 3]}, "not among the samples"),
        ({"scores": [1, 2, 3]}, "want 'index' or 'prompt'"),
        ({"index": 0, "scores": [1, "x", 3]}, "must be numbers"),
    ]:
        bad.write_text(json.dumps({"index": 1, "scores": [1, 2, 3]}) + "\n" + json.dumps(row) + "\n")
        with pytest.raises(DataError, match=f"bad.jsonl:2: .*{message}"):
            read_human_scores(bad, groups)
    (annotators / "carol.json").write_text(json.dumps([[1, 2, 3], [1, 2]]))
    with pytest.raises(DataError, match="carol.json: prompt 1: want a list of 3 scores"):
        read_human_scores(annotators, groups)


def test_d3po_trains_on_human_preferences_of_stored_chains(labelled, sd_folder, tmp_path):
    human = tmp_path / "human.jsonl"
    human.write_text(
        json.dumps({"index": 0, "scores": [3, 1, 2]}) + "\n" + json.dumps({"index": 1, "scores": [0, 0, 1]}) + "\n"
    )
    overrides = [
        "trainer=d3po",
        f"model={sd_folder}",
        f"feedback={labelled}",
        f"human={human}",
        f"output_dir={tmp_path / 'out'}",
        "batch_size=2",
        "tracker=none",
        "progress=false",
        "max_steps=2",
        "lora_rank=4",
        "lr=1e-2",
        "d3po_clip=0.5",
        "sample_steps=50",  # replaced by the stored chains' 2 steps (and their guidance, eta, resolution)
    ]
    cls, config = resolve_trainer_config(None, overrides)
    trainer = cls(config)
    assert (config.sample_steps, config.guidance, config.resolution) == (STEPS, 7.5, 32)
    assert len(trainer.pairs) == 3 + 2  # prompt 0: every pair differs; prompt 1: (0, 2) and (1, 2)
    batch = trainer.make_batch(0)
    chosen = [trainer.pairs[i] for _, i in trainer.schedule.batch(0)]
    assert batch["a_wins"].tolist() == [p.score_a > p.score_b for p in chosen]
    stored = [load_trajectories(trainer.feedback_groups[p.group].trajectory)["latents"] for p in chosen]
    torch.testing.assert_close(batch["trajectory"].latents[0], stored[0][chosen[0].a])
    torch.testing.assert_close(batch["trajectory"].latents[2], stored[0][chosen[0].b])
    before = {k: v.clone() for k, v in trainer._trainable_state().items()}
    summary = trainer.train()
    after = trainer._trainable_state()
    assert summary["steps"] == 2 and summary["skipped_steps"] == 0
    assert not [k for k in before if torch.equal(before[k], after[k])]


def test_feedback_needs_stored_chains(sd_folder, tmp_path):
    from mmalign.cli import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    out = tmp_path / "plain"
    argv = ["label", "--model", str(sd_folder), "--reward", "jpeg-compressibility", "--prompts", str(prompts)]
    assert main(argv + ["--k", "2", "--out", str(out), "--steps", "1", "--resolution", "32"]) == 0
    with pytest.raises(DataError, match="label.json: not found"):
        read_labelled_samples(out)
