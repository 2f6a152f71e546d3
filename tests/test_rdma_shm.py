"""shm provider specifics: segments are 0600 and never leak, also after kill -9 of their owner."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys

import pytest

from rdma import WCStatus, open_context, segment

from .rdma_support import ALL, Local, Peer, wait_until

pytestmark = pytest.mark.timeout(60)


def _segments_of(pid: int) -> list[str]:
    return [n for n in os.listdir(segment.SHM_DIR) if n.startswith(f"{segment.PREFIX}{pid}-")]


def test_segments_are_private_and_unlinked():
    ctx = open_context("shm")
    try:
        pd = ctx.alloc_pd()
        mr = pd.reg_mr(8192, ALL)
        st = os.fstat(mr.seg.fd)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_nlink == 0  # already unlinked: only descriptors and mappings keep it
        assert _segments_of(os.getpid()) == []
    finally:
        ctx.close()


def test_no_leak_after_kill_9_of_a_mapped_owner():
    local = Local("shm")
    peer = Peer("shm", {"log": (1 << 20, ALL)})
    try:
        qp, remote = local.connect(peer)
        assert peer.call("accept", 5) == 0
        addr, _, rkey = remote["log"]
        local.mr.buf[:3] = b"abc"
        qp.post_write(local.mr, 0, 3, addr, rkey, wr_id=1)
        assert local.wait(1)[0].status is WCStatus.SUCCESS
        pid = peer.pid
        os.kill(pid, signal.SIGKILL)
        peer.kill()
        assert _segments_of(pid) == []
        # our mapping of the dead peer's region stays valid memory: no crash, no corruption
        qp.post_write(local.mr, 0, 3, addr, rkey, wr_id=2)
        assert len(local.wait(1)) == 1
        assert wait_until(lambda: qp.state.name == "ERR", timeout=10)
    finally:
        peer.close()
        local.close()


def test_janitor_removes_segments_of_dead_processes():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = os.path.join(segment.SHM_DIR, f"{segment.PREFIX}{dead.pid}-0-deadbeef")
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    os.close(fd)
    mine = os.path.join(segment.SHM_DIR, f"{segment.PREFIX}{os.getpid()}-0-cafe")
    os.close(os.open(mine, os.O_CREAT | os.O_RDWR, 0o600))
    try:
        ctx = open_context("shm")
        ctx.close()
        assert not os.path.exists(path)
        assert os.path.exists(mine)  # a live owner's segment is left alone
    finally:
        for p in (path, mine):
            if os.path.exists(p):
                os.unlink(p)


def test_peer_cannot_map_a_foreign_file():
    seg = segment.create(4096)
    try:
        with pytest.raises(Exception, match="not the advertised"):
            segment.open_peer(os.getpid(), [seg.fd, seg.ino + 1, 4096])
        with pytest.raises(Exception, match="cannot open"):
            segment.open_peer(os.getpid(), [9999, seg.ino, 4096])
    finally:
        seg.close_fd()
