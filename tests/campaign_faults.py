"""The campaign's faults, as methods mixed into Campaign (tests/campaign.py): a schedule drawn
from the seed, one fault at a time (kill -9, partition, a partial or one-way partition, SIGSTOP,
a flaky transport, a full disk, a hand-over, and with --power-cuts a power cut) on the leader or
on a follower, each healed after its hold, and every node whose supervisor or server died
restarted with a fresh server on the same data directory.
"""

from __future__ import annotations

import json
import subprocess
import time

from .netns_cluster import NetnsCluster, NetnsNode

FAULT_KINDS = ("kill-leader", "kill-follower", "partition-leader", "partition-follower",
               "pause-leader", "pause-follower", "flaky-leader", "flaky-follower",
               "fill-leader", "fill-follower", "split-leader", "deaf-leader", "deaf-follower",
               "handover-leader")
POWER_CUT_KINDS = ("power-leader", "power-follower")  # with --power-cuts
LOG_FAILED_EXIT = 4  # supervise's status for a log it cannot write


class Faults:
    """Mixed into Campaign; uses its seeded random streams, its clock and its records."""

    def _repair(self, cluster: NetnsCluster) -> None:
        """Restart (fresh server, same data directory) every node whose supervisor or server died."""
        for node in cluster.nodes:
            if node.paused or node.partitioned:
                continue
            if not node.supervisor_alive() or not node.server_alive():
                if node.supervisor_alive():  # its server died: it leaves by itself (status 1)
                    try:
                        node.supervisor.wait(10)
                    except subprocess.TimeoutExpired:
                        msg = (f"t={time.monotonic() - self.t0:.1f}: {node.name}: supervisor still running "
                               f"10s after its server died (killed and restarted)")
                        self.warnings.append(msg)
                        self.say("WARNING " + msg)
                code = node.supervisor.poll() if node.supervisor is not None else None
                if code is not None and code != -9:
                    self.exits.append({"t": round(time.monotonic() - self.t0, 3), "node": node.name,
                                       "status": code})
                    self.say(f"{node.name}: supervisor exited with status {code}")
                if code == LOG_FAILED_EXIT and node.name not in self._filled:
                    self.anomalies.append(f"{node.name} exited with status {code} (its log could "
                                          f"not be written) without a full disk")
                self._filled.discard(node.name)
                if cluster.restart(node, clear_stale_vip=self.clear_stale_vip):
                    self.stale_vips.append({"t": round(time.monotonic() - self.t0, 3), "node": node.name})
                    self.say(f"{node.name}: removed the VIP its killed supervisor left on eth0")
                self.say(f"{node.name}: restarted with a fresh server")

    def _pick(self, cluster: NetnsCluster, role: str) -> NetnsNode | None:
        leader = cluster.leader()
        if role == "leader":
            return leader
        others = [n for n in cluster.nodes  # a follower that is up (not still attaching)
                  if n is not leader and n.supervisor_alive()
                  and (cluster.status(n) or {}).get("role") == "follower"]
        return self.pick_rng.choice(others) if others else None

    def _fault(self, cluster: NetnsCluster, kind: str) -> None:
        action, role = kind.split("-")
        what = self.rng.choice(["supervisor", "server", "both"])
        pause = self.rng.uniform(0.5, 3.0)
        hold = self.rng.uniform(2.0, 6.0) if action in ("partition", "flaky", "fill", "split", "deaf") else \
            self.rng.uniform(3, 8) * self.election_timeout_ms / 1000
        network = {"drop": round(self.rng.uniform(0.02, 0.2), 3),
                   "delay": round(self.rng.uniform(0.001, 0.02), 4),
                   "duplicate": round(self.rng.uniform(0.02, 0.2), 3), "seed": self.rng.randrange(1 << 16)}
        node = self._pick(cluster, role)
        if node is None:
            self.say(f"{kind}: no {role} to pick; skipped")
            return
        record = {"t": round(time.monotonic() - self.t0, 3), "fault": kind, "node": node.name}
        if action == "kill":
            record["what"] = what
            self.say(f"FAULT kill -9 {what} of {role} {node.name}")
            cluster.kill(node, what)
            time.sleep(pause)
        elif action == "power":
            self.say(f"FAULT power cut of {role} {node.name}: of its data_dir only what was synced is left")
            self._filled.add(node.name)  # its disk fails its last calls: it may exit with status 4
            cluster.cut_power(node)
            time.sleep(pause)
        elif action == "partition":
            record["seconds"] = round(hold, 2)
            self.say(f"FAULT partition {role} {node.name} for {hold:.1f}s")
            cluster.partition(node)
            time.sleep(hold)
            cluster.heal(node)
            self.say(f"healed {node.name}")
        elif action == "split":
            peer = self.pick_rng.choice([n for n in cluster.nodes if n is not node])
            record.update(seconds=round(hold, 2), peer=peer.name)
            self.say(f"FAULT {role} {node.name} and {peer.name} cut from each other for {hold:.1f}s")
            cluster.cut_between(node, peer)
            time.sleep(hold)
            cluster.heal_paths()
            self.say(f"healed the path between {node.name} and {peer.name}")
        elif action == "deaf":
            record["seconds"] = round(hold, 2)
            self.say(f"FAULT {role} {node.name} hears no peer (they still hear it) for {hold:.1f}s")
            cluster.deafen(node)
            time.sleep(hold)
            cluster.heal_paths()
            self.say(f"{node.name} hears its peers again")
        elif action == "handover":
            self.say(f"FAULT supervise handover, {node.name} leading")
            result = cluster.handover()
            said = (result.stdout.strip() or result.stderr.strip()).splitlines()
            record.update(status=result.returncode, said=said[-1] if said else "")
            self.say(f"handover: exit {result.returncode}: {record['said']}")
        elif action == "flaky":
            record.update(seconds=round(hold, 2), **network)
            self.say(f"FAULT {role} {node.name}'s transport requests dropped, held and duplicated "
                     f"({json.dumps(network)}) for {hold:.1f}s")
            cluster.degrade(node, network)
            time.sleep(hold)
            cluster.restore(node)
            self.say(f"network of {node.name} restored")
        elif action == "fill":
            record["seconds"] = round(hold, 2)
            self.say(f"FAULT the disk of {role} {node.name}'s data_dir full for {hold:.1f}s")
            self._filled.add(node.name)
            cluster.fill_disk(node)
            time.sleep(hold)
            record["status"] = node.supervisor.poll() if node.supervisor is not None else None
            if record["status"] not in (None, LOG_FAILED_EXIT):
                self.say(f"{node.name}: supervisor exited with status {record['status']} on a full disk")
            cluster.clear_disk(node)
            self.say(f"room again on {node.name}'s disk")
        else:
            record["seconds"] = round(hold, 2)
            self.say(f"FAULT SIGSTOP supervisor of {role} {node.name} for {hold:.1f}s")
            cluster.pause(node)
            time.sleep(hold)
            cluster.resume(node)
            self.say(f"SIGCONT {node.name}")
        self.faults.append(record)
        time.sleep(0.5)
        self._repair(cluster)

    def _faults(self, cluster: NetnsCluster, until: float) -> None:
        while time.monotonic() < until:
            time.sleep(self.rng.uniform(1.0, 4.0))
            if time.monotonic() >= until:
                break
            try:
                cluster.wait_leader(timeout=30)
            except TimeoutError:
                self.warnings.append(f"no leader for 30s at t={time.monotonic() - self.t0:.1f}")
                self.say("WARNING no leader for 30s")
                self._repair(cluster)
                continue
            if not self._deck:  # every kind once per round, in a seeded order
                self._deck = list(FAULT_KINDS) + list(POWER_CUT_KINDS if self.power_cuts else ())
                self.rng.shuffle(self._deck)
            kind = self._deck.pop()
            try:
                self._fault(cluster, kind)
            except Exception as exc:  # noqa: BLE001 - recorded; the campaign goes on
                self.warnings.append(f"t={time.monotonic() - self.t0:.1f}: {kind} failed: {exc!r}")
                self.say(f"WARNING {kind} failed: {exc!r}")
