"""Peak memory of training, measured, and the micro-batch that fits `train.memory_budget_gb`.

What counts: the training process's peak resident memory, VmHWM in /proc/self/status (the
model, the teacher, optimizer state, activations, the allocator's cache: everything the OS
would have to find room for). GB here is 1e9 bytes.

How a micro-batch is measured: the process forks one child per candidate size. The child resets
its peak mark (writing 5 to /proc/self/clear_refs puts VmHWM back to the memory in use now),
builds the real DeepSpeed engine with that micro-batch, runs PROBE_STEPS optimizer steps of the
stage's own loss on the longest examples of the training set (padding makes every micro-batch
of them as long as the longest), and reports how far its peak rose above its start. The
estimate is the parent's resident memory at the fork plus that rise. (The child's own VmHWM
alone reads ~0.1 GB low: a forked child does not count the pages of shared libraries the
parent had touched until it touches them itself. Adding the rise to the parent's figure counts
the pages the child touches again twice, so the estimate errs high, by ~15 MB on a tiny model.) A child, because an allocator keeps what it once held: in one process the
second measurement would start from the first one's high mark. A child the OS kills for lack
of memory simply does not fit. Peaks measured this way repeat within a few MB, and they grow
with the batch size but not in proportion (the weights and optimizer state are fixed), so
they are measured, not extrapolated.

Limits: one process (no launcher), on Linux, and before this process has a torch.distributed
process group (a forked child of a process with one hangs in deepspeed.initialize). On a GPU
the budget would be the device's memory, which this does not measure: refused there.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from slm_cli.errors import SlmError

PROBE_STEPS = 2  # the first step creates the optimizer state; the second is a steady-state step
MAX_AUTO = 1024  # largest micro-batch micro_batch_size=auto tries
_GB = 1e9


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_gb() -> float | None:
    """This process's peak resident memory (VmHWM) in GB, or None where /proc does not say."""
    kb = _status_kb("VmHWM")
    return None if kb is None else kb * 1024 / _GB


def resident_gb() -> float | None:
    """This process's resident memory now (VmRSS) in GB."""
    kb = _status_kb("VmRSS")
    return None if kb is None else kb * 1024 / _GB


def reset_peak() -> bool:
    """Put this process's peak mark back to its present resident memory; False where Linux does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@dataclass
class Probe:
    """One measured micro-batch size."""

    micro_batch_size: int
    peak_gb: float | None  # None: the child died before it could say (killed by the OS, usually for memory)
    tokens_per_s: float | None
    fits: bool
    note: str = ""


@dataclass
class Fit:
    """What the probe chose, and the table it measured."""

    micro_batch_size: int
    budget_gb: float
    probes: list[Probe]
    mode: str  # auto | checked

    def record(self) -> dict:
        """For slm.json: the budget, the choice and every measured row."""
        return {
            "budget_gb": self.budget_gb, "mode": self.mode, "micro_batch_size": self.micro_batch_size,
            "probe_steps": PROBE_STEPS, "probes": [dataclasses.asdict(p) for p in self.probes],
        }


def longest_examples(train_set: list, n: int) -> list:
    """The `n` longest training examples (repeated when there are fewer): every probe micro-batch is the worst case."""
    ranked = sorted(train_set, key=lambda ex: len(ex.input_ids), reverse=True)
    return [ranked[i % len(ranked)] for i in range(n)]


def probe_steps(engine, *, train_set: list, collate: Callable, tcfg, seed: int, loss_fn=None, prepare=None) -> float:
    """Run PROBE_STEPS steps of the real training loop on the longest examples; returns the last step's tokens/s."""
    from slm_cli.engine import loop

    kwargs = {} if loss_fn is None else {"loss_fn": loss_fn}
    examples = longest_examples(train_set, tcfg.micro_batch_size)
    with tempfile.TemporaryDirectory(prefix="slm-memory-probe-") as work:
        result = loop.train(engine, train_set=examples, val_set=[], collate=collate, tcfg=tcfg, seed=seed,
                            work_dir=Path(work), resume=False, prepare=prepare, description="memory probe", **kwargs)
    return float(result.history[-1]["tokens_per_s"])


def probe_config(tcfg, micro_batch_size: int):
    """The train config a probe child runs: this micro-batch, PROBE_STEPS steps, no evaluation, checkpoints or trackers."""
    return dataclasses.replace(
        tcfg, micro_batch_size=micro_batch_size, max_steps=PROBE_STEPS, warmup_steps=0, eval_every=0, save_every=0,
        report_to=[], memory_budget_gb=None, log_every=1,
    )


def measure(run: Callable[[Any], float], tcfg, micro_batch_size: int) -> Probe:
    """Peak memory and tokens/s of `run(probe tcfg)` in a forked child, for one micro-batch size."""
    read_fd, write_fd = os.pipe()
    parent_gb = resident_gb()
    pid = os.fork()
    if pid == 0:  # the child: measure, report through the pipe, leave without running the parent's exit code
        os.close(read_fd)
        code = 0
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)  # the engine's own prints would interleave with the parent's
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            from slm_cli.engine.launcher import free_port

            os.environ["MASTER_PORT"] = str(free_port())  # each child starts its own process group
            reset_peak()
            start = resident_gb()
            tps = run(probe_config(tcfg, micro_batch_size))
            out = {"peak_gb": parent_gb + (peak_gb() - start), "tokens_per_s": tps}
        except BaseException as exc:  # noqa: BLE001 - whatever stopped it, the parent says so
            out = {"error": f"{type(exc).__name__}: {exc}"}
            code = 1
        try:
            os.write(write_fd, json.dumps(out).encode())
        finally:
            os._exit(code)
    os.close(write_fd)
    chunks = []
    while chunk := os.read(read_fd, 65536):
        chunks.append(chunk)
    os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    if not chunks:
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        why = "killed by the OS (out of memory)" if sig == signal.SIGKILL else f"died ({_status_text(status)})"
        return Probe(micro_batch_size, None, None, False, why)
    out = json.loads(b"".join(chunks))
    if "error" in out:
        if "out of memory" in out["error"].lower() or "MemoryError" in out["error"]:
            return Probe(micro_batch_size, None, None, False, "out of memory")
        raise SlmError(f"the memory probe at train.micro_batch_size={micro_batch_size} failed: {out['error']}")
    return Probe(micro_batch_size, out["peak_gb"], out["tokens_per_s"], False)


def _status_text(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.WEXITSTATUS(status)}"


def check_can_probe(world_size: int) -> None:
    """Refuse, with the fix, where the forked probe cannot measure what the budget means."""
    import torch

    if world_size > 1:
        raise SlmError(
            f"train.memory_budget_gb is measured in one process, and this run has {world_size}: "
            "run it with launcher.nproc_per_node=1, or drop train.memory_budget_gb and give train.micro_batch_size a number."
        )
    if torch.cuda.is_available():
        raise SlmError(
            "train.memory_budget_gb measures host memory (the process's resident set), not GPU memory: on a GPU machine "
            "drop train.memory_budget_gb and give train.micro_batch_size a number."
        )
    if peak_gb() is None or not reset_peak():
        raise SlmError(
            "train.memory_budget_gb needs Linux's /proc/self/status and /proc/self/clear_refs to measure peak memory, and "
            "this system has none: drop train.memory_budget_gb and give train.micro_batch_size a number."
        )
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        raise SlmError(
            "train.memory_budget_gb measures each micro-batch in a forked child, which cannot start DeepSpeed once this "
            "process has a torch.distributed process group (an earlier run in the same Python process made one): run "
            "slm in a process of its own, or drop train.memory_budget_gb and give train.micro_batch_size a number."
        )


def fit_micro_batch(tcfg, run: Callable[[Any], float], *, train_examples: int, world_size: int = 1) -> Fit:
    """The micro-batch this run trains with under `tcfg.memory_budget_gb`, measured by `run` (see `measure`).

    `micro_batch_size=auto`: try 1, 2, 4, ... (at most the training set and MAX_AUTO) until one
    goes over the budget, and take the largest that fits. A number: check that it fits, else
    refuse, naming the largest smaller size that does (halving until one fits).
    """
    budget = float(tcfg.memory_budget_gb)
    check_can_probe(world_size)
    import deepspeed  # noqa: F401 - imported once here, so no child counts the import (the run has it too)
    probes: list[Probe] = []

    def trial(n: int) -> Probe:
        p = measure(run, tcfg, n)
        p.fits = p.peak_gb is not None and p.peak_gb <= budget
        probes.append(p)
        return p

    if tcfg.micro_batch_size == "auto":
        ceiling = max(1, min(MAX_AUTO, train_examples))
        n, best = 1, None
        while n <= ceiling:
            if not trial(n).fits:
                break
            best = n
            if n == ceiling:
                break
            n = min(n * 2, ceiling)
        if best is None:
            raise SlmError(_none_fits(probes[0], budget, tcfg))
        return Fit(best, budget, probes, "auto")
    n = int(tcfg.micro_batch_size)
    if trial(n).fits:
        return Fit(n, budget, probes, "checked")
    while n > 1:
        n //= 2
        if trial(n).fits:
            raise SlmError(
                f"train.micro_batch_size={tcfg.micro_batch_size} needs {_gb(probes[0])} of memory, over train.memory_budget_gb="
                f"{budget:g}; micro-batch {n} fits ({_gb(probes[-1])}). Set train.micro_batch_size={n} (raise train.grad_accum "
                f"to keep the batch per step), or train.micro_batch_size=auto, or raise train.memory_budget_gb.\n"
                + "\n".join(_rows_text(probes, budget))
            )
    raise SlmError(_none_fits(probes[-1], budget, tcfg))


def _gb(p: Probe) -> str:
    return f"{p.peak_gb:.2f} GB" if p.peak_gb is not None else f"more than the machine has ({p.note})"


def _none_fits(p: Probe, budget: float, tcfg) -> str:
    tips = []
    if not tcfg.gradient_checkpointing:
        tips.append("train.gradient_checkpointing=true")
    if tcfg.precision == "fp32":
        tips.append("train.precision=bf16")
    tips.append(f"a budget of at least {p.peak_gb * 1.05:.2f} GB" if p.peak_gb is not None else "a larger budget")
    return (
        f"train.memory_budget_gb={budget:g} is too small: even micro-batch 1 needs {_gb(p)} (the models, optimizer state and "
        f"activations of one sequence). Try {', or '.join(tips)}."
    )


def _rows_text(probes: list[Probe], budget: float) -> list[str]:
    return [
        f"  micro-batch {p.micro_batch_size}: {_gb(p)}{'' if p.fits else ' (over ' + format(budget, 'g') + ' GB)'}"
        for p in probes
    ]


def table(fit: Fit):
    """The probe as a rich table: micro-batch -> peak GB, tokens/s, and which one training uses."""
    from rich.table import Table

    t = Table(title=f"memory probe (train.memory_budget_gb={fit.budget_gb:g}, {PROBE_STEPS} steps each on the longest examples)")
    t.add_column("micro-batch", justify="right")
    t.add_column("peak GB", justify="right")
    t.add_column("tokens/s", justify="right")
    t.add_column("fits", justify="center")
    for p in fit.probes:
        chosen = p.micro_batch_size == fit.micro_batch_size and p.fits
        t.add_row(
            f"[bold]{p.micro_batch_size}[/bold]" if chosen else str(p.micro_batch_size),
            f"{p.peak_gb:.3f}" if p.peak_gb is not None else p.note,
            f"{p.tokens_per_s:,.0f}" if p.tokens_per_s is not None else "-",
            ("[green]yes[/green]" + (" (used)" if chosen else "")) if p.fits else "[red]no[/red]",
        )
    return t


def over_budget_message(peak: float, budget: float, step: int, micro_batch_size: int) -> str:
    return (
        f"training stopped at step {step}: the process's peak memory reached {peak:.2f} GB, over train.memory_budget_gb="
        f"{budget:g} (train.micro_batch_size={micro_batch_size}). Lower train.micro_batch_size (auto measures one that "
        "fits), raise the budget, or turn on train.gradient_checkpointing."
    )


def fit_stage(cfg, train_examples: int, probe: Callable[[Any], float]):
    """A training stage's one call: without `train.memory_budget_gb`, None; with it, measure the micro-batch
    that fits (auto) or check the one given, set it in `cfg.train`, print the table and return the fit.

    `probe(tcfg)` runs in a forked child: it builds the stage's real engine for `tcfg` and returns
    `probe_steps(...)` of the stage's own loss (see `engine_probe` for the plain-CE stages)."""
    if cfg.train.memory_budget_gb is None:
        return None
    from slm_cli import ui
    from slm_cli.engine import distributed as dist

    fit = fit_micro_batch(cfg.train, probe, train_examples=train_examples, world_size=dist.world_size())
    cfg.train.micro_batch_size = fit.micro_batch_size
    ui.console.print(table(fit))
    return fit


def engine_probe(cfg, model, train_set: list, collate: Callable) -> Callable[[Any], float]:
    """The probe of a stage that trains `model` on its own loss (teacher, student)."""

    def probe(tcfg) -> float:
        from slm_cli.engine import loop

        engine, _ = loop.initialize(model, tcfg, cfg.deepspeed)
        return probe_steps(engine, train_set=train_set, collate=collate, tcfg=tcfg, seed=cfg.seed)

    return probe
