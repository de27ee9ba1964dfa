"""`slm quantize` end to end on a tiny Llama artifact: the real CLI, real FP8 / INT8 / INT4 checkpoints
read back from disk, their config.json and tensors as vLLM reads them, and the measured numbers."""

import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from slm_cli import artifacts
from slm_cli.data import load_splits
from slm_cli.data.corpus import load_corpus
from slm_cli.data.tokenizer import train_bpe_tokenizer
from slm_cli.evaluate.perplexity import perplexity
from tests.stages.helpers import meta

# hidden 128 so q/o/gate/up/down divide into 128x128 tiles; k/v are (64, 128) and do not
BLOCK_IGNORE = "quant.ignore=[lm_head,'re:.*\\.(k_proj|v_proj)$']"
# the source records no task data: name the text, so these tests measure FP8, not the fallback
FAST = ["calibration.source=shakespeare", "eval.source=shakespeare", "eval.max_tokens=384", "eval.window=128",
        "eval.stride=64", "calibration.samples=4", "calibration.seq_len=64"]
SCALE_SHAPES = {"fp8_dynamic": (128, 1), "fp8_weight_only": (128, 1), "fp8_static": (1,), "fp8_block": (1, 1)}
# compressed-tensors picks the format: weight-only FP8 has no activation scheme, so it is "naive-quantized"
FORMAT = {"fp8_dynamic": "float-quantized", "fp8_static": "float-quantized", "fp8_weight_only": "naive-quantized",
          "fp8_block": "float-quantized"}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A 2-layer Llama artifact with a BPE tokenizer trained on Shakespeare, and a parent it records."""
    root = tmp_path_factory.mktemp("quantize-src")
    texts = [r["text"] for r in load_splits("shakespeare", train_size=100, val_size=1, test_size=1)["train"]]
    tok = train_bpe_tokenizer(texts, vocab_size=512)
    config = LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
    )
    parent, src = root / "parent", root / "source"
    for i, folder in enumerate((parent, src)):
        torch.manual_seed(i)
        LlamaForCausalLM(config).save_pretrained(folder)
        tok.save_pretrained(folder)
    artifacts.write_metadata(parent, stage="teacher", config={}, parents=[], metrics={})
    artifacts.write_metadata(src, stage="student", config={}, parents=[artifacts.parent("teacher", parent)], metrics={})
    return src


def tensors(folder) -> dict:
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("scheme", list(SCALE_SHAPES))
def test_scheme_round_trip(slm, tmp_path, source, scheme):
    out = tmp_path / "fp8"
    extra = [BLOCK_IGNORE] if scheme == "fp8_block" else []
    assert slm("quantize", f"model.name_or_path={source}", f"quant={scheme}", *extra, *FAST, f"output_dir={out}") == 0
    assert not (tmp_path / "fp8.work").exists()

    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == FORMAT[scheme]
    assert "lm_head" in qc["ignore"]
    group = qc["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"] and group["weights"]["type"] == "float" and group["weights"]["num_bits"] == 8
    assert (group["input_activations"] is None) == (scheme == "fp8_weight_only")

    t = tensors(out)
    q = "model.layers.0.self_attn.q_proj"
    assert t[f"{q}.weight"].dtype == torch.float8_e4m3fn
    assert tuple(t[f"{q}.weight_scale"].shape) == SCALE_SHAPES[scheme]
    assert (f"{q}.input_scale" in t) == (scheme == "fp8_static")
    assert t["model.embed_tokens.weight"].dtype == torch.bfloat16  # unquantized tensors in the save dtype
    if scheme == "fp8_block":
        assert t["model.layers.0.self_attn.k_proj.weight"].dtype == torch.bfloat16

    m = meta(out)
    assert m["stage"] == "quantize"
    (parent,) = m["parents"]
    assert parent["role"] == "source" and parent["hash"] == artifacts.content_hash(source) and parent["stage"] == "student"
    metrics = m["metrics"]
    assert metrics["scheme"] == scheme and metrics["eval_path"] == "reload"
    assert math.isfinite(metrics["perplexity_fp8"]) and abs(metrics["perplexity_increase_pct"]) < 1.0
    assert metrics["quantized_ratio"] < 0.55 and metrics["total_bytes"] < metrics["total_bf16_bytes"]
    assert 0 < metrics["max_rel_weight_error"] <= 2.0**-4  # round-to-nearest with 3 mantissa bits
    # rows read: fp8_static's scales and the default quant.keep_sensitive=auto's choice both use calibration text
    assert metrics["calibration_rows"] == (4 if scheme == "fp8_static" or "kept_bf16" in metrics else 0)
    assert metrics["calibration_rows"] == m["calibration"]["rows"] if "calibration" in m else metrics["calibration_rows"] == 0
    report = json.loads((out / "quantization.json").read_text())
    rows = {r["name"]: r for r in report["layers"]}
    assert rows[q]["quantized"] and rows[q]["max_rel_error"] <= 2.0**-4 and not rows["lm_head"]["quantized"]

    # transformers loads it back through compressed-tensors and it computes
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out)
    logits = model(input_ids=torch.tensor([tok("To be, or not to be")["input_ids"]])).logits
    assert torch.isfinite(logits).all()
    if scheme == "fp8_dynamic":
        # the recorded perplexity is that of the saved checkpoint, recomputed here independently
        text = load_corpus("shakespeare", "test")  # the stored split, as slm eval scores it
        got = perplexity(model, tok, text, window=128, stride=64, max_tokens=384)
        assert got["perplexity"] == pytest.approx(metrics["perplexity_fp8"], rel=1e-5)
        assert metrics["eval_tokens"] == got["tokens"] == 383


@pytest.mark.parametrize("scheme,extra", [
    ("w8a8_int8", ["quant.smoothing_strength=0.5"]),
    ("w4a16", []),  # GPTQ, group size auto (128 here)
    ("w4a16", ["quant.rounding=rtn", "quant.group_size=64"]),
    ("w4a16", ["quant.gptq_act_order=true"]),
])
def test_integer_schemes_end_to_end(slm, tmp_path, source, scheme, extra):
    out = tmp_path / "int"
    assert slm("quantize", f"model.name_or_path={source}", f"quant={scheme}", *extra, *FAST, f"output_dir={out}") == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    weights = qc["config_groups"]["group_0"]["weights"]
    assert qc["format"] == ("int-quantized" if scheme == "w8a8_int8" else "pack-quantized")
    assert weights["type"] == "int" and weights["num_bits"] == (8 if scheme == "w8a8_int8" else 4)
    t = tensors(out)
    q = "model.layers.0.self_attn.q_proj"
    metrics = meta(out)["metrics"]
    if scheme == "w8a8_int8":
        assert t[f"{q}.weight"].dtype == torch.int8 and tuple(t[f"{q}.weight_scale"].shape) == (128, 1)
        assert metrics["smoothing_strength"] == 0.5 and metrics["quantized_ratio"] < 0.52
        # measured against the smoothed float weights (SmoothQuant rescaled their columns): half a step at most
        assert 0 < metrics["max_rel_weight_error"] <= 0.5
    else:
        group = 64 if "quant.group_size=64" in extra else 128
        assert t[f"{q}.weight_packed"].dtype == torch.int32 and t[f"{q}.weight_shape"].tolist() == [128, 128]
        assert tuple(t[f"{q}.weight_scale"].shape) == (128, 128 // group) and t[f"{q}.weight_scale"].dtype == torch.bfloat16
        assert metrics["group_size"] == group and metrics["quantized_ratio"] < 0.27
        if "quant.rounding=rtn" not in extra:
            assert metrics["gptq_mean_error"] < metrics["rtn_mean_error"]
            report = json.loads((out / "quantization.json").read_text())
            assert len(report["gptq"]) == 14 and all(r["error_gptq"] <= r["error_rtn"] for r in report["gptq"])
    assert math.isfinite(metrics["perplexity_quantized"]) and "perplexity_fp8" not in metrics
    assert abs(metrics["perplexity_increase_pct"]) < (2.0 if scheme == "w8a8_int8" else 10.0)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


def test_ignore_respected_and_fake_quant_agrees(slm, tmp_path, source):
    reload, fake = tmp_path / "reload", tmp_path / "fake"
    ignore = "quant.ignore=[lm_head,'re:.*mlp\\.down_proj$']"
    assert slm("quantize", f"model.name_or_path={source}", ignore, *FAST, f"output_dir={reload}") == 0
    assert slm("quantize", f"model.name_or_path={source}", ignore, *FAST, "quant.fake_quant_eval=true", f"output_dir={fake}") == 0
    t = tensors(reload)
    for i in range(2):
        down = f"model.layers.{i}.mlp.down_proj"
        assert t[f"{down}.weight"].dtype == torch.bfloat16 and f"{down}.weight_scale" not in t
        assert t[f"model.layers.{i}.mlp.up_proj.weight"].dtype == torch.float8_e4m3fn
    a, b = meta(reload)["metrics"], meta(fake)["metrics"]
    assert sorted(a["ignored_layers"]) == ["lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert a["quantized_layers"] == 12
    assert b["eval_path"] == "fake_quant"
    # the in-memory fake-quantized model computes what the saved checkpoint computes
    assert b["perplexity_fp8"] == pytest.approx(a["perplexity_fp8"], rel=1e-4)
    assert b["perplexity_source"] == a["perplexity_source"]


def test_bad_requests_exit_2_and_write_nothing(slm, tmp_path, source, capsys):
    out = tmp_path / "fp8"
    assert slm("quantize", f"model.name_or_path={source}", "quant.scheme=fp8_e5m2", f"output_dir={out}") == 2
    err = capsys.readouterr().err
    assert "quant.scheme='fp8_e5m2'" in err and "fp8_block" in err
    assert slm("quantize", f"model.name_or_path={source}", "quant=fp8_block", *FAST, f"output_dir={out}") == 2
    err = capsys.readouterr().err
    assert "model.layers.0.self_attn.k_proj (out=64, in=128)" in err and "divisible by 128" in err
    assert slm("quantize", f"model.name_or_path={source}", "quant.ignore=[lm_head,mlp.nothing]", *FAST, f"output_dir={out}") == 2
    assert "'mlp.nothing' matches no module" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "fp8.work").exists()


def test_existing_output_refused(slm, tmp_path, source, capsys):
    out = tmp_path / "fp8"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    assert slm("quantize", f"model.name_or_path={source}", *FAST, f"output_dir={out}") == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_changed_parent_warns_but_runs(slm, tmp_path, source, capsys):
    parent = source.parent / "parent"
    cfg = parent / "generation_config.json"
    before = cfg.read_text()
    cfg.write_text(before.replace("{", '{\n  "edited": true,', 1))
    try:
        assert slm("quantize", f"model.name_or_path={source}", "eval.source=null", f"output_dir={tmp_path / 'fp8'}") == 0
    finally:
        cfg.write_text(before)
    out = capsys.readouterr().out
    assert "warning" in out and "changed since" in out and "parent" in out
    assert "perplexity_fp8" not in meta(tmp_path / "fp8")["metrics"]


def test_cfg_job_does_not_import_torch(tmp_path):
    code = (
        "import sys; from slm_cli.__main__ import main; "
        "main(['quantize', '--cfg', 'job', 'model.name_or_path=/models/x', 'quant=fp8_static']); "
        "assert 'torch' not in sys.modules, 'torch imported by --cfg job'"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "scheme: fp8_static" in proc.stdout and "model:\n  name_or_path: /models/x" in proc.stdout


def test_a_gguf_file_is_quantized_from_its_converted_folder(slm, tmp_path, source):
    """model.name_or_path may be a .gguf file (or a built-in name), as for every other stage."""
    from tests.unit.test_pretrained import write_llama_gguf

    path = tmp_path / "tiny.gguf"
    write_llama_gguf(AutoModelForCausalLM.from_pretrained(source), AutoTokenizer.from_pretrained(source), path)
    out = tmp_path / "fp8"
    assert slm("quantize", f"model.name_or_path={path}", *FAST, f"output_dir={out}") == 0
    m = meta(out)
    assert m["metrics"]["source_bytes"] > 0 and math.isfinite(m["metrics"]["perplexity_fp8"])
    assert m["parents"][0]["path"] != str(path) and "hash" in m["parents"][0]  # the converted folder, hashed
