"""Readers for user data in the shapes TRL users already have.

TRL names a dataset by its *type* (what it trains) and *format* (plain strings, or chat
messages); slm accepts the types a supervised trainer learns from, with the loss on:

* language modeling, ``{"text": str}``: every token;
* conversational language modeling, ``{"messages": [{"role", "content"}, ...]}``: assistant turns;
* prompt-completion, ``{"prompt": str, "completion": str}``: the completion (and eos);
* conversational prompt-completion, ``{"prompt": [messages], "completion": [messages]}``: the
  completion's assistant turns.

A conversational prompt-completion row is read as the conversation ``prompt + completion``
(``messages``) plus ``prompt_turns = len(prompt)``, so every later stage (tokenization, on-policy
prompts, evaluation) sees one chat shape; tokenization trains only assistant turns from
``prompt_turns`` on, as TRL's completion-only loss does. Prompt-only rows (no completion),
preference rows (``chosen``/``rejected``) and stepwise-supervision rows are refused with the
type named: slm trains on completions and does no preference training. A ``label`` of 0/1 (or
true/false) beside prompt/completion is slm's class label for AUC evaluation.

Extra keys (``answer``, ``label``, ids) pass through untouched. One dataset keeps one type.

Where rows come from:

* ``.jsonl``, and ``.json`` (one array of row objects, or JSON Lines): parsed here, so an error
  names the 1-based line (and encoding problems get the conversion command); the rows are those
  ``datasets.load_dataset("json")`` would give, without arrow's one-type-per-column rule;
* ``.csv``, ``.parquet``: ``datasets.load_dataset`` with the matching builder (arrow files cached
  under ``$SLM_CACHE/datasets``); errors name the 1-based row (CSV: data rows, header excluded);
* a folder of ``train`` / ``validation`` / ``test`` files of one of those types;
* a folder written by ``datasets.save_to_disk`` (a ``Dataset`` or a ``DatasetDict``);
* ``hub:<dataset id>`` (``data.subset`` picks a configuration): ``datasets.load_dataset`` from
  the Hugging Face Hub, or from its local cache when offline.
"""

from __future__ import annotations

import codecs
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable

from slm_cli.data.errors import DataError

RECORD_SHAPES = ("prompt_completion", "messages", "text")
# TRL's names for the dataset types slm trains on, and for those it refuses
LANGUAGE_MODELING = "language modeling"
CONVERSATIONAL_LANGUAGE_MODELING = "conversational language modeling"
PROMPT_COMPLETION = "prompt-completion"
CONVERSATIONAL_PROMPT_COMPLETION = "conversational prompt-completion"
PROMPT_ONLY = "prompt-only"
CONVERSATIONAL_PROMPT_ONLY = "conversational prompt-only"
PREFERENCE = "preference"
STEPWISE_SUPERVISION = "stepwise supervision"
# the key a conversational prompt-completion row carries once read as messages: turns before it are prompt
PROMPT_TURNS = "prompt_turns"
FILE_BUILDERS = {".csv": "csv", ".parquet": "parquet"}  # read with datasets.load_dataset; .jsonl and .json by slm
DATA_SUFFIXES = (".jsonl", ".json", *FILE_BUILDERS)
# pandas would read a completion " 42" as the integer 42 and a prompt "NA" as missing: the text
# columns keep the cell's characters as they are.
CSV_AS_TEXT = {"converters": {key: str for key in ("text", "prompt", "completion", "messages")}, "keep_default_na": False}
SPLITS = ("train", "validation", "test")
HUB_PREFIX = "hub:"
CHAT_ROLES = ("system", "user", "assistant", "tool")
FORMATS_HELP = (
    'each record needs {"prompt": str, "completion": str}, {"prompt": [messages], "completion": [messages]}, '
    '{"messages": [{"role": ..., "content": ...}, ...]} or {"text": str}'
)


def record_shape(record: dict[str, Any]) -> str:
    """Which of RECORD_SHAPES a record read by slm has ("" when none); messages win over prompt/completion.

    A key holding None counts as absent: datasets tables fill columns a row lacks with None.
    """
    present = {key for key, value in record.items() if value is not None}
    if "messages" in present:
        return "messages"
    if {"prompt", "completion"} <= present:
        return "prompt_completion"
    if "text" in present:
        return "text"
    return ""


def record_type(record: dict[str, Any]) -> str:
    """The TRL dataset type of a raw row ("" when it has none of their columns)."""
    present = {key for key, value in record.items() if value is not None}
    if "messages" in present:
        return CONVERSATIONAL_LANGUAGE_MODELING
    if present & {"chosen", "rejected"}:
        return PREFERENCE
    if {"completions", "labels"} <= present:
        return STEPWISE_SUPERVISION
    chat = isinstance(record.get("prompt"), list)
    if {"prompt", "completion"} <= present:
        return CONVERSATIONAL_PROMPT_COMPLETION if chat else PROMPT_COMPLETION
    if "prompt" in present:
        return CONVERSATIONAL_PROMPT_ONLY if chat else PROMPT_ONLY
    if "text" in present:
        return LANGUAGE_MODELING
    return ""


def check_record(record: Any, where: str) -> str:
    """Validate one raw row and return its TRL type; `where` ("file.jsonl line 3") goes into every error."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}; {FORMATS_HELP}.")
    kind = record_type(record)
    keys = ", ".join(sorted(k for k, v in record.items() if v is not None)) or "none"
    if not kind:
        hint = "'completion' without 'prompt'; " if record.get("completion") is not None else ""
        raise DataError(f"{where}: missing fields (has {keys}); {hint}{FORMATS_HELP}.")
    if kind in (PROMPT_ONLY, CONVERSATIONAL_PROMPT_ONLY):
        raise DataError(
            f"{where}: missing fields (has {keys}); 'prompt' without 'completion' is TRL's {kind} type, and slm's "
            "training and evaluation learn from and score completions: give each row a 'completion' "
            "(prompt-completion type)."
        )
    if kind == PREFERENCE:
        raise DataError(
            f"{where}: a row with 'chosen'/'rejected' is TRL's preference type, and slm does no preference training "
            "(DPO and the like). For supervised training keep the preferred answer: rename 'chosen' to 'completion' "
            "and drop 'rejected'."
        )
    if kind == STEPWISE_SUPERVISION:
        raise DataError(
            f"{where}: a row with 'completions' and 'labels' is TRL's stepwise-supervision type (for reward models), "
            "which slm does not train; give rows a single 'completion' instead."
        )
    if kind == PROMPT_COMPLETION:
        for key in ("prompt", "completion"):
            if not isinstance(record[key], str):
                raise DataError(f"{where}: field '{key}' must be a string, got {type(record[key]).__name__}.")
    elif kind == CONVERSATIONAL_PROMPT_COMPLETION:
        _check_turns(record["prompt"], where, "prompt")
        if not isinstance(record["completion"], list):
            raise DataError(
                f"{where}: 'prompt' is a list of messages, so 'completion' must be one too "
                f"(got {type(record['completion']).__name__}); e.g. \"completion\": [{{\"role\": \"assistant\", \"content\": ...}}]."
            )
        _check_turns(record["completion"], where, "completion")
        if not any(m["role"] == "assistant" for m in record["completion"]):
            raise DataError(f"{where}: the completion has no assistant turn, so there is nothing to train on.")
    elif kind == LANGUAGE_MODELING:
        if not isinstance(record["text"], str):
            raise DataError(f"{where}: field 'text' must be a string, got {type(record['text']).__name__}.")
    else:
        _check_turns(record["messages"], where, "messages")
        if not any(m["role"] == "assistant" for m in record["messages"]):
            raise DataError(f"{where}: the conversation has no assistant turn, so there is nothing to train on.")
    if "label" in record and record["label"] is not None and record["label"] not in (0, 1):
        raise DataError(f"{where}: field 'label' must be 0 or 1, got {record['label']!r}.")
    return kind


def _check_turns(messages: Any, where: str, field: str) -> None:
    """A list of chat turns is a non-empty list of {role, content} strings."""
    if isinstance(messages, str) and messages.lstrip().startswith("["):
        raise DataError(
            f"{where}: field '{field}' is text that looks like JSON; a CSV cell holds only text, so keep chat data "
            "in .jsonl, .json or .parquet files."
        )
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field '{field}' must be a non-empty list of {{role, content}} objects.")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise DataError(f"{where}: {field}[{i}] must be an object with a string 'role'.")
        if message["role"] not in CHAT_ROLES:
            raise DataError(f"{where}: {field}[{i}] has role {message['role']!r}; use one of {', '.join(CHAT_ROLES)}.")
        if not isinstance(message.get("content"), str):
            raise DataError(f"{where}: {field}[{i}].content must be a string, got {type(message.get('content')).__name__}.")


def normalize_record(record: dict, kind: str) -> dict:
    """A checked row as slm reads it: conversational prompt-completion becomes messages + prompt_turns."""
    if kind != CONVERSATIONAL_PROMPT_COMPLETION:
        return record
    rest = {k: v for k, v in record.items() if k not in ("prompt", "completion")}
    return {**rest, "messages": [*record["prompt"], *record["completion"]], PROMPT_TURNS: len(record["prompt"])}


def _check_same_shape(records: Iterable[tuple[dict, str]], source: str) -> list[dict]:
    """Validate every row, insist one dataset keeps one type (mixing changes what the loss covers), normalize."""
    out, first_kind = [], None
    for record, where in records:
        kind = check_record(record, where)
        if first_kind is None:
            first_kind = kind
        elif kind != first_kind:
            raise DataError(f"{where}: this row is {kind} data but earlier rows are {first_kind}; keep one type per dataset.")
        out.append(normalize_record(record, kind))
    if not out:
        raise DataError(f"{source}: the dataset is empty; {FORMATS_HELP}.")
    return out


# Byte-order marks of the encodings JSON Lines is not written in. UTF-32's are tested first:
# the UTF-32-LE mark begins with UTF-16-LE's.
_WIDE_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"),
)


def _refuse_wide_encoding(path: Path, head: bytes) -> None:
    """UTF-16/32 text is refused with the command that converts it.

    JSON Lines is UTF-8 by definition (jsonlines.org; RFC 8259 for JSON exchanged between
    systems), and the tools the same file goes to (datasets, TRL, jq) read it as UTF-8, so slm
    asks for a converted copy rather than guess. Without a byte-order mark, NUL bytes between
    ASCII characters give UTF-16 away (JSON text itself never holds a raw NUL).
    """
    name = next((enc for bom, enc in _WIDE_BOMS if head.startswith(bom)), None)
    if name is None and b"\x00" in head:
        name = "UTF-16"
    if name is not None:
        raise DataError(
            f"{path} is {name} text, but JSON Lines must be UTF-8. Convert it, e.g. "
            f"`iconv -f {name} -t UTF-8 {path} > {path.with_suffix('.utf8.jsonl')}` (or save it as UTF-8 in your "
            "editor), and point data.source at the converted file."
        )


def _decode_line(raw: bytes, where: str, path: Path) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        # Latin-1 / Windows-1252 exports (Excel, older Windows tools) are by far the usual cause
        raise DataError(
            f"{where}: byte 0x{raw[exc.start]:02x} (byte {exc.start + 1} of the line) is not UTF-8, and JSON Lines must be "
            f"UTF-8. If the file came from Windows or Excel it is likely Windows-1252: convert it with "
            f"`iconv -f WINDOWS-1252 -t UTF-8 {path} > {path.with_suffix('.utf8.jsonl')}` and point data.source "
            "at the converted file."
        ) from None


def read_jsonl(path: str | Path) -> list[dict]:
    """All records of a JSON Lines file, validated; errors name the file and the 1-based line.

    The file must be UTF-8; a leading UTF-8 byte-order mark (Windows editors write one) is skipped.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(
            f"{path} is a folder, not a .jsonl file. Give a .jsonl file, or a folder holding train.jsonl "
            "(optionally validation.jsonl and test.jsonl) or a datasets.save_to_disk dataset."
        )
    if not path.is_file():
        raise DataError(f"{path}: no such file.")

    def records():
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, start=1):
                where = f"{path} line {lineno}"
                if lineno == 1:
                    _refuse_wide_encoding(path, raw[:64])
                    raw = raw.removeprefix(codecs.BOM_UTF8)
                line = _decode_line(raw, where, path)
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno}).") from None
                yield record, where

    return _check_same_shape(records(), str(path))


def is_datasets_folder(path: Path) -> bool:
    """True for a folder written by `save_to_disk` (a Dataset has state.json, a DatasetDict dataset_dict.json)."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _checked(ds, label: str) -> list[dict]:
    """The rows of one datasets.Dataset, validated one by one; errors say "<label> row <1-based index>"."""
    return _check_same_shape(((row, f"{label} row {i}") for i, row in enumerate(ds, start=1)), label)


def read_datasets_folder(path: str | Path) -> dict[str, list[dict]]:
    """The splits of a `datasets.save_to_disk` folder as validated lists ("train" for a bare Dataset)."""
    import datasets

    path = Path(path)
    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(
            f"{path}: could not be read with datasets.load_from_disk ({exc}). The folder is damaged or incomplete: "
            "copy it again, or write it again with save_to_disk."
        ) from None
    named = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    return {split: _checked(ds, f"{path} [{split}]") for split, ds in named.items()}


def _first_line(exc: BaseException) -> str:
    """The innermost cause's type and first line (datasets wraps a parser's error in DatasetGenerationError)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def read_json(path: Path) -> list[dict]:
    """Rows of a .json file: one JSON array of objects, or JSON Lines under a .json name.

    These are the two layouts datasets.load_dataset("json") reads; parsing with the json module
    here gives errors with a line and column (and, for JSON Lines, the line reader's checks).
    """
    raw = path.read_bytes()
    _refuse_wide_encoding(path, raw[:64])
    text = _decode_line(raw.removeprefix(codecs.BOM_UTF8), str(path), path)
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # a second value after the first: one object a line
            return read_jsonl(path)
        raise DataError(f"{path} line {exc.lineno} column {exc.colno}: malformed JSON ({exc.msg}).") from None
    if isinstance(document, dict):
        lists = [key for key, value in document.items() if isinstance(value, list)]
        hint = f" (the rows may be the list under '{lists[0]}': save that list on its own)" if lists else ""
        raise DataError(f"{path}: holds one JSON object, not a list of rows{hint}; {FORMATS_HELP}.")
    if not isinstance(document, list):
        raise DataError(f"{path}: holds a JSON {type(document).__name__}, not a list of rows; {FORMATS_HELP}.")
    return _check_same_shape(((row, f"{path} row {i}") for i, row in enumerate(document, start=1)), str(path))


@contextmanager
def _quiet_datasets():
    """No progress bars or warnings from datasets while it reads: a failure becomes slm's one DataError."""
    import datasets

    bars, level = datasets.is_progress_bar_enabled(), datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)
        if bars:
            datasets.enable_progress_bars()


def read_data_files(files: dict[str, Path]) -> dict[str, list[dict]]:
    """Named splits from .csv or .parquet files (one type for all), read with datasets.load_dataset.

    The arrow files datasets converts them to go under slm's cache (`SLM_CACHE`/datasets), keyed
    by datasets on the files' content, so a second run reads them back without parsing.
    """
    import datasets

    from slm_cli.paths import cache_dir

    suffixes = {path.suffix for path in files.values()}
    if len(suffixes) != 1:
        raise DataError(f"split files of different types ({', '.join(str(p) for p in files.values())}); use one file type.")
    builder = FILE_BUILDERS[suffixes.pop()]
    loaded = {}
    for split, path in files.items():
        try:
            with _quiet_datasets():
                loaded[split] = datasets.load_dataset(
                    builder, data_files=str(path), split="train", cache_dir=str(cache_dir() / "datasets"),
                    **(CSV_AS_TEXT if builder == "csv" else {}),
                )
        except Exception as exc:  # noqa: BLE001 - any reader failure on a user's file is reported as a data error
            raise DataError(
                f"{path}: datasets.load_dataset({builder!r}) could not read it ({_first_line(exc)}). "
                f"Check that it is a complete {builder.upper()} file"
                + (" with a header row naming the columns." if builder == "csv" else ".")
            ) from None
    return {split: _checked(ds, str(files[split])) for split, ds in loaded.items()}


def read_hub(name: str, subset: str | None = None) -> dict[str, list[dict]]:
    """Named splits of a dataset on the Hugging Face Hub (or a local folder laid out like one).

    Hub splits named train, validation and test are used; others are ignored.
    """
    import datasets

    if not name:
        raise DataError(f"data.source={HUB_PREFIX} names no dataset; write data.source={HUB_PREFIX}<org>/<name>.")
    where = f"data.source={HUB_PREFIX}{name}" + (f" (data.subset={subset})" if subset else "")
    try:
        with _quiet_datasets():
            loaded = datasets.load_dataset(name, subset)
    except Exception as exc:  # noqa: BLE001 - network, missing dataset, bad subset: all a data-source error
        raise DataError(
            f"{where}: datasets.load_dataset could not load it ({_first_line(exc)}). Check the dataset id and "
            "data.subset; without a network only a dataset already in the Hugging Face datasets cache loads "
            "(HF_DATASETS_OFFLINE=1)."
        ) from None
    named = {split: ds for split, ds in loaded.items() if split in SPLITS}
    if "train" not in named:
        raise DataError(f"{where}: no 'train' split (found {', '.join(loaded) or 'none'}).")
    return {split: _checked(ds, f"{HUB_PREFIX}{name} [{split}]") for split, ds in named.items()}


def _split_files(folder: Path) -> dict[str, Path]:
    """train/validation/test files of one data type in `folder` (the first type that has a train file)."""
    for suffix in DATA_SUFFIXES:
        if (folder / f"train{suffix}").is_file():
            return {split: folder / f"{split}{suffix}" for split in SPLITS if (folder / f"{split}{suffix}").is_file()}
    return {}


def _read_file(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    if path.suffix == ".json":
        return read_json(path)
    if path.suffix in FILE_BUILDERS:
        return read_data_files({"train": path})["train"]
    raise DataError(
        f"{path}: unsupported file type '{path.suffix}'; give a .jsonl, .json, .csv or .parquet file (plain text "
        'goes in as {"text": str} records) or a datasets folder.'
    )


def read_user_data(path: str | Path, subset: str | None = None) -> dict[str, list[dict]]:
    """Named splits from a data file ("train" only), a folder of split files, a datasets folder or a hub id."""
    if str(path).startswith(HUB_PREFIX):
        return read_hub(str(path)[len(HUB_PREFIX):], subset)
    path = Path(path).expanduser()
    if path.is_file():
        return {"train": _read_file(path)}
    if path.is_dir():
        if is_datasets_folder(path):
            return read_datasets_folder(path)
        if path.suffix == ".jsonl":
            return {"train": read_jsonl(path)}  # refused there, with the shapes a folder may take
        found = _split_files(path)
        if not found:
            others = sorted(f.name for f in path.iterdir() if f.is_file() and f.suffix in DATA_SUFFIXES)
            if others:
                train = f"train{Path(others[0]).suffix}"
                raise DataError(
                    f"{path}: folder holds {', '.join(others)} but no {train}. Give the file itself "
                    f"(data.source={path / others[0]}), or name the training file {train}."
                )
            raise DataError(
                f"{path}: folder holds neither a datasets.save_to_disk dataset nor a train file (train.jsonl, "
                "train.json, train.csv or train.parquet; optionally with validation and test files of the same type)."
            )
        if next(iter(found.values())).suffix in (".jsonl", ".json"):
            return {split: _read_file(file) for split, file in found.items()}
        return read_data_files(found)
    raise DataError(f"{path}: no such file or folder.")
