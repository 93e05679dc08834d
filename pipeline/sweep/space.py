"""The search space of a sweep: ``dvc exp run -S`` overrides, checked against params.yaml up front.

``dvc exp run -S`` reads each override with Hydra's grammar (``dvc/utils/hydra.py``). A sweep reads
it with the same parser, so ``-S 'train.eta=0.1,0.03'`` means the same in both: the same points, in
the order DVC's queue runs them (Hydra's BasicSweeper: the first override varies slowest), each
value typed as DVC writes it into params.yaml. For an Optuna search, ``range(...)``,
``interval(...)`` and ``tag(log, ...)`` become distributions; a single value is the same in every
trial.

Everything is checked where the space is built, so a typo fails in the first second rather than
after the first training: every key must be in params.yaml (``+key=value`` adds one, as in DVC's
struct mode), a sweep sets only the sections a training reads, and every point gives a valid
training config. Each refusal is one line quoting the override as typed and naming the params file.
"""

from __future__ import annotations

import copy
import decimal
import hashlib
import itertools
import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hydra.core.override_parser.types import Transformer

from pipeline.core.config import DEFAULT_PARAMS, ConfigError, from_section
from pipeline.nn.config import TrainConfig
from pipeline.sweep.overrides import (
    CHOICE,
    FIXED,
    INTERVAL,
    MAX_VALUES,
    Axis,
    one_line,
    parse_axis,
    refusal,
    refuse_overlaps,
)
from pipeline.tracking import TrackingConfig

# the sections a training reads, with their configs; the others belong to stages a sweep does not run
TRAINING_SECTIONS = {"train": TrainConfig, "tracking": TrackingConfig}
# what Optuna's CategoricalDistribution accepts as a choice
OPTUNA_CHOICE_TYPES = (type(None), bool, int, float, str)


@dataclass(frozen=True)
class SearchSpace:
    """The overrides of one sweep, checked: build it with :func:`parse_space`."""

    axes: tuple[Axis, ...]
    params: dict[str, Any] = field(repr=False)  # params.yaml as read, before any override
    source: str = DEFAULT_PARAMS
    _reasons: dict[str, str | None] = field(default_factory=dict, repr=False, compare=False)  # per config

    def swept(self) -> tuple[Axis, ...]:
        return tuple(axis for axis in self.axes if axis.kind != FIXED)

    def fixed(self) -> dict[str, Any]:
        """The single-value overrides, the same in every point: {dotted key: typed value}."""
        return {axis.key: copy.deepcopy(axis.values[0]) for axis in self.axes if axis.kind == FIXED}

    def grid(self) -> list[dict[str, Any]]:
        """Every point, {dotted key: typed value} of the swept keys, in the order DVC's queue runs them.

        Every point is checked first: a grid that would fail at its 40th training fails now."""
        continuous = [axis for axis in self.swept() if axis.kind == INTERVAL]
        if continuous:
            raise refusal(
                [continuous[0].typed],
                self.source,
                "interval(...) is continuous and a grid needs a finite list: give a,b,c, choice(...) or "
                "range(...), or sample it with --search optuna",
            )
        sizes = [len(axis.values) for axis in self.swept()]
        if math.prod(sizes) > MAX_VALUES:
            raise refusal(
                [axis.typed for axis in self.swept()],
                self.source,
                f"a grid of {' x '.join(map(str, sizes))} = {math.prod(sizes):,} trainings, more than the "
                f"{MAX_VALUES:,} a grid may have: narrow the values, or sample them with --search optuna --trials N",
            )
        keys = [axis.key for axis in self.swept()]
        points = [dict(zip(keys, values)) for values in itertools.product(*(a.values for a in self.swept()))]
        fixed = self.fixed()
        self._check({**fixed, **point} for point in points)
        return copy.deepcopy(points)

    def distributions(self) -> dict[str, Any]:
        """The swept keys as Optuna distributions, {dotted key: BaseDistribution}; fixed keys are not in it."""
        from pipeline.sweep.study import import_optuna

        optuna = import_optuna()
        return {axis.key: _distribution(axis, self.source, optuna.distributions) for axis in self.swept()}

    def apply(self, params: Mapping[str, Any], point: Mapping[str, Any]) -> dict[str, Any]:
        """A deep copy of ``params`` with the fixed values and the point's set: the params of one training."""
        swept = [axis.key for axis in self.swept()]
        if sorted(point) != sorted(swept):
            raise ConfigError(
                f"a point of this sweep sets {', '.join(swept) or 'nothing'}, not {', '.join(point) or 'nothing'}"
            )
        return _with_values(params, {**self.fixed(), **point})

    def point_key(self, point: Mapping[str, Any]) -> str:
        """A short hash of the fixed and the point's values, stable across runs: a folder name."""
        text = json.dumps({**self.fixed(), **point}, sort_keys=True, default=repr)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def describe(self, point: Mapping[str, Any]) -> str:
        """The point in the overrides' own syntax, e.g. ``train.eta=0.1 train.epochs=3``."""
        return " ".join(f"{key}={Transformer.str(value)}" for key, value in point.items())

    def _check(self, points: Iterable[Mapping[str, Any]]) -> None:
        """Raise, naming the override to blame, at the first point that gives no valid training."""
        for values in points:
            reason = self._reason(values)
            if reason is not None:
                raise self._blame(values, reason)

    def _reason(self, values: Mapping[str, Any]) -> str | None:
        """Why params.yaml with ``values`` set gives no valid training config; None when it does."""
        params = _with_values(self.params, values)
        touched = {axis.key.split(".")[0] for axis in self.axes}
        sections = [name for name in TRAINING_SECTIONS if name == "train" or name in touched]
        key = repr([(name, params.get(name)) for name in sections])
        if key not in self._reasons:
            self._reasons[key] = _config_reason(params, sections, self.source)
        return self._reasons[key]

    def _blame(self, values: Mapping[str, Any], reason: str) -> ConfigError:
        """The refusal of a failing point: the override the message names, else the one failing alone."""
        involved = [axis for axis in self.axes if axis.key in values]
        blamed = [axis for axis in involved if _names(reason, axis.key)]
        if len(blamed) != 1:
            if not blamed and self._reason({}) == reason:
                return ConfigError(f"{self.source}: {reason}")
            alone = [axis for axis in involved if self._reason({axis.key: values[axis.key]}) == reason]
            blamed = alone[:1] or involved
        own = {a.key: values[a.key] for a in involved if a.kind == FIXED or a in blamed}
        others = {a.key: values[a.key] for a in involved if a.key not in own}
        context = f"with {self.describe(others)}: " if others and self._reason(own) != reason else ""
        return refusal([axis.typed for axis in blamed], self.source, context + reason)


def parse_space(overrides: Sequence[str], params: Mapping[str, Any], source: str = DEFAULT_PARAMS) -> SearchSpace:
    """The search space of ``-S`` overrides on ``params`` (read from ``source``), checked.

    Checked here: the syntax (Hydra's), the keys, the sections, every value of every override and,
    together, every choice with the other overrides' choices and their ranges' and intervals' ends.
    The interior of a grid is checked by :meth:`SearchSpace.grid`."""
    if isinstance(overrides, str):
        overrides = [overrides]
    axes = tuple(parse_axis(typed, params, source, TRAINING_SECTIONS) for typed in overrides)
    refuse_overlaps(axes, source)
    space = SearchSpace(axes, copy.deepcopy(dict(params)), source)
    space._check(_points_to_check(space))
    return space


def _points_to_check(space: SearchSpace) -> Iterator[dict[str, Any]]:
    """Every value of each axis with the others at their first, then every combination of corners."""
    fixed = space.fixed()
    swept = space.swept()
    first = {axis.key: axis.values[0] for axis in swept}
    yield {**fixed, **first}
    for axis in swept:
        for value in axis.values:
            yield {**fixed, **first, axis.key: value}
    if len(swept) > 1:
        for values in itertools.product(*(axis.corners() for axis in swept)):
            yield {**fixed, **dict(zip((axis.key for axis in swept), values))}


def _config_reason(params: Mapping[str, Any], sections: Sequence[str], source: str) -> str | None:
    for name in sections:
        try:
            from_section(TRAINING_SECTIONS[name], params, name, source=source)
        except ConfigError as e:
            return one_line(str(e).removeprefix(f"{source}: "))
    return None


def _distribution(axis: Axis, source: str, distributions: Any) -> Any:
    """The Optuna distribution of a swept axis; Optuna's own refusals become one line naming it."""
    if axis.kind == CHOICE:
        if axis.log:
            raise refusal([axis.typed], source, "tag(log, ...) applies to range(...) and interval(...), not choices")
        odd = [value for value in axis.values if not isinstance(value, OPTUNA_CHOICE_TYPES)]
        if odd:
            raise refusal(
                [axis.typed],
                source,
                f"Optuna picks among numbers, strings, booleans and null, not {odd[0]!r}: name a preset, or run a grid",
            )
    if axis.kind == INTERVAL and all(isinstance(end, int) for end in axis.values):
        raise refusal([axis.typed], source, "an integer interval: give range(a,b), whose stop b is excluded")
    try:
        if axis.kind == CHOICE:
            return distributions.CategoricalDistribution(axis.values)
        if axis.kind == INTERVAL:
            return distributions.FloatDistribution(*axis.values, log=axis.log)
        low, high, step = _range_bounds(axis)
        if isinstance(step, int):
            return distributions.IntDistribution(low, high, step=step, log=axis.log)
        return distributions.FloatDistribution(low, high, step=step, log=axis.log)
    except ValueError as e:
        raise refusal([axis.typed], source, f"Optuna: {e}") from None


def _range_bounds(axis: Axis) -> tuple[int | float, int | float, int | float]:
    """A range's lowest and highest values and its step, for Optuna, whose high is included.

    Hydra's stop is excluded, so the high end is the last value the range gives. Float ends are
    worked out in decimal (start + step * (n - 1)), as Optuna checks that the step divides the span."""
    n = len(axis.values)
    if all(isinstance(value, int) for value in axis.values):  # Hydra's int range: start, stop and step ints
        ends = (axis.start, axis.start + axis.step * (n - 1))
        return min(ends), max(ends), abs(axis.step)
    start, step = decimal.Decimal(str(axis.start)), decimal.Decimal(str(axis.step))
    ends = (float(start), float(start + step * (n - 1)))
    return min(ends), max(ends), float(abs(step))


def _names(reason: str, key: str) -> bool:
    """Whether a config message is about ``key`` ("Got train.eta=...", "unknown key train.x")."""
    return re.search(rf"(?<![\w.]){re.escape(key)}(?![\w.])", reason) is not None


def _with_values(params: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(params))
    for key, value in values.items():
        _set(out, key, copy.deepcopy(value))
    return out


def _set(tree: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node: Any = tree
    for part in parents:
        if isinstance(node, list):
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
