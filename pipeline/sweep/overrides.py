"""One ``-S`` override read as ``dvc exp run -S`` reads it: Hydra's grammar, DVC's struct mode.

The values are typed by letting Hydra apply the override to params.yaml's section, exactly as DVC's
``apply_overrides`` does, so a sweep's training sees the value that ``dvc exp run -S`` would write
(``1`` an int, ``1.0`` a float, ``'1'`` a string, ``[...]`` a list). Every refusal here is one line
that quotes the override as typed and names the params file.
"""

from __future__ import annotations

import copy
import functools
import itertools
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, ValueType
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.core.config import ConfigError

FIXED, CHOICE, RANGE, INTERVAL = "fixed", "choice", "range", "interval"
MAX_VALUES = 1_000  # values of one override; and trainings of one grid (pipeline.sweep.space)


@dataclass(frozen=True)
class Axis:
    """One ``-S`` override: the key it sets and the values it gives, typed as DVC writes them."""

    typed: str  # the override as typed, quoted by every message about it
    key: str  # the dotted key, without the + or ++ that adds it
    kind: str  # FIXED, CHOICE (a,b or choice(...)), RANGE or INTERVAL
    values: tuple[Any, ...]  # FIXED: one; CHOICE and RANGE: every value, in Hydra's order; INTERVAL: its ends
    log: bool = False  # tag(log, ...)
    start: int | float | None = None  # RANGE: where it starts (its values may be shuffled)
    step: int | float | None = None  # RANGE: its step

    def corners(self) -> tuple[Any, ...]:
        """The values checked in combination with the other axes: a range's ends, every choice."""
        if self.kind == RANGE:
            return (self.values[0], self.values[-1])
        return self.values


def parse_axis(typed: str, params: Mapping[str, Any], source: str, sections: Collection[str]) -> Axis:
    """One override, parsed by Hydra and typed as DVC would write it; its key must be in ``sections``
    when it is in params.yaml at all (a sweep varies only what a training reads)."""
    override = _parse(_without_file(typed, source), typed, source)
    _refuse_unsupported(override, typed, source)
    _check_key(override, params, typed, source, sections)
    key = override.key_or_group
    if not override.is_sweep_override():
        value = _typed_value(params, override, override.get_value_element_as_str(), typed, source)
        return Axis(typed, key, FIXED, (value,))
    sweep = override.value()
    log = "log" in sweep.tags
    if override.is_interval_sweep():
        return Axis(typed, key, INTERVAL, (sweep.start, sweep.end), log=log)
    values = tuple(_typed_value(params, override, text, typed, source) for text in _strings(override, typed, source))
    if not values:
        raise refusal([typed], source, "gives no value (a range's stop is excluded: range(1,4) is 1, 2, 3)")
    if override.is_range_sweep():
        return Axis(typed, key, RANGE, values, log=log, start=sweep.start, step=sweep.step)
    return Axis(typed, key, CHOICE, values, log=log)


@functools.cache
def _parser() -> OverridesParser:
    return OverridesParser.create()


def _parse(text: str, typed: str, source: str) -> Override:
    try:
        (override,) = _parser().parse_overrides([text])
    except HydraException as e:
        raise refusal([typed], source, f"not an override: {_hydra_reason(e)}") from None
    return override


def _without_file(typed: str, source: str) -> str:
    """The override without DVC's ``file:`` prefix, which may name only ``source``."""
    name = typed.partition("=")[0]
    if ":" not in name:
        return typed
    path, _, override = typed.partition(":")
    if Path(path) != Path(source) and Path(path).resolve() != Path(source).resolve():
        raise refusal([typed], source, f"a sweep sets values of {source} only, not of {path}")
    return override


def _refuse_unsupported(override: Override, typed: str, source: str) -> None:
    if override.value_type == ValueType.GLOB_CHOICE_SWEEP:
        raise refusal(
            [typed], source, "glob(...) picks Hydra config-group options; dvc exp run refuses it too: list the values"
        )
    if override.is_delete():
        raise refusal([typed], source, "deleting a key (~) is not supported by a sweep: set its value instead")
    if override.package is not None:
        raise refusal([typed], source, "a package (@) names a Hydra config group, which params.yaml has none of")
    if "${" in (override.input_line or "").partition("=")[2]:
        raise refusal([typed], source, "interpolations (${...}) are not supported by a sweep: give the value")


def _check_key(
    override: Override, params: Mapping[str, Any], typed: str, source: str, sections: Collection[str]
) -> None:
    """The key is in params.yaml unless added (DVC's struct mode), in a section a training reads."""
    key = override.key_or_group
    section = key.split(".")[0]
    if section in params and section not in sections:
        raise refusal(
            [typed],
            source,
            f"a sweep only trains, on the data already made, and no training reads {section}: "
            f"vary it with dvc exp run -S, which runs the {section} stage",
        )
    if not (override.is_add() or override.is_force_add()) and not has(params, key):
        raise refusal([typed], source, f"no key {key!r} in {source}{_known_keys(params, key)}; +{typed} adds it")


def _known_keys(params: Mapping[str, Any], key: str) -> str:
    """The keys beside the missing one, to spot a typo: " (keys in train: dataset, ...)"."""
    parent = key.rpartition(".")[0]
    if not parent:
        return f" (sections: {', '.join(map(str, params))})"
    node = lookup(params, parent) if has(params, parent) else None
    if not isinstance(node, Mapping):
        return ""
    return f" (keys in {parent}: {', '.join(map(str, node))})"


def _strings(override: Override, typed: str, source: str) -> list[str]:
    """A choice's or range's values as override text, as DVC's queue writes them (BasicSweeper).

    At most MAX_VALUES: each is typed and checked one by one (milliseconds each), so range(1,100000000)
    would hold the sweep for days before its first training."""
    try:
        strings = list(itertools.islice(override.sweep_string_iterator(), MAX_VALUES + 1))
    except (HydraException, ValueError) as e:
        raise refusal([typed], source, _hydra_reason(e)) from None
    if len(strings) > MAX_VALUES:
        why = f"gives more than the {MAX_VALUES:,} values a sweep's override may have: narrow it"
        raise refusal([typed], source, why)
    return strings


def _typed_value(params: Mapping[str, Any], override: Override, text: str, typed: str, source: str) -> Any:
    """The value ``key=text`` leaves at its key: Hydra applies it to params in struct mode, as DVC."""
    key = override.key_or_group
    section = key.split(".")[0]
    base = {section: copy.deepcopy(params[section])} if section in params else {}
    config = OmegaConf.create(base, flags={"allow_objects": True})
    OmegaConf.set_struct(config, True)
    try:
        parsed = _parser().parse_overrides([f"{override.get_key_element()}={text}"])
        ConfigLoaderImpl._apply_overrides_to_config(parsed, config)
        return lookup(OmegaConf.to_object(config), key)
    except (HydraException, OmegaConfBaseException) as e:
        raise refusal([typed], source, _hydra_reason(e)) from None


def refuse_overlaps(axes: Sequence[Axis], source: str) -> None:
    """Each key once: DVC would apply both, one over the other, which a sweep point cannot say."""
    for i, axis in enumerate(axes):
        for earlier in axes[:i]:
            outer, inner = sorted((axis.key, earlier.key), key=len)
            if inner == outer or inner.startswith(outer + "."):
                raise refusal([earlier.typed, axis.typed], source, f"both set {inner}: give each key once")


def refusal(typed: Sequence[str], source: str, reason: str) -> ConfigError:
    overrides = " ".join(f"-S {text}" for text in typed)
    return ConfigError(f"{overrides} ({source}): {one_line(reason)}")


def _hydra_reason(error: Exception) -> str:
    """Hydra's message without its parse header, caret line and link to the grammar's docs."""
    lines = [line.strip() for line in str(error).splitlines()]
    kept = [
        line
        for line in lines
        if line and not line.startswith(("See https://hydra.cc", "Error parsing override")) and set(line) != {"^"}
    ]
    return "; ".join(kept) or type(error).__name__


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def lookup(tree: Any, key: str) -> Any:
    node = tree
    for part in key.split("."):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, Mapping) and part in node:
            node = node[part]
        else:
            raise KeyError(key)
    return node


def has(tree: Any, key: str) -> bool:
    try:
        lookup(tree, key)
    except KeyError:
        return False
    return True
