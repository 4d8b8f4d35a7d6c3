"""`mmalign annotate` from the command line: init, users, add-task, stats, export."""

from __future__ import annotations

import json

from mmalign.annotate import assign
from mmalign.annotate.db import Database
from mmalign.annotate.people import authenticate
from mmalign.cli import main
from mmalign.data import load_preferences
from tests.annotate import media


def test_cli_round_trip(tmp_path, capsys, new_db):
    db_path = new_db("a")
    assert main(["annotate", "init", "--db", db_path]) == 0
    admin_token = capsys.readouterr().out.strip().split()[-1]
    assert main(["annotate", "init", "--db", db_path]) == 0  # again: nothing to do, no second admin
    assert "token" not in capsys.readouterr().out
    assert main(["annotate", "users", "add", "alice", "--db", db_path]) == 0
    token = capsys.readouterr().out.strip()
    assert main(["annotate", "users", "list", "--db", db_path]) == 0
    users = json.loads(capsys.readouterr().out)
    assert [u["name"] for u in users] == ["admin", "alice"] and users[0]["admin"]
    folder = media.manifest_folder(tmp_path / "m", items=2)
    assert (
        main(
            [
                "annotate",
                "add-task",
                "arena",
                "--kind",
                "pairwise",
                "--from",
                str(folder),
                "--judgements",
                "1",
                "--db",
                db_path,
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["items"] == 2
    assert main(["annotate", "add-task", "arena", "--kind", "pairwise", "--from", str(folder), "--db", db_path]) == 2
    assert "exists already" in capsys.readouterr().err
    db = Database(db_path)
    alice = authenticate(db, token).id
    assert authenticate(db, admin_token).is_admin
    while (a := assign.next_assignment(db, 1, alice)) is not None:
        assign.record(db, a["assignment"], alice, {"choice": 0})
    out = tmp_path / "pairs.jsonl"
    assert main(["annotate", "export", "--task", "arena", "--format", "pairs", "--out", str(out), "--db", db_path]) == 0
    assert len(load_preferences(out)) == 2
    assert main(["annotate", "stats", "--task", "arena", "--db", db_path]) == 0
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1])["complete_items"] == 2
    assert main(["annotate", "users", "revoke", "alice", "--db", db_path]) == 0
    assert authenticate(db, token) is None
    assert main(["annotate", "stats", "--db", new_db("none")]) == 2
    assert "annotate init" in capsys.readouterr().err
