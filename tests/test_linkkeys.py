"""Link-key pool protocol: PoolFiller decisions with a fake time, and LinkKeyWorker master + slave
against both ends of the twin's key engine (in process, and over HTTP with the real ETSI 014
driver), down to identical bytes at both ends."""
from __future__ import annotations

import json
import threading
import time

import pytest

from agents.drivers.base import (
    BadRequest,
    DeviceKey,
    DeviceStatus,
    DeviceUnreachable,
    KeysUnavailable,
    QKDDevice,
)
from agents.keystore import KeyRefError, KeyStore
from agents.linkkeys import (
    Fetch,
    GetStatus,
    LinkKeyProtocolError,
    LinkKeyWorker,
    PoolFiller,
    RateMeter,
    Renotify,
    Wait,
)
from db.netfile import Device, Link
from qkdsdn.twin.engine import InsufficientKey as EngineInsufficientKey
from qkdsdn.twin.engine import KeyEngine, KeysNotFound

MASTER, SLAVE = "KM0", "KM1"
QKDL = "11111111-2222-4333-8444-555555555555"
MSG_NOT_FOUND = "one or more keys specified are not found on KME"


class FakeClock:
    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def status(*, stored=100, key_size=256, per_request=16) -> DeviceStatus:
    return DeviceStatus(source_kme_id="A", target_kme_id="B", master_sae_id=MASTER, slave_sae_id=SLAVE,
                        key_size=key_size, stored_key_count=stored, max_key_count=4096,
                        max_key_per_request=per_request, max_key_size=1024, min_key_size=64, max_sae_id_count=0)


# ----------------------------------------------------------------------------- rate meter


def test_rate_meter_averages_over_its_window():
    m = RateMeter(10.0, now=0.0)
    assert m.rate(0.0) == 0.0
    m.add(1.0, 1000)
    assert m.rate(2.0) == 500.0  # less than a window observed: 1000 bits over 2 s
    m.add(12.0, 3000)
    assert m.rate(12.0) == 300.0  # the first batch has left the window
    assert m.rate(30.0) == 0.0
    assert m.total_bits == 4000


# ----------------------------------------------------------------------------- PoolFiller


def filler(**kw) -> PoolFiller:
    kw.setdefault("pool_max_bits", 100 * 256)
    return PoolFiller("master", now=0.0, **kw)


def test_master_asks_status_then_fetches_what_fits():
    f = filler()
    assert f.next_action(0.0, pool_bits=0, pending_keys=0) == GetStatus()
    f.on_status(0.0, status(stored=40, per_request=16))
    assert f.next_action(0.0, 0, 0) == Fetch(16, 256)  # device batch limit
    assert f.next_action(0.0, 90 * 256, 0) == Fetch(10, 256)  # room left in the pool
    f.on_fetched(0.0, 16)
    f.on_fetched(0.0, 16)
    assert f.next_action(0.0, 0, 0) == Fetch(8, 256)  # what the device still holds
    f.on_fetched(0.0, 8)
    assert f.next_action(0.0, 0, 0) == GetStatus()  # the device's count is used up: ask again


def test_max_batch_caps_the_device_limit():
    f = filler(max_batch=5)
    f.on_status(0.0, status(per_request=16))
    assert f.next_action(0.0, 0, 0) == Fetch(5, 256)
    assert f.batch_limit() == 5


def test_full_pool_waits_and_polls():
    f = filler(full_poll_s=0.5)
    f.on_status(0.0, status())
    action = f.next_action(3.0, pool_bits=100 * 256 - 255, pending_keys=0)  # less than one key of room
    assert action == Wait(3.5, "pool full")


def test_pending_keys_are_renotified_before_fetching_more():
    f = filler()
    f.on_status(0.0, status(per_request=16))
    assert f.next_action(0.0, 0, pending_keys=3) == Renotify(16)
    f.on_notify_failed(1.0)
    assert f.next_action(1.0, 0, 3) == Wait(1.05, "the slave KM did not answer the notification")
    f.on_notify_failed(1.05)
    until = f.next_action(1.05, 0, 3).until
    assert until == pytest.approx(1.15)  # doubled
    assert f.next_action(until, 0, 3) == Renotify(16)
    f.on_notified(until, stored_bits=768, resolved=3)
    assert f.next_action(until, 0, 0) == Fetch(16, 256)
    # An answer that resolves nothing counts as a failure (no busy loop).
    f.on_notified(2.0, 0, 0)
    assert isinstance(f.next_action(2.0, 0, 3), Wait)


def test_no_key_backs_off_exponentially_up_to_the_cap_and_resets():
    f = filler(min_backoff_s=0.1, max_backoff_s=0.5)
    f.on_status(0.0, status(stored=0))
    waits = []
    now = 0.0
    for _ in range(6):
        action = f.next_action(now, 0, 0)
        assert isinstance(action, Wait) and action.reason == "device has no key"
        waits.append(round(action.until - now, 6))
        now = action.until
        assert f.next_action(now, 0, 0) == GetStatus()
        f.on_status(now, status(stored=0))
    assert waits == [0.1, 0.2, 0.4, 0.5, 0.5, 0.5]
    f.on_status(now, status(stored=7))
    assert f.next_action(now, 0, 0) == Fetch(7, 256)
    f.on_no_key(now)  # the device's 503 despite its count
    assert f.next_action(now, 0, 0) == Wait(now + 0.1, "device has no key")


def test_device_errors_and_unusable_status_back_off():
    f = filler(min_backoff_s=0.2)
    f.on_device_error(0.0, "device error: DeviceUnreachable")
    assert f.next_action(0.0, 0, 0) == Wait(0.2, "device error: DeviceUnreachable")
    assert f.next_action(0.2, 0, 0) == GetStatus()
    f.on_status(0.2, status(key_size=12))
    assert isinstance(f.next_action(0.2, 0, 0), Wait)
    assert f.key_size is None


def test_ownership_alternates_across_batches():
    f = filler()
    assert f.assign_owners(3) == ["master", "slave", "master"]
    assert f.assign_owners(2) == ["slave", "master"]


def test_slave_never_fetches_and_measures_arrivals():
    f = PoolFiller("slave", pool_max_bits=1024, now=0.0)
    assert f.next_action(5.0, 0, 0) == Wait(None, "slave end: the master's notifications bring the keys")
    f.on_stored(1.0, 512)
    assert f.arrival_rate_bps(2.0) == 256.0
    with pytest.raises(ValueError):
        PoolFiller("both", pool_max_bits=1024, now=0.0)


# ----------------------------------------------------------------------------- twin engine as a device


def make_engine(clock, *, skr_bps=1_000_000.0, max_per_request=16, buffer_bits=1 << 22) -> KeyEngine:
    dev = Device(model="fixed", skr_bps=skr_bps, qber=0.02, key_size_bits=256, min_key_size_bits=64,
                 max_key_size_bits=1024, max_keys_per_request=max_per_request, buffer_bits=buffer_bits)
    link = Link(name="L01", qkdl_id=QKDL, master=MASTER, slave=SLAVE, length_km=10, device=dev)
    return KeyEngine(link, clock=clock)


class EngineDevice(QKDDevice):
    """One end of the twin's engine behind the driver interface (as the ETSI 014 driver maps it)."""

    def __init__(self, engine: KeyEngine, role: str):
        self.engine, self.role = engine, role
        self.calls: dict[str, int] = {"status": 0, "enc_keys": 0, "dec_keys": 0}
        self.fail: Exception | None = None

    def get_status(self) -> DeviceStatus:
        self.calls["status"] += 1
        if self.fail:
            raise self.fail
        st, dev = self.engine.status(), self.engine.device
        stored = st.available_bits // dev.key_size_bits if self.role == "master" else self.engine.pending_count(SLAVE)
        return DeviceStatus(source_kme_id="L01-" + self.role, target_kme_id="L01-peer", master_sae_id=MASTER,
                            slave_sae_id=SLAVE, key_size=dev.key_size_bits, stored_key_count=stored,
                            max_key_count=st.buffer_bits // dev.key_size_bits,
                            max_key_per_request=dev.max_keys_per_request, max_key_size=dev.max_key_size_bits,
                            min_key_size=dev.min_key_size_bits, max_sae_id_count=0)

    def enc_keys(self, number=1, size=None):
        self.calls["enc_keys"] += 1
        if self.fail:
            raise self.fail
        try:
            keys = self.engine.take_keys(number, size or 256, master_sae=MASTER, slave_sae=SLAVE)
        except EngineInsufficientKey as exc:
            raise KeysUnavailable(str(exc)) from None
        return [DeviceKey(k.key_id, k.material) for k in keys]

    def dec_keys(self, key_ids):
        self.calls["dec_keys"] += 1
        if self.fail:
            raise self.fail
        ids = list(key_ids)
        if len(ids) > self.engine.device.max_keys_per_request:
            raise BadRequest("too many key IDs")
        try:
            keys = self.engine.fetch_keys(ids, caller_sae=SLAVE, master_sae=MASTER)
        except KeysNotFound as exc:
            raise BadRequest(MSG_NOT_FOUND, [{"qkdsdn_missing_key_IDs": exc.missing}]) from None
        return [DeviceKey(k.key_id, k.material) for k in keys]


class Link2:
    """Master and slave workers of one link over the engine, with the notification in between."""

    def __init__(self, tmp_path, *, pool_max_bits=64 * 256, generated_s=1.0, **engine_kw):
        self.engine_clock = FakeClock(0.0)
        self.engine = make_engine(self.engine_clock, **engine_kw)
        self.engine_clock.t += generated_s  # 1 Mbit/s: about 3900 keys of 256 bits per second
        self.clock = FakeClock(0.0)
        self.mdev, self.sdev = EngineDevice(self.engine, "master"), EngineDevice(self.engine, "slave")
        self.mstore = KeyStore(tmp_path / "km0.db", pool_max_bits=pool_max_bits)
        self.sstore = KeyStore(tmp_path / "km1.db", pool_max_bits=pool_max_bits)
        self.slave = LinkKeyWorker(QKDL, "slave", self.sdev, self.sstore, clock=self.clock)
        self.wire_fault: str | None = None  # "request" lost before the slave, "answer" lost after it
        self.notifications = 0
        self.master = LinkKeyWorker(self.engine.link, "master", self.mdev, self.mstore, self.notify, clock=self.clock)

    def notify(self, message: dict) -> dict:
        self.notifications += 1
        message = json.loads(json.dumps(message))  # what crosses the relay channel is JSON
        if self.wire_fault == "request":
            raise ConnectionError("relay channel down")
        answer = json.loads(json.dumps(self.slave.handle_link_keys(message)))
        if self.wire_fault == "answer":
            raise ConnectionError("answer lost")
        return answer

    def close(self):
        self.mstore.close()
        self.sstore.close()


@pytest.fixture
def link2(tmp_path):
    pair = Link2(tmp_path)
    yield pair
    pair.close()


def assert_identical_pools(master: KeyStore, slave: KeyStore):
    """Spend everything each end owns and consume it at the other end: the bytes must match."""
    for spender, receiver, owner in ((master, slave, "master"), (slave, master, "slave")):
        bits = spender.available_bits(QKDL, owner)
        assert bits == receiver.available_bits(QKDL, owner)
        if bits:
            slices = spender.take(QKDL, owner, bits)
            assert receiver.consume_refs(QKDL, [s.to_wire() for s in slices]) == b"".join(s.data for s in slices)
        assert receiver.available_bits(QKDL, owner) == 0


# ----------------------------------------------------------------------------- workers in process


def test_master_and_slave_fill_identical_pools_with_split_ownership(link2):
    added = link2.master.step(0.0)
    assert added == 16 * 256  # one device batch
    assert link2.mdev.calls == {"status": 1, "enc_keys": 1, "dec_keys": 0}
    assert link2.sdev.calls["dec_keys"] == 1
    link2.master.step(0.0)
    for store in (link2.mstore, link2.sstore):
        st = store.stats()[QKDL]
        assert st["master"]["available"] == st["slave"]["available"] == 16 * 256
        assert st["master"]["pending"] == st["slave"]["pending"] == 0
    assert link2.mstore.role(QKDL) == "master" and link2.sstore.role(QKDL) == "slave"
    assert link2.master.arrival_rate_bps(0.0) == 0.0  # no time has passed yet
    assert link2.master.arrival_rate_bps(4.0) == pytest.approx(32 * 256 / 4.0)
    assert link2.slave.arrival_rate_bps(4.0) == pytest.approx(32 * 256 / 4.0)
    assert_identical_pools(link2.mstore, link2.sstore)


def test_bounded_pool_stops_fetching_until_keys_are_spent(link2):
    for _ in range(6):
        link2.master.step(0.0)
    assert link2.mstore.pool_bits(QKDL) == 64 * 256  # exactly the bound: 4 batches of 16
    assert link2.mdev.calls["enc_keys"] == 4
    assert link2.master.step(0.0) == 0
    assert link2.mdev.calls["enc_keys"] == 4
    assert link2.master.filler.next_action(0.0, link2.mstore.pool_bits(QKDL), 0).reason == "pool full"
    # Spending 3 keys' worth makes room for 3 keys, not a whole batch.
    link2.mstore.take(QKDL, "master", 3 * 256)
    assert link2.master.step(1.0) == 3 * 256
    assert link2.mstore.pool_bits(QKDL) == 64 * 256


def test_no_key_at_the_device_backs_off_then_recovers(tmp_path):
    pair = Link2(tmp_path, generated_s=0.0)  # nothing generated yet
    try:
        assert pair.master.step(0.0) == 0
        assert pair.mdev.calls["enc_keys"] == 0  # status said 0 keys: no pointless enc_keys
        action = pair.master.filler.next_action(0.0, 0, 0)
        assert isinstance(action, Wait) and action.reason == "device has no key"
        assert pair.master.step(action.until / 2) == 0
        assert pair.mdev.calls["status"] == 1  # still backing off
        pair.engine_clock.t = 1.0
        assert pair.master.step(action.until) == 16 * 256
        assert_identical_pools(pair.mstore, pair.sstore)
    finally:
        pair.close()


def test_device_failure_is_backed_off_and_keys_kept(link2):
    link2.master.step(0.0)
    link2.mdev.fail = DeviceUnreachable("connection refused")  # the filler still counts keys: enc_keys fails
    assert link2.master.step(0.0) == 0
    wait = link2.master.filler.next_action(0.0, 0, 0)
    assert isinstance(wait, Wait) and wait.reason == "device error: DeviceUnreachable"
    link2.mdev.fail = None
    assert link2.master.step(wait.until) == 16 * 256
    assert link2.mstore.available_bits(QKDL) == 32 * 256


def test_lost_notification_keeps_keys_pending_then_renotifies(link2):
    link2.wire_fault = "request"
    assert link2.master.step(0.0) == 0
    st = link2.mstore.stats()[QKDL]
    assert st["master"]["pending"] + st["slave"]["pending"] == 16 * 256
    assert link2.mstore.available_bits(QKDL) == 0  # unconfirmed keys are never spent
    assert link2.sstore.stats() == {}
    wait = link2.master.filler.next_action(0.0, link2.mstore.pool_bits(QKDL), 16)
    assert isinstance(wait, Wait)
    assert link2.master.step(wait.until) == 0  # still down
    link2.wire_fault = None
    calls = link2.mdev.calls["enc_keys"]
    wait = link2.master.filler.next_action(wait.until, link2.mstore.pool_bits(QKDL), 16)
    assert link2.master.step(wait.until) == 16 * 256 * 2  # the pending batch, then a new one
    assert link2.mdev.calls["enc_keys"] == calls + 1
    assert link2.mstore.pending_keys(QKDL) == []
    assert_identical_pools(link2.mstore, link2.sstore)


def test_lost_answer_is_idempotent_at_the_slave(link2):
    link2.wire_fault = "answer"
    assert link2.master.step(0.0) == 0
    assert link2.sstore.available_bits(QKDL) == 16 * 256  # the slave has them
    assert link2.sdev.calls["dec_keys"] == 1
    link2.wire_fault = None
    wait = link2.master.filler.next_action(0.0, 0, 16)
    link2.mdev.fail = KeysUnavailable("stop after the re-notification")
    assert link2.master.step(wait.until) == 16 * 256
    assert link2.sdev.calls["dec_keys"] == 1  # answered from the store, not the device
    assert link2.mstore.pending_keys(QKDL) == []
    assert_identical_pools(link2.mstore, link2.sstore)


def test_keys_the_slave_device_lost_are_discarded_at_the_master(link2):
    link2.wire_fault = "request"
    link2.master.step(0.0)
    pending = [k for k, _, _ in link2.mstore.pending_keys(QKDL)]
    # The slave's device hands three of them to someone else (or expires them).
    link2.engine.fetch_keys(pending[:3], caller_sae=SLAVE, master_sae=MASTER)
    link2.wire_fault = None
    link2.mdev.fail = KeysUnavailable("no new key")
    wait = link2.master.filler.next_action(0.0, 0, 16)
    assert link2.master.step(wait.until) == 13 * 256
    assert link2.mstore.pending_keys(QKDL) == []
    assert not link2.mstore.known_keys(QKDL, pending[:3])
    assert not link2.sstore.known_keys(QKDL, pending[:3])
    assert_identical_pools(link2.mstore, link2.sstore)


def test_slave_splits_batches_its_device_refuses_as_too_large(link2):
    link2.master.step(0.0)
    # A master batch larger than the slave device's limit (16 IDs per dec_keys).
    keys = link2.engine.take_keys(40, 256, master_sae=MASTER, slave_sae=SLAVE)
    msg = {"link": QKDL, "keys": [{"key_ID": k.key_id, "owner": "slave"} for k in keys]}
    answer = link2.slave.handle_link_keys(msg)
    assert answer == {"stored": [k.key_id for k in keys], "missing": []}
    # The first batch's call, then 40 refused, 2 x 20 refused, 4 x 10 served.
    assert link2.sdev.calls["dec_keys"] == 1 + 1 + 2 + 4
    stored = link2.sstore.take(QKDL, "slave", link2.sstore.available_bits(QKDL, "slave"))
    assert {s.key_id: s.data for s in stored if s.key_id in answer["stored"]} == {k.key_id: k.material for k in keys}


def test_slave_refuses_malformed_notifications(link2):
    good = {"key_ID": "0000000a-0000-4000-8000-00000000000b", "owner": "slave"}
    bad = [
        [],
        {"link": QKDL},
        {"link": "another", "keys": [good]},
        {"link": QKDL, "keys": []},
        {"link": QKDL, "keys": [good, good]},
        {"link": QKDL, "keys": [{"key_ID": "not-a-uuid", "owner": "slave"}]},
        {"link": QKDL, "keys": [{"key_ID": good["key_ID"].upper(), "owner": "slave"}]},
        {"link": QKDL, "keys": [{"key_ID": good["key_ID"], "owner": "both"}]},
        {"link": QKDL, "keys": [{**good, "key": "AAAA"}]},
        {"link": QKDL, "keys": [good], "extra": 1},
    ]
    for message in bad:
        with pytest.raises(LinkKeyProtocolError):
            link2.slave.handle_link_keys(message)
    assert link2.sdev.calls["dec_keys"] == 0
    with pytest.raises(LinkKeyProtocolError):
        link2.master.handle_link_keys({"link": QKDL, "keys": [good]})


def test_a_renotification_cannot_change_a_keys_owner(link2):
    link2.master.step(0.0)
    slave_owned = [s.key_id for s in link2.sstore.take(QKDL, "slave", 8)]
    before = link2.sstore.stats()
    with pytest.raises(LinkKeyProtocolError, match="another owner"):
        link2.slave.handle_link_keys({"link": QKDL, "keys": [{"key_ID": slave_owned[0], "owner": "master"}]})
    assert link2.sstore.stats() == before


def test_transient_slave_device_error_propagates_and_master_retries(link2):
    link2.sdev.fail = DeviceUnreachable("slave KME down")
    assert link2.master.step(0.0) == 0
    assert len(link2.mstore.pending_keys(QKDL)) == 16  # kept for a retry, not discarded
    link2.sdev.fail = None
    link2.mdev.fail = KeysUnavailable("no new key")
    wait = link2.master.filler.next_action(0.0, 0, 16)
    assert link2.master.step(wait.until) == 16 * 256
    assert_identical_pools(link2.mstore, link2.sstore)


def test_concurrent_duplicate_notifications_fetch_once(link2):
    keys = link2.engine.take_keys(8, 256, master_sae=MASTER, slave_sae=SLAVE)
    msg = {"link": QKDL, "keys": [{"key_ID": k.key_id, "owner": o}
                                  for k, o in zip(keys, ["master", "slave"] * 4)]}
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(link2.slave.handle_link_keys(msg))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == [{"stored": [k.key_id for k in keys], "missing": []}] * 4
    assert link2.sdev.calls["dec_keys"] == 1


def test_forged_and_replayed_refs_after_filling(link2):
    link2.master.step(0.0)
    sent = link2.mstore.take(QKDL, "master", 512)
    refs = [s.to_wire() for s in sent]
    assert link2.sstore.consume_refs(QKDL, refs) == b"".join(s.data for s in sent)
    before = link2.sstore.stats()
    with pytest.raises(KeyRefError):
        link2.sstore.consume_refs(QKDL, refs)  # replay
    own = link2.sstore.take(QKDL, "slave", 8)[0]
    after_take = link2.sstore.stats()
    with pytest.raises(KeyRefError):
        link2.sstore.consume_refs(QKDL, [own.to_wire()])  # names a key the receiver owns
    assert link2.sstore.stats() == after_take
    assert before[QKDL]["master"] == after_take[QKDL]["master"]


# ----------------------------------------------------------------------------- real driver over HTTP


@pytest.fixture
def twin_http():
    """The twin's ETSI 014 KME servers of both ends, plain HTTP on 127.0.0.1 (development mode)."""
    from qkdsdn.httpserver import HTTPServer
    from qkdsdn.twin.kme import create_kme_app

    clock = FakeClock(0.0)
    engine = make_engine(clock, max_per_request=32)
    clock.t = 1.0  # 1 Mbit of key in the device buffer
    servers = [HTTPServer(create_kme_app(engine, role, insecure_dev=True), "127.0.0.1", 0, tls=None,
                          insecure_dev=True, name=f"twin-{role}", threads=2).start()
               for role in ("master", "slave")]
    yield engine, clock, servers
    for s in servers:
        s.stop()


def test_workers_over_the_real_etsi014_driver_in_a_thread(tmp_path, twin_http):
    from agents.drivers import ETSI014Device

    engine, clock, (mserver, sserver) = twin_http
    mdev = ETSI014Device(mserver.url, SLAVE, insecure_dev_sae_id=MASTER)
    sdev = ETSI014Device(sserver.url, MASTER, insecure_dev_sae_id=SLAVE)
    pool = 4 * 32 * 256 + 5 * 256  # not a whole number of batches: the last fetch is sized to the room
    with mdev, sdev, KeyStore(tmp_path / "km0.db", pool_max_bits=pool) as ms, \
            KeyStore(tmp_path / "km1.db", pool_max_bits=pool) as ss:
        slave = LinkKeyWorker(QKDL, "slave", sdev, ss)
        master = LinkKeyWorker(engine.link, "master", mdev, ms,
                               lambda m: json.loads(json.dumps(slave.handle_link_keys(json.loads(json.dumps(m))))),
                               full_poll_s=0.01)
        master.start()
        try:
            deadline = time.monotonic() + 30  # liveness guard only
            while ms.available_bits(QKDL) < pool:
                assert time.monotonic() < deadline, f"pool not filled: {ms.stats()}"
                time.sleep(0.01)
            # Spend some: the sleeping worker refills once woken.
            spent = ms.take(QKDL, "master", 3 * 256)
            assert ss.consume_refs(QKDL, [s.to_wire() for s in spent]) == b"".join(s.data for s in spent)
            master.wake()
            while ss.available_bits(QKDL) < pool:
                assert time.monotonic() < deadline, f"pool not refilled: {ss.stats()}"
                time.sleep(0.01)
        finally:
            master.stop()
        assert ms.pool_bits(QKDL) == ss.pool_bits(QKDL) == pool  # bounded
        assert engine.pending_count() == 0  # every key the master took reached the slave
        # The refill went to the end that had spent: both ends again hold the same, to one key.
        st = ms.stats()[QKDL]
        assert abs(st["master"]["available"] - st["slave"]["available"]) <= 256
        assert st["master"]["stored"] > st["slave"]["stored"]
        assert master.snapshot()["arrived_bits"] == slave.snapshot()["arrived_bits"] == pool + 3 * 256
        assert_identical_pools(ms, ss)


def test_a_round_that_drains_the_device_paces_the_next_one():
    f = PoolFiller("master", pool_max_bits=1 << 20, now=0.0, round_s=0.25)
    assert isinstance(f.next_action(0.0, 0, 0), GetStatus)
    f.on_status(0.0, status(stored=5, per_request=16))
    fetch = f.next_action(0.0, 0, 0)
    assert isinstance(fetch, Fetch) and fetch.number == 5
    f.on_fetched(0.0, 5)
    f.on_notified(0.0, 5 * 256, 5)
    wait = f.next_action(0.01, 5 * 256, 0)
    assert isinstance(wait, Wait) and wait.until == pytest.approx(0.25)
    assert isinstance(f.next_action(0.25, 5 * 256, 0), GetStatus)
    # A full batch (the device had more than one request's worth) goes on at once.
    f.on_status(0.25, status(stored=100, per_request=16))
    assert f.next_action(0.25, 5 * 256, 0).number == 16
    f.on_fetched(0.25, 16)
    f.on_notified(0.25, 16 * 256, 16)
    assert not isinstance(f.next_action(0.25, 21 * 256, 0), Wait)


def test_owners_follow_demand_when_levels_are_known():
    f = PoolFiller("master", pool_max_bits=1 << 20, now=0.0)
    f.on_status(0.0, status(key_size=256))
    # The slave end spent its keys: new keys go to it until the two ends hold the same.
    assert f.assign_owners(4, {"master": 1024, "slave": 0}) == ["slave"] * 4
    assert f.assign_owners(4, {"master": 1024, "slave": 512}) == ["slave", "slave", "master", "slave"]
    assert f.assign_owners(2, {"master": 0, "slave": 0}) in (["master", "slave"], ["slave", "master"])
