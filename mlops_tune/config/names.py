"""The names of a multirun's studies and of their folders: OmegaConf resolvers of ``tune.yaml``.

``study.name`` defaults to ``<model>-<data>``. In a multirun, jobs that differ in a swept key
other than the model, the data or the worker index (``-m model.epochs=5,10``) are different
questions: each job's default name gets the swept values (``ann-digits-model.epochs=5``), so
each runs its own study, parent run and output folder. Jobs that sweep only ``worker=0,1`` are
workers of ONE study; a ``study.name`` given on the command line is always used as it is.
A study name becomes ONE folder name (:func:`mlops_tune.runtime.paths.folder_name`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

from mlops_tune.runtime.paths import folder_name

#: the keys a multirun sweeps, as the command line gave them (set by ``hydra_main`` for its jobs,
#: inherited by a launcher's job processes)
SWEPT_ENV = "MLOPS_TUNE_SWEPT"
#: swept keys that keep the jobs' default study name: already in it, or the worker index
SHARED = frozenset({"model", "data", "worker", "study.name"})
#: a longer suffix is replaced by a digest of it
MAX_SUFFIX = 60


def swept_keys(argv: Sequence[str]) -> list[str]:
    """The keys the command line sweeps (``key=a,b``, ``range(...)``, ``choice(...)``) that make
    its jobs distinct studies; [] when it does not parse (Hydra then says why)."""
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parsed = OverridesParser.create().parse_overrides([a for a in argv if not a.startswith("-")])
    except Exception:
        return []
    return [o.key_or_group for o in parsed if o.is_sweep_override()
            and o.key_or_group not in SHARED and not o.key_or_group.startswith("hydra")]


def study_name(base: str) -> str:
    """``base``, with the job's values of the swept keys in a multirun (see the module's doc)."""
    swept = [k for k in os.environ.get(SWEPT_ENV, "").split(",") if k]
    if not swept:
        return base
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
    except (ImportError, ValueError):  # composed outside a Hydra run
        return base
    if str(hydra_cfg.mode) != "RunMode.MULTIRUN":
        return base
    values = dict(o.lstrip("+~").split("=", 1) for o in hydra_cfg.overrides.task if "=" in o)
    suffix = ",".join(f"{key}={values[key]}" for key in swept if key in values)
    if len(suffix) > MAX_SUFFIX:
        suffix = hashlib.sha256(suffix.encode()).hexdigest()[:8]
    return f"{base}-{suffix}" if suffix else base


def register() -> None:
    """The resolvers ``tune.yaml`` uses (once per process)."""
    from omegaconf import OmegaConf

    for name, function in (("mlops_tune.study_name", study_name), ("mlops_tune.folder", folder_name)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, function)
