"""mlops-tune: an experiment-tracking driven model tuner.

Hydra configs describe a base model and a dataset, an Optuna study proposes mutations
of it, every trial is tracked in MLflow and an accuracy gate decides when to stop.
"""

from __future__ import annotations

__all__ = ["UsageError", "__version__"]

__version__ = "0.1.0"

from mlops_tune.runtime.errors import UsageError
