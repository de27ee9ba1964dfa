"""Process-group facts for a stage: rank, world size, and the env DeepSpeed needs in-process."""

from __future__ import annotations

import os

import torch


def setup_env() -> None:
    """Make a plain `python` process look like rank 0 of 1.

    Without RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, DeepSpeed falls back to MPI discovery
    and fails on machines without mpi4py. Under a launcher these are already set.
    """
    from slm_cli.engine.launcher import free_port

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    if world_size() == 1 and not _initialized() and not port_free(int(os.environ["MASTER_PORT"])):
        # a one-process run binds the rendezvous port itself: a MASTER_PORT inherited from a parent process
        # (or an old `export`) whose port is taken would fail with EADDRINUSE, so take a free one
        os.environ["MASTER_PORT"] = str(free_port())
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def port_free(port: int) -> bool:
    """True when a TCP server could listen on 127.0.0.1:`port` now."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (a no-op in a single process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and world_size() > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized() and world_size() > 1:
        torch.distributed.barrier()


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")
