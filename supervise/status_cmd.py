"""`supervise status --config FILE [--json]`: the group as each node reports itself."""

from __future__ import annotations

import json
import urllib.request

from .config import ClusterConfig


def fetch(endpoint: str, timeout: float = 1.0) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://{endpoint}/status", timeout=timeout) as resp:
            return json.loads(resp.read())
    except (OSError, ValueError):
        return None


def group_status(cluster: ClusterConfig) -> dict:
    nodes = {}
    leaders = []
    ballot = 0
    for node in cluster.nodes:
        doc = fetch(node.status)
        if doc is None:
            nodes[node.name] = {"role": "down", "ballot": None, "committed": None, "applied": None,
                                "diverged": False, "defers_candidacy": False, "log_bytes": None,
                                "log_disk_free_bytes": None, "status": node.status}
            continue
        role = doc["role"] if doc["role"] in ("leader", "follower", "candidate") else "candidate"
        if role == "leader" and doc.get("gating"):
            leaders.append((doc["ballot"], node.name))
        ballot = max(ballot, doc["ballot"])
        nodes[node.name] = {"role": role, "ballot": doc["ballot"],
                            "committed": doc["committed"], "applied": doc["applied"],
                            "diverged": doc["diverged"], "gating": doc.get("gating", False),
                            "defers_candidacy": doc.get("defers_candidacy", False),
                            "log_bytes": doc.get("log_bytes"),
                            "log_disk_free_bytes": doc.get("log_disk_free_bytes"),
                            "status": node.status}
    leader = max(leaders)[1] if leaders else None
    return {"leader": leader, "ballot": ballot, "nodes": nodes}


def run_status(cluster: ClusterConfig, as_json: bool) -> int:
    doc = group_status(cluster)
    if as_json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"leader: {doc['leader'] or 'none'}   ballot: {doc['ballot']}")
    print(f"{'node':<10} {'role':<10} {'committed':>10} {'applied':>10}  {'copy':<8}  "
          f"{'log':>7} {'free':>7}  status")
    for name, n in doc["nodes"].items():
        committed = "-" if n["committed"] is None else n["committed"]
        applied = "-" if n["applied"] is None else n["applied"]
        print(f"{name:<10} {n['role']:<10} {committed!s:>10} {applied!s:>10}  {_copy(n):<8}  "
              f"{_size(n['log_bytes']):>7} {_size(n['log_disk_free_bytes']):>7}  "
              f"http://{n['status']}/status")
    if any(_copy(n) == "stray" for n in doc["nodes"].values()):
        print("stray: a client reached that copy directly; its node stands for election only when no "
              "other does")
    return 0


def _copy(node: dict) -> str:
    return "DIVERGED" if node["diverged"] else "stray" if node["defers_candidacy"] else "ok"


def _size(n: int | None) -> str:
    """Bytes as df -h shows them (1024-based)."""
    if n is None:
        return "-"
    size, unit = float(n), 0
    while size >= 1024 and unit < 4:
        size /= 1024
        unit += 1
    return f"{size:.{0 if unit == 0 or size >= 10 else 1}f}{'BKMGT'[unit]}"
