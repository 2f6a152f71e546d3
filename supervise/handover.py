"""`supervise handover --config FILE [--to NODE]`: move leadership off the node that leads,
without stopping anything. The leader brings its successor up to its whole log, tells it to take
over, and follows the log from then on, its server kept (as a leader deposed by an election
does: leadership.py).

The request is a POST of ``{"to", "ts", "mac"}`` to the leader's status endpoint. With a cluster
secret, ``mac`` is an HMAC-SHA256 of the request under it and ``ts`` must be within
``MAX_SKEW_S`` of the node's clock; without one, only a client on the node's own host (loopback)
is obeyed."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from .config import ClusterConfig
from .status_cmd import group_status

PATH = "/handover"
MAX_SKEW_S = 60.0
TAKEOVER_WAIT_S = 30.0  # a successor replays what it has not applied before it gates


class HandoverError(Exception):
    """The hand-over did not happen: one line, exit status 1."""


def _mac(secret: bytes, node: str, to: str | None, ts: float) -> str:
    return hmac.new(secret, f"handover {node} {to or '-'} {ts!r}".encode(), hashlib.sha256).hexdigest()


def request_body(secret: bytes, node: str, to: str | None, ts: float | None = None) -> bytes:
    ts = time.time() if ts is None else ts
    return json.dumps({"to": to, "ts": ts, "mac": _mac(secret, node, to, ts) if secret else None}).encode()


def authorised(secret: bytes, node: str, body: dict, client_host: str) -> str | None:
    """None if the request may be obeyed, else why not."""
    if not secret:
        if ipaddress.ip_address(client_host.split("%")[0]).is_loopback:
            return None
        return "this group has no secret_file: only a client on the node's own host may ask"
    ts, mac = body.get("ts"), body.get("mac")
    if not isinstance(ts, (int, float)) or not isinstance(mac, str):
        return "the request is not signed"
    if abs(time.time() - ts) > MAX_SKEW_S:
        return f"the request's time is more than {MAX_SKEW_S:.0f} s from this node's clock"
    if not hmac.compare_digest(mac, _mac(secret, node, body.get("to"), ts)):
        return "the request is not signed with this group's secret"
    return None


def handle(node: str, secret: bytes, hand_over: Callable[[str | None], str],
           body: bytes, client_host: str) -> tuple[int, dict]:
    """The status endpoint's POST /handover: (HTTP status, JSON document)."""
    try:
        doc = json.loads(body)
        to = doc.get("to")
        if to is not None and not isinstance(to, str):
            raise ValueError("to")
    except (ValueError, AttributeError):
        return 400, {"error": 'expected {"to": NODE or null, "ts": ..., "mac": ...}'}
    refused = authorised(secret, node, doc, client_host)
    if refused is not None:
        return 403, {"error": refused}
    try:
        return 200, {"leader": hand_over(to)}
    except HandoverError as exc:
        return 409, {"error": str(exc)}


def run_handover(cluster: ClusterConfig, to: str | None) -> int:
    if to is not None:
        cluster.node(to)  # ConfigError naming the nodes there are
    before = group_status(cluster)
    leader = before["leader"]
    if leader is None:
        raise HandoverError("no node leads now: nothing to hand over (see `supervise status`)")
    if leader == to:
        print(f"{leader} leads already (ballot {before['ballot']})")
        return 0
    endpoint = cluster.node(leader).status
    req = urllib.request.Request(f"http://{endpoint}{PATH}", method="POST",
                                 data=request_body(cluster.secret(), leader, to),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=TAKEOVER_WAIT_S) as resp:
            answer = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            why = json.loads(exc.read()).get("error", exc.reason)
        except ValueError:
            why = exc.reason
        raise HandoverError(f"{leader} ({endpoint}) did not hand leadership on: {why}") from None
    except OSError as exc:
        raise HandoverError(f"cannot reach {leader}'s status endpoint {endpoint}: {exc}") from None
    successor = answer.get("leader")
    ballot = before["nodes"][leader]["ballot"]
    deadline = time.monotonic() + TAKEOVER_WAIT_S
    while time.monotonic() < deadline:
        now = group_status(cluster)
        if now["leader"] is not None and now["leader"] != leader:
            print(f"leader: {leader} -> {now['leader']} (ballot {now['ballot']})")
            return 0
        if now["leader"] == leader and now["nodes"][leader]["ballot"] > ballot:
            # a successor far behind in applying the log hands leadership to a peer that is not
            raise HandoverError(f"{successor} took over and handed leadership back: {leader} leads "
                                f"again (ballot {now['nodes'][leader]['ballot']})")
        time.sleep(0.1)
    raise HandoverError(f"{leader} handed leadership to {successor}, but no other node gates its "
                        f"clients after {TAKEOVER_WAIT_S:.0f} s (see `supervise status`)")
