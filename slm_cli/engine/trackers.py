"""Experiment trackers for the training loop: `train.report_to=[tensorboard]` (or `wandb`), like TRL's `report_to`.

Only rank 0 writes. Scalars use Hugging Face Trainer's tag names, so dashboards built for TRL runs
read slm's too: `train/loss`, `train/learning_rate`, `train/grad_norm`, `train/tokens_per_s` (plus
`train/kd_loss`, `train/ce_loss` in distillation) at every step, `eval/loss` at each evaluation
and at the end, where `eval/ce` is the validation cross-entropy every training stage shares.

Files go to the run folder (Hydra's `outputs/<stage>/<time>/`), never into the artifact: event
files are not part of the model, and they would change its content hash. TensorBoard writes
`<run folder>/tensorboard/`; wandb logs offline into `<run folder>/wandb/` unless `WANDB_MODE`
says otherwise (`wandb sync` uploads it later).
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import Any

TRACKERS = ("tensorboard", "wandb")
# the package each tracker needs, and how to get it
_PACKAGES = {
    "tensorboard": ("tensorboard", "pip install tensorboard"),
    "wandb": ("wandb", "pip install wandb (it logs offline into the run folder unless WANDB_MODE is set)"),
}
# metrics.jsonl key -> tracker tag, for the per-step row
_STEP_TAGS = {
    "loss": "train/loss",
    "lr": "train/learning_rate",
    "grad_norm": "train/grad_norm",
    "tokens_per_s": "train/tokens_per_s",
    "val_loss": "eval/loss",
}


def tracker_names(report_to: Any) -> list[str]:
    """`report_to` as a list of tracker names: a string or a list; `none` (or []) means no tracker."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    return [n for n in names if n != "none"]


def problems(report_to: Any, where: str) -> list[str]:
    """Config errors of `report_to`, found with the standard library only (no tracker is imported)."""
    out = []
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    for name in names:
        if name != "none" and name not in TRACKERS:
            out.append(f"{where}.report_to: unknown tracker {name!r}; choose from {', '.join(TRACKERS)} "
                       f"(e.g. {where}.report_to=[tensorboard]), or none")
    if "none" in names and len(names) > 1:
        out.append(f"{where}.report_to={names}: 'none' cannot be combined with a tracker")
    for name in tracker_names(report_to):
        module, fix = _PACKAGES.get(name, (None, None))
        if module and importlib.util.find_spec(module) is None:
            out.append(f"{where}.report_to=[{name}] needs the {module} package, which is not installed: {fix}")
    return out


def run_folder(work_dir: Path) -> Path:
    """Hydra's folder for this run; outside a Hydra app, the folder holding the artifact's work dir."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except Exception:  # not inside a Hydra app (a library call)
        return Path(work_dir).parent


class Trackers:
    """The trackers of one run; `log(values, step)` sends finite numbers to each."""

    def __init__(self, names: list[str], folder: Path, run_name: str | None = None):
        self.folder, self._writers = Path(folder), []
        for name in names:
            self._writers.append(_OPENERS[name](self.folder, run_name))

    def log(self, values: dict[str, float], step: int) -> None:
        scalars = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if scalars:
            for writer in self._writers:
                writer.log(scalars, step)

    def log_step(self, row: dict, step: int) -> None:
        """One metrics.jsonl row: loss, lr, grad norm, tokens/s, parts of the loss, and the eval loss when present."""
        values = {tag: row[key] for key, tag in _STEP_TAGS.items() if key in row}
        values.update({f"train/{k}": v for k, v in row.items() if k.endswith("_loss") and k != "val_loss"})
        self.log(values, step)

    def close(self) -> None:
        for writer in self._writers:
            writer.close()
        self._writers = []

    @property
    def paths(self) -> list[str]:
        return [str(w.path) for w in self._writers]


class _TensorBoard:
    def __init__(self, folder: Path, run_name: str | None):
        from torch.utils.tensorboard import SummaryWriter

        self.path = folder / "tensorboard"
        self._writer = SummaryWriter(log_dir=str(self.path))

    def log(self, scalars: dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, global_step=step)

    def close(self) -> None:
        self._writer.close()


class _Wandb:
    def __init__(self, folder: Path, run_name: str | None):
        import wandb

        self.path = folder / "wandb"
        self.path.mkdir(parents=True, exist_ok=True)
        # offline unless the user chose otherwise: slm never sends data anywhere on its own
        mode = os.environ.get("WANDB_MODE", "offline")
        self._run = wandb.init(project=os.environ.get("WANDB_PROJECT", "slm"), name=run_name, dir=str(folder), mode=mode)

    def log(self, scalars: dict[str, float], step: int) -> None:
        self._run.log(scalars, step=step)

    def close(self) -> None:
        self._run.finish()


_OPENERS = {"tensorboard": _TensorBoard, "wandb": _Wandb}
