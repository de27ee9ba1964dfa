"""What FP8 itself costs: perplexity of fp32, bf16-rounded and FP8 checkpoints of one model, side by side.

`slm quantize` compares its FP8 checkpoint against the fp32 source; but the checkpoint keeps its
unquantized tensors (embeddings, norms) in bf16 and a served model is usually bf16 anyway, so this
separates the two roundings. Usage (FP8 folders written by `slm quantize` from the same source):

    OMP_NUM_THREADS=2 .venv/bin/python bench/fp8_vs_bf16.py --model smollm2-135m-instruct \\
        --fp8 fp8_dynamic=/tmp/q/a --fp8 'fp8_dynamic, down_proj kept bf16'=/tmp/q/b

Perplexity as the quantize stage measures it: the corpus' test split, first --max-tokens tokens,
window 512, stride 256; FP8 checkpoints are loaded back through transformers + compressed-tensors.
"""

from __future__ import annotations

import argparse
import json

import torch
from rich.console import Console
from rich.table import Table

from slm_cli import models
from slm_cli.evaluate.perplexity import perplexity
from slm_cli.pretrained import resolve_model_path
from slm_cli.data.text import split_text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--fp8", action="append", default=[], metavar="LABEL=FOLDER")
    ap.add_argument("--corpus", default="shakespeare")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    path = resolve_model_path(args.model)
    tokenizer = models.load_tokenizer(path)
    text = split_text(args.corpus, "test", 0)

    def ppl(model) -> float:
        return perplexity(model.eval(), tokenizer, text, args.window, args.stride, max_tokens=args.max_tokens)["perplexity"]

    rows = []
    model = models.load_model(path, "float32")
    rows.append(("fp32 source", ppl(model)))
    with torch.no_grad():
        for p in model.parameters():  # every tensor rounded to bf16, computed in fp32 as the FP8 reload is
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    rows.append(("bf16-rounded source", ppl(model)))
    del model
    for spec in args.fp8:
        label, folder = spec.split("=", 1)
        rows.append((label, ppl(models.load_model(folder, "float32"))))

    fp32, bf16 = rows[0][1], rows[1][1]
    table = Table(title=f"{args.model}: {args.corpus} perplexity, {args.max_tokens} tokens, window {args.window}, stride {args.stride}")
    for col in ("checkpoint", "perplexity", "vs fp32", "vs bf16"):
        table.add_column(col, justify="left" if col == "checkpoint" else "right")
    for label, value in rows:
        table.add_row(label, f"{value:.3f}", f"{100 * (value / fp32 - 1):+.2f}%", f"{100 * (value / bf16 - 1):+.2f}%")
    Console().print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"checkpoint": k, "perplexity": v} for k, v in rows], f, indent=2)


if __name__ == "__main__":
    main()
