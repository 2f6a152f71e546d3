"""All three machines lose power at once under writers: every node's `data_dir` on a disk that
keeps only what fsync made durable (tests/power_cut_fs.py), every supervisor and server killed.
Restarted with fresh, empty servers, the nodes elect a leader whose copy holds every write a client
saw acknowledged, and the copies agree; also with leaders holding outputs instead of inputs."""

from __future__ import annotations

import threading
import time

import pytest
import redis as redis_py

from supervise.localcluster import LocalCluster

from .power_cut_fs import power_cut_disks
from .workload import assert_copies_answer_alike


def _writers_until_cut(port: int, acked: list[str], stop: threading.Event) -> list[threading.Thread]:
    """Writers of unique keys through one leader, each until its connection fails."""

    def write(i: int) -> None:
        client = redis_py.Redis(port=port, socket_timeout=5, protocol=2)
        seq = 0
        try:
            while not stop.is_set():
                client.set(f"w{i}:{seq}", seq)
                acked.append(f"w{i}:{seq}")
                seq += 1
        except redis_py.RedisError:
            pass  # the power went: that write's outcome is unknown

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    return threads


@pytest.mark.parametrize("hold", ["inputs", "outputs"])
def test_every_write_acknowledged_before_all_three_machines_lose_power_is_kept(hold):
    # holding outputs, a leader's server runs an input before it is logged: its reply waits
    with LocalCluster(n=3, server="redis", transport="shm", durability="fsync", hold=hold) as cluster:

        def kill_all() -> None:
            for node in cluster.nodes:
                cluster.kill(node)

        data_dirs = [cluster.workdir / f"{n.name}-data" for n in cluster.nodes]
        with power_cut_disks(data_dirs, kill_all) as disks:
            try:
                cluster.start(timeout=120)
                acked: list[str] = []
                stop = threading.Event()
                writers = _writers_until_cut(cluster.wait_leader().server_port, acked, stop)
                try:
                    while len(acked) < 500 and all(w.is_alive() for w in writers):
                        time.sleep(0.02)
                    for disk in disks:  # mid-write
                        disk.power_off()
                    kill_all()
                    for disk in disks:
                        disk.power_on()
                finally:
                    stop.set()
                    for w in writers:
                        w.join(30)
                assert len(acked) >= 500
                for node in cluster.nodes:
                    cluster.restart(node)  # a fresh, empty server
                leader = cluster.wait_leader(timeout=120)
                cluster.wait_applied(timeout=120)
                values = redis_py.Redis(port=leader.server_port, protocol=2).mget(acked)
                missing = [k for k, v in zip(acked, values, strict=True) if v is None]
                assert not missing, f"{len(missing)} of {len(acked)} acknowledged writes lost: {missing[:5]}"
                assert all(not n.status()["diverged"] for n in cluster.nodes)
                assert_copies_answer_alike(cluster, leader, "DEBUG", "DIGEST")
            except BaseException:
                print(cluster.logs())
                raise
