"""Safe loading: slm never runs code it reads (pickles, eval, config-driven instantiation, model code
shipped in a checkpoint) unless the user says model.trust_remote_code=true, and records it when they do."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.reliability.common import bpe_tokenizer, cli_env, model_folder, nothing_written

pytestmark = pytest.mark.reliability

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "slm_cli"

# pattern -> why it is banned from the package
BANNED = {
    r"trust_remote_code\s*=\s*True": "checkpoint code must run only when the user sets trust_remote_code=true",
    r"(?<![\w.])eval\(": "eval() runs arbitrary text as code",
    r"(?<![\w.])exec\(": "exec() runs arbitrary text as code",
    r"pickle\.loads?\(": "unpickling runs code from the file",
    r"yaml\.(unsafe_)?load\(": "yaml.load can build arbitrary objects; use yaml.safe_load",
    r"(?<![\w.])instantiate\(": "config-driven instantiation (_target_) turns a config into code",
    r"shell\s*=\s*True": "a shell would interpret paths and overrides",
    r"os\.system\(": "a shell would interpret paths and overrides",
}


def sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_the_package_has_no_unsafe_calls():
    found = []
    for path in sources():
        text = path.read_text()
        for pattern, why in BANNED.items():
            for m in re.finditer(pattern, text):
                line = text.count("\n", 0, m.start()) + 1
                found.append(f"{path.relative_to(ROOT)}:{line}: {m.group(0)} ({why})")
        # torch.load unpickles unless told weights_only=True
        for m in re.finditer(r"torch\.load\(", text):
            call = text[m.end(): text.find(")", m.end()) + 1]
            if "weights_only=True" not in call:
                found.append(f"{path.relative_to(ROOT)}: torch.load without weights_only=True")
    assert found == [], "\n".join(found)
    assert len(sources()) > 40  # the scan did see the package


def test_shipped_configs_and_recipes_instantiate_nothing():
    """No `_target_` (Hydra's object factory) or hydra.callbacks in what slm ships."""
    files = [*(ROOT / "configs").rglob("*.yaml"), *(ROOT / "recipes").rglob("*.yaml")]
    assert files
    bad = [str(f.relative_to(ROOT)) for f in files if re.search(r"_target_|callbacks", f.read_text())]
    assert bad == []


def test_target_keys_are_rejected_not_instantiated(slm, tmp_path, capsys):
    out = tmp_path / "out"
    marker = tmp_path / "ran"
    # were it instantiated, pathlib.Path(marker).touch would not even be reached: validation stops first
    assert slm("quantize", f"model.name_or_path={tmp_path}", "+_target_=pathlib.Path", f"+_args_=[{marker}]", f"output_dir={out}") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "unknown key '_target_'" in err and "unknown key '_args_'" in err
    assert not marker.exists() and nothing_written(out)


@pytest.fixture
def ships_code(tmp_path):
    """A model folder whose config.json maps the model to its own code (auto_map), code that leaves a
    file behind when it runs, and whose slm.json claims trust_remote_code=true."""
    folder = model_folder(tmp_path / "ships_code", bpe_tokenizer())
    sentinel = tmp_path / "code_ran"
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "custom.py").write_text(
        f"import pathlib\npathlib.Path({str(sentinel)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n\n\n"
        "class CustomConfig(LlamaConfig):\n    pass\n\n\n"
        "class CustomModel(LlamaForCausalLM):\n    config_class = CustomConfig\n"
    )
    (folder / "slm.json").write_text(json.dumps({"slm_version": "0.1.0", "stage": "teacher", "trust_remote_code": True}))
    return folder, sentinel


def test_the_sentinel_runs_when_code_is_trusted(tmp_path, ships_code):
    """Control: the folder's code does run (and leaves its file) when trust_remote_code=True is passed."""
    folder, sentinel = ships_code
    code = f"from transformers import AutoConfig; AutoConfig.from_pretrained({str(folder)!r}, trust_remote_code=True)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=cli_env(HF_MODULES_CACHE=str(tmp_path / "hf_modules")))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sentinel.read_text() == "ran"


def test_checkpoint_code_never_runs_without_the_user_flag(slm, tmp_path, capsys, ships_code, record_message):
    folder, sentinel = ships_code
    # slm eval model.name_or_path=: the artifact's own slm.json cannot grant itself trust
    out = tmp_path / "eval"
    assert slm("eval", f"model.name_or_path={folder}", "data.test_size=4", f"output_dir={out}") == 2
    err = " ".join(record_message(capsys.readouterr().err).split())
    assert f"model.name_or_path={folder} ships its own model code (auto_map in config.json)" in err
    assert "If you trust its source, add model.trust_remote_code=true" in err
    assert nothing_written(out)
    # the other stages load the built-in architecture named by model_type, never the folder's code
    out = tmp_path / "fp8"
    assert slm("quantize", f"model.name_or_path={folder}", "eval.source=null", f"output_dir={out}") == 0
    assert json.loads((out / "slm.json").read_text())["trust_remote_code"] is False
    assert not sentinel.exists()
