"""The registry: lazy imports, clear errors for unknown names, every entry importable."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mmalign.registry import REWARDS, TRAINERS, Registry, UnknownNameError


def test_import_is_light():
    code = "import sys, mmalign, mmalign.registry; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_unknown_name_suggests_close_matches():
    with pytest.raises(UnknownNameError, match="Did you mean hpsv2"):
        REWARDS.entry("hpsv2.2")
    with pytest.raises(UnknownNameError, match="Known:"):
        TRAINERS.entry("zzz")


def test_every_entry_resolves_to_a_callable():
    for registry in (REWARDS, TRAINERS):
        for entry in registry:
            assert callable(entry.load()), entry.name


def test_duplicate_registration_refused_and_defaults_merge():
    registry = Registry("thing")
    registry.register("a", "builtins:dict", "a dict", x=1)
    with pytest.raises(ValueError, match="already registered"):
        registry.register("a", "builtins:dict")
    assert registry.build("a", y=2) == {"x": 1, "y": 2}
    assert registry.build("a", x=3) == {"x": 3}
    assert "a" in registry and registry.names() == ["a"]


def test_cli_parser_builds_without_torch():
    """`mmalign --help` stays instant: command modules import heavy libraries inside ``run``."""
    code = "import sys; from mmalign.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
