"""Multi-process launch: re-execute the same `slm <stage>` command under the `deepspeed` launcher.

One process runs in-process. With `launcher.nproc_per_node > 1` or a `launcher.hostfile`,
the parent re-runs the command as `deepspeed ... --module slm_cli <stage> <overrides>` with
`hydra.run.dir` and `output_dir` pinned to absolute paths, so every rank agrees on one
output folder. Multi-node comes from DeepSpeed's launcher (hostfile), not from us.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from slm_cli.engine.ops import clear_shm_buffers
from slm_cli.errors import SlmError


RENDEZVOUS_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")


def needs_relaunch(launcher) -> bool:
    return launcher.nproc_per_node > 1 or bool(launcher.hostfile)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_nproc(nproc: int) -> None:
    """Refuse more processes than this machine has accelerators (GPU) or cores (CPU)."""
    import torch

    if torch.cuda.is_available():
        have, what = torch.cuda.device_count(), "GPUs"
    else:
        have, what = os.cpu_count() or 1, "CPU cores"
    if nproc > have:
        raise SlmError(
            f"launcher.nproc_per_node={nproc} but this machine has {have} {what}; "
            f"set launcher.nproc_per_node to at most {have}."
        )


def launch_command(stage: str, overrides: list[str], nproc: int, hostfile: str | None, port: int) -> list[str]:
    exe = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    cmd = [exe, "--no_local_rank", "--master_port", str(port)]
    if hostfile:
        cmd += ["--hostfile", hostfile]
    cmd += ["--num_accelerators", str(nproc), "--module", "slm_cli", stage, *overrides]
    return cmd


def relaunch(cfg, values: dict) -> int:
    """Run this stage again under the deepspeed launcher and return its exit code."""
    from hydra.core.hydra_config import HydraConfig

    if not cfg.launcher.hostfile:
        check_nproc(cfg.launcher.nproc_per_node)
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir).resolve()
    pinned = {"hydra.run.dir": str(run_dir), "output_dir": str(Path(cfg.output_dir).resolve())}
    overrides = [o for o in hc.overrides.task if o.split("=", 1)[0].lstrip("+~") not in pinned]
    overrides += [f"{k}={v}" for k, v in pinned.items()]
    overrides = _primary_config_flags(hc, cfg.stage) + overrides
    port = cfg.launcher.master_port or free_port()
    cmd = launch_command(cfg.stage, overrides, cfg.launcher.nproc_per_node, cfg.launcher.hostfile, port)
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARS}  # the launcher sets its own
    env.update(SLM_LAUNCHED="1", DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", _accelerator()))
    clear_shm_buffers()  # left by earlier runs that were killed before this cleanup ran
    try:
        return subprocess.call(cmd, env=env)
    finally:
        clear_shm_buffers(port=port, min_age=0.0)  # DeepSpeed never unlinks its ranks' buffers


def _primary_config_flags(hc, stage: str) -> list[str]:
    """`--config-dir/--config-name` of a run whose primary config is not the stage's own (a preset).

    `hc.overrides.task` holds only the key=value overrides; without these flags the ranks would
    compose the plain stage config and train something other than what the user asked for.
    """
    name = hc.job.config_name
    if not name or name == stage:
        return []
    dirs = [src.path for src in hc.runtime.config_sources if src.provider == "command-line"]
    if not dirs:
        return []
    return ["--config-dir", dirs[0].removeprefix("file://"), "--config-name", name]


def _accelerator() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
