"""The one training loop, over the DeepSpeed engine, for the teacher, student and distill stages.

Loss normalisation. A step accumulates `grad_accum` micro-batches on each of `world` ranks.
The loss of a step is (sum of per-token losses over every target token of the step) /
(number of those tokens), the same value one big batch of the same tokens would give.
Each micro-batch therefore contributes `sum_i / total_tokens`; DeepSpeed divides what we
pass to `backward` by `grad_accum` and averages gradients over ranks, so we hand it
`sum_i / total_tokens * grad_accum * world`.

Data order is a pure function of (seed, step): micro-batch k of the run is slice k of a
seeded permutation of the epoch, so resuming at step s needs no loader state.
"""

from __future__ import annotations

import json
import math
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from slm_cli import faults
from slm_cli.engine import checkpoint, cpu_adam
from slm_cli.engine import distributed as dist
from slm_cli.engine.dsconfig import ADAM_BETAS, ADAM_EPS, build_ds_config, hidden_size_of
from slm_cli.errors import SlmError

LossFn = Callable[[Any, dict], tuple[torch.Tensor, dict]]


def sft_loss(engine, batch: dict) -> tuple[torch.Tensor, dict]:
    """Summed next-token cross-entropy over target tokens (labels != -100)."""
    # A packed batch (data.packing) passes position_ids that restart per example and no padding mask:
    # transformers then masks attention block-diagonally, one block per example (see data/tokenize.py).
    packed = "position_ids" in batch
    out = engine(
        input_ids=batch["input_ids"], attention_mask=None if packed else batch["attention_mask"],
        position_ids=batch.get("position_ids"), use_cache=False,
    )
    logits = out.logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    loss_sum = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100, reduction="sum")
    return loss_sum, {"ce": loss_sum.detach()}


def target_tokens(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


def lr_lambda(tcfg) -> Callable[[int], float]:
    """Linear warm-up to the peak, then cosine / linear decay to `min_lr_ratio`, or constant."""

    def factor(step: int) -> float:
        if step < tcfg.warmup_steps:
            return (step + 1) / (tcfg.warmup_steps + 1)
        span = max(1, tcfg.max_steps - tcfg.warmup_steps)
        progress = min(1.0, (step - tcfg.warmup_steps) / span)
        lo = tcfg.min_lr_ratio
        if tcfg.lr_schedule == "cosine":
            return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * progress))
        if tcfg.lr_schedule == "linear":
            return lo + (1 - lo) * (1 - progress)
        return 1.0

    return factor


class MicroBatches:
    """Deterministic, resumable micro-batches: micro-batch k is a pure function of (seed, k)."""

    def __init__(self, dataset: list, micro_batch_size: int, seed: int, collate: Callable):
        self.dataset, self.mb, self.seed, self.collate = dataset, micro_batch_size, seed, collate
        self.rank, self.world = dist.rank(), dist.world_size()
        self.per_epoch = len(dataset) // (micro_batch_size * self.world)
        if self.per_epoch == 0:
            raise SlmError(
                f"the training set has {len(dataset)} examples, fewer than one batch "
                f"(train.micro_batch_size={micro_batch_size} x {self.world} process(es)); add data or lower the batch size."
            )
        self._perm_epoch, self._perm = -1, None

    def __call__(self, k: int) -> dict:
        epoch, j = divmod(k, self.per_epoch)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(len(self.dataset), generator=g), epoch
        start = (j * self.world + self.rank) * self.mb
        return self.collate([self.dataset[int(i)] for i in self._perm[start : start + self.mb]])


@dataclass
class LoopResult:
    engine: Any
    steps: int
    metrics: dict = field(default_factory=dict)
    history: list = field(default_factory=list)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate_loss(engine, dataset: list, collate: Callable, micro_batch_size: int, max_batches: int, loss_fn: LossFn) -> float:
    """Per-token loss over the first `max_batches` micro-batches of `dataset`, sharded over ranks."""
    was_training = engine.module.training
    engine.eval()
    rank, world = dist.rank(), dist.world_size()
    total = torch.zeros(2, dtype=torch.float64)
    n_batches = min(max_batches, math.ceil(len(dataset) / micro_batch_size))
    for b in range(rank, n_batches + (-n_batches % world), world):
        # every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively)
        idx = range(b * micro_batch_size, min((b + 1) * micro_batch_size, len(dataset)))
        batch = _to_device(collate([dataset[i] for i in (idx if b < n_batches else range(micro_batch_size))]), engine.device)
        loss_sum, _ = loss_fn(engine, batch)
        if b < n_batches:
            total += torch.tensor([float(loss_sum), target_tokens(batch)], dtype=torch.float64)
    dist.all_reduce_sum(total)
    if was_training:
        engine.train()
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def initialize(model: torch.nn.Module, tcfg, dcfg):
    """Wrap `model` in a DeepSpeed engine configured from the `train` and `deepspeed` groups."""
    import deepspeed

    from slm_cli.engine.ops import clear_stale_locks, use_private_extensions_dir

    dist.setup_env()
    use_private_extensions_dir()
    clear_stale_locks()  # a lock left by a killed build would make the op load below wait forever
    if tcfg.gradient_checkpointing:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.config.use_cache = False
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ds_config = build_ds_config(tcfg, dcfg, dist.world_size(), hidden_size=hidden_size_of(getattr(model, "config", None)))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = None
    if "optimizer" not in ds_config:
        optimizer = torch.optim.AdamW(params, lr=tcfg.lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=tcfg.weight_decay)
    lr_scheduler = None  # DeepSpeed then builds the config's scheduler block (train.lr_schedule=deepspeed)
    if "scheduler" not in ds_config:
        schedule = lr_lambda(tcfg)
        lr_scheduler = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule)  # noqa: E731
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=params,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        config=ds_config,
    )
    return engine, ds_config


def partition_frozen(model: torch.nn.Module, student_ds_config: dict):
    """Shard a frozen model (the teacher) across ranks under ZeRO-3 instead of copying it per rank.

    Returns the DeepSpeed engine: call it like the model (each layer's weights are gathered for
    its forward, then freed) and keep it alive as long as the model is used. Every rank must run
    the same forwards, as for the student. The model is loaded whole on each rank first and
    partitioned here, so the saving is for the whole run, not the loading peak.
    """
    import deepspeed

    from slm_cli.engine.dsconfig import frozen_zero3_config

    config = frozen_zero3_config(
        student_ds_config, bf16=next(model.parameters()).dtype == torch.bfloat16, hidden_size=model.config.hidden_size
    )
    engine, _, _, _ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def param_counts(module: torch.nn.Module) -> dict[str, int]:
    """Parameters of `module` in all, and those this rank holds (differs under ZeRO-3 partitioning)."""
    total = local = 0
    for p in module.parameters():
        total += getattr(p, "ds_numel", p.numel())
        local += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
    return {"params": total, "params_on_this_rank": local}


def train(
    engine,
    *,
    train_set: list,
    val_set: list,
    collate: Callable,
    tcfg,
    seed: int,
    work_dir: Path,
    resume: bool | str,
    loss_fn: LossFn = sft_loss,
    config_hash: str = "",
    prepare: Callable[[dict, int], dict] | None = None,
    description: str = "train",
    progress=None,
) -> LoopResult:
    """Run `tcfg.max_steps` optimizer steps; checkpoint, evaluate and log as configured.

    `prepare(batch, k)` may replace micro-batch k before its target tokens are counted (the
    distill stage swaps in completions the student samples itself). Evaluation always uses
    the dataset's own batches.

    `resume`: True continues from the last checkpoint (an error if there is none); "auto" does
    so when an unfinished run of the same config (`config_hash`) left one; False starts afresh.
    """
    ckpt_dir = Path(work_dir) / "checkpoints"
    metrics_path = Path(work_dir) / "metrics.jsonl"
    batches = MicroBatches(train_set, tcfg.micro_batch_size, seed, collate)
    world, ga = dist.world_size(), tcfg.grad_accum
    start_step = 0
    # Checked and loaded by `checkpoint`: only checkpoints signed by this user's slm, newest good one first.
    resumed = None
    if resume in (True, "auto"):
        resumed = checkpoint.load_newest(engine, ckpt_dir, config_hash=config_hash, resume=resume)
    elif dist.is_main():
        checkpoint.clear(ckpt_dir)
    dist.barrier()
    if resumed is not None:
        start_step = resumed.step
        _set_rng_state(resumed.client_state["rng"])
        cpu_adam.restore_bias_correction(engine)  # else a resumed CPU Adam drifts from the uninterrupted run
        if dist.is_main():
            _drop_rows_after(metrics_path, start_step)
            from slm_cli.ui import console

            console.print(f"[yellow]resuming[/yellow] from {ckpt_dir / resumed.tag} at step {start_step}")
    elif dist.is_main():
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text("")
    # What the part before a resume contributed to the whole-run metrics (first loss, tokens, seconds).
    carried = checkpoint.carried_totals(resumed.client_state if resumed else None)

    history: list[dict] = []
    interrupted = {"signal": None}

    def _on_signal(signum, _frame):  # finish the current step, checkpoint, exit cleanly
        interrupted["signal"] = signum

    old_handlers = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)} if _main_thread() else {}
    engine.train()
    task = progress.add_task(description, total=tcfg.max_steps, completed=start_step) if progress else None
    trackers = _open_trackers(tcfg, work_dir, description)
    # t_start is moved back by the seconds trained before a resume, so elapsed times count the whole run.
    t_start = time.perf_counter() - carried.get("train_seconds", 0.0)
    tokens_seen, last = int(carried.get("tokens", 0)), {}
    val_loss = float("nan")
    skipped_steps = int(carried.get("skipped_steps", 0))
    budget = getattr(tcfg, "memory_budget_gb", None)
    if budget is not None:
        from slm_cli.engine import memory

        memory.reset_peak()  # the budget is for training: loading (a float32 checkpoint cast to bf16, say) is not counted
    try:
        for step in range(start_step, tcfg.max_steps):
            t0 = time.perf_counter()
            micro = [_to_device(batches(step * ga + j), engine.device) for j in range(ga)]
            if prepare is not None:
                micro = [prepare(b, step * ga + j) for j, b in enumerate(micro)]
            n_target = dist.all_reduce_sum(torch.tensor(float(sum(target_tokens(b) for b in micro))))
            n_target = max(float(n_target), 1.0)
            step_sum = torch.zeros(1, dtype=torch.float64)
            parts_sum: dict[str, float] = {}
            grad_norm = float("nan")
            for j, batch in enumerate(micro):
                loss_sum, parts = loss_fn(engine, batch)
                micro_loss = float(loss_sum.detach())
                scaled = loss_sum / n_target * ga * world
                if not math.isfinite(micro_loss):
                    # All-NaN gradients make the optimizer skip this step's update on every rank (below).
                    scaled = scaled * float("nan")
                engine.backward(scaled)
                if j == ga - 1:
                    grad_norm = _grad_norm(engine)
                    if not math.isfinite(grad_norm) and _no_overflow_check(engine):
                        _drop_gradients(engine)
                engine.step()
                step_sum += micro_loss
                for k, v in parts.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + float(v)
            dist.all_reduce_sum(step_sum)
            if engine.zero_optimization_stage() > 0:
                grad_norm = _grad_norm(engine, after_step=True)
            # DeepSpeed skips the update of a step whose gradients hold NaN/inf (ZeRO 1-3, and bf16 at
            # ZeRO-0); a plain torch optimizer (ZeRO-0, fp32) had its gradients dropped above instead.
            applied = engine.was_step_applied()
            if not applied:
                if math.isfinite(grad_norm):  # a skipped step has no finite norm, whatever a wrapper reports
                    grad_norm = float("nan")
                if engine.lr_scheduler is not None:  # DeepSpeed holds it back; slm's schedule follows the step index
                    engine.lr_scheduler.step()
            step_loss = float(step_sum) / n_target
            nonfinite = not (applied and math.isfinite(step_loss) and math.isfinite(grad_norm))
            skipped_steps += nonfinite
            step_tokens = int(dist.all_reduce_sum(torch.tensor(float(sum(int(b["attention_mask"].sum()) for b in micro)))))
            tokens_seen += step_tokens
            dt = time.perf_counter() - t0
            lr = engine.get_lr()[0]
            last = {
                "step": step + 1,
                "loss": step_loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "skipped": nonfinite,
                "tokens": step_tokens,
                "tokens_per_s": step_tokens / dt if dt > 0 else 0.0,
                "elapsed_s": time.perf_counter() - t_start,
            }
            for k, v in parts_sum.items():
                if k != "ce" or len(parts_sum) > 1:
                    last[f"{k}_loss"] = _reduce_float(v) / n_target
            if tcfg.eval_every and (step + 1) % tcfg.eval_every == 0 and step + 1 < tcfg.max_steps and val_set:
                val_loss = evaluate_loss(engine, val_set, collate, tcfg.micro_batch_size, tcfg.eval_batches, loss_fn)
                last["val_loss"] = val_loss
            history.append(last)
            if dist.is_main() and ((step + 1) % tcfg.log_every == 0 or "val_loss" in last):
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(last) + "\n")
                if trackers is not None:
                    trackers.log_step(last, step + 1)
            if task is not None:
                shown = {"loss": f"{last['loss']:.4f}", "lr": f"{lr:.2e}", "tok/s": f"{last['tokens_per_s']:,.0f}"}
                if "val_loss" in last:
                    shown["val_loss"] = f"{last['val_loss']:.4f}"
                progress.update(task, advance=1, **shown)
            if budget is not None:
                peak = memory.peak_gb()
                if peak is not None and peak > budget:
                    raise SlmError(memory.over_budget_message(peak, budget, step + 1, tcfg.micro_batch_size))
            if nonfinite and tcfg.nonfinite == "stop":
                raise SlmError(_nonfinite_message(step + 1, step_loss, grad_norm, tcfg, ckpt_dir))
            # a signal test interrupts training here, at a known step, however fast the steps run
            faults.point(f"after-step:{step + 1}", until=lambda: interrupted["signal"] is not None)
            want_ckpt = tcfg.save_every and (step + 1) % tcfg.save_every == 0 and step + 1 < tcfg.max_steps
            if want_ckpt or interrupted["signal"] is not None:
                if not _weights_finite(engine):
                    raise SlmError(_nonfinite_message(step + 1, step_loss, grad_norm, tcfg, ckpt_dir, weights=True))
                totals = {
                    "first_train_loss": carried.get("first_train_loss", history[0]["loss"]),
                    "tokens": tokens_seen,
                    "train_seconds": time.perf_counter() - t_start,
                    "skipped_steps": skipped_steps,
                }
                if faults.kill_armed(f"in-checkpoint:{step + 1}"):
                    _die_after_first_checkpoint_file(engine)
                checkpoint.save(engine, ckpt_dir, step + 1, config_hash=config_hash,
                                client_state={"step": step + 1, "rng": _rng_state(), "run_totals": totals})
                faults.point(f"after-checkpoint:{step + 1}")
            if interrupted["signal"] is not None:
                raise SlmError(_stopped_message(interrupted["signal"], step + 1, tcfg.max_steps, ckpt_dir, work_dir))
    except BaseException:
        if trackers is not None:  # flush what the stopped run logged
            trackers.close()
        raise
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
    val_ce = float("nan")
    if val_set:
        val_loss = evaluate_loss(engine, val_set, collate, tcfg.micro_batch_size, tcfg.eval_batches, loss_fn)
        # One quality number every training stage shares: cross-entropy of the validation completions
        # (for distillation, val_loss is the KD objective, which is not comparable across stages).
        val_ce = val_loss if loss_fn is sft_loss else evaluate_loss(
            engine, val_set, collate, tcfg.micro_batch_size, tcfg.eval_batches, sft_loss
        )
    elapsed = time.perf_counter() - t_start
    if trackers is not None:
        trackers.log({"eval/loss": val_loss, "eval/ce": val_ce}, tcfg.max_steps)
        trackers.close()
    if skipped_steps and dist.is_main():
        from slm_cli.ui import console

        # finite weights are published either way; a run that skipped much of its training may still be useless
        console.print(
            f"[yellow]warning:[/yellow] {skipped_steps} of {tcfg.max_steps} steps had a non-finite loss or gradient norm "
            f"and were skipped (train.nonfinite=skip_step); check val_loss before using this model."
        )
    metrics = {
        "steps": tcfg.max_steps,
        "train_loss": last.get("loss", float("nan")),
        "first_train_loss": carried.get("first_train_loss", history[0]["loss"] if history else float("nan")),
        "val_loss": val_loss,
        "val_ce": val_ce,
        "tokens": tokens_seen,
        "train_seconds": elapsed,
        "tokens_per_s": tokens_seen / elapsed if elapsed > 0 else 0.0,
        "skipped_steps": skipped_steps,
    }
    if budget is not None:
        metrics["peak_memory_gb"] = memory.peak_gb()
    return LoopResult(engine=engine, steps=tcfg.max_steps, metrics=metrics, history=history)


def _open_trackers(tcfg, work_dir: Path, description: str):
    """The run's trackers (`train.report_to`) on rank 0; None when there are none to write."""
    from slm_cli.engine.trackers import Trackers, run_folder, tracker_names

    names = tracker_names(tcfg.report_to)
    if not names or not dist.is_main():
        return None
    return Trackers(names, run_folder(work_dir), run_name=description)


def _drop_rows_after(metrics_path: Path, step: int) -> None:
    """Keep the metrics rows of steps up to `step`.

    A run killed after logging a step but before checkpointing it logged rows the resumed run
    computes again, and a kill mid-write leaves half a line; both are dropped.
    """
    if not metrics_path.is_file():
        return
    rows = metrics_path.read_text().splitlines()
    kept = [line for line in rows if _row_step(line) <= step]
    if len(kept) != len(rows):
        metrics_path.write_text("".join(line + "\n" for line in kept))


def _row_step(line: str) -> float:
    try:
        return json.loads(line).get("step", math.inf)
    except ValueError:
        return math.inf


def _stopped_message(signum: int, step: int, max_steps: int, ckpt_dir: Path, work_dir: Path) -> str:
    """What a run stopped by a signal says: where its checkpoint is and the exact command that continues it.

    The command pins output_dir: the default one is a new timestamped folder for each run.
    """
    output_dir = Path(work_dir).with_name(Path(work_dir).name.removesuffix(".work"))
    command = checkpoint.rerun_command(output_dir)
    how = f": {command}" if command else f" with output_dir={output_dir.resolve()}"
    return (
        f"stopped by {signal.Signals(signum).name} after step {step} of {max_steps}; checkpoint saved in {ckpt_dir}. "
        f"Run the same command again to continue from it{how}"
    )


def _no_overflow_check(engine) -> bool:
    """True when DeepSpeed would apply this step's update whatever its gradients hold.

    DeepSpeed's engine skips an update when its optimizer wrapper raises `overflow` (the ZeRO
    optimizers and the bf16 one check gradients for NaN/inf first); a plain torch optimizer, which
    slm passes at ZeRO-0 in fp32, has no such check.
    """
    return not hasattr(engine.optimizer, "overflow")


def _drop_gradients(engine) -> None:
    """Make the coming optimizer step a no-op: torch's AdamW leaves a parameter without a gradient
    untouched, its moments and step count included (zeroed gradients would still move the weights
    through the momentum)."""
    for p in engine.module.parameters():
        p.grad = None


@torch.no_grad()
def _weights_finite(engine) -> bool:
    """Whether every rank's weights (its ZeRO-3 partition, where partitioned) are all finite."""
    bad = 0
    for p in engine.module.parameters():
        held = p.ds_tensor if hasattr(p, "ds_tensor") else p
        if not bool(torch.isfinite(held).all()):
            bad = 1
            break
    return int(dist.all_reduce_sum(torch.tensor(float(bad)))) == 0


def _nonfinite_message(step: int, loss: float, grad_norm: float, tcfg, ckpt_dir: Path, weights: bool = False) -> str:
    what = (
        f"the weights after step {step} hold NaN/inf (that step's loss {loss:.6g}, gradient norm {grad_norm:.6g})"
        if weights
        else f"step {step} has a non-finite loss or gradient norm (loss {loss:.6g}, gradient norm {grad_norm:.6g}); "
        "its update was not applied"
    )
    tips = [f"a lower train.lr (now {tcfg.lr:g})"]
    if not tcfg.max_grad_norm:
        tips.append("gradient clipping (train.max_grad_norm=1.0; now 0 = off)")
    if tcfg.precision == "bf16":
        tips.append("train.precision=fp32")
    tips.append("a check of the data and the source model for extreme values")
    if not weights:
        tips.append("or train.nonfinite=skip_step to skip such steps and go on")
    return (
        f"training stopped: {what}. No checkpoint of this state was written; "
        f"checkpoints of earlier steps in {ckpt_dir} are kept (after changing the config, resume=true continues from "
        f"the newest, resume=false starts afresh). Try {', '.join(tips)}."
    )


def _die_after_first_checkpoint_file(engine) -> None:
    """Test-only (point `in-checkpoint:N`): a power cut in the middle of a checkpoint save."""
    ck = engine.checkpoint_engine
    save = ck.save

    def save_then_die(*args, **kwargs):
        save(*args, **kwargs)
        faults.kill()

    ck.save = save_then_die


def _reduce_float(v: float) -> float:
    return float(dist.all_reduce_sum(torch.tensor(v, dtype=torch.float64)))


def _grad_norm(engine, after_step: bool = False) -> float:
    """Gradient norm of the step (before clipping).

    ZeRO 1-3 report it after `engine.step()`; with ZeRO-0 and a torch optimizer DeepSpeed does not,
    so it is computed from the gradients just before the optimizer step.
    """
    if after_step:
        norm = engine.get_global_grad_norm()
        return float("nan") if norm is None else float(norm)
    if engine.zero_optimization_stage() > 0:
        return float("nan")
    grads = [p.grad.detach().float() for p in engine.module.parameters() if p.grad is not None]
    if not grads:
        return float("nan")
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def consolidated_state_dict(engine, zero_stage: int) -> dict | None:
    """The full model state dict on rank 0 (every rank must call this under ZeRO-3)."""
    if zero_stage == 3:
        sd = engine._zero3_consolidated_16bit_state_dict()
        return sd if dist.is_main() else None
    return engine.module.state_dict() if dist.is_main() else None
