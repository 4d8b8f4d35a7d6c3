"""Exceptions that say which file, row or key is wrong, and what to do about it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class MMAlignError(Exception):
    """Base class of every error mmalign raises on purpose."""


class MediaError(MMAlignError, ValueError):
    """A media file could not be decoded or is unusable; the message names the file."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class WeightsError(MMAlignError):
    """Model weights could not be found or loaded."""


class UnsafeCheckpointError(WeightsError):
    """A checkpoint needs arbitrary code execution (a full pickle) to load; mmalign refuses it."""


class UnsupportedGeneratorError(WeightsError, ValueError):
    """A pipeline folder's ``model_index.json`` names a pipeline class that no generator family handles."""

    def __init__(self, source: str, class_name: str | None, supported: Sequence[str]):
        self.source = source
        self.class_name = class_name
        self.supported = list(supported)
        super().__init__(
            f"{source}: unsupported generator {class_name!r} (model_index.json _class_name); "
            f"supported: {', '.join(self.supported)}"
        )


class StateDictMismatchError(WeightsError):
    """A checkpoint's keys or shapes do not match the architecture it is loaded into."""

    def __init__(
        self,
        source: str,
        missing: Sequence[str] = (),
        unexpected: Sequence[str] = (),
        mismatched: Sequence[str] = (),
    ):
        self.source = source
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)
        parts = [f"{source}: the checkpoint does not match the model."]
        for label, keys in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("shape mismatch", self.mismatched),
        ):
            if keys:
                shown = ", ".join(keys[:12]) + (f", ... ({len(keys)} in all)" if len(keys) > 12 else "")
                parts.append(f"{label} keys: {shown}")
        super().__init__("\n  ".join(parts))


class ConfigError(MMAlignError, ValueError):
    """A recipe or command-line option is invalid; the message names the file and key."""


class DataError(MMAlignError, ValueError):
    """Preference data is malformed or unreadable; the message names the file and row."""

    def __init__(self, source: str, reason: str):
        self.source = str(source)
        self.reason = reason
        super().__init__(f"{self.source}: {reason}")
