"""`supervise --trace` reads on the CPU of the server thread it traces, and only there while it
keeps up (tracer/cpu_follow.py)."""

import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import redis as redis_py

from .procs import wait_until
from .tracing import start_trace_cli, stop_trace_cli

pytestmark = pytest.mark.serial  # where the reader runs, and how much CPU it takes


def _pinned_cpus(pid: int) -> set[int]:
    """The CPUs that a thread of ``pid`` is pinned to alone."""
    pinned = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            allowed = os.sched_getaffinity(int(task.name))
        except OSError:
            continue
        if len(allowed) == 1:
            pinned |= allowed
    return pinned


def _trace(pid: int) -> subprocess.Popen:
    return start_trace_cli("--pid", str(pid), "--json", stdout=subprocess.DEVNULL)


def _stop(proc: subprocess.Popen) -> str:
    os.kill(proc.pid, signal.SIGCONT)
    _, err = stop_trace_cli(proc, timeout=60)
    assert proc.returncode == 0, err
    return err


def _until_pinned_to(cpu: int, proc: subprocess.Popen, client: redis_py.Redis) -> None:
    def pinned() -> bool:
        for _ in range(100):
            client.set("k", "v")
        return _pinned_cpus(proc.pid) == {cpu}
    wait_until(pinned, 20, f"the trace's reader to keep to CPU {cpu}")


def test_trace_reader_moves_to_the_cpu_where_the_traced_thread_runs(redis):
    first, second = sorted(os.sched_getaffinity(0))[:2]
    os.sched_setaffinity(redis.pid, {second})
    proc = _trace(redis.pid)
    try:
        client = redis_py.Redis(port=redis.port)
        _until_pinned_to(second, proc, client)
        os.sched_setaffinity(redis.pid, {first})
        _until_pinned_to(first, proc, client)
        client.close()
    finally:
        err = _stop(proc)
    assert " 0 lost" in err


def test_trace_reader_keeps_to_no_cpu_while_several_server_threads_read(memcached):
    stop = threading.Event()

    def client() -> None:
        with socket.create_connection(("127.0.0.1", memcached.port)) as sock:
            while not stop.is_set():
                sock.sendall(b"set k 0 0 1\r\nx\r\n")
                sock.recv(64)

    # memcached hands connections to its four worker threads in turn: one each
    clients = [threading.Thread(target=client) for _ in range(4)]
    proc = _trace(memcached.pid)
    try:
        for t in clients:
            t.start()
        time.sleep(0.5)
        samples = []
        for _ in range(20):
            samples.append(_pinned_cpus(proc.pid))
            time.sleep(0.05)
    finally:
        stop.set()
        for t in clients:
            t.join()
        _stop(proc)
    assert sum(1 for s in samples if s) <= 2, samples


def _flood(port: int, commands: int) -> None:
    """SETs of 4 KiB values, pipelined 500 at a time: the server reads them 16 KiB at a time,
    and each read's record in the ring takes the whole 4 KiB snap length."""
    command = b"*3\r\n$3\r\nSET\r\n$5\r\nflood\r\n$4096\r\n" + b"x" * 4096 + b"\r\n"
    with socket.create_connection(("127.0.0.1", port)) as sock:
        for _ in range(commands // 500):
            sock.sendall(command * 500)
            replies = b""
            while len(replies) < 500 * len(b"+OK\r\n"):
                replies += sock.recv(65536)


def test_trace_reader_lets_go_of_the_cpu_while_it_is_far_behind(redis):
    cpu = sorted(os.sched_getaffinity(0))[1]
    os.sched_setaffinity(redis.pid, {cpu})
    proc = _trace(redis.pid)
    try:
        client = redis_py.Redis(port=redis.port)
        _until_pinned_to(cpu, proc, client)
        os.kill(proc.pid, signal.SIGSTOP)
        _flood(redis.port, 40_000)  # about 160 MiB in about 10,000 reads: the 32 MiB ring fills
        os.kill(proc.pid, signal.SIGCONT)
        wait_until(lambda: not _pinned_cpus(proc.pid), 10, "the reader to let go of the CPU")
        _until_pinned_to(cpu, proc, client)
        client.close()
    finally:
        _stop(proc)
