"""Typed, validated configuration read from ``params.yaml``.

Each stage owns one frozen dataclass (``DownloadConfig``, ``PrepareConfig`` ...) filled from its
section of ``params.yaml`` by :func:`from_section`. Loading refuses unknown keys and wrong types;
each dataclass's ``__post_init__`` refuses out-of-range values. Every message names the key as
``section.key``, quotes the bad value and says which file it came from, so a typo fails in the
first second of a stage instead of after an hour of training.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

DEFAULT_PARAMS = "params.yaml"


class PipelineError(Exception):
    """An error the user can fix (bad params, bad data, no mirror): shown without a traceback."""


class ConfigError(PipelineError, ValueError):
    """A value in params.yaml (or on the command line) that the pipeline cannot use."""


def load_params(path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    """Read a params.yaml file into a dict; a missing file or a non-mapping top level is an error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file {str(path)!r} not found (run from the repository root, or pass --params)")
    # bytes, so that YAML's reader decodes them and names the bad byte as any other YAML error
    with path.open("rb") as f:
        try:
            params = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
        except RecursionError:
            raise ConfigError(f"{path}: not valid YAML: nested deeper than the parser can follow") from None
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(params).__name__}")
    return params


def require(ok: bool, key: str, value: Any, why: str) -> None:
    """Raise ConfigError naming ``key`` and quoting ``value`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"Got {key}={value!r}: {why}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (int, float, str, bool, list[X], dict, X | None)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"Got {key}={value!r}: expected {_type_name(tp)}")
    if tp is Any:
        return value
    if tp is bool:
        require(isinstance(value, bool), key, value, "expected true or false")
        return value
    if tp is int:
        require(isinstance(value, int) and not isinstance(value, bool), key, value, "expected an integer")
        return value
    if tp is float:
        require(isinstance(value, (int, float)) and not isinstance(value, bool), key, value, "expected a number")
        return float(value)
    if tp is str:
        require(isinstance(value, str), key, value, "expected a string")
        return value
    if origin in (list, tuple):
        require(isinstance(value, (list, tuple)), key, value, f"expected a list ({_type_name(tp)})")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        require(isinstance(value, dict), key, value, "expected a mapping")
        return dict(value)
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")


def from_section(cls: type, params: Mapping[str, Any], section: str, source: str = DEFAULT_PARAMS):
    """Build the dataclass ``cls`` from ``params[section]``, refusing unknown keys and wrong types.

    Keys missing from the section take the dataclass defaults. Errors are prefixed with ``source``
    (the params file) so the user knows where to look.
    """
    raw = params.get(section, {})
    if raw is None:
        raw = {}
    try:
        if not isinstance(raw, dict):
            raise ConfigError(f"Got {section}={raw!r}: expected a mapping of keys")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(raw) - set(fields))
        if unknown:
            raise ConfigError(
                f"unknown key {section}.{unknown[0]} (value {raw[unknown[0]]!r}); "
                f"known keys in {section}: {', '.join(sorted(fields))}"
            )
        values = {name: _coerce(value, hints[name], f"{section}.{name}") for name, value in raw.items()}
        return cls(**values)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except TypeError as e:  # a required field without a default was left out
        raise ConfigError(f"{source}: section {section}: {e}") from None


def load_config(cls: type, section: str, params_path: str | Path = DEFAULT_PARAMS):
    """Read ``params_path`` and build ``cls`` from its ``section``."""
    return from_section(cls, load_params(params_path), section, source=str(params_path))
