"""Prometheus metrics of a replica (prefix ``supervise_``), labelled by replica name.

Children are bound once per replica so the hot path is a plain ``inc``/``set``/``observe``.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

_LAT_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1,
                0.25, 0.5, 1.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
ROLES = ("leader", "follower", "candidate")
_families: dict[int, dict] = {}


def _family(registry: CollectorRegistry) -> dict:
    f = _families.get(id(registry))
    if f is None:
        r = registry
        f = {
            "role": Gauge("supervise_consensus_role", "1 for the replica's current role", ["replica", "role"],
                          registry=r),
            "ballot": Gauge("supervise_consensus_ballot", "Promised ballot", ["replica"], registry=r),
            "leader_changes": Counter("supervise_consensus_leader_changes", "Leaderships won",
                                      ["replica"], registry=r),
            "proposals": Counter("supervise_consensus_proposals", "Payloads proposed", ["replica"],
                                 registry=r),
            "commits": Counter("supervise_consensus_commits", "Entries delivered to the application",
                               ["replica"], registry=r),
            "batch": Histogram("supervise_consensus_batch_size", "Entries per replication write",
                               ["replica"], buckets=_BATCH_BUCKETS, registry=r),
            "latency": Histogram("supervise_consensus_commit_latency_seconds", "Propose to commit",
                                 ["replica"], buckets=_LAT_BUCKETS, registry=r),
            "commit_index": Gauge("supervise_consensus_commit_index", "Commit index", ["replica"],
                                  registry=r),
            "applied_index": Gauge("supervise_consensus_applied_index", "Applied index", ["replica"],
                                   registry=r),
            "durable_index": Gauge("supervise_consensus_durable_index", "Durable index", ["replica"],
                                   registry=r),
            "log_bytes": Gauge("supervise_consensus_log_bytes", "Bytes of the log's records",
                               ["replica"], registry=r),
            "disk_free": Gauge("supervise_consensus_log_disk_free_bytes",
                               "Bytes free to the log on its file system", ["replica"], registry=r),
            "lag": Gauge("supervise_consensus_replication_lag_entries", "Leader's view of a peer's lag",
                         ["replica", "peer"], registry=r),
            "reachable": Gauge("supervise_consensus_peer_reachable", "1 when the peer is connected",
                               ["replica", "peer"], registry=r),
        }
        _families[id(registry)] = f
    return f


class Metrics:
    def __init__(self, replica: str, peers: list[str], registry: CollectorRegistry = REGISTRY) -> None:
        f = _family(registry)
        self._roles = {r: f["role"].labels(replica, r) for r in ROLES}
        self._ballot = f["ballot"].labels(replica)
        self._leader_changes = f["leader_changes"].labels(replica)
        self.proposals = f["proposals"].labels(replica)
        self.commits = f["commits"].labels(replica)
        self.batch = f["batch"].labels(replica)
        self.latency = f["latency"].labels(replica)
        self.commit_index = f["commit_index"].labels(replica)
        self.applied_index = f["applied_index"].labels(replica)
        self.durable_index = f["durable_index"].labels(replica)
        self.log_bytes = f["log_bytes"].labels(replica)
        self.disk_free = f["disk_free"].labels(replica)
        self._lag = {p: f["lag"].labels(replica, p) for p in peers}
        self._reachable = {p: f["reachable"].labels(replica, p) for p in peers}

    def role(self, role: str, ballot: int, leader: str | None) -> None:
        for r, g in self._roles.items():
            g.set(1 if r == role else 0)
        self._ballot.set(ballot)

    def leader_change(self) -> None:
        self._leader_changes.inc()

    def lag(self, peer: str, entries: int) -> None:
        self._lag[peer].set(max(0, entries))

    def read_at_scrape(self, commit: Callable[[], int], applied: Callable[[], int],
                       durable: Callable[[], int], connected: Callable[[str], bool],
                       log_bytes: Callable[[], int], disk_free: Callable[[], int]) -> None:
        """The indices, the log's size and room, and peer reachability are read when scraped:
        always current, and nothing to keep up to date on the replica's own threads."""
        self.commit_index.set_function(commit)
        self.applied_index.set_function(applied)
        self.durable_index.set_function(durable)
        self.log_bytes.set_function(log_bytes)
        self.disk_free.set_function(disk_free)
        for peer, gauge in self._reachable.items():
            gauge.set_function(lambda peer=peer: 1 if connected(peer) else 0)
