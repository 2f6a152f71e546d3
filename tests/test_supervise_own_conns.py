"""How a node that stopped leading lets the log decide the inputs its server still holds."""

import errno
import os
import socket
import threading
import time

import pytest

from supervise.entries import Entry, Kind
from supervise.own_conns import (
    SETTLE_CLOSE_TIMEOUT,
    LostInput,
    OwnConnections,
    reset_backlog,
    shut_down_socket,
)
from tracer import procfs
from tracer.events import Call, Direction, SocketEvent
from tracer.procfs import socket_inode

from .procs import python_server

EPOCH = 7


class Recorder:
    def __init__(self) -> None:
        self.released: list[SocketEvent] = []
        self.refused: list[SocketEvent] = []

    def release(self, ev: SocketEvent) -> None:
        ev.released = True
        self.released.append(ev)

    def refuse(self, ev: SocketEvent, error: int) -> None:
        ev.refused, ev.released = error, True
        self.refused.append(ev)


def _read(conn: int, data: bytes, gated: bool = True) -> SocketEvent:
    return SocketEvent(0, 0.0, os.getpid(), os.getpid(), Call.READ, 10 + conn, len(data), conn,
                       Direction.IN, True, gated, data)


def _close(conn: int) -> SocketEvent:
    return SocketEvent(0, 0.0, os.getpid(), os.getpid(), Call.CLOSE, 10 + conn, 0, conn,
                       Direction.CTL, False, False)


def _propose(own_conns: OwnConnections, own, entry: Entry, held: SocketEvent | None) -> bytes:
    payload = entry.encode()
    own_conns.proposed(own, payload, held)
    return payload


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


def test_an_own_input_committed_after_leadership_ended_is_released_then(rec):
    own_conns = OwnConnections(rec.release, rec.refuse)
    own = own_conns.accepted((EPOCH, 1), 1, 11, None)
    connect = _propose(own_conns, own, Entry(Kind.CONNECT, EPOCH, 1), None)
    held = _read(1, b"SET k v\r\n")
    data = _propose(own_conns, own, Entry(Kind.DATA, EPOCH, 1, held.data), held)
    assert own_conns.depose(EPOCH) == 1
    assert own_conns.delivered(connect, Entry(Kind.CONNECT, EPOCH, 1))
    assert rec.released == []
    assert own_conns.delivered(data, Entry(Kind.DATA, EPOCH, 1, held.data))
    assert rec.released == [held] and rec.refused == []


def test_while_leading_the_commit_future_not_the_delivery_releases(rec):
    own_conns = OwnConnections(rec.release, rec.refuse)
    own = own_conns.accepted((EPOCH, 1), 1, 11, None)
    held = _read(1, b"x")
    data = _propose(own_conns, own, Entry(Kind.DATA, EPOCH, 1, b"x"), held)
    assert own_conns.delivered(data, Entry(Kind.DATA, EPOCH, 1, b"x"))
    assert rec.released == []


def test_identical_payloads_on_one_connection_are_matched_in_log_order(rec):
    own_conns = OwnConnections(rec.release, rec.refuse)
    own = own_conns.accepted((EPOCH, 1), 1, 11, None)
    first, second = _read(1, b"INCR n\r\n"), _read(1, b"INCR n\r\n")
    first.released = True  # its commit was seen while leading
    payload = _propose(own_conns, own, Entry(Kind.DATA, EPOCH, 1, first.data), first)
    _propose(own_conns, own, Entry(Kind.DATA, EPOCH, 1, second.data), second)
    own_conns.depose(EPOCH)
    own_conns.delivered(payload, Entry(Kind.DATA, EPOCH, 1, first.data))
    assert rec.released == []  # the first delivery is the first proposal, not the held second


def test_settling_refuses_what_never_committed_and_shuts_the_connection_down(rec):
    server_side, client_side = socket.socketpair()
    try:
        own_conns = OwnConnections(rec.release, rec.refuse)
        own = own_conns.accepted((EPOCH, 1), 1, server_side.fileno(),
                                   socket_inode(os.getpid(), server_side.fileno()))
        held = _read(1, b"SET k v\r\n")
        _propose(own_conns, own, Entry(Kind.DATA, EPOCH, 1, held.data), held)
        own_conns.depose(EPOCH)
        late = _read(1, b"GET k\r\n")
        assert own_conns.on_event(late)  # input after leadership ended stays held
        assert rec.refused == []
        newer = Entry(Kind.BARRIER, EPOCH + 1, 0, b"marker")
        assert own_conns.ends_leadership(newer)
        settling = threading.Thread(target=own_conns.settle, args=(os.getpid(), set()))
        settling.start()
        client_side.settimeout(5)
        assert client_side.recv(10) == b""  # the client sees the end of the connection
        assert own_conns.on_event(_close(1))  # and the server closes it
        settling.join(5)
        assert not settling.is_alive()
        assert rec.refused == [held, late]
        assert own_conns.orphans == {(EPOCH, 1)} and not own_conns.by_conn
        assert not own_conns.ends_leadership(newer)
        with pytest.raises(LostInput):
            own_conns.delivered(b"", Entry(Kind.DATA, EPOCH, 1, b"SET k v\r\n"))
        assert own_conns.delivered(b"", Entry(Kind.CLOSE, EPOCH, 1))
        assert own_conns.orphans == set()
    finally:
        server_side.close()
        client_side.close()


def test_settling_refuses_an_accept_whose_connect_never_committed(rec):
    """Letting it through would make the server number one more client than the log holds."""
    own_conns = OwnConnections(rec.release, rec.refuse)
    own = own_conns.accepted((EPOCH, 1), 1, 11, None)
    accept = SocketEvent(0, 0.0, os.getpid(), os.getpid(), Call.ACCEPT4, 3, 11, 1, Direction.CTL,
                         True, True)
    _propose(own_conns, own, Entry(Kind.CONNECT, EPOCH, 1), accept)
    assert own_conns.depose(EPOCH) == 1
    started = time.monotonic()
    assert own_conns.settle(os.getpid(), set()) == 1
    assert time.monotonic() - started < SETTLE_CLOSE_TIMEOUT  # the server never had it to close
    assert rec.refused == [accept] and accept.refused == errno.EAGAIN and rec.released == []
    assert own_conns.orphans == set() and not own_conns.by_conn


def test_entries_of_other_leaderships_are_not_own(rec):
    own_conns = OwnConnections(rec.release, rec.refuse)
    own_conns.accepted((EPOCH, 1), 1, 11, None)
    assert not own_conns.delivered(b"", Entry(Kind.CONNECT, EPOCH + 3, 1))
    assert not own_conns.delivered(b"", Entry(Kind.DIGEST, EPOCH + 3, 1, offset=1, crc=2))
    assert own_conns.delivered(b"", Entry(Kind.DIGEST, EPOCH, 1, offset=1, crc=2))


def test_clients_waiting_in_a_listening_sockets_backlog_are_reset():
    listener = socket.create_server(("127.0.0.1", 0))
    clients = [socket.create_connection(listener.getsockname()) for _ in range(3)]
    try:
        assert reset_backlog(os.getpid(), listener.fileno()) == 3
        for client in clients:
            client.settimeout(5)
            with pytest.raises(ConnectionResetError):
                client.recv(10)
        assert os.get_blocking(listener.fileno()), "the listening socket was left non-blocking"
        assert reset_backlog(os.getpid(), listener.fileno()) == 0
    finally:
        for sock in (listener, *clients):
            sock.close()


@pytest.mark.parametrize("now_named", ["another connection", "a file"])
def test_settling_leaves_alone_what_a_closed_connections_fd_names_now(rec, tmp_path, now_named):
    """The server may close a connection (its held input was refused) and reuse the number
    before its close event reaches the node: shutting that number down would end a connection
    that is not the old leadership's, or fail on a file."""
    old_server, old_client = socket.socketpair()
    other_server, other_client = socket.socketpair()
    other_file = open(tmp_path / "data", "w")
    try:
        own_conns = OwnConnections(rec.release, rec.refuse)
        fd = old_server.fileno()
        own_conns.accepted((EPOCH, 1), 1, fd, socket_inode(os.getpid(), fd))
        own_conns.depose(EPOCH)
        old_server.detach()
        os.dup2(other_server.fileno() if now_named == "another connection" else other_file.fileno(), fd)
        started = time.monotonic()
        assert own_conns.settle(os.getpid(), set()) == 0  # no close of its own ever came
        assert time.monotonic() - started >= SETTLE_CLOSE_TIMEOUT
        other_client.setblocking(False)
        with pytest.raises(BlockingIOError):
            other_client.recv(10)  # not shut down: nothing to read, no end of connection
    finally:
        for s in (old_client, other_server, other_client, other_file):
            s.close()


def test_a_connection_a_forked_child_serves_is_shut_down_though_the_parent_closed_its_copy():
    server = python_server("inetd_cat.py")
    client = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    try:
        client.sendall(b"x\n")
        assert client.recv(10) == b"x\n"  # cat serves it, on its standard input and output
        # this client's socket in the server, by its peer address (the cat of the server's
        # start-up probe may still be there)
        host, port = client.getsockname()
        (inode,) = [i for i, s in procfs.tcp_sockets(server.pid).items() if s.remote == f"{host}:{port}"]
        cat = procfs.socket_holders(server.pid, inode)[0][0]
        assert inode not in procfs.socket_fds(server.pid).values()
        assert procfs.socket_holders(server.pid, inode) == [(cat, 0), (cat, 1)]
        shut_down_socket(server.pid, 1000, inode)  # the number the parent had is closed
        assert client.recv(10) == b""
    finally:
        client.close()
        server.stop()
