"""quant.keep_sensitive=auto: `slm quantize` keeps the fewest Linear tensors in bf16 that meet
quant.max_ppl_increase on the calibration text, and says which and why.

The source is a tiny Llama trained for a few seconds on Shakespeare, with one planted FP8 outlier:
layer 0's MLP neuron 0 is switched off (its up_proj row is zero, so the float model never uses it)
and its down_proj column is made 10^8 times larger. The float model computes exactly what it did,
but in FP8 that column sets every row's scale of layer 0's down_proj, and the other weights of the
row fall below E4M3's smallest subnormal: quantizing that one tensor wrecks the MLP of layer 0 (the
one the model leans on most: zeroing it would multiply perplexity by 2.8).
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from slm_cli.data import load_splits
from slm_cli.data.text import calibration_rows
from slm_cli.data.tokenizer import train_bpe_tokenizer
from tests.stages.helpers import meta

OUTLIER = "model.layers.0.mlp.down_proj"
FAST = ["eval.max_tokens=256", "eval.window=128", "eval.stride=64", "calibration.samples=4",
        "calibration.seq_len=64", "calibration.batch_size=4", "quant.sensitivity_tokens=128"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8-auto")
    texts = [r["text"] for r in load_splits("shakespeare", train_size=200, val_size=1, test_size=1)["train"]]
    tok = train_bpe_tokenizer(texts, vocab_size=512)
    config = LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    ids = torch.tensor(tok("\n\n".join(texts), verbose=False)["input_ids"])
    n = (len(ids) - 1) // 64
    rows = ids[: n * 64].view(n, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(120):  # enough for a model that predicts better than chance: FP8 noise then hurts
        batch = rows[torch.randint(0, n, (16,))]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        mlp = model.model.layers[0].mlp
        mlp.up_proj.weight[0].zero_()
        mlp.down_proj.weight[:, 0] = 1e8 * mlp.down_proj.weight.abs().max()
    folder = root / "source"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    calib = root / "calib.txt"
    calib.write_text("\n\n".join(r["text"] for r in load_splits("shakespeare", train_size=40, val_size=40, test_size=1)["validation"]))
    return folder, calib


@torch.no_grad()
def calib_ppl(model, tok, calib) -> float:
    """Perplexity on the calibration rows the stage used (4 rows of 64 tokens, each its own sequence)."""
    rows = calibration_rows(calib.read_text(), tok, 4, 64)
    logits = model(input_ids=rows).logits[:, :-1].float()
    return math.exp(F.cross_entropy(logits.reshape(-1, logits.size(-1)), rows[:, 1:].reshape(-1)).item())


@pytest.mark.parametrize("scheme, method", [("fp8_dynamic", "fisher"), ("fp8_static", "fisher"), ("fp8_dynamic", "kl")])
def test_auto_keeps_the_outlier_tensor_and_meets_the_budget(slm, tmp_path, source, scheme, method):
    folder, calib = source
    out = tmp_path / "fp8"
    assert slm("quantize", f"model.name_or_path={folder}", f"quant={scheme}", f"quant.sensitivity={method}", f"calibration.source={calib}",
               f"eval.source={calib}", *FAST, "quant.max_ppl_increase=0.01", "quant.max_keep_fraction=0.25",
               f"output_dir={out}") == 0
    m = meta(out)
    sel, metrics = m["keep_sensitive"], m["metrics"]
    # quantizing everything breaks the budget; keeping the planted tensor (first in line) meets it
    assert sel["rounds"][0]["kept"] == 0 and sel["rounds"][0]["ppl_increase"] > 0.05
    assert sel["sensitivity_method"] == method
    assert sel["kept"][0] == OUTLIER and sel["met"] is True and sel["ppl_increase"] <= 0.01
    assert metrics["kept_bf16"] == sel["kept"] and metrics["keep_budget_met"] is True
    assert sel["kept_params"] <= 0.25 * sel["quantizable_params"]
    assert {t["name"] for t in sel["kept_tensors"]} == set(sel["kept"]) and all(t["kl"] > 0 for t in sel["kept_tensors"])
    assert m["calibration"]["source"] == str(calib) and m["calibration"]["tokens"] == 256

    # the checkpoint as vLLM reads it: the kept tensors are in the ignore list and stored in bf16
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert set(sel["kept"]) <= set(qc["ignore"]) and "lm_head" in qc["ignore"]
    report = {r["name"]: r for r in json.loads((out / "quantization.json").read_text())["layers"]}
    assert not report[OUTLIER]["quantized"] and report["model.layers.1.mlp.down_proj"]["quantized"]

    # loaded back through transformers, it meets the budget on the calibration text, measured here
    tok = AutoTokenizer.from_pretrained(folder)
    float_ppl = calib_ppl(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), tok, calib)
    fp8_ppl = calib_ppl(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval(), tok, calib)
    assert fp8_ppl / float_ppl - 1 == pytest.approx(sel["ppl_increase"], abs=1e-4)
    assert fp8_ppl / float_ppl - 1 <= 0.01


def test_budget_out_of_reach_warns_and_is_recorded(slm, tmp_path, source, capsys):
    folder, calib = source
    out = tmp_path / "fp8"
    # the default byte cap (3% of the Linear weights) cannot hold the 32k-weight outlier tensor
    assert slm("quantize", f"model.name_or_path={folder}", f"calibration.source={calib}", "eval.source=null", *FAST,
               f"output_dir={out}") == 0
    printed = capsys.readouterr().out
    assert "quant.max_ppl_increase=0.01 is NOT met" in printed and "quant.max_keep_fraction" in printed
    m = meta(out)
    assert m["metrics"]["keep_budget_met"] is False and m["keep_sensitive"]["met"] is False
    assert OUTLIER not in m["keep_sensitive"]["kept"] and m["keep_sensitive"]["ppl_increase"] > 0.01


def test_a_count_keeps_that_many_and_none_keeps_nothing(slm, tmp_path, source):
    folder, calib = source
    two, none = tmp_path / "two", tmp_path / "none"
    common = [f"model.name_or_path={folder}", f"calibration.source={calib}", "eval.source=null", *FAST]
    assert slm("quantize", *common, "quant.keep_sensitive=2", "quant.max_keep_fraction=0.25", f"output_dir={two}") == 0
    sel = meta(two)["keep_sensitive"]
    assert len(sel["kept"]) == 2 and sel["kept"][0] == OUTLIER and sel["met"] is None and sel["mode"] == "count"
    assert slm("quantize", *common, "quant.keep_sensitive=none", f"output_dir={none}") == 0
    m = meta(none)
    assert "keep_sensitive" not in m and "kept_bf16" not in m["metrics"]
    qc = json.loads((none / "config.json").read_text())["quantization_config"]
    assert qc["ignore"] == ["lm_head"]


@pytest.mark.parametrize(
    "override, says",
    [
        ("quant.keep_sensitive=most", "quant.keep_sensitive='most'"),
        ("quant.keep_sensitive=-1", "quant.keep_sensitive=-1 must be >= 0"),
        ("quant.max_ppl_increase=0", "quant.max_ppl_increase"),
        ("quant.max_keep_fraction=1.5", "quant.max_keep_fraction"),
        ("quant.sensitivity_tokens=1", "quant.sensitivity_tokens"),
        ("quant.sensitivity=hessian", "quant.sensitivity='hessian': choose fisher or kl"),
    ],
)
def test_bad_keep_settings_exit_2_before_work(slm, tmp_path, source, capsys, override, says):
    folder, _ = source
    out = tmp_path / "fp8"
    assert slm("quantize", f"model.name_or_path={folder}", override, f"output_dir={out}") == 2
    err = capsys.readouterr().err
    assert says in err
    assert not out.exists()
