"""`supervise demo`: the main job on a built-in default, cleaned up also on Ctrl-C.

Starts a Redis server on a free loopback port, attaches `supervise --pid ... --trace` to it,
drives a few commands from a client and shows the socket events the tracer saw.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time

from .cli import UsageError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise UsageError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s")


def resp(*args: str) -> bytes:
    out = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def run_demo(argv: list[str]) -> int:
    if argv:
        raise UsageError(f"demo takes no arguments (got {' '.join(argv)})")
    redis = shutil.which("redis-server")
    if redis is None:
        raise UsageError("redis-server is not installed; run 'make setup'")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="supervise-demo-")
    server = subprocess.Popen(
        [redis, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", workdir],
        stdout=subprocess.DEVNULL,
    )
    trace = None
    try:
        wait_listening(port)
        print(f"redis-server pid {server.pid} on 127.0.0.1:{port}")
        trace = subprocess.Popen(
            [sys.executable, "-m", "supervise", "--pid", str(server.pid), "--trace"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        attached = trace.stderr.readline()
        if not attached.startswith("tracing"):
            raise UsageError(f"the tracer did not attach: {attached.strip()}")
        print(attached.strip())
        print("client: SET greeting hello; INCR visits (x3); GET greeting")
        with socket.create_connection(("127.0.0.1", port)) as client:
            for cmd in (("SET", "greeting", "hello"), ("INCR", "visits"), ("INCR", "visits"),
                        ("INCR", "visits"), ("GET", "greeting")):
                client.sendall(resp(*cmd))
                client.recv(4096)
        time.sleep(0.5)
        trace.terminate()
        out, err = trace.communicate(timeout=10)
        print("socket events seen from outside the server:")
        for line in out.splitlines():
            print("  " + line)
        print(err.strip())
        print(f"server still serving after detach: {ping(port)}")
        return 0
    finally:
        if trace is not None and trace.poll() is None:
            trace.kill()
        server.terminate()
        server.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


def ping(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as c:
        c.sendall(resp("PING"))
        return c.recv(64).startswith(b"+PONG")
