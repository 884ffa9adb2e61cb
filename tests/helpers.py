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
    """A KNN whose fit sleeps ``MLOPS_TUNE_TEST_SLEEP`` seconds: a trial to kill mid-way."""

    def fit(self, X, y):
        time.sleep(float(os.environ.get("MLOPS_TUNE_TEST_SLEEP", "60")))
        return super().fit(X, y)
