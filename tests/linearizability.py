"""A linearizability checker for per-key registers (read, write, compare-and-set).

The search is Wing & Gong's, with Lowe's memoisation of (linearized set, state) as Porcupine
does it, run separately for each key (a register's history is linearizable as a whole iff the
history of every key is: P-compositionality). Each search has a step and a time budget; running
out gives the verdict "unknown", never a guess.

Operations that never returned (a timeout, a connection error after the request may have been
sent) are indeterminate, as in Jepsen: they may have taken effect at any time after their
invocation, or never. They get a return time of infinity and an unknown output. An
indeterminate read has no effect and is dropped; an indeterminate write or CAS stays.

Before the full search, indeterminate writes and CASes whose new value is never observed (no
read returns it, no CAS expects it) are set aside: if the history without them is linearizable,
so is the history with them (each can take effect after everything else). Only if that reduced
history is not linearizable is the full history searched.

On a violation, ``minimal_slice`` finds the shortest prefix of the history (cut at a completion
time; operations still running at the cut become indeterminate) that is not linearizable, then
drops every read whose removal keeps it non-linearizable (reads change no state, so a
non-linearizable sub-history with fewer reads proves the same violation).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

READ, WRITE, CAS = "read", "write", "cas"
OK, INFO = "ok", "info"


@dataclass(frozen=True)
class Op:
    """One client operation on one key.

    ``arg``: the value for a write, ``(expected, new)`` for a CAS, None for a read.
    ``result``: the value read, True/False for a CAS, None for a write; None when indeterminate.
    ``ret`` is None for an indeterminate operation (``status`` "info").
    """

    id: int
    client: int
    key: str
    kind: str
    arg: Any
    call: float
    ret: float | None
    result: Any = None
    status: str = OK

    def describe(self, t0: float = 0.0) -> str:
        if self.kind == READ:
            what = f"read -> {self.result!r}" if self.status == OK else "read -> ?"
        elif self.kind == WRITE:
            what = f"write {self.arg!r}" + ("" if self.status == OK else " -> ?")
        else:
            exp, new = self.arg
            res = repr(self.result) if self.status == OK else "?"
            what = f"cas {exp!r} -> {new!r} = {res}"
        end = f"{self.ret - t0:9.4f}" if self.ret is not None else "      inf"
        return f"[{self.call - t0:9.4f} .. {end}] client {self.client:3d} {self.key}: {what}"


@dataclass
class Verdict:
    key: str
    result: str  # "ok" | "violation" | "unknown"
    ops: int
    indeterminate: int
    steps: int = 0
    seconds: float = 0.0
    reason: str = ""
    slice: list[Op] = field(default_factory=list)


def step(state: Any, op: Op) -> tuple[bool, Any]:
    """The register model: is ``op`` possible in ``state``, and the state after it."""
    if op.kind == READ:
        return (op.status != OK or op.result == state), state
    if op.kind == WRITE:
        return True, op.arg
    expected, new = op.arg
    if op.status != OK:
        return True, new if state == expected else state
    if op.result:
        return state == expected, new
    return state != expected, state


class _Entry:
    __slots__ = ("op", "bit", "is_call", "match", "prev", "next")

    def __init__(self, op: Op | None, bit: int, is_call: bool) -> None:
        self.op = op
        self.bit = bit
        self.is_call = is_call
        self.match: _Entry | None = None
        self.prev: _Entry | None = None
        self.next: _Entry | None = None


def _search(ops: list[Op], init: Any, max_steps: int, deadline: float) -> tuple[str, int, str]:
    """Wing–Gong with memoisation. Returns (verdict, steps, reason)."""
    if not ops:
        return OK, 0, ""
    events: list[tuple[float, int, _Entry]] = []
    for i, op in enumerate(ops):
        call, ret = _Entry(op, 1 << i, True), _Entry(op, 1 << i, False)
        call.match = ret
        events.append((op.call, 0, call))
        events.append((op.ret if op.ret is not None else math.inf, 1, ret))
    events.sort(key=lambda e: (e[0], e[1]))  # calls before returns at equal times: concurrent
    head = _Entry(None, 0, False)
    prev = head
    for _, _, e in events:
        prev.next = e
        e.prev = prev
        prev = e

    def lift(e: _Entry) -> None:
        e.prev.next = e.next
        if e.next is not None:
            e.next.prev = e.prev
        m = e.match
        m.prev.next = m.next
        if m.next is not None:
            m.next.prev = m.prev

    def unlift(e: _Entry) -> None:
        m = e.match
        m.prev.next = m
        if m.next is not None:
            m.next.prev = m
        e.prev.next = e
        if e.next is not None:
            e.next.prev = e

    state = init
    linearized = 0
    cache: set[tuple[int, Any]] = set()
    stack: list[tuple[_Entry, Any]] = []
    deepest = 0
    blocked: Op | None = None
    steps = 0
    entry = head.next
    while head.next is not None:
        steps += 1
        if steps > max_steps or (steps & 4095 == 0 and time.monotonic() > deadline):
            return "unknown", steps, f"budget exhausted after {steps} steps"
        if entry.is_call:
            ok, new_state = step(state, entry.op)
            if ok:
                key = (linearized | entry.bit, new_state)
                if key not in cache:
                    cache.add(key)
                    stack.append((entry, state))
                    linearized |= entry.bit
                    state = new_state
                    lift(entry)
                    entry = head.next
                    continue
            entry = entry.next
        else:
            if len(stack) >= deepest:
                deepest, blocked = len(stack), entry.op
            if not stack:
                return "violation", steps, (f"no linearization: at most {deepest} of {len(ops)} operations "
                                            f"linearize; stuck before the completion of "
                                            f"{blocked.describe() if blocked else '?'}")
            entry, state = stack.pop()
            linearized &= ~entry.bit
            unlift(entry)
            entry = entry.next
    return OK, steps, ""


def _prepare(ops: Iterable[Op]) -> list[Op]:
    """Drop indeterminate reads (no effect); order by invocation."""
    return sorted((op for op in ops if not (op.kind == READ and op.status != OK)), key=lambda o: o.call)


def _observed(ops: list[Op]) -> set[Any]:
    seen = set()
    for op in ops:
        if op.kind == READ and op.status == OK:
            seen.add(op.result)
        elif op.kind == CAS:
            seen.add(op.arg[0])
    return seen


def impossible_value(ops: list[Op], init: Any = None) -> Op | None:
    """A read (or successful CAS) that observed a value no operation ever wrote, when only the
    initial value can be that and some write had already completed before it began: no search
    needed (and none could finish in time when many operations are indeterminate)."""
    written = {op.arg if op.kind == WRITE else op.arg[1] for op in ops if op.kind != READ}
    done = [op.ret for op in ops if op.status == OK and op.ret is not None
            and (op.kind == WRITE or op.kind == CAS and op.result)]
    first = min(done) if done else None
    for op in ops:
        if op.status != OK or not (op.kind == READ or op.kind == CAS and op.result):
            continue
        seen = op.result if op.kind == READ else op.arg[0]
        if seen in written:
            continue
        if seen != init or (first is not None and first < op.call):
            return op
    return None


def check_key(ops: Iterable[Op], init: Any = None, max_steps: int = 2_000_000,
              max_seconds: float = 60.0) -> tuple[str, int, str]:
    """The verdict for one key's history: ("ok" | "violation" | "unknown", steps, reason)."""
    ops = _prepare(ops)
    bad = impossible_value(ops, init)
    if bad is not None:
        return "violation", 0, f"observed a value that was never written: {bad.describe()}"
    deadline = time.monotonic() + max_seconds
    seen = _observed(ops)
    reduced = [op for op in ops
               if op.status == OK or (op.arg if op.kind == WRITE else op.arg[1]) in seen]
    verdict, steps, reason = _search(reduced, init, max_steps, deadline)
    if verdict == OK or len(reduced) == len(ops):
        return verdict, steps, reason
    verdict, more, reason = _search(ops, init, max_steps, deadline)
    return verdict, steps + more, reason


def _prefix(ops: list[Op], cut: float) -> list[Op]:
    """Operations invoked by ``cut``; those still running then become indeterminate."""
    out = []
    for op in ops:
        if op.call > cut:
            continue
        if op.ret is not None and op.ret > cut:
            op = replace(op, ret=None, result=None, status=INFO)
        out.append(op)
    return out


def minimal_slice(ops: Iterable[Op], init: Any = None, budget_seconds: float = 60.0,
                  per_check_steps: int = 200_000) -> list[Op]:
    """A small non-linearizable sub-history of a non-linearizable one (see the module doc)."""
    ops = _prepare(ops)
    deadline = time.monotonic() + budget_seconds

    def bad(h: list[Op]) -> bool:
        left = max(0.1, deadline - time.monotonic())
        return check_key(h, init, per_check_steps, left)[0] == "violation"

    cuts = sorted({op.ret for op in ops if op.ret is not None})
    lo, hi = 0, len(cuts) - 1
    best = ops
    while lo <= hi and time.monotonic() < deadline:
        mid = (lo + hi) // 2
        h = _prefix(ops, cuts[mid])
        if bad(h):
            best, hi = h, mid - 1
        else:
            lo = mid + 1
    best = _prepare(best)
    i = 0
    while i < len(best) and time.monotonic() < deadline:
        if best[i].kind == READ:
            trial = best[:i] + best[i + 1:]
            if bad(trial):
                best = trial
                continue
        i += 1
    return best


def check(history: Iterable[Op], init: Any = None, max_steps: int = 2_000_000,
          max_seconds: float = 60.0, slice_seconds: float = 60.0) -> dict[str, Verdict]:
    """Per-key verdicts for a whole history."""
    by_key: dict[str, list[Op]] = defaultdict(list)
    for op in history:
        by_key[op.key].append(op)
    out = {}
    for key in sorted(by_key):
        ops = by_key[key]
        t = time.monotonic()
        verdict, steps, reason = check_key(ops, init, max_steps, max_seconds)
        v = Verdict(key, verdict, len(ops), sum(1 for o in ops if o.status != OK), steps,
                    time.monotonic() - t, reason)
        if verdict == "violation":
            v.slice = minimal_slice(ops, init, slice_seconds)
        out[key] = v
    return out
