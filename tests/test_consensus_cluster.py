"""Replica clusters in separate processes over the shm provider: replication, redirection,
hand-over, durability settings and catch-up from segment files."""

from __future__ import annotations

import os

import pytest

from tests.consensus_cluster import Cluster, Load, check_history, settle
from tests.consensus_harness import Client


@pytest.mark.parametrize("n", [3, 5])
def test_replicates_in_order_and_redirects(n: int) -> None:
    with Cluster(n, "shm", "fsync") as c:
        c.start()
        lead = c.leader()
        other = next(x for x, st in c.statuses().items() if x != lead and st and st["leader"] == lead)
        cl = Client(c.reps[other].socket_path)
        assert cl.propose(b"to a follower") == ("NL", lead)
        cl.close()
        with Load(c, threads=4) as load:
            load.wait_acks(300)
        settle(c, load)
        top = check_history(c, load.acked, require_all=c.names)
        assert top >= 300
        st = c.statuses()
        assert {s["applied"] for s in st.values() if s} == {top}
        lag = st[lead]["peers"]
        assert all(p["reachable"] and p["match_index"] == top for p in lag.values())
        if n == 3:
            _check_metrics(c, lead, top)


def _check_metrics(c: Cluster, lead: str, top: int) -> None:
    import json
    import time

    r = f'replica="{lead}"'
    deadline = time.monotonic() + 20
    while True:  # index gauges are refreshed by the timer thread
        cl = Client(c.reps[lead].socket_path)
        text = json.loads(cl.call("M"))
        cl.close()
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, val = line.rpartition(" ")
                name, _, labels = key.partition("{")
                values[name + "{" + ",".join(sorted(labels.rstrip("}").split(","))) + "}"] = float(val)
        if values.get(f"supervise_consensus_applied_index{{{r}}}") == top or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert values[f'supervise_consensus_role{{{r},role="leader"}}'] == 1
    assert values[f'supervise_consensus_role{{{r},role="follower"}}'] == 0
    assert values[f"supervise_consensus_ballot{{{r}}}"] > 0
    assert values[f"supervise_consensus_leader_changes_total{{{r}}}"] >= 1
    assert values[f"supervise_consensus_proposals_total{{{r}}}"] >= 300
    assert values[f"supervise_consensus_commits_total{{{r}}}"] >= top
    assert values[f"supervise_consensus_commit_index{{{r}}}"] == top
    assert values[f"supervise_consensus_applied_index{{{r}}}"] == top
    assert values[f"supervise_consensus_durable_index{{{r}}}"] == top
    assert values[f"supervise_consensus_commit_latency_seconds_count{{{r}}}"] >= 300
    assert values[f"supervise_consensus_batch_size_count{{{r}}}"] > 0
    for p in c.names:
        if p != lead:
            assert values[f'supervise_consensus_peer_reachable{{peer="{p}",{r}}}'] == 1
            assert values[f'supervise_consensus_replication_lag_entries{{peer="{p}",{r}}}'] == 0


def test_step_down_hands_over_and_memory_durability() -> None:
    with Cluster(3, "shm", "memory") as c:
        c.start()
        lead = c.leader()
        with Load(c, threads=4) as load:
            load.wait_acks(100)
            cl = Client(c.reps[lead].socket_path)
            assert cl.call("D 5") == "OK 1"
            cl.close()
            new = c.leader(exclude={lead})
            assert new != lead
            load.wait_acks(100)
        settle(c, load)
        check_history(c, load.acked, require_all=c.names)
        # on_role_change saw the hand-over on both sides, with growing ballots
        old_roles, new_roles = c.reps[lead].roles(), c.reps[new].roles()
        first_lead = next(k for k, (r, _, _) in enumerate(old_roles) if r == "leader")
        assert any(r == "follower" for r, _, _ in old_roles[first_lead:])
        old_ballot = old_roles[first_lead][1]
        assert any(r == "leader" and b > old_ballot and who == new for r, b, who in new_roles)


def test_catch_up_beyond_the_log_region_from_segment_files() -> None:
    # 256 KiB log region: the lagging replica misses ~4 MiB, far more than any region or cache holds
    with Cluster(3, "shm", "fsync", log_region_bytes=256 << 10) as c:
        c.start()
        c.leader()
        victim = c.names[2]
        c.reps[victim].kill()
        lead = c.leader()
        cl = Client(c.reps[lead].socket_path)
        acked = {}
        for k in range(2000):
            payload = b"%05d-" % k + os.urandom(1000)
            verdict, idx = cl.propose(payload)
            assert verdict == "OK"
            acked[payload] = int(idx)
        cl.close()
        c.reps[victim].start()
        top = max(acked.values())
        c.wait_applied(top, [victim], timeout=60)
        check_history(c, acked, require_all=c.names)


def test_resident_memory_does_not_grow_with_the_log() -> None:
    with Cluster(3, "shm", "memory", log_region_bytes=1 << 20, record=False) as c:
        c.start()
        lead = c.leader()
        cl = Client(c.reps[lead].socket_path)
        payload = os.urandom(16 << 10)

        def write(mib: int) -> None:
            for _ in range(mib * 64):
                assert cl.propose(payload)[0] == "OK"

        write(8)
        c.wait_applied(8 * 64)
        base = {n: s["rss"] for n, s in c.statuses().items()}
        write(32)
        c.wait_applied(40 * 64)
        after = {n: s["rss"] for n, s in c.statuses().items()}
        cl.close()
        for n in c.names:  # 32 MiB more log on disk, resident memory about flat
            assert after[n] - base[n] < 12 << 20, (n, base[n], after[n])
            log_bytes = sum(p.stat().st_size for p in (c.dir / f"data-{n}" / "log").glob("seg-*"))
            assert log_bytes > 40 << 20
