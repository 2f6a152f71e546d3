"""Hold-output mode: the server reads its inputs at once, and what it writes waits until every
input it read before is released."""

import contextlib
import socket
import time
from collections.abc import Iterator

import pytest
import redis as redis_py

from tracer.events import Hold
from tracer.tracer import Mode

from .procs import python_server, wait_until
from .tracing import traced

PING = b"*1\r\n$4\r\nPING\r\n"


def _no_reply(client: socket.socket, wait: float = 0.5) -> bool:
    client.settimeout(wait)
    try:
        return client.recv(100) == b""
    except TimeoutError:
        return True


def test_an_unreleased_input_is_read_at_once_but_its_reply_waits_for_the_release(redis):
    with traced(redis.pid, Mode.HOLD_OUTPUT, auto_release=False) as (tracer, rec):
        client = socket.create_connection(("127.0.0.1", redis.port))
        accept = rec.next_input()
        assert accept.gated and accept.holds_outputs
        tracer.release(accept)
        client.sendall(PING)
        held = rec.next_input()
        assert (held.data, held.gated, held.hold) == (PING, True, Hold.OUTPUTS)
        assert not held.stopped, "an armed thread's input must not stop it"
        assert _no_reply(client), "the server answered before its input was released"
        tracer.release(held)
        client.settimeout(5)
        assert client.recv(100) == b"+PONG\r\n"
        client.close()
    assert tracer.stats.escapes == 0


def test_inputs_that_arrive_while_an_output_waits_are_all_read_before_any_is_released(redis):
    with traced(redis.pid, Mode.HOLD_OUTPUT, auto_release=False) as (tracer, rec):
        clients = []
        for _ in range(6):
            clients.append(socket.create_connection(("127.0.0.1", redis.port)))
            tracer.release(rec.next_input())
        clients[0].sendall(PING)
        first = rec.next_input()  # the server is now stopped at its reply
        for client in clients[1:]:
            client.sendall(PING)
        time.sleep(0.3)
        tracer.release(first)
        batch = [rec.next_input() for _ in clients[1:]]
        assert [ev.data for ev in batch] == [PING] * 5
        assert all(_no_reply(c, 0.2) for c in clients[1:])
        for ev in batch:
            tracer.release(ev)
        for client in clients:
            client.settimeout(5)
            assert client.recv(100) == b"+PONG\r\n"
            client.close()


def test_a_refused_input_the_server_consumed_is_an_escape_and_its_reply_never_goes_out(redis):
    with traced(redis.pid, Mode.HOLD_OUTPUT, auto_release=False) as (tracer, rec):
        client = socket.create_connection(("127.0.0.1", redis.port))
        tracer.release(rec.next_input())
        client.sendall(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n")
        tracer.refuse(rec.next_input())
        wait_until(lambda: tracer.stats.escapes == 1, 5, "the refusal to be reported as an escape")
        assert _no_reply(client, 1.0), "a reply to a refused input went out"
        redis.proc.kill()  # what a supervisor does with such a copy (it exits without detaching)
        assert tracer.wait(10)
    client.settimeout(5)
    with contextlib.suppress(ConnectionResetError):
        assert client.recv(100) == b""
    client.close()


def test_detach_clears_the_breakpoints_and_the_server_runs_on(redis):
    client = redis_py.Redis(port=redis.port, socket_timeout=5)
    with traced(redis.pid, Mode.HOLD_OUTPUT) as (tracer, _rec):
        for i in range(100):
            client.set(f"k{i}", i)
        idle = socket.create_connection(("127.0.0.1", redis.port))  # its accept arms the thread
        wait_until(lambda: tracer._armed, 5, "the server's thread to be armed")
    idle.close()
    for i in range(100):  # a breakpoint left on would kill it with SIGTRAP
        assert client.get(f"k{i}") == str(i).encode()
    assert redis.proc.poll() is None


def test_a_thread_stopped_at_its_output_is_let_go_by_detach(redis):
    with traced(redis.pid, Mode.HOLD_OUTPUT, auto_release=False) as (tracer, rec):
        client = socket.create_connection(("127.0.0.1", redis.port))
        tracer.release(rec.next_input())
        client.sendall(PING)
        rec.next_input()
        wait_until(lambda: tracer._trapped, 5, "the server's thread to reach its output")
    client.settimeout(5)
    assert client.recv(100) == b"+PONG\r\n"
    assert redis_py.Redis(port=redis.port, socket_timeout=5).ping()


def test_resuming_after_a_spell_of_gating_holds_the_outputs_of_the_connections_held_before(redis):
    # a leader that fails to hand over goes on holding outputs for its clients' connections; a
    # new leadership holds them only for connections accepted from its start. An input that
    # holds its thread makes no output suspect: it is committed before the thread runs on.
    def ping(client: socket.socket) -> Hold:
        client.sendall(PING)
        event = rec.next_input()
        assert client.recv(100) == b"+PONG\r\n"
        return event.hold

    with traced(redis.pid, Mode.HOLD_OUTPUT) as (tracer, rec):
        client = socket.create_connection(("127.0.0.1", redis.port), timeout=5)
        assert rec.next_input().holds_outputs
        assert ping(client) is Hold.OUTPUTS
        tracer.set_mode(Mode.GATE)
        assert ping(client) is Hold.THREAD
        gated = socket.create_connection(("127.0.0.1", redis.port), timeout=5)
        assert not rec.next_input().holds_outputs
        tracer.set_mode(Mode.HOLD_OUTPUT, resume_outputs_held=True)
        for _ in range(3):
            assert ping(client) in (Hold.OUTPUTS, Hold.OUTPUTS_STOP)
            assert ping(gated) is Hold.THREAD
        tracer.set_mode(Mode.GATE)
        tracer.set_mode(Mode.HOLD_OUTPUT)
        assert ping(client) is Hold.THREAD
        client.close()
        gated.close()
    assert tracer.stats.escapes == 0


@contextlib.contextmanager
def _holding_outputs_of(script: str) -> Iterator[tuple]:
    """A test server traced in hold-output mode: (port, tracer, recorder, escapes reported)."""
    server = python_server(script)
    escapes: list = []
    try:
        with traced(server.pid, Mode.HOLD_OUTPUT, on_escape=escapes.append) as (tracer, rec):
            yield server.port, tracer, rec, escapes
    finally:
        server.stop()


def _echoed(port: int, data: bytes) -> socket.socket:
    client = socket.create_connection(("127.0.0.1", port))
    client.sendall(data)
    client.settimeout(5)
    assert client.recv(100) == data.upper()
    return client


def test_an_output_made_past_the_breakpoints_is_an_escape_and_inputs_are_held_from_then_on():
    with _holding_outputs_of("raw_write_echo.py") as (port, tracer, rec, escapes):
        client = _echoed(port, b"hello")
        wait_until(lambda: escapes, 5, "the escape to be reported")
        assert [ev.hold for ev in escapes] == [Hold.MISSED], escapes
        assert tracer.mode is Mode.GATE
        rec.drain()
        client.sendall(b"again")
        again = rec.next_input()
        assert (again.data, again.hold) == (b"again", Hold.THREAD)
        assert client.recv(100) == b"AGAIN"
        client.close()


def test_an_output_by_a_thread_after_another_threads_newer_input_is_an_escape():
    with _holding_outputs_of("ticker_echo.py") as (port, tracer, _rec, escapes):
        ticker = socket.create_connection(("127.0.0.1", port))
        ticker.sendall(b"tick")
        ticker.settimeout(5)
        assert ticker.recv(4) == b"tock"
        assert not escapes
        client = _echoed(port, b"hello")
        wait_until(lambda: escapes, 5, "the ticking thread's next output to be reported")
        assert escapes[0].hold is Hold.CROSSED
        assert tracer.mode is Mode.GATE
        ticker.close()
        client.close()


@pytest.mark.parametrize("script, reply", [("threaded_echo.py", b"HELLO"),
                                           ("forking_echo.py", b"olleh")])
def test_threads_and_forked_children_have_their_outputs_held(script, reply):
    server = python_server(script)
    try:
        with traced(server.pid, Mode.HOLD_OUTPUT, auto_release=False) as (tracer, rec):
            client = socket.create_connection(("127.0.0.1", server.port))
            tracer.release(rec.next_input())
            client.sendall(b"hello")
            held = rec.next_input()
            assert held.data == b"hello" and held.holds_outputs
            assert _no_reply(client)
            tracer.release(held)
            client.settimeout(5)
            assert client.recv(100) == reply
            client.close()
        assert tracer.stats.escapes == 0
    finally:
        server.stop()


@pytest.mark.parametrize("script, args", [("forking_echo.py", ("hi",)),
                                         ("inetd_cat.py", ("echo", "hi"))])
def test_a_child_forked_after_an_unreleased_input_writes_nothing_until_it_is_released(script, args):
    """The child's greeting comes of its parent's accept: it waits for the accept's release,
    also when the child runs another program first."""
    server = python_server(script, *args)
    try:
        with traced(server.pid, Mode.HOLD_OUTPUT, auto_release=False) as (tracer, rec):
            client = socket.create_connection(("127.0.0.1", server.port))
            accept = rec.next_input()
            assert accept.holds_outputs
            assert _no_reply(client), "the child greeted before the accept was released"
            tracer.release(accept)
            client.settimeout(5)
            assert client.recv(100) == b"hi\n"
            client.close()
        assert tracer.stats.escapes == 0
    finally:
        server.stop()
