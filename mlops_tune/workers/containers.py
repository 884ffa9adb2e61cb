"""``runner=docker``: what a trial container needs, checked before anything is written.

How a container reaches the study, with host networking and nothing mounted writable:

* MLflow: ``tracking.uri`` must be an MLflow server (``http://127.0.0.1:PORT``, e.g.
  ``make server`` or ``docker/compose.yaml``) whose artifacts the server proxies
  (``--serve-artifacts``) or that keeps them in an object store. A local SQLite file or
  artifact folder is refused up front: a non-root container cannot write the host's files.
* Optuna: the study serves its storage through Optuna's gRPC storage proxy on 127.0.0.1
  while it runs (``optuna_setup.StorageServer``).
* The trial's folder is mounted read-only; a data file named by ``data.path`` is mounted
  read-only at the same path.
* Credentials (``MLFLOW_TRACKING_USERNAME``/``PASSWORD``/``TOKEN``, ``AWS_*``) go in an env
  file readable by the invoking user only, not on the ``docker run`` command line.

Images are used as built (``build_image=False``): nothing is rebuilt per trial.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mlops_tune.records.stores import check_reachable
from mlops_tune.runtime.errors import UsageError
from mlops_tune.runtime.secrets import redact, write_private

#: environment variables a trial may need for the tracking server or the artifact store
PASS_THROUGH = (
    "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_S3_IGNORE_TLS",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
    "MLOPS_TUNE_VERBOSE", "TF_CPP_MIN_LOG_LEVEL",  # verbose=true reaches the trial in the container
    "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK",  # the study's choice (runtime.logs.quiet_libraries) holds there too
    # the study's deadlines and retries for the tracking server (records.stores.configure_http)
    "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
)
#: a size such as ``4g``, ``512m``, ``1.5G`` or ``1024`` (bytes)
_MEMORY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)([bkmgBKMG]?)$")
MAKE_IMAGES = "build it with `make images`"
#: seconds a Docker engine call may take when a worker is stopped
STOP_TIMEOUT = 60


def check(runner_cfg: Mapping[str, Any], cfg: Mapping[str, Any]) -> tuple[str, list[str], str | None]:
    """Reject a set-up containers cannot run in, the tracking server's experiment aside
    (:func:`check_experiment`); return the image, the read-only mounts and the data file's
    absolute path."""
    from mlops_tune.families import get_family

    check_limits(runner_cfg)
    family = get_family(cfg["model"]["family"])
    images = runner_cfg.get("images") or {}
    key = family.name if family.name in images else family.image
    if not isinstance(images.get(key), str) or not images[key]:
        raise UsageError(f"runner.images.{key}: no image for model family {family.name}")
    image = images[key]
    uri = str(cfg["tracking"]["uri"])
    if urlsplit(uri).scheme not in ("http", "https"):
        raise UsageError(
            f"tracking.uri: runner=docker needs an MLflow server the containers can reach, not "
            f"{redact(uri)} (start one with `make server`, then tracking.uri=http://127.0.0.1:5000)")
    check_reachable(uri)
    if str(cfg["study"]["storage"]).startswith("journal:"):
        raise UsageError("study.storage: runner=docker serves the study's storage to the containers "
                         "through Optuna's gRPC proxy, which takes SQLite or PostgreSQL, not a journal file")
    _check_engine(image, runner_cfg)
    mounts: list[str] = []
    data_path = cfg["data"].get("path")
    resolved = None
    if isinstance(data_path, str) and data_path:
        path = Path(data_path).expanduser().resolve()
        if not path.exists():
            raise UsageError(f"data.path: {data_path} does not exist")
        resolved = str(path)
        folder = path if path.is_dir() else path.parent
        mounts.append(f"{folder}:{folder}:ro")
    return image, mounts, resolved


def check_limits(runner_cfg: Mapping[str, Any]) -> None:
    """``runner.cpus`` a positive number or null, ``runner.memory`` a size like 2g or null (exit 2)."""
    cpus, memory = runner_cfg.get("cpus"), runner_cfg.get("memory")
    if cpus is not None and (isinstance(cpus, bool) or not isinstance(cpus, (int, float)) or cpus <= 0):
        raise UsageError(f"runner.cpus: must be a positive number of CPUs or null, got {cpus!r}")
    if memory is not None and not (isinstance(memory, str) and _MEMORY.match(memory)):
        raise UsageError(f"runner.memory: must be a size like 2g or 512m, or null, got {memory!r}")


def _check_engine(image: str, runner_cfg: Mapping[str, Any]) -> None:
    """The engine answers, has the image, and takes the container limits (it creates a container
    with them, never started, and removes it: the engine's own rules, e.g. its minimum memory)."""
    try:
        import docker
        from docker.errors import DockerException, ImageNotFound
    except ImportError:
        raise UsageError("runner=docker needs the Docker SDK: pip install 'mlops-tune[docker]'") from None
    try:
        client = docker.from_env(timeout=10)
        client.ping()
    except DockerException as exc:
        reason = str(exc).splitlines()[0][:160]
        raise UsageError(f"runner=docker: the Docker engine is not reachable ({reason}); "
                         "start dockerd or set DOCKER_HOST") from None
    try:
        client.images.get(image)
        _check_limits_taken(client, image, runner_cfg)
    except ImageNotFound:
        raise UsageError(f"runner.images: image '{image}' not found; {MAKE_IMAGES}") from None
    finally:
        client.close()


def _check_limits_taken(client: Any, image: str, runner_cfg: Mapping[str, Any]) -> None:
    """Whether the engine takes ``runner.cpus``/``runner.memory``: a container created with them
    (never started) and removed."""
    from docker.errors import APIError

    cpus, memory = runner_cfg.get("cpus"), runner_cfg.get("memory")
    if cpus is None and memory is None:
        return
    try:
        client.containers.create(image, command=["true"], network_mode="host", mem_limit=memory,
                                 nano_cpus=int(float(cpus) * 1e9) if cpus is not None else None).remove()
    except APIError as exc:
        reason = str(exc.explanation or exc).splitlines()[0][:200]
        key = "runner.memory" if "memory" in reason.lower() and memory is not None else "runner.cpus"
        raise UsageError(f"{key}: the Docker engine refuses the container's limits{limits_text(runner_cfg)}: "
                         f"{reason}") from None


def check_experiment(uri: str, name: str) -> None:
    """An existing experiment whose artifacts a container cannot write is refused."""
    import mlflow

    experiment = mlflow.MlflowClient(tracking_uri=uri).get_experiment_by_name(name)
    if experiment is not None and urlsplit(experiment.artifact_location).scheme in ("", "file"):
        raise UsageError(
            f"tracking.experiment: '{name}' keeps its artifacts in the server's folder "
            f"{experiment.artifact_location}, which a container cannot write; use a server started "
            "with --serve-artifacts (make server) and a new experiment")


def memory_bytes(size: str) -> int:
    """``4g`` / ``512m`` / ``1024`` as bytes (the sizes :func:`check_limits` takes)."""
    match = _MEMORY.match(size)
    if match is None:
        raise UsageError(f"runner.memory: must be a size like 2g or 512m, or null, got {size!r}")
    unit = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30}[match[2].lower()]
    return int(float(match[1]) * unit)


def limits_text(runner_cfg: Mapping[str, Any]) -> str:
    limits = ", ".join(f"{key} {runner_cfg[key]}" for key in ("cpus", "memory") if runner_cfg.get(key) is not None)
    return f" ({limits})" if limits else ""


def run_command(runner_cfg: Mapping[str, Any], container: str, image: str, volumes: list[str],
                env_file: Path, command: list[str]) -> list[str]:
    """``docker run`` of one worker container: removed when it ends, never pulled (the image was
    checked), host network, its name and limits; its environment in ``env_file``."""
    args = ["docker", "run", "--rm", "--pull", "never", "--network", "host", "--name", container]
    for key in ("cpus", "memory"):
        if runner_cfg.get(key) is not None:
            args += [f"--{key}", str(runner_cfg[key])]
    args += ["--env-file", str(env_file)]
    for volume in volumes:
        args += ["-v", volume]
    return [*args, image, *command]


def write_env_file(workdir: Path, values: Mapping[str, str]) -> Path:
    """The workers' environment file: ``values`` (the tracking server, the study's desk) and the
    credentials of :data:`PASS_THROUGH` set here, readable by the invoking user only."""
    path = workdir / "worker.env"
    values = {**values, **{name: os.environ[name] for name in PASS_THROUGH if os.environ.get(name)}}
    write_private(path, "".join(f"{key}={value}\n" for key, value in values.items()))
    return path


def signal_container(container: str, signum: int) -> None:
    """Send a worker's container ``signum`` (its worker closes its runs on SIGTERM); gone already: nothing."""
    with _container(container) as found:
        if found is not None:
            found.kill(signal=signum)


def end(container: str, deadline: float) -> None:
    """Wait for a stopped worker's container to exit until ``deadline`` (time.monotonic()), then
    kill it; remove it either way (MLflow's ``--rm`` may not have yet)."""
    import time

    with _container(container) as found:
        if found is None:
            return
        try:
            found.wait(timeout=max(1.0, deadline - time.monotonic()))
        except Exception:  # still running after the grace: requests' ReadTimeout
            found.kill()
        found.remove(force=True)


@contextlib.contextmanager
def _container(name: str) -> Iterator[Any]:
    """The container ``name`` through the Docker SDK (None when it is gone); errors of a container
    that goes away meanwhile are ignored."""
    import docker
    from docker.errors import DockerException

    client = None
    try:
        client = docker.from_env(timeout=STOP_TIMEOUT)
        found = client.containers.get(name)
    except DockerException:  # NotFound, or the engine is gone: nothing to do
        if client is not None:
            client.close()
        yield None
        return
    try:
        with contextlib.suppress(DockerException):
            yield found
    finally:
        client.close()
