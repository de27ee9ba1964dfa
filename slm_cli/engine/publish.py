"""Publish a trained model as an artifact: the last step of every training stage (rank 0 only)."""

from __future__ import annotations

import json
from pathlib import Path

from slm_cli import artifacts, models, pretrained, ui


def publish_trained(engine, state_dict, *, cfg, resolved: dict, tokenizer, ds_config: dict, stage: str,
                    metrics: dict, parents: list[dict], extra: dict | None = None) -> dict:
    """Write the trained model (LoRA merged unless asked otherwise) + slm.json into staging, then publish it.

    `state_dict` is the consolidated one (ZeRO-3) or None to take the module's own. Returns the
    metrics recorded in slm.json.
    """
    out = artifacts.staging_dir(cfg.output_dir)
    to_save, lora = engine.module, cfg.train.lora
    adapter = None
    if lora.enabled and lora.merge:
        to_save, state_dict = to_save.merge_and_unload(), None
    elif lora.enabled:
        to_save, adapter = save_adapter(to_save, out, cfg.output_dir)
        state_dict = None
    models.save_model(to_save, tokenizer, out, state_dict=state_dict)
    (out / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=2))
    (out / "metrics.jsonl").write_text((artifacts.work_dir(cfg.output_dir) / "metrics.jsonl").read_text())
    metrics = {**metrics, "params": models.count_params(to_save)}
    artifacts.write_metadata(
        out, stage=stage, config=resolved, parents=parents, metrics=metrics,
        extra={"trust_remote_code": cfg.model.trust_remote_code, **({"adapter": adapter} if adapter else {}), **(extra or {})},
    )
    final = artifacts.commit(out, cfg.output_dir, cfg.overwrite)
    ui.console.print(ui.kv_table(f"{stage} artifact: {final}", ui.metric_rows(metrics)))
    return metrics


def save_adapter(peft_model, out, output_dir) -> tuple:
    """Write the LoRA adapter into `out` as a standard PEFT adapter beside a clean base; returns (base, record).

    The artifact is the untouched base checkpoint (standard names) plus adapter_config.json +
    adapter_model.safetensors. `AutoModelForCausalLM.from_pretrained(artifact)` loads the base and,
    finding the adapter beside it, attaches it (transformers 5 with peft installed);
    `peft.AutoPeftModelForCausalLM.from_pretrained(artifact)` loads it too. peft loads the
    base from the config's `base_model_name_or_path` as given (a relative path would be read from
    the caller's working folder), so it names the artifact's own final, absolute path; slm's loader
    ignores it and always takes the base beside the adapter, so a moved artifact still loads in slm.
    The record goes into slm.json.
    """
    peft_model.peft_config["default"].base_model_name_or_path = str(Path(output_dir).absolute())
    peft_model.save_pretrained(out, save_embedding_layers=False)  # "auto" would look the base up, on the hub too
    (out / "README.md").unlink(missing_ok=True)  # peft's blank model-card template; slm.json records the artifact
    record = {
        "kind": "lora", "merged": False, "files": [pretrained.ADAPTER_CONFIG, pretrained.ADAPTER_WEIGHTS],
        "params": models.count_params(peft_model, trainable_only=True),
        "note": "base checkpoint + PEFT adapter; slm merges the adapter on load",
    }
    # unload() takes the LoRA layers out without merging: the base layers come back with their own names
    return peft_model.unload(), record
