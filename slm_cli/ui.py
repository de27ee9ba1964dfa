"""What users see: rich progress bars with loss, lr, tokens/s and ETA; summary tables."""

from __future__ import annotations

import sys
from typing import Any, Iterable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

# Off a terminal (CI logs, pipes) rich would wrap tables at 80 columns; give them room instead.
console = Console(width=None if sys.stdout.isatty() else 160)


def training_progress(enabled: bool = True) -> Progress:
    """A progress bar whose task fields `loss`, `lr` and `tps` show beside the bar."""
    return Progress(
        TextColumn("[bold blue]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss [bold]{task.fields[loss]}"),
        TextColumn("lr {task.fields[lr]}"),
        TextColumn("{task.fields[tps]} tok/s"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=False,
    )


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4g}"
        return f"{value:.3e}"
    if isinstance(value, int) and abs(value) >= 10_000:
        return f"{value:,}"
    return str(value)


def kv_table(title: str, rows: Iterable[tuple[str, Any]]) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("", style="bold")
    table.add_column("value", justify="right")
    for key, value in rows:
        table.add_row(key, fmt(value))
    return table


def records_table(title: str, records: list[dict], columns: list[str]) -> Table:
    table = Table(title=title, title_justify="left")
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

    text = yaml.safe_dump(resolved, sort_keys=False, default_flow_style=None).rstrip()
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
