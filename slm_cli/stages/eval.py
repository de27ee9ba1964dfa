"""`slm eval`: score a model on a task or corpus, print a table, write eval.json.

Reads top to bottom: setup (model folder -> model and tokenizer; data split -> records or text;
the metric that fits them) -> run (perplexity, exact match or yes/no AUC from slm_cli.evaluate) ->
save (eval.json and predictions.jsonl in output_dir; with eval.write_to_artifact=true, the
metrics also go into the artifact's slm.json under metrics.eval.<source>).

Evaluation does not train: one process, no DeepSpeed, no gradients.
"""

from __future__ import annotations

import hydra

from slm_cli.config.schema import EvalStageConfig
from slm_cli.paths import CONFIG_DIR
from slm_cli.runner import run_stage

EVAL_FILE = "eval.json"
PREDICTIONS_FILE = "predictions.jsonl"


@hydra.main(config_path=str(CONFIG_DIR), config_name="eval", version_base="1.3")
def main(cfg) -> None:
    run_stage(cfg, EvalStageConfig, run)


def run(cfg: EvalStageConfig, resolved: dict) -> dict:
    from slm_cli.pretrained import check_model_folder

    # the model folder or hub id first, before the heavy imports below: a bad one fails in about a second
    check_model_folder(cfg.model.name_or_path, "model.name_or_path", tokenizer=not cfg.model.tokenizer)
    if cfg.eval.write_to_artifact:
        _check_is_artifact(cfg.model.name_or_path)

    import json
    import time
    from pathlib import Path

    import torch
    from transformers.utils.logging import disable_progress_bar

    from slm_cli import artifacts, models, ui
    from slm_cli.data.corpus import write_atomic
    from slm_cli.engine.logging import quiet_libraries
    from slm_cli.errors import SlmError
    from slm_cli.evaluate import exact_match, perplexity, yes_no_auc
    from slm_cli.evaluate.heldout import completion_cross_entropy
    from slm_cli.evaluate.sources import choose_metric, load_eval_data
    from slm_cli.pretrained import resolve_model_path

    # --- setup -------------------------------------------------------------------------------
    started = time.time()
    quiet_libraries()
    disable_progress_bar()  # transformers' per-tensor loading bars; slm shows its own progress
    ui.console.print(ui.resolved_config_panel(resolved))
    data = load_eval_data(
        cfg.data.source,
        cfg.eval.split,
        cfg.data.test_size if cfg.eval.split == "test" else cfg.data.val_size,
        cfg.seed,
        cfg.data.val_fraction,
    )
    metric = choose_metric(data, cfg.eval.metric)
    name, dtype, trust = cfg.model.name_or_path, cfg.eval.dtype or cfg.model.dtype, cfg.model.trust_remote_code
    tokenizer_name = cfg.model.tokenizer or name
    field = "model.name_or_path"
    if not trust:
        _refuse_checkpoint_code(name)
    with ui.console.status(f"loading {name}"):
        path = resolve_model_path(name)
        for warning in artifacts.lineage_warnings(path) if Path(path).is_dir() else []:
            ui.console.print(f"[bold yellow]warning:[/bold yellow] {warning}", highlight=False)
        model = models.load_model(path, dtype, trust, field=field).eval()
        try:
            tokenizer_field = "model.tokenizer" if cfg.model.tokenizer else field
            tokenizer = models.load_tokenizer(resolve_model_path(tokenizer_name), trust, field=tokenizer_field)
        except OSError as exc:
            raise SlmError(
                f"no tokenizer could be loaded from {tokenizer_name} ({exc}); "
                "save one beside the weights or name a tokenizer folder with model.tokenizer=..."
            ) from exc
    if torch.cuda.is_available():  # inference only: one GPU if there is one, else the CPU
        model.to("cuda")
    ui.console.print(
        ui.kv_table(
            "eval: setup",
            [
                ("model", name),
                ("folder", path),
                ("parameters", models.count_params(model)),
                ("dtype", dtype),
                ("device", str(next(model.parameters()).device)),
                ("data", f"{data.source} ({data.kind}), {data.split} split, {data.size}"),
                ("metric", metric),
            ],
        )
    )

    # --- run ---------------------------------------------------------------------------------
    # a bar with ETA on a terminal; off one, a line every SLM_LOG_EVERY seconds
    unit = {"perplexity": "windows", "exact_match": "prompts"}.get(metric, "completions")
    with ui.progress(metric, unit=unit) as bar:
        advance = bar.callback
        if metric == "perplexity":
            result = perplexity(
                model, tokenizer, data.text, window=cfg.eval.window, stride=cfg.eval.stride,
                max_tokens=cfg.eval.max_tokens, batch_size=cfg.eval.batch_size, progress=advance,
            )
            rows: list[dict] = []
        elif metric == "exact_match":
            result = exact_match(
                model, tokenizer, data.task, data.examples, batch_size=cfg.eval.batch_size,
                max_new_tokens=cfg.eval.max_new_tokens, few_shot=cfg.eval.few_shot, stop=tuple(cfg.eval.stop),
                seed=cfg.seed, progress=advance, chat=cfg.eval.chat,
            )
            rows = result.pop("predictions")
        elif metric == "completion_ce":  # what slm report shows for every artifact (slm_cli/evaluate/heldout.py)
            result = completion_cross_entropy(
                model, tokenizer, data.examples, cfg.data.max_seq_len, batch_size=cfg.eval.batch_size, progress=advance,
            )
            rows = []
        else:
            result = yes_no_auc(model, tokenizer, data.examples, batch_size=cfg.eval.batch_size, choices=data.choices,
                                progress=advance)
            scores = result.pop("scores")
            rows = [{"prompt": ex["prompt"], "label": ex["label"], "log_odds": s} for ex, s in zip(data.examples, scores)]
    seconds = time.time() - started

    # --- save --------------------------------------------------------------------------------
    out = Path(cfg.output_dir)
    staging = artifacts.begin(out, cfg.overwrite)  # published in one rename below, like every slm output
    settings = _settings(cfg, metric)
    report = {
        "model": name,
        "model_path": str(Path(path).resolve()) if Path(path).exists() else path,
        "source": data.source,
        "split": data.split,
        "metric": metric,
        "metrics": result,
        "settings": settings,
        "seconds": round(seconds, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": resolved,
        "versions": artifacts.versions(),
        "slm_output": artifacts.output_stamp("eval"),
    }
    write_atomic(staging / EVAL_FILE, json.dumps(report, indent=2, default=str) + "\n")
    if rows:
        write_atomic(staging / PREDICTIONS_FILE, "".join(json.dumps(r, default=str) + "\n" for r in rows))
    artifacts.commit(staging, out, cfg.overwrite)
    if cfg.eval.write_to_artifact:
        merge_into_artifact(cfg.model.name_or_path, data.source, {**result, "split": data.split, "metric": metric, **settings})
    ui.console.print(ui.kv_table(f"eval: {data.source}, {data.split} split", ui.metric_rows(result)))
    ui.console.print(f"results: {out / EVAL_FILE}")
    return result


def _settings(cfg: EvalStageConfig, metric: str) -> dict:
    """The settings that change the number, stored beside it."""
    e = cfg.eval
    if metric == "perplexity":
        return {"window": e.window, "stride": e.stride, "max_tokens": e.max_tokens}
    if metric == "exact_match":
        return {"few_shot": e.few_shot, "chat": e.chat, "max_new_tokens": e.max_new_tokens, "stop": list(e.stop), "seed": cfg.seed}
    if metric == "completion_ce":
        return {"max_seq_len": cfg.data.max_seq_len, "seed": cfg.seed}
    return {"seed": cfg.seed}


def _refuse_checkpoint_code(folder: str) -> None:
    """slm eval never runs code shipped in the model folder unless model.trust_remote_code=true says so.

    An artifact's own slm.json saying trust_remote_code=true is no permission: anyone can write
    that file. A folder whose config.json maps the model to its own code (auto_map) is refused
    with the command that loads it knowingly.
    """
    import json
    from pathlib import Path

    from slm_cli.errors import SlmError

    config = Path(folder) / "config.json"
    if config.is_file() and "auto_map" in json.loads(config.read_text()):
        raise SlmError(
            f"model.name_or_path={folder} ships its own model code (auto_map in config.json), which slm eval does "
            "not run unless you ask. If you trust its source, add model.trust_remote_code=true"
        )


def merge_into_artifact(folder: str, source: str, metrics: dict) -> None:
    """Set slm.json's metrics.eval.<source> to `metrics`, keeping everything else; atomic rewrite."""
    import json
    from pathlib import Path

    from slm_cli import artifacts
    from slm_cli.data.corpus import write_atomic

    meta = _check_is_artifact(folder)
    meta.setdefault("metrics", {}).setdefault("eval", {})[source] = metrics
    write_atomic(Path(folder) / artifacts.METADATA_FILE, json.dumps(meta, indent=2, default=str))


def _check_is_artifact(folder: str) -> dict:
    """eval.write_to_artifact needs an slm.json to write into; checked before evaluating, not after."""
    from slm_cli import artifacts
    from slm_cli.errors import SlmError

    meta = artifacts.read_metadata(folder, missing_ok=True)
    if meta is None:
        raise SlmError(
            f"eval.write_to_artifact=true but {folder} has no {artifacts.METADATA_FILE} (not an slm artifact): "
            "there is nothing to write the metrics into. Drop eval.write_to_artifact; eval.json holds the results."
        )
    return meta
