"""Physics model of the emulated QKD devices (the digital twin).

Given a link of the network file, this module answers: how many secret bits per
second does the link's device pair produce, at which QBER, and does it abort?
Two device models exist (``Device.model``):

* ``decoy-bb84``: BB84 with weak coherent pulses and one vacuum plus one weak
  decoy state (Lo, Ma, Chen 2005; Ma, Qi, Zhao, Lo 2005, PRA 72 012326), with
  the asymptotic GLLP key rate.
* ``fixed``: the operator states the key rate and QBER; only disturbances
  (eavesdropper, drift, cut) change them.

Everything here is pure arithmetic on floats, without state or randomness, so
the key generation engine can call it every tick. The formulas, parameters and
references are in ``docs/twin-model.md``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from db.netfile import Device, Link, Network

# Sifting factor of BB84 with uniform basis choice: half the detections survive.
SIFT = 0.5
# Error rate of a dark count (a random bit).
E0 = 0.5
# Highest admissible QBER: beyond it the bit error rate carries no information.
QBER_MAX = 0.5
DEFAULT_ABORT_QBER = 0.11
# The cut-off search gives up (returns inf) beyond this total fibre loss: a model
# without dark counts keeps a positive rate at any distance.
_CUTOFF_SEARCH_DB = 1500.0


@dataclass(frozen=True)
class LinkState:
    """Disturbances of a link, set by the twin's operator or fault campaigns."""

    # Fraction of pulses attacked by an intercept-resend eavesdropper, in [0, 1].
    eve_fraction: float = 0.0
    # Additive QBER from slow drift (polarisation/phase, e.g. 0.005); may be negative
    # after a re-alignment, the resulting QBER is clamped to [0, 0.5].
    qber_drift: float = 0.0
    cut: bool = False

    def __post_init__(self) -> None:
        _check_disturbance(self.eve_fraction, self.qber_drift)


@dataclass(frozen=True)
class Performance:
    """Expected behaviour of a link's device pair."""

    skr_bps: float  # secret key rate, bits/s (0 when aborted or no key)
    qber: float  # observed QBER of the signal states, in [0, 0.5]
    sifted_bps: float | None  # sifted key rate, bits/s; None for the fixed model
    aborted: bool  # QBER above the abort threshold, or the link is cut
    reason: str | None  # why the rate is 0, None when a key is produced


@dataclass(frozen=True)
class DecoyEstimates:
    """Observed gains and error rates of a decoy-state run, and the bounds drawn from them.

    Gains are per pulse. ``y1_lower``, ``e1_upper`` and ``q1_lower`` are the
    vacuum + weak decoy estimates of Ma et al. 2005; ``rate_per_pulse`` is the GLLP
    rate, clipped at 0.
    """

    eta: float
    y0: float
    q_mu: float
    e_mu: float
    q_nu: float
    e_nu: float
    y1_lower: float
    e1_upper: float
    q1_lower: float
    rate_per_pulse: float


# --------------------------------------------------------------------------- helpers


def binary_entropy(x: float) -> float:
    """H2(x) in bits. Saturates at 1 for x >= 1/2 (an error rate past 1/2 is no better)."""
    if x <= 0.0:
        return 0.0
    if x >= 0.5:
        return 1.0
    return -x * math.log2(x) - (1.0 - x) * math.log2(1.0 - x)


def _clamp_qber(e: float) -> float:
    return min(max(e, 0.0), QBER_MAX)


def _check(name: str, value: float, lo: float, hi: float, *, lo_open: bool = False,
           hi_open: bool = False) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if (value <= lo if lo_open else value < lo) or (value >= hi if hi_open else value > hi):
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ValueError(f"{name} must lie in {left}{lo:g}, {hi:g}{right}, got {value:g}")
    return value


def _check_disturbance(eve_fraction: float, qber_drift: float) -> tuple[float, float]:
    eve_fraction = _check("eve_fraction", eve_fraction, 0.0, 1.0)
    qber_drift = _check("qber_drift", qber_drift, -QBER_MAX, QBER_MAX)
    return eve_fraction, qber_drift


def _check_abort(abort_qber: float) -> float:
    return _check("abort_qber", abort_qber, 0.0, QBER_MAX, lo_open=True)


def disturbance_qber(eve_fraction: float = 0.0, qber_drift: float = 0.0) -> float:
    """QBER added by an intercept-resend attack on a fraction of pulses, plus drift.

    Eve measures an attacked pulse in a random basis and resends her result: in
    the sifted key she picked the wrong basis half the time, and then Bob's bit is
    random, so an attacked bit is wrong with probability 1/2 * 1/2 = 1/4.
    """
    eve_fraction, qber_drift = _check_disturbance(eve_fraction, qber_drift)
    return eve_fraction / 4.0 + qber_drift


def fibre_transmittance(length_km: float, attenuation_db_km: float) -> float:
    """Transmittance 10^(-alpha L / 10) of a fibre span."""
    length_km = _check("length_km", length_km, 0.0, math.inf)
    attenuation_db_km = _check("attenuation_db_km", attenuation_db_km, 0.0, math.inf)
    return 10.0 ** (-length_km * attenuation_db_km / 10.0)


def channel_transmittance(link: Link | None = None, *, length_km: float | None = None,
                          attenuation_db_km: float | None = None, insertion_loss_db: float = 0.0,
                          detector_efficiency: float = 1.0) -> float:
    """Overall transmittance eta from Alice's source to a click at Bob's detector.

    eta = 10^(-(alpha L + insertion loss) / 10) * detector efficiency. Either pass a
    ``link`` with an emulated device (its fields are used), or the parameters.
    """
    if link is not None:
        if length_km is not None or attenuation_db_km is not None:
            raise TypeError("pass either a link or its parameters, not both")
        if link.device is None:
            raise ValueError(f"link '{link.name}' has no emulated device")
        return channel_transmittance(length_km=link.length_km, attenuation_db_km=link.attenuation_db_km,
                                     insertion_loss_db=link.device.insertion_loss_db,
                                     detector_efficiency=link.device.detector_efficiency)
    if length_km is None or attenuation_db_km is None:
        raise TypeError("channel_transmittance needs a link, or length_km and attenuation_db_km")
    insertion_loss_db = _check("insertion_loss_db", insertion_loss_db, 0.0, math.inf)
    detector_efficiency = _check("detector_efficiency", detector_efficiency, 0.0, 1.0, lo_open=True)
    return (fibre_transmittance(length_km, attenuation_db_km)
            * 10.0 ** (-insertion_loss_db / 10.0) * detector_efficiency)


def plob_bound_bps(eta: float, clock_rate_hz: float) -> float:
    """PLOB repeaterless bound -log2(1 - eta) secret bits per channel use, times the clock rate."""
    eta = _check("eta", eta, 0.0, 1.0)
    clock_rate_hz = _check("clock_rate_hz", clock_rate_hz, 0.0, math.inf, lo_open=True)
    if eta == 1.0:
        return math.inf
    return -math.log1p(-eta) / math.log(2.0) * clock_rate_hz


# --------------------------------------------------------------------------- decoy-state BB84


def decoy_estimates(eta: float, *, dark_count_prob: float, misalignment_error: float,
                    ec_efficiency: float, mu: float, nu: float, extra_qber: float = 0.0) -> DecoyEstimates:
    """The vacuum + weak decoy estimates and the GLLP rate per pulse at transmittance ``eta``.

    ``extra_qber`` is added to the observed error rates E_mu and E_nu of both
    intensities (eavesdropper and drift, see ``disturbance_qber``); the single-photon
    error bound e1 is then derived from the raised E_nu, so the attack costs
    privacy amplification as well as error correction.
    """
    eta = _check("eta", eta, 0.0, 1.0)
    dark_count_prob = _check("dark_count_prob", dark_count_prob, 0.0, 1.0)
    e_d = _check("misalignment_error", misalignment_error, 0.0, QBER_MAX)
    f = _check("ec_efficiency", ec_efficiency, 1.0, math.inf)
    mu = _check("mu", mu, 0.0, math.inf, lo_open=True)
    nu = _check("nu", nu, 0.0, math.inf, lo_open=True)
    if nu >= mu:
        raise ValueError(f"decoy intensity nu ({nu:g}) must be below signal intensity mu ({mu:g})")
    extra_qber = _check("extra_qber", extra_qber, -QBER_MAX, QBER_MAX)

    # Background yield: either of Bob's two detectors (one per bit value) may click.
    y0 = 2.0 * dark_count_prob
    # 1 - exp(-eta x) without cancellation when eta x is tiny (long fibres).
    click_mu = -math.expm1(-eta * mu)
    click_nu = -math.expm1(-eta * nu)
    q_mu = y0 + click_mu
    q_nu = y0 + click_nu
    e_mu = _clamp_qber((E0 * y0 + e_d * click_mu) / q_mu + extra_qber) if q_mu > 0 else E0
    e_nu = _clamp_qber((E0 * y0 + e_d * click_nu) / q_nu + extra_qber) if q_nu > 0 else E0

    # Ma, Qi, Zhao, Lo 2005, vacuum + weak decoy: lower bound of the single-photon yield
    # and upper bound of its error rate.
    y1_lower = (mu / (mu * nu - nu * nu)) * (
        q_nu * math.exp(nu) - q_mu * math.exp(mu) * (nu * nu) / (mu * mu)
        - (mu * mu - nu * nu) / (mu * mu) * y0)
    if y1_lower > 0.0:
        e1_upper = _clamp_qber((e_nu * q_nu * math.exp(nu) - E0 * y0) / (y1_lower * nu))
        q1_lower = y1_lower * mu * math.exp(-mu)
    else:
        # No single photon provably reached Bob: nothing to distil.
        y1_lower, e1_upper, q1_lower = 0.0, E0, 0.0

    # GLLP: the key comes only from single-photon pulses; error correction pays for all.
    rate = SIFT * (-q_mu * f * binary_entropy(e_mu) + q1_lower * (1.0 - binary_entropy(e1_upper)))
    return DecoyEstimates(eta=eta, y0=y0, q_mu=q_mu, e_mu=e_mu, q_nu=q_nu, e_nu=e_nu,
                          y1_lower=y1_lower, e1_upper=e1_upper, q1_lower=q1_lower,
                          rate_per_pulse=max(rate, 0.0))


def _verdict(skr_bps: float, qber: float, sifted_bps: float | None, abort_qber: float,
             cut: bool = False) -> Performance:
    if cut:
        return Performance(0.0, qber, sifted_bps, True, "link cut")
    if qber > abort_qber:
        return Performance(0.0, qber, sifted_bps, True,
                           f"QBER {qber:.2%} above the abort threshold {abort_qber:.2%}")
    if skr_bps <= 0.0:
        return Performance(0.0, qber, sifted_bps, False,
                           "no secret key: loss and noise exceed what privacy amplification can remove")
    return Performance(skr_bps, qber, sifted_bps, False, None)


def decoy_bb84(*, length_km: float, attenuation_db_km: float, insertion_loss_db: float,
               detector_efficiency: float, dark_count_prob: float, misalignment_error: float,
               clock_rate_hz: float, ec_efficiency: float, mu: float, nu: float,
               eve_fraction: float = 0.0, qber_drift: float = 0.0, cut: bool = False,
               abort_qber: float = DEFAULT_ABORT_QBER) -> Performance:
    """Expected secret key rate and QBER of a decoy-state BB84 link (vacuum + weak decoy).

    A cut fibre transmits nothing: only dark counts click, at QBER 1/2.
    """
    clock_rate_hz = _check("clock_rate_hz", clock_rate_hz, 0.0, math.inf, lo_open=True)
    abort_qber = _check_abort(abort_qber)
    eta = 0.0 if cut else channel_transmittance(
        length_km=length_km, attenuation_db_km=attenuation_db_km,
        insertion_loss_db=insertion_loss_db, detector_efficiency=detector_efficiency)
    est = decoy_estimates(eta, dark_count_prob=dark_count_prob, misalignment_error=misalignment_error,
                          ec_efficiency=ec_efficiency, mu=mu, nu=nu,
                          extra_qber=disturbance_qber(eve_fraction, qber_drift))
    return _verdict(est.rate_per_pulse * clock_rate_hz, est.e_mu, SIFT * est.q_mu * clock_rate_hz,
                    abort_qber, cut)


# --------------------------------------------------------------------------- fixed model


def asymptotic_bb84_fraction(qber: float, ec_efficiency: float) -> float:
    """Secret fraction [1 - f H2(E) - H2(E)]+ of sifted BB84 bits at QBER E (Shor-Preskill)."""
    h = binary_entropy(_clamp_qber(qber))
    return max(1.0 - ec_efficiency * h - h, 0.0)


def fixed(device: Device, *, eve_fraction: float = 0.0, qber_drift: float = 0.0, cut: bool = False,
          abort_qber: float = DEFAULT_ABORT_QBER) -> Performance:
    """A device with a stated key rate and QBER, disturbed by an eavesdropper or drift.

    The disturbed rate is the stated rate times the ratio of BB84 secret fractions
    at the disturbed and at the stated QBER (no sifted rate is known).
    """
    if device.skr_bps is None or device.qber is None:
        raise ValueError("a 'fixed' device needs skr_bps and qber")
    skr0 = _check("skr_bps", device.skr_bps, 0.0, math.inf)
    qber0 = _check("qber", device.qber, 0.0, QBER_MAX)
    abort_qber = _check_abort(abort_qber)
    if cut:
        return _verdict(0.0, E0, None, abort_qber, cut=True)
    qber = _clamp_qber(qber0 + disturbance_qber(eve_fraction, qber_drift))
    f = device.ec_efficiency
    base = asymptotic_bb84_fraction(qber0, f)
    if qber == qber0:
        skr = skr0  # exactly the stated figure, not a ratio's rounding of it
    elif base > 0.0:
        skr = skr0 * asymptotic_bb84_fraction(qber, f) / base
    else:
        # The stated point is past the BB84 limit; the operator's figure still holds
        # undisturbed, and any extra error can only lose key.
        skr = skr0 if qber <= qber0 else 0.0
    return _verdict(skr, qber, None, abort_qber)


# --------------------------------------------------------------------------- links and networks


def performance(link: Link, state: LinkState = LinkState(), *,
                abort_qber: float = DEFAULT_ABORT_QBER) -> Performance:
    """Expected secret key rate and QBER of a link with an emulated device, in ``state``."""
    device = link.device
    if device is None:
        raise ValueError(f"link '{link.name}' has a real QKD device (kme), not an emulated one")
    if device.model == "fixed":
        return fixed(device, eve_fraction=state.eve_fraction, qber_drift=state.qber_drift,
                     cut=state.cut, abort_qber=abort_qber)
    if device.model == "decoy-bb84":
        return decoy_bb84(length_km=link.length_km, attenuation_db_km=link.attenuation_db_km,
                          insertion_loss_db=device.insertion_loss_db,
                          detector_efficiency=device.detector_efficiency,
                          dark_count_prob=device.dark_count_prob,
                          misalignment_error=device.misalignment_error,
                          clock_rate_hz=device.clock_rate_hz, ec_efficiency=device.ec_efficiency,
                          mu=device.mu, nu=device.nu, eve_fraction=state.eve_fraction,
                          qber_drift=state.qber_drift, cut=state.cut, abort_qber=abort_qber)
    raise ValueError(f"link '{link.name}': unknown device model '{device.model}'")


def device_performance(device: Device, length_km: float, attenuation_db_km: float = 0.2,
                       state: LinkState = LinkState(), *,
                       abort_qber: float = DEFAULT_ABORT_QBER) -> Performance:
    """``performance`` of a device on a fibre of the given length, without a Link."""
    link = Link(name="probe", qkdl_id="", master="A", slave="B", length_km=length_km,
                attenuation_db_km=attenuation_db_km, device=device)
    return performance(link, state, abort_qber=abort_qber)


def cutoff_distance_km(device: Device, attenuation_db_km: float = 0.2, state: LinkState = LinkState(),
                       *, abort_qber: float = DEFAULT_ABORT_QBER, tol_km: float = 1e-3) -> float:
    """Shortest fibre length at which the device stops producing key.

    0.0 if it produces none even at 0 km; ``math.inf`` if the rate never depends
    on distance (the ``fixed`` model with a positive rate) or stays positive up
    to 1500 dB of fibre loss (no dark counts).
    """
    attenuation_db_km = _check("attenuation_db_km", attenuation_db_km, 0.0, math.inf, lo_open=True)

    def alive(length: float) -> bool:
        return device_performance(device, length, attenuation_db_km, state,
                                  abort_qber=abort_qber).skr_bps > 0.0

    if not alive(0.0):
        return 0.0
    if device.model == "fixed":
        return math.inf
    hi = _CUTOFF_SEARCH_DB / attenuation_db_km
    if alive(hi):
        return math.inf
    # Bisection: the rate does not increase with distance, so "alive" flips once.
    lo = 0.0
    while hi - lo > tol_km:
        mid = 0.5 * (lo + hi)
        if alive(mid):
            lo = mid
        else:
            hi = mid
    return lo


def format_bps(bps: float) -> str:
    """A rate in human units with three significant digits: '512 b/s', '12.3 kb/s', '1.05 Mb/s'."""
    if bps <= 0.0:
        return "0 b/s"
    if math.isinf(bps):
        return "inf b/s"
    units = ("b/s", "kb/s", "Mb/s", "Gb/s", "Tb/s")
    k = 0
    value = float(f"{bps:.3g}")  # round first so that 999.7 b/s reads '1.00 kb/s'
    while value >= 1000.0 and k < len(units) - 1:
        value /= 1000.0
        k += 1
    if value >= 100.0:
        text = f"{value:.0f}"
    elif value >= 10.0:
        text = f"{value:.1f}"
    elif value >= 1.0:
        text = f"{value:.2f}"
    else:
        text = f"{value:.3g}"
    return f"{text} {units[k]}"


def _format_km(km: float) -> str:
    return "unbounded" if math.isinf(km) else f"{km:.1f} km"


def rates_table(network: Network, state: dict[str, LinkState] | None = None, *,
                abort_qber: float = DEFAULT_ABORT_QBER) -> str:
    """A text table of every link: ends, length, model, expected SKR, QBER, cut-off distance.

    ``state`` optionally maps link names to their disturbance. Links to real
    devices (kme) are listed with their ends and length only.
    """
    header = ("link", "ends", "length", "model", "expected SKR", "QBER", "cut-off")
    rows = []
    for link in network.links:
        ends = f"{link.master} - {link.slave}"
        length = f"{link.length_km:g} km"
        if link.device is None:
            rows.append((link.name, ends, length, "real (ETSI 014)", "-", "-", "-"))
            continue
        st = (state or {}).get(link.name, LinkState())
        perf = performance(link, st, abort_qber=abort_qber)
        skr = format_bps(perf.skr_bps)
        if perf.aborted:
            skr += " (cut)" if st.cut else " (abort)"
        cutoff = cutoff_distance_km(link.device, link.attenuation_db_km, st, abort_qber=abort_qber)
        if link.device.model == "fixed" and math.isinf(cutoff):
            cutoff_text = "n/a (fixed)"
        else:
            cutoff_text = _format_km(cutoff)
        rows.append((link.name, ends, length, link.device.model, skr, f"{perf.qber * 100:.2f} %",
                     cutoff_text))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    right = {2, 4, 5, 6}  # numbers align right

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [line(header), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    return "\n".join(out) + "\n"
