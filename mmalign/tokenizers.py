"""Offline tokenizer files.

The OpenAI CLIP tokenizer (used by PickScore, CLIPScore, the aesthetic backbone and SD1.x text encoders) is a
BPE over 49408 tokens whose merges file open_clip ships inside its wheel. :func:`write_clip_tokenizer` turns
it into the ``vocab.json`` + ``merges.txt`` pair that transformers' ``CLIPTokenizer.from_pretrained`` reads,
so a CLIP tokenizer is available with no hub access (tokenisation equals open_clip's, tested).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

CLIP_VOCAB_SIZE = 49408


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> unicode table, in its published order: printable bytes first."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table = {byte: chr(byte) for byte in printable}
    others = [byte for byte in range(256) if byte not in table]
    table.update({byte: chr(256 + n) for n, byte in enumerate(others)})
    return table


def write_clip_tokenizer(folder: str | Path) -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json of the OpenAI CLIP tokenizer (77 tokens, padded
    with end-of-text as ``openai/clip-vit-*``) from open_clip's shipped BPE merges."""
    from open_clip.tokenizer import default_bpe

    with gzip.open(default_bpe()) as handle:
        lines = handle.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder
