"""DeepSpeed's CPU ops: built once up front (`make ops`), and guarded against stale build locks.

The CPU Adam and the shared-memory collective build by JIT (ninja + gcc) on first use, about
two minutes here, and are cached under TORCH_EXTENSIONS_DIR, which slm sets to a folder inside
this environment (`private_extensions_dir`) unless the user set it.

Every later load still takes torch's build lock (`<ext>/lock`, created with O_EXCL and removed
when the load ends) to let ninja check the build is current. A process killed inside that window
(a SIGKILL, an OOM kill, a machine stop) leaves the file behind, and every later run then waits on
it forever, silently: this hung a CI run for 90 minutes. `clear_stale_locks` removes a lock that
no live process holds open, which is exactly a lock whose owner died (torch keeps the file
descriptor open while it holds the lock).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)


def private_extensions_dir() -> Path:
    """This environment's own build folder: `<venv>/var/torch_extensions/<torch, deepspeed versions>`.

    torch's default, ~/.cache/torch_extensions, is shared by every environment of the user, and a
    build there is keyed by the op's source path. Two venvs (another checkout, a CI clone) therefore
    rebuild each other's ops in turn, two minutes each, and a run that happens to rebuild under a
    resource limit (a file-size limit, a full disk) fails inside the compiler. Inside the venv, the
    build belongs to the environment that compiled it and goes away with it. An interpreter whose
    prefix is not writable (a system Python) builds under the user's cache, keyed by that prefix.
    """
    import hashlib
    import sys
    from importlib import metadata

    def version(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "none"

    name = f"py{sys.version_info[0]}{sys.version_info[1]}-torch{version('torch')}-ds{version('deepspeed')}"
    if os.access(sys.prefix, os.W_OK):
        return Path(sys.prefix) / "var" / "torch_extensions" / name
    key = hashlib.sha256(os.path.realpath(sys.prefix).encode()).hexdigest()[:12]
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "slm-torch-extensions" / f"{name}-{key}"


def use_private_extensions_dir() -> Path:
    """Point torch's JIT builds at `private_extensions_dir()`, unless the user chose TORCH_EXTENSIONS_DIR.

    Set in the environment, so the launcher's ranks and every subprocess build into the same folder.
    """
    if not os.environ.get("TORCH_EXTENSIONS_DIR"):
        os.environ["TORCH_EXTENSIONS_DIR"] = str(private_extensions_dir())
    return Path(os.environ["TORCH_EXTENSIONS_DIR"])


def extensions_root() -> Path:
    """Where torch builds JIT extensions (TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "torch_extensions"


def _open_files() -> set[tuple[int, int]]:
    """(device, inode) of every file a process we can see holds open; empty where /proc is missing."""
    held: set[tuple[int, int]] = set()
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            fds = list(fd_dir.iterdir())
        except OSError:  # the process ended, or it is not ours to read
            continue
        for fd in fds:
            try:
                st = fd.stat()
            except OSError:
                continue
            held.add((st.st_dev, st.st_ino))
    return held


def _orphans(locks: list[Path]) -> dict[Path, tuple[int, int]]:
    held = _open_files()
    found = {}
    for lock in locks:
        try:
            st = lock.stat()
        except FileNotFoundError:
            continue
        if (st.st_dev, st.st_ino) not in held:
            found[lock] = (st.st_dev, st.st_ino)
    return found


def clear_stale_locks(root: Path | None = None, settle: float = 0.5) -> list[Path]:
    """Remove JIT build locks under `root` that no live process holds; return the removed paths.

    A lock is removed only if it is unheld twice, `settle` seconds apart, and is still the same
    file: an owner between closing and deleting its lock (microseconds) is never raced. Does
    nothing where /proc is unavailable (not Linux), since holders cannot be seen there.
    """
    root = extensions_root() if root is None else Path(root)
    if not Path("/proc/self/fd").is_dir() or not root.is_dir():
        return []
    locks = list(root.glob("*/*/lock")) + list(root.glob("*/lock"))
    if not locks:
        return []  # the usual case: no need to read every process's open files
    candidates = _orphans(locks)
    if not candidates:
        return []
    time.sleep(settle)
    removed = []
    for lock, ident in _orphans(list(candidates)).items():
        if ident != candidates[lock]:
            continue  # a new build took the lock meanwhile
        try:
            lock.unlink()
        except FileNotFoundError:
            continue
        log.warning("removed a stale build lock left by an interrupted DeepSpeed op build: %s", lock)
        removed.append(lock)
    return removed


# DeepSpeed's CPU all-reduce (csrc/cpu/comm/shm.cpp) gives every rank a 69 MB POSIX shared-memory
# buffer, /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>, and never unlinks it:
# each multi-process run on this machine used to leave 138 MB of RAM behind (20 GB after a day of
# tests, until builds swapped to a crawl). The launcher removes its run's buffers when the run
# ends, and before each launch sweeps the ones no live process maps any more.
SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "deepspeed_allreduce_buffer_"


def _mapped_paths() -> set[str]:
    """Paths of the files any process we can see has memory-mapped (from /proc/<pid>/maps)."""
    mapped: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # the process ended, or it is not ours to read
            continue
        for line in text.splitlines():
            if SHM_PREFIX in line:
                mapped.add(line.split(None, 5)[-1].replace(" (deleted)", ""))
    return mapped


def clear_shm_buffers(port: int | None = None, min_age: float = 60.0, root: Path = SHM_DIR) -> list[Path]:
    """Remove DeepSpeed all-reduce buffers that no live process maps or holds open; return them.

    `port` limits it to the buffers of the run on that rendezvous port (call it once that run's
    processes have exited). Buffers younger than `min_age` seconds are kept: a rank of another
    run may have just created its buffer and not mapped it yet. Does nothing without /proc.
    """
    if not Path("/proc/self/maps").is_file() or not root.is_dir():
        return []
    pattern = f"{SHM_PREFIX}*_{port}_*" if port is not None else f"{SHM_PREFIX}*"
    buffers = list(root.glob(pattern))
    if not buffers:
        return []
    in_use, held = _mapped_paths(), _open_files()
    now, removed, freed = time.time(), [], 0
    for buffer in buffers:
        try:
            st = buffer.stat()
        except FileNotFoundError:
            continue
        if str(buffer) in in_use or (st.st_dev, st.st_ino) in held or now - st.st_mtime < min_age:
            continue
        try:
            buffer.unlink()
        except FileNotFoundError:
            continue
        removed.append(buffer)
        freed += st.st_size
    if removed:
        log.info("removed %d DeepSpeed shared-memory buffer(s) of finished runs (%.0f MB)", len(removed), freed / 1e6)
    return removed


def build() -> float:
    """Build (or check) the CPU Adam and the shared-memory collective; return the seconds taken."""
    import torch
    from deepspeed.accelerator import get_accelerator
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    t0 = time.perf_counter()
    use_private_extensions_dir()
    clear_stale_locks()
    DeepSpeedCPUAdam([torch.nn.Parameter(torch.zeros(1))])
    shm = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if shm is not None and shm.is_compatible():
        shm.load(verbose=False)
    return time.perf_counter() - t0


if __name__ == "__main__":
    print(f"DeepSpeed CPU ops ready in {use_private_extensions_dir()} ({build():.1f}s)")
