"""`mmalign serve` as a subprocess on a free loopback port, used through HTTPReward and raw httpx: concurrent
clients each get their own scores, bad input is refused naming the item while the server keeps serving, the
token, a full queue answering 503 that the client's retry rides out, and `label`, `score` and `bench` taking the
URL as they take a local name."""

from __future__ import annotations

import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch

from mmalign.cli import main
from mmalign.serve.client import HTTPReward, RemoteRewardError
from mmalign.serve.wire import SAFETENSORS, encode_tensor_request
from tests import tiny
from tests.serve.conftest import TOKEN
from tests.tolerances import kernel_approx

# Bit-equality between the server and the test process rests on both running the same kernels: one intra-op
# thread on each side (the server subprocesses get OMP_NUM_THREADS=1).
pytestmark = pytest.mark.usefixtures("one_thread")

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def stats(url: str, token: str = TOKEN) -> dict:
    info = httpx.get(f"{url}/rewards", headers={"Authorization": f"Bearer {token}"}, timeout=10).json()
    return info["rewards"][0]["stats"]


def post_tensor(url: str, media: torch.Tensor, prompts, headers=AUTH, name: str = "pickscore") -> httpx.Response:
    body = encode_tensor_request(media, prompts)
    return httpx.post(f"{url}/{name}/score", content=body, headers={**headers, "Content-Type": SAFETENSORS})


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------------------
def test_concurrent_clients_each_get_their_own_scores(server, local_reward, monkeypatch):
    """8 clients x 200 requests of 1-3 items drawn from 40 (image, prompt) items: every request answered once,
    with its own items' scores, equal to the in-process reward scoring each item alone.

    Tolerance: a request's items share a model call with other requests' items, and BLAS rounds differently for
    different batch sizes; tests/tolerances.py's KERNEL_RTOL (1e-5) was measured on this very architecture (a
    tiny PickScore CLIP, batches of 1 to 8). Here too: on this machine the largest relative difference between
    an item scored alone and in batches of 2-16 was 1.1e-6. The 40 items' scores are at least 1e-3 apart
    (checked below), so a score handed to the wrong request cannot pass."""
    monkeypatch.setenv("MMALIGN_REWARD_TOKEN", TOKEN)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(40, 3, 32, 32, generator=generator)
    prompts = [f"prompt number {i % 5}" for i in range(40)]
    with torch.no_grad():
        expected = torch.cat([local_reward.score_tensor(images[i : i + 1], prompts[i : i + 1]) for i in range(40)])
    gaps = (expected[:, None] - expected[None, :]).abs() + torch.eye(40) * 1e9
    assert float(gaps.min()) > 1e-3

    before = stats(server.url)
    clients = [HTTPReward(f"{server.url}/pickscore") for _ in range(8)]

    def one_client(c: int) -> list[tuple[list[int], list[float]]]:
        rng = np.random.default_rng(c)
        answers = []
        for _ in range(200):
            index = rng.choice(40, size=int(rng.integers(1, 4)), replace=False).tolist()
            scores = clients[c].score_tensor(images[index], [prompts[i] for i in index])
            answers.append((index, scores.tolist()))
        return answers

    with ThreadPoolExecutor(8) as pool:
        answers = [a for chunk in pool.map(one_client, range(8)) for a in chunk]
    after = stats(server.url)

    assert len(answers) == 1600
    for index, scores in answers:
        assert scores == kernel_approx(expected[index].tolist()), index
    assert sum(client.retries for client in clients) == 0  # nothing was sent twice...
    items = sum(len(index) for index, _ in answers)
    assert after["requests"] - before["requests"] == 1600 and after["items"] - before["items"] == items  # ...or lost
    assert after["failures"] == before["failures"] and after["timeouts"] == before["timeouts"]
    assert after["batches"] - before["batches"] < 1600  # requests did share model calls


def test_bad_input_is_refused_naming_the_item_and_the_server_keeps_serving(server, local_reward):
    good, broken = png(tiny.random_image(0, (40, 30))), b"\x89PNG\r\n\x1a\n truncated"
    files = [("media", ("good.png", good, "image/png")), ("media", ("broken.png", broken, "image/png"))]
    response = httpx.post(f"{server.url}/pickscore/score", files=files, data={"prompts": '["a", "b"]'}, headers=AUTH)
    assert response.status_code == 422 and response.json()["item"] == 1
    assert response.json()["error"].startswith("item 1 (broken.png): ")

    response = httpx.post(
        f"{server.url}/pickscore/score", files=files[:1], data={"prompts": '["a", "b"]'}, headers=AUTH
    )
    assert response.status_code == 422 and "2 prompt(s) for 1 item(s)" in response.json()["error"]

    media = torch.rand(4, 3, 16, 16)
    media[2, 0, 3, 3] = 1.25
    response = post_tensor(server.url, media, ["p"] * 4)
    assert response.status_code == 422 and response.json()["item"] == 2
    assert response.json()["error"].startswith("item 2: values outside [0, 1]") and "max 1.25" in response.text
    cases = [
        (torch.rand(2, 4, 16, 16), "image rewards take [B, 3, H, W], got shape [2, 4, 16, 16]"),
        ((torch.rand(2, 3, 16, 16) * 255).to(torch.uint8), "expected a float tensor"),
        (torch.rand(3, 16, 16), "got shape [3, 16, 16]"),
    ]
    for bad, message in cases:
        response = post_tensor(server.url, bad, ["p"] * bad.shape[0])
        assert response.status_code == 422 and message in response.json()["error"], response.text
    assert post_tensor(server.url, torch.rand(2, 3, 8, 8), ["p", "q"], name="hpsv2").status_code == 404
    response = httpx.post(
        f"{server.url}/pickscore/score", content=b"not safetensors", headers={**AUTH, "Content-Type": SAFETENSORS}
    )
    assert response.status_code == 400 and "not a readable safetensors file" in response.json()["error"]
    response = httpx.post(f"{server.url}/pickscore/score", json={"media": []}, headers=AUTH)
    assert response.status_code == 415

    reward = HTTPReward(f"{server.url}/pickscore", token=TOKEN)
    with pytest.raises(RemoteRewardError, match="item 2: values outside") as caught:
        reward.score_tensor(media, "p")
    assert caught.value.item == 2 and reward.retries == 0  # a 4xx is never retried

    fine = torch.rand(2, 3, 16, 16)
    response = post_tensor(server.url, fine, ["p", "q"])
    assert response.status_code == 200 and response.json()["reward"] == "pickscore"
    assert torch.equal(torch.tensor(response.json()["scores"]), local_reward.score_tensor(fine, ["p", "q"]).detach())


def test_the_token(server):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok", "rewards": ["pickscore"]}
    response = httpx.get(f"{server.url}/rewards")
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    assert post_tensor(server.url, torch.rand(1, 3, 8, 8), ["p"], headers={}).status_code == 401
    wrong = {"Authorization": "Bearer " + TOKEN[:-1]}
    assert post_tensor(server.url, torch.rand(1, 3, 8, 8), ["p"], headers=wrong).status_code == 401
    with pytest.raises(RemoteRewardError, match="HTTP 401: missing or wrong bearer token") as caught:
        HTTPReward(f"{server.url}/pickscore", token="wrong", deadline=60)
    assert caught.value.status == 401
    info = httpx.get(f"{server.url}/rewards", headers=AUTH).json()["rewards"][0]
    assert {k: info[k] for k in ("name", "modality", "dtype", "is_differentiable")} == {
        "name": "pickscore",
        "modality": "image",
        "dtype": "fp32",
        "is_differentiable": False,
    }


def keep_busy(url: str, items: int = 2000) -> tuple[threading.Thread, list]:
    """One request of ``items`` tiny images, scored alone in ``items / 16`` model calls (half a second here): returns
    once the server has taken it, while its model is busy with it."""
    before, answers = stats(url)["requests"], []
    heavy = torch.rand(items, 3, 16, 16)
    thread = threading.Thread(target=lambda: answers.append(post_tensor(url, heavy, ["busy"] * items)))
    thread.start()
    while stats(url)["requests"] == before:
        time.sleep(0.005)
    return thread, answers


def test_a_full_queue_answers_503_and_the_clients_retry_succeeds(server, local_reward, monkeypatch):
    """The queue holds 8 requests (--queue 8). While a large request keeps the model busy, 12 requests at once:
    8 wait, the others are refused at once with 503 + Retry-After. Then, behind another large request, 12
    HTTPReward clients at once: the refused ones retry until they are scored, each with its own scores."""
    monkeypatch.setenv("MMALIGN_REWARD_TOKEN", TOKEN)
    media = torch.rand(12, 2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    prompts = ["a red apple", "the sun"]
    before = stats(server.url)

    busy, answers = keep_busy(server.url)
    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda m: post_tensor(server.url, m, prompts), media))
    busy.join()
    refused = [r for r in responses if r.status_code == 503]
    assert answers[0].status_code == 200 and sum(r.status_code == 200 for r in responses) >= 8
    assert len(refused) + sum(r.status_code == 200 for r in responses) == 12 and refused
    assert all(r.headers["retry-after"] == "1" and "8 requests are waiting" in r.json()["error"] for r in refused)

    clients = [HTTPReward(f"{server.url}/pickscore") for _ in range(12)]
    busy, answers = keep_busy(server.url)
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda c, m: c.score_tensor(m, prompts), clients, media))
    busy.join()
    assert sum(client.retries for client in clients) > 0
    with torch.no_grad():
        for m, scores in zip(media, results):
            assert scores.tolist() == kernel_approx(local_reward.score_tensor(m, prompts).tolist())
    assert stats(server.url)["queue_full"] - before["queue_full"] >= len(refused) + 1


# ------------------------------------------------------------------------------------------------------------
def test_label_takes_the_url_as_a_local_name(server, reward_folder, sd_folder, prompts_file, tmp_path, monkeypatch):
    """`mmalign label --reward http://...` writes what `--reward pickscore --reward-weights ...` writes: the same
    images, scores and pairs (each prompt's K images are one request, scored alone: the same model call)."""
    monkeypatch.setenv("MMALIGN_REWARD_TOKEN", TOKEN)
    common = ["--model", sd_folder, "--prompts", prompts_file, "--k", 3, "--steps", 2, "--resolution", 32]
    served, local = tmp_path / "served", tmp_path / "local"
    for argv in (
        ["label", "--reward", f"{server.url}/pickscore", "--out", served, *common],
        ["label", "--reward", "pickscore", "--reward-weights", reward_folder, "--out", local, *common],
    ):
        assert main([str(a) for a in argv]) == 0
    for name in ("rankings.jsonl", "pairs.jsonl"):
        assert (served / name).read_text() == (local / name).read_text()
    rows = [json.loads(line) for line in (served / "rankings.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and len({s for row in rows for s in row["scores"]}) == 12


def test_score_and_bench_take_the_url(server, reward_folder, tmp_path, monkeypatch):
    """`mmalign score` (the scoring job `bench generators` runs too) and `mmalign bench rewards`."""
    monkeypatch.setenv("MMALIGN_REWARD_TOKEN", TOKEN)
    url = f"{server.url}/pickscore"
    rows, paths = [], []
    for g in range(2):
        names = []
        for i in range(3):
            path = tmp_path / f"{g}_{i}.png"
            tiny.random_image(10 * g + i, (48 + 8 * i, 40)).save(path)
            names.append(path.name)
            paths.append(path)
        rows.append({"prompt": f"prompt {g}", "image_path": names, "rank": [1, 2, 3]})
    (tmp_path / "test.json").write_text(json.dumps(rows))

    for reward, extra, out in ((url, [], "served.jsonl"), ("pickscore", ["--weights", reward_folder], "local.jsonl")):
        argv = ["score", "--reward", reward, *extra, "--prompt", "a fox", "--out", tmp_path / out, "--no-progress"]
        assert main([str(a) for a in [*argv, *paths]]) == 0
    served = [json.loads(line) for line in (tmp_path / "served.jsonl").read_text().splitlines()]
    local = [json.loads(line) for line in (tmp_path / "local.jsonl").read_text().splitlines()]
    assert [r["score"] for r in served] == [r["score"] for r in local] and len(served) == 6
    assert {r["reward"] for r in served} == {"pickscore"} and {r["dtype"] for r in served} == {"fp32"}

    results = {}
    for reward, extra, out in ((url, [], "bench-served"), ("pickscore", ["--weights", reward_folder], "bench-local")):
        argv = ["bench", "rewards", "--protocol", "hpdv2", "--data", tmp_path / "test.json", "--reward", reward]
        argv += [*extra, "--bootstrap", 10, "--out", tmp_path / out, "--no-progress"]
        assert main([str(a) for a in argv]) == 0
        (result,) = [p for p in (tmp_path / out).glob("*.json") if p.name.endswith("hpdv2_test.json")]
        results[out] = json.loads(result.read_text())["metrics"]["accuracy"]["value"]
    assert results["bench-served"] == results["bench-local"]
