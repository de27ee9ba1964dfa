"""Readers for user data in the shapes TRL users already have.

Three record shapes are accepted, one per dataset:

* prompt/completion: ``{"prompt": str, "completion": str}`` (the loss falls on the completion);
* conversational: ``{"messages": [{"role": str, "content": str}, ...]}`` with at least one
  assistant turn (the loss falls on assistant turns);
* language modeling: ``{"text": str}`` (the loss falls on every token).

Extra keys (``answer``, ``label``, ids) pass through untouched. Files come as JSON Lines
(one object per line, blank lines skipped), as a folder of ``train.jsonl`` /
``validation.jsonl`` / ``test.jsonl``, or as a folder written by ``datasets.save_to_disk``
(a ``Dataset`` or a ``DatasetDict`` whose rows have the same columns).
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Any, Iterable

from slm_cli.data.errors import DataError

RECORD_SHAPES = ("prompt_completion", "messages", "text")
JSONL_SPLIT_FILES = {"train": "train.jsonl", "validation": "validation.jsonl", "test": "test.jsonl"}
CHAT_ROLES = ("system", "user", "assistant", "tool")
FORMATS_HELP = (
    'each record needs {"prompt": str, "completion": str}, '
    '{"messages": [{"role": ..., "content": ...}, ...]} or {"text": str}'
)


def record_shape(record: dict[str, Any]) -> str:
    """Which of RECORD_SHAPES a record has ("" when none); messages win over prompt/completion.

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


def check_record(record: Any, where: str) -> str:
    """Validate one record and return its shape; `where` ("file.jsonl line 3") goes into every error."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}; {FORMATS_HELP}.")
    shape = record_shape(record)
    if not shape:
        keys = ", ".join(sorted(record)) or "none"
        half = [k for k in ("prompt", "completion") if record.get(k) is not None]
        hint = f"'{half[0]}' without '{({'prompt', 'completion'} - set(half)).pop()}'; " if len(half) == 1 else ""
        raise DataError(f"{where}: missing fields (has {keys}); {hint}{FORMATS_HELP}.")
    if shape == "prompt_completion":
        for key in ("prompt", "completion"):
            if not isinstance(record[key], str):
                raise DataError(f"{where}: field '{key}' must be a string, got {type(record[key]).__name__}.")
    elif shape == "text":
        if not isinstance(record["text"], str):
            raise DataError(f"{where}: field 'text' must be a string, got {type(record['text']).__name__}.")
    else:
        _check_messages(record["messages"], where)
    if "label" in record and record["label"] not in (0, 1):
        raise DataError(f"{where}: field 'label' must be 0 or 1, got {record['label']!r}.")
    return shape


def _check_messages(messages: Any, where: str) -> None:
    """A conversation is a non-empty list of {role, content} strings with at least one assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects.")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise DataError(f"{where}: messages[{i}] must be an object with a string 'role'.")
        if message["role"] not in CHAT_ROLES:
            raise DataError(f"{where}: messages[{i}] has role {message['role']!r}; use one of {', '.join(CHAT_ROLES)}.")
        if not isinstance(message.get("content"), str):
            raise DataError(f"{where}: messages[{i}].content must be a string, got {type(message.get('content')).__name__}.")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant turn, so there is nothing to train on.")


def _check_same_shape(records: Iterable[tuple[dict, str]], source: str) -> list[dict]:
    """Validate every record and insist one dataset keeps one shape (mixing changes what the loss covers)."""
    out, first_shape = [], None
    for record, where in records:
        shape = check_record(record, where)
        if first_shape is None:
            first_shape = shape
        elif shape != first_shape:
            raise DataError(f"{where}: record is {shape} but earlier records are {first_shape}; keep one shape per dataset.")
        out.append(record)
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
    return {
        split: _check_same_shape(
            ((row, f"{path} [{split}] row {i}") for i, row in enumerate(ds, start=1)), f"{path} [{split}]"
        )
        for split, ds in named.items()
    }


def read_user_data(path: str | Path) -> dict[str, list[dict]]:
    """Named splits from a .jsonl file ("train" only), a folder of split .jsonl files, or a datasets folder."""
    path = Path(path).expanduser()
    if path.is_file():
        if path.suffix != ".jsonl":
            raise DataError(
                f"{path}: unsupported file type '{path.suffix}'; give a .jsonl file (one JSON object a line; "
                'plain text goes in as {"text": str} records) or a datasets folder.'
            )
        return {"train": read_jsonl(path)}
    if path.is_dir():
        if is_datasets_folder(path):
            return read_datasets_folder(path)
        if path.suffix == ".jsonl":
            return {"train": read_jsonl(path)}  # refused there, with the shapes a folder may take
        found = {split: path / name for split, name in JSONL_SPLIT_FILES.items() if (path / name).is_file()}
        if "train" not in found:
            others = sorted(f.name for f in path.glob("*.jsonl") if f.is_file())
            if others:
                raise DataError(
                    f"{path}: folder holds {', '.join(others)} but no train.jsonl. Give the file itself "
                    f"(data.source={path / others[0]}), or name the training file train.jsonl."
                )
            raise DataError(
                f"{path}: folder holds neither a datasets.save_to_disk dataset nor train.jsonl "
                "(optionally with validation.jsonl and test.jsonl)."
            )
        return {split: read_jsonl(file) for split, file in found.items()}
    raise DataError(f"{path}: no such file or folder.")
