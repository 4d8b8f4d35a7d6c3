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


def test_max_memory_and_execution_device_parse_as_accelerate_takes_them():
    assert memory.parse_max_memory("0=20GiB, 1=20GiB,cpu=60GiB") == {0: "20GiB", 1: "20GiB", "cpu": "60GiB"}
    assert memory.parse_max_memory("cpu=1024") == {"cpu": 1024}
    assert memory.parse_max_memory({"cpu": 5}) == {"cpu": 5} and memory.parse_max_memory(None) is None
    with pytest.raises(ValueError, match="DEVICE=SIZE"):
        memory.parse_max_memory("20GiB")
    assert memory.execution_device({"a": "cpu", "b": 1, "c": "disk"}) == torch.device("cuda", 1)
    assert memory.execution_device({"a": "cpu", "b": "disk"}) == torch.device("cpu")


def test_a_module_placed_on_cpu_and_disk_computes_what_it_computed(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(4)])
    x = torch.randn(3, 64)
    expected = model(x)
    with pytest.raises(WeightsError, match="device_map 'everywhere'"):
        memory.infer_device_map(model, "everywhere")
    budget = {"cpu": 2 * 64 * 65 * 4}  # two of the four layers
    with pytest.raises(WeightsError, match="offload folder"):
        memory.place_module(model, "sequential", budget)
    placement = memory.place_module(model, "sequential", budget, offload_folder=tmp_path)
    assert set(placement.values()) == {"cpu", "disk"} and len(placement) == 4  # per layer, not merged
    assert torch.equal(model(x), expected)
    assert torch.equal(model[3](model[2](model[1](model[0](x)))), expected)  # each layer runs alone too
