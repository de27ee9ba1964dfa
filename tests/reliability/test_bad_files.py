"""Bad files: text in the wrong encoding, damaged or incomplete model folders, an artifact of the wrong
kind, a hub id with no network, and datasets too small for what is asked. Every case exits 2 with a
message that names the file, field or value and the fix, prints no traceback and leaves nothing at
output_dir (no artifact, work folder or lock). The model folders are real: tiny Llamas written by
save_pretrained, then damaged the way copies and downloads damage them, and one FP8 checkpoint
written by `slm quantize`."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest

from tests.reliability.common import TEACHER, cli, cli_env, nothing_written, run_slm
from tests.stages.helpers import FAST

pytestmark = pytest.mark.reliability

PC = [{"prompt": f"{i} + {i} =", "completion": f" {2 * i}"} for i in range(1, 9)]
CHAT = [{"messages": [{"role": "user", "content": f"{i} + 1?"}, {"role": "assistant", "content": f"{i + 1}"}]} for i in range(8)]
LATIN1_TEXT = '{"text": "na\xefve"}\n'.encode("latin-1")
QUANT = ["eval.source=null"]
PRUNE_ANY = ["calibration.seq_len=64", "eval.source=null", "prune.keep_ffn=0.5"]
PRUNE = ["calibration.samples=4", *PRUNE_ANY]


def jsonl_text(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


LONG_VALIDATION = jsonl_text([{"prompt": "1 + 1 = " * 40, "completion": " 2"}] * 2).encode()


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


class PlantedPickle:
    """Unpickling this writes a file: proof that slm never unpickles weights."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return Path.write_text, (self.sentinel, "unpickled")


def damaged(root: Path, good: Path, name: str, damage) -> Path:
    folder = root / name
    shutil.copytree(good, folder)
    damage(folder)
    return folder


def cut_in_half(folder: Path) -> None:
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])


def edit_config(folder: Path, change) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


def drop_tokenizer(folder: Path) -> None:
    for f in folder.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            f.unlink()


def sharded_with_a_shard_missing(folder: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    weight_map = {n: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, n in enumerate(names)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture(scope="session")
def models(tmp_path_factory, folders):
    """The good tiny model, copies of it damaged one way each, and an FP8 checkpoint made from it."""
    root = tmp_path_factory.mktemp("bad-models")
    good = folders["teacher"]
    sentinel = root / "unpickled"

    def pickle_only(folder: Path) -> None:
        (folder / "model.safetensors").unlink()
        (folder / "pytorch_model.bin").write_bytes(pickle.dumps(PlantedPickle(sentinel)))

    fp8 = root / "fp8"
    assert run_slm("quantize", f"model.name_or_path={good}", *QUANT, f"output_dir={fp8}", f"hydra.run.dir={root}/logs") == 0
    eval_out = write(root / "eval_out" / "eval.json", json.dumps({"model": str(good), "metrics": {}})).parent
    return {
        "good": good,
        "fp8": fp8,
        "eval_out": eval_out,
        "sentinel": sentinel,
        "truncated": damaged(root, good, "truncated", cut_in_half),
        "bad_json": damaged(root, good, "bad_json", lambda f: write(f / "config.json", '{"model_type": "llama",')),
        "no_model_type": damaged(root, good, "no_model_type", lambda f: edit_config(f, lambda c: c.pop("model_type"))),
        "unknown_type": damaged(root, good, "unknown_type", lambda f: edit_config(f, lambda c: c.update(model_type="llamma"))),
        "no_tokenizer": damaged(root, good, "no_tokenizer", drop_tokenizer),
        "pickle_only": damaged(root, good, "pickle_only", pickle_only),
        "missing_shard": damaged(root, good, "missing_shard", sharded_with_a_shard_missing),
    }


def fp8_fragments(field: str, m: dict) -> list[str]:
    return [
        f"{field}={m['fp8']} is an FP8 checkpoint written by `slm quantize`",
        "quant_method=compressed-tensors, format=float-quantized",
        f"Give the unquantized model it was made from, {field}={m['good'].resolve()}",
    ]


HF = ["teacher", "model=hf", *FAST]  # `slm teacher model=hf model.name_or_path=...`


def folder(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def split_folder(path: Path, train: list[dict], validation: bytes) -> Path:
    write(path / "train.jsonl", jsonl_text(train))
    write(path / "validation.jsonl", validation)
    return path


def truncated_dataset(path: Path) -> Path:
    import datasets

    datasets.Dataset.from_list(PC * 4).save_to_disk(str(path))
    for arrow in path.glob("*.arrow"):
        arrow.write_bytes(arrow.read_bytes()[:100])
    return path


def data(t: Path, name: str, raw: bytes | str) -> list[str]:
    return ["data=jsonl", f"data.source={write(t / name, raw)}"]


# case -> (t: the test's folder, m: the model folders) -> (arguments after the stage word, message fragments)
CASES = {
    # --- text encodings ----------------------------------------------------------------------------
    "JSONL with a Windows-1252 byte": lambda t, m: (
        [*HF[:1], *TEACHER, *data(t, "latin1.jsonl", jsonl_text(PC[:1]).encode() + '{"prompt": "café", "completion": " x"}\n'.encode("cp1252"))],
        [f"{t}/latin1.jsonl line 2: byte 0xe9 (byte 16 of the line) is not UTF-8", "iconv -f WINDOWS-1252 -t UTF-8"],
    ),
    "JSONL in UTF-16 with a BOM": lambda t, m: (
        [*HF[:1], *TEACHER, *data(t, "wide.jsonl", jsonl_text(PC).encode("utf-16"))],
        [f"{t}/wide.jsonl is UTF-16 text, but JSON Lines must be UTF-8", f"iconv -f UTF-16 -t UTF-8 {t}/wide.jsonl"],
    ),
    "chat rows in UTF-16-LE without a BOM": lambda t, m: (
        [*HF[:1], *TEACHER, *data(t, "chat.jsonl", jsonl_text(CHAT).encode("utf-16-le"))],
        [f"{t}/chat.jsonl is UTF-16 text", "iconv -f UTF-16 -t UTF-8"],
    ),
    "validation.jsonl with a Latin-1 byte in a split folder": lambda t, m: (
        [*HF[:1], *TEACHER, "data=jsonl", f"data.source={split_folder(t / 'splits', PC * 4, LATIN1_TEXT)}"],
        [f"{t}/splits/validation.jsonl line 1: byte 0xef", "is not UTF-8"],
    ),
    "calibration JSONL in UTF-16": lambda t, m: (
        ["prune", f"model.name_or_path={m['good']}", *PRUNE, f"calibration.source={write(t / 'calib.jsonl', jsonl_text(PC).encode('utf-16'))}"],
        [f"{t}/calib.jsonl is UTF-16 text"],
    ),
    # --- model folders -----------------------------------------------------------------------------
    "truncated weights: quantize model.name_or_path": lambda t, m: (
        ["quantize", f"model.name_or_path={m['truncated']}", *QUANT],
        [f"model.name_or_path={m['truncated']}: model.safetensors is cut short: its header describes", "Copy it again"],
    ),
    "truncated weights: teacher model.name_or_path": lambda t, m: (
        [*HF, f"model.name_or_path={m['truncated']}"],
        [f"model.name_or_path={m['truncated']}: model.safetensors is cut short"],
    ),
    "truncated weights: distill model.name_or_path": lambda t, m: (
        ["distill", f"teacher.name_or_path={m['good']}", f"model.name_or_path={m['truncated']}", *FAST],
        [f"model.name_or_path={m['truncated']}: model.safetensors is cut short"],
    ),
    "truncated weights: eval artifact": lambda t, m: (
        ["eval", f"model.name_or_path={m['truncated']}", "data.test_size=2"],
        [f"model.name_or_path={m['truncated']}: model.safetensors is cut short"],
    ),
    "truncated weights: bench folder": lambda t, m: (
        ["bench", str(m["truncated"])],
        [f"artifacts[0]={m['truncated']}: model.safetensors is cut short"],
    ),
    "a shard listed in the index is missing: prune": lambda t, m: (
        ["prune", f"model.name_or_path={m['missing_shard']}", *PRUNE],
        [f"model.name_or_path={m['missing_shard']}: model.safetensors.index.json lists 2 weight file(s)",
         "model-00002-of-00002.safetensors is missing", "Copy the whole model folder again"],
    ),
    "config.json is not JSON: prune": lambda t, m: (
        ["prune", f"model.name_or_path={m['bad_json']}", *PRUNE],
        [f"model.name_or_path={m['bad_json']}: {m['bad_json']}/config.json is not valid JSON", "line 1 column 24",
         "save the model again with save_pretrained"],
    ),
    "config.json is not JSON: eval artifact": lambda t, m: (
        ["eval", f"model.name_or_path={m['bad_json']}", "data.test_size=2"],
        [f"model.name_or_path={m['bad_json']}: {m['bad_json']}/config.json is not valid JSON"],
    ),
    "config.json without model_type: student teacher.name_or_path": lambda t, m: (
        ["student", f"teacher.name_or_path={m['no_model_type']}", "model=tiny-llama-student", *FAST],
        [f"teacher.name_or_path={m['no_model_type']}: {m['no_model_type']}/config.json has no \"model_type\"",
         "\"model_type\": \"llama\""],
    ),
    "config.json with an unknown model_type: quantize": lambda t, m: (
        ["quantize", f"model.name_or_path={m['unknown_type']}", *QUANT],
        ["model_type='llamma', which this transformers does not know", "Fix the spelling"],
    ),
    "no tokenizer: quantize model.name_or_path": lambda t, m: (
        ["quantize", f"model.name_or_path={m['no_tokenizer']}", *QUANT],
        [f"model.name_or_path={m['no_tokenizer']} has no tokenizer (none of tokenizer.json", "tokenizer.save_pretrained("],
    ),
    "no tokenizer: teacher model.name_or_path": lambda t, m: (
        [*HF, f"model.name_or_path={m['no_tokenizer']}"],
        [f"model.name_or_path={m['no_tokenizer']} has no tokenizer", "or name a tokenizer folder with model.tokenizer=<folder>"],
    ),
    "no tokenizer: distill teacher.name_or_path": lambda t, m: (
        ["distill", f"teacher.name_or_path={m['no_tokenizer']}", *FAST],
        [f"teacher.name_or_path={m['no_tokenizer']} has no tokenizer"],
    ),
    "pickle-only weights: teacher model.name_or_path": lambda t, m: (
        [*HF, f"model.name_or_path={m['pickle_only']}"],
        [f"model.name_or_path={m['pickle_only']} holds its weights only as pytorch_model.bin, a Python pickle",
         "slm reads safetensors only and never unpickles", f"save_pretrained('{m['pickle_only']}-safetensors')"],
    ),
    "pickle-only weights: student model.name_or_path (init=pretrained)": lambda t, m: (
        ["student", f"teacher.name_or_path={m['good']}", "student.init=pretrained", f"model.name_or_path={m['pickle_only']}", *FAST],
        [f"model.name_or_path={m['pickle_only']} holds its weights only as pytorch_model.bin"],
    ),
    "pickle-only weights: eval artifact": lambda t, m: (
        ["eval", f"model.name_or_path={m['pickle_only']}", "data.test_size=2"],
        [f"model.name_or_path={m['pickle_only']} holds its weights only as pytorch_model.bin"],
    ),
    "pickle-only weights: prune model.name_or_path": lambda t, m: (
        ["prune", f"model.name_or_path={m['pickle_only']}", *PRUNE],
        [f"model.name_or_path={m['pickle_only']} holds its weights only as pytorch_model.bin"],
    ),
    "a GGUF file cut short: prune model.name_or_path": lambda t, m: (
        ["prune", f"model.name_or_path={write(t / 'tiny.gguf', b'GGUF' + (3).to_bytes(4, 'little') + b'cut')}", *PRUNE],
        [f"{t}/tiny.gguf could not be read as a GGUF causal LM", "If the file was cut short or damaged in a copy"],
    ),
    "a .gguf path that does not exist: quantize model.name_or_path": lambda t, m: (
        ["quantize", f"model.name_or_path={t}/nope.gguf", *QUANT],
        [f"model.name_or_path={t}/nope.gguf: no such GGUF file"],
    ),
    "a file where the model folder belongs: quantize": lambda t, m: (
        ["quantize", f"model.name_or_path={m['good']}/config.json", *QUANT],
        [f"model.name_or_path={m['good']}/config.json is a file, not a model folder. Give the folder that holds it: model.name_or_path={m['good']}"],
    ),
    "a file where the model folder belongs: distill teacher.name_or_path": lambda t, m: (
        ["distill", f"teacher.name_or_path={m['good']}/model.safetensors", *FAST],
        [f"teacher.name_or_path={m['good']}/model.safetensors is a file, not a model folder"],
    ),
    "a folder where the JSONL file belongs": lambda t, m: (
        [*HF[:1], *TEACHER, "data=jsonl", f"data.source={folder(t / 'data.jsonl')}"],
        [f"{t}/data.jsonl is a folder, not a .jsonl file"],
    ),
    "a data folder without train.jsonl": lambda t, m: (
        [*HF[:1], *TEACHER, "data=jsonl", f"data.source={write(t / 'mine' / 'rows.jsonl', jsonl_text(PC)).parent}"],
        [f"{t}/mine: folder holds rows.jsonl but no train.jsonl", f"data.source={t}/mine/rows.jsonl"],
    ),
    "a datasets folder with a truncated .arrow file": lambda t, m: (
        [*HF[:1], *TEACHER, "data=jsonl", f"data.source={truncated_dataset(t / 'ds')}"],
        [f"{t}/ds: could not be read with datasets.load_from_disk", "copy it again, or write it again with save_to_disk"],
    ),
    "a .txt file as data": lambda t, m: (
        [*HF[:1], *TEACHER, "data=jsonl", f"data.source={write(t / 'notes.txt', 'some prose')}"],
        [f"{t}/notes.txt: unsupported file type '.txt'", '{"text": str}'],
    ),
    # --- an artifact of the wrong kind -------------------------------------------------------------
    "FP8 checkpoint: prune model.name_or_path": lambda t, m: (["prune", f"model.name_or_path={m['fp8']}", *PRUNE], fp8_fragments("model.name_or_path", m)),
    "FP8 checkpoint: quantize model.name_or_path": lambda t, m: (["quantize", f"model.name_or_path={m['fp8']}", *QUANT], fp8_fragments("model.name_or_path", m)),
    "FP8 checkpoint: distill teacher.name_or_path": lambda t, m: (
        ["distill", f"teacher.name_or_path={m['fp8']}", *FAST], fp8_fragments("teacher.name_or_path", m),
    ),
    "FP8 checkpoint: distill model.name_or_path": lambda t, m: (
        ["distill", f"teacher.name_or_path={m['good']}", f"model.name_or_path={m['fp8']}", *FAST], fp8_fragments("model.name_or_path", m),
    ),
    "FP8 checkpoint: teacher model.name_or_path": lambda t, m: (
        [*HF, f"model.name_or_path={m['fp8']}"], fp8_fragments("model.name_or_path", m),
    ),
    "FP8 checkpoint: student teacher.name_or_path": lambda t, m: (
        ["student", f"teacher.name_or_path={m['fp8']}", "model=tiny-llama-student", *FAST], fp8_fragments("teacher.name_or_path", m),
    ),
    "the output of slm eval as a model": lambda t, m: (
        ["quantize", f"model.name_or_path={m['eval_out']}", *QUANT],
        [f"model.name_or_path={m['eval_out']} is the results of `slm eval`, not a model; give the model folder it scored"],
    ),
    # --- too-small datasets ------------------------------------------------------------------------
    "fewer training examples than one batch": lambda t, m: (
        [*HF[:1], *TEACHER, *data(t, "few.jsonl", jsonl_text(PC))],
        ["the training set has 7 example(s) after encoding, fewer than one batch (train.micro_batch_size=16 x 1 process(es))",
         "lower train.micro_batch_size to 7 or less"],
    ),
    "fewer training examples than one batch: distill": lambda t, m: (
        ["distill", f"teacher.name_or_path={m['good']}", *FAST, *data(t, "few.jsonl", jsonl_text(PC)), "train.micro_batch_size=8"],
        ["the training set has 7 example(s) after encoding, fewer than one batch (train.micro_batch_size=8 x 1 process(es))"],
    ),
    "every validation example longer than data.max_seq_len": lambda t, m: (
        [*HF[:1], *TEACHER, "data=jsonl", f"data.source={split_folder(t / 'splits', PC * 4, LONG_VALIDATION)}",
         "data.max_seq_len=48"],
        ["all 2 examples were dropped from the validation split", "within data.max_seq_len=48"],
    ),
    "a file split with data.val_fraction=0": lambda t, m: (
        [*HF[:1], *TEACHER, *data(t, "rows.jsonl", jsonl_text(PC * 4)), "data.val_fraction=0"],
        ["the validation split is empty", "data.val_fraction > 0"],
    ),
    # fewer rows than calibration.samples is a warning (tests/stages/test_calibration.py); no full row is an error
    "not one calibration row: prune": lambda t, m: (
        ["prune", f"model.name_or_path={m['good']}", "calibration.samples=4", "eval.source=null", "prune.keep_ffn=0.5",
         f"calibration.source={write(t / 'calib.jsonl', jsonl_text(PC))}", "calibration.seq_len=100000"],
        [f"calibration.source={t}/calib.jsonl gives", "less than one row of calibration.seq_len=100000",
         "lower calibration.seq_len, or choose a larger calibration.source"],
    ),
    "not one calibration row: quantize fp8_static": lambda t, m: (
        ["quantize", f"model.name_or_path={m['good']}", "quant=fp8_static", *QUANT, "calibration.source=arithmetic",
         "calibration.seq_len=1000000", "calibration.samples=4"],
        ["calibration.source=arithmetic gives", "less than one row of calibration.seq_len=1000000"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_file_is_refused_and_writes_nothing(slm, tmp_path, capsys, models, record_message, case):
    args, fragments = CASES[case](tmp_path, models)
    capsys.readouterr()  # what building the bad files printed (datasets' progress bars) is not slm's message
    out = tmp_path / "out"
    rc = slm(*args, f"output_dir={out}")
    err = " ".join(record_message(capsys.readouterr().err).split())
    assert rc == 2, err[-3000:]
    assert err.startswith("slm error:") and "Traceback" not in err, err[-3000:]
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err[-3000:]}"
    assert nothing_written(out)
    assert not models["sentinel"].exists(), "a pickle was loaded"


def test_a_utf8_bom_is_accepted(slm, tmp_path, models):
    """Windows editors start UTF-8 files with a byte-order mark; the data reads as if it had none."""
    source = write(tmp_path / "bom.jsonl", b"\xef\xbb\xbf" + jsonl_text(PC).encode())
    out = tmp_path / "out"
    assert slm("eval", "model=hf", f"model.name_or_path={models['good']}", f"data.source={source}",
               "eval.max_new_tokens=2", f"output_dir={out}") == 0
    assert json.loads((out / "eval.json").read_text())["metrics"]["n"] >= 1


def hub_cache(cache: Path, repo_id: str, folder: Path) -> Path:
    """`folder` laid out as huggingface_hub caches a download of `repo_id` at revision main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(folder, repo / "snapshots" / commit)
    write(repo / "refs" / "main", commit)
    return cache


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """A hub endpoint nothing listens on and an empty hub cache; restores the offline flag afterwards."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # so that slm setting it is undone after the test
    return constants


def test_a_hub_id_with_no_network_fails_at_once(slm, tmp_path, capsys, no_hub, record_message):
    out = tmp_path / "out"
    assert slm(*HF, "model.name_or_path=someorg/some-model", f"output_dir={out}") == 2
    err = " ".join(record_message(capsys.readouterr().err).split())
    assert "Traceback" not in err
    assert "model.name_or_path=someorg/some-model is not a folder here, so it was taken as a Hugging Face hub id" in err
    assert "the hub (http://127.0.0.1:9) cannot be reached from this machine (" in err
    assert f"not in the local hub cache ({tmp_path}/hub)" in err and "hf download someorg/some-model" in err
    assert nothing_written(out)


def test_a_hub_id_with_hf_hub_offline_and_no_cache(slm, tmp_path, capsys, no_hub, record_message):
    no_hub.HF_HUB_OFFLINE = True
    out = tmp_path / "out"
    assert slm("distill", "teacher.name_or_path=someorg/teacher", *FAST, f"output_dir={out}") == 2
    err = " ".join(record_message(capsys.readouterr().err).split())
    assert "teacher.name_or_path=someorg/teacher is not a folder here" in err and "HF_HUB_OFFLINE is set" in err
    assert "Traceback" not in err and nothing_written(out)


def test_a_cached_hub_model_works_with_no_network(slm, tmp_path, models, no_hub):
    """Unreachable hub, model in the local cache: used offline, without a minute of retries."""
    hub_cache(Path(no_hub.HF_HUB_CACHE), "someorg/tiny", models["good"])
    out = tmp_path / "out"
    assert slm("eval", "model=hf", "model.name_or_path=someorg/tiny", "data.test_size=2", "eval.max_new_tokens=2",
               f"output_dir={out}") == 0
    assert json.loads((out / "eval.json").read_text())["metrics"]["n"] == 2
    assert no_hub.HF_HUB_OFFLINE is True


def test_a_hub_id_with_no_network_in_a_fresh_process(tmp_path):
    """The same refusal from the command line, where the hub settings come from the environment."""
    env = cli_env(HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_CACHE=str(tmp_path / "hub"))
    env.pop("HF_HUB_OFFLINE", None)
    out = tmp_path / "out"
    proc = cli(["quantize", "model.name_or_path=someorg/some-model", f"output_dir={out}"], cwd=tmp_path, env=env, timeout=120)
    err = " ".join(proc.stderr.split())
    assert proc.returncode == 2, err[-3000:]
    assert "model.name_or_path=someorg/some-model is not a folder here" in err and "cannot be reached" in err
    assert "Traceback" not in err and nothing_written(out)
