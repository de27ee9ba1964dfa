"""Which decoder layers lose the most to FP8: quantize one layer at a time, measure perplexity.

    OMP_NUM_THREADS=2 .venv/bin/python bench/fp8_sensitivity.py --model smollm2-135m-instruct --top 4

Each row fake-quantizes (the exact arithmetic of the saved checkpoint, see
slm_cli.quant.report.fake_quant_model) the Linear layers of one decoder layer only and reports the
perplexity increase over the float model, on the corpus' validation split by default (first
--max-tokens tokens, window 512, stride 256), so that layers are not chosen on the test text that
`slm quantize` then scores. The effects add up roughly, so the layers at the top are the ones worth
keeping in bf16; the script prints the `quant.ignore` override that keeps the --top worst.
"""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table

from slm_cli import models
from slm_cli.evaluate.perplexity import perplexity
from slm_cli.pretrained import resolve_model_path
from slm_cli.quant.report import fake_quant_model
from slm_cli.data.text import split_text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--scheme", default="fp8_dynamic")
    ap.add_argument("--corpus", default="shakespeare")
    ap.add_argument("--split", default="validation", help="choose layers on data the quality check (test split) does not use")
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--top", type=int, default=4)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    path = resolve_model_path(args.model)
    tokenizer = models.load_tokenizer(path)
    model = models.load_model(path, "float32").eval()
    text = split_text(args.corpus, args.split, 0)

    def ppl(m) -> float:
        return perplexity(m, tokenizer, text, 512, 256, max_tokens=args.max_tokens)["perplexity"]

    base = ppl(model)
    every = ppl(fake_quant_model(model, args.scheme, ["lm_head"]))
    rows = []
    for i in range(model.config.num_hidden_layers):
        only_i = ["lm_head", rf"re:^(?!model\.layers\.{i}\.).*"]  # everything but layer i stays float
        rows.append({"layer": i, "increase_pct": 100 * (ppl(fake_quant_model(model, args.scheme, only_i)) / base - 1)})
        print(f"layer {i}: {rows[-1]['increase_pct']:+.3f}%", flush=True)
    rows.sort(key=lambda r: -r["increase_pct"])

    table = Table(title=f"{args.model}, {args.scheme}: one decoder layer quantized at a time "
                        f"(float ppl {base:.3f}, every layer quantized {every:.3f} = {100 * (every / base - 1):+.2f}%)")
    for col in ("layer", "ppl increase", "running sum"):
        table.add_column(col, justify="right")
    total = 0.0
    for r in rows:
        total += r["increase_pct"]
        table.add_row(str(r["layer"]), f"{r['increase_pct']:+.3f}%", f"{total:+.3f}%")
    Console().print(table)
    worst = sorted(r["layer"] for r in rows[: args.top])
    print(f"keep the {args.top} worst in bf16:  \"quant.ignore=[lm_head,'re:model\\.layers\\.({'|'.join(map(str, worst))})\\..*']\"")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"float_ppl": base, "all_ppl": every, "layers": rows}, f, indent=2)


if __name__ == "__main__":
    main()
