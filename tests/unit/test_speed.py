"""slm_cli/evaluate/speed.py on a tiny Llama: statistics, on-disk counts, timings and prefix reuse."""

import json
import statistics

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from slm_cli.data.tokenizer import train_bpe_tokenizer
from slm_cli.evaluate import speed


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls on a shared 2-core machine: a second thread only adds spin-waiting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024,
    )
    return LlamaForCausalLM(cfg).eval()


def test_summarize_matches_numpy():
    xs = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0]
    s = speed.summarize(xs)
    assert s["median"] == statistics.median(xs) == 3.5
    assert s["q1"] == pytest.approx(np.percentile(xs, 25)) and s["q3"] == pytest.approx(np.percentile(xs, 75))
    assert (s["min"], s["max"], s["repeats"]) == (1.0, 10.0, 6)
    assert speed.summarize([7.0]) == {"median": 7.0, "q1": 7.0, "q3": 7.0, "min": 7.0, "max": 7.0, "repeats": 1}
    with pytest.raises(ValueError):
        speed.summarize([])


def test_time_repeats_counts_calls():
    calls = []
    out = speed.time_repeats(lambda: calls.append(1), warmup=2, repeats=3)
    assert len(calls) == 5 and len(out) == 3 and all(t >= 0 for t in out)


def test_params_bytes_and_fp8_detection_from_disk(tmp_path, tiny):
    tiny.save_pretrained(tmp_path / "m")
    folder = tmp_path / "m"
    # tied embeddings are stored once; safetensors holds every parameter exactly once
    assert speed.safetensors_params(folder) == sum(p.numel() for p in tiny.parameters())
    assert speed.weights_bytes(folder) == (folder / "model.safetensors").stat().st_size
    assert not speed.is_fp8_checkpoint(folder)
    # scales of a quantized checkpoint are metadata, not parameters
    fake = tmp_path / "fp8"
    fake.mkdir()
    save_file({"w.weight": torch.zeros(4, 8), "w.weight_scale": torch.ones(4, 1)}, fake / "model.safetensors")
    (fake / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "compressed-tensors"}}))
    assert speed.safetensors_params(fake) == 32 and speed.is_fp8_checkpoint(fake)


def test_prefill_and_decode_report_positive_medians_over_the_repeats(tiny):
    p = speed.prefill_latency(tiny, batch=2, seq_len=16, warmup=1, repeats=3)
    d = speed.decode_throughput(tiny, batch=2, prompt_len=8, new_tokens=4, warmup=1, repeats=3)
    for s in (p, d):
        assert s["repeats"] == 3 and 0 < s["min"] <= s["q1"] <= s["median"] <= s["q3"] <= s["max"]


def direct_score(model, seq: list[int], target_len: int) -> float:
    """log P(last target_len tokens | the rest), from one plain forward pass over the sequence."""
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=torch.tensor([seq])).logits[0].float(), -1)
    return float(sum(logp[t - 1, seq[t]] for t in range(len(seq) - target_len, len(seq))))


def test_prefix_cache_reuse_gives_the_same_scores_as_full_sequences(tiny):
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, 256, (40,), generator=g).tolist()
    items = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 7, 5, 1, 6, 4, 2)]
    target = [17, 42]
    full = speed.score_items_full(tiny, prefix, items, target, batch_size=3)
    cache = speed.prefix_cache(tiny, prefix)
    cached = speed.score_items_cached(tiny, cache, len(prefix), items, target, batch_size=3)
    direct = [direct_score(tiny, prefix + it + target, len(target)) for it in items]
    assert full == pytest.approx(direct, abs=1e-4)
    assert cached == pytest.approx(full, abs=1e-4)
    # the shared prefix cache was not written by the batches that reused it
    assert cache.get_seq_length() == len(prefix)
    again = speed.score_items_cached(tiny, cache, len(prefix), items[::-1], target, batch_size=4)
    assert again == pytest.approx(full[::-1], abs=1e-4)


def test_prefix_reuse_speed_on_the_predictive_task(tiny):
    from slm_cli.data.tasks import TASKS

    texts = [ex["prompt"] + ex["completion"] for ex in TASKS["arithmetic_yesno"].examples("train", 64, 0)]
    tok = train_bpe_tokenizer(texts, vocab_size=320)
    r = speed.prefix_reuse_speed(tiny, tok, prefix_examples=8, items=12, batch_size=4, warmup=1, repeats=2)
    assert r["items"] == 12 and r["prefix_tokens"] > 4 * r["item_tokens_mean"]
    assert r["max_score_diff"] < 1e-4
    assert r["no_reuse_items_per_s"]["median"] > 0 and r["reuse_items_per_s"]["median"] > 0
    assert r["speedup"] == r["reuse_items_per_s"]["median"] / r["no_reuse_items_per_s"]["median"]
