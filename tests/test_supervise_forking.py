"""Servers of several processes, replicated: one that runs a process for each connection, inetd
style (its parent closes its copy of each client's socket at once, and the connection goes on in
the child, cat by exec, on every copy until the client ends it), and one whose workers were
forked before the supervisor attached."""

import socket
import sys
from pathlib import Path

from supervise.localcluster import SERVERS, LocalCluster
from tracer import procfs

from .procs import SERVERS as SERVER_SCRIPTS
from .procs import recv_exactly, wait_until


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_connections_of_a_process_per_connection_server_outlive_its_close_and_end_on_every_copy(
        monkeypatch):
    monkeypatch.setitem(SERVERS, "inetd-cat", lambda port, _workdir: [
        sys.executable, str(SERVER_SCRIPTS / "inetd_cat.py"), str(port)])
    with LocalCluster(n=3, server="inetd-cat", transport="shm") as cluster:
        cluster.start()
        leader = cluster.wait_leader()
        clients = [socket.create_connection(("127.0.0.1", leader.server_port), timeout=10)
                   for _ in range(4)]
        for line_no in range(25):
            for i, client in enumerate(clients):
                line = f"client {i} line {line_no}\n".encode()
                client.sendall(line)
                assert recv_exactly(client, len(line)) == line
        for client in clients[:2]:
            client.shutdown(socket.SHUT_WR)
            assert client.recv(100) == b""
            client.close()
        cluster.wait_applied()
        for node in cluster.nodes:
            wait_until(lambda pid=node.server.pid: len(_children(pid)) == 2, 20,
                       f"{node.name}'s copy to end the two connections its clients ended")
        for client in clients[2:]:
            client.close()
        committed = cluster.wait_applied()
        assert committed >= 4 * (1 + 25 + 1)  # each connection's CONNECT, lines and CLOSE
        for node in cluster.nodes:
            wait_until(lambda pid=node.server.pid: not _children(pid), 20,
                       f"{node.name}'s copy to end every connection")
        docs = [node.status() for node in cluster.nodes]
        assert all(d["applied"] >= committed for d in docs)
        assert [(d["diverged"], d["stray_connections"]) for d in docs] == [(False, 0)] * 3
        logs = cluster.logs()
        assert "dropped" not in logs and "not in the log" not in logs, logs


def test_a_preforking_server_attached_after_its_workers_started_replicates_through_them(
        monkeypatch):
    monkeypatch.setitem(SERVERS, "prefork-echo", lambda port, _workdir: [
        sys.executable, str(SERVER_SCRIPTS / "prefork_echo.py"), str(port)])
    with LocalCluster(n=3, server="prefork-echo", transport="shm") as cluster:
        cluster.start()
        leader = cluster.wait_leader()
        for node in cluster.nodes:
            assert len(procfs.children(node.server.pid)) == 3
        for round_no in range(3):  # a worker serves one connection at a time
            clients = [socket.create_connection(("127.0.0.1", leader.server_port), timeout=10)
                       for _ in range(3)]
            for line_no in range(10):
                for i, client in enumerate(clients):
                    line = f"round {round_no} client {i} line {line_no}\n".encode()
                    client.sendall(line)
                    assert recv_exactly(client, len(line)) == line.upper()
            for client in clients:
                client.close()
        committed = cluster.wait_applied()
        assert committed >= 3 * 3 * (1 + 10 + 1)  # each connection's CONNECT, lines and CLOSE
        docs = [node.status() for node in cluster.nodes]
        assert all(d["applied"] >= committed for d in docs)
        assert [(d["diverged"], d["stray_connections"]) for d in docs] == [(False, 0)] * 3
        logs = cluster.logs()
        assert "dropped" not in logs and "not in the log" not in logs, logs
