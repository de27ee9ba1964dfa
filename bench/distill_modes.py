"""Distillation throughput of every `distill.mode` on the same teacher and student, side by side.

    OMP_NUM_THREADS=1 .venv/bin/python bench/distill_modes.py --teacher T --student S --steps 200

T and S are artifacts (e.g. `teacher` and `sft400` of bench/distill_quality.yaml). Each mode runs the
real `slm distill` in its own process, one after another, on the built-in arithmetic task with the
same batch and steps; tokens/s (trained tokens over training wall time, sampling included) and
seconds per step come from each artifact's slm.json. Read the ratios: they come from one run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

MODES = {
    "supervised": ["distill=supervised"],
    "on_policy": ["distill=on_policy"],
    "sequence_level": ["distill=sequence_level"],
    "mixed, lambda 0.5": ["distill=mixed", "distill.lambda_on_policy=0.5"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--student", required=True)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--gen-tokens", type=int, default=8, help="distill.gen_max_new_tokens for the sampling modes")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, overrides in MODES.items():
            out = Path(tmp) / label.split()[0]
            cmd = [
                sys.executable, "-m", "slm_cli", "distill", *overrides, "data=arithmetic", "data.train_size=20000",
                f"teacher.name_or_path={args.teacher}", f"model.name_or_path={args.student}", f"train.max_steps={args.steps}",
                f"train.micro_batch_size={args.batch}", "train.eval_every=0", "train.lr=1e-3",
                f"distill.gen_max_new_tokens={args.gen_tokens}", f"output_dir={out}", f"hydra.run.dir={tmp}/logs/{out.name}",
            ]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            m = json.loads((out / "slm.json").read_text())["metrics"]
            rows.append({"mode": label, "tokens": m["tokens"], "seconds": m["train_seconds"], "tokens_per_s": m["tokens_per_s"],
                         "s_per_step": m["train_seconds"] / m["steps"], "val_ce": m.get("val_ce")})
    base = rows[0]["s_per_step"]
    table = Table(title=f"slm distill, {args.steps} steps x {args.batch} sequences, arithmetic")
    for col in ("mode", "trained tokens", "tokens/s", "s/step", "step time vs supervised"):
        table.add_column(col, justify="left" if col == "mode" else "right")
    for r in rows:
        table.add_row(r["mode"], f"{r['tokens']:,}", f"{r['tokens_per_s']:,.0f}", f"{r['s_per_step']:.3f}", f"{r['s_per_step'] / base:.2f}x")
    Console().print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
