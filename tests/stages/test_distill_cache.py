"""`slm distill teacher.logits=precompute`: a top-k teacher cache replaces the online teacher."""

import pytest
from transformers import AutoTokenizer

from tests.stages.helpers import FAST, meta, metrics_rows, run_slm

SMALL = ["model.hidden_size=64", "model.intermediate_size=128"]
QUICK = [*FAST, "train.max_steps=4", "data.train_size=64", "train.micro_batch_size=8"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A briefly trained teacher and a student that shares its tokenizer."""
    root = tmp_path_factory.mktemp("pair")
    teacher, student = root / "teacher", root / "student"
    assert run_slm("teacher", "model=tiny-llama", *SMALL, *FAST, "train.max_steps=6", f"output_dir={teacher}",
                 f"hydra.run.dir={root}/logs/t") == 0
    assert run_slm("student", f"teacher.name_or_path={teacher}", "model=tiny-llama-student", *FAST, "train.max_steps=2",
                 f"output_dir={student}", f"hydra.run.dir={root}/logs/s") == 0
    return teacher, student


def test_k_equal_vocab_gives_the_online_losses(slm, tmp_path, pair):
    """With k = vocabulary the cache holds the whole distribution: every logged number equals online KD."""
    teacher, student = pair
    vocab = len(AutoTokenizer.from_pretrained(teacher))
    common = [f"teacher.name_or_path={teacher}", f"model.name_or_path={student}", *QUICK, "distill.kd_temperature=2.0"]
    assert slm("distill", *common, f"output_dir={tmp_path}/online") == 0
    assert slm("distill", *common, "teacher.logits=precompute", f"teacher.logits_top_k={vocab}",
               f"output_dir={tmp_path}/cached") == 0
    online, cached = metrics_rows(tmp_path / "online"), metrics_rows(tmp_path / "cached")
    assert len(online) == len(cached) == 4
    for a, b in zip(online, cached):
        for key in ("loss", "kd_loss", "ce_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (key, a, b)
    m = meta(tmp_path / "cached")["metrics"]
    assert m["teacher_cache_bytes_per_token"] == vocab * 4 + vocab * 4 + 4  # float32 log-probs at k = vocab
    assert m["val_loss"] == pytest.approx(meta(tmp_path / "online")["metrics"]["val_loss"], rel=1e-5)


@pytest.mark.parametrize("divergence", ["reverse_kl", "generalized_jsd"])
def test_small_k_trains_and_reports_bytes(slm, tmp_path, pair, divergence):
    teacher, student = pair
    out = tmp_path / "k8"
    assert slm("distill", f"teacher.name_or_path={teacher}", f"model.name_or_path={student}", *QUICK, "train.max_steps=6",
               "teacher.logits=precompute", "teacher.logits_top_k=8", f"distill.divergence={divergence}",
               f"output_dir={out}") == 0
    m = meta(out)["metrics"]
    assert m["teacher_cache_bytes_per_token"] == 8 * 4 + 8 * 2 + 4  # int32 ids, float16 log-probs, float32 rest
    assert m["teacher_cache_tokens"] > 0
    rows = metrics_rows(out)
    assert rows[0]["loss"] == pytest.approx(0.1 * rows[0]["ce_loss"] + 0.9 * rows[0]["kd_loss"], rel=1e-5)
    assert rows[-1]["kd_loss"] < rows[0]["kd_loss"]


def test_precompute_rejects_bad_settings(slm, tmp_path, pair):
    teacher, student = pair
    common = [f"teacher.name_or_path={teacher}", f"model.name_or_path={student}", *QUICK, "teacher.logits=precompute"]
    assert slm("distill", *common, "teacher.logits_top_k=100000", f"output_dir={tmp_path}/big") != 0
    assert slm("distill", *common, "distill=on_policy", f"output_dir={tmp_path}/onp") != 0
    assert not (tmp_path / "big").exists() and not (tmp_path / "onp").exists()
