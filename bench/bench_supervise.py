"""Replicated Redis against its alternatives, in one run on this host.

redis-benchmark -t set,get -c 50 against: bare Redis; the leader of a three-node supervised
cluster (shm transport, durability memory and fsync); Redis's own primary with two replicas;
Redis under strace -f. Throughput and p50/p99 latency as ratios to bare, plus each supervisor's
peak resident memory. Writes bench/results/supervise.json.

Usage: .venv/bin/python bench/bench_supervise.py [--requests N] [--replicated-requests N] [--rounds N]

Each round runs every setup once; each ratio is to the same round's bare run, and the table
gives the median and range over the rounds (bare Redis moves by half between minutes here).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RedisServer, print_table, redis_benchmark, round_ratios, write_json  # noqa: E402
from supervise.localcluster import LocalCluster  # noqa: E402


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def bare(requests: int) -> dict:
    server = RedisServer()
    try:
        return redis_benchmark(server.port, "set,get", 50, requests)
    finally:
        server.stop()


def primary_replica(requests: int) -> dict:
    primary = RedisServer()
    replicas = [RedisServer(["--replicaof", "127.0.0.1", str(primary.port)]) for _ in range(2)]
    try:
        time.sleep(1.0)
        return redis_benchmark(primary.port, "set,get", 50, requests)
    finally:
        for server in [primary, *replicas]:
            server.stop()


def under_strace(requests: int) -> dict:
    server = RedisServer()
    strace = subprocess.Popen(["strace", "-f", "-qq", "-o", "/dev/null", "-p", str(server.pid)])
    try:
        time.sleep(1.0)
        return redis_benchmark(server.port, "set,get", 50, requests)
    finally:
        strace.terminate()
        strace.wait()
        server.stop()


def supervised(requests: int, durability: str, hold: str) -> tuple[dict, dict[str, float]]:
    with LocalCluster(n=3, server="redis", transport="shm", durability=durability,
                      hold=hold) as cluster:
        cluster.start(timeout=120)
        leader = cluster.wait_leader()
        result = redis_benchmark(leader.server_port, "set,get", 50, requests)
        # the leader does not wait for replay: its throughput alone could hide followers behind
        ended = time.monotonic()
        cluster.wait_applied(timeout=300)
        result["catch_up_s"] = time.monotonic() - ended
        rss = {n.name: peak_rss_mib(n.supervisor.pid) for n in cluster.nodes if n.supervisor}
        return result, rss


SUPERVISED = (("inputs", "memory"), ("inputs", "fsync"), ("outputs", "memory"), ("outputs", "fsync"))


def one_round(args: argparse.Namespace, rss: dict) -> dict[str, dict]:
    results = {"bare": bare(args.requests)}
    for hold, durability in SUPERVISED:
        name = f"supervised ({durability}, hold {hold})"
        for attempt in range(3):  # a spurious election on a starved host ends a leader's run
            try:
                results[name], rss[name] = supervised(args.replicated_requests, durability, hold)
                break
            except RuntimeError as exc:
                print(f"{name} attempt {attempt + 1}: {exc}")
    results["redis primary + 2 replicas"] = primary_replica(args.requests)
    results["strace -f"] = under_strace(args.replicated_requests)
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--replicated-requests", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rss: dict[str, dict[str, float]] = {}
    rounds = [one_round(args, rss) for _ in range(args.rounds)]

    def ratios(name: str, test: str, key: str, base: str = "bare") -> tuple[float, float, float]:
        ran = [r for r in rounds if name in r]
        return round_ratios([r[name][test][key] for r in ran], [r[base][test][key] for r in ran])

    rows = []
    for name in rounds[0]:
        for test in ("SET", "GET"):
            rps = ratios(name, test, "rps")
            rows.append([name, test, f"{statistics.median(r[name][test]['rps'] for r in rounds):.0f}",
                         f"{rps[0]:.3f}x", f"{rps[1]:.3f}-{rps[2]:.3f}x",
                         f"{ratios(name, test, 'p50_ms')[0]:.1f}x",
                         f"{ratios(name, test, 'p99_ms')[0]:.1f}x"])
    print(f"redis-benchmark -t set,get -c 50, {args.rounds} rounds; ratios to the same round's bare "
          "run, median (and range) over the rounds")
    print_table(["setup", "test", "req/s", "vs bare", "range", "p50 vs bare", "p99 vs bare"], rows)
    for name in rounds[0]:
        if "catch_up_s" in rounds[0][name]:
            lags = ", ".join(f"{r[name]['catch_up_s']:.1f}" for r in rounds if name in r)
            print(f"{name}: followers had applied everything {lags} s after the benchmark ended")
    for mode, per_node in rss.items():
        print(f"supervisor peak RSS ({mode}, last round): "
              + ", ".join(f"{k} {v:.0f} MiB" for k, v in per_node.items()))
    for hold in ("inputs", "outputs"):
        name = f"supervised (memory, hold {hold})"
        sup = ratios(name, "SET", "rps")[0]
        vs_strace = ratios(name, "SET", "rps", base="strace -f")[0]
        print(f"{name} SET vs bare: {sup:.3f}x (target >= 0.15x); vs strace -f: {vs_strace:.2f}x "
              "(target >= 4x)")
    path = write_json("supervise", {"rounds": rounds, "peak_rss_mib": rss, "requests": args.requests,
                                    "replicated_requests": args.replicated_requests})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
