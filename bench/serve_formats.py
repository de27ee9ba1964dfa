"""Serving formats for CPUs and GPUs without FP8, on SmolLM2-135M-Instruct: INT8 W8A8 and INT4 W4A16
(GPTQ against round-to-nearest), quality on held-out in-domain text, bytes, and speed through vLLM.

    OMP_NUM_THREADS=2 .venv/bin/python bench/serve_formats.py                  # quantize + quality + bytes
    OMP_NUM_THREADS=2 .venv/bin/python bench/serve_formats.py --vllm           # + vLLM timings (make serve-check first)

Every artifact is made by the real `slm quantize` with its defaults, calibrated on Python's
documentation (runs/pydocs/calib.txt, bench/pydocs.py: 32 rows x 512 tokens) and scored on the
held-out test.txt (sliding-window perplexity, window 512, stride 256, first --eval-tokens tokens),
in float32 (this host runs bf16 matmuls at 0.15x fp32). The dense reference is the same model
through the same scorer (each slm.json's perplexity_source). Bytes are the safetensors files on
disk against the same model in bf16 (every tensor at 2 bytes: the built-in SmolLM2 folder is float32).

With --vllm, `slm bench bench.engine=vllm` times the dense source and each format through vLLM's
offline engine (its CPU build here): time to first token, decode tokens/s at batch 1 and 16 with
64 new tokens, and prefix-cached scoring items/s, once per --vllm-dtypes activation dtype (e.g.
`--vllm-dtypes float32 bfloat16`). Artifacts already in --out are reused.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FORMATS = {  # name (its folder: / -> -) -> `slm quantize` overrides
    "w8a8_int8": ["quant=w8a8_int8"],  # the defaults: SmoothQuant 0.5, keep_sensitive=auto (+1.5% budget)
    "w8a8_int8/smooth0": ["quant=w8a8_int8", "quant.smoothing_strength=0"],
    "w8a8_int8/smooth0/all": ["quant=w8a8_int8", "quant.smoothing_strength=0", "quant.keep_sensitive=none"],
    "w4a16": ["quant=w4a16"],  # the defaults: GPTQ with act_order, group_size=auto (64 here)
    "w4a16/no_act_order": ["quant=w4a16", "quant.gptq_act_order=false"],
    "w4a16/rtn": ["quant=w4a16", "quant.rounding=rtn"],
}


def slm(*args: str) -> None:
    """One slm command in its own process, as a user runs it; its output goes to the terminal."""
    subprocess.run([sys.executable, "-m", "slm_cli", *args], check=True, cwd=ROOT)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=os.path.expanduser("~/.cache/slm/models/smollm2-135m-instruct"))
    p.add_argument("--pydocs", default="runs/pydocs")
    p.add_argument("--out", default="runs/serve_formats")
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--vllm", action="store_true", help="also time the source and each format through vLLM")
    p.add_argument("--vllm-dtypes", nargs="+", default=["auto"], help="bench.vllm_dtype values, one timed run each "
                   "(auto: bf16 on a GPU or a CPU with native bf16, else float32)")
    p.add_argument("--vllm-repeats", type=int, default=3)
    p.add_argument("--no-vllm-scoring", action="store_true", help="skip prompt scoring through vLLM (32 prompts of "
                   "~820 tokens per repeat: it did not finish in 9 minutes for one artifact on this 2-core CPU)")
    args = p.parse_args()
    pydocs, out = ROOT / args.pydocs, ROOT / args.out
    if not (pydocs / "calib.txt").is_file():
        subprocess.run([sys.executable, str(ROOT / "bench" / "pydocs.py"), "--out", str(pydocs)], check=True)
    rows = []
    for name in args.formats:
        folder = out / name.replace("/", "-")
        if not (folder / "slm.json").is_file():
            slm("quantize", f"model.name_or_path={args.model}", *FORMATS[name], "model.dtype=float32",
                f"calibration.source={pydocs / 'calib.txt'}", f"eval.source={pydocs / 'test.txt'}",
                f"eval.max_tokens={args.eval_tokens}", f"output_dir={folder}")
        m = json.loads((folder / "slm.json").read_text())["metrics"]
        rows.append({
            "format": name, "folder": str(folder),
            "ppl_source": m["perplexity_source"], "ppl": m["perplexity_quantized"],
            "ppl_increase_pct": m["perplexity_increase_pct"],
            "total_ratio": m["total_ratio"], "quantized_ratio": m["quantized_ratio"],  # against bf16, whatever the source dtype
            "total_mb": m["total_bytes"] / 2**20, "kept_bf16": len(m.get("kept_bf16", [])),
            "gptq_error": m.get("gptq_mean_error"), "rtn_error": m.get("rtn_mean_error"),
            "group_size": m.get("group_size"), "seconds": m.get("seconds"),
        })
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"serving formats, SmolLM2-135M-Instruct, held-out pydocs ({args.eval_tokens} tokens)")
    for col in ("format", "perplexity", "vs dense source", "bytes vs bf16", "quantized layers vs bf16", "kept bf16",
                "layer error (GPTQ / RTN)"):
        table.add_column(col)
    for r in rows:
        err = f"{r['gptq_error']:.4f} / {r['rtn_error']:.4f}" if r["gptq_error"] is not None else "-"
        table.add_row(r["format"], f"{r['ppl']:.3f} (source {r['ppl_source']:.3f})", f"{r['ppl_increase_pct']:+.2f}%",
                      f"{r['total_ratio']:.3f}x ({r['total_mb']:.1f} MB)", f"{r['quantized_ratio']:.3f}x",
                      str(r["kept_bf16"]), err)
    console.print(table)

    benches = {}
    for dtype in args.vllm_dtypes if args.vllm else []:
        # one `slm bench` per activation dtype vLLM serves in; the source is the dense reference of each
        folders = [args.model] + [r["folder"] for r in rows]
        bench_out = out / f"vllm_bench-{dtype}"
        slm("bench", *folders, "bench.engine=vllm", f"bench.vllm_dtype={dtype}", "bench.decode_batch_sizes=[1,16]",
            "bench.decode_new_tokens=64", f"bench.repeats={args.vllm_repeats}", f"output_dir={bench_out}", "overwrite=true",
            *(["bench.scoring.enabled=false"] if args.no_vllm_scoring else []))
        bench = benches[dtype] = json.loads((bench_out / "bench.json").read_text())
        names = ["dense source"] + [r["format"] for r in rows]
        t = Table(title=f"through vLLM (offline engine), bench.vllm_dtype={dtype}, same run")
        for col in ("artifact", "served as", "time to first token ms", "decode tok/s b1", "decode tok/s b16",
                    "b16 vs dense", "scoring items/s"):
            t.add_column(col)
        base16 = None
        for name, r in zip(names, bench["artifacts"]):
            if not r.get("decode"):
                t.add_row(name, "-", r.get("note") or "not measured", "", "", "", "")
                continue
            d = {x["batch_size"]: x["tokens_per_s"] for x in r["decode"]}
            base16 = base16 or d.get(16)
            t.add_row(name, str(r.get("dtype")), f"{r['ttft_ms']:.1f}", f"{d.get(1, 0):.1f}", f"{d.get(16, 0):.1f}",
                      f"{d.get(16, 0) / base16:.2f}x", f"{(r.get('scoring') or {}).get('items_per_s', 0):.1f}")
        console.print(t)
    (out / "serve_formats.json").write_text(json.dumps(
        {"date": datetime.date.today().isoformat(), "args": vars(args), "rows": rows, "vllm": benches}, indent=2, default=str))
    console.print(f"results: {out / 'serve_formats.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
