"""The tcp provider between three hosts (network namespaces built by tests/netns.py)."""

from __future__ import annotations

import pytest

from rdma import QPState, WCOpcode, WCStatus

from .netns import Hosts
from .rdma_support import ALL, Peer

pytestmark = pytest.mark.timeout(120)

REGIONS = {"log": (65536, ALL), "src": (4096, ALL)}


@pytest.fixture
def cluster():
    peers: list[Peer] = []
    with Hosts(3) as hosts:
        try:
            for h in hosts:
                peers.append(Peer("tcp", REGIONS, host=h.addr, prefix_argv=h.argv([])))
            yield hosts, peers
        finally:
            for p in peers:
                p.close()


def test_one_sided_writes_across_three_namespaces(cluster):
    hosts, (a, b, c) = cluster
    assert a.endpoint.startswith(hosts[0].addr + ":")
    qb = b.call("connect", a.endpoint)
    qc = c.call("connect", a.endpoint)
    ia, ja = a.call("accept", 5), a.call("accept", 5)
    assert {ia, ja} == {0, 1}
    b.call("fill", "src", 0, b"from host 1".hex())
    c.call("fill", "src", 0, b"from host 2".hex())
    b.call("write", qb, "src", 0, 11, "log", 0, 1)
    c.call("write", qc, "src", 0, 11, "log", 64, 2)
    assert b.wait(1)[0][:3] == [1, int(WCStatus.SUCCESS), int(WCOpcode.RDMA_WRITE)]
    assert c.wait(1)[0][:3] == [2, int(WCStatus.SUCCESS), int(WCOpcode.RDMA_WRITE)]
    assert a.read("log", 0, 11) == b"from host 1"
    assert a.read("log", 64, 11) == b"from host 2"
    # and back: host 0 writes into host 1's region over the queue pair it accepted first (host 1's)
    a.call("fill", "src", 0, b"reply".hex())
    a.call("write", ia, "src", 0, 5, "log", 128, 3)
    assert a.wait(1)[0][:2] == [3, int(WCStatus.SUCCESS)]
    assert b.read("log", 128, 5) == b"reply"


def test_partition_moves_queue_pair_to_err(cluster):
    hosts, (a, b, _) = cluster
    qb = b.call("connect", a.endpoint)
    assert a.call("accept", 5) == 0
    b.call("write", qb, "src", 0, 8, "log", 0, 1)
    assert b.wait(1)[0][1] == int(WCStatus.SUCCESS)
    hosts.link_down(1)
    try:
        b.call("write", qb, "src", 0, 8, "log", 0, 2)
        # no FIN, no RST: TCP_USER_TIMEOUT/keepalive bound the detection (about 5 s)
        [wc] = b.wait(1, timeout=30)
        assert wc[:2] == [2, int(WCStatus.RETRY_EXC_ERR)]
        assert b.call("state", qb) == int(QPState.ERR)
    finally:
        hosts.link_up(1)
