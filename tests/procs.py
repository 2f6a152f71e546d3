"""Processes for tests: real servers started on a free loopback port (always cleaned up), and
helpers to signal, reap and wait for processes."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from supervise.localcluster import free_ports

VENV_BIN = Path(sys.executable).parent
SERVERS = Path(__file__).parent / "servers"


def free_port() -> int:
    return free_ports(1)[0]


def wait_port(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port}") from None
            time.sleep(0.02)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    """``n`` bytes from ``sock``; fails the test if the other end closes first."""
    got = b""
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        assert chunk, f"the other end closed after {got!r}"
        got += chunk
    return got


def cpu_seconds(pid: int) -> float:
    """User and system CPU a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


class Server:
    """A server process listening on ``port``; ``stop()`` kills it and removes its files."""

    def __init__(self, argv: list[str], port: int, workdir: str | None = None) -> None:
        self.port = port
        self.workdir = workdir
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     cwd=workdir)
        self.pid = self.proc.pid
        try:
            wait_port(port)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGCONT)
                self.proc.kill()
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def redis_server(port: int | None = None) -> Server:
    port = port or free_port()
    workdir = tempfile.mkdtemp(prefix="test-redis-")
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", workdir]
    return Server(argv, port, workdir)


def memcached_server(threads: int = 4, port: int | None = None) -> Server:
    port = port or free_port()
    return Server(["memcached", "-U", "0", "-l", "127.0.0.1", "-p", str(port), "-t", str(threads),
                   "-u", "root"], port)


def python_server(script: str, *args: str, port: int | None = None) -> Server:
    port = port or free_port()
    return Server([sys.executable, str(SERVERS / script), str(port), *args], port)


def wait_until(pred: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``pred`` until it holds; TimeoutError(what) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def kill_process(proc: subprocess.Popen | None, sig: int = signal.SIGKILL) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        if sig == signal.SIGKILL:
            os.kill(proc.pid, signal.SIGCONT)  # a stopped process dies as well, but tidier
        proc.send_signal(sig)
    except ProcessLookupError:
        pass


def reap(proc: subprocess.Popen | None, timeout: float = 10) -> None:
    if proc is None:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pass


class LaunchedServer:
    """A server its supervisor started (`supervise ... -- CMD`): its child, ours to signal.

    Dead once it is gone or a zombie (its supervisor reaps it, or is itself stopped)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                state = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                state = "X"
            if state in ("Z", "X"):
                self.returncode = -1  # its exit status went to its supervisor
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"server pid {self.pid}", timeout or 0)
            time.sleep(0.01)
        return self.returncode  # type: ignore[return-value]
