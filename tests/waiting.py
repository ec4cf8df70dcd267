"""Waiting in tests: poll for a condition with a generous deadline, never sleep a fixed time.

The deadlines are for a loaded 2-core machine; `CMRP_TEST_TIME_SCALE=3` triples every one of them (slower
machines, a debugger). A deadline only bounds a hung test: a test passes as soon as its condition holds.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable

TIME_SCALE = float(os.environ.get("CMRP_TEST_TIME_SCALE", "1"))


def scaled(seconds: float) -> float:
    """`seconds` times CMRP_TEST_TIME_SCALE: the limit to give a subprocess or a browser wait."""
    return seconds * TIME_SCALE


def wait_until(condition: Callable[[], object], seconds: float, what: str, proc: subprocess.Popen | None = None,
               every: float = 0.2):
    """Poll `condition()` until it is truthy (returned); fail naming `what` after `scaled(seconds)`, or at once
    when `proc` (the process that should make it true) has ended."""
    deadline = time.monotonic() + scaled(seconds)
    while True:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            err = proc.communicate()[1] if proc.stderr else ""
            raise AssertionError(f"the process ended (exit {proc.returncode}) before {what}:\n{(err or '')[-3000:]}")
        assert time.monotonic() < deadline, f"timed out after {scaled(seconds):.0f} s waiting for {what}"
        time.sleep(every)
