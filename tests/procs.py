"""Real processes for the tests: a free localhost port, a command in its own process group with its output in a
log file, waiting for several of them at once (each tree still running at the deadline is killed), and kill -9 of
a whole process tree."""

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
    """Wait for every process (killing each process tree still running after ``timeout``); assert exit 0; their
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
                kill_tree(p)
    out = [log.read_text(errors="replace") for log in logs]
    for p, log, text in zip(procs, logs, out):
        assert p.returncode == 0, f"{' '.join(map(str, p.args))} ({log}) exited {p.returncode}:\n{text[-5000:]}"
    return out


def process_tree(pid: int) -> list[int]:
    """``pid`` and every live descendant (Linux: /proc/<pid>/task/<tid>/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:  # exited meanwhile
                continue
    return out


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL to ``proc`` and all its descendants at once, as a machine that dies takes them all. Not killpg:
    torchrun starts each rank in a session of its own. Each process is stopped first, so that none starts or
    reaps another while the tree is read."""
    stopped: set[int] = set()
    while True:
        new = [p for p in process_tree(proc.pid) if p not in stopped]
        if not new:
            break
        for p in new:
            try:
                os.kill(p, signal.SIGSTOP)
            except ProcessLookupError:
                pass
            stopped.add(p)
    for p in stopped:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
