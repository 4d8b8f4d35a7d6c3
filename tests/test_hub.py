"""Safe loading: safetensors / weights-only pickles; code-executing pickles refused; strict key checks."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from mmalign.errors import StateDictMismatchError, UnsafeCheckpointError, WeightsError
from mmalign.hub import convert_pickle_to_safetensors, load_into, load_state_dict, resolve_dir, resolve_file


class Payload:
    """Unpickling this would run code: os.system is what a malicious checkpoint would call."""

    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_code_executing_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": Payload()}, path)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_state_dict(path)
    assert "mmalign convert --trust-pickle" in str(info.value) and str(path) in str(info.value)
    assert not (tmp_path / "PWNED").exists()


def test_pickled_module_is_refused(tmp_path):
    torch.save(nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(UnsafeCheckpointError):
        load_state_dict(tmp_path / "module.pt")


def test_convert_trusted_pickle(tmp_path):
    torch.save(nn.Linear(2, 3), tmp_path / "module.pt")
    out = convert_pickle_to_safetensors(tmp_path / "module.pt", tmp_path / "module.safetensors")
    state = load_state_dict(out)
    assert set(state) == {"weight", "bias"} and state["weight"].shape == (3, 2)
    cli = [sys.executable, "-m", "mmalign.cli", "convert", str(tmp_path / "module.pt"), str(tmp_path / "b.safetensors")]
    refused = subprocess.run(cli, capture_output=True, text=True)
    assert refused.returncode == 2 and "--trust-pickle" in refused.stderr


def test_plain_and_wrapped_state_dicts(tmp_path):
    torch.save({"a": torch.ones(2)}, tmp_path / "plain.pt")
    torch.save({"state_dict": {"a": torch.ones(2)}}, tmp_path / "wrapped.pt")
    assert load_state_dict(tmp_path / "plain.pt")["a"].sum() == 2
    assert load_state_dict(tmp_path / "wrapped.pt")["a"].sum() == 2
    torch.save({"a": torch.ones(2), "step": 3}, tmp_path / "mixed.pt")
    with pytest.raises(WeightsError, match="step"):
        load_state_dict(tmp_path / "mixed.pt")
    (tmp_path / "trunc.pt").write_bytes((tmp_path / "plain.pt").read_bytes()[:40])
    with pytest.raises(WeightsError, match="trunc.pt"):
        load_state_dict(tmp_path / "trunc.pt")
    (tmp_path / "bad.safetensors").write_bytes(b"nonsense")
    with pytest.raises(WeightsError, match="bad.safetensors"):
        load_state_dict(tmp_path / "bad.safetensors")


def test_load_into_reports_every_problem():
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    del state["1.bias"]
    state["2.weight"] = torch.zeros(1)
    state["0.weight"] = torch.zeros(4, 2)
    with pytest.raises(StateDictMismatchError) as info:
        load_into(model, state, source="ckpt.pt")
    error = info.value
    assert error.missing == ["1.bias"] and error.unexpected == ["2.weight"]
    assert error.mismatched and "0.weight" in error.mismatched[0] and "ckpt.pt" in str(error)
    # allow-lists are explicit globs
    state = {k: v.clone() + 1 for k, v in model.state_dict().items()}
    state["text.position_ids"] = torch.arange(3)
    load_into(model, state, source="ok.pt", allow_unexpected=["*position_ids"])
    assert torch.equal(model[0].bias, state["0.bias"])


def test_resolve_paths_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "w.pt").write_bytes(b"x")
    assert resolve_file(tmp_path / "w.pt", default_repo="a/b", filename="w.pt", what="t") == tmp_path / "w.pt"
    assert resolve_file(tmp_path, default_repo="a/b", filename="w.pt", what="t") == tmp_path / "w.pt"
    with pytest.raises(WeightsError, match="no other.pt"):
        resolve_file(tmp_path, default_repo="a/b", filename="other.pt", what="t")
    with pytest.raises(WeightsError, match="local path"):
        resolve_file("nobody-here/no-such-repo-xyz", default_repo="a/b", filename="w.pt", what="t")
    with pytest.raises(WeightsError, match="no such"):
        resolve_file("./missing.pt", default_repo="a/b", filename="w.pt", what="t")
    assert resolve_dir(tmp_path, default_repo="a/b", what="t") == tmp_path
    with pytest.raises(WeightsError, match="expected a folder"):
        resolve_dir(tmp_path / "w.pt", default_repo="a/b", what="t")
