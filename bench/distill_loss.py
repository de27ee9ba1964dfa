"""Naive vs chunked fused-linear distillation loss: wall time and peak extra memory.

    .venv/bin/python bench/distill_loss.py                      # 4096 tokens, hidden 512, vocab 32000
    .venv/bin/python bench/distill_loss.py --chunks 256 512 1024 --compile
    .venv/bin/python bench/distill_loss.py --profile 256    # where the chunked loss's time goes
    .venv/bin/python bench/distill_loss.py --dtype bfloat16 --chunks 256 1024   # bf16 GEMMs, fp32 softmax

Each run also times the "GEMM floor": the four lm_head GEMMs every implementation must do
(student logits, teacher logits, gradient of the student's hidden states and of its lm_head
weight), at full size in the same dtype and nothing else. No loss can run faster than that, so
"vs floor" says how much the loss's own work adds. With ``--dtype bfloat16`` the hidden states and
weights are bf16 (as in a bf16 DeepSpeed run): the GEMMs run in bf16, the softmax and divergence in
float32; the loss and the weight gradient are compared with a float32 naive reference on the same
(bf16-rounded) inputs, so the error column is what bf16 GEMMs cost.

Each variant runs in its own subprocess so its peak memory can be read on CPU, where
torch's allocator is invisible to tracemalloc: the worker allocates the inputs, reads
ru_maxrss (the process's peak resident set so far), runs forward + backward once (the
warm-up), and reports the rise of ru_maxrss as the variant's peak extra memory. It then
times ``--repeats`` more runs and reports the median. "naive" forms both models' full
[N, V] logits and calls ``distillation_loss``; "chunked" calls
``fused_linear_distillation_loss``. Both include the student's weight/hidden gradients.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _inputs(args, dtype: str | None = None):
    import torch

    torch.manual_seed(0)
    dt = getattr(torch, dtype or getattr(args, "dtype", "float32"))
    n, h, v = args.tokens, args.hidden, args.vocab
    student_hidden = (torch.randn(n, h) / h**0.5).to(dt).requires_grad_()
    student_weight = torch.randn(v, h).to(dt).requires_grad_()
    teacher_hidden = (torch.randn(n, h) / h**0.5).to(dt)
    teacher_weight = torch.randn(v, h).to(dt)
    labels = torch.randint(0, v, (n,))
    return student_hidden, student_weight, teacher_hidden, teacher_weight, labels


def _reference(args, inputs) -> tuple[float, "torch.Tensor"]:
    """float32 naive loss and lm_head weight gradient on the same (possibly bf16-rounded) inputs."""
    import torch

    from slm_cli.distill.losses import distillation_loss

    sh, sw, th, tw, labels = (x.detach().float() if x.is_floating_point() else x for x in inputs)
    sw.requires_grad_()
    loss, _ = distillation_loss(sh @ sw.t(), th @ tw.t(), labels, divergence=args.divergence, beta=args.beta, kd_weight=args.kd_weight)
    loss.backward()
    return float(loss), sw.grad


def _worker(args) -> None:
    """Run one variant and print one JSON line: peak extra GB, times, loss."""
    import torch

    from slm_cli.distill.losses import distillation_loss, fused_linear_distillation_loss

    loss_kwargs = {"divergence": args.divergence, "beta": args.beta, "kd_weight": args.kd_weight}

    def step(student_hidden, student_weight, teacher_hidden, teacher_weight, labels) -> float:
        student_hidden.grad = None
        student_weight.grad = None
        if args.variant == "floor":  # the four GEMMs alone: logits of both models, grads of hidden and weight
            with torch.no_grad():
                grad_logits = student_hidden @ student_weight.t()
                teacher_hidden @ teacher_weight.t()
                grad_logits @ student_weight
                grad_logits.t() @ student_hidden
            return 0.0
        if args.variant == "naive":
            student_logits = student_hidden @ student_weight.t()
            with torch.no_grad():
                teacher_logits = teacher_hidden @ teacher_weight.t()
            loss, _ = distillation_loss(student_logits, teacher_logits, labels, **loss_kwargs)
        else:
            loss, _ = fused_linear_distillation_loss(
                student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                chunk_size=args.chunk_size, compile=args.compile, **loss_kwargs,
            )  # fmt: skip
        loss.backward()
        return float(loss)

    # A tiny run first pages in the code (MKL kernels, OpenMP threads) both variants use,
    # so that the memory reading below is the op's data, not the libraries' first use.
    tiny = argparse.Namespace(tokens=64, hidden=args.hidden, vocab=512)
    start = time.perf_counter()
    step(*_inputs(tiny))
    warmup_s = time.perf_counter() - start  # includes torch.compile's compilation when --compile
    inputs = _inputs(args)
    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    loss = step(*inputs)
    first_s = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, cpu_times = [], []
    for _ in range(args.repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        step(*inputs)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    grad_norm = float(inputs[1].grad.norm()) if inputs[1].grad is not None else 0.0
    error = {}
    if args.variant != "floor":
        ref_loss, ref_grad = _reference(args, inputs)
        grad = inputs[1].grad.float()
        error = {"ref_loss": ref_loss, "rel_grad_error": float((grad - ref_grad).norm() / ref_grad.norm())}
    print(
        json.dumps(
            {
                "peak_extra_gb": (peak_kb - baseline_kb) / 2**20,  # ru_maxrss is in KiB on Linux
                "first_s": first_s,
                "warmup_s": warmup_s,
                "median_s": statistics.median(times),
                "median_cpu_s": statistics.median(cpu_times),
                "loss": loss,
                "grad_norm": grad_norm,
                **error,
            }
        )
    )


def _profile(args) -> None:
    """torch.profiler's per-op table for one chunked forward + backward (after a warm-up run)."""
    from torch.profiler import profile

    from slm_cli.distill.losses import fused_linear_distillation_loss

    student_hidden, student_weight, teacher_hidden, teacher_weight, labels = _inputs(args)

    def step() -> None:
        student_hidden.grad = student_weight.grad = None
        loss, _ = fused_linear_distillation_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, labels, divergence=args.divergence,
            beta=args.beta, kd_weight=args.kd_weight, chunk_size=args.profile,
        )  # fmt: skip
        loss.backward()

    step()
    with profile() as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    gemm = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm_", "aten::addmm"))
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    print(f"GEMMs: {gemm / 1e6:.2f} s of {total / 1e6:.2f} s ({gemm / total:.0%})")


def _run_variant(args, variant: str, chunk_size: int = 0, compile: bool = False) -> dict:
    command = [
        sys.executable, __file__, "--worker", variant,
        "--tokens", str(args.tokens), "--hidden", str(args.hidden), "--vocab", str(args.vocab),
        "--repeats", str(args.repeats), "--divergence", args.divergence,
        "--beta", str(args.beta), "--kd-weight", str(args.kd_weight), "--chunk-size", str(chunk_size),
        "--dtype", args.dtype,
    ] + (["--compile"] if compile else [])  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{variant} (chunk {chunk_size}) failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up")
    parser.add_argument("--divergence", default="generalized_jsd")
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--kd-weight", type=float, default=0.9)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="dtype of hidden states and lm_head weights (GEMMs run in it)")
    parser.add_argument("--chunks", type=int, nargs="+", default=[256, 1024], help="chunk sizes to sweep")
    parser.add_argument("--compile", action="store_true", help="also run the chunked loss with compile=True")
    parser.add_argument("--profile", type=int, metavar="CHUNK", help="profile one chunked fwd+bwd by op instead")
    parser.add_argument("--worker", choices=["naive", "chunked", "floor"], help=argparse.SUPPRESS)
    parser.add_argument("--chunk-size", type=int, default=1024, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.variant = args.worker
        _worker(args)
        return
    if args.profile:
        _profile(args)
        return

    from rich.console import Console
    from rich.table import Table

    console = Console(width=180)
    console.print(
        f"[bold]distillation loss, fwd+bwd[/bold]: {args.tokens} tokens, hidden {args.hidden}, vocab {args.vocab}, "
        f"{args.dtype} CPU, {args.divergence} beta={args.beta}, kd_weight={args.kd_weight}, median of {args.repeats} "
        f"after a warm-up, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start"
    )
    floor = _run_variant(args, "floor")
    rows = [("naive (full logits)", 0, False, _run_variant(args, "naive"))]
    for chunk in args.chunks:
        rows.append((f"chunked {chunk}", chunk, False, _run_variant(args, "chunked", chunk)))
        if args.compile:
            rows.append((f"chunked {chunk} compiled", chunk, True, _run_variant(args, "chunked", chunk, True)))

    naive = rows[0][3]
    table = Table(title="naive vs chunked fused-linear distillation loss")
    for column in ("variant", "median s", "cpu s", "vs GEMM floor", "first run s", "tiny warm-up s", "speed-up", "peak extra GB", "memory ratio", "|Δloss| vs fp32", "grad rel. err"):
        table.add_column(column, justify="right" if column != "variant" else "left")
    for name, _, _, result in rows:
        table.add_row(
            name,
            f"{result['median_s']:.2f}",
            f"{result['median_cpu_s']:.2f}",
            f"{result['median_cpu_s'] / floor['median_cpu_s']:.2f}x",
            f"{result['first_s']:.2f}",
            f"{result['warmup_s']:.1f}",
            f"{naive['median_s'] / result['median_s']:.1f}x",
            f"{result['peak_extra_gb']:.3f}",
            f"{naive['peak_extra_gb'] / max(result['peak_extra_gb'], 1e-9):.0f}x less",
            f"{abs(result['loss'] - result['ref_loss']):.1e}",
            f"{result['rel_grad_error']:.1e}",
        )
    console.print(table)
    console.print(
        f"GEMM floor (the four lm_head GEMMs alone, {args.dtype}): {floor['median_s']:.2f} s wall, "
        f"{floor['median_cpu_s']:.2f} s cpu; 'vs GEMM floor' compares CPU times, the steadier figure on a shared machine."
    )


if __name__ == "__main__":
    main()
