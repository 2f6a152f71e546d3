"""Servers of several processes, replicated: one that runs a process for each connection, inetd
style (its parent closes its copy of each client's socket at once, and the connection goes on in
the child, cat by exec, on every copy until the client ends it), and one whose workers were
forked before the supervisor attached."""

import socket
import sys
from collections.abc import Callable

import pytest

from supervise.localcluster import SERVERS, LocalCluster
from tracer import procfs

from .procs import SERVERS as SERVER_SCRIPTS
from .procs import recv_exactly, wait_until


def _cluster_of(script: str, monkeypatch, hold: str = "inputs") -> LocalCluster:
    monkeypatch.setitem(SERVERS, script, lambda port, _workdir: [
        sys.executable, str(SERVER_SCRIPTS / script), str(port)])
    return LocalCluster(n=3, server=script, transport="shm", hold=hold)


def _exchange(clients: list[socket.socket], lines: int, tag: str,
              reply: Callable[[bytes], bytes]) -> None:
    for line_no in range(lines):
        for i, client in enumerate(clients):
            line = f"{tag} client {i} line {line_no}\n".encode()
            client.sendall(line)
            assert recv_exactly(client, len(line)) == reply(line)


def _assert_every_copy_took_the_log(cluster: LocalCluster, entries: int) -> None:
    committed = cluster.wait_applied()
    assert committed >= entries
    docs = [node.status() for node in cluster.nodes]
    assert all(d["applied"] >= committed for d in docs)
    assert [(d["diverged"], d["stray_connections"]) for d in docs] == [(False, 0)] * 3
    logs = cluster.logs()
    assert "dropped" not in logs and "not in the log" not in logs, logs


@pytest.mark.parametrize("hold", ["inputs", "outputs"])
def test_connections_of_a_process_per_connection_server_outlive_its_close_and_end_on_every_copy(
        monkeypatch, hold):
    with _cluster_of("inetd_cat.py", monkeypatch, hold) as cluster:
        cluster.start()
        leader = cluster.wait_leader()
        clients = [socket.create_connection(("127.0.0.1", leader.server_port), timeout=10)
                   for _ in range(4)]
        _exchange(clients, 25, "cat", lambda line: line)
        for client in clients[:2]:
            client.shutdown(socket.SHUT_WR)
            assert client.recv(100) == b""
            client.close()
        cluster.wait_applied()
        for node in cluster.nodes:
            wait_until(lambda pid=node.server.pid: len(procfs.children(pid)) == 2, 20,
                       f"{node.name}'s copy to end the two connections its clients ended")
        for client in clients[2:]:
            client.close()
        cluster.wait_applied()
        for node in cluster.nodes:
            wait_until(lambda pid=node.server.pid: not procfs.children(pid), 20,
                       f"{node.name}'s copy to end every connection")
        _assert_every_copy_took_the_log(cluster, 4 * (1 + 25 + 1))  # CONNECT, lines, CLOSE
        assert f"holding {hold}" in leader.log_path.read_text()
        assert "escape" not in cluster.logs()


def test_a_preforking_server_attached_after_its_workers_started_replicates_through_them(
        monkeypatch):
    with _cluster_of("prefork_echo.py", monkeypatch) as cluster:
        cluster.start()
        leader = cluster.wait_leader()
        for node in cluster.nodes:
            assert len(procfs.children(node.server.pid)) == 3
        for round_no in range(3):  # a worker serves one connection at a time
            clients = [socket.create_connection(("127.0.0.1", leader.server_port), timeout=10)
                       for _ in range(3)]
            _exchange(clients, 10, f"round {round_no}", bytes.upper)
            for client in clients:
                client.close()
        _assert_every_copy_took_the_log(cluster, 3 * 3 * (1 + 10 + 1))  # CONNECT, lines, CLOSE
