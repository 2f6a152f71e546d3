"""Helpers for the rdma tests: real peer processes (tests/rdma_peer.py) and a local endpoint."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Sequence

import pytest

from rdma import Access, connect, open_context, rdma_devices
from rdma.verbs import WorkCompletion

PEER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rdma_peer.py")
SECRET = b"rdma-conformance-secret"
ALL = int(Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.REMOTE_READ)
PROVIDERS = ["shm", "tcp", "verbs"]


def require_provider(provider: str) -> None:
    if provider == "verbs" and not rdma_devices():
        pytest.skip("no RDMA device (ibv_devices lists none)")


class PeerError(RuntimeError):
    pass


class Peer:
    """A peer in its own process (optionally inside a network namespace via ``prefix_argv``)."""

    def __init__(
        self,
        provider: str,
        regions: dict[str, tuple[int, int]],
        host: str = "127.0.0.1",
        secret: bytes = SECRET,
        prefix_argv: Sequence[str] = (),
        handshake_timeout: float = 2.0,
    ) -> None:
        self.provider = provider
        argv = [*prefix_argv, sys.executable, PEER_SCRIPT, provider, host, secret.hex(), json.dumps(regions)]
        argv.append(str(handshake_timeout))
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        try:
            hello = json.loads(self._readline(30))
        except BaseException:
            self.kill()
            raise
        self.endpoint: str = hello["endpoint"]
        self.pid: int = hello["pid"]
        self.regions: dict[str, list[int]] = hello["regions"]

    def _readline(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not r:
            raise PeerError(f"peer {self.proc.pid} did not answer within {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            raise PeerError(f"peer {self.proc.pid} exited (rc={self.proc.poll()})")
        return line

    def call(self, cmd: str, *args, timeout: float = 20):
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps([cmd, *args]) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self._readline(timeout))
        if "err" in reply:
            raise PeerError(reply["err"])
        return reply["ok"]

    def read(self, name: str, off: int, n: int) -> bytes:
        return bytes.fromhex(self.call("read", name, off, n))

    def wait(self, count: int, timeout: float = 10, spin: float | None = None) -> list[list]:
        return self.call("wait", timeout, count, spin, timeout=timeout + 10)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()  # type: ignore[union-attr]
            except OSError:
                pass

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write('["exit"]\n')  # type: ignore[union-attr]
                self.proc.stdin.flush()  # type: ignore[union-attr]
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()


class Local:
    """This process's side: a context, one PD, one CQ for everything, one 2 MiB region."""

    def __init__(self, provider: str, size: int = 2 << 20) -> None:
        self.provider = provider
        self.ctx = open_context(provider)
        self.pd = self.ctx.alloc_pd()
        self.cq = self.ctx.create_cq()
        self.mr = self.pd.reg_mr(size, Access(ALL))

    def connect(self, peer: Peer, secret: bytes = SECRET):
        priv = json.dumps({"local": [self.mr.addr, self.mr.length, self.mr.rkey]}).encode()
        conn = connect(self.ctx, self.pd, peer.endpoint, secret, self.cq, self.cq, priv, timeout=5)
        return conn.qp, json.loads(conn.peer_private_data)

    def wait(self, n: int = 1, timeout: float = 10) -> list[WorkCompletion]:
        out: list[WorkCompletion] = []
        deadline = time.monotonic() + timeout
        while len(out) < n and time.monotonic() < deadline:
            out += self.cq.wait(deadline - time.monotonic(), n - len(out))
        return out

    def close(self) -> None:
        self.ctx.close()


def wait_until(pred, timeout: float = 10, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()
