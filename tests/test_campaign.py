"""A bounded fault campaign with a fixed seed (issue 7): twelve clients through the VIP while
leaders and followers are killed, cut off, paused and given a lossy network; the history must be
linearizable for every key, nothing acknowledged lost, and the healed copies identical. Longer
runs: see README.md."""

from __future__ import annotations

from .campaign import Campaign
from .campaign_report import leaderless_stretches


def test_fault_campaign_seed_7_is_linearizable_and_converges():
    campaign = Campaign(seed=7, duration=55, clients=12, keys=5, check_seconds=20)
    summary = campaign.run()
    assert summary["faults"] > 0 and summary["operations"] > 0
    assert summary["convergence"].get("same") and not summary["convergence"].get("diverged"), \
        summary["convergence"]
    assert not summary["anomalies"], summary["anomalies"]
    bad = {k: v for k, v in summary["verdicts"].items() if v["result"] != "ok"}
    assert not bad, bad
    assert summary["passed"]


def test_stretches_without_a_gating_leader_are_measured_between_the_monitors_entries():
    timeline = [{"t": 5.0, "leader": "n1"}, {"t": 6.0, "leader": None}, {"t": 7.5, "leader": "n2"},
                {"t": 40.0, "leader": None}, {"t": 41.0, "leader": None}, {"t": 75.0, "leader": "n3"},
                {"t": 90.0, "leader": None}]
    assert leaderless_stretches(timeline) == {"count": 2, "longest_s": 35.0, "total_s": 36.5,
                                              "over_30s": 1}
