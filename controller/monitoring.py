"""Monitoring element: per-link health decisions from key-rate and QBER samples.

``MonitoringElement`` is a plain class (no os_ken, no I/O, no clock): the app shell hands it
each link's measurements with the time, and calls ``tick(now)`` periodically; both return the
actions to carry out, in order:

- ``StoreSample``: a row for the ``link_samples`` table;
- ``LinkMetricsUpdate``: the smoothed key rate and the QBER, for the routing element;
- ``TakeOutOfRouting`` / ``RestoreToRouting``: for the routing element (``set_in_routing``);
- ``Alarm``: an ETSI GS QKD 015 ``alarm`` (or ``event``) notification about a link, with
  severity MAJOR (routing changed: the link is unusable) or MINOR (a warning, or a recovery).

Rules (``MonitoringConfig``):

- A sample with QBER at or above ``qber_threshold`` (default 0.11, where BB84 stops yielding
  secret key) takes the link out of routing at once, with a MAJOR alarm: key made at such an
  error rate may be known to an eavesdropper.
- A link that sends no sample for ``silence_timeout_s`` is taken out (MAJOR) by ``tick``.
- A link out of routing comes back after ``restore_samples`` consecutive healthy samples,
  healthy meaning QBER below ``qber_threshold - restore_margin`` (hysteresis, so a QBER that
  hovers around the threshold does not flap the routes); a link that was out only for silence
  may come back on samples without QBER.
- QBER entering the band ``[threshold - margin, threshold)`` raises a MINOR alarm; a key pool
  that runs dry at either end raises a MINOR ``link_overloaded`` alarm (ETSI 015
  ``sdqkdn_link_overloaded``). Both only on the transition, not on every sample.
- The key rate for routing is an exponentially weighted moving average of the measured rate
  (time constant ``skr_time_constant_s``, weighted by the time between samples, so irregular
  sampling and gaps do not bias it). QBER is passed on unsmoothed: the security rule above
  must see every excursion.

``render_prometheus`` turns a ``snapshot`` into the Prometheus text exposition format.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Mapping, Union

MAJOR = "MAJOR"
MINOR = "MINOR"

# Alarm kinds
QBER_EXCEEDED = "qber_exceeded"
QBER_HIGH = "qber_high"
LINK_SILENT = "link_silent"
LINK_RESTORED = "link_restored"
LINK_OVERLOADED = "link_overloaded"

# Why a link is out of routing
REASON_QBER = "qber"
REASON_SILENT = "silent"


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class StoreSample:
    link: str
    ts: float
    skr_bps: float  # measured over the sampling interval
    skr_smoothed_bps: float
    qber: float | None
    pool_bits_src: int | None
    pool_bits_dst: int | None


@dataclass(frozen=True)
class LinkMetricsUpdate:
    link: str
    skr_bps: float  # smoothed
    qber: float | None  # latest known


@dataclass(frozen=True)
class TakeOutOfRouting:
    link: str
    reason: str


@dataclass(frozen=True)
class RestoreToRouting:
    link: str


@dataclass(frozen=True)
class Alarm:
    """An ETSI 015 link notification: ``notification`` is 'alarm' or 'event'."""

    link: str
    kind: str
    severity: str
    message: str
    notification: str = "alarm"

    def __post_init__(self) -> None:
        if self.severity not in (MAJOR, MINOR):
            raise ValueError(f"alarm severity must be MAJOR or MINOR, got {self.severity!r}")
        if self.notification not in ("alarm", "event"):
            raise ValueError(f"notification must be 'alarm' or 'event', got {self.notification!r}")


Action = Union[StoreSample, LinkMetricsUpdate, TakeOutOfRouting, RestoreToRouting, Alarm]


# --------------------------------------------------------------------------- configuration and state


@dataclass(frozen=True)
class MonitoringConfig:
    qber_threshold: float = 0.11
    restore_margin: float = 0.01
    restore_samples: int = 3
    silence_timeout_s: float = 30.0
    skr_time_constant_s: float = 30.0
    window: int = 120  # samples kept per link

    def __post_init__(self) -> None:
        def finite(v: object) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not finite(self.qber_threshold) or not 0 < self.qber_threshold <= 0.5:
            raise ValueError("qber_threshold must be in (0, 0.5]")
        if not finite(self.restore_margin) or not 0 <= self.restore_margin < self.qber_threshold:
            raise ValueError("restore_margin must be in [0, qber_threshold)")
        for name in ("restore_samples", "window"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1")
        for name in ("silence_timeout_s", "skr_time_constant_s"):
            v = getattr(self, name)
            if not finite(v) or v <= 0:
                raise ValueError(f"{name} must be a finite number > 0")

    @property
    def restore_below(self) -> float:
        return self.qber_threshold - self.restore_margin


@dataclass(frozen=True)
class Sample:
    ts: float
    skr_bps: float
    qber: float | None
    pool_bits_src: int | None
    pool_bits_dst: int | None


@dataclass
class _Link:
    watched_at: float
    window: deque
    last_ts: float | None = None
    skr_smoothed: float | None = None
    qber: float | None = None  # latest known
    in_routing: bool = True
    reason: str | None = None  # why out of routing
    healthy_run: int = 0
    qber_high: bool = False
    pool_dry: bool | None = None  # None until a sample reports a pool
    samples: int = 0
    stale: int = 0
    alarms: dict[str, int] = field(default_factory=lambda: {MAJOR: 0, MINOR: 0})


@dataclass(frozen=True)
class LinkMetrics:
    """One link in a ``MonitoringSnapshot``; load fields are None unless given to ``snapshot``."""

    link: str
    in_routing: bool
    reason: str | None
    skr_bps: float | None  # smoothed
    skr_measured_bps: float | None
    qber: float | None
    pool_bits_src: int | None
    pool_bits_dst: int | None
    last_sample_age_s: float | None
    samples_total: int
    stale_samples_total: int
    alarms_total: Mapping[str, int]
    reserved_bps: float | None = None
    session_count: int | None = None


@dataclass(frozen=True)
class MonitoringSnapshot:
    links: tuple[LinkMetrics, ...]


# --------------------------------------------------------------------------- the element


class MonitoringElement:
    def __init__(self, config: MonitoringConfig | None = None):
        self.config = config if config is not None else MonitoringConfig()
        self._links: dict[str, _Link] = {}

    def watch(self, link: str, now: float) -> None:
        """Start watching a link: its silence is counted from ``now``. Idempotent."""
        if not isinstance(link, str) or not link:
            raise ValueError("link name must be a non-empty string")
        if link not in self._links:
            self._links[link] = _Link(watched_at=float(now), window=deque(maxlen=self.config.window))

    def forget(self, link: str) -> None:
        self._links.pop(link, None)

    def watched(self) -> list[str]:
        return sorted(self._links)

    def in_routing(self, link: str) -> bool:
        return self._links[link].in_routing

    def window(self, link: str) -> tuple[Sample, ...]:
        """The link's latest samples, oldest first."""
        return tuple(self._links[link].window)

    def sample(self, link: str, skr_measured: float, qber: float | None, pool_bits_src: int | None,
               pool_bits_dst: int | None, now: float) -> list[Action]:
        """Take one measurement of a link (key rate measured from key arrival over the last
        interval, QBER, key-pool fill at both ends) and say what to do. A link not yet watched
        is watched from its first sample; a sample older than the link's latest one is counted
        and ignored."""
        _check_sample(link, skr_measured, qber, pool_bits_src, pool_bits_dst, now)
        self.watch(link, now)
        st = self._links[link]
        if st.last_ts is not None and now < st.last_ts:
            st.stale += 1
            return []
        cfg = self.config
        skr = float(skr_measured)
        if st.skr_smoothed is None:
            st.skr_smoothed = skr
        else:
            alpha = -math.expm1(-(now - st.last_ts) / cfg.skr_time_constant_s)
            st.skr_smoothed += alpha * (skr - st.skr_smoothed)
        st.last_ts = float(now)
        st.samples += 1
        if qber is not None:
            st.qber = float(qber)
        st.window.append(Sample(float(now), skr, qber, pool_bits_src, pool_bits_dst))

        actions: list[Action] = [
            StoreSample(link, float(now), skr, st.skr_smoothed, qber, pool_bits_src, pool_bits_dst),
            LinkMetricsUpdate(link, st.skr_smoothed, st.qber),
        ]
        if qber is not None and qber >= cfg.qber_threshold:
            st.healthy_run = 0
            st.qber_high = True
            if st.in_routing:
                actions += self._take_out(link, st, REASON_QBER, QBER_EXCEEDED,
                                          f"QBER {qber:.4f} at or above the threshold {cfg.qber_threshold:g}")
            else:
                st.reason = REASON_QBER  # silence may have taken it out; now QBER keeps it out
        elif not st.in_routing:
            healthy = (qber < cfg.restore_below) if qber is not None else st.reason == REASON_SILENT
            st.healthy_run = st.healthy_run + 1 if healthy else 0
            if st.healthy_run >= cfg.restore_samples:
                actions += self._restore(link, st)
        else:
            actions += self._qber_warning(link, st, qber)
        actions += self._pool_check(link, st, pool_bits_src, pool_bits_dst)
        return actions

    def tick(self, now: float) -> list[Action]:
        """Take out every link in routing that has been silent for ``silence_timeout_s``."""
        actions: list[Action] = []
        timeout = self.config.silence_timeout_s
        for link in sorted(self._links):
            st = self._links[link]
            last = st.last_ts if st.last_ts is not None else st.watched_at
            if st.in_routing and now - last >= timeout:
                what = "no sample yet" if st.last_ts is None else "no sample"
                actions += self._take_out(link, st, REASON_SILENT, LINK_SILENT,
                                          f"{what} for {now - last:.1f} s (timeout {timeout:g} s)")
        return actions

    def snapshot(self, now: float, load: Mapping[str, tuple[float, int]] | None = None) -> MonitoringSnapshot:
        """State of every watched link; ``load`` (link -> (reserved_bps, session_count)), from the
        routing element, is carried along for the metrics."""
        load = load or {}
        out = []
        for link in sorted(self._links):
            st = self._links[link]
            last = st.window[-1] if st.window else None
            reserved, sessions = load.get(link, (None, None))
            out.append(LinkMetrics(
                link=link, in_routing=st.in_routing, reason=st.reason, skr_bps=st.skr_smoothed,
                skr_measured_bps=last.skr_bps if last else None, qber=st.qber,
                pool_bits_src=last.pool_bits_src if last else None, pool_bits_dst=last.pool_bits_dst if last else None,
                last_sample_age_s=max(0.0, now - st.last_ts) if st.last_ts is not None else None,
                samples_total=st.samples, stale_samples_total=st.stale, alarms_total=dict(st.alarms),
                reserved_bps=reserved, session_count=sessions))
        return MonitoringSnapshot(tuple(out))

    # ----------------------------------------------------------------- internals

    def _alarm(self, st: _Link, alarm: Alarm) -> Alarm:
        st.alarms[alarm.severity] += 1
        return alarm

    def _take_out(self, link: str, st: _Link, reason: str, kind: str, message: str) -> list[Action]:
        st.in_routing, st.reason, st.healthy_run = False, reason, 0
        return [TakeOutOfRouting(link, message),
                self._alarm(st, Alarm(link, kind, MAJOR, f"link {link} out of routing: {message}"))]

    def _restore(self, link: str, st: _Link) -> list[Action]:
        cause = st.reason
        st.in_routing, st.reason, st.healthy_run, st.qber_high = True, None, 0, False
        message = (f"link {link} back in routing after {self.config.restore_samples} healthy samples"
                   f" (out for: {cause})")
        return [RestoreToRouting(link), self._alarm(st, Alarm(link, LINK_RESTORED, MINOR, message, "event"))]

    def _qber_warning(self, link: str, st: _Link, qber: float | None) -> list[Action]:
        if qber is None:
            return []
        cfg = self.config
        if qber >= cfg.restore_below:
            if not st.qber_high:
                st.qber_high = True
                message = f"link {link}: QBER {qber:.4f} near the threshold {cfg.qber_threshold:g}"
                return [self._alarm(st, Alarm(link, QBER_HIGH, MINOR, message))]
        else:
            st.qber_high = False
        return []

    def _pool_check(self, link: str, st: _Link, src: int | None, dst: int | None) -> list[Action]:
        if src is None and dst is None:
            return []
        ends = [name for name, bits in (("source", src), ("destination", dst)) if bits == 0]
        # Only a pool that held key and ran dry: pools start empty while the link comes up.
        was_dry, st.pool_dry = st.pool_dry, bool(ends)
        if ends and was_dry is False:
            return [self._alarm(st, Alarm(link, LINK_OVERLOADED, MINOR,
                                          f"link {link}: key pool empty at the {' and '.join(ends)} end"))]
        return []


def _check_sample(link: str, skr: float, qber: float | None, src: int | None, dst: int | None, now: float) -> None:
    def number(v: object) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if not number(now):
        raise ValueError(f"link {link}: sample time must be a finite number")
    if not number(skr) or skr < 0:
        raise ValueError(f"link {link}: measured key rate must be a finite number >= 0, got {skr!r}")
    if qber is not None and (not number(qber) or not 0 <= qber <= 1):
        raise ValueError(f"link {link}: QBER must be in [0, 1], got {qber!r}")
    for name, bits in (("pool_bits_src", src), ("pool_bits_dst", dst)):
        if bits is not None and (not isinstance(bits, int) or isinstance(bits, bool) or bits < 0):
            raise ValueError(f"link {link}: {name} must be an integer >= 0, got {bits!r}")


# --------------------------------------------------------------------------- Prometheus


_FAMILIES: tuple[tuple[str, str, str], ...] = (
    ("qkdsdn_link_skr_bps", "gauge", "Secret key rate of the link for routing (EWMA of the measured rate), bits/s."),
    ("qkdsdn_link_skr_measured_bps", "gauge", "Secret key rate measured from key arrival, last interval, bits/s."),
    ("qkdsdn_link_qber", "gauge", "Latest quantum bit error rate of the link."),
    ("qkdsdn_link_pool_bits", "gauge", "Key bits in the link's pool at each end."),
    ("qkdsdn_link_in_routing", "gauge", "1 when the link is in routing, 0 when the monitoring element took it out."),
    ("qkdsdn_link_last_sample_age_seconds", "gauge", "Seconds since the link's latest sample."),
    ("qkdsdn_link_reserved_bps", "gauge", "Key rate reserved on the link by sessions, bits/s."),
    ("qkdsdn_link_sessions", "gauge", "Sessions routed over the link."),
    ("qkdsdn_link_samples_total", "counter", "Samples accepted for the link."),
    ("qkdsdn_link_stale_samples_total", "counter", "Samples ignored because they were older than the latest one."),
    ("qkdsdn_link_alarms_total", "counter", "Alarms and events raised for the link, by severity."),
    ("qkdsdn_monitoring_links", "gauge", "Links watched by the monitoring element."),
    ("qkdsdn_monitoring_links_out_of_routing", "gauge", "Watched links currently out of routing."),
)


def render_prometheus(state: MonitoringSnapshot) -> str:
    """The snapshot in the Prometheus text exposition format (version 0.0.4)."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = {name: [] for name, _, _ in _FAMILIES}

    def put(name: str, labels: dict[str, str], value: float | int | None) -> None:
        if value is not None:
            samples[name].append((labels, value))

    for m in state.links:
        lab = {"link": m.link}
        put("qkdsdn_link_skr_bps", lab, m.skr_bps)
        put("qkdsdn_link_skr_measured_bps", lab, m.skr_measured_bps)
        put("qkdsdn_link_qber", lab, m.qber)
        put("qkdsdn_link_pool_bits", {**lab, "end": "src"}, m.pool_bits_src)
        put("qkdsdn_link_pool_bits", {**lab, "end": "dst"}, m.pool_bits_dst)
        put("qkdsdn_link_in_routing", lab, 1 if m.in_routing else 0)
        put("qkdsdn_link_last_sample_age_seconds", lab, m.last_sample_age_s)
        put("qkdsdn_link_reserved_bps", lab, m.reserved_bps)
        put("qkdsdn_link_sessions", lab, m.session_count)
        put("qkdsdn_link_samples_total", lab, m.samples_total)
        put("qkdsdn_link_stale_samples_total", lab, m.stale_samples_total)
        for severity in (MAJOR, MINOR):
            put("qkdsdn_link_alarms_total", {**lab, "severity": severity}, m.alarms_total.get(severity, 0))
    put("qkdsdn_monitoring_links", {}, len(state.links))
    put("qkdsdn_monitoring_links_out_of_routing", {}, sum(1 for m in state.links if not m.in_routing))

    lines = []
    for name, kind, help_text in _FAMILIES:
        lines.append(f"# HELP {name} {_escape_help(help_text)}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples[name]:
            lines.append(f"{name}{_labels(labels)} {_value(value)}")
    return "\n".join(lines) + "\n"


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
    return "{" + inner + "}"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _value(v: float | int) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))

