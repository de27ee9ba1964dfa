"""The `slm` command: pop the stage word and hand the rest of the line to that stage's own `@hydra.main`.

Keeping each stage's Hydra entry point intact keeps Hydra's whole grammar working
(`key=value`, `group=option`, `-m` sweeps, `--cfg job`, `--help`, `hydra.run.dir=`).
Nothing here imports torch: `slm`, `--help` and `--cfg job` answer instantly.
"""

from __future__ import annotations

import difflib
import importlib
import sys

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
    console.print("usage: slm <stage> [key=value ...] [-m] [--cfg job] [--help]")


def _expand_recipe(stage: str, args: list[str]) -> list[str]:
    """`recipe=NAME` picks the preset recipes/<stage>/NAME.yaml as the primary config.

    It is Hydra's own `--config-dir/--config-name` spelled shorter; the preset's defaults
    list starts from the stage's config (`- /teacher`), so every other override still applies.
    """
    out, name = [], None
    for a in args:
        if a.startswith("recipe=") and stage != "run":
            name = a.split("=", 1)[1]
        else:
            out.append(a)
    if name is None:
        return out
    path = RECIPE_DIR / stage / f"{name}.yaml"
    have = sorted(p.stem for p in (RECIPE_DIR / stage).glob("*.yaml"))
    if name not in have:  # a name, never a path: `recipe=../../x` must not reach a YAML outside recipes/
        print(f"slm: no recipe {path}. Recipes for `slm {stage}`: {', '.join(have) or 'none'}.", file=sys.stderr)
        sys.exit(2)
    return ["--config-dir", str(path.parent), "--config-name", name, *out]


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
    if stage not in STAGES:
        close = difflib.get_close_matches(stage, list(STAGES), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        print(f"slm: unknown stage '{stage}'.{hint} Stages: {', '.join(STAGES)}.", file=sys.stderr)
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
    stage_module = importlib.import_module(module)
    # check what Hydra will see: bench and report turn bare folder names into artifacts=[...]
    _check_command_line(stage, getattr(stage_module, "folders_to_override", list)(rest))
    # Hydra reads sys.argv itself; give it exactly the stage's part of the line.
    sys.argv = [f"slm-{stage}", *rest]
    stage_module.main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
