"""What every worker of a study builds from its config once the config passed its checks."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mlops_tune.data import Splits, load_splits
from mlops_tune.families import Family, get_family
from mlops_tune.records import registry, stores
from mlops_tune.runners import Runner, get_runner
from mlops_tune.search.gate import GateAwarePruner
from mlops_tune.search.optuna_setup import check_writable, make_pruner, make_sampler
from mlops_tune.search.space import SearchSpace

if TYPE_CHECKING:
    from mlops_tune.workers.cluster import RayWorkers
    from mlops_tune.workers.projects import ProjectWorkers


@dataclass
class Plan:
    """A study's checked config and the objects built from it (the same in every worker)."""

    cfg: Mapping[str, Any]
    name: str
    space: SearchSpace
    family: Family
    sampler: Any
    pruner: Any
    splits: Splits
    runner: Runner
    #: trials of this study running at once in local processes (``study.n_jobs``)
    n_jobs: int = 1
    #: runner=mlflow|docker: the study's workers are MLflow Project runs; runner=ray: Ray tasks
    #: (none train in this process)
    launcher: ProjectWorkers | RayWorkers | None = None

    @property
    def gate(self) -> Mapping[str, Any]:
        return self.cfg["gate"]

    @property
    def threshold(self) -> float:
        return float(self.cfg["gate"]["threshold"])

    @property
    def storage_url(self) -> str:
        return str(self.cfg["study"]["storage"])

    @property
    def tracking_uri(self) -> str:
        return str(self.cfg["tracking"]["uri"])

    @classmethod
    def check(cls, cfg: Mapping[str, Any], n_jobs: int = 1, splits: Splits | None = None) -> Plan:
        """Check everything that can fail on bad input and build the plan, writing nothing
        (``UsageError``: exit 2); the model's section by its family too. ``splits``: the data
        another process of the study loaded. runner=mlflow|docker|ray: the study's launcher, made
        first (runner=docker's containers start before the other checks, the model's included,
        and import meanwhile; runner=ray connects to its cluster and checks it; stopped if one fails)."""
        launcher: ProjectWorkers | RayWorkers | None = None
        if cfg["runner"]["name"] in ("mlflow", "docker"):
            from mlops_tune.workers.projects import ProjectWorkers

            launcher = ProjectWorkers(cfg)
        elif cfg["runner"]["name"] == "ray":
            from mlops_tune.workers.cluster import RayWorkers

            launcher = RayWorkers(cfg)
        try:
            return cls._check(cfg, n_jobs, splits, launcher)
        except BaseException:
            if launcher is not None:
                launcher.stop()
                launcher.close()
            raise

    @classmethod
    def _check(cls, cfg: Mapping[str, Any], n_jobs: int, splits: Splits | None,
               launcher: ProjectWorkers | RayWorkers | None) -> Plan:
        family = get_family(cfg["model"]["family"])
        family.validate(cfg["model"])  # imports the model's framework (scikit-learn: ~1 s; TensorFlow: never)
        if cfg["registry"]["promote"]:
            registry.check_name(cfg["registry"]["name"])
        space = SearchSpace.from_config((cfg.get("search") or {}).get("space"), cfg)
        pruner = make_pruner(cfg["study"]["pruner"])
        if n_jobs > 1:  # a worker's trial in flight stops at its next epoch once another met the gate
            pruner = GateAwarePruner(pruner, cfg["gate"])
        sampler = make_sampler(cfg["study"], space, int(cfg["seed"]), cfg["gate"])
        if splits is None:
            print(f"study '{cfg['study']['name']}': loading data '{cfg['data']['name']}' ...", flush=True)
            splits = load_splits(cfg["data"], int(cfg["seed"]))
        # rejects e.g. a CNN on tabular data, or a base model too large for model.max_params, now
        family.check_data(cfg["model"], splits.as_input(family.input_kind))
        # stores that cannot be written are bad set-ups (exit 2), found before anything is created
        stores.check_reachable(str(cfg["tracking"]["uri"]))
        check_writable(str(cfg["study"]["storage"]))
        runner = get_runner(cfg["runner"])
        if launcher is not None:
            launcher.check()
        return cls(cfg, str(cfg["study"]["name"]), space, family, sampler, pruner, splits, runner, n_jobs, launcher)

    def start_from(self, point: Mapping[str, Any]) -> None:
        """Widen the space to hold ``point`` (a champion's architecture as trial 0); the sampler follows."""
        self.space = self.space.including(dict(point))
        self.sampler = make_sampler(self.cfg["study"], self.space, int(self.cfg["seed"]), self.gate)
