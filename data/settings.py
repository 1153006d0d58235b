"""The one config engine: typed dataclasses <-> YAML, ``base:`` files, dotted overrides, CLI flags.

Every configuration in sinklm (model shapes, training runs, the experiment, each tool's settings) is
a plain dataclass with a docstring under each field. This module turns mappings into those
dataclasses (:func:`from_dict`: unknown keys and wrongly typed values are errors naming the key
path, so a typo never silently falls back to a default), reads YAML files that build on others
(:func:`load_config_file`), applies ``section.key=value`` overrides, and derives a tool's argparse
flags from its settings dataclass (:func:`add_settings_args`), so a setting has one name, one
default and one description whether it comes from a CLI flag, a config file or a Python call.

It sits at the bottom of the package graph (data -> pretrain -> inference -> sinklm) so every layer
can use it; it knows nothing about any particular config.
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import functools
import inspect
import re
import textwrap
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names the key (and file)."""


# --------------------------------------------------------------------------------------------
# dataclass <-> dict with validation
# --------------------------------------------------------------------------------------------


def _check_type(value: Any, hint: Any, where: str) -> Any:
    origin = get_origin(hint)
    if hint is Any:
        return value
    if origin is typing.Union or origin is types.UnionType:
        for option in get_args(hint):
            try:
                return _check_type(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_type_name(hint)}, found {value!r}")
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, found {value!r}")
    if origin is Literal:
        if value in get_args(hint):
            return value
        choices = ", ".join(repr(c) for c in get_args(hint))
        raise ConfigError(f"{where}: expected one of {choices}, found {value!r}")
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, found {value!r}")
        return from_dict(hint, value, where=where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, found {value!r}")
        args = get_args(hint)
        item = args[0] if args else Any
        items = [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, found {value!r}")
        return dict(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, found {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, found {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, found {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, found {value!r}")
        return value
    return value


def at_least(minimum: int | float) -> dict[str, Any]:
    """Field metadata: ``field(default=..., metadata=at_least(1))`` makes smaller values an error
    naming the key (or CLI flag), e.g. ``--workers -2``."""
    return {"min": minimum}


def check_field(field: dataclasses.Field, hint: Any, value: Any, where: str) -> Any:
    """``value`` checked against the field's type and its :func:`at_least` bound; errors name ``where``."""
    value = _check_type(value, hint, where)
    minimum = field.metadata.get("min")
    if minimum is not None and isinstance(value, (int, float)) and not isinstance(value, bool) and value < minimum:
        raise ConfigError(f"{where}: expected a value >= {minimum}, found {value!r}")
    return value


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and bad types raise :class:`ConfigError`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, found {data!r}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}"
            + (f" (and {len(unknown) - 1} more: {', '.join(unknown[1:])})" if len(unknown) > 1 else "")
            + f"; valid keys of {cls.__name__}: {', '.join(sorted(names))}"
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        kwargs[key] = check_field(fields[key], hints[key], value, path)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        if where and not str(err).startswith(where):
            raise ConfigError(f"{where}.{err}") from None
        raise


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain dict (YAML/JSON friendly)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# --------------------------------------------------------------------------------------------
# YAML files, ``base:`` chains, overrides
# --------------------------------------------------------------------------------------------


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; expected a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, found {type(data).__name__}")
    return data


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge ``update`` onto a copy of ``base`` (mappings merge, anything else replaces)."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


# YAML 1.1 reads "3e-4" (no dot) as a string; every config author writes it, so read it as a number.
_EXPONENT_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def numbers_in_exponent_form(value: Any) -> Any:
    """``"3e-4"`` -> 0.0003, recursively through mappings and lists; anything else unchanged."""
    if isinstance(value, str) and _EXPONENT_FLOAT.match(value.strip()):
        return float(value)
    if isinstance(value, dict):
        return {k: numbers_in_exponent_form(v) for k, v in value.items()}
    if isinstance(value, list):
        return [numbers_in_exponent_form(v) for v in value]
    return value


Normalize = Callable[[dict[str, Any], Path], dict[str, Any]]
Merge = Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]


def load_config_file(
    path: str | Path, normalize: Normalize | None = None, merge: Merge = deep_merge, _seen: tuple[Path, ...] = ()
) -> dict[str, Any]:
    """One YAML file with its ``base:`` files (a name or a list, relative to the file) merged underneath.

    ``normalize(data, path)`` reshapes each file's mapping before merging (e.g. a preset name into a
    mapping); ``merge(base, update)`` combines them (default: :func:`deep_merge`).
    """
    path = Path(path)
    resolved = path.resolve()
    if resolved in _seen:
        raise ConfigError(f"{path}: circular `base` chain: {' -> '.join(str(p) for p in (*_seen, resolved))}")
    data = numbers_in_exponent_form(load_yaml(path))
    bases = data.pop("base", None) or []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: base: expected a file name or a list of them, found {bases!r}")
    merged: dict[str, Any] = {}
    for base in bases:
        base_path = path.parent / base
        if not base_path.is_file():
            found = "a folder" if base_path.is_dir() else "no such file"
            raise ConfigError(f"{path}: base: {base!r} -> {base_path}: expected a YAML file, found {found}")
        merged = merge(merged, load_config_file(base_path, normalize, merge, (*_seen, resolved)))
    if normalize is not None:
        data = normalize(data, path)
    return merge(merged, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.lr=3e-4`` -> (["train", "lr"], 0.0003); values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected --section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), numbers_in_exponent_form(value)


def apply_override(data: dict[str, Any], keys: list[str], value: Any) -> dict[str, Any]:
    """``data`` with ``value`` set at the nested key path ``keys`` (mappings merge)."""
    nested: Any = value
    for key in reversed(keys):
        nested = {key: nested}
    return deep_merge(data, nested)


def split_cli_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate ``--section.key=value`` / ``--section.key value`` overrides from the other arguments."""
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
        if "." in name:
            if "=" in arg:
                overrides.append(arg[2:])
            elif i + 1 < len(argv):
                overrides.append(f"{name}={argv[i + 1]}")
                i += 1
            else:
                raise ConfigError(f"override {arg} has no value")
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


# --------------------------------------------------------------------------------------------
# CLI flags derived from a settings dataclass
# --------------------------------------------------------------------------------------------


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of dataclass ``cls`` (and its bases), by field name."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, following in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _optional_inner(hint: Any) -> tuple[Any, bool]:
    """(X, True) for ``X | None``; (hint, False) otherwise."""
    if get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(args) < len(get_args(hint)):
            return args[0], True
    return hint, False


def _comma_list(item: type, flag: str) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        try:
            return [item(part.strip()) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {item.__name__}s, found {text!r}"
            ) from None

    parse.__name__ = f"{flag} list"
    return parse


def _default_of(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return field.default_factory()  # type: ignore[misc]
    return None


def _settings_fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    hints = get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.init]


def add_settings_args(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    skip: Sequence[str] = (),
    flags: dict[str, str] | None = None,
) -> None:
    """One flag per field of dataclass ``cls``: ``--field-name`` (or ``flags[field]``).

    The type comes from the field's hint (int/float/str; ``bool`` -> ``--x/--no-x``; ``list[int]`` /
    ``list[str]`` -> comma-separated text; ``Literal`` -> choices; ``X | None`` -> optional X), the
    default from the field's default, the help from the docstring under the field. A field whose
    type is itself a dataclass adds that dataclass's flags (flat). Values land under the field names.
    """
    docs = field_docs(cls)
    flags = flags or {}
    for field, hint in _settings_fields(cls):
        if field.name in skip:
            continue
        inner, _ = _optional_inner(hint)
        if dataclasses.is_dataclass(inner):
            add_settings_args(parser, inner, skip=skip, flags=flags)
            continue
        flag = flags.get(field.name, "--" + field.name.replace("_", "-"))
        default = _default_of(field)
        help_text = docs.get(field.name, "")
        kwargs: dict[str, Any] = {"dest": field.name, "default": default}
        if inner is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(inner) is Literal:
            kwargs["choices"] = list(get_args(inner))
        elif get_origin(inner) in (list, tuple):
            item = (get_args(inner) or (str,))[0]
            kwargs["type"] = _comma_list(item, flag)
            kwargs["metavar"] = f"{item.__name__.upper()},..."
        elif inner in (int, float, str):
            kwargs["type"] = inner
        if default not in (None, "", [], ()) and inner is not bool:
            shown = ",".join(str(v) for v in default) if isinstance(default, (list, tuple)) else default
            help_text = f"{help_text} (default: {shown})" if help_text else f"default: {shown}"
        parser.add_argument(flag, help=help_text.replace("%", "%%"), **kwargs)


def settings_from_args(
    cls: type, args: argparse.Namespace, *, flags: dict[str, str] | None = None, **override: Any
) -> Any:
    """The dataclass ``cls`` from parsed ``args`` (fields not on ``args`` keep their defaults);
    ``override`` sets fields directly. Values are checked like a config file's, and an error names
    the flag (``flags`` as given to :func:`add_settings_args`)."""
    values: dict[str, Any] = {}
    flags = flags or {}
    for field, hint in _settings_fields(cls):
        inner, _ = _optional_inner(hint)
        if field.name in override:
            values[field.name] = override[field.name]
        elif dataclasses.is_dataclass(inner) and not hasattr(args, field.name):
            values[field.name] = settings_from_args(inner, args, flags=flags)
        elif hasattr(args, field.name):
            flag = flags.get(field.name, "--" + field.name.replace("_", "-"))
            values[field.name] = check_field(field, hint, getattr(args, field.name), flag)
    return from_dict(cls, values, where=getattr(cls, "config_section", ""))


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (``prog: error: ...``, exit status 2) instead of the usage block."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
