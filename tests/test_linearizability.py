"""The register linearizability checker on hand-made histories, and against a brute-force oracle."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from .linearizability import CAS, INFO, OK, READ, WRITE, Op, check, check_key, minimal_slice, step


def op(i: int, kind: str, arg, call: float, ret: float | None, result=None, client: int = 0,
       key: str = "k") -> Op:
    return Op(i, client if client else i, key, kind, arg, call, ret, result, OK if ret is not None else INFO)


def verdict(ops: list[Op]) -> str:
    return check_key(ops)[0]


# ---- hand-made histories ---------------------------------------------------------------------

def test_sequential_history_is_linearizable():
    h = [op(1, WRITE, "a", 0, 1), op(2, READ, None, 2, 3, "a"), op(3, CAS, ("a", "b"), 4, 5, True),
         op(4, CAS, ("a", "c"), 6, 7, False), op(5, READ, None, 8, 9, "b")]
    assert verdict(h) == "ok"


def test_stale_read_after_a_completed_write_is_a_violation():
    h = [op(1, WRITE, "a", 0, 1), op(2, WRITE, "b", 2, 3), op(3, READ, None, 4, 5, "a")]
    assert verdict(h) == "violation"


def test_lost_acknowledged_write_is_a_violation():
    """A write acknowledged, then a read (after it) of the empty register."""
    h = [op(1, WRITE, "a", 0, 1), op(2, READ, None, 2, 3, None)]
    assert verdict(h) == "violation"


def test_read_concurrent_with_a_write_may_see_either_value():
    for seen in ("a", "b"):
        h = [op(1, WRITE, "a", 0, 1), op(2, WRITE, "b", 2, 6), op(3, READ, None, 3, 4, seen)]
        assert verdict(h) == "ok"


def test_reads_must_agree_on_one_order():
    """Two concurrent writes; one reader sees b then a, another a then b: no single order."""
    h = [op(1, WRITE, "a", 0, 10), op(2, WRITE, "b", 0, 10),
         op(3, READ, None, 1, 2, "b", client=3), op(4, READ, None, 3, 4, "a", client=3),
         op(5, READ, None, 1, 2, "a", client=5), op(6, READ, None, 3, 4, "b", client=5)]
    assert verdict(h) == "violation"


def test_indeterminate_write_may_take_effect_late_or_never():
    took = [op(1, WRITE, "a", 0, 1), op(2, WRITE, "x", 2, None), op(3, READ, None, 3, 4, "a"),
            op(4, READ, None, 10, 11, "x")]
    assert verdict(took) == "ok"
    never = [op(1, WRITE, "a", 0, 1), op(2, WRITE, "x", 2, None), op(3, READ, None, 10, 11, "a")]
    assert verdict(never) == "ok"


def test_indeterminate_write_cannot_take_effect_before_its_invocation():
    h = [op(1, WRITE, "a", 0, 1), op(2, READ, None, 2, 3, "x"), op(3, WRITE, "x", 5, None)]
    assert verdict(h) == "violation"


def test_indeterminate_write_seen_then_unseen_is_a_violation():
    h = [op(1, WRITE, "a", 0, 1), op(2, WRITE, "x", 2, None), op(3, READ, None, 3, 4, "x"),
         op(4, READ, None, 5, 6, "a")]
    assert verdict(h) == "violation"


def test_failed_cas_explained_only_by_an_unobserved_indeterminate_write():
    """The reduced search (without the unobserved write) fails; the full one must succeed."""
    h = [op(1, WRITE, "a", 0, 1), op(2, WRITE, "z", 2, None), op(3, CAS, ("a", "b"), 3, 4, False),
         op(4, READ, None, 20, 21, "z")]
    assert verdict(h) == "ok"
    h2 = [op(1, WRITE, "a", 0, 1), op(2, WRITE, "z", 2, None), op(3, CAS, ("a", "b"), 3, 4, False)]
    assert verdict(h2) == "ok"


def test_initial_value_after_a_completed_write_is_found_without_search():
    """The fresh-copy symptom: the empty register read long after writes were acknowledged, with
    many indeterminate writes around that a search would have to place."""
    h = [op(1, WRITE, "a", 0, 1)] + [op(10 + i, WRITE, f"x{i}", 2, None) for i in range(60)]
    h.append(op(100, READ, None, 5, 6, None))
    assert check_key(h, max_steps=1000)[0] == "violation"
    assert check_key([op(1, WRITE, "a", 2, 3), op(2, READ, None, 0, 1, None)])[0] == "ok"


def test_cas_success_requires_the_expected_value():
    h = [op(1, WRITE, "a", 0, 1), op(2, CAS, ("b", "c"), 2, 3, True)]
    assert verdict(h) == "violation"
    h = [op(1, WRITE, "a", 0, 1), op(2, CAS, ("a", "c"), 2, 3, False)]
    assert verdict(h) == "violation"


def test_two_successful_cas_from_the_same_value_is_a_violation():
    h = [op(1, WRITE, "a", 0, 1), op(2, CAS, ("a", "b"), 2, 5, True), op(3, CAS, ("a", "c"), 2, 5, True)]
    assert verdict(h) == "violation"


def test_keys_are_checked_separately():
    h = [op(1, WRITE, "a", 0, 1, key="x"), op(2, READ, None, 2, 3, "a", key="x"),
         op(3, WRITE, "b", 0, 1, key="y"), op(4, READ, None, 2, 3, "a", key="y")]
    out = check(h)
    assert out["x"].result == "ok"
    assert out["y"].result == "violation"
    assert [o.id for o in out["y"].slice] == [3, 4]


def test_budget_gives_unknown():
    h = [op(i, WRITE, f"v{i}", 0, 100) for i in range(1, 16)]
    h += [op(98, READ, None, 200, 201, "v1"), op(99, READ, None, 300, 301, "v2")]
    assert check_key(h, max_steps=50)[0] == "unknown"


def test_minimal_slice_is_short_and_still_a_violation():
    h = [op(i, WRITE, f"v{i}", 10 * i, 10 * i + 1) for i in range(1, 30)]
    h += [op(100 + i, READ, None, 10 * i + 2, 10 * i + 3, f"v{i}") for i in range(1, 30)]
    h.append(op(200, READ, None, 150.5, 150.7, "v3"))  # stale: v14 was acknowledged at 141
    full = check_key(h)[0]
    assert full == "violation"
    s = minimal_slice(h)
    assert check_key(s)[0] == "violation"
    assert len(s) < 25
    assert any(o.id == 200 for o in s)


# ---- brute force oracle ----------------------------------------------------------------------

def oracle(ops: list[Op]) -> bool:
    """Some subset of the indeterminate ops plus every completed op, in some order that respects
    real time, is a legal register sequence."""
    done = [o for o in ops if o.status == OK]
    maybe = [o for o in ops if o.status != OK and o.kind != READ]
    for r in range(len(maybe) + 1):
        for chosen in itertools.combinations(maybe, r):
            pool = done + list(chosen)
            for perm in itertools.permutations(pool):
                if not _respects_real_time(perm):
                    continue
                state, legal = None, True
                for o in perm:
                    legal, state = step(state, o)
                    if not legal:
                        break
                if legal:
                    return True
    return False


def _respects_real_time(seq: tuple[Op, ...]) -> bool:
    for i, a in enumerate(seq):
        for b in seq[i + 1:]:
            if b.ret is not None and b.ret < a.call:
                return False
    return True


VALUES = st.sampled_from(["a", "b", "c"])


@st.composite
def histories(draw) -> list[Op]:
    n = draw(st.integers(1, 6))
    ops = []
    for i in range(n):
        kind = draw(st.sampled_from([READ, WRITE, CAS]))
        call = draw(st.integers(0, 12))
        indeterminate = draw(st.booleans()) and draw(st.booleans())
        ret = None if indeterminate else call + draw(st.integers(0, 6)) + 0.5
        if kind == READ:
            arg, result = None, draw(st.one_of(st.none(), VALUES))
        elif kind == WRITE:
            arg, result = draw(VALUES), None
        else:
            arg, result = (draw(VALUES), draw(VALUES)), draw(st.booleans())
        ops.append(Op(i, i, "k", kind, arg, float(call), ret, None if indeterminate else result,
                      INFO if indeterminate else OK))
    return ops


@settings(max_examples=400, deadline=None)
@given(histories())
def test_checker_agrees_with_brute_force(h):
    expected = "ok" if oracle(h) else "violation"
    assert verdict(h) == expected


@st.composite
def linearizable_histories(draw) -> list[Op]:
    """Built from a sequential execution: each op gets an interval around its point."""
    n = draw(st.integers(1, 40))
    state = None
    ops = []
    for i in range(n):
        point = float(10 * i)
        kind = draw(st.sampled_from([READ, WRITE, CAS]))
        before = draw(st.integers(0, 30))
        indeterminate = kind != READ and draw(st.integers(0, 5)) == 0
        ret = None if indeterminate else point + draw(st.integers(0, 30)) + 0.5
        if kind == READ:
            ops.append(Op(i, i, "k", READ, None, point - before, ret, state))
            continue
        value = f"v{i}"
        if kind == WRITE:
            arg: object = value
        else:
            arg = (state if draw(st.booleans()) else draw(VALUES), value)
        happened = not indeterminate or draw(st.booleans())
        if indeterminate and not happened:
            ops.append(Op(i, i, "k", kind, arg, point - before, None, None, INFO))
            continue
        ok, new = step(state, Op(i, i, "k", kind, arg, 0, 0, True if kind == CAS else None))
        result = ok if kind == CAS else None
        if kind == CAS and not ok:
            new = state
        state = new
        ops.append(Op(i, i, "k", kind, arg, point - before, ret, None if indeterminate else result,
                      INFO if indeterminate else OK))
    return ops


@settings(max_examples=200, deadline=None)
@given(linearizable_histories())
def test_histories_built_from_a_sequential_execution_are_linearizable(h):
    assert verdict(h) == "ok"


@settings(max_examples=200, deadline=None)
@given(linearizable_histories(), st.data())
def test_a_read_of_a_value_never_written_is_a_violation(h, data):
    reads = [o for o in h if o.kind == READ]
    if not reads:
        return
    victim = data.draw(st.sampled_from(reads))
    bad = [Op(o.id, o.client, o.key, o.kind, o.arg, o.call, o.ret, "never-written", o.status)
           if o is victim else o for o in h]
    assert verdict(bad) == "violation"
