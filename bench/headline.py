"""The paper's headline figures on a real pair: SmolLM2-135M-Instruct teaching a ~28M student.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 .venv/bin/python bench/headline.py --json /tmp/headline.json   # ~21 min here
    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 .venv/bin/python bench/headline.py --part b --budget 4 --max-batch 32

(a) One distillation step, baseline vs slm's efficient settings. Baseline: fp32 student and teacher,
    the full-logit loss (both models' tokens x 49152 logits, then the divergence), no gradient
    checkpointing. Efficient: bf16 training (DeepSpeed's bf16 with fp32 master weights), bf16
    teacher, the fused chunked loss (only last hidden states; lm_head applied 256 tokens at a
    time), gradient checkpointing. Same text, same micro-batch. Peak memory and tokens/s side by
    side (the paper/Liger claim: 60% less memory, 20% faster).
(b) A fixed memory budget (`train.memory_budget_gb`): `train.micro_batch_size=auto` measures the
    largest micro-batch that fits with and without gradient checkpointing and CPU offload, then
    trains a few steps at it; tokens/s at each (the paper's claim: up to 3x through larger batches).

Everything runs through slm's own code: `slm_cli.engine.loop.initialize` / `loop.train` (the
DeepSpeed engine and the training loop every stage uses), `slm_cli.distill.objective.KDObjective`
(the stage's loss, fused or full-logit), `slm_cli.engine.memory.fit_micro_batch` (what
`micro_batch_size=auto` runs). Each configuration runs in a fresh subprocess, so its peak
resident memory (VmHWM, reset after the models are loaded: the training peak, not the loading
one) is its own. Text: the held-out Python docs (bench/pydocs.py), cut into windows of --seq
tokens. tokens/s counts the steps after the first (a warm-up).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TEACHER = "smollm2-135m-instruct"
# ~28M parameters, SmolLM2's shape and vocabulary: 6 layers of hidden 384 (6 heads of 64, 2 KV heads).
STUDENT = dict(arch="llama", hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
               num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True)

BASELINE = dict(precision="fp32", teacher_dtype="float32", fused=False, gc=False, zero=0, offload="none")
FUSED = dict(BASELINE, fused=True)
EFFICIENT = dict(FUSED, gc=True)
# bf16 steps are several times slower than fp32 on a CPU without bf16 matmul units (see the header line the
# run prints): that configuration runs one step, enough for its peak memory; its tokens/s include the warm-up.
PART_A = {
    "baseline: fp32, full logits, no checkpointing": BASELINE,
    "fp32 + fused chunked loss": FUSED,
    "fp32 + fused chunked loss + grad checkpointing": EFFICIENT,
    "bf16 (student, teacher) + fused loss + grad checkpointing": dict(EFFICIENT, precision="bf16", teacher_dtype="bfloat16", steps=1),
}
PART_B = {
    "baseline (fp32, full logits, no checkpointing)": BASELINE,
    "fused loss, no checkpointing": FUSED,
    "fused loss + grad checkpointing": EFFICIENT,
    "fused loss + grad checkpointing + ZeRO-2 CPU offload": dict(EFFICIENT, zero=2, offload="cpu"),
}


def linear_gflops(dtype_name: str, m: int = 256, k: int = 576, n: int = 1536, repeats: int = 5) -> float:
    """Best-of GFLOP/s of one SmolLM2-sized linear layer (m tokens) in `dtype_name` on this CPU."""
    import torch

    dtype = getattr(torch, dtype_name)
    x, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    torch.nn.functional.linear(x, w)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.nn.functional.linear(x, w)
        best = min(best, time.perf_counter() - t0)
    return 2 * m * k * n / best / 1e9


def text_windows(tokenizer, seq: int, n: int) -> list:
    """`n` windows of `seq` tokens of held-out text (every token a target), as training examples."""
    from bench.pydocs import write_split
    from slm_cli.data.tokenize import EncodedExample

    _, test = write_split(ROOT / "runs" / "pydocs")
    text = test.read_text(encoding="utf-8")[: max(200_000, 6 * seq * n)]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < seq * n:
        raise SystemExit(f"only {len(ids)} tokens of text for {n} windows of {seq}")
    return [EncodedExample(input_ids=ids[i * seq:(i + 1) * seq], labels=ids[i * seq:(i + 1) * seq]) for i in range(n)]


def worker(spec: dict) -> dict:
    """Load the pair, then (with a budget) fit the micro-batch, then train `steps` steps; report memory and speed."""
    from functools import partial

    from slm_cli import models
    from slm_cli.config.schema import DeepSpeedConfig, DistillSettings, ModelConfig, TrainConfig
    from slm_cli.data.tokenize import collate
    from slm_cli.distill.objective import KDObjective
    from slm_cli.engine import distributed as dist
    from slm_cli.engine import loop, memory
    from slm_cli.engine.logging import quiet_libraries
    from slm_cli.errors import SlmError

    quiet_libraries()
    dist.setup_env()
    loop.seed_everything(0)
    tokenizer = models.load_tokenizer(TEACHER)
    teacher = models.load_model(TEACHER, spec["teacher_dtype"])
    teacher.requires_grad_(False).eval()
    student = models.build_model(ModelConfig(**STUDENT), tokenizer)
    examples = text_windows(tokenizer, spec["seq"], spec["examples"])
    batch_fn = partial(collate, pad_token_id=tokenizer.pad_token_id)
    settings = DistillSettings(fused_loss=spec["fused"])
    vocab = teacher.config.vocab_size
    tcfg = TrainConfig(
        max_steps=spec["steps"], micro_batch_size=spec["batch"], memory_budget_gb=spec.get("budget"), lr=1e-4,
        warmup_steps=0, eval_every=0, precision=spec["precision"], gradient_checkpointing=spec["gc"],
    )
    dcfg = DeepSpeedConfig(zero_stage=spec["zero"], offload_optimizer=spec["offload"])

    def build(t):
        engine, _ = loop.initialize(student, t, dcfg)
        teacher.to(engine.device)
        return engine, KDObjective(teacher, settings, vocab, fused=spec["fused"])

    fit, t_fit = None, 0.0
    if spec.get("budget") is not None:
        def probe(t) -> float:
            engine, objective = build(t)
            return memory.probe_steps(engine, train_set=examples, collate=batch_fn, tcfg=t, seed=0, loss_fn=objective)

        t0 = time.perf_counter()
        try:
            fit = memory.fit_micro_batch(tcfg, probe, train_examples=len(examples))
        except SlmError as exc:  # no micro-batch fits: the engine's own refusal is the result
            return {"error": str(exc), "fit_seconds": time.perf_counter() - t0}
        t_fit = time.perf_counter() - t0
        tcfg.micro_batch_size = fit.micro_batch_size
    loaded_gb = memory.resident_gb()
    memory.reset_peak()  # from here on: the training process's own peak (the loop resets it again under a budget)
    engine, objective = build(tcfg)
    with tempfile.TemporaryDirectory() as work:
        result = loop.train(engine, train_set=examples, val_set=[], collate=batch_fn, tcfg=tcfg, seed=0,
                            work_dir=Path(work), resume=False, loss_fn=objective)
    timed = result.history[1:] or result.history
    seconds = sum(h["tokens"] / h["tokens_per_s"] for h in timed)
    return {
        "student_params": sum(p.numel() for p in student.parameters()),
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "micro_batch_size": tcfg.micro_batch_size,
        "tokens_per_step": tcfg.micro_batch_size * spec["seq"],
        "tokens_per_s": sum(h["tokens"] for h in timed) / seconds,
        "step_s": seconds / len(timed),
        "peak_gb": memory.peak_gb(),
        "loaded_gb": loaded_gb,
        "first_loss": result.history[0]["loss"],
        "fit": fit.record() if fit else None,
        "fit_seconds": t_fit,
    }


def run_worker(spec: dict) -> dict | None:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        print(f"FAILED {spec}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}", flush=True)
        return None
    return json.loads(line[len("RESULT "):])


def part_a(args, console) -> dict:
    from rich.table import Table

    results = {}
    for name, v in PART_A.items():
        spec = dict(dict(steps=args.steps), **v, seq=args.seq, batch=args.batch, examples=max(args.batch * args.steps, 8))
        r = run_worker(spec)
        if r is None:
            continue
        results[name] = r
        console.print(f"(a) {name}: {r['tokens_per_s']:.0f} tok/s, peak {r['peak_gb']:.2f} GB (loaded {r['loaded_gb']:.2f} GB)")
    base = next(iter(results.values()), None)
    r0 = base or {}
    t = Table(title=f"(a) one distillation step: {TEACHER} ({r0.get('teacher_params', 0) / 1e6:.0f}M) -> student "
                    f"({r0.get('student_params', 0) / 1e6:.1f}M), micro-batch {args.batch} x {args.seq} tokens, "
                    + (f"{args.steps - 1} timed step(s) after a warm-up" if args.steps > 1 else "one step, its warm-up included"))
    for col in ("configuration", "tokens/s", "x baseline", "peak GB", "peak vs baseline", "above load GB", "vs baseline",
                "first loss"):
        t.add_column(col, justify="left" if col == "configuration" else "right")
    for name, r in results.items():
        above = r["peak_gb"] - r["loaded_gb"]
        base_above = base["peak_gb"] - base["loaded_gb"]
        t.add_row(name, f"{r['tokens_per_s']:.0f}", f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x", f"{r['peak_gb']:.2f}",
                  f"{r['peak_gb'] / base['peak_gb'] - 1:+.0%}", f"{above:.2f}", f"{above / base_above - 1:+.0%}",
                  f"{r['first_loss']:.4f}")
    console.print(t)
    return results


def part_b(args, console) -> dict:
    from rich.table import Table

    results = {}
    for name, v in PART_B.items():
        spec = dict(v, seq=args.seq_b, batch="auto", budget=args.budget, steps=args.steps, examples=args.max_batch)
        r = run_worker(spec)
        if r is None:
            continue
        results[name] = r
        if "error" in r:
            console.print(f"(b) {name}: refused: {r['error']}")
            continue
        probes = ", ".join(f"{p['micro_batch_size']}: {p['peak_gb']:.2f}" if p["peak_gb"] else f"{p['micro_batch_size']}: {p['note']}"
                           for p in r["fit"]["probes"])
        console.print(f"(b) {name}: micro-batch {r['micro_batch_size']} ({probes}), {r['tokens_per_s']:.0f} tok/s, "
                      f"peak {r['peak_gb']:.2f} GB, probe {r['fit_seconds']:.0f} s")
    base = next((r for r in results.values() if "error" not in r), None)
    t = Table(title=f"(b) train.memory_budget_gb={args.budget:g}, train.micro_batch_size=auto (1, 2, 4, ... up to "
                    f"{args.max_batch}), windows of {args.seq_b} tokens")
    for col in ("configuration", "micro-batch", "probe: micro-batch -> peak GB", "peak GB in training", "tokens/s",
                "x baseline", "probe s"):
        t.add_column(col, justify="left" if col in ("configuration", "probe: micro-batch -> peak GB") else "right")
    for name, r in results.items():
        if "error" in r:
            t.add_row(name, "none fits", r["error"].split(" (the models")[0], "-", "-", "-", f"{r['fit_seconds']:.0f}")
            continue
        probes = ", ".join(f"{p['micro_batch_size']}->{p['peak_gb']:.2f}" if p["peak_gb"] else f"{p['micro_batch_size']}->({p['note']})"
                           for p in r["fit"]["probes"])
        t.add_row(name, str(r["micro_batch_size"]), probes, f"{r['peak_gb']:.2f}", f"{r['tokens_per_s']:.0f}",
                  f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-", f"{r['fit_seconds']:.0f}")
    console.print(t)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["a", "b", "both"], default="both")
    parser.add_argument("--seq", type=int, default=256, help="(a) tokens per sequence")
    parser.add_argument("--batch", type=int, default=4, help="(a) micro-batch")
    parser.add_argument("--steps", type=int, default=2, help="training steps per configuration; the first is a warm-up")
    parser.add_argument("--budget", type=float, default=2.0, help="(b) train.memory_budget_gb")
    parser.add_argument("--seq-b", type=int, default=64, help="(b) tokens per sequence")
    parser.add_argument("--max-batch", type=int, default=16, help="(b) training windows, the most auto tries")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))))
        return
    from slm_cli.ui import console

    console.print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
                  f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    gflops = {d: linear_gflops(d) for d in ("float32", "bfloat16")}
    console.print(f"one 256x576 @ 576x1536 linear here: fp32 {gflops['float32']:.1f} GFLOP/s, bf16 {gflops['bfloat16']:.1f} GFLOP/s")
    out = {"args": {k: v for k, v in vars(args).items() if k != "worker"}, "linear_gflops": gflops,
           "load_average_start": os.getloadavg()[0]}
    t0 = time.perf_counter()
    if args.part in ("a", "both"):
        out["a"] = part_a(args, console)
    if args.part in ("b", "both"):
        out["b"] = part_b(args, console)
    console.print(f"total {time.perf_counter() - t0:.0f} s, load average now {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
