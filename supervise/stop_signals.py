"""SIGINT and SIGTERM, recorded for a main loop that polls.

A handler only appends to a list: one that took a lock (Event.set) deadlocked when a second
signal arrived while the first handler held it (SIGINT from a terminal and from `timeout`).
"""

from __future__ import annotations

import signal


def catch_stop_signals() -> list[int]:
    """Install the handlers; the returned list fills with the signals received."""
    received: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, _frame: received.append(s))
    return received
