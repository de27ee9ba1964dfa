"""Predictive tasks: how strongly the model prefers " Yes" over " No" after the prompt.

For a prompt x the model's score is the log-odds of the two answers,

    s(x) = log p(" Yes" | x) - log p(" No" | x),

where log p(c | x) sums the log-probabilities of the answer's tokens (one token for SmolLM2's
vocabulary, possibly several for a small BPE one). Restricted to the two answers,
P(Yes) = sigmoid(s), so s ranks examples exactly as P(Yes) does: ROC AUC over labels (1 = the
shown equation is right) measures that ranking, accuracy thresholds it at s > 0 (Yes more likely).
Unlike exact match, no generation is needed and a model that is right but unsure still earns AUC.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from slm_cli.data.errors import DataError
from slm_cli.data.tokenize import IGNORE_INDEX, collate, prompt_ids
from slm_cli.evaluate.metrics import accuracy, roc_auc


@torch.no_grad()
def completion_logprobs(
    model,
    tokenizer,
    prompts: list[list[int]],
    completions: list[list[int]],
    batch_size: int,
    progress: Callable[[int, int], None] | None = None,
) -> list[float]:
    """log p(completion | prompt) for each pair: the sum over the completion's tokens.

    `progress(done, total)` is called after each batch with pairs done so far."""
    if len(prompts) != len(completions):
        raise ValueError("completion_logprobs needs one completion per prompt.")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    items = [{"input_ids": p + c, "labels": [IGNORE_INDEX] * len(p) + c} for p, c in zip(prompts, completions)]
    was_training = model.training
    model.eval()
    out: list[float] = []
    for i in range(0, len(items), batch_size):
        batch = {k: v.to(device) for k, v in collate(items[i : i + batch_size], pad_token_id=pad).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        logp = -F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
        out += (logp * (labels != IGNORE_INDEX)).sum(dim=1).tolist()
        if progress is not None:
            progress(len(out), len(items))
    model.train(was_training)
    return out


def yes_no_auc(
    model,
    tokenizer,
    examples: list[dict],
    batch_size: int = 16,
    choices: Sequence[str] = (" Yes", " No"),
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """AUC and accuracy of log p(choices[0]) - log p(choices[1]) against each example's `label` (1/0).

    Returns auc, accuracy, yes_rate (share predicted choices[0]), n, positives and `scores`.
    """
    if any("label" not in ex for ex in examples):
        raise DataError("yes_no_auc needs a 0/1 `label` in every example (a predictive task such as arithmetic_yesno).")
    if len({int(ex["label"]) for ex in examples}) < 2:
        raise DataError(f"AUC needs examples of both labels; these {len(examples)} have one. Evaluate more examples (data.test_size).")
    yes, no = (list(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in choices)
    prompts = [prompt_ids(ex, tokenizer) for ex in examples]
    logp = completion_logprobs(model, tokenizer, prompts + prompts, [yes] * len(prompts) + [no] * len(prompts), batch_size, progress)
    scores = [a - b for a, b in zip(logp[: len(prompts)], logp[len(prompts) :])]
    labels = [int(ex["label"]) for ex in examples]
    predicted = [int(s > 0) for s in scores]
    return {
        "auc": roc_auc(scores, labels),
        "accuracy": accuracy(predicted, labels),
        "yes_rate": sum(predicted) / len(predicted),
        "n": len(examples),
        "positives": sum(labels),
        "scores": scores,
    }
