"""Three network-namespace hosts over tcp with a VIP: clients use only the VIP, before and after
the leader's host is cut off; every write acknowledged before the cut is on the new leader; the
old leader drops the VIP; healed, it keeps its copy and converges without a restart."""

from __future__ import annotations

import threading
import time

import redis as redis_py

from supervise.vip import LEASE_SECONDS

from .netns import enter_netns
from .netns_cluster import SERVER_PORT, NetnsCluster
from .procs import wait_until


def _writer(cluster: NetnsCluster, index: int, acked: list[str], stop: threading.Event) -> None:
    """Unique keys through the VIP only; a write whose outcome is unknown is never retried."""
    enter_netns(cluster.client_ns)
    client = None
    seq = 0
    while not stop.is_set():
        key = f"v{index}:{seq}"
        seq += 1
        try:
            if client is None:
                client = redis_py.Redis(host=cluster.service_addr, port=SERVER_PORT, socket_timeout=2,
                                        socket_connect_timeout=1)
            client.set(key, seq)
            acked.append(key)
        except (redis_py.ConnectionError, redis_py.TimeoutError, OSError):
            if client is not None:
                client.close()
            client = None
            time.sleep(0.05)
    if client is not None:
        client.close()


def test_clients_use_only_the_vip_before_and_after_the_leaders_host_is_cut_off():
    with NetnsCluster(vip=True) as cluster:
        try:
            old = cluster.start(timeout=120)
            wait_until(lambda: cluster.vip_holders() == [old.name], 10, "the leader did not take the VIP")
            acked: list[str] = []
            stop = threading.Event()
            writers = [threading.Thread(target=_writer, args=(cluster, i, acked, stop)) for i in range(4)]
            for w in writers:
                w.start()
            try:
                wait_until(lambda: len(acked) >= 200, 30, "no writes through the VIP")
                cluster.partition(old)
                before_cut = list(acked)
                new = cluster.wait_leader(timeout=30, exclude=(old.name,))
                wait_until(lambda: len(acked) >= len(before_cut) + 200, 30,
                      "clients did not go on through the VIP after the cut")
            finally:
                stop.set()
                for w in writers:
                    w.join(30)
            print(f"leader {old.name} cut off; {new.name} leads; {len(before_cut)} writes acknowledged "
                  f"before the cut, {len(acked)} in all")

            # the new leader has every acknowledged write, read through the VIP
            values = cluster.redis_call(cluster.service_addr, "MGET", *acked, timeout=10)
            missing = [k for k, v in zip(acked, values, strict=True) if v is None]
            assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:5]}"
            assert all(k in set(acked) for k in before_cut)

            # the old leader lost its majority and dropped the VIP, but keeps its copy
            wait_until(lambda: cluster.vip_holders() == [new.name], 20,
                  f"VIP holders {cluster.vip_holders()}, expected only {new.name}")
            assert old.supervisor.poll() is None

            # healed, it lets the log decide what it held, follows and converges, not restarted
            cluster.heal(old)
            cluster.wait_applied(timeout=60)
            assert old.supervisor.poll() is None
            docs = cluster.statuses()
            assert all(d is not None and not d["diverged"] for d in docs.values()), docs
            snaps = {n.name: cluster.snapshot(n, acked) for n in cluster.nodes}
            assert snaps[old.name] == snaps[new.name]
            assert cluster.vip_holders() == [new.name]
        except BaseException:
            print(cluster.logs())
            raise


def test_a_leader_killed_with_9_loses_the_vip_when_its_lease_runs_out():
    with NetnsCluster(vip=True) as cluster:
        try:
            old = cluster.start(timeout=120)
            wait_until(lambda: cluster.vip_holders() == [old.name], 10, "the leader did not take the VIP")
            cluster.kill(old, what="supervisor")
            new = cluster.wait_leader(timeout=30, exclude=(old.name,))
            wait_until(lambda: cluster.vip_holders() == [new.name], LEASE_SECONDS + 5,
                  f"VIP holders {cluster.vip_holders()}, expected only {new.name}")
        except BaseException:
            print(cluster.logs())
            raise
