"""The HTTP side of ``mmalign serve`` (FastAPI under uvicorn): routes, authentication, request decoding, errors.
The contract is in :mod:`mmalign.serve`; batching in :mod:`mmalign.serve.batching`; the wire format in
:mod:`mmalign.serve.wire`."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import sys
from collections.abc import AsyncIterator, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ConfigError, MediaError
from ..rewards.base import DTYPE_NAMES, Reward
from .batching import Batcher, QueueFull, RequestTimeout, ShuttingDown
from .wire import MULTIPART, SAFETENSORS, RequestError, check_prompts, decode_tensor_request, scores_payload

logger = logging.getLogger(__name__)

#: the largest request body read (a batch of 16 fp32 1024 px images is 200 MB)
MAX_BODY = 1 << 30
#: the most files a multipart request may carry
MAX_FILES = 1024
RETRY_AFTER_S = 1


@dataclass(frozen=True)
class ServeSettings:
    """The batching and access settings of a server (the ``mmalign serve`` flags of the same names)."""

    max_batch: int = 16
    max_wait_ms: float = 5.0
    queue: int = 256
    timeout: float = 60.0
    token: str | None = None

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ConfigError(f"--max-batch must be at least 1, got {self.max_batch}")
        if self.max_wait_ms < 0:
            raise ConfigError(f"--max-wait-ms must be 0 or more, got {self.max_wait_ms}")
        if self.queue < 1:
            raise ConfigError(f"--queue must be at least 1, got {self.queue}")
        if self.timeout <= 0:
            raise ConfigError(f"--timeout must be positive, got {self.timeout}")
        if self.token is not None and not self.token:
            raise ConfigError("the token is empty")


class ServedReward:
    """One reward behind its batcher: how requests of each kind are keyed, merged and scored."""

    def __init__(self, name: str, reward: Reward, settings: ServeSettings):
        self.name, self.reward = name, reward
        self.batcher = Batcher(
            name,
            self._score,
            self._merge,
            max_batch=settings.max_batch,
            max_wait=settings.max_wait_ms / 1000.0,
            capacity=settings.queue,
            timeout=settings.timeout,
        )

    def info(self) -> dict[str, Any]:
        reward = self.reward
        dtype = getattr(reward, "dtype", torch.float32)
        return {
            "name": self.name,
            "modality": reward.modality,
            "dtype": DTYPE_NAMES.get(dtype, str(dtype)),
            "is_differentiable": False,  # scores come back as numbers: no gradient crosses HTTP
            "higher_is_better": bool(getattr(reward, "higher_is_better", True)),
            "uses_prompt": bool(getattr(reward, "uses_prompt", True)),
            "scale": getattr(reward, "score_scale", ""),
            "stats": self.batcher.stats.as_dict(),
        }

    @staticmethod
    def tensor_key(media: torch.Tensor, options: Mapping[str, Any]) -> Hashable:
        """Tensors share a model call when they stack (shape past the batch axis, dtype) and share options."""
        return ("tensor", tuple(media.shape[1:]), str(media.dtype), tuple(sorted(options.items())))

    @staticmethod
    def _merge(payloads: list[Any]) -> Any:
        if isinstance(payloads[0], torch.Tensor):
            return torch.cat(payloads)
        return [item for payload in payloads for item in payload]

    def _score(self, key: Hashable, payload: Any, prompts: list[str]) -> list[float]:
        with torch.no_grad():
            if key[0] == "tensor":
                scores = self.reward.score_tensor(payload, prompts, **dict(key[3]))
            else:
                scores = self.reward.score_images(payload, prompts, batch_size=len(payload))
        return scores.detach().float().cpu().tolist()


# ---------------------------------------------------------------------------------------------- requests
def _authorize(request: Request, token: str | None) -> None:
    if token is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise RequestError("missing or wrong bearer token (Authorization: Bearer TOKEN)", status=401)


async def _read_body(request: Request) -> bytes:
    """The body, refused (413) past :data:`MAX_BODY` whether or not a Content-Length announced it."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
        raise RequestError(f"request body over {MAX_BODY} bytes", status=413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise RequestError(f"request body over {MAX_BODY} bytes", status=413)
        chunks.append(chunk)
    return b"".join(chunks)


def _decode_images(files: Sequence[tuple[str, bytes]]) -> list[Any]:
    """Decode uploaded files (in a worker thread: decoding is CPU work) with mmalign's checks and size limit."""
    from ..data.records import decode_image

    images = []
    for index, (filename, data) in enumerate(files):
        try:
            images.append(decode_image(data, f"item {index} ({filename or 'unnamed'})"))
        except MediaError as error:
            raise RequestError(f"item {index} ({filename or 'unnamed'}): {error.reason}", item=index) from None
    return images


async def _multipart(request: Request, served: ServedReward) -> tuple[list[Any], list[str]]:
    if served.reward.modality != "image":
        raise RequestError(
            f"{served.name} scores {served.reward.modality}: send a safetensors tensor ({SAFETENSORS}); "
            "multipart uploads are image files",
            status=415,
        )
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
        raise RequestError(f"request body over {MAX_BODY} bytes", status=413)
    try:
        form = await request.form(max_files=MAX_FILES, max_fields=8)
    except (StarletteHTTPException, ValueError, AssertionError) as error:
        detail = getattr(error, "detail", None) or str(error)
        raise RequestError(f"unreadable multipart body ({detail})", status=400) from None
    try:
        uploads = form.getlist("media")
        if not uploads or any(isinstance(item, str) for item in uploads):
            raise RequestError("send the images as files in the multipart field 'media' (one per item)", status=400)
        files = [(item.filename or "", await item.read()) for item in uploads]
        raw = form.get("prompts")
    finally:
        await form.close()
    if raw is not None and not isinstance(raw, str):
        raise RequestError("prompts: send a form field holding a JSON list of strings, not a file", status=400)
    try:
        prompts = check_prompts(json.loads(raw) if raw is not None else None, len(files))
    except json.JSONDecodeError as error:
        raise RequestError(f"prompts: not valid JSON ({error.msg})") from None
    images = await asyncio.to_thread(_decode_images, files)
    return images, prompts


# --------------------------------------------------------------------------------------------------- app
def create_app(rewards: Mapping[str, Reward], settings: ServeSettings | None = None) -> FastAPI:
    """The app serving ``rewards`` (name -> loaded reward); batchers start and stop with the app's lifespan."""
    settings = settings or ServeSettings()
    served = {name: ServedReward(name, reward, settings) for name, reward in rewards.items()}
    if not served:
        raise ConfigError("serve at least one reward")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for item in served.values():
            await item.batcher.start()
        try:
            yield
        finally:
            for item in served.values():
                await item.batcher.stop()

    app = FastAPI(title="mmalign serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.served = served

    def known(name: str) -> ServedReward:
        if name not in served:
            raise RequestError(f"unknown reward {name!r}; this server serves {', '.join(served)}", status=404)
        return served[name]

    @app.exception_handler(RequestError)
    async def request_error(request: Request, error: RequestError) -> Response:
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        return JSONResponse(error.payload(), status_code=error.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        return JSONResponse({"error": str(error.detail), "item": None}, status_code=error.status_code)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "rewards": list(served)}

    @app.get("/rewards")
    async def list_rewards(request: Request) -> dict[str, Any]:
        _authorize(request, settings.token)
        return {"rewards": [item.info() for item in served.values()]}

    @app.post("/{name}/score")
    async def score(name: str, request: Request) -> Response:
        _authorize(request, settings.token)
        target = known(name)
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == SAFETENSORS:
            body = await _read_body(request)  # parsed and checked in a thread: big batches take milliseconds
            media, prompts, options = await asyncio.to_thread(decode_tensor_request, body, target.reward.modality)
            key, payload = ServedReward.tensor_key(media, options), media
        elif content_type == MULTIPART:
            payload, prompts = await _multipart(request, target)
            key = ("images",)
        else:
            raise RequestError(
                f"Content-Type {content_type or 'missing'}: send {SAFETENSORS} (a tensor 'media', prompts in the "
                f"metadata) or {MULTIPART} (image files in 'media', a JSON list in 'prompts')",
                status=415,
            )
        try:
            result = await target.batcher.submit(key, payload, prompts)
        except (QueueFull, ShuttingDown) as error:
            return JSONResponse(
                {"error": str(error), "item": None}, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)}
            )
        except RequestTimeout as error:
            return JSONResponse({"error": str(error), "item": None}, status_code=504)
        except (ValueError, MediaError) as error:  # the reward refused what passed our checks
            return JSONResponse({"error": f"{name}: {error}", "item": None}, status_code=422)
        except Exception as error:  # noqa: BLE001 - a model failure answers 500, the server keeps serving
            logger.exception("%s: scoring failed", name)
            message = f"{name}: scoring failed ({type(error).__name__}: {error})"
            return JSONResponse({"error": message, "item": None}, status_code=500)
        return JSONResponse(
            {
                "reward": name,
                "scores": scores_payload(result.scores),
                "batch_id": result.batch_id,
                "batch_size": result.batch_size,
            }
        )

    return app


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    rewards: Mapping[str, Reward],
    settings: ServeSettings,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
) -> None:
    """Run the app under uvicorn until interrupted. A non-loopback address needs a token: without one anyone who
    can reach the port could use the model."""
    import uvicorn

    if not is_loopback(host) and settings.token is None:
        raise ConfigError(
            f"refusing to listen on {host} without a token: give --token-file FILE or set MMALIGN_SERVE_TOKEN "
            "(and put the server behind a TLS proxy), or listen on 127.0.0.1"
        )
    app = create_app(rewards, settings)
    names = ", ".join(f"{name} ({r.modality}, {DTYPE_NAMES.get(r.dtype, r.dtype)})" for name, r in rewards.items())
    print(
        f"mmalign serve: {names} on http://{host}:{port} (max batch {settings.max_batch}, max wait "
        f"{settings.max_wait_ms:g} ms, queue {settings.queue}, timeout {settings.timeout:g} s, token "
        f"{'required' if settings.token else 'off'})",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
