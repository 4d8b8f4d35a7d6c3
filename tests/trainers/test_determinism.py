"""Results that must not depend on history or on the CPU's kernels: what a run computes at step N is a
function of (seed, N) and the checkpoint alone, so a resumed run equals an uninterrupted one bit for bit on any
CPU. BLAS kernels (MKL, oneDNN) round differently for different batch sizes (on this kind of machine, a prompt
encoded alone and in a batch of two differ by up to 2.4e-7), so nothing may be computed in a batch whose
composition depends on what ran before."""

from __future__ import annotations

import json

import pytest
import torch

from tests.trainers.conftest import interrupt_then_resume, write_pairs
from tests.trainers.test_training import make_trainer

pytestmark = pytest.mark.kernels

PROMPTS = ["a red apple", "a blue sky", "a green field", "the sun"]


def test_prompt_embeddings_do_not_depend_on_the_batch_they_were_first_encoded_in(sd_folder, pairs_file, tmp_path):
    seen_in_batches = make_trainer(sd_folder, pairs_file, tmp_path / "a")
    seen_in_batches._embeds(PROMPTS)
    seen_in_batches._embeds(PROMPTS[::-1])
    fresh = make_trainer(sd_folder, pairs_file, tmp_path / "b")
    for prompt in PROMPTS:
        alone = fresh._embeds([prompt])
        cached = seen_in_batches._embeds([prompt])
        assert torch.equal(alone.hidden, cached.hidden), prompt
    # and a batch is the rows of its prompts, whatever else is in it
    batch = fresh._embeds([PROMPTS[2], PROMPTS[0]])
    assert torch.equal(batch.hidden[0:1], fresh._embeds([PROMPTS[2]]).hidden)


def test_reward_text_features_do_not_depend_on_the_batch_they_were_first_encoded_in(clip_folder):
    import mmalign

    batched = mmalign.load_reward("pickscore", weights=str(clip_folder))
    batched.encode_text(PROMPTS)
    alone = mmalign.load_reward("pickscore", weights=str(clip_folder))
    for prompt in PROMPTS:
        assert torch.equal(batched.encode_text([prompt]), alone.encode_text([prompt])), prompt


# ----------------------------------------------------------------------------------------------------------
# Exact resume, every trainer
# ----------------------------------------------------------------------------------------------------------
OFFLINE = {
    "dpo": [],
    "sft": [],
    "smpo": [],
    "adaptive-dpo": [],
    "kto": [],
}
ONLINE = {
    "ddpo": ["reward=jpeg-compressibility", "stat_min_count=2"],
    "d3po": ["d3po_clip=0.5"],
    "refl": ["sample_steps=3", "refl_min_step=1", "refl_max_step=2", "grad_accum=1"],  # its EMA resumes too
    "draft": ["draft_mode=k", "draft_k=1"],
    "draft-lv": ["trainer=draft", "draft_mode=lv"],
    "alignprop": ["sample_steps=3"],
}


FLOW = {  # on the tiny SD3 pipeline; rounds of sample_batches=2 steps, so step 2's checkpoint starts a round
    "flow-grpo": ["beta=0.04", "guidance=2.0"],
    "flow-grpo-fast": ["window_range=[0,3]", "window_size=1"],
    "dance-grpo": [],
    "mix-grpo": ["sample_steps=4", "window_size=1", "window_shift_interval=1"],
    "diffusionnft": ["sample_batches=1"],  # its old policy (updated at each round's start) resumes too
}


def test_every_registered_trainer_has_a_resume_case():
    """A trainer added to the registry must be added here too (exact resume is promised for every trainer)."""
    from mmalign.registry import TRAINERS

    covered = set(OFFLINE) | {name.split("-")[0] for name in ONLINE} | set(FLOW)
    missing = sorted(set(TRAINERS.names()) - covered)
    assert not missing, f"no exact-resume case for {missing}: add them to OFFLINE or ONLINE"


@pytest.fixture(scope="module")
def scored_pairs(tmp_path_factory):
    """Three scored pairs with three prompts: an odd count, so global batches of two straddle epochs and
    prompts meet in changing company."""
    path = write_pairs(tmp_path_factory.mktemp("scored"), count=3)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for i, row in enumerate(rows):
        row["prompt"] = PROMPTS[i]
        row["score_chosen"], row["score_rejected"] = 0.25 + 0.01 * i, 0.15
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def three_prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS[:3]) + "\n")
    return path


def _assert_same_weights(full, resumed):
    expected, got = full._trainable_state(), resumed._trainable_state()
    assert expected.keys() == got.keys()
    differ = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not differ, f"{len(differ)} of {len(expected)} tensors differ after resume, e.g. {differ[:3]}"


@pytest.mark.parametrize("name", sorted(OFFLINE))
def test_offline_trainers_resume_exactly(name, sd_folder, scored_pairs, tmp_path, monkeypatch):
    def build(out, *extra):
        common = ["max_steps=3", "checkpoint_every=2", "lr_scheduler=linear", *OFFLINE[name], *extra]
        return make_trainer(sd_folder, scored_pairs, out, f"trainer={name}", *common)

    _assert_same_weights(*interrupt_then_resume(build, tmp_path, monkeypatch))


@pytest.mark.parametrize("name", sorted(ONLINE))
def test_online_trainers_resume_exactly(name, sd_folder, three_prompts, tmp_path, monkeypatch):
    from tests.trainers.test_online import Brightness, make

    trainer = name.split("-")[0]
    reward = None if name == "ddpo" else Brightness()

    def build(out, *extra):
        common = ["max_steps=3", "checkpoint_every=2", "lr=1e-2", *ONLINE[name], *extra]
        return make(trainer, sd_folder, three_prompts, out, *common, reward=reward)

    full, resumed = interrupt_then_resume(build, tmp_path, monkeypatch)
    _assert_same_weights(full, resumed)
    if name == "ddpo":  # the per-prompt reward statistics travel in the checkpoint
        assert json.loads((tmp_path / "b" / "checkpoints" / "step-0000002" / "stat_tracker.json").read_text())
        assert resumed.tracker.state_dict() == full.tracker.state_dict()


@pytest.mark.parametrize("name", sorted(FLOW))
def test_flow_trainers_resume_exactly(name, sd3_folder, three_prompts, tmp_path, monkeypatch):
    from tests.trainers.conftest import make_flow

    def build(out, *extra):
        return make_flow(name, sd3_folder, three_prompts, out, "max_steps=3", "checkpoint_every=2", *FLOW[name], *extra)

    full, resumed = interrupt_then_resume(build, tmp_path, monkeypatch)
    _assert_same_weights(full, resumed)
    if name == "diffusionnft":
        assert all(torch.equal(a, b) for a, b in zip(full.old_params, resumed.old_params))
