"""What every stage does around its own work: validate, guard the output, launch, report errors.

A stage module calls `run_stage(cfg, Schema, work)` from its `@hydra.main`. Validation and
the output checks use only the standard library, so a bad config fails in well under a
second and nothing heavy is imported until the work starts.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

from slm_cli import artifacts, faults
from slm_cli.artifacts import release_lock, staging_dir
from slm_cli.config import ConfigError, validate
from slm_cli.errors import SlmError


def _user_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [SlmError, ConfigError]
    try:  # the data layer has its own error type; import lazily (it may pull torch)
        from slm_cli.data.errors import DataError

        types.append(DataError)
    except ImportError:
        pass
    return tuple(types)


# errno of a write that failed for lack of room: no space, file-size limit, quota, read-only disk
_STORAGE_ERRNOS = {28: "no space left on device", 27: "file too large", 122: "disk quota exceeded", 30: "read-only file system"}


def storage_problem(exc: BaseException) -> str | None:
    """What a failed write ran into, when `exc` is one; None for any other error.

    Python's own writes raise OSError with an errno; safetensors reports the same condition as
    a SafetensorError whose text carries "(os error N)".
    """
    errno = getattr(exc, "errno", None)
    if errno is None and type(exc).__name__ == "SafetensorError":
        for code in _STORAGE_ERRNOS:
            if f"(os error {code})" in str(exc):
                errno = code
    return _STORAGE_ERRNOS.get(errno) if isinstance(errno, int) else None


def fail(message: str, code: int = 2) -> None:
    import logging

    from rich.console import Console
    from rich.markup import escape

    # the run folder's log ends with why the run stopped (a refused run's folder is removed just below);
    # only through the log file handler Hydra's job_logging gives logger `slm` (see configs/hydra/slm.yaml):
    # without one, logging's last-resort handler would print the message to stderr a second time
    log = logging.getLogger("slm")
    if log.handlers:
        log.error("slm error: %s", message)
    _drop_empty_run_dir()
    # escaped: a message quoting `key=[a,b]` must print as written, not as rich markup
    Console(stderr=True).print(f"[bold red]slm error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(code)


def _drop_empty_run_dir() -> None:
    """Remove Hydra's run folder of a failed run when it holds nothing but Hydra's own files.

    A refused run leaves nothing behind; a run dir that holds anything else (a stopped training's
    `artifact.work` with its checkpoints, a worker's files) is kept.
    """
    import shutil

    try:
        from hydra.core.hydra_config import HydraConfig

        run_dir = Path(HydraConfig.get().runtime.output_dir)
    except Exception:  # not inside a Hydra app (a library call, a test)
        return
    if not run_dir.is_dir() or is_worker():
        return
    if not all(p.name == ".hydra" or p.suffix == ".log" for p in run_dir.iterdir()):
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    cwd = Path.cwd().resolve()
    for parent in run_dir.resolve().parents:  # outputs/<stage>/ too, when this run made them and they are empty
        if parent == cwd or not parent.is_relative_to(cwd):
            break
        try:
            parent.rmdir()
        except OSError:
            break


def resolved_dict(cfg: Any) -> dict:
    """The composed config as a plain dict, interpolations resolved, `hydra` section dropped."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


def is_worker() -> bool:
    """True inside a process started by a distributed launcher (ours, deepspeed's or torchrun's).

    Not LOCAL_RANK alone: an in-process run sets that itself for DeepSpeed.
    """
    return os.environ.get("SLM_LAUNCHED") == "1" or int(os.environ.get("WORLD_SIZE", "1")) > 1


def _claim_output(output_dir: str, overwrite: bool | str, values: dict):
    """Check the output is safe to write and lock it for this run; None when there is nothing left to do.

    Refused up front, before any slow work: an output that is, contains or lies inside an input; an
    existing folder slm did not write (see artifacts.check_output); a folder that cannot be created.
    """
    from slm_cli.ui import console

    if artifacts.restore_replaced(output_dir):
        console.print(f"[yellow]warning:[/yellow] restored {output_dir}: a run replacing it was stopped mid-publish")
    done = artifacts.finished_by_earlier_run(output_dir, artifacts.config_fingerprint(values))
    if not done:
        artifacts.check_output(output_dir, overwrite, artifacts.run_inputs(values))
    try:
        lock = artifacts.acquire_lock(output_dir)
    except OSError as exc:
        raise SlmError(
            f"cannot create output_dir {output_dir}: {exc.strerror} ({exc.filename or output_dir}). Choose an "
            "output_dir in a folder you can write, e.g. output_dir=$HOME/slm-out/<name>."
        ) from exc
    if artifacts.leftovers_of(output_dir):  # checked under the lock: a live publisher's .work is never touched
        import shutil

        shutil.rmtree(artifacts.work_dir(output_dir), ignore_errors=True)
    if done:
        artifacts.release_lock(lock)
        console.print(
            f"output_dir {output_dir} already holds the artifact of this command (an earlier run published it and "
            "was stopped while cleaning up); its leftovers were removed, nothing to redo."
        )
        return None
    return lock


def run_stage(cfg: Any, schema: type, work: Callable[[Any, dict], Any], check: Callable[[Any], None] | None = None) -> Any:
    """Validate `cfg` against `schema`, refuse to clobber outputs, relaunch if multi-process, run `work`.

    `check(cfg)` checks the stage's inputs (model folders) once, in the first process, before the
    launcher starts ranks that would each load them and report the same error.
    """
    typed = None
    try:
        values = resolved_dict(cfg)
        from slm_cli.engine.dsconfig import adopt_user_config

        ds_notes = adopt_user_config(values)  # deepspeed.config_file's settings, where you set none yourself
        typed = validate(values, schema, source=f"config of `slm {values.get('stage', '?')}`")
        if ds_notes and not is_worker():
            from rich.markup import escape

            from slm_cli.ui import console

            for note in ds_notes:
                console.print(f"[yellow]note:[/yellow] {escape(note)}", highlight=False, soft_wrap=True)
        if getattr(typed, "resume", False) is not False and not is_worker():
            from slm_cli.engine.checkpoint import find_interrupted_run

            previous = find_interrupted_run(values)  # the default output_dir is new each run: find the old one
            if previous is not None:
                typed.output_dir = values["output_dir"] = str(previous)
        output_dir = getattr(typed, "output_dir", None)
        lock = None
        if output_dir and not is_worker():
            lock = _claim_output(output_dir, typed.overwrite, values)
            if lock is None:
                return None
        try:
            if check is not None and not is_worker():
                check(typed)
            launcher = getattr(typed, "launcher", None)  # stages that do not train run in one process
            if launcher is not None and not is_worker():
                from slm_cli.engine.launcher import needs_relaunch, relaunch

                if needs_relaunch(launcher):
                    sys.exit(relaunch(typed, values))
            faults.point("setup")
            return work(typed, values)
        finally:
            if lock is not None:
                release_lock(lock)
    except _user_error_types() as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted (Ctrl-C). output_dir was not touched (an artifact is published only once complete); "
             "run the same command again (a training run continues from its last checkpoint, if it saved one).", code=130)
    except Exception as exc:
        problem = storage_problem(exc)
        if problem is None:
            raise
        out = getattr(typed, "output_dir", None)
        where = getattr(exc, "filename", None) or (f"into {staging_dir(out)}" if out else "the output")
        fail(
            f"could not write {where}: {problem} ({exc}). Free disk space there (df -h) or raise the file-size limit "
            "(ulimit -f), then run the same command again. output_dir was not touched: an artifact is written to "
            "<output_dir>.work/staging and replaces output_dir only once it is complete."
        )
