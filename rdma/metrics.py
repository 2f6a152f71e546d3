"""Transport metrics for Prometheus (prefix ``supervise_``).

The hot path only bumps plain ints in a per-provider list (``stats(provider)``); a custom
collector turns them into counters when scraped, so a write costs two integer additions.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from prometheus_client.core import REGISTRY, CounterMetricFamily

WRITES, WRITE_BYTES, ERRORS = 0, 1, 2

_stats: dict[str, list[int]] = {}
# every reason the handshake refuses for, at 0 from the start so that a dashboard shows zero
AUTH_REASONS = ("bad_secret", "garbage", "truncated", "timeout", "oversize", "provider_mismatch",
                "overload", "error")
_auth_failures: dict[str, int] = dict.fromkeys(AUTH_REASONS, 0)
_lock = threading.Lock()


def stats(provider: str) -> list[int]:
    """The mutable [writes, write_bytes, errors] list of a provider (resolve once, bump often)."""
    with _lock:
        return _stats.setdefault(provider, [0, 0, 0])


def auth_failure(reason: str) -> None:
    with _lock:
        _auth_failures[reason] = _auth_failures.get(reason, 0) + 1


def snapshot() -> dict[str, dict[str, int]]:
    with _lock:
        out = {p: {"writes": s[0], "write_bytes": s[1], "errors": s[2]} for p, s in _stats.items()}
        out["auth_failures"] = dict(_auth_failures)
        return out


class _Collector:
    def collect(self) -> Iterator[CounterMetricFamily]:
        with _lock:
            st = {p: list(s) for p, s in _stats.items()}
            af = dict(_auth_failures)
        specs = [
            ("supervise_transport_writes", "One-sided RDMA writes posted", WRITES),
            ("supervise_transport_write_bytes", "Bytes posted in one-sided RDMA writes", WRITE_BYTES),
            ("supervise_transport_errors", "Work completions with an error status", ERRORS),
        ]
        for name, doc, idx in specs:
            fam = CounterMetricFamily(name, doc, labels=["provider"])
            for provider, values in sorted(st.items()):
                fam.add_metric([provider], values[idx])
            yield fam
        fam = CounterMetricFamily(
            "supervise_transport_auth_failures", "Refused transport handshakes", labels=["reason"]
        )
        for reason, n in sorted(af.items()):
            fam.add_metric([reason], n)
        yield fam

    def describe(self) -> list:
        return []


_COLLECTOR = _Collector()
_registered = False


def register(registry=REGISTRY) -> None:
    """Expose the counters on ``registry`` (idempotent for the default registry)."""
    global _registered
    if registry is REGISTRY:
        if _registered:
            return
        _registered = True
    registry.register(_COLLECTOR)


register()
