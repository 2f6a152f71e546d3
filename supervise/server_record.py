"""Which process a node's copy of the server is, kept in its data_dir (``server``).

Once a node has started, its server has executed log entries (replayed, or gated as leader), and
a supervisor that stops leaves a follower's server running. Attaching to that process again
would replay the log into it a second time from the first entry: every write applied twice.
The record lets the next start refuse it with one line instead of marking the copy diverged
later, or never (a SET applied twice looks the same)."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from tracer import procfs

log = logging.getLogger("supervise")

FILE = "server"


class ServerAlreadyUsed(Exception):
    """The process was this node's server before: the operator must give it a fresh one."""


class ServerRecord:
    def __init__(self, node: str, data_dir: Path) -> None:
        self.node = node
        self.path = Path(data_dir) / FILE

    def check(self, pid: int) -> None:
        """Raise ServerAlreadyUsed if ``pid`` is the process this node last ran with."""
        try:
            doc = json.loads(self.path.read_text())
            recorded, since = doc["identity"], doc["since"]
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("%s: unreadable (%s): not checked whether pid %d was this node's server "
                        "before", self.path, exc, pid)
            return
        try:
            current = procfs.identity(pid)
        except procfs.GONE:
            return  # the tracer's own check gives the clear error
        if current == recorded:
            raise ServerAlreadyUsed(
                f"pid {pid} has been node {self.node!r}'s server since {since} ({self.path}): it "
                f"has executed log entries already, and attaching again would replay the log into "
                f"it a second time; start a fresh (empty) server and attach to that, or use the "
                f"launch form (supervise --config FILE --node NAME -- CMD)")

    def write(self, pid: int) -> None:
        """Record ``pid`` as this node's server (atomically: a crash leaves the old or the new)."""
        doc = {"pid": pid, "identity": procfs.identity(pid),
               "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc) + "\n")
        os.replace(tmp, self.path)
