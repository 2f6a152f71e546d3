"""The Replica API: configuration, proposals, in-order delivery, status, shutdown."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from prometheus_client import REGISTRY, CollectorRegistry

from consensus import codec
from consensus.commit_future import CommitFuture
from consensus.core import LEADER, Core
from consensus.errors import LogWriteError, ReplicaClosed
from consensus.logstore import LogStore
from consensus.metrics import Metrics
from consensus.transport import Transport

log = logging.getLogger(__name__)


@dataclass
class Peer:
    name: str
    endpoint: str  # "host:port" of its rdma listener


@dataclass
class ReplicaConfig:
    name: str
    endpoint: str
    peers: list[Peer]
    data_dir: Path
    transport: str = "auto"
    secret: bytes = b""
    durability: Literal["fsync", "memory"] = "fsync"
    heartbeat_ms: int = 20
    election_timeout_ms: int = 300
    log_region_bytes: int = 64 << 20
    segment_bytes: int = 64 << 20  # the log's files on disk start a new one past this size
    # How long the receive thread keeps polling after its last message before it sleeps,
    # yielding the core and the GIL between polls, so that a steady stream of proposals meets
    # no sleeping thread on its way (on a 2-core host, bench_consensus.py's shm p50 66-68
    # against 225 µs with 0, and 3.5-3.8x against 3.0x PySyncObj's commits; bench/NOTES.md). It takes
    # CPU that an application sharing the cores may need more (a supervisor polls only with
    # thrifty set, which frees that CPU), and one window per heartbeat when idle.
    spin_us: int = 200
    # How long each sleep on the completion channel is put off by polling without yielding
    # (None: the provider's default, 30 µs for shm). A supervisor sets 0 for the reason above.
    poll_us: int | None = None
    # New entries go at once only to the followers a commit needs; the others get them in
    # batches on the leader's tick (consensus/README.md, "Which followers hear of an entry at once"). It
    # frees their CPU for an application that shares the cores (a supervisor sets it), and
    # costs a group alone on two cores throughput: a commit waits for one chosen follower, not
    # for the first of all to answer (bench_consensus.py: 3.09x PySyncObj against 3.34-3.76x).
    thrifty: bool = False


# A leader hands its committed entries to the application on its tick (every half heartbeat),
# or at once when this many wait, not on every commit: a wake-up of the delivery thread per commit
# is CPU that the followers need, and the leader's proposers learn of each commit from its future.
LEADER_DELIVERY_BATCH = 256


class Replica:
    """One member of a replicated log.

    ``on_commit(index, payload)`` runs on one delivery thread, in log order, once per index per
    Replica lifetime; a replica started from an existing data directory delivers its log again
    from index 1. Internal no-op entries (one per leadership) are not given to ``on_commit``; pass
    ``on_noop(index)`` to see them (so that delivered indices plus no-ops are contiguous).
    ``on_role_change(role, ballot, leader)`` runs on the same delivery thread, in order, after
    every change of role, ballot or known leader.

    ``on_failure(error)`` runs once, on whichever thread met it, when the log's directory refuses
    a write or an fsync (:class:`LogWriteError`). From then on the replica acts as crashed: it
    answers no peer, proposes nothing, delivers nothing more, and ``close`` writes nothing; its
    proposals in flight fail with ReplicaClosed at ``close``. Without ``on_failure`` the error is
    logged.
    """

    def __init__(self, config: ReplicaConfig, on_commit: Callable[[int, bytes], None],
                 on_role_change: Callable[[str, int, str | None], None] | None = None,
                 on_noop: Callable[[int], None] | None = None,
                 registry: CollectorRegistry = REGISTRY,
                 on_failure: Callable[[LogWriteError], None] | None = None) -> None:
        self.config = config
        self._on_commit = on_commit
        self._on_role_change = on_role_change
        self._on_noop = on_noop
        names = sorted([config.name] + [p.name for p in config.peers])
        if len(set(names)) != len(names):
            raise ValueError(f"replica names must be unique: {names}")
        self._names = names
        self._peers = [p.name for p in config.peers]
        self.metrics = Metrics(config.name, self._peers, registry)
        self._fsync = config.durability == "fsync"
        if config.durability not in ("fsync", "memory"):
            raise ValueError(f"durability must be 'fsync' or 'memory', not {config.durability!r}")
        self._stop = threading.Event()
        self._cv = threading.Condition()
        self._role_events: deque[tuple[str, int, str | None]] = deque()
        self._threads: list[threading.Thread] = []
        self._started = False
        self._closed = False
        self._on_failure = on_failure
        self.failed: LogWriteError | None = None
        self.successor: str | None = None  # the peer the last step_down handed leadership to

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        cfg = self.config
        n = len(self._names)
        cache = max(1 << 20, cfg.log_region_bytes // 4)
        self.store = LogStore(Path(cfg.data_dir), fsync=self._fsync, cache_bytes=cache,
                              segment_bytes=cfg.segment_bytes, on_failure=self._log_failed)
        endpoints = {cfg.name: cfg.endpoint, **{p.name: p.endpoint for p in cfg.peers}}
        area = cfg.log_region_bytes // max(1, n - 1)
        poll_s = None if cfg.poll_us is None else cfg.poll_us / 1e6
        self.transport = Transport(cfg.name, endpoints, cfg.transport, cfg.secret, area, self._on_frame,
                                   poll_s=poll_s, spin_s=cfg.spin_us / 1e6)
        self.core = Core(cfg.name, self._names, self.store, self.transport.send, cfg.heartbeat_ms / 1000,
                         cfg.election_timeout_ms / 1000, self.transport.max_body(), self._role_changed,
                         self._commit_advanced, self.metrics, thrifty=cfg.thrifty)
        self.metrics.role("follower", self.store.promised, None)
        self.metrics.read_at_scrape(lambda: self.core.commit_index, lambda: self.core.applied_index,
                                    lambda: self.store.durable_index, self.transport.connected,
                                    lambda: self.store.size_bytes, self.store.free_bytes)
        try:
            self.transport.start()  # binds the listener: fails on a busy port or an empty secret
        except BaseException:
            self.store.close()
            raise
        self._started = True
        for fn, what in ((self._tick_loop, "tick"), (self._deliver_loop, "deliver")):
            t = threading.Thread(target=fn, name=f"{cfg.name}-{what}", daemon=True)
            t.start()
            self._threads.append(t)

    def _log_failed(self, error: LogWriteError) -> None:
        """The store's first failed write (under its lock, maybe under the consensus lock)."""
        self.failed = error
        self._stop.set()
        with self._cv:
            self._cv.notify_all()
        if self._on_failure is not None:
            self._on_failure(error)
        else:
            log.error("%s: %s; this replica stops", self.config.name, error)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        with self._cv:
            self._cv.notify_all()
        if not self._started:
            return
        self.transport.close()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=5)
        with self.core.locked():
            self.core._fail_pending(ReplicaClosed("replica closed"))
        self.store.close()

    # ---- state --------------------------------------------------------------------------------
    @property
    def role(self) -> str:
        return self.core.role

    @property
    def ballot(self) -> int:
        return self.core.ballot

    @property
    def leader(self) -> str | None:
        return self.core.leader

    @property
    def commit_index(self) -> int:
        return self.core.commit_index

    @property
    def applied_index(self) -> int:
        """The last index delivered to ``on_commit`` (or ``on_noop``)."""
        return self.core.applied_index

    @property
    def durable_index(self) -> int:
        return self.store.durable_index

    @property
    def last_index(self) -> int:
        return self.store.last_index

    def peer_status(self) -> dict[str, dict]:
        """Per peer: reachable (connected both ways and heard lately when leading), match_index,
        lag (entries behind our last index; meaningful on the leader), ready (leading: heard
        lately, and fewer than LAGGING_ENTRIES behind in applying the log, as it said: a peer
        that could lead at once)."""
        now = time.monotonic()
        out = {}
        with self.core.locked():
            leading = self.core.role == LEADER
            last = self.store.last_index
            for p in self._peers:
                heard = now - self.core.last_heard[p] < self.core.election_s
                reach = self.transport.connected(p) and (heard or not leading)
                match = self.core.match[p] if leading else None
                out[p] = {"reachable": reach, "match_index": match,
                          "lag": (last - match) if match is not None else None,
                          "ready": leading and self.core.ready(p, now)}
        return out

    # ---- proposals ----------------------------------------------------------------------------
    def propose(self, payload: bytes, defer: bool = False) -> CommitFuture:
        """Future of the committed index; fails with NotLeader(leader) when not leading,
        LeadershipLost when leadership ends before it commits (outcome unknown: it may still
        commit under the next leader), ValueError when larger than a quarter of the log region
        share of one peer (log_region_bytes / (n - 1) / 4). With ``defer``, the proposal waits
        for the next one without it, or ``flush()``, or at most the leader's next tick: a caller
        with many proposals at hand gets them appended, sent and (with fsync) synced as one."""
        if self._closed or not self._started or self.failed is not None:
            fut: CommitFuture = CommitFuture()
            fut.set_exception(ReplicaClosed("replica not running"))
            return fut
        try:
            fut = self.core.submit(bytes(payload), defer)
        except LogWriteError:  # reported; the proposal failed with the batch it went in
            fut = CommitFuture()
            fut.set_exception(ReplicaClosed("replica not running: its log cannot be written"))
            return fut
        self.metrics.proposals.inc()
        return fut

    def flush(self) -> None:
        """Append the proposals made with ``defer``."""
        if not self._closed and self._started and self.failed is None:
            with contextlib.suppress(LogWriteError):  # reported, and the batch's proposals failed
                self.core.flush()

    def withdraw(self, timeout: float) -> None:
        """Never lead again in this replica's lifetime, and hand leadership on if this replica
        leads: for an application that can no longer serve (a supervisor whose copy diverged). It
        still votes and keeps its log, so the group loses no majority by it. When the group has
        had no leader for a while it still stands, only to bring its successor up to date and
        hand leadership to it (a peer whose log is shorter cannot win without that)."""
        self.core.standing = False
        if self.core.role == LEADER:
            self.step_down(timeout)

    def defer_candidacy(self) -> bool:
        """Stand for election only when no other replica has for a while (election.py): for an
        application that may no longer match the log but has not been found to differ (a
        supervisor whose copy a client reached directly). It still leads if no peer does. True
        the first time."""
        first = not self.core.deferring
        self.core.deferring = True
        return first

    @property
    def deferring(self) -> bool:
        return self.core.deferring

    def step_down(self, timeout: float, to: str | None = None) -> bool:
        """Hand leadership to peer ``to``, or to a reachable peer (LeadershipTransfer._successor);
        True once another leads. Proposals made meanwhile wait: if the hand-over does not happen
        within ``timeout``, this replica leads on and appends them; if it does, they fail with
        LeadershipLost (never appended). ValueError if ``to`` is not a peer."""
        if self.failed is not None:
            return False
        target = self.core.transfer(to)
        if target is None:
            return False
        self.successor = target
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.core.role != LEADER:
                return True
            self.core.transfer_poke(target)
            time.sleep(0.005)
        self.core.transfer_abort()
        return self.core.role != LEADER

    # ---- internals ----------------------------------------------------------------------------
    def _on_frame(self, peer: str, mtype: int, body: bytes) -> None:
        if self.failed is not None:
            return  # crashed, as far as peers can tell
        with contextlib.suppress(LogWriteError):  # reported
            self.core.on_frame(peer, mtype, body)

    def _role_changed(self, role: str, ballot: int, leader: str | None) -> None:
        # called under the consensus lock: hand the event to the delivery thread
        if self._on_role_change is not None:
            with self._cv:
                self._role_events.append((role, ballot, leader))
                self._cv.notify()

    def _deliver_role_events(self) -> None:
        while self._role_events:
            role, ballot, leader = self._role_events.popleft()
            try:
                self._on_role_change(role, ballot, leader)  # type: ignore[misc]
            except Exception:  # noqa: BLE001 - a callback bug must not break consensus
                log.exception("on_role_change")

    def _commit_advanced(self, n: int) -> None:
        if self.core.role == LEADER and n - self.applied_index < LEADER_DELIVERY_BATCH:
            return
        with self._cv:
            self._cv.notify()

    def _tick_loop(self) -> None:
        fast = max(0.002, self.config.heartbeat_ms / 2000)  # leader: heartbeats and retries
        slow = max(fast, min(self.config.heartbeat_ms * 2, self.config.election_timeout_ms / 8) / 1000)
        while not self._stop.wait(fast if self.core.role == LEADER else slow):
            try:
                self.core.tick()
            except LogWriteError:
                return  # reported
            except Exception:  # noqa: BLE001
                log.exception("tick")
            if self.core.commit_index > self.applied_index:
                with self._cv:
                    self._cv.notify()

    def _deliver_loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop.is_set() and self.core.commit_index <= self.applied_index \
                        and not self._role_events:
                    self._cv.wait(0.5)
                if self._stop.is_set():
                    return
                hi = self.core.commit_index
            self._deliver_role_events()
            while self.applied_index < hi and not self._stop.is_set():
                try:
                    batch = self.store.entries(self.applied_index + 1, hi, 1 << 20)
                except LogWriteError:
                    return  # reported
                if not batch:
                    log.error("entry %d missing from the log", self.applied_index + 1)
                    self._stop.wait(0.1)
                    break
                for e in batch:
                    try:
                        if e.kind == codec.KIND_DATA:
                            self._on_commit(e.index, e.payload)
                        elif self._on_noop is not None:
                            self._on_noop(e.index)
                    except Exception:  # noqa: BLE001
                        log.exception("on_commit(%d)", e.index)
                    self.core.applied_index = e.index
                    if self._role_events:  # now, not once a long catch-up is done
                        self._deliver_role_events()
                self.metrics.commits.inc(len(batch))
