"""Real processes for the tests: a free localhost port, a command in its own process group with its output in a
log file, and waiting for several of them at once (each group still running at the deadline is killed)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_logged(cmd: list[str], cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    """``cmd`` in ``cwd``, in its own process group (so that all its children can be killed), stdout and stderr
    to ``log``."""
    with open(log, "wb") as f:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def finish(procs: list[subprocess.Popen], logs: list[Path], timeout: float = 600) -> list[str]:
    """Wait for every process (killing each process group still running after ``timeout``); assert exit 0; their
    logs."""
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    out = [log.read_text(errors="replace") for log in logs]
    for p, log, text in zip(procs, logs, out):
        assert p.returncode == 0, f"{' '.join(map(str, p.args))} ({log}) exited {p.returncode}:\n{text[-5000:]}"
    return out
