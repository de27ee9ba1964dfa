"""GPTQ (slm_cli.quant.gptq): a planted problem, grid exactness against compressed-tensors, a tiny Llama."""

import copy

import pytest
import torch
from compressed_tensors.quantization import preset_name_to_scheme
from compressed_tensors.quantization.lifecycle.forward import dequantize, fake_quantize, quantize
from compressed_tensors.quantization.utils import calculate_qparams
from transformers import LlamaConfig, LlamaForCausalLM

from slm_cli.quant.gptq import gptq_model, gptq_quantize, layer_error, rtn_quantize

ARGS = preset_name_to_scheme("W4A16", ["Linear"]).weights


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def planted(out=64, d=256, n=2048, seed=0):
    """W random; inputs X = Z A with a random mixing A and a few high-variance directions in Z."""
    g = torch.Generator().manual_seed(seed)
    spread = torch.ones(d)
    spread[:8] = 10.0
    Z = torch.randn(n, d, generator=g) * spread
    X = Z @ (torch.randn(d, d, generator=g) / d ** 0.5)
    return torch.randn(out, d, generator=g), X.T @ X


def integers(W_hat, scale, zero_point):
    """compressed-tensors' own integers for W_hat with the given qparams (what the packer stores)."""
    return quantize(W_hat, scale, zero_point, ARGS, dtype=torch.int8)


def assert_on_grid(W_hat, scale, zero_point):
    q = integers(W_hat, scale, zero_point)
    assert int(q.min()) >= -8 and int(q.max()) <= 7
    assert torch.equal(dequantize(q, scale, zero_point, ARGS, dtype=W_hat.dtype), W_hat)
    assert torch.equal(fake_quantize(W_hat, scale, zero_point, ARGS), W_hat)


def test_scheme_is_symmetric_int4_groups_of_128():
    assert (ARGS.num_bits, ARGS.type, ARGS.symmetric, ARGS.strategy, ARGS.group_size) == (4, "int", True, "group", 128)


def test_gptq_beats_rtn_on_correlated_inputs():
    W, H = planted()
    e_rtn = layer_error(W, rtn_quantize(W, ARGS)[0], H)
    e_gptq = layer_error(W, gptq_quantize(W, H, ARGS)[0], H)
    # measured: rtn 0.0137, gptq 0.0021 (ratio 0.16)
    assert 0 < e_rtn < 0.05
    assert 0 < e_gptq <= 0.3 * e_rtn


def test_gptq_output_sits_on_the_compressed_tensors_grid():
    W, H = planted()
    W_hat, scale, zero_point = gptq_quantize(W, H, ARGS)
    assert W_hat.shape == W.shape and W_hat.dtype == W.dtype
    assert scale.shape == zero_point.shape == (64, 2)
    assert torch.all(zero_point == 0) and torch.all(scale > 0)
    assert_on_grid(W_hat, scale, zero_point)
    # some rows use both ends of the int4 range (the absmax of a group maps to -8 or 7 after the update)
    q = integers(W_hat, scale, zero_point)
    assert int(q.min()) == -8 and int(q.max()) == 7


def test_rtn_matches_compressed_tensors_fake_quantization():
    W, _ = planted(seed=1)
    groups = W.reshape(64, 2, 128)
    scale, zero_point = calculate_qparams(groups.amin(-1), groups.amax(-1), ARGS)
    W_hat, s, z = rtn_quantize(W, ARGS)
    assert torch.equal(s, scale) and torch.equal(z, zero_point)
    assert torch.allclose(scale, groups.abs().amax(-1) / 7.5)
    assert torch.equal(W_hat, fake_quantize(W, scale, zero_point, ARGS))


def test_identity_hessian_reduces_to_rtn():
    # H = I (damped or not) has a diagonal inverse factor: no error is propagated to later columns,
    # so every group's scale is computed from the original weights and GPTQ is exactly RTN
    W, _ = planted(seed=2)
    W_rtn, s_rtn, z_rtn = rtn_quantize(W, ARGS)
    W_hat, s, z = gptq_quantize(W, torch.eye(256), ARGS, damp=0.01)
    assert torch.equal(W_hat, W_rtn) and torch.equal(s, s_rtn) and torch.equal(z, z_rtn)


def test_block_size_not_aligned_with_groups_and_act_order():
    W, H = planted(seed=3)
    e_rtn = layer_error(W, rtn_quantize(W, ARGS)[0], H)
    W_ref, s_ref, z_ref = gptq_quantize(W, H, ARGS)
    # blocks of 48 straddle the group boundary at 128: the second group's scale is taken from weights
    # still owed part of the block's lazy update; the result is the same up to float32 summation order
    W_48, s_48, z_48 = gptq_quantize(W, H, ARGS, block_size=48)
    assert_on_grid(W_48, s_48, z_48)
    assert torch.allclose(s_48, s_ref, rtol=1e-5, atol=0)
    assert (integers(W_48, s_48, z_48) != integers(W_ref, s_ref, z_ref)).float().mean() < 0.001
    assert layer_error(W, W_48, H) == pytest.approx(layer_error(W, W_ref, H), rel=1e-4)
    W_ao, s_ao, z_ao = gptq_quantize(W, H, ARGS, act_order=True)
    assert_on_grid(W_ao, s_ao, z_ao)
    # act_order's scales are the RTN ones (static groups from the original weights)
    assert torch.equal(s_ao, rtn_quantize(W, ARGS)[1])
    assert layer_error(W, W_ao, H) <= 0.3 * e_rtn


def test_dead_inputs_get_zero_weights():
    W, H = planted(seed=4)
    H[5, :] = 0
    H[:, 5] = 0
    W_hat, scale, zero_point = gptq_quantize(W, H, ARGS)
    assert torch.all(W_hat[:, 5] == 0)
    assert_on_grid(W_hat, scale, zero_point)
    assert layer_error(W, W_hat, H) < layer_error(W, rtn_quantize(W, ARGS)[0], H)


def test_bf16_weights_stay_exact_on_their_bf16_grid():
    W, H = planted(seed=5)
    W = W.bfloat16()
    for W_hat, scale, zero_point in (gptq_quantize(W, H, ARGS), rtn_quantize(W, ARGS)):
        assert W_hat.dtype == scale.dtype == torch.bfloat16
        # the bf16 checkpoint path: integers from bf16 weight and bf16 scale, dequantized in bf16
        assert_on_grid(W_hat, scale, zero_point)
        assert torch.equal(integers(W_hat, scale, zero_point), integers(W_hat.float(), scale.float(), zero_point))


def test_gptq_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple of group_size"):
        rtn_quantize(torch.randn(4, 200), ARGS)
    with pytest.raises(ValueError, match="H has shape"):
        gptq_quantize(torch.randn(4, 256), torch.eye(128), ARGS)


def tiny_llama(tie=True):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, tie_word_embeddings=tie)
    return LlamaForCausalLM(config).float().eval()


def token_batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (2, 32), generator=g) for _ in range(n)]


def test_gptq_model_on_a_tiny_llama(monkeypatch):
    import slm_cli.quant.gptq as gptq

    grams, collect = [], gptq.layer_input_stats

    def counting(layer, module, *args, **kwargs):
        grams.append(module)
        return collect(layer, module, *args, **kwargs)

    monkeypatch.setattr(gptq, "layer_input_stats", counting)
    model = tiny_llama(tie=False)
    dense = copy.deepcopy(model)
    rtn = copy.deepcopy(model)
    calib, held_out = token_batches(4, seed=1), token_batches(1, seed=2)[0]
    seen = []
    results = gptq_model(model, calib, ARGS, ["lm_head"], progress=lambda done, total: seen.append((done, total)))
    rtn_results = gptq_model(rtn, calib, ARGS, ["lm_head"], method="rtn")
    assert seen == [(1, 2), (2, 2)]
    # one Gram per distinct input: q/k/v share one, gate/up share one (4 per layer, 8 in all, twice)
    layer0 = model.model.layers[0]
    assert grams[:4] == [layer0.self_attn.q_proj, layer0.self_attn.o_proj, layer0.mlp.gate_proj, layer0.mlp.down_proj]
    assert len(grams) == 16
    names = [r["name"] for r in results]
    assert len(names) == 14 and "model.layers.0.self_attn.q_proj" in names and "model.layers.1.mlp.down_proj" in names
    modules = dict(model.named_modules())
    for r in results:
        W_hat = modules[r["name"]].weight
        assert_on_grid(W_hat, r["scale"], r["zero_point"])
        assert r["scale"].shape == (W_hat.shape[0], W_hat.shape[1] // 128)
        assert 0 < r["error_gptq"] <= r["error_rtn"] and r["error"] == r["error_gptq"]
    assert all(r["error_gptq"] is None for r in rtn_results)
    assert torch.equal(model.lm_head.weight, dense.lm_head.weight)
    assert torch.equal(model.model.embed_tokens.weight, dense.model.embed_tokens.weight)
    with torch.no_grad():
        ref = dense(held_out).logits
        err_gptq = float(((model(held_out).logits - ref) ** 2).mean())
        err_rtn = float(((rtn(held_out).logits - ref) ** 2).mean())
    assert 0 < err_gptq < err_rtn


def test_gptq_model_rejects_a_targeted_linear_outside_the_decoder_layers():
    model = tiny_llama(tie=False)
    before = model.model.layers[0].self_attn.q_proj.weight.clone()
    with pytest.raises(ValueError, match="lm_head"):
        gptq_model(model, token_batches(1, seed=1), ARGS, [])
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, before)


def test_gptq_model_keeps_bf16_weights_on_their_grid():
    model = tiny_llama().bfloat16()
    batches = [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in token_batches(2, seed=3)]
    results = gptq_model(model, batches, ARGS, ["lm_head"])
    modules = dict(model.named_modules())
    for r in results:
        W_hat = modules[r["name"]].weight
        assert W_hat.dtype == r["scale"].dtype == torch.bfloat16
        assert_on_grid(W_hat, r["scale"], r["zero_point"])
        assert r["error_gptq"] <= r["error_rtn"]
