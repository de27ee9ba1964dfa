"""Calibration-driven structured pruning of a whole model, layer by layer.

Order of work (each step sees the model as already pruned by the steps before it):
1. Depth: score every decoder layer on the calibration batches and drop the least useful ones.
   ``block_influence`` (ShortGPT) is BI_i = 1 - mean over tokens of cos(h_in, h_out): a layer that
   barely rotates its residual stream changes little when removed.
2. Width, for layers in order: attention first, then the MLP of the same layer.  For each, a forward
   pre-hook on o_proj / down_proj accumulates the input Gram matrix H = sum x x^T (float32) and
   sum |x| over the calibration tokens, then raises to stop the forward early.  The chosen method
   (``solver.METHODS``) picks the kept groups and (for OSSCAR) refits o_proj / down_proj; surgery
   removes the rest.  Because layer i+1 is calibrated on the outputs of the pruned layer i, later
   layers correct for earlier error, as in OSSCAR.

Cached layer inputs: the decoder layers are replaced for one pass by catchers that record what the
model feeds them (layer 0's hidden states; every layer's keyword arguments: rotary cos/sin, causal
mask, position ids) and stop before the LM head.  From then on only the layer being pruned runs,
on the cached hidden states, which are then advanced through the pruned layer.  A model of L
layers costs about 3L layer forwards per batch instead of the ~L^2 of re-running the model from
the embeddings for each pruned module.

Attention with GQA has two nested choices: which KV heads to keep (a group = the n_rep query
heads reading one KV head, n_rep * head_dim columns of o_proj), then how many query heads to keep
inside every kept KV head (a group = one head, head_dim columns, the same count per KV head).
When both are asked for, the second problem is solved on the first one's kept columns, with the
first one's refit as its target (equivalent to the dense target up to a constant, because the
refit is the least-squares projection of the dense output onto those columns).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from .solver import METHODS, REFITTING, InputStats, SolverOptions, group_columns, relative_error
from .surgery import (
    attention_shape,
    decoder_layers,
    drop_layers,
    prune_attention,
    prune_mlp,
    resize_config,
    update_config,
)

log = logging.getLogger(__name__)

CORRECTIONS = ("none", "sublayer", "residual")
"""What the refit of a pruned o_proj / down_proj reconstructs (``PrunePlan.correction``)."""

Batch = Tensor | Mapping[str, Tensor]


@dataclass
class PrunePlan:
    """What to remove, and how to choose it.

    method: group selection method, a key of ``solver.METHODS`` (osscar, magnitude, activation, wanda_sp).
    keep_ffn: MLP neurons kept per layer: a float in (0, 1] is a fraction of intermediate_size,
        an int is a count.
    keep_kv_heads: KV heads kept per layer (with their query heads); None keeps all.
    keep_q_per_kv: query heads kept inside every kept KV head; None keeps all.
    drop_layers: number of whole decoder layers removed.
    depth_method: layer scoring for drop_layers, a key of ``DEPTH_METHODS`` (block_influence).
    round_to: the kept intermediate_size is rounded to a multiple of this (kernel-friendly widths).
    ridge: OSSCAR damping, H + ridge * mean(diag H) * I.
    local_search_iters: OSSCAR swap iterations (0 = greedy only, like fmchisel).
    swap_candidates: pruned groups tried per swap iteration.
    greedy_steps: at most this many Schur downdates in the greedy phase (see SolverOptions).
    correction: what the refit of o_proj / down_proj reconstructs on the pruned model's inputs X_p
        (see ``CORRECTIONS`` and the module doc): ``none`` the layer's own dense weights, X_p W;
        ``sublayer`` the dense model's sublayer output X_d W; ``residual`` the dense model's residual
        stream after the sublayer. Only methods that refit (osscar) use it.
    """

    method: str = "osscar"
    keep_ffn: float | int = 1.0
    keep_kv_heads: int | None = None
    keep_q_per_kv: int | None = None
    drop_layers: int = 0
    depth_method: str = "block_influence"
    round_to: int = 1
    ridge: float = 1e-2
    local_search_iters: int = 16
    swap_candidates: int = 32
    greedy_steps: int = 64
    correction: str = "residual"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"prune.method={self.method!r} is unknown; choose one of {sorted(METHODS)}")
        if self.correction not in CORRECTIONS:
            raise ValueError(
                f"prune.correction={self.correction!r} is unknown; choose one of {sorted(CORRECTIONS)}"
            )
        if self.depth_method not in DEPTH_METHODS:
            raise ValueError(
                f"prune.depth_method={self.depth_method!r} is unknown; choose one of {sorted(DEPTH_METHODS)}"
            )
        if isinstance(self.keep_ffn, bool) or not isinstance(self.keep_ffn, (int, float)):
            raise ValueError(f"prune.keep_ffn={self.keep_ffn!r} must be a fraction in (0, 1] or a neuron count")
        if isinstance(self.keep_ffn, float) and not 0.0 < self.keep_ffn <= 1.0:
            raise ValueError(f"prune.keep_ffn={self.keep_ffn} as a fraction must lie in (0, 1]")
        if isinstance(self.keep_ffn, int) and self.keep_ffn < 1:
            raise ValueError(f"prune.keep_ffn={self.keep_ffn} as a count must be >= 1")
        for name in ("keep_kv_heads", "keep_q_per_kv"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"prune.{name}={value!r} must be a positive int or null (keep all)")
        for name in ("drop_layers", "local_search_iters"):
            if getattr(self, name) < 0:
                raise ValueError(f"prune.{name}={getattr(self, name)} must be >= 0")
        for name in ("round_to", "swap_candidates", "greedy_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"prune.{name}={getattr(self, name)} must be >= 1")
        if self.ridge < 0:
            raise ValueError(f"prune.ridge={self.ridge} must be >= 0")

    def solver_options(self) -> SolverOptions:
        return SolverOptions(ridge=self.ridge, greedy_steps=self.greedy_steps,
                             local_search_iters=self.local_search_iters, swap_candidates=self.swap_candidates)


@dataclass
class Targets:
    """Per-layer widths the plan asks for on a given config (uniform over layers)."""

    intermediate_size: int
    num_key_value_heads: int
    q_per_kv: int
    num_hidden_layers: int

    @property
    def num_attention_heads(self) -> int:
        return self.num_key_value_heads * self.q_per_kv


def _round_half_up(x: float) -> int:
    """Nearest int, halves up (Python's round() sends 2.5 to 2, which surprises users)."""
    return math.floor(x + 0.5)


def resolve_targets(config, plan: PrunePlan) -> Targets:
    """Turn the plan's fractions/counts into widths for ``config``; impossible targets raise here."""
    inter = config.intermediate_size
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    n_rep = n_heads // n_kv
    if isinstance(plan.keep_ffn, float):
        keep_ffn = inter if plan.keep_ffn == 1.0 else max(1, _round_half_up(plan.keep_ffn * inter))
    else:
        keep_ffn = plan.keep_ffn
    if keep_ffn > inter:
        raise ValueError(f"prune.keep_ffn={plan.keep_ffn} keeps more neurons than intermediate_size={inter}")
    if keep_ffn < inter and plan.round_to > 1:
        keep_ffn = min(inter, plan.round_to * max(1, _round_half_up(keep_ffn / plan.round_to)))
    keep_kv = n_kv if plan.keep_kv_heads is None else plan.keep_kv_heads
    if keep_kv > n_kv:
        raise ValueError(f"prune.keep_kv_heads={keep_kv} exceeds the model's num_key_value_heads={n_kv}")
    q_per_kv = n_rep if plan.keep_q_per_kv is None else plan.keep_q_per_kv
    if q_per_kv > n_rep:
        raise ValueError(
            f"prune.keep_q_per_kv={q_per_kv} exceeds the query heads per KV head ({n_heads}/{n_kv}={n_rep})"
        )
    if plan.drop_layers >= config.num_hidden_layers:
        raise ValueError(
            f"prune.drop_layers={plan.drop_layers} would remove all {config.num_hidden_layers} layers"
        )
    return Targets(keep_ffn, keep_kv, q_per_kv, config.num_hidden_layers - plan.drop_layers)


def pruned_config(config, plan: PrunePlan):
    """The config the pruned model will have (validated by transformers; raises ValueError if not).

    Which layers are dropped is only known after calibration; for the config only their count
    matters (per-layer lists are cut to the first layers here).
    """
    t = resolve_targets(config, plan)
    return resize_config(config, intermediate_size=t.intermediate_size,
                         num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_key_value_heads,
                         kept_layers=range(t.num_hidden_layers))


def count_params(model: nn.Module) -> int:
    """Parameters counted once each (tied embeddings count once)."""
    return sum(p.numel() for p in model.parameters())


def count_params_after(config, plan: PrunePlan) -> int:
    """Exact parameter count of the pruned model, predicted from the config before any pruning.

    Builds the pruned architecture on the meta device (no memory, no weights), so biases, Qwen3's
    q_norm/k_norm and tied embeddings are counted exactly as transformers builds them.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(pruned_config(config, plan))
    return count_params(model)


class _StopForward(Exception):
    """Raised from a hook once the needed activations are captured: skip the rest of the model."""


def _inputs(batch: Batch, device: torch.device) -> tuple[dict, Tensor | None]:
    """Model kwargs and a (B, T) bool mask of real tokens (None when there is no padding info)."""
    if isinstance(batch, Tensor):
        return {"input_ids": batch.to(device)}, None
    kwargs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    mask = kwargs.get("attention_mask")
    return kwargs, (mask.bool() if mask is not None else None)


def _run(model: nn.Module, batches: list[Batch], on_batch: Callable[[Tensor | None], None]) -> None:
    """Forward every batch (no grad, no cache); a _StopForward from a hook ends that batch early."""
    device = next(model.parameters()).device
    for batch in batches:
        kwargs, mask = _inputs(batch, device)
        on_batch(mask)
        try:
            model(**kwargs, use_cache=False)
        except _StopForward:
            pass


def _token_rows(x: Tensor, mask: Tensor | None) -> Tensor:
    """(tokens, d) float32 rows of a (B, T, d) activation, padding removed."""
    rows = x.reshape(-1, x.shape[-1]).float()
    return rows if mask is None else rows[mask.reshape(-1).to(rows.device)]


@torch.no_grad()
def collect_input_stats(model: nn.Module, module: nn.Module, batches: list[Batch]) -> InputStats:
    """H = sum x x^T and sum |x| of ``module``'s input over all calibration tokens (float32)."""
    d = module.in_features
    device = module.weight.device
    state = {"gram": torch.zeros(d, d, device=device), "abs": torch.zeros(d, device=device), "n": 0, "mask": None}

    def hook(_module, args):
        rows = _token_rows(args[0], state["mask"])
        state["gram"].addmm_(rows.T, rows)
        state["abs"] += rows.abs().sum(0)
        state["n"] += rows.shape[0]
        raise _StopForward

    handle = module.register_forward_pre_hook(hook)
    try:
        _run(model, batches, lambda mask: state.__setitem__("mask", mask))
    finally:
        handle.remove()
    if state["n"] == 0:
        raise ValueError("no calibration tokens reached the layer: give non-empty calibration batches")
    return InputStats(gram=state["gram"], abs_sum=state["abs"], count=state["n"])


@torch.no_grad()
def block_influence(model: nn.Module, batches: list[Batch]) -> Tensor:
    """Per-layer BI = 1 - mean over real tokens of cos(layer input, layer output) (ShortGPT)."""
    layers = decoder_layers(model)
    total = torch.zeros(len(layers), dtype=torch.float64)
    count = torch.zeros(len(layers), dtype=torch.float64)
    state = {"mask": None}
    handles = []

    def make_hook(i):
        def hook(_module, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(
                _token_rows(h_in, state["mask"]), _token_rows(h_out, state["mask"]), dim=-1)
            total[i] += float((1.0 - cos).double().sum())
            count[i] += cos.numel()
        return hook

    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(make_hook(i), with_kwargs=True))
    try:
        _run(model, batches, lambda mask: state.__setitem__("mask", mask))
    finally:
        for handle in handles:
            handle.remove()
    return total / count.clamp_min(1)


@dataclass
class LayerInputs:
    """What the model feeds each decoder layer, per calibration batch (see module doc).

    hidden: per batch, the (B, T, hidden) input of the layer currently being pruned.
    kwargs: per layer, per batch, the keyword arguments the model passed that layer.
    masks: per batch, the (B, T) bool mask of real tokens, or None.
    """

    hidden: list[Tensor]
    kwargs: list[list[dict]]
    masks: list[Tensor | None]


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, batches: list[Batch]) -> LayerInputs:
    """Run the embeddings once per batch, recording every layer's inputs without computing any layer."""
    layers = decoder_layers(model)
    kwargs: list[list[dict]] = [[] for _ in layers]
    hidden: list[Tensor] = []

    def make_catcher(i):
        def catcher(hidden_states, *args, **kw):
            if args:
                raise ValueError(f"decoder layer {i} received positional arguments; expected keywords only")
            kwargs[i].append(kw)
            if i == 0:
                hidden.append(hidden_states)
            if i == len(layers) - 1:
                raise _StopForward
            return hidden_states
        return catcher

    masks: list[Tensor | None] = []
    for i, layer in enumerate(layers):
        layer.forward = make_catcher(i)  # an instance attribute shadows the class's forward
    try:
        _run(model, batches, masks.append)
    finally:
        for layer in layers:
            del layer.forward
    return LayerInputs(hidden=hidden, kwargs=kwargs, masks=masks)


def _layer_output(out) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def layer_input_stats(layer: nn.Module, module: nn.Module, inputs: LayerInputs, index: int,
                      target: Callable[[int, Tensor | None], Tensor] | None = None) -> InputStats:
    """``collect_input_stats`` for ``module`` inside ``layer``, run on the cached layer inputs only.

    target: optional ``target(batch_index, mid)`` -> the (B, T, d_out) output ``module`` should
    produce on that batch (``mid``: the residual stream after attention in this pass, i.e. the
    input of post_attention_layernorm, or None before it is reached); then the stats also hold
    cross = sum x y^T and ||y||^2 (see ``InputStats``).
    """
    d = module.in_features
    device = module.weight.device
    state = {"gram": torch.zeros(d, d, device=device), "abs": torch.zeros(d, device=device), "n": 0, "mask": None,
             "b": 0, "mid": None}
    if target is not None:
        state["cross"] = torch.zeros(d, module.out_features, device=device)
        state["target_sq"] = 0.0

    def hook(_module, args):
        rows = _token_rows(args[0], state["mask"])
        state["gram"].addmm_(rows.T, rows)
        state["abs"] += rows.abs().sum(0)
        state["n"] += rows.shape[0]
        if target is not None:
            y = _token_rows(target(state["b"], state["mid"]), state["mask"])
            state["cross"].addmm_(rows.T, y)
            state["target_sq"] += float((y.double() ** 2).sum())
        raise _StopForward

    handles = [module.register_forward_pre_hook(hook)]
    norm = getattr(layer, "post_attention_layernorm", None)
    if target is not None and norm is not None:
        handles.append(norm.register_forward_pre_hook(lambda _m, args: state.__setitem__("mid", args[0])))
    try:
        for b, (h, kw, mask) in enumerate(zip(inputs.hidden, inputs.kwargs[index], inputs.masks)):
            state.update(mask=mask, b=b, mid=None)
            try:
                layer(h, **kw)
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    if state["n"] == 0:
        raise ValueError("no calibration tokens reached the layer: give non-empty calibration batches")
    return InputStats(gram=state["gram"], abs_sum=state["abs"], count=state["n"], cross=state.get("cross"),
                      target_sq=state.get("target_sq"))


@dataclass
class DenseOutputs:
    """Per calibration batch, what one decoder layer computes on the dense model's inputs.

    attn: o_proj's output; mlp: down_proj's output; mid: the residual stream after attention
    (the input of post_attention_layernorm); out: the layer's output (the dense next-layer input).
    """

    attn: list[Tensor]
    mlp: list[Tensor]
    mid: list[Tensor]
    out: list[Tensor]


@torch.no_grad()
def dense_outputs(layer: nn.Module, hidden: list[Tensor], kwargs: list[dict]) -> DenseOutputs:
    """Run the (not yet pruned) ``layer`` on the dense model's inputs ``hidden``, recording its parts."""
    seen: dict[str, Tensor] = {}
    handles = [
        layer.self_attn.o_proj.register_forward_hook(lambda _m, _a, out: seen.__setitem__("attn", out)),
        layer.mlp.down_proj.register_forward_hook(lambda _m, _a, out: seen.__setitem__("mlp", out)),
        layer.post_attention_layernorm.register_forward_pre_hook(lambda _m, args: seen.__setitem__("mid", args[0])),
    ]
    result = DenseOutputs([], [], [], [])
    try:
        for h, kw in zip(hidden, kwargs):
            result.out.append(_layer_output(layer(h, **kw)))
            result.attn.append(seen["attn"])
            result.mlp.append(seen["mlp"])
            result.mid.append(seen["mid"])
    finally:
        for handle in handles:
            handle.remove()
    return result


def correction_target(correction: str, which: str, dense: DenseOutputs,
                      inputs: LayerInputs) -> Callable[[int, Tensor | None], Tensor] | None:
    """The output o_proj (``which="attn"``) or down_proj (``"mlp"``) should reconstruct, per batch.

    sublayer: the dense model's o_proj / down_proj output on the dense model's inputs.
    residual: what closes the gap between the pruned and the dense residual stream: for o_proj,
    h_mid_dense - h_in_pruned (so h_in_pruned + attn = h_mid_dense); for down_proj,
    h_out_dense - h_mid_pruned. This also corrects the error every earlier pruned sublayer left.
    """
    if correction == "none":
        return None
    if correction == "sublayer":
        parts = dense.attn if which == "attn" else dense.mlp
        return lambda b, _mid: parts[b].float()
    if which == "attn":
        return lambda b, _mid: dense.mid[b].float() - inputs.hidden[b].float()
    return lambda b, mid: dense.out[b].float() - mid.float()


@torch.no_grad()
def advance(layer: nn.Module, inputs: LayerInputs, index: int) -> None:
    """Replace the cached hidden states by ``layer``'s outputs: the inputs of the next layer."""
    inputs.hidden = [_layer_output(layer(h, **kw)) for h, kw in zip(inputs.hidden, inputs.kwargs[index])]


DEPTH_METHODS: dict[str, Callable[[nn.Module, list[Batch]], Tensor]] = {
    "block_influence": block_influence,
}


@dataclass
class LayerReport:
    """What happened to one kept layer (errors are relative: ||X W_hat - X W||^2 / ||X W||^2)."""

    layer: int
    source_layer: int
    kept_ffn: list[int] | None = None
    ffn_error_before_refit: float | None = None
    ffn_error_after_refit: float | None = None
    kept_kv_heads: list[int] | None = None
    kept_q_heads: list[int] | None = None
    attn_error_before_refit: float | None = None
    attn_error_after_refit: float | None = None
    swaps: int = 0


@dataclass
class PruneReport:
    method: str
    params_before: int
    params_after: int
    dropped_layers: list[int] = field(default_factory=list)
    layer_scores: list[float] = field(default_factory=list)
    layers: list[LayerReport] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _errors(stats: InputStats, W: Tensor, cols: Tensor, weight: Tensor) -> tuple[float, float]:
    """Relative reconstruction error keeping the dense rows (before refit) and with ``weight``.

    Relative to the target: X_p W without a correction, else the correction's target Y
    (||X_p W_hat - Y||^2 / ||Y||^2, from H, cross = X_p^T Y and ||Y||^2).
    """
    H = stats.gram.double()
    Wd, cols = W.double(), cols.to(W.device)
    if stats.cross is None:
        return relative_error(H, Wd, cols, Wd[cols]), relative_error(H, Wd, cols, weight.double())
    H_ss, C_s, y2 = H[cols][:, cols], stats.cross.double()[cols], max(stats.target_sq, 1e-300)

    def error(W_s: Tensor) -> float:
        return float(((W_s * (H_ss @ W_s)).sum() - 2 * (W_s * C_s).sum() + y2) / y2)

    return error(Wd[cols]), error(weight.double())


def _prune_layer_attention(layer, stats_of: Callable[[nn.Module, str], InputStats], plan: PrunePlan, t: Targets,
                           report: LayerReport) -> None:
    attn = layer.self_attn
    n_q, n_kv, head_dim = attention_shape(attn)
    n_rep = n_q // n_kv
    if t.num_key_value_heads == n_kv and t.q_per_kv == n_rep:
        return
    method, options = METHODS[plan.method], plan.solver_options()
    stats = stats_of(attn.o_proj, "attn")
    W = attn.o_proj.weight.detach().T.float()
    kv = torch.arange(n_kv)
    cols, weight, sub_stats, swaps = torch.arange(n_q * head_dim), W, stats, 0
    if t.num_key_value_heads < n_kv:
        sel = method(stats, W, group_size=n_rep * head_dim, keep=t.num_key_value_heads, options=options)
        kv, swaps = sel.kept, sel.swaps
        cols, weight = group_columns(kv, n_rep * head_dim), sel.weight
        c = cols.to(stats.gram.device)
        sub_stats = InputStats(stats.gram[c][:, c], stats.abs_sum[c], stats.count)
    q = (kv[:, None] * n_rep + torch.arange(n_rep)[None, :]).reshape(-1)
    if t.q_per_kv < n_rep:
        sel = method(sub_stats, weight, group_size=head_dim, keep=kv.numel() * t.q_per_kv,
                     buckets=kv.numel(), options=options)
        q = q[sel.kept]
        cols, weight, swaps = group_columns(q, head_dim), sel.weight, swaps + sel.swaps
    report.kept_kv_heads, report.kept_q_heads = kv.tolist(), q.tolist()
    report.attn_error_before_refit, report.attn_error_after_refit = _errors(stats, W, cols, weight)
    report.swaps += swaps
    prune_attention(layer, keep_kv_heads=kv, keep_q_heads=q, new_o_weight=weight.T)


def _prune_layer_mlp(layer, stats_of: Callable[[nn.Module, str], InputStats], plan: PrunePlan, t: Targets,
                     report: LayerReport) -> None:
    down = layer.mlp.down_proj
    if t.intermediate_size == down.in_features:
        return
    stats = stats_of(down, "mlp")
    W = down.weight.detach().T.float()
    sel = METHODS[plan.method](stats, W, group_size=1, keep=t.intermediate_size, options=plan.solver_options())
    report.kept_ffn = sel.kept.tolist()
    report.ffn_error_before_refit, report.ffn_error_after_refit = _errors(stats, W, sel.kept, sel.weight)
    report.swaps += sel.swaps
    prune_mlp(layer, sel.kept, new_down_weight=sel.weight.T)


def _widths(config) -> tuple[int, int, int]:
    """(intermediate_size, KV heads, query heads per KV head) of a config."""
    n_kv = config.num_key_value_heads or config.num_attention_heads
    return config.intermediate_size, n_kv, config.num_attention_heads // n_kv


def prune_model(model: nn.Module, calib_batches: Iterable[Batch], plan: PrunePlan,
                progress: Callable[[int, int], None] | None = None) -> tuple[nn.Module, PruneReport]:
    """Prune ``model`` in place by ``plan`` using calibration batches; returns (model, report).

    calib_batches: (B, T) input_ids tensors or dicts with input_ids and optional attention_mask
    (padded tokens are left out of every statistic).  Every layer's inputs are cached once (see the
    module doc); each layer then runs at most three times per batch.  ``progress(done, total)`` is
    called after each layer with the layers done so far.
    """
    t = resolve_targets(model.config, plan)
    pruned_config(model.config, plan)  # fail now, before any work, if transformers would reject it
    batches = list(calib_batches)
    if not batches:
        raise ValueError("prune_model needs at least one calibration batch")
    report = PruneReport(method=plan.method, params_before=count_params(model), params_after=0)
    was_training = model.training
    model.eval()
    try:
        source = list(range(len(decoder_layers(model))))
        if plan.drop_layers:
            scores = DEPTH_METHODS[plan.depth_method](model, batches)
            dropped = sorted(torch.argsort(scores)[: plan.drop_layers].tolist())
            report.layer_scores, report.dropped_layers = scores.tolist(), dropped
            log.info("dropping layers %s (%s %s)", dropped, plan.depth_method, [f"{s:.4f}" for s in scores.tolist()])
            drop_layers(model, dropped)
            source = [i for i in source if i not in set(dropped)]
        layers = decoder_layers(model)
        prunes_width = (t.intermediate_size, t.num_key_value_heads, t.q_per_kv) != _widths(model.config)
        inputs = capture_layer_inputs(model, batches) if prunes_width else None
        # the dense model's path, run alongside for the refit's targets (methods without refit ignore them)
        correction = plan.correction if plan.method in REFITTING else "none"
        dense_hidden = list(inputs.hidden) if inputs is not None and correction != "none" else None
        for i, layer in enumerate(layers):
            entry = LayerReport(layer=i, source_layer=source[i])
            if inputs is not None:
                dense = None
                if dense_hidden is not None:
                    dense = dense_outputs(layer, dense_hidden, inputs.kwargs[i])
                    dense_hidden = dense.out

                def stats_of(module, which, layer=layer, dense=dense, i=i):
                    target = correction_target(correction, which, dense, inputs) if dense is not None else None
                    return layer_input_stats(layer, module, inputs, i, target=target)

                _prune_layer_attention(layer, stats_of, plan, t, entry)
                _prune_layer_mlp(layer, stats_of, plan, t, entry)
                if i + 1 < len(layers):
                    advance(layer, inputs, i)
            report.layers.append(entry)
            if progress is not None:
                progress(i + 1, len(layers))
            log.info("layer %d: ffn error %s -> %s, attn error %s -> %s", i, entry.ffn_error_before_refit,
                     entry.ffn_error_after_refit, entry.attn_error_before_refit, entry.attn_error_after_refit)
        update_config(model)
    finally:
        model.train(was_training)
    report.params_after = count_params(model)
    return model, report
