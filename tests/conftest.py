"""Shared fixtures: tiny models in the published formats, built once per session; never any network."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests import tiny  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): tiny models are
    faster so, and far faster on a shared, loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow: set MMALIGN_SLOW=1 to run")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "slow" in item.keywords and os.environ.get("MMALIGN_SLOW") != "1":
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def hps_checkpoint(tmp_path_factory):
    return tiny.make_hps_checkpoint(tmp_path_factory.mktemp("hps"))


@pytest.fixture(scope="session")
def clip_folder(tmp_path_factory):
    return tiny.make_clip_model(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="session")
def image_files(tmp_path_factory):
    """Five RGB PNGs of different sizes and aspect ratios."""
    folder = tmp_path_factory.mktemp("images")
    sizes = [(320, 256), (256, 320), (224, 224), (500, 120), (97, 301)]
    paths = []
    for seed, size in enumerate(sizes):
        path = folder / f"img_{seed}.png"
        tiny.random_image(seed, size).save(path)
        paths.append(path)
    return paths
