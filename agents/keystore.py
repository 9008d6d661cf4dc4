"""Durable key store of one agent (one SQLite file): link-key pools and end-to-end session keys.

**Link keys.** Every physical link has a pool at both of its ends. A key enters
the master's pool as *pending* (fetched with ``enc_keys``, not yet confirmed by
the slave) and becomes *available* once the slave has stored it; the slave
stores it as available straight away (after ``dec_keys``). Every key has an
**owner** (``master`` or ``slave``, assigned by the master): a KM spends only
keys its own side owns (``take``) and names the bytes it spent to the other end
by reference ``(key_ID, offset, length)``; the other end consumes exactly those
bytes (``consume_refs``). A KM's role on a link is recorded with its first key
and never changes, so the store itself enforces that the two ends never spend
the same bytes for different purposes.

**Reference rule (peer side).** A reference must name an available key that the
*other* side owns, lie inside the key, and not overlap any byte of that key
already consumed. References to one key may arrive in any order: the owner
hands out consecutive ranges, but relay messages carrying them travel
concurrently and can overtake each other, so a strict in-order rule would
reject honest traffic. Replays and forgeries cannot pass: every byte can be
consumed once, and the consumed ranges are kept per key until the key is used
up. A message that never arrives leaves a hole at the peer; the sender's abort
path names those references to ``consume_refs`` so both ends discard them.

**Durability.** WAL journal with ``synchronous=FULL``: a transaction is on disk
when its call returns. ``take`` and ``consume_refs`` consume in the same
transaction that reads the bytes, and overwrite the consumed bytes (zeros; the
column is NULLed once the whole key is used), so a crash — even ``kill -9`` or
power loss — can lose unconsumed material but never hand the same bytes out
twice. ``secure_delete`` makes SQLite zero freed space; old page images may
survive in the WAL until it is checkpointed (``checkpoint()``, done on
``close()``).

**Session keys** (end-to-end keys, by KSID and index) are delivered at most once
per side: a second request for the same index raises ``AlreadyDelivered``; an
index that is not there (yet) gives ``None``. Their bytes are wiped as soon as
every side this KM serves has had them.

Times stored here (key arrival, session key creation, relay message IDs) are
wall-clock seconds, since they must mean something across restarts. Key bytes
never appear in logs, exceptions or reprs.
"""
from __future__ import annotations

import hmac
import logging
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

log = logging.getLogger(__name__)

OWNERS = ("master", "slave")
SIDES = ("source", "destination")
DEFAULT_POOL_MAX_BITS = 8 * 2**20
DEFAULT_REPLAY_WINDOW_S = 3600.0
DEFAULT_REPLAY_MAX_PER_LINK = 100_000
SCHEMA_VERSION = 1
_MAX_ID_LEN = 256
# References per consume_refs call: far above what one relayed key needs, low enough that a
# hostile message cannot make the range bookkeeping expensive.
MAX_REFS = 4096
# SQLite page cache per store (KiB). The link-key index on random key IDs is touched all over
# by every batch of new keys; SQLite's default 2 MiB cache makes those batches read most
# index pages back from the file once the pools hold tens of thousands of keys.
CACHE_KIB = 32 * 1024
MAX_IDLE_READERS = 8  # read connections kept open for reuse

_SCHEMA = """
CREATE TABLE IF NOT EXISTS link_roles (
    link TEXT PRIMARY KEY,
    role TEXT NOT NULL CHECK (role IN ('master', 'slave'))
);
CREATE TABLE IF NOT EXISTS link_keys (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,   -- arrival order: pools are spent oldest first
    link TEXT NOT NULL,
    key_id TEXT NOT NULL,
    owner TEXT NOT NULL CHECK (owner IN ('master', 'slave')),
    state TEXT NOT NULL CHECK (state IN ('pending', 'available', 'consumed')),
    size INTEGER NOT NULL CHECK (size > 0),  -- bytes
    consumed INTEGER NOT NULL DEFAULT 0,     -- bytes consumed so far
    ranges TEXT NOT NULL DEFAULT '',         -- consumed byte ranges 'a-b,c-d' (merged, sorted)
    data BLOB,                               -- consumed ranges zeroed; NULL once consumed
    added_at REAL NOT NULL,
    consumed_at REAL,
    UNIQUE (link, key_id)
);
CREATE INDEX IF NOT EXISTS link_keys_fifo ON link_keys (link, owner, state, seq);
-- Pool levels are kept in memory (KeyStore._levels, summed once at open), so the covering
-- index that earlier versions kept for them only slowed every write down.
DROP INDEX IF EXISTS link_keys_levels;
CREATE TABLE IF NOT EXISTS session_keys (
    ksid TEXT NOT NULL,
    idx INTEGER NOT NULL,
    data BLOB,                               -- NULL once every served side has it
    state TEXT NOT NULL CHECK (state IN ('unconfirmed', 'ready', 'delivered')),
    created_at REAL NOT NULL,
    want_source INTEGER NOT NULL,
    want_destination INTEGER NOT NULL,
    got_source INTEGER NOT NULL DEFAULT 0,
    got_destination INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (ksid, idx)
);
CREATE TABLE IF NOT EXISTS relay_messages (
    link TEXT NOT NULL,
    msg_id TEXT NOT NULL,
    seen_at REAL NOT NULL,
    PRIMARY KEY (link, msg_id)
);
CREATE INDEX IF NOT EXISTS relay_messages_age ON relay_messages (link, seen_at);
"""


# ----------------------------------------------------------------------------- errors


class KeyStoreError(Exception):
    """Base of the key store's refusals; messages never carry key material."""


class InsufficientKey(KeyStoreError):
    """Not enough available key of this side in the link's pool; nothing was consumed."""


class KeyRefError(KeyStoreError):
    """A reference names bytes this end cannot consume (unknown, wrong owner, not available,
    out of range, or already consumed: a replay or forgery); nothing was consumed."""


class AlreadyDelivered(KeyStoreError):
    """This session key index was already delivered to that side."""


class RoleConflict(KeyStoreError):
    """The call contradicts this KM's recorded role on the link (master or slave)."""


class DuplicateKey(KeyStoreError):
    """A key ID that the link's pool already holds (a device must never reuse one)."""


class SessionKeyConflict(KeyStoreError):
    """A session key index already holds different bytes."""


class ReplayedMessage(KeyStoreError):
    """``consume_refs(..., msg_id=...)``: that relay message ID was seen on the link already; nothing
    was consumed."""


# ----------------------------------------------------------------------------- values


@dataclass(frozen=True)
class KeyRef:
    """Bytes ``[offset, offset + length)`` of link key ``key_id``, as relay messages name them."""

    key_id: str
    offset: int
    length: int

    def to_wire(self) -> dict[str, Any]:
        return {"key_ID": self.key_id, "offset": self.offset, "length": self.length}

    @classmethod
    def parse(cls, value: Any) -> "KeyRef":
        """A KeyRef from a wire object ``{"key_ID", "offset", "length"}``, a triple or a KeyRef."""
        if isinstance(value, KeyRef):
            kid, off, n = value.key_id, value.offset, value.length
        elif isinstance(value, Mapping):
            if set(value) != {"key_ID", "offset", "length"}:
                raise KeyRefError("a key reference is an object with exactly key_ID, offset and length")
            kid, off, n = value["key_ID"], value["offset"], value["length"]
        elif isinstance(value, (tuple, list)) and len(value) == 3:
            kid, off, n = value
        else:
            raise KeyRefError("a key reference is (key_ID, offset, length)")
        if not isinstance(kid, str) or not kid or len(kid) > _MAX_ID_LEN:
            raise KeyRefError("key_ID of a key reference must be a non-empty string")
        for name, v in (("offset", off), ("length", n)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise KeyRefError(f"{name} of a key reference must be an integer")
        if off < 0 or n < 1:
            raise KeyRefError(f"key reference {kid} [{off}, +{n}): offset must be >= 0 and length >= 1")
        return cls(kid, off, n)


@dataclass(frozen=True)
class KeySlice:
    """Bytes handed out by ``take``: ``data`` is bytes ``[offset, offset + length)`` of key ``key_id``."""

    key_id: str
    offset: int
    length: int
    data: bytes = field(repr=False)

    @property
    def ref(self) -> KeyRef:
        return KeyRef(self.key_id, self.offset, self.length)

    def to_wire(self) -> dict[str, Any]:
        return self.ref.to_wire()


@dataclass(frozen=True)
class SessionKeyInfo:
    index: int
    state: str  # unconfirmed | ready | delivered
    created_at: float
    sides: tuple[str, ...]  # sides this KM delivers to
    delivered: tuple[str, ...]


# ----------------------------------------------------------------------------- byte ranges


def _parse_ranges(text: str) -> list[tuple[int, int]]:
    if not text:
        return []
    out = []
    for part in text.split(","):
        a, b = part.split("-")
        out.append((int(a), int(b)))
    return out


def _format_ranges(ranges: list[tuple[int, int]]) -> str:
    return ",".join(f"{a}-{b}" for a, b in ranges)


def _add_range(ranges: list[tuple[int, int]], a: int, b: int) -> list[tuple[int, int]]:
    """Insert [a, b) (known not to overlap) and merge neighbours."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges + [(a, b)]):
        if out and out[-1][1] == lo:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


def _overlaps(ranges: list[tuple[int, int]], a: int, b: int) -> bool:
    return any(lo < b and a < hi for lo, hi in ranges)


def _free(ranges: list[tuple[int, int]], size: int) -> Iterator[tuple[int, int]]:
    """Unconsumed intervals of a key, in order."""
    pos = 0
    for lo, hi in ranges:
        if lo > pos:
            yield pos, lo
        pos = max(pos, hi)
    if pos < size:
        yield pos, size


def _other(owner: str) -> str:
    return "slave" if owner == "master" else "master"


def _check_owner(owner: Any) -> str:
    if owner not in OWNERS:
        raise ValueError(f"owner must be 'master' or 'slave', got {owner!r}")
    return owner


def _check_id(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > _MAX_ID_LEN:
        raise ValueError(f"{what} must be a non-empty string of at most {_MAX_ID_LEN} characters")
    return value


# ----------------------------------------------------------------------------- the store


class KeyStore:
    """The agent's key store in one SQLite file (created with mode 0600).

    Safe to share between threads: every call runs under one lock, each in its
    own transaction. ``pool_max_bits`` bounds each link's pool (pending plus
    unconsumed available bits); only the filler consults it (``has_room``): the
    slave stores whatever the master confirms, since refusing would lose keys the
    device has already handed out.
    """

    def __init__(self, path: str | os.PathLike[str], *, pool_max_bits: int = DEFAULT_POOL_MAX_BITS,
                 replay_window_s: float = DEFAULT_REPLAY_WINDOW_S,
                 replay_max_per_link: int = DEFAULT_REPLAY_MAX_PER_LINK):
        if isinstance(pool_max_bits, bool) or not isinstance(pool_max_bits, int) or pool_max_bits < 8:
            raise ValueError("pool_max_bits must be an integer of at least 8")
        if replay_window_s <= 0 or replay_max_per_link < 1:
            raise ValueError("replay_window_s and replay_max_per_link must be positive")
        self.path = Path(path)
        self.pool_max_bits = pool_max_bits
        self.replay_window_s = float(replay_window_s)
        self.replay_max_per_link = int(replay_max_per_link)
        self._lock = threading.RLock()
        # Pool levels, kept in memory: (link, owner, state) -> unconsumed bytes of its pending or
        # available keys. Changes made in a transaction are applied once it commits (``_tx``), so
        # the levels always describe committed state; reading them never waits for a transaction.
        self._levels: dict[tuple[str, str, str], int] = {}
        self._levels_lock = threading.Lock()
        self._tx_levels: dict[tuple[str, str, str], int] | None = None
        # Reads run on connections of their own (WAL: a reader sees the last commit and never
        # waits for the writer), so a lookup on the key delivery path does not queue behind a
        # transaction that stores a batch of link keys.
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._closing = False
        self._replay_pruned: dict[str, tuple[float, int]] = {}  # link -> (time, inserts since)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            # Key material: readable by the agent's user only (SQLite gives -wal/-shm the same mode).
            fd = os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600)
            os.close(fd)
        self._db: sqlite3.Connection | None = sqlite3.connect(
            str(self.path), isolation_level=None, check_same_thread=False, timeout=30.0)
        db = self._db
        try:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise KeyStoreError(f"{self.path}: cannot use WAL journal mode (got {mode})")
            # Every commit is on disk when it returns: an acknowledged consumption survives power loss.
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA secure_delete=ON")
            db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise KeyStoreError(f"{self.path}: key store schema {version} is newer than this "
                                    f"software ({SCHEMA_VERSION})")
            db.executescript(_SCHEMA)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            for link, owner, state, left in db.execute(
                    "SELECT link, owner, state, SUM(size - consumed) FROM link_keys "
                    "WHERE state IN ('pending', 'available') GROUP BY link, owner, state"):
                self._levels[(link, owner, state)] = int(left)
        except Exception:
            db.close()
            self._db = None
            raise

    def __repr__(self) -> str:
        return f"KeyStore({str(self.path)!r})"

    # ------------------------------------------------------------------ plumbing

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            db = self._db
            if db is None:
                raise KeyStoreError(f"{self.path}: the key store is closed")
            if self._tx_levels is not None:
                # Inside a transaction of this thread (the lock is re-entrant): join it; the
                # outermost one commits, or rolls everything back if this raises.
                yield db
                return
            db.execute("BEGIN IMMEDIATE")
            self._tx_levels = {}
            try:
                yield db
            except BaseException:
                self._tx_levels = None
                db.execute("ROLLBACK")
                raise
            try:
                db.execute("COMMIT")
            except BaseException:
                self._tx_levels = None
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            changes, self._tx_levels = self._tx_levels, None
            if changes:
                with self._levels_lock:
                    for key, delta in changes.items():
                        self._levels[key] = self._levels.get(key, 0) + delta

    def _level(self, link: str, owner: str, state: str, delta_bytes: int) -> None:
        """Inside ``_tx``: the link's pending or available bytes of ``owner`` change by ``delta_bytes``."""
        assert self._tx_levels is not None, "pool levels change inside a transaction only"
        key = (link, owner, state)
        self._tx_levels[key] = self._tx_levels.get(key, 0) + delta_bytes

    def _level_bytes(self, link: str, states: tuple[str, ...], owners: tuple[str, ...] = OWNERS) -> int:
        if self._db is None:
            raise KeyStoreError(f"{self.path}: the key store is closed")
        with self._levels_lock:
            return sum(self._levels.get((link, o, st), 0) for o in owners for st in states)

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A read on a connection of its own: it sees every committed transaction and does not
        wait for the writer (WAL). The caller reads its rows to the end inside the block."""
        with self._readers_lock:
            if self._db is None or self._closing:
                raise KeyStoreError(f"{self.path}: the key store is closed")
            db = self._readers.pop() if self._readers else None
        if db is None:
            db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False, timeout=30.0)
            db.execute("PRAGMA query_only=ON")
        try:
            yield db
        finally:
            with self._readers_lock:
                if not self._closing and len(self._readers) < MAX_IDLE_READERS:
                    self._readers.append(db)
                    db = None
            if db is not None:
                db.close()

    def close(self) -> None:
        """Checkpoint the WAL (so old page images with key bytes leave it) and close."""
        with self._lock:
            if self._db is None:
                return
            with self._readers_lock:
                self._closing = True
                readers, self._readers = self._readers, []
            for reader in readers:
                reader.close()
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                self._db.close()
                self._db = None

    def checkpoint(self) -> None:
        """Copy the WAL into the database and truncate it."""
        with self._lock:
            if self._db is None:
                raise KeyStoreError(f"{self.path}: the key store is closed")
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def __enter__(self) -> "KeyStore":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    @staticmethod
    def _role_of(db: sqlite3.Connection, link: str) -> str | None:
        row = db.execute("SELECT role FROM link_roles WHERE link=?", (link,)).fetchone()
        return row[0] if row else None

    def _claim_role(self, db: sqlite3.Connection, link: str, role: str) -> None:
        have = self._role_of(db, link)
        if have is None:
            db.execute("INSERT INTO link_roles (link, role) VALUES (?, ?)", (link, role))
        elif have != role:
            raise RoleConflict(f"link {link}: this key store is the link's {have} end, not its {role} end")

    # ------------------------------------------------------------------ link keys: filling

    def role(self, link: str) -> str | None:
        """This KM's role on ``link`` ('master' | 'slave'), recorded with its first key."""
        with self._tx() as db:
            return self._role_of(db, link)

    def links(self) -> dict[str, str]:
        """Every link this store holds keys of, with this KM's role on it."""
        with self._tx() as db:
            return dict(db.execute("SELECT link, role FROM link_roles ORDER BY link").fetchall())

    def _insert(self, link: str, keys: Iterable[tuple[str, bytes, str]], state: str, role: str,
                now: float | None) -> list[str]:
        _check_id(link, "link")
        rows = []
        seen: set[str] = set()
        for item in keys:
            try:
                kid, data, owner = item
            except (TypeError, ValueError):
                raise ValueError("each key is (key_ID, bytes, owner)") from None
            _check_id(kid, "key_ID")
            _check_owner(owner)
            if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
                raise ValueError(f"key {kid}: key material must be non-empty bytes")
            if kid in seen:
                raise DuplicateKey(f"link {link}: key {kid} appears twice in one batch")
            seen.add(kid)
            rows.append((link, kid, owner, state, len(data), bytes(data)))
        if not rows:
            return []
        at = time.time() if now is None else float(now)
        with self._tx() as db:
            self._claim_role(db, link, role)
            ids = [r[1] for r in rows]
            dup = self._existing(db, link, ids)
            if dup:
                raise DuplicateKey(f"link {link}: {len(dup)} key ID(s) already in the pool, e.g. {sorted(dup)[0]}")
            db.executemany("INSERT INTO link_keys (link, key_id, owner, state, size, data, added_at) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?)", [r + (at,) for r in rows])
            for owner in OWNERS:
                self._level(link, owner, state, sum(r[4] for r in rows if r[2] == owner))
        return ids

    @staticmethod
    def _existing(db: sqlite3.Connection, link: str, ids: Sequence[str]) -> dict[str, tuple[str, str, int]]:
        """{key_ID: (owner, state, size in bytes)} of the IDs the link's pool holds."""
        out: dict[str, tuple[str, str, int]] = {}
        for i in range(0, len(ids), 500):  # stay under SQLite's bound-parameter limit
            chunk = list(ids[i:i + 500])
            marks = ",".join("?" * len(chunk))
            for kid, owner, state, size in db.execute(
                    f"SELECT key_id, owner, state, size FROM link_keys WHERE link=? AND key_id IN ({marks})",
                    [link, *chunk]):
                out[kid] = (owner, state, size)
        return out

    @staticmethod
    def _in_chunks(db: sqlite3.Connection, sql: str, link: str, ids: Sequence[str]) -> None:
        """Run ``sql`` (with ``?`` for the link and ``{marks}`` for the IDs) over ``ids`` in chunks:
        one statement per 500 IDs instead of one per key."""
        for i in range(0, len(ids), 500):
            chunk = list(ids[i:i + 500])
            db.execute(sql.format(marks=",".join("?" * len(chunk))), [link, *chunk])

    def add_pending(self, link: str, keys: Iterable[tuple[str, bytes, str]], *, now: float | None = None) -> list[str]:
        """Master end: keys fetched with enc_keys, not yet confirmed by the slave. Returns their IDs."""
        return self._insert(link, keys, "pending", "master", now)

    def add_available(self, link: str, keys: Iterable[tuple[str, bytes, str]], *, now: float | None = None) -> list[str]:
        """Slave end: keys fetched with dec_keys, ready for use. Returns their IDs."""
        return self._insert(link, keys, "available", "slave", now)

    def mark_available(self, link: str, key_ids: Iterable[str]) -> list[str]:
        """Master end: the slave has stored these keys; pending ones become available. Returns those."""
        ids = list(dict.fromkeys(key_ids))
        if not ids:
            return []
        with self._tx() as db:
            existing = self._existing(db, link, ids)
            marked = [k for k in ids if k in existing and existing[k][1] == "pending"]
            self._in_chunks(db, "UPDATE link_keys SET state='available' WHERE link=? AND state='pending' "
                                "AND key_id IN ({marks})", link, marked)
            for k in marked:
                owner, _state, size = existing[k]
                self._level(link, owner, "pending", -size)
                self._level(link, owner, "available", size)
        return marked

    def discard_pending(self, link: str, key_ids: Iterable[str]) -> list[str]:
        """Master end: drop pending keys the slave can never get (its device no longer holds them)."""
        ids = list(dict.fromkeys(key_ids))
        if not ids:
            return []
        with self._tx() as db:
            existing = self._existing(db, link, ids)
            gone = [k for k in ids if k in existing and existing[k][1] == "pending"]
            self._in_chunks(db, "DELETE FROM link_keys WHERE link=? AND state='pending' AND key_id IN ({marks})",
                            link, gone)
            for k in gone:
                owner, _state, size = existing[k]
                self._level(link, owner, "pending", -size)
        return gone

    def pending_keys(self, link: str, limit: int | None = None) -> list[tuple[str, str, int]]:
        """(key_ID, owner, size in bits) of the link's pending keys, oldest first."""
        sql = "SELECT key_id, owner, size FROM link_keys WHERE link=? AND state='pending' ORDER BY seq"
        args: list[Any] = [link]
        if limit is not None:
            sql += " LIMIT ?"
            args.append(int(limit))
        with self._read() as db:
            return [(k, o, 8 * n) for k, o, n in db.execute(sql, args)]

    def known_keys(self, link: str, key_ids: Iterable[str]) -> dict[str, str]:
        """{key_ID: owner} of the given IDs that the link's pool holds, in any state."""
        ids = list(dict.fromkeys(key_ids))
        with self._tx() as db:
            return {k: owner for k, (owner, _state, _size) in self._existing(db, link, ids).items()}

    # ------------------------------------------------------------------ link keys: levels

    def available_bits(self, link: str, owner: str | None = None) -> int:
        """Unconsumed bits of the link's available keys (of one owner, or all).

        From the levels kept in memory (committed state): no query, no wait for a transaction."""
        owners = OWNERS if owner is None else (_check_owner(owner),)
        return 8 * self._level_bytes(link, ("available",), owners)

    def pool_bits(self, link: str) -> int:
        """Bits the link's pool occupies: pending keys plus unconsumed bits of available ones."""
        return 8 * self._level_bytes(link, ("pending", "available"))

    def has_room(self, link: str, bits: int) -> bool:
        return self.pool_bits(link) + bits <= self.pool_max_bits

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per link: this KM's role and, per owner, pending / available / consumed / stored bits.

        ``stored`` counts keys that reached the available state (consumed rows pruned
        by ``prune_consumed`` leave it), so ``available + consumed == stored``.
        """
        out: dict[str, dict[str, Any]] = {}
        with self._tx() as db:
            roles = dict(db.execute("SELECT link, role FROM link_roles").fetchall())
            for link in roles:
                out[link] = {"role": roles[link],
                             **{o: {"pending": 0, "available": 0, "consumed": 0, "stored": 0} for o in OWNERS}}
            for link, owner, state, size, consumed in db.execute(
                    "SELECT link, owner, state, COALESCE(SUM(size), 0), COALESCE(SUM(consumed), 0) "
                    "FROM link_keys GROUP BY link, owner, state"):
                entry = out[link][owner]  # a link's role is recorded with its first key
                if state == "pending":
                    entry["pending"] += 8 * size
                else:
                    entry["available"] += 8 * (size - consumed)
                    entry["consumed"] += 8 * consumed
                    entry["stored"] += 8 * size
        return out

    # ------------------------------------------------------------------ link keys: spending

    def take(self, link: str, owner: str, nbits: int) -> list[KeySlice]:
        """Consume ``nbits`` (a multiple of 8) of this side's available keys, oldest first.

        One transaction: the returned bytes are consumed (and overwritten in the
        file) before this returns. Keys may be used partially. Raises
        InsufficientKey, consuming nothing, when the side owns fewer bits.
        """
        _check_owner(owner)
        if isinstance(nbits, bool) or not isinstance(nbits, int) or nbits <= 0 or nbits % 8:
            raise ValueError(f"nbits must be a positive multiple of 8, got {nbits!r}")
        need = nbits // 8
        with self._tx() as db:
            role = self._role_of(db, link)
            if role is not None and role != owner:
                raise RoleConflict(f"link {link}: this KM is the {role} end and spends only keys the "
                                   f"{role} owns, not the {owner}'s")
            chosen = []
            got = 0
            cur = db.execute("SELECT seq, key_id, size, ranges FROM link_keys "
                             "WHERE link=? AND owner=? AND state='available' ORDER BY seq", (link, owner))
            try:
                for row in cur:
                    seq, kid, size, ranges = row
                    chosen.append(row)
                    got += sum(b - a for a, b in _free(_parse_ranges(ranges), size))
                    if got >= need:
                        break
            finally:
                cur.close()  # no statement left running when the writes and COMMIT come
            if got < need:
                raise InsufficientKey(f"link {link}: {nbits} bits of {owner}-owned key requested, "
                                      f"{8 * got} available")
            slices: list[KeySlice] = []
            left = need
            for seq, kid, size, ranges_text in chosen:
                (data,) = db.execute("SELECT data FROM link_keys WHERE seq=?", (seq,)).fetchone()
                buf = bytearray(data)
                ranges = _parse_ranges(ranges_text)
                for a, b in list(_free(ranges, size)):
                    if left == 0:
                        break
                    n = min(b - a, left)
                    slices.append(KeySlice(kid, a, n, bytes(buf[a:a + n])))
                    buf[a:a + n] = bytes(n)
                    ranges = _add_range(ranges, a, a + n)
                    left -= n
                self._write_key(db, seq, size, ranges, buf)
            self._level(link, owner, "available", -need)
            return slices

    @staticmethod
    def _write_key(db: sqlite3.Connection, seq: int, size: int, ranges: list[tuple[int, int]],
                   buf: bytearray) -> None:
        consumed = sum(b - a for a, b in ranges)
        if consumed >= size:
            db.execute("UPDATE link_keys SET state='consumed', consumed=?, ranges=?, data=NULL, consumed_at=? "
                       "WHERE seq=?", (size, _format_ranges(ranges), time.time(), seq))
        else:
            db.execute("UPDATE link_keys SET consumed=?, ranges=?, data=? WHERE seq=?",
                       (consumed, _format_ranges(ranges), bytes(buf), seq))

    def consume_refs(self, link: str, refs: Iterable[Any],
                     verify: Callable[[bytes], Any] | None = None, *,
                     msg_id: str | Sequence[str] | None = None, now: float | None = None) -> bytes:
        """Consume exactly the referenced bytes of keys the *other* end owns; returns them concatenated.

        ``refs``: KeyRef, ``{"key_ID", "offset", "length"}`` or triples. All or
        nothing: KeyRefError, consuming nothing, if any reference is malformed,
        unknown, names a key this end owns, a key not yet available, bytes
        outside the key, or bytes already consumed (module docstring: the rule).
        ``verify(data)`` runs inside the transaction before anything is written:
        if it raises (a relay message whose tag does not verify), nothing is
        consumed and the exception propagates — so a forged message cannot burn
        the sender's key.

        ``msg_id``: the relay message's ID (or the IDs of a batch of messages),
        recorded (as ``remember_message`` does, at wall-clock ``now``) in the same
        transaction once ``verify`` passed; an ID already seen on the link raises
        ReplayedMessage and consumes nothing. One transaction (one durable commit)
        per received message, or batch, instead of two per message.
        """
        parsed = [KeyRef.parse(r) for r in refs]
        if not parsed:
            raise KeyRefError("no key reference given")
        if len(parsed) > MAX_REFS:
            raise KeyRefError(f"{len(parsed)} key references in one message; at most {MAX_REFS}")
        with self._tx() as db:
            role = self._role_of(db, link)
            if role is None:
                raise KeyRefError(f"link {link}: this key store holds no key of that link")
            owner = _other(role)
            keys: dict[str, list[Any]] = {}  # key_id -> [seq, size, ranges, buf]
            rows = {}
            for kid in dict.fromkeys(r.key_id for r in parsed):
                rows[kid] = db.execute("SELECT seq, owner, state, size, ranges, data FROM link_keys "
                                       "WHERE link=? AND key_id=?", (link, kid)).fetchone()
            out = bytearray()
            for i, ref in enumerate(parsed):
                where = f"link {link}: reference {i} (key {ref.key_id}, offset {ref.offset}, length {ref.length})"
                row = rows[ref.key_id]
                if row is None:
                    raise KeyRefError(f"{where}: no such key in this end's pool")
                seq, key_owner, state, size, ranges_text, data = row
                if key_owner != owner:
                    raise KeyRefError(f"{where}: the key belongs to this ({role}) end, so the peer cannot spend it")
                if state == "pending":
                    raise KeyRefError(f"{where}: the key is not available yet (the slave has not confirmed it)")
                if state == "consumed":
                    raise KeyRefError(f"{where}: the key is already consumed")
                if ref.offset + ref.length > size:
                    raise KeyRefError(f"{where}: beyond the end of the {size}-byte key")
                entry = keys.get(ref.key_id)
                if entry is None:
                    entry = keys[ref.key_id] = [seq, size, _parse_ranges(ranges_text), bytearray(data)]
                a, b = ref.offset, ref.offset + ref.length
                if _overlaps(entry[2], a, b):
                    raise KeyRefError(f"{where}: those bytes are already consumed")
                out += entry[3][a:b]
                entry[3][a:b] = bytes(b - a)
                entry[2] = _add_range(entry[2], a, b)
            if verify is not None:
                verify(bytes(out))
            ids = [] if msg_id is None else [msg_id] if isinstance(msg_id, str) else list(msg_id)
            at = time.time() if now is None else now
            for mid in ids:
                if not self._remember(db, link, mid, at):
                    raise ReplayedMessage(f"link {link}: relay message {mid} was received already")
            for seq, size, ranges, buf in keys.values():
                self._write_key(db, seq, size, ranges, buf)
            self._level(link, owner, "available", -len(out))
            return bytes(out)

    def prune_consumed(self, before: float) -> int:
        """Forget keys consumed before wall-clock time ``before`` (a reference to them stays rejected)."""
        with self._tx() as db:
            return db.execute("DELETE FROM link_keys WHERE state='consumed' AND consumed_at < ?",
                              (float(before),)).rowcount

    # ------------------------------------------------------------------ session keys

    def put_session_key(self, ksid: str, index: int, data: bytes, *, sides: Iterable[str] = SIDES,
                        confirmed: bool = True, now: float | None = None) -> bool:
        """Store key ``index`` of session ``ksid`` for delivery to ``sides`` (those this KM serves).

        ``confirmed=False`` holds it back until ``confirm_session_key`` (the relay's
        source waits for the destination's confirmation). Returns False if the index
        is already stored with the same bytes (a retransmission); raises
        SessionKeyConflict if it holds other bytes, or if its key was delivered already
        (its bytes are gone, so they cannot be compared: one index never names two keys).
        """
        _check_id(ksid, "ksid")
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"index must be a non-negative integer, got {index!r}")
        if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
            raise ValueError("a session key must be non-empty bytes")
        want = set(sides)
        if not want or not want <= set(SIDES):
            raise ValueError(f"sides must be a non-empty subset of {SIDES}")
        at = time.time() if now is None else float(now)
        with self._tx() as db:
            row = db.execute("SELECT data, state FROM session_keys WHERE ksid=? AND idx=?",
                             (ksid, index)).fetchone()
            if row is not None:
                have, state = row
                if have is not None and hmac.compare_digest(bytes(have), bytes(data)):
                    return False
                if state == "delivered":
                    raise SessionKeyConflict(f"session {ksid}: key index {index} was delivered already")
                raise SessionKeyConflict(f"session {ksid}: key index {index} already holds other key material")
            db.execute("INSERT INTO session_keys (ksid, idx, data, state, created_at, want_source, "
                       "want_destination) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (ksid, index, bytes(data), "ready" if confirmed else "unconfirmed", at,
                        int("source" in want), int("destination" in want)))
            return True

    def put_session_keys(self, ksid: str, keys: Sequence[tuple[int, bytes]], *, sides: Iterable[str] = SIDES,
                         now: float | None = None) -> list[bool]:
        """``put_session_key`` for several (index, bytes) of one session, confirmed, in one
        transaction: all stored or, on SessionKeyConflict or a bad argument, none."""
        sides = tuple(sides)
        with self._tx():  # the calls below join this transaction
            return [self.put_session_key(ksid, index, data, sides=sides, now=now) for index, data in keys]

    def group_key(self, group: str, index: int, make: Callable[[], bytes], *, now: float | None = None) -> bytes:
        """Key ``index`` of an ETSI 014 multicast group at its source key manager.

        The first caller's ``make()`` bytes are stored (for one delivery to the master SAE,
        under ``(group, index)``); every caller gets the stored bytes, so each slave's
        relay carries the same key. Not for delivery: that is ``get_session_key``.
        """
        _check_id(group, "group")
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"index must be a non-negative integer, got {index!r}")
        at = time.time() if now is None else float(now)
        with self._tx() as db:
            row = db.execute("SELECT data FROM session_keys WHERE ksid=? AND idx=?", (group, index)).fetchone()
            if row is not None:
                if row[0] is None:
                    raise AlreadyDelivered(f"group {group}: key index {index} was already delivered")
                return bytes(row[0])
            data = bytes(make())
            if not data:
                raise ValueError("a group key must be non-empty bytes")
            db.execute("INSERT INTO session_keys (ksid, idx, data, state, created_at, want_source, "
                       "want_destination) VALUES (?, ?, ?, 'ready', ?, 1, 0)", (group, index, data, at))
            return data

    def confirm_session_key(self, ksid: str, index: int) -> bool:
        """Release an unconfirmed session key for delivery; False if it was not unconfirmed."""
        with self._tx() as db:
            return db.execute("UPDATE session_keys SET state='ready' WHERE ksid=? AND idx=? AND state='unconfirmed'",
                              (ksid, index)).rowcount == 1

    def get_session_key(self, ksid: str, index: int, side: str) -> bytes | None:
        """Deliver key ``index`` of ``ksid`` to ``side`` (at most once per side).

        Returns None when the index is not here (yet) or still unconfirmed; raises
        AlreadyDelivered on a second request of the same side, ValueError when this
        KM does not deliver to that side. The delivery is recorded before return.
        """
        if side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {side!r}")
        with self._tx() as db:
            row = db.execute("SELECT data, state, want_source, want_destination, got_source, got_destination "
                             "FROM session_keys WHERE ksid=? AND idx=?", (ksid, index)).fetchone()
            if row is None:
                return None
            data, state, want_s, want_d, got_s, got_d = row
            want = {"source": want_s, "destination": want_d}
            got = {"source": got_s, "destination": got_d}
            if not want[side]:
                raise ValueError(f"session {ksid}: this KM does not deliver keys to the {side} side")
            if got[side]:
                raise AlreadyDelivered(f"session {ksid}: key index {index} was already delivered to the {side}")
            if state == "unconfirmed":
                return None
            got[side] = 1
            done = all(got[s] for s in SIDES if want[s])
            db.execute(f"UPDATE session_keys SET got_{side}=1, state=?, data=? WHERE ksid=? AND idx=?",
                       ("delivered" if done else state, None if done else data, ksid, index))
            return bytes(data)

    _INFO_COLUMNS = "idx, state, created_at, want_source, want_destination, got_source, got_destination"

    @staticmethod
    def _info(row: Sequence[Any]) -> SessionKeyInfo:
        i, st, at, ws, wd, gs, gd = row
        return SessionKeyInfo(i, st, at, tuple(s for s, w in zip(SIDES, (ws, wd)) if w),
                              tuple(s for s, g in zip(SIDES, (gs, gd)) if g))

    def get_session_keys(self, ksid: str, indices: Sequence[int], side: str) -> list[bytes] | None:
        """``get_session_key`` for several indices in one transaction, all or nothing: None, with
        nothing delivered, if any index is not here (yet) or unconfirmed; AlreadyDelivered (its
        ``index`` attribute names the index), with nothing delivered, if any was delivered to
        that side already."""
        class _Missing(Exception):
            pass

        try:
            with self._tx():  # the calls below join this transaction
                out = []
                for index in indices:
                    try:
                        data = self.get_session_key(ksid, index, side)
                    except AlreadyDelivered as exc:
                        exc.index = index
                        raise
                    if data is None:
                        raise _Missing
                    out.append(data)
                return out
        except _Missing:
            return None

    def list_session_keys(self, ksid: str) -> list[SessionKeyInfo]:
        """Indices of a session held here (without their bytes), in index order."""
        with self._read() as db:
            rows = db.execute(f"SELECT {self._INFO_COLUMNS} FROM session_keys WHERE ksid=? ORDER BY idx",
                              (ksid,)).fetchall()
        return [self._info(row) for row in rows]

    def session_key_infos(self, ksid: str, indices: Iterable[int]) -> dict[int, SessionKeyInfo]:
        """The given indices of a session that are held here (without their bytes), by index.

        A lookup by primary key: its cost does not grow with the keys the session holds, as
        ``list_session_keys`` does."""
        wanted = [i for i in dict.fromkeys(indices)
                  if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2 ** 63]
        out: dict[int, SessionKeyInfo] = {}
        with self._read() as db:
            for i in range(0, len(wanted), 500):
                chunk = wanted[i:i + 500]
                marks = ",".join("?" * len(chunk))
                for row in db.execute(f"SELECT {self._INFO_COLUMNS} FROM session_keys WHERE ksid=? "
                                      f"AND idx IN ({marks})", [ksid, *chunk]):
                    out[row[0]] = self._info(row)
        return out

    def session_key_info(self, ksid: str, index: int) -> SessionKeyInfo | None:
        """Key ``index`` of a session if it is held here (without its bytes)."""
        return self.session_key_infos(ksid, (index,)).get(index)

    def drop_sessions_except(self, keep: Iterable[str]) -> int:
        """Delete the keys of every session not in ``keep`` (after a restart: sessions nothing
        can deliver any more); returns how many sessions."""
        keep = set(keep)
        with self._tx() as db:
            ksids = [k for (k,) in db.execute("SELECT DISTINCT ksid FROM session_keys") if k not in keep]
            for ksid in ksids:
                db.execute("DELETE FROM session_keys WHERE ksid=?", (ksid,))
        return len(ksids)

    def drop_session_keys(self, ksid: str, indices: Iterable[int]) -> int:
        """Delete keys ``indices`` of the session (their bytes with them); returns how many."""
        with self._tx() as db:
            return sum(db.execute("DELETE FROM session_keys WHERE ksid=? AND idx=?", (ksid, int(i))).rowcount
                       for i in indices)

    def drop_session(self, ksid: str) -> int:
        """Delete every key of the session (its bytes with them); returns how many."""
        with self._tx() as db:
            return db.execute("DELETE FROM session_keys WHERE ksid=?", (ksid,)).rowcount

    def purge_expired(self, now: float, ttl_by_ksid: Mapping[str, float], default_ttl: float | None = None) -> int:
        """Delete session keys older than their session's TTL (seconds, wall clock).

        Sessions missing from ``ttl_by_ksid`` use ``default_ttl``, or are kept when it is None.
        """
        with self._tx() as db:
            n = 0
            for ksid, ttl in ttl_by_ksid.items():
                n += db.execute("DELETE FROM session_keys WHERE ksid=? AND created_at < ?",
                                (ksid, float(now) - float(ttl))).rowcount
            if default_ttl is not None:
                known = list(ttl_by_ksid)
                marks = ",".join("?" * len(known))
                cond = f" AND ksid NOT IN ({marks})" if known else ""
                n += db.execute(f"DELETE FROM session_keys WHERE created_at < ?{cond}",
                                [float(now) - float(default_ttl), *known]).rowcount
            return n

    # ------------------------------------------------------------------ relay replay window

    def remember_message(self, link: str, msg_id: str, now: float) -> bool:
        """Record relay message ``msg_id`` received over ``link``; False if it was seen already.

        IDs are kept for ``replay_window_s``; beyond ``replay_max_per_link`` per link
        (give or take a sixteenth) the oldest go first. A replay older than that still fails: the link-key bytes its
        references name are consumed.
        """
        with self._tx() as db:
            return self._remember(db, link, msg_id, now)

    def _remember(self, db: sqlite3.Connection, link: str, msg_id: str, now: float) -> bool:
        _check_id(link, "link")
        _check_id(msg_id, "msg_id")
        now = float(now)
        try:
            db.execute("INSERT INTO relay_messages (link, msg_id, seen_at) VALUES (?, ?, ?)", (link, msg_id, now))
        except sqlite3.IntegrityError:
            return False
        # Prune a few times per window (or per bound's worth of inserts), not on every message.
        last, since = self._replay_pruned.get(link, (-float("inf"), 0))
        since += 1
        self._replay_pruned[link] = (last, since)
        if now - last >= self.replay_window_s / 16 or since >= max(1, self.replay_max_per_link // 16):
            self._replay_pruned[link] = (now, 0)
            db.execute("DELETE FROM relay_messages WHERE link=? AND seen_at < ?",
                       (link, now - self.replay_window_s))
            count = db.execute("SELECT COUNT(*) FROM relay_messages WHERE link=?", (link,)).fetchone()[0]
            if count > self.replay_max_per_link:
                db.execute("DELETE FROM relay_messages WHERE rowid IN (SELECT rowid FROM relay_messages "
                           "WHERE link=? ORDER BY seen_at LIMIT ?)", (link, count - self.replay_max_per_link))
        return True


__all__ = [
    "AlreadyDelivered", "DuplicateKey", "InsufficientKey", "KeyRef", "KeyRefError", "KeySlice", "KeyStore",
    "KeyStoreError", "MAX_REFS", "OWNERS", "ReplayedMessage", "RoleConflict", "SIDES", "SessionKeyConflict",
    "SessionKeyInfo",
]
