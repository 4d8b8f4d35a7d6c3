"""Typed recipes: a dataclass per trainer, filled from YAML and ``key=value`` command-line overrides.

Each trainer declares a ``<Method>Config`` dataclass (defaults from its paper, checks in ``__post_init__``);
this module fills any such dataclass. Precedence, lowest first: the dataclass defaults, the YAML recipe, the
command line. The layers are merged here (nested dataclasses field by field) and the result is validated by
pydantic against the annotations (lax mode, plus the spellings :func:`_prepare` adds); every error is a
:class:`~mmalign.errors.ConfigError` that names the file (or "command line") and the key::

    cfg = load_config(DPOConfig, find_recipe("train/sd15-dpo"), ["lr=1e-5", "lora.rank=8"])
    save_config(cfg, out_dir / "config.yaml")  # reloads to the same config

YAML is read with YAML 1.2 scalars: only ``true``/``false`` are booleans (``no`` stays the string ``"no"``),
``1e-5`` is a float, dates stay strings, and a number written for a string field keeps its text (``1.10``).
A recipe starts with the command that runs it, as leading ``#`` comment lines (see :func:`recipe_command`).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import difflib
import enum
import functools
import importlib.resources
import re
import types
import typing
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any, TypeVar, Union

import yaml

from .errors import ConfigError

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

__all__ = [
    "find_recipe",
    "list_recipes",
    "load_config",
    "load_yaml",
    "parse_overrides",
    "recipe_command",
    "save_config",
    "to_dict",
]

T = TypeVar("T")

COMMAND_LINE = "command line"
#: Package and folder searched by :func:`find_recipe` (through ``importlib.resources``).
RECIPE_PACKAGE = "mmalign"
RECIPE_DIR = "configs"
RECIPE_SUFFIXES = (".yaml", ".yml")

_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}
_NULL = {"null", "none", "~"}

# ----------------------------------------------------------------------------------------------------------
# YAML with YAML 1.2 core scalars
# ----------------------------------------------------------------------------------------------------------

_BOOL_RE = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_INT_RE = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
_FLOAT_RE = re.compile(
    r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)
_RESOLVERS = (
    ("tag:yaml.org,2002:bool", _BOOL_RE, list("tTfF")),
    ("tag:yaml.org,2002:int", _INT_RE, list("-+0123456789")),
    ("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789.")),
)


class _Int(int):
    """An int read from YAML, remembering its text (for string fields)."""

    text: str

    def __str__(self) -> str:
        return self.text


class _Float(float):
    """A float read from YAML, remembering its text (for string fields)."""

    text: str

    def __str__(self) -> str:
        return self.text


class _Loader(yaml.SafeLoader):
    """Safe loader with YAML 1.2 core booleans and numbers, no timestamps, and no duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first at line {seen[key].start_mark.line + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


_REPLACED = {tag for tag, _, _ in _RESOLVERS} | {"tag:yaml.org,2002:timestamp"}
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _REPLACED]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _tag, _regexp, _first in _RESOLVERS:
    _Loader.add_implicit_resolver(_tag, _regexp, _first)


def _construct_int(loader: _Loader, node: yaml.ScalarNode) -> _Int:
    text = loader.construct_scalar(node)
    value = _Int(int(text, 0) if text[:2] in ("0o", "0x") else int(text, 10))
    value.text = text
    return value


def _construct_float(loader: _Loader, node: yaml.ScalarNode) -> _Float:
    text = loader.construct_scalar(node)
    value = _Float(float(text.replace(".", "", 1)) if text.lstrip("+-").lower() in (".inf", ".nan") else float(text))
    value.text = text
    return value


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _construct_float)


class _Dumper(yaml.SafeDumper):
    """Quotes any string that a YAML 1.1 or 1.2 reader would take for something else (``no``, ``1e-5``)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


for _tag, _regexp, _first in _RESOLVERS:
    _Dumper.add_implicit_resolver(_tag, _regexp, _first)


def _plain(value: Any) -> Any:
    """``value`` with the YAML number subclasses replaced by plain ``int``/``float``, recursively."""
    if isinstance(value, _Int):
        return int(value)
    if isinstance(value, _Float):
        return float(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        context = getattr(exc, "context", None)
        detail = f"{context}: {problem}" if context else problem
        raise ConfigError(f"{source}:{where}: invalid YAML: {detail}") from exc


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a recipe file: a mapping at the top level (an empty file is ``{}``), with YAML 1.2 scalars."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such recipe file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: cannot read the recipe: {exc}") from exc
    data = _parse_yaml(text, source)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of 'key: value' lines, not a {_kind(data)}")
    return data


# ----------------------------------------------------------------------------------------------------------
# Overrides
# ----------------------------------------------------------------------------------------------------------


def parse_overrides(items: Sequence[str]) -> dict[str, str]:
    """``["lr=1e-5", "lora.rank=8"]`` -> ``{"lr": "1e-5", "lora.rank": "8"}``; a later item wins.

    A leading ``--`` on the key is dropped. Values are kept verbatim (typed later, against the dataclass).
    """
    if isinstance(items, str):
        items = [items]
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        key = key.strip()
        key = key[2:] if key.startswith("--") else key
        if not sep or not key:
            raise ConfigError(f"{COMMAND_LINE}: {item!r} is not key=value (for example lr=1e-5 or lora.rank=8)")
        if any(not part for part in key.split(".")):
            raise ConfigError(f"{COMMAND_LINE}: {item!r} has an empty part in the key {key!r}")
        out[key] = value
    return out


# ----------------------------------------------------------------------------------------------------------
# Layers -> one mapping (mmalign's merge and spelling rules) -> pydantic validates it against the dataclass
# ----------------------------------------------------------------------------------------------------------

Layer = tuple[str, Mapping]  # (source name, mapping of raw values; keys may be dotted: "lora.rank")
KeyPath = tuple[str | int, ...]  # a key as a path: ("nested", "targets", 1) is nested.targets[1]


def _kind(value: Any) -> str:
    kind = type(_plain(value))
    return {dict: "mapping", list: "list", str: "string", type(None): "null"}.get(kind, kind.__name__)


def _options(tp: Any) -> list[Any]:
    """The members of a union other than None (``[tp]`` for anything else)."""
    union = typing.get_origin(tp) is Union or isinstance(tp, types.UnionType)
    return [a for a in typing.get_args(tp) if a is not type(None)] if union else [tp]


def _type_name(tp: Any) -> str:
    if len(_options(tp)) > 1:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if isinstance(tp, type) and issubclass(tp, PurePath):
        return "a path"
    if isinstance(tp, type):
        names = {"str": "a string", "int": "an int", "float": "a float", "bool": "a bool (true or false)"}
        return names.get(tp.__name__, tp.__name__)
    return str(tp).replace("typing.", "")


def _key(path: KeyPath) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _is_dict_type(tp: Any) -> bool:
    return typing.get_origin(tp) in (dict, Mapping, typing.Mapping) or tp is dict


def _is_list_type(tp: Any) -> bool:
    return typing.get_origin(tp) in (list, tuple, set, frozenset, Sequence) or tp in (list, tuple)


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError) as exc:
        raise TypeError(f"cannot resolve the type hints of {cls.__name__}: {exc}") from exc


def _prepare(value: Any, tp: Any, source: str, path: KeyPath, origin: dict) -> Any:
    """``value`` readied for pydantic's lax mode where mmalign reads more than it does, recursively.

    That is: null words (``none``, ``~``) for optional fields, comma lists and ``[..]``/``{..}`` YAML flow text
    from the command line, ints written ``1e3`` or ``0x10``, no bool where a number is expected, and YAML numbers
    keep their text for string fields (``1.10``). A mapping for a nested dataclass is merged (keys checked).
    """
    options = _options(tp)
    if len(options) == 1 and options[0] is not tp:  # Optional[X]
        if value is None or (isinstance(value, str) and value.strip().lower() in _NULL):
            return None
        return _prepare(value, options[0], source, path, origin)
    if isinstance(value, bool) and tp in (int, float):
        raise ConfigError(f"{source}: {_key(path)}: {value!r} is not {_type_name(tp)}")
    if tp is int and isinstance(value, str):  # pydantic reads neither 1e3 nor 0x10
        try:
            return int(value, 0)
        except ValueError:
            with contextlib.suppress(ValueError):
                return int(float(value)) if float(value).is_integer() else value
    listish = _is_list_type(tp)
    if isinstance(value, str) and (listish or _is_dict_type(tp) or _is_dataclass_type(tp)):
        text = value.strip()
        if text.startswith("[" if listish else "{"):
            value = _parse_yaml(text, f"{source}: {_key(path)}")
        elif listish:
            value = [part.strip() for part in text.split(",")] if text else []
    args = typing.get_args(tp)
    if listish and isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value) if isinstance(value, (set, frozenset)) else value
        item = args[0] if args else Any
        return [_prepare(v, item, source, (*path, i), origin) for i, v in enumerate(items)]
    if _is_dict_type(tp) and isinstance(value, Mapping):
        item = args[1] if len(args) == 2 else Any
        return {_plain(k): _prepare(v, item, source, (*path, k), origin) for k, v in value.items()}
    if _is_dataclass_type(tp) and isinstance(value, Mapping):
        return _merge(tp, [(source, value)], origin, path)
    return value if tp is str else _plain(value)


def _instance_mapping(obj: Any) -> Any:
    """A dataclass instance as a mapping of its init fields (recursively); other values unchanged."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _instance_mapping(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    return obj


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _join(sources: Any) -> str:
    names = sorted(dict.fromkeys(s for s in sources if s != "defaults"), key=lambda s: s == COMMAND_LINE)
    return " + ".join(names) or "defaults"


def _dotted(layer: Mapping, name: str) -> dict[str, Any]:
    """The ``name.sub: value`` entries of ``layer`` as ``{"sub": value}``."""
    return {k[len(name) + 1 :]: v for k, v in layer.items() if isinstance(k, str) and k.startswith(name + ".")}


def _take(layer: Mapping, name: str, source: str, key: str) -> tuple[bool, Any]:
    """Whether ``layer`` sets field ``name``, and the value: ``name: {...}`` and ``name.sub: ...`` keys merged."""
    dotted = _dotted(layer, name)
    if name not in layer:
        return bool(dotted), dotted or None
    value = layer[name]
    if not dotted:
        return True, value
    if isinstance(value, Mapping):
        return True, {**value, **dotted}
    subkeys = ", ".join(f"{key}.{k}" for k in dotted)
    raise ConfigError(f"{source}: {key} is set both as a whole ({_plain(value)!r}) and by its keys ({subkeys})")


def _merge(cls: type, layers: list[Layer], origin: dict, path: KeyPath = ()) -> dict[str, Any]:
    """The init arguments of ``cls`` from ``layers`` (lowest precedence first), not yet validated.

    Checks the keys; records in ``origin`` which source gave each value, and the classes met (for errors).
    """
    hints = _hints(cls)
    prefix = _key(path) + "." if path else ""
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    for source, layer in layers:
        for key in layer:
            head = str(key).split(".")[0]
            if head in names or (not path and key == "trainer"):
                continue
            close = difflib.get_close_matches(head, names, n=1, cutoff=0.6)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"{source}: unknown key '{prefix}{key}'{hint}")

    out: dict[str, Any] = {}
    for f in (f for f in dataclasses.fields(cls) if f.init):
        tp, here = hints[f.name], (*path, f.name)
        given = []
        for src, layer in layers:
            found, value = _take(layer, f.name, src, _key(here))
            if found:
                given.append((src, value))
        if not given:
            if _default(f) is dataclasses.MISSING:
                raise ConfigError(f"{_join(s for s, _ in layers)}: missing required key '{_key(here)}'")
            continue
        options = _options(tp)
        sub = options[0] if len(options) == 1 and _is_dataclass_type(options[0]) else None
        if sub is not None:
            default = _instance_mapping(_default(f))
            stack = ([("defaults", default)] if isinstance(default, dict) else []) + given
            # Mappings given over a mapping merge field by field; anything else (null, an instance) replaces.
            start = len(stack) - 1
            while start > 0 and isinstance(stack[start][1], Mapping) and isinstance(stack[start - 1][1], Mapping):
                start -= 1
            top_source, top = stack[-1]
            if isinstance(top, Mapping):
                out[f.name] = _merge(sub, stack[start:], origin, here)
            else:
                origin[here] = top_source
                out[f.name] = _prepare(top, tp, top_source, here, origin)
        elif _is_dict_type(tp):
            # A mapping given whole replaces the dict; dotted keys (``loss_weights.kl=0.1``) set single entries.
            value = _default(f)
            for src, layer in layers:
                if f.name in layer:
                    value, origin[here] = _prepare(layer[f.name], tp, src, here, origin), src
                dotted = _dotted(layer, f.name)
                if dotted:
                    value = {**(value if isinstance(value, dict) else {}), **_prepare(dotted, tp, src, here, origin)}
                    origin.update({(*here, k): src for k in dotted})
            out[f.name] = value
        else:
            src, value = given[-1]
            origin[here] = src
            out[f.name] = _prepare(value, tp, src, here, origin)
    return out


@functools.cache
def _validator(cls: type) -> Any:
    """A pydantic validator of ``list[cls]`` (the list carries the config; a dataclass cannot be given one)."""
    from pydantic import ConfigDict, TypeAdapter

    config = ConfigDict(extra="forbid", coerce_numbers_to_str=True, arbitrary_types_allowed=True)
    return TypeAdapter(list[cls], config=config)


def _translate(err: dict, cls: type, origin: dict) -> ConfigError:
    """A pydantic error said as mmalign says it: the source, the key, the value, what was expected."""
    tp, path = cls, ()
    for part in err["loc"][1:]:  # walk the annotations down pydantic's location (a union's member tag ends it)
        tp = _options(tp)[0] if len(_options(tp)) == 1 else tp
        if _is_dataclass_type(tp) and part in _hints(tp):
            tp = _hints(tp)[part]
        elif _is_list_type(tp) or _is_dict_type(tp):
            tp = (typing.get_args(tp) or (Any, Any))[-1 if _is_dict_type(tp) else 0]
        else:
            break
        path = (*path, part)
    tp = _options(tp)[0] if len(_options(tp)) == 1 else tp
    source = next(origin[path[:i]] for i in range(len(path), -1, -1) if path[:i] in origin)
    value, kind, key = err["input"], err["type"], _key(path)
    if kind in ("value_error", "assertion_error") and _is_dataclass_type(tp):
        sources = _join(s for k, s in origin.items() if k[: len(path)] == path) if path else origin[()]
        return ConfigError(f"{sources}: {key + ': ' if key else ''}invalid {tp.__name__}: {err['ctx']['error']}")
    if value is None:
        return ConfigError(f"{source}: {key}: null is not allowed here (expected {_type_name(tp)})")
    if kind == "literal_error":
        choices = typing.get_args(tp)
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return ConfigError(f"{source}: {key}: {value!r} is not one of {', '.join(map(repr, choices))}{hint}")
    shape = {"list_type": "a list", "tuple_type": "a list", "set_type": "a list", "dict_type": "a mapping"}.get(kind)
    if kind.startswith("dataclass"):
        shape = f"a mapping of {tp.__name__} fields"
    if shape:
        return ConfigError(f"{source}: {key}: expected {shape}, got {_kind(value)}")
    return ConfigError(f"{source}: {key}: {value!r} is not {_type_name(tp)}")


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: Sequence[str] | Mapping[str, Any] | None = None,
) -> T:
    """Build the dataclass ``cls`` from its defaults, the YAML file ``path``, then ``overrides``.

    ``overrides`` is a list of ``key=value`` strings (see :func:`parse_overrides`) or a mapping (dotted keys or
    nested mappings). A nested dataclass merges field by field across the layers; any other value, a ``dict``
    field's mapping included, replaces the one below it, except that dotted keys set single entries of a dict.
    A top-level ``trainer:`` key is read like any field when ``cls`` has one, else ignored.
    Values are validated by pydantic (lax mode) against the annotations; errors raised by ``cls.__post_init__``
    (ValueError, TypeError) come back as ConfigError naming the source.
    """
    if not _is_dataclass_type(cls):
        raise TypeError(f"load_config needs a dataclass type, got {cls!r}")
    layers: list[Layer] = []
    if path is not None:
        layers.append((str(path), load_yaml(path)))
    if overrides:
        flat = dict(overrides) if isinstance(overrides, Mapping) else parse_overrides(overrides)
        layers.append((COMMAND_LINE, flat))
    origin: dict[KeyPath, str] = {(): _join(s for s, _ in layers)}
    data = _merge(cls, layers, origin)
    from pydantic import ValidationError

    try:
        return _validator(cls).validate_python([data])[0]
    except ValidationError as exc:
        raise _translate(exc.errors(include_url=False)[0], cls, origin) from None
    except TypeError as exc:
        raise ConfigError(f"{origin[()]}: invalid {cls.__name__}: {exc}") from exc


# ----------------------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------------------


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, enum.Enum):
        return _to_plain(value.value)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, Mapping):
        return {_to_plain(k): _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return [_to_plain(v) for v in sorted(value)]
    return _plain(value)


def to_dict(config: Any) -> dict[str, Any]:
    """The resolved config as plain YAML-ready data (init fields only; paths as strings, tuples as lists)."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"to_dict needs a dataclass instance, got {type(config).__name__}")
    return _to_plain(config)


def save_config(config: Any, path: str | Path, command: str | None = None) -> Path:
    """Write ``config`` as YAML (reloads with :func:`load_config` to an equal config); returns the path.

    ``command``, if given, is written first as a ``#`` comment (the recipe convention, see :func:`recipe_command`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "".join(f"# {line}\n" for line in command.splitlines()) if command else ""
    body = yaml.dump(to_dict(config), Dumper=_Dumper, sort_keys=False, allow_unicode=True, default_flow_style=False)
    path.write_text(header + body, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------------------
# Recipes shipped in the package
# ----------------------------------------------------------------------------------------------------------

_files = ExitStack()
atexit.register(_files.close)


def _recipe_root() -> Traversable:
    return importlib.resources.files(RECIPE_PACKAGE) / RECIPE_DIR


def list_recipes() -> list[str]:
    """Names of the recipes in the package data folder (``train/sd15-dpo`` for ``configs/train/sd15-dpo.yaml``)."""
    names: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        for child in node.iterdir():
            if child.is_dir():
                walk(child, f"{prefix}{child.name}/")
            elif child.is_file() and child.name.endswith(RECIPE_SUFFIXES):
                names.append(prefix + child.name.rsplit(".", 1)[0])

    root = _recipe_root()
    if root.is_dir():
        walk(root, "")
    return sorted(set(names))


def find_recipe(name_or_path: str | Path) -> Path:
    """An existing YAML file as given, else the packaged recipe of that name (``train/sd15-dpo``)."""
    given = Path(name_or_path)
    if given.is_file():
        return given
    name = str(name_or_path).replace("\\", "/").strip("/")
    for suffix in RECIPE_SUFFIXES:
        name = name.removesuffix(suffix)
    if name and ".." not in name.split("/"):
        root = _recipe_root()
        for suffix in RECIPE_SUFFIXES:
            candidate = root
            for part in f"{name}{suffix}".split("/"):
                candidate = candidate.joinpath(part)
            if candidate.is_file():
                if isinstance(candidate, Path):
                    return candidate
                return _files.enter_context(importlib.resources.as_file(candidate))
    available = list_recipes()
    close = difflib.get_close_matches(name, available, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    listing = "\n  ".join(available) if available else "(none)"
    raise ConfigError(
        f"{name_or_path}: no such file, and no recipe of that name.{hint}\nAvailable recipes:\n  {listing}"
    )


def recipe_command(path: str | Path) -> str | None:
    """The command a recipe starts with: its first leading ``#`` comment (``\\``-continued lines joined).

    Returns None when the file does not start with a comment. ``path`` may also be a recipe name.
    """
    lines = find_recipe(path).read_text(encoding="utf-8").splitlines()
    parts: list[str] = []
    for raw in lines:
        line = raw.strip()
        if not line and not parts:
            continue
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if not text and not parts:
            continue
        if not parts and text.startswith("$ "):
            text = text[2:].lstrip()
        continued = text.endswith("\\")
        parts.append(text[:-1].rstrip() if continued else text)
        if not continued:
            break
    return " ".join(p for p in parts if p) or None
