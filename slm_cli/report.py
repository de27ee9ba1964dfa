"""The compression report: every artifact of a lineage side by side, measured the same way.

`write_report(folders, out_dir, title)` follows each artifact's slm.json `parents` back to the
roots, keeps each checkpoint once (by content hash), and writes into `out_dir`:
  * report.json: one row per artifact: params, bytes on disk, the held-out numbers measured here
    (slm_cli/evaluate/heldout.py: completion cross-entropy on the test split of the lineage's task
    data, and the task's exact match or AUC), the numbers its stages recorded in slm.json, and
    `slm bench` results where there are any;
  * report.md: the table, what was measured and on which data, and the plot;
  * report.png: held-out CE vs size on disk, and vs prefill latency (or a note that no artifact
    has been benched).
Every artifact, pruned and FP8 included, is evaluated by the same code on the same records; the
held-out numbers are cached under `$SLM_CACHE/heldout/` by the folder's content hash and the
data's key (records and settings), and reused by any later report while both are unchanged.

The folders named may be artifacts, a folder of artifacts (a pipeline's output_root), a Hydra
multirun folder (one row per job, named by the job's overrides), or `slm bench` results folders
(bench.json: their timings join the rows of the artifacts they measured).

Ratios in brackets are "times the reference" (the artifact whose stage is `teacher`, else the
first root) and are shown only where the two numbers are the same quantity measured the same way:
size, parameters, latency, throughput, memory. Quality numbers are shown as they are.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slm_cli.artifacts import METADATA_FILE, content_hash, output_stamp, read_metadata
from slm_cli.errors import SlmError
from slm_cli.evaluate.speed import FP8_NOTE, safetensors_params, weights_bytes

REPORT_JSON, REPORT_MD, REPORT_PNG = "report.json", "report.md", "report.png"
BENCH_FILE = "bench.json"  # what `slm bench` writes into its results folder
EVAL_KEYS = ("auc", "exact_match", "perplexity", "accuracy")
# The held-out numbers measured here (slm_cli/evaluate/heldout.py) and their column titles.
HELDOUT_KEYS = {"heldout.ce": "test CE", "heldout.exact_match": "exact match", "heldout.auc": "AUC", "heldout.accuracy": "accuracy"}
QUALITY = "heldout.ce"  # the plotted quality: the one number every artifact has
BENCH_KEYS = {"latency_ms": "latency ms", "decode_tokens_per_s": "decode tok/s", "peak_memory_mb": "peak mem MB"}
# Ratios only where numerator and denominator are the same quantity, measured the same way.
RATIO_KEYS = ("params", "weights_bytes", *(f"bench.{k}" for k in BENCH_KEYS))
NO_BENCH = (
    "no `slm bench` results for these artifacts: run `slm bench <folders> bench.write_to_artifact=true`, "
    "or name bench's results folder after `slm report`, for latency and throughput"
)


# --- the lineage -------------------------------------------------------------------------------


@dataclass
class Inputs:
    """What the named folders hold: artifact folders, row names for multirun jobs, and bench results."""

    artifacts: list[Path] = field(default_factory=list)
    labels: dict[Path, str] = field(default_factory=dict)  # resolved artifact path -> row name
    bench: dict[Path, dict] = field(default_factory=dict)  # resolved artifact path -> its `slm bench` result


def _is_artifact(folder: Path) -> bool:
    return (folder / METADATA_FILE).is_file() or (folder / "config.json").is_file()


def _add_bench(results: Path, inputs: Inputs) -> None:
    """The artifacts a bench.json measured, and their results (matched to rows by folder)."""
    try:
        bench = json.loads(results.read_text())
    except (OSError, ValueError) as exc:
        raise SlmError(f"{results}: not a readable {BENCH_FILE} ({exc}); name an `slm bench` results folder.") from exc
    for result in bench.get("artifacts", []):
        folder = Path(result.get("path", ""))
        if result.get("path") and folder.is_dir():
            inputs.artifacts.append(folder)
            inputs.bench[folder.resolve()] = result


def _job_overrides(job: Path) -> list[str]:
    import yaml

    path = job / ".hydra" / "overrides.yaml"
    return [str(o) for o in (yaml.safe_load(path.read_text()) or [])] if path.is_file() else []


def _add_multirun(sweep: Path, inputs: Inputs) -> None:
    """One row per job of a Hydra multirun folder (<sweep>/<job number>/...), named by what the sweep varied."""
    jobs = sorted((d for d in sweep.iterdir() if d.is_dir() and d.name.isdigit()), key=lambda d: int(d.name))
    overrides = {job: _job_overrides(job) for job in jobs}
    # only the overrides that differ between jobs name a row; the rest are common to all
    common = set.intersection(*(set(o) for o in overrides.values())) if overrides else set()
    for job in jobs:
        label = " ".join(o for o in overrides[job] if o not in common) or f"job {job.name}"
        found = sorted(p.parent for p in job.glob(f"*/{METADATA_FILE}"))
        for folder in found:
            inputs.artifacts.append(folder)
            inputs.labels[folder.resolve()] = label if len(found) == 1 else f"{label} {folder.name}"
        for results in sorted(job.glob(f"*/{BENCH_FILE}")):
            _add_bench(results, inputs)


def read_inputs(folders: list[str | Path]) -> Inputs:
    """Artifact folders (and bench results) from what the user named.

    Each folder is an artifact; an `slm bench` results folder (bench.json); a Hydra multirun
    folder (multirun.yaml beside numbered job folders); or a folder of artifacts and bench results
    (a pipeline's output_root).
    """
    inputs = Inputs()
    for f in map(Path, folders):
        if (f / BENCH_FILE).is_file():
            _add_bench(f / BENCH_FILE, inputs)
        elif _is_artifact(f):
            inputs.artifacts.append(f)
        elif (f / "multirun.yaml").is_file():
            _add_multirun(f, inputs)
        elif f.is_dir() and (inside := sorted(p.parent for p in f.glob(f"*/{METADATA_FILE}"))):
            inputs.artifacts += inside
            for results in sorted(f.glob(f"*/{BENCH_FILE}")):
                _add_bench(results, inputs)
        else:
            raise SlmError(
                f"{f}: not an artifact (no {METADATA_FILE} or config.json), an `slm bench` results folder "
                f"({BENCH_FILE}), a multirun folder (multirun.yaml) or a folder of artifacts."
            )
    if not inputs.artifacts:
        raise SlmError(f"{', '.join(map(str, folders))}: no artifacts found in it.")
    return inputs


def expand_folders(folders: list[str | Path]) -> list[Path]:
    """Artifact folders from what the user named (see read_inputs)."""
    return read_inputs(folders).artifacts


def gather_lineage(folders: list[str | Path]) -> tuple[list[dict], list[dict]]:
    """The given artifact folders and all their ancestors, each once, parents before children.

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

    for f in folders:
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


# --- the held-out evaluation ---------------------------------------------------------------


def lineage_data(nodes: list[dict], reference: int) -> tuple[dict | None, int | None]:
    """The lineage's task data (slm_cli/evaluate/heldout.py) and the index of the node it was read from.

    The reference's training data (the teacher's data.* in its slm.json), else the first
    artifact's, in lineage order, that trained on data. (None, None) when none did.
    """
    from slm_cli.evaluate.heldout import lineage_data_config

    for i in [reference, *range(len(nodes))]:
        c = lineage_data_config((nodes[i]["meta"] or {}).get("config"))
        if c is not None:
            return c, i
    return None, None


def _cached(files_hash: str, key: str) -> Path:
    """Where the held-out results of these files on this data are kept: ``$SLM_CACHE/heldout/``."""
    from slm_cli.paths import cache_dir

    return cache_dir() / "heldout" / f"{files_hash}-{key}.json"


def read_cached(files_hash: str, key: str) -> dict | None:
    """Held-out results measured before on the same files and the same data and settings, or None."""
    try:
        return json.loads(_cached(files_hash, key).read_text())
    except (OSError, ValueError):
        return None


def write_cached(files_hash: str, key: str, results: dict) -> None:
    from slm_cli.data.corpus import write_atomic

    path = _cached(files_hash, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(results, default=str))


def evaluate_lineage(nodes: list[dict], data, show: bool) -> list[dict]:
    """{key, files_hash, results | error, reused} for each node, measured on `data` (a HeldoutData).

    Results are cached by (content hash of the folder as it is now, data key) and reused while both
    are unchanged, by any later report: the key covers the records and every setting.
    """
    from slm_cli import ui
    from slm_cli.artifacts import content_hash
    from slm_cli.evaluate.heldout import evaluate_artifact

    out = []
    todo = []
    for n in nodes:
        files_hash = content_hash(n["path"])  # what is on disk now, not what slm.json recorded
        entry = {"key": data.key, "files_hash": files_hash}
        cached = read_cached(files_hash, data.key)
        if cached is not None:
            entry.update(results=cached, reused=True)
        else:
            todo.append(len(out))
        out.append(entry)
    if todo:
        with ui.progress("evaluating on held-out data", total=len(todo), unit="artifacts", enabled=show) as bar:
            for i in todo:
                try:
                    results = evaluate_artifact(str(nodes[i]["path"]), data)
                except (SlmError, OSError, ValueError, RuntimeError) as exc:  # one unreadable artifact must not sink the report
                    out[i]["error"] = f"{type(exc).__name__}: {exc}"
                    ui.console.print(f"[bold yellow]warning:[/bold yellow] {nodes[i]['path']}: not evaluated: {exc}", highlight=False)
                else:
                    out[i].update(results=results, reused=False)
                    write_cached(out[i]["files_hash"], data.key, results)
                bar.advance(1)
    return out


# --- the numbers -------------------------------------------------------------------------------


def artifact_numbers(node: dict, heldout: dict | None = None, bench_result: dict | None = None) -> dict[str, Any]:
    """Every number the report has for one artifact.

    Keys: params, weights_bytes (measured on disk); heldout.<ce|perplexity|exact_match|auc|accuracy>
    (measured here); as recorded in slm.json: val_loss, val_ce, eval.<source>.<metric>,
    quantize.perplexity_fp8 (FP8) or perplexity_quantized (INT8 / INT4) / perplexity_source /
    perplexity_increase_pct; from `slm bench` (a
    results folder named, else slm.json metrics.bench): bench.<latency_ms|decode_tokens_per_s|
    peak_memory_mb>, bench.reuse_speedup, bench.note.
    """
    m = (node["meta"] or {}).get("metrics", {})
    bench = bench_result or m.get("bench") or {}
    out: dict[str, Any] = {}
    if "params" in m:
        out["params"] = m["params"]
    elif "params" in bench:
        out["params"] = bench["params"]
    else:
        out["params"] = safetensors_params(node["path"])
    out["weights_bytes"] = weights_bytes(node["path"])
    for key, value in ((heldout or {}).get("results") or {}).items():
        if key in ("ce", "perplexity", "exact_match", "auc", "accuracy"):
            out[f"heldout.{key}"] = value
    if m.get("val_loss") is not None:
        out["val_loss"] = m["val_loss"]
    if m.get("val_ce") is not None:
        out["val_ce"] = m["val_ce"]
    for source, values in sorted((m.get("eval") or {}).items()):
        for key in EVAL_KEYS:
            if isinstance(values, dict) and values.get(key) is not None:
                out[f"eval.{source}.{key}"] = values[key]
    for key in ("perplexity_fp8", "perplexity_quantized", "perplexity_source", "perplexity_increase_pct"):
        if m.get(key) is not None and not (key == "perplexity_quantized" and "perplexity_fp8" in m):
            out[f"quantize.{key}"] = m[key]
    for key in BENCH_KEYS:
        if bench.get(key) is not None:
            out[f"bench.{key}"] = bench[key]
    if isinstance(bench.get("scoring"), dict) and "speedup" in bench["scoring"]:
        out["bench.reuse_speedup"] = bench["scoring"]["speedup"]
    if bench.get("note"):
        out["bench.note"] = bench["note"]
    if any(k.startswith("bench.") and k != "bench.note" for k in out):
        out["bench.engine"] = bench.get("engine", "hf")  # which engine timed it: transformers or vLLM
        if isinstance(bench.get("scoring"), dict) and "items_per_s" in bench["scoring"]:
            out["bench.scoring_items_per_s"] = bench["scoring"]["items_per_s"]
    return out


def relative(numbers: dict, reference: dict) -> dict[str, float]:
    """value / reference value for the RATIO_KEYS both have (a ratio, "times the teacher")."""
    out = {}
    for key in RATIO_KEYS:
        value, ref = numbers.get(key), reference.get(key)
        if isinstance(value, (int, float)) and isinstance(ref, (int, float)) and not isinstance(value, bool) and ref:
            out[key] = value / ref
    return out


def reference_index(nodes: list[dict]) -> int:
    """The artifact ratios refer to: the one whose stage is teacher, else the first root."""
    stages = [(n["meta"] or {}).get("stage") for n in nodes]
    if "teacher" in stages:
        return stages.index("teacher")
    return next((i for i, n in enumerate(nodes) if not n["parent_hashes"]), 0)


def build_rows(nodes: list[dict], heldout: list[dict] | None = None, inputs: Inputs | None = None) -> tuple[list[dict], int]:
    """One row per node and the index of the reference row (stage teacher, else the first root)."""
    inputs = inputs or Inputs()
    names = short_names([n["path"] for n in nodes])
    names = [inputs.labels.get(n["path"], name) for n, name in zip(nodes, names)]
    if len(set(names)) < len(names):  # labels that collide (e.g. a parent outside the sweep): paths decide
        names = short_names([n["path"] for n in nodes])
    by_hash = {n["hash"]: name for n, name in zip(nodes, names)}
    stages = [(n["meta"] or {}).get("stage") or "base" for n in nodes]
    ref = reference_index(nodes)
    heldout = heldout or [None] * len(nodes)
    numbers = [artifact_numbers(n, h, inputs.bench.get(n["path"])) for n, h in zip(nodes, heldout)]
    rows = []
    for n, name, stage, nums, h in zip(nodes, names, stages, numbers, heldout):
        row = {
            "name": name,
            "path": str(n["path"]),
            "stage": stage,
            "content_hash": n["hash"],
            "parents": [by_hash[x] for x in n["parent_hashes"]],
            "metrics": nums,
            "relative_to_reference": relative(nums, numbers[ref]),
        }
        if h is not None:
            row["heldout"] = h
        calibration = (n["meta"] or {}).get("calibration")
        if isinstance(calibration, dict) and calibration.get("source"):
            row["calibration"] = calibration  # what prune / quantize statistics were fitted on
        kept = (n["meta"] or {}).get("keep_sensitive")
        if isinstance(kept, dict) and "kept" in kept:
            row["keep_sensitive"] = {k: kept.get(k) for k in ("mode", "kept", "met", "ppl_increase", "max_ppl_increase")}
        rows.append(row)
    return rows, ref


# --- the table ---------------------------------------------------------------------------------


def columns(rows: list[dict]) -> list[tuple[str, str]]:
    """(metric key, column title): size, the held-out numbers, and bench numbers when any artifact has them.

    What stages recorded about themselves (val objective, a stage's own perplexity) stays in
    report.json: measured on different data or of different quantities, it would not line up.
    """
    have = {k for r in rows for k in r["metrics"]}
    cols = [("params", "params"), ("weights_bytes", "size MB")]
    cols += [(k, t) for k, t in HELDOUT_KEYS.items() if k in have]
    if any(k.startswith("bench.") and k != "bench.note" for k in have):
        cols.append(("bench.engine", "engine"))  # latency is prefill under hf, time to first token under vllm
        cols += [(f"bench.{k}", t) for k, t in BENCH_KEYS.items()]
        if "bench.reuse_speedup" in have:
            cols.append(("bench.reuse_speedup", "prefix reuse x"))
        if "bench.scoring_items_per_s" in have:
            cols.append(("bench.scoring_items_per_s", "scoring items/s"))
    return cols


def cell(row: dict, key: str, with_ratio: bool = True) -> str:
    from slm_cli.ui import fmt

    nums = row["metrics"]
    if key not in nums:
        if key.startswith("bench.") and nums.get("bench.note"):
            return "FP8: not timed on CPU" if nums["bench.note"] == FP8_NOTE else nums["bench.note"]
        if key.startswith("heldout.") and (row.get("heldout") or {}).get("error"):
            return "not evaluated"
        return "-"
    value = nums[key] / 2**20 if key == "weights_bytes" else nums[key]
    text = fmt(round(value, 2) if key == "weights_bytes" else value)
    ratio = row["relative_to_reference"].get(key)
    if with_ratio and ratio is not None:
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


def data_sentence(report: dict) -> str:
    """What the held-out numbers are and which data they were measured on, for report.md."""
    d = report.get("heldout")
    if not d:
        return (
            "No held-out numbers: no artifact in this lineage records the data it trained on (data.source in "
            "slm.json), so there is no task data to evaluate on."
            if report.get("evaluated", True) else "Held-out evaluation was skipped (evaluate=false)."
        )
    spec = d["spec"]
    task = {"exact_match": " exact match: `slm eval`'s greedy decoding, zero-shot, scored by the task.",
            "auc": " AUC and accuracy: `slm eval`'s log-odds of the two answers."}.get(d["metric"], "")
    return (
        f"Every artifact is measured here on the same records: the test split of `{spec['source']}` "
        f"({d['examples']} records, seed {spec['seed']}), the lineage's task data as recorded in "
        f"{d['from']}'s slm.json. Test, not validation: training watches validation and calibration reads it. "
        f"test CE: cross-entropy of the completions in nats per token (prompt tokens masked, as training's "
        f"loss; data.max_seq_len={spec['max_seq_len']}).{task} FP8 checkpoints are loaded through "
        "compressed-tensors, as they are served. Ratios in brackets (size and speed only): x the reference."
    )


def calibration_note(calibration: dict | None) -> str:
    """`; calibrated on ...` for an artifact's report.md line: the source, why it was chosen, the tokens and the text's hash."""
    if not calibration:
        return ""
    why = {"recorded": "the task data in its lineage", "fallback": "general corpus: no task data recorded",
           "given": "named in its config"}.get(calibration.get("origin"), "named in its config")
    size = f"{calibration.get('rows')} x {calibration.get('seq_len')} = {calibration.get('tokens'):,} tokens" if calibration.get("tokens") else ""
    digest = f", text sha256 {calibration['text_sha256'][:12]}" if calibration.get("text_sha256") else ""
    return f"; calibrated on `{calibration['source']}` ({why}; {size}{digest})"


def kept_note(kept: dict | None) -> str:
    """`; N tensors kept in bf16 ...` for a quantized artifact's report.md line: which FP8 skipped, and why."""
    if not kept:
        return ""
    names = kept.get("kept") or []
    shown = ", ".join(f"`{n}`" for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    if kept.get("mode") != "auto":
        return f"; {len(names)} tensors kept in bf16 by count" + (f" ({shown})" if names else "")
    increase, budget = kept.get("ppl_increase"), kept.get("max_ppl_increase")
    verdict = "met" if kept.get("met") else "**not met**"
    measured = f"calibration perplexity {100 * increase:+.2f}%" if increase is not None else "calibration perplexity"
    what = f"{len(names)} most FP8-sensitive tensors kept in bf16 ({shown})" if names else "no tensor kept in bf16"
    return f"; {what}: {measured} against a budget of +{100 * (budget or 0):.2f}%, {verdict}"


def markdown(report: dict) -> str:
    rows, cols = report["rows"], [tuple(c) for c in report["columns"]]
    ref = rows[report["reference"]]
    head = ["artifact", "stage", *(t for _, t in cols)]
    lines = [
        f"# {report['title']}",
        "",
        f"Created {report['created']}. Reference for the ratios in brackets: **{ref['name']}** ({ref['stage']}).",
        "",
        data_sentence(report),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---", "---"] + ["---:"] * len(cols)) + "|",
    ]
    for r in rows:
        lines.append("| " + " | ".join([r["name"], r["stage"], *(cell(r, k) for k, _ in cols)]) + " |")
    lines.append("")
    lines += [f"- **{r['name']}**: `{r['path']}`" + (f" (from {', '.join(r['parents'])})" if r["parents"] else "")
              + calibration_note(r.get("calibration")) + kept_note(r.get("keep_sensitive")) for r in rows]
    reused = sum(bool((r.get("heldout") or {}).get("reused")) for r in rows)
    if reused:
        lines += ["", f"Held-out numbers of {reused} artifact(s) were measured before on the same files and data, and reused."]
    if not any(k.startswith("bench.") for k, _ in cols):
        lines += ["", NO_BENCH[0].upper() + NO_BENCH[1:] + "."]
    if any(r["metrics"].get("bench.note") == FP8_NOTE for r in rows):
        lines += ["", "FP8 checkpoints are a storage format on CPU (no FP8 matmul kernels): their latency is measured on an H100-class GPU, not here."]
    if report["missing_parents"]:
        lines += ["", "Parents recorded in slm.json but no longer on disk: " + ", ".join(m.get("path", "?") for m in report["missing_parents"])]
    if report.get("plot"):
        lines += ["", f"![held-out CE vs size and latency]({REPORT_PNG})"]
    return "\n".join(lines) + "\n"


# --- the plot ----------------------------------------------------------------------------------


def plot(rows: list[dict], quality: str, path: Path, title: str) -> bool:
    """Quality vs size (MB), and vs prefill latency (ms) or a note that nothing was benched; a marker per artifact."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    have = [r for r in rows if quality in r["metrics"]]
    if not have:
        return False
    timed = [r for r in have if "bench.latency_ms" in r["metrics"]]
    engines = {r["metrics"].get("bench.engine") for r in timed}
    latency_title = "time to first token (ms, vLLM)" if engines == {"vllm"} else "prefill latency (ms)" if engines == {"hf"} else "latency (ms): hf prefill, vLLM first token"
    panels = [("weights_bytes", "size on disk (MB)", have), ("bench.latency_ms", latency_title, timed)]
    # One marker and colour per artifact, named in a legend: artifacts of one size (a student and
    # its distilled continuations) sit on top of each other, where text labels would overprint.
    markers = "osD^vP*Xph<>"
    style = {r["name"]: (markers[i % len(markers)], f"C{i % 10}") for i, r in enumerate(have)}
    better = "higher" if quality.rsplit(".", 1)[-1] in ("auc", "exact_match", "accuracy") else "lower"
    label = HELDOUT_KEYS.get(quality, quality)
    fig, axes = plt.subplots(1, 2, figsize=(14.5, 4.5), squeeze=False)
    for ax, (key, xlabel, pts) in zip(axes[0], panels):
        for r in pts:
            marker, colour = style[r["name"]]
            x = r["metrics"][key] / (2**20 if key == "weights_bytes" else 1)
            ax.scatter([x], [r["metrics"][quality]], marker=marker, color=colour, s=60, alpha=0.8, label=f"{r['name']} ({r['stage']})")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{label} ({better} is better)")
        ax.grid(alpha=0.3)
        if not pts:  # the promise of the title kept honestly: say why the panel is empty
            ax.text(0.5, 0.5, NO_BENCH.replace("`", "").replace(": run", ":\nrun").replace(", or", ",\nor"),
                    ha="center", va="center", fontsize=8, transform=ax.transAxes, wrap=True)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_ylabel("")
    untimed = [r["name"] for r in have if r not in timed and r["metrics"].get("bench.note") == FP8_NOTE]
    if timed and untimed:
        axes[0][1].set_title(f"not timed on CPU (FP8): {', '.join(untimed)}", fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1 - 2.5 / 14.5, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# --- the whole report --------------------------------------------------------------------------


def build_report(artifact_dirs: list[str | Path], title: str, *, evaluate: bool = True, show: bool = False) -> dict:
    """The report as a dict (what report.json holds), without writing anything but the results cache.

    With `evaluate`, every artifact is scored on the lineage's held-out data (see evaluate_lineage).
    """
    inputs = read_inputs(artifact_dirs)
    nodes, missing = gather_lineage(inputs.artifacts)
    if not nodes:
        raise SlmError("no artifacts to report on.")
    ref = reference_index(nodes)
    heldout, data_info = None, None
    config, source_row = lineage_data(nodes, ref) if evaluate else (None, None)
    if config is not None:
        from slm_cli.evaluate.heldout import load_heldout

        data = load_heldout(config)
        heldout = evaluate_lineage(nodes, data, show)
        data_info = {"spec": data.spec, "metric": data.metric, "settings": data.settings, "key": data.key,
                     "examples": len(data.examples), "from": short_names([n["path"] for n in nodes])[source_row]}
    rows, ref = build_rows(nodes, heldout, inputs)
    return {
        "title": title,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "reference": ref,
        "evaluated": evaluate,
        "heldout": data_info,
        "quality": QUALITY if any(QUALITY in r["metrics"] for r in rows) else None,
        "columns": [list(c) for c in columns(rows)],
        "rows": rows,
        "missing_parents": missing,
        "slm_output": output_stamp("report"),
    }


def write_report(artifact_dirs: list[Path], out_dir: Path, title: str, *, show: bool = True,
                 overwrite: bool | str = False, evaluate: bool = True) -> dict:
    """Write report.json, report.md and report.png for the artifacts and their lineage into out_dir.

    Written into `<out_dir>.work/staging` and published in one rename, like every slm output;
    an existing out_dir is replaced only under `overwrite` (see artifacts.check_output). Prints
    the table to slm's console unless show=False. Returns the report dict (as in report.json) with `files`: the paths written.
    """
    from slm_cli import artifacts

    out_dir = Path(out_dir)
    staging = artifacts.begin(out_dir, overwrite)
    report = build_report(artifact_dirs, title, evaluate=evaluate, show=show)
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
