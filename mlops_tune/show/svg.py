"""The study report's plots as inline SVG (no script, no network): the optimization history,
per-epoch curves, the mutation lineage tree and parallel coordinates; and the text helpers
the page shares with them."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

WIDTH, HEIGHT, PAD = 760, 300, 48
_COLORS = {"COMPLETE": "#1f77b4", "PRUNED": "#ff7f0e", "FAIL": "#d62728", "RUNNING": "#7f7f7f", "WAITING": "#7f7f7f"}
_WIN = "#2ca02c"


def score(value: Any) -> str:
    """An accuracy as the terminal prints it: four decimals (``0.9833``, ``1.0000``)."""
    return f"{value:.4f}" if isinstance(value, (int, float)) else str(value)


def readable(value: Any) -> str:
    """``[64, 32]`` for lists, 4 significant digits for floats."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(readable(v) for v in value) + "]"
    return str(value)


# ----------------------------------------------------------------------------- drawing
def esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _scale(value: float, low: float, high: float, out_low: float, out_high: float) -> float:
    if high == low:
        return (out_low + out_high) / 2
    return out_low + (value - low) * (out_high - out_low) / (high - low)


def _axes(x_label: str, y_label: str, x_ticks: Sequence[tuple[float, str]],
          y_ticks: Sequence[tuple[float, str]]) -> str:
    parts = [f'<line x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - 10}" y2="{HEIGHT - PAD}" class="axis"/>',
             f'<line x1="{PAD}" y1="10" x2="{PAD}" y2="{HEIGHT - PAD}" class="axis"/>',
             f'<text x="{(WIDTH + PAD) / 2}" y="{HEIGHT - 8}" class="label">{esc(x_label)}</text>',
             f'<text x="12" y="{HEIGHT / 2}" class="label" transform="rotate(-90 12 {HEIGHT / 2})">{esc(y_label)}</text>']
    parts += [f'<text x="{x:.1f}" y="{HEIGHT - PAD + 16}" class="tick">{esc(t)}</text>' for x, t in x_ticks]
    parts += [f'<text x="{PAD - 6}" y="{y + 4:.1f}" class="tick" text-anchor="end">{esc(t)}</text>'
              for y, t in y_ticks]
    return "".join(parts)


def _y_range(values: Sequence[float], threshold: float) -> tuple[float, float]:
    low = min([*values, threshold], default=0.0)
    return max(0.0, math.floor(low * 20) / 20), 1.0


def _y_ticks(low: float, high: float) -> list[tuple[float, str]]:
    steps = 5
    return [(_scale(low + i * (high - low) / steps, low, high, HEIGHT - PAD, 10), f"{low + i * (high - low) / steps:.2f}")
            for i in range(steps + 1)]


def _int_ticks(n: int, x_of: Any) -> list[tuple[float, str]]:
    step = max(1, math.ceil(n / 12))
    return [(x_of(i), str(i)) for i in range(0, n, step)]


def history_svg(data: Mapping[str, Any]) -> str:
    """Each trial's value by trial number, the best so far, the threshold line."""
    trials, threshold = data["trials"], data["threshold"]
    values = [t["value"] for t in trials if t["value"] is not None]
    low, high = _y_range(values, threshold)
    n = max((t["number"] for t in trials), default=0) + 1

    def x_of(i: float) -> float:
        return _scale(i, -0.5, n - 0.5, PAD, WIDTH - 20)

    def y_of(v: float) -> float:
        return _scale(v, low, high, HEIGHT - PAD, 10)

    parts = [_axes("trial", data["metric"], _int_ticks(n, x_of), _y_ticks(low, high))]
    y_t = y_of(threshold)
    parts.append(f'<line x1="{PAD}" y1="{y_t:.1f}" x2="{WIDTH - 10}" y2="{y_t:.1f}" class="threshold"/>'
                 f'<text x="{WIDTH - 12}" y="{y_t + (14 if y_t < 24 else -5):.1f}" class="tick" text-anchor="end">'
                 f'threshold {score(threshold)}</text>')
    best, steps = -math.inf, []
    for t in sorted(trials, key=lambda t: t["number"]):
        if t["state"] == "COMPLETE" and t["value"] is not None and t["value"] > best:
            best = t["value"]
        if best > -math.inf:
            steps.append(f"{x_of(t['number']):.1f},{y_of(best):.1f}")
    if steps:
        parts.append(f'<polyline points="{" ".join(steps)}" class="best"/>')
    for t in trials:
        x = x_of(t["number"])
        color = _COLORS.get(t["state"], "#7f7f7f")
        title = f"<title>trial {t['number']} {t['state']} {score(t['value'])}</title>"
        if t["value"] is None:  # failed: a cross on the axis
            y = HEIGHT - PAD
            parts.append(f'<path d="M{x - 4:.1f},{y - 4} l8,8 m0,-8 l-8,8" stroke="{color}" class="mark">{title}</path>')
        elif t["state"] == "PRUNED":
            y = y_of(t["value"])
            parts.append(f'<rect x="{x - 4:.1f}" y="{y - 4:.1f}" width="8" height="8" fill="none" stroke="{color}" '
                         f'class="mark">{title}</rect>')
        else:
            parts.append(f'<circle cx="{x:.1f}" cy="{y_of(t["value"]):.1f}" r="4.5" fill="{color}" class="mark">'
                         f'{title}</circle>')
    legend = ('<p class="legend"><span style="color:#1f77b4">&#9679; complete</span> '
              '<span style="color:#ff7f0e">&#9633; pruned (its last reported epoch)</span> '
              '<span style="color:#d62728">&#215; failed</span> <span style="color:#2ca02c">&#8212; best so far</span> '
              '<span style="color:#d62728">- - threshold</span></p>')
    return _svg("history", "".join(parts)) + legend


def epochs_svg(data: Mapping[str, Any]) -> str:
    """Every trial's per-epoch validation accuracy, the winner's drawn over the rest."""
    trials = [t for t in data["trials"] if t["epochs"]]
    if not trials:
        return '<p class="note">No per-epoch metrics: this model family trains in one step.</p>'
    winner = data["verdict"].get("best_trial")
    values = [v for t in trials for v in t["epochs"]]
    low, high = _y_range(values, data["threshold"])
    n = max(len(t["epochs"]) for t in trials)

    def x_of(i: float) -> float:
        return _scale(i, 0, max(1, n - 1), PAD, WIDTH - 20)

    def y_of(v: float) -> float:
        return _scale(v, low, high, HEIGHT - PAD, 10)

    parts = [_axes("epoch", data["metric"], _int_ticks(n, x_of), _y_ticks(low, high))]
    y_t = y_of(data["threshold"])
    parts.append(f'<line x1="{PAD}" y1="{y_t:.1f}" x2="{WIDTH - 10}" y2="{y_t:.1f}" class="threshold"/>')
    for t in sorted(trials, key=lambda t: t["number"] == winner):
        points = " ".join(f"{x_of(i):.1f},{y_of(v):.1f}" for i, v in enumerate(t["epochs"]) if math.isfinite(v))
        cls = "winner" if t["number"] == winner else "curve"
        color = _WIN if cls == "winner" else _COLORS.get(t["state"], "#7f7f7f")
        parts.append(f'<polyline points="{points}" class="{cls}" stroke="{color}">'
                     f'<title>trial {t["number"]} ({t["state"].lower()})</title></polyline>')
    return _svg("epochs", "".join(parts))


def lineage_svg(data: Mapping[str, Any]) -> str:
    """The lineage tree as an outline that grows downwards: one row per trial, each under the
    trial it came from and indented one step deeper, its operators beside it. Labels keep their
    size however many trials (200 trials: 200 rows in a scroll box, not a tree shrunk to fit)."""
    tree, by_number = data["lineage"], {t["number"]: t for t in data["trials"]}
    if tree["root"] is None:
        return '<p class="note">No base-model trial in this study.</p>'
    children: dict[int, list[dict[str, Any]]] = {}
    for edge in tree["edges"]:
        children.setdefault(edge["from"], []).append(edge)
    rows: list[tuple[int, int, dict[str, Any] | None]] = []  # (trial, depth, the edge it came by)
    stack: list[tuple[int, int, dict[str, Any] | None]] = [(tree["root"], 0, None)]
    seen: set[int] = set()
    while stack:
        node, depth, edge = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        rows.append((node, depth, edge))
        stack += [(e["to"], depth + 1, e) for e in sorted(children.get(node, []), key=lambda e: -e["to"])]
    indent, row_h, box_w, box_h = 18, 24, 116, 18
    row_of = {node: i for i, (node, _, _) in enumerate(rows)}
    on_path = set(tree["winner_path"])

    def left(depth: int) -> float:
        return 8 + depth * indent

    parts, labels = [], []
    for i, (node, depth, edge) in enumerate(rows):
        y = 6 + i * row_h
        trial = by_number.get(node, {})
        if edge is not None and edge["from"] in row_of:
            x0, y0 = left(depth - 1) + 8, 6 + row_of[edge["from"]] * row_h + box_h
            win = edge["from"] in on_path and node in on_path
            parts.append(f'<path d="M{x0:.0f},{y0:.0f} V{y + box_h / 2:.0f} H{left(depth):.0f}" '
                         f'class="{"edge win" if win else "edge"}{"" if edge["mutated"] else " sampled"}"/>')
            ops = ", ".join(op.removeprefix("model.") for op in edge["label"].split(","))
            labels.append(f'<text x="{left(depth) + box_w + 8:.0f}" y="{y + 13:.0f}" class="edge-label" '
                          f'data-edge="{edge["from"]}-{node}">{esc(ops)}<title>{esc(edge["label"])}</title></text>')
        value = score(trial.get("value")) if trial.get("value") is not None else trial.get("state", "").lower()
        tag = (" champion" if trial.get("start") else " base") if node == tree["root"] else ""
        parts.append(f'<g class="{"node win" if node in on_path else "node"}" data-trial="{node}">'
                     f'<rect x="{left(depth):.0f}" y="{y:.0f}" width="{box_w}" height="{box_h}" rx="4"/>'
                     f'<text x="{left(depth) + 6:.0f}" y="{y + 13:.0f}">#{node}{esc(tag)}  {esc(value)}</text>'
                     f'<title>{esc(params_text(trial.get("params", {})))}</title></g>')
    longest = max((len(e["label"]) for e in tree["edges"]), default=0)
    width = int(max(left(d) for _, d, _ in rows) + box_w + 16 + 6.2 * longest)
    return _svg("lineage", "".join(parts) + "".join(labels), max(width, 300), 12 + len(rows) * row_h)


def winner_path_html(data: Mapping[str, Any]) -> str:
    """The winner's line of descent in one line: root, each step's operators, the winner."""
    tree, by_number = data["lineage"], {t["number"]: t for t in data["trials"]}
    path = tree["winner_path"]
    if len(path) < 2:
        return ""
    via = {e["to"]: e["label"] for e in tree["edges"]}
    steps = [f'<b>#{path[0]}</b>']
    for node in path[1:]:
        value = by_number.get(node, {}).get("value")
        ops = ", ".join(op.removeprefix("model.") for op in via.get(node, "").split(","))
        steps.append(f'&#8594; {esc(ops)} &#8594; <b>#{node}</b>{f" ({score(value)})" if value is not None else ""}')
    return f'<p class="path" id="winner-path">Winner\'s path: {" ".join(steps)}</p>'


def parallel_svg(data: Mapping[str, Any]) -> str:
    """One axis per searched key (lists: their layers and their total units), the metric last;
    the lines under the axes and their labels, the better a trial the darker its line."""
    trials = [t for t in data["trials"] if t["value"] is not None and t["params"]]
    if not trials:
        return '<p class="note">No trial with a value yet.</p>'
    columns: dict[str, list[float | str]] = {}
    for key in trials[0]["params"]:
        values = [t["params"].get(key) for t in trials]
        if all(isinstance(v, (list, tuple)) for v in values):
            columns[f"{key} (layers)"] = [len(v) for v in values]  # type: ignore[arg-type]
            columns[f"{key} (units)"] = [sum(v) for v in values]  # type: ignore[arg-type]
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            columns[key] = [float(v) for v in values]  # type: ignore[arg-type]
        else:
            columns[key] = [str(v) for v in values]
    columns[data["metric"]] = [t["value"] for t in trials]
    names = list(columns)
    side, top, bottom = 80, 24, HEIGHT - PAD
    gap = (WIDTH - 2 * side) / max(1, len(names) - 1)
    axes, scaled, logs = [], {}, []
    for i, name in enumerate(names):
        x = side + i * gap
        values = columns[name]
        if all(isinstance(v, float | int) for v in values):
            nums = [float(v) for v in values]  # type: ignore[arg-type]
            low, high = min(nums), max(nums)
            log = low > 0 and high / low >= 100
            f = (lambda v: math.log10(v)) if log else (lambda v: v)
            scaled[name] = [_scale(f(v), f(low), f(high), bottom, top) for v in nums]
            ticks = [(bottom, score(low) if name == data["metric"] else readable(low)),
                     (top, score(high) if name == data["metric"] else readable(high))]
            if log:
                logs.append(name)
        else:
            cats = sorted({str(v) for v in values})
            scaled[name] = [_scale(cats.index(str(v)), 0, max(1, len(cats) - 1), bottom, top) for v in values]
            ticks = [(_scale(j, 0, max(1, len(cats) - 1), bottom, top), c) for j, c in enumerate(cats)]
        label = f"{name} (log)" if name in logs else name
        axes.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom}" class="axis"/>'
                    f'<text x="{x:.1f}" y="{bottom + 16 + 14 * (i % 2)}" class="tick halo" text-anchor="middle">'
                    f'{esc(label)}</text>')
        axes += [f'<text x="{x + 4:.1f}" y="{y + 4:.1f}" class="tick halo">{esc(t)}</text>' for y, t in ticks]
    metric = [t["value"] for t in trials]
    low, high = min(metric), max(metric)
    lines = []
    for row, trial in sorted(enumerate(trials), key=lambda item: item[1]["value"]):  # the best drawn last
        points = " ".join(f"{side + i * gap:.1f},{scaled[name][row]:.1f}" for i, name in enumerate(names))
        share = _scale(trial["value"], low, high, 0.35, 1.0)
        winner = trial["number"] == data["verdict"].get("best_trial")
        lines.append(f'<polyline points="{points}" class="{"winner" if winner else "curve"}" '
                     f'stroke="{_WIN if winner else "#1f77b4"}" stroke-opacity="{1 if winner else share:.2f}">'
                     f'<title>trial {trial["number"]}: {score(trial["value"])}</title></polyline>')
    units = ('<p class="legend">One line per trial that has a value, darker the better (green: the winner). '
             '"(layers)": how many hidden layers; "(units)": their units added up; "(log)": a log scale. '
             'Each axis runs from the lowest value the trials took (bottom) to the highest (top).</p>')
    return _svg("parallel", "".join(lines) + "".join(axes)) + units


def _svg(name: str, body: str, width: int = WIDTH, height: int = HEIGHT) -> str:
    return (f'<svg id="svg-{name}" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img">{body}</svg>')


def params_text(params: Mapping[str, Any]) -> str:
    return " ".join(f"{key}={readable(value)}" for key, value in params.items())
