"""`slm prune`: structured pruning (OSSCAR or a baseline) of an artifact into a smaller standard checkpoint.

Reads top to bottom: setup (the request checked against the source's config before any weights
are read, the predicted size, calibration and evaluation text) -> run (perplexity of the source,
prune layer by layer, save into the staging folder, perplexity of the saved checkpoint loaded
back with plain `from_pretrained`) -> save (slm.json with the source as parent, what was kept
in every layer, the reconstruction errors and the calibration set; published atomically).

The MLP width is given by exactly one of `prune.keep_ffn` (a fraction of intermediate_size),
`prune.keep_ffn_count` (neurons per layer) or `prune.target_params` (a total size: the largest
width that fits after the head and layer settings, rounded down to `prune.round_to`).
Calibration uses the first `calibration.samples * calibration.seq_len` tokens of the
`calibration.source` text (slm_cli/data/text.py calibration_text; fewer rows, with a warning, when it
is shorter). Perplexity is the sliding-window one of slm_cli/evaluate/perplexity.py on the first
`eval.max_tokens` tokens of the `eval.source` test split. Both default to `auto`: the task data
recorded in the source's slm.json (or its nearest ancestor's), else the kjv corpus with a warning.
Statistics, solver and refit compute in `model.dtype` (float32 by default); the checkpoint is saved
in the source's own dtype (its config.json `dtype`, else the dtype of its safetensors weights), and
both perplexities read weights as stored (the source's, the saved checkpoint's) computed in
`model.dtype`. slm.json's metrics record `compute_dtype` and `saved_dtype`.
"""

from __future__ import annotations

import hydra

from slm_cli.config.schema import PruneStageConfig
from slm_cli.paths import CONFIG_DIR
from slm_cli.runner import run_stage


@hydra.main(config_path=str(CONFIG_DIR), config_name="prune", version_base="1.3")
def main(cfg) -> None:
    run_stage(cfg, PruneStageConfig, run)


def make_plan(settings, config):
    """The library's PrunePlan for these settings on a model with `config`, and a note on what
    target_params chose (None otherwise). Raises SlmError listing every impossible target."""
    import dataclasses

    from slm_cli.errors import SlmError
    from slm_cli.prune import PrunePlan, keep_ffn_for_params, plan_problems

    if settings.keep_ffn_count is not None:
        keep_ffn = settings.keep_ffn_count
    elif settings.keep_ffn is not None:
        keep_ffn = float(settings.keep_ffn)
    else:
        keep_ffn = 1.0
    plan = PrunePlan(
        method=settings.method, keep_ffn=keep_ffn, keep_kv_heads=settings.keep_kv_heads,
        keep_q_per_kv=settings.keep_q_per_kv, drop_layers=settings.drop_layers, depth_method=settings.depth_method,
        round_to=settings.round_to, ridge=settings.ridge, local_search_iters=settings.local_search_iters,
        swap_candidates=settings.swap_candidates, greedy_steps=settings.greedy_steps,
        correction=settings.correction,
    )
    problems = plan_problems(config, plan)
    if problems:
        raise SlmError(_listed(problems, config))
    note = None
    if settings.target_params is not None:
        try:
            count, params = keep_ffn_for_params(config, plan, int(settings.target_params))
        except ValueError as err:
            raise SlmError(str(err)) from err
        plan = dataclasses.replace(plan, keep_ffn=count)
        note = (
            f"prune.target_params={int(settings.target_params):,} -> keep_ffn_count={count} of "
            f"{config.intermediate_size} MLP neurons per layer ({params:,} parameters)"
        )
    return plan, note


def _listed(problems: list[str], config) -> str:
    shape = (
        f"(the model: {config.num_hidden_layers} layers, intermediate_size {config.intermediate_size}, "
        f"{config.num_attention_heads} query heads, {config.num_key_value_heads} KV heads)"
    )
    lines = "\n".join(f"  - {p}" for p in problems)
    return f"{len(problems)} impossible pruning target(s) {shape}:\n{lines}"


def layer_rows(report) -> list[dict]:
    """One table row per kept layer: its source index, kept widths and relative reconstruction errors."""
    rows = []
    for entry in report.layers:
        rows.append({
            "layer": entry.layer,
            "source layer": entry.source_layer,
            "ffn kept": len(entry.kept_ffn) if entry.kept_ffn is not None else "all",
            "ffn err (no refit)": entry.ffn_error_before_refit if entry.ffn_error_before_refit is not None else "-",
            "ffn err": entry.ffn_error_after_refit if entry.ffn_error_after_refit is not None else "-",
            "q heads kept": len(entry.kept_q_heads) if entry.kept_q_heads is not None else "all",
            "attn err (no refit)": entry.attn_error_before_refit if entry.attn_error_before_refit is not None else "-",
            "attn err": entry.attn_error_after_refit if entry.attn_error_after_refit is not None else "-",
            "swaps": entry.swaps,
        })
    return rows


def run(cfg: PruneStageConfig, resolved: dict) -> dict:
    from slm_cli.pretrained import check_model_folder

    # the model folder first, before the heavy imports below: a bad one fails in about a second
    source_path = check_model_folder(cfg.model.name_or_path, "model.name_or_path", tokenizer=not cfg.model.tokenizer, quantized_ok=False)

    import dataclasses
    import math
    import time
    from pathlib import Path

    import torch
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    from slm_cli import artifacts, models, ui
    from slm_cli.data.text import (
        calibration_record, calibration_rows, calibration_text, resolve_sources, split_text,
    )
    from slm_cli.errors import SlmError
    from slm_cli.evaluate.perplexity import perplexity
    from slm_cli.evaluate.repetition import chat_prompts, greedy_repetition, text_prompts
    from slm_cli.prune import count_params_after, prune_model

    def warn(line: str) -> None:
        ui.console.print(f"[bold yellow]warning:[/bold yellow] {line}", highlight=False)

    # --- setup -------------------------------------------------------------------------------
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    ui.console.print(ui.resolved_config_panel(resolved))
    source = Path(source_path)
    tokenizer = models.load_tokenizer(cfg.model.tokenizer or str(source), cfg.model.trust_remote_code, field="model.tokenizer" if cfg.model.tokenizer else "model.name_or_path")
    config = AutoConfig.from_pretrained(str(source), trust_remote_code=cfg.model.trust_remote_code)
    # computed in model.dtype (float32 by default: statistics, solver, refit), saved in the source's own
    # dtype, so a bf16 source gives a bf16 pruned checkpoint instead of one twice its size
    save_dtype = models.stored_dtype(config, source) or cfg.model.dtype
    plan, note = make_plan(cfg.prune, config)
    if note:
        ui.console.print(f"[bold]{note}[/bold]", highlight=False)
    predicted = count_params_after(config, plan)
    # `auto`: the task data the source artifact (or its nearest ancestor) was trained on, else a general
    # corpus with a warning: calibrating off the task throws much of the quality away
    calib_from, eval_from = resolve_sources(
        {"calibration.source": cfg.calibration.source, "eval.source": cfg.eval.source or None}, source,
        warn=warn, say=lambda line: ui.console.print(line, highlight=False),
    )
    calib_text = calibration_text(calib_from.source, cfg.seed)
    calib = calibration_rows(
        calib_text, tokenizer, cfg.calibration.samples, cfg.calibration.seq_len, source=calib_from.source, warn=warn,
    )
    batches = list(calib.split(cfg.calibration.batch_size))
    model = models.load_model(str(source), cfg.model.dtype, cfg.model.trust_remote_code, field="model.name_or_path").eval()
    eval_text = split_text(eval_from.source, "test", cfg.seed, eval_from.val_fraction) if eval_from else None

    def score(m, what: str) -> dict:
        with ui.progress(f"perplexity of {what}", unit="windows") as bar:
            return perplexity(
                m, tokenizer, eval_text, window=cfg.eval.window, stride=cfg.eval.stride,
                max_tokens=cfg.eval.max_tokens, batch_size=cfg.eval.batch_size, progress=bar.callback,
            )

    # A chat model answers the built-in questions in its own template: on those a healthy model does not loop
    # (dense SmolLM2-135M-Instruct: 9.7% of 4-grams), while continuing raw test text it may (70% on Python docs).
    prompts, prompt_kind = None, None
    if eval_text and cfg.eval.repetition_prompts and getattr(tokenizer, "chat_template", None):
        prompts, prompt_kind = chat_prompts(tokenizer)[: cfg.eval.repetition_prompts], "chat"
    elif eval_text and cfg.eval.repetition_prompts:
        prompts = text_prompts(eval_text, tokenizer, count=cfg.eval.repetition_prompts, prompt_tokens=64)
        prompt_kind = "text"

    def repetition(m, what: str) -> dict | None:
        """Share of repeated 4-grams in greedy replies to the prompts (loops of a pruned model), and the tokens
        generated: a model that answers with EOS at once scores 0 repeats over 0 tokens, which is no health sign."""
        if prompts is None:
            return None
        with ui.console.status(f"greedy replies to {len(prompts)} {prompt_kind} prompts by {what}"):
            return greedy_repetition(m, tokenizer, prompts, max_new_tokens=cfg.eval.repetition_tokens)

    # --- run ---------------------------------------------------------------------------------
    ppl_source = score(model, "the source") if eval_text else None
    repeated_source = repetition(model, "the source")
    # OSSCAR takes minutes per layer on real models: a bar with ETA, or a line every SLM_LOG_EVERY s off a terminal
    with ui.progress(f"pruning with {plan.method} ({len(calib)} x {calib.shape[1]} calibration tokens)", unit="layers") as bar:
        start = time.perf_counter()
        model, report = prune_model(model, batches, plan, progress=bar.callback)
        prune_seconds = time.perf_counter() - start
    if report.params_after != predicted:  # the surgery and the prediction disagree: a bug, never publish it
        raise SlmError(f"the pruned model has {report.params_after:,} parameters, {predicted:,} were predicted")
    out = artifacts.begin(cfg.output_dir, cfg.overwrite)
    models.save_model(model.to(models.torch_dtype(save_dtype)), tokenizer, out)
    del model
    ppl_pruned = repeated_pruned = None
    if eval_text:
        # the saved weights (rounded to save_dtype), computed in model.dtype as the source's were
        reloaded = models.load_model(str(out), cfg.model.dtype, cfg.model.trust_remote_code, field="output_dir").eval()
        ppl_pruned = score(reloaded, "the saved pruned checkpoint, loaded back")
        repeated_pruned = repetition(reloaded, "the pruned checkpoint")
        del reloaded
    ui.console.print(
        ui.records_table(
            f"{plan.method}: per-layer relative reconstruction error ||X W_hat - X W||^2 / ||X W||^2 "
            "(no refit = kept columns with their old weights)",
            layer_rows(report),
            ["layer", "source layer", "ffn kept", "ffn err (no refit)", "ffn err", "q heads kept",
             "attn err (no refit)", "attn err", "swaps"],
        )
    )

    # --- save --------------------------------------------------------------------------------
    pruned_cfg = models.read_config(out)
    metrics = {
        "method": plan.method,
        "params_before": report.params_before,
        "params_after": report.params_after,
        "params_ratio": report.params_after / report.params_before,
        "intermediate_size": pruned_cfg["intermediate_size"],
        "num_attention_heads": pruned_cfg["num_attention_heads"],
        "num_key_value_heads": pruned_cfg["num_key_value_heads"],
        "num_hidden_layers": pruned_cfg["num_hidden_layers"],
        "dropped_layers": report.dropped_layers,
        "prune_seconds": prune_seconds,
        "calibration_rows": int(calib.shape[0]),
        "calibration_seq_len": int(calib.shape[1]),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "compute_dtype": cfg.model.dtype,
        "saved_dtype": save_dtype,
    }
    if ppl_source is not None:
        metrics.update({
            "eval_tokens": ppl_source["tokens"],
            "eval_window": ppl_source["window"],
            "eval_stride": ppl_source["stride"],
            "perplexity_source": ppl_source["perplexity"],
            "perplexity_pruned": ppl_pruned["perplexity"],
            "perplexity_increase_pct": 100.0 * (ppl_pruned["perplexity"] / ppl_source["perplexity"] - 1.0),
        })
        if repeated_source is not None:
            metrics.update({
                "repeated_4grams_source": repeated_source["repeated_ngrams"],
                "repeated_4grams_pruned": repeated_pruned["repeated_ngrams"],
                "repetition_new_tokens_source": repeated_source["new_tokens"],
                "repetition_new_tokens_pruned": repeated_pruned["new_tokens"],
                "repetition_prompts": len(prompts),
                "repetition_prompt_kind": prompt_kind,
                "repetition_tokens": cfg.eval.repetition_tokens,
            })
        if not math.isfinite(metrics["perplexity_pruned"]):
            ui.console.print("[bold yellow]warning:[/bold yellow] the pruned model's perplexity is not finite")
    calibration = {**calibration_record(calib_from, calib_text, calib), "eval_source": eval_from.source if eval_from else None}
    artifacts.write_metadata(
        out, stage="prune", config=resolved, parents=[artifacts.parent("source", source)], metrics=metrics,
        extra={
            "pruning": {**report.to_dict(), "plan": dataclasses.asdict(plan), "target_note": note},
            "calibration": calibration,
            "trust_remote_code": cfg.model.trust_remote_code,
        },
    )
    final = artifacts.commit(out, cfg.output_dir, cfg.overwrite)
    ui.console.print(ui.kv_table(f"prune artifact: {final}", ui.metric_rows(metrics)))
    return metrics
