"""Build DeepSpeed's CPU ops once, up front (`make ops`), instead of inside the first test or run.

The CPU Adam and the shared-memory collective build by JIT (ninja + gcc) on first use, about
two minutes here, and are cached under TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions).
"""

from __future__ import annotations

import time


def build() -> float:
    import torch
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    t0 = time.perf_counter()
    DeepSpeedCPUAdam([torch.nn.Parameter(torch.zeros(1))])
    return time.perf_counter() - t0


if __name__ == "__main__":
    print(f"DeepSpeed CPU Adam ready ({build():.1f}s)")
