"""OSSCAR at keep_ffn 0.5 on SmolLM2-135M-Instruct, calibrated in-domain, no retraining: one run, two tables.

    OMP_NUM_THREADS=1 .venv/bin/python bench/prune.py --curve --json runs/bench_prune.json   # both tables
    OMP_NUM_THREADS=1 .venv/bin/python bench/prune.py --methods osscar --json runs/bench_prune.json  # one row

On 2 cores shared with other jobs (load 6-9), one OSSCAR row at 64 x 256 took 40-52 min of wall time
and the dense row 15 min, so the whole run takes hours: run it in parts into the same --json file
(rows already there are reused) and the last part prints both tables.

Text: Python's documentation split by file (bench/pydocs.py): calibrate on the first samples x 256
tokens of calib.txt, measure on test.txt (never used to choose anything): sliding-window perplexity
on its first --eval-tokens tokens (window 512, stride 256, as `slm prune` scores), and the repeated
4-gram fraction of greedy continuations (slm_cli/evaluate/repetition.py: --prompts prompts of 64 test
tokens, --new-tokens new tokens each).

Table 1, the comparison at 64 x 256 tokens (`slm prune`'s calibration budget until 2026-12-01, when table 2
moved it to 128 x 256): osscar with its default correction (residual: each layer refit toward the dense model's residual
stream), osscar with correction=none (the refit target before 2026-11-30: each layer's own weights
on the pruned model's inputs), and the baselines (wanda_sp, activation, magnitude), all on the same
rows; prune wall time and its ratio to osscar/none, measured in the same process.
Table 2, the calibration curve: osscar (defaults) at --curve-samples sequences of 256 tokens.

Every configuration prunes a fresh copy of the dense float32 model. With --json, each row is written
as soon as it is measured and a rerun with the same file skips the rows already there (long runs on
a shared machine can be resumed).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

METHODS = ["osscar", "osscar/none", "wanda_sp", "activation", "magnitude"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--pydocs", default="runs/pydocs", help="folder of calib.txt / test.txt (written if missing)")
    p.add_argument("--keep-ffn", type=float, default=0.5)
    p.add_argument("--samples", type=int, default=64, help="calibration rows of the comparison")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--methods", nargs="*", default=METHODS, choices=METHODS, help="comparison rows (none: skip)")
    p.add_argument("--curve", action="store_true", help="measure the calibration curve (table 2)")
    p.add_argument("--curve-samples", nargs="+", type=int, default=[32, 64, 128, 256])
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--dtype", default="float32", help="compute dtype of pruning and scoring")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    p.add_argument("--json", default=None, help="write rows here as they come; rows already in it are reused")
    args = p.parse_args()

    import torch
    from transformers.utils import logging as hf_logging

    from bench.pydocs import write_split
    from slm_cli import models, ui
    from slm_cli.data.text import calibration_rows
    from slm_cli.evaluate.perplexity import perplexity
    from slm_cli.evaluate.repetition import greedy_repetition, text_prompts
    from slm_cli.pretrained import resolve_model_path
    from slm_cli.prune import PrunePlan, count_params, prune_model

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    calib_path, test_path = write_split(args.pydocs)
    path = resolve_model_path(args.model)
    tokenizer = models.load_tokenizer(path)
    dense = models.load_model(path, args.dtype).eval()
    # the first 256 x 256 tokens lie well inside the first 4 MB of calib.txt: no need to tokenize 8.8 MB
    calib_text = calib_path.read_text(encoding="utf-8")[:4_000_000]
    test_text = test_path.read_text(encoding="utf-8")
    prompts = text_prompts(test_text, tokenizer, count=args.prompts, prompt_tokens=64)

    done: dict[str, dict] = {}
    if args.json and Path(args.json).is_file():
        done = {r["key"]: r for r in json.loads(Path(args.json).read_text())["rows"]}

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "rows": list(done.values())}, indent=2))

    def measure(key: str, make) -> dict:
        """Run ``make()`` -> (model, seconds, extra) unless ``key`` is in the JSON already; score it."""
        if key in done:
            ui.console.print(f"{key}: reused from {args.json}", highlight=False)
            return done[key]
        model, seconds, extra = make()
        ppl = perplexity(model, tokenizer, test_text, window=512, stride=256, max_tokens=args.eval_tokens)
        rep = greedy_repetition(model, tokenizer, prompts, max_new_tokens=args.new_tokens)
        row = {"key": key, **extra, "params": count_params(model), "perplexity": ppl["perplexity"],
               "eval_tokens": ppl["tokens"], "repeated_4grams": rep["repeated_ngrams"], "prune_seconds": seconds}
        done[key] = row
        save()
        ui.console.print(f"{key}: perplexity {row['perplexity']:.2f}, repeated 4-grams "
                         f"{row['repeated_4grams']:.1%}, {seconds:.0f} s", highlight=False)
        return row

    def pruned(method: str, correction: str, samples: int):
        def make():
            rows = calibration_rows(calib_text, tokenizer, samples, args.seq_len)
            plan = PrunePlan(method=method, keep_ffn=args.keep_ffn, correction=correction)
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            model, _ = prune_model(model, list(rows.split(8)), plan)
            return model, time.perf_counter() - start, {
                "method": method, "correction": correction if method == "osscar" else "-", "samples": samples,
                "calibration_tokens": int(rows.numel())}
        return make

    started = time.time()
    dense_row = measure("dense", lambda: (dense, 0.0, {"method": "dense", "correction": "-", "samples": 0}))
    comparison = []
    for name in args.methods:
        method, _, correction = name.partition("/")
        correction = correction or PrunePlan.correction
        comparison.append(measure(f"{name}@{args.samples}", pruned(method, correction, args.samples)))
    curve = []
    if args.curve:
        for samples in args.curve_samples:
            curve.append(measure(f"osscar@{samples}", pruned("osscar", PrunePlan.correction, samples)))

    before = done.get(f"osscar/none@{args.samples}")
    for row in [dense_row, *comparison, *curve]:
        row["increase"] = row["perplexity"] - dense_row["perplexity"]
        if before and row is not dense_row:
            row["time_vs_osscar_none"] = row["prune_seconds"] / before["prune_seconds"]
    columns = ["method", "correction", "samples", "params", "perplexity", "increase", "repeated_4grams",
               "prune_seconds", "time_vs_osscar_none"]
    ui.console.print(ui.records_table(
        f"SmolLM2-135M-Instruct, keep_ffn {args.keep_ffn}, no retraining: test.txt perplexity "
        f"({args.eval_tokens} tokens) and repeated 4-grams ({args.prompts} x {args.new_tokens} greedy tokens); "
        f"calibration {args.samples} x {args.seq_len} tokens of calib.txt",
        [dense_row, *comparison], columns))
    if curve:
        ui.console.print(ui.records_table(
            f"OSSCAR calibration curve (sequences of {args.seq_len} tokens, correction={PrunePlan.correction})",
            curve, ["samples", "calibration_tokens", "perplexity", "increase", "repeated_4grams", "prune_seconds",
                    "time_vs_osscar_none"]))
    ui.console.print(f"{datetime.date.today()}, {time.time() - started:.0f} s, torch threads {args.threads}, "
                     f"load average {os.getloadavg()[0]:.1f}", highlight=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
