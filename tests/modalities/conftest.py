"""Fixtures of the modality tests: media written in-process, a tiny CLAP folder."""

from __future__ import annotations

import pytest

from tests.modalities import tiny_media


@pytest.fixture(scope="session")
def clap_folder(tmp_path_factory):
    return tiny_media.make_clap_model(tmp_path_factory.mktemp("clap"))
