"""Check a pruning request against a model's config, and size the MLP for a total parameter budget.

Both work from the config alone (no weights), so `slm prune` rejects an impossible request, or
says which width a budget implies, before it loads the model or reads any calibration text.
"""

from __future__ import annotations

import dataclasses

from .calibrate import PrunePlan, count_params_after, pruned_config

# Decoders whose module layout surgery.py knows (model.model.layers[i].self_attn / .mlp with
# q/k/v/o_proj and gate/up/down_proj); each is exercised by the unit tests.
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")


def plan_problems(config, plan: PrunePlan, where: str = "prune") -> list[str]:
    """Every reason ``plan`` cannot be applied to a model with ``config`` (empty when it can)."""
    out: list[str] = []
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        return [
            f"model_type {config.model_type!r} is not supported: structured pruning handles "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} decoders"
        ]
    inter, layers = config.intermediate_size, config.num_hidden_layers
    n_heads = config.num_attention_heads
    n_kv = config.num_key_value_heads or n_heads
    if n_heads % n_kv:
        return [
            f"the source model's num_attention_heads={n_heads} is not a multiple of its num_key_value_heads={n_kv}, "
            "so its query heads do not split evenly into KV groups: fix the source's config.json"
        ]
    n_rep = n_heads // n_kv
    if isinstance(plan.keep_ffn, int) and plan.keep_ffn > inter:
        out.append(f"{where}.keep_ffn_count={plan.keep_ffn} exceeds the model's intermediate_size={inter}")
    if plan.keep_kv_heads is not None and plan.keep_kv_heads > n_kv:
        out.append(f"{where}.keep_kv_heads={plan.keep_kv_heads} exceeds the model's num_key_value_heads={n_kv}")
    if plan.keep_q_per_kv is not None and plan.keep_q_per_kv > n_rep:
        out.append(
            f"{where}.keep_q_per_kv={plan.keep_q_per_kv} exceeds the query heads per KV head "
            f"(num_attention_heads / num_key_value_heads = {n_heads}/{n_kv} = {n_rep})"
        )
    if plan.drop_layers >= layers:
        out.append(f"{where}.drop_layers={plan.drop_layers} would remove all {layers} layers; keep at least one")
    if plan.round_to > inter:
        out.append(f"{where}.round_to={plan.round_to} exceeds the model's intermediate_size={inter}")
    if out:
        return out
    try:  # what transformers itself would refuse, e.g. Llama's hidden_size % num_attention_heads
        pruned_config(config, plan)
    except ValueError as err:
        out.append(str(err))
    return out


def keep_ffn_for_params(config, plan: PrunePlan, target_params: int) -> tuple[int, int]:
    """The largest MLP width (a multiple of ``plan.round_to``) whose pruned model has <= target_params.

    Parameters are affine in the MLP width k, P(k) = P(0) + k * c, where c is the parameters per
    neuron over all kept layers (3 * hidden for gate, up and down rows/columns, plus biases if
    any); two meta-device builds give P exactly, so k = floor((target - P(0)) / c).
    Returns (k, P(k)); raises ValueError when even k = round_to does not fit.
    """
    step = plan.round_to
    inter = config.intermediate_size

    def params(k: int) -> int:
        return count_params_after(config, dataclasses.replace(plan, keep_ffn=k, round_to=1))

    full = params(inter)
    if target_params >= full:
        return inter, full
    base = params(step)
    per_neuron = (full - base) // (inter - step) if inter > step else 0
    if target_params < base:
        raise ValueError(
            f"prune.target_params={target_params:,} is below the smallest model these settings allow "
            f"({base:,} parameters with {step} MLP neuron(s) per layer): drop more layers or heads, or raise it"
        )
    k = step + ((target_params - base) // per_neuron) // step * step
    return k, params(k)
