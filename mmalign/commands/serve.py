"""``mmalign serve``: registered rewards over HTTP with dynamic batching (FastAPI + uvicorn).

    mmalign serve --reward pickscore --weights PickScore_v1/ --processor CLIP-ViT-H-14/ --port 8000
    mmalign train train/ddpo ... reward=http://127.0.0.1:8000/pickscore

The endpoints, wire format and statuses are documented in :mod:`mmalign.serve`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import ConfigError
from ._reward_args import add_reward_file_options

TOKEN_ENV = "MMALIGN_SERVE_TOKEN"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve rewards over HTTP with dynamic batching (use them as reward=http://HOST:PORT/NAME)",
        description="Serve registered rewards over HTTP: POST /NAME/score (safetensors tensors or image files), "
        "GET /rewards, GET /health. Each --weights/--processor/--backbone belongs to the --reward before it.",
    )
    group = p.add_argument_group("rewards (each --reward may be followed by its own files)")
    add_reward_file_options(group, "registered reward name (repeat to serve several)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--host", default="127.0.0.1", help="listen address (loopback by default)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=16, help="most items per model call")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits for more requests")
    p.add_argument("--queue", type=int, default=256, help="requests waiting per reward before 503s")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds a request may wait to be scored (then 504)")
    p.add_argument(
        "--token-file", metavar="FILE", help=f"bearer token required on every call but /health (default ${TOKEN_ENV})"
    )
    p.set_defaults(func=run, rewards=[])


def read_token(token_file: str | None) -> str | None:
    """The token from ``--token-file`` (surrounding whitespace stripped) or the environment; None for no token."""
    if token_file is None:
        return os.environ.get(TOKEN_ENV) or None
    path = Path(token_file)
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as error:
        raise ConfigError(f"--token-file {path}: cannot read ({error.strerror or error})") from None
    if not token:
        raise ConfigError(f"--token-file {path}: the file is empty")
    return token


def served_name(spec: str) -> str:
    """The name a reward is served under (``/NAME/score``): its registry name, or for ``ensemble:FILE`` the
    file's stem as ``ensemble-STEM`` (a path cannot be one URL segment)."""
    if spec.startswith("ensemble:"):
        return "ensemble-" + Path(spec[len("ensemble:") :]).stem
    return spec


def run(args: argparse.Namespace) -> int:
    from ..rewards import is_reward_url, load_reward
    from ..scoring import device_and_threads
    from ..serve.app import ServeSettings, serve

    if not args.rewards:
        raise ConfigError("name at least one --reward to serve")
    names = [served_name(spec.name) for spec in args.rewards]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"--reward {', '.join(duplicates)} given twice: a server serves each name once")
    remote = [name for name in names if is_reward_url(name)]
    if remote:
        raise ConfigError(f"--reward {remote[0]}: serve a registered reward (`mmalign list`), not an address")
    settings = ServeSettings(
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        queue=args.queue,
        timeout=args.timeout,
        token=read_token(args.token_file),
    )
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port}: must be in 1-65535")
    device = device_and_threads(args.device)
    rewards = {
        served_name(spec.name): load_reward(
            spec.name,
            weights=spec.weights,
            processor=spec.processor,
            backbone=spec.backbone,
            device=device,
            dtype=args.dtype,
        ).eval()
        for spec in args.rewards
    }
    serve(rewards, settings, host=args.host, port=args.port)
    return 0
