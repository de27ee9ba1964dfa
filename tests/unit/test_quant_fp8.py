"""FP8 quantization into compressed-tensors: scales vs the absmax formula, a saved
round trip per scheme (files, config.json, reload through transformers), ignore rules,
and the errors a user gets before anything is written."""

import json

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from slm_cli.quant.checks import CheckpointError, quantization_table, validate_checkpoint
from slm_cli.quant.schemes import SCHEMES, QuantError, get_scheme, quantize_model, save_quantized, weight_qparams
from slm_cli.quant.report import fake_quant_model

FP8_MAX = 448.0
# k_proj / v_proj are (64, 128) with 2 KV heads: not 128-divisible, so fp8_block skips them
BLOCK_IGNORE = ["lm_head", r"re:.*\.(k_proj|v_proj)$"]


def tiny_config(hidden=128, **kw):
    return LlamaConfig(
        hidden_size=hidden, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, **kw,
    )


def tiny_tokenizer():
    vocab = {f"w{i}": i for i in range(255)} | {"<unk>": 255}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("src")
    LlamaForCausalLM(tiny_config()).to(torch.bfloat16).save_pretrained(path)
    return path


def calib_batches(n=3):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (2, 16), generator=g) for _ in range(n)]


def load(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


def test_weight_scales_follow_absmax_over_448():
    torch.manual_seed(0)
    w = torch.randn(256, 384)
    for name, want in [
        ("fp8_dynamic", w.abs().amax(dim=1, keepdim=True) / FP8_MAX),
        ("fp8_static", w.abs().max().reshape(1) / FP8_MAX),
        ("fp8_block", w.abs().reshape(2, 128, 3, 128).amax(dim=(1, 3)) / FP8_MAX),
    ]:
        scale, zero_point = weight_qparams(w, get_scheme(name).weights)
        assert scale.shape == want.shape, name
        torch.testing.assert_close(scale, want, rtol=1e-6, atol=0)
        assert torch.all(zero_point.float() == 0)


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_round_trip(scheme, source_dir, tmp_path):
    ignore = BLOCK_IGNORE if scheme == "fp8_block" else None
    batches = calib_batches() if scheme == "fp8_static" else None
    out = tmp_path / "fp8"
    model = quantize_model(load(source_dir), scheme, ignore, batches)
    save_quantized(model, tiny_tokenizer(), out)

    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    formats = {"fp8_weight_only": "naive-quantized", "w8a8_int8": "int-quantized", "w4a16": "pack-quantized"}
    assert qc["format"] == formats.get(scheme, "float-quantized")
    assert qc["config_groups"]["group_0"]["targets"] == ["Linear"]
    assert "lm_head" in qc["ignore"]
    assert (out / "tokenizer.json").is_file()

    with safe_open(out / "model.safetensors", framework="pt") as f:
        q = f.get_tensor("model.layers.0.self_attn.q_proj." + ("weight_packed" if scheme == "w4a16" else "weight"))
        scale = f.get_tensor("model.layers.0.self_attn.q_proj.weight_scale")
        down_scale = f.get_tensor("model.layers.0.mlp.down_proj.weight_scale")
        keys = set(f.keys())
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
    assert q.dtype == {"w8a8_int8": torch.int8, "w4a16": torch.int32}.get(scheme, torch.float8_e4m3fn)
    assert tuple(q.shape) == ((128, 16) if scheme == "w4a16" else (128, 128))  # eight int4 per int32
    want_scale = {"fp8_dynamic": (128, 1), "fp8_weight_only": (128, 1), "fp8_static": (1,), "fp8_block": (1, 1),
                  "w8a8_int8": (128, 1), "w4a16": (128, 1)}
    want_down = {"fp8_dynamic": (128, 1), "fp8_weight_only": (128, 1), "fp8_static": (1,), "fp8_block": (1, 2),
                 "w8a8_int8": (128, 1), "w4a16": (128, 2)}  # w4a16: groups of 128 of down_proj's 256 inputs
    assert tuple(scale.shape) == want_scale[scheme]
    assert tuple(down_scale.shape) == want_down[scheme]
    assert ("model.layers.0.self_attn.q_proj.input_scale" in keys) == (scheme == "fp8_static")
    assert not any(k.endswith("zero_point") for k in keys)

    report = validate_checkpoint(out, scheme, source_dtype=torch.bfloat16)
    assert "lm_head" in report["ignored"]
    assert len(report["quantized"]) == (10 if scheme == "fp8_block" else 14)

    # Reload through transformers (CPU): quantized weights are decompressed to bf16 on the
    # first forward, activations stay fake-quantized. Both sides are bf16 models loaded
    # with from_pretrained, run the same ops, so the logits agree exactly.
    reloaded = load(out)
    reference = fake_quant_model(load(source_dir), scheme, ignore, batches)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got, want = reloaded(ids).logits, reference(ids).logits
        dense = load(source_dir)(ids).logits
    assert reloaded.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # and quantization moved the logits, but not by much (16 levels per group of a random init: more)
    gap = (got.float() - dense.float()).abs().max().item()
    assert 0 < gap < (0.4 if scheme == "w4a16" else 0.2) * dense.float().abs().max().item()


def test_ignore_by_name_and_regex(source_dir, tmp_path):
    ignore = ["lm_head", r"re:.*\.mlp\.down_proj$"]
    model = quantize_model(load(source_dir), "fp8_dynamic", ignore)
    rows = {r["name"]: r for r in quantization_table(model)}
    assert not rows["lm_head"]["quantized"]
    assert not rows["model.layers.1.mlp.down_proj"]["quantized"]
    assert rows["model.layers.1.mlp.up_proj"]["quantized"]
    assert rows["model.layers.1.mlp.up_proj"]["scale_shape"] == (256, 1)

    out = tmp_path / "fp8"
    save_quantized(model, None, out)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert set(qc["ignore"]) == {"lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert f.get_tensor("model.layers.0.mlp.down_proj.weight").dtype == torch.bfloat16
        assert "model.layers.0.mlp.down_proj.weight_scale" not in set(f.keys())
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight").dtype == torch.float8_e4m3fn
    disk = {r["name"]: r for r in quantization_table(out)}
    assert {n for n, r in disk.items() if not r["quantized"]} == set(qc["ignore"])
    validate_checkpoint(out, "fp8_dynamic", source_dtype=torch.bfloat16)


def _untouched(model):
    return not any(hasattr(m, "quantization_scheme") for m in model.modules())


def test_bad_scheme_name_is_a_clear_error(tmp_path):
    model = LlamaForCausalLM(tiny_config())
    with pytest.raises(ValueError, match=r"fp8_int4.*fp8_block.*fp8_dynamic"):
        quantize_model(model, "fp8_int4")
    assert _untouched(model)
    with pytest.raises(ValueError, match="fp8_int4"):
        validate_checkpoint(tmp_path, "fp8_int4")


def test_block_shapes_must_divide_by_128_before_any_work(tmp_path):
    model = LlamaForCausalLM(tiny_config(hidden=96))
    with pytest.raises(QuantError) as err:
        quantize_model(model, "fp8_block")
    msg = str(err.value)
    assert "model.layers.0.self_attn.q_proj (out=96, in=96)" in msg
    assert "model.layers.1.mlp.down_proj (out=96, in=256)" in msg
    assert "quant.ignore" in msg
    assert _untouched(model)
    with pytest.raises(QuantError, match="call quantize_model first"):
        save_quantized(model, None, tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_other_bad_requests_fail_before_touching_the_model():
    model = LlamaForCausalLM(tiny_config())
    with pytest.raises(QuantError, match="calibration"):
        quantize_model(model, "fp8_static")
    with pytest.raises(QuantError, match=r"'re:.*mlpp' matches no module"):
        quantize_model(model, "fp8_dynamic", ["lm_head", "re:.*mlpp"])
    with pytest.raises(QuantError, match="leaves no Linear"):
        quantize_model(model, "fp8_dynamic", ["re:.*"])
    tied = LlamaForCausalLM(tiny_config(tie_word_embeddings=True))
    with pytest.raises(QuantError, match="tie_word_embeddings"):
        quantize_model(tied, "fp8_dynamic", [])
    assert _untouched(model) and _untouched(tied)


def test_static_input_scale_is_calibrated_absmax(source_dir):
    model = load(source_dir)
    seen = []
    handle = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].float().abs().max())
    )
    with torch.no_grad():
        for batch in calib_batches():
            model(batch)
    handle.remove()
    quantize_model(model, "fp8_static", calib_batches=calib_batches())
    got = model.model.layers[0].mlp.down_proj.input_scale.float()
    torch.testing.assert_close(got, (max(seen) / FP8_MAX).reshape(1), rtol=1e-2, atol=0)


def test_fp32_model_saves_unquantized_tensors_in_source_dtype(tmp_path):
    torch.manual_seed(0)
    model = quantize_model(LlamaForCausalLM(tiny_config()), "fp8_dynamic")
    save_quantized(model, None, tmp_path / "fp8", source_dtype=torch.bfloat16)
    with safe_open(tmp_path / "fp8" / "model.safetensors", framework="pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
        assert f.get_tensor("model.layers.0.input_layernorm.weight").dtype == torch.bfloat16
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.float8_e4m3fn
        # scales keep the precision they were computed in
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight_scale").dtype == torch.float32
    assert json.loads((tmp_path / "fp8" / "config.json").read_text())["dtype"] == "bfloat16"
    validate_checkpoint(tmp_path / "fp8", "fp8_dynamic", source_dtype=torch.bfloat16)


def test_validate_lists_every_problem(source_dir, tmp_path):
    out = tmp_path / "fp8"
    save_quantized(quantize_model(load(source_dir), "fp8_dynamic"), None, out)
    with pytest.raises(CheckpointError) as err:
        validate_checkpoint(out, "fp8_static")
    msg = str(err.value)
    assert "weights.strategy is 'channel', expected 'tensor'" in msg
    assert "model.layers.1.mlp.up_proj.input_scale is missing" in msg
    assert "model.layers.0.self_attn.k_proj.weight_scale has shape (64, 1), fp8_static expects (1,)" in msg

    # drop one scale and un-set the format, as a hand-edited checkpoint might
    from safetensors.torch import load_file, save_file

    tensors = load_file(out / "model.safetensors")
    del tensors["model.layers.1.self_attn.o_proj.weight_scale"]
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["format"] = "dense"
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as err:
        validate_checkpoint(out, "fp8_dynamic")
    msg = str(err.value)
    assert "2 problem(s)" in msg
    assert "model.layers.1.self_attn.o_proj.weight_scale is missing" in msg
    assert "format is 'dense', expected 'float-quantized'" in msg


def test_config_schema_lists_exactly_the_library_schemes():
    from slm_cli.config.schema import QUANT_SCHEMES

    assert set(QUANT_SCHEMES) == set(SCHEMES)


def test_check_fp8_request_refuses_without_touching_the_model():
    from slm_cli.quant.schemes import check_request

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(QuantError, match=r"k_proj \(out=64, in=128\)"):
        check_request(model, "fp8_block", ["lm_head"])
    with pytest.raises(QuantError, match="needs calibration"):
        check_request(model, "fp8_static")
    scheme, ignore = check_request(model, "fp8_block", BLOCK_IGNORE)
    assert scheme.weights.block_structure == [128, 128] and ignore == BLOCK_IGNORE
    assert not any(hasattr(m, "quantization_scheme") for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
