"""`supervise handover --config FILE [--to NODE]`: move leadership off the node that leads,
without stopping anything. The leader brings its successor up to its whole log, tells it to take
over, and follows the log from then on, its server kept (as a leader deposed by an election
does: leadership.py).

The request is a POST of ``{"to", "ballot", "ts", "mac"}`` to the leader's status endpoint. It
names the ballot the node leads at, so it is void once leadership has moved. With a cluster
secret, ``mac`` is an HMAC-SHA256 of the request under it, ``ts`` must be within ``MAX_SKEW_S`` of
the node's clock, and a request is taken once: a copy sent again is refused. Without one, only a
client on the node's own host (loopback) is obeyed."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import threading
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


def _mac(secret: bytes, node: str, to: str | None, ballot: int, ts: float) -> str:
    message = f"handover {node} {to or '-'} {ballot} {ts!r}"
    return hmac.new(secret, message.encode(), hashlib.sha256).hexdigest()


def request_body(secret: bytes, node: str, to: str | None, ballot: int, ts: float | None = None) -> bytes:
    ts = time.time() if ts is None else ts
    mac = _mac(secret, node, to, ballot, ts) if secret else None
    return json.dumps({"to": to, "ballot": ballot, "ts": ts, "mac": mac}).encode()


HandOver = Callable[[str | None, int], str]  # (to, ballot) -> the successor, or HandoverError


class HandoverEndpoint:
    """The status endpoint's POST /handover: (body, client host) -> (HTTP status, document)."""

    def __init__(self, node: str, secret: bytes, hand_over: HandOver) -> None:
        self._node = node
        self._secret = secret
        self._hand_over = hand_over
        self._taken: dict[str, float] = {}  # mac -> ts of each signed request taken lately
        self._lock = threading.Lock()  # the server answers each request on a thread of its own

    def __call__(self, body: bytes, client_host: str) -> tuple[int, dict]:
        try:
            doc = json.loads(body)
            to, ballot = doc.get("to"), doc.get("ballot")
            if (to is not None and not isinstance(to, str)) or type(ballot) is not int:
                raise ValueError("to, ballot")
        except (ValueError, AttributeError):
            return 400, {"error": 'expected {"to": NODE or null, "ballot": N, "ts": ..., "mac": ...}'}
        refused = self._refusal(doc, to, ballot, client_host)
        if refused is not None:
            return 403, {"error": refused}
        try:
            return 200, {"leader": self._hand_over(to, ballot)}
        except HandoverError as exc:
            return 409, {"error": str(exc)}

    def _refusal(self, doc: dict, to: str | None, ballot: int, client_host: str) -> str | None:
        """None if the request may be obeyed, else why not."""
        if not self._secret:
            if ipaddress.ip_address(client_host.split("%")[0]).is_loopback:
                return None
            return "this group has no secret_file: only a client on the node's own host may ask"
        ts, mac = doc.get("ts"), doc.get("mac")
        if not isinstance(ts, (int, float)) or not isinstance(mac, str):
            return "the request is not signed"
        now = time.time()
        if not abs(now - ts) <= MAX_SKEW_S:
            return f"the request's time is more than {MAX_SKEW_S:.0f} s from this node's clock"
        if not hmac.compare_digest(mac, _mac(self._secret, self._node, to, ballot, ts)):
            return "the request is not signed with this group's secret"
        with self._lock:
            self._taken = {m: t for m, t in self._taken.items() if now - t <= MAX_SKEW_S}
            if mac in self._taken:
                return "this request was taken already: a copy of a request is never obeyed"
            self._taken[mac] = ts
        return None


def untouched_successor(nodes: dict[str, dict], leader: str) -> str | None:
    """The follower furthest along among those that do not defer their candidacy (no stray
    client reached their copy), when some do; else None: the leader picks the best placed."""
    followers = {n: d for n, d in nodes.items() if n != leader and d["role"] == "follower"}
    untouched = [n for n, d in followers.items() if not d["defers_candidacy"] and not d["diverged"]]
    if not untouched or len(untouched) == len(followers):
        return None
    return max(untouched, key=lambda n: followers[n]["applied"])


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
    if to is None:
        to = untouched_successor(before["nodes"], leader)
    endpoint = cluster.node(leader).status
    ballot = before["nodes"][leader]["ballot"]
    req = urllib.request.Request(f"http://{endpoint}{PATH}", method="POST",
                                 data=request_body(cluster.secret(), leader, to, ballot),
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
