"""Bad input gets one clear line and exit status 2, and harms nothing."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from supervise.doctor import check_idle_cpus
from tracer.idle_poll import HALT_POLL_NS, halt_poll_ns

from .procs import alive

SUPERVISE = [sys.executable, "-m", "supervise"]


def _run(*args: str, env: dict | None = None, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, *SUPERVISE, *args], capture_output=True, text=True, timeout=60,
                          env=env)


def _error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("supervise: error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_no_such_pid_is_refused():
    result = _run("--pid", "4000000", "--trace")
    assert result.returncode == 2
    assert "no process with pid 4000000" in _error_line(result)


def test_kernel_thread_is_refused():
    result = _run("--pid", "2", "--trace")
    assert result.returncode == 2
    assert "kernel thread" in _error_line(result)


def test_process_traced_by_someone_else_is_refused_naming_the_tracer(redis):
    strace = subprocess.Popen(["strace", "-f", "-o", "/dev/null", "-p", str(redis.pid)],
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and f"TracerPid:\t{strace.pid}" not in open(
            f"/proc/{redis.pid}/status"
        ).read():
            time.sleep(0.05)
        result = _run("--pid", str(redis.pid), "--trace")
        assert result.returncode == 2
        assert f"already traced by pid {strace.pid} (strace)" in _error_line(result)
    finally:
        strace.terminate()
        strace.wait(10)
    assert alive(redis.pid)


def test_non_root_user_is_refused(redis):
    result = _run("--pid", str(redis.pid), "--trace",
                  prefix=("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"))
    assert result.returncode == 2
    assert "must run as root" in _error_line(result)


def test_missing_kernel_headers_point_at_doctor(redis):
    env = dict(os.environ, BCC_KERNEL_SOURCE="/nonexistent-kernel-headers")
    result = _run("--pid", str(redis.pid), "--trace", env=env)
    assert result.returncode == 2
    assert "supervise doctor" in _error_line(result)
    assert alive(redis.pid)


def test_unknown_option_is_a_usage_error():
    result = _run("--frobnicate")
    assert result.returncode == 2
    assert "unrecognized arguments: --frobnicate" in result.stderr


def test_trace_needs_a_target():
    result = _run("--trace")
    assert result.returncode == 2
    assert "give --pid PID or a command" in result.stderr


def test_doctor_reports_a_ready_machine():
    result = _run("doctor")
    assert result.returncode == 0, result.stdout
    for item in ("root", "tracefs", "bcc", "kernel headers", "tracepoint program",
                 "bpf_send_signal_thread", "Yama ptrace_scope", "RDMA devices", "network namespaces",
                 "idle CPUs"):
        assert item in result.stdout
    assert any(line.split()[:3] == ["output", "breakpoints", "ok"] for line in result.stdout.splitlines())


@pytest.mark.serial  # reads the machine's idle-CPU latency, which a gating tracer changes
def test_doctor_says_whether_idle_cpus_poll_before_they_halt():
    window = Path(HALT_POLL_NS)
    if halt_poll_ns() is None:
        assert check_idle_cpus().detail == "not under the haltpoll governor"
        return
    was = window.read_text()
    try:
        window.write_text("0")
        halting = check_idle_cpus()
        window.write_text("150000")
        polling = check_idle_cpus()
    finally:
        window.write_text(was)
    assert (halting.mark, halting.required) == ("slow", False)
    assert HALT_POLL_NS in halting.fix
    assert polling.ok and polling.detail.startswith("poll up to 150 µs")
