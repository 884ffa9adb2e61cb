"""``report.html``: one self-contained page per study (inline SVG and CSS, no script, no network).

Sections: the verdict, the optimization history (threshold line, pruned and failed
trials), every trial's per-epoch validation accuracy overlaid, the mutation lineage as a
tree (base model at the root, each child under the trial it mutated, operators on the
edges, the winner's path highlighted), parallel coordinates, and a ranked table whose rows
link to the trials' MLflow runs. The data the page is drawn from is embedded as JSON
(``<script type="application/json" id="report-data">``) for tools and tests.

:func:`report_data` gathers the data (Optuna trials + MLflow metric histories);
:func:`render` turns it into HTML and needs nothing but the data.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from mlops_tune.runtime import keys
from mlops_tune.show.svg import (
    epochs_svg,
    esc,
    history_svg,
    lineage_svg,
    parallel_svg,
    params_text,
    score,
    winner_path_html,
)


def report_data(study: Any, space: Any, cfg: Mapping[str, Any], verdict: Mapping[str, Any],
                histories: Mapping[int, Sequence[float]], run_links: Mapping[int, str]) -> dict[str, Any]:
    """Everything the page shows, as plain JSON-able data.

    Args:
        study: the Optuna study. space: its :class:`~mlops_tune.search.space.SearchSpace`.
        verdict: ``passed``, ``best_trial``, ``best_value``, ``test_accuracy``, ``registered``.
        histories: per-epoch validation accuracy of each trial (by trial number).
        run_links: the MLflow UI address of each trial's run (by trial number).
    """
    trials = []
    for trial in study.get_trials(deepcopy=False):
        try:
            point = space.decode(trial.params)
        except (KeyError, TypeError):  # a trial that failed before every value was suggested
            point = dict(trial.params)
        params = {key.removeprefix("model."): value for key, value in point.items()}
        value = trial.value
        if value is None and trial.intermediate_values:  # pruned: its last reported value
            value = trial.intermediate_values[max(trial.intermediate_values)]
        trials.append({
            "number": trial.number, "state": trial.state.name,
            "value": None if value is None or not math.isfinite(value) else float(value),
            "params": params,
            "parent": str(trial.user_attrs.get(keys.PARENT, "")),
            "mutations": str(trial.user_attrs.get(keys.MUTATIONS, "")),
            "retry_of": trial.user_attrs.get(keys.RETRY_OF),
            "start": str(trial.user_attrs.get(keys.START, "")),
            "error": str(trial.user_attrs.get(keys.ERROR) or trial.user_attrs.get(keys.NOT_CHARGED) or ""),
            "seconds": trial.user_attrs.get(keys.SECONDS),
            "epochs": [float(v) for v in histories.get(trial.number, [])],
            "run": run_links.get(trial.number, ""),
        })
    return {
        "study": study.study_name, "metric": str(cfg["gate"]["metric"]),
        "threshold": float(cfg["gate"]["threshold"]),
        "model": str(cfg["model"]["name"]), "data": str(cfg["data"]["name"]),
        "sampler": cfg["study"]["sampler"] if isinstance(cfg["study"]["sampler"], str) else "custom",
        "n_trials": int(cfg["study"]["n_trials"]),
        "verdict": dict(verdict), "trials": trials, "lineage": lineage(trials, verdict.get("best_trial")),
    }


def lineage(trials: Sequence[Mapping[str, Any]], winner: int | None) -> dict[str, Any]:
    """The mutation tree: an edge from each trial to the trial it mutated.

    The base model (``parent_trial`` = ``none``) is the root; ``base`` (a mutation of the base
    model made before any trial completed) hangs under the base model's trial. A trial the
    sampler proposed without a parent (TPE, random) hangs under the root, in the order it ran.
    """
    numbers = {t["number"] for t in trials}
    roots = [t["number"] for t in trials if t["parent"] == keys.ROOT]
    root = min(roots) if roots else None
    edges = []
    for t in trials:
        if t["number"] == root:
            continue
        parent = t["parent"]
        if parent.isdigit() and int(parent) in numbers:
            source, label = int(parent), t["mutations"] or "mutation"
        elif parent == keys.BASE:
            source, label = root, t["mutations"] or "mutation"
        else:
            source, label = root, "sampled" if not t["mutations"] else t["mutations"]
        if source is None:
            continue
        edges.append({"from": source, "to": t["number"], "label": label, "mutated": bool(t["mutations"])})
    parents = {e["to"]: e["from"] for e in edges}
    path = []
    node = winner
    while node is not None and node not in path:
        path.append(node)
        node = parents.get(node)
    return {"root": root, "edges": edges, "winner_path": list(reversed(path))}




def table_html(data: Mapping[str, Any]) -> str:
    """Every trial, best first (then pruned, then failed), with a link to its run."""
    order = {"COMPLETE": 0, "PRUNED": 1}
    rows = sorted(data["trials"], key=lambda t: (order.get(t["state"], 2), -(t["value"] or 0), t["number"]))
    winner = data["verdict"].get("best_trial")
    out = ['<table id="trials"><thead><tr><th>rank</th><th>trial</th><th>state</th>'
           f'<th>{esc(data["metric"])}</th><th>parameters</th><th>from</th><th>seconds</th><th>run</th></tr></thead><tbody>']
    for rank, t in enumerate(rows, 1):
        origin = (t.get("start") or "base model") if t["parent"] == keys.ROOT else (
            f"#{t['parent']} {t['mutations']}" if t["mutations"] else t["parent"] or "sampled")
        name = f"trial-{t['number']}: " + (score(t["value"]) if t["state"] == "COMPLETE" else
                                             "pruned" if t["state"] == "PRUNED" else "failed")
        run = (f'<a class="run" href="{esc(t["run"])}" data-name="{esc(name)}">MLflow run</a>' if t["run"] else "")
        error = f'<div class="error">{esc(t["error"])}</div>' if t["error"] else ""
        seconds = f"{t['seconds']:.1f}" if isinstance(t["seconds"], (int, float)) else ""
        out.append(f'<tr class="{"winner" if t["number"] == winner else ""}" data-trial="{t["number"]}"><td>{rank}</td>'
                   f'<td>{t["number"]}</td><td>{t["state"].lower()}</td><td>{score(t["value"]) if t["value"] is not None else ""}'
                   f'</td><td class="params">{esc(params_text(t["params"]))}{error}</td><td>{esc(origin)}</td>'
                   f'<td>{seconds}</td><td>{run}</td></tr>')
    out.append("</tbody></table>")
    return "".join(out)


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px;color:#222;max-width:1100px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
.verdict{font-size:18px;padding:10px 14px;border-radius:6px;display:inline-block;margin:8px 0}
.passed{background:#e3f5e1;color:#16620f} .missed{background:#fde8e8;color:#8a1111}
.note{color:#666} .meta{color:#555} .legend{font-size:12px;margin:2px 0 0 48px} .legend span{margin-right:14px}
svg{max-width:100%;height:auto;display:block} .scroll{overflow-x:auto}
.axis{stroke:#888;stroke-width:1} .label{font-size:12px;text-anchor:middle;fill:#333}
.tick{font-size:11px;fill:#555} .small{font-size:9px}
.halo{paint-order:stroke;stroke:#fff;stroke-width:3px;stroke-linejoin:round}
.threshold{stroke:#d62728;stroke-dasharray:6 4;stroke-width:1.5}
.best{fill:none;stroke:#2ca02c;stroke-width:2} .mark{stroke-width:2}
.curve{fill:none;stroke-width:1.2;opacity:.55} .winner{fill:none;stroke-width:3} #svg-parallel .curve{opacity:1;stroke-width:1.4}
.edge{fill:none;stroke:#999;stroke-width:1.5} .edge.sampled{stroke-dasharray:4 3}
.edge.win{stroke:#2ca02c;stroke-width:3}
.scroll.tree{max-height:70vh;overflow:auto;border:1px solid #eee} .scroll.tree svg{max-width:none}
.edge-label{font-size:11px;fill:#444} .path{font-size:13px;margin:4px 0 8px}
.node rect{fill:#f4f7fb;stroke:#1f77b4;stroke-width:1.2} .node text{font-size:11px}
.node.win rect{fill:#e3f5e1;stroke:#2ca02c;stroke-width:2.5} .node.win text{font-weight:600}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{border-bottom:1px solid #e4e4e4;padding:4px 6px;text-align:left;vertical-align:top}
tr.winner{background:#eef9ec;font-weight:600} td.params{font-family:ui-monospace,monospace;font-size:12px}
.error{color:#8a1111;font-weight:normal}
.framed-note{background:#fff6d6;border:1px solid #e0c060;padding:8px 10px;margin:6px 0;font-size:13px}
.framed-note input{font-family:ui-monospace,monospace;font-size:12px;margin-top:4px}
"""


#: the page's one script: shown inside another page (the MLflow UI shows an HTML artifact in a frame
#: sandboxed to scripts only, from which no link can open anything), a run link says where the run is
#: instead of turning the frame blank. Allowed by its hash in the page's Content-Security-Policy.
_FRAMED_JS = """
if (window.self !== window.top) {
  document.body.classList.add("framed");
  const box = document.getElementById("run-address");
  for (const link of document.querySelectorAll("a.run")) {
    link.addEventListener("click", (event) => {
      event.preventDefault();
      box.querySelector("b").textContent = link.dataset.name;
      box.querySelector("input").value = link.href;
      box.hidden = false;
      box.querySelector("input").select();
    });
  }
}
"""

_RUN_BOX = ('<div id="run-address" class="framed-note" hidden>This page is shown inside the MLflow UI, which '
            'lets no link leave it. <b></b> is under this study\'s run in the runs list; its address (selected: '
            'copy it into the address bar): <input readonly size="70"></div>')


def _script_hash(script: str) -> str:
    import base64
    import hashlib

    return "sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()


def render(data: Mapping[str, Any]) -> str:
    """The whole page; every asset inline (a page the MLflow UI can show from an artifact)."""
    verdict = data["verdict"]
    passed = bool(verdict.get("passed"))
    best = verdict.get("best_value")
    line = (f"gate {'PASSED' if passed else 'MISSED'}: best {data['metric']} "
            f"{score(best) if best is not None else 'none'} (trial {verdict.get('best_trial')}) "
            f"vs threshold {score(data['threshold'])}")
    if verdict.get("test_accuracy") is not None:
        line += f", test_accuracy {score(verdict['test_accuracy'])}"
    if verdict.get("registered"):
        line += f"; {verdict['registered']}"
    counts: dict[str, int] = {}
    for t in data["trials"]:
        counts[t["state"].lower()] = counts.get(t["state"].lower(), 0) + 1
    payload = json.dumps(data, default=str).replace("</", "<\\/")
    sections = [
        ("verdict", "Verdict", f'<div class="verdict {"passed" if passed else "missed"}">{esc(line)}</div>'
                               f'<p class="meta">{len(data["trials"])} trials ('
                               f'{esc(", ".join(f"{n} {k}" for k, n in counts.items()))}) of a budget of '
                               f'{data["n_trials"]}; sampler {esc(data["sampler"])}; model {esc(data["model"])} '
                               f'on {esc(data["data"])}</p>'),
        ("history", "Optimization history", history_svg(data)),
        ("epochs", f"Per-epoch {data['metric']}", epochs_svg(data)),
        ("lineage", "Mutation lineage",
         '<p class="note">Each trial under the trial it came from, one step in, with the operators that made '
         'it; dashed: proposed by the sampler without a parent, in the order they ran. Green: the winner\'s '
         f'path.</p>{winner_path_html(data)}<div class="scroll tree">{lineage_svg(data)}</div>'),
        ("parallel", "Parallel coordinates", parallel_svg(data)),
        ("table", "Trials", _RUN_BOX + table_html(data)),
    ]
    body = "".join(f'<section id="{key}"><h2>{esc(title)}</h2>{content}</section>' for key, title, content in sections)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; "
            f"img-src data:; script-src '{_script_hash(_FRAMED_JS)}'\">"
            f"<title>{esc(data['study'])}: mlops-tune study report</title><style>{_CSS}</style></head><body>"
            f"<h1>Study {esc(data['study'])}</h1>{body}"
            f'<script type="application/json" id="report-data">{payload}</script>'
            f'<script>{_FRAMED_JS}</script></body></html>\n')
