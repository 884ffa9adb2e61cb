"""Every trial in its family's container, through MLflow Projects' Docker support (``runner=docker``).

Each trial is an MLflow Project run of a generated one-entry-point project whose
``docker_env`` names the family's image (``runner.images``: ``sklearn`` without
TensorFlow, ``keras`` with it; ``make images`` builds both). MLflow starts
``docker run`` with the run's id, so the Project run IS the trial's child run and MLflow
tags it with the image (``mlflow.docker.image.uri`` / ``.id``); the trial adds the image
family and its user id (``mlops_tune.image``, ``mlops_tune.uid``). Images are used as
built (``build_image=False``): nothing is rebuilt per trial.

How a container reaches the study, with host networking and nothing mounted writable:

* MLflow: ``tracking.uri`` must be an MLflow server (``http://127.0.0.1:PORT``, e.g.
  ``make server`` or ``docker/compose.yaml``) whose artifacts the server proxies
  (``--serve-artifacts``) or that keeps them in an object store. A local SQLite file or
  artifact folder is refused up front: a non-root container cannot write the host's files.
* Optuna: the study process serves its storage through Optuna's gRPC storage proxy on
  127.0.0.1 while the study runs; the trial reports every epoch to it, so the study's
  pruner decides inside the container as it does in-process.
* The trial's config: a YAML file in a folder mounted read-only; a data file named by
  ``data.path`` is mounted read-only at the same path.
* Credentials (``MLFLOW_TRACKING_USERNAME``/``PASSWORD``/``TOKEN``, ``AWS_*``) go in an env
  file readable by the invoking user only, not on the ``docker run`` command line.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mlops_tune import tracking
from mlops_tune.errors import UsageError
from mlops_tune.runners._base import TrialContext
from mlops_tune.runners.mlflow import MlflowRunner

DEFAULT_IMAGES = {"keras": "mlops-tune-keras:latest", "sklearn": "mlops-tune-sklearn:latest"}
#: environment variables a trial may need for the tracking server or the artifact store
PASS_THROUGH = (
    "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_S3_IGNORE_TLS",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
)
_MEMORY = re.compile(r"^[0-9]+(\.[0-9]+)?[bkmgBKMG]?$")
MAKE_IMAGES = "build it with `make images`"


class DockerRunner(MlflowRunner):
    """Runs each trial with ``mlflow.projects.run`` in its family's image."""

    def __init__(self, runner_cfg: Mapping[str, Any]) -> None:
        super().__init__(runner_cfg)
        self.workdir.chmod(0o755)  # the container's unprivileged user reads the trial configs
        self.images = {**DEFAULT_IMAGES, **(runner_cfg.get("images") or {})}
        self.image = ""
        self.mounts: list[str] = []
        self.data_path: str | None = None
        self._project: Path | None = None
        self._proxy: Any = None
        self._proxy_url = ""
        self._executor: Any = None

    # ------------------------------------------------------------------ before anything is written
    def check(self, cfg: Mapping[str, Any]) -> None:
        from mlops_tune.families import get_family

        self._check_limits()
        family = get_family(cfg["model"]["family"])
        key = family.name if family.name in self.images else family.image
        if not isinstance(self.images.get(key), str) or not self.images[key]:
            raise UsageError(f"runner.images.{key}: no image for model family {family.name}")
        self.image = self.images[key]
        uri = str(cfg["tracking"]["uri"])
        if urlsplit(uri).scheme not in ("http", "https"):
            raise UsageError(
                f"tracking.uri: runner=docker needs an MLflow server the containers can reach, not "
                f"{tracking.redact(uri)} (start one with `make server`, then tracking.uri=http://127.0.0.1:5000)")
        tracking.check_reachable(uri)
        storage = str(cfg["study"]["storage"])
        if storage.startswith("journal:"):
            raise UsageError("study.storage: runner=docker serves the study's storage to the containers "
                             "through Optuna's gRPC proxy, which takes SQLite or PostgreSQL, not a journal file")
        self._check_image()
        self._check_experiment(uri, str(cfg["tracking"]["experiment"]))
        data_path = cfg["data"].get("path")
        if isinstance(data_path, str) and data_path:
            path = Path(data_path).expanduser().resolve()
            if not path.exists():
                raise UsageError(f"data.path: {data_path} does not exist")
            self.data_path = str(path)
            folder = path if path.is_dir() else path.parent
            self.mounts.append(f"{folder}:{folder}:ro")

    def _check_limits(self) -> None:
        cpus, memory = self.cfg.get("cpus"), self.cfg.get("memory")
        if cpus is not None and (isinstance(cpus, bool) or not isinstance(cpus, (int, float)) or cpus <= 0):
            raise UsageError(f"runner.cpus: must be a positive number of CPUs or null, got {cpus!r}")
        if memory is not None and not (isinstance(memory, str) and _MEMORY.match(memory)):
            raise UsageError(f"runner.memory: must be a size like 2g or 512m, or null, got {memory!r}")

    def _check_image(self) -> None:
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
            client.images.get(self.image)
        except ImageNotFound:
            raise UsageError(f"runner.images: image '{self.image}' not found; {MAKE_IMAGES}") from None
        finally:
            client.close()

    @staticmethod
    def _check_experiment(uri: str, name: str) -> None:
        import mlflow

        experiment = mlflow.MlflowClient(tracking_uri=uri).get_experiment_by_name(name)
        if experiment is not None and urlsplit(experiment.artifact_location).scheme in ("", "file"):
            raise UsageError(
                f"tracking.experiment: '{name}' keeps its artifacts in the server's folder "
                f"{experiment.artifact_location}, which a container cannot write; use a server started "
                "with --serve-artifacts (make server) and a new experiment")

    # ------------------------------------------------------------------ per trial
    def storage_for_trial(self, context: TrialContext) -> str:
        if self._proxy is None:
            self._start_proxy(context.storage_url)
        return self._proxy_url

    def trial_file_config(self, trial_cfg: Mapping[str, Any], link: Mapping[str, Any]) -> dict[str, Any]:
        config = {
            **super().trial_file_config(trial_cfg, link),
            # the container gets the server's URI from MLflow (MLFLOW_TRACKING_URI); no secret in the file
            "tracking": {**trial_cfg["tracking"], "uri": "${oc.env:MLFLOW_TRACKING_URI}"},
        }
        if self.data_path:
            config["data"] = {**config["data"], "path": self.data_path}
        return config

    def trial_output_dir(self, name: str) -> str:
        return f"/tmp/{name}"  # inside the container: the trial folder is mounted read-only

    def project_run(self, overrides: str, run_id: str, context: TrialContext) -> None:
        import mlflow.projects
        from mlflow.exceptions import ExecutionException

        container = f"mlops-tune-{run_id}"
        docker_args: dict[str, Any] = {"network": "host", "name": container}
        for key in ("cpus", "memory"):
            if self.cfg.get(key) is not None:
                docker_args[key] = str(self.cfg[key])
        env_file = self._env_file()
        if env_file:
            docker_args["env-file"] = env_file
        try:
            mlflow.projects.run(str(self._project_dir()), entry_point="train",
                                parameters={"overrides": overrides}, docker_args=docker_args,
                                run_id=run_id, experiment_id=context.experiment_id,
                                synchronous=True, build_image=False)
        except ExecutionException:  # the trial failed; its container is gone (--rm)
            raise
        except BaseException:
            # interrupted (Ctrl-C, or SIGTERM: mlops_tune.faults turns it into the same):
            # MLflow stops its `docker run` client, not the container
            subprocess.run(["docker", "rm", "--force", container], capture_output=True, check=False)
            raise

    def _project_dir(self) -> Path:
        """A one-entry-point MLflow Project whose ``docker_env`` is the family's image."""
        import yaml

        if self._project is None:
            project = self.workdir / "project"
            project.mkdir(mode=0o755)
            spec = {
                "name": "mlops-tune-trial",
                "docker_env": {"image": self.image, "volumes": [f"{self.workdir}:{self.workdir}:ro", *self.mounts]},
                "entry_points": {"train": {
                    "parameters": {"overrides": {"type": "string", "default": ""}},
                    "command": "python -m mlops_tune.project train {overrides}",
                }},
            }
            (project / "MLproject").write_text(yaml.safe_dump(spec, sort_keys=False))
            self._project = project
        return self._project

    def _env_file(self) -> str | None:
        values = {name: os.environ[name] for name in PASS_THROUGH if os.environ.get(name)}
        if not values:
            return None
        path = self.workdir / "credentials.env"
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.writelines(f"{key}={value}\n" for key, value in values.items())
        return str(path)

    # ------------------------------------------------------------------ the Optuna storage proxy
    def _start_proxy(self, storage_url: str) -> None:
        from concurrent.futures import ThreadPoolExecutor

        import optuna
        from optuna.storages._grpc.server import make_server  # run_grpc_proxy_server blocks forever

        from mlops_tune.devservices import free_port

        port = free_port()
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="optuna-grpc-proxy")
        self._proxy = make_server(optuna.storages.get_storage(storage_url), "127.0.0.1", port, self._executor)
        self._proxy.start()
        self._proxy_url = f"grpc://127.0.0.1:{port}"
        limits = ", ".join(f"{key} {self.cfg[key]}" for key in ("cpus", "memory") if self.cfg.get(key) is not None)
        print(f"runner=docker: trials in {self.image}{f' ({limits})' if limits else ''}; "
              f"Optuna storage served to them on 127.0.0.1:{port}", flush=True)

    def close(self) -> None:
        if self._proxy is not None:
            self._proxy.stop(grace=1).wait()
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._proxy = None
        super().close()


def container_tags() -> dict[str, str]:
    """In a trial image (``MLOPS_TUNE_IMAGE_FAMILY`` set by the Dockerfiles): run tags saying
    which image, which user, and the memory and CPU limits the trial ran under (cgroup v2
    format: bytes or ``max``; ``QUOTA PERIOD`` in microseconds). Elsewhere: none."""
    family = os.environ.get("MLOPS_TUNE_IMAGE_FAMILY")
    if not family:
        return {}

    def read(*paths: str) -> str | None:
        for path in paths:
            with contextlib.suppress(OSError):
                return Path(path).read_text().strip()
        return None

    memory = read("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")
    cpu = read("/sys/fs/cgroup/cpu.max")
    if cpu is None:  # cgroup v1: quota and period in two files
        quota, period = read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), read("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
        cpu = f"{'max' if quota == '-1' else quota} {period}" if quota and period else None
    tags = {"mlops_tune.image": family, "mlops_tune.uid": str(os.getuid())}
    tags.update({tag: value for tag, value in (("mlops_tune.memory_limit", memory), ("mlops_tune.cpu_quota", cpu))
                 if value})
    return tags


def grpc_storage(url: str) -> Any:
    """In the container: the study's storage behind ``grpc://HOST:PORT``."""
    import optuna
    from optuna.storages import GrpcStorageProxy

    parts = urlsplit(url)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    storage = GrpcStorageProxy(host=parts.hostname or "127.0.0.1", port=int(parts.port or 13000))
    storage.wait_server_ready(timeout=30)
    return storage
