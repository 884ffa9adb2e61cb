"""Turning a composed Hydra config into a plain, validated dict.

Hydra already rejects overrides of keys that do not exist (``foo=1``); this module
rejects keys added with ``+`` that nothing reads, missing required values and values
out of range, each as a :class:`~mlops_tune.errors.UsageError` that names the key.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from mlops_tune.errors import UsageError

TRAIN_SECTIONS = frozenset({"model", "data", "tracking", "seed"})
TUNE_SECTIONS = TRAIN_SECTIONS | {"runner", "search", "gate", "study", "registry", "report", "worker"}
SAMPLERS = ("tpe", "random", "mutation")
PRUNERS = ("median", "hyperband", "none")
GATE_METRICS = ("val_accuracy",)

#: keys of the fixed sections (the model and data sections are checked by their family / loader)
SECTION_KEYS: Mapping[str, frozenset[str]] = {
    "tracking": frozenset({"uri", "experiment"}),
    "gate": frozenset({"threshold", "metric"}),
    "study": frozenset({
        "name", "storage", "n_trials", "timeout", "sampler", "pruner",
        "max_consecutive_failures", "heartbeat_interval", "grace_period",
    }),
    "registry": frozenset({"name", "promote"}),
    "report": frozenset({"junit"}),
    "runner": frozenset({"name", "images", "cpus", "memory"}),
    "search": frozenset({"space"}),
}


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
    from mlops_tune.secrets import move_credentials
    from mlops_tune.stores import absolute_sqlite

    # relative SQLite files mean "in the working folder", for trial processes elsewhere too;
    # a password (from a config file or an ${oc.env:...}) goes where the libraries read it
    for section, key in (("tracking", "uri"), ("study", "storage")):
        if isinstance(plain.get(section), dict) and isinstance(plain[section].get(key), str):
            plain[section][key] = absolute_sqlite(move_credentials(plain[section][key]))
    return plain


#: keys whose values may come from the environment and are printed as they are
_SHOWN_ENV_KEYS = frozenset({"tracking.uri", "tracking.experiment"})


def _mask_environment_values(cfg: Any, plain: Mapping[str, Any]) -> None:
    """Values read from the environment (``${oc.env:NAME}``) are never echoed in messages:
    they may be secrets. (Passwords in URLs are handled by ``secrets.move_credentials``.)"""
    from omegaconf import DictConfig, OmegaConf

    from mlops_tune.secrets import remember

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


def validate_train(cfg: Mapping[str, Any], sections: frozenset[str] = TRAIN_SECTIONS) -> None:
    """Check a ``train`` config: sections, model (by its family) and data (by its loader)."""
    from mlops_tune.data import loader_arguments
    from mlops_tune.families import get_family

    _known(cfg, sections, "")
    for section in ("tracking", "model", "data"):
        if not isinstance(cfg.get(section), Mapping):
            raise UsageError(f"{section}: missing config section")
    _check_sections(cfg)
    seed = cfg.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
        raise UsageError(f"seed: must be an integer in [0, 2**32), got {seed!r}")
    _check_tracking(cfg["tracking"])
    if not isinstance(cfg["model"].get("family"), str):
        raise UsageError("model.family: missing (every model YAML names its family)")
    get_family(cfg["model"]["family"]).validate(cfg["model"])
    loader_arguments(cfg["data"])


def _check_tracking(tracking: Mapping[str, Any]) -> None:
    uri, experiment = tracking.get("uri"), tracking.get("experiment")
    if not isinstance(uri, str) or not uri.strip():
        raise UsageError("tracking.uri: must not be empty (e.g. sqlite:///mlflow.db or http://127.0.0.1:5000)")
    if not isinstance(experiment, str) or not experiment.strip():
        raise UsageError("tracking.experiment: must be a non-empty experiment name (e.g. mlops-tune)")


def validate_tune(cfg: Mapping[str, Any]) -> None:
    """Check a ``tune`` config: everything :func:`validate_train` checks, plus gate and study."""
    validate_train(cfg, TUNE_SECTIONS)
    gate = cfg["gate"]
    threshold = gate.get("threshold")
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not 0 <= threshold <= 1:
        raise UsageError(f"gate.threshold: must be an accuracy in [0, 1], got {threshold!r}")
    if gate.get("metric") not in GATE_METRICS:
        raise UsageError(f"gate.metric: '{gate.get('metric')}' is not one of {', '.join(GATE_METRICS)} "
                         "(the test split is never used to choose)")
    worker = cfg.get("worker", 0)
    if not isinstance(worker, int) or isinstance(worker, bool) or worker < 0:
        raise UsageError(f"worker: must be a worker index >= 0, got {worker!r}")
    study = cfg["study"]
    _positive(study, "n_trials", "study")
    _positive(study, "max_consecutive_failures", "study")
    _positive(study, "heartbeat_interval", "study")
    _positive(study, "grace_period", "study")
    if study["heartbeat_interval"] >= study["grace_period"]:
        raise UsageError(f"study.heartbeat_interval: must be shorter than study.grace_period "
                         f"({study['heartbeat_interval']} >= {study['grace_period']}): live trials would "
                         "be failed as dead")
    timeout = study.get("timeout")
    if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
        raise UsageError(f"study.timeout: must be null or a positive number of seconds, got {timeout!r}")
    sampler = study.get("sampler")
    if not (sampler in SAMPLERS or (isinstance(sampler, Mapping) and "_target_" in sampler)):
        raise UsageError(f"study.sampler: '{sampler}' is not one of {', '.join(SAMPLERS)} "
                         "or {_target_: optuna.samplers.X}")
    if isinstance(sampler, Mapping):
        check_code_targets(sampler, "study.sampler", CODE_NAMESPACES["study.sampler"])
    pruner = study.get("pruner")
    if not (pruner in PRUNERS or (isinstance(pruner, Mapping) and "_target_" in pruner)):
        raise UsageError(f"study.pruner: '{pruner}' is not one of {', '.join(PRUNERS)} "
                         "or {_target_: optuna.pruners.X}")
    if isinstance(pruner, Mapping):
        check_code_targets(pruner, "study.pruner", CODE_NAMESPACES["study.pruner"])
    registry = cfg["registry"]
    if not isinstance(registry.get("promote"), bool):
        raise UsageError(f"registry.promote: must be true or false, got {registry.get('promote')!r}")
    if not isinstance(study.get("name"), str) or not study["name"]:
        raise UsageError("study.name: must be a non-empty string")
    if not isinstance(study.get("storage"), str):
        raise UsageError("study.storage: must be an Optuna storage URL such as sqlite:///optuna.db")


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


def _check_sections(cfg: Mapping[str, Any]) -> None:
    for section, keys in SECTION_KEYS.items():
        if section in cfg:
            if not isinstance(cfg[section], Mapping):
                raise UsageError(f"{section}: must be a config section, got {cfg[section]!r}")
            _known(cfg[section], keys, f"{section}.")


def _known(values: Mapping[str, Any], allowed: Iterable[str], prefix: str) -> None:
    allowed = set(allowed)
    for key in values:
        if key not in allowed:
            raise UsageError(f"{prefix}{key}: unknown config key (known: {', '.join(sorted(allowed))})")


def _positive(section: Mapping[str, Any], key: str, name: str) -> None:
    value = section.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UsageError(f"{name}.{key}: must be a positive integer, got {value!r}")
