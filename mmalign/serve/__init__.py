"""Rewards as services: ``mmalign serve`` puts registered rewards behind HTTP with dynamic batching, and
``reward=http://HOST:PORT/NAME`` uses one wherever a local reward name is taken (trainers, ``label``, ``score``,
``bench``).

Command::

    mmalign serve --reward NAME [--weights PATH] [--processor PATH] [--backbone PATH] [--reward NAME ...]
                  [--device cpu|cuda] [--dtype fp32|bf16|fp16] [--host 127.0.0.1] [--port 8000]
                  [--max-batch 16] [--max-wait-ms 5] [--queue 256] [--timeout 60] [--token-file FILE]

``--weights``, ``--processor`` and ``--backbone`` belong to the ``--reward`` before them. The token comes from
``--token-file`` or ``$MMALIGN_SERVE_TOKEN``; the server listens on loopback by default and refuses a
non-loopback ``--host`` without a token.

Endpoints (errors are JSON ``{"error": "...", "item": INDEX or null}``; ``item`` names the item at fault):

* ``GET /health`` (never needs the token) -> ``{"status": "ok", "rewards": [NAME, ...]}``.
* ``GET /rewards`` -> ``{"rewards": [{"name", "modality", "dtype", "is_differentiable": false,
  "higher_is_better", "uses_prompt", "scale", "stats"}, ...]}``; ``stats`` counts requests, items, model
  batches, queue-full refusals, timeouts and failures since the start.
* ``POST /NAME/score`` with either body:

  - ``Content-Type: application/x-safetensors``: a safetensors file holding one float tensor ``media``, laid out
    as the reward's ``score_tensor`` takes it (image ``[B, 3, H, W]`` and video / multi-view
    ``[B, T|V, 3, H, W]`` in [0, 1]; audio ``[B, C, S]``), and in its metadata ``prompts`` (a JSON list of B
    strings) and optionally ``sample_rate`` (audio) or ``video_fps`` (video). The floats arrive bit for bit:
    what trainers send.
  - ``Content-Type: multipart/form-data`` (image rewards): the encoded files (PNG, JPEG, WebP...) in the field
    ``media``, one per item, and ``prompts`` (a JSON list of strings, one per file), decoded with mmalign's
    checks and scored with the reward's reference preprocessing (``score_images``): what ``score`` and ``label``
    send.

  -> ``{"reward": NAME, "scores": [float | null, ...], "batch_id": N, "batch_size": M}``: one score per item,
  in order (``null`` for a non-finite score); ``batch_id`` numbers the model call that scored the request and
  ``batch_size`` is how many items that call held (the request's and its neighbours').

Statuses: 400 unreadable body; 401 missing or wrong bearer token; 404 unknown reward; 413 body over 1 GiB; 415
unsupported content type; 422 a bad item or option (undecodable image, wrong tensor layout or dtype, values not
finite or outside [0, 1], prompt count different from the item count); 503 + ``Retry-After`` when the reward's
queue is full; 504 when not scored within ``--timeout``.

Batching (:mod:`mmalign.serve.batching`): requests for a reward wait in a queue of ``--queue`` requests; a worker
takes the oldest and adds waiting requests of the same kind (tensors of one shape and dtype, or image files)
until ``--max-batch`` items or ``--max-wait-ms`` after the first, scores them in one model call in its own
thread, and splits the scores back. A request larger than ``--max-batch`` is scored alone, ``--max-batch`` items
per model call. Scores of one item may differ from an in-process call in the last float bits when its model call
held other requests' items (BLAS kernels round differently per batch size); a request scored alone equals the
in-process call on the same batch, bit for bit.

The client (:class:`~mmalign.serve.client.HTTPReward`, from ``mmalign.rewards.load_reward("http://...")``) sends
``$MMALIGN_REWARD_TOKEN`` and retries connection errors, timeouts and 502/503/504 with capped exponential
backoff until ``$MMALIGN_REWARD_DEADLINE`` seconds (default 300); a 4xx is raised at once.
"""

__all__ = ["HTTPReward", "RemoteRewardError"]


def __getattr__(name: str):  # the client imports httpx: only on first use
    if name in __all__:
        from . import client

        return getattr(client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
