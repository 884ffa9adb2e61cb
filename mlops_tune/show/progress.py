"""What a user sees while a study runs.

On a terminal: one live status line under the per-trial lines (rich), with the trial k/N,
the running trial's epoch and validation accuracy so far, elapsed time, an ETA of the
budget and the best value against the threshold. Without a terminal (Jenkins, a pipe):
the plain per-trial lines and a line per start-up step, so the log is never silent for
long. ``MLOPS_TUNE_LIVE=0`` turns the live line off on a terminal too.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any, TextIO

LIVE_ENV = "MLOPS_TUNE_LIVE"

#: one writer for the terminal: lines from other processes (helper workers) are printed whole,
#: through the live display while it is drawn (above its line, wrapped like every other line)
_WRITE = threading.Lock()
_active: list[Any] = []  # the live display being drawn, if any


def emit(text: str, err: bool = False) -> None:
    """Print one whole line another process wrote (its stdout, or its stderr with ``err``)."""
    with _WRITE:
        if _active:
            from rich.text import Text

            _active[0].console.print(Text(text))
            return
        stream = sys.stderr if err else sys.stdout
        stream.write(text + "\n")
        stream.flush()


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def wants_live(stream: TextIO) -> bool:
    """A live line only on a real terminal (not TERM=dumb), unless ``MLOPS_TUNE_LIVE=0``."""
    setting = os.environ.get(LIVE_ENV, "").lower()
    if setting in ("0", "false", "no"):
        return False
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    return setting in ("1", "true", "yes") or (tty and os.environ.get("TERM", "") != "dumb")


class Progress:
    """The study's progress display; every method is safe to call from any thread."""

    def __init__(self, n_trials: int, threshold: float, metric: str, epochs: int | None, done: int = 0,
                 timeout: float | None = None, stream: TextIO | None = None, live: bool | None = None,
                 best: float | None = None) -> None:
        self.stream = stream or sys.stdout
        self.n_trials, self.threshold, self.metric, self.epochs = n_trials, threshold, metric, epochs
        self.timeout = timeout
        self.live = wants_live(self.stream) if live is None else live
        self.started = time.perf_counter()
        self.running: dict[int, dict[str, Any]] = {}
        self.durations: list[float] = []
        self.done = done  # trials judged before this process started (a resume, other workers)
        self.best = best  # the study's best so far (a resumed study's too)
        self._lock = threading.Lock()
        self._live: Any = None
        self._announced_first = False

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Progress:
        if self.live:
            from rich.console import Console
            from rich.live import Live

            console = Console(file=self.stream, force_terminal=True)
            self._live = Live(self._render(), console=console, refresh_per_second=4, transient=True,
                              redirect_stdout=True, redirect_stderr=True, get_renderable=self._render)
            self._live.start()
            with _WRITE:
                _active.append(self._live)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            with _WRITE:
                _active.clear()
            self._live.stop()
            self._live = None

    def refresh(self) -> None:
        """Redraw the live line now (it also redraws itself 4 times a second and with every line printed)."""
        if self._live is not None:
            self._live.refresh()

    # ------------------------------------------------------------------ events
    def trial_started(self, number: int) -> None:
        with self._lock:
            self.running[number] = {"epoch": None, "value": None, "started": time.perf_counter()}
            first = not self._announced_first
            self._announced_first = True
        if first and not self.live:  # the first trial imports and builds the most: say it started
            print(f"starting trial {number} ...", file=self.stream, flush=True)

    def epoch(self, number: int, epoch: int, value: float) -> None:
        with self._lock:
            if number in self.running:
                self.running[number].update(epoch=epoch, value=value)

    def trial_finished(self, number: int, value: float | None, judged: bool) -> None:
        with self._lock:
            info = self.running.pop(number, None)
            if judged:
                self.done += 1
                if info is not None:
                    self.durations.append(time.perf_counter() - info["started"])
            if value is not None and (self.best is None or value > self.best):
                self.best = value

    def sync(self, judged: int, best: float | None) -> None:
        """The study's own count of judged trials and its best, read from its storage (what other
        workers finished too)."""
        with self._lock:
            self.done = max(self.done, judged)
            if best is not None and (self.best is None or best > self.best):
                self.best = best

    # ------------------------------------------------------------------ the live line
    def status(self) -> str:
        """The live line's text (also what a test can read)."""
        with self._lock:
            elapsed = time.perf_counter() - self.started
            parts = [f"trial {min(self.done + max(1, len(self.running)), self.n_trials)}/{self.n_trials}"]
            for number, info in sorted(self.running.items()):
                text = f"#{number}"
                if info["epoch"] is not None:
                    text += f" epoch {info['epoch'] + 1}" + (f"/{self.epochs}" if self.epochs else "")
                    text += f" {self.metric} {info['value']:.4f}"
                else:
                    text += f" running {_clock(time.perf_counter() - info['started'])}"
                parts.append(text)
            best = f"{self.best:.4f}" if self.best is not None else "-"
            parts.append(f"best {best} (gate {self.threshold:.4f})")
            parts.append(f"elapsed {_clock(elapsed)}")
            remaining = self.n_trials - self.done
            if self.durations and remaining > 0:
                eta = sum(self.durations) / len(self.durations) * remaining
                if self.timeout is not None:
                    eta = min(eta, max(0.0, self.timeout - elapsed))
                parts.append(f"ETA {_clock(eta)}")
            return " | ".join(parts)

    def _render(self) -> Any:
        from rich.text import Text

        return Text(self.status(), style="bold")
