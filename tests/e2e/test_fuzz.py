"""Property-based fuzzing of bad input (hypothesis): generated configs and data files.

Whatever the config and the file, ``mlops-train`` and ``mlops-tune`` end with exit code 0,
1 or 2, never 3; exit 2 prints exactly one line and no traceback; no MLflow run is left
RUNNING; the registry changes only on exit 0.

The jobs run in this process through the same task functions and exit-code mapping the
console scripts use after Hydra composed the config (``cli.run_task``), with the real
MLflow store and Optuna storage, so that hundreds of examples fit in a few minutes.
The command-line layer itself (Hydra's parsing) is covered by tests/e2e/test_bad_input.py.

In CI (``CI=true``) the examples are derandomized (the same every run) and their number
fixed; locally ``MLOPS_TUNE_FUZZ_EXAMPLES`` asks for more.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlops_tune.config import cli
from mlops_tune.train import train
from mlops_tune.tune import tune
from tests.conftest import IN_CI, mlflow_runs

TRAIN_EXAMPLES = int(os.environ.get("MLOPS_TUNE_FUZZ_EXAMPLES", "200"))
TUNE_EXAMPLES = max(TRAIN_EXAMPLES // 4, 30)


def fuzz(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, derandomize=IN_CI, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large])


# ----------------------------------------------------------------------------- generated data

cells = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.integers(-5, 5),
    st.sampled_from(["", "red", "1.5", "nan", "inf", "-inf", " ", "x,y", '"q"']),
)
labels = st.one_of(st.sampled_from(["a", "b", "c"]), st.integers(0, 3), st.sampled_from(["", "nan"]))


@st.composite
def csv_texts(draw: st.DrawFn) -> tuple[str, list[str]]:
    """A CSV file's text (header first, maybe ragged, empty or header-only) and its columns."""
    n_features = draw(st.integers(0, 4))
    columns = [f"f{i}" for i in range(n_features)] + ["label"]
    n_rows = draw(st.integers(0, 60))
    numeric = draw(st.booleans())
    rows = []
    for _ in range(n_rows):
        if numeric:
            values = [repr(draw(st.floats(-100, 100, allow_nan=False))) for _ in range(n_features)]
        else:
            values = [str(draw(cells)) for _ in range(n_features)]
        values.append(str(draw(labels)))
        if draw(st.integers(0, 30)) == 0:  # now and then a ragged line
            values.append("extra")
        rows.append(",".join(values))
    header = ",".join(columns) if draw(st.integers(0, 20)) else ""
    return "\n".join([header, *rows]) + "\n", columns


@st.composite
def npz_arrays(draw: st.DrawFn) -> dict[str, np.ndarray]:
    n = draw(st.integers(0, 60))
    shape = draw(st.sampled_from([(n, 3), (n, 4, 4), (n,), ()]))
    values = st.one_of(st.floats(-10, 10, width=32), st.sampled_from([np.nan, np.inf, -np.inf]))
    x = np.asarray(draw(st.lists(values,
                                 min_size=int(np.prod(shape)), max_size=int(np.prod(shape)))),
                   dtype=np.float32).reshape(shape)
    y = np.asarray(draw(st.lists(st.integers(0, draw(st.integers(0, 3))), min_size=n, max_size=n)))
    arrays = {"x": x, "y": y}
    if draw(st.integers(0, 10)) == 0:
        arrays.pop(draw(st.sampled_from(["x", "y"])))
    return arrays


def config_values(kind: str) -> st.SearchStrategy[list[str]]:
    """Overrides, some sane and some not."""
    pick = {
        "seed": st.one_of(st.integers(-3, 2**33), st.sampled_from(["abc", "1.5", "null"])),
        "data.val_size": st.sampled_from(["0.2", "0", "1", "-0.5", "0.9", "abc", "0.5"]),
        "data.test_size": st.sampled_from(["0.2", "0.0", "0.6", "2"]),
        "model.n_neighbors": st.one_of(st.integers(-2, 80), st.sampled_from(["x", "1.5", "null"])),
        "model.weights": st.sampled_from(["uniform", "distance", "bogus"]),
        "model.scaler": st.sampled_from(["null", "standard", "minmax", "nope"]),
    }
    if kind == "tune":
        pick |= {
            "gate.threshold": st.sampled_from(["0.5", "0.99", "1.5", "-1", "abc", "1"]),
            "study.n_trials": st.sampled_from(["1", "2", "0", "-1"]),
            "study.sampler": st.sampled_from(["tpe", "random", "mutation", "bogus"]),
            "registry.promote": st.sampled_from(["true", "false", "abc"]),
        }
    return st.lists(st.sampled_from(sorted(pick)), unique=True, max_size=3).flatmap(
        lambda keys: st.tuples(*[pick[k].map(lambda v, k=k: f"{k}={v}") for k in keys]).map(list))


# ----------------------------------------------------------------------------- the job, in-process


def run_job(command: str, overrides: list[str], folder: Path) -> tuple[int, str, str]:
    """Compose the config like the console script and run its task: (exit code, stdout, stderr)."""
    from hydra import compose, initialize_config_dir

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), contextlib.chdir(folder):
        try:
            with initialize_config_dir(config_dir=str(cli.CONF_DIR), version_base="1.3"):
                cfg = compose(config_name=command, overrides=overrides)
        except Exception as exc:  # the CLI turns these into one line and exit 2 too
            return 2, "", f"mlops-{command}: error: {cli.summarize_hydra_error(str(exc))}\n"
        code = cli.run_task(train if command == "train" else tune, cfg, f"mlops-{command}")
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory, mlflow_template: Path) -> Iterator[Path]:
    work = tmp_path_factory.mktemp("fuzz")
    shutil.copy(mlflow_template, work / "mlflow.db")
    yield work
    import mlflow

    mlflow.set_tracking_uri(None)


def _versions(folder: Path) -> int:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    return len(client.search_model_versions())


def _check(code: int, stderr: str, folder: Path, versions_before: int) -> None:
    assert code in (0, 1, 2), stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    if code == 2:
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and ": error: " in lines[0], stderr[-3000:]
    assert [r for r in mlflow_runs(folder) if r.info.status == "RUNNING"] == []
    if code != 0:
        assert _versions(folder) == versions_before


# ----------------------------------------------------------------------------- the properties


@fuzz(TRAIN_EXAMPLES)
@given(csv=csv_texts(), model=st.sampled_from(["knn", "logreg"]), overrides=config_values("train"),
       features=st.sampled_from([None, "[f0]", "f0", "[f0,label]", "[]"]))
def test_train_on_generated_csv_never_crashes(folder: Path, csv: tuple[str, list[str]], model: str,
                                              overrides: list[str], features: str | None) -> None:
    text, _ = csv
    (folder / "data.csv").write_text(text)
    args = [f"model={model}", "data=csv", f"data.path={folder / 'data.csv'}", "data.target=label", *overrides]
    if features is not None:
        args.append(f"+data.features={features}")
    before = _versions(folder)
    code, _, err = run_job("train", args, folder)
    _check(code, err, folder, before)


@fuzz(max(TRAIN_EXAMPLES // 4, 50))
@given(arrays=npz_arrays(), overrides=config_values("train"))
def test_train_on_generated_npz_never_crashes(folder: Path, arrays: dict[str, np.ndarray],
                                              overrides: list[str]) -> None:
    np.savez(folder / "data.npz", **arrays)
    before = _versions(folder)
    code, _, err = run_job("train", ["model=knn", "data=npz", f"data.path={folder / 'data.npz'}", *overrides],
                           folder)
    _check(code, err, folder, before)


@fuzz(TUNE_EXAMPLES)
@given(csv=csv_texts(), overrides=config_values("tune"))
def test_tune_on_generated_csv_never_crashes(folder: Path, csv: tuple[str, list[str]], overrides: list[str]) -> None:
    text, _ = csv
    (folder / "data.csv").write_text(text)
    storage = folder / "optuna.db"
    defaults = {"study.n_trials": "2", "study.max_consecutive_failures": "3"}
    given_keys = {o.split("=", 1)[0] for o in overrides}
    args = ["model=knn", "data=csv", f"data.path={folder / 'data.csv'}", "data.target=label",
            f"study.storage=sqlite:///{storage}", *overrides,
            *[f"{k}={v}" for k, v in defaults.items() if k not in given_keys]]
    before = _versions(folder)
    code, _, err = run_job("tune", args, folder)
    _check(code, err, folder, before)
    storage.unlink(missing_ok=True)  # every example is a new study
