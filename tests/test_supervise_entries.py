"""The supervisor's log entries and output digests."""

import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from supervise.digest import OutputChecker
from supervise.entries import Entry, EntryError, Kind, decode

u64 = st.integers(min_value=0, max_value=2**64 - 1)


@given(kind=st.sampled_from([Kind.CONNECT, Kind.CLOSE]), epoch=u64, conn=u64)
def test_connect_and_close_round_trip(kind, epoch, conn):
    assert decode(Entry(kind, epoch, conn).encode()) == Entry(kind, epoch, conn)


@given(epoch=u64, conn=u64, data=st.binary(max_size=4096))
def test_data_round_trips_byte_for_byte(epoch, conn, data):
    assert decode(Entry(Kind.DATA, epoch, conn, data).encode()).data == data


@given(epoch=u64, conn=u64, offset=u64, crc=st.integers(0, 2**32 - 1))
def test_digest_round_trip(epoch, conn, offset, crc):
    entry = Entry(Kind.DIGEST, epoch, conn, offset=offset, crc=crc)
    assert decode(entry.encode()) == entry


@given(st.binary(max_size=64))
def test_hostile_payloads_decode_or_raise_entry_error(payload):
    try:
        entry = decode(payload)
    except EntryError:
        return
    assert decode(entry.encode()) == entry


def test_connect_with_a_body_is_refused():
    with pytest.raises(EntryError):
        decode(Entry(Kind.CONNECT, 1, 2).encode() + b"x")


def test_same_output_split_differently_gives_the_same_digest():
    a, b = OutputChecker(), OutputChecker()
    a.output("c", b"hello world", 11)
    b.output("c", b"hello ", 6)
    b.output("c", b"world", 5)
    assert a.digest("c") == b.digest("c") == (11, zlib.crc32(b"hello world"))


def test_a_differing_byte_is_a_mismatch_and_a_match_is_a_check():
    follower = OutputChecker()
    follower.expect("c", 5, zlib.crc32(b"12345"))
    follower.output("c", b"12345", 5)
    assert (follower.checks, follower.mismatches) == (1, 0)
    follower.expect("c", 10, zlib.crc32(b"1234567890"))
    follower.output("c", b"6789X", 5)
    assert follower.mismatches == 1
    assert "byte 10" in follower.first_mismatch


def test_a_mismatch_report_quotes_the_last_input_and_the_write_that_differed():
    """The operator sees which request's reply differed: here a set listed in another order."""
    smembers = b"*2\r\n$8\r\nSMEMBERS\r\n$5\r\nadded\r\n"
    leader_reply = b"*3\r\n$2\r\nc1\r\n$2\r\nc2\r\n$2\r\nc3\r\n"
    follower = OutputChecker()
    follower.input("c", smembers)
    follower.output("c", b"*3\r\n$2\r\nc3\r\n$2\r\nc1\r\n$2\r\nc2\r\n", len(leader_reply))
    follower.expect("c", len(leader_reply), zlib.crc32(leader_reply))
    assert follower.mismatches == 1
    assert "the last input on it began '*2\\r\\n$8\\r\\nSMEMBERS" in follower.first_mismatch
    assert "ended at that byte began '*3\\r\\n$2\\r\\nc3\\r\\n" in follower.first_mismatch


def test_a_check_waits_until_the_output_reaches_its_offset():
    follower = OutputChecker()
    follower.expect("c", 4, zlib.crc32(b"abcd"))
    assert follower.checks == 0
    follower.output("c", b"ab", 2)
    assert follower.checks == 0
    follower.output("c", b"cd", 2)
    assert follower.checks == 1 and follower.mismatches == 0


def test_after_a_partly_captured_write_later_offsets_are_unverifiable_not_mismatched():
    leader, follower = OutputChecker(), OutputChecker()
    for checker, parts in ((leader, [(b"ab", 2), (b"cdef", 4)]), (follower, [(b"ab", 2), (b"cd", 4)])):
        for data, length in parts:
            checker.output("c", data, length)
    assert leader.digest("c") == (6, zlib.crc32(b"abcdef"))
    assert follower.digest("c") == (2, zlib.crc32(b"ab"))  # digested up to the partial write
    follower.expect("c", 2, zlib.crc32(b"ab"))
    follower.expect("c", 6, zlib.crc32(b"abcdef"))
    assert (follower.checks, follower.mismatches, follower.unverifiable) == (1, 0, 1)


def _cuts(draw_data, length):
    """Increasing write boundaries of a stream of ``length`` bytes, ending at ``length``."""
    return sorted(set(draw_data.draw(st.lists(st.integers(1, length), max_size=12))) | {length})


@given(stream=st.binary(min_size=1, max_size=300), data=st.data())
def test_a_follower_checks_every_leader_digest_at_its_own_write_ends_and_leaves_the_rest_unverified(
        stream, data):
    leader_cuts, follower_cuts = _cuts(data, len(stream)), _cuts(data, len(stream))
    logged = data.draw(st.lists(st.sampled_from(leader_cuts), unique=True).map(sorted))
    leader, follower = OutputChecker(), OutputChecker()
    start = 0
    for cut in leader_cuts:
        leader.output("c", stream[start:cut], cut - start, checked=False)
        start = cut
    assert leader.digest("c") == (len(stream), zlib.crc32(stream))
    # the follower's writes and the logged digests interleave in any order, each in its own
    writes = list(zip([0] + follower_cuts[:-1], follower_cuts, strict=True))
    checks = [(offset, zlib.crc32(stream[:offset])) for offset in logged]
    while writes or checks:
        if writes and (not checks or data.draw(st.booleans())):
            start, cut = writes.pop(0)
            follower.output("c", stream[start:cut], cut - start)
        else:
            follower.expect("c", *checks.pop(0))
    assert follower.mismatches == 0
    assert follower.checks == len(set(logged) & set(follower_cuts))
    assert follower.unverifiable == len(set(logged) - set(follower_cuts))


def test_a_long_lived_connection_keeps_only_the_digests_its_checks_have_not_reached():
    leader, follower = OutputChecker(), OutputChecker()
    crc = 0
    for n in range(1, 100_001):
        reply = b"+OK %d\r\n" % n
        crc = zlib.crc32(reply, crc)
        leader.output("c", reply, len(reply), checked=False)
        follower.output("c", reply, len(reply))
        if n % 50 == 0:  # the leader logs a digest now and then
            follower.expect("c", *leader.digest("c"))
    assert (follower.checks, follower.mismatches, follower.unverifiable) == (2000, 0, 0)
    assert leader.digest("c")[1] == crc
    assert len(follower.streams["c"].checkpoints) <= 50
    assert leader.streams["c"].checkpoints is None


def test_a_closed_connections_digests_are_forgotten_and_checks_its_output_never_reached_counted():
    follower = OutputChecker()
    follower.output("c", b"abc", 3)
    follower.expect("c", 3, zlib.crc32(b"abc"))
    follower.expect("c", 5, zlib.crc32(b"abcde"))  # the leader wrote more than this copy did
    follower.forget("c")
    assert (follower.checks, follower.unverifiable) == (1, 1)
    assert follower.streams == {} and follower.pending == {}
