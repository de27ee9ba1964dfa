"""Shared fixtures: an isolated cache and working folder, and `slm` run in-process."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Tiny test models gain nothing from intra-op threads, and on a busy 2-core machine two OpenMP
# threads per process oversubscribe it badly (measured here: 10-20x slower training steps).
# Set before torch is imported so subprocesses inherit it too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True, scope="session")
def _slm_cache(tmp_path_factory):
    """Generated data and tokenizers go to a throwaway cache, never the user's."""
    if "SLM_CACHE" not in os.environ:
        os.environ["SLM_CACHE"] = str(tmp_path_factory.mktemp("slm-cache"))
    yield


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op torch thread avoids OpenMP oversubscription on a shared CPU
    (use with `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def slm(tmp_path, monkeypatch):
    """Run `slm <args>` in-process from `tmp_path`, as a user would type it; returns the exit code."""
    from tests.stages.helpers import run_slm

    monkeypatch.chdir(tmp_path)
    return run_slm
