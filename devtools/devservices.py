"""Throwaway services on loopback for a team setup on one machine, CI and the tests.

* ``postgres``: a PostgreSQL cluster in a folder (``initdb -A trust``), listening on
  127.0.0.1 only, with databases for Optuna (``optuna``) and MLflow (``mlflow``).
* ``server``: ``mlflow server`` on 127.0.0.1 with a PostgreSQL backend store and a
  proxied artifact store (``--serve-artifacts``), so clients need no artifact credentials.
* Ray nodes (``start_ray_node``): each its own ``ray start`` with its own CPU count, folder and
  ports, so that several nodes of one cluster run on this machine (tests, benchmarks).

``make server`` runs ``python -m devtools.devservices up .services``: it prints the
``tracking.uri`` and ``study.storage`` to use and leaves pid files that
``make stop-services`` reads. As root, PostgreSQL runs as the ``postgres`` user.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Postgres:
    """A running throwaway cluster."""

    folder: Path
    port: int
    pid: int

    def url(self, database: str, driver: str = "postgresql+psycopg2") -> str:
        return f"{driver}://postgres@127.0.0.1:{self.port}/{database}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def postgres_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def start_postgres(folder: Path, databases: tuple[str, ...] = ("optuna", "mlflow")) -> Postgres:
    """initdb into ``folder`` (trust auth, loopback only), start it, create ``databases``."""
    initdb, pg_ctl, createdb = (postgres_bin(n) for n in ("initdb", "pg_ctl", "createdb"))
    if not (initdb and pg_ctl and createdb):
        raise RuntimeError("PostgreSQL server binaries not found (Debian: apt-get install postgresql)")
    folder = folder.resolve()
    data = folder / "pgdata"
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    port = free_port()
    subprocess.run(_as_postgres([initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"]),
                   check=True, capture_output=True)
    pg = restart_postgres(Postgres(folder, port, 0))
    for database in databases:
        subprocess.run(_as_postgres([createdb, "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", database]),
                       check=True, capture_output=True)
    return pg


def restart_postgres(pg: Postgres) -> Postgres:
    """Start the cluster of ``pg`` (again) on its port; returns it with the new server pid."""
    data = pg.folder / "pgdata"
    subprocess.run(_as_postgres([
        str(postgres_bin("pg_ctl")), "-D", str(data), "-l", str(pg.folder / "postgres.log"), "-w", "start",
        "-o", f"-c listen_addresses=127.0.0.1 -p {pg.port} -k {pg.folder} -c fsync=off",
    ]), check=True, capture_output=True)
    pid = int((data / "postmaster.pid").read_text().split()[0])
    return Postgres(pg.folder, pg.port, pid)


def stop_postgres(pg: Postgres) -> None:
    pg_ctl = postgres_bin("pg_ctl")
    if pg_ctl:
        subprocess.run(_as_postgres([pg_ctl, "-D", str(pg.folder / "pgdata"), "-m", "fast", "stop"]),
                       capture_output=True)


def start_mlflow_server(backend_uri: str, artifacts: Path | str, port: int | None = None,
                        log: Path | None = None, timeout: float = 120,
                        cwd: Path | None = None) -> tuple[subprocess.Popen, str]:
    """``mlflow server`` on 127.0.0.1 serving (proxying) ``artifacts``; returns (process, URL).

    ``artifacts`` is a folder or an object store URI (``s3://bucket/prefix``; the server
    reads ``MLFLOW_S3_ENDPOINT_URL`` and the AWS variables from the environment).
    ``cwd`` is where a relative ``sqlite:///`` backend URI is resolved.
    """
    port = port or free_port()
    if isinstance(artifacts, Path):
        artifacts.mkdir(parents=True, exist_ok=True)
        artifacts = str(artifacts.resolve())
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", backend_uri, "--artifacts-destination", artifacts,
         "--serve-artifacts", "--workers", "2"],
        stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd,
        # MLflow's job runner (GenAI jobs: four polling consumer processes) is not used by mlops-tune
        env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode} (see {log})")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"mlflow server did not answer on {url} within {timeout:.0f} s")


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def start_ray_node(folder: Path, cpus: int, head: str | None = None, env: dict[str, str] | None = None) -> str:
    """``ray start`` of one node (the head when ``head`` is None) with its temporary folder ``folder`` and
    ports of its own; returns the head's address (``127.0.0.1:PORT``) or "". ``env`` is the node's
    environment (its workers inherit it)."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port
    args = [str(Path(sys.executable).parent / "ray"), "start", "--num-cpus", str(cpus), "--temp-dir", str(folder),
            "--disable-usage-stats", "--node-manager-port", str(port()), "--object-manager-port", str(port()),
            "--metrics-export-port", str(port()), "--dashboard-agent-listen-port", str(port()),
            "--dashboard-agent-grpc-port", str(port()), "--runtime-env-agent-port", str(port()),
            "--min-worker-port", "0", "--max-worker-port", "0"]
    address = ""
    if head is None:
        address = f"127.0.0.1:{port()}"
        args += ["--head", "--port", address.rsplit(":", 1)[1], "--include-dashboard", "true",
                 "--dashboard-port", str(port()), "--ray-client-server-port", str(port())]
    else:
        args += ["--address", head]
    proc = subprocess.run(args, env={"RAY_USAGE_STATS_ENABLED": "0", **(env or os.environ)}, capture_output=True,
                          text=True, timeout=180)
    if proc.returncode != 0:
        raise RuntimeError(f"ray start failed: {proc.stdout[-1500:]}{proc.stderr[-1500:]}")
    return address


def ray_node_id(folder: Path, timeout: float = 60) -> str:
    """The id of the node whose temporary folder is ``folder`` (its raylet's log names it)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for log in folder.glob("session_*/logs/raylet.out"):
            for line in log.read_text(errors="replace").splitlines():
                if "Setting node ID" in line:
                    return line.rsplit("node_id=", 1)[-1].split()[0].strip(",.")
        time.sleep(0.5)
    raise RuntimeError(f"no node id in {folder}")


def kill_ray_node(folder: Path) -> None:
    """SIGKILL every process of the node whose temporary folder is ``folder``: those naming it in their
    command line (its raylet, its agents) and every process under them (its workers)."""
    import psutil

    found = {}
    for proc in psutil.process_iter(["cmdline"]):
        if str(folder) in " ".join(proc.info["cmdline"] or []):
            found[proc.pid] = proc
            with contextlib.suppress(psutil.Error):
                found.update({child.pid: child for child in proc.children(recursive=True)})
    for proc in found.values():
        with contextlib.suppress(psutil.Error):
            proc.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.devservices", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["up"])
    parser.add_argument("folder", type=Path, help="where data, logs and pid files go (e.g. .services)")
    parser.add_argument("--port", type=int, default=5000, help="port of the MLflow server on 127.0.0.1")
    args = parser.parse_args(argv)
    pg = start_postgres(args.folder)
    (args.folder / "postgres.pid").write_text(str(pg.pid))
    proc, url = start_mlflow_server(pg.url("mlflow"), args.folder / "artifacts", args.port,
                                    log=args.folder / "mlflow-server.log")
    (args.folder / "mlflow-server.pid").write_text(str(proc.pid))
    print(f"MLflow server: {url}   (PostgreSQL backend on 127.0.0.1:{pg.port}, artifacts proxied)\n"
          f"use: mlops-tune tracking.uri={url} study.storage={pg.url('optuna')}\n"
          f"stop: make stop-services")
    return 0


if __name__ == "__main__":
    sys.exit(main())
