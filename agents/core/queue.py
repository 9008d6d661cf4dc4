"""Priority queue of requests that wait for key material.

Service order: higher ``priority`` first; within a priority, first in first out (every entry
gets a sequence number at its first push, and keeps it when re-queued).

Head-of-line policy — strict priority. ``pop_ready`` serves entries in service order while
the head fits in the available bits and stops at the first one that does not: a large
high-priority request blocks every request behind it, even small ones that would fit. That is
what "served by priority" means: key material that arrives is saved up for the most urgent
request instead of being nibbled away by lower ones, so the head cannot starve. Every entry is
bounded by its deadline, so a head that never fits leaves the queue at its deadline and
unblocks the rest. Entries whose deadline has passed are never served and never block; they
stay until ``expire`` reports them.

Length is bounded (``max_len``). A full queue makes room for a request that would be served
before its last entry by dropping that last entry (lowest priority, youngest); otherwise the
newcomer is rejected with a reason. Dropped entries are returned so the caller can answer them.

No I/O and no clock: the current time ``now`` (monotonic seconds) is passed in.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, replace
from typing import Iterator

QUEUE_FULL = "queue_full"
DEADLINE_PASSED = "deadline_passed"


@dataclass(frozen=True)
class QueuedRequest:
    request_id: str
    priority: int
    bits: int
    deadline: float
    seq: int
    enqueued_at: float

    @property
    def _key(self) -> tuple[int, int]:
        return (-self.priority, self.seq)


@dataclass(frozen=True)
class PushResult:
    accepted: bool
    reason: str | None = None
    # Entries dropped to make room; the caller must answer them (they will never be served).
    evicted: tuple[QueuedRequest, ...] = ()


class PriorityRequestQueue:
    def __init__(self, max_len: int = 256):
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len must be an integer >= 1, got {max_len!r}")
        self.max_len = max_len
        self._keys: list[tuple[int, int]] = []  # sorted service order
        self._by_key: dict[tuple[int, int], QueuedRequest] = {}
        self._by_id: dict[str, QueuedRequest] = {}
        self._next_seq = 0

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._by_id

    def __iter__(self) -> Iterator[QueuedRequest]:
        """Entries in service order."""
        return iter([self._by_key[k] for k in self._keys])

    def __repr__(self) -> str:
        return f"PriorityRequestQueue(len={len(self)}, max_len={self.max_len})"

    def get(self, request_id: str) -> QueuedRequest | None:
        return self._by_id.get(request_id)

    def peek(self) -> QueuedRequest | None:
        """The head (next to be served), or None when empty. Expired entries included."""
        return self._by_key[self._keys[0]] if self._keys else None

    def next_deadline(self) -> float | None:
        return min((e.deadline for e in self._by_id.values()), default=None)

    def push(self, request_id: str, priority: int, bits: int, deadline: float, now: float) -> PushResult:
        """Queue a new request behind those of the same or higher priority."""
        _check_args(request_id, priority, bits, deadline)
        if request_id in self._by_id:
            raise ValueError(f"request {request_id!r} is already queued")
        entry = QueuedRequest(request_id, priority, bits, float(deadline), self._next_seq, float(now))
        result = self._insert(entry, now)
        if result.accepted:
            self._next_seq += 1
        return result

    def requeue(self, entry: QueuedRequest, now: float, *, bits: int | None = None,
                deadline: float | None = None) -> PushResult:
        """Put back an entry served earlier (e.g. the material it was given went elsewhere), at
        its original place in the order; ``bits`` / ``deadline`` may be corrected."""
        entry = replace(entry, bits=entry.bits if bits is None else bits,
                        deadline=entry.deadline if deadline is None else float(deadline))
        _check_args(entry.request_id, entry.priority, entry.bits, entry.deadline)
        if entry.request_id in self._by_id:
            raise ValueError(f"request {entry.request_id!r} is already queued")
        if entry.seq >= self._next_seq:
            raise ValueError("requeue takes an entry this queue handed out")
        return self._insert(entry, now)

    def extend_deadline(self, request_id: str, deadline: float) -> bool:
        """Move a queued entry's deadline later (another caller now waits for the same key)."""
        entry = self._by_id.get(request_id)
        if entry is None or deadline <= entry.deadline:
            return False
        entry = replace(entry, deadline=float(deadline))
        self._by_id[request_id] = self._by_key[entry._key] = entry
        return True

    def pop_ready(self, available_bits: int, now: float) -> list[QueuedRequest]:
        """Remove and return, in service order, the entries that ``available_bits`` covers:
        serving stops at the first live entry that does not fit (strict priority)."""
        if isinstance(available_bits, bool) or not isinstance(available_bits, int):
            raise ValueError(f"available_bits must be an integer, got {available_bits!r}")
        served: list[QueuedRequest] = []
        left = available_bits
        for key in list(self._keys):
            entry = self._by_key[key]
            if entry.deadline <= now:
                continue  # expired: neither served nor blocking; expire() reports it
            if entry.bits > left:
                break
            left -= entry.bits
            self._delete(entry)
            served.append(entry)
        return served

    def expire(self, now: float) -> list[str]:
        """Remove the entries whose deadline has come (deadline <= now); their ids in service order."""
        expired = [self._by_key[k] for k in self._keys if self._by_key[k].deadline <= now]
        for entry in expired:
            self._delete(entry)
        return [e.request_id for e in expired]

    def remove(self, request_id: str) -> QueuedRequest | None:
        """Take a request out (its caller gave up or was answered); None if it is not queued."""
        entry = self._by_id.get(request_id)
        if entry is not None:
            self._delete(entry)
        return entry

    def _insert(self, entry: QueuedRequest, now: float) -> PushResult:
        if entry.deadline <= now:
            return PushResult(False, DEADLINE_PASSED)
        evicted: tuple[QueuedRequest, ...] = ()
        if len(self._keys) >= self.max_len:
            last = self._by_key[self._keys[-1]]
            if not entry._key < last._key:
                return PushResult(False, QUEUE_FULL)
            self._delete(last)
            evicted = (last,)
        bisect.insort(self._keys, entry._key)
        self._by_key[entry._key] = entry
        self._by_id[entry.request_id] = entry
        return PushResult(True, None, evicted)

    def _delete(self, entry: QueuedRequest) -> None:
        i = bisect.bisect_left(self._keys, entry._key)
        del self._keys[i]
        del self._by_key[entry._key]
        del self._by_id[entry.request_id]


def _check_args(request_id: str, priority: int, bits: int, deadline: float) -> None:
    if not isinstance(request_id, str) or not request_id:
        raise ValueError("request_id must be a non-empty string")
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ValueError(f"priority must be an integer, got {priority!r}")
    if isinstance(bits, bool) or not isinstance(bits, int) or bits <= 0:
        raise ValueError(f"bits must be an integer > 0, got {bits!r}")
    if isinstance(deadline, bool) or not isinstance(deadline, (int, float)) or math.isnan(deadline):
        raise ValueError(f"deadline must be a number, got {deadline!r}")
