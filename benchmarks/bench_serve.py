"""A served reward (`mmalign serve` + HTTPReward) against the same reward scoring in process, in the same run.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_serve.py [--models clip-b32,tiny] [--requests 48] [--threads 1]

For each model (random weights in the PickScore format: ``clip-b32`` is CLIP ViT-B/32's architecture, ``tiny`` the
tests' 64 px CLIP, where the HTTP overhead shows alone) and for 1 and 8 concurrent clients, each client sends
``--requests`` requests of ``--items`` images (float ``[items, 3, 256, 256]`` in [0, 1], as a trainer sends them)
one after the other. In process, the clients are threads calling ``score_tensor`` on one shared reward; over HTTP,
threads each with its own HTTPReward against one server (`--max-batch 16`, `--max-wait-ms` 5 by default as the
server's).
Reported: per-request latency p50 and p99 and throughput (items/s), and their ratios HTTP / in process; the mean
model batch the server formed; the CPU that other processes used meanwhile (the machine may be shared).

Both sides run the model on ``--threads`` intra-op threads (the server as OMP_NUM_THREADS). The clients are threads
of this process (one GIL), not separate processes: their encoding time is part of the HTTP latency.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import REPO, RESULTS, busy_cpu_seconds, cpu_flags, cpu_model, versions  # noqa: E402

MODELS = {
    "clip-b32": dict(  # openai/clip-vit-base-patch32's sizes
        image_size=224,
        projection_dim=512,
        text=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
        vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    ),
    "tiny": dict(image_size=64, projection_dim=32),
}
PROMPTS = [f"a photograph of {thing}, highly detailed" for thing in ("a fox", "a red car", "two cats", "a lake")]
FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")


def build(model: str, folder: Path) -> Path:
    sys.path.insert(0, str(REPO))
    from tests import tiny

    return tiny.make_clip_model(folder / model, **MODELS[model])


def start_server(folder: Path, port: int, threads: int, log: Path, max_wait_ms: float) -> subprocess.Popen:
    import httpx

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "mmalign.cli", "serve", "--reward", "pickscore", "--weights", str(folder)]
    process = subprocess.Popen(
        [*command, "--port", str(port), "--max-wait-ms", str(max_wait_ms)],
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("server did not start in 300 s")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_of(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def phase(score_fns, requests: int, batches, server_pid: int | None) -> dict:
    """``len(score_fns)`` client threads, each sending ``requests`` requests in turn; latencies and throughput."""
    latencies: list[float] = []
    lock, barrier = threading.Lock(), threading.Barrier(len(score_fns) + 1)

    def client(c: int) -> None:
        barrier.wait()
        for r in range(requests):
            media = batches[(c * requests + r) % len(batches)]
            prompts = [PROMPTS[(c + r + k) % len(PROMPTS)] for k in range(media.shape[0])]
            start = time.perf_counter()
            scores = score_fns[c](media, prompts)
            elapsed = time.perf_counter() - start
            assert scores.shape == (media.shape[0],)
            with lock:
                latencies.append(elapsed)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(len(score_fns))]
    for thread in threads:
        thread.start()
    busy, own, server = busy_cpu_seconds(), time.process_time(), cpu_of(server_pid) if server_pid else 0.0
    load = os.getloadavg()[0]
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    ours = time.process_time() - own + ((cpu_of(server_pid) - server) if server_pid else 0.0)
    items = sum(int(batches[i % len(batches)].shape[0]) for i in range(len(score_fns) * requests))
    return {
        "p50_ms": float(np.percentile(latencies, 50) * 1000),
        "p99_ms": float(np.percentile(latencies, 99) * 1000),
        "items_per_s": items / seconds,
        "seconds": seconds,
        "requests": len(latencies),
        "other_cores": max(0.0, (busy_cpu_seconds() - busy - ours) / seconds),
        "load_start": load,
        "load_end": os.getloadavg()[0],
    }


def measure(model: str, folder: Path, args: argparse.Namespace, log: Path) -> list[dict]:
    import httpx
    import torch

    import mmalign
    from mmalign.serve.client import HTTPReward

    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.rand(args.items, 3, 256, 256, generator=generator) for _ in range(16)]
    local = mmalign.load_reward("pickscore", weights=str(folder))
    port = free_port()
    server = start_server(folder, port, args.threads, log, args.max_wait_ms)
    url = f"http://127.0.0.1:{port}/pickscore"

    def in_process(media, prompts):
        with torch.no_grad():
            return local.score_tensor(media, prompts)

    def stats() -> dict:
        return httpx.get(f"http://127.0.0.1:{port}/rewards", timeout=10).json()["rewards"][0]["stats"]

    rows = []
    try:
        for clients in args.clients:
            remotes = [HTTPReward(url) for _ in range(clients)]
            for fn in (in_process, remotes[0].score_tensor):  # warm-up: text caches, allocator, connections
                for media in batches[:2]:
                    fn(media, [PROMPTS[0]] * media.shape[0])
            row = {"model": model, "clients": clients, "items": args.items}
            print(f"{model}, {clients} client(s): in process ...", flush=True)
            row["in_process"] = phase([in_process] * clients, args.requests, batches, None)
            before = stats()
            print(f"{model}, {clients} client(s): HTTP ...", flush=True)
            row["http"] = phase([r.score_tensor for r in remotes], args.requests, batches, server.pid)
            after = stats()
            row["server_batches"] = after["batches"] - before["batches"]
            row["mean_batch"] = (after["items"] - before["items"]) / max(1, row["server_batches"])
            row["retries"] = sum(r.retries for r in remotes)
            for key in ("p50_ms", "p99_ms", "items_per_s"):
                row[f"x_{key}"] = row["http"][key] / row["in_process"][key]
            print(json.dumps(row), flush=True)
            rows.append(row)
            for remote in remotes:
                remote.close()
    finally:
        server.terminate()
        server.wait(30)
    return rows


def machine(threads: int) -> dict:
    flags = set(cpu_flags().split())
    return {
        "cpu": cpu_model(),
        "flags": [flag for flag in FLAGS if flag in flags],
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads": threads,
        "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "platform": platform.platform(),
        "versions": versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# A served reward vs the same reward in process",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores ({', '.join(m['flags']) or 'no AVX2'}), model on {m['threads']} "
        f"intra-op thread(s) on both sides; `uptime` before: {m['uptime']}; after: {report['uptime_after']}; "
        f"{m['date']}; torch {m['versions'].get('torch')}, Python {m['versions'].get('python')}.",
        "",
        "Each client sends requests of "
        f"{report['items']} image(s) [{report['items']}, 3, 256, 256] one after the other ({report['requests']} per "
        f"client; the server's batching window {report.get('max_wait_ms', 5.0):g} ms). Latencies are per request as "
        "the client sees them; x = HTTP / in process (latency: above 1 is "
        "slower; throughput: above 1 is more items/s). `other cores`: CPU that other processes used during the "
        "in-process / HTTP phase, in cores (the machine is shared).",
        "",
        "| model | clients | p50 ms in process | p50 ms HTTP | x p50 | p99 ms in process | p99 ms HTTP | x p99 "
        "| items/s in process | items/s HTTP | x throughput | server mean batch | retries | other cores |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        a, b = row["in_process"], row["http"]
        lines.append(
            f"| {row['model']} | {row['clients']} | {a['p50_ms']:.1f} | {b['p50_ms']:.1f} | {row['x_p50_ms']:.2f} "
            f"| {a['p99_ms']:.1f} | {b['p99_ms']:.1f} | {row['x_p99_ms']:.2f} | {a['items_per_s']:.1f} "
            f"| {b['items_per_s']:.1f} | {row['x_items_per_s']:.2f} | {row['mean_batch']:.1f} | {row['retries']} "
            f"| {a['other_cores']:.2f} / {b['other_cores']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="clip-b32,tiny")
    parser.add_argument("--clients", default="1,8")
    parser.add_argument("--requests", type=int, default=48, help="requests per client")
    parser.add_argument("--items", type=int, default=1, help="images per request")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of the model, both sides")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="the server's batching window")
    parser.add_argument("--out", default=str(RESULTS / "serve"), help="writes OUT.md and OUT.json")
    args = parser.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    report = {
        "command": " ".join(["python benchmarks/bench_serve.py", *sys.argv[1:]]),
        "machine": machine(args.threads),
        "requests": args.requests,
        "items": args.items,
        "max_wait_ms": args.max_wait_ms,
        "rows": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            folder = build(model, Path(tmp))
            report["rows"] += measure(model, folder, args, Path(tmp) / f"{model}-server.log")
    report["uptime_after"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
