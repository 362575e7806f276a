"""A server under test as a process tree: the RSS summed over it, stopping
every process in it, waiting until the server answers. Linux /proc only."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def _stat(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name (state, ppid, ...); [] if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def descendants(pid: int) -> list[int]:
    """Every process below pid (read before stopping it: orphans get re-parented)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))):
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def tree_rss(pid: int) -> int:
    """RSS in bytes summed over a process and all its descendants."""
    total = 0
    for member in (pid, *descendants(pid)):
        try:
            status = Path(f"/proc/{member}/status").read_text()
        except OSError:
            continue
        total += sum(
            int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:")
        )
    return total


def stop_tree(proc: subprocess.Popen[bytes], grace: float = 60) -> None:
    """SIGTERM a server and every process below it (milvus-server's wrapper
    leaves its child running otherwise), SIGKILL what outlives the grace."""
    pids = [proc.pid, *descendants(proc.pid)]
    for pid in reversed(pids):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    for pid in pids:
        while time.monotonic() < deadline and (fields := _stat(pid)) and fields[0] != "Z":
            if pid == proc.pid and proc.poll() is not None:
                break
            time.sleep(0.1)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def wait_until(check: Callable[[], object], proc: subprocess.Popen[bytes], log: Path) -> None:
    """Poll check() until it returns without raising (--server-wait s at most,
    600 by default; Milvus restarted on 1M vectors took longer)."""
    deadline = time.monotonic() + float(os.environ.get("RAG_BENCH_SERVER_WAIT", "600"))
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-3000:]}")
        try:
            check()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
