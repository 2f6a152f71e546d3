"""One node of a replicated server: the tracer on the local copy, a consensus replica, and the
logic that turns one into the other.

Leader: every input of the server (accept, data, client EOF) is held by the tracer, proposed as
a log entry, and released once committed. Follower: committed entries are replayed into the
local server. Taking and losing leadership: leadership.py.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time

from consensus import LogWriteError, Peer, Replica, ReplicaConfig
from tracer.events import ACCEPTS, READS, SocketEvent
from tracer.tracer import Mode, Tracer

from .config import ClusterConfig, NodeConfig
from .digest import Divergence, OutputChecker
from .entries import EntryError, Kind, decode
from .handover import HandoverError
from .leader_inputs import LeaderInputs
from .leadership import LOG_FAILED_EXIT, LOST_LEADERSHIP_EXIT, Leadership
from .metrics import NodeMetrics
from .own_conns import LostInput, OwnConnections, shut_down_socket
from .replayer import Replayer
from .server_address import ServerAddress
from .vip import LeaderVip

log = logging.getLogger("supervise")

DIGEST_INTERVAL = 0.5
# A follower this many committed entries behind replays in catch-up mode (supervise/catch_up.py).
CATCH_UP_BACKLOG = 1000
HANDOVER_TIMEOUT_S = 2.0  # for the successor to catch up with the whole log and be elected


class Node(Leadership):
    def __init__(self, cluster: ClusterConfig, me: NodeConfig, metrics: NodeMetrics) -> None:
        self.cluster = cluster
        self.me = me
        self.metrics = metrics
        self.address = ServerAddress(cluster, me)
        self.tracer: Tracer | None = None
        self.replica: Replica | None = None
        self.inputs: LeaderInputs | None = None
        self.server_pid = 0
        self.listen_fds: set[int] = set()
        self.leading = False
        self.epoch = 0
        self.stray = 0
        self.stray_input = 0
        self._stray_inputs_seen: set[int] = set()
        self.fatal = threading.Event()
        self.exit_code = 0
        self.checker = OutputChecker()
        self.divergence = Divergence(self.checker, metrics, on_diverged=self._withdraw)
        self.replayer = Replayer(me.server_host, me.server_port, self._on_replay_output, self._on_stray,
                                 serialize=cluster.serialize)
        self.own = OwnConnections(self._release_held, self._refuse_held)
        self._barrier: tuple[bytes, threading.Event] | None = None
        self.vip = LeaderVip(cluster.vip, cluster.vip_interface)
        self._stepping_down = False
        self._handover_lock = threading.Lock()
        self._taking_over = False
        self._takeover_lock = threading.Lock()
        self._lost_reported = 0
        self._escapes_before = 0
        self._opening = False
        self._readers: dict[int, int] = {}  # pid -> the first thread seen reading client input
        self._hinted = cluster.serialize
        metrics.track(len(cluster.nodes),
                      lambda: self.own.open_count() if self.leading else len(self.replayer.conns),
                      lambda: self.tracer.threads_held if self.tracer else 0,
                      self._lost_events, self._serial_timeouts)

    # ---- start and stop -----------------------------------------------------------------------

    def attach(self, pid: int | None, command: list[str] | None) -> None:
        # resume_spin=0: the commit a held thread waits for needs the followers' CPU more than
        # the tracer needs to catch the next input early (bench_supervise.py, bench/NOTES.md)
        self.tracer = Tracer(Mode.OBSERVE, self._on_event, snaplen=16384, exitkill=True,
                             on_escape=self._on_escape, on_exit=self._on_server_exit,
                             on_batch=self._on_event_batch,
                             resume_spin=0.0, idle_poll=self.cluster.idle_poll,
                             serialize=self.cluster.serialize)
        if pid is not None:
            self.address.check(pid)
            self.tracer.attach(pid)
            self.server_pid = pid
        else:
            self.server_pid = self.tracer.launch(command or [])
            self.address.wait(self.server_pid)
        self.listen_fds = self.address.listen_fds(self.server_pid)
        if self.cluster.serialize:
            tracer, pid = self.tracer, self.server_pid
            self.replayer.watch_server(lambda: tracer.input_tally(pid), tracer.thread_busy)

    def start_replica(self) -> None:
        cfg = ReplicaConfig(
            name=self.me.name, endpoint=self.me.replication,
            peers=[Peer(n.name, n.replication) for n in self.cluster.nodes if n.name != self.me.name],
            data_dir=self.me.data_dir, transport=self.cluster.transport,
            secret=self.cluster.secret(), durability=self.cluster.durability,
            heartbeat_ms=self.cluster.heartbeat_ms,
            election_timeout_ms=self.cluster.election_timeout_ms,
            log_region_bytes=self.cluster.log_region_bytes,
            # Six processes share the cores here, and each replicated input waits for a commit:
            # a receive thread polling for an answer takes the CPU that the answer needs.
            # 2,370 against 1,980 SET/s with the default 30 µs (four interleaved pairs).
            poll_us=0,
            # 200 µs unless configured: with the leader waking only one follower per entry (the
            # other takes entries in batches), 2,644-3,129 against 2,283-2,635 SET/s with three
            # nodes on two cores; before that, polling lost (bench/NOTES.md)
            spin_us=self.cluster.spin_us,
            thrifty=True,
        )
        self.replica = Replica(cfg, self._on_commit, self._on_role_change,
                               on_failure=self._on_log_failure)
        self.inputs = LeaderInputs(self.replica, self.own, self.checker, self.metrics,
                                   self.listen_fds, self._release_held)
        self.replica.start()
        threading.Thread(target=self._digest_loop, name="digests", daemon=True).start()

    def shutdown(self) -> None:
        """A follower leaves its server running; a leader steps down first and its server, which
        holds its own clients' connections, leaves the service with it (PTRACE_O_EXITKILL), as
        does the server of a former leader whose held inputs the log has not decided yet."""
        self.replayer.abandon()
        with self._handover_lock:  # one asked for by `supervise handover` finishes first
            if self.leading and self.replica is not None and self.replica.failed is None:
                self._stepping_down = True
                handed = self.replica.step_down(timeout=2.0)
                log.info("stepping down: %s", "another node leads" if handed else "no majority to hand to")
        if self.replica is not None:
            self.replica.close()
        self.vip.drop()
        if (self.leading or self.own.unsettled) and self.server_pid:
            log.warning("leader leaving: its server (pid %d) leaves the service with it", self.server_pid)
            try:
                os.kill(self.server_pid, 9)
            except ProcessLookupError:
                pass
        if self.tracer is not None:
            self.tracer.detach()
        self.replayer.close()

    def hand_over(self, to: str | None, ballot: int) -> str:
        """`supervise handover`: hand leadership to ``to`` (or the best peer) and follow the
        log, the server kept; the successor's name, or HandoverError. ``ballot`` is the one the
        request saw this node lead at: a request from before a change of leadership is void."""
        with self._handover_lock:
            if not self.leading or self.replica is None or self._stepping_down:
                raise HandoverError(f"{self.me.name} does not lead (its leader: "
                                    f"{self.replica.leader if self.replica else None})")
            if ballot != self.replica.ballot:
                raise HandoverError(f"the request was for ballot {ballot}; {self.me.name} leads at "
                                    f"ballot {self.replica.ballot} now: ask again")
            peers = [n.name for n in self.cluster.nodes if n is not self.me]
            if to is not None and to not in peers:
                raise HandoverError(f"{to!r} is not a peer of {self.me.name} (peers: {', '.join(peers)})")
            ready = [p for p, st in self.replica.peer_status().items() if st["ready"]]
            if not ready or (to is not None and to not in ready):
                who = f"{to} is not" if to else "no peer is"
                raise HandoverError(
                    f"{who} ready to lead (unreachable, withdrawn since its copy diverged, or far "
                    f"behind in applying the log); {self.me.name} leads on (ready: "
                    f"{', '.join(ready) or 'none'}; see `supervise status`)")
            log.info("handing leadership to %s, as asked", to or "the peer best placed to lead")
            holding_outputs = self.tracer is not None and self.tracer.mode is Mode.HOLD_OUTPUT
            if holding_outputs:
                self._hold_inputs_until_logged()
            if not self.replica.step_down(timeout=HANDOVER_TIMEOUT_S, to=to):
                if holding_outputs and self.leading:
                    self.tracer.set_mode(Mode.HOLD_OUTPUT, resume_outputs_held=True)
                who = f"{to} could not" if to else "no peer could"
                raise HandoverError(f"{who} take over within {HANDOVER_TIMEOUT_S:.0f} s (unreachable, "
                                    f"or not caught up): {self.me.name} leads on")
            return self.replica.successor or "?"

    def _hold_inputs_until_logged(self, timeout: float = HANDOVER_TIMEOUT_S) -> None:
        """A leader holding outputs lets its server run inputs before they commit; one whose
        leadership ends before the log took them must leave (status 3). Before a hand-over it
        holds inputs instead, and waits until what the server ran is committed."""
        assert self.tracer is not None
        self.tracer.set_mode(Mode.GATE)
        deadline = time.monotonic() + timeout
        time.sleep(0.02)  # the tracer thread reports what was read before the switch
        while self.own.executed_unlogged() and time.monotonic() < deadline:
            time.sleep(0.005)

    # ---- status -------------------------------------------------------------------------------

    def status(self) -> dict:
        r = self.replica if self.replica is not None and hasattr(self.replica, "core") else None
        return {
            "node": self.me.name,
            "role": r.role if r else "starting",
            "leader": r.leader if r else None,
            "ballot": r.ballot if r else 0,
            "committed": r.commit_index if r else 0,
            "applied": r.applied_index if r else 0,
            "durable": r.durable_index if r else 0,
            "log_bytes": r.store.size_bytes if r else 0,
            "log_disk_free_bytes": r.store.free_bytes() if r else None,
            "diverged": self.divergence.diverged,
            "diverged_reason": self.divergence.reason,
            "gating": self.leading,
            "server_pid": self.server_pid,
            "server": self.me.server,
            "stray_connections": self.stray,
            "stray_input_bytes": self.stray_input,
            "defers_candidacy": r.deferring if r else False,
            "escapes": self.tracer.stats.escapes if self.tracer else 0,
            "serial_timeouts": self._serial_timeouts(),
            "held": self.tracer.threads_held if self.tracer else 0,
            "holding": self._holding(),
            "inputs": self.tracer.stats.inputs if self.tracer else 0,
            "output_stops": self.tracer.stats.output_stops if self.tracer else 0,
            "lost_events": self._lost_events(),
            "peers": r.peer_status() if r else {},
        }

    def _holding(self) -> str | None:
        """What a gating leader holds until commit: "inputs" or "outputs"; None otherwise."""
        if self.tracer is None or not self.leading:
            return None
        return "outputs" if self.tracer.mode is Mode.HOLD_OUTPUT else "inputs"

    # ---- consensus callbacks (delivery thread) ------------------------------------------------

    def _on_commit(self, index: int, payload: bytes) -> None:
        try:
            entry = decode(payload)
        except EntryError as exc:
            log.error("entry %d is not a supervisor entry (%s): skipped", index, exc)
            return
        if self.own.ends_leadership(entry):
            self._settle()
        if entry.kind is Kind.BARRIER:
            if self._barrier is not None and self._barrier[0] == entry.data:
                self._barrier[1].set()
            return
        try:
            if self.own.delivered(payload, entry):
                if entry.kind is Kind.CLOSE:
                    self.checker.forget(entry.cid)
                return  # input of this node's own clients: its server consumed it when it committed
        except LostInput as exc:
            if self._stepping_down:
                return  # the next leader closes this leader's connections; its server leaves with it
            log.error("%s: this copy no longer matches the log and leaves the service; restart the "
                      "node with a fresh server to rejoin", exc)
            self.exit_code = LOST_LEADERSHIP_EXIT
            self.fatal.set()
            return
        if self.divergence.diverged:
            return
        if entry.kind is Kind.DIGEST:
            self.checker.expect(entry.cid, entry.offset, entry.crc)
            self.divergence.check()
            return
        assert self.replica is not None
        catching_up = self.replica.commit_index - index >= CATCH_UP_BACKLOG
        if self.tracer is not None:
            self.tracer.set_batched_wakeups(catching_up)
        if entry.kind is Kind.DATA:
            self.checker.input(entry.cid, entry.data)
        self.replayer.apply(entry, catching_up=catching_up)
        if entry.kind is Kind.CLOSE:  # the replayer saw the server's last output of it
            self.checker.forget(entry.cid)
            self.divergence.check()
        self.metrics.replayed.inc()
        if entry.kind is Kind.DATA:
            self.metrics.input_bytes.inc(len(entry.data))

    # ---- tracer callbacks (tracer thread) -----------------------------------------------------

    def _on_event(self, ev: SocketEvent) -> None:
        if not self._hinted and ev.input and ev.ret > 0 and ev.call in READS:
            self._hint_serialize(ev)
        if self.leading or (self._opening and ev.gated):
            own = self.own.by_conn.get(ev.conn)
            if (own is not None and not own.closing) or ev.call in ACCEPTS:
                self.inputs.on_event(ev, own, self.epoch)
                return
        elif self.own.on_event(ev):
            return
        replayed = self.replayer.on_server_event(ev)
        if ev.gated:
            if ev.call in READS and ev.ret > 0 and not replayed:
                # a client connected to this copy directly: its input is not in the log, so
                # the server must never see it
                log.warning("refused %d input bytes on connection %d, which is not in the log; the "
                            "server drops it", ev.ret, ev.conn)
                self.tracer.refuse(ev)
            elif ev.call in ACCEPTS and ev.fd in self.listen_fds and not replayed:
                self._refuse_held(ev, errno.EAGAIN)  # gating, not leading: the log has no CONNECT
            else:
                self.tracer.release(ev)

    def _hint_serialize(self, ev: SocketEvent) -> None:
        """Say once that a second thread of a process reads client input (see tracer/serial.py)."""
        first = self._readers.setdefault(ev.pid, ev.tid)
        if first != ev.tid:
            self._hinted = True
            log.warning("threads %d and %d of pid %d both read client input: if they share what "
                        "they serve (as memcached's workers do), the copies can diverge; set "
                        "serialize = true in [cluster] (README, Limitations)", first, ev.tid, ev.pid)

    def _on_event_batch(self) -> None:
        """The inputs of a batch were proposed one by one, deferred: append them as one."""
        if self.replica is not None:
            self.replica.flush()

    def _release_held(self, ev: SocketEvent) -> None:
        assert self.tracer is not None
        self.tracer.release(ev)

    def _refuse_held(self, ev: SocketEvent, error: int) -> None:
        assert self.tracer is not None
        if ev.call in READS:
            log.info("refused %d input bytes on connection %d: the log did not take them", ev.ret,
                     ev.conn)
        elif ev.call in ACCEPTS:
            log.info("refused client %s (connection %d): the log does not hold its connection",
                     ev.peer or "?", ev.conn)
            shut_down_socket(self.server_pid, ev.ret)  # ends it even if the tracer cannot close it
        self.tracer.refuse(ev, error)

    def _on_replay_output(self, cid: tuple[int, int], data: bytes, length: int) -> None:
        self.checker.output(cid, data, length)
        self.metrics.output_bytes.inc(length)
        self.divergence.check()

    def _on_stray(self, ev: SocketEvent) -> None:
        if ev.call in READS:
            if not self.leading and not ev.gated:  # a leader refuses such input (_on_event)
                self.stray_input += ev.ret
                if ev.conn not in self._stray_inputs_seen:
                    self._stray_inputs_seen.add(ev.conn)
                    log.warning("the server read %d bytes on connection %d (%s), which is not in the log: "
                                "this copy no longer matches the log", ev.ret, ev.conn, ev.peer or "?")
                    self._defer_candidacy()
            return
        if ev.fd not in self.listen_fds:
            return
        self.stray += 1
        self.metrics.stray.inc()
        log.warning("stray client %s connected to this follower's server directly (connection %d); "
                    "clients must use the leader", ev.peer, ev.conn)
        self._defer_candidacy()

    def _on_escape(self, ev: SocketEvent) -> None:
        self.metrics.escapes.inc()
        if ev.refused:  # input the log will never hold reached the server
            log.error("refused input reached the server on connection %d: this copy no longer "
                      "matches the log and leaves the service; restart the node with a fresh "
                      "server to rejoin", ev.conn)
            self.exit_code = LOST_LEADERSHIP_EXIT
            self.fatal.set()

    def _on_log_failure(self, error: LogWriteError) -> None:
        log.error("%s: this node leaves the service (as if it had crashed); make room there or "
                  "mend the disk, then restart the node with a fresh server: its log is kept", error)
        self.exit_code = LOG_FAILED_EXIT
        self.fatal.set()

    def _on_server_exit(self, status: int | None) -> None:
        log.error("the server (pid %d) exited with status %s", self.server_pid, status)
        self.replayer.abandon()
        self.exit_code = 1
        self.fatal.set()

    # ---- output checking ----------------------------------------------------------------------

    def _lost_events(self) -> int:
        return self.tracer.lost_events if self.tracer else 0

    def _serial_timeouts(self) -> int:
        """Inputs let go (leader) or sent (follower) before the thread with the last one had
        finished with it (tracer/serial.py)."""
        return (self.tracer.stats.serial_timeouts if self.tracer else 0) + self.replayer.serial_timeouts

    def _report_lost_events(self) -> None:
        lost = self._lost_events()
        if lost > self._lost_reported:
            log.error("the tracer lost %d socket events (%d in all): its ring buffer was full, so "
                      "this node's output checks and replay order can no longer be trusted; restart "
                      "the node with a fresh server", lost - self._lost_reported, lost)
            self._lost_reported = lost

    def _digest_loop(self) -> None:
        while not self.fatal.wait(DIGEST_INTERVAL):
            self._report_lost_events()
            if self.leading and self.inputs is not None:
                self.inputs.propose_digests(self.epoch)
