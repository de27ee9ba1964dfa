"""`slm student`: the three ways a student starts, then fine-tuning; tokenizer checks."""

import pytest
from transformers import AutoConfig

from tests.stages.helpers import FAST, loss_fell, meta, reloaded_val_loss


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A 4-layer tiny Llama teacher, trained briefly once for every test here."""
    import sys

    from slm_cli.__main__ import main

    root = tmp_path_factory.mktemp("teacher")
    out = root / "teacher"
    argv = list(sys.argv)
    try:
        main(["teacher", "model=tiny-llama", "model.hidden_size=64", "model.intermediate_size=128", *FAST,
              f"output_dir={out}", f"hydra.run.dir={root}/logs"])
    finally:
        sys.argv = argv
    return out


def test_student_from_config_uses_teacher_tokenizer(slm, tmp_path, teacher):
    out = tmp_path / "student"
    assert slm("student", f"teacher.name_or_path={teacher}", "model=tiny-llama-student", *FAST, f"output_dir={out}") == 0
    m = meta(out)
    assert m["stage"] == "student" and m["init"] == "config"
    assert m["parents"][0]["role"] == "teacher" and len(m["parents"][0]["hash"]) == 64
    assert (out / "tokenizer.json").read_text() == (teacher / "tokenizer.json").read_text()
    first, last = loss_fell(out)
    assert last < first
    assert m["metrics"]["params"] < meta(teacher)["metrics"]["params"]
    assert reloaded_val_loss(out) == pytest.approx(m["metrics"]["val_loss"], rel=1e-4)


def test_student_from_teacher_layers(slm, tmp_path, teacher):
    out = tmp_path / "layers"
    assert slm("student", f"teacher.name_or_path={teacher}", "student.init=teacher_layers", "student.layers=[0,3]",
               *FAST, f"output_dir={out}") == 0
    cfg = AutoConfig.from_pretrained(out)
    assert cfg.num_hidden_layers == 2 and cfg.hidden_size == AutoConfig.from_pretrained(teacher).hidden_size
    assert reloaded_val_loss(out) == pytest.approx(meta(out)["metrics"]["val_loss"], rel=1e-4)


def test_student_from_smaller_pretrained_model(slm, tmp_path, teacher):
    small = tmp_path / "small"
    assert slm("student", f"teacher.name_or_path={teacher}", "model=tiny-llama-student", *FAST, "train.max_steps=2", f"output_dir={small}") == 0
    out = tmp_path / "pretrained"
    assert slm("student", f"teacher.name_or_path={teacher}", "student.init=pretrained", f"model.name_or_path={small}",
               *FAST, f"output_dir={out}") == 0
    roles = [p["role"] for p in meta(out)["parents"]]
    assert roles == ["teacher", "base_model"]


def test_student_with_other_tokenizer_is_refused(slm, tmp_path, teacher):
    from transformers import AutoModelForCausalLM

    from slm_cli.data.tokenizer import train_bpe_tokenizer

    other = tmp_path / "other"
    tok = train_bpe_tokenizer(["completely different text " * 50, "zebra quartz 123"], vocab_size=300, save_dir=other)
    cfg = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(other)
    rc = slm("student", f"teacher.name_or_path={teacher}", "student.init=pretrained", f"model.name_or_path={other}", *FAST,
             f"output_dir={tmp_path}/s")
    assert rc == 2
    assert not (tmp_path / "s").exists()


def test_missing_teacher_path_is_clear(slm, tmp_path, capsys):
    rc = slm("student", f"teacher.name_or_path={tmp_path}/nope", "student.init=teacher_layers", "student.layers=[0]", *FAST,
             f"output_dir={tmp_path}/s")
    assert rc == 2
    assert "no such folder" in capsys.readouterr().err
