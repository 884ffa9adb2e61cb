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
    best_value = parent.data.metrics["best_val_accuracy"]
    assert parent.info.run_name == f"MISSED {best_value:.4f} ann-digits"  # the runs list shows the verdict
    assert parent.data.tags["mlflow.note.content"].startswith("gate MISSED: best val_accuracy")  # plain text
    for run in children:  # each trial's accuracy in its name; one-value metrics at step 0
        if tracking.TAG_TRIAL_NUMBER in run.data.tags and run.data.tags[tracking.TAG_STATE] == "COMPLETE":
            assert run.info.run_name == (f"trial-{run.data.tags[tracking.TAG_TRIAL_NUMBER]}: "
                                         f"{run.data.metrics['val_accuracy']:.4f}")
            history = mlflow_client(study["folder"]).get_metric_history(run.info.run_id, "fit_seconds")
            assert [m.step for m in history] == [0]
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
        for svg in ("history", "epochs", "parallel"):
            box = page.page.locator(f"#svg-{svg}").bounding_box()
            assert box and box["width"] > 300 and box["height"] > 150, svg
        box = page.page.locator("#svg-lineage").bounding_box()  # an outline: a row of ~24 px per trial
        assert box and box["width"] > 300 and box["height"] >= 5 * 24
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


@pytest.fixture(scope="module")
def big_study(tmp_path_factory: pytest.TempPathFactory, mlflow_template: Path) -> dict:
    """A 200-trial KNN mutation study from a weak base (30 neighbours: mutations beat it; the gate out
    of reach: all 200 run) whose run links point at
    an MLflow UI on a port of its own (tracking.ui_url)."""
    folder = tmp_path_factory.mktemp("report-200")
    shutil.copy(mlflow_template, folder / "mlflow.db")
    port = devservices.free_port()
    result = run_command("mlops-tune", "model=knn", "model.n_neighbors=30", "study.sampler=mutation",
                         "study.n_trials=200", "gate.threshold=1.0", "registry.promote=false", f"tracking.ui_url=http://127.0.0.1:{port}",
                         "hydra.run.dir=out", cwd=folder, timeout=1200)
    assert result.code == 1, result.stderr[-2000:]
    page = (folder / "out" / "report.html").read_text()
    return {"folder": folder, "port": port, "page": page, "data": report_json(page)}


def test_a_200_trial_lineage_stays_readable_with_the_winners_path(big_study: dict) -> None:
    path, data = big_study["folder"] / "out" / "report.html", big_study["data"]
    winner_path = data["lineage"]["winner_path"]
    with browser.browser() as chromium:
        page = browser.open_page(chromium, path.as_uri())
        assert page.page.locator("#svg-lineage g.node").count() == 200
        assert page.page.locator("#svg-lineage g.node.win").count() == len(winner_path) >= 2
        heights = page.page.evaluate("() => Array.from(document.querySelectorAll('#svg-lineage text'))"
                                     ".map(t => t.getBoundingClientRect().height)")
        assert len(heights) >= 200 and min(heights) >= 9, min(heights)  # every label at a readable size
        line = page.page.locator("#winner-path").inner_text()
        assert line.startswith("Winner's path: #0") and f"#{winner_path[-1]}" in line
        page.page.locator(f'#svg-lineage g.node.win[data-trial="{winner_path[-1]}"]').scroll_into_view_if_needed()
        page.page.locator("section#lineage").screenshot(path=str(browser.ARTIFACTS / "report-200-lineage.png"))
        page.screenshot("report-200-trials.png")
        assert page.console_errors == []
        assert page.requests == [path.as_uri()]


def test_run_links_open_the_run_from_the_file_and_from_the_mlflow_ui(big_study: dict) -> None:
    """A trial's "MLflow run" link opens that run in the MLflow UI, clicked in report.html opened
    from its folder and clicked in the UI's own view of the report artifact."""
    folder, data = big_study["folder"], big_study["data"]
    proc, url = devservices.start_mlflow_server("sqlite:///mlflow.db", folder / "mlartifacts", port=big_study["port"],
                                                cwd=folder, log=folder / "server.log")
    best = data["verdict"]["best_trial"]
    client = mlflow_client(folder)
    parent = next(r for r in mlflow_runs(folder) if tracking.TAG_GATE in r.data.tags)
    try:
        with browser.browser() as chromium:
            page = browser.open_page(chromium, (folder / "out" / "report.html").as_uri())
            page.page.locator(f'tr[data-trial="{best}"] a').click()
            page.page.wait_for_url(f"{url}/#/experiments/*/runs/*", timeout=30000)
            run_id = page.page.url.rsplit("/", 1)[1]
            name = client.get_run(run_id).info.run_name
            assert name.startswith(f"trial-{best}: ")
            page.page.get_by_text(name).first.wait_for(timeout=60000)  # the UI shows the run
            page.screenshot("report-link-from-file.png")
            ui = browser.open_page(chromium, f"{url}/#/experiments/{parent.info.experiment_id}/runs/"
                                             f"{parent.info.run_id}/artifacts/report.html")
            # MLflow shows the artifact in a frame sandboxed to scripts only: no link can leave it (tried:
            # _top and _blank are blocked, and the UI itself cannot run inside it). The link says where the
            # run is instead, its address selected; that address opens the run.
            frame = _report_frame(ui)
            frame.locator(f'tr[data-trial="{best}"] a').click()
            note = frame.locator("#run-address")
            note.wait_for(state="visible", timeout=10000)
            assert name in note.inner_text()
            address = frame.locator("#run-address input").input_value()
            assert address == f"{url}/#/experiments/{parent.info.experiment_id}/runs/{run_id}"
            ui.screenshot("report-link-from-mlflow-ui.png")
            followed = browser.open_page(chromium, address)
            followed.page.get_by_text(name).first.wait_for(timeout=60000)
            assert page.outside_requests() == [] and ui.outside_requests() == [] and followed.outside_requests() == []
    finally:
        devservices.stop_process(proc)


def _report_frame(page: browser.Page):
    """The frame in which the MLflow UI shows report.html."""
    frame = None
    for _ in range(120):  # the UI loads the artifact, then shows it in a frame
        frame = next((f for f in page.page.frames if f.url.startswith("blob:")), None)
        if frame is not None and frame.locator("#svg-lineage").count():
            return frame
        page.page.wait_for_timeout(500)
    raise AssertionError("the artifact view shows report.html in a frame")


def test_the_mlflow_runs_list_shows_the_verdict_and_each_trials_accuracy(study: dict) -> None:
    """Scanning the experiment's runs list in the MLflow UI, without opening a run: the study's row
    starts with its verdict and best accuracy, and its trials (expanded) with their accuracy."""
    folder, parent = study["folder"], study["parent"]
    proc, url = devservices.start_mlflow_server("sqlite:///mlflow.db", folder / "mlartifacts", cwd=folder,
                                                log=folder / "server.log")
    try:
        with browser.browser() as chromium:
            page = browser.open_page(chromium, f"{url}/#/experiments/{parent.info.experiment_id}/runs")
            row = page.page.locator(".ag-row").filter(has_text=parent.info.run_name).first
            row.wait_for(timeout=60000)
            assert parent.info.run_name.startswith("MISSED 0.") and parent.info.run_name in row.inner_text()
            row.locator("button").first.click()  # show the study's child runs
            for child in study["children"]:
                if child.data.tags.get(tracking.TAG_STATE) == "COMPLETE":
                    number, value = child.data.tags[tracking.TAG_TRIAL_NUMBER], child.data.metrics["val_accuracy"]
                    page.page.get_by_text(f"trial-{number}: {value:.4f}", exact=True).wait_for(timeout=30000)
            page.screenshot("mlflow-runs-list.png")
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
        assert detail["objective_names"] == ["val_accuracy"]  # not "Objective 0"
        assert {"key": "gate", "value": "val_accuracy >= 0.9990"} in detail["user_attrs"]
    finally:
        devservices.stop_process(proc)


def test_a_study_name_the_plot_font_lacks_writes_no_warning(tune, workdir: Path) -> None:
    """The README promises the libraries' chatter stays off: a CJK or emoji study name in the plots'
    title (a font without those glyphs) used to print matplotlib's "Glyph ... missing" per character."""
    result = tune("model=knn", "study.n_trials=2", "gate.threshold=0.999", "study.name='模型-🚀'")
    assert result.code == 1, result.stderr[-2000:]
    assert "Glyph" not in result.stderr and "Warning" not in result.stderr, result.stderr[-2000:]
    assert "study '模型-🚀'" in result.stdout
