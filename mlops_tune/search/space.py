"""Search spaces relative to the base model, as plain data.

A space is read from ``conf/search/<model>.yaml``: one *dimension* per config key it
changes. Dimension types:

``int`` / ``float``
    ``low``, ``high``, optional ``log`` (and ``step`` for ints).
``categorical``
    ``choices`` (``null`` allowed, e.g. "no scaler").
``int_list``
    a list of ints such as ``model.hidden_units``: its length goes from ``min_length``
    to ``len(base) + extra_length``; each entry in ``[low, high]`` (optionally ``log``).
    Optuna params are ``<name>_len`` and ``<name>_0 .. <name>_{len-1}``: an entry
    exists only when the list is that long, so there are no phantom values.

Bounds always include the base model's value, so the base model (trial 0) is a point
of the space and can be enqueued exactly as configured.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from mlops_tune.runtime.errors import UsageError

DIMENSION_TYPES = ("int", "float", "categorical", "int_list")


@dataclass(frozen=True)
class Dimension:
    """One config key the search may change."""

    key: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: int = 1
    choices: tuple[Any, ...] = ()
    min_length: int = 1
    max_length: int = 1

    @property
    def name(self) -> str:
        """Optuna param name (the last part of the key)."""
        return self.key.rsplit(".", 1)[-1]

    # ------------------------------------------------------------------ Optuna
    def suggest(self, trial: Any) -> Any:
        """Ask an Optuna trial for this dimension's value."""
        if self.type == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log,
                                     step=1 if self.log else self.step)
        if self.type == "float":
            return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)
        if self.type == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        length = trial.suggest_int(f"{self.name}_len", self.min_length, self.max_length)
        return [trial.suggest_int(f"{self.name}_{i}", int(self.low), int(self.high), log=self.log)
                for i in range(length)]

    def encode(self, value: Any) -> dict[str, Any]:
        """Optuna params that make this dimension take ``value``."""
        if self.type != "int_list":
            return {self.name: value}
        params: dict[str, Any] = {f"{self.name}_len": len(value)}
        params.update({f"{self.name}_{i}": int(v) for i, v in enumerate(value)})
        return params

    def decode(self, params: Mapping[str, Any]) -> Any:
        if self.type != "int_list":
            return params[self.name]
        return [params[f"{self.name}_{i}"] for i in range(params[f"{self.name}_len"])]

    # ------------------------------------------------------------------ mutation
    def operators(self, value: Any) -> list[str]:
        """Mutation operators that change ``value`` and stay inside the bounds."""
        if self.type == "categorical":
            return ["change"] if len(self.choices) > 1 else []
        if self.type in ("int", "float"):
            ops = []
            if value < self.high:
                ops.append("increase")
            if value > self.low:
                ops.append("decrease")
            return ops
        ops = []
        if any(v < self.high for v in value):
            ops.append("widen_layer")
        if any(v > self.low for v in value):
            ops.append("narrow_layer")
        if len(value) < self.max_length:
            ops.append("add_layer")
        if len(value) > self.min_length:
            ops.append("remove_layer")
        return ops

    def mutate(self, value: Any, operator: str, rng: random.Random) -> Any:
        """Apply one operator from :meth:`operators` to ``value``."""
        if operator == "change":
            return rng.choice([c for c in self.choices if c != value])
        if operator in ("increase", "decrease"):
            return self._step(value, +1 if operator == "increase" else -1, rng)
        layers = list(value)
        if operator == "add_layer":
            position = rng.randrange(len(layers) + 1)
            layers.insert(position, layers[min(position, len(layers) - 1)])
        elif operator == "remove_layer":
            layers.pop(rng.randrange(len(layers)))
        else:
            grow = operator == "widen_layer"
            candidates = [i for i, v in enumerate(layers) if (v < self.high if grow else v > self.low)]
            i = rng.choice(candidates)
            # big steps: a base model is often far too small, and halving is the inverse of x2
            factor = rng.choice([2.0, 3.0, 4.0]) if grow else 2.0
            new = math.ceil(layers[i] * factor) if grow else math.floor(layers[i] / factor)
            layers[i] = int(min(max(new, self.low), self.high))
        return layers

    def _step(self, value: float, sign: int, rng: random.Random) -> float:
        assert self.low is not None and self.high is not None
        if self.log:
            factor = math.exp(abs(rng.gauss(0.0, 0.8)) + 0.3)
            new = value * factor if sign > 0 else value / factor
        else:
            span = self.high - self.low
            new = value + sign * max(abs(rng.gauss(0.0, 0.15 * span)), self.step if self.type == "int" else 0.0)
        new = min(max(new, self.low), self.high)
        if self.type == "int":
            new = round(new)
            if new == value:
                new = int(min(max(value + sign * self.step, self.low), self.high))
        return new


@dataclass(frozen=True)
class SearchSpace:
    """The dimensions of a study and the base model's point in them."""

    dimensions: tuple[Dimension, ...]
    base: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, space_cfg: Mapping[str, Any] | None, cfg: Mapping[str, Any]) -> SearchSpace:
        """Build the space of ``conf/search/<model>.yaml`` around the base model in ``cfg``.

        Raises:
            UsageError: empty space, a key the config does not have, or a bad dimension.
        """
        if not space_cfg:
            raise UsageError(
                f"search.space: no search space for model={cfg['model'].get('name')} "
                f"(add conf/search/{cfg['model'].get('name')}.yaml)"
            )
        dims, base, names = [], {}, set()
        for key, spec in space_cfg.items():
            value = _lookup(cfg, key)
            dim = _dimension(key, spec, value)
            if dim.name in names:
                raise UsageError(f"search.space.{key}: two dimensions are named '{dim.name}'")
            names.add(dim.name)
            dims.append(dim)
            base[key] = value
        return cls(tuple(dims), base)

    def point_of(self, cfg: Mapping[str, Any]) -> dict[str, Any]:
        """The point a whole config (e.g. a champion's trial config) sits at; a key it lacks
        takes the base model's value."""
        point = {}
        for dim in self.dimensions:
            try:
                point[dim.key] = _lookup(cfg, dim.key)
            except UsageError:
                point[dim.key] = self.base[dim.key]
        return point

    def including(self, point: Mapping[str, Any]) -> SearchSpace:
        """The same space (still anchored on the base model) with bounds widened just enough to hold ``point``."""
        dims = []
        for dim in self.dimensions:
            value = point[dim.key]
            if dim.type == "categorical":
                dims.append(dim if value in dim.choices else replace(dim, choices=(*dim.choices, value)))
            elif dim.type == "int_list":
                values = [int(v) for v in value] or [int(dim.low)]
                dims.append(replace(dim, low=min(int(dim.low), *values), high=max(int(dim.high), *values),
                                    min_length=min(dim.min_length, len(value)),
                                    max_length=max(dim.max_length, len(value))))
            else:
                low, high = min(dim.low, value), max(dim.high, value)
                if dim.log and low <= 0:
                    raise UsageError(f"search.space.{dim.key}: {value!r} cannot be searched on a log scale")
                dims.append(replace(dim, low=int(low) if dim.type == "int" else low,
                                    high=int(high) if dim.type == "int" else high))
        return SearchSpace(tuple(dims), dict(self.base))

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Ask an Optuna trial for a point; returns ``{config key: value}``."""
        return {dim.key: dim.suggest(trial) for dim in self.dimensions}

    def encode(self, point: Mapping[str, Any]) -> dict[str, Any]:
        params: dict[str, Any] = {}
        for dim in self.dimensions:
            params.update(dim.encode(point[dim.key]))
        return params

    def decode(self, params: Mapping[str, Any]) -> dict[str, Any]:
        return {dim.key: dim.decode(params) for dim in self.dimensions}

    def apply(self, cfg: Mapping[str, Any], point: Mapping[str, Any]) -> dict[str, Any]:
        """A copy of ``cfg`` with the point's values set at their config keys."""
        new = copy.deepcopy(dict(cfg))
        for key, value in point.items():
            node = new
            *parents, leaf = key.split(".")
            for part in parents:
                node = node[part]
            node[leaf] = value
        return new

    def widest(self, point: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]] | None:
        """``point`` with every layer of its layer lists as wide as the space allows (same depth,
        every other setting as ``point``), and the operators as ``"<key>:widest"``; ``None`` when
        the space has no layer list or ``point``'s layers are already at the top.

        A study's probe (``study.probe=widest``): does capacity alone reach the gate?
        """
        child, applied = dict(point), []
        for dim in self.dimensions:
            if dim.type != "int_list" or dim.high is None:
                continue
            wide = [max(int(v), int(dim.high)) for v in point[dim.key]]
            if wide != list(point[dim.key]):
                child[dim.key] = wide
                applied.append(f"{dim.key}:widest")
        return (child, applied) if applied else None

    def mutate(self, point: Mapping[str, Any], rng: random.Random, n_ops: int,
               weights: Mapping[str, float] | None = None) -> tuple[dict[str, Any], list[str]]:
        """Apply ``n_ops`` operators to distinct dimensions of ``point``.

        ``weights`` (by ``"<key>:<operator>"``, default 1) make some operators likelier.
        Returns the child point and the operators applied as ``"<key>:<operator>"``.
        """
        child = dict(point)
        candidates = [(dim, op) for dim in self.dimensions for op in dim.operators(point[dim.key])]
        applied: list[str] = []
        while candidates and len(applied) < n_ops:
            chosen = rng.choices(candidates, [(weights or {}).get(f"{d.key}:{o}", 1.0) for d, o in candidates])[0]
            dim, op = chosen
            child[dim.key] = dim.mutate(child[dim.key], op, rng)
            applied.append(f"{dim.key}:{op}")
            candidates = [(d, o) for d, o in candidates if d.key != dim.key]
        return child, applied


def _lookup(cfg: Mapping[str, Any], key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise UsageError(f"search.space.{key}: the config has no key '{key}' to search over")
        node = node[part]
    return node


def _dimension(key: str, spec: Any, base: Any) -> Dimension:
    if not isinstance(spec, Mapping) or spec.get("type") not in DIMENSION_TYPES:
        raise UsageError(f"search.space.{key}.type: must be one of {', '.join(DIMENSION_TYPES)}")
    known = {"type", "low", "high", "log", "step", "choices", "min_length", "extra_length"}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise UsageError(f"search.space.{key}.{unknown[0]}: unknown key (known: {', '.join(sorted(known))})")
    kind = spec["type"]
    if kind == "categorical":
        choices = list(spec.get("choices") or [])
        if base not in choices:
            choices.insert(0, base)  # the base model must be a point of the space
        return Dimension(key, kind, choices=tuple(choices))
    try:
        low, high = float(spec["low"]), float(spec["high"])
    except (KeyError, TypeError, ValueError):
        raise UsageError(f"search.space.{key}: needs numeric 'low' and 'high'") from None
    if low > high or (spec.get("log") and low <= 0):
        raise UsageError(f"search.space.{key}: needs low <= high (and low > 0 with log: true)")
    if kind == "int_list":
        if not isinstance(base, list) or not all(isinstance(v, int) for v in base):
            raise UsageError(f"search.space.{key}: int_list needs a list of ints in the base model, got {base!r}")
        low, high = min([low, *base]), max([high, *base])
        min_length = min(int(spec.get("min_length", 1)), len(base))
        max_length = len(base) + int(spec.get("extra_length", 2))
        return Dimension(key, kind, low=int(low), high=int(high), log=bool(spec.get("log", False)),
                         min_length=min_length, max_length=max_length)
    if not isinstance(base, (int, float)) or isinstance(base, bool):
        raise UsageError(f"search.space.{key}: {kind} dimension needs a number in the base model, got {base!r}")
    low, high = min(low, base), max(high, base)
    if kind == "int":
        return Dimension(key, kind, low=int(low), high=int(high), log=bool(spec.get("log", False)),
                         step=int(spec.get("step", 1)))
    return Dimension(key, kind, low=low, high=high, log=bool(spec.get("log", False)))
