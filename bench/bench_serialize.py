"""What serializing costs a multi-threaded server (cluster.serialize; tracer/serial.py).

Three supervised memcached copies (4 worker threads each, shm transport, durability memory) on
this host, with and without ``serialize``: 10 clients each set their own keys through the leader
(a workload both settings replicate correctly), then a follower is restarted with an empty
server and replays the whole log. Reports the leader's throughput and the replay rate, each
serialized as a ratio to the same round's unserialized run. Writes bench/results/serialize.json.

Usage: .venv/bin/python bench/bench_serialize.py [--rounds N] [--ops N]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pymemcache.client.base import Client  # noqa: E402

from bench.common import print_table, round_ratios, write_json  # noqa: E402
from supervise.localcluster import LocalCluster  # noqa: E402

CLIENTS = 10
VALUE = b"v" * 32


def _clients(port: int, ops: int) -> float:
    """Sets per second through ``port`` from CLIENTS clients, each on its own keys."""
    def client(index: int) -> None:
        mc = Client(("127.0.0.1", port), timeout=30)
        try:
            for j in range(ops):
                mc.set(f"c{index}:{j}", VALUE, noreply=False)
        finally:
            mc.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return CLIENTS * ops / (time.monotonic() - start)


def _replay_rate(cluster: LocalCluster, node, target: int) -> float:
    """Entries a second that ``node``, restarted with an empty server, applies on its way to
    ``target``, counted from its first applied entry (not its supervisor's start)."""
    cluster.kill(node)
    cluster.restart(node)
    first = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        doc = node.status() or {}
        applied = doc.get("applied", 0)
        now = time.monotonic()
        if applied and first is None:
            first = (now, applied)
        if applied >= target:
            return (applied - first[1]) / max(now - first[0], 1e-3)
        time.sleep(0.01)
    raise TimeoutError(f"{node.name} did not replay {target} entries within 300 s")


def one_run(serialize: bool, ops: int) -> dict:
    with LocalCluster(n=3, server="memcached", transport="shm", durability="memory",
                      serialize=serialize) as cluster:
        cluster.start(timeout=120)
        leader = cluster.wait_leader()
        rate = _clients(leader.server_port, ops)
        target = cluster.wait_applied(timeout=120)
        follower = next(n for n in cluster.nodes if n is not leader)
        replay = _replay_rate(cluster, follower, target)
        diverged = [n.name for n in cluster.nodes if (n.status() or {}).get("diverged")]
    return {"sets_per_s": rate, "replay_entries_per_s": replay, "entries": target,
            "diverged": diverged}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ops", type=int, default=1000, help="sets per client")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {"unserialized": [], "serialized": []}
    for r in range(args.rounds):
        for name, serialize in (("unserialized", False), ("serialized", True)):
            result = one_run(serialize, args.ops)
            runs[name].append(result)
            print(f"round {r + 1} {name}: {result['sets_per_s']:,.0f} sets/s, replay "
                  f"{result['replay_entries_per_s']:,.0f} entries/s", flush=True)
    rows = []
    summary = {}
    for key, label in (("sets_per_s", "sets/s through the leader"),
                       ("replay_entries_per_s", "replay of a fresh copy, entries/s")):
        base = [run[key] for run in runs["unserialized"]]
        mine = [run[key] for run in runs["serialized"]]
        med, lo, hi = round_ratios(mine, base)
        summary[key] = {"ratio": med, "low": lo, "high": hi}
        rows.append([label, f"{sorted(base)[len(base) // 2]:,.0f}", f"{sorted(mine)[len(mine) // 2]:,.0f}",
                     f"{med:.2f}x ({lo:.2f}-{hi:.2f}x)"])
    print_table(["", "unserialized (median)", "serialized (median)", "serialized / unserialized"], rows)
    diverged = [run["diverged"] for name in runs for run in runs[name] if run["diverged"]]
    if diverged:
        print(f"diverged copies: {diverged}")
    path = write_json("serialize", {"args": vars(args), "runs": runs, "summary": summary})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
