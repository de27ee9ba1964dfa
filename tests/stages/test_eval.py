"""`slm eval` in-process on a tiny Llama saved here: every number in eval.json recomputed directly."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from slm_cli import artifacts
from slm_cli.data.corpus import load_corpus
from slm_cli.data.tasks import TASKS
from slm_cli.data.tokenizer import train_bpe_tokenizer
from slm_cli.evaluate import exact_match, perplexity, roc_auc, yes_no_auc
from tests.stages.helpers import meta


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory):
    """A 2-layer Llama with a BPE tokenizer, saved as an slm artifact (HF folder + slm.json)."""
    folder = tmp_path_factory.mktemp("art") / "artifact"
    texts = [ex["prompt"] + ex["completion"] for ex in TASKS["arithmetic_yesno"].examples("train", 64, 0)]
    texts += [ex["prompt"] + ex["completion"] for ex in TASKS["arithmetic"].examples("train", 64, 0)]
    tok = train_bpe_tokenizer(texts, vocab_size=320)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )
    )
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    artifacts.write_metadata(folder, stage="teacher", config={"note": "test"}, parents=[], metrics={"val_loss": 1.5})
    return folder


def load(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(folder)


def report(out) -> dict:
    return json.loads((Path(out) / "eval.json").read_text())


def predictions(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "predictions.jsonl").read_text().splitlines()]


def test_exact_match_on_a_task_and_merge_into_the_artifact(slm, tmp_path, tiny_artifact):
    hash_before = meta(tiny_artifact)["content_hash"]
    out = tmp_path / "ev"
    rc = slm(
        "eval", f"model.name_or_path={tiny_artifact}", "data.test_size=6", "eval.max_new_tokens=4", "eval.few_shot=1",
        "eval.batch_size=4", "eval.write_to_artifact=true", f"output_dir={out}",
    )
    assert rc == 0
    r = report(out)
    assert r["metric"] == "exact_match" and r["source"] == "arithmetic" and r["split"] == "test"
    assert r["metrics"]["n"] == 6 and r["metrics"]["few_shot"] == 1 and r["settings"]["max_new_tokens"] == 4
    rows = predictions(out)
    assert len(rows) == 6 and r["metrics"]["correct"] == sum(row["correct"] for row in rows)
    model, tok = load(tiny_artifact)
    direct = exact_match(model, tok, TASKS["arithmetic"], TASKS["arithmetic"].examples("test", 6, 0), 4, 4, few_shot=1)
    assert [p["generation"] for p in direct["predictions"]] == [row["generation"] for row in rows]
    assert r["metrics"]["exact_match"] == direct["exact_match"]

    m = meta(tiny_artifact)
    assert m["metrics"]["val_loss"] == 1.5 and m["stage"] == "teacher"  # the rest of slm.json is kept
    assert m["metrics"]["eval"]["arithmetic"]["exact_match"] == r["metrics"]["exact_match"]
    assert m["metrics"]["eval"]["arithmetic"]["few_shot"] == 1
    assert artifacts.content_hash(tiny_artifact) == hash_before  # the checkpoint itself is untouched

    assert slm("eval", f"model.name_or_path={tiny_artifact}", "data.test_size=6", f"output_dir={out}") == 2  # exists
    assert slm("eval", f"model.name_or_path={tiny_artifact}", "data.test_size=2", "eval.max_new_tokens=2", f"output_dir={out}", "overwrite=true") == 0
    assert report(out)["metrics"]["n"] == 2


def test_perplexity_on_a_corpus(slm, tmp_path, tiny_artifact):
    out = tmp_path / "ppl"
    rc = slm(
        "eval", "model=hf", f"model.name_or_path={tiny_artifact}", "data.source=shakespeare", "eval.window=64",
        "eval.stride=48", "eval.max_tokens=300", "eval.batch_size=3", f"output_dir={out}",
    )
    assert rc == 0
    r = report(out)
    assert r["metric"] == "perplexity" and r["settings"] == {"window": 64, "stride": 48, "max_tokens": 300}
    model, tok = load(tiny_artifact)
    direct = perplexity(model, tok, load_corpus("shakespeare", "test"), window=64, stride=48, max_tokens=300)
    assert r["metrics"]["tokens"] == 299
    assert r["metrics"]["perplexity"] == pytest.approx(direct["perplexity"], rel=1e-5)
    assert not (out / "predictions.jsonl").exists()


def test_yes_no_auc_on_a_predictive_task(slm, tmp_path, tiny_artifact):
    out = tmp_path / "auc"
    rc = slm("eval", f"model.name_or_path={tiny_artifact}", "data.source=arithmetic_yesno", "data.test_size=10", f"output_dir={out}")
    assert rc == 0
    r = report(out)
    assert r["metric"] == "auc" and r["metrics"]["n"] == 10 and r["metrics"]["positives"] == 5
    rows = predictions(out)
    assert r["metrics"]["auc"] == pytest.approx(roc_auc([row["log_odds"] for row in rows], [row["label"] for row in rows]))
    model, tok = load(tiny_artifact)
    direct = yes_no_auc(model, tok, TASKS["arithmetic_yesno"].examples("test", 10, 0))
    assert r["metrics"]["auc"] == pytest.approx(direct["auc"]) and r["metrics"]["accuracy"] == pytest.approx(direct["accuracy"])


def test_a_users_labelled_jsonl_is_scored_by_auc_with_its_own_answers(slm, tmp_path, tiny_artifact):
    """prompt/completion records with a 0/1 label and one answer per label are predictive data: AUC by default,
    scoring the file's own two answers (here " True" / " False"), exactly as yes_no_auc computes it."""
    data = tmp_path / "mine"
    data.mkdir()
    examples = TASKS["arithmetic_yesno"].examples("test", 12, 0)
    rows = [{"prompt": ex["prompt"], "completion": " True" if ex["label"] else " False", "label": ex["label"]}
            for ex in examples]
    for split in ("train", "validation", "test"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "auc"
    assert slm("eval", f"model.name_or_path={tiny_artifact}", "data=jsonl", f"data.source={data}", f"output_dir={out}") == 0
    r = report(out)
    assert r["metric"] == "auc" and r["metrics"]["n"] == 12 and r["metrics"]["positives"] == 6
    model, tok = load(tiny_artifact)
    direct = yes_no_auc(model, tok, rows, choices=(" True", " False"))
    assert r["metrics"]["auc"] == pytest.approx(direct["auc"]) and r["metrics"]["accuracy"] == pytest.approx(direct["accuracy"])
    assert direct["auc"] != pytest.approx(yes_no_auc(model, tok, rows)["auc"])  # not the default " Yes" / " No"

    # labels beside free-form completions stay generative: exact match, and AUC asked for is refused by name
    (data / "test.jsonl").write_text("".join(json.dumps({**r, "completion": f" answer {i}"}) + "\n" for i, r in enumerate(rows)))
    assert slm("eval", f"model.name_or_path={tiny_artifact}", "data=jsonl", f"data.source={data}", "eval.max_new_tokens=2",
               f"output_dir={tmp_path / 'em'}") == 0
    assert report(tmp_path / "em")["metric"] == "exact_match"
    assert slm("eval", f"model.name_or_path={tiny_artifact}", "data=jsonl", f"data.source={data}", "eval.metric=auc",
               f"output_dir={tmp_path / 'no'}") == 2
    assert not (tmp_path / "no").exists()


def test_gguf_file_is_evaluated_directly(slm, tmp_path, tiny_artifact):
    from tests.unit.test_pretrained import write_llama_gguf

    model, tok = load(tiny_artifact)
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(model, tok, path)
    args = ["data.source=shakespeare", "eval.window=32", "eval.stride=16", "eval.max_tokens=100"]
    assert slm("eval", "model=hf", f"model.name_or_path={path}", *args, f"output_dir={tmp_path / 'g'}") == 0
    assert slm("eval", f"model.name_or_path={tiny_artifact}", *args, f"output_dir={tmp_path / 'a'}") == 0
    a, g = report(tmp_path / "a")["metrics"], report(tmp_path / "g")["metrics"]
    assert g["perplexity"] == pytest.approx(a["perplexity"], rel=1e-5)


def test_user_errors_exit_2(slm, tmp_path, tiny_artifact, capsys):
    assert slm("eval", f"model.name_or_path={tiny_artifact}", "eval.metric=perplexity", f"output_dir={tmp_path / 'x'}") == 2
    assert "does not fit data.source=arithmetic" in capsys.readouterr().err
    assert slm("eval", "model=tiny-llama", f"output_dir={tmp_path / 'y'}") == 2
    assert "slm eval reads a trained model: give model.name_or_path=" in capsys.readouterr().err
    plain = tmp_path / "plain"  # an HF folder with no slm.json: nothing to write the metrics into
    shutil.copytree(tiny_artifact, plain, ignore=shutil.ignore_patterns("slm.json"))
    assert slm("eval", f"model.name_or_path={plain}", "eval.write_to_artifact=true", f"output_dir={tmp_path / 'w'}") == 2
    assert "has no slm.json (not an slm artifact)" in capsys.readouterr().err
    assert slm("eval", f"model.name_or_path={tiny_artifact}", "data.source=arithmetic_yesno", "data.test_size=1", f"output_dir={tmp_path / 'z'}") == 2
    assert "both labels" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in ("x", "y", "z", "w"))
