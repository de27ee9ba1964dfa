"""Structured pruning (OSSCAR and baselines) of Llama-family decoders into standard checkpoints.

Entry point: ``prune_model(model, calib_batches, PrunePlan(...)) -> (model, PruneReport)``;
``count_params_after(config, plan)`` predicts the result's size before any work.
"""

from .calibrate import (
    DEPTH_METHODS,
    LayerInputs,
    LayerReport,
    PrunePlan,
    PruneReport,
    block_influence,
    capture_layer_inputs,
    collect_input_stats,
    count_params,
    count_params_after,
    prune_model,
    pruned_config,
    resolve_targets,
)
from .solver import METHODS, InputStats, Selection, SolverOptions, osscar
from .surgery import drop_layers, prune_attention, prune_mlp, update_config
from .targets import SUPPORTED_MODEL_TYPES, keep_ffn_for_params, plan_problems

__all__ = [
    "DEPTH_METHODS",
    "METHODS",
    "InputStats",
    "LayerInputs",
    "LayerReport",
    "PrunePlan",
    "PruneReport",
    "Selection",
    "SUPPORTED_MODEL_TYPES",
    "SolverOptions",
    "block_influence",
    "capture_layer_inputs",
    "collect_input_stats",
    "count_params",
    "count_params_after",
    "drop_layers",
    "keep_ffn_for_params",
    "osscar",
    "plan_problems",
    "prune_attention",
    "prune_mlp",
    "prune_model",
    "pruned_config",
    "resolve_targets",
    "update_config",
]
