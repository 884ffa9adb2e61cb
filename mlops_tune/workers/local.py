"""Workers in local helper processes (``study.n_jobs`` > 1), started and supervised with
:mod:`multiprocessing` (the ``spawn`` start method: a fresh interpreter, no state forked).

A helper process starts first thing, before the study checks its config and loads its data:
it imports the model's framework and MLflow's store meanwhile (CPU work on its own core), then
takes the checked data from its queue, and once the study's parent run exists its
:class:`~mlops_tune.workers.loop.Assignment`. The study waits on the processes' sentinels,
so a helper that dies is seen at once; a helper whose study dies (even by SIGKILL) sees its
parent's sentinel close (``multiprocessing.parent_process()``) and stops as if it got SIGTERM.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import socket
from collections.abc import Mapping
from multiprocessing.connection import wait
from typing import Any

import optuna
from optuna.trial import TrialState

from mlops_tune import attrs, claims, threads
from mlops_tune.data import Splits
from mlops_tune.errors import EnvironmentFault, StudyAborted
from mlops_tune.workers import helper
from mlops_tune.workers.objective import give_back


class LocalProcesses:
    """``n`` helper processes of one study, each running the worker loop."""

    #: seconds a stopped helper has to close its runs before it is killed
    STOP_GRACE = 20

    def __init__(self, cfg: Mapping[str, Any], n: int) -> None:
        context = multiprocessing.get_context("spawn")
        env = threads.thread_env(n + 1)
        self.queues: list[Any] = []
        self.processes: list[Any] = []
        for index in range(1, n + 1):
            queue = context.Queue()
            queue.cancel_join_thread()  # a helper that died never reads: do not wait for it at exit
            process = context.Process(target=helper.serve, args=(dict(cfg), index, n + 1, queue, env),
                                      name=f"mlops-tune-worker-{index}", daemon=True)
            process.start()
            self.queues.append(queue)
            self.processes.append(process)
        self.released = False

    @property
    def pids(self) -> list[int]:
        return [int(process.pid) for process in self.processes]

    def checked(self, splits: Splits) -> None:
        """The config and the data passed every check: the helpers build their plan on ``splits``."""
        for queue in self.queues:
            queue.put(splits)

    def release(self, assignment: Any) -> None:
        """The stores are open and the parent run exists: the helpers start taking trials."""
        for queue in self.queues:
            queue.put(assignment)
        self.released = True

    def describe(self, n_jobs: int) -> str:
        """``N trials at once (...)``, for the study's output."""
        return (f"{n_jobs} trials at once ({n_jobs - 1} more process{'es' if n_jobs > 2 else ''}, pid "
                f"{', '.join(map(str, self.pids))}; TF threads per process: {threads.tf_threads_text()})")

    def wait(self) -> list[int]:
        """Wait for every helper. Returns the pids of helpers killed by a signal (the OOM killer, a
        ``kill``): their trials are given back (:func:`give_back_lost`). A helper that failed (exit
        3: its environment; any other code) fails the study, as the study's own worker would."""
        pending = {process.sentinel: process for process in self.processes}
        while pending:
            for sentinel in wait(list(pending)):
                pending.pop(sentinel).join()
        self._close_queues()
        failed = [(index, p.exitcode) for index, p in enumerate(self.processes, 1) if (p.exitcode or 0) > 0]
        if failed:
            index, code = failed[0]
            message = (f"worker process {index} of {len(self.processes) + 1} ended with exit code {code} "
                       "(its error is above)")
            if code == 3:
                raise EnvironmentFault("worker process", message)
            raise StudyAborted(message)
        return [int(p.pid) for p in self.processes if (p.exitcode or 0) < 0]

    def stop(self, exc: BaseException) -> None:
        """The study failed or was stopped: helpers still waiting are ended at once (they wrote
        nothing); helpers at work get the study's signal and close their runs as KILLED."""
        signum = getattr(exc, "signum", signal.SIGTERM)
        for process in self.processes:
            if process.is_alive():
                with contextlib.suppress(OSError):
                    if self.released:
                        os.kill(int(process.pid), signum)
                    else:
                        process.kill()
        for process in self.processes:
            process.join(self.STOP_GRACE)
            if process.is_alive():
                process.kill()
                process.join()
        self._close_queues()

    def _close_queues(self) -> None:
        """Nothing more goes to the helpers: the queues' feeder threads end."""
        for queue in self.queues:
            queue.close()


def give_back_lost(study: optuna.Study, storage: Any, pids: list[int], budget: claims.Budget) -> list[int]:
    """The trials that helper processes ``pids`` (dead) left RUNNING: not charged, failed, and
    queued to run again (their MLflow runs are closed by the study's reconcile). Returns their numbers.
    A trial's ticket names the worker that took it (``host-pid-...``)."""
    owners = tuple(f"{socket.gethostname()}-{pid}-" for pid in pids)
    study_id = storage.get_study_id_from_name(study.study_name)
    lost = []
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if str(frozen.user_attrs.get(attrs.TICKET, "")).partition(" ")[2].startswith(owners):
            trial = optuna.trial.Trial(study, storage.get_trial_id_from_study_id_trial_number(study_id, frozen.number))
            give_back(trial, "its worker process died mid-trial (killed)", budget)
            study.tell(trial, state=TrialState.FAIL)
            lost.append(frozen.number)
    return lost
