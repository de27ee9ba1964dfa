"""README's "Coming from TRL, torchtune, axolotl or llm-compressor": every slm command in its tables is tried.

A training command is run with `--cfg job`: Hydra composes it and slm checks every key and value
(a misspelt key, a wrong group option or an impossible value exits 2), and nothing trains. The
`slm cp` lines run for real, and the files they write are the ones the `--config` lines read.
"""

import re
import shlex
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "deepspeed"


def _section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Coming from TRL, torchtune, axolotl or llm-compressor")
    end = text.index("\n## ", start + 3)
    return text[start:end]


def _slm_commands() -> list[str]:
    """The backticked `slm ...` snippets in the right-hand column of every table row."""
    commands = []
    for line in _section().splitlines():
        if not line.startswith("| ") or line.startswith("|---"):
            continue
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        if len(cells) != 2 or cells[1] == "slm" or cells[1].startswith("slm ("):
            continue  # a header row
        commands += [c for c in re.findall(r"`([^`]+)`", cells[1]) if c == "slm" or c.startswith("slm ")]
    return commands


COMMANDS = _slm_commands()


def test_the_section_has_every_table():
    assert len(COMMANDS) >= 25, COMMANDS
    for peer in ("trl sft", "tune cp", "tune run", "axolotl", "oneshot", "GKD"):
        assert peer in _section(), peer


@pytest.fixture
def user_folder(slm, tmp_path):
    """A folder as a user has it: the DeepSpeed JSON files the tables name, and the copies `slm cp` writes."""
    shutil.copy(FIXTURES / "zero2_auto.json", tmp_path / "ds_config.json")
    shutil.copy(FIXTURES / "zero2_auto.json", tmp_path / "zero2.json")
    for command in COMMANDS:
        if command.startswith("slm cp "):
            assert slm(*shlex.split(command)[1:]) == 0, command
    return tmp_path


@pytest.mark.parametrize("command", [c for c in COMMANDS if not c.startswith("slm cp ")])
def test_each_command_composes_and_validates(slm, user_folder, command, capsys):
    args = shlex.split(command)[1:]
    if not args:  # `slm`: the stages and recipes table
        assert slm() == 0
        assert "slm stages" in capsys.readouterr().out
        return
    assert slm(*args, "--cfg", "job") == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    for arg in args:  # every key=value on the line reached the resolved config
        if "=" in arg and not arg.startswith(("model=", "data=", "distill=", "quant=")):
            key, value = arg.split("=", 1)
            leaf = key.rsplit(".", 1)[-1]
            assert f"{leaf}:" in printed, (command, key)
