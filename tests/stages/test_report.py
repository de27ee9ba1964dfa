"""`slm report` on a teacher -> student -> pruned -> FP8 lineage written here: every artifact scored on
the test split of the teacher's task data by the same code (FP8 through compressed-tensors), the
numbers checked against direct calls and `slm eval`, cached results reused, bench results joined,
a multirun folder as one row per job."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from slm_cli import artifacts
from slm_cli import report as report_mod
from slm_cli.data import load_splits
from slm_cli.data.tokenizer import train_bpe_tokenizer
from slm_cli.evaluate.heldout import completion_cross_entropy
from slm_cli.evaluate.speed import FP8_NOTE
from slm_cli.models import example_texts
from slm_cli.quant.schemes import quantize_model, save_quantized
from slm_cli.report import NO_BENCH, REPORT_JSON, REPORT_MD, REPORT_PNG, short_names, write_report
from tests.stages.helpers import meta

DATA = {"source": "arithmetic", "test_size": 8, "val_fraction": 0.05, "max_seq_len": 64}


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(example_texts(load_splits("arithmetic", train_size=300, val_size=1, test_size=1)["train"]), 300)


def save(folder: Path, tok, layers: int, ffn: int, stage: str, parents: list[dict], metrics: dict, config: dict | None = None) -> Path:
    torch.manual_seed(layers * 100 + ffn)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    ))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    artifacts.write_metadata(folder, stage=stage, config=config or {}, parents=parents, metrics={"params": model.num_parameters(), **metrics})
    return folder


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tokenizer):
    """runs/demo/{teacher,student,pruned,fp8}: only the teacher records its data; the FP8 one is a real compressed-tensors checkpoint."""
    root = tmp_path_factory.mktemp("runs") / "demo"
    teacher = save(root / "teacher", tokenizer, 2, 64, "teacher", [],
                   {"val_loss": 1.25, "bench": {"latency_ms": 8.5, "decode_tokens_per_s": 60.25, "peak_memory_mb": 120.0}},
                   config={"data": DATA, "seed": 0})
    student = save(root / "student", tokenizer, 1, 64, "student", [artifacts.parent("teacher", teacher)],
                   {"val_loss": 0.02, "val_ce": 1.5}, config={"data": {**DATA, "test_size": 12}, "seed": 3})
    pruned = save(root / "pruned", tokenizer, 1, 32, "prune", [artifacts.parent("source", student)], {"perplexity_increase_pct": 1.0})
    model = AutoModelForCausalLM.from_pretrained(pruned, dtype=torch.float32)
    quantize_model(model, "fp8_dynamic", ["lm_head"], None)
    fp8 = root / "fp8"
    save_quantized(model, tokenizer, fp8, source_dtype=torch.float32)
    artifacts.write_metadata(fp8, stage="quantize", config={}, parents=[artifacts.parent("source", pruned)],
                             metrics={"perplexity_fp8": 2688.0, "bench": {"note": FP8_NOTE}},
                             extra={"keep_sensitive": {"mode": "auto", "kept": ["model.layers.0.self_attn.k_proj"], "met": True,
                                                       "ppl_increase": 0.0042, "max_ppl_increase": 0.01}})
    return root


def direct_ce(folder, tok) -> float:
    examples = load_splits("arithmetic", train_size=1, val_size=1, test_size=8, seed=0)["test"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return completion_cross_entropy(model, tok, examples, max_seq_len=64)["ce"]


def test_every_artifact_is_scored_on_the_teachers_test_split(slm, tmp_path, pipeline, tokenizer):
    out = tmp_path / "rep"
    # the FP8 artifact alone: its parents are found through slm.json; the student named twice counts once
    assert slm("report", str(pipeline / "fp8"), str(pipeline / "student"), f"output_dir={out}", "title=demo") == 0
    report = json.loads((out / REPORT_JSON).read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert [r["name"] for r in report["rows"]] == ["teacher", "student", "pruned", "fp8"]
    assert report["heldout"]["spec"] == {**{k: v for k, v in DATA.items() if k != "test_size"}, "size": 8, "seed": 0, "split": "test"}
    assert report["heldout"]["from"] == "teacher" and report["heldout"]["metric"] == "exact_match"
    for name, r in rows.items():
        assert r["metrics"]["heldout.exact_match"] in [i / 8 for i in range(9)] and r["heldout"]["results"]["n"] == 8
        assert r["heldout"]["results"]["tokens"] == rows["teacher"]["heldout"]["results"]["tokens"] > 8
        assert r["content_hash"] == meta(pipeline / name)["content_hash"]
        assert r["metrics"]["weights_bytes"] == (pipeline / name / "model.safetensors").stat().st_size
    # the same number a direct computation gives, FP8 read back through compressed-tensors
    for name in ("student", "fp8"):
        assert rows[name]["metrics"]["heldout.ce"] == pytest.approx(direct_ce(pipeline / name, tokenizer), rel=1e-6)
    fp8, pruned = rows["fp8"]["metrics"]["heldout.ce"], rows["pruned"]["metrics"]["heldout.ce"]
    assert fp8 != pruned and fp8 == pytest.approx(pruned, rel=0.02)  # FP8 rounding moves it, a little
    # what stages recorded about themselves stays in report.json, out of the table
    assert rows["fp8"]["metrics"]["quantize.perplexity_fp8"] == 2688.0 and rows["student"]["metrics"]["val_loss"] == 0.02
    assert [c[1] for c in report["columns"]] == ["params", "size MB", "test CE", "exact match",
                                                 "engine", "latency ms", "decode tok/s", "peak mem MB"]
    assert rows["teacher"]["metrics"]["bench.engine"] == "hf"  # every timed row says which engine timed it
    # ratios only for like quantities
    rel = rows["student"]["relative_to_reference"]
    assert set(rel) == {"params", "weights_bytes"} and rel["params"] == rows["student"]["metrics"]["params"] / rows["teacher"]["metrics"]["params"]
    md = (out / REPORT_MD).read_text()
    assert "the test split of `arithmetic` (8 records, seed 0)" in md and "recorded in teacher's slm.json" in md
    assert "| fp8 | quantize |" in md and "FP8: not timed on CPU" in md and "val objective" not in md and "2688" not in md
    # which tensors FP8 skipped, and why, on the quantized artifact's line
    assert rows["fp8"]["keep_sensitive"]["kept"] == ["model.layers.0.self_attn.k_proj"]
    assert ("1 most FP8-sensitive tensors kept in bf16 (`model.layers.0.self_attn.k_proj`): calibration perplexity "
            "+0.42% against a budget of +1.00%, met") in md
    assert report_mod.kept_note({"mode": "auto", "kept": [], "met": True, "ppl_increase": -0.0003, "max_ppl_increase": 0.01}) == (
        "; no tensor kept in bf16: calibration perplexity -0.03% against a budget of +1.00%, met")
    assert (out / REPORT_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_slm_eval_gives_the_report_s_numbers(slm, tmp_path, pipeline):
    report = write_report([pipeline / "student"], tmp_path / "rep", "t", show=False)
    rows = {r["name"]: r for r in report["rows"]}
    same = [f"model.name_or_path={pipeline / 'student'}", "data.source=arithmetic", "data.test_size=8", "data.max_seq_len=64"]
    assert slm("eval", *same, f"output_dir={tmp_path / 'em'}") == 0
    assert slm("eval", *same, "eval.metric=completion_ce", f"output_dir={tmp_path / 'ce'}") == 0
    exact = json.loads((tmp_path / "em" / "eval.json").read_text())["metrics"]
    ce = json.loads((tmp_path / "ce" / "eval.json").read_text())
    assert rows["student"]["metrics"]["heldout.exact_match"] == exact["exact_match"]
    # batches of 8 in slm eval, 32 in the report: the same sums up to float rounding in padded rows
    assert rows["student"]["metrics"]["heldout.ce"] == pytest.approx(ce["metrics"]["ce"], rel=1e-5)
    assert ce["metrics"]["tokens"] == rows["student"]["heldout"]["results"]["tokens"]
    assert ce["settings"] == {"max_seq_len": 64, "seed": 0}


def test_results_are_reused_while_files_and_data_are_unchanged(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("SLM_CACHE", str(tmp_path / "cache"))  # nothing measured before this test
    teacher = save(tmp_path / "teacher", tokenizer, 2, 64, "teacher", [], {}, config={"data": DATA, "seed": 0})
    student = save(tmp_path / "student", tokenizer, 1, 64, "student", [artifacts.parent("teacher", teacher)], {})
    out = tmp_path / "rep"
    first = write_report([student], out, "t", show=False)
    assert not any(r["heldout"]["reused"] for r in first["rows"])
    assert len(list((tmp_path / "cache" / "heldout").glob("*.json"))) == 2

    def must_not_run(*args, **kwargs):
        raise AssertionError("evaluated again although files and data are unchanged")

    with monkeypatch.context() as m:  # another report, into another folder
        m.setattr("slm_cli.evaluate.heldout.evaluate_artifact", must_not_run)
        again = write_report([student], tmp_path / "rep2", "t", show=False)
    assert all(r["heldout"]["reused"] for r in again["rows"])
    assert [r["metrics"]["heldout.ce"] for r in again["rows"]] == [r["metrics"]["heldout.ce"] for r in first["rows"]]
    assert "measured before on the same files and data, and reused" in (tmp_path / "rep2" / REPORT_MD).read_text()

    # new weights in one artifact: that one is scored again, the other is reused
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    torch.nn.init.zeros_(model.model.layers[0].mlp.down_proj.weight)
    model.save_pretrained(student)
    third = write_report([student], out, "t", show=False, overwrite=True)
    assert {r["name"]: r["heldout"]["reused"] for r in third["rows"]} == {"teacher": True, "student": False}
    assert third["rows"][1]["metrics"]["heldout.ce"] != first["rows"][1]["metrics"]["heldout.ce"]

    # other data (a larger test split recorded by the teacher): every artifact is scored again
    m = meta(teacher)
    m["config"]["data"]["test_size"] = 10
    (teacher / artifacts.METADATA_FILE).write_text(json.dumps(m))
    fourth = write_report([student], out, "t", show=False, overwrite=True)
    assert not any(r["heldout"]["reused"] for r in fourth["rows"]) and fourth["heldout"]["examples"] == 10


def test_bench_results_fill_the_latency_panel(tmp_path, pipeline):
    bench = tmp_path / "bench"
    bench.mkdir()
    results = [{"path": str(pipeline / "student"), "latency_ms": 4.25, "decode_tokens_per_s": 120.5, "peak_memory_mb": 80.0,
                "scoring": {"speedup": 3.5}},
               {"path": str(pipeline / "fp8"), "note": FP8_NOTE}]
    (bench / "bench.json").write_text(json.dumps({"artifacts": results}))
    report = write_report([bench], tmp_path / "rep", "t", show=False, evaluate=False)
    rows = {r["name"]: r for r in report["rows"]}
    assert sorted(rows) == ["fp8", "pruned", "student", "teacher"]  # the benched artifacts and their lineage
    assert rows["student"]["metrics"]["bench.latency_ms"] == 4.25 and rows["student"]["metrics"]["bench.reuse_speedup"] == 3.5
    assert rows["student"]["relative_to_reference"]["bench.latency_ms"] == 4.25 / 8.5  # teacher's from its slm.json
    assert report["heldout"] is None and "Held-out evaluation was skipped" in (tmp_path / "rep" / REPORT_MD).read_text()


def test_no_bench_results_is_said_not_promised(tmp_path, pipeline):
    report = write_report([pipeline / "pruned"], tmp_path / "rep", "t", show=False)  # teacher benched, the others not
    assert report["plot"] and NO_BENCH not in (tmp_path / "rep" / REPORT_MD).read_text()
    lone = tmp_path / "lone"
    shutil.copytree(pipeline / "student", lone)
    m = meta(lone)
    m["parents"] = []
    (lone / artifacts.METADATA_FILE).write_text(json.dumps(m))
    report = write_report([lone], tmp_path / "rep2", "t", show=False)
    assert not any(c[0].startswith("bench.") for c in report["columns"])
    assert NO_BENCH[1:] in (tmp_path / "rep2" / REPORT_MD).read_text()
    assert report["heldout"]["spec"]["size"] == 12 and report["heldout"]["spec"]["seed"] == 3  # its own data: it is the root


def test_a_multirun_folder_gives_one_row_per_job(slm, tmp_path, pipeline, tokenizer):
    sweep = tmp_path / "multirun" / "student" / "2026-11-30_12-00-00"
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    for job, lr in enumerate(["0.001", "0.0003"]):
        (sweep / str(job) / ".hydra").mkdir(parents=True)
        (sweep / str(job) / ".hydra" / "overrides.yaml").write_text(f"- data=arithmetic\n- train.lr={lr}\n")
        save(sweep / str(job) / "artifact", tokenizer, 1, 48 + job, "student", [artifacts.parent("teacher", pipeline / "teacher")], {})
    out = tmp_path / "rep"
    assert slm("report", str(sweep), "evaluate=false", f"output_dir={out}") == 0
    report = json.loads((out / REPORT_JSON).read_text())
    assert [r["name"] for r in report["rows"]] == ["teacher", "train.lr=0.001", "train.lr=0.0003"]
    assert [r["parents"] for r in report["rows"]] == [[], ["teacher"], ["teacher"]]
    assert "| train.lr=0.0003 | student |" in (out / REPORT_MD).read_text()


def test_bad_folder_and_names(slm, tmp_path):
    (tmp_path / "empty").mkdir()
    assert slm("report", str(tmp_path / "empty"), f"output_dir={tmp_path / 'r'}") == 2
    assert slm("report", f"output_dir={tmp_path / 'r'}") == 2
    names = short_names([Path("outputs/teacher/t1/artifact"), Path("outputs/student/t2/artifact"), Path("runs/a/x")])
    assert names == ["t1/artifact", "t2/artifact", "x"]


def test_a_hub_id_parent_is_recorded_by_name_and_a_deleted_folder_as_missing(tmp_path, monkeypatch, tokenizer):
    monkeypatch.chdir(tmp_path)  # a hub id must not turn into a path under the working directory
    base = save(tmp_path / "base", tokenizer, 2, 64, "teacher", [], {"val_loss": 2.0})
    hub = artifacts.parent("base_model", "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert hub == {"role": "base_model", "name": "HuggingFaceTB/SmolLM2-135M-Instruct"}
    teacher = save(tmp_path / "teacher", tokenizer, 2, 64, "teacher", [hub, artifacts.parent("base_model", base)], {"val_loss": 1.0})
    shutil.rmtree(base)
    report = write_report([teacher], tmp_path / "rep", "t", show=False)
    assert [m["path"] for m in report["missing_parents"]] == [str(base.resolve())]
    md = (tmp_path / "rep" / REPORT_MD).read_text()
    assert "HuggingFaceTB" not in md and "no artifact in this lineage records the data it trained on" in md
