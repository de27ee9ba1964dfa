"""Does slm work on a GPU? One command on a machine with one NVIDIA GPU, within ~8 minutes.

    make gpu-check                                   # on the GPU machine: python bench/gpu_check.py
    make gpu-check DRY=1                             # anywhere: the same code on CPU, fp32, tiny sizes (~1 min)
    python3 bench/gpu_check.py --out runs/gpu_check/gpu_check.json --only train/teacher fp8
    python3 bench/gpu_check.py --dry-run --fail fp8_matmul    # a deliberately failing check: exit code 1

The checks (each recorded as ok, failed or skipped, with its seconds and numbers):

1. ``train/<stage>/zero<0|2>``: a few optimizer steps of every training stage (``slm teacher``,
   ``slm student``, ``slm distill`` supervised and on-policy), run in this process through slm's
   own command line, on CUDA in bf16 (DeepSpeed's bf16 with fp32 master weights, a bf16 teacher),
   gradient checkpointing on, under ZeRO-0 and ZeRO-2, on the tiny Llama models built from
   configs/model/tiny-llama*.yaml. Recorded: the exit code, the last logged loss (must be finite)
   and the peak CUDA memory allocated during the run. The student starts from the teacher trained
   here; distillation uses both.
2. ``fused_loss``: ``fused_linear_distillation_loss`` (chunked, never forms the logits) against
   ``distillation_loss`` on the full [tokens, vocab] logits (slm_cli/distill/losses.py), forward and
   backward, at 4096 tokens x 32768 vocab x hidden 576 in bf16: both loss values, their relative
   difference, the relative difference of the lm_head weight gradients, the time and peak CUDA
   memory of each. Fails if they disagree or the fused loss does not use less memory.
3. ``fp8_matmul``: the matmul an FP8 checkpoint (``quant=fp8_dynamic``) is served with.
   SmolLM2-135M's MLP shapes (576 -> 1536 and back) at 4096 tokens: weights quantized to
   float8_e4m3fn with one scale per output channel (``slm_cli.quant.schemes.weight_qparams``, the
   scales slm writes), activations with one scale per token (absmax / 448), multiplied by
   ``torch._scaled_mm``; compared with the bf16 matmul of the same weights, both against a
   float32 reference (max abs and relative error), with the time of each. Skipped, with the
   reason, on a GPU without FP8 tensor cores (compute capability below 8.9).
4. ``pytest_gpu``: ``pytest -m gpu tests/gpu`` (the tests marked gpu, which plain ``make test``
   deselects: a tiny Llama's forward and backward, the fused loss and FP8 matmuls, CUDA vs CPU).

Output: one JSON file (``--out``), and a rich table printed and written as Markdown beside it
(same name, .md). The exit code is 1 if any check failed, else 0 (a skip with its reason is not a
failure).

``--dry-run`` runs the same code on the CPU so that this script cannot rot unseen: CUDA hidden,
fp32 instead of bf16 (bf16 GEMMs are slow on most CPUs; ``--bf16`` keeps bf16), DeepSpeed's CPU
accelerator, tiny sizes
(256 tokens x 2048 vocab x hidden 64 for the loss, 64 tokens for the FP8 matmul, which torch runs
on the CPU too). tests/unit/test_gpu_check.py runs it. ``--fail NAME`` makes the named checks (or
prefixes of names) raise before they start: only to show that a failure reaches the exit code.

Preparing a bare GPU image (torch only, no network there): download the wheels here, carry them in
``.whl/``, install them on the device with no index:

    bash bench/gpu_wheels.sh                          # here, with network access: fills .whl/
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
    python3 bench/gpu_check.py                        # or: make gpu-check
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STAGES = ("teacher", "student", "distill_supervised", "distill_on_policy")
ZERO_STAGES = (0, 2)
GPU_TESTS = "tests/gpu"  # the gpu-marked tests
# SmolLM2-135M: hidden 576, MLP 1536, vocabulary 49152 (the loss check uses a 32k one, as bench/distill_loss.py).
SMOLLM2_HIDDEN, SMOLLM2_MLP = 576, 1536
TASK_RECORDS = 200  # records of the training checks' task file (128 train, 16 validation, 8 test)
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_CAPABILITY = (8, 9)  # Ada / Hopper and later have FP8 tensor cores

# Sizes and tolerances: (GPU, --dry-run). The dry run only proves the code runs; its numbers mean little.
SIZES = {
    "train_steps": (4, 2),
    "loss_tokens": (4096, 256),
    "loss_vocab": (32768, 2048),
    "loss_hidden": (SMOLLM2_HIDDEN, 64),
    "fp8_tokens": (4096, 64),
    "repeats": (20, 2),
    "loss_repeats": (3, 1),
}
# bf16 GEMMs round the logits to 8 bits of mantissa, differently chunk by chunk and in one piece.
LOSS_RTOL = {"bfloat16": 1e-2, "float32": 1e-4}
GRAD_RTOL = {"bfloat16": 5e-2, "float32": 1e-3}
# FP8 E4M3 keeps 3 mantissa bits: elementwise error up to 2^-4; a dot product averages it down to a few %.
FP8_RTOL = 0.08


@dataclass
class Check:
    """One check's outcome, as it goes into the JSON."""

    name: str
    group: str
    status: str = "ok"  # ok | failed | skipped
    seconds: float = 0.0
    reason: str | None = None  # why it was skipped, or what failed
    metrics: dict[str, Any] = field(default_factory=dict)


class CheckFailed(Exception):
    """A check ran but its numbers are wrong (the message says which)."""


class CheckSkipped(Exception):
    """A check cannot run on this machine (the message says why)."""


def size(key: str, dry: bool):
    return SIZES[key][1 if dry else 0]


# ---------------------------------------------------------------------------
# CUDA memory and timing helpers (no-ops on the CPU)
# ---------------------------------------------------------------------------


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _reset_peak() -> int:
    """Free what can be freed, reset the peak mark; returns the bytes allocated now."""
    import torch

    gc.collect()
    if not _cuda():
        return 0
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _peak_gb(baseline: int = 0) -> float | None:
    """Peak CUDA memory allocated since `_reset_peak`, above `baseline`, in GB (1e9 bytes); None on the CPU."""
    import torch

    if not _cuda():
        return None
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - baseline) / 1e9


def _timed(fn: Callable[[], Any], repeats: int) -> tuple[Any, float]:
    """Run fn once (warm-up, its result returned), then `repeats` times; the median seconds."""
    import torch

    result = fn()
    times = []
    for _ in range(repeats):
        if _cuda():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if _cuda():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


def _rel(a, b) -> float:
    """‖a − b‖ / ‖b‖ in float32 (a scalar pair: |a − b| / |b|)."""
    import torch

    a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


# ---------------------------------------------------------------------------
# 1. a training step of every stage, through the real command line
# ---------------------------------------------------------------------------


def _slm(*args: str) -> int:
    """`slm <args>` in this process (as tests/stages run it); the exit code."""
    from slm_cli.__main__ import main

    argv = list(sys.argv)
    try:
        return main(list(args))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = argv


def task_file(work: Path) -> Path:
    """A small prompt/completion task (sums of two numbers) as a .jsonl file, written once.

    Not the built-in arithmetic task: that one is generated by reasoning-gym, whose dependencies
    (matplotlib, pillow, fonttools, ...) would add tens of MB to the wheels a bare GPU image needs
    (bench/gpu_wheels.sh); the stages read a .jsonl file with the standard library alone.
    """
    path = work / "data" / "sums.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        pairs = [(a, (a * 37 + 11) % 100) for a in range(TASK_RECORDS)]
        path.write_text("".join(json.dumps({"prompt": f"What is {a} + {b}? ", "completion": str(a + b)}) + "\n" for a, b in pairs))
    return path


def _train_args(stage: str, zero: int, dry: bool, bf16: bool, work: Path, parents: dict[str, Path]) -> tuple[str, list[str]]:
    """The `slm` stage word and overrides of one training check."""
    name = f"{stage}_zero{zero}"
    args = [
        "data=jsonl", f"data.source={task_file(work)}", "data.max_seq_len=64",
        "data.train_size=128", "data.val_size=16", "data.test_size=8",
        f"train.max_steps={size('train_steps', dry)}", "train.micro_batch_size=8", "train.warmup_steps=1",
        "train.eval_every=0", "train.eval_batches=1",
        f"train.precision={'bf16' if bf16 else 'fp32'}", "train.gradient_checkpointing=true",
        f"deepspeed=zero{zero}",
        f"output_dir={work / name}", f"hydra.run.dir={work / 'logs' / name}",
    ]  # fmt: skip
    teacher_dtype = "bfloat16" if bf16 else "float32"
    if stage == "teacher":
        return "teacher", ["model=tiny-llama", *args]
    if "teacher" not in parents:
        raise CheckSkipped("no teacher artifact: every train/teacher check failed")
    if stage == "student":
        return "student", ["model=tiny-llama-student", f"teacher.name_or_path={parents['teacher']}", *args]
    if "student" not in parents:
        raise CheckSkipped("no student artifact: every train/student check failed")
    mode = stage.removeprefix("distill_")
    return "distill", [
        f"distill={mode}", f"teacher.name_or_path={parents['teacher']}", f"teacher.dtype={teacher_dtype}",
        f"model.name_or_path={parents['student']}", "distill.gen_max_new_tokens=8", *args,
    ]  # fmt: skip


def check_train(stage: str, zero: int, dry: bool, bf16: bool, work: Path, parents: dict[str, Path]) -> dict[str, Any]:
    word, args = _train_args(stage, zero, dry, bf16, work, parents)
    out = work / f"{stage}_zero{zero}"
    _reset_peak()
    code = _slm(word, *args)
    peak = _peak_gb()
    if code != 0:
        raise CheckFailed(f"slm {word} exited with {code}; its log: {work / 'logs' / out.name}/{word}.log")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    loss = rows[-1]["loss"] if rows else float("nan")
    metrics = {"final_loss": loss, "steps": len(rows), "peak_cuda_gb": peak, "precision": "bf16" if bf16 else "fp32",
               "zero_stage": zero, "artifact": str(out)}
    if not math.isfinite(loss):
        raise CheckFailed(f"the last logged loss is {loss}", metrics)
    if not dry and not peak:
        raise CheckFailed("no CUDA memory was allocated: the run did not train on the GPU", metrics)
    if stage in ("teacher", "student"):
        parents.setdefault(stage, out)
    return metrics


# ---------------------------------------------------------------------------
# 2. the fused chunked distillation loss against the full-logit loss
# ---------------------------------------------------------------------------


def check_fused_loss(dry: bool, bf16: bool) -> dict[str, Any]:
    import torch

    from slm_cli.distill.losses import distillation_loss, fused_linear_distillation_loss

    device = "cuda" if _cuda() else "cpu"
    dtype = torch.bfloat16 if bf16 else torch.float32
    n, v, h = size("loss_tokens", dry), size("loss_vocab", dry), size("loss_hidden", dry)
    kwargs = {"divergence": "generalized_jsd", "beta": 0.5, "kd_weight": 0.9}
    generator = torch.Generator().manual_seed(0)

    def make(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(device, dtype)

    student_hidden, student_weight = make(n, h, scale=h**-0.5).requires_grad_(), make(v, h).requires_grad_()
    teacher_hidden, teacher_weight = make(n, h, scale=h**-0.5), make(v, h)
    labels = torch.randint(0, v, (n,), generator=generator).to(device)
    labels[::7] = -100  # masked prompt tokens, as in a real batch

    def full() -> float:
        student_hidden.grad = student_weight.grad = None
        with torch.no_grad():
            teacher_logits = teacher_hidden @ teacher_weight.t()
        loss, _ = distillation_loss(student_hidden @ student_weight.t(), teacher_logits, labels, **kwargs)
        loss.backward()
        return float(loss.detach())

    def fused() -> float:
        student_hidden.grad = student_weight.grad = None
        loss, _ = fused_linear_distillation_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, **kwargs)
        loss.backward()
        return float(loss.detach())

    results = {}
    for name, fn in (("full", full), ("fused", fused)):
        baseline = _reset_peak()
        loss, seconds = _timed(fn, size("loss_repeats", dry))
        results[name] = {"loss": loss, "seconds": seconds, "peak_cuda_gb": _peak_gb(baseline), "grad": student_weight.grad.clone()}
    full_r, fused_r = results["full"], results["fused"]
    dtype_name = str(dtype).removeprefix("torch.")
    metrics = {
        "shape": f"{n} tokens x {v} vocab x hidden {h}, {dtype_name}, {device}",
        "full_loss": full_r["loss"], "fused_loss": fused_r["loss"],
        "loss_rel_diff": abs(fused_r["loss"] - full_r["loss"]) / abs(full_r["loss"]),
        "grad_rel_diff": _rel(fused_r["grad"], full_r["grad"]),
        "full_seconds": full_r["seconds"], "fused_seconds": fused_r["seconds"],
        "full_peak_cuda_gb": full_r["peak_cuda_gb"], "fused_peak_cuda_gb": fused_r["peak_cuda_gb"],
    }  # fmt: skip
    if not metrics["loss_rel_diff"] <= LOSS_RTOL[dtype_name]:
        raise CheckFailed(f"fused and full-logit losses differ by {metrics['loss_rel_diff']:.2e} (> {LOSS_RTOL[dtype_name]:g})", metrics)
    if not metrics["grad_rel_diff"] <= GRAD_RTOL[dtype_name]:
        raise CheckFailed(f"their weight gradients differ by {metrics['grad_rel_diff']:.2e} (> {GRAD_RTOL[dtype_name]:g})", metrics)
    if fused_r["peak_cuda_gb"] is not None and fused_r["peak_cuda_gb"] >= full_r["peak_cuda_gb"]:
        raise CheckFailed("the fused loss used no less CUDA memory than the full-logit loss", metrics)
    return metrics


# ---------------------------------------------------------------------------
# 3. FP8 matmuls as an fp8_dynamic checkpoint is served
# ---------------------------------------------------------------------------


def _fp8_operands(x, weight):
    """float8_e4m3fn activations (one scale per token) and weight (one per output channel, slm's scales).

    Returns (x_fp8 [M, K], x_scale [M, 1], w_fp8 [N, K], w_scale [N, 1]); x ≈ x_fp8 · x_scale,
    W ≈ w_fp8 · w_scale. The weight scales come from `weight_qparams` with fp8_dynamic's weight
    arguments, the function `slm quantize` fills its checkpoints' `weight_scale` with.
    """
    import torch

    from slm_cli.quant.schemes import get_scheme, weight_qparams

    w_scale, _ = weight_qparams(weight.float(), get_scheme("fp8_dynamic").weights)
    w_scale = w_scale.float().reshape(-1, 1)
    x_scale = (x.float().abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
    as_fp8 = lambda t, s: (t.float() / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)  # noqa: E731
    return as_fp8(x, x_scale), x_scale, as_fp8(weight, w_scale), w_scale


def check_fp8_matmul(dry: bool, bf16: bool) -> dict[str, Any]:
    import torch

    if _cuda():
        capability = torch.cuda.get_device_capability()
        if capability < FP8_CAPABILITY:
            raise CheckSkipped(
                f"{torch.cuda.get_device_name()} is compute capability {capability[0]}.{capability[1]}; "
                "torch._scaled_mm's FP8 needs 8.9 or later (Ada, Hopper)"
            )
    device = "cuda" if _cuda() else "cpu"
    dense = torch.bfloat16 if bf16 else torch.float32  # the unquantized model's dtype
    tokens, repeats = size("fp8_tokens", dry), size("repeats", dry)
    generator = torch.Generator().manual_seed(0)
    metrics: dict[str, Any] = {"device": device, "tokens": tokens, "dense_dtype": str(dense).removeprefix("torch.")}
    worst = 0.0
    for name, (out_features, in_features) in {"up_proj": (SMOLLM2_MLP, SMOLLM2_HIDDEN), "down_proj": (SMOLLM2_HIDDEN, SMOLLM2_MLP)}.items():
        x = torch.randn(tokens, in_features, generator=generator).to(device, dense)
        weight = (torch.randn(out_features, in_features, generator=generator) * in_features**-0.5).to(device, dense)
        reference = x.float() @ weight.float().t()
        x_fp8, x_scale, w_fp8, w_scale = _fp8_operands(x, weight)
        try:
            fp8_out, fp8_s = _timed(
                lambda: torch._scaled_mm(x_fp8, w_fp8.t(), scale_a=x_scale, scale_b=w_scale.t(), out_dtype=dense), repeats
            )
        except (RuntimeError, NotImplementedError) as exc:
            if device == "cpu":
                raise CheckSkipped(f"this torch ({torch.__version__}) has no CPU torch._scaled_mm: {exc}") from exc
            raise
        dense_out, dense_s = _timed(lambda: x @ weight.t(), repeats)
        for label, out, seconds in (("fp8", fp8_out, fp8_s), (metrics["dense_dtype"], dense_out, dense_s)):
            err = (out.float() - reference).abs()
            metrics[f"{name}_{label}_max_abs_err"] = float(err.max())
            metrics[f"{name}_{label}_rel_err"] = _rel(out, reference)
            metrics[f"{name}_{label}_ms"] = seconds * 1e3
        metrics[f"{name}_shape"] = f"[{tokens}, {in_features}] @ [{in_features}, {out_features}]"
        worst = max(worst, metrics[f"{name}_fp8_rel_err"])
    if not worst <= FP8_RTOL:
        raise CheckFailed(f"FP8 matmul relative error {worst:.3f} (> {FP8_RTOL})", metrics)
    return metrics


# ---------------------------------------------------------------------------
# 4. the gpu-marked tests
# ---------------------------------------------------------------------------


def check_pytest_gpu(dry: bool) -> dict[str, Any]:
    """`pytest -m gpu` over tests/gpu, where the gpu tests live.

    Not over all of tests/: collecting the whole suite imports its every dependency (datasets,
    pyarrow, pandas: ~60 MB of wheels more on a bare image) for tests that `-m gpu` then deselects.
    """
    python = [sys.executable, *(["-S"] if sys.flags.no_site else [])]  # the interpreter and site setup of this run
    command = [*python, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-m", "gpu", GPU_TESTS]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    summary = lines[-1].strip("= ") if lines else ""
    counts = {}
    for part in summary.replace(" in ", ", ").split(", "):
        words = part.split()
        if len(words) == 2 and words[0].isdigit():
            counts[words[1]] = int(words[0])
    skips = [line.removeprefix("SKIPPED ") for line in lines if line.startswith("SKIPPED")]
    metrics = {"command": " ".join(command[len(python):]), "summary": summary, **counts, "skip_reasons": skips[:5]}
    if proc.returncode == 5:
        raise CheckFailed("pytest collected no test marked gpu", metrics)
    if proc.returncode != 0:
        metrics["output_tail"] = (proc.stdout + proc.stderr)[-3000:]
        raise CheckFailed(f"pytest -m gpu exited with {proc.returncode}: {summary}", metrics)
    if not counts.get("passed"):
        if not dry:
            raise CheckFailed(f"no gpu test passed on the GPU: {summary}", metrics)
        raise CheckSkipped(f"every gpu test skipped itself without CUDA ({summary})", metrics)
    return metrics


# ---------------------------------------------------------------------------
# running, recording, reporting
# ---------------------------------------------------------------------------


def _plan(dry: bool, bf16: bool, work: Path) -> list[tuple[str, str, Callable[[], dict[str, Any]]]]:
    """(name, group, function) of every check, in the order they run (a stage's parents first)."""
    parents: dict[str, Path] = {}
    plan = []
    for stage in STAGES:
        for zero in ZERO_STAGES:
            plan.append((f"train/{stage}/zero{zero}", "train", lambda s=stage, z=zero: check_train(s, z, dry, bf16, work, parents)))
    plan.append(("fused_loss", "fused_loss", lambda: check_fused_loss(dry, bf16)))
    plan.append(("fp8_matmul", "fp8_matmul", lambda: check_fp8_matmul(dry, bf16)))
    plan.append(("pytest_gpu", "pytest_gpu", lambda: check_pytest_gpu(dry)))
    return plan


def _selected(name: str, prefixes: list[str] | None) -> bool:
    return prefixes is None or any(name.startswith(p) for p in prefixes)


def run_check(name: str, group: str, fn: Callable[[], dict[str, Any]], inject_failure: bool) -> Check:
    check = Check(name, group)
    start = time.perf_counter()
    try:
        if inject_failure:
            raise CheckFailed("injected failure (--fail): this check did not run")
        check.metrics = fn()
    except CheckSkipped as exc:
        check.status, check.reason = "skipped", str(exc.args[0])
        check.metrics = exc.args[1] if len(exc.args) > 1 else {}
    except CheckFailed as exc:
        check.status, check.reason = "failed", str(exc.args[0])
        check.metrics = exc.args[1] if len(exc.args) > 1 else {}
    except Exception as exc:  # noqa: BLE001 - any crash is this check's failure, the others still run
        check.status, check.reason = "failed", f"{type(exc).__name__}: {exc}"
        check.metrics = {"traceback": traceback.format_exc()[-3000:]}
    check.seconds = time.perf_counter() - start
    return check


def environment(dry: bool) -> dict[str, Any]:
    import torch

    env = {
        "dry_run": dry, "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "host": platform.node(), "cpu_count": os.cpu_count(),
        "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR"),
    }  # fmt: skip
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, capability=f"{props.major}.{props.minor}", gpu_memory_gb=props.total_memory / 1e9)
    for package in ("deepspeed", "transformers", "compressed_tensors"):
        try:
            env[package] = __import__(package).__version__
        except Exception as exc:  # noqa: BLE001 - a missing package shows up here and in the checks that need it
            env[package] = f"unavailable ({type(exc).__name__})"
    return env


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# The headline numbers of each group, as table cells: (label, metric key).
HEADLINE = {
    "train": (("loss", "final_loss"), ("peak CUDA GB", "peak_cuda_gb")),
    "fused_loss": (("rel. diff", "loss_rel_diff"), ("grad rel. diff", "grad_rel_diff"), ("full GB", "full_peak_cuda_gb"),
                   ("fused GB", "fused_peak_cuda_gb"), ("full s", "full_seconds"), ("fused s", "fused_seconds")),
    "fp8_matmul": (("fp8 rel. err", "up_proj_fp8_rel_err"), ("fp8 max abs", "up_proj_fp8_max_abs_err"),
                   ("fp8 ms", "up_proj_fp8_ms"), ("dense ms", None)),
    "pytest_gpu": (("", "summary"),),
}


def _details(check: Check) -> str:
    m = check.metrics
    parts = []
    for label, key in HEADLINE[check.group]:
        if key is None:  # the dense matmul's time, whatever its dtype
            key = next((k for k in m if k.startswith("up_proj_") and k.endswith("_ms") and "fp8" not in k), None)
        if key in m:
            parts.append(f"{label} {_fmt(m[key])}".strip())
    return ", ".join(parts)


def table(report: dict[str, Any]):
    from rich.table import Table

    env = report["environment"]
    where = f"{env.get('gpu', 'CPU')}, torch {env['torch']}" + (" (dry run)" if env["dry_run"] else "")
    t = Table(title=f"gpu-check: {where}, {report['seconds']:.0f} s", title_justify="left")
    for column in ("check", "status", "s", "numbers / reason"):
        t.add_column(column, justify="right" if column == "s" else "left")
    style = {"ok": "green", "failed": "bold red", "skipped": "yellow"}
    for c in report["checks"]:
        text = _details(Check(**c)) if c["status"] == "ok" else (c["reason"] or "")
        t.add_row(c["name"], f"[{style[c['status']]}]{c['status']}[/]", f"{c['seconds']:.1f}", text)
    return t


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        f"# gpu-check ({'dry run, CPU' if env['dry_run'] else env.get('gpu', 'no GPU')})",
        "",
        f"torch {env['torch']}, CUDA {env['cuda']}, DeepSpeed {env['deepspeed']}, transformers {env['transformers']}; "
        f"{report['seconds']:.0f} s in all; {'every check passed' if report['ok'] else 'FAILED'}.",
        "",
        "| check | status | s | numbers / reason |",
        "|---|---|---:|---|",
    ]
    for c in report["checks"]:
        text = _details(Check(**c)) if c["status"] == "ok" else (c["reason"] or "")
        lines.append(f"| {c['name']} | {c['status']} | {c['seconds']:.1f} | {text.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def _prepare_env(dry: bool, work: Path) -> None:
    """Environment for the checks, set before torch is imported."""
    if dry:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the dry run is the CPU run, even on a GPU machine
        os.environ["DS_ACCELERATOR"] = "cpu"
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models: threads only oversubscribe a small machine
    else:
        os.environ["DS_ACCELERATOR"] = "cuda"  # the Makefile exports cpu for every other target
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("SLM_CACHE", str(work / "cache"))  # generated data and tokenizers: never the user's cache


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/gpu_check/gpu_check.json", help="the JSON report (the .md goes beside it)")
    parser.add_argument("--dry-run", action="store_true", help="run every check on the CPU, fp32, tiny sizes")
    parser.add_argument("--bf16", action="store_true", help="with --dry-run: bf16 as on the GPU, not fp32 (slow on most CPUs)")
    parser.add_argument("--only", nargs="+", metavar="PREFIX", help="run only the checks whose name starts with one of these")
    parser.add_argument("--fail", nargs="+", default=[], metavar="PREFIX", help="make these checks fail before they start (tests the exit code)")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    work = out.parent / "work"
    _prepare_env(args.dry_run, work)

    from rich.console import Console

    console = Console(width=160)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        console.print("[bold red]gpu-check: torch sees no CUDA device.[/] Run it on the GPU machine, or use --dry-run (make gpu-check DRY=1) here.")
        return 2
    if work.exists():
        import shutil

        shutil.rmtree(work)  # every run trains from scratch: a previous run's artifacts would be resumed instead
    work.mkdir(parents=True)
    report: dict[str, Any] = {"environment": {**environment(args.dry_run), "bf16": args.bf16 or not args.dry_run}, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    checks: list[Check] = []
    start = time.perf_counter()
    for name, group, fn in _plan(args.dry_run, args.bf16 or not args.dry_run, work):
        if not _selected(name, args.only):
            continue
        console.print(f"[dim]gpu-check: {name} ...[/]")
        check = run_check(name, group, fn, inject_failure=_selected(name, args.fail) and bool(args.fail))
        checks.append(check)
        colour = {"ok": "green", "failed": "bold red", "skipped": "yellow"}[check.status]
        console.print(f"gpu-check: {name} [{colour}]{check.status}[/] in {check.seconds:.1f} s" + (f": {check.reason}" if check.reason else ""))
    report["seconds"] = time.perf_counter() - start
    report["ok"] = all(c.status != "failed" for c in checks)
    report["checks"] = [asdict(c) for c in checks]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    console.print(table(report))
    console.print(f"gpu-check: {out} and {out.with_suffix('.md').name}; " + ("every check passed" if report["ok"] else "[bold red]a check failed[/]"))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
