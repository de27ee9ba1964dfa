"""Resume checkpoints: save them, sign them, keep the last two, and load only what this user's slm wrote.

Why signing. DeepSpeed's checkpoint files are pickles, and its loader unpickles them in full
(torch's loader with weights_only off): loading a checkpoint runs whatever code it names. A folder
`<output_dir>.work/checkpoints` that someone else put there (an unpacked archive, a shared
disk, a copied project) would run their code on `resume`. So every checkpoint tag `step<N>`
gets a marker, `step<N>/slm_resume.json`, listing the sha256 of each file of the tag with
the step and the config fingerprint, signed with HMAC-SHA256 under a per-user key kept
mode 0600 in the slm cache. Resume loads a tag only when its marker's signature and every
file's hash match, checked before anything is unpickled. Whoever can forge a marker can
already read the user's key, i.e. already runs code as the user.

Why two. A crash or power loss can leave a save half done: an empty `latest`, an empty
marker, a truncated file. The newest checkpoint that verifies is loaded (DeepSpeed's
`latest` pointer is not used: the tag is named explicitly), the ones skipped are named with
the reason, and the previous good checkpoint is kept until a newer one is complete.

Only the standard library is imported at module level: the runner uses this module to find
an interrupted run before anything heavy is loaded.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import shlex
import shutil
import stat
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slm_cli.data.corpus import write_atomic
from slm_cli.errors import SlmError
from slm_cli.paths import RECIPE_DIR, cache_dir
from slm_cli.pretrained import file_sha256

MARKER = "slm_resume.json"
KEY_FILE = "resume.key"
KEEP = 2  # complete checkpoints kept: the newest, and the one before it in case the newest is damaged
_TAG = re.compile(r"step(\d+)")
_KEY_BYTES = 32


# --- the per-user signing key --------------------------------------------------------------------


def key_path() -> Path:
    return cache_dir() / KEY_FILE


def signing_key(create: bool = False) -> bytes | None:
    """The user's resume-signing key; made (when `create`) on first use, None if there is none yet.

    Refused when it is a symlink, not owned by this user, or readable/writable by anyone else: a
    key others can read lets them sign a checkpoint this user's slm would then unpickle.
    """
    path = key_path()
    if create and not os.path.lexists(path):
        _create_key(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SlmError(
            f"cannot open the checkpoint signing key {path} ({exc.strerror}); it must be a regular file, not a "
            "symlink. Delete it; slm makes a new one at the next checkpoint (checkpoints signed with the old "
            "key then no longer resume)."
        ) from exc
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise SlmError(f"the checkpoint signing key {path} is not a regular file. Delete it; slm makes a new one.")
        if hasattr(os, "getuid") and st.st_uid != os.getuid():
            raise SlmError(
                f"the checkpoint signing key {path} belongs to uid {st.st_uid}, not to you (uid {os.getuid()}), so "
                "someone else may know it. Delete it (or point SLM_CACHE at a folder of your own); slm makes a new "
                "one at the next checkpoint."
            )
        if st.st_mode & 0o077:
            raise SlmError(
                f"the checkpoint signing key {path} has mode {stat.S_IMODE(st.st_mode):04o}: others can read or change "
                "it, and whoever knows it can make slm load a checkpoint of theirs. Delete it (slm makes a new one, "
                f"mode 0600), or, if no one else has had access, run `chmod 600 {path}`."
            )
        key = f.read()
    if len(key) != _KEY_BYTES:
        raise SlmError(
            f"the checkpoint signing key {path} holds {len(key)} bytes, not {_KEY_BYTES} (cut short by a crash?). "
            "Delete it; slm makes a new one at the next checkpoint."
        )
    return key


def _create_key(path: Path) -> None:
    """Write a new random key so that no one ever reads a partial one.

    The bytes go to a private temporary file (mkstemp: O_EXCL, mode 0600) that is then linked to
    its name; link(2), like O_EXCL, fails if the name exists, so of two processes making a key at
    once exactly one wins and the other reads the winner's.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".resume-key-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(_KEY_BYTES))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
    finally:
        os.unlink(tmp)


def _sign(key: bytes, body: dict) -> str:
    return hmac.new(key, json.dumps(body, sort_keys=True).encode(), hashlib.sha256).hexdigest()


# --- saving --------------------------------------------------------------------------------------


def tag_of(step: int) -> str:
    return f"step{step}"


def tags(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """The `step<N>` folders in `ckpt_dir`, newest (highest step) first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if p.is_dir() and (m := _TAG.fullmatch(p.name))]
    return sorted(found, key=lambda t: t[0], reverse=True)


def save(engine, ckpt_dir: Path, step: int, *, config_hash: str, client_state: dict) -> None:
    """DeepSpeed checkpoint `step<N>`, then its signed marker, then drop all but the last two.

    The marker is written only after every rank's files are on disk (synced), so a tag with a
    valid marker is complete; older tags are deleted only after that.
    """
    from slm_cli.engine import distributed as dist

    tag_dir = ckpt_dir / tag_of(step)
    try:
        signing_key(create=True)  # on every rank: a key that cannot be used stops them all, before the save
        if dist.is_main():
            if tag_dir.exists():  # left by a run this one fell back from: never mix its files with ours
                shutil.rmtree(tag_dir)
        dist.barrier()
        engine.save_checkpoint(str(ckpt_dir), tag=tag_of(step), client_state=client_state)
        dist.barrier()
        if dist.is_main():
            _write_marker(tag_dir, step, config_hash)
            _drop_old(ckpt_dir, step)
        dist.barrier()
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as a RuntimeError
        raise SlmError(
            f"could not save the checkpoint of step {step} in {ckpt_dir} ({exc}). Is the disk full (df -h) or a "
            "file-size limit set (ulimit -f)? Free space and run the same command again; it resumes from the last "
            "complete checkpoint, if any."
        ) from exc


def _write_marker(tag_dir: Path, step: int, config_hash: str) -> None:
    files = {}
    for path in sorted(p for p in tag_dir.rglob("*") if p.is_file() and p.name != MARKER):
        files[str(path.relative_to(tag_dir))] = _synced_sha256(path)
    body = {"tag": tag_dir.name, "step": step, "config_hash": config_hash, "files": files}
    key = signing_key(create=True)
    write_atomic(tag_dir / MARKER, json.dumps({**body, "signature": _sign(key, body)}, indent=1), durable=True)


def _drop_old(ckpt_dir: Path, step: int) -> None:
    """Keep tag `step` and the newest complete one before it; remove every other `step<N>`."""
    keep = {step}
    older = [s for s, p in tags(ckpt_dir) if s < step and (p / MARKER).is_file()]
    keep.update(older[: KEEP - 1])
    for s, p in tags(ckpt_dir):
        if s not in keep:
            shutil.rmtree(p, ignore_errors=True)


def clear(ckpt_dir: Path) -> None:
    """Remove every checkpoint tag (resume=false): a later rerun must not continue the old run."""
    for _, p in tags(ckpt_dir):
        shutil.rmtree(p, ignore_errors=True)
    for name in ("latest", MARKER):  # MARKER: the unsigned one older slm versions wrote here
        (ckpt_dir / name).unlink(missing_ok=True)


def _synced_sha256(path: Path) -> str:
    """The file's sha256, after making sure its bytes are on disk (what the signed marker vouches for)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return file_sha256(path)


# --- verifying and loading -----------------------------------------------------------------------


@dataclass
class Unusable:
    """A tag that cannot be resumed from, and why. `crash_leftover`: what an interrupted save leaves
    (no marker, an empty or cut-off one), as opposed to a checkpoint that fails its signature."""

    tag: str
    reason: str
    crash_leftover: bool = False


def read_marker(tag_dir: Path, key: bytes | None) -> tuple[dict | None, Unusable | None]:
    """The tag's marker if its signature is this user's (files not yet hashed), else why not."""
    path, name = tag_dir / MARKER, tag_dir.name
    if not path.is_file():
        return None, Unusable(name, f"it has no {MARKER} (its save did not finish)", crash_leftover=True)
    text = path.read_text(errors="replace")
    if not text.strip():
        return None, Unusable(name, f"its {MARKER} is empty (a save cut off by a crash or power loss)", crash_leftover=True)
    try:
        marker = json.loads(text)
        body = {k: marker[k] for k in ("tag", "step", "config_hash", "files")}
        signature = str(marker["signature"])
    except (ValueError, KeyError, TypeError):
        return None, Unusable(name, f"its {MARKER} is cut off or not slm's (not the JSON slm writes)", crash_leftover=True)
    if key is None:
        return None, Unusable(name, f"it is signed, but there is no signing key {key_path()} to check it with "
                                    "(was SLM_CACHE changed?)")
    if not hmac.compare_digest(signature, _sign(key, body)) or body["tag"] != name or not isinstance(body["files"], dict):
        return None, Unusable(name, f"the signature of its {MARKER} does not match your key {key_path()}: this "
                                    "checkpoint was not written by your slm, or was changed since")
    return marker, None


def verify(tag_dir: Path, key: bytes | None) -> tuple[dict | None, Unusable | None]:
    """The marker of a tag whose signature and every file match, else why not. Reads no pickle."""
    marker, problem = read_marker(tag_dir, key)
    if problem is not None:
        return None, problem
    name, files = tag_dir.name, marker["files"]
    present = {str(p.relative_to(tag_dir)) for p in tag_dir.rglob("*") if p.is_file() and p.name != MARKER}
    if present - set(files):
        return None, Unusable(name, f"it holds files its signed {MARKER} does not list: {', '.join(sorted(present - set(files)))}")
    for rel, digest in files.items():
        path = tag_dir / rel
        if not path.is_file():
            return None, Unusable(name, f"its file {rel} is missing")
        if not hmac.compare_digest(file_sha256(path), str(digest)):
            return None, Unusable(
                name, f"its file {rel} ({path.stat().st_size} bytes) is not the file that was saved (truncated or changed)"
            )
    return marker, None


@dataclass
class Resumed:
    step: int
    tag: str
    client_state: dict
    skipped: list


def load_newest(engine, ckpt_dir: Path, *, config_hash: str, resume: bool | str) -> Resumed | None:
    """Load the newest checkpoint in `ckpt_dir` that verifies and loads; None when there is none to resume.

    `resume`: True must resume (an error if nothing can be); "auto" resumes a run of the same
    config (an error for another config), and starts afresh when there is nothing at all, or only
    what a crash during a save leaves. Refused outright: checkpoints that exist but none of which
    verifies, since loading a checkpoint that fails its signature would run someone else's code.
    """
    found = tags(ckpt_dir)
    if not found:
        if resume is True:
            raise SlmError(f"resume=true but there is no checkpoint in {ckpt_dir}; run with resume=false to start afresh.")
        return None
    key = signing_key()
    skipped: list[Unusable] = []
    tried_loading = False
    for step, tag_dir in found:
        marker, problem = verify(tag_dir, key)
        if problem is None and resume == "auto" and marker["config_hash"] != config_hash:
            # Checked before loading anything: a checkpoint of another config may not even fit this model.
            raise SlmError(
                f"{ckpt_dir} holds an unfinished run with a different config. Pass resume=false to start afresh "
                "(its checkpoints are replaced), resume=true to continue it anyway, or choose another output_dir."
            )
        if problem is None:
            tried_loading = True
            try:
                load_path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag_dir.name)
            except Exception as exc:  # noqa: BLE001  any failure to load sends us to the previous checkpoint
                load_path, client = None, None
                problem = Unusable(tag_dir.name, f"DeepSpeed could not load it ({type(exc).__name__}: {exc})")
            if problem is None and (load_path is None or not client or "step" not in client):
                problem = Unusable(tag_dir.name, "DeepSpeed could not load it (see the warnings above)")
            if problem is None:
                _warn_skipped(skipped)
                return Resumed(step=int(client["step"]), tag=tag_dir.name, client_state=client, skipped=skipped)
        skipped.append(problem)
    if resume == "auto" and all(s.crash_leftover for s in skipped):
        _warn_skipped(skipped, then="starting afresh")
        return None
    listing = "; ".join(f"{s.tag}: {s.reason}" for s in skipped)
    loaded = "" if tried_loading else " Nothing was loaded."
    raise SlmError(
        f"none of the checkpoints in {ckpt_dir} can be resumed from ({listing}).{loaded} Run with "
        "resume=false to start afresh (the checkpoints there are deleted), or choose another output_dir."
    )


def _warn_skipped(skipped: list, then: str = "") -> None:
    from slm_cli.engine import distributed as dist

    if not skipped or not dist.is_main():
        return
    from slm_cli.ui import console

    for s in skipped:
        console.print(f"[yellow]warning:[/yellow] skipped checkpoint {s.tag}: {s.reason}", highlight=False, soft_wrap=True)
    if then:
        console.print(f"[yellow]warning:[/yellow] no checkpoint to resume from; {then}", highlight=False, soft_wrap=True)


# --- "run the same command again" ------------------------------------------------------------------


def rerun_command(output_dir: Path) -> str | None:
    """The command line that continues this run: the user's own, with output_dir pinned, or None if unknown.

    The dispatcher leaves `sys.argv = ["slm-<stage>", <hydra args>]` (under our launcher too). A
    recipe is given back as `recipe=NAME`, a file of the user's as `--config FILE`; `hydra.run.dir` pinned by the launcher and any
    `resume=` (resume=false would start afresh) are left out.
    """
    prog = Path(sys.argv[0]).name if sys.argv else ""
    if not prog.startswith("slm-"):
        return None
    stage, args, out = prog[len("slm-"):], list(sys.argv[1:]), []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--config-dir" and i + 3 < len(args) and args[i + 2] == "--config-name":
            folder, name = Path(args[i + 1]), args[i + 3]
            if folder.resolve() == (RECIPE_DIR / stage).resolve():
                out.append(f"recipe={name}")
            else:  # the user's own file, given back as they can type it
                out += ["--config", str(folder / (name if name.endswith(".yaml") else f"{name}.yaml"))]
            i += 4
            continue
        drop = {"output_dir", "resume"} | ({"hydra.run.dir"} if os.environ.get("SLM_LAUNCHED") == "1" else set())
        if a.split("=", 1)[0].lstrip("+~") not in drop:
            out.append(a)
        i += 1
    return shlex.join(["slm", stage, *out, f"output_dir={Path(output_dir).resolve()}"])


def find_interrupted_run(values: dict) -> Path | None:
    """For a command that left output_dir and hydra.run.dir at their defaults: the newest earlier run of
    the same config, under the same `outputs/<stage>/` folder, that was interrupted with a checkpoint.

    The default output_dir lies in a new timestamped folder each time, so without this "run the same
    command again" would start from scratch. Only a tag whose marker is signed with this user's key
    and whose config fingerprint matches counts (its files are checked when it is loaded).
    """
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return None
    if hc.mode == RunMode.MULTIRUN:  # each job of a sweep has its own folder by design
        return None
    output_dir = values.get("output_dir")
    given = {o.split("=", 1)[0].lstrip("+~") for o in [*hc.overrides.task, *hc.overrides.hydra]}
    run_dir = Path(hc.runtime.output_dir).resolve()
    if not output_dir or {"output_dir", "hydra.run.dir"} & given or Path(output_dir).resolve().parent != run_dir:
        return None
    from slm_cli.artifacts import config_fingerprint

    name, key, best = Path(output_dir).name, signing_key(), None
    if key is None:
        return None
    for ckpt_dir in run_dir.parent.glob(f"*/{name}.work/checkpoints"):
        previous = ckpt_dir.parent.parent / name
        if previous.parent == run_dir or os.path.lexists(previous):
            continue
        # The fingerprint covers output_dir; that run's was the same default, resolved in its own folder.
        fingerprint = config_fingerprint({**values, "output_dir": str(previous)})
        for _, tag_dir in tags(ckpt_dir):
            marker, problem = read_marker(tag_dir, key)
            if problem is None and marker["config_hash"] == fingerprint:
                when = (tag_dir / MARKER).stat().st_mtime
                if best is None or when > best[0]:
                    best = (when, previous, int(marker["step"]))
                break
    if best is None:
        return None
    from slm_cli.ui import console

    console.print(
        f"[yellow]continuing[/yellow] the interrupted run in {best[1]} (same config, checkpoint of step {best[2]}); "
        "pass resume=false to start a new run instead.",
        highlight=False, soft_wrap=True,
    )
    return best[1]


def carried_totals(client_state: dict | None) -> dict[str, Any]:
    """The whole-run totals a checkpoint carries (empty for a checkpoint of an older slm)."""
    return dict((client_state or {}).get("run_totals") or {})
