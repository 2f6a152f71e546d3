"""Entry codec, wire messages, segment files and log store: round trips and detection of damaged
bytes."""

from __future__ import annotations

import os
import tempfile
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consensus import codec, wire
from consensus.codec import Entry
from consensus.logstore import LogStore
from consensus.segments import SegmentCorruptError, SegmentLog

payloads = st.lists(st.binary(max_size=300), min_size=1, max_size=40)


def _entries(data: list[bytes], first: int = 1, ballot: int = 7) -> list[Entry]:
    return [Entry(first + i, ballot + (i // 5), codec.KIND_DATA if i % 7 else codec.KIND_NOOP, p)
            for i, p in enumerate(data)]


u64 = st.integers(0, 2**64 - 1)


@given(u64, u64, u64, st.booleans(), st.integers(0, 2**32 - 1))
def test_append_responses_round_trip_with_the_followers_lag(
        ballot: int, index: int, last: int, ok: bool, lag: int) -> None:
    m = wire.AppendResp(ballot, index, last, ok, lag)
    assert wire.dec_append_resp(wire.enc_append_resp(m)) == m


def test_a_lag_too_large_for_an_acknowledgement_is_sent_as_the_largest_it_holds() -> None:
    m = wire.dec_append_resp(wire.enc_append_resp(wire.AppendResp(1, 2, 3, True, 2**40)))
    assert m.lag == 2**32 - 1


@given(payloads)
def test_codec_round_trip(data: list[bytes]) -> None:
    entries = _entries(data)
    blob = codec.encode_many(entries)
    assert codec.decode_all(blob) == entries
    assert len(blob) % 8 == 0


@given(st.binary(min_size=0, max_size=200), st.data())
def test_codec_detects_any_flipped_byte(payload: bytes, data: st.DataObject) -> None:
    rec = bytearray(codec.encode(Entry(3, 9, codec.KIND_DATA, payload)))
    pos = data.draw(st.integers(0, len(rec) - 1))
    pad_lo = codec.HEADER_SIZE + len(payload)
    pad_hi = codec.HEADER_SIZE + codec.padded(len(payload))
    if pad_lo <= pos < pad_hi or 20 <= pos < 24 or 28 <= pos < 32:
        return  # padding bytes carry no information
    rec[pos] ^= data.draw(st.integers(1, 255))
    with pytest.raises(codec.CorruptRecord):
        codec.decode(bytes(rec))


@given(st.binary(min_size=1, max_size=200), st.data())
def test_codec_detects_torn_record(payload: bytes, data: st.DataObject) -> None:
    rec = codec.encode(Entry(1, 1, codec.KIND_DATA, payload))
    cut = data.draw(st.integers(0, len(rec) - 1))
    with pytest.raises(codec.CorruptRecord):
        codec.decode(rec[:cut])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payloads, st.integers(200, 3000))
def test_segments_round_trip_with_rotation(data: list[bytes], seg_bytes: int) -> None:
    entries = _entries(data)
    with tempfile.TemporaryDirectory() as d:
        log = SegmentLog(Path(d), fsync=False, segment_bytes=seg_bytes)
        for i in range(0, len(entries), 3):
            log.append(entries[i:i + 3])
        log.close()
        log = SegmentLog(Path(d), fsync=False, segment_bytes=seg_bytes)
        assert log.read_range(1, len(entries), 1 << 30) == entries
        for e in entries:
            assert log.ballot_at(e.index) == e.ballot
            assert log.read_range(e.index, e.index) == [e]
        log.close()


@settings(max_examples=40, deadline=None)
@given(payloads, st.data())
def test_segments_truncate_suffix(data: list[bytes], d: st.DataObject) -> None:
    entries = _entries(data)
    cut = d.draw(st.integers(1, len(entries)))
    with tempfile.TemporaryDirectory() as tmp:
        log = SegmentLog(Path(tmp), fsync=False, segment_bytes=500)
        for e in entries:
            log.append([e])
        log.truncate_from(cut)
        assert log.last_index == cut - 1
        log.append([Entry(cut, 99, codec.KIND_DATA, b"new")])
        log.close()
        log = SegmentLog(Path(tmp), fsync=False, segment_bytes=500)
        new = Entry(cut, 99, codec.KIND_DATA, b"new")
        assert log.read_range(1, cut, 1 << 30) == entries[:cut - 1] + [new]
        log.close()


def _write_log(d: Path, n: int, seg_bytes: int = 1 << 20) -> list[Path]:
    log = SegmentLog(d, fsync=False, segment_bytes=seg_bytes)
    for e in _entries([bytes([i % 256]) * (10 + i) for i in range(n)]):
        log.append([e])
    log.close()
    return sorted(d.glob("seg-*.log"))


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_segments_corruption_names_file_and_offset(d: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        paths = _write_log(Path(tmp), 30)
        path = paths[0]
        raw = bytearray(path.read_bytes())
        # corrupt a byte inside some record other than the last (the last may be a torn tail)
        offsets = [0]
        for _ in range(29):
            _, nxt = codec.decode(raw, offsets[-1])
            offsets.append(nxt)
        k = d.draw(st.integers(0, 28))
        start, end = offsets[k], offsets[k + 1]
        pos = d.draw(st.sampled_from([start, start + 8, start + 33, end - 1]))
        raw[pos] ^= 0x5A
        path.write_bytes(bytes(raw))
        with pytest.raises(SegmentCorruptError) as exc:
            SegmentLog(Path(tmp), fsync=False)
        assert str(path) in str(exc.value)
        assert f"offset {start}" in str(exc.value)
        assert exc.value.offset == start


def test_torn_tail_of_last_segment_is_truncated(tmp_path: Path) -> None:
    paths = _write_log(tmp_path, 10)
    size = paths[-1].stat().st_size
    with open(paths[-1], "r+b") as f:
        f.truncate(size - 5)  # the last record is torn
    log = SegmentLog(tmp_path, fsync=False)
    assert log.last_index == 9
    log.close()
    with open(paths[-1], "ab") as f:
        f.write(b"\0" * 100)  # zeros a crash can leave after the last record
    log = SegmentLog(tmp_path, fsync=False)
    assert log.last_index == 9
    log.close()


def test_truncated_middle_segment_is_an_error(tmp_path: Path) -> None:
    paths = _write_log(tmp_path, 60, seg_bytes=400)
    assert len(paths) > 2
    size = paths[1].stat().st_size
    with open(paths[1], "r+b") as f:
        f.truncate(size - 3)
    with pytest.raises(SegmentCorruptError, match=str(paths[1])):
        SegmentLog(tmp_path, fsync=False)


def test_missing_segment_is_an_error(tmp_path: Path) -> None:
    paths = _write_log(tmp_path, 60, seg_bytes=400)
    os.unlink(paths[1])
    with pytest.raises(SegmentCorruptError, match="expected"):
        SegmentLog(tmp_path, fsync=False)


def test_logstore_cache_takes_no_more_memory_than_its_budget(tmp_path: Path) -> None:
    budget = 2 << 20
    store = LogStore(tmp_path, fsync=False, cache_bytes=budget)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for first in range(1, 40_001, 20):  # small entries, as a replicated SET's
            store.append([Entry(first + i, 7, codec.KIND_DATA, os.urandom(60)) for i in range(20)])
            store.flush()  # as a replica does once per round
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        store.close()
    assert used <= 1.25 * budget, f"{used / budget:.2f}x its budget"


def test_logstore_cache_bounded_and_promise_persisted(tmp_path: Path) -> None:
    st_ = LogStore(tmp_path, fsync=True, cache_bytes=10_000)
    entries = _entries([os.urandom(500) for _ in range(200)])
    for i in range(0, 200, 10):
        st_.append(entries[i:i + 10])
        st_.sync()
    assert st_.durable_index == 200
    assert st_._cache_bytes <= 10_000
    assert st_.entries(1, 200, 1 << 30) == entries
    assert st_.entries(150, 200, 1 << 30) == entries[149:]
    for lo in (1, 150, 199):  # encoded records, from the cache and from the files alike
        blob, count = st_.records(lo, 200, 1 << 30)
        assert count == 201 - lo and codec.decode_all(blob) == entries[lo - 1:]
    st_.save_promise(12345)
    st_.truncate_from(150)
    st_.close()
    again = LogStore(tmp_path, fsync=True)
    assert again.promised == 12345
    assert again.last_index == 149
    assert again.entry(149) == entries[148]
    again.close()
    (tmp_path / "promise").write_bytes(b"garbage!!!!!")
    with pytest.raises(SegmentCorruptError, match="promise"):
        LogStore(tmp_path, fsync=True)
