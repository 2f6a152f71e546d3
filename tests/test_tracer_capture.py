"""The tracer sees a real server's socket inputs and outputs, from outside the process."""

import base64
import ctypes
import json
import os
import signal
import socket
import threading
import time

import pytest
import redis as redis_py

from tracer import probes, procfs
from tracer.events import ACCEPTS, CLOSES, Call, Direction
from tracer.tracer import Mode

from .procs import free_port, memcached_server, python_server, recv_exactly, wait_port, wait_until
from .tracing import compiled_probes, start_trace_cli, stop_trace_cli, traced


def _stop_cli(proc) -> list[dict]:
    out, err = stop_trace_cli(proc)
    assert proc.returncode == 0, err
    proc.stderr_text = err
    return [json.loads(line) for line in out.splitlines()]


def _commands(n: int, tag: str) -> list[bytes]:
    conn = redis_py.Connection()
    return [b"".join(conn.pack_command("SET", f"{tag}:{i}", "x" * i)) for i in range(n)]


def test_redis_client_bytes_appear_exactly_and_in_order_on_their_connection(redis):
    proc = start_trace_cli("--pid", str(redis.pid), "--json", "--snaplen", "16384")
    try:
        sent = {"a": _commands(40, "a"), "b": _commands(40, "b")}
        clients = {k: socket.create_connection(("127.0.0.1", redis.port)) for k in sent}
        for i in range(40):
            for name, client in clients.items():
                client.sendall(sent[name][i])
                assert client.recv(100) == b"+OK\r\n"
        ports = {name: c.getsockname()[1] for name, c in clients.items()}
        for client in clients.values():
            client.close()
    finally:
        events = _stop_cli(proc)
    for name, port in ports.items():
        peer = f"127.0.0.1:{port}"
        mine = [e for e in events if e["peer"] == peer]
        conns = {e["conn"] for e in mine}
        assert len(conns) == 1, f"one connection id for {peer}, got {conns}"
        inputs = b"".join(base64.b64decode(e.get("data", "")) for e in mine if e["dir"] == "in")
        assert inputs == b"".join(sent[name])
        outputs = [base64.b64decode(e["data"]) for e in mine if e["dir"] == "out"]
        assert outputs == [b"+OK\r\n"] * 40
        assert mine[0]["call"] in ("accept", "accept4")
        assert {e["pid"] for e in mine} == {redis.pid}
        assert all(isinstance(e["t"], float) and e["fd"] >= 0 for e in mine)


@pytest.mark.serial  # the reader drops events rather than slow the server: it needs a free CPU
def test_trace_cli_prints_every_event_that_happened_before_it_was_stopped(redis):
    proc = start_trace_cli("--pid", str(redis.pid), "--json")
    ping = b"*1\r\n$4\r\nPING\r\n"
    try:
        os.kill(proc.pid, signal.SIGSTOP)  # nothing is read while the server works: it all waits
        client = socket.create_connection(("127.0.0.1", redis.port))
        for _ in range(5000):
            client.sendall(ping)
            assert client.recv(100) == b"+PONG\r\n"
        client.close()
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        events = _stop_cli(proc)
    pings = [e for e in events if e["dir"] == "in" and e.get("data") == base64.b64encode(ping).decode()]
    assert len(pings) == 5000
    assert "0 lost" in proc.stderr_text


WRAP_MESSAGE = 4000


def _messages_past_two_wraps() -> list[bytes]:
    """Distinct echo messages enough to wrap the ring buffer 2.6 times: each round trip puts
    about twice a message in the ring (the input and its echo)."""
    from tracer.probes import RINGBUF_PAGES

    rounds = RINGBUF_PAGES * 4096 * 5 // (2 * WRAP_MESSAGE) // 2
    return [f"{i:08d}".encode() * (WRAP_MESSAGE // 8) for i in range(rounds)]


def _echo(client: socket.socket, message: bytes) -> bytes:
    client.sendall(message)
    got = b""
    while len(got) < len(message):
        got += client.recv(65536)
    return got


def test_gated_inputs_stay_whole_and_in_order_across_wraps_of_the_ring_buffer():
    server = python_server("threaded_echo.py")
    messages = _messages_past_two_wraps()
    try:
        with traced(server.pid, Mode.GATE) as (_tracer, rec):
            client = socket.create_connection(("127.0.0.1", server.port))
            for message in messages:
                assert _echo(client, message) == message.upper()
            client.close()
            inputs = [e.data for e in rec.drain() if e.dir is Direction.IN and e.ret > 0]
        assert b"".join(inputs) == b"".join(messages)
    finally:
        server.stop()


@pytest.mark.serial  # the reader drops events rather than slow the server: it needs a free CPU
def test_trace_cli_reads_every_event_whole_and_in_order_across_wraps_of_the_ring_buffer(tmp_path):
    server = python_server("threaded_echo.py")
    messages = _messages_past_two_wraps()
    out_path = tmp_path / "trace.jsonl"
    try:
        with out_path.open("w") as out:
            proc = start_trace_cli("--pid", str(server.pid), "--json", stdout=out)
            try:
                client = socket.create_connection(("127.0.0.1", server.port))
                for i, message in enumerate(messages):
                    if i % 500 == 0:
                        time.sleep(0.05)  # idle CPU for the reader, which drops rather than slow us
                    _echo(client, message)
                client.close()
                wait_until(lambda: out_path.stat().st_size > 2 * len(messages) * WRAP_MESSAGE, 60,
                           "the trace to print every round trip")
            finally:
                _, err = stop_trace_cli(proc, timeout=60)
        assert proc.returncode == 0, err
        assert "0 lost" in err
        events = [json.loads(line) for line in out_path.read_text().splitlines()]
    finally:
        server.stop()
    by_dir = {d: b"".join(base64.b64decode(e["data"]) for e in events if e["dir"] == d and "data" in e)
              for d in ("in", "out")}
    assert by_dir["in"] == b"".join(messages)
    assert by_dir["out"] == b"".join(messages).upper()


def test_redis_py_commands_and_replies_seen_as_input_and_output_events(redis):
    with traced(redis.pid, Mode.OBSERVE) as (_tracer, rec):
        client = redis_py.Redis(port=redis.port)
        client.rpush("list", "one", "two")
        assert client.lrange("list", 0, -1) == [b"one", b"two"]
        client.close()
        seen = []
        while not any(e.is_eof for e in seen):
            seen.append(rec.events.get(timeout=5))
    data_in = b"".join(e.data for e in seen if e.dir is Direction.IN)
    data_out = b"".join(e.data for e in seen if e.dir is Direction.OUT)
    assert b"RPUSH\r\n$4\r\nlist\r\n$3\r\none\r\n$3\r\ntwo" in data_in
    assert b"*2\r\n$3\r\none\r\n$3\r\ntwo\r\n" in data_out


def test_memcached_worker_threads_that_predate_attach_are_all_seen_and_gated(memcached):
    with traced(memcached.pid, Mode.GATE) as (tracer, rec):
        assert tracer.stats.threads >= 5
        clients = [socket.create_connection(("127.0.0.1", memcached.port)) for _ in range(8)]
        for round_ in range(5):
            for i, client in enumerate(clients):
                client.sendall(f"set k{i} 0 0 2\r\nv{round_}\r\n".encode())
            for client in clients:
                assert client.recv(100) == b"STORED\r\n"
        for client in clients:
            client.close()
        inputs = [e for e in rec.drain() if e.input and e.dir is Direction.IN and e.ret > 0]
    assert len({e.tid for e in inputs}) >= 2, "memcached spreads connections over workers"
    assert all(e.gated for e in inputs)
    assert tracer.stats.escapes == 0


def test_threads_created_after_attach_are_followed_and_gated():
    server = python_server("threaded_echo.py")
    try:
        with traced(server.pid, Mode.GATE) as (tracer, rec):
            before = tracer.stats.threads
            clients = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(3)]
            for i, client in enumerate(clients):
                client.sendall(f"hello {i}".encode())
                assert client.recv(100) == f"HELLO {i}".encode()
            assert tracer.stats.threads >= before + 3
            inputs = [e for e in rec.drain() if e.dir is Direction.IN and e.ret > 0]
        assert sorted(e.data for e in inputs) == [b"hello 0", b"hello 1", b"hello 2"]
        assert all(e.gated for e in inputs)
        assert len({e.tid for e in inputs}) == 3
    finally:
        server.stop()


@pytest.fixture(params=[probes.TGID_SLOTS, 1], ids=["tgid-slots", "one-shared-tgid-slot"])
def tgid_slots(request, monkeypatch) -> int:
    """The probes' slots for supervised tgids; with one, a forked child's mode is in the
    fallback hash, since its parent holds the slot."""
    monkeypatch.setattr(probes, "TGID_SLOTS", request.param)
    return request.param


def _a_connection_ended(events) -> bool:
    return any(e.call is Call.CLOSE and e.last and e.conn for e in events)


def test_forked_children_are_followed_and_their_inputs_seen(tgid_slots):
    server = python_server("forking_echo.py")
    try:
        with traced(server.pid, Mode.GATE) as (_tracer, rec):
            client = socket.create_connection(("127.0.0.1", server.port))
            client.sendall(b"abc")
            assert client.recv(100) == b"cba"
            client.close()
            wait_until(lambda: _a_connection_ended(rec.seen), 10, "the connection's end")
            inputs = [e for e in rec.drain() if e.dir is Direction.IN and e.ret > 0]
        assert [e.data for e in inputs] == [b"abc"]
        assert inputs[0].pid != server.pid and inputs[0].gated
        # the parent's close of its copy does not end the connection; the child's exit does
        closes = [e for e in rec.seen if e.call is Call.CLOSE and e.conn == inputs[0].conn]
        assert [(e.pid, e.last) for e in closes] == [(server.pid, False), (inputs[0].pid, True)]
        assert closes[-1].tid == 0
    finally:
        server.stop()


def test_a_connection_ends_with_its_last_descriptor_across_fork_dup2_and_exec():
    """inetd style: the parent closes its copy of the socket after fork, the child dup2s it onto
    its standard input and output and execs cat, which closes the accepted descriptor; the
    connection ends only when cat exits, with no close call."""
    server = python_server("inetd_cat.py")
    try:
        with traced(server.pid, Mode.GATE) as (_tracer, rec):
            client = socket.create_connection(("127.0.0.1", server.port))
            client.sendall(b"hello\n")
            assert recv_exactly(client, 6) == b"hello\n"
            client.shutdown(socket.SHUT_WR)
            assert client.recv(100) == b""
            client.close()
            wait_until(lambda: _a_connection_ended(rec.seen), 10, "the connection's end")
            events = list(rec.seen)
        conn = next(e.conn for e in events if e.call in ACCEPTS)
        closes = [e for e in events if e.call is Call.CLOSE and e.conn == conn]
        assert [e.last for e in closes] == [False] * (len(closes) - 1) + [True]
        child = closes[-1].pid
        assert child != server.pid  # cat ended it
        assert any(e.pid == server.pid for e in closes)  # the parent's close did not
        # exec closed the accepted descriptor in the child, with no close call
        assert any(e.pid == child and e.tid == 0 and e.fd not in (0, 1) for e in closes)
        assert {e.fd for e in events if e.call is Call.DUP2 and e.conn == conn} == {0, 1}
        inputs = [e for e in events if e.conn == conn and e.dir is Direction.IN]
        assert [e.data for e in inputs] == [b"hello\n", b""]
        assert all(e.gated and e.pid != server.pid for e in inputs)
    finally:
        server.stop()


def test_workers_a_preforking_server_forked_before_attach_are_traced_and_gated():
    server = python_server("prefork_echo.py")
    try:
        wait_until(lambda: len(procfs.children(server.pid)) == 3, 10, "the workers")
        workers = procfs.children(server.pid)
        with traced(server.pid, Mode.GATE) as (_tracer, rec):
            clients = [socket.create_connection(("127.0.0.1", server.port), timeout=5)
                       for _ in range(3)]
            for i, client in enumerate(clients):
                client.sendall(f"w{i}".encode())
                assert recv_exactly(client, 2) == f"W{i}".encode()
            for client in clients:
                client.close()
            events = list(rec.seen)
        inputs = [e for e in events if e.dir is Direction.IN and e.ret > 0]
        assert sorted(e.data for e in inputs) == [b"w0", b"w1", b"w2"]
        accepts = [e for e in events if e.call in ACCEPTS]
        assert len(accepts) == 3
        assert all(e.gated and e.pid in workers for e in inputs + accepts)
    finally:
        server.stop()


# close_range's sockets leave the map in its probe, in every mode; a wide range's past the
# probe's reach when the tracer reads its event, with the thread held until then in a holding mode
@pytest.mark.parametrize("how, mode, ended_by", [("dup2", Mode.OBSERVE, Call.CLOSE),
                                                 ("close_range", Mode.OBSERVE, Call.CLOSE_RANGE),
                                                 ("close_range", Mode.GATE, Call.CLOSE_RANGE),
                                                 ("close_range", Mode.HOLD_OUTPUT, Call.CLOSE_RANGE)])
def test_a_socket_closed_without_close_ends_there_and_its_fd_number_is_no_longer_taken_for_it(
        how, mode, ended_by):
    server = python_server("dup2_closer.py", how)
    try:
        with traced(server.pid, mode) as (_tracer, rec):
            client = socket.create_connection(("127.0.0.1", server.port))
            client.sendall(b"ping")
            assert recv_exactly(client, 4) == b"ping"
            assert client.recv(100) == b""  # the server's socket is closed
            client.close()
            wait_until(lambda: any(e.call in CLOSES for e in rec.seen), 10, "the close")
            time.sleep(0.2)  # the server's read of /dev/null and its close come right after
            events = list(rec.seen)
        conn = next(e.conn for e in events if e.call in ACCEPTS)
        mine = [e for e in events if e.conn == conn and e.call not in ACCEPTS]
        assert [(e.call, e.dir) for e in mine] == [
            (Call.READ, Direction.IN), (Call.WRITE, Direction.OUT), (ended_by, Direction.CTL)]
        assert mine[-1].last and mine[-1].tid == server.pid and mine[-1].fd == mine[0].fd
    finally:
        server.stop()


@pytest.mark.parametrize("mode", [Mode.GATE, Mode.HOLD_OUTPUT])
def test_a_close_range_wider_than_its_probe_looks_ends_the_connection_at_both_its_descriptors(mode):
    server = python_server("dup2_closer.py", "close_range_wide")
    try:
        with traced(server.pid, mode) as (_tracer, rec):
            client = socket.create_connection(("127.0.0.1", server.port))
            client.sendall(b"ping")
            assert recv_exactly(client, 4) == b"ping"
            assert client.recv(100) == b""
            client.close()
            wait_until(lambda: any(e.call in CLOSES and e.last for e in rec.seen), 10, "the close")
            time.sleep(0.2)
            events = list(rec.seen)
        conn = next(e.conn for e in events if e.call in ACCEPTS)
        mine = [e for e in events if e.conn == conn and e.call not in ACCEPTS]
        fd = mine[0].fd
        assert [(e.call, e.fd) for e in mine] == [
            (Call.READ, fd), (Call.WRITE, fd), (Call.DUP2, fd + 300),
            (Call.CLOSE_RANGE, fd), (Call.CLOSE_RANGE, fd + 300)]
        assert [e.last for e in mine[-2:]] == [False, True]
    finally:
        server.stop()


def test_a_tgid_whose_slot_another_holds_is_captured_and_takes_the_slot_when_it_is_freed(redis):
    client = redis_py.Redis(port=redis.port)
    with traced(redis.pid, Mode.OBSERVE) as (tracer, rec):
        p = tracer.probes
        slot = ctypes.c_uint32(redis.pid % probes.TGID_SLOTS)
        mode = p.tgid_slots[slot].mode
        other = redis.pid + probes.TGID_SLOTS  # same slot
        p.unsupervise_tgid(redis.pid)
        p.supervise_tgid(other, mode)
        p.supervise_tgid(redis.pid, mode)
        assert p.tgid_slots[slot].tgid == other and p.tgids[ctypes.c_uint32(redis.pid)].value == mode
        client.set("while-in-the-hash", "1")
        p.unsupervise_tgid(other)
        assert p.tgid_slots[slot].tgid == redis.pid and len(p.tgids) == 0
        client.set("back-in-the-slot", "1")
        client.close()
        seen: list = []
        while not any(e.is_eof for e in seen):
            seen.append(rec.events.get(timeout=5))
    data_in = b"".join(e.data for e in seen if e.dir is Direction.IN)
    assert b"while-in-the-hash" in data_in and b"back-in-the-slot" in data_in


def test_launch_mode_traces_a_server_started_under_it(tmp_path):
    port = free_port()
    proc = start_trace_cli("--json", "--", "redis-server", "--port", str(port), "--save", "",
                           "--dir", str(tmp_path), "--logfile", str(tmp_path / "log"))
    server_pid = int(proc.attached_line.split("pid ")[1].split(")")[0])
    try:
        wait_port(port)
        client = redis_py.Redis(port=port)
        client.set("launched", "yes")
        client.close()
    finally:
        os.kill(server_pid, signal.SIGKILL)
        out, _ = stop_trace_cli(proc)
    events = [json.loads(line) for line in out.splitlines()]
    data = b"".join(base64.b64decode(e.get("data", "")) for e in events if e["dir"] == "in")
    assert b"launched" in data
    assert {e["pid"] for e in events} == {server_pid}


def test_large_inputs_are_read_whole_when_held(redis):
    value = b"z" * 300_000
    with traced(redis.pid, Mode.GATE) as (_tracer, rec):
        client = redis_py.Redis(port=redis.port)
        client.set("big", value)
        assert client.strlen("big") == len(value)
        client.close()
        inputs = [e for e in rec.drain() if e.dir is Direction.IN and e.ret > 0]
    assert all(len(e.data) == e.ret for e in inputs)
    assert value in b"".join(e.data for e in inputs)


def test_memcached_under_trace_cli_reports_threads_and_io():
    server = memcached_server(threads=4)
    try:
        proc = start_trace_cli("--pid", str(server.pid))
        client = socket.create_connection(("127.0.0.1", server.port))
        client.sendall(b"set a 0 0 1\r\nx\r\n")
        assert client.recv(100) == b"STORED\r\n"
        client.close()
        out, err = stop_trace_cli(proc)
        assert "set a 0 0 1" in out and "STORED" in out
        assert "detached" in err
    finally:
        server.stop()



def _short_connections(port: int, tag: str, n: int) -> None:
    for i in range(n):
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(f"set {tag}:{i} 0 0 1\r\nx\r\n".encode())
            assert client.recv(100) == b"STORED\r\n"


def test_connections_accepted_while_another_thread_closes_the_same_fd_number_are_all_seen(
        memcached):
    """memcached closes on a worker thread while its listener thread accepts: the fd number a
    close frees is often the very next one accepted."""
    threads_, per_thread = 4, 250
    with traced(memcached.pid, Mode.OBSERVE) as (_, rec):
        workers = [threading.Thread(target=_short_connections, args=(memcached.port, f"t{t}", per_thread))
                   for t in range(threads_)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        time.sleep(0.5)
        events = rec.drain()
    inputs = [e for e in events if e.dir is Direction.IN and e.ret > 0]
    seen = {e.data.split(b" ")[1].decode() for e in inputs}
    sent = {f"t{t}:{i}" for t in range(threads_) for i in range(per_thread)}
    assert sent - seen == set(), f"{len(sent - seen)} connections' inputs were not seen"
    by_conn: dict[int, list[str]] = {}
    for e in events:
        if e.call is Call.CLOSE or e.call in ACCEPTS:
            by_conn.setdefault(e.conn, []).append(e.call.name)
    assert all(calls[0] != "CLOSE" for calls in by_conn.values()), \
        "a close was reported under a connection accepted later"


def test_trace_cli_stops_cleanly_under_a_burst_of_interrupts(redis):
    """A second signal used to arrive while the first handler held a lock it took again."""
    proc = start_trace_cli("--pid", str(redis.pid))
    for i in range(50):
        proc.send_signal(signal.SIGINT if i % 2 else signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "detached" in err


def test_batched_wakeups_lose_nothing_and_a_connections_start_and_end_are_read_at_once(redis):
    """With batched wake-ups (a follower catching up) only a connection's accept and end wake
    the tracer thread; here it would otherwise not read the ring for an hour."""
    sent = _commands(20, "b")
    with traced(redis.pid, Mode.OBSERVE) as (tracer, recorder):
        tracer.set_batched_wakeups(True)
        tracer._poll_seconds = 3600
        client = socket.create_connection(("127.0.0.1", redis.port))
        wait_until(lambda: any(e.call in ACCEPTS for e in recorder.seen), 10, "the accept")
        for command in sent:
            client.sendall(command)
            assert client.recv(100) == b"+OK\r\n"
        client.close()
        wait_until(lambda: any(e.is_eof for e in recorder.seen), 10, "the connection's end")
        mine = [e for e in recorder.seen if e.conn == recorder.seen[0].conn]
        assert b"".join(e.data for e in mine if e.dir is Direction.IN) == b"".join(sent)
        assert [e.data for e in mine if e.dir is Direction.OUT] == [b"+OK\r\n"] * len(sent)

        tracer.set_batched_wakeups(False)  # every input wakes the tracer thread again
        seen = len(recorder.seen)
        again = socket.create_connection(("127.0.0.1", redis.port))
        again.sendall(sent[0])
        assert again.recv(100) == b"+OK\r\n"
        wait_until(lambda: any(e.input and e.data == sent[0] for e in recorder.seen[seen:]), 10,
                   "the input after batching ended")
        again.close()


@pytest.mark.parametrize("mode", [Mode.OBSERVE, Mode.GATE])
def test_inputs_read_into_several_buffers_by_readv_and_recvmsg_are_gathered_whole(mode):
    server = python_server("vectored_echo.py")
    messages = [bytes([65 + i]) * (100 + 1000 * i) for i in range(6)]  # the last, 5,100 bytes
    try:
        with traced(server.pid, mode, snaplen=8192) as (_tracer, rec):
            client = socket.create_connection(("127.0.0.1", server.port))
            inputs = []
            for message in messages:
                client.sendall(message)
                echoed = b""
                while len(echoed) < len(message):
                    echoed += client.recv(65536)
                assert echoed == message
                event = rec.next_input()
                while event.call in ACCEPTS:
                    event = rec.next_input()
                inputs.append((event.call, event.data))
            client.close()
    finally:
        server.stop()
    assert {call for call, _ in inputs} == {Call.READV, Call.RECVMSG}
    assert [data for _, data in inputs] == messages


def test_probes_handed_from_one_tracer_to_the_next_report_only_the_new_servers_events(redis):
    shared = compiled_probes()
    with traced(redis.pid, Mode.OBSERVE, probes=shared) as (_tracer, rec):
        assert redis_py.Redis(port=redis.port, socket_timeout=5).ping()
        first = rec.next_input()
    server = python_server("threaded_echo.py")
    try:
        with traced(server.pid, Mode.OBSERVE, probes=shared) as (_tracer, rec):
            assert redis_py.Redis(port=redis.port, socket_timeout=5).ping(), "the last one's server"
            with socket.create_connection(("127.0.0.1", server.port)) as client:
                client.sendall(b"x")
                assert recv_exactly(client, 1) == b"X"
            accept = rec.next_input()
            assert (accept.pid, accept.call in ACCEPTS) == (server.pid, True)
            assert accept.conn == first.conn, "connection ids start afresh"
            assert rec.next_input().data == b"x"
            assert {e.pid for e in rec.seen} == {server.pid}
    finally:
        server.stop()
