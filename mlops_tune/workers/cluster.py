"""``runner=ray``: the study's workers as Ray tasks on an existing Ray cluster.

The study's process is the Ray driver: it connects to the cluster (``runner.address``), checks
that a worker can run there and reach the study's stores, and starts ``runner.workers`` tasks.
Each task is a worker like any other (:func:`mlops_tune.workers.loop.run_worker`): it pulls its
trials from the study's Optuna storage and tracks them on its MLflow server, so both must be
shared ones (PostgreSQL, an MLflow server) unless every node is this machine. Ray places each task
on a node with the resources it asks for: ``runner.cpus``, ``runner.memory`` and the custom
resources of its model family (``runner.resources.keras: {tensorflow: 1}`` by default: Keras
workers go to nodes started with ``ray start --resources '{"tensorflow": N}'``), spread over the
nodes. A task runs in a process of its own (``max_calls=1``).

Credentials never travel in a task's arguments or its runtime environment (Ray shows its runtime
environment in its dashboard and writes it to its logs): the study's config, the passwords this
process took out of its URLs and the variables of :data:`HANDED_ON` go to every task through Ray's
object store (a task's only other argument is its assignment); a node's own environment
(``MLFLOW_TRACKING_PASSWORD``, ``PGPASSFILE`` ...) wins where it sets them.

A task whose worker or node dies costs its trial nothing: the study gives back the trials its
tickets name and starts another task while work remains. A stop (SIGTERM, Ctrl-C) cancels every
task (a worker closes its runs as KILLED), then force-cancels those still running after a grace.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import optuna

from mlops_tune.records import claims, tracking
from mlops_tune.runtime import faults, heap, secrets
from mlops_tune.runtime.errors import EXIT_CRASH, EnvironmentFault, StudyAborted, UsageError, first_line
from mlops_tune.show import report
from mlops_tune.workers.containers import PASS_THROUGH, check_limits, memory_bytes
from mlops_tune.workers.launched import MAX_FRUITLESS_WORKERS, STOP_GRACE, close_run, finished_by, work_left
from mlops_tune.workers.loop import Assignment
from mlops_tune.workers.objective import give_back_lost

#: trial-run tags: the Ray node and the host a trial ran on
TAG_NODE, TAG_HOST = "mlops_tune.node", "mlops_tune.host"
PROG = "mlops-tune worker"
#: the variables of this process a worker gets (a node's own setting wins): the containers' and libpq's password
HANDED_ON = (*PASS_THROUGH, "PGPASSWORD")
#: hosts that name this machine only
LOOPBACK = ("localhost", "127.0.0.1", "::1", "0.0.0.0", "")


@dataclass
class _Task:
    label: str
    run_id: str


class RayWorkers:
    """``runner.workers`` workers of one study as Ray tasks (the launcher of ``runner=ray``)."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        """Connect to the cluster and check that a worker can run there and reach the stores (exit 2),
        writing nothing."""
        from mlops_tune.families import get_family

        runner = dict(cfg["runner"])
        self.cfg, self.runner, self.n = cfg, runner, int(runner.get("workers") or 1)
        check_limits(runner)
        family = get_family(cfg["model"]["family"])
        by_family = runner.get("resources") or {}
        #: the key of runner.resources this study's workers read: the family's, else its image's (keras)
        self.family = family.name if family.name in by_family else family.image
        self.resources = {str(k): float(v) for k, v in dict(by_family.get(self.family) or {}).items()}
        self.tasks: dict[Any, _Task] = {}  # by the task's ObjectRef
        self.count, self.stopping = 0, False
        self.assignment: Assignment | None = None
        self.ended: tuple[optuna.Study, Any, claims.Budget] | None = None  # what a stop gives lost trials back to
        self.handed: Any = None  # the ObjectRef of what every task gets (handed_on)
        self.ray = _connect(str(runner.get("address") or "auto"))
        try:
            nodes = [node for node in self.ray.nodes() if node.get("Alive")]
            _check_resources(nodes, self.ask(), self.family)
            check_reachable_from(nodes, self.ray.util.get_node_ip_address(), str(cfg["study"]["storage"]),
                                 str(cfg["tracking"]["uri"]))
        except BaseException:
            self.close()
            raise

    def ask(self) -> dict[str, Any]:
        """What one worker asks of Ray: CPUs, memory (bytes) and its family's custom resources."""
        cpus = self.runner.get("cpus")
        memory = self.runner.get("memory")
        return {"num_cpus": float(cpus) if cpus is not None else 1.0,
                "memory": memory_bytes(str(memory)) if memory is not None else None,
                "resources": self.resources}

    def check(self) -> None:
        """Nothing more once the study's other checks passed (the cluster was checked on connecting)."""

    def describe(self) -> str:
        ask = self.ask()
        what = ", ".join([f"{ask['num_cpus']:g} CPU", *([f"{self.runner['memory']} memory"] if ask["memory"] else []),
                          *(f"{v:g} {k}" for k, v in self.resources.items())])
        nodes = sum(1 for node in self.ray.nodes() if node.get("Alive"))
        return f"{self.n} worker{'s' if self.n > 1 else ''} as Ray tasks at once ({what} each) on {nodes} node(s)"

    def __enter__(self) -> RayWorkers:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if kind is not None:
            self.stop()
        self.close()

    def start(self, assignment: Assignment) -> None:
        """The parent run exists: the tasks start (their processes import while this one finishes opening).
        ``runner.fresh_per_trial``: each task runs one trial (a fresh process per trial)."""
        self.assignment = replace(assignment, trials=1 if self.runner.get("fresh_per_trial") else None)
        for _ in range(self.n):
            self._launch()

    def run(self, study: optuna.Study, storage: Any, budget: claims.Budget, assignment: Assignment,
            started: float) -> None:
        """Keep ``runner.workers`` tasks at work while work remains; return once every task has ended.
        Raises :class:`EnvironmentFault` when workers fail or keep dying before finishing a trial."""
        self.ended = (study, storage, budget)
        if not self.tasks:  # a study that runs its workers again (a dead process's trials)
            for _ in range(self.n):
                self._launch()
        print(f"study '{assignment.name}': {self.describe()}", flush=True)
        heap.settle()  # no trial trains in this process: its start-up ends here
        fruitless = 0
        while self.tasks:
            # a timeout, so that a signal's handler runs in this thread while the tasks work
            try:
                done, _ = self.ray.wait(list(self.tasks), num_returns=1, timeout=0.5)
            except KeyboardInterrupt:  # Ray's wait turns the study's stop (SIGTERM ...) into a bare one
                faults.check_stopped()
                raise
            if not done:
                continue
            task = self.tasks.pop(done[0])
            code, why = self._outcome(done[0])
            finished = finished_by(study, task.run_id)
            if code is None:  # its process or its node died: its trial is given back
                reason = f"its worker ({task.label}) {why}"
                for frozen in give_back_lost(study, storage, (task.run_id,), budget, reason):
                    report.trial_line(study, frozen, float(self.cfg["gate"]["threshold"]),
                                      time.perf_counter() - started, self.cfg["gate"])
                fruitless = 0 if finished else fruitless + 1
            close_run(task.run_id, "FINISHED" if code == 0 else "FAILED")
            if code not in (None, 0):
                message = f"worker {task.label} (Ray task) ended with exit code {code}: {why}"
                raise EnvironmentFault("Ray worker", message) if code == EXIT_CRASH else StudyAborted(message)
            if fruitless >= MAX_FRUITLESS_WORKERS:
                raise EnvironmentFault("Ray worker", f"{fruitless} workers in a row died before finishing a trial "
                                       f"(last: {task.label}, run {task.run_id}: {why})")
            if not self.stopping and work_left(self.cfg, study, budget, assignment):
                self._launch()

    def stop(self) -> None:
        """Cancel every task (its worker gives its trial back and closes its runs as KILLED); force-cancel
        those still running after a grace, and give back what they held."""
        self.stopping = True
        tasks = dict(self.tasks)
        if not tasks:
            return
        faults.extend_stop(STOP_GRACE + faults.STOP_DEADLINE)
        with contextlib.suppress(Exception):
            for ref in tasks:
                self.ray.cancel(ref)
            _, left = self.ray.wait(list(tasks), num_returns=len(tasks), timeout=STOP_GRACE)
            for ref in left:
                self.ray.cancel(ref, force=True)
            if left and self.ended is not None:
                study, storage, budget = self.ended
                give_back_lost(study, storage, tuple(tasks[ref].run_id for ref in left), budget,
                               "the study was stopped")
        for task in tasks.values():
            close_run(task.run_id, "KILLED")
        self.tasks.clear()

    def close(self) -> None:
        """Disconnect from the cluster (it keeps running)."""
        with contextlib.suppress(Exception):
            self.ray.shutdown()

    # ------------------------------------------------------------------ tasks
    def _launch(self) -> None:
        """One more task: its run (a child of the study's run), then the task."""
        assert self.assignment is not None
        self.count += 1
        label = f"worker-{self.count}"
        run_id = tracking.create_run(self.assignment.experiment_id, label, {
            "mlflow.parentRunId": self.assignment.parent_run_id, tracking.TAG_ROLE: "worker",
            "mlops_tune.launcher": "ray"})
        fields = asdict(replace(self.assignment, owner=run_id, tags={tracking.TAG_WORKER_RUN: run_id}))
        ask = self.ask()
        options: dict[str, Any] = {"num_cpus": ask["num_cpus"], "resources": ask["resources"],
                                   "scheduling_strategy": "SPREAD", "max_retries": 0, "name": f"mlops-tune-{label}"}
        if ask["memory"]:
            options["memory"] = ask["memory"]
        if self.handed is None:  # the config and the credentials, once per study, in the object store
            self.handed = self.ray.put({"config": worker_config(self.cfg), "credentials": handed_on()})
        ref = self.ray.remote(max_calls=1)(serve).options(**options).remote(self.handed, fields)
        self.tasks[ref] = _Task(label, run_id)

    def _outcome(self, ref: Any) -> tuple[int | None, str]:
        """The task's exit code and why (None: its process or its node died, or it was cancelled)."""
        from ray.exceptions import RayError, RayTaskError

        try:
            code, error = self.ray.get(ref)
        except RayTaskError as exc:  # raised outside the worker's own mapping (its imports?)
            return EXIT_CRASH, secrets.redact_text(first_line(exc, 300))
        except RayError as exc:  # WorkerCrashedError, NodeDiedError, TaskCancelledError ...
            return None, f"died mid-trial ({type(exc).__name__})"
        return int(code), str(error)


def worker_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The study's checked config for a worker: its trials run in the worker's process."""
    config = {**cfg, "runner": {"name": "inprocess"}, "study": {**cfg["study"], "n_jobs": 1}}
    path = config["data"].get("path")
    if isinstance(path, str) and path:  # the same file at the same path on every node
        config["data"] = {**config["data"], "path": str(Path(path).expanduser().resolve())}
    return config


def handed_on() -> dict[str, Any]:
    """The credentials a worker on another node needs: this process's PostgreSQL password entries
    and the variables of :data:`HANDED_ON` it has (put in Ray's object store, not in the task's arguments)."""
    return {"pgpass": secrets.pgpass_entries(),
            "env": {name: os.environ[name] for name in HANDED_ON if os.environ.get(name)}}


def serve(handed: Mapping[str, Any], fields: dict[str, Any]) -> tuple[int, str]:
    """A Ray task: one worker of the study (``handed``: its config and credentials, from the object
    store; ``fields``: its :class:`Assignment`). Returns its exit code (those of ``mlops-tune``) and
    its error's line."""
    import ray

    from mlops_tune.runtime import exits
    from mlops_tune.runtime.logs import quiet_libraries, set_verbose
    from mlops_tune.workers.loop import run_worker
    from mlops_tune.workers.plan import Plan

    config, credentials = dict(handed["config"]), handed["credentials"]
    for name, value in credentials["env"].items():
        os.environ.setdefault(name, value)  # the node's own setting first
        if "PASSWORD" in name or "SECRET" in name or "TOKEN" in name:
            secrets.remember(value)
    secrets.add_pgpass_entries(list(credentials["pgpass"]))
    secrets.guard_streams()
    runtime = ray.get_runtime_context()
    cpus = max(1, int(float(runtime.get_assigned_resources().get("CPU", 1))))
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", str(cpus))
    os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
    node = runtime.get_node_id()
    fields = {**fields, "tags": {**fields.get("tags", {}), TAG_NODE: node, TAG_HOST: socket.gethostname()}}
    errors: list[str] = []

    def work() -> int:
        cfg = config  # checked by the study, plain: its model's section is checked again below
        set_verbose(bool(cfg.get("verbose")))
        quiet_libraries()
        print(f"{PROG}: {fields['owner']} on node {node[:12]} ({socket.gethostname()}) joins study "
              f"'{fields['name']}'", flush=True)
        run_worker(Plan.check(cfg), Assignment(**fields))
        return 0

    code = exits.run_mapped(work, PROG, errors.append)
    return code, secrets.redact_text(errors[-1] if errors else "")


def _connect(address: str) -> Any:
    """Ray, connected to the cluster at ``address`` as this study's driver (exit 2 when none answers)."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # every worker's trial lines, not one of each
    try:
        import ray
    except ImportError:
        raise UsageError("runner=ray needs Ray: pip install 'mlops-tune[ray]'") from None
    import logging

    _answers(os.environ.get("RAY_ADDRESS", "") if address == "auto" else address)
    _hide_secrets_from_ray()
    # Ray's core installs its own SIGTERM/SIGINT handlers in a driver: the study's own stay in force
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True, configure_logging=True)
    except Exception as exc:  # ConnectionError, RuntimeError, ValueError: no cluster there
        raise UsageError(f"runner.address: no Ray cluster answers at {secrets.redact(address)} "
                         f"({secrets.redact_text(first_line(exc, 200))}); start one with `ray start --head` "
                         "or point runner.address at it") from None
    finally:
        for signum, handler in handlers.items():
            if handler is not None:
                signal.signal(signum, handler)
    return ray


def _answers(address: str, timeout: float = 5.0) -> None:
    """A cluster named by ``HOST:PORT`` or ``ray://HOST:PORT`` takes a TCP connection (Ray itself would
    retry for minutes); ``auto`` without ``RAY_ADDRESS`` is Ray's to find."""
    if not address or address == "auto":
        return
    parts = urlsplit(address if "://" in address else f"ray-gcs://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or not port:
        raise UsageError(f"runner.address: '{secrets.redact(address)}' is not auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        raise UsageError(f"runner.address: no Ray cluster answers at {host}:{port} ({exc.strerror or exc}); "
                         "start one with `ray start --head` or point runner.address at it") from None


def _hide_secrets_from_ray() -> None:
    """Ray shows its driver's command line (``/proc/self/cmdline``) in the dashboard's job view: a
    password given in it is masked in this process's title first (``setproctitle``)."""
    try:
        shown = Path("/proc/self/cmdline").read_bytes().rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        shown = " ".join([sys.executable, *sys.argv])
    if secrets.redact_text(shown) == shown:
        return
    try:
        import setproctitle
    except ImportError:
        raise UsageError("runner=ray with a password in the command line needs setproctitle: "
                         "pip install 'mlops-tune[ray]'") from None
    setproctitle.setproctitle(secrets.redact_text(shown))


def _check_resources(nodes: list[dict[str, Any]], ask: Mapping[str, Any], family: str) -> None:
    """Some node of the cluster can hold one worker (else its task would wait forever)."""
    wanted = {"CPU": ask["num_cpus"], **({"memory": ask["memory"]} if ask["memory"] else {}), **ask["resources"]}
    if any(all(node.get("Resources", {}).get(k, 0) >= v for k, v in wanted.items()) for node in nodes):
        return
    missing = sorted({k for k, v in wanted.items()
                      if not any(node.get("Resources", {}).get(k, 0) >= v for node in nodes)})
    custom = [k for k in missing if k not in ("CPU", "memory")]
    hint = (f"start the nodes that have it with `ray start --resources '{{\"{custom[0]}\": 4}}'`, or set "
            f"runner.resources.{family}={{}}" if custom else "ask less (runner.cpus, runner.memory)")
    shown = [f"memory {wanted[k] / 2**30:g}g" if k == "memory" else f"{k} {wanted[k]:g}" for k in missing]
    raise UsageError(f"runner.resources: no node of the Ray cluster offers what a {family} worker asks "
                     f"({', '.join(shown)}); {hint}")


def check_reachable_from(nodes: list[dict[str, Any]], here: str, storage_url: str, tracking_uri: str) -> None:
    """A store only this machine can reach (a SQLite or journal file, a server on loopback) handed to a
    cluster with nodes elsewhere is exit 2; a cluster whose every node is this machine takes them."""
    if all(str(node.get("NodeManagerAddress", "")) in (here, *LOOPBACK) for node in nodes):
        return
    elsewhere = next(str(n.get("NodeManagerAddress")) for n in nodes if str(n.get("NodeManagerAddress")) != here)
    for key, url in (("study.storage", storage_url), ("tracking.uri", tracking_uri)):
        parts = urlsplit(url)
        local_file = parts.scheme in ("", "file", "journal") or parts.scheme.startswith("sqlite")
        if local_file or (parts.hostname or "") in LOOPBACK:
            raise UsageError(f"{key}: {secrets.redact(url)} is reachable from this machine only, and the Ray "
                             f"cluster has nodes elsewhere ({elsewhere}); use a shared store (PostgreSQL, an "
                             "MLflow server on an address the nodes reach)")
