"""INT8 W8A8 and INT4 W4A16 through compressed-tensors on a tiny Llama: the checkpoint's integers are
the quantizer's own (GPTQ's included), SmoothQuant preserves the function and helps INT8 where
activations have outliers, and group sizes that do not divide are refused with the fix."""

import copy

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from slm_cli.quant.checks import validate_checkpoint
from slm_cli.quant.gptq import gptq_model
from slm_cli.quant.report import checkpoint_size_report, fake_quant_model, weight_error_report
from slm_cli.quant.schemes import SCALE_DTYPE, QuantError, check_request, quantize_model, save_quantized
from slm_cli.quant.smooth import smooth_model


def tiny(hidden=128, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def rows(n=8, seq=32, seed=1):
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(seed))


def decompressed(folder) -> dict[str, torch.Tensor]:
    """Every Linear weight of a reloaded checkpoint after compressed-tensors decompressed it."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        model(input_ids=rows(1, 4))  # the first forward decompresses
    return {n: m.weight.detach().float() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def test_gptq_weights_reach_the_checkpoint_unchanged(tmp_path):
    model = tiny()
    qscheme, ignore = check_request(model, "w4a16", ["lm_head"], calibrated=True)
    results = gptq_model(model, list(rows().split(4)), qscheme.weights, ignore, scale_dtype=SCALE_DTYPE)
    chosen = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    gptq_rounded = copy.deepcopy(model)
    quantize_model(model, "w4a16", ignore, weight_scales={r["name"]: r["scale"] for r in results})
    save_quantized(model, None, tmp_path, source_dtype=torch.bfloat16)

    layers = validate_checkpoint(tmp_path, "w4a16", source_dtype=torch.bfloat16)
    assert len(layers["quantized"]) == 14
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        assert f.get_tensor("model.layers.0.mlp.down_proj.weight_scale").dtype == torch.bfloat16
        assert tuple(f.get_tensor("model.layers.0.mlp.down_proj.weight_scale").shape) == (128, 2)
    got = decompressed(tmp_path)
    for name in layers["quantized"]:
        # GPTQ's own rounding, bit for bit: the packer recomputed the same integers from its scales
        torch.testing.assert_close(got[name], chosen[name], rtol=0, atol=0, msg=name)
    assert all(r["error_gptq"] <= r["error_rtn"] for r in results)
    errors = weight_error_report(gptq_rounded, tmp_path)
    assert len(errors) == 14 and max(r["rel_l2_error"] for r in errors) == 0.0  # against GPTQ's weights: exact
    sizes = checkpoint_size_report(tmp_path)
    assert sizes["quantized_layers"] == 14
    # int4 is 0.25 of bf16's bytes; one bf16 scale per 128 weights adds 1/128
    assert sizes["quantized_ratio"] == pytest.approx(0.25 + 1 / 128, abs=2e-3)


def test_int8_checkpoint_matches_the_fake_quantized_model(tmp_path):
    model = tiny()
    reference = fake_quant_model(model, "w8a8_int8", ["lm_head"], storage_dtype=torch.bfloat16)
    quantize_model(model, "w8a8_int8", ["lm_head"])
    save_quantized(model, None, tmp_path, source_dtype=torch.bfloat16)
    validate_checkpoint(tmp_path, "w8a8_int8", source_dtype=torch.bfloat16)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        q = f.get_tensor("model.layers.1.mlp.down_proj.weight")
    assert q.dtype == torch.int8 and q.abs().max() == 127  # the absmax entry of a row lands on the edge
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = rows(2, 16, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=1e-5)
    got = decompressed(tmp_path)
    for name, module in reference.named_modules():
        if hasattr(module, "weight_scale"):  # the quantizer's own Q*s, read back from the int8 files
            torch.testing.assert_close(got[name], module.weight.detach().float(), rtol=0, atol=0, msg=name)
    errors = weight_error_report(tiny(), tmp_path)
    assert len(errors) == 14 and all(0 < r["max_rel_error"] <= 0.5 for r in errors)  # half a step at most
    assert checkpoint_size_report(tmp_path)["quantized_ratio"] < 0.52


def plant_outlier(model, channel=7, factor=40.0):
    """Make one input channel of every q/k/v and gate/up 40x larger, without changing the function:
    the norm's weight grows, the consumers' columns shrink (an activation outlier, as LLMs have)."""
    with torch.no_grad():
        for layer in model.model.layers:
            for norm, linears in ((layer.input_layernorm, [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]),
                                  (layer.post_attention_layernorm, [layer.mlp.gate_proj, layer.mlp.up_proj])):
                norm.weight[channel] *= factor
                for m in linears:
                    m.weight[:, channel] /= factor


def logit_error(model, ids):
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        fq = fake_quant_model(model, "w8a8_int8", ["lm_head"])(input_ids=ids).logits
    return ((fq - dense) ** 2).mean().item()


def test_smoothquant_keeps_the_function_and_helps_int8_with_outliers():
    model = tiny()
    plant_outlier(model)
    ids = rows(2, 24, seed=7)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    plain = logit_error(model, ids)
    report = smooth_model(model, rows(), alpha=0.5)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-4, atol=1e-5)
    assert len(report) == 4 and all(r["outlier_ratio_after"] < r["outlier_ratio_before"] for r in report)
    assert logit_error(model, ids) < 0.5 * plain


def test_group_size_that_does_not_divide_is_refused_with_the_fix():
    model = tiny(hidden=192)  # 192 = 1.5 x 128
    qscheme, _ = check_request(model, "w4a16", ["lm_head"])
    assert qscheme.weights.group_size == 64  # auto: the largest of 128 / 64 / 32 that divides 192 and 256
    with pytest.raises(QuantError, match=r"group_size=128 does not divide .*in=192.*group_size=auto"):
        check_request(model, "w4a16", ["lm_head"], group_size=128)
