"""FP8 report: dequantized weights and their error vs direct formulas, bytes on disk,
and the fake-quantized model's weights and activations vs a hand-written quantizer."""

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from slm_cli.quant.schemes import quantize_model, save_quantized
from slm_cli.quant.report import (
    checkpoint_size_report,
    compare_reload,
    dequantize_weight,
    fake_quant_model,
    weight_error_report,
)

FP8_MAX = 448.0
BLOCK_IGNORE = ["lm_head", r"re:.*\.(k_proj|v_proj)$"]


def tiny_config(**kw):
    return LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, **kw,
    )


def load(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


def calib_batches(n=2):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (2, 16), generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("src")
    LlamaForCausalLM(tiny_config()).to(torch.bfloat16).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def fp8_dirs(source_dir, tmp_path_factory):
    dirs = {}
    for scheme, ignore in [("fp8_dynamic", None), ("fp8_static", None), ("fp8_block", BLOCK_IGNORE)]:
        out = tmp_path_factory.mktemp(scheme)
        batches = calib_batches() if scheme == "fp8_static" else None
        save_quantized(quantize_model(load(source_dir), scheme, ignore, batches), None, out)
        dirs[scheme] = out
    return dirs


def qdq(x, scale):
    """Hand-written FP8 E4M3 quantize→dequantize: clamp to ±448 in scale units, round."""
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(x.dtype) * scale


def test_dequantize_block_matches_a_loop_over_tiles():
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(5, 7, generator=g) * 50).to(torch.float8_e4m3fn)
    scale = torch.rand(3, 3, generator=g) + 0.5  # tiles of 2x3 cover 6x9, cropped to 5x7
    want = torch.empty(5, 7)
    for i in range(5):
        for j in range(7):
            want[i, j] = q[i, j].float() * scale[i // 2, j // 3]
    torch.testing.assert_close(dequantize_weight(q, scale, (2, 3)), want, rtol=0, atol=0)


@pytest.mark.parametrize("scheme", ["fp8_dynamic", "fp8_static", "fp8_block"])
def test_weight_error_within_fp8_rounding(scheme, source_dir, fp8_dirs):
    rows = weight_error_report(source_dir, fp8_dirs[scheme])
    assert len(rows) == (10 if scheme == "fp8_block" else 14)
    # 3 mantissa bits: round-to-nearest is within 2^-4 relative for normal numbers; the
    # division by a bf16 scale adds at most another 2^-8 of slack
    for row in rows:
        assert 0 < row["max_rel_error"] <= 2**-4 + 2**-8, row
        assert 0.005 < row["mean_rel_error"] < 2**-4, row
    # mean_rel_error against the formula for one layer, read straight from the files
    with safe_open(fp8_dirs[scheme] / "model.safetensors", framework="pt") as f:
        q = f.get_tensor("model.layers.1.mlp.up_proj.weight").float()
        s = f.get_tensor("model.layers.1.mlp.up_proj.weight_scale").float()
    with safe_open(source_dir / "model.safetensors", framework="pt") as f:
        w = f.get_tensor("model.layers.1.mlp.up_proj.weight").float()
    if scheme == "fp8_block":  # (256, 128) weight, (2, 1) scales of 128x128 tiles
        s = s.repeat_interleave(128, 0).repeat_interleave(128, 1)
    w_hat = q * s
    want = ((w_hat - w).abs().sum() / w.abs().sum()).item()
    got = next(r for r in rows if r["name"] == "model.layers.1.mlp.up_proj")["mean_rel_error"]
    assert got == pytest.approx(want, rel=1e-5)


def test_dequantized_weights_are_what_transformers_reloads(fp8_dirs):
    reloaded = load(fp8_dirs["fp8_block"])
    with torch.no_grad():
        reloaded(torch.zeros(1, 2, dtype=torch.long))  # first forward decompresses
    with safe_open(fp8_dirs["fp8_block"] / "model.safetensors", framework="pt") as f:
        q = f.get_tensor("model.layers.0.mlp.down_proj.weight")
        s = f.get_tensor("model.layers.0.mlp.down_proj.weight_scale")
    ours = dequantize_weight(q, s).to(torch.bfloat16)
    assert torch.equal(ours, reloaded.model.layers[0].mlp.down_proj.weight)


def test_size_on_disk(source_dir, fp8_dirs):
    size = checkpoint_size_report(fp8_dirs["fp8_dynamic"], source_dir)
    # per layer: out*in fp8 bytes + out bf16 scales, against out*in bf16 bytes
    shapes = [(128, 128), (64, 128), (64, 128), (128, 128), (256, 128), (256, 128), (128, 256)] * 2
    assert size["quantized_bytes"] == sum(o * i + 2 * o for o, i in shapes)
    assert size["quantized_bf16_bytes"] == sum(2 * o * i for o, i in shapes)
    assert size["quantized_ratio"] <= 0.55
    # embeddings and lm_head (2 x 256x128) stay bf16, so the whole file shrinks less
    assert 0.55 < size["total_ratio"] < 0.8
    assert size["total_bytes"] == (fp8_dirs["fp8_dynamic"] / "model.safetensors").stat().st_size
    block = checkpoint_size_report(fp8_dirs["fp8_block"])
    assert block["quantized_ratio"] == pytest.approx(0.5, abs=0.001)  # one scale per 16k weights


@pytest.mark.parametrize("scheme", ["fp8_dynamic", "fp8_static", "fp8_block", "fp8_weight_only"])
def test_fake_quant_model_matches_hand_written_quantizer(scheme):
    torch.manual_seed(0)
    source = LlamaForCausalLM(tiny_config()).eval()
    ignore = BLOCK_IGNORE if scheme == "fp8_block" else None
    batches = calib_batches() if scheme == "fp8_static" else None
    fq = fake_quant_model(source, scheme, ignore, batches)
    assert not hasattr(source.model.layers[0].mlp.up_proj, "quantization_scheme")  # a copy

    w = source.model.layers[0].mlp.up_proj.weight.detach()  # (256, 128)
    layer = fq.model.layers[0].mlp.up_proj
    if scheme == "fp8_static":
        w_scale = w.abs().max() / FP8_MAX
    elif scheme == "fp8_block":
        w_scale = (w.abs().reshape(2, 128, 1, 128).amax(dim=(1, 3)) / FP8_MAX).repeat_interleave(128, 0)
    else:
        w_scale = w.abs().amax(dim=1, keepdim=True) / FP8_MAX
    torch.testing.assert_close(layer.weight.detach(), qdq(w, w_scale), rtol=1e-6, atol=0)

    x = torch.randn(2, 5, 128)
    if scheme == "fp8_dynamic":
        x_hat = qdq(x, x.abs().amax(dim=-1, keepdim=True) / FP8_MAX)  # per token
    elif scheme == "fp8_block":
        groups = x.unflatten(-1, (1, 128))  # per token, per group of 128 channels
        x_hat = qdq(groups, groups.abs().amax(dim=-1, keepdim=True) / FP8_MAX).flatten(-2)
    elif scheme == "fp8_static":
        x_hat = qdq(x, layer.input_scale)  # calibrated, fixed
    else:
        x_hat = x  # weight-only: activations untouched
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x_hat, layer.weight), rtol=1e-5, atol=1e-6)


def test_compare_reload_reports_the_gap(source_dir, fp8_dirs):
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(3))
    reference = fake_quant_model(load(source_dir), "fp8_dynamic")
    same = compare_reload(fp8_dirs["fp8_dynamic"], reference, ids)
    assert same["max_abs_logit_gap"] == 0.0
    assert same["reloaded_weight_dtype"] == "bfloat16"
    assert same["same_argmax_fraction"] == 1.0
    dense = compare_reload(fp8_dirs["fp8_dynamic"], load(source_dir), ids)
    assert 0 < dense["rel_logit_gap"] < 0.2


def test_fake_quant_with_storage_dtype_computes_what_the_fp32_source_checkpoint_computes(tmp_path):
    """An fp32 source saved with bf16 embeddings/norms: only the storage-rounded fake model matches the reload."""
    torch.manual_seed(0)
    source = LlamaForCausalLM(tiny_config()).eval()
    out = tmp_path / "fp8"
    copy = LlamaForCausalLM(tiny_config()).eval()
    copy.load_state_dict(source.state_dict())
    save_quantized(quantize_model(copy, "fp8_dynamic"), None, out)  # unquantized tensors stored as bf16
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(3))
    rounded = compare_reload(out, fake_quant_model(source, "fp8_dynamic", storage_dtype=torch.bfloat16), ids, torch.float32)
    full = compare_reload(out, fake_quant_model(source, "fp8_dynamic"), ids, torch.float32)
    assert rounded["reloaded_weight_dtype"] == "float32"
    assert rounded["max_abs_logit_gap"] < 1e-5 < full["max_abs_logit_gap"]
