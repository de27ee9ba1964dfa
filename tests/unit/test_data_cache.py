"""The tokenized-data cache: a second encoding of the same records with the same tokenizer reads the
cache; other data, another tokenizer or another max_seq_len miss it; a damaged file is re-encoded."""

import logging

import pytest

from slm_cli.data.tokenize import encode_dataset, tokenizer_fingerprint
from slm_cli.data.tokenizer import train_bpe_tokenizer

CORPUS = ["Calculate 5 - 3 - 6.\nAnswer: -4", "What color is the sky? It is blue."] * 4
ROWS = [{"prompt": f"Calculate {i} + {i}.\nAnswer:", "completion": f" {2 * i}"} for i in range(12)]
CHAT = [
    {"messages": [{"role": "user", "content": "What color is the sky?"}, {"role": "assistant", "content": "It is blue."}]}
] * 3


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLM_CACHE", str(tmp_path))
    return tmp_path / "tokenized"


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(CORPUS, vocab_size=300)


def files(cache):
    return sorted(cache.glob("*.safetensors"))


def test_second_encoding_reads_the_cache(cache, tok, caplog):
    caplog.set_level(logging.INFO, logger="slm_cli.data.tokenize")
    first, stats = encode_dataset(ROWS, tok, max_seq_len=16)
    assert not stats.from_cache and len(files(cache)) == 1
    assert "written to the cache" in caplog.text
    again, cached = encode_dataset(ROWS, tok, max_seq_len=16)
    assert cached.from_cache and f"train split: {len(first)} examples read from the cache" in caplog.text
    assert again == first
    assert (cached.total, cached.truncated, cached.dropped) == (stats.total, stats.truncated, stats.dropped)
    assert stats.truncated > 0  # the cut examples keep their flag through the cache
    assert [e.truncated for e in again] == [e.truncated for e in first]


def test_other_data_tokenizer_or_length_miss_the_cache(cache, tok):
    encode_dataset(ROWS, tok, max_seq_len=16)
    assert not encode_dataset(ROWS[:-1] + [{**ROWS[-1], "completion": " 23"}], tok, max_seq_len=16)[1].from_cache
    assert not encode_dataset(ROWS, tok, max_seq_len=17)[1].from_cache
    other = train_bpe_tokenizer(CORPUS, vocab_size=290)
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tok)
    assert not encode_dataset(ROWS, other, max_seq_len=16)[1].from_cache
    assert len(files(cache)) == 4
    assert encode_dataset(ROWS, tok, max_seq_len=16)[1].from_cache


def test_a_new_chat_template_misses_the_cache(cache, tok):
    encode_dataset(CHAT, tok, max_seq_len=64)
    changed = train_bpe_tokenizer(CORPUS, vocab_size=300)
    assert tokenizer_fingerprint(changed) == tokenizer_fingerprint(tok)
    changed.chat_template = changed.chat_template.replace("<|im_start|>", "<|im_start|> ")
    encoded, stats = encode_dataset(CHAT, changed, max_seq_len=64)
    assert not stats.from_cache
    assert encoded != encode_dataset(CHAT, tok, max_seq_len=64)[0]


def test_a_damaged_cache_file_is_encoded_again_and_replaced(cache, tok, caplog):
    first, _ = encode_dataset(ROWS, tok, max_seq_len=16)
    [path] = files(cache)
    path.write_bytes(path.read_bytes()[:40])
    again, stats = encode_dataset(ROWS, tok, max_seq_len=16)
    assert not stats.from_cache and again == first
    assert "ignoring a damaged tokenized-data cache file" in caplog.text
    assert encode_dataset(ROWS, tok, max_seq_len=16)[1].from_cache


def test_cache_false_writes_nothing(cache, tok):
    encoded, stats = encode_dataset(ROWS, tok, max_seq_len=16, cache=False)
    assert not stats.from_cache and not files(cache) and len(encoded) == stats.kept
