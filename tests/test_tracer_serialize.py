"""Serialized releases: memcached's worker threads take held inputs one at a time, in release order."""

import socket
import time

from tracer.events import READS, Call
from tracer.tracer import Mode, Tracer

ROUNDS = 100


def _request(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    return sock.recv(4096)


def test_inputs_released_back_to_back_take_effect_in_release_order_across_worker_threads(memcached):
    """Two clients' appends to one key, on two worker threads, are both held, then released
    newer first, back to back. Without serializing the two threads race (about four rounds in
    ten came out in arrival order on these machines); serialized, the first released runs to
    its sleep before the second goes on, every time. Which append arrives first is up to the
    scheduler (on a busy machine b's can), so each round expects its own release order."""
    held: list = []
    released: list[bytes] = []
    sleeps: list[int] = []

    def on_event(ev):
        if ev.call is Call.SLEEP:
            sleeps.append(ev.tid)
        elif ev.gated and ev.call in READS and ev.data.startswith(b"append"):
            held.append(ev)
            if len(held) == 2:
                older, newer = held
                held.clear()
                released.append(b"".join(e.data.split(b"\r\n")[1] for e in (newer, older)))
                tracer.release(newer)
                tracer.release(older)
        elif ev.gated:
            tracer.release(ev)

    tracer = Tracer(Mode.GATE, on_event, serialize=True)
    tracer.attach(memcached.proc.pid)
    try:
        a, b, c = (socket.create_connection(("127.0.0.1", memcached.port), timeout=10)
                   for _ in range(3))
        values = []
        for r in range(ROUNDS):
            assert _request(c, f"set k{r} 0 0 1\r\nx\r\n".encode()) == b"STORED\r\n"
            a.sendall(f"append k{r} 0 0 1\r\na\r\n".encode())
            time.sleep(0.002)  # a's input is usually held first
            b.sendall(f"append k{r} 0 0 1\r\nb\r\n".encode())
            assert a.recv(100) == b"STORED\r\n" and b.recv(100) == b"STORED\r\n"
            values.append(_request(c, f"get k{r}\r\n".encode()).split(b"\r\n")[1])
        for s in (a, b, c):
            s.close()
        assert values == [b"x" + order for order in released]
        assert len(set(sleeps)) >= 3  # the listener and two workers reported their sleeps
        assert tracer.stats.serial_timeouts == 0 and tracer.stats.escapes == 0
    finally:
        tracer.detach()
