"""Bad input: exit code 2, one line naming the problem, no traceback, nothing written.

Every case here is a row of the bad-input table in docs/reliability.md (the last test
keeps the two in step). Each runs the real console script in a fresh folder (two cases
at a time: each is a fresh process that mostly imports) and asserts: exit 2, exactly one
stderr line (``mlops-<cmd>: error: ...``) containing the expected words, no traceback, no
MLflow run (so no registry version either); for ``mlops-tune`` also no Optuna storage.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import ROOT, Result, mlflow_runs, read_only, run_command

SECRET = "hunter2-very-secret"


def _write_inputs(folder: Path) -> dict[str, str]:
    """Every file the cases name, made here: CSV, npz and image folders, good and broken."""
    from PIL import Image

    rng = np.random.default_rng(0)
    files: dict[str, str] = {}

    def csv(name: str, frame: pd.DataFrame) -> None:
        frame.to_csv(folder / name, index=False)
        files[name.split(".")[0]] = str(folder / name)

    def raw(name: str, content: bytes) -> None:
        (folder / name).write_bytes(content)
        files[name.replace(".", "_")] = str(folder / name)

    def npz(name: str, **arrays: np.ndarray) -> None:
        np.savez(folder / name, **arrays)
        files[name.replace(".", "_")] = str(folder / name)

    good = pd.DataFrame({"a": rng.normal(size=60), "b": rng.normal(size=60), "label": ["x", "y"] * 30})
    csv("good.csv", good)
    csv("text.csv", good.assign(color=["red", "blue"] * 30))
    csv("one_class.csv", good.assign(label="x"))
    csv("tiny.csv", pd.DataFrame({"a": [1.0, 2.0, 3.0, 4.0, 5.0], "label": ["x", "y", "x", "y", "x"]}))
    csv("inf.csv", good.assign(a=[np.inf, *good["a"][1:]]))
    csv("header_only.csv", good.iloc[:0])
    csv("no_label.csv", good.assign(label=[None] + ["x", "y"] * 29 + ["x"]))
    csv("missing_value.csv", good.assign(b=[np.nan, *good["b"][1:]]))
    raw("ragged.csv", b"a,b,label\n1,2,x\n3,4,y,5\n6,7,x\n")
    raw("binary.csv", bytes(range(256)) * 4)
    csv("continuous.csv", good.assign(label=rng.normal(size=60) * 10))
    csv("ids.csv", pd.DataFrame({"a": rng.normal(size=150), "b": rng.normal(size=150), "label": ["x", "y"] * 75,
                                 "uid": [f"u{i:03d}" for i in range(150)]}))
    raw("duplicate.csv", b"a,b,a,label\n" + b"".join(b"%d,%d,%d,%s\n" % (i, i % 3, i % 5, b"xy"[i % 2:i % 2 + 1])
                                                   for i in range(60)))
    os.mkfifo(folder / "fifo.csv")
    files["fifo"] = str(folder / "fifo.csv")
    x = rng.normal(size=(60, 4)).astype(np.float32)
    y = np.arange(60) % 2
    npz("nan.npz", x=np.where(rng.random((60, 4)) < 0.1, np.nan, x), y=y)
    npz("inf.npz", x=np.where(rng.random((60, 4)) < 0.1, -np.inf, x), y=y)
    npz("zero_d.npz", x=np.array(1.0), y=np.array(1))
    npz("empty.npz")
    npz("lengths.npz", x=x, y=y[:50])
    npz("strings.npz", x=np.array([["a", "b"]] * 60), y=y)
    npz("continuous.npz", x=x, y=rng.normal(size=60))
    raw("corrupt.npz", b"PK\x03\x04 not really a zip file")
    raw("csv_as.npz", (folder / "good.csv").read_bytes())
    for name, classes, corrupt in (("images", "ab", True), ("one_class_images", "a", False)):
        for label in classes:
            (folder / name / label).mkdir(parents=True)
            for i in range(6):
                Image.fromarray((rng.random((8, 8)) * 255).astype("uint8")).save(folder / name / label / f"{i}.png")
        if corrupt:
            (folder / name / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
        files[name] = str(folder / name)
    return files


CSV = ["model=knn", "data=csv", "data.target=label"]
#: case id -> (command, arguments, words the one error line must hold)
CASES: dict[str, tuple[str, list[str], str]] = {
    # the command line and config groups
    "unknown model group": ("train", ["model=nosuch"], "model/nosuch"),
    "model group typo lists model names only": ("train", ["model=knnn"], "available: ann, cnn, knn, logreg"),
    "unknown data group": ("train", ["data=nosuch"], "data/nosuch"),
    "unknown runner group": ("tune", ["model=knn", "runner=nosuch"], "runner/nosuch"),
    "unknown key added with +": ("train", ["+model.unitz=3"], "model.unitz: unknown key"),
    "unknown top-level key": ("train", ["foo=1"], "unknown key foo"),
    "typo in a key suggests the key": ("tune", ["model=knn", "gate.treshold=0.9"], "did you mean gate.threshold?"),
    "typo in a model key": ("train", ["model=knn", "model.n_neighbor=3"], "did you mean model.n_neighbors?"),
    "unquoted path with spaces": ("train", [*CSV, "data.path=/my", "dir/x.csv"], "quote a value with spaces"),
    "output folder read-only": ("train", ["model=knn", "hydra.run.dir={readonly}/out"], "cannot write the output"),
    "output folder under a file": ("tune", ["model=knn", "hydra.run.dir={good}/out"],
                                   "cannot create the output folder"),
    "sweep folder under a file": ("tune", ["-m", "model=knn", "hydra.sweep.dir={good}/sweep"],
                                  "cannot create the output folder"),
    "Optuna storage name too long": ("tune", ["model=knn", f"study.storage=sqlite:///{'s' * 300}.db"],
                                     "file name too long (303 bytes"),
    "JUnit file name too long": ("tune", ["model=knn", f"report.junit={'j' * 300}.xml"], "file name too long"),
    "tracking store under a file": ("tune", ["model=knn", "tracking.uri=sqlite:///{good}/mlflow.db"],
                                    "good.csv is a file, so"),
    # data files
    "missing data.path": ("train", ["data=csv"], "data.path: required"),
    "missing file": ("train", [*CSV, "data.path=/nonexistent/file.csv"], "file not found"),
    "missing target column": ("train", [*CSV[:2], "data.path={good}", "data.target=nope"], "'nope' not in"),
    "feature column not in file": ("train", [*CSV, "data.path={good}", "+data.features=[a,zz]"], "'zz' not in"),
    "non-numeric features": ("train", [*CSV, "data.path={text}"], "'color'"),
    "one class": ("train", [*CSV, "data.path={one_class}"], "only one class"),
    "too few samples": ("train", [*CSV, "data.path={tiny}"], "too few"),
    "inf in a CSV feature": ("train", [*CSV, "data.path={inf}"], "infinite values in column(s) 'a'"),
    "missing values in a feature": ("train", [*CSV, "data.path={missing_value}"], "missing values in column(s) 'b'"),
    "missing labels": ("train", [*CSV, "data.path={no_label}"], "missing labels"),
    "header-only CSV": ("train", [*CSV, "data.path={header_only}"], "no data rows"),
    "ragged CSV": ("train", [*CSV, "data.path={ragged_csv}"], "Expected 3 fields in line 3"),
    "binary file as CSV": ("train", [*CSV, "data.path={binary_csv}"], "not a text CSV file"),
    "continuous target": ("train", [*CSV, "data.path={continuous}"], "column 'label' of"),
    "identifier as target": ("train", [*CSV[:2], "data.path={ids}", "data.target=uid", "+data.features=[a,b]"],
                             "not classes"),
    "duplicate column names": ("train", [*CSV, "data.path={duplicate_csv}"], "'a' appear more than once"),
    "data.path is a folder": ("train", [*CSV, "data.path={folder}"], "is a folder, not a file"),
    "data.path is a FIFO": ("train", [*CSV, "data.path={fifo}"], "is a FIFO (named pipe), not a regular file"),
    "data.path is a device": ("train", [*CSV, "data.path=/dev/zero"], "/dev/zero is a device"),
    "file name too long": ("train", [*CSV, f"data.path=/tmp/{'x' * 300}.csv"], "File name too long"),
    "one-hot encoding that would explode": (
        "train", [*CSV, "data.path={ids}", "data.encode_categorical=true"], "data.max_categories=100"),
    "category limit not a number": (
        "train", [*CSV, "data.path={ids}", "data.encode_categorical=true", "data.max_categories=many"],
        "data.max_categories: must be a whole number"),
    "regression dataset from scikit-learn": ("train", ["model=knn", "data=iris", "data.dataset=diabetes"],
                                             "'diabetes' is a regression dataset"),
    "continuous y in an npz": ("train", ["model=knn", "data=npz", "data.path={continuous_npz}"], "regression target"),
    "target listed in data.features (leakage)": (
        "train", [*CSV, "data.path={good}", "+data.features=[a,label]"], "target column 'label'"),
    "data.features as a string": ("train", [*CSV, "data.path={good}", "+data.features=ab"], "must be a list"),
    "NaN in an npz": ("train", ["model=knn", "data=npz", "data.path={nan_npz}"], "NaN or infinite"),
    "inf in an npz": ("train", ["model=knn", "data=npz", "data.path={inf_npz}"], "NaN or infinite"),
    "npz with 0-d arrays": ("train", ["model=knn", "data=npz", "data.path={zero_d_npz}"], "samples first"),
    "empty npz": ("train", ["model=knn", "data=npz", "data.path={empty_npz}"], "holds no arrays"),
    "npz x and y of different lengths": ("train", ["model=knn", "data=npz", "data.path={lengths_npz}"], "50 labels"),
    "npz with text features": ("train", ["model=knn", "data=npz", "data.path={strings_npz}"], "not real-valued"),
    "corrupt npz": ("train", ["model=knn", "data=npz", "data.path={corrupt_npz}"], "not a readable .npz"),
    "CSV given to the npz loader": ("train", ["model=knn", "data=npz", "data.path={csv_as_npz}"], "use data=csv"),
    "corrupt PNG in an images folder": ("train", ["model=cnn", "data=images", "data.path={images}"], "broken.png"),
    "images of one class": ("train", ["model=cnn", "data=images", "data.path={one_class_images}"], "only one class"),
    "images folder missing": ("train", ["model=cnn", "data=images", "data.path=/nonexistent"], "folder not found"),
    "image color mode": ("train", ["model=cnn", "data=images", "data.path={images}", "data.color_mode=cmyk"],
                         "data.color_mode"),
    "validation share 0": ("train", ["model=knn", "data.val_size=0"], "data.val_size"),
    "no share left to train": ("train", ["model=knn", "data.val_size=0.6", "data.test_size=0.5"], "sum < 1"),
    "cnn on tabular data": ("train", ["model=cnn", "data=wine"], "needs images"),
    # model config
    "zero units": ("train", ["model.hidden_units=[0]"], "model.hidden_units"),
    "negative units": ("train", ["model.hidden_units=[16,-4]"], "model.hidden_units"),
    "a model too large (memory)": ("train", ["model.hidden_units=[100000000]"], "model.max_params"),
    "zero conv filters": ("train", ["model=cnn", "model.conv_filters=[0]"], "model.conv_filters"),
    "dropout 1.5": ("train", ["model.dropout=1.5"], "model.dropout"),
    "negative learning rate": ("train", ["model.learning_rate=-1"], "model.learning_rate: must be in (0, 10]"),
    "learning rate above the limit": ("train", ["model.learning_rate=20"],
                                      "model.learning_rate: must be in (0, 10], got 20"),
    "experiment name MLflow refuses": ("tune", ["model=knn", f"tracking.experiment={'e' * 600}"],
                                       "tracking.experiment: 'eeeeeeeeeeeeeeeeeeee...eeeeeeee' cannot be used"),
    "unknown activation": ("train", ["model.activation=bogus"], "model.activation"),
    "unknown optimizer": ("train", ["model.optimizer=bogus"], "model.optimizer"),
    "zero batch size": ("train", ["model.batch_size=0"], "model.batch_size"),
    "zero epochs": ("train", ["model.epochs=0"], "model.epochs"),
    "zero neighbours": ("train", ["model=knn", "model.n_neighbors=0"], "model.n_neighbors"),
    "more neighbours than training samples": ("train", ["model=knn", "data=iris", "model.n_neighbors=200"],
                                              "more than the 90 training samples"),
    "unknown KNN weights": ("train", ["model=knn", "model.weights=bogus"], "model.weights"),
    "unknown scaler": ("train", ["model=knn", "model.scaler=bogus"], "model.scaler"),
    "model._target_ runs a command": (
        "train", ["model=knn", "data=iris", "model._target_=subprocess.Popen", "~model.n_neighbors",
                  "~model.weights", "~model.p", "+model.args=[touch,{folder}/pwned]"],
        "is not a scikit-learn classifier class"),
    "model._target_ a function": ("train", ["model=knn", "model._target_=os.system"], "not a class"),
    "model._target_ not importable": ("train", ["model=knn", "model._target_=nosuch.Thing"], "cannot import"),
    # seeds and tracking
    "negative seed": ("train", ["model=knn", "seed=-1"], "seed"),
    "seed >= 2**32": ("train", ["model=knn", "seed=4294967296"], "seed"),
    "text seed": ("train", ["model=knn", "seed=abc"], "seed"),
    "empty tracking.uri": ("train", ["model=knn", "tracking.uri="], "tracking.uri: must not be empty"),
    "tracking.uri file store in /proc": ("train", ["model=knn", "tracking.uri=file:///proc/nope"],
                                         "cannot create or write"),
    "tracking.uri unsupported scheme": ("train", ["model=knn", "tracking.uri=ftp://host/x"], "unsupported scheme"),
    "empty tracking.experiment": ("train", ["model=knn", "tracking.experiment="], "tracking.experiment"),
    "unreachable tracking server": ("train", ["model=knn", "tracking.uri=http://127.0.0.1:9"],
                                    "cannot reach the MLflow"),
    "tracking folder missing": ("train", ["model=knn", "tracking.uri=sqlite:////nonexistent/dir/mlflow.db"],
                                "tracking.uri"),
    "secret in an interpolated value is not echoed": (
        "tune", ["model=knn", "gate.threshold=${{oc.env:MLOPS_TUNE_TEST_SECRET}}"], "gate.threshold"),
    # the study
    "threshold above 1": ("tune", ["model=knn", "gate.threshold=1.5"], "gate.threshold"),
    "negative threshold": ("tune", ["model=knn", "gate.threshold=-0.1"], "gate.threshold"),
    "test metric as gate": ("tune", ["model=knn", "gate.metric=test_accuracy"], "gate.metric"),
    "unknown sampler": ("tune", ["model=knn", "study.sampler=bogus"], "study.sampler"),
    "unknown pruner": ("tune", ["model=knn", "study.pruner=bogus"], "study.pruner"),
    "sampler naming foreign code": ("tune", ["model=knn", "study.sampler={{_target_:os.system,command:ls}}"],
                                    "only optuna.samplers.X may be named"),
    "pruner hiding foreign code": (
        "tune", ["model=knn", "study.pruner={{_target_:optuna.pruners.MedianPruner,"
                              "n_startup_trials:{{_target_:os.getcwd}}}}"], "'os.getcwd' is not allowed"),
    "zero trials": ("tune", ["model=knn", "study.n_trials=0"], "study.n_trials"),
    "negative timeout": ("tune", ["model=knn", "study.timeout=-5"], "study.timeout"),
    "zero failures allowed": ("tune", ["model=knn", "study.max_consecutive_failures=0"],
                              "study.max_consecutive_failures"),
    "heartbeat longer than the grace period": ("tune", ["model=knn", "study.heartbeat_interval=30"],
                                               "shorter than study.grace_period"),
    "empty study name": ("tune", ["model=knn", "study.name="], "study.name"),
    "negative worker index": ("tune", ["model=knn", "worker=-1"], "worker"),
    "registry.promote not a boolean": ("tune", ["model=knn", "registry.promote=abc"], "registry.promote"),
    "registry name MLflow refuses": ("tune", ["model=knn", "registry.name=bad/name"], "registry.name"),
    "unreachable storage": ("tune", ["model=knn", "study.storage=postgresql+psycopg2://u:secret@127.0.0.1:9/db"],
                            "127.0.0.1"),
    "read-only study storage": ("tune", ["model=knn", "study.storage=sqlite:///{readonly}/optuna.db"], "read-only"),
    "zero confirmation seeds": ("tune", ["model=knn", "gate.confirm=0"], "gate.confirm"),
    "zero parameter limit": ("tune", ["model=knn", "gate.max_params=0"], "gate.max_params"),
    "negative latency limit": ("tune", ["model=knn", "gate.max_predict_ms=-1"], "gate.max_predict_ms"),
    "unknown start": ("tune", ["model=knn", "study.start_from=latest"], "study.start_from"),
    "unknown data-change policy": ("tune", ["model=knn", "study.on_data_change=ignore"], "study.on_data_change"),
    "unknown probe": ("tune", ["study.probe=wider"], "study.probe"),
    "zero trials at once": ("tune", ["model=knn", "study.n_jobs=0"], "study.n_jobs"),
    "trials at once with another runner": ("tune", ["model=knn", "study.n_jobs=2", "runner=mlflow"], "study.n_jobs"),
    # what the study writes at its end
    "JUnit path is a folder": ("tune", ["model=knn", "report.junit={folder}"], "report.junit"),
    "JUnit path is another file": ("tune", ["model=knn", "report.junit={good}"], "not a JUnit XML file"),
    "JUnit path under a file": ("tune", ["model=knn", "report.junit={good}/junit.xml"], "is a file"),
}


@pytest.fixture(scope="module")
def outcomes(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
             mlflow_template: Path) -> Iterator[dict[str, tuple[Result, Path]]]:
    """The selected cases run two at a time (each is a fresh process, mostly imports):
    case -> (its result, its working folder). Inputs are shared and only read."""
    inputs = tmp_path_factory.mktemp("inputs")
    files = _write_inputs(inputs)
    readonly = inputs / "readonly"
    readonly.mkdir()
    (readonly / "optuna.db").touch()
    selected = [item.callspec.params["case"] for item in request.session.items
                if item.originalname == "test_bad_input_is_exit_2_with_one_line"]

    def run(case: str) -> tuple[str, tuple[Result, Path]]:
        command, args, _ = CASES[case]
        folder = tmp_path_factory.mktemp("case")
        shutil.copy(mlflow_template, folder / "mlflow.db")
        values = {**files, "folder": str(folder), "readonly": str(readonly)}
        result = run_command(f"mlops-{command}", *[a.format(**values) for a in args], cwd=folder,
                             MLOPS_TUNE_TEST_SECRET=SECRET)
        return case, (result, folder)

    with read_only(readonly), ThreadPoolExecutor(max_workers=2) as pool:
        yield dict(pool.map(run, selected))


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_input_is_exit_2_with_one_line(case: str, outcomes: dict[str, tuple[Result, Path]]) -> None:
    command = CASES[case][0]
    result, folder = outcomes[case]
    assert result.code == 2, (result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"mlops-{command}: error: "), result.stderr[-2000:]
    assert CASES[case][2] in lines[0], lines[0]
    assert lines[0].isprintable(), lines[0]  # no byte of a file reaches the terminal raw
    assert SECRET not in result.stdout + result.stderr and "secret@" not in result.stderr
    assert mlflow_runs(folder) == []  # rejected before any run exists
    assert not (folder / "pwned").exists()
    if command == "tune" and "storage" not in case:
        assert not (folder / "optuna.db").exists()


@pytest.mark.parametrize(("command", "env", "words"), [
    ("tune", {"MLOPS_TUNE_N_JOBS": "abc"}, ["MLOPS_TUNE_N_JOBS", "got 'abc'"]),  # not a secret: shown
    ("tune", {"MLOPS_TUNE_CONF": "/nonexistent/conf"}, ["MLOPS_TUNE_CONF", "/nonexistent/conf", "tune.yaml"]),
    ("train", {"MLOPS_TUNE_CONF": "/nonexistent/conf"}, ["MLOPS_TUNE_CONF", "train.yaml"]),
])
def test_an_error_caused_by_an_environment_variable_names_the_variable(
        tmp_path: Path, command: str, env: dict[str, str], words: list[str]) -> None:
    result = run_command(f"mlops-{command}", "model=knn", cwd=tmp_path, **env)
    assert result.code == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"mlops-{command}: error: "), result.stderr[-2000:]
    assert all(word in lines[0] for word in words), lines[0]
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "mlflow.db").exists()


def test_the_bad_input_table_in_the_docs_lists_every_case() -> None:
    text = (ROOT / "docs" / "reliability.md").read_text()
    table = text.split("## Bad input", 1)[1]
    documented = set(re.findall(r"^\| (?:\d+) \| ([^|]+?) \|", table, flags=re.MULTILINE))
    assert documented == set(CASES), (sorted(set(CASES) - documented), sorted(documented - set(CASES)))
    assert len(CASES) >= 60


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["--help", "model=nosuch"], ["--help", "foo=1"],
                                  ["--help", "-m", "model=knn,ann"], ["--hydra-help", "foo=1"]],
                         ids=["help", "h", "bad group", "unknown key", "multirun sweep", "hydra help"])
def test_help_is_shown_whatever_else_the_command_line_holds(tmp_path: Path, args: list[str]) -> None:
    """The help does not depend on the overrides: a bad one beside --help never breaks it."""
    result = run_command("mlops-tune", *args, cwd=tmp_path)
    assert result.code == 0 and result.stderr == "", result.stderr[-2000:]
    assert "mlops-tune" in result.stdout and ("Usage:" in result.stdout or "Hydra" in result.stdout)


@pytest.mark.parametrize("args", [["--help", "--config-name=nosuch"], ["--shell-completion"]])
def test_a_help_flag_hydra_refuses_is_one_line_exit_2(tmp_path: Path, args: list[str]) -> None:
    result = run_command("mlops-tune", *args, cwd=tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.code == 2 and len(lines) == 1 and lines[0].startswith("mlops-tune: error: "), result.stderr
    assert 'File "' not in lines[0] and "Error:" not in lines[0], lines[0]
