"""The summary of a fault campaign (tests/campaign.py): counts, faults, leadership, verdicts."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from .linearizability import CAS, OK, WRITE, Verdict

if TYPE_CHECKING:
    from .campaign import Campaign


def leaderless_stretches(leaders: list[dict]) -> dict:
    """Stretches without a gating leader in the monitor's timeline (``{"t", "leader"}`` entries,
    leader None when none gates): how many ended, the longest and their sum, in seconds."""
    spans, since = [], None
    for entry in leaders:
        if entry["leader"] is None:
            since = entry["t"] if since is None else since
        elif since is not None:
            spans.append(entry["t"] - since)
            since = None
    return {"count": len(spans), "longest_s": round(max(spans, default=0.0), 1),
            "total_s": round(sum(spans), 1), "over_30s": sum(1 for x in spans if x >= 30)}


def summarize(c: Campaign, verdicts: dict[str, Verdict], convergence: dict,
              check_seconds: float) -> tuple[dict, list[str]]:
    """The campaign's JSON summary and its printed form."""
    outcomes: Counter = Counter()
    for op in c.history:
        if op.client >= 0:
            outcomes[f"{op.kind} {op.status}"] += 1
    acked_writes = sum(1 for op in c.history if op.client >= 0 and op.status == OK
                       and (op.kind == WRITE or op.kind == CAS and op.result))
    acked_adds = sum(1 for status in c.adds.values() if status == OK)
    fault_counts = Counter(f["fault"] + (f" ({f['what']})" if "what" in f else "") for f in c.faults)
    passed = (all(v.result == "ok" for v in verdicts.values()) and convergence.get("same")
              and not convergence.get("diverged") and not c.anomalies)
    out = {
        "seed": c.seed, "duration": c.duration, "clients": c.clients,
        "operations": sum(outcomes.values()), "outcomes": dict(sorted(outcomes.items())),
        "not_executed": dict(c.failed), "acknowledged_writes": acked_writes,
        "faults": len(c.faults), "fault_kinds": dict(sorted(fault_counts.items())),
        "fault_timeline": c.faults,
        "leader_changes": max(0, sum(1 for x in c.leaders if x["leader"]) - 1),
        "leaders": c.leaders, "leaderless": leaderless_stretches(c.leaders),
        "set": {"acknowledged_adds": acked_adds, "indeterminate_adds": len(c.adds) - acked_adds,
                "final_size": None if c.final_set is None else len(c.final_set)},
        "supervisor_exits": c.exits, "anomalies": c.anomalies,
        "stale_vips_removed_by_harness": c.stale_vips, "warnings": c.warnings,
        "convergence": {k: v for k, v in convergence.items() if k != "values"},
        "verdicts": {k: {"result": v.result, "ops": v.ops, "indeterminate": v.indeterminate,
                         "steps": v.steps, "seconds": round(v.seconds, 2), "reason": v.reason}
                     for k, v in verdicts.items()},
        "check_seconds": round(check_seconds, 1),
        "transport_faults": "flaky-leader / flaky-follower: the tcp provider's failpoints "
                            "(SUPERVISE_FAILPOINTS)",
        "passed": bool(passed),
    }
    lines = ["", "=== campaign summary ===",
             f"seed {c.seed}, {c.duration:.0f}s of faults, {c.clients} clients, "
             f"{out['operations']} operations"]
    lines += [f"  {k:12s} {v}" for k, v in out["outcomes"].items()]
    lines.append(f"  not executed (refused connection or error reply): {sum(c.failed.values())} "
                 f"{dict(c.failed)}")
    lines.append(f"acknowledged writes (SET, successful CAS): {acked_writes}")
    lines.append(f"set: {acked_adds} acknowledged adds, {len(c.adds) - acked_adds} indeterminate; "
                 f"{out['set']['final_size']} elements at the end")
    lines.append(f"faults injected: {len(c.faults)}")
    lines += [f"  {k:30s} {v}" for k, v in out["fault_kinds"].items()]
    chain = " -> ".join(f"{x['leader']}@{x['ballot']}" if x["leader"] else "none" for x in c.leaders)
    lines.append(f"leader changes: {out['leader_changes']} ({chain})")
    gaps = out["leaderless"]
    lines.append(f"without a gating leader: {gaps['count']} stretches, {gaps['total_s']} s in all, "
                 f"the longest {gaps['longest_s']} s, {gaps['over_30s']} of 30 s or more")
    lines.append(f"supervisor exits: {c.exits}")
    lines.append(f"anomalies (safety: divergence, final reads, the set): {c.anomalies or 'none'}")
    lines.append(f"warnings (availability, VIP): {c.warnings or 'none'}")
    if c.clear_stale_vip:
        lines.append(f"stale VIPs (left by a supervisor killed with -9) removed by the harness before "
                     f"a restart: {len(c.stale_vips)} {c.stale_vips if c.stale_vips else ''}")
    lines.append(f"convergence: {out['convergence']}")
    lines.append(f"linearizability (checked in {check_seconds:.1f}s):")
    for key, v in verdicts.items():
        lines.append(f"  {key}: {v.result:9s} {v.ops} ops ({v.indeterminate} indeterminate), "
                     f"{v.steps} steps {v.reason}")
        if v.result == "violation":
            lines.append(f"  shortest non-linearizable prefix of {key}, reads it does not need "
                         f"removed: {len(v.slice)} operations; the last 40 (seconds from the start):")
            lines += [f"    {o.describe()}" for o in v.slice[-40:]]
    lines.append("transport message faults (delay/drop/duplicate): " + out["transport_faults"])
    lines.append(f"VERDICT: {'PASS' if passed else 'FAIL'}")
    return out, lines
