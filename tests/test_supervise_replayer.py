"""The follower's replayer against a real server watched by a real tracer (observe mode)."""

import os
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import redis

from supervise.borrowed_socket import borrow_socket, bytes_read
from supervise.entries import Entry, Kind
from supervise.replayer import Replayer
from tests.netns import Hosts, enter_netns
from tests.procs import python_server, redis_server, wait_until
from tests.tracing import traced
from tracer.tracer import Mode

BULK = 64 << 20  # far more than the loopback socket buffers hold
NEXT = b"y" * (16 << 20)  # more than the socket buffers take while the server reads nothing


def test_a_server_blocked_on_a_reply_nobody_asked_for_still_consumes_the_next_input():
    """The replayer reads replies only between inputs; a single-threaded server that blocks until
    its whole reply is read must still get to the next input, on another connection, even one
    larger than the socket buffers hold."""
    server = python_server("blocking_bulk.py")
    replayer = Replayer("127.0.0.1", server.port, on_output=lambda *_: None, on_stray=lambda _: None)
    try:
        with traced(server.pid, Mode.OBSERVE) as (tracer, _):
            tracer.on_event = replayer.on_server_event
            for conn in (1, 2):
                replayer.apply(Entry(Kind.CONNECT, 1, conn))
            replayer.apply(Entry(Kind.DATA, 1, 1, f"bulk {BULK}".encode()))
            replayer.apply(Entry(Kind.DATA, 1, 2, NEXT))
            second = replayer.conns[(1, 2)]
            assert (second.sent, second.consumed) == (len(NEXT), len(NEXT))
            assert not second.server_closed
    finally:
        replayer.close()
        server.stop()


def test_catching_up_keeps_log_order_across_connections_without_waiting_for_the_tracer():
    """In catch-up mode the replayer learns from the server's own socket that an input was read,
    not from the tracer; the server must still take the inputs in log order. Appends to one key
    from four connections in turn spell the log's order; any input taken early reorders them."""
    server = redis_server()
    replayer = Replayer("127.0.0.1", server.port, on_output=lambda *_: None, on_stray=lambda _: None)
    conns = range(1, 5)
    try:
        with traced(server.pid, Mode.OBSERVE) as (tracer, _):
            tracer.on_event = replayer.on_server_event
            for conn in conns:
                replayer.apply(Entry(Kind.CONNECT, 1, conn))
            expected = []
            for k in range(2000):
                conn = conns[k % len(conns)]
                word = f"{k},"
                expected.append(word)
                command = f"*3\r\n$6\r\nAPPEND\r\n$5\r\nwords\r\n${len(word)}\r\n{word}\r\n"
                replayer.apply(Entry(Kind.DATA, 1, conn, command.encode()), catching_up=True)
            client = redis.Redis(port=server.port)
            assert client.get("words").decode() == "".join(expected)
            client.close()
            taken = [replayer.conns[(1, c)] for c in conns]
            assert all(c.read_seen == c.sent for c in taken)  # the socket said so, not only the tracer
    finally:
        replayer.close()
        server.stop()


def test_bytes_read_counts_what_the_owner_read_not_what_arrived():
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server_end, _ = listener.accept()
    borrowed = borrow_socket(os.getpid(), server_end.fileno())
    try:
        assert borrowed is not None
        client.sendall(b"x" * 1000)
        server_end.recv(1000, socket.MSG_PEEK | socket.MSG_WAITALL)  # all arrived, none read
        assert bytes_read(borrowed) == 0
        server_end.recv(300)
        assert bytes_read(borrowed) == 300
        while bytes_read(borrowed) < 1000:
            server_end.recv(1000)
        assert bytes_read(borrowed) == 1000
    finally:
        for sock in (borrowed, server_end, client, listener):
            if sock is not None:
                sock.close()



def test_connections_are_replayed_while_every_ephemeral_port_waits_out_another_connection():
    """Connections that ended recently hold their ports in TIME_WAIT for a minute (a burst of
    short client connections left thousands on a follower's host). A port held so toward one
    destination is still free toward another, where connect() picks it; a port bound before
    connecting is not. With every one of 24 ephemeral ports (in a namespace of its own) waiting
    out a connection to another listener, 20 connections must still be replayed, each
    incrementing a counter once."""
    _in_a_namespace_of_its_own(_replay_with_every_port_in_time_wait, 20, timeout=120)


def _replay_with_every_port_in_time_wait(count: int) -> None:
    server = redis_server()
    try:
        _hold_every_ephemeral_port_in_time_wait(24)
        replies = _replay_connections(server, count, b"*2\r\n$4\r\nINCR\r\n$1\r\nn\r\n")
    finally:
        server.stop()
    assert [replies[(1, conn)] for conn in range(1, count + 1)] == [
        f":{n}\r\n".encode() for n in range(1, count + 1)]


def test_a_replayed_connection_ends_with_a_fin_even_when_its_replies_were_not_read():
    """Replies are read only every few inputs; a connection closed with some unread would end
    with a reset, which a server that still writes after the client's end would see as an error
    its leader's copy never had. In a namespace of its own no reset may leave the host."""
    assert _in_a_namespace_of_its_own(_resets_sent_replaying_unread_replies, 5, timeout=60) == 0


def _resets_sent_replaying_unread_replies(count: int) -> int:
    server = python_server("threaded_echo.py")
    try:
        resets_before = _tcp_counter("OutRsts")
        replies = _replay_connections(server, count, b"hello")
        resets = _tcp_counter("OutRsts") - resets_before
    finally:
        server.stop()
    assert set(replies.values()) == {b"HELLO"}
    return resets


def _in_a_namespace_of_its_own(run, *args, timeout: float):
    with Hosts(1) as hosts, ThreadPoolExecutor(1, initializer=enter_netns,
                                               initargs=(hosts[0].name,)) as inside:
        return inside.submit(run, *args).result(timeout=timeout)


def _replay_connections(server, count: int, data: bytes) -> dict[tuple[int, int], bytes]:
    """Replay ``count`` connections to ``server`` (CONNECT, one DATA, CLOSE each); returns what
    the server wrote on each, as its tracer saw."""
    replies: dict[tuple[int, int], bytes] = {}
    replayer = Replayer("127.0.0.1", server.port, on_stray=lambda _: None,
                        on_output=lambda cid, out, _length: replies.__setitem__(cid, out))
    try:
        with traced(server.pid, Mode.OBSERVE) as (tracer, _):
            tracer.on_event = replayer.on_server_event
            for conn in range(1, count + 1):
                replayer.apply(Entry(Kind.CONNECT, 1, conn))
                replayer.apply(Entry(Kind.DATA, 1, conn, data))
                replayer.apply(Entry(Kind.CLOSE, 1, conn))
            wait_until(lambda: len(replies) == count, 10, "a reply on every connection")
    finally:
        replayer.close()
    return replies


def _tcp_counter(name: str) -> int:
    """A TCP counter of this thread's network namespace (/proc/net is the process's)."""
    lines = [line.split() for line in Path("/proc/thread-self/net/snmp").read_text().splitlines()
             if line.startswith("Tcp:")]
    return int(dict(zip(lines[0], lines[1], strict=True))[name])


def _hold_every_ephemeral_port_in_time_wait(ports: int) -> None:
    """Leave this namespace ``ports`` ephemeral ports, then connect to a listener of our own
    until none is left, closing each client first: the side that closes first keeps the
    connection in TIME_WAIT."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        low = 40000 if listener.getsockname()[1] < 40000 else 30000  # not the listener's port
        Path("/proc/sys/net/ipv4/ip_local_port_range").write_text(f"{low} {low + ports - 1}")
        while True:
            try:
                client = socket.create_connection(listener.getsockname())
            except OSError:
                return
            accepted, _ = listener.accept()
            client.close()
            accepted.recv(1)  # the client's FIN
            accepted.close()


def test_serialized_catch_up_sends_the_next_input_only_once_the_last_ones_thread_slept():
    """A thread per connection; the first connection's adds take 3 ms (a nanosleep, which is no
    wait for input), the second's none. Caught up from the probes' counts, without the tracer's
    reports, the adds still land in log order: the next is sent only once the thread that read
    the last has gone back to waiting for input."""
    server = python_server("slow_appender.py")
    replayer = Replayer("127.0.0.1", server.port, on_output=lambda *_: None, on_stray=lambda _: None,
                        serialize=True)
    try:
        with traced(server.pid, Mode.OBSERVE, serialize=True) as (tracer, _):
            tracer.on_event = replayer.on_server_event
            tracer.set_batched_wakeups(True)  # as a follower catching up
            replayer.watch_server(lambda: tracer.input_tally(server.pid), tracer.thread_busy)
            for conn in (1, 2):
                replayer.apply(Entry(Kind.CONNECT, 1, conn))
            words = [str(k) for k in range(200)]
            for k, word in enumerate(words):
                conn, millis = (1, 3) if k % 2 == 0 else (2, 0)
                replayer.apply(Entry(Kind.DATA, 1, conn, f"add {word} {millis}\n".encode()),
                               catching_up=True)
            assert replayer.serial_timeouts == 0
            with socket.create_connection(("127.0.0.1", server.port)) as reader:
                reader.sendall(b"list\n")
                answer = b""
                while not answer.endswith(b"\n"):
                    answer += reader.recv(65536)
            assert answer.decode().split() == words
    finally:
        replayer.close()
        server.stop()
