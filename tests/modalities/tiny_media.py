"""Media written in the tests (PyAV videos, soundfile audio, PIL grids) and a tiny CLAP in its published layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


def random_frames(count: int, height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    """Smooth random RGB frames uint8 ``[T, H, W, 3]`` (blocks upsampled, so codecs and resizes behave)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(count, max(height // 8, 1), max(width // 8, 1), 3), dtype=np.uint8)
    return np.repeat(np.repeat(small, 8, axis=1), 8, axis=2)[:, :height, :width].copy()


def write_video(
    path: Path,
    frames: np.ndarray,
    fps: int = 8,
    codec: str = "ffv1",
    pix_fmt: str = "bgr0",
    gop: int | None = None,
    bframes: int | None = None,
) -> Path:
    """Encode uint8 RGB frames with PyAV (``ffv1`` + ``bgr0`` in .mkv is lossless RGB)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt
        if gop is not None:
            stream.codec_context.gop_size = gop
        if bframes is not None:
            stream.codec_context.max_b_frames = bframes
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_audio_av(path: Path, wave: np.ndarray, rate: int, codec: str, fmt: str = "fltp") -> Path:
    """Encode float ``[C, S]`` audio with PyAV (mp3/m4a files for the FFmpeg decoding path)."""
    import av

    channels = wave.shape[0]
    layout = "mono" if channels == 1 else "stereo"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate, layout=layout)
        frame_size = stream.codec_context.frame_size or 1024
        for start in range(0, wave.shape[1], frame_size):
            chunk = np.ascontiguousarray(wave[:, start : start + frame_size].astype(np.float32))
            frame = av.AudioFrame.from_ndarray(chunk, format=fmt, layout=layout)
            frame.sample_rate = rate
            frame.pts = start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def sine(freq: float, seconds: float, rate: int, amplitude: float = 0.5, channels: int = 1) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    wave = amplitude * np.sin(2 * np.pi * freq * t)
    return np.repeat(wave[None], channels, axis=0).astype(np.float32)


# -- tiny CLAP -------------------------------------------------------------------------------------------------
def _byte_symbols() -> list[str]:
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table = {byte: chr(byte) for byte in printable}
    others = [byte for byte in range(256) if byte not in table]
    table.update({byte: chr(256 + n) for n, byte in enumerate(others)})
    return [table[b] for b in range(256)]


TINY_MERGES = [("Ġ", "a"), ("Ġ", "d"), ("o", "g"), ("Ġd", "og"), ("Ġ", "c"), ("a", "t"), ("Ġc", "at"), ("Ġ", "b")]


def write_roberta_tokenizer(folder: Path) -> Path:
    """A byte-level BPE (GPT-2 / RoBERTa format) with every byte and a few merges: vocab.json + merges.txt."""
    vocab = ["<s>", "<pad>", "</s>", "<unk>"] + _byte_symbols() + ["".join(m) for m in TINY_MERGES] + ["<mask>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in TINY_MERGES) + "\n")
    return folder


def make_clap_model(folder: Path, seed: int = 0, fusion: bool = False) -> Path:
    """A tiny transformers ``ClapModel`` (RoBERTa text, HTSAT audio) + ``ClapProcessor`` folder, offline."""
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor, RobertaTokenizer

    tokenizer = RobertaTokenizer.from_pretrained(str(write_roberta_tokenizer(folder / "_tok")))
    assert len(tokenizer) == 4 + 256 + len(TINY_MERGES) + 1, len(tokenizer)
    torch.manual_seed(seed)
    config = ClapConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=82,
            type_vocab_size=1,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
        ),
        audio_config=dict(
            window_size=8,
            num_mel_bins=64,
            spec_size=256,
            patch_size=8,  # published: 4; 8 keeps the 64-bin, 10 s mel input but quarters the tokens
            patch_stride=[8, 8],
            hidden_size=32,
            patch_embeds_hidden_size=16,
            depths=[1, 1],
            num_attention_heads=[2, 2],
            enable_fusion=fusion,
            fusion_type="aff_2d" if fusion else None,
        ),
        projection_dim=16,
    )
    model = ClapModel(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    extractor = ClapFeatureExtractor(
        feature_size=64,
        sampling_rate=48_000,
        hop_length=480,
        max_length_s=10,
        fft_window_size=1024,
        frequency_min=50,
        frequency_max=14_000,
        truncation="fusion" if fusion else "rand_trunc",
        padding="repeatpad",
    )
    ClapProcessor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(folder)
    return folder
