"""The tcp provider between network namespaces (one per replica): partitions (a host cut off,
two hosts cut from each other, a host that hears no one), and injected transport faults (drop,
delay, duplicate, cut) under a concurrent propose load."""

from __future__ import annotations

import json
import time

import pytest

from tests.consensus_cluster import Cluster, Load, check_history, settle
from tests.consensus_harness import Client
from tests.netns import Hosts


@pytest.fixture
def hosts5():
    with Hosts(5) as h:
        yield h


def _inject(c: Cluster, name: str, spec: dict) -> None:
    cl = Client(c.reps[name].socket_path)
    assert cl.call("F " + json.dumps(spec)) == "OK"
    cl.close()


@pytest.mark.parametrize("n", [3, 5])
def test_partition_leader_and_heal(hosts5: Hosts, n: int) -> None:
    with Cluster(n, "tcp", "fsync", hosts=hosts5.addrs[:n], netns=hosts5.names[:n]) as c:
        c.start()
        old = c.leader()
        k = c.names.index(old)
        with Load(c, threads=4) as load:
            load.wait_acks(100)
            hosts5.link_down(k)
            new = c.leader(exclude={old})
            load.wait_acks(100)
            hosts5.link_up(k)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                st = c.reps[old].status()
                if st and st["role"] == "follower" and st["leader"] is not None:
                    break
                time.sleep(0.05)
            else:
                raise AssertionError(f"{old} did not rejoin: {c.statuses()}")
            assert new in c.names
            load.wait_acks(100)
        settle(c, load)
        check_history(c, load.acked, require_all=c.names)


def test_dropped_delayed_duplicated_and_cut_messages(hosts5: Hosts) -> None:
    with Cluster(3, "tcp", "memory", hosts=hosts5.addrs[:3], netns=hosts5.names[:3]) as c:
        c.start()
        c.leader()
        with Load(c, threads=6) as load:
            load.wait_acks(50)
            for i, name in enumerate(c.names):
                _inject(c, name, {"drop": 0.05, "delay": 0.002, "duplicate": 0.1, "seed": i})
            load.wait_acks(300, timeout=60)
            for name in c.names:  # break every connection at once, twice
                _inject(c, name, {"drop": 0.05, "delay": 0.002, "duplicate": 0.1, "cut": True})
            load.wait_acks(100, timeout=60)
            _inject(c, c.leader(), {"cut": True})
            load.wait_acks(100, timeout=60)
            for name in c.names:
                _inject(c, name, {})
            load.wait_acks(50)
        settle(c, load)
        check_history(c, load.acked, require_all=c.names)
        # the cuts really broke connections: every replica reconnected beyond its first 2 + 2
        for r in c.reps.values():
            assert r.stderr_tail(10**7).count("connected (epoch") > 4


def test_isolated_follower_does_not_raise_the_ballot(hosts5: Hosts) -> None:
    # pre-vote: a follower cut off for many election timeouts keeps its ballot, so healing it
    # does not force an election (the rest of the cluster may still change leaders on its own)
    with Cluster(3, "tcp", "fsync", hosts=hosts5.addrs[:3], netns=hosts5.names[:3]) as c:
        c.start()
        lead = c.leader()
        k = next(i for i, n in enumerate(c.names) if n != lead)
        lone = c.names[k]
        with Load(c, threads=2) as load:
            load.wait_acks(50)
            hosts5.link_down(k)
            before = c.reps[lone].status()
            time.sleep(2.0)  # about seven election timeouts alone
            after = c.reps[lone].status()
            assert after["ballot"] == before["ballot"], (before, after)
            assert after["role"] != "leader"
            hosts5.link_up(k)
            load.wait_acks(100)
        settle(c, load)
        check_history(c, load.acked, require_all=c.names)


def test_leader_cut_from_one_follower_keeps_leading_through_the_other(hosts5: Hosts) -> None:
    # a partial partition: the leader and one follower cannot reach each other, the third node
    # reaches both. The leader keeps its majority; the cut follower's pre-votes are refused by the
    # node that still hears the leader, so no ballot rises; healed, it catches up.
    with Cluster(3, "tcp", "fsync", hosts=hosts5.addrs[:3], netns=hosts5.names[:3]) as c:
        c.start()
        lead = c.leader()
        i = c.names.index(lead)
        k = next(j for j, n in enumerate(c.names) if n != lead)
        cut = c.names[k]
        with Load(c, threads=4) as load:
            load.wait_acks(50)
            ballots = {n: s["ballot"] for n, s in c.statuses().items()}
            hosts5.block(i, k)
            hosts5.block(k, i)
            load.wait_acks(200)
            time.sleep(2.0)  # about seven election timeouts cut
            load.wait_acks(100)
            st = c.statuses()
            assert st[lead]["role"] == "leader", st
            assert {n: s["ballot"] for n, s in st.items()} == ballots, st
            assert st[cut]["role"] != "leader", st
            hosts5.unblock_all()
            load.wait_acks(100)
        settle(c, load)
        check_history(c, load.acked, require_all=c.names)


def test_leader_that_hears_no_peer_steps_down_and_another_is_elected(hosts5: Hosts) -> None:
    # one-way: what the leader sends still arrives, nothing sent to it does. It can commit nothing,
    # so it must give up leading (it hears no majority) rather than hold the group.
    with Cluster(3, "tcp", "fsync", hosts=hosts5.addrs[:3], netns=hosts5.names[:3]) as c:
        c.start()
        old = c.leader()
        i = c.names.index(old)
        with Load(c, threads=4) as load:
            load.wait_acks(50)
            for j in range(3):
                if j != i:
                    hosts5.block(j, i)
            new = c.leader(exclude={old})
            load.wait_acks(100)
            deadline = time.monotonic() + 30
            while (c.reps[old].status() or {}).get("role") == "leader":
                assert time.monotonic() < deadline, f"{old} still leads, deaf: {c.statuses()}"
                time.sleep(0.05)
            hosts5.unblock_all()
            deadline = time.monotonic() + 30
            while (c.reps[old].status() or {}).get("leader") is None:
                assert time.monotonic() < deadline, f"{old} did not rejoin: {c.statuses()}"
                time.sleep(0.05)
            assert new in c.names
            load.wait_acks(100)
        settle(c, load)
        check_history(c, load.acked, require_all=c.names)
