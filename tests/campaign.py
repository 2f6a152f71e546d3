"""A Jepsen-style fault campaign against supervised Redis (or memcached) on three namespace hosts
(tcp transport).

    .venv/bin/python -m tests.campaign --seed 7 --duration 120 [--clients 12] [--keys 5]
        [--server memcached]

Clients on a fourth host use only the VIP. Each does reads (GET), writes (SET of a value unique
to the campaign) and compare-and-set (a Lua script via EVAL; memcached: tests/stores.py)
on a handful of keys, with a socket timeout; every operation's invocation and completion times,
arguments and result are recorded. A timeout or a connection error after the request was sent
makes the operation indeterminate (Jepsen's "info"); a refused connection or an error reply means
it did not happen.

Faults (tests/campaign_faults.py) follow a schedule drawn from the seed: kill -9 of the leader's
or a follower's supervisor, server or both (then a restart with a fresh server on the same data
directory), partition of the leader's or a follower's host (link down, then up), a supervisor
paused with SIGSTOP for longer than the election timeout (then SIGCONT). A node whose supervisor exited
(1 after its server died; 3 when its copy could not be kept after it lost leadership) is
restarted with a fresh server. A node's transport can be made flaky for a while (its requests
dropped, delayed and duplicated, through the failpoints file that ``SUPERVISE_FAILPOINTS`` names:
supervise/failpoints.py); this kernel has no netem. With ``--power-cuts`` every data_dir is on a
disk that keeps only what was synced (tests/power_cut_fs.py), and a host can lose power: its
supervisor and server killed, its disk left with what fsync made durable.

A tenth of the operations instead add an element unique to the campaign to one set (SADD;
memcached: an append to one key). At
the end every fault is healed, the clients stop, each key and the set are read once more through
the VIP, every node must have applied everything without diverging and hold the same values, and
the history is checked for linearizability per key (tests/linearizability.py). An acknowledged
write lost on a key is caught there only if a later read can tell, which on keys that every
client writes is rare; the set tells directly: every acknowledged add must be in it, and nothing
that was never sent (Jepsen's set workload).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from .campaign_faults import Faults
from .campaign_report import summarize
from .linearizability import CAS, INFO, OK, READ, WRITE, Op, Verdict, check
from .netns import enter_netns
from .netns_cluster import SERVER_PORT, NetnsCluster
from .stores import STORES

INIT = "init"
ADD_SHARE = 0.1


@dataclass
class Campaign(Faults):
    seed: int
    duration: float
    clients: int = 12
    keys: int = 5
    timeout: float = 2.0
    election_timeout_ms: int = 300
    check_seconds: float = 120.0
    clear_stale_vip: bool = False
    logs_dir: str | None = None
    hold: str = "inputs"
    server: str = "redis"
    power_cuts: bool = False
    log: Any = None
    history: list[Op] = field(default_factory=list)
    failed: Counter = field(default_factory=Counter)
    faults: list[dict] = field(default_factory=list)
    leaders: list[dict] = field(default_factory=list)
    anomalies: list[str] = field(default_factory=list)
    exits: list[dict] = field(default_factory=list)
    stale_vips: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    adds: dict[str, str] = field(default_factory=dict)  # element -> OK or INFO
    final_set: set[str] | None = None

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)  # the schedule: kinds, gaps, holds, what to kill
        self.pick_rng = random.Random(self.seed + 1)  # which follower
        self._deck: list[str] = []
        self._filled: set[str] = set()  # nodes whose disk filled or lost power since their last restart
        self.key_names = [f"k{i}" for i in range(self.keys)]
        self._ids = itertools.count()
        self._stop_clients = threading.Event()
        self._stop_monitor = threading.Event()
        self.t0 = time.monotonic()
        self.store = STORES[self.server](SERVER_PORT, self.timeout)

    def say(self, msg: str) -> None:
        line = f"[{time.monotonic() - self.t0:7.2f}] {msg}"
        print(line, file=self.log or sys.stdout, flush=True)

    # ---- clients --------------------------------------------------------------------------------

    def _invoke(self, client: int, key: str, kind: str, arg: Any,
                request: Callable[[], Any]) -> tuple[bool, Op | None]:
        """One recorded operation (None if it did not happen); False when the connection is no
        longer usable. ``request()`` returns the result: a read's value, a CAS's success."""
        call = time.monotonic()
        try:
            result = request()
        except self.store.lost:
            op = Op(next(self._ids), client, key, kind, arg, call, None, None, INFO)
            self.history.append(op)
            return False, op
        except self.store.refused as exc:
            self.failed[f"{kind}: {str(exc)[:40]}"] += 1
            return True, None
        op = Op(next(self._ids), client, key, kind, arg, call, time.monotonic(),
                result if kind != WRITE else None, OK)
        self.history.append(op)
        return True, op

    def _add(self, conn: Any, element: str) -> bool:
        """One add of the set workload; False when the connection is no longer usable."""
        try:
            self.store.add(conn, element)
        except self.store.lost:
            self.adds[element] = INFO
            return False
        except self.store.refused as exc:
            self.failed[f"add: {str(exc)[:40]}"] += 1
            return True
        self.adds[element] = OK
        return True

    def _client(self, index: int, cluster: NetnsCluster) -> None:
        enter_netns(cluster.client_ns)
        rng = random.Random(self.seed * 1000 + index)
        seen: dict[str, str] = {}
        store = self.store
        conn: Any = None
        for seq in itertools.count():
            if self._stop_clients.is_set():
                break
            if conn is None:
                try:
                    conn = store.connect(cluster.service_addr)
                except store.lost:
                    self.failed["connect"] += 1
                    conn = None
                    time.sleep(0.1)
                    continue
            key = rng.choice(self.key_names)
            r = rng.random()
            value = f"c{index}.{seq}"
            if rng.random() < ADD_SHARE:
                alive = self._add(conn, value)
                last = None
            elif r < 0.4:
                alive, last = self._invoke(index, key, READ, None, partial(store.get, conn, key))
            elif r < 0.7:
                alive, last = self._invoke(index, key, WRITE, value,
                                           partial(store.set, conn, key, value))
            else:
                expected = seen.get(key, INIT)
                alive, last = self._invoke(index, key, CAS, (expected, value),
                                           partial(store.cas, conn, key, expected, value))
            if last is not None and last.status == OK:
                if last.kind == READ and last.result is not None:
                    seen[key] = last.result
                elif last.kind == WRITE or (last.kind == CAS and last.result):
                    seen[key] = value
            if not alive:
                store.close(conn)
                conn = None
                time.sleep(0.05)
            time.sleep(rng.uniform(0, 0.01))
        if conn is not None:
            store.close(conn)

    # ---- monitor ----------------------------------------------------------------------------------

    def _monitor(self, cluster: NetnsCluster) -> None:
        try:
            self._monitor_loop(cluster)
        except Exception as exc:  # noqa: BLE001 - said, not silently lost
            self.warnings.append(f"the monitor stopped: {exc!r}")
            self.say(f"WARNING the monitor stopped: {exc!r}")

    def _monitor_loop(self, cluster: NetnsCluster) -> None:
        current: tuple[str, int] | None = None
        multi_vip = False
        holders_seen: tuple[list[str], str | None] | None = None
        shown = 0.0  # when the nodes' progress was last said while there was no leader
        while not self._stop_monitor.wait(0.25):
            best = None
            docs = {}
            for node in cluster.nodes:
                doc = docs[node.name] = cluster.status(node, timeout=0.5)
                if doc and doc["role"] == "leader" and doc["gating"] and not node.partitioned:
                    if best is None or doc["ballot"] > best[1]:
                        best = (node.name, doc["ballot"])
                if doc and doc["diverged"]:
                    msg = f"{node.name} diverged: {doc['diverged_reason']}"
                    if msg not in self.anomalies:
                        self.anomalies.append(msg)
                        self.say("ANOMALY " + msg)
                if doc and doc.get("lost_events"):
                    msg = f"{node.name}'s tracer lost socket events (its server pid {doc['server_pid']})"
                    if msg not in self.warnings:
                        self.warnings.append(msg)
                        self.say("WARNING " + msg)
            if best is None and current is not None:
                current = None
                self.leaders.append({"t": round(time.monotonic() - self.t0, 3), "leader": None,
                                     "ballot": None})
                self.say("no gating leader")
            if best is None and time.monotonic() - shown >= 1.0:
                shown = time.monotonic()  # why nobody stands: a lagging copy waits (election.py)
                self.say("  nodes: " + ", ".join(
                    f"{name} {doc['role']} committed {doc['committed']} applied {doc['applied']}"
                    if doc else f"{name} unreachable" for name, doc in docs.items()))
            if best is not None and best != current:
                current = best
                self.leaders.append({"t": round(time.monotonic() - self.t0, 3), "leader": best[0],
                                     "ballot": best[1]})
                self.say(f"leader {best[0]} (ballot {best[1]})")
            try:
                holders = cluster.vip_holders_netlink()
                arp = cluster.vip_arp_owner()
            except Exception:  # noqa: BLE001 - a netlink hiccup: ask again next round
                continue
            if (holders, arp) != holders_seen:
                holders_seen = (holders, arp)
                self.say(f"VIP on {holders or 'no host'}; the client host sends VIP traffic to {arp}")
            if len(holders) > 1 and not multi_vip:
                msg = f"t={time.monotonic() - self.t0:.1f}: VIP held by {len(holders)} hosts: {holders}"
                self.warnings.append(msg)
                self.say("WARNING " + msg)
            multi_vip = len(holders) > 1

    # ---- the run ----------------------------------------------------------------------------------

    def run(self) -> dict:
        with NetnsCluster(vip=True, election_timeout_ms=self.election_timeout_ms,
                          launch_restarts=True, hold=self.hold, server=self.server,
                          serialize=self.store.serialize, power_cuts=self.power_cuts) as cluster:
            try:
                return self._run(cluster)
            except BaseException:
                self.say("campaign failed; supervisor logs:\n" + cluster.logs())
                raise
            finally:
                if self.logs_dir:
                    cluster.save_logs(self.logs_dir)

    def _run(self, cluster: NetnsCluster) -> dict:
        self.say(f"seed {self.seed}, {self.duration:.0f}s, {self.clients} clients of {self.server}, "
                 f"keys {self.key_names}, leaders hold {self.hold}")
        leader = cluster.start(timeout=90)
        self.say(f"cluster up, leader {leader.name}; workdir {cluster.workdir}")

        def start_keys() -> None:
            conn = self.store.connect(cluster.service_addr)
            try:
                self.store.start_set(conn)
                for key in self.key_names:
                    call = time.monotonic()
                    self.store.set(conn, key, INIT)
                    self.history.append(Op(next(self._ids), -1, key, WRITE, INIT, call,
                                           time.monotonic()))
            finally:
                self.store.close(conn)

        cluster.in_client_ns(start_keys)
        monitor = threading.Thread(target=self._monitor, args=(cluster,), daemon=True)
        monitor.start()
        clients = [threading.Thread(target=self._client, args=(i, cluster), daemon=True)
                   for i in range(self.clients)]
        for c in clients:
            c.start()
        started = time.monotonic()
        try:
            self._faults(cluster, started + self.duration)
        finally:
            self.say("healing everything")
            for node in cluster.nodes:
                if node.partitioned:
                    cluster.heal(node)
                if node.paused:
                    cluster.resume(node)
        for attempt in range(3):
            time.sleep(1.0)
            self._repair(cluster)
            try:
                cluster.wait_leader(timeout=30)
                break
            except TimeoutError:
                self.warnings.append(f"no leader 30s after healing (attempt {attempt + 1})")
        time.sleep(3.0)  # the clients go on against the healed group
        self._stop_clients.set()
        for c in clients:
            c.join(self.timeout + 10)
        for key in self.key_names:  # one last read of each key: the last acknowledged writes

            def final_read(key: str = key) -> bool | None:
                conn = self.store.connect(cluster.service_addr)
                try:
                    alive, op = self._invoke(-2, key, READ, None, lambda: self.store.get(conn, key))
                    return True if op is not None and op.status == OK else None
                finally:
                    self.store.close(conn)

            if self._through_vip(cluster, final_read) is None:
                self.anomalies.append(f"final read of {key} through the VIP failed")
        self._check_adds(cluster)
        self._stop_monitor.set()
        monitor.join(10)
        return self._finish(cluster)

    def _through_vip(self, cluster: NetnsCluster, call: Callable[[], Any], tries: int = 10) -> Any:
        """``call()`` from the clients' host, once a second until it returns something other than
        None without a connection error; None if it never did."""
        for _ in range(tries):
            try:
                result = cluster.in_client_ns(call)
            except self.store.lost:
                result = None
            if result is not None:
                return result
            time.sleep(1)
        return None

    def _check_adds(self, cluster: NetnsCluster) -> None:
        """Read the set through the VIP: every acknowledged add must be in it, and nothing else
        but adds whose outcome is unknown."""

        def members() -> set[str]:
            conn = self.store.connect(cluster.service_addr)
            try:
                return self.store.members(conn)
            finally:
                self.store.close(conn)

        self.final_set = self._through_vip(cluster, members)
        if self.final_set is None:
            self.anomalies.append("final read of the set through the VIP failed")
            return
        lost = sorted(e for e, status in self.adds.items() if status == OK and e not in self.final_set)
        unknown = sorted(self.final_set - self.adds.keys())
        if lost:
            self.anomalies.append(f"{len(lost)} acknowledged adds missing from the set, e.g. {lost[:5]}")
        if unknown:
            self.anomalies.append(f"{len(unknown)} elements in the set that no client added, "
                                  f"e.g. {unknown[:5]}")

    def _finish(self, cluster: NetnsCluster) -> dict:
        convergence: dict[str, Any] = {}
        try:
            for attempt in range(3):
                self._repair(cluster)  # a supervisor that failed to start is started again
                try:
                    convergence["applied"] = cluster.wait_applied(timeout=60)
                    break
                except TimeoutError:
                    if attempt == 2:
                        raise
                    self.say("the nodes have not converged yet; repairing and waiting again")
            snaps = self._snapshots(cluster)
            docs = cluster.statuses()  # after the reads: they must not make a copy diverge
            convergence["diverged"] = sorted(n for n, d in docs.items() if d and d["diverged"])
            values = {name: {k: (v.decode() if v is not None else None) for k, v in snap.items()}
                      for name, snap in snaps.items()}
            convergence["values"] = values
            convergence["same"] = len({json.dumps(v, sort_keys=True) for v in values.values()}) == 1
        except TimeoutError as exc:
            convergence["error"] = str(exc)
            convergence["same"] = False
        self.say(f"convergence: {json.dumps(convergence)}")
        self.say(f"checking {len(self.history)} operations")
        t = time.monotonic()
        relative = [replace(op, call=op.call - self.t0, ret=None if op.ret is None else op.ret - self.t0)
                    for op in self.history]
        verdicts = check(relative, init=None, max_seconds=self.check_seconds,
                         slice_seconds=min(60.0, self.check_seconds))
        check_seconds = time.monotonic() - t
        return self._summary(verdicts, convergence, check_seconds)

    def _snapshots(self, cluster: NetnsCluster) -> dict[str, dict]:
        """Every copy's keys, the leader's first. A direct read of a follower's copy is a stray
        client there: Redis numbers it, so a replicated connection replayed after it would get
        another client id in its HELLO reply than on the leader, and the follower would rightly
        report divergence. The leader's read is replicated, so every copy replays it before any
        follower is read."""
        leader = cluster.leader()
        snaps = {}
        for node in sorted(cluster.nodes, key=lambda n: n is not leader):
            snaps[node.name] = cluster.snapshot(node, self.key_names)
            if node is leader:
                cluster.wait_applied(timeout=60)
        return snaps

    def _summary(self, verdicts: dict[str, Verdict], convergence: dict, check_seconds: float) -> dict:
        out, lines = summarize(self, verdicts, convergence, check_seconds)
        self.say("\n".join(lines))
        return out


def _exit_on_sigterm(main_pid: int):
    """SIGTERM unwinds like Ctrl-C, so that the cluster, its namespaces and workdir are removed.
    A child forked without exec (pyroute2 forks one per namespace and ends it with SIGTERM)
    inherits the handler: it must exit at once, never unwind its copy of this process."""

    def handler(signum: int, _frame: object) -> None:
        if os.getpid() != main_pid:
            os._exit(128 + signum)
        sys.exit(128 + signum)

    return handler


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.campaign", description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of faults")
    p.add_argument("--clients", type=int, default=12)
    p.add_argument("--keys", type=int, default=5)
    p.add_argument("--timeout", type=float, default=2.0, help="client socket timeout (s)")
    p.add_argument("--check-seconds", type=float, default=300.0, help="checker budget per key (s)")
    p.add_argument("--json", help="write the summary here as JSON")
    p.add_argument("--clear-stale-vip", action="store_true",
                   help="remove a VIP left by a killed supervisor before restarting its node (a "
                        "workaround for supervise versions that do not do it themselves)")
    p.add_argument("--logs", help="copy the supervisors' logs to this directory")
    p.add_argument("--history", help="write every operation here (JSON Lines, times from the start)")
    p.add_argument("--hold", choices=("inputs", "outputs"), default="inputs",
                   help="what leaders hold until its commit (cluster.hold)")
    p.add_argument("--server", choices=sorted(STORES), default="redis",
                   help="the replicated server (memcached: four worker threads, serialized)")
    p.add_argument("--power-cuts", action="store_true",
                   help="data_dirs on disks that keep only what was synced, and power-leader / "
                        "power-follower faults (tests/power_cut_fs.py)")
    args = p.parse_args(argv)
    if STORES[args.server].serialize and args.hold == "outputs":
        p.error(f"--server {args.server} is served serialized, which holding outputs cannot be "
                "(cluster.serialize needs hold = \"inputs\"): drop --hold outputs")
    from tracer.signalfd import block_sigchld

    block_sigchld()
    signal.signal(signal.SIGTERM, _exit_on_sigterm(os.getpid()))
    campaign = Campaign(seed=args.seed, duration=args.duration, clients=args.clients, keys=args.keys,
                        timeout=args.timeout, check_seconds=args.check_seconds,
                        clear_stale_vip=args.clear_stale_vip, logs_dir=args.logs, hold=args.hold,
                        server=args.server, power_cuts=args.power_cuts)
    summary = campaign.run()
    if args.history:
        with open(args.history, "w") as f:
            for op in sorted(campaign.history, key=lambda o: o.call):
                f.write(json.dumps({"id": op.id, "client": op.client, "key": op.key, "kind": op.kind,
                                    "arg": op.arg, "call": round(op.call - campaign.t0, 6),
                                    "ret": None if op.ret is None else round(op.ret - campaign.t0, 6),
                                    "result": op.result, "status": op.status}) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
