"""Typed configuration: dataclasses loaded from YAML presets with ``key=value`` overrides.

Every job has one config dataclass (fields documented on the class). A preset YAML fills some fields, command-line
overrides like ``sampling.frames_per_clip=16`` or ``clips.length_s=4`` change single values, and the dataclasses'
own ``__post_init__`` checks validate the result. Unknown keys are errors, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

__all__ = [
    "ConfigError",
    "apply_overrides",
    "check_choices",
    "flag_overrides",
    "flatten",
    "from_dict",
    "load_config",
    "to_dict",
]

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value or key that does not fit the config's schema; the message names the field."""


def _coerce(value: Any, annotation: Any, field_path: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{field_path}: expected a mapping, got {value!r}")
        return from_dict(annotation, value, field_path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, field_path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{field_path}: {value!r} fits none of {annotation}: {errors}")
    if origin is typing.Literal:
        # Same type as well as equal value: True is not the choice 1, nor 2.0 the choice 2.
        if not any(value == choice and type(value) is type(choice) for choice in args):
            raise ConfigError(f"{field_path}: must be one of {list(args)}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{field_path}: expected a list, got {value!r}")
        item_type = args[0] if args else Any
        items = [_coerce(v, item_type, f"{field_path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{field_path}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is Any:
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{field_path}: expected true/false, got {value!r}")
        return value
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str) and not isinstance(value, annotation):
        raise ConfigError(f"{field_path}: expected {annotation.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict, path: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) mapping, checking keys and types.

    Raises:
        ConfigError: naming the field for an unknown key, a wrong type, or a failed validation.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{path or cls.__name__}: unknown key(s) {unknown}; known: {sorted(fields)}")
    values = {key: _coerce(value, hints[key], f"{path}{key}") for key, value in data.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{path or cls.__name__}: {exc}") from None


def _has_literal(annotation: Any) -> bool:
    if typing.get_origin(annotation) is typing.Literal:
        return True
    return any(_has_literal(arg) for arg in typing.get_args(annotation))


@functools.cache
def _choice_fields(cls: type) -> tuple[tuple[str, Any], ...]:
    hints = typing.get_type_hints(cls)
    return tuple((f.name, hints[f.name]) for f in dataclasses.fields(cls) if _has_literal(hints[f.name]))


def check_choices(config: Any, prefix: str = "", error: type[ValueError] = ConfigError) -> None:
    """Check the ``Literal``-typed fields of a dataclass built directly in Python (``load_config`` checks them
    already): call it from ``__post_init__`` instead of listing the choices by hand.

    Args:
        config: A dataclass instance.
        prefix: Prepended to field names in the message (``"model."`` gives ``model.quantization: ...``).
        error: The exception class to raise (a ``ValueError`` taking one message).

    Raises:
        ValueError: ``error``, naming the field, the choices and the value, for the first field off its choices.
    """
    for name, annotation in _choice_fields(type(config)):
        try:
            _coerce(getattr(config, name), annotation, f"{prefix}{name}")
        except ConfigError as exc:
            if error is ConfigError:
                raise
            raise error(str(exc)) from None


def to_dict(config: Any) -> dict:
    """A config as plain nested dicts/lists (for YAML, JSON and MLflow params)."""
    return dataclasses.asdict(config)


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; the form used for overrides and MLflow params."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply ``dotted.key=value`` strings to a nested dict; values are parsed as YAML (``8`` is an int).

    Raises:
        ConfigError: for an override without ``=``.
    """
    data = dict(data)
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {override!r} is not key=value")
        node = data
        *parents, leaf = key.strip().split(".")
        for part in parents:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        node[leaf] = yaml.safe_load(text) if text.strip() else ""
    return data


def flag_overrides(flags: Mapping[str, Any], overrides: Sequence[str] = ()) -> list[str]:
    """A job's command-line flags as ``key=value`` overrides, before its own ``key=value`` overrides (which win).

    Args:
        flags: Config field (dotted) -> flag value, e.g. ``{"source": args.source, "sampling.strategy": args.sampler}``;
            a flag left ``None`` is not given. Strings are JSON-quoted, so a path such as ``123`` or ``null`` stays
            the string it is.
        overrides: The ``dotted.key=value`` strings of the command line.

    Returns:
        The overrides for :func:`load_config`.
    """
    given = [
        f"{key}={json.dumps(value) if isinstance(value, str) else value}"
        for key, value in flags.items()
        if value is not None
    ]
    return [*given, *overrides]


def load_config(cls: type[T], preset: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Load ``cls`` from an optional YAML preset plus ``key=value`` overrides on top of the class defaults.

    Args:
        cls: The config dataclass.
        preset: YAML file with a (partial) mapping of the config's fields.
        overrides: ``dotted.key=value`` strings.

    Raises:
        ConfigError: naming the field or file for anything that does not fit.
    """
    data: dict = {}
    if preset is not None:
        path = Path(preset)
        if not path.is_file():
            raise ConfigError(f"config preset {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        data = loaded
    data = apply_overrides(data, overrides)
    return from_dict(cls, data)
