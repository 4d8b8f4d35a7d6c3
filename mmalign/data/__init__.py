"""Preference data: pairs and rankings from JSONL, Pick-a-Pic, HPDv2, ImageRewardDB and Hugging Face datasets.

Light at import (no torch): the torch datasets in :mod:`mmalign.data.dataset` load on first use.

>>> pairs = load_preferences("prefs.jsonl")                  # doctest: +SKIP
>>> pairs.skipped                                            # [(where, reason), ...]  # doctest: +SKIP
>>> ds = PreferenceDataset(pairs, resolution=512, seed=0)    # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from .readers import (
    FORMATS,
    PICKAPIC_COLUMNS,
    detect_format,
    load_preferences,
    read_hf_dataset,
    read_hpdv2,
    read_imagereward_db,
    read_jsonl,
    read_pairs_json,
    read_pairs_parquet,
    read_pickapic,
)
from .records import (
    TIE_POLICIES,
    ImageInput,
    PreferenceList,
    PreferencePair,
    PreferenceStream,
    Ranking,
    ReadReport,
    TiePolicy,
    decode_image,
)

_LAZY = {
    "PreferenceDataset",
    "IterablePreferenceDataset",
    "PairTransform",
    "AudioPreferenceDataset",
    "AudioPairTransform",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FORMATS",
    "AudioPairTransform",
    "AudioPreferenceDataset",
    "PICKAPIC_COLUMNS",
    "TIE_POLICIES",
    "ImageInput",
    "IterablePreferenceDataset",
    "PairTransform",
    "PreferenceDataset",
    "PreferenceList",
    "PreferencePair",
    "PreferenceStream",
    "Ranking",
    "ReadReport",
    "TiePolicy",
    "decode_image",
    "detect_format",
    "load_preferences",
    "read_hf_dataset",
    "read_hpdv2",
    "read_imagereward_db",
    "read_jsonl",
    "read_pairs_json",
    "read_pairs_parquet",
    "read_pickapic",
]
