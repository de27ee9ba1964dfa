"""Greedy-decoding loops before and after recovery: the share of repeated 4-grams in each model's replies.

    OMP_NUM_THREADS=2 .venv/bin/python bench/repetition.py runs/bench_smollm2_predictive/{teacher,pruned,recovered_sft,recovered}

Every model answers the same eight general questions (slm_cli.evaluate.repetition.CHAT_QUESTIONS), each in
its tokenizer's chat template, greedily, --new-tokens tokens at most (EOS ends a reply). The figure is the
pooled share of 4-grams of the replies that repeat an earlier 4-gram of the same reply
(slm_cli/evaluate/repetition.py): a dense chat model answering short questions scores near 0, a model
that loops tends to 1. `--text FILE` continues prompts of 64 tokens from a plain-text file instead.
One run, one table; `--json` keeps the rows and each model's first reply.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from rich.console import Console
from rich.table import Table

from slm_cli import models
from slm_cli.evaluate.repetition import chat_prompts, greedy_repetition, text_prompts
from slm_cli.pretrained import resolve_model_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="artifact folders, hub-style folders or built-in model names")
    ap.add_argument("--text", help="continue prompts of 64 tokens from this plain-text file (default: chat questions)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", help="write the rows (and each model's first reply) here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    console = Console()
    rows = []
    for name in args.models:
        path = resolve_model_path(name)
        tokenizer = models.load_tokenizer(path)
        model = models.load_model(path, dtype=args.dtype)
        if args.text:
            prompts = text_prompts(Path(args.text).read_text(), tokenizer, count=8, prompt_tokens=64)
        else:
            prompts = chat_prompts(tokenizer)
        start = time.perf_counter()
        result = greedy_repetition(model, tokenizer, prompts, max_new_tokens=args.new_tokens)
        first = model.generate(torch.tensor([prompts[0]]), max_new_tokens=args.new_tokens, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        reply = tokenizer.decode(first[0, len(prompts[0]):], skip_special_tokens=True)
        rows.append({
            "model": name,
            "params": sum(p.numel() for p in model.parameters()),
            "repeated_4grams": result["repeated_ngrams"],
            "new_tokens": result["new_tokens"],
            "prompts": result["prompts"],
            "seconds": round(time.perf_counter() - start, 1),
            "first_reply": reply,
        })
        console.print(f"{name}: {result['repeated_ngrams']:.1%} repeated 4-grams over {result['new_tokens']} tokens")
        del model

    table = Table(title=f"Repeated 4-grams in greedy replies ({'text continuations' if args.text else 'chat questions'}, "
                        f"<= {args.new_tokens} new tokens each)")
    for col in ("model", "params", "repeated 4-grams", "new tokens", "first reply (start)"):
        table.add_column(col, justify="left" if col in ("model", "first reply (start)") else "right")
    for r in rows:
        table.add_row(r["model"], f"{r['params']:,}", f"{r['repeated_4grams']:.1%}", str(r["new_tokens"]),
                      r["first_reply"][:60].replace("\n", " "))
    console.print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
