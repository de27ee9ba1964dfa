"""SmoothQuant: move activation outliers into the weights before INT8 quantization.

Per-token INT8 activations share one scale across a token's channels, so a few channels that
are always large (LLM activations have them, at fixed positions) set the scale and crush every
other channel into a handful of levels. Weights have no such outliers. SmoothQuant (Xiao et al.,
2023) rescales channel j of a Linear's input by 1/s_j and column j of its weight by s_j, which
leaves the product unchanged in exact arithmetic:

    y = x W^T = (x diag(1/s)) (W diag(s))^T,    s_j = max|x_j|^α / max|W_:,j|^(1-α)

α (``quant.smoothing_strength``) moves quantization difficulty from activations (α = 0: none
moved) to weights (α = 1: activations flat). The 1/s is folded into the RMSNorm that feeds the
Linears, so the served model has no extra op: ``input_layernorm`` feeds q/k/v, and
``post_attention_layernorm`` feeds gate/up in Llama-style blocks. Consumers of one norm share
one s (the max over their weight columns). max|x_j| comes from the calibration rows, seen on
the unsmoothed model in one pass.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from slm_cli.prune.surgery import decoder_layers

__all__ = ["smooth_model", "smoothing_pairs"]


def smoothing_pairs(layer: nn.Module) -> list[tuple[str, nn.Module, list[nn.Linear]]]:
    """(name, norm, the Linears it feeds) of one decoder layer, for Llama-style blocks
    (Llama, Qwen2/3, Mistral); any other layout is refused rather than smoothed wrongly."""
    try:
        attn, mlp = layer.self_attn, layer.mlp
        pairs = [
            ("attn", layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj]),
            ("mlp", layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj]),
        ]
    except AttributeError as exc:
        raise ValueError(f"quant.smoothing_strength needs Llama-style decoder layers "
                         f"({type(layer).__name__} has no {exc.name}); set it to 0") from exc
    for part, norm, linears in pairs:
        if any(m.in_features != norm.weight.numel() for m in linears):
            raise ValueError(f"{type(layer).__name__}.{part}: a Linear fed by the norm is not as wide as it; "
                             "set quant.smoothing_strength=0")
    return pairs


@torch.no_grad()
def _input_absmax(model: nn.Module, probes: dict[str, nn.Linear], rows: Tensor, batch_size: int) -> dict[str, Tensor]:
    """Per input channel, max |x| of each probed Linear over every calibration token."""
    seen: dict[str, Tensor] = {}

    def hook(name):
        def record(_module, args):
            x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0).float()
            seen[name] = x if name not in seen else torch.maximum(seen[name], x)
        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in probes.items()]
    try:
        for batch in rows.split(batch_size):
            model(input_ids=batch.to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return seen


@torch.no_grad()
def smooth_model(
    model: nn.Module, rows: Tensor, alpha: float, batch_size: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict]:
    """Fold SmoothQuant scales with strength ``alpha`` into ``model`` in place (see module doc).

    rows: (N, T) calibration input ids. Returns per smoothed norm: layer, part (attn / mlp), and
    the activation absmax ratio max/median before and after (how much flatter the channels got).
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"smoothing strength must be in (0, 1], got {alpha}")
    layers = decoder_layers(model)
    pairs = [(i, *pair) for i, layer in enumerate(layers) for pair in smoothing_pairs(layer)]
    probes = {f"{i}.{part}": linears[0] for i, part, _norm, linears in pairs}
    absmax = _input_absmax(model, probes, rows, batch_size)
    report = []
    for done, (i, part, norm, linears) in enumerate(pairs, start=1):
        x_max = absmax[f"{i}.{part}"].clamp_min(1e-5)
        w_max = torch.stack([m.weight.detach().abs().amax(dim=0).float() for m in linears]).amax(dim=0).clamp_min(1e-5)
        s = (x_max.pow(alpha) / w_max.pow(1.0 - alpha)).clamp_min(1e-5)
        norm.weight.div_(s.to(norm.weight.dtype))
        for m in linears:
            m.weight.mul_(s.to(m.weight.dtype))
        flat = x_max / s
        report.append({
            "layer": i, "part": part,
            "outlier_ratio_before": float(x_max.max() / x_max.median()),
            "outlier_ratio_after": float(flat.max() / flat.median()),
        })
        if progress is not None:
            progress(done, len(pairs))
    return report

