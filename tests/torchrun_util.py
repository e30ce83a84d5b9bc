"""Run `torchrun` from tests so that a hang fails the test instead of stalling the suite.

torchrun starts each rank in a session of its own (`start_new_session=True` in torch's subprocess
handler), so killing torchrun's process group leaves the ranks alive. On a timeout we therefore kill
every descendant, found through /proc, and the output goes to files rather than pipes, so no surviving
process can keep the test waiting for an end-of-file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def descendants(pid: int) -> list[int]:
    """All live descendants of `pid` (children first), read from /proc/<pid>/stat."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # the process ended while we looked
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # fields after "(comm)": state, ppid, ...
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every descendant, whatever session or process group they are in."""
    for p in [*descendants(pid), pid]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_killable(cmd: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `cmd`; on a timeout kill it with all its descendants and fail with the output so far."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err, text=True, stdin=subprocess.DEVNULL)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            proc.wait()
            out.seek(0), err.seek(0)
            pytest.fail(f"{cmd[0]} timed out after {timeout} s\nstdout:\n{out.read()[-3000:]}\n"
                        f"stderr:\n{err.read()[-3000:]}")
        out.seek(0), err.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())


def run_torchrun(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 <args>` with one thread per rank, killed whole on a timeout.

    --standalone takes a free rendezvous port each run; gloo talks over loopback, whatever the
    hostname resolves to."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    return run_killable(cmd, env, timeout)
