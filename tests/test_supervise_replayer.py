"""The follower's replayer against a real server watched by a real tracer (observe mode)."""

from supervise.entries import Entry, Kind
from supervise.replayer import Replayer
from tests.procs import python_server
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
