"""Find weight files by local path or hub id, and load them without executing pickled code.

Local paths always win and never touch the network; hub ids go through ``huggingface_hub``, which honours
``HF_HUB_OFFLINE=1`` and its cache. Nothing here runs at import time.
"""

from __future__ import annotations

import fnmatch
import os
import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from .errors import StateDictMismatchError, UnsafeCheckpointError, WeightsError

HF_PREFIX = "hf-hub:"

CONVERT_HINT = (
    "mmalign only loads safetensors or plain tensor pickles (torch.load(weights_only=True)). "
    "If you trust this file, convert it once with:\n"
    "    mmalign convert --trust-pickle {path} {stem}.safetensors\n"
    "and pass the .safetensors file instead."
)


def _looks_like_repo_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def _hub_download(repo_id: str, filename: str | None, what: str, allow_patterns: Iterable[str] | None = None) -> Path:
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        if filename is None:
            patterns = list(allow_patterns) if allow_patterns is not None else None
            return Path(snapshot_download(repo_id, allow_patterns=patterns))
        return Path(hf_hub_download(repo_id, filename))
    except Exception as error:  # offline, missing repo, missing file: say what to do
        target = f"{repo_id}/{filename}" if filename else repo_id
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = "HF_HUB_OFFLINE is set and the file is not in the local cache; " if offline else ""
        raise WeightsError(
            f"cannot fetch {what} from the hub ({target}): {hint}{type(error).__name__}: {error}. "
            f"Download it elsewhere and pass a local path instead."
        ) from error


def resolve_file(spec: str | os.PathLike | None, *, default_repo: str, filename: str, what: str) -> Path:
    """Resolve a weights argument to one local file.

    ``spec`` may be ``None`` (use ``default_repo``), a file, a folder holding ``filename``, a hub repo id
    (``org/name`` or ``hf-hub:org/name``), or ``org/name/file`` naming another file of a repo.
    """
    if spec is None:
        return _hub_download(default_repo, filename, what)
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        candidate = path / filename
        if candidate.is_file():
            return candidate
        raise WeightsError(f"{path}: folder has no {filename} ({what})")
    repo = text[len(HF_PREFIX) :] if text.startswith(HF_PREFIX) else text
    if _looks_like_repo_id(repo):
        return _hub_download(repo, filename, what)
    if repo.count("/") >= 2 and not text.startswith((".", "/", "~")):
        org, name, file_in_repo = repo.split("/", 2)
        return _hub_download(f"{org}/{name}", file_in_repo, what)
    raise WeightsError(f"{text}: no such file or folder ({what})")


def resolve_dir(
    spec: str | os.PathLike | None, *, default_repo: str, what: str, allow_patterns: Iterable[str] | None = None
) -> Path:
    """Resolve a model folder: a local directory, or a hub repo id snapshot (cached, offline-aware).

    ``allow_patterns`` limits a hub snapshot to matching files (e.g. configs and tokenizer, not the weights)."""
    if spec is None:
        return _hub_download(default_repo, None, what, allow_patterns)
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise WeightsError(f"{path}: expected a folder ({what}), found a file")
    repo = text[len(HF_PREFIX) :] if text.startswith(HF_PREFIX) else text
    if _looks_like_repo_id(repo):
        return _hub_download(repo, None, what, allow_patterns)
    raise WeightsError(f"{text}: no such folder ({what})")


def load_state_dict(path: str | os.PathLike, *, unwrap: Iterable[str] = ("state_dict",)) -> dict[str, torch.Tensor]:
    """Load a flat ``{name: tensor}`` dict from safetensors or a weights-only torch pickle.

    A pickle that needs code execution is refused with an :class:`UnsafeCheckpointError` saying how to
    convert it. A top-level ``{'state_dict': {...}}`` wrapper (HPSv2's format) is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as error:
            raise WeightsError(f"{path}: not a readable safetensors file ({error})") from error
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        hint = CONVERT_HINT.format(path=path, stem=path.with_suffix(""))
        raise UnsafeCheckpointError(
            f"{path}: refused, this checkpoint needs code execution to unpickle ({error}).\n{hint}"
        ) from error
    except (RuntimeError, EOFError, OSError) as error:
        raise WeightsError(f"{path}: not a readable torch checkpoint ({error})") from error
    for key in unwrap:
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    bad = [key for key, value in obj.items() if not isinstance(value, torch.Tensor)]
    if bad:
        raise WeightsError(f"{path}: entries that are not tensors: {', '.join(map(str, bad[:8]))}")
    return dict(obj)


class _Placeholder:
    """Stands for a class of a pickle that is not imported: keeps whatever state the pickle gives it."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        object.__setattr__(self, "_pickled_state", state)


# What a structural load lets the pickle build for real: tensors, parameters, containers, dtypes.
_STRUCTURAL_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch", "Size"),
    ("copyreg", "_reconstructor"),
    ("copyreg", "__newobj__"),
    ("builtins", "object"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
}


class _StructuralUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        module = {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(module, module)  # protocol-2 names
        if (module, name) in _STRUCTURAL_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return type(name, (_Placeholder,), {"_pickled_from": f"{module}.{name}"})


class _StructuralPickle:
    """A ``pickle_module`` for ``torch.load`` that imports no class of the pickle (see :func:`module_tensors`)."""

    Unpickler = _StructuralUnpickler
    load = staticmethod(pickle.load)
    __name__ = "mmalign.hub._StructuralPickle"


def _object_state(obj: object) -> Mapping | None:
    state = getattr(obj, "_pickled_state", None) if isinstance(obj, _Placeholder) else getattr(obj, "__dict__", None)
    if isinstance(state, tuple) and state and isinstance(state[0], Mapping):
        state = state[0]
    return state if isinstance(state, Mapping) else None


def module_tensors(obj: object, prefix: str = "") -> dict[str, torch.Tensor]:
    """The ``state_dict`` of a (structurally loaded) module tree: parameters and persistent buffers, named by
    the ``_modules`` path, read from each module's pickled ``__dict__``."""
    state = _object_state(obj)
    if state is None or "_parameters" not in state:
        return {}
    skip = set(state.get("_non_persistent_buffers_set", ()) or ())
    out = {prefix + k: v for k, v in (state.get("_parameters") or {}).items() if isinstance(v, torch.Tensor)}
    buffers = state.get("_buffers") or {}
    out.update({prefix + k: v for k, v in buffers.items() if isinstance(v, torch.Tensor) and k not in skip})
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            out.update(module_tensors(child, f"{prefix}{name}."))
    return out


def load_pickled_module_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a pickled whole ``nn.Module`` without importing its classes (the MPS release pickles
    modules of the reference's ``trainer`` package). Only torch's tensor rebuilders and plain containers are
    real; every other class becomes an inert placeholder holding its pickled state. Still a pickle: only for
    files you trust (``mmalign convert --trust-pickle``)."""
    obj = torch.load(str(path), map_location="cpu", weights_only=False, pickle_module=_StructuralPickle)
    tensors = module_tensors(obj)
    if not tensors:
        raise WeightsError(f"{path}: no module state found in the pickle")
    return tensors


def convert_pickle_to_safetensors(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Convert a trusted full pickle to safetensors. This executes the pickle: only for files you trust.
    A pickled module whose classes cannot be imported here (MPS's ``trainer.*``) is read structurally
    (:func:`load_pickled_module_tensors`)."""
    from safetensors.torch import save_file

    try:
        obj = torch.load(str(source), map_location="cpu", weights_only=False)
    except (ModuleNotFoundError, AttributeError):
        obj = load_pickled_module_tensors(source)
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    tensors = {k: v.detach().contiguous().clone() for k, v in obj.items() if isinstance(v, torch.Tensor)}
    target = Path(target)
    save_file(tensors, str(target))
    return target


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in patterns)


def load_into(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    source: str,
    allow_missing: Iterable[str] = (),
    allow_unexpected: Iterable[str] = (),
) -> None:
    """Load strictly, except for keys matching the documented allow-lists (glob patterns).

    Missing, unexpected and wrongly shaped keys are all reported together in one
    :class:`StateDictMismatchError`; nothing is loaded silently with ``strict=False``.
    """
    allow_missing, allow_unexpected = tuple(allow_missing), tuple(allow_unexpected)
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict and not _matches(k, allow_missing)]
    unexpected = [k for k in state_dict if k not in own and not _matches(k, allow_unexpected)]
    mismatched = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        raise StateDictMismatchError(source, missing, unexpected, mismatched)
    known = {k: v for k, v in state_dict.items() if k in own}
    module.load_state_dict(known, strict=False)
