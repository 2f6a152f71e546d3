"""Taking leadership, and losing it, as methods mixed into Node (supervise/node.py).

Taking it: the new leader replays everything committed up to a barrier entry of its own, commits
CLOSE for every connection of the old leadership, and only then gates its own clients and takes
the VIP. Losing it: the copy keeps what it holds until the log decides it (own_conns.py), unless
input escaped the gate while it led, in which case it leaves the service.
"""

from __future__ import annotations

import logging
import threading
import time

from consensus import NotLeader
from tracer.tracer import Mode

from .entries import Entry, Kind

log = logging.getLogger("supervise")

LOST_LEADERSHIP_EXIT = 3  # the copy no longer matches the log: the supervisor exits with this
LOG_FAILED_EXIT = 4  # its log could not be opened or written (consensus.LogWriteError)


class Leadership:
    """Mixed into :class:`supervise.node.Node`; shares its state."""

    def _on_role_change(self, role: str, ballot: int, leader: str | None) -> None:
        self.metrics.leader.set(1 if self.leading else 0)
        if role == "leader" and not self.leading:
            self._start_takeover()
        elif role != "leader" and self.leading and not self._stepping_down:
            assert self.tracer is not None
            if self.tracer.stats.escapes > self._escapes_before:
                log.error("lost leadership (ballot %d, leader now %s) after input escaped the gate "
                          "while leading: this copy may hold input the log never will, so it leaves "
                          "the service; restart the node with a fresh server", ballot, leader)
                self.vip.drop()
                self.exit_code = LOST_LEADERSHIP_EXIT
                self.fatal.set()
                return
            held = self.own.depose(self.epoch)  # first: the tracer thread then holds what comes
            self.tracer.set_mode(Mode.GATE)  # inputs that come now can be refused; outputs' can't
            self.leading = False
            self.metrics.leader.set(0)
            self.vip.drop()
            log.warning("lost leadership (ballot %d, leader now %s) while gating: %d inputs stay held "
                        "until the log decides them, then this copy follows the log", ballot, leader,
                        held)

    def _settle(self) -> None:
        """The log went on past this node's last leadership: what it still held will never
        commit. Refuse it, close the old clients' connections, and follow."""
        assert self.tracer is not None
        closed = self.own.settle(self.server_pid, self.listen_fds)
        if not self.leading:
            self.tracer.set_mode(Mode.OBSERVE)
        log.info("the log went on past this node's leadership: refused the inputs it still held and "
                 "closed %d connections of its clients; following", closed)

    def _withdraw(self) -> None:
        """A diverged copy must never serve: this node stops standing for election and hands on
        any leadership it has (it keeps voting, so the group keeps its majority)."""
        if self.replica is not None:
            threading.Thread(target=self.replica.withdraw, args=(2.0,), name="withdraw",
                             daemon=True).start()

    def _defer_candidacy(self) -> None:
        """A copy a stray client reached may no longer match the log (Redis numbers even a
        connection that sends nothing), so it should lead only if no untouched copy can."""
        if self.replica is not None and self.replica.defer_candidacy():
            self.metrics.deferred.set(1)
            log.warning("this node now stands for election only when no other node does")

    def _start_takeover(self) -> None:
        with self._takeover_lock:
            if self._taking_over:
                return  # the running takeover follows the replica's current ballot
            self._taking_over = True
        threading.Thread(target=self._become_leader, name="failover", daemon=True).start()

    def _become_leader(self) -> None:
        """Replay all that is committed, close the old leadership's connections, then gate.

        A copy may have a long log to replay first: the takeover goes on for as long as this
        node leads and the replay progresses, retrying a barrier that timed out, and under the
        replica's current ballot (leadership may have ended and come back meanwhile)."""
        assert self.replica is not None and self.tracer is not None
        attempt, ballot = 0, self.replica.ballot
        try:
            while self.replica.role == "leader" and not self.leading:
                if self.divergence.diverged:
                    log.error("elected with ballot %d, but this copy diverged: handing leadership on",
                              self.replica.ballot)
                    self.replica.withdraw(timeout=2.0)
                    return
                ballot = self.replica.ballot
                attempt += 1
                try:
                    self._take_over(ballot, attempt)
                except TimeoutError as exc:
                    log.warning("taking over with ballot %d (attempt %d): %s; retrying", ballot, attempt, exc)
                except NotLeader as exc:
                    log.info("leadership with ballot %d ended while taking over: %s", ballot, exc)
                    self.fatal.wait(0.05)
            if not self.leading:
                log.info("leadership (last ballot %d) ended before this node could take over", ballot)
        except Exception:
            log.exception("taking over leadership failed; handing leadership on")
            self.replica.step_down(timeout=2.0)
        finally:
            self._barrier = None
            with self._takeover_lock:
                self._taking_over = False
                again = (self.replica.role == "leader" and not self.leading and not self.fatal.is_set()
                         and not self.divergence.diverged)
            if again:  # leadership came back after the loop looked
                self._start_takeover()

    def _take_over(self, ballot: int, attempt: int) -> None:
        assert self.replica is not None and self.tracer is not None
        marker = f"{self.me.name}:{ballot}:{attempt}:{time.time_ns()}".encode()
        done = threading.Event()
        self._barrier = (marker, done)
        self.replica.propose(Entry(Kind.BARRIER, ballot, 0, marker).encode()).result(30)
        applied = self.replica.applied_index
        while not done.wait(5.0):
            if self.replica.role != "leader" or self.replica.ballot != ballot:
                raise NotLeader(self.replica.leader)
            if self.replica.applied_index == applied:
                raise TimeoutError("the replay made no progress for 5 s")
            applied = self.replica.applied_index
        if self.divergence.diverged:  # found while replaying up to the barrier: the loop hands on
            return
        stale = self.replayer.open_connections() + sorted(self.own.orphans)
        for cid in stale:
            self.replica.propose(Entry(Kind.CLOSE, cid[0], cid[1]).encode())
        if stale:
            self.replica.propose(Entry(Kind.BARRIER, ballot, 1, marker + b"/closed").encode()).result(30)
        self.epoch = ballot
        # gating first: an input seen while leading must never have been let through ungated;
        # what is gated before `leading` is set is already this leadership's
        self._opening = True
        self.tracer.set_mode(Mode.HOLD_OUTPUT if self.cluster.hold == "outputs" else Mode.GATE)
        self._escapes_before = self.tracer.stats.escapes
        self.leading = True
        self._opening = False
        self.metrics.leader.set(1)
        log.info("leading with ballot %d: closed %d connections of the old leadership, holding %s "
                 "of clients of %s", ballot, len(stale), self._holding(), self.me.server)
        self.vip.take(lambda: self.leading and self.replica is not None and self.replica.role == "leader")
