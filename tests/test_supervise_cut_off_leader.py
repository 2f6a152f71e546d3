"""A leader cut off from its group while a client connects: the accept is held, its CONNECT is
proposed but can never commit. When the log moves on without it, the old leader must refuse that
connection, not let its server accept it: Redis numbers its clients, so one accepted client more
than the log holds makes every later client's CLIENT ID differ on that copy."""

from __future__ import annotations

import socket

from .netns_cluster import SERVER_PORT, NetnsCluster
from .procs import wait_until


def _connect(addr: str) -> socket.socket:
    sock = socket.create_connection((addr, SERVER_PORT), timeout=5)
    sock.sendall(b"CLIENT ID\r\n")
    return sock


def _reply_or_end(sock: socket.socket) -> bytes:
    try:
        return sock.recv(100)
    except ConnectionResetError:
        return b""


def test_a_connection_a_cut_off_leader_never_logged_is_refused_and_its_copy_stays_the_logs():
    with NetnsCluster(vip=False) as cluster:
        try:
            old = cluster.start(timeout=120)
            cluster.partition(old)
            # from the old leader's own host, which still reaches its server
            orphan = cluster.in_ns(old.ns, _connect, old.addr)
            new = cluster.wait_leader(timeout=30, exclude=(old.name,))
            wait_until(lambda: (cluster.status(old) or {}).get("role") == "follower", 10,
                  "the cut-off leader did not step down")
            cluster.heal(old)
            wait_until(lambda: "went on past this node's leadership" in old.log_path.read_text(), 30,
                  "the old leader did not settle what it held")
            assert _reply_or_end(orphan) == b"", "the server served a connection the log never took"
            orphan.close()
            assert "refused client" in old.log_path.read_text()

            ids = [cluster.redis_call(new.addr, "CLIENT", "ID") for _ in range(3)]
            assert len(set(ids)) == 3
            cluster.wait_applied(timeout=60)
            docs = cluster.statuses()
            assert all(d is not None and not d["diverged"] for d in docs.values()), docs
        except BaseException:
            print(cluster.logs())
            raise
