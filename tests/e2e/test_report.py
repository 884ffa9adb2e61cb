"""The study report (report.html) and what the MLflow UI shows of a study, in real headless Chromium."""

from __future__ import annotations

import itertools
import json
import re
import shutil
from pathlib import Path

import pytest

from devtools import devservices
from mlops_tune.records import tracking
from tests import browser
from tests.conftest import mlflow_client, mlflow_runs, run_command

SECTIONS = ("verdict", "history", "epochs", "lineage", "parallel", "table")
pytestmark = pytest.mark.slow


def report_json(page_html: str) -> dict:
    match = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page_html, re.S)
    assert match, "report.html embeds its data"
    return json.loads(match.group(1).replace("<\\/", "</"))


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory, mlflow_template: Path) -> dict:
    """A 5-trial mutation study of the ANN (4 epochs a trial; the gate is out of reach: all 5 run)."""
    folder = tmp_path_factory.mktemp("report-study")
    shutil.copy(mlflow_template, folder / "mlflow.db")
    result = run_command("mlops-tune", "study.n_trials=5", "study.sampler=mutation", "model.epochs=4",
                         "gate.threshold=0.999", "hydra.run.dir=out", cwd=folder)
    assert result.code == 1, result.stderr
    runs = mlflow_runs(folder)
    parent = next(r for r in runs if tracking.TAG_GATE in r.data.tags)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    page = (folder / "out" / "report.html").read_text()
    return {"folder": folder, "stdout": result.stdout, "parent": parent, "children": children, "page": page,
            "data": report_json(page)}


def test_the_report_is_written_next_to_best_config_and_logged_to_the_parent_run(study: dict) -> None:
    folder, parent = study["folder"], study["parent"]
    assert (folder / "out" / "best_config.yaml").exists()
    assert f"study report: {folder / 'out' / 'report.html'}" in study["stdout"]
    logged = mlflow_client(folder).download_artifacts(parent.info.run_id, "report.html", str(folder))
    assert Path(logged).read_text() == study["page"]
    # self-contained: nothing the browser would fetch
    assert not re.search(r'<(script|link|img)[^>]+(src|href)=', study["page"])


def test_the_lineage_tree_matches_every_child_runs_parent_trial_tag(study: dict) -> None:
    data = study["data"]
    edges = {edge["to"]: edge for edge in data["lineage"]["edges"]}
    assert data["lineage"]["root"] == 0
    trial_runs = [r for r in study["children"] if tracking.TAG_TRIAL_NUMBER in r.data.tags]
    assert len(trial_runs) == 5
    for run in trial_runs:
        number, parent = int(run.data.tags[tracking.TAG_TRIAL_NUMBER]), run.data.tags[tracking.TAG_PARENT_TRIAL]
        if parent == "none":
            assert number == data["lineage"]["root"] and number not in edges
            continue
        expected = 0 if parent == "base" else int(parent)
        assert edges[number]["from"] == expected, (number, parent)
        assert edges[number]["label"] == run.data.tags[tracking.TAG_MUTATIONS]
    # the winner's path runs from the root to the best trial along the edges
    path = data["lineage"]["winner_path"]
    assert path[0] == 0 and path[-1] == data["verdict"]["best_trial"]
    assert all(edges[b]["from"] == a for a, b in itertools.pairwise(path))


def test_the_report_data_agrees_with_mlflow(study: dict) -> None:
    data, parent = study["data"], study["parent"]
    client = mlflow_client(study["folder"])
    assert data["verdict"]["passed"] is False
    assert data["verdict"]["best_trial"] == int(parent.data.tags["mlops_tune.best_trial"])
    by_number = {t["number"]: t for t in data["trials"]}
    for run in study["children"]:
        if tracking.TAG_TRIAL_NUMBER not in run.data.tags:
            continue
        trial = by_number[int(run.data.tags[tracking.TAG_TRIAL_NUMBER])]
        assert trial["value"] == pytest.approx(run.data.metrics["val_accuracy"])
        per_epoch = sorted(client.get_metric_history(run.info.run_id, "val_accuracy"), key=lambda m: m.timestamp)
        assert len(trial["epochs"]) == 4 == len({m.step for m in per_epoch})
        assert trial["run"].endswith(f"/runs/{run.info.run_id}")
        # readable parameters: the list as a list, no internal names
        assert isinstance(trial["params"]["hidden_units"], list)
        assert not any(key.endswith("_len") for key in trial["params"])


def test_the_mlflow_runs_tell_the_story(study: dict) -> None:
    parent, children = study["parent"], study["children"]
    assert parent.info.run_name == "ann-digits"
    assert parent.data.tags["mlflow.note.content"].startswith("**gate MISSED: best val_accuracy")
    best = [r for r in children if r.data.tags.get("mlops_tune.best") == "true"]
    assert [r.data.tags[tracking.TAG_TRIAL_NUMBER] for r in best] == [parent.data.tags["mlops_tune.best_trial"]]
    artifacts = {a.path for a in mlflow_client(study["folder"]).list_artifacts(parent.info.run_id)}
    assert {"report.html", "optimization_history.png", "trials.csv"} <= artifacts
    assert "param_importances.png" not in artifacts  # 5 trials: too few for importances


def test_the_report_renders_in_chromium_with_no_error_and_no_outside_request(study: dict) -> None:
    path = study["folder"] / "out" / "report.html"
    with browser.browser() as chromium:
        page = browser.open_page(chromium, path.as_uri())
        page.screenshot("report-file.png")
        for section in SECTIONS:
            box = page.page.locator(f"section#{section}").bounding_box()
            assert box and box["height"] > 40, section
        for svg in ("history", "epochs", "lineage", "parallel"):
            box = page.page.locator(f"#svg-{svg}").bounding_box()
            assert box and box["width"] > 300 and box["height"] > 150, svg
        assert page.page.locator("#svg-lineage g.node").count() == 5
        assert page.page.locator("#svg-lineage g.node.win").count() == len(study["data"]["lineage"]["winner_path"])
        assert page.page.locator("#svg-epochs polyline").count() == 5
        assert page.page.locator("table#trials tbody tr").count() == 5
        assert page.page.locator("section#verdict").inner_text().startswith("Verdict\ngate MISSED")
        assert page.console_errors == []
        assert page.outside_requests() == []
        assert page.requests == [path.as_uri()]


def test_the_report_shows_in_the_mlflow_ui_artifact_view(study: dict) -> None:
    folder, run = study["folder"], study["parent"]
    proc, url = devservices.start_mlflow_server("sqlite:///mlflow.db", folder / "mlartifacts", cwd=folder,
                                                log=folder / "server.log")
    try:
        with browser.browser() as chromium:
            page = browser.open_page(
                chromium, f"{url}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}/artifacts/report.html")
            frame = None
            for _ in range(120):  # the UI loads the artifact, then shows it in a frame
                frame = next((f for f in page.page.frames if f.url.startswith("blob:")), None)
                if frame is not None and frame.locator("#svg-lineage").count():
                    break
                page.page.wait_for_timeout(500)
            assert frame is not None, "the artifact view shows report.html in a frame"
            assert frame.locator("section#lineage h2").inner_text() == "Mutation lineage"
            assert frame.locator("#svg-lineage g.node").count() == 5
            page.screenshot("report-in-mlflow-ui.png")
            assert page.outside_requests() == []
    finally:
        devservices.stop_process(proc)


def test_optuna_dashboard_reads_the_study_storage_as_it_is(study: dict) -> None:
    """The `dashboard` extra: optuna-dashboard on loopback finds the study and its trials through its API."""
    import subprocess
    import sys
    import time
    import urllib.request

    folder, port = study["folder"], devservices.free_port()
    dashboard = Path(sys.executable).parent / "optuna-dashboard"
    proc = subprocess.Popen([str(dashboard), "sqlite:///optuna.db", "--host", "127.0.0.1", "--port", str(port)],
                            cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline, summaries = time.time() + 60, None
        while time.time() < deadline and summaries is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as answer:
                    summaries = json.load(answer)["study_summaries"]
            except OSError:
                assert proc.poll() is None, "optuna-dashboard exited"
                time.sleep(0.5)
        assert summaries is not None, "optuna-dashboard did not answer within 60 s"
        [summary] = [s for s in summaries if s["study_name"] == "ann-digits"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{summary['study_id']}", timeout=10) as answer:
            detail = json.load(answer)
        assert len(detail["trials"]) == 5
        assert sorted(t["number"] for t in detail["trials"]) == [0, 1, 2, 3, 4]
    finally:
        devservices.stop_process(proc)


def test_a_study_name_the_plot_font_lacks_writes_no_warning(tune, workdir: Path) -> None:
    """The README promises the libraries' chatter stays off: a CJK or emoji study name in the plots'
    title (a font without those glyphs) used to print matplotlib's "Glyph ... missing" per character."""
    result = tune("model=knn", "study.n_trials=2", "gate.threshold=0.999", "study.name='模型-🚀'")
    assert result.code == 1, result.stderr[-2000:]
    assert "Glyph" not in result.stderr and "Warning" not in result.stderr, result.stderr[-2000:]
    assert "study '模型-🚀'" in result.stdout
