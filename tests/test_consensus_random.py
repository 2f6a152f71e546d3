"""A seeded random schedule of faults against 5 replicas on tcp between network namespaces, under
a concurrent propose load, for a bounded time; then the history checker.

Replay a failure with ``CONSENSUS_SEED=<seed printed below>``; ``CONSENSUS_RANDOM_SECONDS`` sets
the duration (default 40).
"""

from __future__ import annotations

import json
import os
import random
import time

from tests.consensus_cluster import Cluster, Load, check_history, settle
from tests.consensus_harness import Client
from tests.netns import Hosts


def _call(c: Cluster, name: str, line: str) -> str | None:
    try:
        cl = Client(c.reps[name].socket_path, timeout=10)
        try:
            return cl.call(line)
        finally:
            cl.close()
    except (OSError, ConnectionError):
        return None


def test_random_fault_schedule() -> None:
    seed = int(os.environ.get("CONSENSUS_SEED") or random.randrange(1 << 32))
    duration = float(os.environ.get("CONSENSUS_RANDOM_SECONDS", "40"))
    print(f"CONSENSUS_SEED={seed}")
    rng = random.Random(seed)
    log: list[str] = []
    with Hosts(5) as hosts, Cluster(5, "tcp", "fsync", hosts=hosts.addrs, netns=hosts.names,
                                    env={"CONSENSUS_FAULT_TORN_WRITES": "0.01"}) as c:
        c.start()
        c.leader()
        killed: set[str] = set()
        cut_off: set[int] = set()
        names = c.names
        try:
            with Load(c, threads=6) as load:
                end = time.monotonic() + duration
                while time.monotonic() < end:
                    down = len(killed) + len(cut_off)
                    st = {n: s for n, s in c.statuses().items() if s}
                    leaders = [n for n, s in st.items() if s["role"] == "leader"]
                    lead = leaders[0] if leaders else None
                    choice = rng.choice(["kill", "kill_leader", "restart", "partition", "heal", "faults",
                                         "cut", "clear", "step_down", "kill_all"] if down < 2 else
                                        ["restart", "heal", "clear", "restart", "heal"])
                    t = round(time.monotonic() - end + duration, 2)
                    if choice in ("kill", "kill_leader") and down < 2:
                        pool = [lead] if choice == "kill_leader" and lead else \
                            [n for n in names if n not in killed]
                        victim = rng.choice(pool)
                        c.reps[victim].kill()
                        killed.add(victim)
                        log.append(f"{t} kill {victim}")
                    elif choice == "restart" and killed:
                        back = rng.choice(sorted(killed))
                        c.reps[back].start()
                        killed.discard(back)
                        log.append(f"{t} restart {back}")
                    elif choice == "partition" and down < 2:
                        i = rng.randrange(5)
                        if i not in cut_off:
                            hosts.link_down(i)
                            cut_off.add(i)
                            log.append(f"{t} partition {names[i]}")
                    elif choice == "heal" and cut_off:
                        i = rng.choice(sorted(cut_off))
                        hosts.link_up(i)
                        cut_off.discard(i)
                        log.append(f"{t} heal {names[i]}")
                    elif choice in ("faults", "cut", "clear"):
                        who = rng.choice([n for n in names if n not in killed])
                        spec = {"faults": {"drop": rng.choice([0.01, 0.05]), "delay": rng.choice([0, 0.002]),
                                           "duplicate": 0.05, "seed": rng.randrange(1000)},
                                "cut": {"cut": True}, "clear": {}}[choice]
                        _call(c, who, "F " + json.dumps(spec))
                        log.append(f"{t} {choice} {who}")
                    elif choice == "step_down" and lead:
                        _call(c, lead, "D 2")
                        log.append(f"{t} step_down {lead}")
                    elif choice == "kill_all" and rng.random() < 0.3:
                        for r in c.reps.values():
                            r.kill()
                        for r in c.reps.values():
                            r.start()
                        killed.clear()
                        log.append(f"{t} kill_all+restart")
                    time.sleep(rng.uniform(0.2, 1.2))
                for i in sorted(cut_off):
                    hosts.link_up(i)
                for n in sorted(killed):
                    c.reps[n].start()
                for n in names:
                    _call(c, n, "F {}")
                log.append("healed everything")
                c.leader(timeout=30)
                load.wait_acks(100, timeout=60)
            settle(c, load)
            check_history(c, load.acked, require_all=names)
            assert len(load.acked) > 200
        except BaseException:
            print(f"CONSENSUS_SEED={seed} schedule:\n" + "\n".join(log))
            raise
        print(f"CONSENSUS_SEED={seed}: {len(load.acked)} acknowledged of {load.attempts} attempts; "
              f"schedule: {'; '.join(log)}")
