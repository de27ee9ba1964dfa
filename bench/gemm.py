"""This host's matrix-multiply speed in float32 and bfloat16: read it before any speed figure.

    .venv/bin/python bench/gemm.py

Whether bf16 is a speed format on a CPU depends on the instructions it has: with AVX512-BF16 or
AMX, oneDNN multiplies bf16 natively (an earlier host here ran bf16 GEMMs 2.2x faster than fp32);
with AVX2 only, bf16 is converted in software and runs several times *slower* than fp32. Every
bf16 speed figure in BENCHMARKS.md holds only for a host whose line here matches.
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F


def cpu_flags() -> list[str]:
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    return [f for f in wanted if f in flags]


def gflops(dtype: torch.dtype, m: int = 1024, k: int = 576, n: int = 1536, repeats: int = 5) -> float:
    """GFLOP/s of F.linear at a transformer-MLP shape (best of `repeats`)."""
    a, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    F.linear(a, w)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        F.linear(a, w)
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best / 1e9


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"F.linear 1024x576 @ 576x1536, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}")
    table.add_column("dtype")
    table.add_column("GFLOP/s", justify="right")
    table.add_column("vs float32", justify="right")
    fp32 = gflops(torch.float32)
    for dtype in (torch.float32, torch.bfloat16):
        value = fp32 if dtype == torch.float32 else gflops(dtype)
        table.add_row(str(dtype).removeprefix("torch."), f"{value:.1f}", f"{value / fp32:.2f}x")
    console = Console()
    console.print(f"CPU flags: {' '.join(cpu_flags()) or '?'}; torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}")
    console.print(table)


if __name__ == "__main__":
    main()
