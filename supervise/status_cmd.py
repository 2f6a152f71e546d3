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
            nodes[node.name] = {"role": "down", "committed": None, "applied": None,
                                "diverged": False, "status": node.status}
            continue
        role = doc["role"] if doc["role"] in ("leader", "follower", "candidate") else "candidate"
        if role == "leader" and doc.get("gating"):
            leaders.append((doc["ballot"], node.name))
        ballot = max(ballot, doc["ballot"])
        nodes[node.name] = {"role": role, "committed": doc["committed"], "applied": doc["applied"],
                            "diverged": doc["diverged"], "gating": doc.get("gating", False),
                            "status": node.status}
    leader = max(leaders)[1] if leaders else None
    return {"leader": leader, "ballot": ballot, "nodes": nodes}


def run_status(cluster: ClusterConfig, as_json: bool) -> int:
    doc = group_status(cluster)
    if as_json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"leader: {doc['leader'] or 'none'}   ballot: {doc['ballot']}")
    print(f"{'node':<10} {'role':<10} {'committed':>10} {'applied':>10}  diverged  status")
    for name, n in doc["nodes"].items():
        committed = "-" if n["committed"] is None else n["committed"]
        applied = "-" if n["applied"] is None else n["applied"]
        print(f"{name:<10} {n['role']:<10} {committed!s:>10} {applied!s:>10}  "
              f"{'YES' if n['diverged'] else 'no':<8}  http://{n['status']}/status")
    return 0
