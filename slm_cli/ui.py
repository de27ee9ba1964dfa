"""What users see, and what each run's log file keeps.

On a terminal: rich progress bars with ETA, tables and panels. Off a terminal (CI, `| tee`, a file)
a live bar would print once, at the end, so progress becomes a plain line every `SLM_LOG_EVERY`
seconds instead. Everything printed through `console` also goes, as plain text without colours, to
the `slm` logger, which Hydra's job_logging (configs/hydra/slm.yaml) writes to the run folder's
`<stage>.log`; there the progress lines come every `SLM_LOG_EVERY` seconds whether or not a
terminal shows the bar.
"""

from __future__ import annotations

import io
import logging
import math
import os
import sys
import time
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

from rich.console import Console
from rich.control import Control
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

log = logging.getLogger("slm")

# Seconds between two progress lines off a terminal and in the log file (0 = a line per update).
LOG_EVERY_ENV = "SLM_LOG_EVERY"
DEFAULT_LOG_EVERY_S = 30.0
# Off a terminal rich would wrap everything at 80 columns; tables and config lines get room instead.
WIDTH_OFF_TERMINAL = 200


def log_every_s() -> float:
    """`SLM_LOG_EVERY` (seconds) or the default; a bad value is an error naming the variable."""
    raw = os.environ.get(LOG_EVERY_ENV, "").strip()
    if not raw:
        return DEFAULT_LOG_EVERY_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value >= 0):
        from slm_cli.errors import SlmError

        raise SlmError(f"{LOG_EVERY_ENV}={raw!r}: give the seconds between progress lines as a number >= 0, e.g. {LOG_EVERY_ENV}=30")
    return value


class LoggedConsole(Console):
    """A rich Console whose output is also sent, as plain text, to the `slm` logger (the run's log file)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._plain = Console(file=io.StringIO(), width=WIDTH_OFF_TERMINAL, color_system=None, force_terminal=False,
                              force_jupyter=False, highlight=False)

    def print(self, *objects: Any, **kwargs: Any) -> None:
        super().print(*objects, **kwargs)
        # live displays redraw through print(Control()); only real output belongs in the log
        if not log.isEnabledFor(logging.INFO) or all(isinstance(o, Control) for o in objects):
            return
        with self._plain.capture() as captured:
            self._plain.print(*objects, **kwargs)
        text = captured.get().rstrip()
        if text:
            log.info(text)


console = LoggedConsole(width=None if sys.stdout.isatty() else WIDTH_OFF_TERMINAL)


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-:--:--"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class _Lines:
    """The plain progress lines of one task: when the next is due, and what it says."""

    def __init__(self, description: str, total: float | None, completed: float, unit: str, every_s: float):
        self.description, self.total, self.completed, self.unit = description, total, completed, unit
        self.every_s, self.fields = every_s, {}
        self.first, self.started = completed, time.monotonic()
        self.last_line: float | None = None
        self.printed_at: float | None = None  # `completed` when the last line was printed

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        done = self.completed - self.first  # since this run started: a resumed run's earlier steps took no time here
        parts = [f"{self.description}: {fmt(self.completed)}"]
        if self.total:
            parts[0] += f"/{fmt(self.total)} {self.unit} ({100 * self.completed / self.total:.0f}%)"
        else:
            parts[0] += f" {self.unit}"
        parts += [f"{k} {v}" for k, v in self.fields.items()]
        parts.append(f"elapsed {_clock(elapsed)}")
        if self.total:
            left = self.total - self.completed
            if left <= 0:
                eta = 0.0
            else:  # the rate so far; unknown (nan) before the first unit of this run is done
                eta = elapsed / done * left if done > 0 else float("nan")
            parts.append(f"eta {_clock(eta)}")
        return " | ".join(parts)

    def due(self, final: bool) -> bool:
        if self.printed_at == self.completed:  # no news since the last line
            return False
        return final or self.last_line is None or time.monotonic() - self.last_line >= self.every_s


class TaskProgress:
    """Progress of long work, the same API on and off a terminal.

    On a terminal: a rich bar with the task's fields, elapsed time and ETA. Off a terminal: a plain
    line (done/total, fields, elapsed, eta) at the first update, then at most one every
    `SLM_LOG_EVERY` seconds, and a last one at the end. The log file gets those lines in both cases.
    Fields are labels and already formatted values: `update(task, advance=1, loss="2.31")`.
    """

    def __init__(self, enabled: bool = True, every_s: float | None = None):
        self.enabled = enabled
        self.every_s = log_every_s() if every_s is None else every_s
        self.terminal = console.is_terminal
        self._tasks: dict[int, _Lines] = {}
        self._bar = Progress(
            TextColumn("[bold blue]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console,
            disable=not (enabled and self.terminal), transient=False,
        )

    def __enter__(self) -> "TaskProgress":
        self._bar.__enter__()
        return self

    def __exit__(self, exc_type, *rest) -> None:
        self._bar.__exit__(exc_type, *rest)
        if exc_type is None:
            for lines in self._tasks.values():
                self._emit(lines, final=True)

    def add_task(self, description: str, total: float | None = None, completed: float = 0, unit: str = "steps",
                 **fields: Any) -> int:
        task = self._bar.add_task(description, total=total, completed=completed, info="")
        self._tasks[task] = _Lines(description, total, completed, unit, self.every_s)
        if fields:
            self.update(task, **fields)
        return task

    def update(self, task: int, *, advance: float = 0, completed: float | None = None, total: float | None = None,
               **fields: Any) -> None:
        lines = self._tasks[task]
        lines.completed = (lines.completed if completed is None else completed) + advance
        if total is not None:
            lines.total = total
        lines.fields.update({k: str(v) for k, v in fields.items()})
        info = "  ".join(f"{k} {v}" for k, v in lines.fields.items())
        self._bar.update(task, completed=lines.completed, total=lines.total, info=info)
        if advance or completed is not None:
            self._emit(lines, final=False)

    def _emit(self, lines: _Lines, final: bool) -> None:
        if not self.enabled or not lines.due(final):
            return
        text = lines.line()
        lines.last_line, lines.printed_at = time.monotonic(), lines.completed
        if self.terminal:  # the bar shows it; the log file still gets the line
            log.info(text)
        else:
            console.print(text, highlight=False, markup=False, soft_wrap=True)


class _OneTask:
    """A `TaskProgress` with a single task: `p.update(completed=3, total=10)`, `p.advance(1, loss="0.3")`."""

    def __init__(self, progress: TaskProgress, task: int):
        self._progress, self._task = progress, task

    def update(self, completed: float | None = None, total: float | None = None, **fields: Any) -> None:
        self._progress.update(self._task, completed=completed, total=total, **fields)

    def advance(self, n: float = 1, **fields: Any) -> None:
        self._progress.update(self._task, advance=n, **fields)

    def callback(self, done: int, total: int) -> None:
        """For library functions that report `progress(done, total)` (perplexity, generation, scoring)."""
        self.update(completed=done, total=total)


@contextmanager
def progress(description: str, total: float | None = None, unit: str = "steps", enabled: bool = True) -> Iterator[_OneTask]:
    """`with ui.progress("pruning", total=30, unit="layers") as p: ... p.advance()`: one task, bar or lines."""
    with TaskProgress(enabled) as tasks:
        yield _OneTask(tasks, tasks.add_task(description, total=total, unit=unit))


def training_progress(enabled: bool = True) -> TaskProgress:
    """Progress of the training loop; its fields `loss`, `lr` and `tok/s` show beside the bar and in the lines."""
    return TaskProgress(enabled)


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4g}"
        return f"{value:.3e}"
    if isinstance(value, int) and abs(value) >= 10_000:
        return f"{value:,}"
    return str(value)


def titled_table(title: str) -> Table:
    """A table at least as wide as its title: rich wraps a title to the table's width, which cut
    titles naming a folder (`teacher artifact: /long/path`) over several lines."""
    return Table(title=title, title_justify="left", min_width=len(title))


def kv_table(title: str, rows: Iterable[tuple[str, Any]]) -> Table:
    table = titled_table(title)
    table.add_column("", style="bold")
    table.add_column("value", justify="right")
    for key, value in rows:
        table.add_row(key, fmt(value))
    return table


def records_table(title: str, records: list[dict], columns: list[str]) -> Table:
    table = titled_table(title)
    for c in columns:
        table.add_column(c, justify="left" if c == columns[0] else "right")
    for r in records:
        table.add_row(*(fmt(r.get(c, "")) for c in columns))
    return table


def resolved_config_panel(resolved: dict):
    """The resolved config as YAML, printed at the start of every stage (and saved in slm.json)."""
    import yaml
    from rich.panel import Panel
    from rich.syntax import Syntax

    # PyYAML folds lines at 80 columns unless told otherwise; rich wraps what a narrow terminal cannot show
    text = yaml.safe_dump(resolved, sort_keys=False, default_flow_style=None, width=160).rstrip()
    return Panel(Syntax(text, "yaml", theme="ansi_dark", background_color="default"), title="resolved config", expand=False)


def setup_table(stage: str, model, tokenizer, data_stats, n_val: int, ds_config: dict) -> Table:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    zero = ds_config.get("zero_optimization", {})
    rows = [
        ("model", type(model).__name__),
        ("parameters", total),
        ("trainable", trainable),
        ("vocabulary", len(tokenizer)),
        ("train examples", data_stats.total - data_stats.dropped),
        ("truncated", data_stats.truncated),
        ("dropped (no target left)", data_stats.dropped),
        ("validation examples", n_val),
        ("ZeRO stage", zero.get("stage", 0)),
        ("offload optimizer", zero.get("offload_optimizer", {}).get("device", "none")),
        ("offload params", zero.get("offload_param", {}).get("device", "none")),
        ("bf16", ds_config.get("bf16", {}).get("enabled", False)),
    ]
    return kv_table(f"{stage}: setup", rows)


def metric_rows(metrics: dict) -> list[tuple[str, Any]]:
    return [(k, v) for k, v in metrics.items() if not isinstance(v, (dict, list))]
