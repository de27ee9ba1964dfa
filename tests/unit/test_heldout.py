"""slm_cli/evaluate/heldout.py: completion cross-entropy against a direct sum of token log-probabilities,
and the lineage's data read from a resolved config."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from slm_cli.data.tokenizer import train_bpe_tokenizer
from slm_cli.evaluate.heldout import completion_cross_entropy, lineage_data_config, load_heldout
from slm_cli.evaluate.predictive import completion_logprobs

EXAMPLES = [{"prompt": "Calculate 2 + 3.\nAnswer:", "completion": " 5"}, {"prompt": "Calculate 10 * 4.\nAnswer:", "completion": " 40"}]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    tok = train_bpe_tokenizer([e["prompt"] + e["completion"] for e in EXAMPLES] * 20, vocab_size=280)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
    )).eval()
    return model, tok


def test_completion_ce_is_the_mean_nll_of_completion_and_eos_tokens(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompts = [tok(e["prompt"])["input_ids"] for e in EXAMPLES]
    completions = [tok(e["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for e in EXAMPLES]
    logp = completion_logprobs(model, tok, prompts, completions, batch_size=1)  # one at a time: no padding at all
    n = sum(len(c) for c in completions)
    got = completion_cross_entropy(model, tok, EXAMPLES, max_seq_len=64, batch_size=2)
    assert got["tokens"] == n and got["examples"] == 2 and got["dropped"] == 0
    assert got["ce"] == pytest.approx(-sum(logp) / n, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(got["ce"]))


def test_an_example_cut_before_its_completion_is_dropped_as_in_training(model_and_tokenizer):
    model, tok = model_and_tokenizer
    long = {"prompt": "Calculate 2 + 3 + 10 * 4 + 2 + 3 + 10 * 4.\nAnswer:", "completion": " 90"}
    keep = len(tok(EXAMPLES[0]["prompt"])["input_ids"]) + 1  # the first example keeps one target token
    assert len(tok(long["prompt"])["input_ids"]) >= keep
    got = completion_cross_entropy(model, tok, [EXAMPLES[0], long], max_seq_len=keep, batch_size=2)
    assert (got["examples"], got["dropped"], got["tokens"], got["truncated"]) == (1, 1, 1, 1)


def test_the_lineage_data_comes_from_the_resolved_config():
    assert lineage_data_config({}) is None and lineage_data_config({"data": {"source": ""}}) is None
    c = lineage_data_config({"seed": 7, "data": {"source": "arithmetic", "test_size": 5, "val_fraction": 0.1, "max_seq_len": 32}})
    assert c == {"source": "arithmetic", "size": 5, "seed": 7, "val_fraction": 0.1, "max_seq_len": 32}
    a, b = load_heldout(c), load_heldout({**c, "seed": 8})
    assert len(a.examples) == 5 and a.metric == "exact_match" and a.spec["split"] == "test"
    assert a.key != b.key and a.key == load_heldout(c).key  # the records decide the key


def test_a_corpus_lineage_is_scored_by_cross_entropy_alone():
    from slm_cli.data.errors import DataError
    from slm_cli.evaluate.sources import choose_metric, load_eval_data

    d = load_heldout({"source": "shakespeare", "size": 3, "seed": 0, "val_fraction": 0.05, "max_seq_len": 64})
    assert d.metric is None and len(d.examples) == 3 and all(set(e) == {"text"} for e in d.examples)
    with pytest.raises(DataError, match="eval.metric=perplexity"):  # slm eval: a text has no completions
        choose_metric(load_eval_data("shakespeare", "test", None, seed=0), "completion_ce")
    assert choose_metric(load_eval_data("arithmetic_yesno", "test", 4, seed=0), "completion_ce") == "completion_ce"
