"""The artifact folder contract: stages hand off only through these folders.

An artifact is a standard Hugging Face checkpoint plus `slm.json`:
  stage, resolved config, parents (path + content hash), metrics, package versions.
It appears only complete: a stage writes into `<output_dir>.work/staging` and renames it to
`output_dir` as its very last step, so a killed run never leaves a folder a later stage would
accept. Work files (checkpoints for resume, live metrics) live in `<output_dir>.work/`.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from slm_cli import __version__, faults
from slm_cli.errors import SlmError

METADATA_FILE = "slm.json"
# Files that define a checkpoint's content; logs and metrics do not change what a model is.
_HASHED_SUFFIXES = (".safetensors", ".json", ".model", ".txt", ".jinja")
_HASH_EXCLUDE = {METADATA_FILE, "metrics.jsonl", "eval.json"}
PACKAGES = ("torch", "transformers", "deepspeed", "peft", "hydra-core", "compressed-tensors", "safetensors")


def work_dir(output_dir: str | Path) -> Path:
    out = Path(output_dir)
    return out.with_name(out.name + ".work")


def staging_dir(output_dir: str | Path) -> Path:
    return work_dir(output_dir) / "staging"


# Inputs of a run, by the name of their config field (the last part of a dotted key): these
# hold paths an output must never be, contain or lie inside. Fields under `inputs.` (a recipe's
# artifacts) count too.
INPUT_FIELDS = {"name_or_path", "tokenizer", "path", "artifacts", "source", "config_file", "hostfile"}
# Files that make a folder slm's own output: slm.json of a model artifact, or the result file of
# eval / bench / report, which carries an `slm_output` stamp (see `output_stamp`).
RESULT_FILES = ("eval.json", "bench.json", "report.json")
PIPELINE_ENV = "SLM_PIPELINE_STAGE"  # set by `slm run` for each stage it runs: {"root": ..., "name": ...}


def output_stamp(stage: str) -> dict:
    """What slm records in every folder it writes, so a later run can tell its own output from a user's."""
    stamp = {"stage": stage, "slm_version": __version__}
    tag = os.environ.get(PIPELINE_ENV)
    if tag:
        stamp["pipeline"] = json.loads(tag)
    return stamp


def owner_of(folder: str | Path) -> dict | None:
    """The stamp slm left in `folder` (stage, and the pipeline stage that wrote it), or None if slm did not write it."""
    folder = Path(folder)
    meta = _read_json(folder / METADATA_FILE)
    if meta is not None:
        return {"stage": meta.get("stage"), "slm_version": meta.get("slm_version"), "pipeline": meta.get("pipeline")}
    for name in RESULT_FILES:
        data = _read_json(folder / name)
        if data is not None and isinstance(data.get("slm_output"), dict):
            return data["slm_output"]
    return None


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def run_inputs(values: dict, prefix: str = "") -> dict[str, str]:
    """Every input path a resolved config names: {dotted field: path}, for the fields in INPUT_FIELDS."""
    found: dict[str, str] = {}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            found.update(run_inputs(value, f"{full}."))
        elif key in INPUT_FIELDS or prefix == "inputs.":
            items = value if isinstance(value, list) else [value]
            for i, item in enumerate(items):
                if isinstance(item, str) and item:
                    found[full if len(items) == 1 else f"{full}[{i}]"] = item
    return found


def check_output(output_dir: str | Path, overwrite: bool | str, inputs: dict[str, str]) -> None:
    """Refuse an output that would destroy anything the user did not ask slm to replace.

    The output (symlinks resolved) may never be, contain or lie inside an input of the run: the
    model it reads, its data, its DeepSpeed JSON. An existing output is replaced only with
    `overwrite=true`, and then only if slm wrote it (`owner_of`) or it is empty; any other folder
    or file needs `overwrite=force`, which says "I know this is not slm's".
    """
    out = Path(output_dir)
    real = Path(os.path.realpath(out))
    for field, value in inputs.items():
        if not os.path.lexists(value):
            continue  # a hub id or a built-in name, not a path
        src = Path(os.path.realpath(value))
        if real == src:
            why = "is the input"
        elif src.is_relative_to(real):
            why = "contains the input"
        elif real.is_relative_to(src):
            why = "lies inside the input"
        else:
            continue
        raise SlmError(
            f"output_dir={out} {why} {field}={value}: writing the output there would replace or change what "
            "this run reads. Choose an output_dir outside every input."
        )
    _check_siblings(out)
    if not os.path.lexists(out):
        return
    if not overwrite:
        raise SlmError(f"output_dir {out} already exists. Choose another output_dir=..., or pass overwrite=true to replace it.")
    if overwrite == "force":
        return
    if out.is_dir() and not out.is_symlink() and (owner_of(out) is not None or not any(out.iterdir())):
        return
    raise SlmError(
        f"output_dir {out} exists and was not written by slm (no {METADATA_FILE} or slm result file in it), so "
        "overwrite=true does not replace it. Choose another output_dir, or pass overwrite=force if you really "
        f"want {out} deleted and replaced."
    )


PUBLISHING = "publishing"  # in <output_dir>.work while an artifact is renamed into place: which one


def _identity(folder: Path) -> str | None:
    """What makes one published output differ from another: its slm.json (or result file) bytes' hash."""
    for name in (METADATA_FILE, *RESULT_FILES):
        path = Path(folder) / name
        if path.is_file():
            return hashlib.sha256(path.read_bytes()).hexdigest()
    return None


def leftovers_of(output_dir: str | Path) -> bool:
    """True when `<output_dir>.work` is only what a finished publish of output_dir had not yet deleted.

    Any other .work (the checkpoints of a run still to finish) is kept for its resume.
    """
    out = Path(output_dir)
    marker = work_dir(out) / PUBLISHING
    try:
        published = marker.read_text()
    except OSError:
        return False
    return bool(published) and published == _identity(out)


# What slm itself puts in `<output_dir>.work`; a folder of that name holding anything else is the user's.
WORK_ENTRIES = {"staging", "checkpoints", "metrics.jsonl", "teacher_logits", "publishing", "replaced"}


def _check_siblings(out: Path) -> None:
    """`<output_dir>.work` and `<output_dir>.lock` are slm's; refuse to run over a user's file of that name.

    slm deletes its work folder after publishing and unlinks its lock file when it ends, so a
    user's own `model.work` folder or `model.lock` file beside `output_dir=model` would be lost.
    """
    work, lock = work_dir(out), lock_path(out)
    if os.path.lexists(work):
        foreign = not work.is_dir() or work.is_symlink() or any(p.name not in WORK_ENTRIES for p in work.iterdir())
        if foreign:
            raise SlmError(
                f"{work} exists and is not slm's work folder for output_dir={out} (slm keeps its checkpoints and "
                "staging there, and deletes the folder when done). Move it away or choose another output_dir."
            )
    if os.path.lexists(lock):
        try:
            text = lock.read_text() if lock.is_file() and not lock.is_symlink() and lock.stat().st_size < 256 else None
        except (OSError, UnicodeDecodeError):
            text = None
        if text is None or (text.strip() and not re.fullmatch(r"\S+ \d+", text.strip())):
            raise SlmError(
                f"{lock} exists and is not an slm lock file (slm locks output_dir={out} with it and deletes it when "
                "done). Move it away or choose another output_dir."
            )


def finished_by_earlier_run(output_dir: str | Path, fingerprint: str) -> bool:
    """True when a run of this very config published `output_dir` and was stopped before it cleaned up.

    Publishing renames the artifact into place first and only then deletes `<output_dir>.work`; a
    kill in between leaves both. Running the same command again then has nothing left to compute.
    """
    meta = _read_json(Path(output_dir) / METADATA_FILE)
    return meta is not None and leftovers_of(output_dir) and config_fingerprint(meta.get("config") or {}) == fingerprint


def begin(output_dir: str | Path, overwrite: bool | str) -> Path:
    """Return an empty staging folder to write the artifact into (the output was checked by `check_output`)."""
    out = Path(output_dir)
    if os.path.lexists(out) and not overwrite:
        raise SlmError(f"output_dir {out} already exists. Choose another output_dir=..., or pass overwrite=true.")
    stage = staging_dir(out)
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    return stage


def check_finite(folder: str | Path) -> None:
    """Refuse to publish weights holding NaN or inf: no later stage or server can use them."""
    from safetensors import safe_open

    bad: list[str] = []
    for path in sorted(Path(folder).rglob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if t.is_floating_point() and not bool(t.float().isfinite().all()):
                    bad.append(name)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise SlmError(
            f"the model this run produced has NaN or inf weights ({shown}), so it was not published. The run "
            "diverged or its input already held non-finite weights: lower train.lr, set train.max_grad_norm, "
            "or check the source model."
        )


def commit(staging: Path, output_dir: str | Path, overwrite: bool | str) -> Path:
    """Publish `staging` as `output_dir` in one atomic step, replacing the old one only when `overwrite`.

    The weights are checked for NaN/inf first. An existing output is swapped with the new one by
    one `renameat2(RENAME_EXCHANGE)`, so at every instant `output_dir` is either the whole old
    artifact or the whole new one; the old one, now at the staging path, is deleted afterwards. A
    kill at any point leaves at most leftovers inside `<output_dir>.work`, which the next run clears.
    """
    out = Path(output_dir)
    try:
        check_finite(staging)
    except SlmError:
        shutil.rmtree(staging, ignore_errors=True)  # a broken model is not kept where a later run could take it
        _remove_if_empty(work_dir(out))  # checkpoints, if any, stay for a resume
        raise
    # Names what is being published, so a run that finds `<output_dir>.work` beside an output_dir
    # holding exactly this knows the .work is only the leftovers of a finished publish (`leftovers_of`).
    (work_dir(out) / PUBLISHING).write_text(_identity(staging) or "")
    faults.point("publish:before-swap")
    if os.path.lexists(out):
        if not overwrite:
            raise SlmError(f"output_dir {out} appeared while this run was working; the new artifact is kept in {staging}.")
        _exchange(staging, out)
        faults.point("publish:after-swap")
        shutil.rmtree(staging, ignore_errors=True)  # the old artifact
    else:
        os.replace(staging, out)
    faults.point("publish:after-rename")
    shutil.rmtree(work_dir(out), ignore_errors=True)
    return out


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def _exchange(a: Path, b: Path) -> None:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE).

    Where the kernel or file system cannot (another OS, some network file systems), fall back to
    two renames with the old artifact parked in `<output_dir>.work/replaced`: a kill between them
    leaves no output_dir for an instant, and `restore_replaced` puts the old one back on the next run.
    """
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        rc = libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), 2)  # AT_FDCWD, RENAME_EXCHANGE
        err = ctypes.get_errno() if rc != 0 else 0
    except (AttributeError, OSError):
        rc, err = -1, 38  # ENOSYS: no renameat2 in this libc
    if rc == 0:
        return
    if err not in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: not supported here; anything else is a real failure
        raise OSError(err, os.strerror(err), str(b))
    parked = work_dir(b) / "replaced"
    shutil.rmtree(parked, ignore_errors=True)
    os.replace(b, parked)
    os.replace(a, b)
    os.replace(parked, a)


def restore_replaced(output_dir: str | Path) -> bool:
    """Put back an artifact parked by a publish that was killed between its two renames (see `_exchange`)."""
    out = Path(output_dir)
    parked = work_dir(out) / "replaced"
    if os.path.lexists(out) or not parked.is_dir():
        return False
    os.replace(parked, out)
    return True


def lock_path(output_dir: str | Path) -> Path:
    out = Path(output_dir)
    return out.with_name(out.name + ".lock")


class OutputLock:
    """Exclusive claim on `output_dir` for this run's life: an `fcntl.flock` on `<output_dir>.lock`.

    The kernel drops the lock when its owner exits, however it exits, so a dead run's lock is free
    at once and there is no takeover to race. The file holds the owner's host and pid only to name
    it in the refusal. A run that locked a file another run just unlinked would hold a lock on a
    name no one can see; checking that the path still names the locked file closes that gap.
    """

    def __init__(self, output_dir: str | Path):
        self.output_dir, self.path, self.fd = output_dir, lock_path(output_dir), None

    def acquire(self) -> "OutputLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.read(fd, 256).decode(errors="replace").strip()
                os.close(fd)
                who = f"{owner.partition(' ')[0]} pid {owner.partition(' ')[2]}" if owner else "its pid not yet written"
                raise SlmError(
                    f"another slm run ({who}) is writing output_dir {self.output_dir} (lock {self.path}). "
                    "Wait for it to finish or choose another output_dir."
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the file was unlinked by its previous owner between our open and our lock: retry
        os.ftruncate(fd, 0)
        os.write(fd, f"{platform.node()} {os.getpid()}".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # while still holding it, so no one can lock this file after we let go
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None


def acquire_lock(output_dir: str | Path) -> OutputLock:
    return OutputLock(output_dir).acquire()


def release_lock(lock: OutputLock) -> None:
    lock.release()


def content_hash(folder: str | Path) -> str:
    """sha256 over the files that define a checkpoint (weights, configs, tokenizer), names included."""
    folder = Path(folder)
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.name in _HASH_EXCLUDE or not path.name.endswith(_HASHED_SUFFIXES):
            continue
        h.update(str(path.relative_to(folder)).encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def config_fingerprint(resolved: dict) -> str:
    """A hash of what a run computes: the resolved config without the keys that only steer the run."""
    steering = {"resume", "overwrite"}
    payload = {k: v for k, v in resolved.items() if k not in steering}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def versions() -> dict[str, str]:
    out = {"slm": __version__, "python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def parent(role: str, path: str | Path) -> dict[str, Any]:
    """A lineage entry for an input artifact (its slm stage, if it has one, and content hash).

    An input that is not on this disk (a hub id) is recorded by name: made into a path it would
    point into the working directory and read as a missing parent later.
    """
    if not Path(path).exists():
        return {"role": role, "name": str(path)}
    path = Path(path)
    entry: dict[str, Any] = {"role": role, "path": str(path.resolve())}
    if path.is_dir():
        entry["hash"] = content_hash(path)
        meta = read_metadata(path, missing_ok=True)
        if meta:
            entry["stage"] = meta.get("stage")
    return entry


def write_metadata(folder: Path, *, stage: str, config: dict, parents: list[dict], metrics: dict, extra: dict | None = None):
    meta = {
        "slm_version": __version__,
        "stage": stage,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config,
        "parents": parents,
        "metrics": metrics,
        "versions": versions(),
        "content_hash": content_hash(folder),
    }
    pipeline = output_stamp(stage).get("pipeline")
    if pipeline:  # which `slm run` stage wrote it: that pipeline may replace it on a rerun, nothing else may
        meta["pipeline"] = pipeline
    if extra:
        meta.update(extra)
    (Path(folder) / METADATA_FILE).write_text(json.dumps(meta, indent=2, default=str))
    return meta


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split(".")[:3] if p.isdigit())


def check_readable(folder: str | Path, field: str) -> None:
    """Refuse an artifact written by a newer slm: its slm.json or layout may mean things this one does not know."""
    meta = read_metadata(folder, missing_ok=True)
    if not meta:
        return
    theirs = str(meta.get("slm_version", "0"))
    if _version_tuple(theirs) > _version_tuple(__version__):
        raise SlmError(
            f"{field}={folder} was written by slm {theirs}, newer than this slm {__version__}. "
            "Upgrade slm (pip install -U slm-cli, or git pull in your checkout) to read it."
        )


def lineage_warnings(folder: str | Path) -> list[str]:
    """Why an artifact's recorded lineage may no longer hold: its own files or a parent's changed.

    Each content hash in the artifact's slm.json is recomputed where that folder still exists;
    a mismatch means the model was edited or overwritten since the stage that wrote it ran, so
    its recorded metrics and parents may not describe what is on disk now. A plain Hugging Face
    folder (no slm.json) records no lineage and gives no warnings.
    """
    meta = read_metadata(folder, missing_ok=True)
    if meta is None:
        return []
    out = []
    recorded = meta.get("content_hash")
    if recorded and content_hash(folder) != recorded:
        out.append(f"{folder} changed since `slm {meta.get('stage')}` wrote it (content hash differs from slm.json)")
    for p in meta.get("parents", []):
        path, want = p.get("path"), p.get("hash")
        if not path or not want:
            continue
        if not Path(path).is_dir():
            out.append(f"parent {p.get('role')} {path} no longer exists; its hash cannot be checked")
        elif content_hash(path) != want:
            out.append(f"parent {p.get('role')} {path} changed since {folder} was made from it (content hash differs)")
    return out


def read_metadata(folder: str | Path, missing_ok: bool = False) -> dict | None:
    path = Path(folder) / METADATA_FILE
    if not path.is_file():
        if missing_ok:
            return None
        raise SlmError(f"{folder} has no {METADATA_FILE}: it was not written by an slm stage.")
    return json.loads(path.read_text())


def recorded_task_data(folder: str | Path) -> tuple[dict, Path] | None:
    """The task data an artifact was made for, and the folder whose slm.json records it, or None.

    The nearest in the lineage, breadth first from `folder` through slm.json `parents` (the
    `source` of a pruned or FP8 artifact, a distilled student's teacher after the student's own
    config): the `data` block (source, val_fraction, ...) of a training or eval run's resolved
    config. A plain Hugging Face folder, or a lineage that never trained on data, gives None.
    """
    queue, seen = [Path(folder)], set()
    while queue:
        here = queue.pop(0)
        key = str(here.resolve())
        if key in seen:
            continue
        seen.add(key)
        meta = read_metadata(here, missing_ok=True) if here.is_dir() else None
        if not meta:
            continue
        data = (meta.get("config") or {}).get("data")
        if isinstance(data, dict) and data.get("source"):
            return data, here
        queue += [Path(p["path"]) for p in meta.get("parents", []) if p.get("path")]
    return None
