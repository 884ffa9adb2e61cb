"""The shape of the fixed config sections, as dataclasses (OmegaConf structured configs).

Merged under every config before it is used (``config.load``): a key that is not in a
section, or a value of the wrong type, is an error naming the key, for configs composed
by Hydra from ``conf/`` and equally for the files a study writes and reads back (a study's
``best_config.yaml`` given to ``mlops-train --config-path``, a trial folder). The model and
data sections are free-form here: their family and loader check them. What a type cannot
say (a threshold in [0, 1], a positive budget) is checked in ``mlops_tune.config``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

# OmegaConf reads the annotations at run time: Optional[...] and Dict[...] spellings it understands.


@dataclass
class TrackingConfig:
    uri: str = MISSING
    experiment: str = MISSING
    ui_url: Optional[str] = None  # noqa: UP045 - the MLflow UI the report links to (null: derived)


@dataclass
class GateConfig:
    threshold: float = 0.95
    metric: str = "val_accuracy"
    confirm: int = 1  # seeds a passing trial must reach the threshold with, on average
    max_params: Optional[int] = None  # noqa: UP045 - a passing model has at most this many parameters
    max_predict_ms: Optional[float] = None  # noqa: UP045 - milliseconds per sample, on the validation split


@dataclass
class StudyConfig:
    name: str = MISSING
    storage: str = "sqlite:///optuna.db"
    n_trials: int = 20
    timeout: Optional[float] = None  # noqa: UP045 - OmegaConf needs Optional
    sampler: Any = "tpe"  # a name, or {_target_: optuna.samplers.X, ...}
    pruner: Any = "median"  # a name, or {_target_: optuna.pruners.X, ...}
    n_jobs: str = "auto"  # trials at once: auto (one per core for Keras trials in the study's process) | N
    max_consecutive_failures: int = 5
    start_from: str = "base"  # base | champion: trial 0 is the base model or the registry's champion
    probe: str = "widest"  # widest | none: trial 1 is trial 0 with every layer as wide as the space allows
    on_data_change: str = "new_study"  # new_study | fail: the stored study saw other data
    heartbeat_interval: int = 5
    grace_period: int = 20


@dataclass
class RegistryConfig:
    name: str = MISSING
    promote: bool = True


@dataclass
class ReportConfig:
    junit: Optional[str] = None  # noqa: UP045


@dataclass
class RunnerConfig:
    name: str = "inprocess"
    workers: int = 1  # runner=mlflow|docker|ray: warm workers (trials at once)
    fresh_per_trial: bool = False  # runner=mlflow|docker: one process (container) per trial
    images: Optional[dict[str, str]] = None  # noqa: UP045 - runner=docker: image per family
    cpus: Optional[float] = None  # noqa: UP045
    memory: Optional[str] = None  # noqa: UP045
    address: Optional[str] = None  # noqa: UP045 - runner=ray: the cluster to connect to
    resources: Optional[dict[str, Any]] = None  # noqa: UP045 - runner=ray: custom resources by family


@dataclass
class SearchConfig:
    space: Optional[dict[str, Any]] = None  # noqa: UP045


@dataclass
class TrainConfig:
    """``mlops-train`` (and one trial): a model, a dataset, where to track it, a seed."""

    model: Any = MISSING
    data: Any = MISSING
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    seed: int = 42
    verbose: bool = False  # the libraries' own logs (TensorFlow, MLflow, Optuna) back on


@dataclass
class TuneConfig(TrainConfig):
    """``mlops-tune``: one study of mutations of the base model, gated by accuracy."""

    runner: RunnerConfig = field(default_factory=RunnerConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    worker: int = 0
