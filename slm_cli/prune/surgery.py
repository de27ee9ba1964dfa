"""Physical removal of MLP neurons, attention heads and whole layers from a transformers model.

Works on the Llama family layout (Llama, Qwen2, Qwen3, Mistral):
``model.model.layers[i].self_attn.{q,k,v,o}_proj`` and ``.mlp.{gate,up,down}_proj``.

Why the pieces are independent:
- MLP neuron j is row j of gate_proj and up_proj and column j of down_proj: y = down(act(gate x) * up x),
  so dropping those three slices removes exactly that neuron's contribution.
- Query head h is rows h*head_dim..(h+1)*head_dim of q_proj and the same columns of o_proj; with GQA,
  query head h reads KV head h // n_rep (``repeat_kv`` repeats each KV head n_rep times in order).
  A head's output depends only on its own q and its KV head's k, v, so the kept heads' outputs are
  unchanged by removing others.  Qwen3's q_norm / k_norm act per head on head_dim, shared by all
  heads: they stay as they are.

The result must load with plain ``AutoModelForCausalLM.from_pretrained``, so widths stay uniform over
layers and the config says them explicitly (``update_config``); ``head_dim`` is always written.
"""

from __future__ import annotations

import copy
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a Llama-family CausalLM (``model.model.layers``)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"{type(model).__name__} has no model.model.layers: structured pruning supports Llama-family "
            "decoders (Llama, Qwen2, Qwen3, Mistral)"
        )
    return layers


def _as_index(indices: Iterable[int] | Tensor, size: int, what: str) -> Tensor:
    """Sorted, unique, in-range long index; raises a clear error otherwise."""
    idx = torch.as_tensor(list(indices) if not isinstance(indices, Tensor) else indices, dtype=torch.long)
    idx = idx.reshape(-1).cpu()
    if idx.numel() == 0:
        raise ValueError(f"{what}: keeping nothing is impossible; keep at least one")
    if idx.min() < 0 or idx.max() >= size:
        raise ValueError(f"{what}: indices must lie in [0, {size}), got {idx.tolist()}")
    if torch.unique(idx).numel() != idx.numel():
        raise ValueError(f"{what}: indices repeat: {idx.tolist()}")
    return torch.sort(idx).values


def _sliced_linear(old: nn.Linear, rows: Tensor | None = None, cols: Tensor | None = None,
                   weight: Tensor | None = None) -> nn.Linear:
    """A new Linear holding old.weight[rows][:, cols] (or ``weight``), bias sliced by ``rows``."""
    W = old.weight.detach()
    if rows is not None:
        W = W[rows.to(W.device)]
    if cols is not None:
        W = W[:, cols.to(W.device)]
    if weight is not None:
        if tuple(weight.shape) != tuple(W.shape):
            raise ValueError(f"replacement weight has shape {tuple(weight.shape)}, expected {tuple(W.shape)}")
        W = weight.detach()
    bias = old.bias
    new = nn.Linear(W.shape[1], W.shape[0], bias=bias is not None, device=old.weight.device,
                    dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(W)
        if bias is not None:
            new.bias.copy_(bias.detach()[rows.to(bias.device)] if rows is not None else bias.detach())
    new.weight.requires_grad_(old.weight.requires_grad)
    return new


def prune_mlp(layer: nn.Module, keep_idx: Sequence[int] | Tensor, new_down_weight: Tensor | None = None) -> None:
    """Keep MLP neurons ``keep_idx``: rows of gate/up_proj, columns of down_proj.

    new_down_weight: optional (hidden, len(keep_idx)) replacement for down_proj.weight (nn.Linear
    layout, columns in sorted keep order), e.g. the OSSCAR least-squares refit.
    """
    mlp = layer.mlp
    keep = _as_index(keep_idx, mlp.down_proj.in_features, "keep_ffn neurons")
    mlp.gate_proj = _sliced_linear(mlp.gate_proj, rows=keep)
    mlp.up_proj = _sliced_linear(mlp.up_proj, rows=keep)
    mlp.down_proj = _sliced_linear(mlp.down_proj, cols=keep, weight=new_down_weight)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = keep.numel()


def attention_shape(attn: nn.Module) -> tuple[int, int, int]:
    """(num query heads, num KV heads, head_dim) of an attention module, read from its weights."""
    head_dim = int(attn.head_dim)
    return attn.q_proj.out_features // head_dim, attn.k_proj.out_features // head_dim, head_dim


def _head_rows(heads: Tensor, head_dim: int) -> Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def prune_attention(
    layer: nn.Module,
    keep_kv_heads: Sequence[int] | Tensor | None = None,
    keep_q_heads: Sequence[int] | Tensor | None = None,
    new_o_weight: Tensor | None = None,
) -> None:
    """GQA-aware head removal.

    keep_kv_heads: KV heads kept (default all); their k/v rows stay, with their query heads.
    keep_q_heads: query heads kept, original numbering (default: all query heads of the kept KV
        heads).  Every kept KV head must keep the same number of query heads (the config has one
        ``num_key_value_groups``), and each kept query head's KV head (q // n_rep) must be kept.
    new_o_weight: optional (hidden, kept_q * head_dim) replacement for o_proj.weight.
    """
    attn = layer.self_attn
    n_q, n_kv, head_dim = attention_shape(attn)
    n_rep = n_q // n_kv
    kv = _as_index(range(n_kv) if keep_kv_heads is None else keep_kv_heads, n_kv, "keep_kv_heads")
    if keep_q_heads is None:
        q = _head_rows(kv, n_rep)  # all query heads of the kept KV heads
    else:
        q = _as_index(keep_q_heads, n_q, "keep_q_heads")
    owners = q // n_rep
    if not torch.isin(owners, kv).all():
        raise ValueError(
            f"keep_q_heads {q.tolist()} include heads whose KV head is pruned (kept KV heads {kv.tolist()})"
        )
    per_kv = torch.bincount(owners, minlength=n_kv)[kv]
    if not (per_kv == per_kv[0]).all() or per_kv[0] == 0:
        raise ValueError(
            f"every kept KV head must keep the same number (>= 1) of query heads, got {per_kv.tolist()} "
            f"for KV heads {kv.tolist()}"
        )
    q_rows, kv_rows = _head_rows(q, head_dim), _head_rows(kv, head_dim)
    attn.q_proj = _sliced_linear(attn.q_proj, rows=q_rows)
    attn.k_proj = _sliced_linear(attn.k_proj, rows=kv_rows)
    attn.v_proj = _sliced_linear(attn.v_proj, rows=kv_rows)
    attn.o_proj = _sliced_linear(attn.o_proj, cols=q_rows, weight=new_o_weight)
    attn.num_key_value_groups = int(per_kv[0])
    # Some attention classes also cache head counts as attributes; keep them truthful.
    for name, value in (("num_heads", q.numel()), ("num_attention_heads", q.numel()),
                        ("num_key_value_heads", kv.numel())):
        if hasattr(attn, name):
            setattr(attn, name, value)


def _per_layer_list_names(config, num_layers: int) -> list[str]:
    """Config fields that hold one entry per layer (``layer_types``, ``mlp_layer_types``, ...)."""
    return [name for name, value in vars(config).items()
            if "layer" in name and isinstance(value, (list, tuple)) and len(value) == num_layers]


def resize_config(config, *, intermediate_size: int | None = None, num_attention_heads: int | None = None,
                  num_key_value_heads: int | None = None, kept_layers: Sequence[int] | None = None,
                  in_place: bool = False):
    """Config with new uniform widths / layer subset, validated by transformers' own checks.

    Validation happens on a copy first, so an impossible target leaves ``config`` untouched even
    with ``in_place=True``.

    ``head_dim`` is written explicitly (it no longer equals hidden_size / num_attention_heads after
    head pruning).  Per-layer lists are sliced to ``kept_layers``.  Raises ValueError (naming the
    value) when transformers would reject the result, e.g. Llama's hidden_size % num_attention_heads.
    """
    new = copy.deepcopy(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    old_layers = config.num_hidden_layers
    if kept_layers is not None:
        kept = list(kept_layers)
        for name in _per_layer_list_names(config, old_layers):
            setattr(new, name, [getattr(config, name)[i] for i in kept])
        new.num_hidden_layers = len(kept)
    new.head_dim = head_dim
    if intermediate_size is not None:
        new.intermediate_size = int(intermediate_size)
    if num_attention_heads is not None:
        new.num_attention_heads = int(num_attention_heads)
    if num_key_value_heads is not None:
        new.num_key_value_heads = int(num_key_value_heads)
    if hasattr(new, "validate"):
        try:
            new.validate()
        except Exception as err:  # transformers wraps validator errors in its own class
            raise ValueError(
                f"pruned {type(config).__name__} would be rejected by transformers: {err}. "
                f"(intermediate_size={new.intermediate_size}, num_attention_heads={new.num_attention_heads}, "
                f"num_key_value_heads={new.num_key_value_heads}); choose another keep target"
            ) from err
    if not in_place:
        return new
    # Modules hold a reference to the model's config object: update that object, not a copy.
    changed = ["head_dim", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers"]
    for name in changed + (_per_layer_list_names(config, old_layers) if kept_layers is not None else []):
        setattr(config, name, getattr(new, name))
    return config


def drop_layers(model: nn.Module, layer_indices: Iterable[int]) -> None:
    """Remove whole decoder layers; fix config (count, per-layer lists) and every ``layer_idx``."""
    layers = decoder_layers(model)
    n = len(layers)
    drop = set(int(i) for i in layer_indices)
    if any(not 0 <= i < n for i in drop):
        raise ValueError(f"drop_layers: indices must lie in [0, {n}), got {sorted(drop)}")
    if len(drop) >= n:
        raise ValueError(f"drop_layers: cannot drop {len(drop)} of {n} layers; keep at least one")
    kept = [i for i in range(n) if i not in drop]
    model.model.layers = nn.ModuleList(layers[i] for i in kept)
    # The KV cache is indexed by layer_idx: it must be 0..L-1 in the new order.
    for new_idx, layer in enumerate(model.model.layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    resize_config(model.config, kept_layers=kept, in_place=True)


def update_config(model: nn.Module) -> None:
    """Write the modules' actual widths into ``model.config`` (uniform over layers, validated)."""
    layers = decoder_layers(model)
    widths = {(layer.mlp.down_proj.in_features, *attention_shape(layer.self_attn)) for layer in layers}
    if len(widths) != 1:
        raise ValueError(
            f"layer widths differ across layers {sorted(widths)}: stock transformers and vLLM need uniform "
            "(intermediate_size, heads, KV heads, head_dim); prune the same count in every layer"
        )
    intermediate, n_q, n_kv, head_dim = widths.pop()
    if len(layers) != model.config.num_hidden_layers:
        raise ValueError(f"config says {model.config.num_hidden_layers} layers, model has {len(layers)}")
    resize_config(model.config, intermediate_size=intermediate, num_attention_heads=n_q,
                  num_key_value_heads=n_kv, in_place=True)
    model.config.head_dim = head_dim
