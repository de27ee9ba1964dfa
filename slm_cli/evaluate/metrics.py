"""Classification metrics on plain Python lists: ROC AUC (Mann-Whitney) and accuracy."""

from __future__ import annotations

from typing import Sequence


def average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks of `values` in ascending order; tied values share the mean of their ranks.

    [10, 20, 20, 30] -> [1, 2.5, 2.5, 4].
    """
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        shared = (i + j) / 2 + 1  # mean of the 1-based ranks i+1 .. j+1
        for k in range(i, j + 1):
            ranks[order[k]] = shared
        i = j + 1
    return ranks


def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve: the probability that a random positive scores above a random
    negative, ties counting one half.

    Computed by the Mann-Whitney rank statistic: with R+ the sum of the positives' ranks among
    all scores (ties averaged), n+ positives and n- negatives,

        AUC = (R+ - n+(n+ + 1)/2) / (n+ * n-),

    because R+ - n+(n+ + 1)/2 counts, over all (positive, negative) pairs, 1 when the positive is
    higher and 1/2 when they tie. O(n log n) instead of the O(n+ * n-) pairwise count.
    """
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} scores but {len(labels)} labels.")
    if any(label not in (0, 1) for label in labels):
        raise ValueError("labels must be 0 or 1.")
    n_pos = sum(labels)
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUC needs both classes; got {n_pos} positive and {n_neg} negative examples.")
    ranks = average_ranks(scores)
    rank_sum = sum(r for r, label in zip(ranks, labels) if label == 1)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Share of predictions equal to their label."""
    if len(predictions) != len(labels) or not labels:
        raise ValueError(f"accuracy needs equally many predictions and labels (got {len(predictions)}, {len(labels)}).")
    return sum(int(p == y) for p, y in zip(predictions, labels)) / len(labels)
