"""Console scripts on top of Hydra, with the public exit codes.

Hydra parses the command line (overrides, ``-m`` multirun, ``--config-path`` ...) and
runs the task once per job. Hydra itself exits 1 on a config it cannot compose, and
discards the task's return value; this wrapper restores the contract:

* 0 success (gate met), 1 gate missed, 2 bad usage/config/data, 3 a crash or a failure of
  the environment during the run, 130 / 143 / 129 stopped by SIGINT / SIGTERM / SIGHUP;
* a multirun exits with the worst code of its jobs (codes are collected through a
  file, so launchers that run jobs in other processes report too);
* errors are one line on stderr, no traceback, for everything that is the user's doing
  and for failures of the environment (a store, a server, the disk);
* a password in a URL on the command line is moved out of it before Hydra records the
  command line (see ``mlops_tune.runtime.secrets``); a stopped job stops the whole multirun.
"""

from __future__ import annotations

import io
import os
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TextIO

from mlops_tune.config import mixed, names
from mlops_tune.runtime import exits, faults, paths, secrets
from mlops_tune.runtime.errors import EXIT_USAGE

CONF_DIR = Path(os.environ.get("MLOPS_TUNE_CONF", Path(__file__).resolve().parents[1] / "conf"))
_CODES_ENV = "MLOPS_TUNE_EXIT_CODES_FILE"

Task = Callable[[Any], int]


class _HeldStderr(io.TextIOBase):
    """Holds what is written to stderr until the first job starts.

    Before a job starts only Hydra writes there, and only to report a config it could
    not compose: that text is turned into one line. Once a job runs, output passes.
    """

    def __init__(self, inner: TextIO) -> None:
        self.inner = inner
        self.held: list[str] = []
        self.passing = False

    def write(self, text: str) -> int:  # type: ignore[override]
        if self.passing:
            return self.inner.write(text)
        self.held.append(text)
        return len(text)

    def flush(self) -> None:
        self.inner.flush()

    def release(self) -> None:
        if not self.passing:
            self.passing = True
            self.inner.write("".join(self.held))
            self.held.clear()


def summarize_hydra_error(text: str, config_name: str | None = None, argv: list[str] | None = None) -> str:
    """One line from Hydra's (or argparse's) multi-line error report, with the fix where it is clear."""
    lines = [line.strip() for line in _without_frames(text) if line.strip()]
    lines = [line for line in lines if not line.startswith(("Set the environment variable", "Traceback", "See https"))]
    if not lines:
        return "invalid command line or config"
    for line in lines:
        if "error:" in line:  # argparse: "prog: error: unrecognized arguments: ..."
            return line.split("error:", 1)[1].strip()
    summary = lines[0]
    unknown = re.match(r"Could not override '([^']+)'", summary)
    if unknown:
        key = unknown.group(1)
        hint = _did_you_mean(key, config_name, argv or [])
        return f"unknown key {key}" + (f"; did you mean {hint}?" if hint else " (add a new key with +" + key + "=...)")
    if "Available options" in text:
        start = next(i for i, line in enumerate(lines) if line.startswith("Available options"))
        options = []
        for line in lines[start + 1:]:
            if line.startswith("Config search path"):
                break
            options.append(line)
        return f"{summary.split(': ', 1)[-1]} (available: {', '.join(options)})"
    if re.search(r"mismatched input|no viable alternative|extraneous input|LexerNoViableAlt|token recognition", text):
        return (f"cannot parse the command line ({summary}); quote a value with spaces or special "
                """characters, e.g. 'data.path="/my dir/x.csv"'""")
    for line in lines:
        failed = re.match(r"(?:\w+Error): \[Errno \d+\] ([^:]+): '(.*)'$", line)
        if failed and failed.group(1) in ("Not a directory", "File exists", "File name too long"):
            why = "a file is where a folder must be" if failed.group(1) != "File name too long" else failed.group(1)
            return (f"cannot create the output folder {paths.shown(failed.group(2))} ({why}); "
                    "set hydra.run.dir=... (hydra.sweep.dir=... for -m) to a folder that can be created")
        if "Permission denied" in line or "Read-only file system" in line:
            return (f"cannot write the output folder ({line.split(': ', 1)[-1]}); "
                    "set hydra.run.dir=... to a writable one")
    return re.sub(r"^[\w.]*(?:Error|Exception): ", "", summary)  # an exception's line, without its class


def _without_frames(text: str) -> list[str]:
    """The lines of ``text`` without a Python traceback's frames (``File "..."`` and its code lines)."""
    kept, in_frame = [], False
    for line in text.splitlines():
        if line.startswith('  File "'):
            in_frame = True
            continue
        if in_frame and line.startswith("    "):
            continue
        in_frame = False
        kept.append(line)
    return kept


def _did_you_mean(key: str, config_name: str | None, argv: list[str]) -> str | None:
    """The closest existing key of the composed config (composed without the unknown key)."""
    import difflib

    if config_name is None:
        return None
    try:
        from hydra import compose, initialize_config_dir
        from omegaconf import OmegaConf

        # the config groups chosen on the command line (model=knn ...), not the failing key
        groups = [a for a in argv if "=" in a and not a.startswith(("-", "+", "~")) and "." not in a.split("=")[0]]
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = OmegaConf.to_container(compose(config_name, overrides=groups), resolve=False)
    except Exception:
        return None

    def keys(node: Any, prefix: str) -> list[str]:
        found = []
        for name, value in node.items():
            found.append(f"{prefix}{name}")
            if isinstance(value, dict):
                found += keys(value, f"{prefix}{name}.")
        return found

    candidates = [k for k in keys(cfg, "") if not k.startswith("hydra")]
    matches = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    return matches[0] if matches else None


class _StopAll(SystemExit):
    """A job was stopped by a signal: no further job of a multirun starts."""


#: the job's label and one-line outcome, for the table at the end of a multirun
_job_summary: dict[str, str] = {}


def note_job(outcome: str) -> None:
    """What the multirun summary says of this job (``mlops-tune``: the study and its verdict)."""
    _job_summary["outcome"] = outcome


def run_task(task: Task, cfg: Any, prog: str) -> int:
    """Run one job, mapping exceptions onto exit codes (``mlops_tune.runtime.exits``)."""
    return exits.run_mapped(lambda: task(cfg), prog, lambda outcome: _job_summary.setdefault("outcome", outcome))


def _say(prog: str, text: str) -> None:
    exits.say(prog, text)


_held: _HeldStderr | None = None


def record_job(task: Task, cfg: Any, prog: str) -> int:
    """Body of a Hydra job: run ``task`` and record its exit code for the final exit.

    Commands define a module-level job function that calls this, so that launchers
    running jobs in other processes can pickle it by reference.
    """
    if _held is not None:
        _held.release()
    _redact_saved_configs()
    _job_summary.clear()
    _job_summary["label"] = _job_label()
    for note in mixed.drop_foreign(cfg, CONF_DIR):
        print(f"{prog}: {note}", flush=True)
    code = run_task(task, cfg, prog)
    codes_path = os.environ.get(_CODES_ENV)
    if codes_path:
        with open(codes_path, "a", encoding="utf-8") as codes:
            outcome = secrets.redact_text(_job_summary.get("outcome", "")).replace("\t", " ").replace("\n", " ")
            label = secrets.redact_text(_job_summary["label"]).replace("\t", " ")
            codes.write(f"{code}\t{label}\t{outcome}\n")
    if code in (130, 143):
        raise _StopAll(code)
    return code


def _job_label() -> str:
    """The job's overrides (``model=knn data=wine``), or its number."""
    try:
        from hydra.core.hydra_config import HydraConfig

        job = HydraConfig.get().job
        return " ".join(job.override_dirname.split(",")) or f"job {job.num}"
    except Exception:
        return "job"


def multirun_table(rows: list[tuple[int, str, str]]) -> str:
    """The end of a multirun: every job, its exit code and its outcome, and the exit code of the whole.

    A job is labelled by the overrides that tell it apart (those every job shares are left out).
    """
    shared = set.intersection(*(set(label.split()) for _, label, _ in rows)) if len(rows) > 1 else set()
    rows = [(code, " ".join(t for t in label.split() if t not in shared) or label, outcome)
            for code, label, outcome in rows]
    width = max((len(label) for _, label, _ in rows), default=3)
    lines = [f"\nmultirun: {len(rows)} job(s)", f"  {'job':<{width}}  exit  outcome"]
    lines += [f"  {label:<{width}}  {code:4d}  {outcome}" for code, label, outcome in rows]
    lines.append(f"exit code {max((code for code, _, _ in rows), default=0)} (the worst of the jobs)")
    return "\n".join(lines)


def _redact_saved_configs() -> None:
    """Mask URL passwords that reached Hydra's saved configs from config files or the environment."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
    except Exception:  # not under Hydra
        return
    output = Path(hydra_cfg.runtime.output_dir)
    secrets.redact_files(output / str(hydra_cfg.output_subdir or ".hydra"),
                         ("config.yaml", "hydra.yaml", "overrides.yaml"))
    if str(hydra_cfg.mode) == "RunMode.MULTIRUN":
        secrets.redact_files(Path(hydra_cfg.sweep.dir), ("multirun.yaml",))


#: Hydra's flags that take a value (the next argument)
_VALUE_FLAGS = ("-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir", "-c", "--cfg", "-p",
                "--package")


def _help_arguments(argv: list[str]) -> list[str]:
    """The arguments that shape ``--help`` (Hydra's flags and their values), without the overrides
    and the multirun flag: the help is the same for any of them, and a bad one must not break it."""
    kept = []
    for index, arg in enumerate(argv):
        if (arg.startswith("-") and arg not in ("-m", "--multirun")) or (index and argv[index - 1] in _VALUE_FLAGS):
            kept.append(arg)
    return kept


def _own_help(config_name: str, argv: list[str]) -> bool:
    """``--help`` of the built-in configs: their help text, printed without Hydra (which composes every
    config group to list them first: ~0.8 s). Another config (``--config-path`` ...) or
    ``--hydra-help``: False, Hydra answers."""
    if not any(arg in ("-h", "--help") for arg in argv) or any(
            arg.startswith(("--hydra-help", "--config-path", "--config-dir", "--config-name", "-cp", "-cd", "-cn"))
            for arg in argv):
        return False
    import yaml

    try:
        print(yaml.safe_load((CONF_DIR / f"{config_name}.yaml").read_text())["hydra"]["help"]["template"], flush=True)
    except BrokenPipeError:  # `mlops-tune --help | head`: the reader had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return True


def hydra_main(config_name: str, job: Task, prog: str) -> NoReturn:
    """Run ``job`` under Hydra with ``config_name`` from ``conf/``; exit with the contract's code."""
    if "MLOPS_TUNE_CONF" in os.environ and not (CONF_DIR / f"{config_name}.yaml").is_file():
        _say(prog, f"error: MLOPS_TUNE_CONF: {CONF_DIR} holds no {config_name}.yaml (the variable names the config "
                   "folder to use instead of the built-in one; unset it, or point it at a copy of mlops_tune/conf)")
        sys.exit(EXIT_USAGE)
    if _own_help(config_name, sys.argv[1:]):
        sys.exit(0)
    faults.install_signal_handlers(prog)
    faults.quiet_background_faults()
    # before Hydra saves the command line in overrides.yaml / hydra.yaml
    sys.argv = [secrets.move_credentials(arg) for arg in sys.argv]
    secrets.guard_streams()
    try:
        import hydra
    except KeyboardInterrupt as exc:
        _say(prog, str(exc) or "interrupted")
        sys.exit(faults.signal_exit_code(exc))

    global _held
    fd, codes_path = tempfile.mkstemp(prefix="mlops-tune-codes-")
    os.close(fd)
    os.environ[_CODES_ENV] = codes_path
    _held = held = _HeldStderr(sys.stderr)
    sys.stderr = held  # type: ignore[assignment]
    hydra_failed = False
    stopped: int | None = None
    if any(arg in ("-h", "--help", "--hydra-help") for arg in sys.argv[1:]):
        sys.argv = [sys.argv[0], *_help_arguments(sys.argv[1:])]
    if any(arg in ("-m", "--multirun") for arg in sys.argv[1:]):
        os.environ[names.SWEPT_ENV] = ",".join(names.swept_keys(sys.argv[1:]))
        argv, specific = mixed.widen(sys.argv[1:], CONF_DIR)  # model keys of some of the swept models
        sys.argv = [sys.argv[0], *argv]
        os.environ[mixed.SPECIFIC_ENV] = ",".join(specific)
    try:
        hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")(job)()
    except _StopAll as exc:
        stopped = int(exc.code or 143)
    except KeyboardInterrupt as exc:  # before or between jobs
        held.release()
        _say(prog, str(exc) or "interrupted")
        stopped = faults.signal_exit_code(exc)
    except SystemExit as exc:
        hydra_failed = exc.code not in (0, None)
    except Exception as exc:  # Hydra's own, raised past its reporting (--help with a config it cannot load)
        held.held.append(f"{type(exc).__name__}: {exc}\n")
        hydra_failed = True
    finally:
        sys.stderr = held.inner
        _held = None
        os.environ.pop(_CODES_ENV, None)
        os.environ.pop(names.SWEPT_ENV, None)
        os.environ.pop(mixed.SPECIFIC_ENV, None)
    rows = []
    for line in Path(codes_path).read_text().splitlines():
        code, label, outcome = [*line.split("\t", 2), "", ""][:3]
        rows.append((int(code), label, outcome))
    codes = [code for code, _, _ in rows]
    os.unlink(codes_path)
    if any(arg in ("-m", "--multirun") for arg in sys.argv[1:]) and rows:
        print(multirun_table(rows), flush=True)
    if stopped is not None:
        sys.exit(stopped)
    if hydra_failed:
        if not held.passing:
            _say(prog, f"error: {summarize_hydra_error(''.join(held.held), config_name, sys.argv[1:])}")
        codes.append(EXIT_USAGE)
    else:
        held.release()
    sys.exit(max(codes, default=0))
