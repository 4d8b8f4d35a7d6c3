"""mmalign.memory: the dtype a loader picks for "auto" and the fit check's arithmetic."""

from __future__ import annotations

import pytest
import torch

from mmalign import memory
from mmalign.errors import WeightsError


def test_auto_dtype_follows_native_bf16(monkeypatch):
    monkeypatch.setattr(memory, "cpu_flags", lambda: {"avx2", "amx_bf16"})
    assert memory.auto_dtype("auto", "cpu") == "bf16"
    monkeypatch.setattr(memory, "cpu_flags", lambda: {"avx2", "avx512f"})
    assert memory.auto_dtype("auto", "cpu") == "fp32"
    assert memory.auto_dtype("fp16", "cpu") == "fp16"  # an explicit dtype is kept


def test_ensure_fits_counts_bytes_and_names_them(monkeypatch):
    monkeypatch.setattr(memory, "free_device_memory", lambda device: 10 * 2**30)
    assert memory.ensure_fits("m", 2_000_000_000, torch.bfloat16, "cpu") == 4_000_000_000
    with pytest.raises(WeightsError, match=r"m: 3\.00B parameters in float32 need 11\.2 GiB .* 10\.0 GiB are free"):
        memory.ensure_fits("m", 3_000_000_000, torch.float32, "cpu")
    with pytest.raises(WeightsError, match="need 10.7 GiB"):  # the checkpoint read whole counts too
        memory.ensure_fits("m", 2_000_000_000, torch.bfloat16, "cpu", extra=7 * 2**30)
    monkeypatch.setattr(memory, "free_device_memory", lambda device: None)
    assert memory.ensure_fits("m", 10**12, torch.float32, "cpu") == 4 * 10**12  # unknown free memory passes


def test_meta_parameter_count_allocates_nothing():
    assert memory.meta_parameter_count(lambda: torch.nn.Linear(1000, 1000)) == 1_001_000
