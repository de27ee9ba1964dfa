"""Test-only fault injection at named points, so crash tests wait for a state, never for a time.

`SLM_TEST_KILL_AT=<point>` SIGKILLs the process when it reaches that point (a power cut there);
`SLM_TEST_PAUSE_AT=<point>` prints `slm-test: paused at <point>` to stderr and waits there for a
signal, so a test can interrupt exactly that state. Unset (always, outside tests) they do nothing.
"""

from __future__ import annotations

import os
import signal
import sys
import time

KILL_ENV = "SLM_TEST_KILL_AT"
PAUSE_ENV = "SLM_TEST_PAUSE_AT"


def point(name: str) -> None:
    if os.environ.get(KILL_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get(PAUSE_ENV) == name:
        print(f"slm-test: paused at {name}", file=sys.stderr, flush=True)
        while True:  # a signal's handler (KeyboardInterrupt for SIGINT) ends the wait
            time.sleep(3600)
