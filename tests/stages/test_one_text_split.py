"""One text split for every stage: `slm prune`'s and `slm quantize`'s perplexity of their source model
equals `slm eval`'s on the same data, window, stride and max_tokens (they once disagreed because a
copy of the splitter re-cut a corpus into 2 KB records and joined them with extra blank lines)."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from slm_cli import artifacts
from slm_cli.data import load_splits
from slm_cli.data.corpus import load_corpus
from slm_cli.data.text import split_text
from slm_cli.data.tokenizer import train_bpe_tokenizer
from tests.stages.helpers import meta

# 4096 tokens of this tokenizer span several 2 KB corpus blocks, so a re-joined text would differ
SAME = ["eval.window=128", "eval.stride=64", "eval.max_tokens=4096", "eval.batch_size=4"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    texts = [r["text"] for r in load_splits("shakespeare", train_size=40, val_size=1, test_size=1)["train"]]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=300)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("split") / "source"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    artifacts.write_metadata(folder, stage="student", config={}, parents=[], metrics={})
    return folder


def test_a_corpus_split_is_its_stored_text_unchanged():
    assert split_text("shakespeare", "test", seed=0) == load_corpus("shakespeare", "test")
    assert split_text("shakespeare", "validation", seed=0) == load_corpus("shakespeare", "calibration")


def test_prune_quantize_and_eval_report_the_same_source_perplexity(slm, tmp_path, source):
    assert slm("eval", f"model.name_or_path={source}", "data.source=shakespeare", *SAME, f"output_dir={tmp_path / 'eval'}") == 0
    evaluated = json.loads((tmp_path / "eval" / "eval.json").read_text())["metrics"]
    assert evaluated["tokens"] == 4095

    fast = ["calibration.samples=2", "calibration.seq_len=32", "eval.source=shakespeare"]
    assert slm("prune", f"model.name_or_path={source}", "prune.keep_ffn=0.5", *fast, *SAME, f"output_dir={tmp_path / 'p'}") == 0
    assert slm("quantize", f"model.name_or_path={source}", *fast, *SAME, f"output_dir={tmp_path / 'q'}") == 0
    for folder in (tmp_path / "p", tmp_path / "q"):
        m = meta(folder)["metrics"]
        assert m["eval_tokens"] == evaluated["tokens"]
        assert m["perplexity_source"] == pytest.approx(evaluated["perplexity"], rel=1e-6)
