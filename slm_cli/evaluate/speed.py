"""Serving speed of a causal LM: size, memory, prefill latency, decode throughput, prefix reuse.

What the numbers mean
---------------------
* **prefill latency** (ms): one forward pass over a batch of `b` prompts of `L` tokens that also
  fills the KV cache, as a server does before the first new token. It grows with b*L (the
  matmuls) plus b*L^2 (attention).
* **decode throughput** (tokens/s): after the prefill, `n` greedy steps of one token per sequence,
  each reading the whole KV cache; b*n tokens over the time of the n steps only. A decode step
  is memory bound (every weight is read once per step whatever b is), so a larger batch buys
  tokens almost for free until the matmuls become compute bound: that is why servers batch.
* **prefix reuse** (items/s): a predictive task scores many candidate items after one shared
  context (a member profile, a few-shot block): score(item) = log P(" Yes" | prefix, item).
  Without reuse every item pays for prefix + item; with the prefix's KV cache computed once and
  shared, an item pays only for its own tokens (attending to the cached prefix). For a prefix
  of P tokens and items of I tokens the work falls roughly by (P + I) / I.

Every timing is a list of repeats after warm-up runs (the first calls allocate, pick kernels and
fill caches); we report the median and the spread (interquartile range, min and max), because a
shared machine makes single numbers lie.

Run as `python -m slm_cli.evaluate.speed SPEC.json RESULT.json`, a measurement happens in a
fresh process, so the peak resident memory it reports belongs to that one model alone; it prints
one `slm-bench-progress <done> <total>` line per measurement on stdout for `slm bench`'s progress.
"""

from __future__ import annotations

import copy
import json
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

from slm_cli.pretrained import ADAPTER_WEIGHTS, has_adapter

FP8_NOTE = "n/a (no FP8 kernels on CPU)"
INT_NOTE = "n/a under transformers (INT weights run decompressed; time them with bench.engine=vllm)"
# Tensors of a compressed-tensors checkpoint that carry quantization metadata, not parameters.
_NON_PARAM_SUFFIXES = ("_scale", "_zero_point", "_g_idx", "weight_shape")


# --- statistics --------------------------------------------------------------------------------


def summarize(samples: list[float]) -> dict:
    """Median and spread of repeated timings: median, q1, q3 (interquartile range), min, max, repeats.

    Quartiles by linear interpolation between order statistics (numpy's default): q1 is the value
    a quarter of the way from the smallest to the largest sample.
    """
    if not samples:
        raise ValueError("summarize needs at least one sample")
    xs = sorted(samples)

    def quantile(q: float) -> float:
        pos = q * (len(xs) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return {
        "median": statistics.median(xs),
        "q1": quantile(0.25),
        "q3": quantile(0.75),
        "min": xs[0],
        "max": xs[-1],
        "repeats": len(xs),
    }


def time_repeats(fn: Callable[[], object], warmup: int, repeats: int, sync: Callable[[], None] = lambda: None) -> list[float]:
    """Seconds taken by each of `repeats` calls of `fn`, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


# --- what is on disk ---------------------------------------------------------------------------


def read_config(folder: str | Path) -> dict:
    path = Path(folder) / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def is_fp8_checkpoint(folder: str | Path) -> bool:
    """True for a compressed-tensors checkpoint (config.json quantization_config.quant_method)."""
    qc = read_config(folder).get("quantization_config") or {}
    return qc.get("quant_method") == "compressed-tensors"


def weights_bytes(folder: str | Path) -> int:
    """Bytes of the weight files (*.safetensors) in the folder."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def safetensors_params(folder: str | Path) -> int:
    """Parameters counted from the safetensors headers without loading a tensor.

    A safetensors file starts with an 8-byte little-endian header length and a JSON header that
    gives every tensor's shape; scales and zero points of a quantized checkpoint are skipped so an
    FP8 model counts the same parameters as its source. Tied embeddings are stored once.
    """
    total = 0
    # a LoRA adapter beside the base (train.lora.merge=false) is merged on load: the model has the base's parameters
    for path in sorted(f for f in Path(folder).glob("*.safetensors") if f.name != ADAPTER_WEIGHTS):
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        for name, info in header.items():
            if name == "__metadata__" or name.endswith(_NON_PARAM_SUFFIXES):
                continue
            count = 1
            for d in info["shape"]:
                count *= d
            total += count
    return total


def rss_mb() -> float:
    """Resident memory of this process now (Linux /proc), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return peak_rss_mb()


def peak_rss_mb() -> float:
    """Largest resident memory this process has had (getrusage ru_maxrss, KiB on Linux), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- timing a model ----------------------------------------------------------------------------


def _sync_for(device) -> Callable[[], None]:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def random_ids(vocab_size: int, batch: int, length: int, seed: int, device="cpu"):
    """Token ids drawn uniformly from the vocabulary: speed does not depend on which tokens."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=g).to(device)


def prefill_latency(model, batch: int, seq_len: int, warmup: int, repeats: int, seed: int = 0) -> dict:
    """Seconds of one cache-filling forward pass over `batch` prompts of `seq_len` tokens (summarize())."""
    import torch

    device = next(model.parameters()).device
    ids = random_ids(model.config.vocab_size, batch, seq_len, seed, device)

    @torch.inference_mode()
    def step():
        # a server needs only the last position's logits to sample the first new token
        return model(input_ids=ids, use_cache=True, logits_to_keep=1).logits

    return summarize(time_repeats(step, warmup, repeats, _sync_for(device)))


def decode_throughput(model, batch: int, prompt_len: int, new_tokens: int, warmup: int, repeats: int, seed: int = 0) -> dict:
    """Greedy decode speed: batch*new_tokens / seconds of the decode steps (prefill excluded).

    Each repeat prefills a fresh cache (untimed), then runs `new_tokens` one-token steps, each
    feeding the argmax of the previous logits back in, as `generate` does, without its stopping
    rules: every sequence decodes exactly `new_tokens` tokens. Returns summarize() of tokens/s.
    """
    import torch

    device = next(model.parameters()).device
    sync = _sync_for(device)
    ids = random_ids(model.config.vocab_size, batch, prompt_len, seed, device)

    @torch.inference_mode()
    def once() -> float:
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        cache, nxt = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
        sync()
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=nxt, cache=cache, use_cache=True)
            cache, nxt = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
        sync()
        return batch * new_tokens / (time.perf_counter() - t0)

    for _ in range(warmup):
        once()
    return summarize([once() for _ in range(repeats)])


# --- scoring many items after one shared prefix ------------------------------------------------


def _logits_needed(ends: list[int], target_len: int, width: int) -> int:
    """How many trailing positions' logits score every row's target (the `logits_to_keep` to ask for).

    The logit at position t predicts the token at t + 1, so a target at [e - T, e) needs the
    logits at [e - T - 1, e - 1); asking only for those skips the vocabulary projection over
    the rest of the sequence, as a scoring server does.
    """
    return width - min(e - target_len - 1 for e in ends)


def _target_logprob(logits, input_ids, ends: list[int], target_len: int) -> list[float]:
    """Sum over each row's target tokens (the last `target_len` before `ends[row]`) of log p(token).

    `logits` holds the last logits.shape[1] positions of the padded input (see _logits_needed).
    """
    import torch

    offset = input_ids.shape[1] - logits.shape[1]
    logp = torch.log_softmax(logits.float(), dim=-1)
    out = []
    for row, end in enumerate(ends):
        out.append(float(sum(logp[row, t - 1 - offset, input_ids[row, t]] for t in range(end - target_len, end))))
    return out


def _right_padded(seqs: list[list[int]], pad: int):
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def score_items_full(model, prefix: list[int], items: list[list[int]], target: list[int], batch_size: int, pad: int = 0) -> list[float]:
    """log P(target | prefix + item) per item, each sequence run whole (no reuse): the baseline."""
    import torch

    device = next(model.parameters()).device
    scores: list[float] = []
    with torch.inference_mode():
        for i in range(0, len(items), batch_size):
            chunk = items[i : i + batch_size]
            seqs = [prefix + it + target for it in chunk]
            ids, mask = _right_padded(seqs, pad)
            ends = [len(s) for s in seqs]
            keep = _logits_needed(ends, len(target), ids.shape[1])
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=keep).logits
            scores += _target_logprob(logits, ids, ends, len(target))
    return scores


def prefix_cache(model, prefix: list[int]):
    """The KV cache (transformers DynamicCache) of the shared prefix, computed once."""
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode():
        return model(input_ids=torch.tensor([prefix], device=device), use_cache=True, logits_to_keep=1).cache


def score_items_cached(model, cache, prefix_len: int, items: list[list[int]], target: list[int], batch_size: int, pad: int = 0) -> list[float]:
    """log P(target | prefix + item) per item, reusing the prefix's KV cache `cache` (batch 1).

    For a batch of b items the cache is copied once and repeated b times along the batch
    (DynamicCache.batch_repeat_interleave); the items (right-padded) are fed after it with an
    attention mask of ones over the prefix, then `crop(-width)` drops the items' keys and values
    again so the same b-row cache serves the next batch. The prefix cache itself is never
    written. Positions continue from prefix_len, so each item sees exactly what it sees in
    score_items_full and the scores agree to float rounding.
    """
    import torch

    device = next(model.parameters()).device
    batched: dict[int, object] = {}  # batch size -> its cache of prefix rows
    scores: list[float] = []
    with torch.inference_mode():
        for i in range(0, len(items), batch_size):
            chunk = items[i : i + batch_size]
            if len(chunk) not in batched:
                c = copy.deepcopy(cache)
                c.batch_repeat_interleave(len(chunk))
                batched[len(chunk)] = c
            c = batched[len(chunk)]
            seqs = [it + target for it in chunk]
            ids, mask = _right_padded(seqs, pad)
            ids, mask = ids.to(device), mask.to(device)
            full_mask = torch.cat([torch.ones(len(chunk), prefix_len, dtype=mask.dtype, device=device), mask], dim=1)
            ends = [len(s) for s in seqs]
            keep = _logits_needed(ends, len(target), ids.shape[1])
            logits = model(input_ids=ids, attention_mask=full_mask, cache=c, use_cache=True, logits_to_keep=keep).logits
            c.crop(-ids.shape[1])
            scores += _target_logprob(logits, ids, ends, len(target))
    return scores


def scoring_workload(tokenizer, prefix_examples: int, items: int, seed: int) -> tuple[list[int], list[list[int]], list[int]]:
    """A predictive-task workload from arithmetic_yesno: (prefix ids, item ids, target ids).

    The prefix is `prefix_examples` solved train examples (the shared context, like a member
    profile before candidate items); each item is one unsolved test question; the target is
    " Yes". Pieces are tokenized separately, so both scoring paths see identical token ids.
    """
    from slm_cli.data.tasks import TASKS

    task = TASKS["arithmetic_yesno"]
    context = "\n\n".join(ex["prompt"] + ex["completion"] for ex in task.examples("train", prefix_examples, seed))
    questions = ["\n\n" + ex["prompt"] for ex in task.examples("test", items, seed)]
    ids = lambda text, special: list(tokenizer(text, add_special_tokens=special)["input_ids"])  # noqa: E731
    return ids(context, True), [ids(q, False) for q in questions], ids(task.choices[0], False)


def prefix_reuse_speed(model, tokenizer, prefix_examples: int, items: int, batch_size: int, warmup: int, repeats: int, seed: int = 0) -> dict:
    """Items/s scoring `items` questions after a shared prefix, without and with its KV cache.

    The with-reuse time includes computing the prefix cache once per pass (as a server would per
    request). Returns both summaries, their ratio of medians, the token counts and the largest
    score difference between the two paths.
    """
    prefix, its, target = scoring_workload(tokenizer, prefix_examples, items, seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    sync = _sync_for(next(model.parameters()).device)

    def without():
        return score_items_full(model, prefix, its, target, batch_size, pad)

    def with_reuse():
        return score_items_cached(model, prefix_cache(model, prefix), len(prefix), its, target, batch_size, pad)

    gap = max(abs(a - b) for a, b in zip(without(), with_reuse()))
    slow = summarize([len(its) / s for s in time_repeats(without, warmup, repeats, sync)])
    fast = summarize([len(its) / s for s in time_repeats(with_reuse, warmup, repeats, sync)])
    return {
        "prefix_tokens": len(prefix),
        "item_tokens_mean": sum(len(i) for i in its) / len(its),
        "items": len(its),
        "batch_size": batch_size,
        "no_reuse_items_per_s": slow,
        "reuse_items_per_s": fast,
        "speedup": fast["median"] / slow["median"],
        "max_score_diff": gap,
    }


# --- one artifact, measured in its own process -------------------------------------------------


def measurements(spec: dict) -> int:
    """How many timed measurements `measure(spec)` makes: the total its progress counts to."""
    prefill = len(spec["prefill_batch_sizes"]) * len(spec["prefill_seq_lens"])
    return prefill + len(spec["decode_batch_sizes"]) + (1 if spec.get("scoring") else 0)


# A line the measuring subprocess prints after each measurement: "<prefix> <done> <total>".
PROGRESS_PREFIX = "slm-bench-progress"


def parse_progress(line: str) -> tuple[int, int] | None:
    parts = line.split()
    if len(parts) == 3 and parts[0] == PROGRESS_PREFIX and parts[1].isdigit() and parts[2].isdigit():
        return int(parts[1]), int(parts[2])
    return None


def measure(spec: dict, progress: Callable[[int, int], None] | None = None) -> dict:
    """Every number for one model folder. `spec` holds: path, device, warmup, repeats,
    prefill_batch_sizes, prefill_seq_lens, decode_batch_sizes, decode_prompt_len, decode_new_tokens,
    scoring (dict or None: prefix_examples, items, batch_size), seed, threads, isolated (True when
    this process measures this model alone, so its peak RSS is the model's).

    An FP8 (compressed-tensors) checkpoint on CPU is not timed: there are no FP8 matmul kernels
    here, so a number would measure emulation and dequantization, not the format's speed.
    ``progress(done, total)`` is called after each measurement (total: ``measurements(spec)``).
    """
    path = spec["path"]
    cfg = read_config(path)
    result = {
        "path": str(path),
        "params": safetensors_params(path),
        "weights_bytes": weights_bytes(path),
        "dtype": cfg.get("dtype") or cfg.get("torch_dtype"),
        "fp8": is_fp8_checkpoint(path),
        "warmup": spec["warmup"],
        "repeats": spec["repeats"],
    }
    import torch
    import transformers
    from transformers import AutoTokenizer
    from transformers.utils.logging import disable_progress_bar

    disable_progress_bar()
    transformers.logging.set_verbosity_error()
    device = torch.device(spec.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    result["device"] = device.type
    if result["fp8"] and device.type == "cpu":
        fmt = (cfg.get("quantization_config") or {}).get("format", "")
        result["note"] = INT_NOTE if fmt in ("int-quantized", "pack-quantized") else FP8_NOTE
        return result
    torch.manual_seed(spec.get("seed", 0))
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    # Import what loading and scoring will import before taking the baseline: modeling code and
    # the task generators are a fixed ~150 MB of Python that is not the model's memory.
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = AutoConfig.from_pretrained(path, trust_remote_code=spec.get("trust_remote_code", False))
    if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
        _ = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]  # the lookup imports the modeling module
    if spec.get("scoring"):
        import slm_cli.data.tasks  # noqa: F401
    from slm_cli.models import load_checked

    if has_adapter(path):  # the LoRA adapter is merged on load, by peft: its import is not the model's memory either
        import peft  # noqa: F401
    q = torch.ones(1, 1, 4, 8)  # the math libraries' one-off workspaces are the process's, not the model's
    torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True) @ torch.ones(8, 8)
    base = rss_mb()
    t0 = time.perf_counter()
    model = load_checked(path, "bench", dtype="auto", trust_remote_code=spec.get("trust_remote_code", False))
    model = model.to(device).eval()
    result["load_s"] = time.perf_counter() - t0
    result["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    w, r, seed = spec["warmup"], spec["repeats"], spec.get("seed", 0)
    done, total = 0, measurements(spec)

    def measured(value):
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)
        return value

    result["prefill"] = [
        measured({"batch_size": b, "seq_len": n, "ms": _scaled(prefill_latency(model, b, n, w, r, seed), 1000.0)})
        for b in spec["prefill_batch_sizes"]
        for n in spec["prefill_seq_lens"]
    ]
    result["decode"] = [
        measured({
            "batch_size": b,
            "prompt_len": spec["decode_prompt_len"],
            "new_tokens": spec["decode_new_tokens"],
            "tokens_per_s": decode_throughput(model, b, spec["decode_prompt_len"], spec["decode_new_tokens"], w, r, seed),
        })
        for b in spec["decode_batch_sizes"]
    ]
    scoring = spec.get("scoring")
    if scoring:
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as exc:
            result["scoring"] = {"note": f"skipped: no tokenizer in {path} ({type(exc).__name__})"}
        else:
            result["scoring"] = prefix_reuse_speed(
                model, tokenizer, scoring["prefix_examples"], scoring["items"], scoring["batch_size"], w, r, seed
            )
        measured(None)
    # the headline numbers the report shows: the first prefill setting and the first decode setting
    result["latency_ms"] = result["prefill"][0]["ms"]["median"] if result["prefill"] else None
    result["decode_tokens_per_s"] = result["decode"][0]["tokens_per_s"]["median"] if result["decode"] else None
    if device.type == "cuda":
        result["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["memory_kind"] = "cuda max_memory_allocated"
    elif spec.get("isolated"):
        result["peak_memory_mb"] = peak_rss_mb() - base
        result["memory_kind"] = "peak RSS of loading + running, above the process's RSS before loading"
    else:
        # one process for several models: its lifetime peak belongs to whichever model was largest
        result["peak_memory_mb"] = None
        result["memory_kind"] = "not measured (bench.isolate=false shares one process)"
    return result


def _scaled(summary: dict, factor: float) -> dict:
    return {k: (v * factor if k != "repeats" else v) for k, v in summary.items()}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m slm_cli.evaluate.speed SPEC.json RESULT.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(args[0]).read_text())
    # progress goes to stdout, one line per measurement, for `slm bench` to show (the result goes to the file)
    def report(done: int, total: int) -> None:
        print(PROGRESS_PREFIX, done, total, flush=True)

    Path(args[1]).write_text(json.dumps(measure({**spec, "isolated": True}, progress=report), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
