"""The compression report: every artifact of a lineage side by side, relative to the teacher.

`write_report(artifact_dirs, out_dir, title)` follows each folder's slm.json `parents` back to
the roots, keeps each checkpoint once (by content hash), and writes into `out_dir`:
  * report.json: one row per artifact with the numbers copied unchanged from its slm.json
    (params, val_loss, metrics.eval.<source>.*, the quantize perplexities, metrics.bench.*),
    the weights' bytes on disk, and each number divided by the reference artifact's;
  * report.md: the same table in Markdown, with the plot;
  * report.png: quality vs size, and quality vs latency when bench numbers exist.
The reference is the artifact whose stage is `teacher`, else the first root of the lineage.

Ratios read "times the teacher": size 0.25 means a quarter of the teacher's bytes; latency
0.5 twice as fast; for loss and perplexity lower is better, for AUC and exact match higher.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from slm_cli.artifacts import METADATA_FILE, content_hash, output_stamp, read_metadata
from slm_cli.errors import SlmError
from slm_cli.evaluate.speed import FP8_NOTE, safetensors_params, weights_bytes

REPORT_JSON, REPORT_MD, REPORT_PNG = "report.json", "report.md", "report.png"
EVAL_KEYS = ("auc", "exact_match", "perplexity", "accuracy")
# Which quality column the plot uses when several exist: the one most rows have, then this order.
QUALITY_PREFERENCE = ("auc", "exact_match", "perplexity", "val_ce", "perplexity_fp8", "val_loss")
BENCH_KEYS = {"latency_ms": "latency ms", "decode_tokens_per_s": "decode tok/s", "peak_memory_mb": "peak mem MB"}


# --- the lineage -------------------------------------------------------------------------------


def expand_folders(folders: list[str | Path]) -> list[Path]:
    """Artifact folders from what the user named: an artifact, or a folder of artifacts (a pipeline's output_root)."""
    out: list[Path] = []
    for f in folders:
        f = Path(f)
        if (f / METADATA_FILE).is_file() or (f / "config.json").is_file():
            out.append(f)
            continue
        inside = sorted(p.parent for p in f.glob(f"*/{METADATA_FILE}")) if f.is_dir() else []
        if not inside:
            raise SlmError(f"{f}: neither an artifact (no {METADATA_FILE} or config.json) nor a folder of artifacts.")
        out += inside
    return out


def gather_lineage(folders: list[str | Path]) -> tuple[list[dict], list[dict]]:
    """The given artifacts and all their ancestors, each once, parents before children.

    Returns (nodes, missing): a node is {path, meta (slm.json or None), hash, parent_hashes};
    `missing` lists parent entries whose folder is gone (reported, not fatal).
    """
    nodes: dict[str, dict] = {}
    missing: list[dict] = []
    order: list[str] = []

    def visit(path: Path, known_hash: str | None) -> str:
        meta = read_metadata(path, missing_ok=True)
        h = (meta or {}).get("content_hash") or known_hash or content_hash(path)
        if h in nodes:
            return h
        node = {"path": path.resolve(), "meta": meta, "hash": h, "parent_hashes": []}
        nodes[h] = node
        for entry in (meta or {}).get("parents", []):
            if "path" not in entry:
                continue  # a hub id: nothing on disk to follow
            p = Path(entry["path"])
            if p.is_dir():
                node["parent_hashes"].append(visit(p, entry.get("hash")))
            else:
                missing.append({"child": str(path), **entry})
        order.append(h)  # after its parents: a topological order
        return h

    for f in expand_folders(folders):
        visit(Path(f), None)
    return [nodes[h] for h in order], missing


def short_names(paths: list[Path]) -> list[str]:
    """The shortest path suffixes that tell the folders apart (`outputs/x/<time>/artifact` -> `<time>/artifact`)."""
    generic = {"artifact", "results"}
    for k in range(1, max((len(p.parts) for p in paths), default=1) + 1):
        names = ["/".join(p.parts[-(k + 1 if p.name in generic else k):]) for p in paths]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


# --- the numbers -------------------------------------------------------------------------------


def artifact_numbers(node: dict) -> dict[str, Any]:
    """Every number the report shows for one artifact, each copied as is from slm.json (or measured on disk).

    Keys: params, weights_bytes, val_loss, eval.<source>.<metric>, quantize.perplexity_fp8 /
    perplexity_source / perplexity_increase_pct, bench.<latency_ms|decode_tokens_per_s|peak_memory_mb>,
    bench.reuse_speedup, bench.note.
    """
    m = (node["meta"] or {}).get("metrics", {})
    bench = m.get("bench") or {}
    out: dict[str, Any] = {}
    if "params" in m:
        out["params"] = m["params"]
    elif "params" in bench:
        out["params"] = bench["params"]
    else:
        out["params"] = safetensors_params(node["path"])
    out["weights_bytes"] = weights_bytes(node["path"])
    if m.get("val_loss") is not None:
        out["val_loss"] = m["val_loss"]
    if m.get("val_ce") is not None:
        out["val_ce"] = m["val_ce"]
    for source, values in sorted((m.get("eval") or {}).items()):
        for key in EVAL_KEYS:
            if isinstance(values, dict) and values.get(key) is not None:
                out[f"eval.{source}.{key}"] = values[key]
    for key in ("perplexity_fp8", "perplexity_source", "perplexity_increase_pct"):
        if m.get(key) is not None:
            out[f"quantize.{key}"] = m[key]
    for key in BENCH_KEYS:
        if bench.get(key) is not None:
            out[f"bench.{key}"] = bench[key]
    if isinstance(bench.get("scoring"), dict) and "speedup" in bench["scoring"]:
        out["bench.reuse_speedup"] = bench["scoring"]["speedup"]
    if bench.get("note"):
        out["bench.note"] = bench["note"]
    return out


def relative(numbers: dict, reference: dict) -> dict[str, float]:
    """value / reference value for each number both have (a ratio, "times the teacher")."""
    out = {}
    for key, value in numbers.items():
        ref = reference.get(key)
        if isinstance(value, (int, float)) and isinstance(ref, (int, float)) and not isinstance(value, bool) and ref:
            out[key] = value / ref
    return out


def build_rows(nodes: list[dict]) -> tuple[list[dict], int]:
    """One row per node and the index of the reference row (stage teacher, else the first root)."""
    names = short_names([n["path"] for n in nodes])
    by_hash = {n["hash"]: name for n, name in zip(nodes, names)}
    stages = [(n["meta"] or {}).get("stage") or "base" for n in nodes]
    ref = next((i for i, s in enumerate(stages) if s == "teacher"), None)
    if ref is None:
        ref = next((i for i, n in enumerate(nodes) if not n["parent_hashes"]), 0)
    numbers = [artifact_numbers(n) for n in nodes]
    rows = []
    for n, name, stage, nums in zip(nodes, names, stages, numbers):
        rows.append(
            {
                "name": name,
                "path": str(n["path"]),
                "stage": stage,
                "content_hash": n["hash"],
                "parents": [by_hash[h] for h in n["parent_hashes"]],
                "metrics": nums,
                "relative_to_reference": relative(nums, numbers[ref]),
            }
        )
    return rows, ref


def quality_key(rows: list[dict]) -> str | None:
    """The quality number to plot: the one most artifacts have, ties broken by QUALITY_PREFERENCE."""
    counts: dict[str, int] = {}
    for r in rows:
        for k in r["metrics"]:
            if k in ("val_loss", "val_ce") or k.startswith(("eval.", "quantize.perplexity_fp8")):
                counts[k] = counts.get(k, 0) + 1
    if not counts:
        return None

    def rank(k: str) -> tuple[int, int]:
        leaf = k.rsplit(".", 1)[-1]
        return (-counts[k], QUALITY_PREFERENCE.index(leaf) if leaf in QUALITY_PREFERENCE else len(QUALITY_PREFERENCE))

    return min(counts, key=rank)


# --- the table ---------------------------------------------------------------------------------


def columns(rows: list[dict]) -> list[tuple[str, str]]:
    """(metric key, column title) for every number any row has, in a fixed reading order."""
    have = {k for r in rows for k in r["metrics"]}
    cols = [("params", "params"), ("weights_bytes", "size MB")]
    cols += [(k, t) for k, t in (("val_ce", "val CE"), ("val_loss", "val objective")) if k in have]
    cols += [(k, k.removeprefix("eval.").replace(".", " ")) for k in sorted(have) if k.startswith("eval.")]
    cols += [(f"quantize.{k}", t) for k, t in (("perplexity_fp8", "FP8 ppl"), ("perplexity_increase_pct", "ppl +% vs source")) if f"quantize.{k}" in have]
    bench_cols = [(f"bench.{k}", t) for k, t in BENCH_KEYS.items()] + [("bench.reuse_speedup", "prefix reuse x")]
    if any(k.startswith("bench.") for k in have):
        cols += bench_cols
    return cols


def cell(row: dict, key: str, with_ratio: bool = True) -> str:
    from slm_cli.ui import fmt

    nums = row["metrics"]
    if key not in nums:
        if key.startswith("bench.") and nums.get("bench.note"):
            return nums["bench.note"]
        return "-"
    value = nums[key] / 2**20 if key == "weights_bytes" else nums[key]
    text = fmt(round(value, 2) if key == "weights_bytes" else value)
    ratio = row["relative_to_reference"].get(key)
    if with_ratio and ratio is not None and key not in ("quantize.perplexity_increase_pct", "bench.reuse_speedup"):
        text += f" ({ratio:.3g}x)"
    return text


def rich_table(report: dict):
    from rich.table import Table

    rows, cols = report["rows"], [tuple(c) for c in report["columns"]]
    ref = rows[report["reference"]]["name"]
    table = Table(title=f"{report['title']} (ratios: x {ref})", title_justify="left")
    table.add_column("artifact", style="bold")
    table.add_column("stage")
    for _, title in cols:
        table.add_column(title, justify="right")
    for r in rows:
        table.add_row(r["name"], r["stage"], *(cell(r, k) for k, _ in cols))
    return table


def markdown(report: dict) -> str:
    rows, cols = report["rows"], [tuple(c) for c in report["columns"]]
    ref = rows[report["reference"]]
    head = ["artifact", "stage", *(t for _, t in cols)]
    lines = [
        f"# {report['title']}",
        "",
        f"Created {report['created']}. Reference for the ratios in brackets: **{ref['name']}** ({ref['stage']}).",
        "Numbers are copied from each artifact's slm.json (size from its safetensors files); see report.json.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---", "---"] + ["---:"] * len(cols)) + "|",
    ]
    for r in rows:
        lines.append("| " + " | ".join([r["name"], r["stage"], *(cell(r, k) for k, _ in cols)]) + " |")
    lines.append("")
    lines += [f"- **{r['name']}**: `{r['path']}`" + (f" (from {', '.join(r['parents'])})" if r["parents"] else "") for r in rows]
    if any(r["metrics"].get("bench.note") == FP8_NOTE for r in rows):
        lines += ["", "FP8 checkpoints are a storage format on CPU (no FP8 matmul kernels): their latency is measured on an H100-class GPU, not here."]
    if report["missing_parents"]:
        lines += ["", "Parents recorded in slm.json but no longer on disk: " + ", ".join(m.get("path", "?") for m in report["missing_parents"])]
    if report.get("plot"):
        lines += ["", f"![quality vs size and latency]({REPORT_PNG})"]
    return "\n".join(lines) + "\n"


# --- the plot ----------------------------------------------------------------------------------


def plot(rows: list[dict], quality: str, path: Path, title: str) -> bool:
    """Quality vs size (MB), and quality vs latency (ms) when any row has it; one labelled point each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    have = [r for r in rows if quality in r["metrics"]]
    if not have:
        return False
    timed = [r for r in have if "bench.latency_ms" in r["metrics"]]
    panels = [("weights_bytes", "size on disk (MB)", have)] + ([("bench.latency_ms", "prefill latency (ms)", timed)] if timed else [])
    # One marker and colour per artifact, named in a legend: artifacts of one size (a student and
    # its distilled continuations) sit on top of each other, where text labels would overprint.
    markers = "osD^vP*Xph<>"
    style = {r["name"]: (markers[i % len(markers)], f"C{i % 10}") for i, r in enumerate(have)}
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels) + 2.5, 4.5), squeeze=False)
    for ax, (key, label, pts) in zip(axes[0], panels):
        for r in pts:
            marker, colour = style[r["name"]]
            x = r["metrics"][key] / (2**20 if key == "weights_bytes" else 1)
            ax.scatter([x], [r["metrics"][quality]], marker=marker, color=colour, s=60, alpha=0.8, label=f"{r['name']} ({r['stage']})")
        ax.set_xlabel(label)
        better = "higher" if quality.rsplit(".", 1)[-1] in ("auc", "exact_match", "accuracy") else "lower"
        ax.set_ylabel(f"{quality} ({better} is better)")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1 - 2.5 / (6 * len(panels) + 2.5), 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# --- the whole report --------------------------------------------------------------------------


def build_report(artifact_dirs: list[str | Path], title: str) -> dict:
    """The report as a dict (what report.json holds), without writing anything."""
    nodes, missing = gather_lineage(artifact_dirs)
    if not nodes:
        raise SlmError("no artifacts to report on.")
    rows, ref = build_rows(nodes)
    return {
        "title": title,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "reference": ref,
        "quality": quality_key(rows),
        "columns": [list(c) for c in columns(rows)],
        "rows": rows,
        "missing_parents": missing,
        "slm_output": output_stamp("report"),
    }


def write_report(artifact_dirs: list[Path], out_dir: Path, title: str, *, show: bool = True, overwrite: bool | str = False) -> dict:
    """Write report.json, report.md and report.png for the artifacts and their lineage into out_dir.

    Written into `<out_dir>.work/staging` and published in one rename, like every slm output;
    an existing out_dir is replaced only under `overwrite` (see artifacts.check_output). Prints the
    table to slm's console unless show=False. Returns the report dict (as in report.json) with
    `files`: the paths written.
    """
    from slm_cli import artifacts

    out_dir = Path(out_dir)
    staging = artifacts.begin(out_dir, overwrite)
    report = build_report(artifact_dirs, title)
    report["plot"] = plot(report["rows"], report["quality"], staging / REPORT_PNG, title) if report["quality"] else False
    names = [REPORT_JSON, REPORT_MD] + ([REPORT_PNG] if report["plot"] else [])
    report["files"] = [str(out_dir / n) for n in names]
    (staging / REPORT_JSON).write_text(json.dumps(report, indent=2, default=str) + "\n")
    (staging / REPORT_MD).write_text(markdown(report))
    artifacts.commit(staging, out_dir, overwrite)
    if show:
        from slm_cli.ui import console

        console.print(rich_table(report))
        console.print(f"report: {out_dir / REPORT_MD}" + (f", plot: {out_dir / REPORT_PNG}" if report["plot"] else ""))
    return report
