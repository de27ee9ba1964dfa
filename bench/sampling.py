"""On-policy sampling speed: the student's KV cache, dynamic vs static vs compiled, side by side in one run.

    OMP_NUM_THREADS=2 .venv/bin/python bench/sampling.py --batch 2 --new-tokens 128 --calls 4

On-policy distillation spends most of its step writing the student's completions (BENCHMARKS.md,
"Distillation speed against TRL's GKDTrainer"). This times `slm_cli.distill.sampler.sample_completions`
(what `slm distill distill.mode=on_policy` calls) on the SmolLM2 pair of bench/vs_trl.py: the 4-layer
student (42M parameters) samples `--new-tokens` tokens at temperature 0.9 for `--batch` chat prompts
from the Python docs, once per `distill.gen_cache` setting:

  * dynamic: transformers' default, the KV cache grows each step;
  * static: preallocated KV cache (prompt + new tokens), eager forward;
  * compiled: static cache plus torch.compile of the decoding forward.

Each setting draws the same `--calls` batches of prompts (different prompts per call, as training does)
with the same seeds, after one untimed warm-up call on its own batch (for `compiled` that call
compiles, and its time is reported apart). Reported: median s per call, new tokens per second (EOS
cuts rows; the tokens counted are the ones kept), and the speed-up over dynamic.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--calls", type=int, default=4, help="timed calls per setting (each on its own prompts)")
    ap.add_argument("--caches", nargs="+", default=["dynamic", "static", "compiled"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(REPO / "runs" / "vs_trl"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch
    from rich.console import Console
    from rich.table import Table
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.vs_trl import build_data, build_pair
    from slm_cli.distill.sampler import sample_completions

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _, student = build_pair(out, 4)
    rows = [json.loads(line) for line in build_data(out, 64).read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(student)
    prompts = [tok.apply_chat_template(r["messages"][:1], add_generation_prompt=True, tokenize=True, return_dict=False)
               for r in rows]
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).eval()
    need = args.batch * (args.calls + 1)
    batches = [prompts[i:i + args.batch] for i in range(0, need, args.batch)]

    results = []
    for cache in args.caches:
        times, tokens = [], 0
        first_s = None
        for call, batch in enumerate(batches):
            torch.manual_seed(call)
            t0 = time.perf_counter()
            completions = sample_completions(model, batch, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
                                             max_new_tokens=args.new_tokens, temperature=0.9, cache=cache)
            elapsed = time.perf_counter() - t0
            if call == 0:
                first_s = elapsed
                continue
            times.append(elapsed)
            tokens += sum(len(c) for c in completions)
        median = statistics.median(times)
        results.append({"cache": cache, "first_call_s": first_s, "median_s": median, "min_s": min(times),
                        "max_s": max(times), "new_tokens_per_s": tokens / sum(times), "new_tokens": tokens,
                        "prompt_tokens": [len(p) for b in batches[1:] for p in b]})
        print(f"{cache}: first call {first_s:.1f} s, median {median:.2f} s/call", flush=True)

    base = next((r for r in results if r["cache"] == "dynamic"), results[0])
    table = Table(title=f"On-policy sampling: batch {args.batch}, {args.new_tokens} new tokens, "
                        f"{args.calls} calls, torch threads {torch.get_num_threads()}")
    for column in ("gen_cache", "first call s", "median s/call", "min-max s", "new tok/s", "vs dynamic"):
        table.add_column(column, justify="left" if column == "gen_cache" else "right")
    for r in results:
        table.add_row(r["cache"], f"{r['first_call_s']:.1f}", f"{r['median_s']:.2f}", f"{r['min_s']:.2f}-{r['max_s']:.2f}",
                      f"{r['new_tokens_per_s']:.1f}", f"{base['median_s'] / r['median_s']:.2f}x")
    Console().print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
