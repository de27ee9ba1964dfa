"""Which Linear tensors stay in bf16 so that FP8 costs at most a chosen perplexity increase.

How the selection works
-----------------------
FP8 rounds every weight with a relative error of up to 2^-4; most tensors shrug it off, a few
do not (on SmolLM2-135M, fp8_dynamic on every Linear costs ~+3% perplexity). Keeping a tensor
in bf16 costs one byte per weight more than FP8, so the question is which few tensors buy the
most quality per byte.

1. Sensitivity. For every targeted Linear ``t`` alone, the model with only ``t`` fake-quantized
   (the exact arithmetic of the saved checkpoint: weight Q·s, input activations fake-quantized as
   the scheme says, see ``slm_cli.quant.report.fake_quant_model``) is compared with the float
   model on calibration tokens by the mean per-token KL divergence

       S_t = 1/T · Σ_tokens KL(p_float(· | x_<i) ‖ p_t(· | x_<i)),

   which is never negative and, unlike a perplexity difference, does not cancel between tokens
   the rounding helps and tokens it hurts. The float model's input to every decoder layer is
   recorded once, so measuring a tensor of layer i reruns only layers i..L-1 and the head
   (about half a forward pass on average); the pass runs in the model's dtype on
   ``sensitivity_tokens`` tokens. That is still one partial forward pass per tensor (210 on SmolLM2-135M: hours on a
   loaded 2-core CPU), so the default (``sensitivity=fisher``, ``fisher_sensitivity``) estimates
   S_t for every tensor from one forward and one backward pass, with the same exact fake-quant
   output error; the joint checks below stay exact either way.
2. Order: by S_t per weight (bytes saved by FP8 are one per weight), most sensitive first.
3. Greedy with confirmation: the joint perplexity increase on the calibration rows is measured
   with everything quantized; while it exceeds the budget, tensors are added in order until the
   predicted increase, the last measured one scaled by the share of total sensitivity still
   quantized, is below the budget; then it is measured again. It stops when a measurement meets
   the budget, or when no further tensor fits the byte cap (then the result says the budget was
   not met). Every measurement is recorded.

Only tensor choice changes between measurements: quantized modules are identical whatever else
is kept (per-tensor weight scales; static input scales are observed on the float model), so
swapping float modules into one fake-quantized copy gives exactly the checkpoint that would be
saved with those tensors ignored.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from compressed_tensors.quantization.utils import is_module_quantized

from slm_cli.quant.schemes import QuantError
from slm_cli.quant.report import fake_quant_model

SENSITIVITY_METHODS = ("fisher", "kl")

__all__ = ["SENSITIVITY_METHODS", "fisher_sensitivity", "keep_order", "mean_nll", "parse_keep_sensitive", "select_sensitive", "tensor_sensitivity"]


def parse_keep_sensitive(value) -> int | str:
    """``quant.keep_sensitive`` as ``"auto"`` or a count of tensors (``none`` = 0)."""
    text = str(value).strip().lower()
    if text == "auto":
        return "auto"
    if text in ("none", "null", "false", "0"):
        return 0
    if text.isdigit():
        return int(text)
    raise QuantError(
        f"quant.keep_sensitive={value!r}: use auto (keep the fewest tensors in bf16 that meet "
        "quant.max_ppl_increase), a number N >= 0 (keep the N most sensitive), or none (quantize all)"
    )


def _set_module(model: torch.nn.Module, name: str, module: torch.nn.Module) -> torch.nn.Module:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, module)
    return old


@contextlib.contextmanager
def _swapped(model: torch.nn.Module, modules: dict[str, torch.nn.Module]):
    """``model`` with the named submodules replaced for the duration of the block."""
    old = {name: _set_module(model, name, m) for name, m in modules.items()}
    try:
        yield model
    finally:
        for name, m in old.items():
            _set_module(model, name, m)


def _decoder_parts(model):
    """(decoder layers, final norm, head) of a standard HF causal LM, or None."""
    try:
        decoder = model.get_decoder()
        layers, norm, head = decoder.layers, decoder.norm, model.get_output_embeddings()
    except AttributeError:
        return None
    return (layers, norm, head) if head is not None else None


class _Replay:
    """The float model's inputs to every decoder layer on a few batches, replayed from layer i on."""

    def __init__(self, model: torch.nn.Module, batches: Sequence[torch.Tensor]):
        self.model = model
        self.parts = _decoder_parts(model)
        self.batches = list(batches)
        self.inputs: list[list[tuple]] = []
        self.ref_logp: list[torch.Tensor] = []
        for ids in self.batches:
            seen: list[tuple] = []
            handles = []
            if self.parts is not None:
                for layer in self.parts[0]:
                    handles.append(layer.register_forward_pre_hook(
                        lambda _m, args, kwargs: seen.append((args, dict(kwargs))), with_kwargs=True
                    ))
            try:
                logits = model(input_ids=ids, use_cache=False).logits
            finally:
                for h in handles:
                    h.remove()
            if self.parts is not None and len(seen) != len(self.parts[0]):
                self.parts = None  # a model that does not call its layers once each: full forwards
            self.inputs.append(seen)
            self.ref_logp.append(F.log_softmax(logits[:, :-1].float(), dim=-1))

    def logits(self, b: int, first_layer: int | None) -> torch.Tensor:
        if self.parts is None or first_layer is None:
            return self.model(input_ids=self.batches[b], use_cache=False).logits
        layers, norm, head = self.parts
        args, kwargs = self.inputs[b][first_layer]
        h = args[0] if args else kwargs["hidden_states"]
        for j in range(first_layer, len(layers)):
            a, kw = self.inputs[b][j]
            h = layers[j](h, *a[1:], **{k: v for k, v in kw.items() if k != "hidden_states"})
            if isinstance(h, tuple):
                h = h[0]
        return head(norm(h))

    def kl(self, first_layer: int | None) -> float:
        """Mean per-token KL(float ‖ current model) over every batch."""
        total, count = 0.0, 0
        for b, ref in enumerate(self.ref_logp):
            logp = F.log_softmax(self.logits(b, first_layer)[:, :-1].float(), dim=-1)
            total += (ref.exp() * (ref - logp)).sum(-1).sum().item()
            count += ref.shape[0] * ref.shape[1]
        return total / max(count, 1)


@torch.no_grad()
def tensor_sensitivity(
    model: torch.nn.Module,
    scheme: str,
    ignore: Iterable[str],
    rows: torch.Tensor,
    calib_batches: Iterable | None = None,
    dtype: torch.dtype | None = None,
    batch_size: int = 2,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict]:
    """S_t (module docstring) of every Linear the scheme quantizes, computed on ``rows``.

    Works on copies of ``model`` (not modified), in ``dtype`` when given, else in the model's own
    dtype (``model.dtype``): bf16 is not faster everywhere (an AVX2-only CPU runs bf16 GEMMs at
    0.15x fp32, bench/gemm.py). Returns one dict per tensor: name, params (weights), kl (S_t),
    kl_per_param, layer; in no particular order.
    """
    ref = copy.deepcopy(model).eval()
    if dtype is not None:
        ref = ref.to(dtype)
    calib = None if calib_batches is None else list(calib_batches)
    fq = fake_quant_model(ref, scheme, list(ignore), calib)
    quantized = {name: m for name, m in fq.named_modules() if is_module_quantized(m)}
    floats = dict(ref.named_modules())
    replay = _Replay(ref, rows.split(batch_size))
    layer_of: dict[str, int | None] = {}
    if replay.parts is not None:
        index = {id(layer): i for i, layer in enumerate(replay.parts[0])}
        for name in quantized:
            owner = None
            parts = name.split(".")
            for k in range(len(parts), 0, -1):
                sub = floats.get(".".join(parts[:k]))
                if sub is not None and id(sub) in index:
                    owner = index[id(sub)]
                    break
            layer_of[name] = owner
    out = []
    for done, (name, module) in enumerate(quantized.items(), 1):
        with _swapped(ref, {name: module}):
            kl = replay.kl(layer_of.get(name))
        params = floats[name].weight.numel()
        out.append({"name": name, "params": params, "kl": kl, "kl_per_param": kl / params,
                    "layer": layer_of.get(name)})
        if progress is not None:
            progress(done, len(quantized))
    return out


def fisher_sensitivity(
    model: torch.nn.Module,
    scheme: str,
    ignore: Iterable[str],
    rows: torch.Tensor,
    calib_batches: Iterable | None = None,
    batch_size: int = 2,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict]:
    """A one-pass estimate of S_t for every tensor at once (``sensitivity=fisher``).

    To second order, the KL divergence a small change δ of the log-likelihood causes is
    ½·E[δ²] (the Fisher information). For tensor t with float output y and exact fake-quantized
    output ŷ (weight Q·s, input activations fake-quantized as the scheme says, both on the float
    model's input x), the first-order change of the loss at position p is g_p·(ŷ_p − y_p), where
    g_p = ∂NLL/∂y_p comes from one backward pass of the float model. So

        Ŝ_t = ½ · 1/T · Σ_p (g_p · (ŷ_p − y_p))²,

    for all tensors from one forward and one backward pass per batch instead of one (partial)
    forward pass per tensor. Same keys as ``tensor_sensitivity``, with ``kl`` holding Ŝ_t.
    """
    calib = None if calib_batches is None else list(calib_batches)
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    fq = fake_quant_model(ref, scheme, list(ignore), calib)
    quantized = {name: m for name, m in fq.named_modules() if is_module_quantized(m)}
    floats = dict(ref.named_modules())
    totals = {name: 0.0 for name in quantized}
    tokens = 0

    def hook(name):
        def forward_hook(_module, args, output):
            with torch.no_grad():
                dy = (quantized[name](args[0]) - output).detach()

            def on_grad(g):
                totals[name] += 0.5 * ((g * dy).sum(-1).float() ** 2).sum().item()

            output.register_hook(on_grad)

        return forward_hook

    handles = [floats[name].register_forward_hook(hook(name)) for name in quantized]
    batches = rows.split(batch_size)
    try:
        for done, ids in enumerate(batches, 1):
            with torch.enable_grad():
                embeds = ref.get_input_embeddings()(ids).detach().requires_grad_(True)
                logits = ref(inputs_embeds=embeds, use_cache=False).logits[:, :-1].float()
                nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1), reduction="sum")
                nll.backward()
            tokens += ids[:, 1:].numel()
            if progress is not None:
                progress(done, len(batches))
    finally:
        for h in handles:
            h.remove()
    out = []
    for name in quantized:
        params = floats[name].weight.numel()
        kl = totals[name] / max(tokens, 1)
        out.append({"name": name, "params": params, "kl": kl, "kl_per_param": kl / params, "layer": None})
    return out


def keep_order(sensitivity: list[dict]) -> list[dict]:
    """Tensors by sensitivity per weight, most sensitive first (ties by name, so it is deterministic)."""
    return sorted(sensitivity, key=lambda r: (-r["kl_per_param"], r["name"]))


@torch.no_grad()
def mean_nll(model: torch.nn.Module, rows: torch.Tensor, batch_size: int) -> float:
    """Mean next-token NLL over every row (each row its own sequence), in nats per token."""
    total, count = 0.0, 0
    for ids in rows.split(batch_size):
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1), reduction="sum")
        total += nll.item()
        count += ids[:, 1:].numel()
    return total / count


@torch.no_grad()
def select_sensitive(
    model: torch.nn.Module,
    scheme: str,
    ignore: Iterable[str],
    rows: torch.Tensor,
    keep: int | str = "auto",
    max_ppl_increase: float = 0.01,
    max_keep_fraction: float = 0.03,
    sensitivity_tokens: int = 2048,
    calib_batches: Iterable | None = None,
    storage_dtype: torch.dtype | None = torch.bfloat16,
    batch_size: int = 4,
    progress: Callable[[str, int, int], None] | None = None,
    max_rounds: int = 8,
    method: str = "fisher",
) -> dict:
    """The Linear tensors to keep in ``storage_dtype`` (bf16) besides ``ignore``; see the module docstring.

    ``keep``: ``"auto"`` (fewest tensors meeting ``max_ppl_increase``, a fraction: 0.01 = +1%
    perplexity on ``rows``) or an int N (the first N in sensitivity-per-weight order, measured
    but not checked against the budget). At most ``max_keep_fraction`` of the quantizable
    Linear weights are kept. ``model`` is not modified.

    Returns a dict for slm.json: kept (names), budget, cap, the measurements (kept count,
    perplexity increase), met (bool), the kept tensors' sensitivities, and seconds spent.
    """
    started = time.perf_counter()
    ignore = list(ignore)
    seq_len = rows.shape[1]
    n_sens = max(1, min(rows.shape[0], math.ceil(sensitivity_tokens / seq_len)))
    sens_rows = rows[:n_sens, : min(seq_len, max(2, sensitivity_tokens))]
    say = (lambda what: (lambda d, t: progress(what, d, t))) if progress else (lambda what: None)
    if method not in SENSITIVITY_METHODS:
        raise QuantError(f"quant.sensitivity={method!r}: choose one of {', '.join(SENSITIVITY_METHODS)}")
    measure_each = tensor_sensitivity if method == "kl" else fisher_sensitivity
    sensitivity = keep_order(
        measure_each(model, scheme, ignore, sens_rows, calib_batches, progress=say(f"sensitivity of each tensor ({method})"))
    )
    t_sens = time.perf_counter() - started
    total_params = sum(r["params"] for r in sensitivity)
    cap = int(max_keep_fraction * total_params)

    # exact arithmetic for the joint measurements: the source's dtype, unquantized tensors rounded as saved
    calib = None if calib_batches is None else list(calib_batches)
    fq = fake_quant_model(model, scheme, ignore, calib, storage_dtype=storage_dtype).eval()
    originals = dict(model.named_modules())

    def kept_module(name: str) -> torch.nn.Module:
        m = copy.deepcopy(originals[name])
        if storage_dtype is not None:
            for p in m.parameters():
                p.data = p.data.to(storage_dtype).to(p.dtype)
        return m

    nll_float = mean_nll(model.eval(), rows, batch_size)
    cache: dict[str, torch.nn.Module] = {}
    rounds: list[dict] = []

    def measure(kept: list[str]) -> float:
        for name in kept:
            if name not in cache:
                cache[name] = kept_module(name)
        with _swapped(fq, {n: cache[n] for n in kept}):
            nll = mean_nll(fq, rows, batch_size)
        increase = math.exp(nll - nll_float) - 1.0
        rounds.append({"kept": len(kept), "kept_params": sum(by_name[n]["params"] for n in kept),
                       "ppl_increase": increase})
        if progress is not None:
            progress("joint perplexity with tensors kept", len(rounds), 0)
        return increase

    by_name = {r["name"]: r for r in sensitivity}
    kept: list[str] = []
    kept_params = 0
    if keep != "auto":
        for r in sensitivity[: int(keep)]:
            kept.append(r["name"])
            kept_params += r["params"]
        increase = measure(kept)
        met = None
    else:
        total_kl = sum(r["kl"] for r in sensitivity) or 1e-30
        increase = measure(kept)
        candidates = list(sensitivity)
        while increase > max_ppl_increase and len(rounds) <= max_rounds:
            # predicted increase: the last measured one times the share of sensitivity still quantized
            measured_kl = total_kl - sum(by_name[n]["kl"] for n in kept)
            remaining_kl, added = measured_kl, 0
            for r in list(candidates):
                if kept_params + r["params"] > cap:
                    continue
                kept.append(r["name"])
                kept_params += r["params"]
                candidates.remove(r)
                added += 1
                remaining_kl -= r["kl"]
                if increase * remaining_kl / max(measured_kl, 1e-30) <= max_ppl_increase:
                    break
            if added == 0:
                break
            increase = measure(kept)
        met = increase <= max_ppl_increase
    return {
        "mode": "auto" if keep == "auto" else "count",
        "kept": kept,
        "kept_params": kept_params,
        "quantizable_params": total_params,
        "max_ppl_increase": max_ppl_increase,
        "max_keep_fraction": max_keep_fraction,
        "met": met,
        "ppl_increase": increase,
        "ppl_float": math.exp(nll_float),
        "rounds": rounds,
        "calibration_tokens": int(rows.numel()),
        "sensitivity_tokens": int(sens_rows.numel()),
        "sensitivity_method": method,
        "sensitivity_seconds": t_sens,
        "seconds": time.perf_counter() - started,
        "tensors": [{k: r[k] for k in ("name", "params", "kl", "kl_per_param")} | {"kept": r["name"] in kept}
                    for r in sensitivity],
    }

