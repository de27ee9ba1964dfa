"""Test-only fault injection at named points, so crash tests wait for a state, never for a time.

`SLM_TEST_KILL_AT=<point>` SIGKILLs the process when it reaches that point (a power cut there);
`SLM_TEST_PAUSE_AT=<point>` prints `slm-test: paused at <point>` to stderr and waits there for a
signal, so a test can interrupt exactly that state. Unset (always, outside tests) they do nothing.

Points: `setup` (a stage about to start its work), `after-step:N` (step N logged),
`in-checkpoint:N` (DeepSpeed wrote the first file of checkpoint N, not the rest),
`after-checkpoint:N` (checkpoint N complete), `publish:before-swap`, `publish:after-swap`,
`publish:after-rename` (see artifacts.commit).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Callable

KILL_ENV = "SLM_TEST_KILL_AT"
PAUSE_ENV = "SLM_TEST_PAUSE_AT"
PAUSE_LIMIT_S = 600.0  # a paused run whose test died never waits for good


def kill_armed(name: str) -> bool:
    return os.environ.get(KILL_ENV) == name


def kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def point(name: str, until: Callable[[], bool] | None = None) -> None:
    """Die or pause here if a test asked for it.

    `until`: the pause ends when it returns True (the training loop's signal handler only sets a
    flag); without it, only a signal that raises (SIGINT's KeyboardInterrupt) or kills ends it.
    """
    if kill_armed(name):
        kill()
    if os.environ.get(PAUSE_ENV) == name:
        print(f"slm-test: paused at {name}", file=sys.stderr, flush=True)
        deadline = time.monotonic() + PAUSE_LIMIT_S
        while (until is None or not until()) and time.monotonic() < deadline:
            time.sleep(0.01)  # a signal cuts the sleep short and runs its handler first
