"""Physics model of the digital twin: published numbers, physical limits, disturbances, output."""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest

from db.netfile import Device, Link, load
from qkdsdn.twin.physics import (LinkState, Performance, channel_transmittance, cutoff_distance_km,
                                 decoy_bb84, decoy_estimates, device_performance, format_bps,
                                 performance, plob_bound_bps, rates_table)
from qkdsdn.twin.plot import plot_skr_vs_distance

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# GYS experiment parameters as used by Ma, Qi, Zhao, Lo 2005 (PRA 72 012326): Y0 = 1.7e-6 is
# the background yield of both detectors, so 0.85e-6 per detector.
GYS = Device(detector_efficiency=0.045, dark_count_prob=0.85e-6, misalignment_error=0.033,
             ec_efficiency=1.22, mu=0.48, nu=0.05, insertion_loss_db=0.0, clock_rate_hz=2e6)
GYS_ATT = 0.21

DEVICE_SETS = {
    "netfile-default": Device(),
    "gys": GYS,
    "high-efficiency": Device(detector_efficiency=0.9, insertion_loss_db=0.0, dark_count_prob=1e-8,
                              misalignment_error=0.005, ec_efficiency=1.05, mu=0.6, nu=0.05,
                              clock_rate_hz=2.5e9),
    # Ideal hardware at the highest intensities: the closest the model gets to PLOB.
    "ideal": Device(detector_efficiency=1.0, insertion_loss_db=0.0, dark_count_prob=0.0,
                    misalignment_error=0.0, ec_efficiency=1.0, mu=1.0, nu=0.01),
    "noisy": Device(dark_count_prob=1e-4, misalignment_error=0.04, mu=0.3, nu=0.2),
}


def h2(x: float) -> float:
    return -x * math.log2(x) - (1 - x) * math.log2(1 - x)


def decoy_kwargs(dev: Device, length_km: float, att: float = 0.2, **extra) -> dict:
    return dict(length_km=length_km, attenuation_db_km=att, insertion_loss_db=dev.insertion_loss_db,
                detector_efficiency=dev.detector_efficiency, dark_count_prob=dev.dark_count_prob,
                misalignment_error=dev.misalignment_error, clock_rate_hz=dev.clock_rate_hz,
                ec_efficiency=dev.ec_efficiency, mu=dev.mu, nu=dev.nu, **extra)


def link(length_km: float = 25.0, device: Device | None = None, att: float = 0.2) -> Link:
    return Link(name="L", qkdl_id="", master="A", slave="B", length_km=length_km,
                attenuation_db_km=att, device=device if device is not None else Device())


# --------------------------------------------------------------------------- published numbers


def test_gys_vacuum_weak_decoy_reaches_about_140_km():
    # Ma et al. 2005, vacuum + weak decoy with the GYS parameters: key up to ~140 km.
    cutoff = cutoff_distance_km(GYS, GYS_ATT)
    assert 135.0 < cutoff < 146.0
    assert device_performance(GYS, 130.0, GYS_ATT).skr_bps > 0
    assert device_performance(GYS, 150.0, GYS_ATT).skr_bps == 0


def test_gys_optimal_signal_intensity_near_half_a_photon():
    # Ma et al. / Lo-Ma-Chen: the optimal mu for GYS is about 0.48 (O(1), not O(eta)).
    mus = [0.1 + 0.01 * i for i in range(90)]
    rates = [device_performance(replace(GYS, mu=m), 50.0, GYS_ATT).skr_bps for m in mus]
    best = mus[rates.index(max(rates))]
    assert 0.4 <= best <= 0.55


def test_weaker_decoy_gives_longer_reach():
    # The weak-decoy bound tightens as nu -> 0 (Ma et al. 2005, Sec. IV).
    reach = [cutoff_distance_km(replace(GYS, nu=nu), GYS_ATT) for nu in (0.01, 0.05, 0.1, 0.2)]
    assert reach == sorted(reach, reverse=True)
    assert reach[0] - reach[-1] > 3.0


@pytest.mark.parametrize("length_km", [0.0, 20.0, 60.0, 100.0, 130.0])
def test_decoy_bounds_bracket_the_true_single_photon_values(length_km):
    eta = channel_transmittance(length_km=length_km, attenuation_db_km=GYS_ATT,
                                detector_efficiency=GYS.detector_efficiency)
    est = decoy_estimates(eta, dark_count_prob=GYS.dark_count_prob,
                          misalignment_error=GYS.misalignment_error, ec_efficiency=GYS.ec_efficiency,
                          mu=GYS.mu, nu=GYS.nu)
    y0 = 1.7e-6
    assert est.y0 == pytest.approx(y0)
    # The channel model's own single-photon yield and error rate (Ma et al. eq. 4-5).
    y1 = y0 + eta
    e1 = (0.5 * y0 + GYS.misalignment_error * eta) / y1
    assert est.y1_lower <= y1 * (1 + 1e-9)
    assert est.y1_lower > 0.9 * y1  # a weak decoy of 0.05 makes the bound tight
    assert est.e1_upper >= e1 * (1 - 1e-9)
    assert est.q1_lower == pytest.approx(est.y1_lower * GYS.mu * math.exp(-GYS.mu))


def test_gain_qber_and_sifted_rate_follow_the_channel_model():
    dev = Device()
    eta = 10 ** (-(25 * 0.2 + dev.insertion_loss_db) / 10) * dev.detector_efficiency
    y0 = 2 * dev.dark_count_prob
    q_mu = y0 + 1 - math.exp(-eta * dev.mu)
    e_mu = (0.5 * y0 + dev.misalignment_error * (1 - math.exp(-eta * dev.mu))) / q_mu
    perf = performance(link(25.0, dev))
    assert perf.qber == pytest.approx(e_mu, rel=1e-9)
    assert perf.sifted_bps == pytest.approx(0.5 * q_mu * dev.clock_rate_hz, rel=1e-9)
    assert 0 < perf.skr_bps < perf.sifted_bps
    assert not perf.aborted and perf.reason is None


# --------------------------------------------------------------------------- physical limits


def test_transmittance_and_plob():
    assert channel_transmittance(link(25.0)) == pytest.approx(10 ** (-0.6) * 0.2)
    assert channel_transmittance(length_km=50, attenuation_db_km=0.2) == pytest.approx(0.1)
    assert plob_bound_bps(0.5, 1e9) == pytest.approx(1e9)
    assert plob_bound_bps(0.0, 1e9) == 0.0
    assert plob_bound_bps(1e-3, 1.0) == pytest.approx(1e-3 / math.log(2), rel=1e-3)
    with pytest.raises(TypeError):
        channel_transmittance()
    with pytest.raises(ValueError):
        plob_bound_bps(1.5, 1e9)


@pytest.mark.parametrize("name", sorted(DEVICE_SETS))
@pytest.mark.parametrize("state", [LinkState(), LinkState(eve_fraction=0.05), LinkState(qber_drift=0.01)])
def test_rate_never_increases_with_distance(name, state):
    dev = DEVICE_SETS[name]
    rates = [device_performance(dev, km * 0.5, 0.2, state).skr_bps for km in range(601)]
    assert rates[0] > 0
    assert all(b <= a for a, b in zip(rates, rates[1:]))


@pytest.mark.parametrize("name", sorted(DEVICE_SETS))
@pytest.mark.parametrize("att", [0.16, 0.2, 0.25])
def test_rate_never_above_plob_bound(name, att):
    dev = DEVICE_SETS[name]
    for km in range(0, 301, 2):
        rate = device_performance(dev, float(km), att).skr_bps
        eta = channel_transmittance(length_km=km, attenuation_db_km=att,
                                    insertion_loss_db=dev.insertion_loss_db,
                                    detector_efficiency=dev.detector_efficiency)
        assert rate <= plob_bound_bps(eta, dev.clock_rate_hz), (name, km)


@pytest.mark.parametrize("name", ["netfile-default", "gys", "high-efficiency", "noisy"])
def test_no_key_past_cutoff(name):
    dev = DEVICE_SETS[name]
    cutoff = cutoff_distance_km(dev, 0.2)
    assert 0 < cutoff < math.inf
    assert device_performance(dev, max(cutoff - 0.5, 0.0), 0.2).skr_bps > 0
    for extra in (0.01, 1.0, 10.0, 100.0, 1000.0):
        perf = device_performance(dev, cutoff + extra, 0.2)
        assert perf.skr_bps == 0
        assert perf.reason is not None
        eta = channel_transmittance(length_km=cutoff + extra, attenuation_db_km=0.2,
                                    insertion_loss_db=dev.insertion_loss_db,
                                    detector_efficiency=dev.detector_efficiency)
        est = decoy_estimates(eta, dark_count_prob=dev.dark_count_prob,
                              misalignment_error=dev.misalignment_error,
                              ec_efficiency=dev.ec_efficiency, mu=dev.mu, nu=dev.nu)
        assert est.rate_per_pulse == 0.0  # clipped, never negative


def test_cutoff_special_cases():
    # Without dark counts the rate decays with eta but never reaches zero.
    assert cutoff_distance_km(DEVICE_SETS["ideal"], 0.2) == math.inf
    fixed = Device(model="fixed", skr_bps=1e5, qber=0.02)
    assert cutoff_distance_km(fixed, 0.2) == math.inf
    assert cutoff_distance_km(Device(), 0.2, LinkState(cut=True)) == 0.0
    # Drift shortens the reach.
    assert cutoff_distance_km(Device(), 0.2, LinkState(qber_drift=0.02)) < cutoff_distance_km(Device(), 0.2)


# --------------------------------------------------------------------------- disturbances


@pytest.mark.parametrize("fraction", [0.04, 0.1, 0.2, 0.4])
def test_eavesdropper_raises_qber_by_a_quarter_of_the_fraction(fraction):
    calm = performance(link(25.0))
    attacked = performance(link(25.0), LinkState(eve_fraction=fraction))
    assert attacked.qber - calm.qber == pytest.approx(fraction / 4, abs=1e-12)
    assert attacked.skr_bps < calm.skr_bps
    assert attacked.sifted_bps == calm.sifted_bps  # the attack changes errors, not clicks


def test_eavesdropper_costs_privacy_amplification_too():
    dev = Device()
    eta = channel_transmittance(link(25.0, dev))
    kw = dict(dark_count_prob=dev.dark_count_prob, misalignment_error=dev.misalignment_error,
              ec_efficiency=dev.ec_efficiency, mu=dev.mu, nu=dev.nu)
    calm = decoy_estimates(eta, **kw)
    attacked = decoy_estimates(eta, extra_qber=0.025, **kw)
    assert attacked.e_nu - calm.e_nu == pytest.approx(0.025)
    assert attacked.e1_upper > calm.e1_upper + 0.025


def test_drift_adds_to_qber_like_an_eavesdropper():
    calm = performance(link(25.0))
    drifted = performance(link(25.0), LinkState(qber_drift=0.005))
    assert drifted.qber - calm.qber == pytest.approx(0.005)
    assert drifted.skr_bps < calm.skr_bps
    both = performance(link(25.0), LinkState(eve_fraction=0.1, qber_drift=0.005))
    assert both.qber - calm.qber == pytest.approx(0.03)


@pytest.mark.parametrize("state", [LinkState(eve_fraction=0.5), LinkState(eve_fraction=1.0),
                                   LinkState(qber_drift=0.12), LinkState(eve_fraction=0.3, qber_drift=0.04)])
@pytest.mark.parametrize("device", [Device(), Device(model="fixed", skr_bps=2e5, qber=0.02)])
def test_above_abort_threshold_no_key(state, device):
    perf = performance(link(10.0, device), state)
    assert perf.qber > 0.11
    assert perf.skr_bps == 0
    assert perf.aborted
    assert "abort threshold" in perf.reason


def test_abort_threshold_is_configurable():
    perf = performance(link(10.0), LinkState(qber_drift=0.04))
    assert not perf.aborted and perf.skr_bps > 0
    strict = performance(link(10.0), LinkState(qber_drift=0.04), abort_qber=0.04)
    assert strict.aborted and strict.skr_bps == 0


def test_between_secret_fraction_limit_and_abort_no_key_but_no_abort():
    # QBER ~10%: below the 11% abort threshold, yet f=1.16 error correction eats all key.
    perf = performance(link(10.0), LinkState(qber_drift=0.09))
    assert perf.qber < 0.11
    assert perf.skr_bps == 0 and not perf.aborted
    assert perf.reason


@pytest.mark.parametrize("device", [Device(), Device(model="fixed", skr_bps=2e5, qber=0.02)])
def test_cut_link(device):
    perf = performance(link(10.0, device), LinkState(cut=True))
    assert perf == Performance(0.0, 0.5, perf.sifted_bps, True, "link cut")
    if device.model == "decoy-bb84":
        # Only dark counts click on a cut fibre.
        assert perf.sifted_bps == pytest.approx(0.5 * 2 * device.dark_count_prob * device.clock_rate_hz)


def test_fixed_model_scales_by_secret_fraction():
    dev = Device(model="fixed", skr_bps=200_000, qber=0.02)
    calm = performance(link(10.0, dev))
    assert calm == Performance(200_000, 0.02, None, False, None)
    drifted = performance(link(10.0, dev), LinkState(qber_drift=0.01))
    f = dev.ec_efficiency
    expected = 200_000 * (1 - (1 + f) * h2(0.03)) / (1 - (1 + f) * h2(0.02))
    assert drifted.qber == pytest.approx(0.03)
    assert drifted.skr_bps == pytest.approx(expected, rel=1e-9)
    assert 160_000 < drifted.skr_bps < 170_000
    attacked = performance(link(10.0, dev), LinkState(eve_fraction=0.2))
    assert attacked.qber == pytest.approx(0.07)
    assert 0 < attacked.skr_bps < drifted.skr_bps


def test_invalid_inputs_are_rejected():
    with pytest.raises(ValueError):
        LinkState(eve_fraction=1.5)
    with pytest.raises(ValueError):
        LinkState(eve_fraction=-0.1)
    with pytest.raises(ValueError):
        LinkState(qber_drift=float("nan"))
    with pytest.raises(ValueError, match="nu"):
        decoy_bb84(**decoy_kwargs(replace(Device(), mu=0.1, nu=0.1), 10.0))
    with pytest.raises(ValueError, match="abort_qber"):
        performance(link(), abort_qber=0.0)
    real = Link(name="R", qkdl_id="", master="A", slave="B", length_km=5.0, device=None)
    with pytest.raises(ValueError, match="real"):
        performance(real)


def test_decoy_bb84_matches_performance_of_the_link():
    dev = DEVICE_SETS["high-efficiency"]
    direct = decoy_bb84(**decoy_kwargs(dev, 40.0, 0.18, eve_fraction=0.1, qber_drift=0.002))
    assert direct == performance(link(40.0, dev, 0.18), LinkState(eve_fraction=0.1, qber_drift=0.002))


# --------------------------------------------------------------------------- output


@pytest.mark.parametrize("bps, text", [(0, "0 b/s"), (512, "512 b/s"), (12_345, "12.3 kb/s"),
                                       (999.7, "1.00 kb/s"), (200_000, "200 kb/s"),
                                       (5_574_000, "5.57 Mb/s"), (3e9, "3.00 Gb/s")])
def test_format_bps(bps, text):
    assert format_bps(bps) == text


def test_rates_table_lists_every_link_of_linear_5():
    net = load(EXAMPLES / "linear-5.yaml")
    table = rates_table(net)
    lines = table.splitlines()
    assert lines[0].split()[:2] == ["link", "ends"]
    for ln in net.links:
        assert ln.length_km == 25
        perf = performance(ln)
        assert perf.skr_bps > 0
        row = next(line for line in lines if line.startswith(ln.name + " "))
        assert f"{ln.master} - {ln.slave}" in row
        assert "25 km" in row and "decoy-bb84" in row
        assert format_bps(perf.skr_bps) in row and "b/s" in row and "0 b/s" not in row
        assert f"{perf.qber * 100:.2f} %" in row
        assert f"{cutoff_distance_km(ln.device, ln.attenuation_db_km):.1f} km" in row
    assert len(lines) == 2 + len(net.links)


def test_rates_table_shows_disturbed_and_fixed_links():
    net = load(EXAMPLES / "paper-poc.yaml")
    table = rates_table(net, {"L01": LinkState(cut=True), "L02": LinkState(eve_fraction=1.0)})
    rows = {line.split()[0]: line for line in table.splitlines()[2:]}
    assert set(rows) == {ln.name for ln in net.links}
    assert "(cut)" in rows["L01"] and "50.00 %" in rows["L01"]
    assert "(abort)" in rows["L02"] and "27.00 %" in rows["L02"]
    assert "200 kb/s" in rows["L45"] and "n/a (fixed)" in rows["L45"]


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plot_network_writes_png(tmp_path):
    out = tmp_path / "linear.png"
    plot_skr_vs_distance(load(EXAMPLES / "linear-5.yaml"), out)
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 20_000


def test_plot_devices_writes_png(tmp_path):
    out = tmp_path / "devices.png"
    plot_skr_vs_distance({"default": Device(), "GYS": GYS,
                          "fixed": Device(model="fixed", skr_bps=1e5, qber=0.02)},
                         out, max_km=200.0, attenuation_db_km=0.21)
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 20_000
    with pytest.raises(ValueError):
        plot_skr_vs_distance({}, tmp_path / "empty.png")

