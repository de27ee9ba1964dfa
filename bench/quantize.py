"""FP8 size and quality for every scheme, on SmolLM2-135M-Instruct and a small trained student.

    .venv/bin/python bench/quantize.py --student outputs/student/<run>/artifact

Each scheme runs the real `slm quantize` command (a fresh process, as a user runs it) into a
temporary folder and reads its slm.json: bytes of the quantized Linear layers and of the whole
checkpoint against bf16, and perplexity of the saved checkpoint loaded back vs its source on the
`shakespeare` test split (first --eval-tokens tokens, sliding window --window / --stride). A
scheme the model cannot take (fp8_block needs 128-divisible shapes) is reported with the reason.
Targets: quantized layers <= 0.55x their bf16 bytes, perplexity increase <= 1% for fp8_dynamic.
CPU only: FP8 is a storage format here, so no latency is measured.
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

SCHEMES = ["fp8_dynamic", "fp8_static", "fp8_weight_only", "fp8_block"]
COLUMNS = ["model", "scheme", "quantized layers", "quantized / bf16", "total / bf16", "ppl source", "ppl fp8",
           "ppl change", "max rel. weight err", "seconds"]


def run_scheme(model_path: str, scheme: str, args, work: Path) -> dict:
    out = work / f"{Path(model_path).name}-{scheme}"
    cmd = [
        sys.executable, "-m", "slm_cli", "quantize", f"model.name_or_path={model_path}", f"quant={scheme}",
        f"output_dir={out}", f"hydra.run.dir={work / 'logs'}",
        f"eval.max_tokens={args.eval_tokens}", f"eval.window={args.window}", f"eval.stride={args.stride}",
        f"calibration.samples={args.calib_samples}", f"calibration.seq_len={args.calib_seq_len}",
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        reason = proc.stderr.strip().splitlines()
        reason = next((line for line in reason if "slm error" in line), reason[-1] if reason else "?")
        return {"scheme": scheme, "refused": reason.replace("slm error:", "").strip(), "seconds": seconds}
    metrics = json.loads((out / "slm.json").read_text())["metrics"]
    return {**metrics, "seconds": seconds}


def row(name: str, r: dict) -> dict:
    if "refused" in r:
        return {"model": name, "scheme": r["scheme"], "quantized layers": "refused", "ppl change": r["refused"][:90] + "..."}
    return {
        "model": name,
        "scheme": r["scheme"],
        "quantized layers": r["quantized_layers"],
        "quantized / bf16": f"{r['quantized_ratio']:.3f}x",
        "total / bf16": f"{r['total_ratio']:.3f}x",
        "ppl source": f"{r['perplexity_source']:.3f}",
        "ppl fp8": f"{r['perplexity_fp8']:.3f}",
        "ppl change": f"{r['perplexity_increase_pct']:+.3f}%",
        "max rel. weight err": f"{r['max_rel_weight_error']:.4f}",
        "seconds": f"{r['seconds']:.0f}",
    }


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smollm2", default="smollm2-135m-instruct", help="built-in name or HF folder; '' to skip")
    p.add_argument("--student", default="", help="a trained student artifact folder; '' to skip")
    p.add_argument("--schemes", default=",".join(SCHEMES))
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--stride", type=int, default=256)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--json", default="", help="also write the raw metrics here")
    args = p.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

    models = []
    if args.smollm2:
        from slm_cli.pretrained import resolve_model_path

        models.append(("SmolLM2-135M-Instruct", resolve_model_path(args.smollm2)))
    if args.student:
        models.append(("student", args.student))
    raw, rows = [], []
    with tempfile.TemporaryDirectory(prefix="slm-bench-quantize-") as tmp:
        for name, path in models:
            for scheme in args.schemes.split(","):
                r = run_scheme(path, scheme, args, Path(tmp))
                raw.append({"model": name, "path": path, **r})
                rows.append(row(name, r))
                print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
