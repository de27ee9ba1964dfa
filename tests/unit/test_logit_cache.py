"""The top-k teacher-logit cache: storage round trip, bucketed KD loss vs direct formulas."""

import json
from functools import partial

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from slm_cli.data.tokenize import EncodedExample, collate
from slm_cli.distill import logit_cache as lc
from slm_cli.distill.losses import distillation_loss

V = 256


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=V)
    return LlamaForCausalLM(cfg).eval()


def _examples(n=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 5 + i
        ids = torch.randint(0, V, (length,), generator=g).tolist()
        prompt = 2 + i % 3
        out.append(EncodedExample(ids, [-100] * prompt + ids[prompt:]))
    return out


def _direct_rows(teacher, ex, T):
    """Teacher log-probs at T for one example's target positions, computed unbatched."""
    with torch.no_grad():
        logits = teacher(input_ids=torch.tensor([ex.input_ids])).logits[0, :-1]
    targets = torch.tensor(ex.labels[1:]) != -100
    return torch.log_softmax(logits[targets] / T, -1)


def test_cache_round_trip_in_any_batch_order(teacher, tmp_path):
    examples = _examples()
    coll = partial(collate, pad_token_id=0)
    index = lc.write_cache(teacher, examples, tmp_path, k=8, vocab_size=V, collate=coll, kd_temperature=2.0,
                           dtype=torch.float32, batch_size=3, shard_tokens=10, teacher_hash="abc")
    assert len(index["shards"]) > 1 and (tmp_path / "shard-00001.safetensors").is_file()
    assert index["bytes_per_token"] == 8 * 4 + 8 * 4 + 4
    assert index["tokens"] == sum(e.num_targets - (e.labels[0] != -100) for e in examples)
    assert json.loads((tmp_path / "index.json").read_text())["teacher_hash"] == "abc"
    assert lc.cache_matches(index, k=8, vocab_size=V, kd_temperature=2.0, dtype=torch.float32, teacher_hash="abc",
                            examples=examples)
    assert not lc.cache_matches(index, k=16, vocab_size=V, kd_temperature=2.0, dtype=torch.float32,
                                teacher_hash="abc", examples=examples)
    assert not lc.cache_matches(index, k=8, vocab_size=V, kd_temperature=2.0, dtype=torch.float32,
                                teacher_hash="abc", examples=examples[:-1])

    cache = lc.TeacherLogitCache(tmp_path)
    order = [5, 0, 3, 6]
    ids, lp, rest = cache.rows(coll([examples[i] for i in order]))
    direct = torch.cat([_direct_rows(teacher, examples[i], 2.0) for i in order])
    want_lp, want_ids = direct.topk(8, -1)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(lp, want_lp, atol=1e-5, rtol=1e-5)
    # the rest bucket holds exactly the mass outside the top-k
    torch.testing.assert_close(lp.exp().sum(-1) + rest.exp(), torch.ones(len(rest)), atol=1e-5, rtol=0)
    with pytest.raises(KeyError, match="not in the teacher-logit cache"):
        cache.rows(coll(_examples(n=1, seed=99)))


def test_float16_storage_halves_logprob_bytes(teacher, tmp_path):
    index = lc.write_cache(teacher, _examples(3), tmp_path, k=64, vocab_size=V, collate=partial(collate, pad_token_id=0))
    assert index["dtype"] == "float16" and index["bytes_per_token"] == 64 * 4 + 64 * 2 + 4
    stored = sum((tmp_path / s["file"]).stat().st_size for s in index["shards"])
    assert stored >= index["tokens"] * index["bytes_per_token"]


@pytest.mark.parametrize("divergence,beta", [("forward_kl", None), ("reverse_kl", None), ("generalized_jsd", 0.3), ("tvd", None)])
def test_k_equal_vocab_is_the_online_loss(divergence, beta):
    torch.manual_seed(2)
    s, t = torch.randn(12, V, requires_grad=True), torch.randn(12, V)
    labels = torch.randint(0, V, (12,))
    T = 2.0
    ids, lp, rest = lc.teacher_topk(torch.log_softmax(t / T, -1), V)
    got, parts = lc.topk_distillation_loss(s, ids, lp, rest, labels, divergence=divergence, beta=beta, kd_temperature=T)
    want, wparts = distillation_loss(s, t, labels, divergence=divergence, beta=beta, kd_temperature=T, reduction="sum")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(parts["ce"], wparts["ce"])
    g1, = torch.autograd.grad(got, s)
    g2, = torch.autograd.grad(want, s)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)


def test_topk_forward_kl_is_kl_of_the_bucketed_distributions():
    torch.manual_seed(3)
    k, T = 5, 1.5
    s, t = torch.randn(4, V), torch.randn(4, V)
    labels = torch.randint(0, V, (4,))
    p, q = torch.softmax(t / T, -1), torch.softmax(s / T, -1)
    ids, lp, rest = lc.teacher_topk(p.log(), k)
    top = p.topk(k, -1).indices
    p_b = torch.cat([p.gather(-1, top), 1 - p.gather(-1, top).sum(-1, keepdim=True)], -1)
    q_b = torch.cat([q.gather(-1, top), 1 - q.gather(-1, top).sum(-1, keepdim=True)], -1)
    want = T**2 * (p_b * (p_b.log() - q_b.log())).sum()
    got, parts = lc.topk_distillation_loss(s, ids, lp, rest, labels, kd_temperature=T, kd_weight=1.0)
    torch.testing.assert_close(parts["kd"], want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # folding into buckets can only lose information: bucketed KL <= full KL
    assert want <= T**2 * (p * (p.log() - q.log())).sum()
