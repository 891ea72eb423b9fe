"""Kill-and-resume helpers shared by the fault tests."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable


def sigkill_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 120.0) -> None:
    """Wait until `ready()` (e.g. a first checkpoint or cache line exists), then SIGKILL `proc` — a real crash.

    Fails if the process ends on its own first or `ready()` never holds within `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    try:
        while not ready() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, f"the process finished or failed before it could be killed:\n{proc.stdout.read().decode()}"
        assert ready(), f"not ready to be killed within {timeout:.0f} s"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
