"""Optuna from config: the storage, the sampler and the pruner a study runs with.

Everything here uses Optuna's public API. The study's storage can also be served to
trial processes that cannot open it themselves (containers): :class:`StorageServer`
runs Optuna's gRPC storage proxy in a child process, :func:`open_storage` is the
client side (``grpc://HOST:PORT``).
"""

from __future__ import annotations

import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import optuna

from mlops_tune.records import claims
from mlops_tune.records.stores import write_ahead_sqlite
from mlops_tune.runtime import locks, paths
from mlops_tune.runtime.errors import UsageError, first_line
from mlops_tune.runtime.retries import retrying
from mlops_tune.runtime.secrets import redact
from mlops_tune.search import gate
from mlops_tune.search.mutate import MutationSampler
from mlops_tune.search.seeding import TrialSeeded
from mlops_tune.search.space import SearchSpace


def make_storage(study_cfg: Mapping[str, Any]) -> optuna.storages.BaseStorage:
    """The Optuna storage named by ``study.storage`` (RDB URL, ``journal:///path``, or
    ``grpc://HOST:PORT``: the storage proxy a study serves to its workers in containers).

    RDB storages get a heartbeat, so a trial whose worker died is failed after the grace period.

    Raises:
        UsageError: the storage cannot be opened (the message names the host, not the password).
    """
    url = str(study_cfg["storage"])
    try:
        if url.startswith("grpc://"):  # a worker in a container: the study's storage proxy
            return open_storage(url)
        if url.startswith("journal:"):
            from optuna.storages.journal import JournalFileBackend, JournalStorage

            return JournalStorage(JournalFileBackend(claims.journal_path(url)))
        write_ahead_sqlite(url)
        with locks.sqlite_schema(url):  # processes starting together on a new file
            return _open_rdb(
                url,
                heartbeat_interval=int(study_cfg["heartbeat_interval"]),
                grace_period=int(study_cfg["grace_period"]),
                # a dead worker's trial is failed, then run again once by whoever asks next
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
            )
    except Exception as exc:
        host = urlsplit(url).hostname or url.split("://", 1)[-1].split("?")[0]
        reason = first_line(exc, 200)
        raise UsageError(f"study.storage: cannot open the Optuna storage at {redact(host)} "
                         f"({redact(reason)})") from None


def check_writable(url: str) -> None:
    """A SQLite or journal file must be writable before the study starts (else exit 2)."""
    path = locks.sqlite_path(url) or (Path(claims.journal_path(url)).absolute() if url.startswith("journal:") else None)
    if path is not None:
        paths.check_creatable(path, "study.storage")
    if path is None or not path.parent.is_dir():
        return
    if not os.access(path if path.exists() else path.parent, os.W_OK):
        raise UsageError(f"study.storage: {path} is read-only (read-only file system or no write "
                         "permission); point study.storage at a writable file")


class SQLiteStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage on a SQLite file, where taking a waiting trial is atomic.

    ``Study.ask`` takes the oldest waiting trial (the base model, the probe, a mutation's child, a
    trial given back) with ``set_trial_state_values(..., RUNNING)``, which succeeds for one caller
    only because the storage reads the trial's row ``FOR UPDATE``. SQLite ignores ``FOR UPDATE``:
    two processes (or two threads of the storage proxy) that read the row before either writes
    both succeed and both run the trial (optuna/optuna#4002, #4621), and the second one's budget
    ticket is never spent. Here the read and the write of that change hold a lock file next to the
    database, which every process of the machine that opens the file through this class takes.
    """

    def __init__(self, url: str, path: Path, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self.take_lock = path.with_name(path.name + ".take.lock")

    def set_trial_state_values(self, trial_id: int, state: optuna.trial.TrialState,
                               values: Sequence[float] | None = None) -> bool:
        if state != optuna.trial.TrialState.RUNNING:
            return super().set_trial_state_values(trial_id, state, values)
        with locks.exclusive(self.take_lock):
            return super().set_trial_state_values(trial_id, state, values)


def rdb_storage(url: str, **kwargs: Any) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage for ``url``: :class:`SQLiteStorage` for a SQLite file."""
    path = locks.sqlite_path(url)
    return SQLiteStorage(url, path, **kwargs) if path is not None else optuna.storages.RDBStorage(url, **kwargs)


def _open_rdb(url: str, attempts: int = 4, **kwargs: Any) -> optuna.storages.RDBStorage:
    """An RDB storage (``kwargs``: Optuna's, e.g. heartbeats); retried when processes race to
    create a new database (the study's and its storage proxy's, or workers'): the loser of that
    race sees a unique-key error and finds the tables on its next try."""
    for attempt in retrying(lambda exc: "IntegrityError" in type(exc).__name__ + str(exc), attempts, 0.5):
        with attempt:
            return rdb_storage(url, engine_kwargs=_engine_kwargs(url), **kwargs)
    raise AssertionError("attempts must be >= 1")


def _engine_kwargs(url: str) -> dict[str, Any]:
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 60}}
    if url.startswith("postgresql"):
        return {"connect_args": {"connect_timeout": 5}, "pool_pre_ping": True}
    return {}


def make_sampler(study_cfg: Mapping[str, Any], space: SearchSpace, seed: int,
                 gate_cfg: Mapping[str, Any] | None = None) -> optuna.samplers.BaseSampler:
    """``tpe`` (seeded, warm-started by the base trial), ``random``, ``mutation`` or ``{_target_: ...}``.

    The built-in ones propose a study's trial N from ``seed`` and N, whichever worker asks
    (:mod:`mlops_tune.search.seeding`); a sampler named by ``_target_`` is reseeded per worker.

    With deployment limits in ``gate_cfg`` (``max_params``, ``max_predict_ms``) the mutation
    sampler mutates the best trial within them (TPE reads each trial's Optuna constraints, set
    by the study: ``gate.constraints``).
    """
    sampler = study_cfg["sampler"]
    if sampler == "tpe":
        # constant_liar: trials still running in other workers count as poor, so
        # parallel trials explore apart (with one trial at a time it changes nothing)
        return TrialSeeded(lambda s: optuna.samplers.TPESampler(seed=s, n_startup_trials=5, multivariate=True,
                                                                group=True, constant_liar=True), seed)
    if sampler == "random":
        return TrialSeeded(lambda s: optuna.samplers.RandomSampler(seed=s), seed)
    if sampler == "mutation":
        return MutationSampler(space, seed=seed, feasible=gate.feasible(gate_cfg or {}))
    return _instantiate(sampler, "study.sampler", optuna.samplers.BaseSampler)


def make_pruner(pruner: Any) -> optuna.pruners.BasePruner:
    """``study.pruner``: ``median`` (default), ``hyperband``, ``none`` or ``{_target_: optuna.pruners.X, ...}``."""
    if pruner == "median":
        return LikeForLikeMedianPruner()
    if pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=2, reduction_factor=3)
    if pruner == "none":
        return optuna.pruners.NopPruner()
    return _instantiate(pruner, "study.pruner", optuna.pruners.BasePruner)


def reporting(pruner: Any, parallel: bool) -> tuple[int | None, int | None]:
    """For a trial in this process: the first epoch reported to Optuna and the first at which
    the pruner is asked (see ``trial.OptunaReporter``). ``median`` looks from its warm-up on;
    ``none`` needs no values (with workers in parallel it is still asked, to stop once the gate is met);
    any other pruner gets every epoch."""
    if pruner == "median":
        return MEDIAN_WARMUP, (0 if parallel else MEDIAN_WARMUP)
    if pruner == "none":
        return None, (0 if parallel else None)
    return 0, 0


#: ``study.pruner=median`` judges a trial from this epoch (0-based) on
MEDIAN_WARMUP = 8


class LikeForLikeMedianPruner(optuna.pruners.BasePruner):
    """``study.pruner=median``: stop a trial whose val_accuracy at epoch e is below the median
    of earlier trials at epoch e, comparing like with like.

    Measured on digits (issue 16): Optuna's MedianPruner with a 4-epoch warm-up stopped 12 of
    20 trials at epoch 4-5, several still climbing: trials with large batches take fewer steps
    per epoch and learn slower per epoch, so they were judged against small-batch trials.
    Here a trial is only compared with trials of the same ``group_by`` values (the batch
    size), only from epoch ``n_warmup_steps`` on, and only once ``n_startup_trials`` such
    trials reported that epoch."""

    #: seconds a snapshot of the finished trials is reused (one storage read, not one per epoch)
    REFRESH = 2.0

    def __init__(self, n_startup_trials: int = 3, n_warmup_steps: int = MEDIAN_WARMUP,
                 group_by: tuple[str, ...] = ("model.batch_size",)) -> None:
        self.n_startup_trials, self.n_warmup_steps, self.group_by = n_startup_trials, n_warmup_steps, group_by
        self._finished: list[optuna.trial.FrozenTrial] = []
        self._read_at = -math.inf

    def _finished_trials(self, study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
        if time.monotonic() - self._read_at >= self.REFRESH:
            states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
            self._finished = study.get_trials(deepcopy=False, states=states)
            self._read_at = time.monotonic()
        return self._finished

    def _group(self, trial: optuna.trial.FrozenTrial) -> tuple[Any, ...]:
        return tuple(trial.params.get(key) for key in self.group_by)

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or step < self.n_warmup_steps:
            return False
        value = trial.intermediate_values[step]
        if math.isnan(value):
            return True
        group = self._group(trial)
        peers = [t.intermediate_values[step] for t in self._finished_trials(study)
                 if t.number != trial.number and step in t.intermediate_values and self._group(t) == group]
        peers = [v for v in peers if not math.isnan(v)]
        if len(peers) < self.n_startup_trials:
            return False
        return value < statistics.median(peers)


def _instantiate(spec: Any, key: str, base: type) -> Any:
    """A sampler or pruner from ``{_target_: ...}`` (config.check_code_targets has vetted the names)."""
    from hydra.utils import instantiate

    try:
        obj = instantiate(spec)
    except Exception as exc:
        raise UsageError(f"{key}: cannot build {spec.get('_target_')!r} ({first_line(exc)})") from None
    if not isinstance(obj, base):
        raise UsageError(f"{key}: {spec.get('_target_')!r} is not an Optuna {base.__name__}")
    return obj


# ----------------------------------------------------------------------------- the gRPC storage proxy
class StorageServer:
    """Optuna's gRPC storage proxy for one study's storage, in a child process on 127.0.0.1.

    ``optuna.storages.run_grpc_proxy_server`` serves until its process ends, so it gets a
    process of its own, stopped by :meth:`stop`, or by the end of the study's process whatever
    ended it (a SIGKILL too): the proxy reads its standard input, a pipe only the study's process
    holds, and ends when the pipe closes. The storage URL travels in the child's environment (a
    PostgreSQL password stays in the PGPASSFILE it already uses).
    """

    def __init__(self, storage_url: str) -> None:
        self.port = _free_port()
        self.url = f"grpc://127.0.0.1:{self.port}"
        env = {**os.environ, "MLOPS_TUNE_PROXY_STORAGE": storage_url}
        self._process = subprocess.Popen(
            [sys.executable, "-m", "mlops_tune.search.optuna_setup", str(self.port)],
            env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True,  # a Ctrl-C meant for the study is handled by the study
        )

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Return once the proxy takes connections (its process imports Optuna and opens the storage
        meanwhile: the study starts its workers first). Raises ``UsageError`` when it cannot start."""
        if not _listening("127.0.0.1", self.port, timeout, 0.1, self._alive):
            self.stop()
            raise UsageError(f"study.storage: the Optuna storage proxy did not answer within {timeout:.0f} s")

    def _alive(self) -> None:
        """Raises ``UsageError`` with the proxy's last line when its process has ended."""
        if self._process.poll() is not None:
            error = (self._process.stderr.read() if self._process.stderr else b"").decode(errors="replace")
            lines = [line for line in error.splitlines() if line.strip()]
            raise UsageError(f"study.storage: the Optuna storage proxy did not start "
                             f"({redact(lines[-1] if lines else 'no output')})")

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        for pipe in (self._process.stdin, self._process.stderr):
            if pipe:
                pipe.close()


def open_storage(url: str) -> Any:
    """The storage a trial process reports to: an RDB/journal URL, or ``grpc://HOST:PORT`` (the proxy)."""
    if not url.startswith("grpc://"):
        return url
    from optuna.storages import GrpcStorageProxy

    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", int(parts.port or 13000)
    # the proxy takes calls once it listens: a TCP connect says so at once, where the client's
    # wait_server_ready polls the channel's state in 0.2 s steps
    if not _listening(host, port, 30, 0.05):
        raise ConnectionError(f"the Optuna storage proxy at {host}:{port} did not answer within 30 s")
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return GrpcStorageProxy(host=host, port=port)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _listening(host: str, port: int, timeout: float, step: float, alive: Callable[[], None] = lambda: None) -> bool:
    """Whether ``host:port`` takes connections within ``timeout`` s, tried every ``step`` s
    (``alive`` is called between tries and may raise)."""
    deadline = time.monotonic() + timeout
    while not _port_open(port, host):
        alive()
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _serve(port: int) -> None:
    """The proxy process: serve the storage named in the environment until terminated."""
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = os.environ["MLOPS_TUNE_PROXY_STORAGE"]
    write_ahead_sqlite(url)  # as the study's own process writes it: no fsync per commit

    def end_with_the_study() -> None:
        # returns when the study's process closed the pipe or is gone; the file descriptor, not
        # sys.stdin: a failure below ends the interpreter with this thread still reading, and
        # stdin's buffer (locked by the read) would turn the failure's traceback into a fatal error
        while os.read(0, 4096):
            pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=end_with_the_study, name="mlops-tune-proxy-parent", daemon=True).start()
    try:
        with locks.sqlite_schema(url):  # the study's process may be creating the tables now
            # with Optuna's cache of finished trials, as for a URL (get_storage); a new PostgreSQL
            # database's tables are created by the study's process at the same time: retried
            storage = optuna.storages.get_storage(_open_rdb(url))
    except Exception as exc:  # one line, the study's to say (StorageServer.wait_ready)
        print(f"{type(exc).__name__}: {first_line(exc, 300)}", file=sys.stderr, flush=True)
        sys.exit(1)
    optuna.storages.run_grpc_proxy_server(storage, host="127.0.0.1", port=port)


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
