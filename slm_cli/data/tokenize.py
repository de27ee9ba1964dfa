"""Token ids and loss labels for causal-LM fine-tuning, with the loss on completions only.

A causal LM is trained on ``-sum_t log p(x_t | x_<t)`` over the positions whose label is not
-100; Hugging Face models shift labels by one inside the loss, so ``labels[t] = input_ids[t]``
marks token t as a target and ``labels[t] = -100`` leaves it out. Here:

* prompt/completion: ``ids = tok(prompt) + tok(completion) + [eos]``; the prompt is tokenized on
  its own (as at generation time, and as TRL's non-conversational path does) and only the
  completion and eos are targets;
* messages: the tokenizer's chat template renders the conversation; only assistant turns
  (content and the template's end-of-turn token) are targets, and for a conversational
  prompt-completion row (read as messages with ``prompt_turns``) only those of the completion.
  The spans are found by rendering the conversation prefix by prefix, so any template whose
  renders grow by appending works;
* text: every token is a target (plain language modeling).

Sequences longer than ``max_seq_len`` are cut on the right; an example with no target left is
dropped and counted.

Encoding is cached: `encode_dataset` stores a split's ids and labels in one safetensors file
under ``$SLM_CACHE/tokenized``, named by a hash of the records, the tokenizer (its vocabulary,
merges, normalizer, special tokens and chat template), ``max_seq_len`` and ENCODING_VERSION, so
a second run with the same data and tokenizer reads it back instead of tokenizing again, and a
change to any of them misses.

Packing (`pack_examples`, ``data.packing=true``) puts several encoded examples in one row of at
most ``max_seq_len`` tokens, by best-fit decreasing (TRL's default ``bfd``). Each row carries
``position_ids`` that restart at 0 for every example; given those and no padding mask,
transformers builds a block-diagonal causal mask (``masking_utils.find_packed_sequence_indices``,
for the eager and sdpa attention alike), so no token attends across an example boundary, and
each example's first label is ignored so no example is asked to predict the next one's first
token. A packed batch's summed loss therefore equals the unpacked batches' (tested), with less
padding.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slm_cli.data.errors import DataError
from slm_cli.data.formats import PROMPT_TURNS, record_shape

IGNORE_INDEX = -100
# Bump when the rules that turn a record into ids and labels change: old cache files then miss.
ENCODING_VERSION = 1
log = logging.getLogger(__name__)


@dataclass
class EncodedExample:
    """One training sequence: token ids, labels (-100 where no loss), and whether it was cut short."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    # packed rows only: each example's positions, restarting at 0 (see pack_examples)
    position_ids: list[int] | None = field(default=None, repr=False)

    @property
    def num_targets(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass
class EncodeStats:
    """What encoding did to a dataset: examples seen, cut to max_seq_len, dropped (no target left),
    whether they came from the tokenized-data cache, and the rows they were packed into (None: not packed)."""

    total: int = 0
    truncated: int = 0
    dropped: int = 0
    from_cache: bool = False
    packed_rows: int | None = None

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


def assistant_char_spans(messages: list[dict], tokenizer, first_turn: int = 0) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character span of each assistant turn from `first_turn` on.

    For assistant turn i: the render of messages[:i] with the generation prompt ends where the
    turn's content starts; the render of messages[:i+1] ends after its end-of-turn token (trailing
    whitespace the template adds between turns is left out). Both must be prefixes of the whole
    render, which holds for templates that only append as a conversation grows.
    """
    full = _render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < first_turn:
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


def _encode_messages(messages: list[dict], tokenizer, first_turn: int = 0) -> tuple[list[int], list[int]]:
    """Token ids of the rendered chat and labels that keep only tokens overlapping an assistant span
    of turn `first_turn` or later (the completion of a conversational prompt-completion row)."""
    text, spans = assistant_char_spans(messages, tokenizer, first_turn)
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
        ids, labels = _encode_messages(example["messages"], tokenizer, example.get(PROMPT_TURNS) or 0)
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
    examples: list[dict], tokenizer, max_seq_len: int, split: str = "train", cache: bool = True
) -> tuple[list[EncodedExample], EncodeStats]:
    """Encode every record; count truncated and dropped ones. Raises DataError if none survives.

    `split` names the records in errors ("train", "validation"). With `cache`, the result is read
    from (or written to) the tokenized-data cache; `stats.from_cache` says which.
    """
    if max_seq_len < 1:
        raise DataError(f"data.max_seq_len={max_seq_len} must be >= 1.")
    more = _MORE_DATA.get(split, "add records")
    if not examples:
        raise DataError(f"the {split} split is empty, and the training stages need examples in it: {more}.")
    path = _cache_path(examples, tokenizer, max_seq_len) if cache else None
    if path is not None:
        hit = _read_cache(path)
        if hit is not None:
            log.info("tokenized %s split: %d examples read from the cache %s", split, len(hit[0]), path)
            return hit
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
    if path is not None:
        _write_cache(path, encoded, stats)
        log.info("tokenized %s split: %d examples, written to the cache %s", split, len(encoded), path)
    return encoded, stats


# --- the tokenized-data cache ---------------------------------------------------------------


def tokenizer_fingerprint(tokenizer) -> str | None:
    """A hash of everything about a tokenizer that changes ids or labels; None when it cannot be serialized.

    A fast tokenizer's JSON holds its vocabulary, merges, normalizer, pre-tokenizer and
    post-processor (the bos/eos it adds); the chat template and special tokens sit beside it.
    Slow (Python) tokenizers have no such serialization, so their data is not cached.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    import tokenizers
    import transformers

    parts = {
        "class": type(tokenizer).__name__,
        "backend": backend.to_str(),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special": {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id},
        "added": {str(k): str(v) for k, v in sorted(tokenizer.added_tokens_decoder.items())},
        # the libraries that apply it: a new release may split the same text differently
        "versions": [tokenizers.__version__, transformers.__version__],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def data_fingerprint(examples: list[dict]) -> str:
    """A hash of the records, in order (`default=str` covers the dates and decimals a parquet file may hold)."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps(example, sort_keys=True, ensure_ascii=False, default=str).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def _cache_path(examples: list[dict], tokenizer, max_seq_len: int) -> Path | None:
    from slm_cli.paths import cache_dir

    tok = tokenizer_fingerprint(tokenizer)
    if tok is None:
        return None
    key = hashlib.sha256(
        json.dumps([ENCODING_VERSION, data_fingerprint(examples), tok, max_seq_len]).encode()
    ).hexdigest()
    return cache_dir() / "tokenized" / f"{key[:32]}.safetensors"


def _write_cache(path: Path, encoded: list[EncodedExample], stats: EncodeStats) -> None:
    """One safetensors file: all ids and labels end to end, each example's length and truncation flag.

    Written to a temp file and renamed, so a reader never sees half a file; a cache that cannot be
    written (read-only, full disk) costs only the re-tokenization next time.
    """
    from safetensors.torch import save_file

    tensors = {
        "input_ids": torch.tensor([t for e in encoded for t in e.input_ids], dtype=torch.int64),
        "labels": torch.tensor([t for e in encoded for t in e.labels], dtype=torch.int64),
        "lengths": torch.tensor([len(e.input_ids) for e in encoded], dtype=torch.int64),
        "truncated": torch.tensor([e.truncated for e in encoded], dtype=torch.bool),
    }
    metadata = {"stats": json.dumps({"total": stats.total, "truncated": stats.truncated, "dropped": stats.dropped})}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=metadata)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    except OSError as exc:
        log.warning("could not write the tokenized-data cache %s (%s); the next run tokenizes again", path, exc)


def _read_cache(path: Path) -> tuple[list[EncodedExample], EncodeStats] | None:
    """The cached split, or None when absent or unreadable (a damaged file is encoded again and replaced)."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            stats = EncodeStats(**json.loads(f.metadata()["stats"]), from_cache=True)
            ids, labels, lengths, truncated = (
                f.get_tensor(name).tolist() for name in ("input_ids", "labels", "lengths", "truncated")
            )
    except Exception as exc:  # noqa: BLE001 - any damage means the same thing: encode again
        log.warning("ignoring a damaged tokenized-data cache file %s (%s)", path, exc)
        return None
    if len(ids) != sum(lengths) or len(labels) != len(ids) or len(lengths) != stats.kept:
        log.warning("ignoring a tokenized-data cache file %s whose sizes disagree", path)
        return None
    encoded, start = [], 0
    for n, cut in zip(lengths, truncated):
        encoded.append(EncodedExample(ids[start : start + n], labels[start : start + n], bool(cut)))
        start += n
    return encoded, stats


# --- packing ----------------------------------------------------------------------------------


def pack_examples(examples: list[EncodedExample], max_seq_len: int, stats: EncodeStats | None = None) -> list[EncodedExample]:
    """Examples packed into rows of at most `max_seq_len` tokens by best-fit decreasing.

    Longest first, each example goes into the open row with the least room that still fits it
    (a new row when none does), which leaves little padding for few rows. In a row, position_ids
    restart at 0 for every example and each example's first label becomes -100 (in an unpacked
    row that label is never a target either: nothing precedes the first token). Rows keep the
    order of their first (longest) example; the loop shuffles them by seed. Sets
    `stats.packed_rows` when given.
    """
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, row index), sorted, for the best-fit search
    for i in order:
        n = len(examples[i].input_ids)
        if n > max_seq_len:
            raise ValueError(f"example {i} has {n} tokens, more than max_seq_len={max_seq_len}; encode with it first.")
        at = bisect.bisect_left(room, (n, -1))
        if at < len(room):
            free, row = room.pop(at)
            rows[row].append(i)
            bisect.insort(room, (free - n, row))
        else:
            rows.append([i])
            bisect.insort(room, (max_seq_len - n, len(rows) - 1))
    packed = []
    for members in rows:
        ids, labels, positions = [], [], []
        for i in members:
            example = examples[i]
            ids += example.input_ids
            labels += [IGNORE_INDEX, *example.labels[1:]]
            positions += range(len(example.input_ids))
        packed.append(EncodedExample(ids, labels, any(examples[i].truncated for i in members), positions))
    if stats is not None:
        stats.packed_rows = len(packed)
    return packed


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
    messages: the conversation up to (not including) its final assistant turn (a conversational
    prompt-completion row: its prompt turns), rendered with the template's generation prompt.
    """
    shape = record_shape(example)
    if shape == "prompt_completion":
        return _ids(tokenizer, example["prompt"], add_special_tokens=True)
    if shape == "messages":
        messages = list(example["messages"])
        if example.get(PROMPT_TURNS):
            messages = messages[: example[PROMPT_TURNS]]
        elif messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        return _ids(tokenizer, _render(tokenizer, messages, add_generation_prompt=True), add_special_tokens=False)
    raise DataError(f"a record with keys {sorted(example)} has no prompt to generate from; use prompt/completion or messages.")


def _as_ids(item) -> list[int]:
    return item.input_ids if isinstance(item, EncodedExample) else list(item["input_ids"] if isinstance(item, dict) else item)


def collate(batch: list, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a training batch: input_ids (pad_token_id), attention_mask (0) and labels (-100) on padding.

    Items are EncodedExample or dicts with input_ids and labels. A batch of packed rows also
    gets position_ids (the padding tail counts as one more example, so it forms its own block);
    its attention_mask then only counts real tokens, and the loss passes position_ids instead.
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
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if any(getattr(item, "position_ids", None) is not None for item in batch):
        positions = torch.zeros((len(batch), width), dtype=torch.long)
        for row, item in enumerate(batch):
            own = item.position_ids if item.position_ids is not None else list(range(len(item.input_ids)))
            positions[row, : len(own)] = torch.tensor(own, dtype=torch.long)
            positions[row, len(own) :] = torch.arange(width - len(own))
        out["position_ids"] = positions
    return out


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
