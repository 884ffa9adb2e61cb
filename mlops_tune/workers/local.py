"""Workers in local helper processes (``study.n_jobs`` > 1), started and supervised with
:mod:`multiprocessing` (the ``spawn`` start method: a fresh interpreter, no state forked).

A helper process starts first thing, before the study checks its config and loads its data:
it imports the model's framework and MLflow's store meanwhile (CPU work on its own core), then
takes the checked data from its queue, and once the study's parent run exists its
:class:`~mlops_tune.workers.loop.Assignment`. The study waits on the processes' sentinels,
so a helper that dies is seen at once; a helper whose study dies (even by SIGKILL) sees its
parent's sentinel close (``multiprocessing.parent_process()``) and stops as if it got SIGTERM.

A helper's standard output and error are pipes this process reads: each line it writes is
printed here whole (:func:`~mlops_tune.show.progress.emit`), through the study's live display
when one is drawn, so no line of a helper is ever glued to the status line or to another line.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import socket
import threading
from collections.abc import Mapping
from multiprocessing.connection import wait
from typing import Any

from mlops_tune.data import Splits
from mlops_tune.runtime import faults, threads
from mlops_tune.runtime.errors import EnvironmentFault, StudyAborted
from mlops_tune.show import progress
from mlops_tune.workers import helper
from mlops_tune.workers.loop import WorkerLoop
from mlops_tune.workers.objective import give_back_lost


class LocalProcesses:
    """``n`` helper processes of one study, each running the worker loop."""

    #: seconds a stopped helper has to close its runs before it is killed
    STOP_GRACE = 20

    def __init__(self, cfg: Mapping[str, Any], n: int) -> None:
        context = multiprocessing.get_context("spawn")
        env = threads.thread_env(n + 1)
        self.queues: list[Any] = []
        self.processes: list[Any] = []
        outputs = []
        for index in range(1, n + 1):
            queue = context.Queue()
            queue.cancel_join_thread()  # a helper that died never reads: do not wait for it at exit
            pipes = [context.Pipe(duplex=False) for _ in range(2)]  # its stdout and stderr
            process = context.Process(target=helper.serve, args=(dict(cfg), index, n + 1, queue, env,
                                                                 [writer for _, writer in pipes]),
                                      name=f"mlops-tune-worker-{index}", daemon=True)
            process.start()
            for reader, writer in pipes:
                writer.close()  # the helper holds the writing ends: the pipes end with it
                outputs.append(reader)
            self.queues.append(queue)
            self.processes.append(process)
        self.released = False
        self.printer = threading.Thread(target=_print_lines, args=(outputs,), name="mlops-tune-helper-output",
                                        daemon=True)
        self.printer.start()

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
        self.printer.join(5)  # the helpers' last lines (their error, if any) are printed first
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

    def wait_and_rerun_lost(self, loop: WorkerLoop) -> None:
        """Wait for every helper (:meth:`wait`); the trials of one that was killed are given back
        and run again in ``loop`` (this process's worker)."""
        lost = give_back_lost(loop.study, loop.storage, owners(self.wait()), loop.budget,
                              "its worker process died mid-trial (killed)")
        if lost:
            print(f"study '{loop.plan.name}': a worker process was killed; trial(s) {[t.number for t in lost]} "
                  "run again here", flush=True)
            loop.run(threading.Event())

    def stop(self, exc: BaseException) -> None:
        """The study failed or was stopped: helpers still waiting are ended at once (they wrote
        nothing); helpers at work get the study's signal and close their runs as KILLED."""
        signum = getattr(exc, "signum", signal.SIGTERM)
        faults.extend_stop(self.STOP_GRACE + faults.STOP_DEADLINE)  # a stop waits for them to close their runs
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
        self.printer.join(5)  # what the helpers said while they stopped is printed before the study's last line
        self._close_queues()

    def _close_queues(self) -> None:
        """Nothing more goes to the helpers: the queues' feeder threads end."""
        for queue in self.queues:
            queue.close()


def _print_lines(readers: list[Any]) -> None:
    """Print the helpers' output line by line (stdout readers at even places, stderr at odd) until
    every helper closed its pipes."""
    pending = {reader: (bool(i % 2), b"") for i, reader in enumerate(readers)}
    while pending:
        for reader in wait(list(pending)):
            err, rest = pending[reader]
            try:
                chunk = os.read(reader.fileno(), 65536)
            except OSError:
                chunk = b""
            if chunk:
                *lines, rest = (rest + chunk).split(b"\n")
                pending[reader] = (err, rest)
            else:  # the helper ended: what it left without a newline, then this pipe is done
                lines = [rest] if rest else []
                del pending[reader]
                reader.close()
            for line in lines:
                # a closed terminal (SIGHUP) must not end this thread: a helper writing to a pipe
                # nobody reads would block once it is full
                with contextlib.suppress(Exception):
                    progress.emit(line.decode(errors="replace").rstrip("\r"), err=err)


def owners(pids: list[int]) -> tuple[str, ...]:
    """How the tickets of helper processes ``pids`` name their worker (``host-pid-...``)."""
    return tuple(f"{socket.gethostname()}-{pid}-" for pid in pids)
