"""Faults under a concurrent propose load (shm provider), each followed by the history checker."""

from __future__ import annotations

import time

from consensus import codec
from tests.consensus_cluster import Cluster, Load, check_history, settle
from tests.procs import wait_until


def test_kill_leader() -> None:
    with Cluster(3, "shm", "fsync") as c:
        c.start()
        lead = c.leader()
        with Load(c, threads=6) as load:
            load.wait_acks(200)
            c.reps[lead].kill()
            new = c.leader(exclude={lead})
            assert new != lead
            load.wait_acks(200)
            c.reps[lead].start()
            load.wait_acks(100)
        settle(c, load)
        check_history(c, load.acked, require_all=c.names)


def test_kill_follower_and_restart_from_data_dir() -> None:
    with Cluster(5, "shm", "fsync") as c:
        c.start()
        lead = c.leader()
        victims = [x for x in c.names if x != lead][:2]
        with Load(c, threads=6) as load:
            load.wait_acks(100)
            for v in victims:  # a minority of 5 may be down at once
                c.reps[v].kill()
            load.wait_acks(200)
            for v in victims:
                c.reps[v].start()
            load.wait_acks(200)
        settle(c, load)
        check_history(c, load.acked, require_all=c.names)


def test_kill_all_and_restart_loses_nothing_acknowledged() -> None:
    with Cluster(3, "shm", "fsync") as c:
        c.start()
        c.leader()
        with Load(c, threads=8) as load:
            load.wait_acks(300)
            for r in c.reps.values():  # all at once, mid-load
                r.kill()
        load.stop()
        acked_before = dict(load.acked)
        for r in c.reps.values():
            r.start()
        c.leader()
        with Load(c, threads=4) as load2:
            load2.wait_acks(50)
        settle(c, load2)
        both = {**acked_before, **load2.acked}
        check_history(c, both, require_all=c.names)


def test_torn_entry_writes_are_never_applied() -> None:
    # every replica tears 20% of its entry-carrying writes: the tail never reaches the peer
    with Cluster(3, "shm", "memory", env={"CONSENSUS_FAULT_TORN_WRITES": "0.2"}) as c:
        c.start()
        c.leader()
        with Load(c, threads=4) as load:
            load.wait_acks(300, timeout=60)
        settle(c, load)
        check_history(c, load.acked, require_all=c.names)
        torn = sum(r.stderr_tail(10**7).count("bad frame") for r in c.reps.values())
        assert torn > 0


def test_torn_tail_on_disk_is_truncated_and_corrupt_segment_is_refused() -> None:
    with Cluster(3, "shm", "fsync") as c:
        c.start()
        lead = c.leader()
        a, b = [x for x in c.names if x != lead]
        with Load(c, threads=4) as load:
            load.wait_acks(200)
            c.reps[a].kill()
            c.reps[b].kill()
        load.stop()
        # a: a crash mid-append leaves half a record at the end of its last segment
        seg_a = sorted((c.dir / f"data-{a}" / "log").glob("seg-*.log"))[-1]
        last = codec.encode(codec.Entry(10**6, 1, codec.KIND_DATA, b"x" * 100))
        with open(seg_a, "ab") as f:
            f.write(last[:60])
        # b: a flipped byte in the middle of a segment
        seg_b = sorted((c.dir / f"data-{b}" / "log").glob("seg-*.log"))[0]
        raw = bytearray(seg_b.read_bytes())
        _, off = codec.decode(raw, 0)
        raw[off + 9] ^= 0xFF  # the second record's ballot
        seg_b.write_bytes(bytes(raw))
        c.reps[a].start()
        proc_b = c.reps[b]
        try:
            proc_b.start()
        except RuntimeError:
            pass
        deadline = time.monotonic() + 15
        while proc_b.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not proc_b.alive(), "a replica started on a corrupt segment"
        err = proc_b.stderr_tail(10**6)
        assert f"corrupt log segment {seg_b} at offset {off}" in err, err[-2000:]
        assert "torn tail" in c.reps[a].stderr_tail(10**6)
        c.leader()
        with Load(c, threads=4) as load2:
            load2.wait_acks(100)
        settle(c, load2, names=[lead, a])
        check_history(c, {**load.acked, **load2.acked}, require_all=[lead, a])


def test_a_follower_sees_a_dead_peer_unreachable_and_reconnects_once_it_restarts() -> None:
    """Followers send each other nothing until an election, so a connection to a dead peer must
    be found dead and rebuilt without a send: else the first vote sent to the restarted peer
    is lost."""
    with Cluster(3, "shm", "fsync") as c:
        c.start()
        lead = c.leader()
        dead, watcher = sorted(n for n in c.names if n != lead)

        def reachable() -> bool | None:
            """None while the watcher's status does not answer (a busy machine)."""
            doc = c.reps[watcher].status()
            return None if doc is None else doc["peers"][dead]["reachable"]

        wait_until(lambda: reachable() is True, 10, f"{watcher} to reach {dead}")
        c.reps[dead].kill()
        wait_until(lambda: reachable() is False, 10, f"{watcher} to see {dead} unreachable once killed")
        c.reps[dead].start()
        wait_until(lambda: reachable() is True, 10, f"{watcher} to reach {dead} again once restarted")
