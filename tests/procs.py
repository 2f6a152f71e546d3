"""Real server processes for tests: started on a free loopback port, always cleaned up."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
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


def python_server(script: str, port: int | None = None) -> Server:
    port = port or free_port()
    return Server([sys.executable, str(SERVERS / script), str(port)], port)
