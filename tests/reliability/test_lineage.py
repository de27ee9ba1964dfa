"""Lineage: every artifact's slm.json names its parents with content hashes, and `slm eval` and
`slm quantize` warn when an artifact or a parent changed since. The chain teacher -> student ->
distill -> quantize also runs with model.trust_remote_code=true, which each slm.json records."""

import json

import pytest

from slm_cli import artifacts
from tests.reliability.common import TINY, run_slm, slm_json
from tests.stages.helpers import FAST

pytestmark = pytest.mark.reliability

SHORT = [*FAST, "train.max_steps=2", "model.trust_remote_code=true"]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    a = {name: root / name for name in ("teacher", "student", "distill", "fp8")}
    runs = [
        ["teacher", *TINY, *SHORT],
        ["student", f"teacher.name_or_path={a['teacher']}", "model=tiny-llama-student", *SHORT],
        ["distill", f"teacher.name_or_path={a['teacher']}", f"model.name_or_path={a['student']}", *SHORT],
        ["quantize", f"model.name_or_path={a['distill']}", "model.trust_remote_code=true", "eval.source=null"],
    ]
    for args, out in zip(runs, a.values()):
        assert run_slm(*args, f"output_dir={out}", f"hydra.run.dir={root}/logs/{out.name}") == 0, args[0]
    return a


def test_every_artifact_names_its_parents_with_content_hashes(chain):
    expected = {
        "teacher": [],
        "student": [("teacher", "teacher")],
        "distill": [("teacher", "teacher"), ("student", "student")],
        "fp8": [("source", "distill")],
    }
    for name, parents in expected.items():
        meta = slm_json(chain[name])
        assert meta["content_hash"] == artifacts.content_hash(chain[name]), name
        got = [(p["role"], p["path"], p["hash"], p["stage"]) for p in meta["parents"]]
        want = [(role, str(chain[of].resolve()), artifacts.content_hash(chain[of]), slm_json(chain[of])["stage"])
                for role, of in parents]
        assert got == want, name
        assert meta["trust_remote_code"] is True, name
        assert artifacts.lineage_warnings(chain[name]) == [], name


def test_eval_and_quantize_warn_when_an_artifact_or_parent_changed(slm, tmp_path, capsys, chain, record_message):
    edited = {chain["teacher"] / "config.json", chain["distill"] / "generation_config.json"}
    saved = {path: path.read_text() for path in edited}
    try:
        for path in edited:  # the same settings, written differently: the files, and so the hashes, changed
            path.write_text(json.dumps(json.loads(saved[path]), indent=4))
        want = [
            f"{chain['distill']} changed since `slm distill` wrote it (content hash differs from slm.json)",
            f"parent teacher {chain['teacher'].resolve()} changed since {chain['distill']} was made from it",
        ]
        assert slm("eval", f"model.name_or_path={chain['distill']}", "data.test_size=4", "eval.max_new_tokens=4",
                   f"output_dir={tmp_path}/eval") == 0
        out = " ".join(record_message(capsys.readouterr().out).split())
        assert all(f"warning: {w}" in out for w in want), out[-3000:]
        assert "parent student" not in out  # unchanged parents are not flagged
        assert slm("quantize", f"model.name_or_path={chain['distill']}", "eval.source=null", f"output_dir={tmp_path}/fp8") == 0
        out = " ".join(capsys.readouterr().out.split())
        assert all(f"warning: {w}" in out for w in want), out[-3000:]
    finally:
        for path, text in saved.items():
            path.write_text(text)
    assert artifacts.lineage_warnings(chain["distill"]) == []
