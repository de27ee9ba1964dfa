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
import shutil
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from slm_cli import __version__
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


def begin(output_dir: str | Path, overwrite: bool) -> Path:
    """Check the output is free and return an empty staging folder to write the artifact into."""
    out = Path(output_dir)
    if out.exists() and not overwrite:
        raise SlmError(f"output_dir {out} already exists. Choose another output_dir=..., or pass overwrite=true.")
    stage = staging_dir(out)
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    return stage


def commit(staging: Path, output_dir: str | Path, overwrite: bool, keep_work: bool = False) -> Path:
    """Atomically publish `staging` as `output_dir` (replacing the old one only when `overwrite`)."""
    out = Path(output_dir)
    old = None
    if out.exists():
        if not overwrite:
            raise SlmError(f"output_dir {out} appeared while this run was working; the new artifact is kept in {staging}.")
        old = out.with_name(out.name + f".old-{os.getpid()}")
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    if not keep_work:
        shutil.rmtree(work_dir(out), ignore_errors=True)
    return out


def lock_path(output_dir: str | Path) -> Path:
    out = Path(output_dir)
    return out.with_name(out.name + ".lock")


def acquire_lock(output_dir: str | Path) -> Path:
    """Claim `output_dir` for this process; a second run aimed at it is refused while this one lives.

    The lock is a sibling file holding the owner's host and pid, created with O_EXCL. A lock
    whose process is gone (a crashed or killed run) is stale and taken over.
    """
    path = lock_path(output_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    me = f"{platform.node()} {os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            host, _, pid = path.read_text().strip().partition(" ")
            if host == platform.node() and pid.isdigit() and not _alive(int(pid)):
                path.unlink(missing_ok=True)  # stale: its owner is gone
                continue
            raise SlmError(
                f"another slm run ({host} pid {pid}) is writing output_dir {output_dir} (lock {path}). "
                "Wait for it to finish or choose another output_dir; delete the lock file only if that run is gone."
            )
        with os.fdopen(fd, "w") as f:
            f.write(me)
        return path
    raise SlmError(f"could not take the lock {path}; delete it if no slm run is using {output_dir}.")


def release_lock(path: Path) -> None:
    try:
        if path.read_text().strip() == f"{platform.node()} {os.getpid()}":
            path.unlink()
    except FileNotFoundError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
