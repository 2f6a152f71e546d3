"""Connection management, like rdma_cm: an authenticated out-of-band handshake over TCP.

Frames are a 4-byte big-endian length and a JSON object (at most ``MAX_FRAME`` bytes). The
exchange, with nonces from both sides so that nothing can be replayed::

    C -> S  hello     {magic, v, provider, nonce_c}
    S -> C  challenge {nonce_s}                       (or reject: provider mismatch)
    C -> S  auth      {proof_c = HMAC(k, "C"|nonce_c|nonce_s|provider)}
    S -> C  accept    {params_s, private_s, proof_s = HMAC(k, "S"|nonce_c|nonce_s|params_s|private_s)}
    C -> S  params    {params_c, private_c, mac = HMAC(k, "P"|nonce_c|nonce_s|params_c|private_c)}
    S -> C  ready

Each side proves the secret before the other reveals anything, and the parameters (queue pair
numbers, segment references, the caller's private data such as region lists) are bound to the
session by the MACs. After ``ready`` the socket belongs to the provider: the tcp provider carries
its traffic on it, the shm provider keeps it open to learn of the peer's death.

A listener refuses a wrong secret, garbage, an oversized frame, a provider mismatch or a peer
that stalls longer than ``handshake_timeout``: it logs the reason (logger ``rdma.cm``), counts it
in ``refused`` and in ``supervise_transport_auth_failures_total``, and keeps serving others
(every handshake runs in its own thread, at most ``max_pending`` at once).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import queue
import socket
import struct
import threading
import time
from dataclasses import dataclass

from . import metrics
from .provider import SecretFileError, is_local_host, open_context, rdma_devices, read_secret
from .verbs import CompletionQueue, Context, ProtectionDomain, QueuePair, VerbsError

log = logging.getLogger("rdma.cm")
__all__ = [
    "ConnectError",
    "Connection",
    "Listener",
    "SecretFileError",
    "connect",
    "is_local_host",
    "open_context",
    "parse_endpoint",
    "rdma_devices",
    "read_secret",
]

MAGIC = "rdma-cm"
VERSION = 1
MAX_FRAME = 64 * 1024
_LEN = struct.Struct(">I")


class ConnectError(VerbsError, ConnectionRefusedError):
    """The peer could not be reached, refused us, or failed to authenticate."""


@dataclass
class Connection:
    qp: QueuePair
    peer_private_data: bytes
    peer_endpoint: str


class _Refuse(Exception):
    def __init__(self, reason: str, detail: str, reply: str | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.reply = reply  # a reason to send back (after counting, so the count is never late)


# -- framing -----------------------------------------------------------------------------------
def _recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Refuse("timeout", "handshake stalled")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(n - len(buf))
        except TimeoutError:
            raise _Refuse("timeout", "handshake stalled") from None
        except OSError as e:
            raise _Refuse("truncated", f"connection error: {e}") from None
        if not chunk:
            raise _Refuse("truncated", "connection closed mid-handshake")
        buf += chunk
    return bytes(buf)


def _recv_frame(sock: socket.socket, deadline: float, expect: str) -> dict:
    (n,) = _LEN.unpack(_recv_exact(sock, 4, deadline))
    if n > MAX_FRAME:
        raise _Refuse("oversize", f"frame of {n} bytes (limit {MAX_FRAME})")
    body = _recv_exact(sock, n, deadline)
    try:
        msg = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        raise _Refuse("garbage", "frame is not JSON") from None
    if not isinstance(msg, dict):
        raise _Refuse("garbage", "frame is not an object")
    if msg.get("t") == "reject" and expect != "reject":
        raise _Refuse("rejected", str(msg.get("reason", "no reason given"))[:200])
    if msg.get("t") != expect:
        raise _Refuse("garbage", f"expected {expect!r}, got {str(msg.get('t'))[:40]!r}")
    return msg


def _send_frame(sock: socket.socket, msg: dict) -> None:
    body = json.dumps(msg, separators=(",", ":"), sort_keys=True).encode()
    sock.sendall(_LEN.pack(len(body)) + body)


def _mac(secret: bytes, tag: bytes, nc: bytes, ns: bytes, body: bytes) -> str:
    return hmac.new(secret, tag + nc + ns + body, hashlib.sha256).hexdigest()


def _canon(params: object, private: object) -> bytes:
    return json.dumps([params, private], separators=(",", ":"), sort_keys=True).encode()


def _nonce(msg: dict) -> bytes:
    try:
        n = bytes.fromhex(str(msg.get("nonce")))
    except ValueError:
        raise _Refuse("garbage", "malformed nonce") from None
    if len(n) != 32:
        raise _Refuse("garbage", "malformed nonce")
    return n


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: object) -> bytes:
    try:
        return base64.b64decode(str(text), validate=True)
    except ValueError:
        raise _Refuse("garbage", "malformed private data") from None


def _check_proof(expected: str, got: object) -> bool:
    return isinstance(got, str) and hmac.compare_digest(expected, got)


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"endpoint {endpoint!r} is not host:port")
    return host.strip("[]"), int(port)


def _nodelay(sock: socket.socket) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# -- listener ----------------------------------------------------------------------------------
class Listener:
    """Accepts authenticated connections; ``accept`` hands out connected queue pairs."""

    def __init__(
        self,
        ctx: Context,
        pd: ProtectionDomain,
        endpoint: str,
        secret: bytes,
        send_cq: CompletionQueue,
        recv_cq: CompletionQueue,
        private_data: bytes,
        handshake_timeout: float = 2.0,
        max_pending: int = 64,
    ) -> None:
        if not secret:
            raise ValueError("empty cluster secret")
        self._ctx, self._pd, self._secret = ctx, pd, bytes(secret)
        self._scq, self._rcq, self._private = send_cq, recv_cq, bytes(private_data)
        self.handshake_timeout = handshake_timeout
        host, port = parse_endpoint(endpoint)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._ls = socket.create_server((host, port), family=family, backlog=128)
        self.endpoint = f"{host}:{self._ls.getsockname()[1]}"
        self.refused: dict[str, int] = {}
        self._count_lock = threading.Lock()
        self._ready: queue.Queue[Connection] = queue.Queue()
        self._slots = threading.BoundedSemaphore(max_pending)
        self._closed = False
        self._thread = threading.Thread(
            target=self._accept_loop, name=f"rdma-cm-{self.endpoint}", daemon=True
        )
        self._thread.start()

    def accept(self, timeout: float | None = None) -> Connection | None:
        """The next connected peer, or None after ``timeout`` seconds."""
        try:
            return self._ready.get(timeout=timeout)
        except queue.Empty:
            return None

    def refusals(self) -> dict[str, int]:
        """A consistent copy of ``refused``."""
        with self._count_lock:
            return dict(self.refused)

    def _refuse(self, peer: str, reason: str, detail: str) -> None:
        with self._count_lock:  # handshakes run in parallel threads
            self.refused[reason] = self.refused.get(reason, 0) + 1
        metrics.auth_failure(reason)
        log.warning("refused transport handshake from %s: %s (%s)", peer, reason, detail)

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                sock, addr = self._ls.accept()
            except OSError:
                if self._closed:
                    return
                time.sleep(0.05)  # EMFILE and friends: back off, keep serving
                continue
            peer = f"{addr[0]}:{addr[1]}"
            if not self._slots.acquire(blocking=False):
                self._refuse(peer, "overload", "too many handshakes in progress")
                sock.close()
                continue
            threading.Thread(target=self._handshake, args=(sock, peer), daemon=True).start()

    def _handshake(self, sock: socket.socket, peer: str) -> None:
        qp = None
        k = self._secret
        try:
            _nodelay(sock)
            deadline = time.monotonic() + self.handshake_timeout
            hello = _recv_frame(sock, deadline, "hello")
            if hello.get("magic") != MAGIC or hello.get("v") != VERSION:
                raise _Refuse("garbage", "not an rdma-cm hello of this version")
            nc = _nonce(hello)
            provider = hello.get("provider")
            if provider != self._ctx.provider:
                detail = f"listener uses provider {self._ctx.provider!r}, connector {str(provider)[:20]!r}"
                raise _Refuse("provider_mismatch", detail, f"provider mismatch: {detail}")
            ns = os.urandom(32)
            _send_frame(sock, {"t": "challenge", "nonce": ns.hex()})
            auth = _recv_frame(sock, deadline, "auth")
            if not _check_proof(_mac(k, b"C", nc, ns, provider.encode()), auth.get("proof")):
                raise _Refuse(
                    "bad_secret",
                    "connector's proof does not match the cluster secret",
                    "authentication failed",
                )
            qp = self._ctx._cm_prepare(self._pd, self._scq, self._rcq)  # type: ignore[attr-defined]
            params = self._ctx._cm_params(qp, sock, False)  # type: ignore[attr-defined]
            priv = _b64(self._private)
            proof = _mac(k, b"S", nc, ns, _canon(params, priv))
            _send_frame(sock, {"t": "accept", "params": params, "private": priv, "proof": proof})
            msg = _recv_frame(sock, deadline, "params")
            if not _check_proof(
                _mac(k, b"P", nc, ns, _canon(msg.get("params"), msg.get("private"))), msg.get("mac")
            ):
                raise _Refuse("bad_secret", "connection parameters fail their MAC")
            peer_private = _unb64(msg.get("private"))
            if not isinstance(msg.get("params"), dict):
                raise _Refuse("garbage", "connection parameters are not an object")
            sock.settimeout(None)
            self._ctx._cm_complete(qp, sock, msg["params"], False)  # type: ignore[attr-defined]
            _send_frame(sock, {"t": "ready"})
            conn = Connection(qp, peer_private, peer)
            if self._closed:
                qp.close()
                return
            self._ready.put(conn)
            qp = None
        except _Refuse as r:
            self._refuse(peer, r.reason, r.detail)
            if r.reply is not None:
                try:
                    _send_frame(sock, {"t": "reject", "reason": r.reply})
                except OSError:
                    pass
            sock.close()
        except (VerbsError, OSError) as e:
            self._refuse(peer, "error", str(e))
            sock.close()
        finally:
            if qp is not None:
                qp.close()
            self._slots.release()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._ls.shutdown(socket.SHUT_RDWR)  # wakes the accept() of the loop thread
        except OSError:
            pass
        self._ls.close()
        self._thread.join(timeout=2)
        while True:
            try:
                self._ready.get_nowait().qp.close()
            except queue.Empty:
                break


# -- connector ---------------------------------------------------------------------------------
def connect(
    ctx: Context,
    pd: ProtectionDomain,
    endpoint: str,
    secret: bytes,
    send_cq: CompletionQueue,
    recv_cq: CompletionQueue,
    private_data: bytes,
    timeout: float = 2.0,
) -> Connection:
    """Connect a queue pair to the listener at ``endpoint``; raises ConnectError on any failure."""
    host, port = parse_endpoint(endpoint)
    deadline = time.monotonic() + timeout
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise ConnectError(f"cannot reach rdma listener {endpoint}: {e}") from e
    qp = None
    k = bytes(secret)
    try:
        _nodelay(sock)
        nc = os.urandom(32)
        _send_frame(
            sock, {"t": "hello", "magic": MAGIC, "v": VERSION, "provider": ctx.provider, "nonce": nc.hex()}
        )
        ns = _nonce(_recv_frame(sock, deadline, "challenge"))
        _send_frame(sock, {"t": "auth", "proof": _mac(k, b"C", nc, ns, ctx.provider.encode())})
        acc = _recv_frame(sock, deadline, "accept")
        if not _check_proof(
            _mac(k, b"S", nc, ns, _canon(acc.get("params"), acc.get("private"))), acc.get("proof")
        ):
            raise _Refuse("bad_secret", "listener failed to prove the cluster secret")
        peer_private = _unb64(acc.get("private"))
        if not isinstance(acc.get("params"), dict):
            raise _Refuse("garbage", "listener's parameters are not an object")
        qp = ctx._cm_prepare(pd, send_cq, recv_cq)  # type: ignore[attr-defined]
        params, priv = ctx._cm_params(qp, sock, True), _b64(private_data)  # type: ignore[attr-defined]
        _send_frame(
            sock,
            {
                "t": "params",
                "params": params,
                "private": priv,
                "mac": _mac(k, b"P", nc, ns, _canon(params, priv)),
            },
        )
        _recv_frame(sock, deadline, "ready")
        sock.settimeout(None)
        ctx._cm_complete(qp, sock, acc["params"], True)  # type: ignore[attr-defined]
        conn = Connection(qp, peer_private, endpoint)
        qp = None
        return conn
    except _Refuse as r:
        sock.close()
        if r.reason == "rejected":
            raise ConnectError(f"rdma listener {endpoint} refused the connection: {r.detail}") from None
        raise ConnectError(f"handshake with rdma listener {endpoint} failed: {r}") from None
    except OSError as e:
        sock.close()
        raise ConnectError(f"handshake with rdma listener {endpoint} failed: {e}") from e
    except VerbsError:
        sock.close()
        raise
    finally:
        if qp is not None:
            qp.close()
