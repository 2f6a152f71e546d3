"""The Multi-Paxos state machine of one replica: replication and commit (elections: election.py;
handing leadership on: transfer.py; the proposal queue: proposals.py).

Ballots are ``round * n + node_id``, unique per node. Phase 1 runs once per leadership and
elects only a candidate whose log is at least as up to date as a majority's, so every entry that
may have been chosen is already in the new leader's log; the leader re-proposes its whole
uncommitted tail under its own ballot and appends a no-op of its ballot before anything new. It
counts acceptances only for entries of its own ballot (the no-op first), so an older tail commits
with it, never by itself.

The leader writes entries straight into each follower's inbox ring (see transport.py). A follower
accepts only from a writer whose ballot is at least its promise, validates every entry (canary,
crc, contiguity, the previous entry's ballot), persists per the durability setting and answers
with the index it accepted up to. One lock guards the state; fsync of a leader's own log runs
outside it (group commit).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable

from consensus import codec, wire
from consensus.codec import Entry
from consensus.commit_future import CommitFuture
from consensus.election import CANDIDATE, FOLLOWER, LAGGING_ENTRIES, LEADER, Elections
from consensus.errors import LeadershipLost
from consensus.logstore import LogStore
from consensus.proposals import Proposals
from consensus.transfer import LeadershipTransfer

log = logging.getLogger(__name__)

__all__ = ["CANDIDATE", "FOLLOWER", "LEADER", "Core"]
MAX_FRAME_PAYLOAD = 256 << 10
UNKNOWN_LAG = 0xFFFFFFFF  # a follower's lag until its first acknowledgement to this leader


class Core(Elections, LeadershipTransfer, Proposals):
    def __init__(self, name: str, names: list[str], store: LogStore, send: Callable[[str, int, bytes], bool],
                 heartbeat_s: float, election_s: float, max_frame: int,
                 on_role: Callable[[str, int, str | None], None], on_commit_advance: Callable[[int], None],
                 metrics, thrifty: bool = False) -> None:
        self.name = name
        self.thrifty = thrifty
        self.names = names
        self.n = len(names)
        self.my_id = names.index(name)
        self.peers = [p for p in names if p != name]
        self.majority = self.n // 2 + 1
        self.store = store
        self._send = send
        self.heartbeat_s = heartbeat_s
        self.retry_s = max(4 * heartbeat_s, 0.05)  # an append unanswered this long is sent again
        self.election_s = election_s
        self.max_frame = min(max_frame, MAX_FRAME_PAYLOAD)
        self.max_payload = max_frame - 256  # one entry must fit in one frame
        self._on_role = on_role
        self._on_commit_advance = on_commit_advance
        self.m = metrics
        self.mu = threading.Lock()
        self._queue: deque[tuple[bytes, CommitFuture, float]] = deque()
        self.role = FOLLOWER
        self.leader: str | None = None
        self._notified: tuple = (FOLLOWER, None, store.promised)
        self.commit_index = 0
        self.commit_heard = 0  # the highest commit index a leader sent, which the log may not reach yet
        self.applied_index = 0  # delivered to the application; the replica's delivery thread sets it
        self.transferring = False
        self.standing = True  # False: votes, but never stands for election (Replica.withdraw)
        self.deferring = False  # True: stands only once no other replica has (Replica.defer_candidacy)
        self._refused_handover: tuple[str, int] | None = None
        self._told: str | None = None  # leading: the peer sent TIMEOUT_NOW in this hand-over
        self._told_at = 0.0  # and when, last
        self._hand_to: str | None = None  # lagging, it stands for this peer (election.py)
        self._granted = 0
        self._votes: set[str] = set()
        self._prevote_ballot = 0
        self._prevotes: set[str] = set()
        self._leader_contact = 0.0
        self._deadline = time.monotonic() + self._random_timeout() + election_s
        self._pending: dict[int, tuple[CommitFuture, float]] = {}
        self.next_index = dict.fromkeys(self.peers, 1)
        self.match = dict.fromkeys(self.peers, 0)
        self.inflight: dict[str, float] = {}
        self.last_sent = dict.fromkeys(self.peers, 0.0)
        self.last_heard = dict.fromkeys(self.peers, 0.0)
        self.peer_lag = dict.fromkeys(self.peers, UNKNOWN_LAG)  # entries not applied, as each said
        self._led_from = 0  # the log's last index when this replica last came to lead

    @property
    def ballot(self) -> int:
        return self.store.promised

    def _random_timeout(self) -> float:
        return self.election_s * (1 + random.random())

    # ---- role changes (called with mu held) -------------------------------------------------
    def _set_role(self, role: str, leader: str | None) -> None:
        changed = (role, leader, self.ballot) != self._notified
        if self.role == LEADER and role != LEADER:
            self._fail_pending(LeadershipLost(leader))
            self.transferring = False
            self._told = None
            # A leader stops leading because it lost touch (paused, cut off) or met a higher
            # ballot; either way a leader it does not know of yet may be reaching it now. Until an
            # election timeout has passed it refuses pre-votes, as if it had just heard from one.
            self._leader_contact = time.monotonic()
        self.role, self.leader = role, leader
        if role == FOLLOWER:
            self._hand_to = None
        if changed:
            self._notified = (role, leader, self.ballot)
            self.m.role(role, self.ballot, leader)
            self._on_role(role, self.ballot, leader)

    def _promise(self, ballot: int) -> None:
        if ballot > self.store.promised:
            self.store.save_promise(ballot)  # durable before any answer leaves

    def _step_down(self, ballot: int, leader: str | None) -> None:
        self._promise(ballot)
        self._deadline = time.monotonic() + self._random_timeout()
        self._set_role(FOLLOWER, leader)

    def _become_leader(self) -> None:
        now = time.monotonic()
        for p in self.peers:
            self.next_index[p] = self.store.last_index + 1
            self.match[p] = 0
            self.last_heard[p] = now
            self.peer_lag[p] = UNKNOWN_LAG
        self._led_from = self.store.last_index
        self.inflight.clear()
        self._set_role(LEADER, self.name)
        self.m.leader_change()
        log.info("%s: leader with ballot %d, log up to %d", self.name, self.ballot, self.store.last_index)
        # re-propose the uncommitted tail under this ballot: the no-op of this ballot commits it
        self.store.append([Entry(self.store.last_index + 1, self.ballot, codec.KIND_NOOP, b"")])
        self.store.sync()
        for p in self.peers:
            self._replicate(p, now)
        self._advance_commit()

    # ---- replication (leader) -----------------------------------------------------------------
    def _eager(self, now: float) -> list[str]:
        """The followers that new entries go to at once: as many as a commit needs besides the
        leader, those furthest along (in name order on a tie), first among those that could lead
        at once (``ready``). The others get them in batches on the leader's tick
        (``_tick_bound``), so that they are not woken for every entry; one that stops answering
        falls behind and is replaced by the next. Without ``thrifty``, every follower."""
        if not self.thrifty:
            return self.peers
        return sorted(self.peers, key=lambda p: (not self.ready(p, now), -self.match[p]))[
            :self.majority - 1]

    def ready(self, p: str, now: float) -> bool:
        """The follower answers and does not lag in applying the log: it could lead at once."""
        return self.peer_lag[p] < LAGGING_ENTRIES and now - self.last_heard[p] < self.retry_s

    def _tick_bound(self, p: str, now: float, eager: list[str]) -> int:
        """How far the tick sends entries to follower ``p``. A lagging one outside the eager set
        gets only what the ready eager followers have acknowledged, so that it never holds an
        entry they lack (they could not win an election without its vote then, and it would
        have to stand and hand leadership on: election.py)."""
        last = self.store.last_index
        if not self.thrifty or self.peer_lag[p] < LAGGING_ENTRIES or p in eager:
            return last
        acked = [self.match[e] for e in eager if self.ready(e, now)]
        return min(acked) if acked else last

    def _replicate(self, p: str, now: float, upto: int | None = None) -> None:
        nxt = self.next_index[p]
        records, count = self.store.records(nxt, self.store.last_index if upto is None else upto,
                                            self.max_frame)
        prev = nxt - 1
        body = wire.enc_append(self.ballot, self.commit_index, prev, self.store.ballot_at(prev), records,
                               count)
        if self._send(p, wire.APPEND, body):
            self.last_sent[p] = now
            if count:
                self.m.batch.observe(count)
                self.inflight[p] = now
                self.next_index[p] = nxt + count

    def _advance_commit(self) -> None:
        if self.role != LEADER:
            return
        acks = sorted([self.store.durable_index] + [self.match[p] for p in self.peers], reverse=True)
        n = acks[self.majority - 1]
        if n > self.commit_index and self.store.ballot_at(n) == self.ballot:
            self._commit_to(n)

    def _commit_to(self, n: int) -> None:
        old = self.commit_index
        self.commit_index = n
        pend = self._pending
        if pend:
            now = time.perf_counter()
            observe = self.m.latency.observe
            for i in range(old + 1, n + 1):
                got = pend.pop(i, None)
                if got is not None:
                    fut, t0 = got
                    if not fut.done():
                        fut.set_result(i)
                    observe(now - t0)
        self._on_commit_advance(n)

    # ---- incoming messages (receive thread) ---------------------------------------------------
    def on_frame(self, peer: str, mtype: int, body: bytes) -> None:
        if mtype == wire.APPEND_RESP:
            with self.locked():
                self._on_append_resp(peer, wire.dec_append_resp(body))
            if not self.store.fsync:
                self.store.flush()  # the leader's own records reach the page cache once per round
            return
        with self.locked():
            if mtype == wire.APPEND:
                self._on_append(peer, wire.dec_append(body))
            elif mtype == wire.APPEND_RESP:
                self._on_append_resp(peer, wire.dec_append_resp(body))
            elif mtype == wire.VOTE_REQ:
                self._on_vote_req(peer, wire.dec_vote_req(body))
            elif mtype == wire.VOTE_RESP:
                self._on_vote_resp(peer, wire.dec_vote_resp(body))
            elif mtype == wire.PREVOTE_REQ:
                self._on_prevote_req(peer, wire.dec_vote_req(body))
            elif mtype == wire.PREVOTE_RESP:
                self._on_prevote_resp(peer, wire.dec_vote_resp(body))
            elif mtype == wire.TIMEOUT_NOW:
                self._on_timeout_now(peer, wire.dec_ballot(body))
            elif mtype == wire.TAKEOVER_ASK:
                self._on_takeover_ask(peer, wire.dec_ballot(body))
            elif mtype == wire.TAKEOVER_GO:
                self._on_takeover_go(peer, wire.dec_ballot(body))

    def _reply(self, peer: str, ok: bool, index: int) -> None:
        # a withdrawn replica will never lead: it says it lags without end, so that no leader
        # counts it ready to, nor hands leadership to it while a standing peer could take it.
        # The lag is what it would apply before it could lead: its whole log, and what a leader
        # said is committed beyond it. (Not its own commit index, which a replica restarted with
        # its log learns only after its first answer: it would say it had applied everything.)
        lag = max(self.commit_heard, self.store.last_index) - self.applied_index \
            if self.standing else UNKNOWN_LAG
        m = wire.AppendResp(self.ballot, index, self.store.last_index, ok, lag)
        self._send(peer, wire.APPEND_RESP, wire.enc_append_resp(m))

    def _on_append(self, peer: str, m: wire.Append) -> None:
        st = self.store
        if m.ballot < st.promised:
            self._reply(peer, False, 0)  # tells a deposed leader the newer ballot
            return
        if m.ballot > st.promised or self.role != FOLLOWER or self.leader != peer:
            self._step_down(m.ballot, peer)
        self._leader_contact = time.monotonic()
        self._hand_to = None  # a leader leads: no peer needs this replica to stand for it
        if m.commit > self.commit_heard:
            self.commit_heard = m.commit
        self._deadline = self._leader_contact + self._random_timeout()
        if m.prev_index > st.last_index:
            self._reply(peer, False, st.last_index)
            return
        if m.prev_index > 0 and st.ballot_at(m.prev_index) != m.prev_ballot:
            hint = max(self.commit_index, st.first_index_of_ballot(m.prev_index) - 1)
            self._reply(peer, False, min(hint, m.prev_index - 1))
            return
        new: list[Entry] = []
        for k, e in enumerate(m.entries):
            if e.index <= st.last_index:
                if st.ballot_at(e.index) == e.ballot:
                    continue
                if e.index <= self.commit_index:
                    log.error("%s: refusing to overwrite committed index %d", self.name, e.index)
                    return
                st.truncate_from(e.index)
            new = list(m.entries[k:])
            break
        if new:
            st.append(new)
            if st.fsync:
                st.sync()
        matched = m.prev_index + len(m.entries)
        self._reply(peer, True, matched)  # first: the leader waits for it, delivery does not
        if new and not st.fsync:
            st.flush()  # memory durability: acknowledged in memory, then handed to the page cache
        commit = min(m.commit, matched)
        if commit > self.commit_index:
            self._commit_to(commit)

    def _on_append_resp(self, peer: str, m: wire.AppendResp) -> None:
        if m.ballot > self.ballot:
            self._step_down(m.ballot, None)
            return
        if self.role != LEADER or m.ballot != self.ballot:
            return
        now = time.monotonic()
        self.last_heard[peer] = now
        self.peer_lag[peer] = m.lag
        if m.ok:
            if m.index > self.match[peer]:
                self.match[peer] = m.index
                self.m.lag(peer, self.store.last_index - m.index)
            if self.next_index[peer] <= m.index:
                self.next_index[peer] = m.index + 1
            if self.next_index[peer] - 1 <= m.index:
                self.inflight.pop(peer, None)
            self._advance_commit()
        else:
            self.next_index[peer] = max(self.match[peer], min(m.index, self.next_index[peer] - 1)) + 1
            self.inflight.pop(peer, None)
        if peer not in self.inflight and self.next_index[peer] <= self.store.last_index and \
                peer in self._eager(now):
            self._replicate(peer, now)

    # ---- timers -------------------------------------------------------------------------------
    def tick(self) -> None:
        self.store.flush()
        with self.locked():
            now = time.monotonic()
            if self.role == LEADER:
                if self.store.durable_index < self.store.last_index:
                    self.store.sync()
                    self._advance_commit()
                if not self.standing:
                    self._hand_on(now)
                elif self._hand_to is not None:
                    self._hand_on_to(self._hand_to, now)
                elif self._led_from - self.applied_index >= LAGGING_ENTRIES:
                    self._hand_on_to_ready(now)
                eager = self._eager(now)
                for p in self.peers:
                    t = self.inflight.get(p)
                    if t is not None and now - t > self.retry_s:
                        self.inflight.pop(p)
                        self.next_index[p] = self.match[p] + 1
                    upto = self._tick_bound(p, now, eager)
                    if now - self.last_sent[p] >= self.heartbeat_s or (
                            p not in self.inflight and self.next_index[p] <= upto):
                        self._replicate(p, now, upto)
                    self.m.lag(p, self.store.last_index - self.match[p])
                heard = 1 + sum(1 for p in self.peers if now - self.last_heard[p] < self.election_s * 2)
                if heard < self.majority:
                    log.warning("%s: lost contact with a majority, stepping down", self.name)
                    self._step_down(self.ballot, None)
            elif now >= self._deadline:
                self.election_due(now)
