"""`supervise demo`, the main job, end to end: it passes, and it leaves nothing of what it started
behind, also when it is interrupted the way Ctrl-C in a terminal does (SIGINT to its process
group, which its servers and supervisors share)."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _default_sigint() -> None:
    """As in a terminal: a test run started in the background inherits SIGINT ignored, and Python
    then never turns SIGINT into KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_demo() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "supervise", "demo"], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=_default_sigint)


def _workdir(first_line: str) -> str:
    found = re.search(r"cluster file (\S+)/cluster\.toml", first_line)
    assert found, f"the demo did not name its cluster file: {first_line!r}"
    return found.group(1)


def _left_behind(workdir: str) -> list[str]:
    """Processes started for the demo that still run: their command line or working directory
    (Redis runs in its node's directory) is under the demo's directory."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if workdir in cmdline or cwd.startswith(workdir):
            found.append(f"{pid}: {cmdline}")
    return found


def _kill_group(demo: subprocess.Popen) -> None:
    try:
        os.killpg(demo.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    demo.wait(10)


def test_the_demo_passes_and_leaves_nothing_running_or_on_disk():
    demo = _start_demo()
    try:
        out, _ = demo.communicate(timeout=400)
    finally:
        _kill_group(demo)
    assert demo.returncode == 0, out
    assert "demo passed: one service, three copies, nothing lost" in out
    workdir = _workdir(out.splitlines()[0])
    assert not Path(workdir).exists()
    assert _left_behind(workdir) == []


def test_ctrl_c_during_the_workload_stops_everything_the_demo_started():
    demo = _start_demo()
    lines: list[str] = []
    try:
        for line in demo.stdout:
            lines.append(line)
            if line.startswith("2."):  # the clients are writing through the leader
                break
        assert lines and lines[-1].startswith("2."), "".join(lines)
        time.sleep(0.5)
        os.killpg(demo.pid, signal.SIGINT)
        rest, _ = demo.communicate(timeout=60)
    finally:
        _kill_group(demo)
    out = "".join(lines) + rest
    assert demo.returncode == 130, out
    assert "interrupted: cleaning up" in out
    workdir = _workdir(lines[0])
    assert not Path(workdir).exists()
    assert _left_behind(workdir) == []
