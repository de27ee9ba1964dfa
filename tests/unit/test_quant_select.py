"""slm_cli.quant.select against a direct computation on a tiny Llama: the replayed per-tensor KL equals
the KL of a full forward pass of the model with only that tensor fake-quantized, and the greedy
selection's joint measurement equals the perplexity of fake_quant_model with the kept tensors ignored."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from slm_cli.quant.schemes import QuantError
from slm_cli.quant.report import fake_quant_model
from slm_cli.quant.select import keep_order, mean_nll, parse_keep_sensitive, select_sensitive, tensor_sensitivity


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=97, tie_word_embeddings=True, initializer_range=0.2)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def rows():
    return torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def direct_kl(model, scheme, name, rows, calib) -> float:
    """Mean per-token KL(float || only `name` fake-quantized), by full forward passes."""
    others = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != name]
    fq = fake_quant_model(model, scheme, others, calib)
    ref = F.log_softmax(model(input_ids=rows).logits[:, :-1].float(), -1)
    got = F.log_softmax(fq(input_ids=rows).logits[:, :-1].float(), -1)
    return (ref.exp() * (ref - got)).sum(-1).mean().item()


@pytest.mark.parametrize("scheme", ["fp8_dynamic", "fp8_static", "fp8_weight_only"])
def test_replayed_kl_matches_full_forward(model, rows, scheme):
    calib = list(rows.split(2)) if scheme == "fp8_static" else None
    sens = {r["name"]: r for r in tensor_sensitivity(model, scheme, ["lm_head"], rows, calib, dtype=torch.float32)}
    assert len(sens) == 3 * 7 and all(r["kl"] > 0 for r in sens.values())
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj", "model.layers.2.self_attn.o_proj"):
        # static input scales are observed on the float model, whatever else is quantized
        assert sens[name]["kl"] == pytest.approx(direct_kl(model, scheme, name, rows, calib), rel=1e-4, abs=1e-9)
        assert sens[name]["kl_per_param"] == pytest.approx(sens[name]["kl"] / model.get_submodule(name).weight.numel())
        assert sens[name]["layer"] == int(name.split(".")[2])


def test_keep_order_is_by_sensitivity_per_weight():
    rows = [{"name": "big", "kl": 4.0, "params": 400, "kl_per_param": 0.01},
            {"name": "small", "kl": 1.0, "params": 10, "kl_per_param": 0.1},
            {"name": "tie_b", "kl": 0.1, "params": 100, "kl_per_param": 0.001},
            {"name": "tie_a", "kl": 0.1, "params": 100, "kl_per_param": 0.001}]
    assert [r["name"] for r in keep_order(rows)] == ["small", "big", "tie_a", "tie_b"]


def test_joint_measurement_is_the_fake_quant_model_with_those_tensors_ignored(model, rows):
    sel = select_sensitive(model, "fp8_dynamic", ["lm_head"], rows, keep=3, max_keep_fraction=1.0,
                           sensitivity_tokens=32, storage_dtype=torch.bfloat16)
    assert len(sel["kept"]) == 3 and sel["met"] is None and sel["kept"] == [r["name"] for r in sel["tensors"][:3]]
    fq = fake_quant_model(model, "fp8_dynamic", ["lm_head", *sel["kept"]], storage_dtype=torch.bfloat16)
    want = math.exp(mean_nll(fq, rows, 4) - mean_nll(model, rows, 4)) - 1
    assert sel["ppl_increase"] == pytest.approx(want, rel=1e-6, abs=1e-9)
    assert sel["rounds"] == [{"kept": 3, "kept_params": sel["kept_params"], "ppl_increase": sel["ppl_increase"]}]


def test_auto_stops_at_the_byte_cap_and_says_so(model, rows):
    # a budget nothing meets (perplexity must halve): the selection fills the cap and reports met=False
    sel = select_sensitive(model, "fp8_dynamic", ["lm_head"], rows, max_ppl_increase=-1.0, max_keep_fraction=0.1,
                           sensitivity_tokens=32)
    assert sel["met"] is False and sel["kept"]
    assert sel["kept_params"] <= 0.1 * sel["quantizable_params"]
    smallest = min(r["params"] for r in sel["tensors"] if not r["kept"])
    assert sel["kept_params"] + smallest > 0.1 * sel["quantizable_params"]  # nothing else would fit


@pytest.mark.parametrize("value, want", [("auto", "auto"), ("AUTO", "auto"), ("none", 0), (0, 0), ("5", 5), (7, 7)])
def test_parse_keep_sensitive(value, want):
    assert parse_keep_sensitive(value) == want


def test_parse_keep_sensitive_refuses_nonsense():
    with pytest.raises(QuantError, match="quant.keep_sensitive='most'.*auto.*none"):
        parse_keep_sensitive("most")
