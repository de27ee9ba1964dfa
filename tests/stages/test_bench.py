"""`slm bench` in-process on tiny Llama artifacts saved here: numbers, repeats, slm.json merge, FP8 on CPU."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from slm_cli import artifacts
from slm_cli.data.tasks import TASKS
from slm_cli.data.tokenizer import train_bpe_tokenizer
from slm_cli.evaluate.speed import FP8_NOTE
from slm_cli.evaluate.vllm_speed import longest_sequence, serving_dtype
from slm_cli.stages.bench import folders_to_override
from tests.stages.helpers import meta

# small but complete settings: every measurement runs, each with 3 timed repeats
QUICK = [
    "bench.warmup=1", "bench.repeats=3", "bench.threads=1", "bench.prefill_seq_lens=[16,32]", "bench.decode_batch_sizes=[1,4]",
    "bench.decode_prompt_len=8", "bench.decode_new_tokens=4", "bench.scoring.prefix_examples=4", "bench.scoring.items=6",
    "bench.scoring.batch_size=3",
]


def save_tiny(folder: Path, layers: int, stage: str, parents: list[dict]) -> Path:
    texts = [ex["prompt"] + ex["completion"] for ex in TASKS["arithmetic_yesno"].examples("train", 32, 0)]
    tok = train_bpe_tokenizer(texts, vocab_size=300)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512,
        )
    )
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    artifacts.write_metadata(folder, stage=stage, config={}, parents=parents, metrics={"val_loss": 2.0, "params": model.num_parameters()})
    return folder


@pytest.fixture(scope="module")
def lineage(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    teacher = save_tiny(root / "teacher", 3, "teacher", [])
    student = save_tiny(root / "student", 1, "student", [artifacts.parent("teacher", teacher)])
    return teacher, student


def bench_json(out) -> dict:
    return json.loads((Path(out) / "bench.json").read_text())


def test_bench_two_artifacts_each_in_its_own_process(slm, tmp_path, lineage):
    teacher, student = lineage
    out = tmp_path / "b"
    # folders right after the stage word, as a user types them
    assert slm("bench", str(teacher), str(student), *QUICK, f"output_dir={out}", "bench.write_to_artifact=true") == 0
    results = bench_json(out)["artifacts"]
    assert [r["stage"] for r in results] == ["teacher", "student"]
    for r, folder in zip(results, lineage):
        assert r["params"] == meta(folder)["metrics"]["params"]
        assert r["weights_bytes"] == (folder / "model.safetensors").stat().st_size
        assert r["dtype"] == "float32" and r["device"] == "cpu" and r["peak_memory_mb"] > 0
        assert [(p["batch_size"], p["seq_len"]) for p in r["prefill"]] == [(1, 16), (1, 32)]
        assert [d["batch_size"] for d in r["decode"]] == [1, 4]
        for s in [p["ms"] for p in r["prefill"]] + [d["tokens_per_s"] for d in r["decode"]]:
            assert s["repeats"] == 3 and 0 < s["min"] <= s["median"] <= s["max"]
        assert r["latency_ms"] == r["prefill"][0]["ms"]["median"]
        assert r["decode_tokens_per_s"] == r["decode"][0]["tokens_per_s"]["median"]
        sc = r["scoring"]
        assert sc["items"] == 6 and sc["max_score_diff"] < 1e-4 and sc["speedup"] > 0
        # merged into slm.json unchanged, the rest kept, the checkpoint untouched
        m = meta(folder)
        assert m["metrics"]["bench"]["latency_ms"] == r["latency_ms"] and m["metrics"]["val_loss"] == 2.0
        assert artifacts.content_hash(folder) == m["content_hash"]


def test_fp8_artifact_on_cpu_is_not_timed(slm, tmp_path, lineage):
    fp8 = tmp_path / "fp8"
    shutil.copytree(lineage[1], fp8)
    cfg = json.loads((fp8 / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "format": "float-quantized"}
    (fp8 / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "b"
    assert slm("bench", f"artifacts=[{fp8}]", *QUICK, "bench.isolate=false", f"output_dir={out}") == 0
    (r,) = bench_json(out)["artifacts"]
    assert r["fp8"] and r["note"] == FP8_NOTE and r["params"] > 0 and r["weights_bytes"] > 0
    assert "prefill" not in r and "latency_ms" not in r


def test_bad_requests(slm, tmp_path, lineage):
    assert slm("bench", f"output_dir={tmp_path / 'x'}") == 2  # no artifacts
    assert slm("bench", str(tmp_path / "nowhere"), f"output_dir={tmp_path / 'x'}") == 2
    assert slm("bench", str(lineage[0]), "bench.repeats=0", f"output_dir={tmp_path / 'x'}") == 2
    assert not (tmp_path / "x").exists()


def test_bare_folders_become_the_artifacts_list():
    assert folders_to_override(["a/b", "bench.repeats=2", "--cfg", "job", "c"]) == [
        "bench.repeats=2", "--cfg", "job", 'artifacts=["a/b","c"]',
    ]
    assert folders_to_override(["artifacts=[x]"]) == ["artifacts=[x]"]


def test_vllm_engine_without_vllm_is_a_clear_error_and_writes_nothing(slm, tmp_path, lineage, capsys):
    teacher, _ = lineage
    out = tmp_path / "b"
    missing = tmp_path / "no-venv" / "bin" / "python"
    assert slm("bench", str(teacher), "bench.engine=vllm", f"bench.vllm_python={missing}", f"output_dir={out}") == 2
    err = capsys.readouterr().err
    assert f"bench.vllm_python {missing} does not exist" in err and "make serve-check" in err
    assert not out.exists()


def test_vllm_dtype_is_checked_before_anything_runs(slm, tmp_path, lineage, capsys):
    teacher, _ = lineage
    out = tmp_path / "b"
    assert slm("bench", str(teacher), "bench.engine=vllm", "bench.vllm_dtype=int8", f"output_dir={out}") == 2
    assert "bench.vllm_dtype='int8': choose auto, bfloat16, float16 or float32" in capsys.readouterr().err
    assert not out.exists()
    assert serving_dtype("float16") == "float16"  # an explicit choice is passed through


def test_vllm_model_length_holds_the_scored_prompt_and_its_one_new_token():
    spec = {"decode_prompt_len": 64, "decode_new_tokens": 64,
            "scoring": {"prefix": [5] * 800, "items": [[6] * 12, [6] * 15], "target": [7] * 4}}
    assert longest_sequence(spec) == 800 + 15 + 4 + 1  # vLLM refused 819 tokens at max_model_len 819
    assert longest_sequence({"decode_prompt_len": 64, "decode_new_tokens": 32}) == 96


def _vllm_python() -> str | None:
    from slm_cli.errors import SlmError
    from slm_cli.stages.bench import find_vllm_python

    try:
        return find_vllm_python(None)
    except SlmError:
        return None


@pytest.mark.skipif(_vllm_python() is None, reason="vLLM is not installed: `make serve-check ARTIFACT=<folder>` creates "
                    "its environment (/tmp/slm-vllm, or $SLM_VLLM_PYTHON); the vLLM bench path is then tested here")
def test_vllm_engine_measures_through_vllm(slm, tmp_path):
    """A tiny Llama (head size 64, which vLLM's CPU attention takes) timed through vLLM's offline engine."""
    folder = tmp_path / "tiny"
    texts = [ex["prompt"] + ex["completion"] for ex in TASKS["arithmetic_yesno"].examples("train", 32, 0)]
    tok = train_bpe_tokenizer(texts, vocab_size=300)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024)
                     ).to(torch.bfloat16).save_pretrained(folder)
    tok.save_pretrained(folder)
    artifacts.write_metadata(folder, stage="student", config={}, parents=[], metrics={})
    out = tmp_path / "b"
    assert slm("bench", str(folder), "bench.engine=vllm", "bench.repeats=2", "bench.decode_batch_sizes=[1,4]",
               "bench.decode_new_tokens=8", "bench.scoring.items=4", "bench.scoring.prefix_examples=2",
               "bench.write_to_artifact=true", f"output_dir={out}") == 0
    (r,) = bench_json(out)["artifacts"]
    assert r["engine"] == "vllm" and r["ttft_ms"] > 0 and r["latency_ms"] == r["ttft_ms"]
    assert r["dtype"] == serving_dtype("auto")  # float32 on a CPU without native bf16, where vLLM emulates bf16 slowly
    assert [d["batch_size"] for d in r["decode"]] == [1, 4] and all(d["tokens_per_s"] > 0 for d in r["decode"])
    assert r["scoring"]["items"] == 4 and r["scoring"]["items_per_s"] > 0
    assert meta(folder)["metrics"]["bench"]["engine"] == "vllm"
