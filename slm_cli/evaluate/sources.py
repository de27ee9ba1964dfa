"""What to score for a `data.source`, and which metric fits it.

  * a corpus (`shakespeare`, `kjv`): the whole text of the split -> perplexity;
  * a generative task (`arithmetic`, `gsm_symbolic`): prompt/completion records -> exact match;
  * a predictive task (`arithmetic_yesno`): records with a 0/1 label -> yes/no AUC and accuracy
    (exact match also works: the task scores a generated "Yes"/"No");
  * any prompt/completion or chat records, on request (eval.metric=completion_ce): the mean
    cross-entropy of the completion tokens, encoded as training encodes them (the number
    `slm report` shows for every artifact);
  * a user file of prompt/completion records that all carry a 0/1 `label`, where every label-1 record
    has one completion and every label-0 record another (e.g. " Yes" / " No"): a predictive task ->
    AUC of log p(positive completion) - log p(negative completion), and accuracy;
  * a user file: `{"text"}` records -> perplexity of their text joined by blank lines;
    the text of a split (corpus or file) is slm_cli/data/text.py's `split_text`, the one that
    `slm prune` and `slm quantize` score, and always the whole split (eval.max_tokens cuts tokens);
    prompt/completion or chat records -> exact match of the trimmed generation against the
    reference completion.

Splits: `test`, or `validation` (for a corpus that is its calibration split). Built-in tasks
generate exactly the requested number of examples of that split (no train examples are drawn
except the few-shot ones).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from slm_cli.data import DEFAULT_TASK_SIZES, get_task, load_splits
from slm_cli.data.corpus import CORPORA
from slm_cli.data.errors import DataError
from slm_cli.data.formats import record_shape
from slm_cli.data.text import split_text

# metric -> the kinds of data it can score
METRIC_KINDS = {
    "perplexity": ("text",),
    "exact_match": ("generative", "predictive"),
    "auc": ("predictive",),
    "completion_ce": ("generative", "predictive"),
}
AUTO_METRIC = {"text": "perplexity", "generative": "exact_match", "predictive": "auc"}


@dataclass
class EvalData:
    """The records (or text) of one split of a source, with the kind of data they are."""

    source: str
    split: str
    kind: str  # text | generative | predictive
    task: Any = None  # the built-in task (scoring, few-shot examples), None for user data and corpora
    examples: list[dict] = field(default_factory=list)
    text: str = ""
    label_choices: tuple[str, str] | None = None  # user predictive data: (completion of label 1, of label 0)

    @property
    def choices(self) -> tuple[str, str]:
        """The two answers a predictive source scores against each other: (positive, negative)."""
        if self.task is not None:
            return tuple(self.task.choices)
        return self.label_choices or (" Yes", " No")

    @property
    def size(self) -> str:
        return f"{len(self.text):,} characters" if self.kind == "text" else f"{len(self.examples)} examples"


def label_choices(records: list[dict]) -> tuple[str, str] | None:
    """(positive, negative) completion when `records` are predictive: prompt/completion strings, every one
    with a 0/1 `label`, one completion for all label-1 records and another for all label-0 ones; else None."""
    by_label: dict[int, set] = {0: set(), 1: set()}
    for r in records:
        label, completion = r.get("label"), r.get("completion")
        if label not in (0, 1, True, False) or not isinstance(completion, str) or not isinstance(r.get("prompt"), str):
            return None
        by_label[int(label)].add(completion)
    if len(by_label[1]) == 1 and len(by_label[0]) == 1 and by_label[1] != by_label[0]:
        return next(iter(by_label[1])), next(iter(by_label[0]))
    return None


def _user_kind(records: list[dict], source: str, choices: tuple[str, str] | None) -> str:
    shapes = {record_shape(r) for r in records}
    if shapes == {"text"}:
        return "text"
    if shapes == {"prompt_completion"} and choices:
        return "predictive"
    if shapes <= {"prompt_completion", "messages"} and shapes:
        return "generative"
    raise DataError(
        f"data.source={source}: records mix or lack shapes ({', '.join(sorted(s or 'unknown' for s in shapes))}); "
        "evaluation needs all {'text'} records (perplexity) or all prompt/completion or chat records (exact match)."
    )


def load_eval_data(source: str, split: str, size: int | None, seed: int, val_fraction: float = 0.05) -> EvalData:
    """The `split` ("test" or "validation") of `source`, at most `size` examples (None: all; 200 for tasks)."""
    if split not in ("test", "validation"):
        raise DataError(f"eval.split={split!r}: choose test or validation.")
    task = get_task(source)
    if task is not None:
        examples = task.examples(split, DEFAULT_TASK_SIZES[split] if size is None else size, seed)
        return EvalData(source, split, task.kind, task=task, examples=examples)
    if source in CORPORA:
        return EvalData(source, split, "text", text=split_text(source, split, seed))
    records = load_splits(source, val_size=size, test_size=size, train_size=1, val_fraction=val_fraction, seed=seed)[split]
    if not records:
        raise DataError(f"data.source={source}: the {split} split is empty.")
    choices = label_choices(records)
    kind = _user_kind(records, source, choices)
    if kind == "text":
        return EvalData(source, split, "text", text=split_text(source, split, seed, val_fraction))
    return EvalData(source, split, kind, examples=records, label_choices=choices if kind == "predictive" else None)


def choose_metric(data: EvalData, requested: str) -> str:
    """`requested`, checked against the data, or the metric that fits it when "auto"."""
    if requested == "auto":
        return AUTO_METRIC[data.kind]
    if requested not in METRIC_KINDS:
        raise DataError(f"eval.metric={requested!r}: choose auto, {', '.join(METRIC_KINDS)}.")
    if data.kind not in METRIC_KINDS[requested]:
        fits = [m for m, kinds in METRIC_KINDS.items() if data.kind in kinds]
        raise DataError(
            f"eval.metric={requested} does not fit data.source={data.source} ({data.kind} data); "
            f"use eval.metric={' or '.join(fits)}, or auto."
            + (" AUC needs predictive records: each with a 0/1 `label`, one completion shared by every label-1 record "
               "and another by every label-0 record (e.g. \" Yes\" / \" No\")." if requested == "auc" else "")
        )
    return requested
