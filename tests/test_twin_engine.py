"""Key generation engine of the digital twin, driven by a fake clock (no sleeps)."""
from __future__ import annotations

import math

import pytest

from db.netfile import Device, Link
from qkdsdn.twin import physics
from qkdsdn.twin.engine import InsufficientKey, KeyEngine, KeysNotFound, NotKeySlave


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def make_link(skr=10_000.0, qber=0.02, name="L01", **device) -> Link:
    dev = Device(model="fixed", skr_bps=skr, qber=qber, **device)
    return Link(name=name, qkdl_id="6b1a3c1e-0000-4000-8000-000000000001", master="KM0", slave="KM1",
                length_km=10.0, device=dev)


def drain(engine: KeyEngine, size: int = 256) -> int:
    """Take every whole key available; returns the bits taken."""
    taken = 0
    per_call = engine.device.max_keys_per_request
    while (n := engine.stored_key_count(size)) > 0:
        n = min(n, per_call)
        taken += size * len(engine.take_keys(n, size, master_sae="KM0", slave_sae="KM1"))
    return taken


def test_identical_material_at_both_ends_and_keys_used_once():
    clock = FakeClock()
    eng = KeyEngine(make_link(), clock=clock)
    clock.advance(1.0)
    keys = eng.take_keys(5, 256, master_sae="KM0", slave_sae="KM1")
    assert len({k.key_id for k in keys}) == 5
    assert all(len(k.material) == 32 for k in keys)
    assert len({k.material for k in keys}) == 5  # distinct keys
    fetched = eng.fetch_keys([k.key_id for k in reversed(keys)], caller_sae="KM1", master_sae="KM0")
    assert {(k.key_id, k.material) for k in fetched} == {(k.key_id, k.material) for k in keys}
    # Delivered on both sides: gone.
    with pytest.raises(KeysNotFound) as err:
        eng.fetch_keys([keys[0].key_id], caller_sae="KM1")
    assert err.value.missing == [keys[0].key_id]
    assert eng.pending_count() == 0


def test_key_repr_hides_material():
    clock = FakeClock()
    eng = KeyEngine(make_link(), clock=clock)
    clock.advance(1.0)
    key = eng.take_keys(1, 256, master_sae="KM0", slave_sae="KM1")[0]
    assert key.material.hex() not in repr(key)
    assert key.key_id in repr(key)


@pytest.mark.parametrize("rate", [10_000.0, 10_000_000.0])
def test_delivered_rate_within_5_percent_over_10_s(rate):
    clock = FakeClock()
    # Buffer large enough not to clip between drains; large keys keep the 10 Mb/s case fast.
    eng = KeyEngine(make_link(skr=rate, buffer_bits=1 << 28, max_key_size_bits=8192), clock=clock)
    size = 256 if rate < 1e6 else 8192
    taken = 0
    for _ in range(100):
        clock.advance(0.1)
        taken += drain(eng, size)
    expected = rate * 10.0
    assert abs(taken - expected) / expected < 0.05
    assert taken <= expected
    st = eng.status()
    assert st.measured_skr_bps == pytest.approx(rate, rel=0.01)
    assert st.model_skr_bps == pytest.approx(rate)
    assert st.delivered_bits == taken


def test_slow_link_does_not_lose_fractional_bits():
    clock = FakeClock(0.0)
    eng = KeyEngine(make_link(skr=2.5), clock=clock)
    for _ in range(1024):  # polls every 1/64 s (exact in binary): 0.039 bits each
        clock.advance(1 / 64)
        eng.available_bits()
    assert eng.available_bits() == 40


def test_buffer_is_bounded():
    clock = FakeClock()
    eng = KeyEngine(make_link(skr=1e6, buffer_bits=8192), clock=clock)
    clock.advance(100.0)
    assert eng.available_bits() == 8192
    assert eng.stored_key_count(256) == 32
    with pytest.raises(InsufficientKey):
        eng.take_keys(33, 256, master_sae="KM0", slave_sae="KM1")
    assert eng.available_bits() == 8192  # a refused request takes nothing


def test_pending_table_is_bounded():
    clock = FakeClock()
    eng = KeyEngine(make_link(skr=1e6), clock=clock, pending_max_bits=1024)
    clock.advance(1.0)
    eng.take_keys(4, 256, master_sae="KM0", slave_sae="KM1")
    with pytest.raises(InsufficientKey, match="wait for the slave"):
        eng.take_keys(1, 256, master_sae="KM0", slave_sae="KM1")
    pending = eng.status()
    assert pending.pending_keys == 4 and pending.pending_bits == 1024


def test_pending_keys_expire_after_ttl():
    clock = FakeClock()
    eng = KeyEngine(make_link(), clock=clock, pending_ttl_s=60.0)
    clock.advance(1.0)
    key = eng.take_keys(1, 256, master_sae="KM0", slave_sae="KM1")[0]
    clock.advance(59.0)
    assert eng.pending_count() == 1
    clock.advance(1.0)
    with pytest.raises(KeysNotFound):
        eng.fetch_keys([key.key_id], caller_sae="KM1")


def test_only_the_named_slave_gets_the_keys():
    clock = FakeClock()
    eng = KeyEngine(make_link(), clock=clock)
    clock.advance(1.0)
    key = eng.take_keys(1, 256, master_sae="KM0", slave_sae="KM1")[0]
    with pytest.raises(NotKeySlave):
        eng.fetch_keys([key.key_id], caller_sae="KM2")
    # Refused requests leave the key in place; a wrong master in the path hides it.
    with pytest.raises(KeysNotFound):
        eng.fetch_keys([key.key_id], caller_sae="KM1", master_sae="KM9")
    assert eng.fetch_keys([key.key_id], caller_sae="KM1")[0].material == key.material


def test_all_or_nothing_fetch():
    clock = FakeClock()
    eng = KeyEngine(make_link(), clock=clock)
    clock.advance(1.0)
    key = eng.take_keys(1, 256, master_sae="KM0", slave_sae="KM1")[0]
    missing = "00000000-0000-4000-8000-000000000000"
    with pytest.raises(KeysNotFound) as err:
        eng.fetch_keys([key.key_id, missing], caller_sae="KM1")
    assert err.value.missing == [missing]
    assert eng.pending_count() == 1


def test_seeded_engines_reproduce_keys_and_ids():
    runs = []
    for _ in range(2):
        clock = FakeClock()
        eng = KeyEngine(make_link(seed=42), clock=clock)
        clock.advance(1.0)
        runs.append([(k.key_id, k.material) for k in eng.take_keys(4, 512, master_sae="KM0", slave_sae="KM1")])
    assert runs[0] == runs[1]
    clock = FakeClock()
    other = KeyEngine(make_link(seed=43), clock=clock)
    clock.advance(1.0)
    assert other.take_keys(1, 512, master_sae="KM0", slave_sae="KM1")[0].material != runs[0][0][1]
    # Unseeded engines draw from the OS CSPRNG: no two runs agree.
    a, b = (KeyEngine(make_link(), clock=FakeClock(0.0)) for _ in range(2))
    for e in (a, b):
        e._clock = FakeClock(1.0)  # noqa: SLF001 - move both past their start
    ka = a.take_keys(1, 256, master_sae="KM0", slave_sae="KM1")[0]
    kb = b.take_keys(1, 256, master_sae="KM0", slave_sae="KM1")[0]
    assert ka.material != kb.material and ka.key_id != kb.key_id


def test_seeded_stream_keys_are_slices_of_one_stream():
    clock = FakeClock()
    one = KeyEngine(make_link(seed=7), clock=clock)
    clock.advance(1.0)
    big = one.take_keys(1, 1024, master_sae="KM0", slave_sae="KM1")[0].material
    clock2 = FakeClock()
    two = KeyEngine(make_link(seed=7), clock=clock2)
    clock2.advance(1.0)
    small = [k.material for k in two.take_keys(4, 256, master_sae="KM0", slave_sae="KM1")]
    assert b"".join(small) == big


def test_cut_stops_accrual_and_restore_resumes():
    clock = FakeClock()
    eng = KeyEngine(make_link(skr=1000.0), clock=clock)
    clock.advance(1.0)
    eng.cut()
    clock.advance(10.0)
    st = eng.status()
    assert st.state == "cut" and st.model_skr_bps == 0.0
    assert st.available_bits == 1000  # accrued before the cut, still deliverable
    eng.take_keys(3, 256, master_sae="KM0", slave_sae="KM1")
    with pytest.raises(InsufficientKey, match="link cut"):
        eng.take_keys(1, 256, master_sae="KM0", slave_sae="KM1")
    eng.restore()
    clock.advance(2.0)
    st = eng.status()
    assert st.state == "up"
    assert st.available_bits == 1000 - 768 + 2000


def test_eavesdropper_raises_qber_by_fraction_over_4_and_aborts_above_11_percent():
    clock = FakeClock()
    link = make_link(skr=10_000.0, qber=0.02)
    eng = KeyEngine(link, clock=clock)
    eng.set_eavesdropper(0.2)
    st = eng.status()
    assert st.qber == pytest.approx(0.02 + 0.2 / 4)
    expected = physics.performance(link, physics.LinkState(eve_fraction=0.2)).skr_bps
    assert 0 < expected < 10_000.0
    assert st.model_skr_bps == pytest.approx(expected)
    clock.advance(10.0)
    assert eng.available_bits() == pytest.approx(10 * expected, abs=1)

    eng.set_eavesdropper(0.4)  # 0.02 + 0.10 = 12 % > 11 %
    before = eng.available_bits()
    clock.advance(10.0)
    st = eng.status()
    assert st.qber == pytest.approx(0.12)
    assert st.state == "aborted" and "abort" in st.reason
    assert st.available_bits == before
    with pytest.raises(ValueError):
        eng.set_eavesdropper(1.5)


def test_rate_in_force_during_each_interval_is_used():
    clock = FakeClock()
    eng = KeyEngine(make_link(skr=1000.0), clock=clock)
    clock.advance(5.0)  # 5000 bits at full rate, accrued lazily when the cut comes
    eng.cut()
    clock.advance(5.0)
    eng.restore()
    clock.advance(5.0)
    assert eng.available_bits() == 10_000
    # 15 s window would be 10 s: measured SKR covers the last 10 s, half of it cut.
    assert eng.status().measured_skr_bps == pytest.approx(500.0)


def test_drift_raises_qber_up_to_the_limit_and_integrates_the_rate():
    clock = FakeClock()
    link = make_link(skr=10_000.0, qber=0.02)
    eng = KeyEngine(link, clock=clock)
    eng.set_drift(0.001, max_qber=0.05)  # reaches 5 % after 30 s, then stays
    clock.advance(10.0)
    assert eng.status().qber == pytest.approx(0.03)
    clock.advance(60.0)
    st = eng.status()
    assert st.qber == pytest.approx(0.05)
    assert st.drift_qber_per_s == 0.001

    def rate(drift):
        return physics.performance(link, physics.LinkState(qber_drift=drift)).skr_bps

    # Exact integral: 30 s of rising drift (numerically, fine grid) + 40 s at the cap.
    n = 30_000
    rising = sum(rate(0.001 * (i + 0.5) * 30 / n) for i in range(n)) * 30 / n
    expected = rising + 40 * rate(0.03)
    assert eng.available_bits() == pytest.approx(expected, rel=1e-3)


def test_drift_past_abort_threshold_stops_key():
    clock = FakeClock()
    eng = KeyEngine(make_link(skr=10_000.0, qber=0.02), clock=clock)
    eng.set_drift(0.01)  # no limit: 11 % after 9 s
    clock.advance(20.0)
    st = eng.status()
    assert st.state == "aborted"
    bits = st.available_bits
    assert 0 < bits < 90_000
    clock.advance(20.0)
    assert eng.available_bits() == bits
    eng.restore()
    assert eng.status().qber == pytest.approx(0.02)


def test_decoy_bb84_link_accrues_at_the_model_rate():
    clock = FakeClock()
    link = Link(name="N0-N1", qkdl_id="6b1a3c1e-0000-4000-8000-000000000002", master="N0", slave="N1",
                length_km=25.0, device=Device())
    eng = KeyEngine(link, clock=clock)
    model = physics.performance(link).skr_bps
    assert model > 0
    clock.advance(10.0)
    assert eng.available_bits() == math.floor(10 * model)


def test_link_without_device_is_refused():
    link = Link(name="X", qkdl_id="6b1a3c1e-0000-4000-8000-000000000003", master="A", slave="B",
                length_km=1.0, device=None)
    with pytest.raises(ValueError, match="no emulated device"):
        KeyEngine(link)
