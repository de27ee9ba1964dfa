"""`slm prune` end to end on tiny Llama and Qwen3 (GQA) artifacts: the real CLI in-process, the pruned
checkpoint read back with plain transformers, its size against the prediction, slm.json, and refusals."""

import json
import math
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen3Config

from slm_cli import artifacts
from slm_cli.data import load_splits
from slm_cli.data.corpus import load_corpus
from slm_cli.data.text import text_fingerprint
from slm_cli.data.tokenizer import train_bpe_tokenizer
from slm_cli.evaluate.perplexity import perplexity
from slm_cli.evaluate.repetition import chat_prompts, greedy_repetition, text_prompts
from slm_cli.prune import PrunePlan, count_params, count_params_after
from tests.stages.helpers import meta

# the sources record no task data: name the text, so these tests measure pruning, not the fallback
FAST = [
    "calibration.source=shakespeare", "eval.source=shakespeare",
    "calibration.samples=4", "calibration.seq_len=64", "calibration.batch_size=2",
    "eval.max_tokens=256", "eval.window=128", "eval.stride=64", "threads=1",
    "eval.repetition_prompts=3", "eval.repetition_tokens=24",
]
CONFIGS = {"llama": LlamaConfig, "qwen3": Qwen3Config}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tokenizer():
    texts = [r["text"] for r in load_splits("shakespeare", train_size=60, val_size=1, test_size=1)["train"]]
    return train_bpe_tokenizer(texts, vocab_size=384)


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tokenizer):
    """2-layer Llama and Qwen3 artifacts (4 query heads, 2 KV heads) recording a parent."""
    root = tmp_path_factory.mktemp("prune-src")
    out = {}
    for i, (kind, cls) in enumerate(CONFIGS.items()):
        config = cls(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
        )
        torch.manual_seed(i)
        folder = root / kind
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        artifacts.write_metadata(folder, stage="student", config={}, parents=[], metrics={})
        out[kind] = folder
    return out


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_prune_writes_a_standard_smaller_checkpoint(slm, tmp_path, sources, kind):
    src, out = sources[kind], tmp_path / "pruned"
    args = ["prune.keep_ffn=0.5", "prune.keep_q_per_kv=1", "prune.local_search_iters=4"]
    assert slm("prune", f"model.name_or_path={src}", *args, *FAST, f"output_dir={out}") == 0
    assert not (tmp_path / "pruned.work").exists()

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    source_config = AutoModelForCausalLM.from_pretrained(src).config
    predicted = count_params_after(source_config, PrunePlan(keep_ffn=0.5, keep_q_per_kv=1))
    m = meta(out)
    metrics = m["metrics"]
    assert count_params(model) == predicted == metrics["params_after"] < metrics["params_before"]
    assert (model.config.intermediate_size, model.config.num_attention_heads, model.config.num_key_value_heads) == (64, 2, 2)
    assert model.config.head_dim == 16 and model.model.layers[0].mlp.down_proj.weight.shape == (64, 64)

    (parent,) = m["parents"]
    assert m["stage"] == "prune" and parent["role"] == "source" and parent["stage"] == "student"
    assert parent["hash"] == artifacts.content_hash(src)
    assert m["config"]["prune"]["keep_ffn"] == 0.5
    calib_hash = text_fingerprint(load_corpus("shakespeare", "calibration"))
    assert m["calibration"] == {"source": "shakespeare", "origin": "given", "text_sha256": calib_hash, "rows": 4,
                                "seq_len": 64, "tokens": 256, "eval_source": "shakespeare"}
    layers = m["pruning"]["layers"]
    assert len(layers) == 2
    for entry in layers:
        assert len(entry["kept_ffn"]) == 64 and len(set(entry["kept_ffn"])) == 64
        assert len(entry["kept_q_heads"]) == 2 and sorted(h // 2 for h in entry["kept_q_heads"]) == [0, 1]
        # OSSCAR's refit never does worse than keeping the old weights of the same columns
        assert 0 <= entry["ffn_error_after_refit"] <= entry["ffn_error_before_refit"] + 1e-9
        assert 0 <= entry["attn_error_after_refit"] <= entry["attn_error_before_refit"] + 1e-9

    # the recorded perplexity is that of the saved checkpoint, recomputed here independently
    tok = AutoTokenizer.from_pretrained(out)
    text = load_corpus("shakespeare", "test")  # the stored split, as slm eval scores it
    got = perplexity(model, tok, text, window=128, stride=64, max_tokens=256)
    assert got["perplexity"] == pytest.approx(metrics["perplexity_pruned"], rel=1e-5)
    assert metrics["eval_tokens"] == got["tokens"] == 255 and math.isfinite(metrics["perplexity_source"])
    assert m["pruning"]["plan"]["correction"] == "residual"

    # the loop figure: repeated 4-grams of greedy replies to 3 built-in questions (slm's tokenizers carry a
    # ChatML template), recomputed here
    prompts = chat_prompts(tok)[:3]
    rep = greedy_repetition(model, tok, prompts, max_new_tokens=24)
    assert metrics["repeated_4grams_pruned"] == pytest.approx(rep["repeated_ngrams"])
    assert metrics["repetition_new_tokens_pruned"] == rep["new_tokens"] and metrics["repetition_new_tokens_source"] > 0
    assert 0 <= metrics["repeated_4grams_source"] <= 1 and rep["new_tokens"] > 3 * 4
    assert (metrics["repetition_prompts"], metrics["repetition_tokens"]) == (3, 24)
    assert metrics["repetition_prompt_kind"] == "chat"


def test_prune_repetition_continues_test_text_for_a_base_model(slm, tmp_path, sources):
    """Without a chat template the loop figure comes from continuing prompts of 64 test tokens."""
    src = tmp_path / "base-src"
    tok = AutoTokenizer.from_pretrained(sources["llama"])
    assert tok.chat_template  # slm's own tokenizers carry ChatML; this source is a base model's
    tok.chat_template = None
    AutoModelForCausalLM.from_pretrained(sources["llama"]).save_pretrained(src)
    tok.save_pretrained(src)
    (src / "chat_template.jinja").unlink(missing_ok=True)
    artifacts.write_metadata(src, stage="student", config={}, parents=[], metrics={})
    out = tmp_path / "pruned"
    assert slm("prune", f"model.name_or_path={src}", "prune.keep_ffn=0.5", "prune.local_search_iters=2", *FAST,
               f"output_dir={out}") == 0
    metrics = meta(out)["metrics"]
    assert metrics["repetition_prompt_kind"] == "text" and metrics["repetition_prompts"] == 3

    pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    reloaded_tok = AutoTokenizer.from_pretrained(out)
    assert not reloaded_tok.chat_template
    prompts = text_prompts(load_corpus("shakespeare", "test"), reloaded_tok, count=3, prompt_tokens=64)
    rep = greedy_repetition(pruned, reloaded_tok, prompts, max_new_tokens=24)
    assert metrics["repeated_4grams_pruned"] == pytest.approx(rep["repeated_ngrams"])


def _stored_dtypes(folder) -> set[str]:
    """The dtypes in the safetensors headers of `folder` (read without loading a tensor)."""
    found = set()
    for file in folder.glob("*.safetensors"):
        with open(file, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        found |= {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    return found


def test_pruned_checkpoint_keeps_the_source_dtype(slm, tmp_path, sources):
    """A bf16 source gives a bf16 pruned checkpoint (half the bytes of float32), while the statistics and
    solver still run in model.dtype=float32; a float32 source stays float32."""
    bf16_src = tmp_path / "bf16-source"
    AutoModelForCausalLM.from_pretrained(sources["llama"], dtype=torch.bfloat16).save_pretrained(bf16_src)
    AutoTokenizer.from_pretrained(sources["llama"]).save_pretrained(bf16_src)
    assert _stored_dtypes(bf16_src) == {"BF16"}
    sizes = {}
    data = ["calibration.source=shakespeare", "eval.source=shakespeare"]
    for name, src in {"bf16": bf16_src, "fp32": sources["llama"]}.items():
        out = tmp_path / f"pruned-{name}"
        assert slm("prune", f"model.name_or_path={src}", "prune.keep_ffn=0.5", *FAST, *data, f"output_dir={out}") == 0
        saved = "bfloat16" if name == "bf16" else "float32"
        metrics = meta(out)["metrics"]
        assert (metrics["compute_dtype"], metrics["saved_dtype"]) == ("float32", saved)
        assert json.loads((out / "config.json").read_text())["dtype"] == saved
        assert _stored_dtypes(out) == {"BF16" if name == "bf16" else "F32"}
        assert AutoModelForCausalLM.from_pretrained(out, dtype="auto").dtype == getattr(torch, saved)
        sizes[name] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        # the recorded perplexity is that of the weights as saved, computed in float32
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        got = perplexity(model, AutoTokenizer.from_pretrained(out), load_corpus("shakespeare", "test"), window=128, stride=64, max_tokens=256)
        assert got["perplexity"] == pytest.approx(metrics["perplexity_pruned"], rel=1e-5)
    assert 0.45 < sizes["bf16"] / sizes["fp32"] < 0.55


def test_keep_everything_reproduces_the_logits(slm, tmp_path, sources):
    src, out = sources["qwen3"], tmp_path / "same"
    assert slm("prune", f"model.name_or_path={src}", *FAST, f"output_dir={out}") == 0
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    before = AutoModelForCausalLM.from_pretrained(src).eval()(input_ids=ids).logits
    after = AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=ids).logits
    torch.testing.assert_close(after, before)
    metrics = meta(out)["metrics"]
    assert metrics["params_after"] == metrics["params_before"]
    assert metrics["perplexity_pruned"] == pytest.approx(metrics["perplexity_source"], rel=1e-6)


def test_target_params_and_drop_layers(slm, tmp_path, sources, capsys):
    src, out = sources["llama"], tmp_path / "target"
    config = AutoModelForCausalLM.from_pretrained(src).config
    one_layer = PrunePlan(method="wanda_sp", drop_layers=1)
    target = count_params_after(config, PrunePlan(keep_ffn=40, drop_layers=1)) + 100  # 3*64 params per neuron
    args = ["prune=wanda_sp", f"prune.target_params={target}", "prune.drop_layers=1", "prune.round_to=8"]
    assert slm("prune", f"model.name_or_path={src}", *args, *FAST, f"output_dir={out}") == 0
    assert "keep_ffn_count=40 of 128" in capsys.readouterr().out
    m = meta(out)
    assert m["metrics"]["intermediate_size"] == 40 and m["metrics"]["num_hidden_layers"] == 1
    assert m["metrics"]["params_after"] <= target < count_params_after(config, PrunePlan(keep_ffn=48, drop_layers=1))
    assert count_params_after(config, one_layer) > m["metrics"]["params_after"]
    (dropped,) = m["pruning"]["dropped_layers"]
    assert [e["source_layer"] for e in m["pruning"]["layers"]] == [1 - dropped]
    assert len(m["pruning"]["layer_scores"]) == 2
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 1


def test_impossible_targets_exit_2_and_write_nothing(slm, tmp_path, sources, capsys):
    src, out = sources["llama"], tmp_path / "bad"
    rc = slm("prune", f"model.name_or_path={src}", "prune.keep_kv_heads=3", "prune.keep_q_per_kv=3", "prune.drop_layers=2",
             *FAST, f"output_dir={out}")
    err = capsys.readouterr().err
    assert rc == 2 and "3 impossible pruning target(s)" in err
    assert "keep_kv_heads=3 exceeds the model's num_key_value_heads=2" in err
    assert "keep_q_per_kv=3 exceeds the query heads per KV head" in err and "remove all 2 layers" in err
    assert slm("prune", f"model.name_or_path={src}", "prune.keep_ffn=0.0", *FAST, f"output_dir={out}") == 2
    assert "keep 0 would remove the MLP" in capsys.readouterr().err
    assert slm("prune", f"model.name_or_path={src}", "prune.keep_ffn=1", *FAST, f"output_dir={out}") == 2
    assert "prune.keep_ffn_count=1 for a number of neurons" in capsys.readouterr().err
    assert slm("prune", f"model.name_or_path={src}", "prune.keep_ffn_count=500", *FAST, f"output_dir={out}") == 2
    assert "keep_ffn_count=500 exceeds the model's intermediate_size=128" in capsys.readouterr().err
    assert slm("prune", f"model.name_or_path={src}", "prune.target_params=1000", *FAST, f"output_dir={out}") == 2
    assert "below the smallest model these settings allow" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "bad.work").exists() and not (tmp_path / "bad.lock").exists()


def test_existing_output_refused(slm, tmp_path, sources, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    assert slm("prune", f"model.name_or_path={sources['llama']}", "prune.keep_ffn=0.5", *FAST, f"output_dir={out}") == 2
    assert "already exists" in capsys.readouterr().err
    assert list(out.iterdir()) == []


def test_cfg_job_does_not_import_torch(tmp_path):
    code = (
        "import sys; from slm_cli.__main__ import main\n"
        "try:\n    main(['prune', 'model.name_or_path=/x', 'prune.keep_ffn=0.5', '--cfg', 'job'])\n"
        "except SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "keep_ffn: 0.5" in proc.stdout and "method: osscar" in proc.stdout
