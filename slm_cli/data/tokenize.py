"""Token ids and loss labels for causal-LM fine-tuning, with the loss on completions only.

A causal LM is trained on ``-sum_t log p(x_t | x_<t)`` over the positions whose label is not
-100; Hugging Face models shift labels by one inside the loss, so ``labels[t] = input_ids[t]``
marks token t as a target and ``labels[t] = -100`` leaves it out. Here:

* prompt/completion: ``ids = tok(prompt) + tok(completion) + [eos]``; the prompt is tokenized on
  its own (as at generation time, and as TRL's non-conversational path does) and only the
  completion and eos are targets;
* messages: the tokenizer's chat template renders the conversation; only assistant turns
  (content and the template's end-of-turn token) are targets. The spans are found by rendering
  the conversation prefix by prefix, so any template whose renders grow by appending works;
* text: every token is a target (plain language modeling).

Sequences longer than ``max_seq_len`` are cut on the right; an example with no target left is
dropped and counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slm_cli.data.errors import DataError
from slm_cli.data.formats import record_shape

IGNORE_INDEX = -100


@dataclass
class EncodedExample:
    """One training sequence: token ids, labels (-100 where no loss), and whether it was cut short."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def num_targets(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass
class EncodeStats:
    """What encoding did to a dataset: examples seen, cut to max_seq_len, and dropped (no target left)."""

    total: int = 0
    truncated: int = 0
    dropped: int = 0

    @property
    def kept(self) -> int:
        return self.total - self.dropped


def _ids(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(
            "the data has 'messages' but the tokenizer has no chat_template; "
            "use a chat tokenizer or prompt/completion records."
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _content_start(tokenizer, messages: list[dict], i: int) -> str:
    """The rendered text just before assistant turn i's content: the earlier turns plus the generation prompt.

    transformers refuses to render an empty conversation, so for a conversation that opens with
    the assistant the header is found by rendering that turn with a marker as its content.
    """
    if i:
        return _render(tokenizer, messages[:i], add_generation_prompt=True)
    marker = "\u2063slm-content\u2063"
    probe = _render(tokenizer, [{**messages[0], "content": marker}], add_generation_prompt=False)
    return probe[: max(probe.find(marker), 0)]


def assistant_char_spans(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character span of each assistant turn.

    For assistant turn i: the render of messages[:i] with the generation prompt ends where the
    turn's content starts; the render of messages[:i+1] ends after its end-of-turn token (trailing
    whitespace the template adds between turns is left out). Both must be prefixes of the whole
    render, which holds for templates that only append as a conversation grows.
    """
    full = _render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _content_start(tokenizer, messages, i)
        through = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (full.startswith(through) and through.startswith(before)):
            raise DataError(
                "the tokenizer's chat_template rewrites earlier turns as the conversation grows, so assistant "
                "turns cannot be located; use prompt/completion records or a template that only appends."
            )
        spans.append((len(before), len(through.rstrip())))
    return full, spans


def _encode_messages(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of the rendered chat and labels that keep only tokens overlapping an assistant span."""
    text, spans = assistant_char_spans(messages, tokenizer)
    try:
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise DataError("chat data needs a fast (Rust) tokenizer to map characters to tokens.") from None
    ids = list(encoding["input_ids"])
    labels = [
        token if any(start < span_end and end > span_start for span_start, span_end in spans) else IGNORE_INDEX
        for token, (start, end) in zip(ids, encoding["offset_mapping"])
    ]
    return ids, labels


def encode_example(example: dict, tokenizer, max_seq_len: int) -> EncodedExample | None:
    """Ids and labels for one record, cut to `max_seq_len`; None when no target token is left."""
    shape = record_shape(example)
    if shape == "prompt_completion":
        prompt = _ids(tokenizer, example["prompt"], add_special_tokens=True)
        completion = _ids(tokenizer, example["completion"], add_special_tokens=False)
        if tokenizer.eos_token_id is not None:
            completion.append(tokenizer.eos_token_id)
        ids = prompt + completion
        labels = [IGNORE_INDEX] * len(prompt) + completion
    elif shape == "messages":
        ids, labels = _encode_messages(example["messages"], tokenizer)
    elif shape == "text":
        ids = _ids(tokenizer, example["text"], add_special_tokens=True)
        labels = list(ids)
    else:
        raise DataError(f"cannot encode a record with keys {sorted(example)}; it needs prompt/completion, messages or text.")
    truncated = len(ids) > max_seq_len
    encoded = EncodedExample(ids[:max_seq_len], labels[:max_seq_len], truncated)
    return encoded if encoded.num_targets else None


# How to give a split more examples, by split: shown when one is empty or smaller than a batch.
_MORE_DATA = {
    "train": "raise data.train_size for a built-in task, or add records to your file",
    "validation": "set data.val_size >= 1 for a built-in task, data.val_fraction > 0 for a file without a "
    "validation split, or add records to validation.jsonl",
}


def encode_dataset(
    examples: list[dict], tokenizer, max_seq_len: int, split: str = "train"
) -> tuple[list[EncodedExample], EncodeStats]:
    """Encode every record; count truncated and dropped ones. Raises DataError if none survives.

    `split` names the records in errors ("train", "validation").
    """
    if max_seq_len < 1:
        raise DataError(f"data.max_seq_len={max_seq_len} must be >= 1.")
    more = _MORE_DATA.get(split, "add records")
    if not examples:
        raise DataError(f"the {split} split is empty, and the training stages need examples in it: {more}.")
    stats, encoded = EncodeStats(), []
    for example in examples:
        stats.total += 1
        item = encode_example(example, tokenizer, max_seq_len)
        if item is None:
            stats.dropped += 1
            continue
        stats.truncated += item.truncated
        encoded.append(item)
    if not encoded:
        raise DataError(
            f"all {stats.total} examples were dropped from the {split} split: none has a completion token within "
            f"data.max_seq_len={max_seq_len}; raise data.max_seq_len or shorten the prompts."
        )
    return encoded, stats


def check_batch_fits(train_examples: int, micro_batch_size: int, processes: int = 1) -> None:
    """Refuse, before any model is built, a training set smaller than one step's micro-batches."""
    if train_examples < micro_batch_size * processes:
        most = max(1, train_examples // processes)
        raise DataError(
            f"the training set has {train_examples} example(s) after encoding, fewer than one batch "
            f"(train.micro_batch_size={micro_batch_size} x {processes} process(es)). Add training data "
            f"({_MORE_DATA['train']}), or lower train.micro_batch_size to {most} or less."
        )


def prompt_ids(example: dict, tokenizer) -> list[int]:
    """The prompt as the model sees it when asked to generate the completion.

    prompt/completion: the tokenized prompt, exactly the prefix `encode_example` trains on.
    messages: the conversation up to (not including) its final assistant turn, rendered with the
    template's generation prompt.
    """
    shape = record_shape(example)
    if shape == "prompt_completion":
        return _ids(tokenizer, example["prompt"], add_special_tokens=True)
    if shape == "messages":
        messages = list(example["messages"])
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        return _ids(tokenizer, _render(tokenizer, messages, add_generation_prompt=True), add_special_tokens=False)
    raise DataError(f"a record with keys {sorted(example)} has no prompt to generate from; use prompt/completion or messages.")


def _as_ids(item) -> list[int]:
    return item.input_ids if isinstance(item, EncodedExample) else list(item["input_ids"] if isinstance(item, dict) else item)


def collate(batch: list, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a training batch: input_ids (pad_token_id), attention_mask (0) and labels (-100) on padding.

    Items are EncodedExample or dicts with input_ids and labels.
    """
    if not batch:
        raise ValueError("collate needs at least one example.")
    width = max(len(_as_ids(item)) for item in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, item in enumerate(batch):
        ids = _as_ids(item)
        item_labels = item.labels if isinstance(item, EncodedExample) else item["labels"]
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
        labels[row, : len(ids)] = torch.tensor(item_labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_prompts(prompts: list, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-pad generation prompts so every row's last real token sits in the last column.

    Decoder-only generation appends new tokens on the right, so prompts must end together;
    the attention mask hides the pads (HF models derive position ids from it).
    Items are lists of ids, dicts with input_ids, or EncodedExample.
    """
    if not prompts:
        raise ValueError("collate_prompts needs at least one prompt.")
    rows = [_as_ids(item) for item in prompts]
    width = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, ids in enumerate(rows):
        if ids:
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}
