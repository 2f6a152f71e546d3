"""Metrics of the supervisor itself (prefix ``supervise_``): gating, inputs, outputs, checks."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

HOLD_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2,
                0.1, 0.25, 0.5, 1.0)


class NodeMetrics:
    def __init__(self, node: str, registry: CollectorRegistry = REGISTRY) -> None:
        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, ["node", *labels], registry=registry)

        self.node = node
        self.held = counter("supervise_held_syscalls", "Input syscalls held until committed", ("call",))
        self.hold_seconds = Histogram("supervise_hold_seconds", "Time an input syscall was held",
                                      ["node", "call"], buckets=HOLD_BUCKETS, registry=registry)
        self.input_bytes = counter("supervise_input_bytes", "Input bytes proposed or replayed")
        self.output_bytes = counter("supervise_output_bytes", "Bytes the server wrote to its clients")
        self.escapes = counter("supervise_escapes", "Held inputs whose thread ran on without stopping")
        self.stray = counter("supervise_stray_connections",
                             "Clients that connected to a follower's server directly")
        self.digest_checks = counter("supervise_digest_checks", "Output digests compared")
        self.divergences = counter("supervise_divergences", "Output digests that differed")
        self.replayed = counter("supervise_replayed_entries", "Log entries applied to this server")
        self.diverged = Gauge("supervise_diverged", "1 when this node's server diverged", ["node"],
                              registry=registry)
        self.leader = Gauge("supervise_is_leader", "1 while this node gates its server", ["node"],
                            registry=registry)
        self.open_connections = Gauge("supervise_open_connections", "Replicated client connections",
                                      ["node"], registry=registry)
        self.by_call: dict[str, tuple] = {}

    def call(self, name: str) -> tuple:
        bound = self.by_call.get(name)
        if bound is None:
            bound = (self.held.labels(self.node, name), self.hold_seconds.labels(self.node, name))
            self.by_call[name] = bound
        return bound
