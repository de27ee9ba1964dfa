"""The `slm` command: pop the stage word and hand the rest of the line to that stage's own `@hydra.main`.

Keeping each stage's Hydra entry point intact keeps Hydra's whole grammar working
(`key=value`, `group=option`, `-m` sweeps, `--cfg job`, `--help`, `hydra.run.dir=`).
Nothing here imports torch: `slm`, `--help` and `--cfg job` answer instantly.
"""

from __future__ import annotations

import difflib
import importlib
import re
import sys
from pathlib import Path

from slm_cli.paths import RECIPE_DIR

# stage word -> (module with a hydra `main`, or None while not yet available; what it does)
STAGES: dict[str, tuple[str | None, str]] = {
    "teacher": ("slm_cli.stages.teacher", "Fine-tune the teacher on the task (SFT, DeepSpeed)"),
    "student": ("slm_cli.stages.student", "Build a small student (config, pretrained or teacher layers) and fine-tune it"),
    "distill": ("slm_cli.stages.distill", "Logit and on-policy distillation from a teacher"),
    "prune": ("slm_cli.stages.prune", "Structured pruning of heads, MLP neurons and layers (OSSCAR), checked and measured"),
    "quantize": ("slm_cli.stages.quantize", "FP8 checkpoints in the compressed-tensors format vLLM reads"),
    "eval": ("slm_cli.stages.eval", "Perplexity, exact match and AUC of any artifact"),
    "bench": ("slm_cli.stages.bench", "Size, memory, latency, tokens/s and prefix-KV reuse of artifacts"),
    "report": ("slm_cli.stages.report", "Lineage table, report.md/.json and plot: quality vs size and latency"),
    "run": ("slm_cli.stages.run", "Run a multi-stage pipeline recipe, skipping stages already done"),
}


def _first_comment(path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def print_overview() -> None:
    from rich.table import Table

    from slm_cli.ui import console
    stages = Table(title="slm stages", title_justify="left")
    stages.add_column("stage", style="bold cyan")
    stages.add_column("what it does")
    stages.add_column("status")
    for name, (module, what) in STAGES.items():
        stages.add_row(name, what, "ready" if module else "[dim]not yet available[/dim]")
    stages.add_row("cp", "Write an editable copy of a shipped recipe or stage config, to run with --config", "ready")
    console.print(stages)
    recipes = Table(title="shipped recipes (recipes/)", title_justify="left")
    recipes.add_column("recipe", style="bold green")
    recipes.add_column("description")
    recipes.add_column("use with")
    for path in sorted(RECIPE_DIR.rglob("*.yaml")) if RECIPE_DIR.exists() else []:
        name = str(path.relative_to(RECIPE_DIR).with_suffix(""))
        if "stages:" in path.read_text():  # a pipeline
            use = f"slm run recipe={name}"
        else:
            use = f"slm {path.parent.name} recipe={path.stem}"
        recipes.add_row(name, _first_comment(path), use)
    console.print(recipes)
    console.print("usage: slm <stage> [key=value ...] [--config FILE.yaml] [-m] [--cfg job] [--help]", soft_wrap=True)
    console.print("       slm cp <recipe or stage> FILE.yaml [--force]   an editable copy; run it with --config FILE.yaml",
                  soft_wrap=True)


def _usage_error(message: str) -> None:
    print(f"slm: {message}", file=sys.stderr)
    sys.exit(2)


def is_config_file(value: str) -> bool:
    """`recipe=` and `--config` name a file when the value ends in .yaml (or .yml), else a shipped recipe."""
    return value.endswith((".yaml", ".yml"))


def _hydra_value(value: str) -> str:
    """A value as one Hydra override token: quoted when it holds characters Hydra's grammar would split on."""
    if re.fullmatch(r"[\w./+-]+", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _expand_recipe(stage: str, args: list[str]) -> list[str]:
    """`recipe=NAME`, `recipe=FILE.yaml` and `--config FILE.yaml` pick the config a stage starts from.

    For a stage, NAME is the preset recipes/<stage>/NAME.yaml and FILE a YAML file of your own (a copy
    from `slm cp`, or a preset whose defaults list starts from the stage's config: `- /teacher`); either
    becomes Hydra's `--config-dir/--config-name`, so every other override still applies. For `slm run`,
    both become the run config's `recipe=` (a pipeline: shipped name or file).
    """
    out, value = [], None
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--config" or a.startswith("--config="):
            if a == "--config":
                if i + 1 >= len(args):
                    _usage_error("--config needs a file: slm <stage> --config my.yaml [key=value ...]")
                given, i = args[i + 1], i + 2
            else:
                given, i = a.split("=", 1)[1], i + 1
            if value is not None:
                _usage_error(f"--config {given}: a config was already given ({value}); give one --config or recipe=")
            if not is_config_file(given):
                _usage_error(f"--config {given}: give a YAML file ending in .yaml (for a shipped recipe, use recipe={given})")
            value = given
            continue
        if a.startswith("recipe=") and stage != "run":
            if value is not None:
                _usage_error(f"{a}: a config was already given ({value}); give one --config or recipe=")
            value = a.split("=", 1)[1]
        else:
            out.append(a)
        i += 1
    if value is None:
        return out
    if stage == "run":
        if any(a.startswith("recipe=") for a in out):
            _usage_error(f"--config {value} and recipe= both name the pipeline; give one")
        return [f"recipe={_hydra_value(value)}", *out]
    if is_config_file(value):
        path = Path(value).expanduser()
        if path.suffix != ".yaml":
            _usage_error(f"{value}: Hydra reads config files ending in .yaml; rename it to {path.with_suffix('.yaml').name}")
        if not path.is_file():
            _usage_error(f"{value}: no such file (recipe= and --config take a YAML file of yours or a shipped preset name)")
        from slm_cli.pipeline import is_pipeline

        if is_pipeline(path):
            _usage_error(f"{value} is a pipeline recipe (it has `stages:`); run it with: slm run --config {value}")
        if _starts_from_itself(path):
            # Hydra puts the file's folder first on its search path, so `- /teacher` in teacher.yaml finds the
            # file itself instead of slm's config, and the run silently drops what the file sets.
            _usage_error(f"{value}: its defaults list starts from slm's /{path.stem} config, but the file's own name "
                         f"hides that config from Hydra; rename it, e.g. to my-{path.name}")
        return ["--config-dir", str(path.resolve().parent), "--config-name", path.stem, *out]
    path = RECIPE_DIR / stage / f"{value}.yaml"
    have = sorted(p.stem for p in (RECIPE_DIR / stage).glob("*.yaml"))
    if value not in have:  # a name, never a path: `recipe=../../x` must not reach a YAML outside recipes/
        _usage_error(f"no recipe {path}. Recipes for `slm {stage}`: {', '.join(have) or 'none'}; "
                     f"or give a file of yours: recipe=my.yaml (slm cp {stage} my.yaml writes one to edit).")
    return ["--config-dir", str(path.parent), "--config-name", value, *out]


def _starts_from_itself(path: Path) -> bool:
    """Whether the defaults list of `<name>.yaml` names the config `/<name>` (or `<name>`)."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError):
        return False  # Hydra reports a file it cannot read, with its own position
    defaults = data.get("defaults") if isinstance(data, dict) else None
    entries = [e for e in defaults if isinstance(e, str)] if isinstance(defaults, list) else []
    return any(e.removeprefix("optional ").strip().lstrip("/") == path.stem for e in entries)


def _check_command_line(stage: str, args: list[str]) -> None:
    """Misspelt keys and group options, invalid values and (for `slm run`) a recipe that fails its checks
    end here with exit 2, before Hydra makes a run folder."""
    from slm_cli.config import STAGE_SCHEMAS, ConfigError
    from slm_cli.config.precheck import check_command_line
    from slm_cli.errors import SlmError

    try:
        configs = check_command_line(stage, args, STAGE_SCHEMAS[stage])
        if stage == "run":
            from slm_cli import pipeline

            available = {s for s, (m, _) in STAGES.items() if m and s != "run"}
            for recipe in dict.fromkeys(cfg.recipe for cfg in configs):
                pipeline.load_recipe(pipeline.find_recipe(recipe, RECIPE_DIR), available)
    except (ConfigError, SlmError) as exc:
        from slm_cli.runner import fail

        fail(str(exc))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print_overview()
        return 0
    stage, rest = argv[0], argv[1:]
    if stage == "cp":
        from slm_cli import cp

        return cp.main(rest, [s for s, (m, _) in STAGES.items() if m and s != "run"])
    if stage not in STAGES:
        close = difflib.get_close_matches(stage, list(STAGES), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        print(f"slm: unknown stage '{stage}'.{hint} Stages: {', '.join(STAGES)} (and `slm cp`).", file=sys.stderr)
        return 2
    module, _ = STAGES[stage]
    if module is None:
        print(
            f"slm: stage '{stage}' is not yet available in this version of slm. "
            f"Available now: {', '.join(s for s, (m, _) in STAGES.items() if m)}.",
            file=sys.stderr,
        )
        return 2
    from slm_cli.engine.ops import use_private_extensions_dir

    use_private_extensions_dir()  # before anything can build a DeepSpeed op, here or in a launched rank
    rest = _expand_recipe(stage, rest)
    if _printed_config(rest) and ("-m" in rest or "--multirun" in rest):
        _usage_error("--cfg prints the config of one run; drop -m (Hydra cannot print a sweep's configs)")
    stage_module = importlib.import_module(module)
    # check what Hydra will see: bench and report turn bare folder names into artifacts=[...]
    _check_command_line(stage, getattr(stage_module, "folders_to_override", list)(rest))
    # Hydra reads sys.argv itself; give it exactly the stage's part of the line.
    sys.argv = [f"slm-{stage}", *rest]
    stage_module.main()
    if stage == "run" and _printed_config(rest):
        stage_module.print_plan(rest)  # after Hydra's config: the stages that config runs
    return 0


def _printed_config(args: list[str]) -> bool:
    """Whether the line asks Hydra to print the config (`--cfg job|all`, `-c job`) instead of running."""
    for i, a in enumerate(args):
        if a in ("--cfg", "-c") and i + 1 < len(args) and args[i + 1] in ("job", "all"):
            return True
        if a in ("--cfg=job", "--cfg=all"):
            return True
    return False


if __name__ == "__main__":
    sys.exit(main())
