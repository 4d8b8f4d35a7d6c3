"""A reward served by ``mmalign serve``, used like a local one: ``load_reward("http://127.0.0.1:8000/pickscore")``.

Tensors travel as safetensors (exact floats), files as multipart uploads of their own bytes (Pillow images as
lossless PNG). Connection errors, timeouts, 502/503/504 are retried with capped exponential backoff (honouring
``Retry-After``) until a deadline, so a training run rides out a server restart; a 4xx is the caller's mistake and
is raised at once with the server's message, which names the item at fault. Scoring is idempotent, so a request
the server may have scored before dying is simply sent again.

Environment: ``MMALIGN_REWARD_TOKEN`` (bearer token sent with every request), ``MMALIGN_REWARD_DEADLINE``
(seconds a call keeps retrying, default 300). This module sits at the rewards layer: it imports nothing above it.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

import httpx
import torch
from PIL import Image

from ..errors import ConfigError, MediaError, MMAlignError
from ..modalities.image import broadcast_prompts, pil_to_tensor, to_rgb
from ..rewards.base import DTYPES
from .wire import SAFETENSORS, encode_tensor_request

logger = logging.getLogger(__name__)

TOKEN_ENV = "MMALIGN_REWARD_TOKEN"
DEADLINE_ENV = "MMALIGN_REWARD_DEADLINE"
DEFAULT_DEADLINE = 300.0
#: one attempt's read timeout: longer than the server's default --timeout (60 s), so the server's 504 comes first
DEFAULT_ATTEMPT_TIMEOUT = 90.0
RETRY_STATUSES = frozenset({502, 503, 504})
#: transport failures worth another attempt (not a malformed URL or a local protocol misuse)
RETRY_ERRORS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


class RemoteRewardError(MMAlignError):
    """A served reward refused a request (``status``, ``item``: the index of the item at fault) or stayed
    unreachable past the deadline (``status`` None)."""

    def __init__(self, message: str, status: int | None = None, item: int | None = None):
        super().__init__(message)
        self.status, self.item = status, item


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff: ``first`` s, times ``factor`` per attempt, at most ``cap`` s, ±``jitter`` of it
    (clients restarted together do not retry in lockstep)."""

    first: float = 0.1
    factor: float = 2.0
    cap: float = 5.0
    jitter: float = 0.2

    def delay(self, attempt: int, rng: random.Random) -> float:
        base = min(self.cap, self.first * self.factor ** min(attempt, 64))
        return base * (1.0 + self.jitter * (2.0 * rng.random() - 1.0))


def split_reward_url(url: str) -> tuple[str, str]:
    """``http://host:port[/prefix]/NAME`` -> (``http://host:port[/prefix]``, ``NAME``)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{url!r}: a served reward is http(s)://HOST:PORT/NAME")
    if parts.query or parts.fragment:
        raise ConfigError(f"{url!r}: a served reward's address takes no query or fragment")
    prefix, _, name = parts.path.rstrip("/").rpartition("/")
    if not name:
        raise ConfigError(f"{url!r} names no reward: use {url.rstrip('/')}/NAME (GET /rewards lists them)")
    return urlunsplit((parts.scheme, parts.netloc, prefix, "", "")), name


def _deadline_from_env() -> float:
    raw = os.environ.get(DEADLINE_ENV)
    if raw is None:
        return DEFAULT_DEADLINE
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{DEADLINE_ENV}={raw!r} is not a number of seconds") from None
    if value < 0:
        raise ConfigError(f"{DEADLINE_ENV}={raw!r} must be 0 or more")
    return value


class HTTPReward:
    """The client of one served reward: ``score_tensor``, ``score_images``, ``score``, ``info`` as a local reward.

    ``modality``, ``name``, ``dtype``, ``uses_prompt`` and ``higher_is_better`` come from the server's
    ``/rewards``; scores come back as numbers, so the reward is not differentiable and ``.to()`` is a no-op (the
    scores are put on the device of the media they score). Thread-safe: several threads may share one.
    """

    is_differentiable: ClassVar[bool] = False

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        deadline: float | None = None,
        attempt_timeout: float = DEFAULT_ATTEMPT_TIMEOUT,
        backoff: Backoff = Backoff(),
        transport: httpx.BaseTransport | None = None,
    ):
        self.url = url.rstrip("/")
        self.base, self.remote_name = split_reward_url(self.url)
        self.deadline = _deadline_from_env() if deadline is None else float(deadline)
        self.backoff = backoff
        token = token if token is not None else os.environ.get(TOKEN_ENV)
        headers = {"Authorization": f"Bearer {token.strip()}"} if token else {}
        timeout = httpx.Timeout(attempt_timeout, connect=min(10.0, attempt_timeout))
        self._client = httpx.Client(timeout=timeout, headers=headers, transport=transport)
        self._lock = threading.Lock()
        self._rng = random.Random()
        self.retries = 0  # attempts that were retried, over the client's life
        self._info = self._fetch_info()
        self.name: str = self._info["name"]
        self.modality: str = self._info["modality"]
        self.uses_prompt = bool(self._info.get("uses_prompt", True))
        self.higher_is_better = bool(self._info.get("higher_is_better", True))
        self.score_scale = str(self._info.get("scale", ""))

    @classmethod
    def from_url(
        cls,
        url: str,
        weights: str | None = None,
        processor: str | None = None,
        backbone: str | None = None,
        device: Any = None,
        dtype: Any = None,
        **options: Any,
    ) -> HTTPReward:
        """What :func:`mmalign.rewards.load_reward` builds for a URL. The server holds the model: files are
        refused; ``device`` and ``dtype`` are the server's (scores land on the media's device)."""
        given = [
            flag for flag, value in (("weights", weights), ("processor", processor), ("backbone", backbone)) if value
        ]
        if given:
            raise ConfigError(
                f"{url}: a served reward loads its files on the server; drop {', '.join(given)} "
                "(give them to `mmalign serve` instead)"
            )
        reward = cls(url, **options)
        if dtype is not None and DTYPES.get(str(dtype), dtype) != reward.dtype:
            logger.info("%s: dtype %s asked for; the server scores in %s", url, dtype, reward._info["dtype"])
        return reward

    # -- the reward surface -------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return DTYPES.get(self._info.get("dtype", "fp32"), torch.float32)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def to(self, *args: Any, **kwargs: Any) -> HTTPReward:
        return self

    def eval(self) -> HTTPReward:
        return self

    def info(self) -> dict[str, object]:
        return {
            "reward": self.name,
            "modality": self.modality,
            "higher_is_better": self.higher_is_better,
            "is_differentiable": False,
            "scale": self.score_scale,
            "dtype": self._info.get("dtype", "fp32"),
            "url": self.url,
        }

    def score_tensor(
        self, media: torch.Tensor, prompts: str | Sequence[str] | None = None, **options: Any
    ) -> torch.Tensor:
        """Scores ``[B]`` (float32, on ``media``'s device) of a canonical batch, sent exactly as it is."""
        if not isinstance(media, torch.Tensor):
            raise TypeError(f"score_tensor takes a tensor, got {type(media).__name__}; use score_images for files")
        count = media.shape[0] if media.ndim > 0 else 0
        if count == 0:
            return torch.empty(0, device=media.device)
        prompts = broadcast_prompts(prompts, count)
        body = encode_tensor_request(media, prompts, **options)
        response = self._request("POST", "score", content=body, headers={"Content-Type": SAFETENSORS})
        return self._scores(response, count).to(media.device)

    def __call__(self, media: torch.Tensor, prompts: str | Sequence[str] | None = None, **options: Any) -> torch.Tensor:
        return self.score_tensor(media, prompts, **options)

    def score_images(
        self, images: Sequence[Any], prompts: str | Sequence[str] | None = None, batch_size: int = 32
    ) -> torch.Tensor:
        """Scores (float32, CPU) of image files, encoded bytes or Pillow images, ``batch_size`` per request;
        the server decodes them and preprocesses them as the reference does."""
        images = list(images)
        prompts = broadcast_prompts(prompts, len(images))
        scores = []
        for start in range(0, len(images), max(1, batch_size)):
            chunk = images[start : start + batch_size]
            files = [("media", _upload(item, start + k)) for k, item in enumerate(chunk)]
            data = {"prompts": json.dumps(prompts[start : start + batch_size], ensure_ascii=False)}
            response = self._request("POST", "score", files=files, data=data)
            scores.append(self._scores(response, len(chunk)))
        return torch.cat(scores) if scores else torch.empty(0)

    def score(self, media: Any, prompts: str | Sequence[str] | None = None, batch_size: int = 32) -> torch.Tensor:
        if isinstance(media, torch.Tensor):
            return self.score_tensor(media, prompts)
        if isinstance(media, (Image.Image, str, os.PathLike, bytes)):
            media = [media]
        return self.score_images(list(media), prompts, batch_size)

    # what lifting (video frames, views: mmalign.rewards.lifted) calls on an image reward: the server does the
    # preprocessing, so the "pixels" sent are the canonical frames themselves
    def preprocess_tensor(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def preprocess_reference(self, image: Image.Image) -> torch.Tensor:
        return pil_to_tensor(image)

    def score_pixels(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.score_tensor(pixels, prompts)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> HTTPReward:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"HTTPReward({self.url!r}, modality={self.modality!r})"

    # -- transport ----------------------------------------------------------------------------------------
    def _fetch_info(self) -> dict[str, Any]:
        listing = self._request("GET", "rewards").json().get("rewards", [])
        for info in listing:
            if info.get("name") == self.remote_name:
                return info
        served = ", ".join(str(info.get("name")) for info in listing) or "nothing"
        raise RemoteRewardError(f"{self.url}: the server at {self.base} serves {served}, not {self.remote_name!r}")

    def _scores(self, response: httpx.Response, count: int) -> torch.Tensor:
        scores = response.json().get("scores")
        if not isinstance(scores, list) or len(scores) != count:
            got = len(scores) if isinstance(scores, list) else type(scores).__name__
            raise RemoteRewardError(f"{self.url}: expected {count} scores, got {got}")
        return torch.tensor([float("nan") if s is None else float(s) for s in scores], dtype=torch.float32)

    def _request(self, method: str, what: str, **kwargs: Any) -> httpx.Response:
        """One call with retries until the deadline; ``what`` is ``rewards`` or ``score``."""
        url = f"{self.base}/rewards" if what == "rewards" else f"{self.base}/{self.remote_name}/score"
        start, attempt = time.monotonic(), 0
        while True:
            wait = 0.0
            try:
                response = self._client.request(method, url, **kwargs)
            except RETRY_ERRORS as error:
                problem = f"{type(error).__name__}: {error or 'no detail'}"
            else:
                if response.status_code < 400:
                    return response
                message, item = _error_of(response)
                if response.status_code not in RETRY_STATUSES:
                    raise RemoteRewardError(
                        f"{self.url}: HTTP {response.status_code}: {message}", response.status_code, item
                    )
                problem = f"HTTP {response.status_code}: {message}"
                wait = _retry_after(response)
            delay = max(self.backoff.delay(attempt, self._rng), wait)
            elapsed = time.monotonic() - start
            if elapsed + delay > self.deadline:
                raise RemoteRewardError(
                    f"{self.url}: no answer after {attempt + 1} attempt(s) in {elapsed:.1f} s (deadline "
                    f"{self.deadline:g} s, {DEADLINE_ENV}); last: {problem}"
                )
            logger.warning("%s: %s; retrying in %.2f s (attempt %d)", self.url, problem, delay, attempt + 2)
            with self._lock:
                self.retries += 1
            time.sleep(delay)
            attempt += 1


def _error_of(response: httpx.Response) -> tuple[str, int | None]:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase, None
    if isinstance(body, dict):
        return str(body.get("error") or body.get("detail") or body), body.get("item")
    return str(body)[:500], None


def _retry_after(response: httpx.Response) -> float:
    try:
        return max(0.0, float(response.headers.get("retry-after", "0")))
    except ValueError:  # an HTTP date: not sent by mmalign serve; fall back to the backoff
        return 0.0


def _upload(item: Any, index: int) -> tuple[str, bytes, str]:
    """(filename, bytes, content type) of one image: a file's own bytes, a Pillow image as lossless PNG."""
    if isinstance(item, Image.Image):
        buffer = io.BytesIO()
        to_rgb(item).save(buffer, format="PNG")
        return f"image_{index}.png", buffer.getvalue(), "image/png"
    if isinstance(item, (bytes, bytearray, memoryview)):
        return f"image_{index}", bytes(item), "application/octet-stream"
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        try:
            return path.name, path.read_bytes(), "application/octet-stream"
        except OSError as error:
            raise MediaError(path, f"cannot read ({error.strerror or error})") from None
    raise TypeError(f"item {index}: expected a path, bytes or a Pillow image, got {type(item).__name__}")
