"""The node's HTTP endpoint: /metrics for Prometheus, /status for `supervise status`, and the
POST actions its caller names (/handover for `supervise handover`)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

METRICS_MAX_AGE = 0.5  # seconds one rendering of /metrics is served again


class Exposition:
    """The registry rendered at most once per ``max_age`` and one rendering at a time, however
    many scrapers ask at once: they share the bytes (and wait on a lock, which costs nothing)
    instead of competing with the consensus and tracer threads for the interpreter."""

    def __init__(self, registry: CollectorRegistry = REGISTRY, max_age: float = METRICS_MAX_AGE) -> None:
        self._registry = registry
        self._max_age = max_age
        self._lock = threading.Lock()
        self._body = b""
        self._at = float("-inf")

    def body(self) -> bytes:
        with self._lock:
            if time.monotonic() - self._at >= self._max_age:
                self._body = generate_latest(self._registry)
                self._at = time.monotonic()
            return self._body


Action = Callable[[bytes, str], tuple[int, dict]]  # (body, client host) -> (status, document)
MAX_BODY = 4096


def serve(endpoint: str, status: Callable[[], dict],
          actions: dict[str, Action] | None = None) -> ThreadingHTTPServer:
    host, _, port = endpoint.rpartition(":")
    exposition = Exposition()
    actions = actions or {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            action = actions.get(self.path.split("?")[0])
            length = self.headers.get("Content-Length", "")
            length = int(length) if length.isdigit() else 0
            if action is None:
                code, doc = 404, {"error": f"POST only to {', '.join(actions) or 'nothing'}"}
            elif not 0 < length <= MAX_BODY:
                code, doc = 400, {"error": f"expected a JSON body of at most {MAX_BODY} bytes"}
            else:
                code, doc = action(self.rfile.read(length), self.client_address[0])
            self._send(code, json.dumps(doc).encode(), "application/json")

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path = self.path.split("?")[0]
            if path == "/metrics":
                body, ctype = exposition.body(), CONTENT_TYPE_LATEST
            elif path == "/status":
                body, ctype = json.dumps(status()).encode(), "application/json"
            else:
                self.send_error(404, "try /metrics or /status")
                return
            self._send(200, body, ctype)

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            try:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up waiting (a timed-out probe): nothing to report

        def log_message(self, *_args: object) -> None:
            pass

    ThreadingHTTPServer.allow_reuse_address = True
    ThreadingHTTPServer.daemon_threads = True
    server = ThreadingHTTPServer((host.strip("[]"), int(port)), Handler)
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server
