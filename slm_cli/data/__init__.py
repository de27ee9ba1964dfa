"""The data layer: one call turns a `data.source` into train / validation / test records.

A source is, in this order of lookup:

1. a built-in task name (``arithmetic``, ``gsm_symbolic``, ``arithmetic_yesno``; see tasks.py),
   generated offline with disjoint splits;
2. a corpus name (``shakespeare``, ``kjv``; see corpus.py): ``{"text"}`` blocks, with the corpus'
   calibration split serving as validation;
3. ``hub:<dataset id>``: a dataset on the Hugging Face Hub (``subset`` picks its configuration);
4. a path: a ``.jsonl``, ``.json``, ``.csv`` or ``.parquet`` file, a folder of ``train``
   [``validation``, ``test``] files of one of those types, or a ``datasets.save_to_disk`` folder
   (see formats.py for the row types). Write ``./arithmetic`` for a file that shares a built-in name.

User data without a validation split is split by a seeded shuffle: ``round(val_fraction * n)``
records (at least one when val_fraction > 0) go to validation, the rest to train. Without a test
split, test is the validation set.
"""

from __future__ import annotations

import random
from pathlib import Path

from slm_cli.data.corpus import CORPORA, corpus_examples
from slm_cli.data.errors import DataError
from slm_cli.data.formats import HUB_PREFIX, read_user_data
from slm_cli.data.tasks import TASKS

DEFAULT_TASK_SIZES = {"train": 2000, "validation": 200, "test": 200}


def get_task(name: str):
    """The built-in task called `name`, or None when `name` is a corpus or a path."""
    return TASKS.get(name)


def list_sources() -> list[dict]:
    """Built-in sources for help tables: name, type (task/corpus), kind and a one-line description."""
    rows = [
        {"name": name, "type": "task", "kind": task.kind, "description": type(task).__doc__.strip().splitlines()[0]}
        for name, task in TASKS.items()
    ]
    rows += [
        {"name": name, "type": "corpus", "kind": "language modeling", "description": f"prose from the {src.package} package"}
        for name, src in CORPORA.items()
    ]
    return rows


def _sample(records: list[dict], size: int | None, seed: int) -> list[dict]:
    """`size` records chosen by a seeded draw, in their original order (all when size is None or larger)."""
    if size is None or size >= len(records):
        return records
    if size < 0:
        raise DataError(f"a split size of {size} is invalid; use a count >= 0 or null for all.")
    keep = sorted(random.Random(seed).sample(range(len(records)), size))
    return [records[i] for i in keep]


def _user_splits(path: Path | str, val_fraction: float, seed: int, subset: str | None = None) -> dict[str, list[dict]]:
    """Named splits from a user file/folder or hub id, with validation carved out of train when absent."""
    named = read_user_data(path, subset)
    if "train" not in named:
        raise DataError(f"{path}: no 'train' split (found {', '.join(named)}).")
    train = named["train"]
    validation = named.get("validation")
    if validation is None:
        if not 0.0 <= val_fraction < 1.0:
            raise DataError(f"data.val_fraction={val_fraction} must be in [0, 1).")
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        n_val = max(1, round(val_fraction * len(train))) if val_fraction > 0 else 0
        if n_val >= len(train):
            raise DataError(
                f"{path}: {len(train)} record(s) cannot be split into train and validation with "
                f"data.val_fraction={val_fraction}; add records, provide a validation split, or set data.val_fraction=0."
            )
        validation = [train[i] for i in order[:n_val]]
        train = [train[i] for i in order[n_val:]]
    test = named.get("test", validation)
    return {"train": train, "validation": validation, "test": test}


def load_splits(
    source: str,
    *,
    train_size: int | None = None,
    val_size: int | None = None,
    test_size: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    block_chars: int = 2048,
    subset: str | None = None,
) -> dict[str, list[dict]]:
    """Records for "train", "validation" and "test" from a task, a corpus, a hub id or a user path.

    Sizes cap each split (None: all of it; for tasks None means DEFAULT_TASK_SIZES). The same
    arguments always give the same records. `block_chars` sets corpus record length; `subset`
    names a hub dataset's configuration.
    """
    sizes = {"train": train_size, "validation": val_size, "test": test_size}
    task = get_task(source)
    if task is not None:
        return {
            split: task.examples(split, DEFAULT_TASK_SIZES[split] if size is None else size, seed)
            for split, size in sizes.items()
        }
    if source in CORPORA:
        corpus_split = {"train": "train", "validation": "calibration", "test": "test"}
        return {
            split: _sample(corpus_examples(source, corpus_split[split], block_chars), size, seed)
            for split, size in sizes.items()
        }
    if source.startswith(HUB_PREFIX):
        splits = _user_splits(source, val_fraction, seed, subset)
        return {split: _sample(records, sizes[split], seed) for split, records in splits.items()}
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(
            f"data.source={source!r} is neither a built-in source ({', '.join([*TASKS, *CORPORA])}), "
            f"a {HUB_PREFIX}<dataset id>, nor an existing data file (.jsonl, .json, .csv, .parquet) or folder."
        )
    splits = _user_splits(path, val_fraction, seed)
    return {split: _sample(records, sizes[split], seed) for split, records in splits.items()}


__all__ = ["DataError", "get_task", "list_sources", "load_splits"]
