"""Handing leadership on, as methods mixed into Core: a leader that leaves (Replica.step_down)
or withdraws (Replica.withdraw) brings its successor up to its whole log, then sends it
TIMEOUT_NOW; that peer asks back whether the hand-over still holds (TAKEOVER_ASK), and once the
leader says it does (TAKEOVER_GO) it starts an election at once instead of waiting out its
timer. Proposals wait meanwhile (proposals.py). A leader that gives the hand-over up answers no
more asks: a successor paused past the hand-over's timeout finds the requests queued when it
resumes, and lets leadership be (with Raft's transfer it would depose the leader that led on).

The successor is the one named to step_down, or else the live peer that lags least in applying
the log, as each says in its acknowledgements (under LAGGING_ENTRIES counts as not at all), then
the one with the longest log: a copy that is replaying the log could serve only once it has
delivered all of it.
"""

from __future__ import annotations

import logging
import time

from consensus import wire
from consensus.election import FOLLOWER, LAGGING_ENTRIES, LEADER

log = logging.getLogger("consensus.core")


class LeadershipTransfer:
    """Mixed into :class:`consensus.core.Core`."""

    def _successor(self, live: list[str]) -> str:
        return min(live, key=lambda p: (self.peer_lag[p] if self.peer_lag[p] >= LAGGING_ENTRIES else 0,
                                        -self.match[p]))

    def _hand_on(self, now: float) -> None:
        """A withdrawn replica leads only until its successor has its whole log, then tells that
        peer to take over."""
        live = [p for p in self.peers if now - self.last_heard[p] < self.election_s]
        if not live:
            return
        target = self._successor(live)
        if not self.transferring:
            log.info("%s: withdrawn, handing leadership on to %s", self.name, target)
            self.transferring = True
        self._hand_over_if_caught_up(target)

    def _hand_on_to(self, target: str, now: float) -> None:
        """A replica lagging in application that leads for ``target`` (it stood for that peer,
        Elections._on_prevote_req, or came to lead lagging, _hand_on_to_ready) leads only until
        ``target`` has its whole log; if ``target`` goes silent, it leads on."""
        if now - self.last_heard[target] >= self.election_s:
            log.info("%s: %s is silent; leading on instead of handing leadership to it", self.name,
                     target)
            self._hand_to = None
            self._lead_on()
            return
        if not self.transferring:
            log.info("%s: behind in applying its log, handing leadership to %s", self.name, target)
            self.transferring = True
        self._hand_over_if_caught_up(target)

    def _hand_on_to_ready(self, now: float) -> None:
        """A replica that came to lead far behind in applying its log (one restarted with a fresh
        copy does not know how far the log was committed, so nothing kept it from standing)
        hands leadership to a peer that could lead at once, as soon as one answers."""
        ready = [p for p in self.peers if self.ready(p, now)]
        if ready:
            self._hand_to = self._successor(ready)

    def transfer(self, to: str | None = None) -> str | None:
        """Begin a graceful hand-over (leader only) to ``to``, or to the successor among the
        reachable peers; None if there is none, or ``to`` is not reachable."""
        if to is not None and to not in self.peers:
            raise ValueError(f"{to!r} is not a peer of {self.name} (peers: {', '.join(self.peers)})")
        with self.locked():
            if self.role != LEADER:
                return None
            now = time.monotonic()
            live = [p for p in self.peers if now - self.last_heard[p] < self.election_s]
            if 1 + len(live) < self.majority or not live or (to is not None and to not in live):
                return None
            target = to or self._successor(live)
            self.transferring = True
            self._replicate(target, now)
            self._hand_over_if_caught_up(target)
            return target

    def transfer_poke(self, target: str) -> None:
        with self.locked():
            if self.role == LEADER and self.transferring:
                self._hand_over_if_caught_up(target)

    def transfer_abort(self) -> None:
        with self.locked():
            if self.role == LEADER and self.transferring:
                self._lead_on()

    def _lead_on(self) -> None:
        """Give the hand-over up: a successor that asks from now on is not told to go."""
        self.transferring = False
        self._told = None

    def _hand_over_if_caught_up(self, target: str) -> None:
        """Asked again each heartbeat (a message may be lost), not each poke: a successor that
        was paused finds fewer requests queued."""
        now = time.monotonic()
        if self.match[target] == self.store.last_index and (
                target != self._told or now - self._told_at >= self.heartbeat_s):
            self._told, self._told_at = target, now
            self._send(target, wire.TIMEOUT_NOW, wire.enc_ballot(self.ballot))

    def _on_timeout_now(self, peer: str, ballot: int) -> None:
        """The leader hands leadership to this replica (called with the lock held): it asks
        whether that still holds, and stands once the leader says so (_on_takeover_go)."""
        if not self.standing:
            if self._refused_handover != (peer, ballot):  # a leader asks again every heartbeat
                self._refused_handover = (peer, ballot)
                log.info("%s: withdrawn, so not taking over from %s", self.name, peer)
        elif ballot == self.ballot and self.leader == peer:
            self._send(peer, wire.TAKEOVER_ASK, wire.enc_ballot(ballot))

    def _on_takeover_ask(self, peer: str, ballot: int) -> None:
        """Answered only while handing over to ``peer``, which has the whole log: the question
        may come late."""
        if self.role == LEADER and self.transferring and ballot == self.ballot and \
                self._told == peer and self.match[peer] == self.store.last_index:
            self._send(peer, wire.TAKEOVER_GO, wire.enc_ballot(ballot))

    def _on_takeover_go(self, peer: str, ballot: int) -> None:
        if self.standing and self.role == FOLLOWER and ballot == self.ballot and self.leader == peer:
            log.info("%s: leadership handed over by %s", self.name, peer)
            self.start_election()
