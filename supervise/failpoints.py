"""Transport failpoints for fault campaigns, off unless the environment asks for them.

``SUPERVISE_FAILPOINTS=/path/spec.json`` makes a node watch that file. Its content is the tcp
provider's fault spec, applied to every queue pair of the node's transport: lost requests
(retransmitted after an RTO, as RC does), held requests and duplicated requests, e.g.
``{"drop": 0.05, "delay": 0.02, "duplicate": 0.05, "seed": 7}``. An empty object, an empty file
or no file clears them. Only the ``tcp`` transport has failpoints; they exist to show that
consensus survives a bad network, which this kernel cannot emulate (no netem).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Protocol

ENV = "SUPERVISE_FAILPOINTS"
KEYS = {"drop", "delay", "duplicate", "seed", "cut"}

log = logging.getLogger("supervise.failpoints")


class Injectable(Protocol):
    def inject(self, spec: dict) -> None: ...


class FailpointFile:
    """Applies the spec file's content to a transport whenever the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: tuple[int, int] | None = None

    @classmethod
    def from_environment(cls) -> FailpointFile | None:
        value = os.environ.get(ENV)
        return cls(Path(value)) if value else None

    def poll(self, transport: Injectable) -> None:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = (0, 0)
        if stamp == self._seen:
            return
        self._seen = stamp
        try:
            text = self.path.read_text() if stamp != (0, 0) else ""
            spec = json.loads(text) if text.strip() else {}
            if not isinstance(spec, dict) or not set(spec) <= KEYS:
                raise ValueError(f"expected an object with keys from {sorted(KEYS)}")
        except (OSError, ValueError) as exc:
            log.error("%s: %s; failpoints left as they were", self.path, exc)
            return
        transport.inject(spec)
        if spec:
            log.warning("transport failpoints now %s (from %s)", json.dumps(spec), self.path)
        else:
            log.warning("transport failpoints cleared (%s)", self.path)
