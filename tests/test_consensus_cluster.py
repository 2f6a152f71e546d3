"""Replica clusters in separate processes over the shm provider: replication, redirection,
hand-over, durability settings and catch-up from segment files."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from tests.consensus_cluster import Cluster, Load, Proposer, check_history, settle
from tests.consensus_harness import Client
from tests.procs import cpu_seconds


def _converged(c: Cluster, timeout: float = 30) -> tuple[str, dict]:
    """Wait until one leader sees every peer caught up and every replica applied its log.
    (On a starved host a spurious election may append a no-op at any time: compare with a
    snapshot that is consistent in itself, not with an earlier figure.)"""
    deadline = time.monotonic() + timeout
    while True:
        st = c.statuses()
        leads = [n for n, s in st.items() if s and s["role"] == "leader"]
        if len(leads) == 1 and all(st.values()):
            last = st[leads[0]]["last"]
            if all(s["applied"] == last for s in st.values()) and \
                    all(p["match_index"] == last for p in st[leads[0]]["peers"].values()):
                return leads[0], st
        if time.monotonic() > deadline:
            raise TimeoutError(f"no convergence: {st}")
        time.sleep(0.05)


def _metrics(c: Cluster, name: str) -> dict[str, float]:
    cl = Client(c.reps[name].socket_path)
    text = json.loads(cl.call("M"))
    cl.close()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, val = line.rpartition(" ")
            metric, _, labels = key.partition("{")
            values[metric + "{" + ",".join(sorted(labels.rstrip("}").split(","))) + "}"] = float(val)
    return values


@pytest.mark.parametrize("n", [3, 5])
def test_replicates_in_order_and_redirects(n: int) -> None:
    with Cluster(n, "shm", "fsync") as c:
        c.start()
        lead, st = _converged(c)
        other = next(x for x in c.names if x != lead)
        cl = Client(c.reps[other].socket_path)
        verdict, leader_named = cl.propose(b"to a follower")
        cl.close()
        assert verdict == "NL" and leader_named in c.names
        with Load(c, threads=4) as load:
            load.wait_acks(300)
        settle(c, load)
        top = check_history(c, load.acked, require_all=c.names)
        assert top >= 300
        lead, st = _converged(c)
        assert all(p["reachable"] for p in st[lead]["peers"].values())
        if n == 3:
            _check_metrics(c, len(load.acked))


def _check_metrics(c: Cluster, acked: int) -> None:
    deadline = time.monotonic() + 30
    while True:  # until the status and the metrics (read a moment apart) agree
        lead, st = _converged(c)
        values = {n: _metrics(c, n) for n in c.names}
        r, last = f'replica="{lead}"', st[lead]["last"]
        fresh = [values[n].get(f'supervise_consensus_applied_index{{replica="{n}"}}') == st[n]["applied"]
                 for n in c.names]
        fresh += [values[lead].get(f"supervise_consensus_{g}{{{r}}}") == last
                  for g in ("commit_index", "durable_index", "commits_total")]
        if all(fresh) and _converged(c)[1][lead]["last"] == last:
            break
        assert time.monotonic() < deadline, (st, values)
        time.sleep(0.2)

    def total(metric: str) -> float:
        return sum(values[n][f'{metric}{{replica="{n}"}}'] for n in c.names)

    v = values[lead]
    assert v[f'supervise_consensus_role{{{r},role="leader"}}'] == 1
    assert v[f'supervise_consensus_role{{{r},role="follower"}}'] == 0
    assert v[f"supervise_consensus_ballot{{{r}}}"] == st[lead]["ballot"]
    assert v[f"supervise_consensus_commit_index{{{r}}}"] == last
    assert v[f"supervise_consensus_durable_index{{{r}}}"] == last
    assert v[f"supervise_consensus_commits_total{{{r}}}"] == last
    assert total("supervise_consensus_leader_changes_total") >= 1
    assert total("supervise_consensus_proposals_total") >= acked
    assert total("supervise_consensus_commit_latency_seconds_count") >= acked
    assert total("supervise_consensus_batch_size_count") > 0
    for p in c.names:
        if p != lead:
            assert v[f'supervise_consensus_peer_reachable{{peer="{p}",{r}}}'] == 1
            assert v[f'supervise_consensus_replication_lag_entries{{peer="{p}",{r}}}'] == 0


def test_step_down_hands_over_and_memory_durability() -> None:
    with Cluster(3, "shm", "memory") as c:
        c.start()
        lead = c.leader()
        with Load(c, threads=4) as load:
            load.wait_acks(100)
            cl = Client(c.reps[lead].socket_path)
            assert cl.call("D 20") == "OK 1"
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


def test_step_down_to_a_named_peer_hands_leadership_to_that_peer() -> None:
    with Cluster(3, "shm", "memory") as c:
        c.start()
        lead = c.leader()
        with Load(c, threads=4) as load:
            for to in [n for n in c.names if n != lead] * 2:  # each follower, twice over
                load.wait_acks(100)
                cl = Client(c.reps[lead].socket_path)
                assert cl.call(f"D 20 {to}") == "OK 1"
                cl.close()
                assert c.leader(exclude={lead}) == to
                lead = to
            load.wait_acks(100)
        settle(c, load)
        check_history(c, load.acked, require_all=c.names)


def test_proposals_made_during_a_hand_over_that_times_out_are_committed_by_the_leader() -> None:
    # the named successor is stopped (SIGSTOP) just after it was last heard, so it never catches
    # up: the hand-over is abandoned, and what was proposed meanwhile is appended, not refused
    with Cluster(3, "shm", "memory") as c:
        c.start()
        lead = c.leader()
        to = next(n for n in c.names if n != lead)
        stepper, proposer = Client(c.reps[lead].socket_path), Client(c.reps[lead].socket_path)
        assert proposer.propose(b"before")[0] == "OK"
        os.killpg(c.reps[to].proc.pid, signal.SIGSTOP)
        try:
            answers: list[str] = []
            thread = threading.Thread(target=lambda: answers.append(stepper.call(f"D 1.0 {to}")))
            thread.start()
            time.sleep(0.3)
            verdict, index = proposer.propose(b"during")
            thread.join(10)
        finally:
            os.killpg(c.reps[to].proc.pid, signal.SIGCONT)
        # the leader led on and committed it (that the resumed peer then lets leadership be is
        # test_a_successor_resumed_after_its_hand_over_timed_out_does_not_take_over)
        assert answers == ["OK 0"]
        assert verdict == "OK", (verdict, index)
        stepper.close()
        proposer.close()
        c.wait_applied(int(index))
        check_history(c, {b"during": int(index)}, require_all=c.names)


def test_a_successor_resumed_after_its_hand_over_timed_out_does_not_take_over() -> None:
    # stopped once caught up, it was told to take over every few ms until the leader gave up;
    # resumed, it finds the requests queued, and behind them the entry the leader appended as
    # it led on: it lets leadership be
    with Cluster(3, "shm", "memory") as c:
        c.start()
        lead = c.leader()
        to = next(n for n in c.names if n != lead)
        ballot = c.reps[lead].status()["ballot"]
        stepper = Client(c.reps[lead].socket_path)
        verdict, first = stepper.propose(b"before")
        assert verdict == "OK", (verdict, first)
        c.wait_applied(c.reps[lead].status()["last"], [to])
        os.killpg(c.reps[to].proc.pid, signal.SIGSTOP)
        try:
            assert stepper.call(f"D 1.0 {to}") == "OK 0"
        finally:
            os.killpg(c.reps[to].proc.pid, signal.SIGCONT)
        verdict, index = stepper.propose(b"after")
        assert verdict == "OK", (verdict, index)
        time.sleep(2.0)
        st = c.reps[lead].status()
        assert (st["role"], st["ballot"]) == ("leader", ballot), c.statuses()
        stepper.close()
        c.wait_applied(int(index))
        check_history(c, {b"before": int(first), b"after": int(index)}, require_all=c.names)


def test_a_thrifty_leader_commits_while_either_follower_is_stopped_and_both_get_every_entry() -> None:
    """A thrifty leader sends new entries at once to one follower only, the other getting them
    on its tick. Commits must go on while either follower is stopped, and in the end every
    replica holds every acknowledged entry, in order."""
    with Cluster(3, "shm", "memory", thrifty=True) as c:
        c.start()
        lead = c.leader()
        with Load(c, threads=4) as load:
            load.wait_acks(200)
            for follower in (n for n in c.names if n != lead):
                proc = c.reps[follower].proc
                proc.send_signal(signal.SIGSTOP)
                try:
                    load.wait_acks(200)
                finally:
                    proc.send_signal(signal.SIGCONT)
                load.wait_acks(200)
        settle(c, load)
        check_history(c, load.acked, require_all=c.names)


def test_catch_up_beyond_the_log_region_from_segment_files() -> None:
    # 256 KiB log region: the lagging replica misses ~4 MiB, far more than any region or cache holds
    with Cluster(3, "shm", "fsync", log_region_bytes=256 << 10) as c:
        c.start()
        c.leader()
        victim = c.names[2]
        c.reps[victim].kill()
        acked = {}
        prop = Proposer(c)
        for k in range(2000):
            payload, idx = prop.propose(lambda a, k=k: b"%05d-%d-" % (k, a) + os.urandom(1000))
            acked[payload] = idx
        prop.close()
        c.reps[victim].start()
        top = max(acked.values())
        c.wait_applied(top, [victim], timeout=60)
        check_history(c, acked, require_all=c.names)


def test_receive_threads_stop_polling_when_the_proposals_stop() -> None:
    """Each receive loop polls for spin_us after a message; an idle group must go back to
    sleeping, a core's worth of polling per replica would be a defect."""
    with Cluster(3, "shm", "memory", record=False) as c:
        c.start()
        prop = Proposer(c)
        for _ in range(2000):
            prop.propose(lambda _a: b"x" * 64)
        c.wait_applied(2000)
        prop.close()
        pids = {n: r.proc.pid for n, r in c.reps.items()}
        before = {n: cpu_seconds(pid) for n, pid in pids.items()}
        time.sleep(3)
        used = {n: (cpu_seconds(pid) - before[n]) / 3 for n, pid in pids.items()}
        assert all(share < 0.3 for share in used.values()), used  # idle: about 0.02 each


def test_resident_memory_does_not_grow_with_the_log() -> None:
    with Cluster(3, "shm", "memory", log_region_bytes=1 << 20, record=False) as c:
        c.start()
        payload = os.urandom(16 << 10)
        prop = Proposer(c)

        def write(mib: int) -> None:
            for _ in range(mib * 64):
                prop.propose(lambda _a: payload)

        write(8)
        c.wait_applied(8 * 64)
        base = {n: s["rss"] for n, s in c.statuses().items()}
        write(32)
        c.wait_applied(40 * 64)
        after = {n: s["rss"] for n, s in c.statuses().items()}
        prop.close()
        for n in c.names:  # 32 MiB more log on disk, resident memory about flat
            assert after[n] - base[n] < 12 << 20, (n, base[n], after[n])
            log_bytes = sum(p.stat().st_size for p in (c.dir / f"data-{n}" / "log").glob("seg-*"))
            assert log_bytes > 40 << 20


def test_a_replica_whose_application_lags_lets_a_caught_up_peer_lead() -> None:
    """Its log is as up to date as the caught-up peer's, so either could win; the lagging one
    (its application still delivering, as a supervisor's fresh copy replays) stands back."""
    from consensus.election import LAGGING_ENTRIES

    with Cluster(3, "shm", "memory", record=False) as c:
        slow = c.names[2]
        c.reps[slow].spec["apply_delay_s"] = 0.005
        for name in c.names[:2]:
            c.reps[name].start()
        lead = c.leader()
        with Load(c, threads=8) as load:
            load.wait_acks(LAGGING_ENTRIES + 500)
        c.reps[slow].start()  # delivers the log from index 1, 5 ms an entry
        deadline = time.monotonic() + 30
        while True:
            st = c.reps[slow].status()
            if st and st["leader"] == lead and st["commit"] - st["applied"] >= LAGGING_ENTRIES:
                break
            assert time.monotonic() < deadline, f"{slow} never lagged: {st}"
            time.sleep(0.05)
        c.reps[lead].kill()
        new = c.leader(exclude={lead}, timeout=30)
        st = c.reps[slow].status()
        assert new != slow, f"the lagging replica took over: {st}"
        assert st["commit"] - st["applied"] >= LAGGING_ENTRIES, "it had caught up meanwhile"


def test_a_lagging_replica_with_the_longest_log_stands_at_once_for_a_caught_up_peer_that_lacked_it(
) -> None:
    """The caught-up peer missed entries while it was down, so it cannot win without the lagging
    replica's vote, which its shorter log does not get; the lagging replica would not stand for
    CANDIDACY_DEFER_TIMEOUTS (30 s here). So it stands at once, brings the peer up to date and
    hands leadership to it, instead of the group waiting out its delivery."""
    from consensus.election import CANDIDACY_DEFER_TIMEOUTS, LAGGING_ENTRIES

    with Cluster(3, "shm", "fsync", record=False) as c:
        slow = c.names[2]
        c.reps[slow].spec["apply_delay_s"] = 0.05  # 1,500 entries: 75 s of delivery
        for name in c.names[:2]:
            c.reps[name].start()
        lead = c.leader()
        behind = next(n for n in c.names[:2] if n != lead)
        c.reps[slow].start()
        c.reps[behind].kill()
        with Load(c, threads=8) as load:  # committed by the leader and the lagging replica alone
            load.wait_acks(LAGGING_ENTRIES + 500)
        st = c.reps[slow].status()
        assert st["commit"] - st["applied"] >= LAGGING_ENTRIES, st
        c.reps[lead].kill()
        c.reps[behind].start()
        deadline = time.monotonic() + CANDIDACY_DEFER_TIMEOUTS * 0.3 / 3  # a third of the wait
        while c.leader(exclude={lead}, timeout=30) != behind:  # the lagging one leads only for a while
            assert time.monotonic() < deadline, c.statuses()
            time.sleep(0.1)
        st = c.reps[slow].status()
        assert st["commit"] - st["applied"] >= LAGGING_ENTRIES, "it had caught up meanwhile"
        led = [b for r, b, _ in c.reps[slow].roles() if r == "leader"]
        assert len(led) <= 1, c.reps[slow].roles()


def test_a_leader_stepping_down_hands_leadership_to_a_peer_caught_up_in_applying_the_log() -> None:
    """Both peers hold the whole log, but one is far behind in applying it (a copy replaying the
    log after a restart): the leader hands leadership to the other, which can serve at once. The
    lagging one comes first in the leader's list of peers, where a tie in log length went."""
    from consensus.election import LAGGING_ENTRIES

    with Cluster(3, "shm", "fsync", record=False) as c:
        slow = c.names[0]
        c.reps[slow].spec["apply_delay_s"] = 0.05  # 1,500 entries: 75 s of delivery
        for name in c.names[1:]:
            c.reps[name].start()
        lead = c.leader()
        caught = next(n for n in c.names[1:] if n != lead)
        c.reps[slow].start()
        with Load(c, threads=8) as load:
            load.wait_acks(LAGGING_ENTRIES + 500)
        st = c.reps[slow].status()
        assert st["commit"] - st["applied"] >= LAGGING_ENTRIES, st
        cl = Client(c.reps[lead].socket_path)
        assert cl.call("D 5") == "OK 1"
        cl.close()
        assert c.leader(exclude={lead}) == caught
        assert not [b for r, b, _ in c.reps[slow].roles() if r == "leader"], c.reps[slow].roles()


def test_new_entries_go_first_to_a_follower_that_can_serve_so_it_takes_over_without_a_replaying_one(
) -> None:
    """With thrifty replication a commit needs only one follower's acknowledgement, and new
    entries go at once to one follower. When it is the one replaying the log, the other lacks
    entries it holds and can win an election only through its vote, after a hand-over; the
    leader gives them first to the follower that does not lag, so it wins at once. The lagging
    follower comes first in name order, where a tie in log length went."""
    from consensus.election import LAGGING_ENTRIES

    with Cluster(3, "shm", "fsync", record=False, thrifty=True) as c:
        slow = c.names[0]
        c.reps[slow].spec["apply_delay_s"] = 0.05
        for name in c.names[1:]:
            c.reps[name].start()
        lead = c.leader()
        caught = next(n for n in c.names[1:] if n != lead)
        c.reps[slow].start()
        deadline = time.monotonic() + 20
        while c.reps[slow].status()["last"] < c.reps[lead].status()["last"]:  # a tie
            assert time.monotonic() < deadline, c.statuses()
            time.sleep(0.05)
        with Load(c, threads=8) as load:
            load.wait_acks(LAGGING_ENTRIES + 500)
            st = c.reps[slow].status()
            assert st["commit"] - st["applied"] >= LAGGING_ENTRIES, st
            c.reps[lead].kill()
            assert c.leader(exclude={lead}) == caught
        assert not [b for r, b, _ in c.reps[slow].roles() if r == "leader"], c.reps[slow].roles()


def test_a_replica_that_came_to_lead_far_behind_in_applying_its_log_hands_leadership_to_one_that_applied_it(
) -> None:
    """A replica restarted with its log (a supervisor's node restarted with a fresh copy) does
    not know how far the log was committed, so nothing keeps it from standing, and it may win;
    then it has the whole log to apply before it could serve. It hands leadership to a peer that
    has applied it as soon as one answers. Here every replica restarts, and the slow one stands
    first (its election timeout is the shortest)."""
    from consensus.election import LAGGING_ENTRIES

    with Cluster(3, "shm", "fsync", record=False) as c:
        c.start()
        c.leader()
        with Load(c, threads=8) as load:
            load.wait_acks(LAGGING_ENTRIES + 500)
        slow = c.names[0]
        for name in c.names:
            c.reps[name].kill()
            c.reps[name].spec["election_timeout_ms"] = 1500
        c.reps[slow].spec.update(apply_delay_s=0.05, election_timeout_ms=100)
        for name in c.names:
            c.reps[name].start()
        c.leader(exclude={slow}, timeout=10)
        st = c.reps[slow].status()
        assert st["commit"] - st["applied"] >= LAGGING_ENTRIES, "it had applied the log meanwhile"
        led = [b for r, b, _ in c.reps[slow].roles() if r == "leader"]
        assert len(led) == 1, c.reps[slow].roles()  # it led first, and only once


def test_a_peer_restarted_with_its_log_is_not_handed_leadership_before_it_has_applied_it() -> None:
    """A replica restarted with its log and a fresh application learns how far the log was
    committed only from a leader, after its first acknowledgement. It counts its whole log as
    still to apply, so a leader far behind in applying the log does not take it for a peer that
    could serve at once and hand leadership to one just as far behind. Here both restart with
    slow applications (neither knows how far the log was committed), and the third is down."""
    from consensus.election import LAGGING_ENTRIES

    with Cluster(3, "shm", "fsync", record=False) as c:
        c.start()
        c.leader()
        with Load(c, threads=8) as load:
            load.wait_acks(LAGGING_ENTRIES + 500)
        leading, restarted, _ = c.names
        for name in c.names:
            c.reps[name].kill()
        c.reps[leading].spec.update(apply_delay_s=0.05, election_timeout_ms=100)
        c.reps[restarted].spec.update(apply_delay_s=0.05, election_timeout_ms=1500)
        c.reps[leading].start()
        c.reps[restarted].start()
        assert c.leader(timeout=10) == leading
        deadline = time.monotonic() + 10
        while (st := c.reps[leading].status())["peers"][restarted]["match_index"] != st["last"]:
            assert time.monotonic() < deadline, c.statuses()
            time.sleep(0.05)
        time.sleep(2)  # a hand-over, once decided, takes a heartbeat or two
        peer = c.reps[leading].status()["peers"][restarted]
        assert peer["reachable"] and not peer["ready"], peer
        st = c.reps[restarted].status()
        assert st["commit"] - st["applied"] >= LAGGING_ENTRIES, "it had applied the log meanwhile"
        assert not [b for r, b, _ in c.reps[restarted].roles() if r == "leader"], \
            c.reps[restarted].roles()
        assert c.leader(timeout=1) == leading


def _start_and_withdraw_a_follower(c: Cluster) -> tuple[str, str, str]:
    """(the leader, the follower withdrawn, the other follower), the first follower by name
    withdrawn."""
    c.start()
    lead = c.leader()
    withdrawn, other = [n for n in c.names if n != lead]
    cl = Client(c.reps[withdrawn].socket_path)
    assert cl.call("W 2") == "OK"
    cl.close()
    return lead, withdrawn, other


def test_a_withdrawn_follower_is_never_counted_ready_nor_handed_leadership() -> None:
    """Up to date, it still could not lead: a hand-over to it would be refused and wait out its
    timeout. The leader's step-down goes to the standing peer, even the one it would choose last
    on a tie (the peer it lists first is the withdrawn one)."""
    with Cluster(3, "shm", "fsync") as c:
        lead, withdrawn, standing = _start_and_withdraw_a_follower(c)
        deadline = time.monotonic() + 10
        while (peers := c.reps[lead].status()["peers"])[withdrawn]["ready"] or not peers[standing]["ready"]:
            assert time.monotonic() < deadline, c.statuses()  # a busy machine can delay a heartbeat
            time.sleep(0.05)
        cl = Client(c.reps[lead].socket_path)
        assert cl.call("D 5") == "OK 1"
        cl.close()
        assert c.leader(exclude={lead}) == standing
        peers = c.reps[standing].status()["peers"]
        assert not peers[withdrawn]["ready"], peers


def test_a_withdrawn_replica_with_the_longest_log_hands_leadership_to_a_peer_that_lacked_it() -> None:
    """The only live peer missed entries while it was down, so it cannot win without the
    withdrawn replica's log: that replica stands after a while, brings it up to date and hands
    leadership to it, and never leads for longer."""
    with Cluster(3, "shm", "fsync") as c:
        lead, withdrawn, behind = _start_and_withdraw_a_follower(c)
        c.reps[behind].kill()
        acked = {}
        prop = Proposer(c)
        for k in range(50):  # committed by the leader and the withdrawn replica alone
            payload, idx = prop.propose(lambda a, k=k: b"missed-%d-%d" % (k, a))
            acked[payload] = idx
        prop.close()
        c.reps[lead].kill()
        c.reps[behind].start()
        deadline = time.monotonic() + 30
        while c.leader(timeout=30, exclude={lead}) != behind:  # the withdrawn one leads only for a while
            assert time.monotonic() < deadline, c.statuses()
            time.sleep(0.1)
        c.wait_applied(max(acked.values()), [behind], timeout=30)
        check_history(c, acked, require_all=[withdrawn, behind])
        roles = c.reps[withdrawn].roles()
        led = [b for r, b, _ in roles if r == "leader"]
        assert len(led) <= 1, roles


def _wait_caught_up(c: Cluster, follower: str, lead: str) -> None:
    deadline = time.monotonic() + 10
    while True:
        f, ld = c.reps[follower].status(), c.reps[lead].status()
        if f and ld and f["leader"] == lead and f["last"] == ld["last"] == ld["commit"] == f["applied"]:
            return
        assert time.monotonic() < deadline, c.statuses()
        time.sleep(0.05)


def test_a_deferring_replica_lets_a_peer_that_does_not_defer_take_over_and_leads_when_none_does() -> None:
    """A supervisor whose copy a client reached directly defers: at each of three failovers the
    peer that does not defer takes over (either would win about half the time otherwise), and
    when both live replicas defer, one of them leads all the same."""
    with Cluster(3, "shm", "fsync") as c:
        c.start()
        lead = c.leader()
        deferring = min(n for n in c.names if n != lead)
        cl = Client(c.reps[deferring].socket_path)
        assert cl.call("R") == "OK"
        cl.close()
        assert c.reps[deferring].status()["deferring"]
        for _ in range(3):
            clean = next(n for n in c.names if n not in (lead, deferring))
            _wait_caught_up(c, clean, lead)  # else only the deferring replica's log could win
            c.reps[lead].kill()
            assert c.leader(exclude={lead}) == clean, c.statuses()
            c.reps[lead].start()
            lead = clean
        assert not [b for r, b, _ in c.reps[deferring].roles() if r == "leader"], c.reps[deferring].roles()
        other = next(n for n in c.names if n not in (lead, deferring))
        _wait_caught_up(c, other, lead)  # the old leader restarted last
        cl = Client(c.reps[other].socket_path)
        assert cl.call("R") == "OK"
        cl.close()
        c.reps[lead].kill()
        assert c.leader(exclude={lead}) in (deferring, other)
