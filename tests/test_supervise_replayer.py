"""The follower's replayer against a real server watched by a real tracer (observe mode)."""

import os
import socket

import redis

from supervise.borrowed_socket import borrow_socket, bytes_read
from supervise.entries import Entry, Kind
from supervise.replayer import Replayer
from tests.procs import python_server, redis_server
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
