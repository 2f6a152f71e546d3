"""Elections: pre-vote and phase 1 (prepare/promise), as methods mixed into Core.

A replica that misses its leader first runs a pre-vote: it asks whether a majority would promise
its next ballot, and nothing changes unless a majority has also lost the leader (a replica that
merely lost touch — a healed partition, a starved process — cannot depose a healthy leader).
Then phase 1: the candidate persists its promise and asks for votes; a voter promises a ballot
higher than any it has seen, persisting the promise before it answers, and grants it only to a
candidate whose log is at least as up to date (last ballot, then last index), as DARE does.
"""

from __future__ import annotations

import logging
import random
import time

from consensus import wire

log = logging.getLogger("consensus.core")

LEADER, FOLLOWER, CANDIDATE = "leader", "follower", "candidate"
LAGGING_ENTRIES = 1000
CANDIDACY_DEFER_TIMEOUTS = 100
WITHDRAWN_DEFER_TIMEOUTS = 10
DEFERRING_TIMEOUTS = 3


class Elections:
    """Mixed into :class:`consensus.core.Core`; every method runs with the core's lock held."""

    def election_due(self, now: float) -> None:
        """The election timer ran out. A replica whose application lags its commit index by
        LAGGING_ENTRIES or more could serve as leader only once it has delivered all of that (a
        supervisor's fresh copy replaying the log), and it goes on delivering as a follower
        anyway. So it stands only once it has nearly caught up, and a caught-up peer, even one
        back from a pause or a partition, takes over first. After CANDIDACY_DEFER_TIMEOUTS
        election timeouts without a leader it stands regardless: an application that stopped
        delivering must not stop the group. Liveness only: nothing here changes what may be
        chosen.

        A withdrawn replica stands only after WITHDRAWN_DEFER_TIMEOUTS election timeouts without
        a leader, and then only to hand leadership on (Core.tick): a peer whose log is shorter
        than a majority's cannot win without it, and its vote alone would never let it. For the
        same reason a lagging replica that refused a standing peer its vote, its own log being
        longer, stands at once, and only to hand leadership to that peer (_on_prevote_req).

        A deferring replica stands only once DEFERRING_TIMEOUTS election timeouts have passed
        without a leader: past the longest any peer waits (two), so a peer that does not defer
        stands first, and wins unless its log is behind."""
        deferred_until = self._leader_contact + DEFERRING_TIMEOUTS * self.election_s
        if self.deferring and self._hand_to is None and now < deferred_until:
            self._deadline = deferred_until + random.random() * self.election_s
            return
        if not self.standing and now - self._leader_contact < WITHDRAWN_DEFER_TIMEOUTS * self.election_s:
            self._deadline = now + self._random_timeout()
            return
        if (self._lagging() and self._hand_to is None
                and now - self._leader_contact < CANDIDACY_DEFER_TIMEOUTS * self.election_s):
            self._deadline = now + self._random_timeout()
            return
        self.start_prevote()

    def _lag(self) -> int:
        """Entries committed that this replica has not applied yet."""
        return max(0, self.commit_index - self.applied_index)

    def _lagging(self) -> bool:
        return self._lag() >= LAGGING_ENTRIES

    def start_prevote(self) -> None:
        """Raft's pre-vote: ask whether a majority would promise our next ballot, changing no
        state, so that a replica that only lost touch (a healed partition, a starved process)
        cannot depose a healthy leader by raising the ballot."""
        rnd = self.store.promised // self.n + 1
        self._prevote_ballot = rnd * self.n + self.my_id
        self._prevotes = {self.name}
        self._deadline = time.monotonic() + self._random_timeout()
        req = wire.enc_vote_req(wire.VoteReq(self._prevote_ballot, self.store.last_index,
                                             self.store.last_ballot))
        for p in self.peers:
            self._send(p, wire.PREVOTE_REQ, req)
        if len(self._prevotes) >= self.majority:
            self.start_election()

    def _on_prevote_req(self, peer: str, m: wire.VoteReq) -> None:
        st = self.store
        alive = self.role == LEADER or time.monotonic() - self._leader_contact < self.election_s
        could = m.ballot > st.promised and not alive
        granted = could and (m.last_ballot, m.last_index) >= (st.last_ballot, st.last_index)
        if could and not granted and self._lagging() and self.standing:
            # the peer stands, but cannot win without entries only this replica holds, and this
            # one would not stand for a while: it stands for the peer (election_due)
            self._hand_to = peer
        self._send(peer, wire.PREVOTE_RESP, wire.enc_vote_resp(wire.VoteResp(m.ballot, granted)))

    def _on_prevote_resp(self, peer: str, m: wire.VoteResp) -> None:
        if m.granted and m.ballot == self._prevote_ballot and self.role != LEADER:
            self._prevotes.add(peer)
            if len(self._prevotes) >= self.majority:
                self._prevote_ballot = 0
                self.start_election()

    def start_election(self) -> None:
        rnd = self.store.promised // self.n + 1
        ballot = rnd * self.n + self.my_id
        self._promise(ballot)
        self._granted = ballot
        self._votes = {self.name}
        self._deadline = time.monotonic() + self._random_timeout()
        self._set_role(CANDIDATE, None)
        log.info("%s: election with ballot %d", self.name, ballot)
        req = wire.enc_vote_req(wire.VoteReq(ballot, self.store.last_index, self.store.last_ballot))
        for p in self.peers:
            self._send(p, wire.VOTE_REQ, req)
        if len(self._votes) >= self.majority:
            self._become_leader()

    def _on_vote_req(self, peer: str, m: wire.VoteReq) -> None:
        st = self.store
        if m.ballot > st.promised:
            up_to_date = (m.last_ballot, m.last_index) >= (st.last_ballot, st.last_index)
            self._step_down(m.ballot, None)
            if up_to_date:
                self._granted = m.ballot
                self._deadline = time.monotonic() + self._random_timeout()
        granted = m.ballot == st.promised and self._granted == m.ballot
        self._send(peer, wire.VOTE_RESP, wire.enc_vote_resp(wire.VoteResp(st.promised, granted)))

    def _on_vote_resp(self, peer: str, m: wire.VoteResp) -> None:
        if m.ballot > self.ballot:
            self._step_down(m.ballot, None)
            return
        if self.role == CANDIDATE and m.granted and m.ballot == self.ballot:
            self._votes.add(peer)
            if len(self._votes) >= self.majority:
                self._become_leader()
