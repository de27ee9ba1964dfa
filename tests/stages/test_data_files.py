"""`slm teacher` on data a TRL user already has: conversational prompt-completion JSONL, parquet and
CSV files; the tokenized-data cache across runs; data.packing."""

import json

import pandas as pd
import pytest

from tests.stages.helpers import loss_fell, meta, metrics_rows, reloaded_val_loss

SMALL_MODEL = ["model=tiny-llama", "model.num_hidden_layers=2", "model.hidden_size=64", "model.intermediate_size=128"]
RUN = [
    "data=jsonl", "data.max_seq_len=64", "data.val_fraction=0.1", "train.max_steps=12", "train.micro_batch_size=8",
    "train.eval_every=0", "train.eval_batches=2", "train.warmup_steps=2", "train.lr=3e-3",
]
N = 80


def chat_rows(n=N):
    """TRL's conversational prompt-completion type: prompt and completion are message lists."""
    return [
        {
            "prompt": [{"role": "system", "content": "Answer with the number."}, {"role": "user", "content": f"{a} + {b} = ?"}],
            "completion": [{"role": "assistant", "content": str(a + b)}],
        }
        for a, b in ((i % 9 + 1, i // 9 + 1) for i in range(n))
    ]


def standard_rows(n=N):
    return [{"prompt": f"{a} + {b} =", "completion": f" {a + b}"} for a, b in ((i % 9 + 1, i // 9 + 1) for i in range(n))]


def teacher(slm, out, source, *extra):
    assert slm("teacher", *SMALL_MODEL, *RUN, f"data.source={source}", f"output_dir={out}", *extra) == 0
    return meta(out)


def test_conversational_prompt_completion_jsonl_trains_and_a_second_run_reads_the_token_cache(slm, tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chat_rows()))
    first = teacher(slm, tmp_path / "a", data)
    assert first["metrics"]["data"] == {
        "total": N - 8, "truncated": 0, "dropped": 0, "from_cache": False, "packed_rows": None,
    }
    start, end = loss_fell(tmp_path / "a")
    assert end < start
    # the artifact reproduces its validation loss on the same chat rows, rendered the same way
    assert reloaded_val_loss(tmp_path / "a") == pytest.approx(first["metrics"]["val_loss"], rel=1e-4)
    # slm eval scores the same rows: the prompt turns are what the model answers, the completion the reference
    out = tmp_path / "eval"
    assert slm("eval", f"model.name_or_path={tmp_path / 'a'}", "data=jsonl", f"data.source={data}", "data.val_fraction=0.1",
               "eval.split=validation", "eval.max_new_tokens=3", f"output_dir={out}") == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["metric"] == "exact_match" and report["metrics"]["n"] == 8
    answers = {str(a + b) for a, b in ((i % 9 + 1, i // 9 + 1) for i in range(N))}
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 8 and all(p["reference"] in answers for p in predictions)
    # same data, same tokenizer (built from the same rows): the tokenized splits come from the cache
    second = teacher(slm, tmp_path / "b", data)
    assert second["metrics"]["data"]["from_cache"] is True
    assert [r["loss"] for r in metrics_rows(tmp_path / "b")] == [r["loss"] for r in metrics_rows(tmp_path / "a")]
    # one changed row changes the data hash: a miss
    rows = chat_rows()
    rows[3]["completion"][0]["content"] = "41"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert teacher(slm, tmp_path / "c", data)["metrics"]["data"]["from_cache"] is False


def test_parquet_and_csv_files_train(slm, tmp_path):
    pd.DataFrame(chat_rows()).to_parquet(tmp_path / "chat.parquet")
    pd.DataFrame(standard_rows()).to_csv(tmp_path / "pc.csv", index=False)
    for name in ("chat.parquet", "pc.csv"):
        m = teacher(slm, tmp_path / name.replace(".", "_"), tmp_path / name)
        assert m["metrics"]["data"]["total"] == N - 8, name
        assert m["metrics"]["val_loss"] == pytest.approx(reloaded_val_loss(tmp_path / name.replace(".", "_")), rel=1e-4)


def test_packing_trains_on_fewer_rows_and_validates_unpacked(slm, tmp_path):
    data = tmp_path / "pc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in standard_rows()))
    plain = teacher(slm, tmp_path / "plain", data)
    packed = teacher(slm, tmp_path / "packed", data, "data.packing=true")
    assert packed["metrics"]["data"]["packed_rows"] < (N - 8) / 4  # ~8-token examples, 64-token rows
    rows_plain, rows_packed = metrics_rows(tmp_path / "plain"), metrics_rows(tmp_path / "packed")
    # a packed micro-batch holds several examples per row: more tokens per step
    assert sum(r["tokens"] for r in rows_packed) > 3 * sum(r["tokens"] for r in rows_plain)
    start, end = loss_fell(tmp_path / "packed")
    assert end < start
    # validation stays unpacked, so the artifact reproduces it with a plain forward pass
    assert reloaded_val_loss(tmp_path / "packed") == pytest.approx(packed["metrics"]["val_loss"], rel=1e-4)
    assert plain["metrics"]["data"]["packed_rows"] is None


def test_distill_refuses_packing(slm, tmp_path, capsys):
    assert slm("distill", "teacher.name_or_path=/nowhere", "data.packing=true") == 2
    assert "data.packing=true is for supervised fine-tuning" in capsys.readouterr().err
