"""Training-engine benchmark: what gradient checkpointing, CPU offload and bf16 cost or buy.

    .venv/bin/python bench/engine.py            # or: make bench
    .venv/bin/python bench/engine.py --steps 5 --seq 1024

Every variant trains the same Llama-shaped model on the same random tokens through slm's
own DeepSpeed engine setup (`slm_cli.engine.loop.initialize`), each in a fresh subprocess so
its peak resident memory (ru_maxrss) is its own. In the same run the parent measures this
machine's matmul peak (fp32 and bf16, 2048x2048), and each variant's model FLOP utilisation
(MFU) is its achieved 6·N·tokens model FLOP/s against the peak of its dtype. Results print
side by side, as ratios to the fp32 baseline, because this machine is noisy.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {
    "fp32": dict(precision="fp32", gc=False, zero=0, offload="none"),
    "fp32 + grad ckpt": dict(precision="fp32", gc=True, zero=0, offload="none"),
    "fp32 + ZeRO-2 offload": dict(precision="fp32", gc=False, zero=2, offload="cpu"),
    "bf16": dict(precision="bf16", gc=False, zero=0, offload="none"),
    "bf16 + grad ckpt": dict(precision="bf16", gc=True, zero=0, offload="none"),
}


def matmul_peak(dtype_name: str, n: int = 2048, repeats: int = 5) -> float:
    """Best-of-`repeats` GFLOP/s of an n x n matmul in `dtype_name` on this CPU."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def worker(spec: dict) -> dict:
    """Train `spec['steps']` timed steps after one warm-up step; report tokens/s and memory."""
    import torch

    from slm_cli.config.schema import DeepSpeedConfig, ModelConfig, TrainConfig
    from slm_cli.engine import loop
    from slm_cli.engine.logging import quiet_libraries
    from slm_cli.models import build_model

    quiet_libraries()
    loop.seed_everything(0)

    class _Tok:  # the model only needs the vocabulary size and special ids
        bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

        def __len__(self):
            return spec["vocab"]

    mcfg = ModelConfig(
        arch="llama", hidden_size=spec["hidden"], intermediate_size=spec["hidden"] * 4, num_hidden_layers=spec["layers"],
        num_attention_heads=spec["hidden"] // 64, num_key_value_heads=spec["hidden"] // 128, max_position_embeddings=spec["seq"],
    )
    model = build_model(mcfg, _Tok())
    n_params = sum(p.numel() for p in model.parameters())
    tcfg = TrainConfig(
        max_steps=spec["steps"] + 1, micro_batch_size=spec["batch"], precision=spec["precision"],
        gradient_checkpointing=spec["gc"], warmup_steps=0, eval_every=0,
    )
    dcfg = DeepSpeedConfig(zero_stage=spec["zero"], offload_optimizer=spec["offload"])
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    engine, _ = loop.initialize(model, tcfg, dcfg)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, spec["vocab"], (spec["batch"], spec["seq"]), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    times = []
    for step in range(spec["steps"] + 1):
        t0 = time.perf_counter()
        loss_sum, _ = loop.sft_loss(engine, batch)
        engine.backward(loss_sum / loop.target_tokens(batch))
        engine.step()
        if step > 0:  # step 0 is the warm-up
            times.append(time.perf_counter() - t0)
    tokens = spec["batch"] * spec["seq"]
    step_s = sorted(times)[len(times) // 2]
    return {
        "params": n_params,
        "step_s": step_s,
        "tokens_per_s": tokens / step_s,
        "model_gflops": 6 * n_params * tokens / step_s / 1e9,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "train_rss_gb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 2**20,
        "loss": float(loss_sum / loop.target_tokens(batch)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="run only these variants")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))))
        return

    from rich.table import Table

    from slm_cli.ui import console
    peaks = {"fp32": matmul_peak("float32"), "bf16": matmul_peak("bfloat16")}
    console.print(f"matmul peak here (2048², best of 5): fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s")
    results = {}
    for name, v in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        spec = dict(v, seq=args.seq, batch=args.batch, hidden=args.hidden, layers=args.layers, vocab=args.vocab, steps=args.steps)
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            console.print(f"[red]{name} failed[/red]\n{proc.stderr[-2000:]}")
            continue
        r = json.loads(line[len("RESULT "):])
        r["mfu"] = r["model_gflops"] / peaks[v["precision"]]
        results[name] = r
        console.print(f"{name}: {r['tokens_per_s']:.0f} tok/s, peak RSS {r['peak_rss_gb']:.2f} GB")
    base = results.get("fp32")
    table = Table(title=f"training step, seq {args.seq} x batch {args.batch}, Llama {args.layers}L h{args.hidden} "
                        f"({next(iter(results.values()))['params'] / 1e6:.1f}M params), median of {args.steps} steps")
    for col in ("variant", "tokens/s", "x fp32", "peak RSS GB", "x fp32 ", "MFU", "loss"):
        table.add_column(col, justify="right" if col != "variant" else "left")
    for name, r in results.items():
        table.add_row(
            name, f"{r['tokens_per_s']:.0f}", f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}" if base else "-",
            f"{r['peak_rss_gb']:.2f}", f"{r['peak_rss_gb'] / base['peak_rss_gb']:.2f}" if base else "-",
            f"{r['mfu']:.1%}", f"{r['loss']:.4f}",
        )
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps({"peaks_gflops": peaks, "args": vars(args), "results": results}, indent=2, default=str))


if __name__ == "__main__":
    main()
