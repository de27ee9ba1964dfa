"""Your own config file: `recipe=FILE.yaml` / `--config FILE.yaml`, `slm cp`, and `slm run --cfg job`'s stage list."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from slm_cli.__main__ import STAGES
from slm_cli.cp import shipped
from slm_cli.paths import CONFIG_DIR, RECIPE_DIR
from slm_cli.pipeline import load_recipe
from tests.stages.helpers import FAST, meta

RUNNABLE = [s for s, (m, _) in STAGES.items() if m and s != "run"]
COPIES = shipped(RUNNABLE)
PRESET = "defaults:\n  - /teacher\n  - override /deepspeed: zero1\n  - _self_\ntrain:\n  max_steps: 7\n"


def _job(capsys, slm, *args) -> tuple[int, str, str]:
    """`slm <args> --cfg job` in-process: exit code, stdout, stderr."""
    capsys.readouterr()
    code = slm(*args, "--cfg", "job")
    out = capsys.readouterr()
    return code, out.out, out.err


def _config(text: str) -> dict:
    return yaml.safe_load(text)  # the stage list slm run adds is YAML comments, so the whole output still parses


def test_cp_writes_an_editable_copy_and_refuses_to_overwrite(slm, tmp_path, capsys):
    assert slm("cp", "teacher", "mine.yaml") == 0
    text = (tmp_path / "mine.yaml").read_text()
    shipped_text = (CONFIG_DIR / "teacher.yaml").read_text()
    assert text.endswith(shipped_text) and "slm teacher --config mine.yaml" in text.splitlines()[1]
    (tmp_path / "mine.yaml").write_text("edited\n")
    capsys.readouterr()
    assert slm("cp", "teacher", "mine.yaml") == 2
    assert "mine.yaml exists; slm cp will not overwrite it" in capsys.readouterr().err
    assert (tmp_path / "mine.yaml").read_text() == "edited\n"
    assert slm("cp", "teacher/tiny-zero2-offload", "mine.yaml", "--force") == 0
    assert (tmp_path / "mine.yaml").read_text().endswith((RECIPE_DIR / "teacher" / "tiny-zero2-offload.yaml").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.yaml"]  # no temporary file left beside it
    capsys.readouterr()
    assert slm("cp", "teacher", "/sys/x.yaml") == 2  # a folder nobody may write in, root included
    assert "could not write /sys/x.yaml: Permission denied" in capsys.readouterr().err

    (tmp_path / "sub").mkdir()
    assert slm("cp", "quickstart", "sub") == 0  # a folder: the file keeps the recipe's name
    copied = yaml.safe_load((tmp_path / "sub" / "quickstart.yaml").read_text())
    assert copied["output_root"] == "runs/quickstart"  # named after the copy, so it never writes over the shipped run's folder
    assert slm("cp", "quickstart", "q.yaml") == 0
    assert yaml.safe_load((tmp_path / "q.yaml").read_text())["output_root"] == "runs/q"
    assert slm("cp", "quickstart", "#1: x.yaml") == 0  # a name YAML would cut at the '#' is quoted
    assert yaml.safe_load((tmp_path / "#1: x.yaml").read_text())["output_root"] == "runs/#1: x"
    capsys.readouterr()
    assert slm("cp", "teacher", str(CONFIG_DIR / "teacher.yaml"), "--force") == 2
    assert "is the shipped file itself" in capsys.readouterr().err

    capsys.readouterr()
    assert slm("cp", "teachr", "x.yaml") == 2
    assert "nothing shipped is called 'teachr'. Did you mean 'teacher'?" in capsys.readouterr().err
    assert slm("cp", "teacher", "x.yml") == 2
    assert "must end in .yaml" in capsys.readouterr().err
    assert slm("cp", "../configs/teacher", "x.yaml") == 2  # names only: nothing outside what is shipped
    assert slm("cp", "teacher") == 2
    assert "usage: slm cp" in capsys.readouterr().err
    assert slm("cp") == 0
    listed = capsys.readouterr().out
    assert "usage: slm cp" in listed and all(name in listed for name in ("teacher", "distill/sft_then_on_policy", "quickstart"))
    assert not (tmp_path / "x.yaml").exists()


@pytest.mark.parametrize("name", list(COPIES))
def test_every_shipped_config_and_recipe_copies_and_runs_as_the_original(slm, tmp_path, capsys, name):
    """`slm cp NAME f.yaml` then `--config f.yaml` composes exactly the config the shipped one does."""
    source, command = COPIES[name]
    stage = command.split()[1]
    assert slm("cp", name, "copy.yaml") == 0
    if stage == "run":
        copy, original = load_recipe(tmp_path / "copy.yaml", set(RUNNABLE)), load_recipe(source, set(RUNNABLE))
        assert copy.stages == original.stages and copy.inputs == original.inputs
        code, out, err = _job(capsys, slm, "run", "--config", "copy.yaml")
        assert code == 0, err
        assert _config(out)["recipe"] == "copy.yaml"
        assert [line.split(":")[0].strip("# ") for line in out.splitlines() if line.startswith("#   ")] == [s.name for s in copy.stages]
        return
    shipped_line = [] if source.parent == CONFIG_DIR else [f"recipe={source.stem}"]
    code, original, err = _job(capsys, slm, stage, *shipped_line)
    assert code == 0, err
    for line in (["--config", "copy.yaml"], ["recipe=copy.yaml"], [f"--config={tmp_path / 'copy.yaml'}"]):
        code, out, err = _job(capsys, slm, stage, *line)
        assert code == 0, err
        assert out == original


def test_a_preset_of_your_own_starts_from_the_stage_config(slm, tmp_path, capsys):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mine.yaml").write_text(PRESET)
    for line in (["recipe=sub/mine.yaml"], ["--config", "sub/mine.yaml"], ["--config", str(tmp_path / "sub" / "mine.yaml")]):
        code, out, err = _job(capsys, slm, "teacher", *line)
        assert code == 0, err
        cfg = _config(out)
        assert cfg["train"]["max_steps"] == 7 and cfg["deepspeed"]["zero_stage"] == 1  # from the file
        assert cfg["stage"] == "teacher" and cfg["train"]["lr"] == _config(_job(capsys, slm, "teacher")[1])["train"]["lr"]
    code, out, _ = _job(capsys, slm, "teacher", "--config", "sub/mine.yaml", "train.max_steps=3")
    assert code == 0 and _config(out)["train"]["max_steps"] == 3  # the command line still wins

    # the file's folder comes first on Hydra's search path: a group option beside it is usable by name
    (tmp_path / "sub" / "model").mkdir()
    option = yaml.safe_load((CONFIG_DIR / "model" / "tiny-llama.yaml").read_text())
    (tmp_path / "sub" / "model" / "mine.yaml").write_text(yaml.safe_dump({**option, "hidden_size": 48}))
    code, out, err = _job(capsys, slm, "teacher", "--config", "sub/mine.yaml", "model=mine")
    assert code == 0, err
    assert _config(out)["model"]["hidden_size"] == 48 and _config(out)["train"]["max_steps"] == 7


@pytest.mark.parametrize("args,files,message", [
    (["teacher", "--config", "nope.yaml"], {}, "nope.yaml: no such file"),
    (["teacher", "--config", "x.yml"], {"x.yml": PRESET}, "rename it to x.yaml"),
    (["teacher", "--config", "mine"], {}, "give a YAML file ending in .yaml (for a shipped recipe, use recipe=mine)"),
    (["teacher", "--config"], {}, "--config needs a file"),
    (["teacher", "--config", "a.yaml", "recipe=tiny-zero2-offload"], {"a.yaml": PRESET}, "give one --config or recipe="),
    (["teacher", "recipe=nope"], {}, "Recipes for `slm teacher`: smollm2-lora, tiny-zero2-offload; or give a file of yours"),
    (["teacher", "--config", "teacher.yaml"], {"teacher.yaml": PRESET}, "rename it, e.g. to my-teacher.yaml"),
    (["teacher", "--config", "p.yaml"], {"p.yaml": "stages: [{name: a, stage: teacher}]\n"},
     "p.yaml is a pipeline recipe (it has `stages:`); run it with: slm run --config p.yaml"),
    (["run", "--config", "mine.yaml"], {"mine.yaml": PRESET}, "run it with `slm <stage> --config mine.yaml`"),
    (["run", "--config", "nope.yaml"], {}, "recipe=nope.yaml: no such file"),
    (["run", "recipe=nope"], {}, "recipe=nope: no such pipeline recipe. Pipelines shipped in"),
    (["run", "--config", "p.yaml", "recipe=quickstart"], {"p.yaml": "stages: []\n"}, "both name the pipeline; give one"),
    (["run", "-m", "force=true,false", "--cfg", "job"], {}, "--cfg prints the config of one run; drop -m"),
])
def test_config_file_mistakes_are_clear_errors(slm, tmp_path, capsys, args, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert slm(*args) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert message in err, err
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "runs").exists()


def test_run_cfg_job_lists_the_stages_with_their_overrides(slm, tmp_path, capsys):
    code, out, err = _job(capsys, slm, "run", "recipe=distill/sft_then_on_policy", "inputs.teacher=t", "output_root=r")
    assert code == 0, err
    assert _config(out)["inputs"]["teacher"] == "t"
    stages = [line for line in out.splitlines() if line.startswith("#   ")]
    root = tmp_path / "r"
    assert stages == [
        f"#   supervised: slm distill distill=supervised train.max_steps=100 teacher.name_or_path={tmp_path / 't'} "
        f"'model.name_or_path=<inputs.student: not given>' output_dir={root / 'supervised'}",
        f"#   on_policy: slm distill distill=on_policy train.max_steps=50 distill.gen_max_new_tokens=16 "
        f"teacher.name_or_path={tmp_path / 't'} model.name_or_path={root / 'supervised'} output_dir={root / 'on_policy'}",
    ]
    assert not root.exists()  # printed, nothing run


def test_run_config_takes_any_file_name(slm, tmp_path, capsys):
    """A path with a space and a quote reaches the run config intact (it is quoted for Hydra's grammar)."""
    (tmp_path / "my dir").mkdir()
    assert slm("cp", "quickstart", "my dir/it's.yaml") == 0
    assert "run it with: slm run --config 'my dir/it'\"'\"'s.yaml'" in capsys.readouterr().out  # as a shell reads it
    code, out, err = _job(capsys, slm, "run", "--config", "my dir/it's.yaml")
    assert code == 0, err
    assert _config(out)["recipe"] == "my dir/it's.yaml" and "#   fp8: slm quantize" in out


def test_run_cfg_job_imports_nothing_heavy(tmp_path):
    code = (
        "import sys; from slm_cli.__main__ import main\n"
        "main(['run', '--cfg', 'job'])\n"
        "print('HEAVY', [m for m in ('torch', 'transformers', 'deepspeed', 'peft') if m in sys.modules])"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert "HEAVY []" in proc.stdout, proc.stdout + proc.stderr
    # the recipe's data: block comes first, then the stage's own overrides
    assert "#   fp8: slm quantize calibration.source=arithmetic eval.source=arithmetic quant=fp8_dynamic" in proc.stdout


def test_overview_names_cp_and_config(capsys):
    from slm_cli.__main__ import main

    assert main([]) == 0
    out = capsys.readouterr().out
    assert "cp" in out and "Write an editable copy of a shipped recipe or stage config" in out
    assert "[--config FILE.yaml]" in out and "slm cp <recipe or stage> FILE.yaml [--force]" in out


def test_a_copied_stage_config_runs_as_is(slm, tmp_path):
    """`slm cp teacher`, edit the copy, `slm teacher --config`: the artifact's config is the edited file's."""
    assert slm("cp", "teacher", "my-teacher.yaml") == 0
    path = tmp_path / "my-teacher.yaml"
    path.write_text(path.read_text().replace("\nseed: 0\n", "\nseed: 5\n"))
    out = tmp_path / "artifact"
    assert slm("teacher", "--config", "my-teacher.yaml", *FAST, "train.max_steps=2", f"output_dir={out}") == 0
    m = meta(out)
    assert m["stage"] == "teacher" and m["config"]["seed"] == 5 and m["config"]["train"]["max_steps"] == 2
