"""The web app in-process (FastAPI's TestClient): login, forms of every task kind, CSRF, security headers,
media confinement, input validation."""

from __future__ import annotations

import os
import re

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from mmalign.annotate.app import CSP, create_app
from mmalign.annotate.db import Judgement, init_database
from mmalign.annotate.people import add_user
from mmalign.annotate.tasks import add_task
from tests.annotate import media


@pytest.fixture
def site(tmp_path, new_db):
    db = init_database(new_db("a"))[0]
    tokens = {"admin": add_user(db, "admin", admin=True), "alice": add_user(db, "alice")}
    add_task(db, "pairs", "pairwise", media.manifest_folder(tmp_path / "p", items=2), judgements=2)
    add_task(db, "rank", "kwise", media.label_folder(tmp_path / "l", prompts=1, k=3), judgements=1)
    add_task(
        db, "rate", "rating", media.manifest_folder(tmp_path / "r", items=1, kind="multiview"), dimensions=["a", "b"]
    )
    add_task(db, "sound", "pairwise", media.manifest_folder(tmp_path / "s", items=1, kind="audio"))
    add_task(db, "film", "pairwise", media.manifest_folder(tmp_path / "v", items=1, kind="video"))
    return db, tokens, tmp_path


def login(client, token):
    client.get("/login")
    response = client.post(
        "/login", data={"token": token, "csrf": client.cookies["mmalign_csrf"]}, follow_redirects=False
    )
    assert response.status_code == 303
    return client.cookies["mmalign_csrf"]


def hidden(html, name):
    return re.search(rf'name="{name}" value="([^"]+)"', html).group(1)


def count(db):
    with db.session() as s:
        return s.scalar(select(func.count(Judgement.id)))


def test_security_headers_everywhere(site):
    db, tokens, _ = site
    client = TestClient(create_app(db))
    for path in ("/login", "/api/health", "/static/app.js", "/nope"):
        response = client.get(path)
        assert response.headers["content-security-policy"] == CSP
        assert "script-src 'self'" in CSP and "unsafe-inline" not in CSP and "frame-ancestors 'none'" in CSP
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["referrer-policy"] == "same-origin"
    assert client.get("/login").headers["cache-control"] == "no-store"
    fresh = TestClient(create_app(db)).get("/login").headers["set-cookie"]
    assert "HttpOnly" in fresh and "SameSite=strict" in fresh
    assert "<script>" not in client.get("/login").text  # no inline script anywhere (CSP would block it)


def test_pairwise_form_flow_and_escaping(site):
    db, tokens, _ = site
    client = TestClient(create_app(db))
    assert client.get("/", follow_redirects=False).headers["location"] == "/login"
    csrf = login(client, tokens["alice"])
    page = client.get("/tasks/1").text
    assert "prompt &lt;b&gt;" in page and "<b>" not in page  # autoescaped
    assert "sd15" not in page and "sdxl" not in page  # blind: no generator names, no file names
    images = re.findall(r'<img src="(/media/[0-9/]+)"', page)
    assert len(images) == 2 and client.get(images[0]).headers["content-type"] == "image/png"
    assignment = hidden(page, "assignment")
    response = client.post(
        "/tasks/1/submit", data={"csrf": csrf, "assignment": assignment, "choice": "1"}, follow_redirects=False
    )
    assert response.status_code == 303 and count(db) == 1
    again = client.post(
        "/tasks/1/submit", data={"csrf": csrf, "assignment": assignment, "choice": "1"}, follow_redirects=False
    )
    assert again.status_code == 303 and count(db) == 1  # a double click counts once
    page = client.get("/tasks/1?saved=1").text
    assert "Saved." in page
    client.post("/tasks/1/submit", data={"csrf": csrf, "assignment": hidden(page, "assignment"), "choice": "tie"})
    assert "Nothing left for you" in client.get("/tasks/1").text and count(db) == 2


def test_kwise_and_rating_forms(site):
    db, tokens, _ = site
    client = TestClient(create_app(db))
    csrf = login(client, tokens["alice"])
    page = client.get("/tasks/2").text
    data = {"csrf": csrf, "assignment": hidden(page, "assignment"), "rank_0": "2", "rank_1": "1", "rank_2": "3"}
    assert client.post("/tasks/2/submit", data=data, follow_redirects=False).status_code == 303
    page = client.get("/tasks/3").text
    assert len(re.findall(r'<img src="/media/3/[0-9/]+"', page)) == 6  # 2 options x 3 views
    data = {"csrf": csrf, "assignment": hidden(page, "assignment")}
    data.update({f"score_{d}_{o}": "4" for d in range(2) for o in range(2)})
    assert client.post("/tasks/3/submit", data=data, follow_redirects=False).status_code == 303
    data["score_0_0"] = "9"
    bad = client.post("/tasks/3/submit", data=data)
    assert bad.status_code in (400, 409)
    assert "<audio src=" in client.get("/tasks/4").text and "<video src=" in client.get("/tasks/5").text
    assert count(db) == 2


def test_validation_errors_are_clear(site):
    db, tokens, _ = site
    client = TestClient(create_app(db))
    headers = {"Authorization": f"Bearer {tokens['alice']}"}
    a = client.post("/api/tasks/1/next", headers=headers).json()["assignment"]
    cases = [
        ({"assignment": a["assignment"], "answer": {"choice": 3}}, 400, "0, 1 or"),
        ({"assignment": a["assignment"], "answer": {"ranks": [1]}}, 400, "choice"),
        ({"assignment": "x", "answer": {}}, 422, "assignment"),
        ({"assignment": a["assignment"], "answer": {}, "bogus": 1}, 422, "bogus"),
        ({"assignment": a["assignment"], "answer": {"choice": 0}, "seconds": -1}, 422, "seconds"),
        ({"assignment": 999, "answer": {"choice": 0}}, 404, "of yours"),
    ]
    for body, status, message in cases:
        response = client.post("/api/judgements", json=body, headers=headers)
        assert response.status_code == status, (body, response.text)
        assert message in response.json()["error"]
    huge = client.post(
        "/api/judgements", content=b"{" + b" " * 70000 + b"}", headers={**headers, "content-type": "application/json"}
    )
    assert huge.status_code == 413
    assert client.post("/api/tasks/99/next", headers=headers).status_code == 404
    ok = client.post(
        "/api/judgements", json={"assignment": a["assignment"], "answer": {"choice": 0}, "next": True}, headers=headers
    )
    assert ok.status_code == 201 and ok.json()["next"]["assignment"] != a["assignment"]


def test_no_anonymous_writes_and_csrf(site):
    db, tokens, _ = site
    client = TestClient(create_app(db))
    assert client.post("/api/tasks/1/next").status_code == 401
    assert client.post("/api/tasks/1/next", headers={"Authorization": "Bearer mma_wrong"}).status_code == 401
    assert client.post("/tasks/1/submit", data={"assignment": "1", "choice": "0"}).status_code == 401
    csrf = login(client, tokens["alice"])
    assignment = hidden(client.get("/tasks/1").text, "assignment")
    for data, headers in [
        ({"assignment": assignment, "choice": "0"}, {}),  # no token
        ({"assignment": assignment, "choice": "0", "csrf": "x" * 43}, {}),  # wrong token
        ({"assignment": assignment, "choice": "0", "csrf": csrf}, {"Origin": "http://evil.example"}),
    ]:
        response = client.post("/tasks/1/submit", data=data, headers=headers)
        assert response.status_code == 403 and ("CSRF" in response.text or "cross-origin" in response.text)
    assert client.post("/api/tasks/1/next").status_code == 403  # cookie session without the CSRF header
    assert client.post("/api/tasks/1/next", headers={"X-CSRF-Token": csrf}).status_code == 200
    assert count(db) == 0
    login_csrf = TestClient(create_app(db)).post("/login", data={"token": tokens["alice"]})
    assert login_csrf.status_code == 403  # login needs the form's CSRF token too


def test_media_only_from_the_task_folder(site):
    db, tokens, tmp = site
    client = TestClient(create_app(db))
    assert client.get("/media/1/1/0/0").status_code == 401  # media need a login
    headers = {"Authorization": f"Bearer {tokens['alice']}"}
    assert client.get("/media/1/1/0/0", headers=headers).status_code == 200
    secret = tmp / "secret.txt"
    secret.write_text("top secret")
    for path in [
        "/media/1/../../secret.txt",
        "/media/1/%2e%2e/%2e%2e/secret.txt",
        "/media/1/..%2f..%2fsecret.txt",
        f"/media/1/1/0/{secret}",
        "/media/1/1/0/0/../../../../etc/passwd",
        "/media/1/3/0/0",  # an item of another task
        "/media/2/1/0/0",
        "/media/1/1/5/0",
        "/media/1/1/0/-1",
        "/media/1/1/0/0%00",
        "/static/../secret.txt",
        "/static/%2e%2e/%2e%2e/secret.txt",
    ]:
        response = client.get(path, headers=headers)
        assert response.status_code in (404, 422), path
        assert "top secret" not in response.text and "root:" not in response.text
    # a file of the task replaced by a symlink that points out of the folder is refused
    target = tmp / "p" / "sd15" / "0.png"
    os.remove(target)
    os.symlink(secret, target)
    fresh = TestClient(create_app(db))
    assert fresh.get("/media/1/1/0/0", headers=headers).status_code == 404


def test_admin_page(site):
    db, tokens, _ = site
    client = TestClient(create_app(db))
    headers = {"Authorization": f"Bearer {tokens['alice']}"}
    assert client.get("/admin", headers=headers).status_code == 403
    assert client.get("/api/tasks/1/stats", headers=headers).status_code == 403
    a = client.post("/api/tasks/1/next", headers=headers).json()["assignment"]
    client.post("/api/judgements", json={"assignment": a["assignment"], "answer": {"choice": 0}}, headers=headers)
    admin = {"Authorization": f"Bearer {tokens['admin']}"}
    page = client.get("/admin", headers=admin)
    assert page.status_code == 200 and "alice" in page.text and "Krippendorff" in page.text
    stats = client.get("/api/tasks/1/stats", headers=admin).json()
    assert stats["human_judgements"] == 1 and stats["annotators"][0]["annotator"] == "alice"
