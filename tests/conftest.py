"""Shared fixtures: an isolated cache and working folder, and `slm` run in-process."""

from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True, scope="session")
def _slm_cache(tmp_path_factory):
    """Generated data and tokenizers go to a throwaway cache, never the user's."""
    if "SLM_CACHE" not in os.environ:
        os.environ["SLM_CACHE"] = str(tmp_path_factory.mktemp("slm-cache"))
    yield


@pytest.fixture
def slm(tmp_path, monkeypatch):
    """Run `slm <args>` in-process from `tmp_path`, as a user would type it; returns the exit code."""
    from slm_cli.__main__ import main

    monkeypatch.chdir(tmp_path)
    argv_before = list(sys.argv)

    def run(*args: str) -> int:
        try:
            return main(list(args))
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else 1
        finally:
            sys.argv = argv_before

    return run
