"""`slm report`: the artifacts of a lineage side by side, relative to the teacher.

Reads top to bottom: setup (the folders named: artifacts, a pipeline's output_root, a Hydra
multirun folder, `slm bench` results) -> run (follow slm.json parents back to the roots, one row
per checkpoint by content hash; score every one on the test split of the lineage's task data,
unless evaluate=false) -> save (table on the terminal; report.md, report.json and report.png in
output_dir). The work is slm_cli/report.py's `write_report`, which `slm run` also calls at the
end of a pipeline.

Folders may follow the stage word: `slm report A B` means `slm report 'artifacts=[A,B]'`.
"""

from __future__ import annotations

import sys

import hydra

from slm_cli.config.schema import ReportStageConfig
from slm_cli.paths import CONFIG_DIR
from slm_cli.runner import run_stage

# Hydra options that take the next word as their value (so that word is not a folder)
_OPTIONS_WITH_VALUE = {"--config-dir", "-cd", "--config-name", "-cn", "--config-path", "-cp", "--cfg", "-c", "--package", "-p"}


def folders_to_override(args: list[str]) -> list[str]:
    """Bare words (not options, not key=value) become one `artifacts=[...]` override."""
    keep, folders, skip = [], [], False
    for a in args:
        if skip or a.startswith("-") or "=" in a:
            keep.append(a)
            skip = a in _OPTIONS_WITH_VALUE
            continue
        folders.append(a)
    if not folders:
        return keep
    quoted = ",".join('"' + f.replace("\\", "\\\\").replace('"', '\\"') + '"' for f in folders)
    return [*keep, f"artifacts=[{quoted}]"]


def main() -> None:
    sys.argv = [sys.argv[0], *folders_to_override(sys.argv[1:])]
    hydra_main()


@hydra.main(config_path=str(CONFIG_DIR), config_name="report", version_base="1.3")
def hydra_main(cfg) -> None:
    run_stage(cfg, ReportStageConfig, run)


def run(cfg: ReportStageConfig, resolved: dict) -> dict:
    from pathlib import Path

    from slm_cli import ui
    from slm_cli.report import write_report

    # --- setup -------------------------------------------------------------------------------
    ui.console.print(ui.resolved_config_panel(resolved))

    # --- run and save ------------------------------------------------------------------------
    folders = [cfg.artifacts] if isinstance(cfg.artifacts, str) else list(cfg.artifacts)  # one folder from a pipeline input
    return write_report([Path(a) for a in folders], Path(cfg.output_dir), cfg.title, overwrite=cfg.overwrite, evaluate=cfg.evaluate)
