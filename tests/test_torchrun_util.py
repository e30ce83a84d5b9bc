"""The torchrun helper must end a hung run, ranks in their own sessions included."""

import os
import subprocess
import sys
import time

import pytest

from tests.torchrun_util import descendants, run_killable

# A stand-in for torchrun: it starts a "rank" in a new session (as torch's subprocess handler does),
# prints the rank's pid, and both hang.
HANGING_LAUNCHER = (
    "import subprocess, sys, time\n"
    "rank = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True)\n"
    "print(rank.pid, flush=True)\n"
    "time.sleep(600)\n"
)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def test_a_hung_run_fails_and_its_ranks_are_killed():
    t0 = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match="timed out after 3 s") as info:
        run_killable([sys.executable, "-c", HANGING_LAUNCHER], dict(os.environ), timeout=3)
    assert time.monotonic() - t0 < 60
    rank_pid = int(str(info.value).split("stdout:\n")[1].split()[0])
    deadline = time.monotonic() + 10
    while _alive(rank_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(rank_pid), "the rank in its own session survived"


def test_a_finished_run_returns_its_output_and_code():
    proc = run_killable([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"],
                        dict(os.environ), timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "out\n", "err\n")


def test_descendants_finds_grandchildren():
    child = subprocess.Popen([sys.executable, "-c", HANGING_LAUNCHER], stdout=subprocess.PIPE, text=True)
    try:
        rank_pid = int(child.stdout.readline())
        assert rank_pid in descendants(child.pid)
        assert rank_pid in descendants(os.getpid())
    finally:
        for p in [*descendants(child.pid), child.pid]:
            os.kill(p, 9)
        child.wait()
