"""A tiny SD3 pipeline of the real classes, saved once per session, and its generator."""

from __future__ import annotations

import pytest

from mmalign.models.generator import load_generator
from tests import tiny


@pytest.fixture(scope="session")
def folder(tmp_path_factory):
    return tiny.make_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "pipe", seed=0)


@pytest.fixture(scope="session")
def generator(folder):
    return load_generator(str(folder))
