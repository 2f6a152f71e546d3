"""`supervise --trace --json` writes one valid JSON document per event, with every field exact."""

import base64
import io
import json
import threading

from hypothesis import given
from hypothesis import strategies as st

from supervise.trace_cmd import TracePrinter, json_line
from tracer.events import Call, Direction, SocketEvent

peers = st.one_of(
    st.none(),
    st.builds(lambda a, p: f"{a}:{p}", st.ip_addresses(v=4), st.integers(0, 65535)),
    st.builds(lambda a, p: f"[{a}]:{p}", st.ip_addresses(v=6), st.integers(0, 65535)),
)
events = st.builds(
    SocketEvent,
    seq=st.integers(0, 2**64 - 1),
    t=st.floats(0, 4e9),
    pid=st.integers(1, 2**22),
    tid=st.integers(1, 2**22),
    call=st.sampled_from(list(Call)),
    fd=st.integers(-1, 2**31 - 1),
    ret=st.integers(-(2**63), 2**63 - 1),
    conn=st.integers(0, 2**64 - 1),
    dir=st.sampled_from(list(Direction)),
    input=st.booleans(),
    gated=st.booleans(),
    data=st.binary(max_size=300),
    peer=peers,
    escaped=st.booleans(),
)


@given(events)
def test_a_json_line_parses_to_every_field_of_its_event(event):
    doc = json.loads(json_line(event))
    assert abs(doc["t"] - event.t) <= 1e-6 * max(1.0, event.t) and isinstance(doc["t"], float)
    assert (doc["pid"], doc["tid"], doc["fd"], doc["ret"], doc["conn"]) == (
        event.pid, event.tid, event.fd, event.ret, event.conn)
    assert doc["call"] == event.call.syscall and doc["dir"] == event.dir.label
    assert doc["peer"] == event.peer
    assert base64.b64decode(doc.get("data", "")) == event.data
    assert doc.get("gated", False) == event.gated and doc.get("escaped", False) == event.escaped


# events that share most of what a line's repeated fields are remembered by, differing in one
few = st.sampled_from
alike_events = st.builds(
    SocketEvent, seq=st.just(0), t=st.floats(0, 4e9), pid=few([7, 8]), tid=few([7, 9]),
    call=few([Call.READ, Call.WRITE, Call.RECVFROM]), fd=few([5, 6]), ret=st.integers(-1, 99),
    conn=few([1, 2]), dir=few(list(Direction)), input=st.booleans(), gated=st.booleans(),
    data=st.binary(max_size=8), peer=few([None, "10.0.0.1:80", "10.0.0.2:80"]),
)


@given(st.lists(alike_events, min_size=2, max_size=40))
def test_events_of_a_connection_keep_their_own_fields_in_a_json_line(batch):
    for event in batch:
        doc = json.loads(json_line(event))
        assert (doc["pid"], doc["tid"], doc["call"], doc["fd"], doc["ret"], doc["conn"],
                doc["peer"], doc["dir"]) == (event.pid, event.tid, event.call.syscall, event.fd,
                                             event.ret, event.conn, event.peer, event.dir.label)


@given(st.lists(events, max_size=50), st.integers(1, 8))
def test_lines_come_out_whole_and_in_order_however_the_flushes_interleave(batch, every):
    out = io.StringIO()
    printer = TracePrinter(out, as_json=True)
    printer.FLUSH_LINES = every
    flusher = threading.Thread(target=lambda: [printer.flush() for _ in range(20)])
    flusher.start()
    for event in batch:
        printer(event)
    flusher.join()
    printer.flush()
    assert out.getvalue().splitlines() == [json_line(e) for e in batch]
