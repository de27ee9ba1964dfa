"""`slm quantize`: a quantized checkpoint of an artifact, in the compressed-tensors format vLLM serves.

Schemes (slm_cli/quant/schemes.py): FP8 (`fp8_dynamic` default, `fp8_static`, `fp8_weight_only`,
`fp8_block`) for GPUs with FP8 tensor cores; `w8a8_int8` (INT8 GEMMs: CPUs, pre-FP8 GPUs) with
optional SmoothQuant (slm_cli/quant/smooth.py); `w4a16` (4-bit weight groups rounded by GPTQ,
slm_cli/quant/gptq.py) for memory-bound decoding.

Reads top to bottom: setup (lineage check, source model, calibration and evaluation text) ->
run (smooth activations for w8a8_int8 when asked; choose the Linear tensors kept in bf16 with
`quant.keep_sensitive`, see slm_cli/quant/select.py; GPTQ for w4a16; quantize, save into the
staging folder, check it as vLLM would read it, measure it) ->
save (slm.json with the source as parent, published atomically). Nothing is published when a
check fails: the staging folder stays under `<output_dir>.work/` for inspection.

Quality is judged on the saved checkpoint loaded back with `AutoModelForCausalLM.from_pretrained`
(compressed-tensors decompresses the quantized weights to the compute dtype), unless
`quant.fake_quant_eval=true`, which scores an in-memory fake-quantized copy of the source instead
(same numbers, for machines where reloading FP8 is unavailable or too slow). Perplexity is the
sliding-window one of slm_cli/evaluate/perplexity.py on the first `eval.max_tokens` tokens of the
test split. No latency is reported here: speed belongs to `slm bench` and to vLLM on the
hardware the model will serve on (`make serve-check`).
"""

from __future__ import annotations

import re

import hydra

from slm_cli.config.schema import QuantizeStageConfig
from slm_cli.paths import CONFIG_DIR
from slm_cli.runner import run_stage

QUANT_REPORT_FILE = "quantization.json"


@hydra.main(config_path=str(CONFIG_DIR), config_name="quantize", version_base="1.3")
def main(cfg) -> None:
    run_stage(cfg, QuantizeStageConfig, run)


SCHEME_LABEL = {"w8a8_int8": "INT8", "w4a16": "INT4"}


def layer_groups(rows: list[dict], label: str = "FP8") -> list[dict]:
    """Linear layers grouped by name with the layer index replaced by `*` (one row per kind of layer)."""
    groups: dict[tuple, dict] = {}
    for r in rows:
        key = (re.sub(r"\.\d+\.", ".*.", r["name"]), r["quantized"], r["shape"], r["scale_shape"])
        g = groups.setdefault(
            key,
            {
                "layer": key[0],
                "count": 0,
                "status": label if r["quantized"] else "[yellow]kept[/yellow]",
                "shape (out, in)": str(tuple(r["shape"])),
                "weight": r["weight_dtype"],
                "scale": str(tuple(r["scale_shape"])) if r["scale_shape"] is not None else "-",
            },
        )
        g["count"] += 1
    return list(groups.values())


def run(cfg: QuantizeStageConfig, resolved: dict) -> dict:
    from slm_cli.pretrained import check_model_folder

    # the model folder first, before the heavy imports below: a bad one fails in about a second
    source_path = check_model_folder(cfg.model.name_or_path, "model.name_or_path", tokenizer=not cfg.model.tokenizer, quantized_ok=False)  # built-in names converted

    import json
    import math
    from pathlib import Path

    import torch

    from slm_cli import artifacts, models, ui
    from slm_cli.data.text import (
        calibration_record, calibration_rows, calibration_text, resolve_sources, split_text,
    )
    from slm_cli.evaluate.perplexity import perplexity
    from slm_cli.quant.checks import CheckpointError, quantization_table, validate_checkpoint
    from slm_cli.quant.schemes import SCALE_DTYPE, check_request, quantize_model, save_quantized
    from slm_cli.quant.report import checkpoint_size_report, fake_quant_model, weight_error_report
    from slm_cli.quant.gptq import gptq_model
    from slm_cli.quant.select import parse_keep_sensitive, select_sensitive
    from slm_cli.quant.smooth import smooth_model
    from transformers.utils import logging as hf_logging

    # --- setup -------------------------------------------------------------------------------
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    ui.console.print(ui.resolved_config_panel(resolved))
    source = Path(source_path)
    tokenizer = models.load_tokenizer(cfg.model.tokenizer or str(source), cfg.model.trust_remote_code, field="model.tokenizer" if cfg.model.tokenizer else "model.name_or_path")
    model = models.load_model(str(source), cfg.model.dtype, cfg.model.trust_remote_code, field="model.name_or_path").eval()
    # a request that cannot succeed (ignore typo, block shapes, group size) fails before any slow work
    group_size = "auto" if str(cfg.quant.group_size).strip().lower() == "auto" else int(cfg.quant.group_size)
    qscheme, _ = check_request(model, cfg.quant.scheme, cfg.quant.ignore, calibrated=True, group_size=group_size)
    label = SCHEME_LABEL.get(cfg.quant.scheme, "FP8")
    keep = parse_keep_sensitive(cfg.quant.keep_sensitive)
    for warning in artifacts.lineage_warnings(source):
        ui.console.print(f"[bold yellow]warning:[/bold yellow] {warning}", highlight=False)
    def warn(line: str) -> None:
        ui.console.print(f"[bold yellow]warning:[/bold yellow] {line}", highlight=False)

    # `auto`: the task data the source artifact (or its nearest ancestor) was trained on, else a general
    # corpus with a warning; fp8_static (activation scales), quant.keep_sensitive (which tensors stay
    # bf16), SmoothQuant (activation ranges) and GPTQ (input Gram matrices) read calibration text
    static = cfg.quant.scheme == "fp8_static"
    smooth = cfg.quant.smoothing_strength > 0
    gptq = cfg.quant.scheme == "w4a16" and cfg.quant.rounding == "gptq"
    needs_rows = static or bool(keep) or smooth or gptq
    calib_from, eval_from = resolve_sources(
        {"calibration.source": cfg.calibration.source if needs_rows else None, "eval.source": cfg.eval.source or None},
        source, warn=warn, say=lambda line: ui.console.print(line, highlight=False),
    )
    calib, calibration, rows = None, None, None
    if needs_rows:
        calib_text = calibration_text(calib_from.source, cfg.seed)
        rows = calibration_rows(
            calib_text, tokenizer, cfg.calibration.samples, cfg.calibration.seq_len, source=calib_from.source, warn=warn,
        )
        calibration = calibration_record(calib_from, calib_text, rows)
        calib = list(rows.split(cfg.calibration.batch_size)) if static else None
    eval_text = split_text(eval_from.source, "test", cfg.seed, eval_from.val_fraction) if eval_from else None

    def score(m, what: str) -> dict:
        with ui.progress(f"perplexity of {what}", unit="windows") as bar:
            return perplexity(
                m, tokenizer, eval_text, window=cfg.eval.window, stride=cfg.eval.stride,
                max_tokens=cfg.eval.max_tokens, batch_size=cfg.eval.batch_size, progress=bar.callback,
            )

    # --- run ---------------------------------------------------------------------------------
    ppl_source = score(model, "the source") if eval_text else None
    ignore = list(cfg.quant.ignore)
    selection = smoothing = gptq_rows = None
    if smooth:
        # function-preserving in float: the source's perplexity above is also the smoothed model's
        with ui.progress(f"SmoothQuant (alpha {cfg.quant.smoothing_strength:g})", unit="norms") as bar:
            smoothing = smooth_model(model, rows, cfg.quant.smoothing_strength, cfg.calibration.batch_size, bar.callback)
        worst = max(smoothing, key=lambda r: r["outlier_ratio_before"])
        ui.console.print(
            f"smoothed {len(smoothing)} norms; the largest activation outlier ratio (max/median channel) "
            f"{worst['outlier_ratio_before']:.0f} -> {worst['outlier_ratio_after']:.1f} (layer {worst['layer']} {worst['part']})",
            highlight=False,
        )
    if keep:
        # which Linear tensors stay bf16: per-tensor sensitivity, then joint checks on the calibration rows
        with ui.progress("choosing the tensors kept in bf16", unit="steps") as bar:
            selection = select_sensitive(
                model, cfg.quant.scheme, ignore, rows, keep=keep, max_ppl_increase=cfg.quant.max_ppl_increase,
                max_keep_fraction=cfg.quant.max_keep_fraction, sensitivity_tokens=cfg.quant.sensitivity_tokens,
                calib_batches=calib, storage_dtype=models.torch_dtype(cfg.quant.save_dtype),
                batch_size=cfg.calibration.batch_size, progress=lambda what, d, t: bar.callback(d, t),
                method=cfg.quant.sensitivity,
            )
        ignore += selection["kept"]
        ui.console.print(
            f"kept in bf16: {len(selection['kept'])} tensor(s), {selection['kept_params']:,} of "
            f"{selection['quantizable_params']:,} quantizable weights; perplexity increase on the calibration rows "
            f"{100 * selection['ppl_increase']:+.3f}% (budget +{100 * cfg.quant.max_ppl_increase:g}%); "
            f"{selection['seconds']:.0f} s, of which {selection['sensitivity_seconds']:.0f} s per-tensor sensitivity",
            highlight=False,
        )
        if selection["met"] is False:
            warn(
                f"quant.max_ppl_increase={cfg.quant.max_ppl_increase} is NOT met: keeping the most sensitive tensors "
                f"up to the byte cap quant.max_keep_fraction={cfg.quant.max_keep_fraction} still costs "
                f"{100 * selection['ppl_increase']:+.3f}% perplexity on the calibration rows. Raise "
                "quant.max_keep_fraction or quant.max_ppl_increase, or use a scheme that keeps activations in 16 bits "
                "(fp8_weight_only, w4a16)"
            )
    weight_scales = None
    if gptq:
        # sequential GPTQ on the calibration rows: each layer sees the outputs of the layers already rounded
        with ui.progress("GPTQ, layer by layer", unit="layers") as bar:
            gptq_rows = gptq_model(
                model, list(rows.split(cfg.calibration.batch_size)), qscheme.weights, ignore,
                damp=cfg.quant.gptq_damp, act_order=cfg.quant.gptq_act_order, scale_dtype=SCALE_DTYPE, progress=bar.callback,
            )
        weight_scales = {r["name"]: r.pop("scale") for r in gptq_rows}
        for r in gptq_rows:
            r.pop("zero_point")
        rtn_err = sum(r["error_rtn"] for r in gptq_rows) / len(gptq_rows)
        gptq_err = sum(r["error_gptq"] for r in gptq_rows) / len(gptq_rows)
        ui.console.print(
            f"GPTQ: mean relative output error of {len(gptq_rows)} Linear layers {gptq_err:.4f} "
            f"(round-to-nearest {rtn_err:.4f}, {gptq_err / rtn_err:.2f}x)", highlight=False,
        )
    ppl_quant = None
    if eval_text and cfg.quant.fake_quant_eval:
        fake = fake_quant_model(
            model, cfg.quant.scheme, ignore, calib, storage_dtype=models.torch_dtype(cfg.quant.save_dtype),
            group_size=group_size, weight_scales=weight_scales,
        )
        ppl_quant = score(fake, "the fake-quantized model")
        del fake
    # SmoothQuant rescaled the weights' columns: their error is measured against the smoothed float weights
    smoothed = {k: v.detach().clone() for k, v in model.state_dict().items() if k.endswith(".weight")} if smooth else None
    # only a static scheme has slow work to follow (calibration batches); the weight scales take seconds
    with ui.progress(f"quantizing to {cfg.quant.scheme}: activation scales", unit="batches", enabled=calib is not None) as bar:
        quantize_model(model, cfg.quant.scheme, ignore, calib, progress=bar.callback, group_size=group_size,
                       weight_scales=weight_scales)
    out = artifacts.begin(cfg.output_dir, cfg.overwrite)
    save_dtype = models.torch_dtype(cfg.quant.save_dtype)
    save_quantized(model, tokenizer, out, source_dtype=save_dtype)
    del model
    # vLLM's view of the files: on a failure nothing is published
    try:
        layers = validate_checkpoint(out, cfg.quant.scheme, source_dtype=save_dtype)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}\nNothing was published; the checkpoint as written is kept in {out}.") from exc
    table = quantization_table(out)
    ui.console.print(
        ui.records_table(
            f"{cfg.quant.scheme}: {len(layers['quantized'])} Linear layers in {label}, {len(layers['ignored'])} kept "
            f"(quant.ignore={cfg.quant.ignore}"
            + (f" + {len(selection['kept'])} kept by quant.keep_sensitive={cfg.quant.keep_sensitive})" if selection else ")"),
            layer_groups(table, label),
            ["layer", "count", "status", "shape (out, in)", "weight", "scale"],
        )
    )
    if eval_text and not cfg.quant.fake_quant_eval:
        reloaded = models.load_model(str(out), cfg.model.dtype, cfg.model.trust_remote_code, field="output_dir").eval()
        ppl_quant = score(reloaded, f"the saved {label} checkpoint, loaded back")
        del reloaded
    errors = weight_error_report(smoothed if smooth else source, out)
    sizes = checkpoint_size_report(out)
    sizes["source_bytes"] = sum(p.stat().st_size for p in source.glob("*.safetensors"))

    # --- save --------------------------------------------------------------------------------
    by_name = {r["name"]: r for r in errors}
    report = {
        "scheme": cfg.quant.scheme,
        "ignore": ignore,
        "keep_sensitive": selection,
        "smoothing": smoothing,
        "gptq": gptq_rows,
        "sizes": sizes,
        "layers": [{**r, **by_name.get(r["name"], {})} for r in table],
    }
    (out / QUANT_REPORT_FILE).write_text(json.dumps(report, indent=2, default=list))
    metrics = {
        "scheme": cfg.quant.scheme,
        "quantized_layers": len(layers["quantized"]),
        "ignored_layers": layers["ignored"],
        **{k: v for k, v in sizes.items() if k != "quantized_layers"},
        "max_rel_weight_error": max((r["max_rel_error"] for r in errors), default=0.0),
        "mean_rel_weight_error": sum(r["mean_rel_error"] for r in errors) / max(len(errors), 1),
        # rows of calibration text read: fp8_static's activation scales and quant.keep_sensitive's choice use them
        "calibration_rows": 0 if rows is None else int(rows.shape[0]),
        "calibration_seq_len": int(rows.shape[1]) if rows is not None else 0,
        **({"group_size": qscheme.weights.group_size, "rounding": cfg.quant.rounding} if cfg.quant.scheme == "w4a16" else {}),
        **({"smoothing_strength": cfg.quant.smoothing_strength} if smooth else {}),
        **({"gptq_mean_error": gptq_err, "rtn_mean_error": rtn_err} if gptq_rows else {}),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    if selection is not None:
        metrics.update(
            {
                "kept_bf16": selection["kept"],
                "kept_bf16_params": selection["kept_params"],
                "keep_budget_met": selection["met"],
                "calibration_ppl_increase_pct": 100.0 * selection["ppl_increase"],
                "max_ppl_increase_pct": 100.0 * cfg.quant.max_ppl_increase,
                "selection_seconds": selection["seconds"],
            }
        )
    if ppl_source is not None:
        metrics.update(
            {
                "eval_path": "fake_quant" if cfg.quant.fake_quant_eval else "reload",
                "eval_tokens": ppl_source["tokens"],
                "eval_window": ppl_source["window"],
                "eval_stride": ppl_source["stride"],
                "perplexity_source": ppl_source["perplexity"],
                "perplexity_quantized": ppl_quant["perplexity"],
                # the FP8-era name stays for FP8 artifacts (readers of earlier slm.json files use it)
                **({"perplexity_fp8": ppl_quant["perplexity"]} if label == "FP8" else {}),
                "perplexity_increase_pct": 100.0 * (ppl_quant["perplexity"] / ppl_source["perplexity"] - 1.0),
            }
        )
        if not math.isfinite(metrics["perplexity_quantized"]):
            ui.console.print(f"[bold yellow]warning:[/bold yellow] the {label} model's perplexity is not finite")
    # the max error of every layer sits near its format's rounding bound; the mean tells layers apart
    worst = sorted(errors, key=lambda r: r["mean_rel_error"], reverse=True)[: cfg.quant.error_rows]
    if worst:
        ui.console.print(
            ui.records_table(
                f"largest weight errors ({len(worst)} of {len(errors)} layers; all in {QUANT_REPORT_FILE})",
                worst,
                ["name", "mean_rel_error", "rel_l2_error", "max_rel_error"],
            )
        )
    artifacts.write_metadata(
        out, stage="quantize", config=resolved, parents=[artifacts.parent("source", source)], metrics=metrics,
        extra={"trust_remote_code": cfg.model.trust_remote_code,
               **({"keep_sensitive": {k: v for k, v in selection.items() if k != "tensors"}
                   | {"kept_tensors": [r for r in selection["tensors"] if r["kept"]]}} if selection else {}),
               **({"calibration": {**calibration, "eval_source": eval_from.source if eval_from else None}} if calibration else {})},
    )
    final = artifacts.commit(out, cfg.output_dir, cfg.overwrite)
    ui.console.print(ui.kv_table(f"quantize artifact: {final}", ui.metric_rows(metrics)))
    if metrics["device"] == "cpu" and label == "FP8":
        ui.console.print(
            "[dim]On this CPU FP8 is a storage format: there are no FP8 matmul kernels (vLLM emulates them, far slower "
            "than bf16), so no latency is reported. Serve it on an FP8-capable GPU (H100 class) for speed, or use "
            "quant=w8a8_int8 for CPUs.[/dim]"
        )
    return metrics
