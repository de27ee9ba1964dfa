"""`slm run`: a pipeline runs each stage once, skips finished ones, re-runs what changed, stops on failure."""

import json

import yaml

from tests.stages.helpers import FAST, meta

TINY = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=1", *FAST, "train.max_steps=3"]


def _recipe(path, student_lr="3e-3", distill_teacher="teacher"):
    path.write_text(yaml.safe_dump({
        "output_root": str(path.parent / "out"),
        "stages": [
            {"name": "teacher", "stage": "teacher", "overrides": ["model=tiny-llama", *TINY]},
            {"name": "student", "stage": "student", "overrides": ["model=tiny-llama-student", *TINY, f"train.lr={student_lr}"],
             "inputs": {"teacher.name_or_path": "teacher"}},
            {"name": "kd", "stage": "distill", "overrides": [*TINY[3:]],
             "inputs": {"teacher.name_or_path": distill_teacher, "model.name_or_path": "student"}},
        ],
    }))
    return path


def _statuses(capsys):
    out = capsys.readouterr().out
    return {name: ("skipped" if f"{name} (" in out and "up to date" in out.split(f"{name} (")[1].split("\n")[0] else "ran")
            for name in ("teacher", "student", "kd")}


def test_pipeline_runs_skips_and_reruns_what_changed(slm, tmp_path, capsys):
    recipe = _recipe(tmp_path / "p.yaml")
    assert slm("run", f"recipe={recipe}") == 0
    out = tmp_path / "out"
    assert [meta(out / n)["stage"] for n in ("teacher", "student", "kd")] == ["teacher", "student", "distill"]
    state = json.loads((out / "pipeline.json").read_text())
    assert set(state) == {"teacher", "student", "kd"}
    capsys.readouterr()

    hashes = {n: meta(out / n)["content_hash"] for n in state}
    assert slm("run", f"recipe={recipe}") == 0
    assert _statuses(capsys) == {"teacher": "skipped", "student": "skipped", "kd": "skipped"}
    assert {n: meta(out / n)["content_hash"] for n in state} == hashes

    _recipe(recipe, student_lr="1e-3")  # change one stage's override
    assert slm("run", f"recipe={recipe}") == 0
    assert _statuses(capsys) == {"teacher": "skipped", "student": "ran", "kd": "ran"}
    assert meta(out / "teacher")["content_hash"] == hashes["teacher"]
    assert meta(out / "student")["content_hash"] != hashes["student"]

    assert slm("run", f"recipe={recipe}", "force=true") == 0
    assert _statuses(capsys) == {"teacher": "ran", "student": "ran", "kd": "ran"}


def test_failing_stage_stops_and_keeps_earlier_artifacts(slm, tmp_path, capsys):
    recipe = tmp_path / "p.yaml"
    recipe.write_text(yaml.safe_dump({
        "output_root": str(tmp_path / "out"),
        "stages": [
            {"name": "teacher", "stage": "teacher", "overrides": ["model=tiny-llama", *TINY]},
            {"name": "broken", "stage": "student", "overrides": ["model=tiny-llama-student", *TINY, "student.init=teacher_layers",
                                                                 "student.layers=[0,7]"], "inputs": {"teacher.name_or_path": "teacher"}},
        ],
    }))
    assert slm("run", f"recipe={recipe}") == 2
    err = capsys.readouterr().err
    assert "stage 'broken' (slm student) failed" in err and "Finished artifacts are kept (teacher)" in err
    assert (tmp_path / "out" / "teacher" / "slm.json").is_file()
    assert not (tmp_path / "out" / "broken").exists()


def test_bad_recipe_lists_every_problem(slm, tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump({"stages": [
        {"name": "a", "stage": "teachr"},
        {"name": "b", "stage": "student", "inputs": {"teacher.name_or_path": "later"}, "overrides": ["output_dir=x"]},
    ]}))
    assert slm("run", f"recipe={recipe}") == 2
    err = capsys.readouterr().err
    assert "stage='teachr' is not one of" in err
    assert "input teacher.name_or_path='later' names no earlier stage" in err
    assert "override 'output_dir=x' is set by the pipeline" in err


def test_recipe_may_not_add_hydra_callbacks(slm, tmp_path, capsys):
    recipe = tmp_path / "cb.yaml"
    recipe.write_text(yaml.safe_dump({"stages": [
        {"name": "a", "stage": "teacher", "overrides": ["+hydra.callbacks.x._target_=os.system"]},
    ]}))
    assert slm("run", f"recipe={recipe}") == 2
    assert "recipes may not add Hydra callbacks" in capsys.readouterr().err
