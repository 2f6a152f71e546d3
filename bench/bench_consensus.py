"""Consensus benchmark: commit latency (one proposer) and throughput (32 proposers), 64 B payloads,
3 replicas in separate processes on this host, over shm and tcp, beside PySyncObj (3 nodes,
separate processes, same payloads) measured in the same run.

Proposals are made inside the leader's process by a thread that waits for each commit
(``Replica.propose(...).result()``; PySyncObj: a ``@replicated`` method with ``sync=True``), so
the latency includes that thread's wake-up. (The supervisor releases a held input from a
callback run where the commit is seen, and wakes its tracer thread instead.)

    .venv/bin/python bench/bench_consensus.py [--quick]

Prints a table, writes bench/results/consensus.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import free_port, print_table, write_json  # noqa: E402

PAYLOAD = 64
THREADS = 32


# ---- PySyncObj node (child process) --------------------------------------------------------
def pso_node(me: str, others: list[str], batch: bool) -> None:
    from pysyncobj import SyncObj, SyncObjConf, replicated

    from tests.consensus_harness import measure

    class Log(SyncObj):
        def __init__(self) -> None:
            # batch=False wakes the loop on every command (PIPE notifier): its low-latency setting
            super().__init__(me, others, SyncObjConf(dynamicMembershipChange=False,
                                                     appendEntriesUseBatch=batch))
            self.n = 0

        @replicated
        def put(self, data: bytes) -> int:
            self.n += 1
            return self.n

    obj = Log()
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "status":
            out = {"leader": bool(obj._isLeader()), "ready": obj.isReady()}
        elif cmd[0] in ("lat", "tput"):
            out = measure(lambda p: obj.put(p, sync=True, timeout=10), cmd[0], [float(x) for x in cmd[1:]])
        else:
            break
        print(json.dumps(out), flush=True)
    os._exit(0)


def run_pysyncobj(lat_count: int, duration: float, batch: bool) -> dict:
    addrs = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    procs = []
    try:
        for a in addrs:
            others = [x for x in addrs if x != a]
            mode = "batch" if batch else "nobatch"
            procs.append(subprocess.Popen([sys.executable, __file__, "--pso-node", mode, a, *others],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO))

        def ask(p: subprocess.Popen, line: str) -> dict:
            p.stdin.write(line + "\n")
            p.stdin.flush()
            return json.loads(p.stdout.readline())

        deadline = time.monotonic() + 30
        leader = None
        while leader is None and time.monotonic() < deadline:
            for p in procs:
                st = ask(p, "status")
                if st["leader"] and st["ready"]:
                    leader = p
            time.sleep(0.1)
        if leader is None:
            raise RuntimeError("PySyncObj elected no leader")
        ask(leader, f"lat 50 {PAYLOAD}")  # warm-up
        lat = ask(leader, f"lat {lat_count} {PAYLOAD}")
        tput = ask(leader, f"tput {THREADS} {duration} {PAYLOAD}")
        return {"p50_us": lat["p50_us"], "p99_us": lat["p99_us"], "ops_per_s": tput["ops_per_s"]}
    finally:
        for p in procs:
            p.kill()
            p.wait()


def run_ours(transport: str, durability: str, lat_count: int, duration: float) -> dict:
    from tests.consensus_cluster import Cluster
    from tests.consensus_harness import Client

    with Cluster(3, transport, durability, record=False, log_region_bytes=64 << 20) as c:
        c.start()
        lead = c.leader()
        cl = Client(c.reps[lead].socket_path, timeout=300)
        cl.call(f"B lat 50 {PAYLOAD}")  # warm-up
        lat = json.loads(cl.call(f"B lat {lat_count} {PAYLOAD}"))
        tput = json.loads(cl.call(f"B tput {THREADS} {duration} {PAYLOAD}"))
        cl.close()
        for r in c.reps.values():
            r.stop()
        return {"p50_us": lat["p50_us"], "p99_us": lat["p99_us"], "ops_per_s": tput["ops_per_s"]}


def one_round(lat_count: int, duration: float) -> dict[str, dict]:
    rows = {}
    for name, fn in [
        ("consensus shm memory", lambda: run_ours("shm", "memory", lat_count, duration)),
        ("consensus shm fsync", lambda: run_ours("shm", "fsync", lat_count, duration)),
        ("consensus tcp memory", lambda: run_ours("tcp", "memory", lat_count, duration)),
        ("pysyncobj (batching)", lambda: run_pysyncobj(lat_count // 10, duration, True)),
        ("pysyncobj (no batching)", lambda: run_pysyncobj(lat_count, duration, False)),
    ]:
        print(f"running {name} ...", flush=True)
        rows[name] = fn()
    # compare against PySyncObj's better configuration for each figure, in the same round
    pso = [r for n, r in rows.items() if n.startswith("pysyncobj")]
    best_ops = max(r["ops_per_s"] for r in pso)
    best_p50 = min(r["p50_us"] for r in pso)
    for r in rows.values():
        r["throughput_ratio_vs_pysyncobj"] = r["ops_per_s"] / best_ops
        r["p50_ratio_vs_pysyncobj"] = r["p50_us"] / best_p50
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="shorter runs")
    ap.add_argument("--rounds", type=int, default=3, help="each runs every setup once")
    ap.add_argument("--pso-node", nargs="+")
    args = ap.parse_args()
    if args.pso_node:
        pso_node(args.pso_node[1], args.pso_node[2:], args.pso_node[0] == "batch")
        return
    lat_count, duration = (500, 2.0) if args.quick else (2000, 5.0)
    rounds = []
    for k in range(args.rounds):
        print(f"round {k + 1} of {args.rounds}", flush=True)
        rounds.append(one_round(lat_count, duration))

    def med(name: str, key: str) -> float:
        return statistics.median(r[name][key] for r in rounds)

    rows = []
    for name in rounds[0]:
        tput = sorted(r[name]["throughput_ratio_vs_pysyncobj"] for r in rounds)
        p50 = sorted(r[name]["p50_us"] for r in rounds)
        rows.append([name, f"{med(name, 'p50_us'):.0f}", f"{p50[0]:.0f}-{p50[-1]:.0f}",
                     f"{med(name, 'p99_us'):.0f}",
                     f"{med(name, 'ops_per_s'):.0f}", f"{statistics.median(tput):.2f}x",
                     f"{tput[0]:.2f}-{tput[-1]:.2f}x", f"{med(name, 'p50_ratio_vs_pysyncobj'):.2f}x"])
    print(f"\n{args.rounds} rounds; medians, and the ranges of p50 and of the throughput ratio (each "
          "ratio is to the better PySyncObj configuration in the same round)")
    print_table(["system", "p50 µs", "p50 range", "p99 µs", "ops/s (32 prop.)", "tput vs PSO", "range",
                 "p50 vs PSO"], rows)
    path = write_json("consensus", {"payload_bytes": PAYLOAD, "proposers": THREADS,
                                    "latency_samples": lat_count, "throughput_seconds": duration,
                                    "rounds": rounds})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
