"""One conformance suite for every rdma provider (shm, tcp, and verbs where a device exists).

Every peer is a real separate process (tests/rdma_peer.py); nothing is mocked.
"""

from __future__ import annotations

import os
import signal
import threading

import pytest

from rdma import Access, ConnectError, QPState, WCOpcode, WCStatus, connect

from .rdma_support import ALL, PROVIDERS, SECRET, Local, Peer, require_provider, wait_until

pytestmark = pytest.mark.timeout(90)

MIB = 1 << 20
REGIONS = {
    "log": (MIB + 4096, ALL),
    "ro": (4096, int(Access.LOCAL_WRITE | Access.REMOTE_READ)),
    "wo": (4096, int(Access.LOCAL_WRITE | Access.REMOTE_WRITE)),
    "recv": (64 * 1024, ALL),
}


@pytest.fixture(params=PROVIDERS)
def provider(request):
    require_provider(request.param)
    return request.param


@pytest.fixture
def local(provider):
    loc = Local(provider)
    try:
        yield loc
    finally:
        loc.close()


@pytest.fixture
def peers(provider):
    started: list[Peer] = []

    def start(regions=REGIONS, **kw) -> Peer:
        p = Peer(provider, regions, **kw)
        started.append(p)
        return p

    try:
        yield start
    finally:
        for p in started:
            p.close()


def _connect(local: Local, peer: Peer):
    qp, remote = local.connect(peer)
    qi = peer.call("accept", 5)
    assert qi is not None
    assert qp.state is QPState.RTS
    return qp, remote, qi


@pytest.mark.parametrize("size", [1, 64, 4096, MIB])
def test_write_then_read_back(local, peers, size):
    peer = peers()
    qp, remote, _ = _connect(local, peer)
    addr, length, rkey = remote["log"]
    data = os.urandom(size)
    local.mr.buf[:size] = data
    off = 4096 - 1 if size < MIB else 4096  # unaligned for small sizes
    qp.post_write(local.mr, 0, size, addr + off, rkey, wr_id=7)
    [wc] = local.wait(1)
    assert (wc.wr_id, wc.status, wc.opcode) == (7, WCStatus.SUCCESS, WCOpcode.RDMA_WRITE)
    # the completion means the bytes are in the peer's region (the peer's CPU did nothing)
    assert peer.read("log", off, size) == data
    qp.post_read(local.mr, MIB, size, addr + off, rkey, wr_id=8)
    [wc] = local.wait(1)
    assert (wc.wr_id, wc.status, wc.opcode) == (8, WCStatus.SUCCESS, WCOpcode.RDMA_READ)
    assert bytes(local.mr.buf[MIB : MIB + size]) == data


def test_last_byte_ok_one_past_fails(local, peers):
    peer = peers()
    qp, remote, _ = _connect(local, peer)
    addr, length, rkey = remote["wo"]
    local.mr.buf[0:2] = b"\xaa\xbb"
    qp.post_write(local.mr, 0, 1, addr + length - 1, rkey, wr_id=1)
    assert local.wait(1)[0].status is WCStatus.SUCCESS
    assert peer.read("wo", length - 1, 1) == b"\xaa"
    qp.post_write(local.mr, 0, 2, addr + length - 1, rkey, wr_id=2)
    [wc] = local.wait(1)
    assert (wc.wr_id, wc.status) == (2, WCStatus.REM_ACCESS_ERR)
    assert qp.state is QPState.ERR
    # the queue pair is in ERR: later work requests are flushed
    qp.post_write(local.mr, 0, 1, addr, rkey, wr_id=3)
    [wc] = local.wait(1)
    assert (wc.wr_id, wc.status) == (3, WCStatus.WR_FLUSH_ERR)
    assert peer.read("wo", 0, 1) == b"\0"
    # before the start of the region, on a fresh queue pair
    qp2, _, _ = _connect(local, peer)
    qp2.post_write(local.mr, 0, 1, addr - 1, rkey, wr_id=4)
    assert local.wait(1)[0].status is WCStatus.REM_ACCESS_ERR


def test_write_with_immediate_and_send(local, peers):
    peer = peers()
    qp, remote, qi = _connect(local, peer)
    addr, _, rkey = remote["log"]
    for i in range(3):
        peer.call("post_recv", qi, "recv", i * 1024, 1024, 100 + i)
    local.mr.buf[:8] = b"imm-data"
    qp.post_write(local.mr, 0, 8, addr + 64, rkey, wr_id=1, imm_data=0xDEADBEEF)
    local.mr.buf[100:105] = b"hello"
    qp.post_send(local.mr, 100, 5, wr_id=2)
    qp.post_send(local.mr, 100, 5, wr_id=3, imm_data=42)
    assert [(w.wr_id, w.status) for w in local.wait(3)] == [(1, 0), (2, 0), (3, 0)]
    got = peer.wait(3)
    assert got[0] == [100, int(WCStatus.SUCCESS), int(WCOpcode.RECV_RDMA_WITH_IMM), 8, 0xDEADBEEF]
    assert got[1] == [101, int(WCStatus.SUCCESS), int(WCOpcode.RECV), 5, None]
    assert got[2] == [102, int(WCStatus.SUCCESS), int(WCOpcode.RECV), 5, 42]
    assert peer.read("log", 64, 8) == b"imm-data"
    assert peer.read("recv", 1024, 5) == b"hello"


@pytest.mark.parametrize("spin", [0.0, None, 0.05], ids=["sleeps-at-once", "default", "polls-50ms"])
def test_a_waiter_is_woken_by_a_completion_that_comes_while_it_sleeps_or_polls(local, peers, spin):
    peer = peers()
    qp, _, qi = _connect(local, peer)
    peer.call("post_recv", qi, "recv", 0, 64, 7)
    local.mr.buf[:5] = b"later"
    sender = threading.Timer(0.3, qp.post_send, (local.mr, 0, 5), {"wr_id": 1})
    sender.start()
    try:
        got = peer.wait(1, timeout=5, spin=spin)
    finally:
        sender.join()
    assert got == [[7, int(WCStatus.SUCCESS), int(WCOpcode.RECV), 5, None]]
    assert peer.read("recv", 0, 5) == b"later"
    assert [(w.wr_id, w.status) for w in local.wait(1)] == [(1, WCStatus.SUCCESS)]


def test_send_larger_than_receive_buffer(local, peers):
    peer = peers()
    qp, _, qi = _connect(local, peer)
    peer.call("post_recv", qi, "recv", 0, 4, 9)
    peer.call("post_recv", qi, "recv", 4, 4, 10)
    qp.post_send(local.mr, 0, 16, wr_id=1)
    [wc] = local.wait(1)
    assert wc.status is WCStatus.REM_INV_REQ_ERR
    got = peer.wait(2)
    assert got[0][:2] == [9, int(WCStatus.LOC_LEN_ERR)]
    assert got[1][:2] == [10, int(WCStatus.WR_FLUSH_ERR)]  # the peer's queue pair followed into ERR


def test_completion_order_and_unsignaled(local, peers):
    peer = peers()
    qp, remote, _ = _connect(local, peer)
    addr, _, rkey = remote["log"]
    sizes = [1, 64, 4096, 100, 65536, 7] * 20
    for i, n in enumerate(sizes):
        qp.post_write(local.mr, 0, n, addr + i * 8, rkey, wr_id=i, signaled=(i % 3 != 1))
    expected = [i for i in range(len(sizes)) if i % 3 != 1]
    wcs = local.wait(len(expected))
    assert [w.wr_id for w in wcs] == expected
    assert all(w.status is WCStatus.SUCCESS for w in wcs)
    assert local.cq.poll() == []


def test_access_rights(local, peers):
    peer = peers()
    qp, remote, _ = _connect(local, peer)
    addr, _, rkey = remote["ro"]
    qp.post_read(local.mr, 0, 16, addr, rkey, wr_id=1)
    assert local.wait(1)[0].status is WCStatus.SUCCESS
    qp.post_write(local.mr, 0, 16, addr, rkey, wr_id=2)  # no REMOTE_WRITE
    assert local.wait(1)[0].status is WCStatus.REM_ACCESS_ERR
    assert qp.state is QPState.ERR
    qp2, _, _ = _connect(local, peer)
    addr, _, rkey = remote["wo"]
    qp2.post_read(local.mr, 0, 16, addr, rkey, wr_id=3)  # no REMOTE_READ
    assert local.wait(1)[0].status is WCStatus.REM_ACCESS_ERR


def test_wrong_rkey_and_deregistered_region(local, peers):
    peer = peers()
    qp, remote, _ = _connect(local, peer)
    addr, _, rkey = remote["wo"]
    qp.post_write(local.mr, 0, 8, addr, rkey ^ 0x5A5A5A5A, wr_id=1)
    assert local.wait(1)[0].status is WCStatus.REM_ACCESS_ERR
    qp2, _, _ = _connect(local, peer)
    qp2.post_write(local.mr, 0, 8, addr, rkey, wr_id=2)
    assert local.wait(1)[0].status is WCStatus.SUCCESS
    peer.call("dereg", "wo")
    qp2.post_write(local.mr, 0, 8, addr, rkey, wr_id=3)
    assert local.wait(1)[0].status is WCStatus.REM_ACCESS_ERR


def test_peer_killed_then_reconnect(local, peers):
    peer = peers()
    qp, remote, qi = _connect(local, peer)
    addr, _, rkey = remote["log"]
    qp.post_write(local.mr, 0, 64, addr, rkey, wr_id=1)
    assert local.wait(1)[0].status is WCStatus.SUCCESS
    qp.post_recv(local.mr, 0, 64, wr_id=50)
    os.kill(peer.pid, signal.SIGKILL)
    peer.kill()
    # the dead peer's queue pair turns ours to ERR within the provider's bound (ms here)
    assert wait_until(lambda: qp.state is QPState.ERR, timeout=10)
    [flushed] = local.wait(1)
    assert (flushed.wr_id, flushed.status, flushed.opcode) == (50, WCStatus.WR_FLUSH_ERR, WCOpcode.RECV)
    qp.post_write(local.mr, 0, 64, addr, rkey, wr_id=2)
    qp.post_write(local.mr, 0, 64, addr, rkey, wr_id=3)
    wcs = local.wait(2)
    assert [w.wr_id for w in wcs] == [2, 3]
    assert wcs[0].status in (WCStatus.RETRY_EXC_ERR, WCStatus.WR_FLUSH_ERR)
    assert wcs[1].status is WCStatus.WR_FLUSH_ERR
    # reconnect to a new peer process
    peer2 = peers()
    qp2, remote2, _ = _connect(local, peer2)
    addr2, _, rkey2 = remote2["log"]
    local.mr.buf[:4] = b"back"
    qp2.post_write(local.mr, 0, 4, addr2, rkey2, wr_id=4)
    assert local.wait(1)[0].status is WCStatus.SUCCESS
    assert peer2.read("log", 0, 4) == b"back"


def test_graceful_close_moves_peer_to_err(local, peers):
    peer = peers()
    qp, remote, qi = _connect(local, peer)
    peer.call("close_qp", qi)
    addr, _, rkey = remote["log"]
    ok = wait_until(lambda: qp.state is QPState.ERR, timeout=5)
    if not ok:  # shm notices a closed peer queue pair on the next work request
        qp.post_write(local.mr, 0, 8, addr, rkey, wr_id=1)
        assert local.wait(1)[0].status is not WCStatus.SUCCESS
    assert qp.state is QPState.ERR


def test_concurrent_queue_pairs_from_threads(local, peers):
    peer = peers()
    nthreads, per = 4, 100
    _, remote, _ = _connect(local, peer)
    # one CQ per thread so each thread sees only its own completions
    cqs = [local.ctx.create_cq() for _ in range(nthreads)]
    qps = []
    for t in range(nthreads):
        c = connect(local.ctx, local.pd, peer.endpoint, SECRET, cqs[t], cqs[t], b"", timeout=5)
        peer.call("accept", 5)
        qps.append(c.qp)
    addr, _, rkey = remote["log"]
    local.mr.buf[: nthreads * per] = bytes(range(256)) * (nthreads * per // 256) + bytes(nthreads * per % 256)
    errors: list = []

    def run(t: int) -> None:
        try:
            done = []
            for i in range(per):
                off = t * per + i
                qps[t].post_write(local.mr, off, 1, addr + off, rkey, wr_id=off)
                if i % 10 == 9:
                    while len(done) < i + 1:
                        done += cqs[t].wait(10)
            while len(done) < per:
                done += cqs[t].wait(10)
            assert [w.wr_id for w in done] == [t * per + i for i in range(per)]
            assert all(w.status is WCStatus.SUCCESS for w in done)
        except BaseException as e:  # reported to the main thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(nthreads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors, errors
    assert peer.read("log", 0, nthreads * per) == bytes(local.mr.buf[: nthreads * per])


def test_wrong_secret_refused_and_counted(local, peers):
    peer = peers()
    with pytest.raises(ConnectError, match="refused|authentication|secret"):
        local.connect(peer, secret=b"not-the-secret")
    assert wait_until(lambda: peer.call("refused").get("bad_secret", 0) >= 1, timeout=5)
    qp, remote, _ = _connect(local, peer)  # the listener still serves a good peer
    addr, _, rkey = remote["log"]
    qp.post_write(local.mr, 0, 8, addr, rkey, wr_id=1)
    assert local.wait(1)[0].status is WCStatus.SUCCESS


def test_provider_mismatch_refused(provider, peers):
    other = "tcp" if provider != "tcp" else "shm"
    peer = peers()
    loc = Local(other)
    try:
        with pytest.raises(ConnectError, match="provider mismatch"):
            loc.connect(peer)
    finally:
        loc.close()
    assert peer.call("refused").get("provider_mismatch", 0) == 1


def test_pipelined_large_reads_and_writes(local, peers):
    """Many 1 MiB READs and WRITEs outstanding at once (more than any socket buffer holds)."""
    peer = peers()
    qp, remote, _ = _connect(local, peer)
    addr, _, rkey = remote["log"]
    peer.call("fill", "log", 0, (b"\x5a" * 4096).hex())
    local.mr.buf[MIB : 2 * MIB] = b"\xa5" * MIB
    n = 24
    for i in range(n):
        qp.post_read(local.mr, 0, MIB, addr, rkey, wr_id=i)
        qp.post_write(local.mr, MIB, MIB, addr, rkey, wr_id=100 + i)
    wcs = local.wait(2 * n, timeout=60)
    assert [w.wr_id for w in wcs] == [x for i in range(n) for x in (i, 100 + i)]
    assert all(w.status is WCStatus.SUCCESS for w in wcs)
    assert peer.read("log", MIB - 16, 16) == b"\xa5" * 16
