"""Publish a trained model as an artifact: the last step of every training stage (rank 0 only)."""

from __future__ import annotations

import json

from slm_cli import artifacts, models, ui


def publish_trained(engine, state_dict, *, cfg, resolved: dict, tokenizer, ds_config: dict, stage: str,
                    metrics: dict, parents: list[dict], extra: dict | None = None) -> dict:
    """Write the trained model (LoRA merged unless asked otherwise) + slm.json into staging, then publish it.

    `state_dict` is the consolidated one (ZeRO-3) or None to take the module's own. Returns the
    metrics recorded in slm.json.
    """
    out = artifacts.staging_dir(cfg.output_dir)
    to_save, lora = engine.module, cfg.train.lora
    if lora.enabled and lora.merge:
        to_save, state_dict = to_save.merge_and_unload(), None
    elif lora.enabled:  # base weights plus the adapter beside them
        to_save.save_pretrained(out / "adapter")
        to_save, state_dict = to_save.get_base_model(), None
    models.save_model(to_save, tokenizer, out, state_dict=state_dict)
    (out / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=2))
    (out / "metrics.jsonl").write_text((artifacts.work_dir(cfg.output_dir) / "metrics.jsonl").read_text())
    metrics = {**metrics, "params": models.count_params(to_save)}
    artifacts.write_metadata(
        out, stage=stage, config=resolved, parents=parents, metrics=metrics,
        extra={"trust_remote_code": cfg.model.trust_remote_code, **(extra or {})},
    )
    final = artifacts.commit(out, cfg.output_dir, cfg.overwrite)
    ui.console.print(ui.kv_table(f"{stage} artifact: {final}", ui.metric_rows(metrics)))
    return metrics
