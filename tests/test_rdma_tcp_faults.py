"""The tcp provider's fault-injection hook, as the consensus tests use it."""

from __future__ import annotations

import os

import pytest

from rdma import QPState, WCOpcode, WCStatus
from rdma.tcp import Faults

from .rdma_support import ALL, Local, Peer, wait_until

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def pair():
    local = Local("tcp")
    peer = Peer("tcp", {"log": (1 << 20, ALL), "recv": (65536, ALL)})
    try:
        qp, remote = local.connect(peer)
        qi = peer.call("accept", 5)
        yield local, peer, qp, remote, qi
    finally:
        peer.close()
        local.close()


def test_drop_delay_duplicate_keep_rc_semantics(pair):
    local, peer, qp, remote, qi = pair
    addr, _, rkey = remote["log"]
    n = 150
    for i in range(n):
        peer.call("post_recv", qi, "recv", 0, 64, 1000 + i) if i % 5 == 0 else None
    qp.faults = Faults(drop=0.2, delay=0.0005, duplicate=0.3, seed=1234)
    data = os.urandom(n * 64)
    local.mr.buf[: len(data)] = data
    for i in range(n):
        imm = i if i % 5 == 0 else None
        qp.post_write(local.mr, i * 64, 64, addr + i * 64, rkey, wr_id=i, imm_data=imm)
    wcs = local.wait(n, timeout=60)
    assert [w.wr_id for w in wcs] == list(range(n))
    assert all(w.status is WCStatus.SUCCESS for w in wcs)
    assert peer.read("log", 0, n * 64) == data
    # duplicates were not executed twice: exactly one receive consumed per WRITE_WITH_IMM
    got = peer.wait(n // 5 + 1, timeout=3)
    assert [g[0] for g in got] == [1000 + i for i in range(0, n, 5)]
    assert all(g[2] == int(WCOpcode.RECV_RDMA_WITH_IMM) for g in got)


def test_retry_exceeded_after_repeated_drops(pair):
    local, peer, qp, remote, qi = pair
    addr, _, rkey = remote["log"]
    qp.faults = Faults(drop=1.0, retry_cnt=2, seed=1)
    qp.post_write(local.mr, 0, 8, addr, rkey, wr_id=1)
    qp.post_write(local.mr, 0, 8, addr, rkey, wr_id=2)
    wcs = local.wait(2)
    assert [(w.wr_id, w.status) for w in wcs] == [(1, WCStatus.RETRY_EXC_ERR), (2, WCStatus.WR_FLUSH_ERR)]
    assert qp.state is QPState.ERR
    assert wait_until(lambda: peer.call("state", qi) == int(QPState.ERR), timeout=10)


def test_cut_moves_both_sides_to_err(pair):
    local, peer, qp, remote, qi = pair
    addr, _, rkey = remote["log"]
    qp.post_write(local.mr, 0, 8, addr, rkey, wr_id=1)
    assert local.wait(1)[0].status is WCStatus.SUCCESS
    qp.cut()
    assert wait_until(lambda: qp.state is QPState.ERR, timeout=10)
    assert wait_until(lambda: peer.call("state", qi) == int(QPState.ERR), timeout=10)
    qp.post_write(local.mr, 0, 8, addr, rkey, wr_id=2)
    [wc] = local.wait(1)
    assert wc.status in (WCStatus.RETRY_EXC_ERR, WCStatus.WR_FLUSH_ERR)
