"""Turning a composed Hydra config (or a config file) into a plain, validated dict.

Hydra already rejects overrides of keys that do not exist (``foo=1``). The schemas of
``mlops_tune.config.schema`` reject keys added with ``+`` that nothing reads and values of the
wrong type; this module adds what a type cannot say (ranges, required values, names of
code a config may point at), each as a :class:`~mlops_tune.runtime.errors.UsageError` naming the key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from mlops_tune.config import names
from mlops_tune.runtime import threads
from mlops_tune.runtime.errors import UsageError, check_int

SAMPLERS = ("tpe", "random", "mutation")
PRUNERS = ("median", "hyperband", "none")
GATE_METRICS = ("val_accuracy",)

names.register()  # tune.yaml's study.name and a multirun's job folders


def load_train(cfg: Any) -> dict[str, Any]:
    """A ``train`` config (or one trial's), resolved, typed by the schema and checked."""
    from mlops_tune.config.schema import TrainConfig

    plain = apply_schema(to_plain(cfg), TrainConfig)
    validate_train(plain)
    return plain


def load_tune(cfg: Any, model: bool = True) -> dict[str, Any]:
    """A ``tune`` config, resolved, typed by the schema and checked. ``model=False``: the model's
    section by its family only later (it imports the model's framework, e.g. scikit-learn: ~1 s),
    by :meth:`mlops_tune.workers.plan.Plan.check`, which the study calls once runner=docker's
    containers have started."""
    from mlops_tune.config.schema import TuneConfig

    plain = apply_schema(to_plain(cfg), TuneConfig)
    validate_tune(plain, model)
    return plain


def apply_schema(plain: Mapping[str, Any], schema: type) -> dict[str, Any]:
    """``plain`` merged over the dataclass ``schema``: unknown keys and wrong types are errors."""
    import dataclasses

    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

    try:
        typed = OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(schema), plain))
    except ConfigKeyError as exc:
        key = str(getattr(exc, "full_key", "") or "config")
        known = sorted(f.name for f in dataclasses.fields(exc.object_type)) \
            if dataclasses.is_dataclass(getattr(exc, "object_type", None)) else []
        raise UsageError(f"{key}: unknown config key" + (f" (known: {', '.join(known)})" if known else "")) from None
    except OmegaConfBaseException as exc:
        key = str(getattr(exc, "full_key", "") or "config")
        reason = str(exc).splitlines()[0]
        if "is not a subclass of" in reason:
            reason = "must be a config section"
        raise UsageError(f"{key}: {reason}") from None
    assert isinstance(typed, dict)
    return typed


def to_plain(cfg: Any) -> dict[str, Any]:
    """Resolve a DictConfig into plain Python containers, reporting missing values by key."""
    from omegaconf import OmegaConf
    from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

    try:
        plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as exc:
        key = getattr(exc, "full_key", None) or "config"
        raise UsageError(f"{key}: required value is missing (set {key}=...)") from None
    except InterpolationResolutionError as exc:
        raise UsageError(f"{getattr(exc, 'full_key', 'config')}: {str(exc).splitlines()[0]}") from None
    assert isinstance(plain, dict)
    _mask_environment_values(cfg, plain)
    from mlops_tune.records.stores import absolute_sqlite
    from mlops_tune.runtime.secrets import move_credentials

    # relative SQLite files mean "in the working folder", for trial processes elsewhere too;
    # a password (from a config file or an ${oc.env:...}) goes where the libraries read it
    for section, key in (("tracking", "uri"), ("study", "storage")):
        if isinstance(plain.get(section), dict) and isinstance(plain[section].get(key), str):
            plain[section][key] = absolute_sqlite(move_credentials(plain[section][key]))
    return plain


#: keys whose values may come from the environment and are printed as they are
_SHOWN_ENV_KEYS = frozenset({"tracking.uri", "tracking.experiment", "study.n_jobs"})


def _mask_environment_values(cfg: Any, plain: Mapping[str, Any]) -> None:
    """Values read from the environment (``${oc.env:NAME}``) are never echoed in messages:
    they may be secrets. (Passwords in URLs are handled by ``secrets.move_credentials``.)"""
    from omegaconf import DictConfig, OmegaConf

    from mlops_tune.runtime.secrets import remember

    def walk(node: Any, resolved: Any, prefix: str) -> None:
        if not isinstance(node, DictConfig) or not isinstance(resolved, Mapping):
            return
        raw = OmegaConf.to_container(node, resolve=False)
        assert isinstance(raw, dict)
        for key, value in raw.items():
            full = f"{prefix}{key}"
            if isinstance(value, str) and "oc.env" in value and full not in _SHOWN_ENV_KEYS:
                remember(str(resolved.get(key)))
            elif isinstance(value, dict):
                walk(node[key], resolved.get(key), f"{full}.")

    walk(cfg, plain, "")


def validate_train(cfg: Mapping[str, Any], model: bool = True) -> None:
    """Check a ``train`` config: model (by its family; ``model=False``: its family's name only),
    data (by its loader), seed, tracking."""
    from mlops_tune.data import loader_arguments
    from mlops_tune.families import get_family

    for section in ("model", "data"):
        if not isinstance(cfg.get(section), Mapping):
            raise UsageError(f"{section}: must be a config section, got {cfg.get(section)!r}")
    check_int(cfg.get("seed"), "seed", low=0, high=2**32)
    _check_tracking(cfg["tracking"])
    if not isinstance(cfg["model"].get("family"), str):
        raise UsageError("model.family: missing (every model YAML names its family)")
    family = get_family(cfg["model"]["family"])
    if model:
        family.validate(cfg["model"])
    loader_arguments(cfg["data"])


def _check_tracking(tracking: Mapping[str, Any]) -> None:
    uri, experiment = tracking.get("uri"), tracking.get("experiment")
    if not isinstance(uri, str) or not uri.strip():
        raise UsageError("tracking.uri: must not be empty (e.g. sqlite:///mlflow.db or http://127.0.0.1:5000)")
    if not isinstance(experiment, str) or not experiment.strip():
        raise UsageError("tracking.experiment: must be a non-empty experiment name (e.g. mlops-tune)")
    ui_url = tracking.get("ui_url")
    if ui_url is not None and not (isinstance(ui_url, str) and ui_url.startswith(("http://", "https://"))):
        raise UsageError(f"tracking.ui_url: must be the MLflow UI's http(s) address (e.g. http://127.0.0.1:5000), "
                         f"got {ui_url!r}")


def validate_tune(cfg: Mapping[str, Any], model: bool = True) -> None:
    """Check a ``tune`` config: everything :func:`validate_train` checks, plus gate and study."""
    validate_train(cfg, model)
    threshold = cfg["gate"]["threshold"]
    if not 0 <= threshold <= 1:
        raise UsageError(f"gate.threshold: must be an accuracy in [0, 1], got {threshold!r}")
    if cfg["gate"]["metric"] not in GATE_METRICS:
        raise UsageError(f"gate.metric: '{cfg['gate']['metric']}' is not one of {', '.join(GATE_METRICS)} "
                         "(the test split is never used to choose)")
    check_int(cfg["worker"], "worker", low=0)
    check_int(cfg["runner"]["workers"], "runner.workers")
    check_int(cfg["gate"]["confirm"], "gate.confirm")
    if cfg["gate"]["max_params"] is not None:
        check_int(cfg["gate"]["max_params"], "gate.max_params")
    limit = cfg["gate"]["max_predict_ms"]
    if limit is not None and not (isinstance(limit, (int, float)) and math.isfinite(limit) and limit > 0):
        raise UsageError(f"gate.max_predict_ms: must be null or a positive number of milliseconds, got {limit!r}")
    for key, choices in (("start_from", ("base", "champion")), ("on_data_change", ("new_study", "fail")),
                         ("probe", ("widest", "none"))):
        if cfg["study"][key] not in choices:
            raise UsageError(f"study.{key}: '{cfg['study'][key]}' is not one of {', '.join(choices)}")
    study = cfg["study"]
    threads.parse_n_jobs(study["n_jobs"])
    for key in ("n_trials", "max_consecutive_failures", "heartbeat_interval", "grace_period"):
        check_int(study[key], f"study.{key}")
    if study["heartbeat_interval"] >= study["grace_period"]:
        raise UsageError(f"study.heartbeat_interval: must be shorter than study.grace_period "
                         f"({study['heartbeat_interval']} >= {study['grace_period']}): live trials would "
                         "be failed as dead")
    if study["timeout"] is not None and study["timeout"] <= 0:
        raise UsageError(f"study.timeout: must be null or a positive number of seconds, got {study['timeout']!r}")
    for key, choices_of, namespace in (("sampler", SAMPLERS, "samplers"), ("pruner", PRUNERS, "pruners")):
        spec = study[key]
        if not (spec in choices_of or (isinstance(spec, Mapping) and "_target_" in spec)):
            raise UsageError(f"study.{key}: '{spec}' is not one of {', '.join(choices_of)} "
                             f"or {{_target_: optuna.{namespace}.X}}")
        if isinstance(spec, Mapping):
            check_code_targets(spec, f"study.{key}", CODE_NAMESPACES[f"study.{key}"])
    if not study["name"]:
        raise UsageError("study.name: must be a non-empty string")


#: the only modules a config may name code from, per key (see docs/reliability.md, "trust")
CODE_NAMESPACES: Mapping[str, tuple[str, ...]] = {
    "study.sampler": ("optuna.samplers.",),
    "study.pruner": ("optuna.pruners.",),
}


def check_code_targets(spec: Any, key: str, namespaces: tuple[str, ...]) -> None:
    """Refuse any ``_target_`` in ``spec`` (nested ones too) outside ``namespaces``, before
    anything is imported or instantiated."""
    if isinstance(spec, Mapping):
        target = spec.get("_target_")
        if target is not None and not (isinstance(target, str) and target.startswith(namespaces)):
            allowed = " or ".join(f"{n}X" for n in namespaces)
            raise UsageError(f"{key}: _target_ {target!r} is not allowed (only {allowed} may be named)")
        for name, sub in spec.items():
            if name != "_target_":
                check_code_targets(sub, key, namespaces)
    elif isinstance(spec, list):
        for sub in spec:
            check_code_targets(sub, key, namespaces)
