"""Estimators and helpers the tests use through ``model._target_`` (importable as tests.helpers)."""

from __future__ import annotations

import os
import time

from sklearn.neighbors import KNeighborsClassifier


class EvenFailsKNN(KNeighborsClassifier):
    """A KNN whose fit raises for an even ``n_neighbors``: a trial that fails on purpose."""

    def fit(self, X, y):
        if self.n_neighbors % 2 == 0:
            raise RuntimeError(f"refusing even n_neighbors={self.n_neighbors}")
        return super().fit(X, y)


class AlwaysFailsKNN(KNeighborsClassifier):
    def fit(self, X, y):
        raise RuntimeError("this estimator always fails")


class SlowKNN(KNeighborsClassifier):
    """A KNN whose fit sleeps ``MLOPS_TUNE_TEST_SLEEP`` seconds, or, with ``MLOPS_TUNE_TEST_HOLD``
    set, as long as that file exists (a test holds the trial in its fit, then lets it go): a
    trial to kill mid-way."""

    def fit(self, X, y):
        hold = os.environ.get("MLOPS_TUNE_TEST_HOLD")
        if hold:
            while os.path.exists(hold):
                time.sleep(0.05)
        else:
            time.sleep(float(os.environ.get("MLOPS_TUNE_TEST_SLEEP", "60")))
        return super().fit(X, y)
