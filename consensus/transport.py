"""Per-writer inbox rings over rdma/ queue pairs: how replicas write messages into each other.

Every replica registers one inbox area per peer (a per-writer region): ``[slot 64 B][ring]``.
Peer P connects to our listener, learns the (addr, length, rkey) of its area from our private
data, and RDMA-WRITEs frames (wire.py) into the ring; the WRITE_WITH_IMM carries the frame's ring
offset, so our receive thread wakes on the completion (no polling while idle), validates the frame
in place and hands it to the consensus core. The leader's APPEND frames carry log entries, so the
ring P writes into is the circular log region of the design. Only P can write its area, so a
deposed leader's writes can never touch what a newer leader wrote.

Flow control: the first 64 bytes of an area are a slot that its writer fills with what it has
consumed of *our* ring at its side ``(epoch, consumed position, consumed count)``, lazily (every
quarter ring or quarter of the posted receives, and on a 200 ms timer). A writer never overwrites
unconsumed frames and never exceeds the receives posted for it; when a ring is full the frame is
dropped (the protocol retransmits, as it must over any lossy network).

Connections are one queue pair per direction: we connect to every peer (and reconnect after an
error, with a new epoch); they connect to us.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable

from consensus import wire
from consensus.ring import RECV_DEPTH, SLOT, Incoming, Outgoing, decode_slot, encode_slot
from rdma import cm
from rdma.verbs import Access, QPState, WCOpcode, WCStatus

log = logging.getLogger(__name__)

_OUTQ_LIMIT = 4096
_CREDIT = -1


class Transport:
    def __init__(self, name: str, endpoints: dict[str, str], provider: str, secret: bytes, area_bytes: int,
                 on_frame: Callable[[str, int, bytes], None], poll_s: float | None = None,
                 spin_s: float = 0.0) -> None:
        self.name = name
        self.poll_s = poll_s
        self.spin_s = spin_s
        self.endpoints = endpoints
        self.peers = [p for p in endpoints if p != name]
        self.provider = provider
        self.secret = secret
        self.area_bytes = max(area_bytes, 1 << 16) & ~63
        self.on_frame = on_frame
        self.out: dict[str, Outgoing | None] = dict.fromkeys(self.peers)
        self.inc: dict[int, Incoming] = {}
        self.inc_by_peer: dict[str, Incoming] = {}
        self._inc_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._wake: dict[str, threading.Event] = {p: threading.Event() for p in self.peers}
        self._faults: dict | None = None
        self.async_send = False
        self._outq: dict[str, deque] = {p: deque() for p in self.peers}
        self._outq_wake = {p: threading.Event() for p in self.peers}

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        hosts = tuple(ep.rsplit(":", 1)[0] for ep in self.endpoints.values())
        self.ctx = cm.open_context(self.provider, peer_hosts=hosts)
        self.pd = self.ctx.alloc_pd()
        self.send_cq = self.ctx.create_cq(4096)
        self.recv_cq = self.ctx.create_cq(4096)
        self.inbox = {p: self.pd.reg_mr(self.area_bytes, Access.LOCAL_WRITE | Access.REMOTE_WRITE)
                      for p in self.peers}
        self.scratch = self.pd.reg_mr(4096, Access.LOCAL_WRITE)
        areas = {p: [mr.addr, mr.length, mr.rkey] for p, mr in self.inbox.items()}
        private = json.dumps({"name": self.name, "areas": areas}, separators=(",", ":")).encode()
        try:
            self.listener = cm.Listener(self.ctx, self.pd, self.endpoints[self.name], self.secret,
                                        self.send_cq, self.recv_cq, private_data=private)
        except BaseException:
            self.close()
            raise
        self.async_send = self.ctx.provider == "tcp"
        if self.async_send:
            for p in self.peers:
                self._spawn(lambda p=p: self._sender_loop(p), f"send-{p}")
        self._spawn(self._accept_loop, "accept")
        self._spawn(self._recv_loop, "recv")
        for p in self.peers:
            self._spawn(lambda p=p: self._connect_loop(p), f"connect-{p}")

    def _spawn(self, fn: Callable[[], None], what: str) -> None:
        t = threading.Thread(target=fn, name=f"{self.name}-{what}", daemon=True)
        t.start()
        self._threads.append(t)

    def close(self) -> None:
        self._stop.set()
        for ev in [*self._wake.values(), *self._outq_wake.values()]:
            ev.set()
        if hasattr(self, "listener"):
            _quiet(self.listener.close)
        _quiet(self.recv_cq.close)
        _quiet(self.send_cq.close)
        for t in self._threads:
            t.join(timeout=3)
        for o in self.out.values():
            if o is not None:
                _quiet(o.qp.close)
        for i in list(self.inc.values()):
            _quiet(i.conn.qp.close)
        for mr in [*self.inbox.values(), self.scratch]:
            _quiet(mr.close)
        _quiet(self.pd.close)
        _quiet(self.ctx.close)

    # ---- sending ------------------------------------------------------------------------------
    def connected(self, peer: str) -> bool:
        return _usable(self.out.get(peer))

    def max_body(self) -> int:
        return (self.area_bytes - SLOT) // 4

    def send(self, peer: str, mtype: int, body: bytes) -> bool:
        """Write one frame into ``peer``'s inbox ring for us; False if it cannot go now.

        With a provider whose posts can block (tcp: a full socket buffer during a partition,
        injected delays) the frame goes through the peer's sender thread instead, so that one
        unreachable peer never stalls the consensus lock."""
        o = self.out.get(peer)
        if o is None or o.broken:
            return False
        if self.async_send:
            q = self._outq[peer]
            if len(q) >= _OUTQ_LIMIT:
                return False
            q.append((mtype, body))
            self._outq_wake[peer].set()
            return True
        with o.lock:
            try:
                return self._send_locked(o, mtype, body)
            except Exception as exc:  # noqa: BLE001 - a dead QP is an expected state
                log.info("%s -> %s: send failed: %s", self.name, peer, exc)
                self._break(o)
                return False

    def _send_locked(self, o: Outgoing, mtype: int, body: bytes) -> bool:
        if o.qp.state == QPState.ERR:
            self._break(o)
            return False
        done = o.write_frame(mtype, body, decode_slot(bytes(self.inbox[o.peer].buf[0:SLOT]), o.epoch))
        if done:
            self._drain_send_cq()
        return done is not False

    def _drain_send_cq(self) -> None:
        for wc in self.send_cq.poll(64):
            if wc.status != WCStatus.SUCCESS:
                for o in list(self.out.values()):
                    if o is not None and o.qp.qp_num == wc.qp_num and not o.broken:
                        log.info("%s -> %s: write failed (%s)", self.name, o.peer, wc.status.name)
                        self._break(o)

    def _break(self, o: Outgoing) -> None:
        if not o.broken:
            o.broken = True
            self._wake[o.peer].set()

    def _report(self, inc: Incoming, force: bool = False) -> None:
        """Tell the writer how far we consumed its ring (written into our area at the writer)."""
        o = self.out.get(inc.peer)
        if o is None or o.broken:
            return
        ring = self.area_bytes - SLOT
        if not force and inc.consumed_pos - inc.reported_pos < ring // 4 and \
                inc.consumed_cnt - inc.reported_cnt < RECV_DEPTH // 4:
            return
        raw = encode_slot(inc.epoch, inc.consumed_pos, inc.consumed_cnt)
        inc.reported_pos, inc.reported_cnt = inc.consumed_pos, inc.consumed_cnt
        if self.async_send:
            self._outq[inc.peer].append((_CREDIT, raw))
            self._outq_wake[inc.peer].set()
            return
        self._write_credit(o, raw)

    def _write_credit(self, o: Outgoing, raw: bytes) -> None:
        with o.lock:
            try:
                o.write_slot(raw)
            except Exception:  # noqa: BLE001
                self._break(o)

    def _sender_loop(self, peer: str) -> None:
        q, wake = self._outq[peer], self._outq_wake[peer]
        while not self._stop.is_set():
            wake.wait(0.5)
            wake.clear()
            while q:
                mtype, body = q.popleft()
                o = self.out.get(peer)
                if o is None or o.broken:
                    continue
                if mtype == _CREDIT:
                    self._write_credit(o, body)
                    continue
                with o.lock:
                    try:
                        self._send_locked(o, mtype, body)
                    except Exception as exc:  # noqa: BLE001
                        log.info("%s -> %s: send failed: %s", self.name, peer, exc)
                        self._break(o)

    # ---- fault injection (tests) ---------------------------------------------------------------
    def inject(self, spec: dict) -> None:
        """Failpoints of the tcp provider on every queue pair, now and after reconnects:
        ``{"drop": p, "delay": s, "duplicate": p, "seed": n}``; ``{"cut": true}`` breaks every
        connection once; ``{}`` clears."""
        spec = dict(spec)
        cut = spec.pop("cut", False)
        self._faults = spec or None
        qps = [o.qp for o in self.out.values() if o is not None]
        qps += [i.conn.qp for i in list(self.inc.values())]
        for qp in qps:
            self._apply_faults(qp)
            if cut and hasattr(qp, "cut"):
                _quiet(qp.cut)

    def _apply_faults(self, qp: object) -> None:
        if not hasattr(qp, "faults"):
            return
        if self._faults is None:
            qp.faults = None
        else:
            from rdma.tcp import Faults

            qp.faults = Faults(**self._faults)

    # ---- connecting ---------------------------------------------------------------------------
    def _connect_loop(self, peer: str) -> None:
        wake = self._wake[peer]
        while not self._stop.is_set():
            o = self.out[peer]
            if not _usable(o):
                if o is not None:
                    self.out[peer] = None
                    _quiet(o.qp.close)
                    _quiet(o.staging.close)
                self._try_connect(peer)
            else:
                inc = self.inc_by_peer.get(peer)
                if inc is not None and (inc.consumed_pos, inc.consumed_cnt) != (inc.reported_pos,
                                                                               inc.reported_cnt):
                    self._report(inc, force=True)
                with o.lock:
                    _quiet(self._drain_send_cq)
            wake.wait(0.2 if self.out[peer] is not None else 0.1)
            wake.clear()

    def _try_connect(self, peer: str) -> None:
        epoch = int.from_bytes(os.urandom(8), "little") >> 1
        private = json.dumps({"name": self.name, "epoch": epoch}, separators=(",", ":")).encode()
        try:
            conn = cm.connect(self.ctx, self.pd, self.endpoints[peer], self.secret, self.send_cq,
                              self.recv_cq, private_data=private, timeout=1.0)
        except Exception as exc:  # noqa: BLE001 - peer down: retry later
            log.debug("%s -> %s: connect failed: %s", self.name, peer, exc)
            return
        try:
            info = json.loads(conn.peer_private_data)
            addr, length, rkey = info["areas"][self.name]
            if info["name"] != peer:
                raise ValueError(f"expected {peer}, reached {info['name']}")
            staging = self.pd.reg_mr(length, Access.LOCAL_WRITE)
        except Exception as exc:  # noqa: BLE001
            log.warning("%s -> %s: bad handshake data: %s", self.name, peer, exc)
            _quiet(conn.qp.close)
            return
        self._apply_faults(conn.qp)
        log.info("%s -> %s: connected (epoch %x)", self.name, peer, epoch)
        self.out[peer] = Outgoing(peer, conn, conn.qp, staging, addr, length, rkey, epoch)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn = self.listener.accept(timeout=0.2)
            except Exception:  # noqa: BLE001
                if self._stop.is_set():
                    return
                log.exception("accept")
                time.sleep(0.1)
                continue
            if conn is None:
                continue
            try:
                info = json.loads(conn.peer_private_data)
                peer, epoch = info["name"], int(info["epoch"])
                if peer not in self.inbox:
                    raise ValueError(f"unknown replica {peer!r}")
                for k in range(RECV_DEPTH):
                    conn.qp.post_recv(self.scratch, 0, 0, wr_id=k)
            except Exception as exc:  # noqa: BLE001
                log.warning("%s: refusing connection: %s", self.name, exc)
                _quiet(conn.qp.close)
                continue
            self._apply_faults(conn.qp)
            inc = Incoming(peer, conn, epoch)
            with self._inc_lock:
                old = self.inc_by_peer.get(peer)
                self.inc[conn.qp.qp_num] = inc
                self.inc_by_peer[peer] = inc
                if old is not None:
                    self.inc.pop(old.conn.qp.qp_num, None)
            if old is not None:
                _quiet(old.conn.qp.close)
            self._wake[peer].set()  # a restarted peer: our connection to it is to be rebuilt too
            log.info("%s <- %s: connected (epoch %x)", self.name, peer, epoch)

    # ---- receiving ----------------------------------------------------------------------------
    def _recv_loop(self) -> None:
        views = {p: mr.buf[SLOT:] for p, mr in self.inbox.items()}
        cq = self.recv_cq
        spin_s = self.spin_s
        last = 0.0
        while not self._stop.is_set():
            try:
                wcs = cq.poll(64)
                if not wcs:
                    # Shortly after traffic poll, yielding the core and the GIL between polls:
                    # a futex wakeup costs more than a round trip.
                    if time.monotonic() - last < spin_s:
                        os.sched_yield()
                        continue
                    wcs = cq.wait(timeout=0.5, max_entries=64, spin=self.poll_s)
                    if not wcs:
                        continue
                last = time.monotonic()
            except Exception:  # noqa: BLE001
                if self._stop.is_set():
                    return
                raise
            for wc in wcs:
                inc = self.inc.get(wc.qp_num)
                if inc is None:
                    continue
                if wc.status != WCStatus.SUCCESS:
                    with self._inc_lock:
                        if self.inc.get(wc.qp_num) is inc:
                            del self.inc[wc.qp_num]
                            if self.inc_by_peer.get(inc.peer) is inc:
                                del self.inc_by_peer[inc.peer]
                    continue
                if wc.opcode != WCOpcode.RECV_RDMA_WITH_IMM:
                    continue
                try:
                    inc.conn.qp.post_recv(self.scratch, 0, 0, wr_id=wc.wr_id)
                except Exception:  # noqa: BLE001
                    log.debug("repost failed", exc_info=True)
                inc.consumed_cnt += 1  # the receive is consumed even when the frame is torn
                try:
                    mtype, epoch, pos, body = wire.decode_frame(views[inc.peer], wc.imm_data or 0)
                except wire.BadFrame as exc:
                    log.warning("%s <- %s: bad frame at %s: %s", self.name, inc.peer, wc.imm_data, exc)
                    continue
                if epoch != inc.epoch:
                    continue
                inc.consumed_pos = max(inc.consumed_pos, pos + wire.frame_size(len(body)))
                try:
                    self.on_frame(inc.peer, mtype, body)
                except Exception:  # noqa: BLE001 - one bad message must not stop the replica
                    log.exception("%s <- %s: frame type %d", self.name, inc.peer, mtype)
                self._report(inc)


def _usable(o: Outgoing | None) -> bool:
    """False for a connection to rebuild: none yet, broken by a failed send, or its queue pair in
    ERR (the peer died or closed it: found without a send, since followers send each other
    nothing until an election)."""
    return o is not None and not o.broken and o.qp.state != QPState.ERR


def _quiet(fn: Callable[[], object]) -> None:
    try:
        fn()
    except Exception:  # noqa: BLE001
        log.debug("ignored", exc_info=True)
