"""Evaluation: sliding-window perplexity, exact match by greedy generation, yes/no AUC.

Pure functions over a transformers model and tokenizer; the `slm eval` stage picks the one that
fits the data source.
"""

from slm_cli.evaluate.generation import CompletionMatch, exact_match, few_shot_prompt, greedy_generate
from slm_cli.evaluate.metrics import accuracy, average_ranks, roc_auc
from slm_cli.evaluate.perplexity import perplexity, sliding_windows
from slm_cli.evaluate.predictive import completion_logprobs, yes_no_auc

__all__ = [
    "CompletionMatch",
    "accuracy",
    "average_ranks",
    "completion_logprobs",
    "exact_match",
    "few_shot_prompt",
    "greedy_generate",
    "perplexity",
    "roc_auc",
    "sliding_windows",
    "yes_no_auc",
]
