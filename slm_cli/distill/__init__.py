"""Distillation: divergences, the (chunked, fused-linear) distillation loss, vocabulary checks."""

from slm_cli.distill.losses import (
    DIVERGENCES,
    check_vocab,
    distillation_loss,
    forward_kl,
    fused_linear_distillation_loss,
    generalized_jsd,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    trim_vocab,
    tvd,
)

__all__ = [
    "DIVERGENCES",
    "check_vocab",
    "distillation_loss",
    "forward_kl",
    "fused_linear_distillation_loss",
    "generalized_jsd",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "trim_vocab",
    "tvd",
]
