"""GPTQ: 4-bit group-wise weight quantization that corrects its own rounding error (W4A16).

The objective
-------------
A Linear computes y = W x. Rounding every weight to the nearest point of its grid (RTN) treats
the weights as independent, but what matters is the output on real inputs. With the
calibration inputs stacked as the columns of X and H = X X^T (the input Gram matrix, summed
over calibration tokens), GPTQ minimises, row by row of W (rows are independent),

    || (W_hat - W) X ||^2 = tr( (W_hat - W) H (W_hat - W)^T )

over W_hat restricted to the quantization grid. ``layer_error`` reports this divided by
tr(W H W^T), the relative output error on the calibration inputs.

The OBS update
--------------
Exact minimisation over a grid is intractable, so GPTQ (Frantar et al., 2022) quantizes the
input columns one at a time, left to right, and after fixing column j moves the columns not
yet quantized so that they absorb the error just made. This is the Optimal Brain Surgeon step:
with H^-1 the inverse Hessian of the columns still free (j and those after it), rounding
column j by e = w_j - q_j is best compensated by

    W[:, k] -= e / [H^-1]_jj * [H^-1]_jk        for every free k > j,

and column j then leaves the problem, which changes H^-1 to its Schur complement on the
remaining columns. Inputs that never fire (H_jj = 0) carry no information: their weights are
set to zero and H_jj to 1 so that H stays invertible. A small damping, ``damp`` times the mean
of diag(H), is added to the diagonal for numerical stability.

Why the Cholesky form
---------------------
The successive Schur complements need not be computed. Write H^-1 = U^T U with U upper
triangular (the Cholesky factor of the inverse). Row j of U, divided by U_jj, is exactly
row j of the Schur-complemented inverse divided by its diagonal: the coefficients the update
above needs, already in the order the sweep uses them. So one factorisation of H (float64,
retried with more damping if it fails) gives every update, and the error e / U_jj is the
"scaled error" the lazy update below accumulates.

The lazy block update
---------------------
Updating all later columns after every column is a rank-1 update of a large matrix per
column: memory-bound. Columns are processed in blocks of ``block_size``: inside a block the
updates only touch the block's own columns; the errors of the block, E (out, B), are then
applied to every later column at once as W[:, after] -= E U[block, after], one matrix
multiply. The result is the same as updating column by column.

Group scales
------------
The W4A16 scheme of compressed-tensors stores one scale (and zero point) per output row and
group of ``group_size`` (128) consecutive input columns: symmetric int4, scale = absmax / 7.5,
integers in [-8, 7]. A group's scales are computed when the sweep reaches the group's first
column, from its weights as updated by everything quantized before it, with compressed-tensors'
own ``calculate_qparams``; every column is rounded with compressed-tensors' ``fake_quantize``.
The weights this module writes are therefore the dequantized grid values Q * scale, which the
compressed-tensors packer turns back into exactly the same integers.

With ``act_order`` the columns are swept in decreasing order of H_jj (the inputs with the
most energy first, while most columns are still free to absorb their error). Their groups stay
the consecutive column ranges of the checkpoint format (no g_idx is needed, compressed-tensors'
"weight" activation ordering), so their scales are fixed before the sweep from the original
weights.

Dtypes: the math is float32 (float64 for the factorisation). Scales are rounded to the dtype
compressed-tensors stores them in (the weight's, for float weights) before they are used, and
the dequantized weights are written back in the weight's dtype; re-quantizing a bf16 weight
written this way with its bf16 scale gives back the same integers (|Q| <= 8, so the bf16
rounding of Q * scale moves Q / scale by at most 8 * 2^-9 < 0.5).

``gptq_model`` applies this to every targeted Linear of a decoder model, layer by layer,
reusing the pruning stage's calibration capture (``slm_cli.prune.calibrate``): each layer is
calibrated on the outputs of the already quantized layers before it, and within a layer each
Linear on the inputs produced by the already quantized Linears before it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch
from compressed_tensors.quantization import (
    ActivationOrdering,
    QuantizationArgs,
    QuantizationStrategy,
    QuantizationType,
)
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from compressed_tensors.quantization.utils import calculate_qparams
from compressed_tensors.utils.match import match_named_modules
from torch import Tensor, nn

from slm_cli.prune.calibrate import advance, capture_layer_inputs, layer_input_stats
from slm_cli.prune.surgery import decoder_layers

__all__ = ["METHODS", "TARGETS", "gptq_model", "gptq_quantize", "layer_error", "rtn_quantize"]

log = logging.getLogger(__name__)

TARGETS = ["Linear"]
METHODS = ("gptq", "rtn")
_MAX_DAMP_RETRIES = 6


def _check_args(args: QuantizationArgs, columns: int) -> int:
    """The group size of ``args``; raises ValueError for what this module cannot produce."""
    if args.strategy != QuantizationStrategy.GROUP or not args.group_size:
        raise ValueError(f"GPTQ here quantizes weights in groups; got strategy={args.strategy}, "
                         f"group_size={args.group_size}")
    if args.type != QuantizationType.INT:
        raise ValueError(f"GPTQ here produces integer grids; got type={args.type}")
    if args.actorder in (ActivationOrdering.GROUP, ActivationOrdering.DYNAMIC):
        raise ValueError(f"actorder={args.actorder} needs a g_idx in the checkpoint, which this module does not "
                         "produce; use actorder None or 'weight' (act_order=True keeps consecutive groups)")
    if columns % args.group_size:
        raise ValueError(f"in_features={columns} is not a multiple of group_size={args.group_size}")
    return args.group_size


def _storage_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype compressed-tensors gives the scale of a weight of ``dtype``."""
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) else torch.float16


def _column_args(args: QuantizationArgs) -> QuantizationArgs:
    """``args`` with one scale per row: quantizes a single (out, 1) column with the group arithmetic."""
    return args.model_copy(update={"strategy": QuantizationStrategy.CHANNEL, "group_size": None})


def _qparams(W: Tensor, args: QuantizationArgs, scale_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Per-row scale and zero point of ``W`` (out, k) as one group each: ((out,), (out,)).

    The scale is rounded to ``scale_dtype`` (what the checkpoint stores) and returned in float32.
    """
    scale, zero_point = calculate_qparams(W.amin(dim=1), W.amax(dim=1), args)
    return scale.to(scale_dtype).float(), zero_point


def rtn_quantize(W: Tensor, args: QuantizationArgs, *,
                 scale_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Round-to-nearest baseline: (W_hat (out, in) in W's dtype, scale (out, in/g), zero_point (out, in/g)).

    scale_dtype: dtype the scales are stored (and rounded) in; default the one compressed-tensors
    gives a weight of W's dtype.
    """
    out, columns = W.shape
    g = _check_args(args, columns)
    scale_dtype = scale_dtype or _storage_dtype(W.dtype)
    W32 = W.detach().float()
    scale, zero_point = _qparams(W32.reshape(out * (columns // g), g), args, scale_dtype)
    scale, zero_point = scale.reshape(out, columns // g), zero_point.reshape(out, columns // g)
    W_hat = fake_quantize(W32, scale, zero_point, args)
    return W_hat.to(W.dtype), scale.to(scale_dtype), zero_point


def _inverse_hessian_factor(H: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor U of (H + damp * mean(diag H) I)^-1 (float64); more damping if needed."""
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    mean_diag = float(torch.diagonal(H).mean())
    for attempt in range(_MAX_DAMP_RETRIES + 1):
        L, info = torch.linalg.cholesky_ex(H + (damp * mean_diag) * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U
        if attempt == _MAX_DAMP_RETRIES:
            break
        damp = max(damp * 10, 1e-6)
        log.warning("GPTQ: the damped Hessian is not positive definite; retrying with damp=%g", damp)
    raise ValueError(f"GPTQ: the calibration Hessian is not positive definite even with damp={damp:g}")


def gptq_quantize(W: Tensor, H: Tensor, args: QuantizationArgs, *, damp: float = 0.01, block_size: int = 128,
                  act_order: bool = False,
                  scale_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """GPTQ of W (out, in) for inputs with Gram matrix H (in, in); see the module doc.

    Returns (W_hat, scale, zero_point) like ``rtn_quantize``: W_hat holds the dequantized grid
    values in W's dtype, scale (out, in/g) in ``scale_dtype`` (default: compressed-tensors'
    choice for W's dtype), zero_point (out, in/g).
    damp: added to diag(H) as a fraction of its mean. block_size: columns per lazy update.
    act_order: sweep columns by decreasing H_jj, with group scales fixed beforehand.
    """
    out, columns = W.shape
    g = _check_args(args, columns)
    if H.shape != (columns, columns):
        raise ValueError(f"H has shape {tuple(H.shape)}; expected ({columns}, {columns}) for W {tuple(W.shape)}")
    if block_size < 1:
        raise ValueError(f"block_size={block_size} must be >= 1")
    if damp < 0:
        raise ValueError(f"damp={damp} must be >= 0")
    w_dtype = W.dtype
    scale_dtype = scale_dtype or _storage_dtype(w_dtype)
    col_args = _column_args(args)

    W = W.detach().float().clone()
    H = H.detach().to(device=W.device, dtype=torch.float64).clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    n_groups = columns // g
    qparams: list[tuple[Tensor, Tensor] | None] = [None] * n_groups  # per group: (scale, zero point), (out,) each
    perm = None
    if act_order:
        # static groups: the checkpoint's groups are consecutive columns whatever the sweep order
        qparams = [_qparams(W[:, k * g:(k + 1) * g], args, scale_dtype) for k in range(n_groups)]
        perm = torch.argsort(torch.diagonal(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    group_of = ((perm.cpu() if perm is not None else torch.arange(columns)) // g).tolist()  # host ints: no syncs

    U = _inverse_hessian_factor(H, damp).float()
    del H
    Q = torch.zeros_like(W)
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            k = group_of[j]
            if not act_order and j % g == 0:
                # the group's weights as updated by every column quantized so far: its columns in this
                # block are current in W1; those after the block still miss this block's pending update
                current = W1[:, i:i + g]
                if j + g > i2:
                    rest = W[:, i2:j + g]
                    if i > 0:
                        rest = rest - E1[:, :i] @ U[i1:j, i2:j + g]
                    current = torch.cat([current, rest], dim=1)
                qparams[k] = _qparams(current, args, scale_dtype)
            s, z = qparams[k]
            w = W1[:, i]
            q = fake_quantize(w[:, None], s[:, None], z[:, None], col_args)[:, 0]
            Q[:, j] = q
            err = (w - q) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            E1[:, i] = err
        if i2 < columns:
            W[:, i2:] -= E1 @ U[i1:i2, i2:]

    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    scale = torch.stack([s for s, _ in qparams], dim=1)
    zero_point = torch.stack([z for _, z in qparams], dim=1)
    # the values already sit on the grid; one pass of the group quantizer makes that explicit
    W_hat = fake_quantize(Q, scale, zero_point, args)
    return W_hat.to(w_dtype), scale.to(scale_dtype), zero_point


def layer_error(W: Tensor, W_hat: Tensor, H: Tensor) -> float:
    """Relative output error on the calibration inputs: tr(D H D^T) / tr(W H W^T), D = W_hat - W."""
    Hd = H.detach().double().to(W.device)
    Wd = W.detach().double()
    D = W_hat.detach().double() - Wd
    num = float(((D @ Hd) * D).sum())
    den = float(((Wd @ Hd) * Wd).sum())
    if den <= 0:
        return 0.0 if num == 0 else float("inf")
    return num / den


def _input_groups(layer: nn.Module, modules: list[tuple[str, nn.Module]], inputs, index: int,
                  layer_name: str) -> list[list[tuple[str, nn.Module]]]:
    """``modules`` in the order ``layer`` runs them, consecutive ones fed the same tensor grouped.

    One forward of the layer on the first cached batch records, per module, the tensor it receives.
    Modules of one group (q/k/v, gate/up) share one input Gram matrix: quantizing one of them cannot
    change what the others receive.
    """
    seen: list[tuple[str, nn.Module, Tensor]] = []
    called: set[int] = set()

    def make_hook(name):
        def hook(module, args):
            if id(module) not in called:
                called.add(id(module))
                seen.append((name, module, args[0]))
        return hook

    handles = [module.register_forward_pre_hook(make_hook(name)) for name, module in modules]
    try:
        layer(inputs.hidden[0], **inputs.kwargs[index][0])
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name, module in modules if id(module) not in called]
    if missing:
        raise ValueError(f"{missing} in {layer_name} never ran in its forward: no calibration inputs to quantize "
                         "them with; add them to the ignore list")
    groups: list[list[tuple[str, nn.Module]]] = []
    previous = None
    for name, module, x in seen:
        if groups and x is previous:
            groups[-1].append((name, module))
        else:
            groups.append([(name, module)])
        previous = x
    return groups


@torch.no_grad()
def gptq_model(model: nn.Module, batches: Iterable, args: QuantizationArgs, ignore: list[str], *,
               damp: float = 0.01, method: str = "gptq", block_size: int = 128, act_order: bool = False,
               scale_dtype: torch.dtype | None = None,
               progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """Quantize every targeted Linear of ``model``'s decoder layers in place; one result dict per module.

    Targeted: ``match_named_modules(model, ["Linear"], ignore)``; each must lie inside a decoder
    layer (ValueError naming those that do not, e.g. an lm_head left out of ``ignore``). Layer by
    layer on the cached calibration inputs (``slm_cli.prune.calibrate``), each module's weight is
    replaced by its dequantized grid values (Q * scale, in the weight's dtype).

    batches: (B, T) input_ids tensors or dicts with input_ids and optional attention_mask.
    method: "gptq", or "rtn" for the round-to-nearest baseline (no Hessian update).
    Each dict: name, layer (decoder layer index), error_rtn and error_gptq (relative output errors
    on the module's own calibration inputs, ``layer_error``; error_gptq is None for method="rtn"),
    error (that of the weights written), scale (out, in/g) and zero_point (out, in/g).
    scale_dtype: the dtype the checkpoint stores the scales in (default: the weight's), see ``rtn_quantize``.
    ``progress(done, total)`` is called after each decoder layer.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is unknown; choose one of {list(METHODS)}")
    batches = list(batches)
    if not batches:
        raise ValueError("gptq_model needs at least one calibration batch")
    layers = decoder_layers(model)
    owner: dict[int, int] = {}
    for i, layer in enumerate(layers):
        for module in layer.modules():
            owner[id(module)] = i
    targeted = list(match_named_modules(model, TARGETS, list(ignore)))
    outside = [name for name, module in targeted if id(module) not in owner]
    if outside:
        raise ValueError(f"targeted Linear modules outside the decoder layers cannot be calibrated by GPTQ: "
                         f"{outside}; add them to the ignore list (e.g. ignore: [lm_head])")
    per_layer: list[list[tuple[str, nn.Module]]] = [[] for _ in layers]
    for name, module in targeted:
        _check_args(args, module.in_features)
        per_layer[owner[id(module)]].append((name, module))

    results: list[dict] = []
    was_training = model.training
    model.eval()
    try:
        inputs = capture_layer_inputs(model, batches)
        for i, layer in enumerate(layers):
            if per_layer[i]:
                for group in _input_groups(layer, per_layer[i], inputs, i, f"decoder layer {i}"):
                    H = layer_input_stats(layer, group[0][1], inputs, i).gram
                    for name, module in group:
                        results.append(_quantize_module(name, i, module, H, args, damp=damp, method=method,
                                                        block_size=block_size, act_order=act_order,
                                                        scale_dtype=scale_dtype))
                    del H
            if i + 1 < len(layers):
                advance(layer, inputs, i)
            if progress is not None:
                progress(i + 1, len(layers))
    finally:
        model.train(was_training)
    return results


def _quantize_module(name: str, layer: int, module: nn.Module, H: Tensor, args: QuantizationArgs, *,
                     damp: float, method: str, block_size: int, act_order: bool,
                     scale_dtype: torch.dtype | None = None) -> dict:
    """Quantize one Linear in place by ``method``; its result dict (see ``gptq_model``)."""
    W = module.weight.detach()
    W_rtn, scale, zero_point = rtn_quantize(W, args, scale_dtype=scale_dtype)
    error_rtn = layer_error(W, W_rtn, H)
    error_gptq = None
    W_hat = W_rtn
    if method == "gptq":
        W_hat, scale, zero_point = gptq_quantize(W, H, args, damp=damp, block_size=block_size,
                                                 act_order=act_order, scale_dtype=scale_dtype)
        error_gptq = layer_error(W, W_hat, H)
    module.weight.copy_(W_hat)
    error = error_rtn if error_gptq is None else error_gptq
    log.info("%s: relative output error rtn %.3g, %s %.3g", name, error_rtn, method, error)
    return {"name": name, "layer": layer, "error_rtn": error_rtn, "error_gptq": error_gptq, "error": error,
            "scale": scale, "zero_point": zero_point}
