"""Typed recipes: a dataclass per trainer, filled from YAML and ``key=value`` command-line overrides.

Each trainer declares a ``<Method>Config`` dataclass (defaults from its paper, checks in ``__post_init__``);
this module fills any such dataclass. Precedence, lowest first: the dataclass defaults, the YAML recipe, the
command line. Every value is coerced to its field's annotated type, and every error is a
:class:`~mmalign.errors.ConfigError` that names the file (or "command line") and the key::

    cfg = load_config(DPOConfig, find_recipe("train/sd15-dpo"), ["lr=1e-5", "lora.rank=8"])
    save_config(cfg, out_dir / "config.yaml")  # reloads to the same config

YAML is read with YAML 1.2 scalars: only ``true``/``false`` are booleans (``no`` stays the string ``"no"``),
``1e-5`` is a float, dates stay strings, and a number written for a string field keeps its text (``1.10``).
A recipe starts with the command that runs it, as leading ``#`` comment lines (see :func:`recipe_command`).
"""

from __future__ import annotations

import atexit
import dataclasses
import difflib
import enum
import importlib.resources
import re
import types
import typing
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any, Literal, TypeVar, Union

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


class _Float(float):
    """A float read from YAML, remembering its text (for string fields)."""

    text: str


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
# Coercion
# ----------------------------------------------------------------------------------------------------------


def _kind(value: Any) -> str:
    kind = type(_plain(value))
    return {dict: "mapping", list: "list", str: "string", type(None): "null"}.get(kind, kind.__name__)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return {"str": "a string", "int": "an int", "float": "a float", "bool": "a bool (true or false)"}.get(
            tp.__name__, tp.__name__
        )
    return str(tp).replace("typing.", "")


def _bad(source: str, key: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"{source}: {key}: {_plain(value)!r} is not {expected}")


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) is Union or (hasattr(types, "UnionType") and isinstance(tp, types.UnionType))


def _parse_flow(value: str, source: str, key: str) -> Any:
    """A ``[...]`` or ``{...}`` string from the command line, read as YAML."""
    return _parse_yaml(value, f"{source}: {key}")


def _coerce(value: Any, tp: Any, source: str, key: str) -> Any:
    """``value`` converted to the annotated type ``tp``, or a ConfigError naming ``source`` and ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if tp is Any or tp is object:
        return _plain(value)
    if _is_union(tp):
        if type(None) in args and (value is None or (isinstance(value, str) and value.strip().lower() in _NULL)):
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(value, option, source, key)
            except ConfigError as exc:
                errors.append(exc)
        if len(options) == 1:
            raise errors[0]
        raise _bad(source, key, value, " or ".join(_type_name(a) for a in args))
    if value is None:
        raise ConfigError(f"{source}: {key}: null is not allowed here (expected {_type_name(tp)})")
    if origin is Literal:
        for choice in args:
            if type(value) is type(choice) and value == choice:
                return choice
            if isinstance(value, (str, _Int, _Float)) and str(getattr(value, "text", value)) == str(choice):
                return choice
        choices = ", ".join(repr(c) for c in args)
        close = difflib.get_close_matches(str(value), [str(c) for c in args], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{source}: {key}: {_plain(value)!r} is not one of {choices}{hint}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise _bad(source, key, value, "a bool (true or false)")
    if tp is int:
        if isinstance(value, bool):
            raise _bad(source, key, value, "an int")
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            text = value.strip()
            try:
                return int(text, 0) if text[:2].lower() in ("0x", "0o", "0b") else int(text)
            except ValueError:
                try:
                    number = float(text)
                except ValueError:
                    number = None
                if number is not None and number.is_integer():
                    return int(number)
        raise _bad(source, key, value, "an int")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise _bad(source, key, value, "a float")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return getattr(value, "text", str(value))
        raise _bad(source, key, value, "a string")
    if isinstance(tp, type) and issubclass(tp, PurePath):
        if isinstance(value, (str, PurePath)):
            return tp(value)
        raise _bad(source, key, value, "a path")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            return value
        for member in tp:
            if value == member.value or str(value) in (member.name, str(member.value)):
                return member
        names = ", ".join(repr(m.value) for m in tp)
        raise ConfigError(f"{source}: {key}: {_plain(value)!r} is not one of {names}")
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if isinstance(value, str) and value.lstrip().startswith("{"):
            value = _parse_flow(value, source, key)
        if isinstance(value, Mapping):
            return _build(tp, [(source, value)], key + ".")
        raise ConfigError(f"{source}: {key}: expected a mapping of {tp.__name__} fields, got {_kind(value)}")
    if origin in (list, tuple, set, frozenset) or origin in (Sequence, typing.Sequence) or tp in (list, tuple):
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                value = _parse_flow(text, source, key)
            else:
                value = [part.strip() for part in text.split(",")] if text else []
        if isinstance(value, (set, frozenset)):
            value = sorted(value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key}: expected a list, got {_kind(value)}")
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ConfigError(f"{source}: {key}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, source, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, source, f"{key}[{i}]") for i, v in enumerate(value)]
        if origin in (tuple, set, frozenset):
            return origin(items)
        return tuple(items) if tp is tuple else items
    if origin in (dict, Mapping, typing.Mapping) or tp is dict:
        if isinstance(value, str) and value.lstrip().startswith("{"):
            value = _parse_flow(value, source, key)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: {key}: expected a mapping, got {_kind(value)}")
        key_type, value_type = args if len(args) == 2 else (Any, Any)
        return {
            _coerce(k, key_type, source, f"{key}.{k}"): _coerce(v, value_type, source, f"{key}.{k}")
            for k, v in value.items()
        }
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{source}: {key}: cannot read {_plain(value)!r} as {_type_name(tp)}")


# ----------------------------------------------------------------------------------------------------------
# Building a dataclass from layers of values
# ----------------------------------------------------------------------------------------------------------

Layer = tuple[str, Mapping]  # (source name, mapping of raw values; keys may be dotted: "lora.rank")


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _dataclass_of(tp: Any) -> type | None:
    """The dataclass type of a field typed ``D`` or ``D | None``, else None."""
    if _is_dataclass_type(tp):
        return tp
    if _is_union(tp):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(options) == 1 and _is_dataclass_type(options[0]):
            return options[0]
    return None


def _is_dict_type(tp: Any) -> bool:
    return typing.get_origin(tp) in (dict, Mapping, typing.Mapping) or tp is dict


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


def _sources(layers: Sequence[Layer]) -> str:
    names = list(dict.fromkeys(src for src, _ in layers if src != "defaults"))
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


def _build(cls: type[T], layers: list[Layer], prefix: str = "") -> T:
    """Build ``cls`` from ``layers`` (lowest precedence first), each a mapping of raw values."""
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError) as exc:
        raise TypeError(f"cannot resolve the type hints of {cls.__name__}: {exc}") from exc
    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = [f.name for f in fields]
    for source, layer in layers:
        for key in layer:
            head = str(key).split(".")[0]
            if head in names or (not prefix and key == "trainer"):
                continue
            close = difflib.get_close_matches(head, names, n=1, cutoff=0.6)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"{source}: unknown key '{prefix}{key}'{hint}")

    kwargs: dict[str, Any] = {}
    for f in fields:
        tp = hints[f.name]
        key = prefix + f.name
        given = []
        for src, layer in layers:
            found, value = _take(layer, f.name, src, key)
            if found:
                given.append((src, value))
        if not given:
            if _default(f) is dataclasses.MISSING:
                raise ConfigError(f"{_sources(layers)}: missing required key '{key}'")
            continue
        sub = _dataclass_of(tp)
        if sub is not None:
            default = _instance_mapping(_default(f))
            stack = ([("defaults", default)] if isinstance(default, dict) else []) + given
            # Mappings given over a mapping merge field by field; anything else (null, an instance) replaces.
            start = len(stack) - 1
            while start > 0 and isinstance(stack[start][1], Mapping) and isinstance(stack[start - 1][1], Mapping):
                start -= 1
            top_source, top = stack[-1]
            if isinstance(top, Mapping):
                kwargs[f.name] = _build(sub, stack[start:], key + ".")
            else:
                kwargs[f.name] = _coerce(top, tp, top_source, key)
        elif _is_dict_type(tp):
            # A mapping given whole replaces the dict; dotted keys (``loss_weights.kl=0.1``) set single entries.
            value = _default(f)
            for src, layer in layers:
                if f.name in layer:
                    value = _coerce(layer[f.name], tp, src, key)
                dotted = _dotted(layer, f.name)
                if dotted:
                    value = {**(value if isinstance(value, dict) else {}), **_coerce(dotted, tp, src, key)}
            kwargs[f.name] = value
        else:
            src, value = given[-1]
            kwargs[f.name] = _coerce(value, tp, src, key)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        where = f"{prefix[:-1]}: " if prefix else ""
        raise ConfigError(f"{_sources(layers)}: {where}invalid {cls.__name__}: {exc}") from exc


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
    Errors raised by ``cls.__post_init__`` (ValueError, TypeError) come back as ConfigError naming the source.
    """
    if not _is_dataclass_type(cls):
        raise TypeError(f"load_config needs a dataclass type, got {cls!r}")
    layers: list[Layer] = []
    if path is not None:
        layers.append((str(path), load_yaml(path)))
    if overrides:
        flat = dict(overrides) if isinstance(overrides, Mapping) else parse_overrides(overrides)
        layers.append((COMMAND_LINE, flat))
    return _build(cls, layers)


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
