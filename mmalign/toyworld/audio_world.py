"""The toy audio world: short clips of beeps, their prompt grammar, a ground-truth renderer and an exact judge.

A prompt reads ``"<count> <pitch> beep[s] <tempo>"``, e.g. ``"two high beeps fast"`` (4 pitches x 3 counts x 2
tempos = 24 prompts, split into train / held-out as the image and video worlds' are). A clip is mono,
:data:`SAMPLES` samples at :data:`SAMPLE_RATE` Hz (1.024 s):

* rendering (:func:`render_audio`): ``count`` sine beeps of the prompted pitch (:data:`PITCHES`: 250, 375, 625 and
  1000 Hz, a factor 1.5-1.67 apart), each starting at phase 0 with 8 ms linear ramps, amplitude :data:`AMPLITUDE`;
  ``fast`` beeps last 3-5 frames of :data:`FRAME` samples (48-80 ms) with 4-6 frame gaps, ``slow`` ones 11-13 frames
  (176-208 ms) with 6-8 frame gaps, the first onset a random frame; the clip is a pure function of the prompt and
  the seed. Beeps start on the 16 ms frame grid and every pitch is a whole number of cycles per frame (4, 6, 10,
  16), so every frame of a beep holds the same waveform: a tiny autoencoder (hop 64) need not encode phase (with
  onsets anywhere and other pitches the shipped one's first fit reproduced two of four pitches and drew silence for
  the others, the mean of a waveform whose phase it could not predict);
* judging (:func:`judge_audio`), exact and from the signal alone: the envelope is the RMS of :data:`FRAME`-sample
  frames (16 ms); a frame is on when its RMS is at least :data:`ON_FRACTION` of the loudest frame's (and at least
  :data:`SILENCE`); runs of on-frames, one-frame gaps bridged and one-frame runs dropped, are the beeps. ``count``
  is 1 when there are as many beeps as prompted; ``tempo`` 1 when the beeps' mean length is below
  :data:`FAST_BELOW` frames (128 ms) for ``fast``, at least that for ``slow``; ``pitch`` 1 when, in the Hann-windowed
  magnitude spectrum of the whole clip, the band of ±:data:`BAND` around the prompted pitch holds the most energy of
  the four pitch bands and at least :data:`PITCH_SHARE` of the energy from 100 to 2000 Hz. ``overall`` is the mean of
  the three attributes, ``exact`` 1 when all three are 1.

All functions are pure: randomness comes from an explicit seed or ``random.Random``; numpy only (no torch).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from itertools import product
from typing import ClassVar

import numpy as np

from .judge import AttributeScores, mean_scores
from .world import COUNT_WORDS, COUNTS

SAMPLE_RATE = 4000
SAMPLES = 4096
#: pitch word -> frequency in Hz (1.5-1.67 apart: well separated for a spectrum judge; whole cycles per frame)
PITCHES: dict[str, float] = {"deep": 250.0, "low": 375.0, "high": 625.0, "shrill": 1000.0}
TEMPOS: tuple[str, ...] = ("fast", "slow")
AUDIO_ATTRIBUTES: tuple[str, ...] = ("pitch", "count", "tempo")
#: (beep length, gap) in frames per tempo, each jittered by up to one frame either way
BEEP_TIMING: dict[str, tuple[int, int]] = {"fast": (4, 5), "slow": (12, 7)}
AMPLITUDE = 0.8
RAMP = 32
FRAME = 64
ON_FRACTION = 0.3
SILENCE = 0.03
FAST_BELOW = 8.0
BAND = 0.1
PITCH_SHARE = 0.3

__all__ = [
    "AUDIO_ATTRIBUTES",
    "PITCHES",
    "SAMPLES",
    "SAMPLE_RATE",
    "TEMPOS",
    "AudioPrompt",
    "AudioVerdict",
    "all_audio_prompts",
    "audio_words",
    "beeps",
    "corrupt_audio",
    "dominant_pitch",
    "judge_audio",
    "judge_audios",
    "mean_scores",
    "parse_audio_prompt",
    "perturb_audio",
    "random_audio_prompt",
    "render_audio",
    "split_audio_prompts",
    "to_waveform",
]


@dataclass(frozen=True, order=True)
class AudioPrompt:
    """One toy audio prompt: which pitch, how many beeps, how fast."""

    pitch: str
    count: int
    tempo: str

    def __post_init__(self) -> None:
        if self.pitch not in PITCHES:
            raise ValueError(f"unknown pitch {self.pitch!r}; known: {', '.join(PITCHES)}")
        if self.count not in COUNTS:
            raise ValueError(f"count must be one of {COUNTS}, got {self.count!r}")
        if self.tempo not in TEMPOS:
            raise ValueError(f"unknown tempo {self.tempo!r}; known: {', '.join(TEMPOS)}")

    @property
    def text(self) -> str:
        return f"{COUNT_WORDS[self.count]} {self.pitch} beep{'s' if self.count > 1 else ''} {self.tempo}"

    @property
    def frequency(self) -> float:
        return PITCHES[self.pitch]

    def __str__(self) -> str:
        return self.text


def audio_words() -> tuple[str, ...]:
    """Every word of every toy audio prompt (the tokenizer's vocabulary)."""
    return tuple(sorted({*COUNT_WORDS.values(), *PITCHES, "beep", "beeps", *TEMPOS}))


def parse_audio_prompt(text: str) -> AudioPrompt:
    """The :class:`AudioPrompt` a text states; raises ``ValueError`` on text outside the grammar."""
    words = text.strip().lower().split()
    counts = {word: n for n, word in COUNT_WORDS.items()}
    if len(words) != 4 or words[0] not in counts or words[2] not in ("beep", "beeps"):
        raise ValueError(f"not a toy audio prompt: {text!r} (expected e.g. 'two high beeps fast')")
    count = counts[words[0]]
    if (count > 1) != (words[2] == "beeps"):
        raise ValueError(f"not a toy audio prompt: {text!r} ('beep' for one, 'beeps' for more)")
    return AudioPrompt(words[1], count, words[3])


def all_audio_prompts() -> list[AudioPrompt]:
    """Every prompt of the grammar (4 pitches x 3 counts x 2 tempos = 24), sorted."""
    return sorted(AudioPrompt(p, n, t) for p, n, t in product(PITCHES, COUNTS, TEMPOS))


def split_audio_prompts(heldout: int = 6, seed: int = 0) -> tuple[list[AudioPrompt], list[AudioPrompt]]:
    """A seeded ``(train, heldout)`` split of :func:`all_audio_prompts`; ``heldout`` prompts are never trained on."""
    prompts = all_audio_prompts()
    random.Random(seed).shuffle(prompts)
    return sorted(prompts[heldout:]), sorted(prompts[:heldout])


def random_audio_prompt(rng: random.Random) -> AudioPrompt:
    return AudioPrompt(rng.choice(list(PITCHES)), rng.choice(COUNTS), rng.choice(TEMPOS))


def perturb_audio(prompt: AudioPrompt, rng: random.Random, attributes: tuple[str, ...] | list[str]) -> AudioPrompt:
    """``prompt`` with each named attribute replaced by a different random value."""
    choices = {"pitch": tuple(PITCHES), "count": COUNTS, "tempo": TEMPOS}
    changes = {}
    for name in attributes:
        current = getattr(prompt, name)
        changes[name] = rng.choice([value for value in choices[name] if value != current])
    return replace(prompt, **changes)


def corrupt_audio(prompt: AudioPrompt, rng: random.Random, rate: float) -> AudioPrompt:
    """``prompt`` with each attribute independently replaced by a different value with probability ``rate`` (the
    noisy captions the generator is trained on, as :func:`mmalign.toyworld.video_world.corrupt_video`)."""
    return perturb_audio(prompt, rng, [name for name in AUDIO_ATTRIBUTES if rng.random() < rate])


# ------------------------------------------------------------------------------------------------ rendering


def beeps(prompt: AudioPrompt, rng: random.Random, samples: int = SAMPLES) -> list[tuple[int, int]]:
    """``[(onset, length)]`` in samples of the prompt's beeps, on the frame grid: lengths and gaps jittered by up to
    a frame, a random first onset, all inside the clip (a frame of silence at either end at least)."""
    length, gap = BEEP_TIMING[prompt.tempo]
    lengths = [FRAME * (length + rng.randint(-1, 1)) for _ in range(prompt.count)]
    gaps = [FRAME * (gap + rng.randint(-1, 1)) for _ in range(prompt.count - 1)]
    spare = (samples - sum(lengths) - sum(gaps)) // FRAME - 2
    onset = FRAME * (1 + rng.randint(0, max(0, spare)))
    out = []
    for k, size in enumerate(lengths):
        out.append((onset, size))
        onset += size + (gaps[k] if k < len(gaps) else 0)
    return out


def render_audio(
    prompt: AudioPrompt | str, seed: int | random.Random = 0, samples: int = SAMPLES, rate: int = SAMPLE_RATE
) -> np.ndarray:
    """A ground-truth clip of ``prompt`` (``float32 [samples]`` in [-1, 1]), the same for the same seed."""
    prompt = parse_audio_prompt(prompt) if isinstance(prompt, str) else prompt
    rng = seed if isinstance(seed, random.Random) else random.Random(seed)
    wave = np.zeros(samples, dtype=np.float32)
    for onset, length in beeps(prompt, rng, samples):
        n = np.arange(length)
        ramp = np.minimum(1.0, np.minimum(n + 1, length - n) / RAMP)
        wave[onset : onset + length] = AMPLITUDE * ramp * np.sin(2 * np.pi * prompt.frequency * n / rate)
    return wave


# ------------------------------------------------------------------------------------------------ judging


@dataclass(frozen=True)
class AudioVerdict(AttributeScores):
    """The judge's scores of one clip for one prompt, with what it found: the beeps as ``(first, last)`` frames
    and the dominant pitch word (``None``: no pitch band dominates)."""

    attributes: ClassVar[tuple[str, ...]] = AUDIO_ATTRIBUTES

    pitch: float
    count: float
    tempo: float
    segments: tuple[tuple[int, int], ...]
    heard_pitch: str | None


def to_waveform(audio) -> np.ndarray:
    """``float64 [S]`` from a clip: ``[S]``, or ``[C, S]`` (channels averaged), numpy or torch."""
    if hasattr(audio, "detach"):
        audio = audio.detach().float().cpu().numpy()
    audio = np.asarray(audio, dtype=np.float64)
    if audio.ndim == 2:
        audio = audio.mean(axis=0)
    if audio.ndim != 1:
        raise ValueError(f"expected a clip [S] or [C, S], got shape {audio.shape}")
    return audio


def envelope(wave: np.ndarray) -> np.ndarray:
    """RMS of consecutive :data:`FRAME`-sample frames (a partial last frame dropped)."""
    frames = len(wave) // FRAME
    return np.sqrt(np.mean(wave[: frames * FRAME].reshape(frames, FRAME) ** 2, axis=1))


def segments_of(on: np.ndarray) -> list[tuple[int, int]]:
    """``(first, last)`` frames of the runs of ``on``, one-frame gaps bridged, one-frame runs dropped."""
    on = on.copy()
    for i in range(1, len(on) - 1):
        if on[i - 1] and on[i + 1]:
            on[i] = True
    runs, start = [], None
    for i, value in enumerate([*on.tolist(), False]):
        if value and start is None:
            start = i
        elif not value and start is not None:
            if i - start > 1:
                runs.append((start, i - 1))
            start = None
    return runs


def dominant_pitch(wave: np.ndarray, rate: int = SAMPLE_RATE) -> str | None:
    """The pitch word whose band (±:data:`BAND` of its frequency) holds the most spectral energy, when that band
    holds at least :data:`PITCH_SHARE` of the energy from 100 to 2000 Hz; else ``None``."""
    power = np.abs(np.fft.rfft(wave * np.hanning(len(wave)))) ** 2
    freqs = np.fft.rfftfreq(len(wave), 1.0 / rate)
    total = power[(freqs >= 100) & (freqs <= 2000)].sum()
    if total <= 0:
        return None
    energy = {word: power[np.abs(freqs - f) <= BAND * f].sum() for word, f in PITCHES.items()}
    word = max(energy, key=energy.get)
    return word if energy[word] >= PITCH_SHARE * total else None


def judge_audio(audio, prompt: AudioPrompt | str, rate: int = SAMPLE_RATE) -> AudioVerdict:
    """Score one clip (``[S]`` or ``[C, S]`` in [-1, 1] at ``rate`` Hz, numpy or torch) against a prompt (an
    :class:`AudioPrompt` or its text)."""
    prompt = parse_audio_prompt(prompt) if isinstance(prompt, str) else prompt
    wave = to_waveform(audio)
    rms = envelope(wave)
    peak = float(rms.max()) if len(rms) else 0.0
    if peak < SILENCE:
        return AudioVerdict(0.0, 0.0, 0.0, (), None)
    found = segments_of(rms >= max(ON_FRACTION * peak, SILENCE))
    mean_length = float(np.mean([last - first + 1 for first, last in found])) if found else 0.0
    heard_tempo = None if not found else ("fast" if mean_length < FAST_BELOW else "slow")
    heard = dominant_pitch(wave, rate)
    return AudioVerdict(
        pitch=float(heard == prompt.pitch),
        count=float(len(found) == prompt.count),
        tempo=float(heard_tempo == prompt.tempo),
        segments=tuple(found),
        heard_pitch=heard,
    )


def judge_audios(clips, prompts, rate: int = SAMPLE_RATE) -> list[AudioVerdict]:
    """:func:`judge_audio` over parallel sequences (a ``[B, C, S]`` tensor in [-1, 1] also works)."""
    return [judge_audio(clip, prompt, rate) for clip, prompt in zip(clips, prompts)]
