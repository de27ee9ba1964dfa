"""`slm distill`: the student learns the teacher's next-token distributions.

Modes (`distill.mode`): `supervised` (KD on the dataset's completions; with kd_weight < 1 mixed
with cross-entropy on them), `on_policy` (the student samples completions, the teacher scores
every token), `sequence_level` (the teacher samples), `mixed` (GKD's lambda: a fraction of
micro-batches on-policy). The paper's recipe runs supervised first, then on-policy from that
artifact: `recipes/distill/`. Setup -> run -> save, top to bottom, like the other stages.
"""

from __future__ import annotations

import hydra

from slm_cli.config.schema import DistillStageConfig
from slm_cli.paths import CONFIG_DIR
from slm_cli.runner import run_stage


@hydra.main(config_path=str(CONFIG_DIR), config_name="distill", version_base="1.3")
def main(cfg) -> None:
    run_stage(cfg, DistillStageConfig, run, check=check_inputs)


def check_inputs(cfg: DistillStageConfig) -> None:
    """The model folders (or hub ids) this stage reads, checked before anything heavy is imported and,
    for a multi-process run, before the launcher starts: a bad one fails in about a second."""
    from slm_cli.pretrained import check_model_folder

    for field, path in (("teacher.name_or_path", cfg.teacher.name_or_path), ("model.name_or_path", cfg.model.name_or_path)):
        if path:
            check_model_folder(path, field, quantized_ok=False)


def run(cfg: DistillStageConfig, resolved: dict) -> dict:
    from dataclasses import asdict
    from functools import partial

    from slm_cli import artifacts, models, ui
    from slm_cli.data import load_splits
    from slm_cli.data.tokenize import check_batch_fits, collate, encode_dataset
    from slm_cli.distill.losses import check_vocab
    from slm_cli.distill.objective import KDObjective, make_prepare
    from slm_cli.distill.sampler import GenerationCopy
    from slm_cli.engine import distributed as dist
    from slm_cli.engine import loop, memory
    from slm_cli.engine.logging import quiet_libraries
    from slm_cli.engine.publish import publish_trained
    from slm_cli.errors import SlmError

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
    teacher_tok = models.load_tokenizer(cfg.teacher.name_or_path, cfg.model.trust_remote_code, field="teacher.name_or_path")
    teacher = models.load_model(cfg.teacher.name_or_path, cfg.teacher.dtype, cfg.model.trust_remote_code, field="teacher.name_or_path")
    teacher.requires_grad_(False).eval()
    if cfg.model.name_or_path:
        tokenizer = models.load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code, field="model.name_or_path")
        model = models.load_model(cfg.model.name_or_path, cfg.model.dtype, cfg.model.trust_remote_code, field="model.name_or_path")
    else:
        tokenizer = teacher_tok
        model = models.build_model(cfg.model, tokenizer)
    if not models.tokenizers_match(tokenizer, teacher_tok):
        raise SlmError(
            f"student tokenizer ({len(tokenizer)} tokens, model.name_or_path={cfg.model.name_or_path}) differs from the teacher's "
            f"({len(teacher_tok)} tokens, teacher.name_or_path={cfg.teacher.name_or_path}); token-level distillation needs one vocabulary."
        )
    try:
        vocab_size = check_vocab(model.config.vocab_size, teacher.config.vocab_size, len(tokenizer), len(teacher_tok))
    except ValueError as exc:
        raise SlmError(f"student and teacher vocabularies do not fit together: {exc}") from exc
    if cfg.train.lora.enabled:
        model = models.apply_lora(model, cfg.train.lora)
    train_set, train_stats = encode_dataset(splits["train"], tokenizer, cfg.data.max_seq_len)
    batch_fn = partial(collate, pad_token_id=tokenizer.pad_token_id)
    # ZeRO-3 shards the student; it samples through a whole copy taken before partitioning
    student_copy = None
    if cfg.deepspeed.zero_stage == 3 and cfg.distill.mode in ("on_policy", "mixed"):
        student_copy = GenerationCopy(model)

    def probe(tcfg) -> float:
        # In a forked child: the student's engine, the teacher and its forwards, sampling included. With
        # teacher.logits=precompute this is an upper bound: the run itself drops the teacher for its cache.
        engine, ds_config = loop.initialize(model, tcfg, cfg.deepspeed)
        frozen = teacher.to(engine.device)
        if cfg.deepspeed.zero_stage == 3:
            frozen = loop.partition_frozen(frozen, ds_config)
        objective = KDObjective(frozen, cfg.distill, vocab_size, fused=cfg.distill.fused_loss)
        prepare = make_prepare(
            cfg.distill.mode, cfg.distill, student_engine=engine, teacher=frozen, pad_id=tokenizer.pad_token_id,
            eos_id=tokenizer.eos_token_id, seed=cfg.seed, student_copy=student_copy, teacher_synced=False,
        )
        return memory.probe_steps(engine, train_set=train_set, collate=batch_fn, tcfg=tcfg, seed=cfg.seed,
                                  loss_fn=objective, prepare=prepare)

    # under train.memory_budget_gb: measure the micro-batch that fits (micro_batch_size=auto) or check the one given
    memory_fit = memory.fit_stage(cfg, len(train_set), probe)
    check_batch_fits(len(train_set), cfg.train.micro_batch_size, dist.world_size())
    val_set, _ = encode_dataset(splits["validation"], tokenizer, cfg.data.max_seq_len, split="validation")
    engine, ds_config = loop.initialize(model, cfg.train, cfg.deepspeed)
    teacher.to(engine.device)
    teacher_metrics = {}
    if cfg.teacher.logits == "precompute":
        objective, teacher_metrics = _cached_objective(cfg, teacher, train_set + val_set, batch_fn, vocab_size)
        teacher = None  # supervised mode never samples from it; the cache replaces it from here on
    else:
        if cfg.deepspeed.zero_stage == 3:
            # sharded like the student, not one whole copy per rank
            teacher = loop.partition_frozen(teacher, ds_config)
            teacher_metrics["teacher_zero3"] = loop.param_counts(teacher.module)
        objective = KDObjective(teacher, cfg.distill, vocab_size, fused=cfg.distill.fused_loss)
    prepare = make_prepare(
        cfg.distill.mode, cfg.distill, student_engine=engine, teacher=teacher,
        pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id, seed=cfg.seed, student_copy=student_copy,
        teacher_synced=cfg.deepspeed.zero_stage == 3 and dist.world_size() > 1,
    )
    if dist.is_main():
        artifacts.begin(cfg.output_dir, cfg.overwrite)
        ui.console.print(ui.setup_table(f"distill ({cfg.distill.mode}, {cfg.distill.divergence})", model, tokenizer,
                                        train_stats, len(val_set), ds_config))

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
            loss_fn=objective,
            prepare=prepare,
            description=f"distill {cfg.distill.mode}",
            progress=progress,
        )

    # --- save --------------------------------------------------------------------------------
    state_dict = loop.consolidated_state_dict(engine, cfg.deepspeed.zero_stage)  # every rank takes part
    metrics = result.metrics
    if dist.is_main():
        parents = [artifacts.parent("teacher", cfg.teacher.name_or_path)]
        if cfg.model.name_or_path:
            parents.append(artifacts.parent("student", cfg.model.name_or_path))
        metrics = publish_trained(
            engine, state_dict, cfg=cfg, resolved=resolved, tokenizer=tokenizer, ds_config=ds_config,
            stage="distill", metrics={**result.metrics, **teacher_metrics, "data": asdict(train_stats)}, parents=parents,
            extra={"mode": cfg.distill.mode, **({"memory": memory_fit.record()} if memory_fit else {})},
        )
    dist.barrier()
    return metrics


def _cached_objective(cfg: DistillStageConfig, teacher, examples: list, batch_fn, vocab_size: int):
    """Write (or reuse) the teacher's top-k cache in <output_dir>.work/teacher_logits and build the cached loss.

    Log-probs are stored as float16, or float32 when k covers the whole vocabulary (then the
    cached loss is meant to equal the online one). Rank 0 writes; every rank reads.
    """
    import torch

    from slm_cli import artifacts, ui
    from slm_cli.distill import logit_cache
    from slm_cli.distill.objective import CachedKDObjective
    from slm_cli.engine import distributed as dist
    from slm_cli.errors import SlmError

    k = cfg.teacher.logits_top_k
    if k > vocab_size:
        raise SlmError(f"teacher.logits_top_k={k} is larger than the shared vocabulary ({vocab_size}); use at most {vocab_size}.")
    dtype = torch.float32 if k == vocab_size else torch.float16
    cache_dir = artifacts.work_dir(cfg.output_dir) / "teacher_logits"
    if dist.is_main():
        teacher_hash = artifacts.content_hash(cfg.teacher.name_or_path)
        want = dict(k=k, vocab_size=vocab_size, kd_temperature=cfg.distill.kd_temperature, dtype=dtype)
        if not logit_cache.cache_matches(logit_cache.read_index(cache_dir), teacher_hash=teacher_hash, examples=examples, **want):
            # the teacher runs over the whole training set once: minutes to hours for a real teacher
            with ui.progress(f"teacher logits (top-{k} cache)", unit="examples") as bar:
                logit_cache.write_cache(
                    teacher, examples, cache_dir, collate=batch_fn, batch_size=cfg.train.micro_batch_size,
                    teacher_hash=teacher_hash, progress=bar.callback, **want,
                )
    dist.barrier()
    cache = logit_cache.TeacherLogitCache(cache_dir)
    index = cache.index
    if dist.is_main():
        ui.console.print(
            f"teacher logits cache: {cache_dir} ({index['tokens']} target tokens, top-{k}, {index['dtype']}, "
            f"{index['bytes_per_token']} bytes/token)"
        )
    metrics = {"teacher_cache_bytes_per_token": index["bytes_per_token"], "teacher_cache_tokens": index["tokens"]}
    return CachedKDObjective(cache, cfg.distill, vocab_size), metrics
