"""The agent's durable key store: link-key pools (take / consume_refs, ownership, replay and
forgery rejection, no reuse across a kill -9), session keys delivered at most once per side,
the relay replay window."""
from __future__ import annotations

import hashlib
import os
import random
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agents.keystore import (
    AlreadyDelivered,
    DuplicateKey,
    InsufficientKey,
    KeyRef,
    KeyRefError,
    KeySlice,
    KeyStore,
    ReplayedMessage,
    RoleConflict,
    SessionKeyConflict,
)

REPO = Path(__file__).resolve().parents[1]
LINK = "11111111-2222-4333-8444-555555555555"


def key_batch(n: int, size: int = 32, rng: random.Random | None = None, owners=("master", "slave")):
    """n keys with distinct random bytes, owners alternating: [(key_ID, bytes, owner)]."""
    rng = rng or random.Random(1)
    return [(f"00000000-0000-4000-8000-{i:012d}", rng.randbytes(size), owners[i % len(owners)]) for i in range(n)]


def pair(tmp_path, keys, **kw):
    """Master and slave stores of one link holding the same keys (confirmed)."""
    master = KeyStore(tmp_path / "master.db", **kw)
    slave = KeyStore(tmp_path / "slave.db", **kw)
    master.add_pending(LINK, keys)
    slave.add_available(LINK, keys)
    master.mark_available(LINK, [k for k, _, _ in keys])
    return master, slave


def original(keys, key_id, offset, length):
    return {k: d for k, d, _ in keys}[key_id][offset:offset + length]


# ----------------------------------------------------------------------------- filling and levels


def test_pending_then_available_and_pool_levels(tmp_path):
    keys = key_batch(4)
    with KeyStore(tmp_path / "ks.db", pool_max_bits=8 * 32 * 5) as store:
        assert store.add_pending(LINK, keys) == [k for k, _, _ in keys]
        assert store.role(LINK) == "master"
        assert store.pool_bits(LINK) == 4 * 256
        assert store.available_bits(LINK) == 0
        # Pending keys are not spendable: the slave may not have them.
        with pytest.raises(InsufficientKey):
            store.take(LINK, "master", 8)
        assert store.has_room(LINK, 256) and not store.has_room(LINK, 257)
        assert store.mark_available(LINK, [keys[0][0], keys[1][0], "no-such-key"]) == [keys[0][0], keys[1][0]]
        assert store.mark_available(LINK, [keys[0][0]]) == []  # already available
        assert store.available_bits(LINK) == 512
        assert store.available_bits(LINK, "master") == 256 and store.available_bits(LINK, "slave") == 256
        assert [k for k, _, _ in store.pending_keys(LINK)] == [keys[2][0], keys[3][0]]
        assert store.pending_keys(LINK, limit=1) == [(keys[2][0], "master", 256)]
        assert store.discard_pending(LINK, [keys[2][0], keys[0][0]]) == [keys[2][0]]  # available ones stay
        assert store.pool_bits(LINK) == 3 * 256
        st = store.stats()[LINK]
        assert st["role"] == "master"
        assert st["master"] == {"pending": 0, "available": 256, "consumed": 0, "stored": 256}
        assert st["slave"] == {"pending": 256, "available": 256, "consumed": 0, "stored": 256}
        assert store.known_keys(LINK, [keys[3][0], keys[2][0]]) == {keys[3][0]: "slave"}


def test_roles_and_duplicates_are_refused(tmp_path):
    keys = key_batch(2)
    with KeyStore(tmp_path / "ks.db") as store:
        store.add_available(LINK, keys)
        with pytest.raises(RoleConflict):
            store.add_pending(LINK, key_batch(1, rng=random.Random(9)))
        with pytest.raises(DuplicateKey):
            store.add_available(LINK, [keys[0]])
        with pytest.raises(DuplicateKey):
            store.add_available("other", [keys[0], keys[0]])
        with pytest.raises(ValueError):
            store.add_available("other", [("k", b"", "slave")])
        with pytest.raises(ValueError):
            store.add_available("other", [("k", b"x", "both")])
        # A slave end spends only slave-owned key.
        with pytest.raises(RoleConflict):
            store.take(LINK, "master", 8)
        assert store.links() == {LINK: "slave"}


# ----------------------------------------------------------------------------- take


def test_take_consumes_oldest_first_with_partial_keys(tmp_path):
    keys = key_batch(6)  # slave owns keys 1, 3, 5
    with KeyStore(tmp_path / "ks.db") as store:
        store.add_available(LINK, keys)
        s1 = store.take(LINK, "slave", 80)  # 10 bytes of key 1
        assert [(s.key_id, s.offset, s.length) for s in s1] == [(keys[1][0], 0, 10)]
        s2 = store.take(LINK, "slave", 8 * 40)  # the rest of key 1, 18 bytes of key 3
        assert [(s.key_id, s.offset, s.length) for s in s2] == [(keys[1][0], 10, 22), (keys[3][0], 0, 18)]
        for s in s1 + s2:
            assert s.data == original(keys, s.key_id, s.offset, s.length)
        st = store.stats()[LINK]["slave"]
        assert st["consumed"] == 8 * 50 and st["available"] == 8 * (96 - 50)
        assert st["available"] + st["consumed"] == st["stored"]
        assert store.stats()[LINK]["master"]["consumed"] == 0
        with pytest.raises(ValueError):
            store.take(LINK, "slave", 12)
        with pytest.raises(ValueError):
            store.take(LINK, "slave", 0)


def test_insufficient_key_consumes_nothing(tmp_path):
    keys = key_batch(4)
    with KeyStore(tmp_path / "ks.db") as store:
        store.add_available(LINK, keys)
        store.take(LINK, "slave", 8)
        before = store.stats()
        with pytest.raises(InsufficientKey) as err:
            store.take(LINK, "slave", 8 * 64)
        assert "504 available" in str(err.value)
        assert store.stats() == before
        # Exactly what is left can still be taken.
        assert sum(s.length for s in store.take(LINK, "slave", 8 * 63)) == 63
        assert store.available_bits(LINK, "slave") == 0


def test_consumed_bytes_are_overwritten_on_disk(tmp_path):
    keys = key_batch(6)
    path = tmp_path / "ks.db"
    store = KeyStore(path)
    store.add_available(LINK, keys)
    taken = store.take(LINK, "slave", 8 * (32 + 16))  # all of key 1, half of key 3
    with sqlite3.connect(path) as raw:
        rows = dict(raw.execute("SELECT key_id, data FROM link_keys").fetchall())
    assert rows[keys[1][0]] is None
    assert rows[keys[3][0]] == bytes(16) + keys[3][1][16:]
    store.close()  # checkpoints: the WAL's old page images go
    image = path.read_bytes() + b"".join(p.read_bytes() for p in tmp_path.glob("ks.db-*"))
    for s in taken:
        assert s.data not in image
    assert keys[3][1][16:] in image and keys[5][1] in image  # unconsumed material is still there


def test_concurrent_takes_never_share_bytes(tmp_path):
    keys = key_batch(64)
    with KeyStore(tmp_path / "ks.db") as store:
        store.add_available(LINK, keys)
        results: list[list[KeySlice]] = []
        lock = threading.Lock()

        def worker(size):
            for _ in range(2 * 32 * 32):  # more rounds than the pool has bytes: a bound, not a limit
                try:
                    got = store.take(LINK, "slave", size)
                except InsufficientKey:
                    return
                with lock:
                    results.append(got)

        threads = [threading.Thread(target=worker, args=(size,)) for size in (8, 24, 120, 200)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        used: dict[str, set[int]] = {}
        for got in results:
            for s in got:
                span = set(range(s.offset, s.offset + s.length))
                assert not used.setdefault(s.key_id, set()) & span
                used[s.key_id] |= span
                assert s.data == original(keys, s.key_id, s.offset, s.length)
        assert sum(len(v) for v in used.values()) + store.available_bits(LINK, "slave") // 8 == 32 * 32


def test_key_bytes_stay_out_of_reprs_and_errors(tmp_path):
    keys = key_batch(2, size=16)
    with KeyStore(tmp_path / "ks.db") as store:
        store.add_available(LINK, keys)
        s = store.take(LINK, "slave", 64)[0]
        for text in (repr(s), str(s), repr(store)):
            assert s.data.hex() not in text and repr(s.data) not in text
        with pytest.raises(KeyRefError) as err:
            store.consume_refs(LINK, [s.ref])  # own key
        assert keys[1][1].hex() not in str(err.value)


def test_reopen_keeps_consumption(tmp_path):
    keys = key_batch(4)
    with KeyStore(tmp_path / "ks.db") as store:
        store.add_available(LINK, keys)
        first = store.take(LINK, "slave", 8 * 40)
    with KeyStore(tmp_path / "ks.db") as store:
        again = store.take(LINK, "slave", 8 * 24)
        assert [(s.key_id, s.offset) for s in again] == [(keys[3][0], 8)]
        assert not {(s.key_id, s.offset) for s in first} & {(s.key_id, s.offset) for s in again}
        assert store.role(LINK) == "slave"
    assert stat.S_IMODE(os.stat(tmp_path / "ks.db").st_mode) == 0o600


# ----------------------------------------------------------------------------- consume_refs


def test_take_and_consume_refs_give_identical_bytes_both_ways(tmp_path):
    keys = key_batch(8)
    master, slave = pair(tmp_path, keys)
    with master, slave:
        sent = master.take(LINK, "master", 8 * 40)
        assert slave.consume_refs(LINK, [s.to_wire() for s in sent]) == b"".join(s.data for s in sent)
        back = slave.take(LINK, "slave", 8 * 70)
        assert master.consume_refs(LINK, [s.ref for s in back]) == b"".join(s.data for s in back)
        for store in (master, slave):
            st = store.stats()[LINK]
            assert st["master"]["consumed"] == 8 * 40 and st["slave"]["consumed"] == 8 * 70
            for owner in ("master", "slave"):
                assert st[owner]["available"] + st[owner]["consumed"] == st[owner]["stored"] == 4 * 256


def test_refs_of_one_key_may_arrive_in_any_order(tmp_path):
    keys = key_batch(2)
    master, slave = pair(tmp_path, keys)
    with master, slave:
        a = master.take(LINK, "master", 64)
        b = master.take(LINK, "master", 64)
        c = master.take(LINK, "master", 64)
        # Relay messages overtake each other: the peer must still accept each once.
        assert slave.consume_refs(LINK, [r.ref for r in c]) == c[0].data
        assert slave.consume_refs(LINK, [r.ref for r in a]) == a[0].data
        assert slave.consume_refs(LINK, [r.ref for r in b]) == b[0].data
        assert slave.available_bits(LINK, "master") == master.available_bits(LINK, "master") == 8 * 8


def test_replayed_refs_are_rejected_and_consume_nothing(tmp_path):
    keys = key_batch(8)
    master, slave = pair(tmp_path, keys)
    with master, slave:
        first = master.take(LINK, "master", 8 * 40)
        slave.consume_refs(LINK, [s.ref for s in first])
        fresh = master.take(LINK, "master", 64)
        before = slave.stats()
        # The replay rides along with a fresh, honest reference: the whole message fails.
        with pytest.raises(KeyRefError, match="already consumed"):
            slave.consume_refs(LINK, [fresh[0].ref] + [s.ref for s in first])
        # A sub-range of consumed bytes, overlapping a consumed range.
        with pytest.raises(KeyRefError, match="already consumed"):
            slave.consume_refs(LINK, [KeyRef(first[-1].key_id, first[-1].offset + first[-1].length - 1, 2)])
        assert slave.stats() == before
        # The fresh reference is untouched and still works.
        assert slave.consume_refs(LINK, [fresh[0].ref]) == fresh[0].data


@pytest.mark.parametrize("make_ref, match", [
    (lambda keys: ("00000000-0000-4000-8000-999999999999", 0, 4), "no such key"),
    (lambda keys: (keys[1][0], 0, 4), "belongs to this"),          # slave-owned, at the slave
    (lambda keys: (keys[0][0], 30, 4), "beyond the end"),
    (lambda keys: (keys[0][0], -1, 4), "offset must be"),
    (lambda keys: (keys[0][0], 0, 0), "length >= 1"),
    (lambda keys: (keys[0][0], True, 4), "integer"),
    (lambda keys: {"key_ID": keys[0][0], "offset": 0}, "exactly key_ID"),
    (lambda keys: {"key_ID": 7, "offset": 0, "length": 1}, "non-empty string"),
    (lambda keys: "k", r"\(key_ID, offset, length\)"),
])
def test_forged_refs_are_rejected_and_consume_nothing(tmp_path, make_ref, match):
    keys = key_batch(4)
    master, slave = pair(tmp_path, keys)
    with master, slave:
        good = master.take(LINK, "master", 32)[0]
        before = slave.stats()
        with pytest.raises(KeyRefError, match=match):
            slave.consume_refs(LINK, [good.ref, make_ref(keys)])
        assert slave.stats() == before


def test_refs_to_pending_or_overlapping_or_unknown_link_are_rejected(tmp_path):
    keys = key_batch(4)
    master, slave = pair(tmp_path, keys)
    extra = key_batch(2, rng=random.Random(5), owners=("slave",))
    extra = [(k.replace("-0000-4000", "-1111-4000"), d, o) for k, d, o in extra]
    with master, slave:
        master.add_pending(LINK, extra)  # not yet confirmed by the slave
        with pytest.raises(KeyRefError, match="not available yet"):
            master.consume_refs(LINK, [(extra[0][0], 0, 4)])
        with pytest.raises(KeyRefError, match="already consumed"):
            slave.consume_refs(LINK, [(keys[0][0], 0, 8), (keys[0][0], 4, 8)])  # overlap within one message
        with pytest.raises(KeyRefError, match="holds no key"):
            slave.consume_refs("another-link", [(keys[0][0], 0, 8)])
        with pytest.raises(KeyRefError, match="no key reference"):
            slave.consume_refs(LINK, [])
        assert slave.stats()[LINK]["master"]["consumed"] == 0


def test_fully_consumed_and_pruned_keys_stay_rejected(tmp_path):
    keys = key_batch(2)
    master, slave = pair(tmp_path, keys)
    with master, slave:
        whole = master.take(LINK, "master", 256)
        slave.consume_refs(LINK, [whole[0].ref])
        with pytest.raises(KeyRefError, match="already consumed"):
            slave.consume_refs(LINK, [whole[0].ref])
        assert slave.prune_consumed(before=time.time() + 1) == 1
        with pytest.raises(KeyRefError, match="no such key"):
            slave.consume_refs(LINK, [whole[0].ref])
        st = slave.stats()[LINK]["master"]
        assert st["available"] + st["consumed"] == st["stored"] == 0


# ----------------------------------------------------------------------------- crash


@pytest.mark.parametrize("seed", [11, 22, 33])
def test_kill_9_never_hands_out_bytes_twice(tmp_path, seed):
    rng = random.Random(seed)
    keys = key_batch(300, size=32, rng=rng, owners=("slave",))
    db, log_path = tmp_path / "ks.db", tmp_path / "taken.log"
    with KeyStore(db) as store:
        store.add_available(LINK, keys)
    log_path.touch()
    child = subprocess.Popen([sys.executable, str(REPO / "tests" / "helpers_crash.py"), str(db), str(log_path),
                              LINK, "slave"], cwd=REPO)
    try:
        # Kill after a random number of returned takes (bounded: the pool allows ~1500).
        target = rng.randint(1, 400)
        deadline = time.monotonic() + 60  # liveness guard only
        while log_path.read_text().count("\n") < target and child.poll() is None:
            assert time.monotonic() < deadline, "the crash-test child made no progress"
            time.sleep(0.001)
        time.sleep(rng.random() * 0.01)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    lines = log_path.read_text().split("\n")[:-1]  # a cut last line has no newline: ignored
    assert lines and "END" not in lines, "the child ran dry before the kill; the test proves nothing"
    logged: dict[str, set[int]] = {}
    for line in lines:
        kid, off, n, digest = line.split()
        off, n = int(off), int(n)
        assert hashlib.sha256(original(keys, kid, off, n)).hexdigest() == digest
        span = set(range(off, off + n))
        assert not logged.setdefault(kid, set()) & span, "the child was handed the same bytes twice"
        logged[kid] |= span
    with KeyStore(db) as store:
        st = store.stats()[LINK]["slave"]
        assert st["available"] + st["consumed"] == st["stored"] == 300 * 256
        logged_bytes = sum(len(v) for v in logged.values())
        # Only the take in flight at the kill can be consumed without being logged (<= 512 bits).
        assert logged_bytes <= st["consumed"] // 8 <= logged_bytes + 64
        rest = store.take(LINK, "slave", st["available"]) if st["available"] else []
        for s in rest:
            assert not logged.get(s.key_id, set()) & set(range(s.offset, s.offset + s.length)), \
                "a slice returned before the kill was handed out again"
            assert s.data == original(keys, s.key_id, s.offset, s.length)
        assert store.available_bits(LINK) == 0


# ----------------------------------------------------------------------------- session keys


def test_session_key_delivered_at_most_once_per_side(tmp_path):
    with KeyStore(tmp_path / "ks.db") as store:
        assert store.put_session_key("ks-1", 0, b"K" * 32) is True
        assert store.get_session_key("ks-1", 1, "source") is None  # not there yet
        assert store.get_session_key("ks-1", 0, "source") == b"K" * 32
        with pytest.raises(AlreadyDelivered):
            store.get_session_key("ks-1", 0, "source")
        assert store.get_session_key("ks-1", 0, "destination") == b"K" * 32
        with pytest.raises(AlreadyDelivered):
            store.get_session_key("ks-1", 0, "destination")
        info = store.list_session_keys("ks-1")[0]
        assert (info.index, info.state, info.delivered) == (0, "delivered", ("source", "destination"))
        with sqlite3.connect(tmp_path / "ks.db") as raw:
            assert raw.execute("SELECT data FROM session_keys").fetchone()[0] is None  # wiped once delivered
        # A key stored under that index after delivery is refused (the delivered bytes are gone, so
        # even a copy cannot be told from another key): one index never names two keys.
        for again in (b"K" * 32, b"X" * 32):
            with pytest.raises(SessionKeyConflict):
                store.put_session_key("ks-1", 0, again)
        with pytest.raises(AlreadyDelivered):
            store.get_session_key("ks-1", 0, "source")
        with pytest.raises(ValueError):
            store.get_session_key("ks-1", 0, "sideways")


def test_session_key_for_one_side_unconfirmed_then_confirmed(tmp_path):
    with KeyStore(tmp_path / "ks.db") as store:
        store.put_session_key("ks-2", 3, b"\x01" * 16, sides=["source"], confirmed=False)
        assert store.get_session_key("ks-2", 3, "source") is None  # waits for the destination's confirmation
        assert store.put_session_key("ks-2", 3, b"\x01" * 16) is False  # same bytes: a retransmission
        with pytest.raises(SessionKeyConflict):
            store.put_session_key("ks-2", 3, b"\x02" * 16)
        assert store.confirm_session_key("ks-2", 3) is True
        assert store.confirm_session_key("ks-2", 3) is False
        with pytest.raises(ValueError, match="does not deliver"):
            store.get_session_key("ks-2", 3, "destination")
        assert store.get_session_key("ks-2", 3, "source") == b"\x01" * 16
        assert store.list_session_keys("ks-2")[0].state == "delivered"


def test_session_keys_survive_reopen_and_delivery_is_durable(tmp_path):
    with KeyStore(tmp_path / "ks.db") as store:
        store.put_session_key("ks-3", 0, b"a" * 8)
        store.put_session_key("ks-3", 1, b"b" * 8)
        assert store.get_session_key("ks-3", 0, "source") == b"a" * 8
    with KeyStore(tmp_path / "ks.db") as store:
        with pytest.raises(AlreadyDelivered):
            store.get_session_key("ks-3", 0, "source")
        assert store.get_session_key("ks-3", 1, "source") == b"b" * 8


def test_drop_session_and_purge_expired(tmp_path):
    with KeyStore(tmp_path / "ks.db") as store:
        store.put_session_key("old", 0, b"x", now=100.0)
        store.put_session_key("old", 1, b"y", now=150.0)
        store.put_session_key("other", 0, b"z", now=100.0)
        store.put_session_key("gone", 0, b"w", now=100.0)
        assert store.drop_session("gone") == 1
        assert store.purge_expired(200.0, {"old": 60.0}) == 1  # index 0 is older than 60 s
        assert [i.index for i in store.list_session_keys("old")] == [1]
        assert store.list_session_keys("other")  # no TTL given, no default: kept
        assert store.purge_expired(200.0, {"old": 60.0}, default_ttl=50.0) == 1
        assert store.list_session_keys("other") == [] and store.list_session_keys("gone") == []


# ----------------------------------------------------------------------------- replay window


def test_remember_message_detects_replays_per_link(tmp_path):
    with KeyStore(tmp_path / "ks.db", replay_window_s=100.0) as store:
        assert store.remember_message(LINK, "m1", 10.0) is True
        assert store.remember_message(LINK, "m1", 11.0) is False
        assert store.remember_message("other-link", "m1", 11.0) is True
        # Past the window the ID is forgotten (the consumed link key still stops the replay).
        assert store.remember_message(LINK, "m2", 200.0) is True
        assert store.remember_message(LINK, "m1", 201.0) is True


def test_replay_window_is_bounded_per_link(tmp_path):
    with KeyStore(tmp_path / "ks.db", replay_window_s=1e9, replay_max_per_link=32) as store:
        for i in range(200):
            assert store.remember_message(LINK, f"m{i}", float(i))
        with sqlite3.connect(tmp_path / "ks.db") as raw:
            count = raw.execute("SELECT COUNT(*) FROM relay_messages").fetchone()[0]
        assert count <= 32 + 32 // 16
        assert store.remember_message(LINK, "m199", 300.0) is False  # the newest are kept


def test_failed_verification_consumes_nothing(tmp_path):
    keys = key_batch(4)
    master, slave = pair(tmp_path, keys)
    with master, slave:
        sent = master.take(LINK, "master", 8 * 48)
        refs = [s.ref for s in sent]
        before = slave.stats()[LINK]

        def reject(data):
            assert data == b"".join(s.data for s in sent)
            raise ValueError("tag does not verify")

        with pytest.raises(ValueError, match="tag does not verify"):
            slave.consume_refs(LINK, refs, verify=reject)
        assert slave.stats()[LINK] == before
        # The honest message that follows still finds its bytes.
        seen = []
        assert slave.consume_refs(LINK, refs, verify=seen.append) == b"".join(s.data for s in sent)
        assert len(seen) == 1


def _sql_levels(store: KeyStore, link: str) -> tuple[int, dict[str, int]]:
    """pool_bits and available_bits per owner, straight from the table."""
    db = store._db
    pool = db.execute("SELECT COALESCE(SUM(size - consumed), 0) FROM link_keys WHERE link=? "
                      "AND state IN ('pending', 'available')", (link,)).fetchone()[0]
    avail = {o: db.execute("SELECT COALESCE(SUM(size - consumed), 0) FROM link_keys WHERE link=? "
                           "AND state='available' AND owner=?", (link, o)).fetchone()[0] for o in ("master", "slave")}
    return 8 * pool, {o: 8 * v for o, v in avail.items()}


def _memory_levels(store: KeyStore, link: str) -> tuple[int, dict[str, int]]:
    return store.pool_bits(link), {o: store.available_bits(link, o) for o in ("master", "slave")}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_pool_levels_in_memory_match_the_table(tmp_path, seed):
    """pool_bits / available_bits come from levels kept in memory: after any mix of filling,
    spending, refused and failed calls, and after a reopen, they equal the table's sums."""
    rng = random.Random(seed)
    keys = [(f"00000000-0000-4000-8000-{i:012d}", rng.randbytes(rng.choice((16, 32, 40))),
             ("master", "slave")[rng.randrange(2)]) for i in range(200)]
    master = KeyStore(tmp_path / "m.db")
    slave = KeyStore(tmp_path / "s.db")
    added = 0
    try:
        for _ in range(120):
            op = rng.randrange(6)
            if op == 0 and added < len(keys):
                batch = keys[added:added + rng.randint(1, 20)]
                added += len(batch)
                master.add_pending(LINK, batch)
                slave.add_available(LINK, batch)
                if rng.random() < 0.3:  # a duplicate in a batch: refused, nothing stored
                    with pytest.raises(DuplicateKey):
                        master.add_pending(LINK, batch[:1])
            elif op == 1 and added:
                master.mark_available(LINK, [k for k, _, _ in rng.sample(keys[:added], min(added, 15))])
            elif op == 2 and added and rng.random() < 0.2:
                master.discard_pending(LINK, [k for k, _, _ in rng.sample(keys[:added], min(added, 3))])
            elif op in (3, 4):
                owner = rng.choice(("master", "slave"))
                spender, receiver = (master, slave) if owner == "master" else (slave, master)
                try:
                    sent = spender.take(LINK, owner, 8 * rng.randint(1, 60))
                except InsufficientKey:
                    continue
                refs = [x.ref for x in sent]
                if rng.random() < 0.3:  # a forged message first: consumes nothing
                    with pytest.raises((ValueError, KeyRefError)):
                        receiver.consume_refs(LINK, refs, verify=lambda d: (_ for _ in ()).throw(ValueError("tag")))
                try:
                    receiver.consume_refs(LINK, refs)
                except KeyRefError:
                    pass  # a pending key at the master (the slave spent it before the master's confirmation)
            else:
                with pytest.raises(InsufficientKey):
                    master.take(LINK, "master", 8 * 10 ** 6)
            for store in (master, slave):
                assert _memory_levels(store, LINK) == _sql_levels(store, LINK)
    finally:
        levels = {name: _memory_levels(st, LINK) for name, st in (("m", master), ("s", slave))}
        master.close()
        slave.close()
    for name in ("m", "s"):
        with KeyStore(tmp_path / f"{name}.db") as again:
            assert _memory_levels(again, LINK) == _sql_levels(again, LINK) == levels[name]


def test_consume_refs_with_msg_id_refuses_a_replay_and_consumes_nothing(tmp_path):
    keys = key_batch(4)
    master, slave = pair(tmp_path, keys)
    with master, slave:
        first = master.take(LINK, "master", 8 * 48)
        assert slave.consume_refs(LINK, [s.ref for s in first], msg_id="m1", now=10.0) == b"".join(
            s.data for s in first)
        second = master.take(LINK, "master", 8 * 16)
        before = slave.stats()[LINK]
        with pytest.raises(ReplayedMessage):  # fresh refs under an ID seen before: nothing consumed
            slave.consume_refs(LINK, [s.ref for s in second], msg_id="m1", now=11.0)
        assert slave.stats()[LINK] == before
        assert not slave.remember_message(LINK, "m1", 12.0)
        # A forged message does not record its ID: the honest one that follows goes through.
        with pytest.raises(ValueError):
            slave.consume_refs(LINK, [s.ref for s in second], msg_id="m2", now=13.0,
                               verify=lambda d: (_ for _ in ()).throw(ValueError("tag")))
        assert slave.consume_refs(LINK, [s.ref for s in second], msg_id="m2", now=14.0) == second[0].data


def test_session_key_infos_by_index(tmp_path):
    with KeyStore(tmp_path / "ks.db") as store:
        for i in range(5):
            store.put_session_key("k", i, bytes([i + 1]) * 4, sides=("source",), confirmed=i != 3)
        store.get_session_key("k", 1, "source")
        infos = store.session_key_infos("k", [4, 1, 3, 9, 1, -1, 2 ** 70])
        assert sorted(infos) == [1, 3, 4]
        assert infos[1].delivered == ("source",) and infos[3].state == "unconfirmed"
        assert infos == {i.index: i for i in store.list_session_keys("k") if i.index in (1, 3, 4)}
        assert store.session_key_info("k", 0).sides == ("source",)
        assert store.session_key_info("k", 7) is None and store.session_key_info("other", 0) is None


def test_group_key_is_made_once_and_delivered_once_to_the_master(tmp_path):
    group = "99999999-9999-4999-8999-999999999999"
    made = []

    def make():
        made.append(os.urandom(32))
        return made[-1]

    with KeyStore(tmp_path / "ks.sqlite") as store:
        first = store.group_key(group, 0, make)
        assert store.group_key(group, 0, make) == first and made == [first]  # every member relays these bytes
        assert store.get_session_key(group, 0, "source") == first
        with pytest.raises(AlreadyDelivered):
            store.group_key(group, 0, make)  # delivered: no member relays it any more
        with pytest.raises(AlreadyDelivered):
            store.get_session_key(group, 0, "source")
        with pytest.raises(ValueError):
            store.get_session_key(group, 0, "destination")
        assert store.group_key(group, 1, make) != first
    with KeyStore(tmp_path / "ks.sqlite") as store:  # durable: the same bytes after a restart
        assert store.group_key(group, 1, make) == made[1] and len(made) == 2
        # A failed call's keys are dropped by index; the others stay.
        assert store.drop_session_keys(group, [1, 7]) == 1
        assert [i.index for i in store.list_session_keys(group)] == [0]


def test_get_session_keys_is_all_or_nothing(tmp_path):
    with KeyStore(tmp_path / "ks.db") as store:
        for i in range(4):
            store.put_session_key("k", i, bytes([i + 1]) * 4, sides=("destination",), confirmed=i != 2)
        assert store.get_session_keys("k", [0, 2], "destination") is None  # 2 unconfirmed: nothing delivered
        assert store.get_session_keys("k", [0, 9], "destination") is None  # 9 not here
        assert store.get_session_keys("k", [1, 0], "destination") == [b"\x02" * 4, b"\x01" * 4]
        with pytest.raises(AlreadyDelivered) as exc:
            store.get_session_keys("k", [3, 0], "destination")
        assert exc.value.index == 0
        assert store.get_session_keys("k", [3], "destination") == [b"\x04" * 4]  # 3 was not handed out above
        delivered = {i.index for i in store.list_session_keys("k") if i.delivered}
        assert delivered == {0, 1, 3}
