"""PriorityRequestQueue: service order, strict head-of-line, deadlines, bounded length."""
from __future__ import annotations

import pytest

from agents.core.queue import DEADLINE_PASSED, QUEUE_FULL, PriorityRequestQueue


def ids(entries):
    return [e.request_id for e in entries]


def test_higher_priority_first_and_fifo_within_a_priority():
    q = PriorityRequestQueue()
    for rid, prio in [("a1", 1), ("b5", 5), ("a2", 1), ("c3", 3), ("b6", 5), ("a3", 1)]:
        assert q.push(rid, prio, 10, deadline=100.0, now=0.0).accepted
    assert ids(q) == ["b5", "b6", "c3", "a1", "a2", "a3"]
    assert ids(q.pop_ready(1000, now=1.0)) == ["b5", "b6", "c3", "a1", "a2", "a3"]
    assert len(q) == 0


def test_scarce_material_is_served_in_order_while_the_head_fits():
    q = PriorityRequestQueue()
    q.push("low", 1, 100, 100.0, 0.0)
    q.push("high1", 9, 100, 100.0, 0.0)
    q.push("high2", 9, 100, 100.0, 0.0)
    assert ids(q.pop_ready(250, now=1.0)) == ["high1", "high2"]
    assert ids(q.pop_ready(99, now=1.0)) == []
    assert ids(q.pop_ready(100, now=1.0)) == ["low"]


def test_strict_priority_a_large_head_blocks_smaller_lower_ones():
    q = PriorityRequestQueue()
    q.push("big-high", 7, 1000, 100.0, 0.0)
    q.push("small-low", 1, 10, 100.0, 0.0)
    assert q.pop_ready(999, now=1.0) == []
    assert ids(q) == ["big-high", "small-low"]
    assert ids(q.pop_ready(1010, now=1.0)) == ["big-high", "small-low"]


def test_expire_at_the_deadline():
    q = PriorityRequestQueue()
    q.push("early", 5, 10, deadline=10.0, now=0.0)
    q.push("late", 1, 10, deadline=20.0, now=0.0)
    assert q.expire(9.999) == []
    assert q.next_deadline() == 10.0
    assert q.expire(10.0) == ["early"]
    assert ids(q) == ["late"]
    assert q.expire(25.0) == ["late"]
    assert q.next_deadline() is None


def test_expired_entries_neither_served_nor_blocking():
    q = PriorityRequestQueue()
    q.push("stale-big", 9, 10_000, deadline=5.0, now=0.0)
    q.push("fresh", 1, 10, deadline=50.0, now=0.0)
    assert ids(q.pop_ready(10, now=6.0)) == ["fresh"]
    assert q.expire(6.0) == ["stale-big"]


def test_push_with_a_past_deadline_is_rejected():
    q = PriorityRequestQueue()
    r = q.push("x", 1, 10, deadline=5.0, now=5.0)
    assert (r.accepted, r.reason) == (False, DEADLINE_PASSED)
    assert "x" not in q


def test_bounded_length_rejects_or_evicts_the_last_entry():
    q = PriorityRequestQueue(max_len=2)
    q.push("p3-old", 3, 10, 100.0, 0.0)
    q.push("p3-young", 3, 10, 100.0, 0.0)
    same = q.push("p3-newest", 3, 10, 100.0, 0.0)
    assert (same.accepted, same.reason) == (False, QUEUE_FULL)
    lower = q.push("p1", 1, 10, 100.0, 0.0)
    assert (lower.accepted, lower.reason) == (False, QUEUE_FULL)
    higher = q.push("p8", 8, 10, 100.0, 0.0)
    assert higher.accepted and ids(higher.evicted) == ["p3-young"]
    assert ids(q) == ["p8", "p3-old"]


def test_remove_and_duplicates():
    q = PriorityRequestQueue()
    q.push("a", 1, 10, 100.0, 0.0)
    q.push("b", 1, 10, 100.0, 0.0)
    with pytest.raises(ValueError):
        q.push("a", 2, 10, 100.0, 0.0)
    assert q.remove("a").request_id == "a"
    assert q.remove("a") is None
    assert ids(q) == ["b"]


def test_requeue_keeps_the_original_place_and_corrects_bits():
    q = PriorityRequestQueue()
    q.push("first", 2, 100, 100.0, 0.0)
    q.push("second", 2, 100, 100.0, 0.0)
    (served,) = q.pop_ready(100, now=1.0)
    assert served.request_id == "first"
    q.push("third", 2, 100, 100.0, 2.0)
    assert q.requeue(served, now=3.0, bits=356).accepted
    assert [(e.request_id, e.bits) for e in q] == [("first", 356), ("second", 100), ("third", 100)]
    assert q.pop_ready(300, now=4.0) == []  # the corrected head blocks


def test_extend_deadline():
    q = PriorityRequestQueue()
    q.push("a", 1, 10, 10.0, 0.0)
    assert not q.extend_deadline("a", 5.0)
    assert q.extend_deadline("a", 30.0)
    assert q.expire(20.0) == []
    assert q.get("a").deadline == 30.0


@pytest.mark.parametrize("args", [("", 1, 10, 1.0), ("a", 1.5, 10, 1.0), ("a", 1, 0, 1.0), ("a", 1, 10, float("nan"))])
def test_invalid_arguments(args):
    with pytest.raises(ValueError):
        PriorityRequestQueue().push(*args, now=0.0)
