"""Never destroy what the user did not ask slm to write, and never publish a broken model.

- an output may never be, contain or lie inside an input of the run (symlinks resolved);
- `overwrite=true` replaces only slm's own output; anything else needs `overwrite=force`;
- `slm run` replaces only what that pipeline's stage wrote;
- publishing swaps the new artifact in with one atomic exchange: a kill at any point leaves the old
  or the new one, and the same command run again finishes cleanly;
- weights with NaN/inf are never published;
- the output lock is a kernel lock: a dead run's lock is free at once, two runs never both get it.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from slm_cli import artifacts
from tests.reliability.common import TEACHER, cli, cli_env, nothing_written, slm_json
from tests.stages.helpers import hold_lock, lock_holder

pytestmark = pytest.mark.reliability

QUANT = ["eval.source=null"]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def user_model(tmp_path: Path, folders, name: str = "my-model") -> Path:
    """A user's only copy of a fine-tuned model: a plain HF folder, no slm.json."""
    dst = tmp_path / name
    shutil.copytree(folders["teacher"], dst)
    return dst


# --- an output never touches an input ---------------------------------------------------------------

def test_quantize_into_its_own_source_is_refused_even_with_overwrite(slm, tmp_path, capsys, folders, record_message):
    model = user_model(tmp_path, folders)
    before = snapshot(model)
    assert slm("quantize", f"model.name_or_path={model}", f"output_dir={model}", "overwrite=true", *QUANT) == 2
    err = " ".join(record_message(capsys.readouterr().err).split())
    assert f"output_dir={model} is the input model.name_or_path={model}" in err and "Choose an output_dir outside every input" in err
    assert snapshot(model) == before  # the user's model, byte for byte
    assert not (tmp_path / "my-model.work").exists() and not (tmp_path / "my-model.lock").exists()


def test_teacher_writing_over_the_model_it_reads_is_refused(slm, tmp_path, capsys, folders):
    model = user_model(tmp_path, folders)
    before = snapshot(model)
    assert slm("teacher", "model=hf", f"model.name_or_path={model}", *TEACHER[4:], f"output_dir={model}", "overwrite=force") == 2
    assert f"is the input model.name_or_path={model}" in " ".join(capsys.readouterr().err.split())
    assert snapshot(model) == before


def test_an_output_that_contains_an_input_is_refused(slm, tmp_path, capsys, folders):
    model = user_model(tmp_path / "models", folders)
    (tmp_path / "models" / "slm.json").write_text("{}")  # even an slm-looking folder: it holds the input
    assert slm("quantize", f"model.name_or_path={model}", f"output_dir={tmp_path / 'models'}", "overwrite=true", *QUANT) == 2
    assert f"contains the input model.name_or_path={model}" in " ".join(capsys.readouterr().err.split())
    assert (model / "config.json").is_file()


def test_an_output_inside_an_input_is_refused(slm, tmp_path, capsys, folders):
    model = user_model(tmp_path, folders)
    before = snapshot(model)
    assert slm("quantize", f"model.name_or_path={model}", f"output_dir={model / 'fp8'}", *QUANT) == 2
    assert f"lies inside the input model.name_or_path={model}" in " ".join(capsys.readouterr().err.split())
    assert snapshot(model) == before


def test_a_symlink_to_the_input_is_the_input(slm, tmp_path, capsys, folders):
    model = user_model(tmp_path, folders)
    link = tmp_path / "link"
    link.symlink_to(model)
    before = snapshot(model)
    assert slm("quantize", f"model.name_or_path={model}", f"output_dir={link}", "overwrite=force", *QUANT) == 2
    assert f"output_dir={link} is the input model.name_or_path={model}" in " ".join(capsys.readouterr().err.split())
    assert snapshot(model) == before and link.is_symlink()


def test_an_output_holding_the_training_data_is_refused(slm, tmp_path, capsys):
    data_dir = tmp_path / "project"
    data_dir.mkdir()
    data = data_dir / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "completion": str(i + 1)}) + "\n" for i in range(64)))
    assert slm("teacher", *TEACHER, "data=jsonl", f"data.source={data}", f"output_dir={data_dir}", "overwrite=force") == 2
    assert f"contains the input data.source={data}" in " ".join(capsys.readouterr().err.split())
    assert data.is_file()


# --- overwrite replaces only slm's own output -------------------------------------------------------

def test_overwrite_true_refuses_a_folder_slm_did_not_write_and_force_replaces_it(slm, tmp_path, capsys, folders, record_message):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "ideas.md").write_text("my notes")
    args = ["quantize", f"model.name_or_path={folders['teacher']}", f"output_dir={notes}", *QUANT]
    assert slm(*args, "overwrite=true") == 2
    err = " ".join(record_message(capsys.readouterr().err).split())
    assert f"output_dir {notes} exists and was not written by slm" in err and "overwrite=force" in err
    assert (notes / "ideas.md").read_text() == "my notes"
    assert slm(*args, "overwrite=yes") == 2  # a typo is not consent
    assert "overwrite='yes': choose false, true" in " ".join(capsys.readouterr().err.split())
    assert slm(*args, "overwrite=force") == 0
    assert slm_json(notes)["stage"] == "quantize" and not (notes / "ideas.md").exists()
    # now it is slm's own artifact: overwrite=true replaces it
    assert slm(*args, "overwrite=true") == 0 and slm_json(notes)["stage"] == "quantize"


def test_result_folders_are_replaced_only_when_slm_wrote_them(slm, tmp_path, capsys, teacher_artifact):
    out = tmp_path / "report"
    args = ["report", f"artifacts=[{teacher_artifact}]", f"output_dir={out}"]
    assert slm(*args) == 0
    first = json.loads((out / "report.json").read_text())
    assert first["slm_output"]["stage"] == "report"
    assert slm(*args, "overwrite=true") == 0  # slm's own report
    (out / "report.json").unlink()
    (out / "mine.txt").write_text("x")
    assert slm(*args, "overwrite=true") == 2  # no longer recognisable as slm's
    assert (out / "mine.txt").read_text() == "x"


def test_a_users_files_named_like_slms_work_folder_and_lock_are_never_touched(slm, tmp_path, capsys, folders):
    out = tmp_path / "model"
    (tmp_path / "model.work").mkdir()
    (tmp_path / "model.work" / "thesis.tex").write_text("years of work")
    args = ["quantize", f"model.name_or_path={folders['teacher']}", f"output_dir={out}", *QUANT]
    assert slm(*args) == 2
    assert f"{tmp_path / 'model.work'} exists and is not slm's work folder" in " ".join(capsys.readouterr().err.split())
    assert (tmp_path / "model.work" / "thesis.tex").read_text() == "years of work"
    shutil.rmtree(tmp_path / "model.work")
    (tmp_path / "model.lock").write_text("my lock-in notes\nline two")
    assert slm(*args) == 2
    assert "is not an slm lock file" in " ".join(capsys.readouterr().err.split())
    assert (tmp_path / "model.lock").read_text() == "my lock-in notes\nline two" and not out.exists()


# --- slm run replaces only what its own stage wrote -------------------------------------------------

def one_stage_recipe(tmp_path: Path) -> Path:
    recipe = tmp_path / "fp8_only.yaml"
    recipe.write_text(
        "inputs: {teacher: null}\n"
        "stages:\n"
        "  - name: fp8\n    stage: quantize\n    overrides: [eval.source=null]\n    inputs: {model.name_or_path: teacher}\n"
    )
    return recipe


def test_slm_run_never_replaces_a_users_folder(slm, tmp_path, capsys, folders, record_message):
    root = tmp_path / "runs"
    (root / "fp8").mkdir(parents=True)
    (root / "fp8" / "notes.md").write_text("mine")
    args = ["run", f"recipe={one_stage_recipe(tmp_path)}", f"inputs.teacher={folders['teacher']}", f"output_root={root}", "report=false"]
    assert slm(*args) == 2
    err = " ".join(record_message(capsys.readouterr().err).split())
    assert f"{root / 'fp8'} exists and was not written by this pipeline's stage 'fp8'" in err
    assert (root / "fp8" / "notes.md").read_text() == "mine"

    shutil.rmtree(root / "fp8")
    assert slm(*args) == 0
    meta = slm_json(root / "fp8")
    assert meta["pipeline"] == {"root": str(root.resolve()), "name": "fp8"}
    assert slm(*args, "force=true") == 0  # its own artifact: replaced
    # another pipeline's artifact at the same place is not this pipeline's
    other = tmp_path / "other"
    shutil.copytree(root, other)
    meta["pipeline"]["root"] = str(tmp_path / "elsewhere")
    (other / "fp8" / "slm.json").write_text(json.dumps(meta))
    assert slm("run", *args[1:3], f"output_root={other}", "report=false", "force=true") == 2


# --- publishing is one atomic step -----------------------------------------------------------------

@pytest.fixture(scope="module")
def weight_only_fp8(tmp_path_factory, folders):
    """An FP8 weight-only artifact of the battery's model: the old artifact the tests below replace."""
    root = tmp_path_factory.mktemp("fp8-old")
    out = root / "fp8"
    args = ["quantize", f"model.name_or_path={folders['teacher']}", f"output_dir={out}", *QUANT, "quant.scheme=fp8_weight_only",
            f"hydra.run.dir={root}/logs"]
    assert cli(args, cwd=root).returncode == 0
    return out


@pytest.mark.parametrize("point", ["publish:before-swap", "publish:after-swap", "publish:after-rename"])
def test_a_kill_while_publishing_leaves_old_or_new_and_the_rerun_finishes(tmp_path, folders, weight_only_fp8, point):
    """SIGKILL at each point of publishing over an existing artifact, then the same command again."""
    src = folders["teacher"]
    out = tmp_path / "fp8"
    shutil.copytree(weight_only_fp8, out)
    base = ["quantize", f"model.name_or_path={src}", f"output_dir={out}", *QUANT, f"hydra.run.dir={tmp_path}/logs"]
    old = snapshot(out)
    cmd = [*base, "overwrite=true"]  # the new artifact: another scheme over the old one
    killed = cli(cmd, cwd=tmp_path, env=cli_env(SLM_TEST_KILL_AT=point))
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (out / "slm.json").is_file()  # never neither
    scheme = slm_json(out)["config"]["quant"]["scheme"]
    assert (snapshot(out) == old) == (point == "publish:before-swap")
    assert scheme == ("fp8_weight_only" if point == "publish:before-swap" else "fp8_dynamic")
    rerun = cli(cmd, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert slm_json(out)["config"]["quant"]["scheme"] == "fp8_dynamic"
    assert not (tmp_path / "fp8.work").exists() and not (tmp_path / "fp8.lock").exists()
    if point != "publish:before-swap":
        assert "already holds the artifact of this command" in " ".join(rerun.stdout.split())


def test_a_kill_after_publishing_a_new_output_then_the_same_command(tmp_path, folders):
    out = tmp_path / "fp8"
    cmd = ["quantize", f"model.name_or_path={folders['teacher']}", f"output_dir={out}", *QUANT, f"hydra.run.dir={tmp_path}/logs"]
    assert cli(cmd, cwd=tmp_path, env=cli_env(SLM_TEST_KILL_AT="publish:after-rename")).returncode == -9
    assert (tmp_path / "fp8.work").exists()  # the kill came before the cleanup
    rerun = cli(cmd, cwd=tmp_path)  # no overwrite: the same command, as the user typed it
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert not (tmp_path / "fp8.work").exists() and slm_json(out)["stage"] == "quantize"


def test_the_leftovers_of_a_finished_publish_never_block_the_next_run(tmp_path):
    """Killed after publishing, before deleting its checkpoints: another config over it must not read them
    as an unfinished run of its own."""
    out = tmp_path / "teacher"
    base = ["teacher", *TEACHER, f"output_dir={out}", f"hydra.run.dir={tmp_path}/logs"]
    killed = cli([*base, "train.max_steps=4", "train.save_every=2"], cwd=tmp_path, env=cli_env(SLM_TEST_KILL_AT="publish:after-rename"))
    assert killed.returncode == -9 and (tmp_path / "teacher.work" / "checkpoints").is_dir()
    rerun = cli([*base, "train.max_steps=3", "overwrite=true"], cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert slm_json(out)["config"]["train"]["max_steps"] == 3 and not (tmp_path / "teacher.work").exists()


def test_exchange_swaps_two_folders(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("new")
    (b / "x").write_text("old")
    artifacts._exchange(a, b)
    assert (b / "x").read_text() == "new" and (a / "x").read_text() == "old"


# --- no NaN/inf weights are ever published -----------------------------------------------------------

def test_non_finite_weights_are_never_published(slm, tmp_path, capsys, folders, record_message):
    model = user_model(tmp_path, folders, "broken")
    weights = load_file(str(model / "model.safetensors"))
    name = next(k for k in weights if k.endswith("mlp.down_proj.weight"))
    weights[name][0, 0] = float("nan")
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "fp8"
    code = slm("quantize", f"model.name_or_path={model}", f"output_dir={out}", "quant.ignore=[lm_head,'re:.*down_proj']", *QUANT)
    err = " ".join(record_message(capsys.readouterr().err).split())
    assert code == 2 and "NaN or inf" in err and "Traceback" not in err
    assert nothing_written(out)


def test_check_finite_names_the_tensor(tmp_path):
    save_file({"a": torch.ones(2), "b": torch.tensor([1.0, float("inf")]), "i": torch.tensor([1, 2])}, str(tmp_path / "m.safetensors"))
    with pytest.raises(artifacts.SlmError, match=r"NaN or inf weights \(b\)"):
        artifacts.check_finite(tmp_path)
    save_file({"a": torch.ones(2, dtype=torch.bfloat16)}, str(tmp_path / "m.safetensors"))
    artifacts.check_finite(tmp_path)


# --- output locations that cannot be written ---------------------------------------------------------

def test_an_output_under_a_file_is_a_clear_error(slm, tmp_path, capsys, folders):
    (tmp_path / "plain").write_text("a file")
    assert slm("quantize", f"model.name_or_path={folders['teacher']}", f"output_dir={tmp_path / 'plain' / 'fp8'}", *QUANT) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"cannot create output_dir {tmp_path / 'plain' / 'fp8'}" in err and "Choose an output_dir in a folder you can write" in err
    assert (tmp_path / "plain").read_text() == "a file"


def test_an_output_on_a_read_only_file_system_is_a_clear_error(slm, tmp_path, capsys, folders):
    target = Path("/sys/slm-test-output")  # sysfs: no files can be made there, even by root
    try:
        target.with_name("slm-test-probe").mkdir()
    except OSError:
        pass
    else:
        target.with_name("slm-test-probe").rmdir()
        pytest.skip("/sys accepts new folders here: no unwritable location to test with")
    assert slm("quantize", f"model.name_or_path={folders['teacher']}", f"output_dir={target}", *QUANT) == 2
    assert f"cannot create output_dir {target}" in " ".join(capsys.readouterr().err.split())


# --- the output lock ----------------------------------------------------------------------------------

def test_a_live_run_holds_the_lock_and_is_named(slm, tmp_path, capsys, folders, record_message):
    out = tmp_path / "fp8"
    owner = hold_lock(out)
    try:
        assert slm("quantize", f"model.name_or_path={folders['teacher']}", f"output_dir={out}", *QUANT) == 2
        err = " ".join(record_message(capsys.readouterr().err).split())
        assert f"another slm run ({platform.node()} pid {owner.pid}) is writing output_dir {out}" in err
        assert not out.exists()
    finally:
        owner.stdin.close()
        owner.wait()
    assert not (tmp_path / "fp8.lock").exists()  # released by its owner


def test_a_lock_file_naming_a_live_but_unrelated_pid_is_not_held(slm, tmp_path, folders):
    """A killed run's lock file may name a pid the system has since given to another process."""
    out = tmp_path / "fp8"
    (tmp_path / "fp8.lock").write_text(f"{platform.node()} {os.getpid()}")  # alive, but holds no lock
    assert slm("quantize", f"model.name_or_path={folders['teacher']}", f"output_dir={out}", *QUANT) == 0
    assert slm_json(out)["stage"] == "quantize" and not (tmp_path / "fp8.lock").exists()


def test_racing_runs_never_both_take_a_stale_lock(tmp_path):
    """Four processes go for the same stale lock at once, ten times: exactly one wins each time."""
    for round_ in range(10):
        out = tmp_path / f"out{round_}"
        (tmp_path / f"out{round_}.lock").write_text(f"{platform.node()} 999999999")  # its owner is long gone
        procs = [lock_holder(out) for _ in range(4)]
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        answers = [p.stdout.readline().split()[0] for p in procs]
        for p in procs:
            p.stdin.close()
            p.wait()
        assert sorted(answers) == ["got", "refused", "refused", "refused"], (round_, answers)


# --- DeepSpeed's op builds belong to the environment -------------------------------------------------

def test_op_builds_go_to_this_environment(monkeypatch):
    import sys

    from slm_cli.engine import ops

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    path = ops.use_private_extensions_dir()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(path)
    assert path.is_relative_to(Path(sys.prefix)) or "slm-torch-extensions" in str(path)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/somewhere/else")  # the user's own choice wins
    assert ops.use_private_extensions_dir() == Path("/somewhere/else")


def test_a_refused_run_leaves_no_hydra_run_folder(slm, tmp_path, capsys):
    """Errors found inside a stage (after Hydra made its run folder) leave nothing either."""
    assert slm("quantize", f"model.name_or_path={tmp_path / 'missing'}", *QUANT) == 2
    assert "no such folder" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_an_error_message_is_printed_as_written(slm, tmp_path, capsys):
    """Square brackets in a message are text, not rich markup."""
    from slm_cli.runner import fail

    with pytest.raises(SystemExit):
        fail("use key=[value1,value2] and [bold]x[/bold]")
    assert "use key=[value1,value2] and [bold]x[/bold]" in capsys.readouterr().err
