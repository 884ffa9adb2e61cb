"""Python's cyclic garbage collector in the processes mlops-tune starts.

Measured here (``import`` of Optuna, scikit-learn, MLflow's SQL store, then TensorFlow):
with the collector on, the imports took 7.7-8.9 s; with it off, 6.1-6.8 s, because each
full collection sweeps every object the imports made so far. And Keras' ``clear_session``,
run before each model, is such a full collection: 0.37-0.44 s of every trial over the
~600 000 objects of a study's imports. So a process that mlops-tune starts (``mlops-tune``,
a study's helper processes, Project workers) calls :func:`defer` first; before its first trial,
:func:`settle` moves what the imports made out of the collector's reach (:func:`gc.freeze`:
modules and the study's own state, alive as long as the process) and turns the collector
back on, so later collections sweep only what the trials make (a study whose trials all run
in Project workers or containers settles when it starts them: left off, its garbage piled up
for the whole study and its exit spent a second collecting it). It does not collect first:
over the ~1 000 000 objects of a Keras study's imports a collection took 0.46 s and found
5 383 unreachable ones (kept, frozen, for the process's life), and both of a two-process
study's processes ran it just before their first trial (its start came 0.5 s later).

A program that calls mlops-tune as a library keeps its collector as it is: :func:`settle`
does nothing in a process that did not call :func:`defer`.
"""

from __future__ import annotations

import gc

_deferred = False


def defer() -> None:
    """The collector off until :func:`settle`: for the start-up of a process mlops-tune owns."""
    global _deferred
    _deferred = True
    gc.disable()


def settle() -> None:
    """Freeze every object made so far, and turn the collector back on (a process that
    called :func:`defer`; otherwise nothing). Safe to call again: later calls freeze what
    was imported since."""
    if not _deferred:
        return
    gc.freeze()
    gc.enable()
