"""`slm run recipe=<name>`: run a pipeline recipe's stages in order.

Each stage runs as its own `slm <stage>` process (so each gets its own DeepSpeed launch, as
configured), reading earlier artifacts and writing <output_root>/<name>. Stages already done
with the same config and inputs are skipped; `force=true` redoes them. A failing stage stops
the run with its exit code; every artifact finished before it stays as it was.
"""

from __future__ import annotations

import hydra

from slm_cli.config.schema import RunStageConfig
from slm_cli.paths import CONFIG_DIR
from slm_cli.runner import run_stage


@hydra.main(config_path=str(CONFIG_DIR), config_name="run", version_base="1.3")
def main(cfg) -> None:
    run_stage(cfg, RunStageConfig, run)


def print_plan(args: list[str]) -> None:
    """`slm run --cfg job`: after the run config Hydra printed, the stages it runs, each as the command
    line `slm run` will give it (overrides, input artifacts, output folder), as YAML comments."""
    import shlex
    from pathlib import Path

    from slm_cli import pipeline
    from slm_cli.__main__ import STAGES
    from slm_cli.config import ConfigError
    from slm_cli.config.precheck import check_command_line
    from slm_cli.errors import SlmError
    from slm_cli.paths import RECIPE_DIR
    from slm_cli.runner import fail

    # the same config without --cfg: composed and validated, as the run itself would be
    line, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in ("--cfg", "-c"):
            skip = True
        elif not a.startswith("--cfg="):
            line.append(a)
    available = {s for s, (module, _) in STAGES.items() if module and s != "run"}
    try:
        for cfg in check_command_line("run", line, RunStageConfig):
            recipe = pipeline.load_recipe(pipeline.find_recipe(cfg.recipe, RECIPE_DIR), available)
            root = Path(cfg.output_root or recipe.output_root)
            given = {**recipe.inputs, **{k: v for k, v in cfg.inputs.items() if v is not None}}
            print(f"# the stages this runs, in order ({recipe.path} -> {root}):")
            for spec, sources, out in pipeline.plan(recipe, root, given):
                missing = {k: spec.inputs[k] for k, p in sources.items() if p is None}
                known = {k: p for k, p in sources.items() if p is not None}
                words = ["slm", spec.stage, *pipeline.stage_overrides(spec, known, out)]
                words[-1:-1] = [f"{k}=<inputs.{src}: not given>" for k, src in missing.items()]
                print(f"#   {spec.name}: {shlex.join(words)}")
    except (ConfigError, SlmError) as exc:
        fail(str(exc))


def run(cfg: RunStageConfig, resolved: dict) -> dict:
    import json
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    from slm_cli import pipeline, ui
    from slm_cli.__main__ import STAGES
    from slm_cli.artifacts import PIPELINE_ENV, content_hash
    from slm_cli.engine.launcher import RENDEZVOUS_VARS
    from slm_cli.errors import SlmError
    from slm_cli.paths import RECIPE_DIR

    # --- setup -------------------------------------------------------------------------------
    available = {s for s, (module, _) in STAGES.items() if module and s != "run"}
    recipe = pipeline.load_recipe(pipeline.find_recipe(cfg.recipe, RECIPE_DIR), available)
    root = Path(cfg.output_root or recipe.output_root)
    given = {**recipe.inputs, **{k: v for k, v in cfg.inputs.items() if v is not None}}
    needed = {src for spec in recipe.stages for src in spec.inputs.values() if src in recipe.inputs}
    missing = sorted(n for n in needed if not given.get(n))
    if missing:
        raise SlmError(f"recipe {cfg.recipe} needs " + ", ".join(f"inputs.{n}=<artifact folder>" for n in missing) + ".")
    for n in needed:
        if not Path(given[n]).is_dir():
            raise SlmError(f"inputs.{n}={given[n]}: no such artifact folder.")
    state = pipeline.read_state(root)
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARS}
    ui.console.print(f"[bold]pipeline[/bold] {recipe.path} -> {root} ({len(recipe.stages)} stages)")

    # --- run ---------------------------------------------------------------------------------
    outputs: dict[str, Path] = {n: Path(p) for n, p in given.items() if p}
    summary = []
    for spec, sources, out in pipeline.plan(recipe, root, given):
        key = pipeline.run_key(spec, {k: content_hash(p) for k, p in sources.items()})
        if not cfg.force and pipeline.is_done(state, spec.name, key, out):
            ui.console.print(f"[green]✓[/green] {spec.name} ({spec.stage}): up to date, skipped")
            summary.append({"stage": spec.name, "runs": spec.stage, "status": "skipped", "seconds": 0.0})
            outputs[spec.name] = out
            continue
        tag = {"root": str(root.resolve()), "name": spec.name}
        replace = _may_replace(out, tag, spec.name)
        cmd = [sys.executable, "-m", "slm_cli", spec.stage, *pipeline.stage_overrides(spec, sources, out),
               f"hydra.run.dir={(root / 'logs' / spec.name).resolve()}", *(["overwrite=true"] if replace else [])]
        ui.console.rule(f"{spec.name}: slm {spec.stage}")
        t0 = time.perf_counter()
        code = subprocess.call(cmd, env={**env, PIPELINE_ENV: json.dumps(tag)})
        seconds = time.perf_counter() - t0
        if code != 0:
            done = [s["stage"] for s in summary]
            raise SlmError(
                f"stage {spec.name!r} (slm {spec.stage}) failed with exit code {code} after {seconds:.0f}s. "
                f"Finished artifacts are kept ({', '.join(done) or 'none'}); fix the cause and run the same "
                f"`slm run recipe={cfg.recipe}` again to continue from {spec.name!r}."
            )
        state[spec.name] = {"key": key, "content_hash": content_hash(out), "output": str(out), "stage": spec.stage}
        pipeline.write_state(root, state)
        outputs[spec.name] = out
        summary.append({"stage": spec.name, "runs": spec.stage, "status": "ran", "seconds": round(seconds, 1)})

    # --- save --------------------------------------------------------------------------------
    ui.console.print(ui.records_table(f"pipeline {cfg.recipe}", summary, ["stage", "runs", "status", "seconds"]))
    models_made = [outputs[s.name] for s in recipe.stages if (outputs[s.name] / "slm.json").is_file()]
    if models_made and cfg.report:  # eval stages write results, not models
        from slm_cli.report import write_report

        report_dir = root / "report"
        report = write_report(models_made, report_dir, title=f"slm run recipe={cfg.recipe}",
                              overwrite=_may_replace(report_dir, None, "report"))
        ui.console.print(f"report: {root / 'report'} ({', '.join(Path(f).name for f in report.get('files', []))})")
    return {"stages": summary}


def _may_replace(out, tag: dict | None, name: str) -> bool:
    """Whether `slm run` may replace what is at `out`: only an output it wrote itself for this stage.

    A stage's slm.json (or result file) records the pipeline root and stage name that wrote it;
    anything else there (a user's own folder, another pipeline's artifact) is refused, never replaced.
    The report, written by the runner itself, is recognised by its stamp.
    """
    import os

    from slm_cli.artifacts import owner_of
    from slm_cli.errors import SlmError

    if not os.path.lexists(out):
        return False
    owner = owner_of(out) if out.is_dir() else None
    ours = owner is not None and (owner.get("pipeline") == tag if tag else owner.get("stage") == "report")
    if not ours:
        raise SlmError(
            f"{out} exists and was not written by this pipeline's stage {name!r}, so `slm run` will not replace it. "
            "Move it away, or choose another output_root=..."
        )
    return True
