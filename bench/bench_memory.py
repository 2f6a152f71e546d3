"""Each supervisor's memory over a long run: does it stay flat as the log grows?

Three supervised Redis copies on this host (shm, durability memory) take rounds of
redis-benchmark through the leader (SET, LPUSH, INCR; 50 clients, each round on new
connections). After each round, once every node has applied the log, it reads each supervisor's
resident memory from /proc: private (RssAnon: the Python heap, the log cache), shared memory
(RssShmem: the shm transport's rings, which fill as they are first written, up to their size)
and file-backed (RssFile: bcc's LLVM and the other libraries). Writes bench/results/memory.json.

Usage: .venv/bin/python bench/bench_memory.py [--rounds N] [--requests N]

The figure that matters is the private memory's growth per 100,000 log entries over the second
half of the run, as a ratio to the private memory after the first round.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import print_table, write_json  # noqa: E402
from supervise.localcluster import LocalCluster  # noqa: E402

FIELDS = ("RssAnon", "RssShmem", "RssFile")


def memory_mib(pid: int) -> dict[str, float]:
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in FIELDS:
            found[key] = int(value.split()[0]) / 1024
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--requests", type=int, default=20_000, help="per test and round")
    args = parser.parse_args()
    samples: list[dict] = []
    with LocalCluster(durability="memory") as cluster:
        cluster.start()
        leader = cluster.wait_leader()
        for _ in range(args.rounds):
            subprocess.run(["redis-benchmark", "-p", str(leader.server_port), "-t", "set,lpush,incr",
                            "-c", "50", "-n", str(args.requests), "-r", "100000", "-q"],
                           stdout=subprocess.DEVNULL, check=True, timeout=1800)
            entries = cluster.wait_applied(timeout=900)
            samples.append({"entries": entries, "nodes": {
                n.name: memory_mib(n.supervisor.pid) for n in cluster.nodes if n.supervisor}})
    names = list(samples[0]["nodes"])
    rows = [[f"{s['entries']:,}"] + [f"{s['nodes'][n]['RssAnon']:.0f} / {s['nodes'][n]['RssShmem']:.0f}"
                                     for n in names] for s in samples]
    print(f"leader {leader.name}; private / shared MiB per supervisor after each round")
    print_table(["log entries"] + names, rows)
    half = samples[len(samples) // 2]
    last = samples[-1]
    growth = {}
    for n in names:
        per_100k = ((last["nodes"][n]["RssAnon"] - half["nodes"][n]["RssAnon"])
                    / max(1, last["entries"] - half["entries"]) * 100_000)
        growth[n] = {"private_mib_per_100k_entries": round(per_100k, 2),
                     "vs_first_round": round(per_100k / samples[0]["nodes"][n]["RssAnon"], 4)}
        print(f"{n}: private memory grew {per_100k:+.1f} MiB per 100,000 entries over the second "
              f"half ({per_100k / samples[0]['nodes'][n]['RssAnon']:+.3f}x its size after the first "
              f"round); file-backed {last['nodes'][n]['RssFile']:.0f} MiB")
    path = write_json("memory", {"leader": leader.name, "samples": samples, "growth": growth,
                                 "requests": args.requests})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
