"""Metrics of the supervisor itself (prefix ``supervise_``): gating, inputs, outputs, checks.

The families are made once per registry; a ``NodeMetrics`` binds its node's children once, so
the hot path is a plain ``inc``/``observe`` with no label lookup, and every series exists (at 0)
from the first scrape on. Gauges that describe the node's state right now (open connections,
threads held) are read when scraped, so they cost nothing between scrapes.

Counters are declared without ``_total``: prometheus_client appends it (``supervise_escapes`` is
exposed as ``supervise_escapes_total``). The full list of names is in ``dashboards/README.md``.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

# 10 µs to 1 s, as for the consensus commit latency: a held syscall waits for one commit.
HOLD_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2,
                0.1, 0.25, 0.5, 1.0)
# The input syscalls the tracer gates (tracer.events ACCEPTS | READS): bound at start so that
# their series exist before the first input.
GATED_CALLS = ("accept", "accept4", "read", "readv", "recvfrom", "recvmsg")

_families: dict[int, dict] = {}


def _family(registry: CollectorRegistry) -> dict:
    f = _families.get(id(registry))
    if f is not None:
        return f
    r = registry

    def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
        return Counter(name, doc, ["node", *labels], registry=r)

    def gauge(name: str, doc: str) -> Gauge:
        return Gauge(name, doc, ["node"], registry=r)

    f = {
        "held": counter("supervise_held_syscalls", "Input syscalls held until committed, then released",
                        ("call",)),
        "hold_seconds": Histogram("supervise_hold_seconds",
                                  "Time from an input syscall's return in the kernel to its release",
                                  ["node", "call"], buckets=HOLD_BUCKETS, registry=r),
        "held_now": gauge("supervise_held_threads", "Server threads held right now, waiting for a commit"),
        "input_bytes": counter("supervise_input_bytes",
                               "Input bytes proposed (leader) or replayed (follower)"),
        "output_bytes": counter("supervise_output_bytes", "Bytes the server wrote to its clients"),
        "escapes": counter("supervise_escapes", "Held inputs whose thread ran on without stopping"),
        "lost_events": gauge("supervise_tracer_lost_events",
                             "Socket events the probes dropped because the tracer's ring buffer was full"),
        "serial_timeouts": gauge("supervise_serial_timeouts",
                                 "Serializing: inputs that went on before the thread with the one "
                                 "before had finished with it"),
        "stray": counter("supervise_stray_connections",
                         "Clients that connected to a follower's server directly"),
        "digest_checks": counter("supervise_digest_checks", "Output digests compared with the leader's"),
        "divergences": counter("supervise_divergences", "Output digests that differed from the leader's"),
        "digests_unverifiable": counter(
            "supervise_digests_unverifiable",
            "Leader digests this node could not compare: its copy's writes ended elsewhere, or were "
            "captured only in part"),
        "replayed": counter("supervise_replayed_entries", "Log entries applied to this node's server"),
        "diverged": gauge("supervise_diverged", "1 when this node's server diverged and left the service"),
        "deferred": gauge("supervise_candidacy_deferred",
                          "1 once a stray client reached this node's server: the node stands for "
                          "election only when no other does"),
        "leader": gauge("supervise_is_leader", "1 while this node gates its server's clients"),
        "open_connections": gauge("supervise_open_connections",
                                  "Replicated client connections open on this node's server"),
        "cluster_nodes": gauge("supervise_cluster_nodes", "Nodes in the cluster file"),
    }
    _families[id(registry)] = f
    return f


class NodeMetrics:
    """The children of one node, bound once: ``metrics.output_bytes.inc(n)``."""

    def __init__(self, node: str, registry: CollectorRegistry = REGISTRY) -> None:
        # A node's process exposes no ``*_created`` series: they would double the counters'
        # series and no dashboard or alert here uses them.
        disable_created_metrics()
        f = _family(registry)
        self.node = node
        self._held = f["held"]
        self._hold_seconds = f["hold_seconds"]
        self.held_now = f["held_now"].labels(node)
        self.input_bytes = f["input_bytes"].labels(node)
        self.output_bytes = f["output_bytes"].labels(node)
        self.escapes = f["escapes"].labels(node)
        self.lost_events = f["lost_events"].labels(node)
        self.serial_timeouts = f["serial_timeouts"].labels(node)
        self.stray = f["stray"].labels(node)
        self.digest_checks = f["digest_checks"].labels(node)
        self.divergences = f["divergences"].labels(node)
        self.digests_unverifiable = f["digests_unverifiable"].labels(node)
        self.replayed = f["replayed"].labels(node)
        self.diverged = f["diverged"].labels(node)
        self.deferred = f["deferred"].labels(node)
        self.leader = f["leader"].labels(node)
        self.open_connections = f["open_connections"].labels(node)
        self.cluster_nodes = f["cluster_nodes"].labels(node)
        self.by_call: dict[str, tuple] = {}
        for name in GATED_CALLS:
            self.call(name)

    def call(self, name: str) -> tuple:
        """(held counter, hold-time histogram) of one syscall name, bound on first use."""
        bound = self.by_call.get(name)
        if bound is None:
            bound = (self._held.labels(self.node, name), self._hold_seconds.labels(self.node, name))
            self.by_call[name] = bound
        return bound

    def track(self, cluster_nodes: int, open_connections: Callable[[], int],
              held_now: Callable[[], int], lost_events: Callable[[], int],
              serial_timeouts: Callable[[], int]) -> None:
        """Gauges read at scrape time from the node's own state."""
        self.cluster_nodes.set(cluster_nodes)
        self.open_connections.set_function(_never_raises(open_connections))
        self.held_now.set_function(_never_raises(held_now))
        self.lost_events.set_function(_never_raises(lost_events))
        self.serial_timeouts.set_function(_never_raises(serial_timeouts))


def _never_raises(fn: Callable[[], int]) -> Callable[[], float]:
    """A scrape must not fail because the node is starting or stopping: NaN then."""

    def read() -> float:
        try:
            return float(fn())
        except Exception:  # noqa: BLE001 - any failure of a state read means "unknown"
            return float("nan")

    return read
