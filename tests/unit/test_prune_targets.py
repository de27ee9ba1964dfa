"""Pruning requests checked against a config, and MLP sizing for a parameter budget (no weights needed)."""

import dataclasses

import pytest
from transformers import LlamaConfig, Qwen3Config

from slm_cli.prune import PrunePlan, count_params_after, keep_ffn_for_params, plan_problems

BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=128)


def test_a_possible_plan_has_no_problems():
    assert plan_problems(LlamaConfig(**BASE), PrunePlan(keep_ffn=0.5, keep_kv_heads=1, keep_q_per_kv=1, drop_layers=2)) == []


def test_every_impossible_target_is_named():
    problems = plan_problems(LlamaConfig(**BASE), PrunePlan(keep_ffn=200, keep_kv_heads=3, keep_q_per_kv=3, drop_layers=3))
    text = "\n".join(problems)
    assert len(problems) == 4
    assert "keep_ffn_count=200 exceeds" in text and "keep_kv_heads=3 exceeds" in text
    assert "(num_attention_heads / num_key_value_heads = 4/2 = 2)" in text and "remove all 3 layers" in text


def test_heads_transformers_would_reject():
    # one KV head read by 4 query heads; keeping 3 of them leaves hidden_size 64 not divisible by 3 heads
    config = LlamaConfig(**{**BASE, "num_key_value_heads": 1})
    (problem,) = plan_problems(config, PrunePlan(keep_q_per_kv=3))
    assert "would be rejected by transformers" in problem and "num_attention_heads=3" in problem
    assert plan_problems(config, PrunePlan(keep_q_per_kv=2)) == []


def test_unsupported_architecture():
    config = LlamaConfig(**BASE)
    config.model_type = "gpt2"
    (problem,) = plan_problems(config, PrunePlan(keep_ffn=0.5))
    assert "'gpt2' is not supported" in problem


@pytest.mark.parametrize("cls", [LlamaConfig, Qwen3Config])
def test_keep_ffn_for_params_is_the_largest_width_that_fits(cls):
    config = cls(**BASE)
    plan = PrunePlan(keep_q_per_kv=1, drop_layers=1, round_to=8)
    exact = count_params_after(config, dataclasses.replace(plan, keep_ffn=40, round_to=1))
    for target, want in ((exact, 40), (exact + 3 * 64 * 2 * 8 - 1, 40), (exact + 3 * 64 * 2 * 8, 48)):
        k, params = keep_ffn_for_params(config, plan, target)
        assert (k, params) == (want, count_params_after(config, dataclasses.replace(plan, keep_ffn=want, round_to=1)))
        assert params <= target
    assert keep_ffn_for_params(config, plan, 10**9)[0] == 128
    with pytest.raises(ValueError, match="below the smallest model"):
        keep_ffn_for_params(config, plan, 100)
