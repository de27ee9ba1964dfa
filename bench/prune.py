"""Structured pruning without retraining on SmolLM2-135M-Instruct: perplexity and wall time per method.

    .venv/bin/python bench/prune.py                       # the whole table (~20-30 min on 2 busy cores)
    .venv/bin/python bench/prune.py --settings ffn0.5 --methods osscar --samples 128

Every method prunes a fresh copy of the same dense model on the same calibration rows (the first
samples x seq_len tokens of the `shakespeare` corpus' calibration split) and is scored on the same
text (the first --eval-tokens tokens of its test split, sliding window 512, stride --eval-stride), in memory
(the stage tests check that the saved checkpoint scores the same). Settings:

  ffn0.5, ffn0.75   keep that fraction of the 1536 MLP neurons in every layer
  q2of3             keep 2 of the 3 query heads of every KV group (9 -> 6 heads)
  drop6, drop10     drop 6 / 10 of the 30 layers by block influence; the width methods do not
                    apply, so these rows are measured once
Results go to the terminal and, with --json, to a file (figures in bench/prune.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import time

SETTINGS = {
    "ffn0.5": {"keep_ffn": 0.5},
    "ffn0.75": {"keep_ffn": 0.75},
    "q2of3": {"keep_q_per_kv": 2},
    "drop6": {"drop_layers": 6},
    "drop10": {"drop_layers": 10},
}
DEPTH_ONLY = {"drop6", "drop10"}
METHODS = ["osscar", "activation", "wanda_sp", "magnitude"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--samples", type=int, default=32, help="calibration rows")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration row")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-tokens", type=int, default=2048)
    p.add_argument("--eval-stride", type=int, default=511, help="sliding-window stride (window 512)")
    p.add_argument("--ridge", type=float, default=1e-2)
    p.add_argument("--local-search-iters", type=int, default=16)
    p.add_argument("--swap-candidates", type=int, default=32)
    p.add_argument("--greedy-steps", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args()

    import torch
    from transformers.utils import logging as hf_logging

    from slm_cli import models, ui
    from slm_cli.data import load_splits
    from slm_cli.evaluate.perplexity import perplexity
    from slm_cli.pretrained import resolve_model_path
    from slm_cli.prune import PrunePlan, count_params, prune_model

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    path = resolve_model_path(args.model)
    tokenizer = models.load_tokenizer(path)
    dense = models.load_model(path, "float32").eval()

    def text(split: str) -> str:
        rows = load_splits("shakespeare", train_size=1, val_size=None, test_size=None)[split]
        return "\n\n".join(r["text"] for r in rows)

    ids = tokenizer(text("validation"), verbose=False)["input_ids"][: args.samples * args.seq_len]
    calib = torch.tensor(ids).view(-1, args.seq_len)
    batches = list(calib.split(args.batch_size))
    eval_text = text("test")

    def score(model) -> float:
        return perplexity(model, tokenizer, eval_text, window=512, stride=args.eval_stride,
                          max_tokens=args.eval_tokens)["perplexity"]

    rows = []
    start = time.perf_counter()
    dense_ppl = score(dense)
    rows.append({"setting": "dense", "method": "-", "params": count_params(dense), "perplexity": dense_ppl,
                 "increase": 0.0, "seconds": 0.0})
    ui.console.print(f"dense: perplexity {dense_ppl:.2f} ({time.perf_counter() - start:.0f} s), "
                     f"calibration {tuple(calib.shape)}, eval {args.eval_tokens} tokens", highlight=False)
    for setting in args.settings:
        for method in (["osscar"] if setting in DEPTH_ONLY else args.methods):
            plan = PrunePlan(method=method, ridge=args.ridge, local_search_iters=args.local_search_iters,
                             swap_candidates=args.swap_candidates, greedy_steps=args.greedy_steps, **SETTINGS[setting])
            model = copy.deepcopy(dense)
            t0 = time.perf_counter()
            model, report = prune_model(model, batches, plan)
            seconds = time.perf_counter() - t0
            ppl = score(model)
            row = {"setting": setting, "method": "block_influence" if setting in DEPTH_ONLY else method,
                   "params": report.params_after, "perplexity": ppl, "increase": ppl - dense_ppl, "seconds": seconds}
            rows.append(row)
            ui.console.print(f"{setting:8s} {row['method']:16s} ppl {ppl:12.2f}  {seconds:7.1f} s", highlight=False)
            del model
            if args.json:  # after every row, so an interrupted run keeps what it measured
                with open(args.json, "w") as f:
                    json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    for setting in args.settings:
        if setting in DEPTH_ONLY:
            continue
        incr = {r["method"]: r["increase"] for r in rows if r["setting"] == setting}
        baselines = [v for k, v in incr.items() if k != "osscar"]
        if "osscar" in incr and baselines:
            ratio = incr["osscar"] / min(baselines)
            rows_of = [r for r in rows if r["setting"] == setting and r["method"] == "osscar"]
            rows_of[0]["ratio_to_best_baseline"] = ratio
    ui.console.print(ui.records_table(
        f"SmolLM2-135M-Instruct, no retraining: perplexity on {args.eval_tokens} test tokens "
        f"(calibration {calib.shape[0]}x{calib.shape[1]} tokens)",
        rows, ["setting", "method", "params", "perplexity", "increase", "ratio_to_best_baseline", "seconds"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
