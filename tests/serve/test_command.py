"""`mmalign serve` argument handling that needs no running server: where the token comes from, and what is
refused before anything listens."""

from __future__ import annotations

import pytest

from mmalign.cli import main
from mmalign.commands.serve import read_token
from mmalign.errors import ConfigError


def test_the_token_comes_from_the_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("MMALIGN_SERVE_TOKEN", raising=False)
    assert read_token(None) is None
    monkeypatch.setenv("MMALIGN_SERVE_TOKEN", "from-env")
    assert read_token(None) == "from-env"
    (tmp_path / "token").write_text("  from-file\n")
    assert read_token(str(tmp_path / "token")) == "from-file"  # the file wins over the environment
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="the file is empty"):
        read_token(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="cannot read"):
        read_token(str(tmp_path / "missing"))


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--reward", "jpeg-compressibility", "--host", "0.0.0.0"], "refusing to listen on 0.0.0.0 without a token"),
        (["--reward", "jpeg-compressibility", "--reward", "jpeg-compressibility"], "given twice"),
        (["--reward", "http://127.0.0.1:8000/hps"], "serve a registered reward"),
        (["--reward", "jpeg-compressibility", "--max-batch", "0"], "--max-batch must be at least 1"),
        (["--reward", "no-such-reward"], "unknown reward 'no-such-reward'"),
    ],
)
def test_refused_before_listening(argv, message, monkeypatch, capsys):
    monkeypatch.delenv("MMALIGN_SERVE_TOKEN", raising=False)
    assert main(["serve", *argv]) == 2
    assert message in capsys.readouterr().err


def test_weights_must_follow_their_reward(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--weights", "w.pt", "--reward", "pickscore"])
    assert "--weights must follow the --reward it belongs to" in capsys.readouterr().err


def test_an_ensemble_is_served_under_its_file_stem():
    from mmalign.commands.serve import served_name

    assert served_name("ensemble:runs/fit/hpdv2.json") == "ensemble-hpdv2"
    assert served_name("pickscore") == "pickscore"
