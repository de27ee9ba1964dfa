"""Compression calibrated on the task by default (issue 14, part 1): a recipe's `data:` block reaches
every stage, `slm prune` / `slm quantize` alone read the task data from the source's slm.json (or fall
back to the kjv corpus with a warning), any text source calibrates as given, a short one warns, and
slm.json and `slm report` record what calibrated an artifact."""

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, LlamaConfig

from slm_cli import artifacts
from slm_cli.data import load_splits
from slm_cli.data.corpus import load_corpus
from slm_cli.data.text import split_text, text_fingerprint
from slm_cli.data.tokenizer import train_bpe_tokenizer
from slm_cli.pipeline import data_overrides, load_recipe
from slm_cli.report import write_report
from tests.stages.helpers import FAST, meta

# 200 prompt/completion records: a file whose 5% validation carve-out would give 10 of them
RECORDS = [{"prompt": f"What is {a} plus {b}?", "completion": f" {a + b}"} for a in range(20) for b in range(10)]
ALL_TEXT = "\n\n".join(r["prompt"] + r["completion"] for r in RECORDS)
PRUNE = ["prune.keep_ffn=0.5", "calibration.samples=4", "calibration.seq_len=32", "calibration.batch_size=2",
         "eval.max_tokens=128", "eval.window=32", "eval.stride=16", "threads=1"]
FALLBACK = "records no task data (no data.source in its slm.json or its parents'), so calibration.source falls back to the general corpus 'kjv'"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tokenizer():
    texts = [r["text"] for r in load_splits("shakespeare", train_size=40, val_size=1, test_size=1)["train"]]
    return train_bpe_tokenizer(texts, vocab_size=384)


def tiny_model(folder, tokenizer):
    """A 1-layer Llama saved as a plain Hugging Face folder (no slm.json)."""
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_recipe_data_block_reaches_every_stage(slm, tmp_path):
    data = jsonl(tmp_path / "task.jsonl", RECORDS)
    recipe = tmp_path / "p.yaml"
    recipe.write_text(yaml.safe_dump({
        "output_root": str(tmp_path / "out"),
        "data": {"source": str(data), "max_seq_len": 48},
        "stages": [
            {"name": "teacher", "stage": "teacher", "overrides": [
                "model=tiny-llama", "model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=1",
                *FAST, "train.max_steps=2", "train.micro_batch_size=8"]},
            {"name": "pruned", "stage": "prune", "overrides": PRUNE, "inputs": {"model.name_or_path": "teacher"}},
            {"name": "fp8", "stage": "quantize", "inputs": {"model.name_or_path": "pruned"}, "overrides": [
                "quant=fp8_static", "calibration.samples=2", "calibration.seq_len=32", "calibration.batch_size=2",
                "eval.source=null"]},
            {"name": "eval", "stage": "eval", "overrides": ["eval.max_new_tokens=4", "eval.batch_size=16"],
             "inputs": {"model.name_or_path": "fp8"}},
        ],
    }))
    assert slm("run", f"recipe={recipe}", "report=false") == 0
    out = tmp_path / "out"
    teacher = meta(out / "teacher")["config"]["data"]
    assert (teacher["source"], teacher["max_seq_len"]) == (str(data), 48)
    assert teacher["train_size"] == 256  # the stage's own data.train_size (tests' FAST) wins over nothing in the block
    pruned = meta(out / "pruned")
    assert (pruned["config"]["calibration"]["source"], pruned["config"]["eval"]["source"]) == (str(data), str(data))
    # a single file calibrates on all its records, never on a 5% validation carve-out
    assert pruned["calibration"]["text_sha256"] == text_fingerprint(ALL_TEXT)
    assert (pruned["calibration"]["source"], pruned["calibration"]["origin"], pruned["calibration"]["tokens"]) == (str(data), "given", 128)
    assert pruned["metrics"]["eval_tokens"] > 0
    fp8 = meta(out / "fp8")
    assert fp8["config"]["calibration"]["source"] == str(data) and fp8["config"]["eval"]["source"] is None  # its own override wins
    assert fp8["calibration"]["text_sha256"] == text_fingerprint(ALL_TEXT) and fp8["calibration"]["rows"] == 2
    evaluated = json.loads((out / "eval" / "eval.json").read_text())
    assert evaluated["source"] == str(data) and evaluated["config"]["data"]["max_seq_len"] == 48


def test_data_overrides_per_stage_and_own_keys_win(tmp_path):
    data = {"source": "arithmetic", "max_seq_len": 64}
    assert data_overrides("teacher", data, []) == ["data=arithmetic", "data.max_seq_len=64"]
    assert data_overrides("distill", data, ["data.max_seq_len=32"]) == ["data=arithmetic"]
    assert data_overrides("eval", {"source": "my.jsonl"}, []) == ["data=jsonl", "data.source=my.jsonl"]
    assert data_overrides("prune", data, []) == ["calibration.source=arithmetic", "eval.source=arithmetic"]
    assert data_overrides("quantize", data, ["eval.source=null"]) == ["calibration.source=arithmetic"]
    assert data_overrides("report", data, []) == []
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"data": {"source": "arithmetic", "max_len": 3}, "stages": [{"name": "t", "stage": "teacher"}]}))
    with pytest.raises(Exception, match=r"data: unknown keys \['max_len'\] \(valid: source, subset"):
        load_recipe(bad, {"teacher"})


def test_prune_alone_calibrates_on_the_recorded_task_data(slm, tmp_path, tokenizer, capsys):
    """The source records no data itself; its parent (the teacher) trained on arithmetic: prune walks up to it."""
    teacher = tiny_model(tmp_path / "teacher", tokenizer)
    artifacts.write_metadata(teacher, stage="teacher", config={"data": {"source": "arithmetic", "val_fraction": 0.05}},
                             parents=[], metrics={})
    student = tiny_model(tmp_path / "student", tokenizer)
    artifacts.write_metadata(student, stage="student", config={}, parents=[artifacts.parent("teacher", teacher)], metrics={})
    out = tmp_path / "pruned"
    assert slm("prune", f"model.name_or_path={student}", *PRUNE, f"output_dir={out}") == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "calibration.source=auto -> arithmetic" in printed and "records no task data" not in printed
    m = meta(out)
    assert m["config"]["calibration"]["source"] == "auto"
    assert m["calibration"] == {
        "source": "arithmetic", "origin": "recorded", "recorded_in": str(teacher),
        "text_sha256": text_fingerprint(split_text("arithmetic", "validation", 0)),
        "rows": 4, "seq_len": 32, "tokens": 128, "eval_source": "arithmetic",
    }
    # slm report writes a line per artifact saying what calibrated it
    report = write_report([out], tmp_path / "report", "t", show=False, evaluate=False)
    md = (tmp_path / "report" / "report.md").read_text()
    assert report["rows"][-1]["calibration"]["source"] == "arithmetic"
    assert "calibrated on `arithmetic` (the task data in its lineage; 4 x 32 = 128 tokens, text sha256 " in md


def test_plain_folder_falls_back_to_kjv_with_a_warning(slm, tmp_path, tokenizer, capsys):
    src = tiny_model(tmp_path / "hf", tokenizer)
    out = tmp_path / "pruned"
    assert slm("prune", f"model.name_or_path={src}", *PRUNE, f"output_dir={out}") == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "warning:" in printed and FALLBACK in printed
    assert "pass your task data, e.g. calibration.source=<task name or data file" in printed
    assert "eval.source=auto" in printed  # perplexity falls back too, and says so
    m = meta(out)
    assert (m["calibration"]["source"], m["calibration"]["origin"], m["calibration"]["eval_source"]) == ("kjv", "fallback", "kjv")
    assert m["calibration"]["text_sha256"] == text_fingerprint(load_corpus("kjv", "calibration"))


def test_txt_file_calibrates_on_its_whole_text(slm, tmp_path, tokenizer):
    src = tiny_model(tmp_path / "hf", tokenizer)
    text = load_corpus("kjv", "test")[:6000]
    txt = tmp_path / "notes.txt"
    txt.write_text(text)
    out = tmp_path / "pruned"
    assert slm("prune", f"model.name_or_path={src}", *PRUNE, f"calibration.source={txt}", f"eval.source={txt}",
               f"output_dir={out}") == 0
    m = meta(out)
    assert (m["calibration"]["source"], m["calibration"]["origin"]) == (str(txt), "given")
    assert m["calibration"]["text_sha256"] == text_fingerprint(text) and m["calibration"]["tokens"] == 128
    assert m["metrics"]["eval_tokens"] == 127  # eval.max_tokens=128 of the same text: 127 predicted


def test_fewer_rows_than_asked_warns_and_uses_them(slm, tmp_path, tokenizer, capsys):
    """32 records: all of them calibrate (not 2 carved out), and asking for more rows than they fill says so."""
    src = tiny_model(tmp_path / "hf", tokenizer)
    rows = RECORDS[:32]
    data = jsonl(tmp_path / "small.jsonl", rows)
    available = len(tokenizer("\n\n".join(r["prompt"] + r["completion"] for r in rows))["input_ids"]) // 32
    assert 4 < available < 64
    out = tmp_path / "pruned"
    assert slm("prune", f"model.name_or_path={src}", *PRUNE, f"calibration.source={data}", "calibration.samples=64",
               "eval.source=null", f"output_dir={out}") == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert (f"{available} row(s) of calibration.seq_len=32, {64 - available} fewer than calibration.samples=64 asked; "
            f"calibrating on {available} row(s)") in printed
    assert meta(out)["calibration"]["rows"] == meta(out)["metrics"]["calibration_rows"] == available


def test_quantize_alone_calibrates_and_measures_on_the_recorded_task_data(slm, tmp_path, tokenizer, capsys):
    src = tiny_model(tmp_path / "student", tokenizer)
    artifacts.write_metadata(src, stage="student", config={"data": {"source": "arithmetic"}}, parents=[], metrics={})
    out = tmp_path / "fp8"
    assert slm("quantize", f"model.name_or_path={src}", "quant=fp8_static", "calibration.samples=2", "calibration.seq_len=32",
               "calibration.batch_size=2", "eval.max_tokens=128", "eval.window=32", "eval.stride=16", f"output_dir={out}") == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "calibration.source=auto -> arithmetic" in printed and "eval.source=auto -> arithmetic" in printed
    m = meta(out)
    assert (m["calibration"]["source"], m["calibration"]["origin"], m["calibration"]["eval_source"]) == ("arithmetic", "recorded", "arithmetic")
    assert m["calibration"]["text_sha256"] == text_fingerprint(split_text("arithmetic", "validation", 0))
    assert m["calibration"]["tokens"] == 64 and m["metrics"]["eval_tokens"] == 127
