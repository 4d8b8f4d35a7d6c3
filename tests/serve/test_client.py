"""The client without a server (httpx's MockTransport answers in process): what it sends, which answers it
retries and which it raises, the deadline; and reward specs that hold URLs."""

from __future__ import annotations

import httpx
import pytest
import torch

from mmalign.errors import ConfigError
from mmalign.rewards import load_reward
from mmalign.serve.client import Backoff, HTTPReward, RemoteRewardError, split_reward_url
from mmalign.serve.wire import SAFETENSORS, RequestError, decode_tensor_request, encode_tensor_request
from mmalign.trainers.online import parse_reward_spec

INFO = {"name": "pickscore", "modality": "image", "dtype": "bf16", "uses_prompt": True, "higher_is_better": True}
FAST = Backoff(first=0.001, cap=0.002)


class FakeServer:
    """Answers /rewards, and /pickscore/score from a script of (status, body, headers) or exceptions; scored
    requests are decoded and kept."""

    def __init__(self, script=()):
        self.script, self.received, self.headers = list(script), [], []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.headers.append(dict(request.headers))
        if request.url.path == "/rewards":
            return httpx.Response(200, json={"rewards": [INFO]})
        step = self.script.pop(0) if self.script else None
        if isinstance(step, Exception):
            raise step
        if step is not None:
            status, body, headers = step
            return httpx.Response(status, json=body, headers=headers)
        media, prompts, options = decode_tensor_request(request.read(), "image")
        self.received.append((media, prompts, options))
        return httpx.Response(200, json={"reward": "pickscore", "scores": media.mean(dim=(1, 2, 3)).tolist()})


def client(server, **kwargs) -> HTTPReward:
    return HTTPReward("http://test:8000/pickscore", transport=httpx.MockTransport(server), backoff=FAST, **kwargs)


def test_tensors_travel_exactly_and_info_comes_from_the_server(monkeypatch):
    monkeypatch.setenv("MMALIGN_REWARD_TOKEN", "tok")
    server = FakeServer()
    reward = client(server)
    assert (reward.name, reward.modality, reward.dtype, reward.is_differentiable) == (
        "pickscore",
        "image",
        torch.bfloat16,
        False,
    )
    assert reward.to("cuda") is reward  # a no-op: the model is the server's
    media = torch.rand(3, 3, 5, 7, generator=torch.Generator().manual_seed(0))
    scores = reward.score_tensor(media, "a fox")
    sent, prompts, _ = server.received[0]
    assert torch.equal(sent, media) and prompts == ["a fox"] * 3
    assert torch.equal(scores, media.mean(dim=(1, 2, 3)))  # float32 -> JSON -> float32, unchanged
    assert server.headers[-1]["authorization"] == "Bearer tok" and server.headers[-1]["content-type"] == SAFETENSORS


def test_connection_errors_503_and_timeouts_are_retried_4xx_never():
    retried = [
        httpx.ConnectError("refused"),
        (503, {"error": "queue full"}, {"Retry-After": "0"}),
        httpx.ReadTimeout("slow"),
        httpx.RemoteProtocolError("server disconnected"),
        (504, {"error": "not scored in time"}, {}),
    ]
    server = FakeServer(retried)
    reward = client(server)
    assert reward.score_tensor(torch.full((1, 3, 2, 2), 0.5), "p").tolist() == [0.5]
    assert reward.retries == 5

    server.script = [(422, {"error": "item 1: values outside [0, 1]", "item": 1}, {})]
    with pytest.raises(RemoteRewardError, match="item 1: values outside") as caught:
        reward.score_tensor(torch.rand(2, 3, 2, 2), "p")
    assert (caught.value.status, caught.value.item, reward.retries) == (422, 1, 5)  # not retried


def test_the_deadline_ends_the_retries():
    server = FakeServer([(503, {"error": "queue full"}, {})] * 1000)
    reward = client(server, deadline=0.05)
    with pytest.raises(RemoteRewardError, match="no answer after .* attempt.*last: HTTP 503: queue full"):
        reward.score_tensor(torch.rand(1, 3, 2, 2), "p")
    assert reward.retries >= 2


def test_unknown_remote_name_and_files_given_to_a_url():
    server = FakeServer()
    with pytest.raises(RemoteRewardError, match="serves pickscore, not 'hps'"):
        HTTPReward("http://test:8000/hps", transport=httpx.MockTransport(server), backoff=FAST)
    with pytest.raises(ConfigError, match="drop weights"):
        load_reward("http://test:8000/pickscore", weights="model/", transport=httpx.MockTransport(server))
    with pytest.raises(ConfigError, match="names no reward"):
        split_reward_url("http://127.0.0.1:8000")
    assert split_reward_url("https://h/prefix/hpsv2.1/") == ("https://h/prefix", "hpsv2.1")


def test_reward_specs_with_urls():
    assert parse_reward_spec("http://127.0.0.1:8000/hps") == [("http://127.0.0.1:8000/hps", 1.0)]
    assert parse_reward_spec("http://127.0.0.1:8000/hps:0.5,aesthetic:0.2") == [
        ("http://127.0.0.1:8000/hps", 0.5),
        ("aesthetic", 0.2),
    ]
    assert parse_reward_spec("aesthetic:2,http://[::1]:9000/x/pickscore") == [
        ("aesthetic", 2.0),
        ("http://[::1]:9000/x/pickscore", 1.0),
    ]
    assert parse_reward_spec("http://host/hps:0.25") == [("http://host/hps", 0.25)]
    with pytest.raises(ConfigError, match="weight 'x' of 'hps'"):
        parse_reward_spec("hps:x")


def test_wire_checks_name_the_item():
    good = torch.rand(3, 3, 4, 4)
    bad = good.clone()
    bad[2, 1, 0, 0] = float("nan")
    with pytest.raises(RequestError, match="item 2: values are not all finite") as caught:
        decode_tensor_request(encode_tensor_request(bad, ["a", "b", "c"]), "image")
    assert caught.value.item == 2
    with pytest.raises(RequestError, match=r"video rewards take \[B, T, 3, H, W\]"):
        decode_tensor_request(encode_tensor_request(good, ["a"] * 3), "video")
    with pytest.raises(RequestError, match="expected a float tensor"):
        decode_tensor_request(encode_tensor_request((good * 255).to(torch.uint8), ["a"] * 3), "image")
    with pytest.raises(RequestError, match=r"2 prompt\(s\) for 3 item"):
        decode_tensor_request(encode_tensor_request(good, ["a", "b"]), "image")
    audio = torch.rand(2, 1, 100) * 2 - 1
    media, prompts, options = decode_tensor_request(
        encode_tensor_request(audio, ["x", "y"], sample_rate=16000), "audio"
    )
    assert torch.equal(media, audio) and options == {"sample_rate": 16000} and prompts == ["x", "y"]
    with pytest.raises(RequestError, match="sample_rate: expected a positive int"):
        body = encode_tensor_request(audio, ["x", "y"], sample_rate=-3)
        decode_tensor_request(body, "audio")


def test_a_served_image_reward_lifts_to_videos():
    """A video generator's trainer lifts image rewards to its videos (the mean over up to 8 frames): the frames go
    to the server as images and the scores are averaged here."""
    from mmalign.rewards.lifted import lift

    server = FakeServer()
    video_reward = lift(client(server), "video")
    videos = torch.rand(2, 4, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    scores = video_reward.score_tensor(videos, ["a", "b"])
    ((sent, prompts, _),) = server.received
    assert torch.equal(sent, videos.flatten(0, 1)) and prompts == ["a"] * 4 + ["b"] * 4
    torch.testing.assert_close(scores, videos.mean(dim=(2, 3, 4)).mean(dim=1))
