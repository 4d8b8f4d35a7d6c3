"""An online trainer whose reward is `reward=http://...`: the server is killed with kill -9 in the middle of the
run and restarted on the same port; the reward call retries across the restart and the run ends with the LoRA
weights of the same run scoring in process."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from mmalign.serve.client import HTTPReward
from tests.serve.conftest import TOKEN
from tests.trainers.conftest import make_online

pytestmark = pytest.mark.usefixtures("one_thread")

LORA = "pytorch_lora_weights.safetensors"


def test_ddpo_with_a_served_reward_rides_out_a_kill_and_equals_the_in_process_run(
    server, reward_folder, sd_folder, prompts_file, tmp_path, monkeypatch
):
    """Bit for bit, not to a tolerance: each reward call of the trainer is one request of one sampled batch and
    nothing else is sent meanwhile, so the server scores exactly the batch the in-process reward scores (same
    floats: safetensors carries them exactly; same kernels: one thread on both sides), and a score comes back
    through JSON unchanged (a float32 is exactly representable as a double and JSON writes doubles round-trip)."""
    monkeypatch.setenv("MMALIGN_REWARD_TOKEN", TOKEN)
    common = ("max_steps=3", "lr=1e-2")
    defaults = ("sample_steps=2",)
    local = make_online(
        "ddpo",
        sd_folder,
        prompts_file,
        tmp_path / "local",
        "reward=pickscore",
        f"reward_weights={reward_folder}",
        *common,
        defaults=defaults,
    )
    local_summary = local.train()

    served = make_online(
        "ddpo",
        sd_folder,
        prompts_file,
        tmp_path / "served",
        f"reward={server.url}/pickscore",
        *common,
        defaults=defaults,
    )
    remote = served.reward.rewards[0]
    assert isinstance(remote, HTTPReward) and remote.name == "pickscore"
    original, calls = remote.score_tensor, []

    def score_tensor(media, prompts, **options):
        calls.append(len(prompts))
        if len(calls) == 2:  # the second reward call of the run meets a dead server, then a booting one
            server.kill()
            server.start(wait=False)
        return original(media, prompts, **options)

    monkeypatch.setattr(remote, "score_tensor", score_tensor)
    served_summary = served.train()
    server.wait_ready()

    assert len(calls) >= 3 and remote.retries >= 1
    restarted = remote._request("GET", "rewards").json()["rewards"][0]["stats"]
    assert restarted["requests"] == len(calls) - 1  # the new process scored every call from the second on
    rewards = [row["reward"] for row in local_summary["history"]]
    assert [row["reward"] for row in served_summary["history"]] == rewards and len(set(rewards)) > 1
    expected, got = load_file(tmp_path / "local" / LORA), load_file(tmp_path / "served" / LORA)
    assert expected.keys() == got.keys() and expected
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
