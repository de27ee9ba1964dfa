"""Structured pruning (OSSCAR and baselines) of Llama-family decoders into standard checkpoints.

Entry point: ``prune_model(model, calib_batches, PrunePlan(...)) -> (model, PruneReport)``;
``count_params_after(config, plan)`` predicts the result's size before any work.
"""

from .calibrate import (
    DEPTH_METHODS,
    LayerReport,
    PrunePlan,
    PruneReport,
    block_influence,
    collect_input_stats,
    count_params,
    count_params_after,
    prune_model,
    pruned_config,
    resolve_targets,
)
from .solver import METHODS, InputStats, Selection, SolverOptions, osscar
from .surgery import drop_layers, prune_attention, prune_mlp, update_config

__all__ = [
    "DEPTH_METHODS",
    "METHODS",
    "InputStats",
    "LayerReport",
    "PrunePlan",
    "PruneReport",
    "Selection",
    "SolverOptions",
    "block_influence",
    "collect_input_stats",
    "count_params",
    "count_params_after",
    "drop_layers",
    "osscar",
    "prune_attention",
    "prune_mlp",
    "prune_model",
    "pruned_config",
    "resolve_targets",
    "update_config",
]
