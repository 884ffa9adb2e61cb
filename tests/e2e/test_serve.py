"""The champion serves: `mlflow models serve -m "models:/<registry.name>@champion" --env-manager local`
on 127.0.0.1 answers /invocations with the predictions of the model loaded in Python."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from devtools import devservices
from tests.conftest import BIN, command_env, run_command

pytestmark = pytest.mark.slow


def serve(folder: Path, model_uri: str) -> tuple[subprocess.Popen, str]:
    port = devservices.free_port()
    # as the docs say: the venv activated (mlflow starts `uvicorn` from PATH)
    env = command_env(MLFLOW_TRACKING_URI=f"sqlite:///{folder / 'mlflow.db'}")
    env["PATH"] = f"{BIN}:{env['PATH']}"
    proc = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
                             "--host", "127.0.0.1", "--port", str(port)], cwd=folder, env=env,
                            stdout=open(folder / "serve.log", "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        assert proc.poll() is None, (folder / "serve.log").read_text()[-2000:]
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)
    devservices.stop_process(proc)
    raise AssertionError("mlflow models serve did not answer /ping within 180 s")


def invoke(url: str, rows: np.ndarray) -> np.ndarray:
    body = json.dumps({"inputs": rows.tolist()}).encode()
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as answer:
        return np.asarray(json.load(answer)["predictions"])


@pytest.mark.parametrize(("model", "data", "extra"), [
    ("knn", "wine", ()),
    ("ann", "digits", ("model.epochs=3",)),
])
def test_the_champion_serves_the_predictions_it_makes_in_python(workdir: Path, model: str, data: str,
                                                               extra: tuple[str, ...]) -> None:
    import mlflow

    from mlops_tune.config import to_plain
    from mlops_tune.data import load_splits
    from mlops_tune.families import get_family
    from tests.conftest import compose_config

    result = run_command("mlops-tune", f"model={model}", f"data={data}", "study.n_trials=1", "gate.threshold=0",
                         *extra, cwd=workdir)
    assert result.code == 0, result.stderr
    name = f"mlops-tune-{model}-{data}"
    assert f"registry: {name} version 1 is now 'champion'" in result.stdout
    uri = f"models:/{name}@champion"

    plain = to_plain(compose_config("tune", f"model={model}", f"data={data}"))
    family = get_family(plain["model"]["family"])
    splits = load_splits(plain["data"], int(plain["seed"])).as_input(family.input_kind)
    rows = splits.x_test[:20].astype(np.float32)
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    expected = np.asarray(mlflow.pyfunc.load_model(uri).predict(rows))

    proc, url = serve(workdir, uri)
    try:
        served = invoke(url, rows)
    finally:
        devservices.stop_process(proc)
    assert served.shape == expected.shape
    np.testing.assert_allclose(served.astype(float), expected.astype(float), rtol=1e-5, atol=1e-6)
    if model == "ann":  # class probabilities: the served model's choices are the champion's accuracy
        assert served.shape == (20, splits.n_classes)
        assert np.allclose(served.sum(axis=1), 1, atol=1e-4)
