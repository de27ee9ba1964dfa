"""FP8 with the most sensitive Linear tensors kept in bf16 (quant.keep_sensitive=auto), side by side
with every Linear in FP8 and with a whole decoder layer kept, on calibration and held-out text.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=2 .venv/bin/python bench/fp8_auto.py --json /tmp/fp8_auto.json

Per scheme (fp8_dynamic, fp8_static) and variant the script reports: perplexity increase over the float
(fp32) source on the calibration rows (the first --samples x --seq-len tokens of runs/pydocs/calib.txt,
each row its own sequence: what quant.max_ppl_increase is checked on) and on held-out text
(runs/pydocs/test.txt, first --max-tokens tokens, window 512, stride 256: what `slm quantize` scores),
the checkpoint's bytes over the bf16 checkpoint's, and the selection's seconds. Every FP8 model is the
in-memory fake-quantized one (slm_cli.quant.report.fake_quant_model with the storage rounding of a
saved checkpoint), which tests/stages/test_quantize.py shows computes what the reloaded checkpoint
computes. Bytes are counted from tensor shapes: 2 per bf16 weight, 1 per FP8 weight, 4 per scale.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `bench.pydocs` when run as a script

import torch
from compressed_tensors.quantization.utils import is_module_quantized
from rich.console import Console
from rich.table import Table

from bench.pydocs import write_split
from slm_cli import models
from slm_cli.data.text import calibration_rows
from slm_cli.evaluate.perplexity import perplexity
from slm_cli.pretrained import resolve_model_path
from slm_cli.quant.report import fake_quant_model
from slm_cli.quant.select import mean_nll, select_sensitive


def checkpoint_bytes(fq: torch.nn.Module) -> tuple[int, int]:
    """(bytes of the FP8 checkpoint, bytes of the bf16 checkpoint) from shapes; tied tensors once."""
    fp8 = bf16 = 0
    seen = set()
    for module in fq.modules():
        quantized = is_module_quantized(module)
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if pname.endswith(("_scale", "_zero_point")):
                fp8 += 4 * p.numel() if pname.endswith("_scale") else 0
                continue
            bf16 += 2 * p.numel()
            fp8 += (1 if quantized and pname == "weight" else 2) * p.numel()
    return fp8, bf16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--schemes", nargs="+", default=["fp8_dynamic", "fp8_static"])
    ap.add_argument("--pydocs", default="runs/pydocs")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--sensitivity-tokens", type=int, default=1024)
    ap.add_argument("--sensitivity", default="fisher", choices=["fisher", "kl"])
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--max-ppl-increase", type=float, default=0.01)
    ap.add_argument("--max-keep-fraction", type=float, default=0.03)
    ap.add_argument("--only-auto", action="store_true", help="skip the every-Linear and whole-layer variants")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    folder = Path(args.pydocs)
    if not (folder / "test.txt").exists():
        write_split(folder)
    path = resolve_model_path(args.model)
    tokenizer = models.load_tokenizer(path)
    model = models.load_model(path, "float32").eval()
    rows = calibration_rows((folder / "calib.txt").read_text(), tokenizer, args.samples, args.seq_len)
    test_text = (folder / "test.txt").read_text()[: 40 * args.max_tokens]
    last = model.config.num_hidden_layers - 1

    def test_ppl(m) -> float:
        return perplexity(m, tokenizer, test_text, 512, 256, max_tokens=args.max_tokens)["perplexity"]

    base_calib = math.exp(mean_nll(model, rows, 4))
    base_test = test_ppl(model)
    print(f"float source: calibration ppl {base_calib:.4f}, test ppl {base_test:.4f}", flush=True)
    results = []
    for scheme in args.schemes:
        calib = list(rows.split(4)) if scheme == "fp8_static" else None
        started = time.perf_counter()
        sel = select_sensitive(
            model, scheme, ["lm_head"], rows, keep="auto", max_ppl_increase=args.max_ppl_increase,
            max_keep_fraction=args.max_keep_fraction, sensitivity_tokens=args.sensitivity_tokens,
            calib_batches=calib, method=args.sensitivity, progress=lambda what, d, t: print(f"  {scheme} {what} {d}/{t} at {time.perf_counter() - started:.0f} s", flush=True) if t in (0, d) or d % 30 == 0 else None,
        )
        seconds = time.perf_counter() - started
        variants = {
            "every Linear in FP8": [],
            f"whole last layer ({last}) kept": [rf"re:model\.layers\.{last}\..*"],
            "keep_sensitive=auto": sel["kept"],
        }
        if args.only_auto:
            variants = {"keep_sensitive=auto": sel["kept"]}
        for label, kept in variants.items():
            fq = fake_quant_model(model, scheme, ["lm_head", *kept], calib, storage_dtype=torch.bfloat16).eval()
            calib_ppl = math.exp(mean_nll(fq, rows, 4))
            ppl = test_ppl(fq)
            fp8_bytes, bf16_bytes = checkpoint_bytes(fq)
            row = {
                "scheme": scheme, "variant": label, "kept_tensors": len(kept) if label.startswith("keep") else kept,
                "calib_ppl": calib_ppl, "calib_increase_pct": 100 * (calib_ppl / base_calib - 1),
                "test_ppl": ppl, "test_increase_pct": 100 * (ppl / base_test - 1),
                "bytes_ratio": fp8_bytes / bf16_bytes,
                "selection_seconds": seconds if label.startswith("keep") else None,
                "sensitivity_seconds": sel["sensitivity_seconds"] if label.startswith("keep") else None,
            }
            results.append(row)
            print(json.dumps(row), flush=True)
            del fq
        results[-1]["selection"] = {k: v for k, v in sel.items() if k != "tensors"} | {"top": sel["tensors"][:20]}

    table = Table(title=f"{args.model}: float calib ppl {base_calib:.3f}, test ppl {base_test:.3f}")
    for col in ("scheme", "variant", "calib ppl", "test ppl", "bytes / bf16", "selection s"):
        table.add_column(col)
    for r in results:
        table.add_row(r["scheme"], r["variant"], f"{r['calib_ppl']:.3f} ({r['calib_increase_pct']:+.2f}%)",
                      f"{r['test_ppl']:.3f} ({r['test_increase_pct']:+.2f}%)", f"{r['bytes_ratio']:.4f}x",
                      "" if r["selection_seconds"] is None else f"{r['selection_seconds']:.0f} ({r['sensitivity_seconds']:.0f} per-tensor)")
    Console().print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"base_calib_ppl": base_calib, "base_test_ppl": base_test,
                                               "args": vars(args), "rows": results}, indent=2))


if __name__ == "__main__":
    main()
