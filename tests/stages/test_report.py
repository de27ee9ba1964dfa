"""`slm report` and write_report on a teacher -> student -> FP8 lineage written here with slm.json metrics."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from slm_cli import artifacts
from slm_cli.evaluate.speed import FP8_NOTE
from slm_cli.report import REPORT_JSON, REPORT_MD, REPORT_PNG, short_names, write_report
from tests.stages.helpers import meta


def save(folder: Path, layers: int, stage: str, parents: list[dict], metrics: dict) -> Path:
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2)
    )
    model.save_pretrained(folder)
    artifacts.write_metadata(folder, stage=stage, config={}, parents=parents, metrics={"params": model.num_parameters(), **metrics})
    return folder


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """runs/demo/{teacher,student,quantized}: the student has eval and bench numbers, the FP8 one a bench note."""
    root = tmp_path_factory.mktemp("runs") / "demo"
    bench = {"latency_ms": 4.25, "decode_tokens_per_s": 120.5, "peak_memory_mb": 80.0, "scoring": {"speedup": 3.5}}
    teacher = save(
        root / "teacher", 4, "teacher", [],
        {"val_loss": 1.25, "eval": {"arithmetic_yesno": {"auc": 0.8, "accuracy": 0.7, "n": 64}},
         "bench": {"latency_ms": 8.5, "decode_tokens_per_s": 60.25, "peak_memory_mb": 120.0}},
    )
    student = save(
        root / "student", 2, "student", [artifacts.parent("teacher", teacher)],
        {"val_loss": 1.5, "eval": {"arithmetic_yesno": {"auc": 0.75, "accuracy": 0.65, "n": 64}}, "bench": bench},
    )
    fp8 = root / "quantized"
    shutil.copytree(student, fp8)
    cfg = json.loads((fp8 / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "compressed-tensors"}
    (fp8 / "config.json").write_text(json.dumps(cfg))
    artifacts.write_metadata(
        fp8, stage="quantize", config={}, parents=[artifacts.parent("source", student)],
        metrics={"perplexity_source": 30.5, "perplexity_fp8": 31.0, "perplexity_increase_pct": 1.64, "bench": {"note": FP8_NOTE}},
    )
    return root


def test_report_follows_the_lineage_and_copies_numbers_exactly(slm, tmp_path, pipeline):
    out = tmp_path / "rep"
    # the FP8 artifact alone: its parents are found through slm.json; the student named twice counts once
    assert slm("report", str(pipeline / "quantized"), str(pipeline / "student"), f"output_dir={out}", "title=demo") == 0
    for name in (REPORT_JSON, REPORT_MD, REPORT_PNG):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    assert (out / REPORT_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / REPORT_JSON).read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert [r["name"] for r in report["rows"]] == ["teacher", "student", "quantized"]
    assert report["rows"][report["reference"]]["stage"] == "teacher" and report["title"] == "demo"
    assert rows["student"]["parents"] == ["teacher"] and rows["quantized"]["parents"] == ["student"]
    for name, r in rows.items():
        m = meta(pipeline / name)["metrics"]
        assert r["content_hash"] == meta(pipeline / name)["content_hash"]
        assert r["metrics"]["weights_bytes"] == (pipeline / name / "model.safetensors").stat().st_size
        if "params" in m:
            assert r["metrics"]["params"] == m["params"]
        if "val_loss" in m:
            assert r["metrics"]["val_loss"] == m["val_loss"]
        for key in ("auc", "accuracy"):
            if "eval" in m:
                assert r["metrics"][f"eval.arithmetic_yesno.{key}"] == m["eval"]["arithmetic_yesno"][key]
        for key in ("latency_ms", "decode_tokens_per_s", "peak_memory_mb"):
            if key in m.get("bench", {}):
                assert r["metrics"][f"bench.{key}"] == m["bench"][key]
    assert rows["quantized"]["metrics"]["quantize.perplexity_fp8"] == 31.0
    assert rows["quantized"]["metrics"]["params"] == rows["student"]["metrics"]["params"]  # counted from the headers
    assert rows["student"]["metrics"]["bench.reuse_speedup"] == 3.5
    rel = rows["student"]["relative_to_reference"]
    assert rel["params"] == rows["student"]["metrics"]["params"] / rows["teacher"]["metrics"]["params"]
    assert rel["bench.latency_ms"] == 4.25 / 8.5 and rel["val_loss"] == 1.5 / 1.25
    assert report["quality"] == "eval.arithmetic_yesno.auc"  # the highest-ranked metric most rows have
    md = (out / REPORT_MD).read_text()
    assert "| student | student |" in md and "0.5x" in md and FP8_NOTE in md and f"]({REPORT_PNG})" in md


def test_a_pipeline_folder_and_write_report_for_slm_run(tmp_path, pipeline):
    out = tmp_path / "rep"
    report = write_report([pipeline], out, "pipeline demo", show=False)
    assert sorted(r["name"] for r in report["rows"]) == ["quantized", "student", "teacher"]
    assert sorted(Path(f).name for f in report["files"]) == [REPORT_JSON, REPORT_MD, REPORT_PNG]
    assert json.loads((out / REPORT_JSON).read_text())["rows"] == json.loads(json.dumps(report["rows"], default=str))


def test_bad_folder_and_names(slm, tmp_path):
    (tmp_path / "empty").mkdir()
    assert slm("report", str(tmp_path / "empty"), f"output_dir={tmp_path / 'r'}") == 2
    assert slm("report", f"output_dir={tmp_path / 'r'}") == 2
    names = short_names([Path("outputs/teacher/t1/artifact"), Path("outputs/student/t2/artifact"), Path("runs/a/x")])
    assert names == ["t1/artifact", "t2/artifact", "x"]


def test_a_hub_id_parent_is_recorded_by_name_and_a_deleted_folder_as_missing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a hub id must not turn into a path under the working directory
    base = save(tmp_path / "base", 2, "teacher", [], {"val_loss": 2.0})
    hub = artifacts.parent("base_model", "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert hub == {"role": "base_model", "name": "HuggingFaceTB/SmolLM2-135M-Instruct"}
    teacher = save(tmp_path / "teacher", 2, "teacher", [hub, artifacts.parent("base_model", base)], {"val_loss": 1.0})
    shutil.rmtree(base)
    report = write_report([teacher], tmp_path / "rep", "t", show=False)
    assert [m["path"] for m in report["missing_parents"]] == [str(base.resolve())]
    assert "HuggingFaceTB" not in (tmp_path / "rep" / REPORT_MD).read_text()
