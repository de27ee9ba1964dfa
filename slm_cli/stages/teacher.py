"""`slm teacher`: supervised fine-tuning of the teacher on the task.

Reads top to bottom: setup (data, tokenizer, model, DeepSpeed engine) -> run (the training
loop) -> save (consolidated HF folder + slm.json, published atomically).
"""

from __future__ import annotations

import hydra

from slm_cli.config.schema import TeacherStageConfig
from slm_cli.paths import CONFIG_DIR
from slm_cli.runner import run_stage


@hydra.main(config_path=str(CONFIG_DIR), config_name="teacher", version_base="1.3")
def main(cfg) -> None:
    run_stage(cfg, TeacherStageConfig, run, check=check_inputs)


def check_inputs(cfg: TeacherStageConfig) -> None:
    """The model folders (or hub ids) this stage reads, checked before anything heavy is imported and,
    for a multi-process run, before the launcher starts: a bad one fails in about a second."""
    from slm_cli.pretrained import check_model_folder

    if cfg.model.name_or_path:
        check_model_folder(cfg.model.name_or_path, "model.name_or_path", tokenizer=not cfg.model.tokenizer, quantized_ok=False)


def run(cfg: TeacherStageConfig, resolved: dict) -> dict:
    from dataclasses import asdict
    from functools import partial

    from slm_cli import artifacts, models, ui
    from slm_cli.data import load_splits
    from slm_cli.data.tokenize import check_batch_fits, collate, encode_dataset, pack_examples
    from slm_cli.engine import distributed as dist
    from slm_cli.engine import loop, memory
    from slm_cli.engine.logging import quiet_libraries
    from slm_cli.engine.publish import publish_trained
    from slm_cli.pretrained import resolve_model_path

    # --- setup -------------------------------------------------------------------------------
    quiet_libraries()
    dist.setup_env()
    loop.seed_everything(cfg.seed)
    if dist.is_main():
        ui.console.print(ui.resolved_config_panel(resolved))
    splits = load_splits(
        cfg.data.source,
        train_size=cfg.data.train_size,
        val_size=cfg.data.val_size,
        test_size=cfg.data.test_size,
        val_fraction=cfg.data.val_fraction,
        seed=cfg.seed,
        subset=cfg.data.subset,
    )
    tokenizer = models.resolve_tokenizer(cfg.model, splits["train"])
    if cfg.model.name_or_path:
        model = models.load_model(cfg.model.name_or_path, cfg.model.dtype, cfg.model.trust_remote_code)
    else:
        model = models.build_model(cfg.model, tokenizer)
    if cfg.train.lora.enabled:
        model = models.apply_lora(model, cfg.train.lora)
    train_set, train_stats = encode_dataset(splits["train"], tokenizer, cfg.data.max_seq_len)
    if cfg.data.packing:
        train_set = pack_examples(train_set, cfg.data.max_seq_len, train_stats)
    batch_fn = partial(collate, pad_token_id=tokenizer.pad_token_id)
    # under train.memory_budget_gb: measure the micro-batch that fits (micro_batch_size=auto) or check the one given
    memory_fit = memory.fit_stage(cfg, len(train_set), memory.engine_probe(cfg, model, train_set, batch_fn))
    check_batch_fits(len(train_set), cfg.train.micro_batch_size, dist.world_size())
    val_set, _ = encode_dataset(splits["validation"], tokenizer, cfg.data.max_seq_len, split="validation")
    engine, ds_config = loop.initialize(model, cfg.train, cfg.deepspeed)
    if dist.is_main():
        artifacts.begin(cfg.output_dir, cfg.overwrite)
        ui.console.print(ui.setup_table("teacher", model, tokenizer, train_stats, len(val_set), ds_config))

    # --- run ---------------------------------------------------------------------------------
    with ui.training_progress(dist.is_main()) as progress:
        result = loop.train(
            engine,
            train_set=train_set,
            val_set=val_set,
            collate=batch_fn,
            tcfg=cfg.train,
            seed=cfg.seed,
            work_dir=artifacts.work_dir(cfg.output_dir),
            resume=cfg.resume,
            config_hash=artifacts.config_fingerprint(resolved),
            description="teacher",
            progress=progress,
        )

    # --- save --------------------------------------------------------------------------------
    state_dict = loop.consolidated_state_dict(engine, cfg.deepspeed.zero_stage)  # every rank takes part
    metrics = result.metrics
    if dist.is_main():
        parents = [artifacts.parent("base_model", resolve_model_path(cfg.model.name_or_path))] if cfg.model.name_or_path else []
        metrics = publish_trained(
            engine, state_dict, cfg=cfg, resolved=resolved, tokenizer=tokenizer, ds_config=ds_config,
            stage="teacher", metrics={**result.metrics, "data": asdict(train_stats)}, parents=parents,
            extra={"memory": memory_fit.record()} if memory_fit else None,
        )
    dist.barrier()
    return metrics
