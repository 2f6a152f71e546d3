"""Power cuts: every replica's log on a disk that keeps only what fsync made durable
(tests/power_cut_fs.py), all three losing power at once mid-load, again and again, or one or
two at a time while the others go on. With ``durability = "fsync"`` nothing acknowledged is
lost and every replica starts again from what its disk kept; with ``"memory"`` the same cut
loses what was acknowledged (what that setting trades away)."""

from __future__ import annotations

import random
from pathlib import Path

from tests.consensus_cluster import Cluster, Load, check_history, settle
from tests.power_cut_fs import PowerCutDisk, power_cut_disks


def _on_power_cut_disks(c: Cluster):
    def kill_replicas() -> None:
        for r in c.reps.values():
            r.kill()

    return power_cut_disks([c.dir / f"data-{name}" for name in c.names], kill_replicas)


def _cut_everything(c: Cluster, disks: list[PowerCutDisk]) -> None:
    for disk in disks:
        disk.power_off()
    for r in c.reps.values():
        r.kill()
    for disk in disks:
        disk.power_on()


def _log_files(data_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(data_dir)) for p in data_dir.rglob("*") if p.is_file())


def test_acknowledged_entries_survive_every_replica_losing_power_at_once_again_and_again() -> None:
    # small segments, so that cuts also fall around a new segment's creation
    with Cluster(3, "shm", "fsync", segment_bytes=16 << 10) as c, _on_power_cut_disks(c) as disks:
        c.start()
        c.leader()
        acked: dict[bytes, int] = {}
        for _ in range(4):
            with Load(c, threads=8) as load:
                load.wait_acks(300)
                _cut_everything(c, disks)  # mid-load
            load.stop()
            acked.update(load.acked)
            for r in c.reps.values():
                r.start()
            c.leader(timeout=30)
        with Load(c, threads=4) as load:
            load.wait_acks(50)
        settle(c, load)
        acked.update(load.acked)
        assert len(acked) >= 1250
        check_history(c, acked, require_all=c.names)
        segments = [f for f in _log_files(c.dir / "data-r0") if f.startswith("log/seg-")]
        assert len(segments) > 2, segments


def test_replicas_that_lose_power_one_or_two_at_a_time_rejoin_from_what_their_disks_kept() -> None:
    rng = random.Random(5)
    with Cluster(3, "shm", "fsync", segment_bytes=16 << 10) as c, _on_power_cut_disks(c) as disks:
        c.start()
        c.leader()
        disk_of = dict(zip(c.names, disks, strict=True))
        with Load(c, threads=8) as load:
            for k in range(9):
                load.wait_acks(150)
                leader = c.leader()
                # in turn: the leader; any one; a majority, the leader among them
                victims = [[leader], [rng.choice(c.names)],
                           [leader, rng.choice([n for n in c.names if n != leader])]][k % 3]
                for victim in victims:
                    disk_of[victim].power_off()
                for victim in victims:
                    c.reps[victim].kill()
                    disk_of[victim].power_on()
                    c.reps[victim].start()
        settle(c, load)
        assert len(load.acked) >= 1200
        check_history(c, load.acked, require_all=c.names)


def test_with_memory_durability_a_power_cut_loses_what_was_acknowledged() -> None:
    with Cluster(3, "shm", "memory") as c, _on_power_cut_disks(c) as disks:
        c.start()
        c.leader()
        with Load(c, threads=8) as load:
            load.wait_acks(300)
        load.stop()
        assert all(any(f.startswith("log/seg-") for f in _log_files(Path(r.spec["data_dir"])))
                   for r in c.reps.values())
        _cut_everything(c, disks)
        kept = {r.name: _log_files(Path(r.spec["data_dir"])) for r in c.reps.values()}
        assert not any(kept.values()), kept  # nothing was ever synced, not even a file's name
        for r in c.reps.values():
            r.start()
        c.leader(timeout=30)
        st = c.statuses()
        assert all(s is not None and s["last"] < len(load.acked) for s in st.values()), st

