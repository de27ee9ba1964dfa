"""Perplexity of a causal LM on a long text, by a sliding window.

Perplexity is exp of the mean negative log-likelihood of the scored tokens,

    PPL = exp( -1/T * sum_t log p(x_t | x_<t) ),

but a model sees at most a few thousand tokens, so the context of x_t must be cut. A window of
`window` tokens slides over the text by `stride` tokens:

    window k covers tokens [begin_k, end_k), end_k = min(window + k*stride, N), begin_k = max(0, end_k - window),

and scores only the tokens it adds, [end_{k-1}, end_k) (the first window scores [1, end_0)).
So every token x_1 .. x_{N-1} is scored exactly once (T = N - 1; x_0 has no context to be
predicted from), the first window's tokens with all earlier tokens as context, every later token
with at least `window - stride` and at most `window - 1` tokens of context. A smaller stride
gives more context per token (lower, fairer perplexity) at the cost of `window / stride` times
more compute; stride = window - 1 is the cheapest setting that still scores every token.
With window >= N there is one window and the result is the full-context perplexity.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F


def sliding_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_target) of each window over `n_tokens` tokens: the window feeds tokens
    [begin, end) to the model and scores targets [first_target, end)."""
    if window < 2:
        raise ValueError(f"window={window}: a window needs at least 2 tokens (one context, one target).")
    if not 1 <= stride < window:
        raise ValueError(
            f"stride={stride} must be in [1, window - 1] = [1, {window - 1}]: each window must keep at least one "
            "token of context before the first token it scores (stride = window - 1 is the cheapest)."
        )
    windows, scored_to, k = [], 1, 0
    while scored_to < n_tokens:
        end = min(window + k * stride, n_tokens)
        begin = max(0, end - window)
        windows.append((begin, end, scored_to))
        scored_to, k = end, k + 1
    return windows


@torch.no_grad()
def token_nll(model, input_ids: torch.Tensor, n_targets: int) -> torch.Tensor:
    """-log p of the last `n_targets` tokens of each row of `input_ids` [B, L] given the tokens
    before them; returns [B, n_targets] in float32. Only the logits that predict them are computed."""
    try:
        out = model(input_ids=input_ids, logits_to_keep=n_targets + 1)
    except TypeError:  # a model class without logits_to_keep computes all positions
        out = model(input_ids=input_ids)
    logits = out.logits[:, -(n_targets + 1) : -1].float()
    targets = input_ids[:, -n_targets:]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none").view(targets.shape)


@torch.no_grad()
def perplexity(
    model,
    tokenizer,
    text: str,
    window: int,
    stride: int,
    max_tokens: int | None = None,
    batch_size: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Sliding-window perplexity of `model` on `text` (see the module docstring for window/stride).

    The text is tokenized as the tokenizer does by default (with its BOS, if it adds one) and cut
    to its first `max_tokens` tokens when given. Windows of equal length run `batch_size` at a time.
    `progress(done, total)` is called after each batch with windows done so far.
    Returns perplexity, mean nll (nats/token), tokens scored, windows, window, stride.
    """
    ids = list(tokenizer(text, verbose=False)["input_ids"])
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError("perplexity needs a text of at least 2 tokens.")
    windows = sliding_windows(len(ids), window, stride)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count, done = 0.0, 0, 0
    # Windows with the same input length and number of targets batch together (all but the first
    # and the last, usually).
    groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for begin, end, first in windows:
        groups.setdefault((end - begin, end - first), []).append((begin, end))
    for (_, n_targets), spans in groups.items():
        for i in range(0, len(spans), batch_size):
            batch = torch.tensor([ids[b:e] for b, e in spans[i : i + batch_size]], device=device)
            nll = token_nll(model, batch, n_targets)
            total += float(nll.sum())
            count += nll.numel()
            done += len(batch)
            if progress is not None:
                progress(done, len(windows))
    model.train(was_training)
    mean_nll = total / count
    return {
        "perplexity": math.exp(mean_nll),
        "nll": mean_nll,
        "tokens": count,
        "windows": len(windows),
        "window": window,
        "stride": stride,
    }
