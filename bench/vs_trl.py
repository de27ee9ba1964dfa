"""slm distill vs TRL's GKDTrainer on the SmolLM2 pair: seconds per step, side by side in one run.

    .venv/bin/pip install trl==1.16.0            # bench-only: TRL is not a dependency of slm
    .venv/bin/python bench/vs_trl.py --steps 6 --batch 4 --new-tokens 128

Teacher: SmolLM2-135M-Instruct (the offline built-in, float32). Student: the teacher's first
`--student-layers` decoder layers with its embedding, norm and tokenizer (42M parameters at 4
layers), written once to runs/vs_trl/student. Data: `--examples` chat examples cut from Python's
documentation (bench/pydocs.py; a paragraph's start as the user turn, its continuation as the
assistant turn), the same JSONL for both trainers.

Both trainers run the same work in their own subprocess, float32, torch AdamW, lr 1e-5, no gradient
checkpointing, micro-batch `--batch`, one process:
  * supervised: generalized JSD (beta 0.5) on the dataset's completions, no cross-entropy term
    (TRL: lmbda=0; slm: distill=supervised, kd_weight=1);
  * on-policy: the student samples `--new-tokens` tokens (temperature 0.9) from each prompt and the
    teacher scores them (TRL: lmbda=1, max_new_tokens; slm: distill=on_policy, gen_max_new_tokens).
Per-step wall times are read from each trainer's own step boundaries (TRL: a TrainerCallback;
slm: metrics.jsonl's elapsed_s); the first step (warm-up, lazy init) is dropped and the median of
the rest is reported with the tokens each step scored (prompt + completion), since sampled
completions can stop early at EOS on either side. speed-up = TRL s/token / slm s/token.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_pair(out: Path, layers: int) -> tuple[str, Path]:
    """(teacher folder, student folder): the student keeps the teacher's first `layers` decoder layers."""
    from slm_cli.pretrained import resolve_model_path

    teacher = resolve_model_path("smollm2-135m-instruct")
    student = out / f"student-{layers}"
    if (student / "config.json").is_file():
        return teacher, student
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(teacher)
    config.num_hidden_layers = layers
    if isinstance(getattr(config, "layer_types", None), list):  # one entry per layer: keep the first `layers`
        config.layer_types = config.layer_types[:layers]
    source = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
    assert not missing, missing  # every student tensor comes from the teacher; the deeper layers are dropped
    tmp = out / f".student-{layers}.tmp"
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(teacher).save_pretrained(tmp)
    tmp.rename(student)
    return teacher, student


def build_data(out: Path, examples: int) -> Path:
    """Chat examples from the Python docs: a paragraph's first words ask, the rest answers."""
    from bench.pydocs import write_split

    path = out / f"docs-{examples}.jsonl"
    if path.is_file():
        return path
    calib, _ = write_split(REPO / "runs" / "pydocs")
    paragraphs = [p.strip() for p in calib.read_text().split("\n\n") if 600 <= len(p.strip()) <= 2000]
    rows = []
    for p in paragraphs[:examples]:
        words = p.split()
        head, tail = " ".join(words[:24]), " ".join(words[24:120])
        rows.append({"messages": [
            {"role": "user", "content": f"Continue this passage from the Python documentation:\n{head}"},
            {"role": "assistant", "content": tail},
        ]})  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------- workers (subprocesses)


def run_trl(args, teacher: str, student: Path, data: Path, work: Path) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(student)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    times: list[float] = []
    tokens: list[int] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    class CountingGKD(GKDTrainer):
        def compute_loss(self, model, inputs, *a, **k):
            tokens.append(int(inputs["attention_mask"].sum()))
            return super().compute_loss(model, inputs, *a, **k)

    config = GKDConfig(
        output_dir=str(work), max_steps=args.steps, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
        learning_rate=1e-5, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=True, bf16=False, fp16=False, seed=0, max_length=args.max_length, dataloader_num_workers=0,
        lmbda=1.0 if args.mode == "on_policy" else 0.0, beta=0.5, temperature=0.9, max_new_tokens=args.new_tokens,
        disable_dropout=True, gradient_checkpointing=False, optim="adamw_torch",
    )  # fmt: skip
    trainer = CountingGKD(
        model=AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32),
        teacher_model=AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32),
        args=config, train_dataset=load_dataset("json", data_files=str(data), split="train"),
        processing_class=tokenizer, callbacks=[StepTimer()],
    )  # fmt: skip
    trainer.train()
    return {"step_s": times, "step_tokens": tokens}


def run_slm(args, teacher: str, student: Path, data: Path, work: Path, precompute: bool = False,
            gen_cache: str | None = None) -> dict:
    mode = ["distill=on_policy", f"distill.gen_max_new_tokens={args.new_tokens}"] if args.mode == "on_policy" else ["distill=supervised"]
    command = [
        sys.executable, "-m", "slm_cli", "distill", f"model.name_or_path={student}", f"teacher.name_or_path={teacher}",
        "teacher.dtype=float32", f"data.source={data}", f"data.max_seq_len={args.max_length}", *mode,
        "distill.divergence=generalized_jsd", "distill.beta=0.5", "distill.kd_weight=1.0", "distill.gen_temperature=0.9",
        f"train.max_steps={args.steps}", f"train.micro_batch_size={args.batch}", "train.lr=1e-5", "train.warmup_steps=0",
        "train.lr_schedule=constant", "train.eval_every=0", "train.precision=fp32", "train.gradient_checkpointing=false",
        f"hydra.run.dir={work}", f"output_dir={work}/artifact",
    ] + (["teacher.logits=precompute"] if precompute else []) + ([f"distill.gen_cache={gen_cache}"] if gen_cache else [])  # fmt: skip
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    total_s = time.perf_counter() - started
    rows = [json.loads(line) for line in next(work.rglob("metrics.jsonl")).read_text().splitlines()]
    elapsed = [0.0] + [r["elapsed_s"] for r in rows]
    return {"step_s": [b - a for a, b in zip(elapsed, elapsed[1:])], "step_tokens": [r["tokens"] for r in rows], "run_s": total_s}


def _summary(result: dict) -> dict:
    step_s, step_tokens = result["step_s"][1:], result["step_tokens"][1 : len(result["step_s"])]
    return {
        "median_step_s": statistics.median(step_s),
        "tokens_per_step": statistics.mean(step_tokens) if step_tokens else float("nan"),
        "tokens_per_s": sum(step_tokens) / sum(step_s) if step_tokens else float("nan"),
        "steps_timed": len(step_s),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per run; the first is dropped as warm-up")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--student-layers", type=int, default=4)
    ap.add_argument("--modes", nargs="+", default=["supervised", "on_policy"])
    ap.add_argument("--out", default=str(REPO / "runs" / "vs_trl"))
    ap.add_argument("--compiled", action="store_true", help="also run slm on-policy with distill.gen_cache=compiled")
    ap.add_argument("--precompute", action="store_true", help="also run slm supervised with teacher.logits=precompute (top-64 teacher log-probs cached once)")
    ap.add_argument("--worker", choices=["trl", "slm", "slm-precompute", "slm-compiled"], help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher, student = build_pair(out, args.student_layers)
    data = build_data(out, args.examples)

    if args.worker:
        if args.worker == "trl":
            result = run_trl(args, teacher, student, data, Path(args.work))
        else:
            result = run_slm(args, teacher, student, data, Path(args.work), precompute=args.worker == "slm-precompute",
                             gen_cache="compiled" if args.worker == "slm-compiled" else None)
        print("RESULT " + json.dumps(result))
        return

    from rich.console import Console
    from rich.table import Table

    console = Console(width=150)
    console.print(
        f"teacher {teacher} | student {student} | {args.examples} examples | batch {args.batch} | {args.steps} steps "
        f"(first dropped) | on-policy {args.new_tokens} new tokens | {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"
    )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results: dict[tuple[str, str], dict] = {}
    for mode in args.modes:
        workers = ("trl", "slm") + (("slm-precompute",) if args.precompute and mode == "supervised" else ()) \
            + (("slm-compiled",) if args.compiled and mode == "on_policy" else ())
        for worker in workers:
            work = out / f"{stamp}-{mode}-{worker}"
            command = [sys.executable, __file__, "--worker", worker, "--mode", mode, "--work", str(work), "--out", str(out),
                       "--steps", str(args.steps), "--batch", str(args.batch), "--new-tokens", str(args.new_tokens),
                       "--max-length", str(args.max_length), "--examples", str(args.examples),
                       "--student-layers", str(args.student_layers)]  # fmt: skip
            started = time.perf_counter()
            proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=dict(os.environ, TRL_EXPERIMENTAL_SILENCE="1"))
            if proc.returncode != 0:
                raise SystemExit(f"{worker} {mode} failed:\n{proc.stderr[-3000:]}")
            line = next(l for l in proc.stdout.splitlines()[::-1] if l.startswith("RESULT "))
            results[(mode, worker)] = {**_summary(json.loads(line[7:])), "wall_s": time.perf_counter() - started}
            console.print(f"  {mode} {worker}: {results[(mode, worker)]}")

    table = Table(title="distillation step, slm vs TRL GKDTrainer (SmolLM2-135M teacher)")
    for c in ("mode", "trainer", "median s/step", "tokens/step", "tokens/s", "slm speed-up (tokens/s)"):
        table.add_column(c, justify="left" if c in ("mode", "trainer") else "right")
    names = {"trl": "TRL GKDTrainer", "slm": "slm distill", "slm-precompute": "slm, teacher.logits=precompute (steps only)",
             "slm-compiled": "slm, distill.gen_cache=compiled"}
    for mode in args.modes:
        trl = results[(mode, "trl")]
        for worker, name in names.items():
            if (mode, worker) not in results:
                continue
            r = results[(mode, worker)]
            ratio = f"{r['tokens_per_s'] / trl['tokens_per_s']:.2f}x" if worker != "trl" else ""
            table.add_row(mode, name, f"{r['median_step_s']:.2f}", f"{r['tokens_per_step']:.1f}", f"{r['tokens_per_s']:.1f}", ratio)
    console.print(table)
    (out / f"{stamp}.json").write_text(json.dumps({f"{m}/{w}": r for (m, w), r in results.items()}, indent=1))


if __name__ == "__main__":
    main()
