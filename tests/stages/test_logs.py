"""Watching a run: every stage writes a readable <stage>.log in its run folder, progress off a terminal is
a plain line every SLM_LOG_EVERY seconds (0 here: every update, so nothing depends on timing), and
`train.report_to=[tensorboard]` writes event files the TensorBoard reader takes back."""

import os
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from slm_cli import artifacts
from slm_cli.data import load_splits
from slm_cli.data.tokenizer import train_bpe_tokenizer
from tests.stages.helpers import FAST, metrics_rows, run_cli

STEPS = 6


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A tiny `slm teacher` in a fresh process whose stdout is a pipe (not a terminal), with TensorBoard."""
    root = tmp_path_factory.mktemp("logs")
    run_dir, out = root / "run", root / "run" / "artifact"
    args = [
        "teacher", "model=tiny-llama", *FAST, f"train.max_steps={STEPS}", "train.eval_every=3",
        "train.report_to=[tensorboard]", f"output_dir={out}", f"hydra.run.dir={run_dir}",
    ]
    proc = run_cli(args, env={**os.environ, "SLM_LOG_EVERY": "0"}, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, run_dir, out


def test_the_run_folder_log_holds_config_setup_steps_and_final_metrics(teacher_run):
    proc, run_dir, out = teacher_run
    log = (run_dir / "teacher.log").read_text()
    assert "resolved config" in log and "arch: llama" in log  # the panel, with the model group resolved
    assert re.search(r"max_steps: %d\b" % STEPS, log)
    assert "teacher: setup" in log and "ZeRO stage" in log and "train examples" in log
    steps = re.findall(r"teacher: (\d+)/%d steps \(\d+%%\) \| loss ([\d.]+) \| lr ([\d.e+-]+) \| tok/s ([\d,]+)" % STEPS, log)
    assert [int(s[0]) for s in steps] == list(range(1, STEPS + 1))  # SLM_LOG_EVERY=0: a line per step
    losses = [r["loss"] for r in metrics_rows(out)]
    assert [float(s[1]) for s in steps] == pytest.approx(losses, abs=1e-4)  # the same numbers as metrics.jsonl
    assert "val_loss" in log.split("teacher: 3/")[1].splitlines()[0]  # eval_every=3: the line shows it
    final = artifacts.read_metadata(out)["metrics"]
    assert re.search(r"^│ val_ce +│ +%s │$" % re.escape(f"{final['val_ce']:.4g}"), log, flags=re.M)
    # nothing is cut at 80 columns: the title naming the artifact and the model's config line stay whole
    assert f"teacher artifact: {out}\n" in log
    assert re.search(r"data: \{source: arithmetic, .*, val_fraction: 0.05, max_seq_len: 64", log)
    assert "\x1b[" not in log  # plain text, no colour codes


def test_off_a_terminal_stdout_gets_plain_progress_lines_not_one_bar_at_the_end(teacher_run):
    proc, _, out = teacher_run
    lines = [line for line in proc.stdout.splitlines() if line.startswith("teacher: ") and " steps (" in line]
    assert [line.split("/")[0] for line in lines] == [f"teacher: {i}" for i in range(1, STEPS + 1)]
    assert all(" | eta " in line and " | elapsed " in line for line in lines)
    assert not re.search(r"^teacher ━", proc.stdout, flags=re.M)  # no rich bar printed once at the end
    assert f"teacher artifact: {out}\n" in proc.stdout  # not cut at 80 columns


def test_report_to_tensorboard_logs_loss_lr_tokens_grad_norm_and_eval(teacher_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir, out = teacher_run
    assert not any("tfevents" in p.name for p in out.rglob("*"))  # event files stay out of the artifact
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    scalars = {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}
    rows = metrics_rows(out)
    for tag, key in [("train/loss", "loss"), ("train/learning_rate", "lr"), ("train/grad_norm", "grad_norm"),
                     ("train/tokens_per_s", "tokens_per_s")]:
        assert [e.step for e in scalars[tag]] == list(range(1, STEPS + 1)), tag
        assert [e.value for e in scalars[tag]] == pytest.approx([r[key] for r in rows], rel=1e-5), tag
    final = artifacts.read_metadata(out)["metrics"]
    assert [e.step for e in scalars["eval/loss"]] == [3, STEPS]  # eval_every=3, then the end of the run
    assert scalars["eval/loss"][0].value == pytest.approx(rows[2]["val_loss"], rel=1e-5)
    assert scalars["eval/loss"][1].value == pytest.approx(final["val_loss"], rel=1e-5)
    assert [e.step for e in scalars["eval/ce"]] == [STEPS]
    assert scalars["eval/ce"][0].value == pytest.approx(final["val_ce"], rel=1e-5)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A 2-layer Llama artifact with a byte-level BPE tokenizer, written directly (no training)."""
    texts = [r["text"] for r in load_splits("shakespeare", train_size=40, val_size=1, test_size=1)["train"]]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=320)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny") / "model"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    artifacts.write_metadata(folder, stage="student", config={}, parents=[], metrics={})
    return folder


PPL = ["eval.max_tokens=256", "eval.window=64", "eval.stride=32", "eval.batch_size=2"]


def test_prune_prints_a_line_per_layer_and_per_perplexity_batch(slm, tmp_path, tiny_model, capsys, monkeypatch):
    monkeypatch.setenv("SLM_LOG_EVERY", "0")
    rc = slm("prune", f"model.name_or_path={tiny_model}", "prune.keep_ffn=0.5", "calibration.samples=4",
             "calibration.seq_len=32", "calibration.batch_size=2", *PPL, "threads=1", f"output_dir={tmp_path / 'p'}",
             f"hydra.run.dir={tmp_path / 'run'}")
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    layers = re.findall(r"^pruning with osscar \(4 x 32 calibration tokens\): (\d)/2 layers \(\d+%\) \| elapsed \S+ \| eta \S+$",
                        out, flags=re.M)
    assert layers == ["1", "2"]
    windows = re.findall(r"^perplexity of the source: (\d+)/(\d+) windows", out, flags=re.M)
    assert windows and windows[-1][0] == windows[-1][1]  # ends at all windows done
    assert "perplexity of the saved pruned checkpoint, loaded back: " in out
    log = (tmp_path / "run" / "prune.log").read_text()
    assert "pruning with osscar (4 x 32 calibration tokens): 2/2 layers (100%)" in log
    assert "prune artifact:" in log and "perplexity_pruned" in log
    assert "layer 1: ffn error" in log  # the library's own per-layer INFO line (logger slm_cli)


def test_eval_prints_progress_lines_off_a_terminal(slm, tmp_path, tiny_model, capsys, monkeypatch):
    monkeypatch.setenv("SLM_LOG_EVERY", "0")
    rc = slm("eval", f"model.name_or_path={tiny_model}", "data=shakespeare", *PPL, f"output_dir={tmp_path / 'e'}",
             f"hydra.run.dir={tmp_path / 'run'}")
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    done = re.findall(r"^perplexity: (\d+)/(\d+) windows \(\d+%\) \| elapsed \S+ \| eta \S+$", out, flags=re.M)
    assert len(done) >= 2 and done[-1][0] == done[-1][1]
    log = (tmp_path / "run" / "eval.log").read_text()
    assert f"perplexity: {done[-1][0]}/{done[-1][1]} windows (100%)" in log and "eval: shakespeare, test split" in log

    rc = slm("eval", f"model.name_or_path={tiny_model}", "data=arithmetic", "data.test_size=4", "eval.batch_size=2",
             "eval.max_new_tokens=2", f"output_dir={tmp_path / 'em'}", f"hydra.run.dir={tmp_path / 'run-em'}")
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    assert re.findall(r"^exact_match: (\d)/4 prompts", out, flags=re.M) == ["2", "4"]


def test_fp8_static_calibration_prints_a_line_per_batch(slm, tmp_path, tiny_model, capsys, monkeypatch):
    monkeypatch.setenv("SLM_LOG_EVERY", "0")
    rc = slm("quantize", f"model.name_or_path={tiny_model}", "quant.scheme=fp8_static", "calibration.samples=4",
             "calibration.seq_len=32", "calibration.batch_size=2", "eval.source=null", f"output_dir={tmp_path / 'q'}",
             f"hydra.run.dir={tmp_path / 'run'}")
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    assert re.findall(r"^quantizing to fp8_static: activation scales: (\d)/2 batches", out, flags=re.M) == ["1", "2"]
    assert "quantize artifact:" in (tmp_path / "run" / "quantize.log").read_text()


def test_bench_counts_every_measurement_of_every_artifact_off_a_terminal(slm, tmp_path, tiny_model, capsys, monkeypatch):
    monkeypatch.setenv("SLM_LOG_EVERY", "0")
    quick = ["bench.warmup=0", "bench.repeats=1", "bench.prefill_seq_lens=[16]", "bench.decode_batch_sizes=[1,2]",
             "bench.decode_prompt_len=8", "bench.decode_new_tokens=2", "bench.scoring.enabled=false", "bench.threads=1"]
    # the first artifact is measured in its own process (progress comes back over a pipe), the second in this one
    assert slm("bench", str(tiny_model), *quick, f"output_dir={tmp_path / 'b1'}", f"hydra.run.dir={tmp_path / 'r1'}") == 0
    assert slm("bench", str(tiny_model), str(tiny_model), *quick, "bench.isolate=false", f"output_dir={tmp_path / 'b2'}",
               f"hydra.run.dir={tmp_path / 'r2'}") == 0
    out = capsys.readouterr().out
    done = re.findall(r"^measuring: (\d+)/(\d+) measurements \(\d+%\) \| elapsed \S+ \| eta \S+$", out, flags=re.M)
    # 1 prefill + 2 decode settings per artifact: 3 for the first run, 6 for the second
    assert done == [(str(i), "3") for i in (1, 2, 3)] + [(str(i), "6") for i in range(1, 7)]
    assert "measuring: 6/6 measurements (100%)" in (tmp_path / "r2" / "bench.log").read_text()


def test_the_error_that_stops_a_run_ends_its_log_and_prints_once(slm, tmp_path, tiny_model, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("a folder holding more than Hydra's files is kept")
    rc = slm("eval", f"model.name_or_path={tiny_model}", f"data.source={tmp_path / 'missing.jsonl'}",
             f"output_dir={tmp_path / 'e'}", f"hydra.run.dir={run_dir}")
    captured = capsys.readouterr()
    assert rc == 2
    assert captured.err.count("slm error:") == 1 and "missing.jsonl" in captured.err
    assert "slm error" not in captured.out  # the log record goes to the file, not to the terminal again
    last = (run_dir / "eval.log").read_text().strip().splitlines()[-1]
    assert "[slm][ERROR] - slm error:" in last and "missing.jsonl" in last


@pytest.mark.slow  # two ranks under the deepspeed launcher (~1 min idle, 4 busy); one rank: teacher_run above
def test_under_two_ranks_only_rank_0_logs_and_writes_events(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, steps = tmp_path / "run", 3
    proc = run_cli(
        ["teacher", "model=tiny-llama", "launcher=ddp2", *FAST, f"train.max_steps={steps}", "data.train_size=64",
         "train.micro_batch_size=4", "train.report_to=[tensorboard]", f"output_dir={tmp_path / 'out'}",
         f"hydra.run.dir={run_dir}"],
        env={**os.environ, "SLM_LOG_EVERY": "0"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (events,) = list((run_dir / "tensorboard").iterdir())  # one writer: rank 0's
    acc = EventAccumulator(str(events))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, steps + 1))
    log = (run_dir / "teacher.log").read_text()
    assert [log.count(f"teacher: {i}/{steps} steps") for i in range(1, steps + 1)] == [1] * steps
    assert log.count("teacher: setup") == 1


def test_the_teacher_logit_cache_reports_progress_per_batch(tmp_path):
    """teacher.logits=precompute runs the teacher over the whole training set: `slm distill` shows it with ETA."""
    from functools import partial

    from slm_cli.data.tokenize import EncodedExample, collate
    from slm_cli.distill.logit_cache import write_cache

    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=64)).eval()
    examples = [EncodedExample(list(range(i, i + 6)), [-100, -100] + list(range(i + 2, i + 6))) for i in range(5)]
    calls = []
    write_cache(teacher, examples + examples[:1], tmp_path, k=4, vocab_size=64, collate=partial(collate, pad_token_id=0),
                batch_size=2, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(2, 5), (4, 5), (5, 5)]  # distinct examples only: the repeated one is stored once
