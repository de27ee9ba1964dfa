"""Bad input: every case exits non-zero (2 for a user error) with a message that names the file,
field or value and the fix, and leaves nothing at output_dir (no artifact, work folder or lock)."""

import json
import shutil
from pathlib import Path

import pytest

from tests.reliability.common import TEACHER, nothing_written, slm_json
from tests.stages.helpers import FAST

pytestmark = pytest.mark.reliability

QUANT_FAST = ["eval.max_tokens=256", "eval.window=128", "eval.stride=64"]
PRUNE_FAST = ["calibration.samples=4", "calibration.seq_len=64", *QUANT_FAST]


def jsonl(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text(text)
    return path


def jsonl_data(tmp_path: Path, text: str) -> list[str]:
    return ["data=jsonl", f"data.source={jsonl(tmp_path, text)}"]


MALFORMED = '{"prompt": "1+1=", "completion": "2"}\n{"prompt": "2+2="\n'
NO_PROMPT = '{"question": "1+1=", "answer": "2"}\n'
NO_COMPLETION = '{"prompt": "1+1="}\n'


def ds_json(tmp_path: Path) -> Path:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"optimizer": {"type": "Lamb", "params": {"lr": "auto"}}, "zero_optimization": {"stage": 0}}))
    return path


def not_a_model(tmp_path: Path) -> Path:
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "README.md").write_text("not a model")
    return folder


# case -> (stage and arguments, given tmp_path and the model folders; fragments the message must hold)
CASES = {
    "unknown key": (
        lambda t, f: ["teacher", *TEACHER, "+train.max_step=5"],
        ["unknown key 'train.max_step'", "did you mean train.max_steps?"],
    ),
    "config _target_ is an unknown key, never instantiated": (
        lambda t, f: ["teacher", *TEACHER, "+model._target_=os.system"],
        ["unknown key 'model._target_'", "valid keys here: name_or_path"],
    ),
    "wrong types, every problem at once": (
        lambda t, f: ["teacher", *TEACHER, "train.max_steps=ten", "train.lr=fast"],
        ["2 problem(s)", "train.max_steps='ten' has the wrong type: expected int", "train.lr='fast' has the wrong type"],
    ),
    "missing model path": (
        lambda t, f: ["teacher", "model=hf", f"model.name_or_path={t}/nope", *FAST],
        ["model.name_or_path={t}/nope: no such folder", "Give a folder holding config.json and weights"],
    ),
    "a folder that is not a model": (
        lambda t, f: ["quantize", f"model.name_or_path={not_a_model(t)}"],
        ["model.name_or_path={t}/notes is not a model folder (no config.json)", "Point it at a folder written by save_pretrained"],
    ),
    "malformed JSONL line": (
        lambda t, f: ["teacher", *TEACHER, *jsonl_data(t, MALFORMED)],
        ["{t}/data.jsonl line 2: malformed JSON"],
    ),
    "JSONL without prompt or messages": (
        lambda t, f: ["teacher", *TEACHER, *jsonl_data(t, NO_PROMPT)],
        ["{t}/data.jsonl line 1: missing fields (has answer, question)", 'each record needs {"prompt": str, "completion": str}'],
    ),
    "JSONL with prompt but no completion": (
        lambda t, f: ["teacher", *TEACHER, *jsonl_data(t, NO_COMPLETION)],
        ["{t}/data.jsonl line 1: missing fields (has prompt); 'prompt' without 'completion'"],
    ),
    "empty dataset": (
        lambda t, f: ["teacher", *TEACHER, *jsonl_data(t, "")],
        ["{t}/data.jsonl: the dataset is empty"],
    ),
    "every example longer than data.max_seq_len": (
        lambda t, f: ["teacher", *TEACHER, "data.max_seq_len=8"],
        ["all 256 examples were dropped", "within data.max_seq_len=8; raise data.max_seq_len"],
    ),
    "student tokenizer differs from the teacher's": (
        lambda t, f: ["distill", f"teacher.name_or_path={f['teacher']}", f"model.name_or_path={f['other_tok']}", *FAST],
        ["student tokenizer", "differs from the teacher's", "token-level distillation needs one vocabulary"],
    ),
    "student vocabulary smaller than the shared tokenizer": (
        lambda t, f: ["distill", f"teacher.name_or_path={f['teacher']}", f"model.name_or_path={f['short_vocab']}", *FAST],
        ["student and teacher vocabularies do not fit together", "student lm_head has", "resize the model's token embeddings"],
    ),
    "impossible pruning target": (
        lambda t, f: ["prune", f"model.name_or_path={f['teacher']}", "prune.keep_kv_heads=3", *PRUNE_FAST],
        ["prune.keep_kv_heads=3 exceeds the model's num_key_value_heads=2"],
    ),
    "FP8 block shapes not divisible by 128": (
        lambda t, f: ["quantize", f"model.name_or_path={f['teacher']}", "quant=fp8_block", *QUANT_FAST],
        ["quant.scheme=fp8_block needs every quantized Linear's (out, in) shape divisible by 128",
         "model.layers.0.self_attn.q_proj (out=64, in=64)", "or use quant.scheme=fp8_dynamic"],
    ),
    "more processes than the machine has": (
        lambda t, f: ["teacher", *TEACHER, "launcher.nproc_per_node=4096"],
        ["launcher.nproc_per_node=4096 but this machine has", "set launcher.nproc_per_node to at most"],
    ),
    "DeepSpeed JSON with an optimizer slm cannot run": (
        lambda t, f: ["teacher", *TEACHER, f"deepspeed.config_file={ds_json(t)}"],
        ["deepspeed.config_file={t}/ds.json:", "optimizer.type='Lamb': slm trains with Adam or AdamW",
         'set "type": "AdamW" or remove the optimizer block'],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_and_writes_nothing(slm, tmp_path, capsys, folders, record_message, case):
    build, fragments = CASES[case]
    out = tmp_path / "out"
    rc = slm(*build(tmp_path, folders), f"output_dir={out}")
    err = " ".join(record_message(capsys.readouterr().err).split())
    assert rc == 2, err[-2000:]
    assert err.startswith("slm error:") and "Traceback" not in err
    for fragment in fragments:
        assert fragment.replace("{t}", str(tmp_path)) in err, err[-2000:]
    assert nothing_written(out)


def test_heads_not_divisible_by_kv_heads_is_refused(slm, tmp_path, capsys, record_message):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.reliability.common import bpe_tokenizer

    tok, src, out = bpe_tokenizer(), tmp_path / "src", tmp_path / "out"
    config = LlamaConfig(hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=6,
                         num_key_value_heads=4, vocab_size=len(tok))
    LlamaForCausalLM(config).save_pretrained(src)
    tok.save_pretrained(src)
    rc = slm("prune", f"model.name_or_path={src}", "prune.keep_q_per_kv=1", *PRUNE_FAST, f"output_dir={out}")
    err = record_message(capsys.readouterr().err)
    assert rc == 2 and "num_attention_heads=6" in err and "num_key_value_heads=4" in err
    assert nothing_written(out)


def test_existing_output_dir_is_refused_and_kept(slm, tmp_path, capsys, record_message):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert slm("teacher", *TEACHER, f"output_dir={out}") == 2
    err = " ".join(record_message(capsys.readouterr().err).split())
    assert f"output_dir {out} already exists. Choose another output_dir=..., or pass overwrite=true" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "out.work").exists() and not (tmp_path / "out.lock").exists()


def test_artifact_from_a_newer_slm_is_refused(slm, tmp_path, capsys, teacher_artifact, record_message):
    newer = tmp_path / "newer"
    shutil.copytree(teacher_artifact, newer)
    meta = slm_json(newer)
    meta["slm_version"] = "99.0.0"
    (newer / "slm.json").write_text(json.dumps(meta))
    for stage, field in (("student", "teacher.name_or_path"), ("quantize", "model.name_or_path")):
        out = tmp_path / f"out-{stage}"
        extra = ["model=tiny-llama-student", *FAST] if stage == "student" else []
        assert slm(stage, f"{field}={newer}", *extra, f"output_dir={out}") == 2
        err = " ".join(record_message(capsys.readouterr().err).split())
        assert f"{field}={newer} was written by slm 99.0.0, newer than this slm" in err and "Upgrade slm" in err
        assert nothing_written(out)
