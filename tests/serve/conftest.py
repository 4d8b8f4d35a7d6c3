"""A tiny PickScore-format reward (a transformers CLIP at 64 px, saved as `save_pretrained` writes it) served by
real `mmalign serve` subprocesses; the test process loads the same files in process for comparison."""

from __future__ import annotations

import pytest

import mmalign
from tests import tiny
from tests.serve.server import RewardServer

TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="session")
def reward_folder(tmp_path_factory):
    return tiny.make_clip_model(tmp_path_factory.mktemp("serve-clip"), image_size=64)


@pytest.fixture(scope="session")
def local_reward(reward_folder):
    return mmalign.load_reward("pickscore", weights=str(reward_folder))


@pytest.fixture(scope="session")
def sd_folder(tmp_path_factory):
    return tiny.make_sd_pipeline(tmp_path_factory.mktemp("serve-sd"))


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve-prompts") / "prompts.txt"
    path.write_text("a red apple\na blue sky\na green field\nthe sun\n")
    return path


@pytest.fixture(scope="session")
def server(reward_folder, tmp_path_factory, request):
    """`mmalign serve --reward pickscore` (tiny), a queue of 8 requests (8 sequential clients never fill it; the
    queue test does), the token from --token-file. One for the session (a server takes seconds to start: it imports
    transformers), restarted in place by the kill -9 test."""
    folder = tmp_path_factory.mktemp("serve-a")
    (folder / "token").write_text(TOKEN + "\n")
    args = ["--reward", "pickscore", "--weights", reward_folder, "--token-file", folder / "token", "--queue", 8]
    process = RewardServer(args, folder / "server.log").start(wait=False)
    for name in ("local_reward", "sd_folder"):  # built here while the server boots
        request.getfixturevalue(name)
    process.wait_ready()
    yield process
    process.stop()
