"""Monitoring element: QBER and silence rules, hysteresis, EWMA, alarms, Prometheus text."""
from __future__ import annotations

import math
import re

import pytest

from controller.monitoring import (LINK_OVERLOADED, LINK_RESTORED, LINK_SILENT, MAJOR, MINOR, QBER_EXCEEDED,
                                   QBER_HIGH, Alarm, LinkMetricsUpdate, MonitoringConfig, MonitoringElement,
                                   RestoreToRouting, StoreSample, TakeOutOfRouting, render_prometheus)
from controller.routing import LinkView, RoutingElement

CFG = MonitoringConfig(qber_threshold=0.11, restore_margin=0.02, restore_samples=3, silence_timeout_s=10.0,
                       skr_time_constant_s=5.0, window=4)


def kinds(actions) -> list:
    return [type(a).__name__ if not isinstance(a, Alarm) else (a.kind, a.severity) for a in actions]


def routing_actions(actions) -> list:
    return [a for a in actions if isinstance(a, (TakeOutOfRouting, RestoreToRouting, Alarm))]


def test_a_healthy_sample_is_stored_and_passed_to_routing():
    mon = MonitoringElement(CFG)
    actions = mon.sample("L1", 1000.0, 0.02, 4096, 2048, now=1.0)
    assert actions == [StoreSample("L1", 1.0, 1000.0, 1000.0, 0.02, 4096, 2048),
                       LinkMetricsUpdate("L1", 1000.0, 0.02)]
    assert mon.in_routing("L1") and mon.watched() == ["L1"]


@pytest.mark.parametrize("qber", [0.11, 0.2])
def test_qber_at_or_above_the_threshold_takes_the_link_out_with_a_major_alarm(qber):
    mon = MonitoringElement(CFG)
    mon.sample("L1", 1000.0, 0.02, None, None, now=0.0)
    actions = mon.sample("L1", 900.0, qber, None, None, now=1.0)
    assert kinds(actions) == ["StoreSample", "LinkMetricsUpdate", "TakeOutOfRouting", (QBER_EXCEEDED, MAJOR)]
    assert actions[2].link == "L1" and "threshold 0.11" in actions[2].reason
    assert actions[3].notification == "alarm" and "out of routing" in actions[3].message
    assert not mon.in_routing("L1")
    # Still bad: stored, but no second alarm.
    assert kinds(mon.sample("L1", 900.0, qber, None, None, now=2.0)) == ["StoreSample", "LinkMetricsUpdate"]


def test_restore_needs_consecutive_samples_below_threshold_minus_margin():
    mon = MonitoringElement(CFG)
    mon.sample("L1", 1000.0, 0.15, None, None, now=0.0)
    assert not mon.in_routing("L1")
    t = iter(range(1, 100))
    # Below the threshold but inside the margin: does not count.
    for _ in range(5):
        assert routing_actions(mon.sample("L1", 1000.0, 0.1, None, None, now=next(t))) == []
    # Two good, one in the band (resets), then three good.
    for q in (0.05, 0.05, 0.095, 0.05, 0.05):
        assert routing_actions(mon.sample("L1", 1000.0, q, None, None, now=next(t))) == []
    actions = mon.sample("L1", 1000.0, 0.089, None, None, now=next(t))
    assert kinds(routing_actions(actions)) == ["RestoreToRouting", (LINK_RESTORED, MINOR)]
    assert actions[-1].notification == "event" and "qber" in actions[-1].message
    assert mon.in_routing("L1")


def test_samples_without_qber_do_not_restore_a_link_taken_out_for_qber():
    mon = MonitoringElement(CFG)
    mon.sample("L1", 1000.0, 0.2, None, None, now=0.0)
    for i in range(1, 10):
        assert routing_actions(mon.sample("L1", 1000.0, None, None, None, now=float(i))) == []
    assert not mon.in_routing("L1")


def test_a_silent_link_is_taken_out_by_tick_and_comes_back_with_samples():
    mon = MonitoringElement(CFG)
    mon.watch("L2", now=0.0)  # never sampled: silence counts from the watch
    mon.sample("L1", 1000.0, 0.02, None, None, now=0.0)
    assert mon.tick(9.9) == []
    actions = mon.tick(10.0)
    assert [(type(a).__name__, a.link) for a in actions] == [
        ("TakeOutOfRouting", "L1"), ("Alarm", "L1"), ("TakeOutOfRouting", "L2"), ("Alarm", "L2")]
    assert actions[1].kind == LINK_SILENT and actions[1].severity == MAJOR
    assert "no sample for 10.0 s" in actions[0].reason and "no sample yet" in actions[2].reason
    assert mon.tick(100.0) == []  # already out: no repeated alarm
    # A silenced link may come back on samples without QBER.
    for i in range(2):
        assert routing_actions(mon.sample("L1", 10.0, None, None, None, now=101.0 + i)) == []
    assert kinds(routing_actions(mon.sample("L1", 10.0, None, None, None, now=103.0))) == [
        "RestoreToRouting", (LINK_RESTORED, MINOR)]
    assert mon.tick(112.9) == []
    assert len(mon.tick(113.0)) == 2


def test_a_silent_link_that_reports_bad_qber_stays_out_for_qber():
    mon = MonitoringElement(CFG)
    mon.sample("L1", 1000.0, 0.02, None, None, now=0.0)
    mon.tick(20.0)
    assert routing_actions(mon.sample("L1", 1000.0, 0.3, None, None, now=21.0)) == []
    for i in range(5):
        assert routing_actions(mon.sample("L1", 1000.0, None, None, None, now=22.0 + i)) == []
    assert mon.snapshot(30.0).links[0].reason == "qber"


def test_forgotten_links_are_no_longer_watched():
    mon = MonitoringElement(CFG)
    mon.watch("L1", now=0.0)
    mon.watch("L1", now=5.0)  # idempotent: the first watch time stands
    assert len(mon.tick(10.0)) == 2
    mon.forget("L1")
    assert mon.tick(100.0) == [] and mon.watched() == []


def test_skr_is_smoothed_with_a_time_weighted_ewma():
    mon = MonitoringElement(CFG)  # time constant 5 s
    mon.sample("L1", 1000.0, None, None, None, now=0.0)
    update = mon.sample("L1", 2000.0, None, None, None, now=5.0)[1]
    assert update.skr_bps == pytest.approx(1000.0 + 1000.0 * (1 - math.exp(-1)))
    # The same time span in small steps ends at the same value.
    a, b = MonitoringElement(CFG), MonitoringElement(CFG)
    a.sample("L", 0.0, None, None, None, now=0.0)
    b.sample("L", 0.0, None, None, None, now=0.0)
    a_last = a.sample("L", 100.0, None, None, None, now=4.0)[1].skr_bps
    for t in (1.0, 2.0, 3.0, 4.0):
        b_last = b.sample("L", 100.0, None, None, None, now=t)[1].skr_bps
    assert a_last == pytest.approx(b_last)
    # After a long gap the old value no longer matters.
    assert mon.sample("L1", 10.0, None, None, None, now=1000.0)[1].skr_bps == pytest.approx(10.0)
    # Stored samples keep the measured value too.
    assert mon.window("L1")[-1].skr_bps == 10.0


def test_metrics_update_keeps_the_latest_known_qber():
    mon = MonitoringElement(CFG)
    mon.sample("L1", 1000.0, 0.03, None, None, now=0.0)
    assert mon.sample("L1", 1000.0, None, None, None, now=1.0)[1] == LinkMetricsUpdate("L1", 1000.0, 0.03)


def test_stale_samples_are_counted_and_ignored():
    mon = MonitoringElement(CFG)
    mon.sample("L1", 1000.0, 0.02, None, None, now=5.0)
    assert mon.sample("L1", 1.0, 0.5, None, None, now=4.0) == []
    assert mon.in_routing("L1")
    snap = mon.snapshot(6.0).links[0]
    assert (snap.samples_total, snap.stale_samples_total, snap.skr_bps) == (1, 1, 1000.0)


def test_window_keeps_the_latest_samples():
    mon = MonitoringElement(CFG)
    for i in range(6):
        mon.sample("L1", float(i), None, None, None, now=float(i))
    assert [s.ts for s in mon.window("L1")] == [2.0, 3.0, 4.0, 5.0]


def test_qber_near_the_threshold_raises_one_minor_alarm_per_excursion():
    mon = MonitoringElement(CFG)  # band [0.09, 0.11)
    seq = [0.05, 0.095, 0.1, 0.05, 0.09, 0.05]
    alarms = [routing_actions(mon.sample("L1", 1.0, q, None, None, now=float(i))) for i, q in enumerate(seq)]
    assert [[(a.kind, a.severity) for a in x] for x in alarms] == [[], [(QBER_HIGH, MINOR)], [], [],
                                                                   [(QBER_HIGH, MINOR)], []]
    assert mon.in_routing("L1")


def test_a_pool_that_runs_dry_raises_link_overloaded_once():
    mon = MonitoringElement(CFG)
    pools = [(0, 0), (0, 512), (1024, 512), (0, 512), (0, 0), (8, 8), (8, 0)]
    out = [routing_actions(mon.sample("L1", 1.0, 0.01, s, d, now=float(i))) for i, (s, d) in enumerate(pools)]
    assert [[a.kind for a in x] for x in out] == [[], [], [], [LINK_OVERLOADED], [], [], [LINK_OVERLOADED]]
    assert "source end" in out[3][0].message and "destination end" in out[6][0].message
    assert out[3][0].severity == MINOR


@pytest.mark.parametrize("args", [("L1", -1.0, 0.1, None, None, 0.0), ("L1", math.nan, 0.1, None, None, 0.0),
                                  ("L1", 1.0, 1.5, None, None, 0.0), ("L1", 1.0, 0.1, -1, None, 0.0),
                                  ("L1", 1.0, 0.1, None, 1.5, 0.0), ("L1", 1.0, 0.1, None, None, math.inf),
                                  ("", 1.0, 0.1, None, None, 0.0), ("L1", True, 0.1, None, None, 0.0)])
def test_bad_samples_are_rejected(args):
    mon = MonitoringElement(CFG)
    with pytest.raises(ValueError):
        mon.sample(*args[:5], now=args[5])
    assert mon.watched() == []  # checked before the link is registered


@pytest.mark.parametrize("kw", [dict(qber_threshold=0.0), dict(qber_threshold=0.6), dict(restore_margin=0.2),
                                dict(restore_samples=0), dict(window=0), dict(silence_timeout_s=0),
                                dict(skr_time_constant_s=math.inf)])
def test_bad_configuration_is_rejected(kw):
    with pytest.raises(ValueError):
        MonitoringConfig(**kw)


def test_alarm_severity_is_major_or_minor():
    with pytest.raises(ValueError):
        Alarm("L1", "x", "CRITICAL", "m")


def test_monitoring_actions_drive_the_routing_element():
    routing = RoutingElement()
    routing.load([LinkView("AB", "A", "B"), LinkView("AC", "A", "C"), LinkView("CB", "C", "B")])
    mon = MonitoringElement(CFG)

    def apply(actions):
        for a in actions:
            if isinstance(a, LinkMetricsUpdate):
                routing.update_link(a.link, skr_bps=a.skr_bps, qber=a.qber)
            elif isinstance(a, TakeOutOfRouting):
                routing.set_in_routing(a.link, False)
            elif isinstance(a, RestoreToRouting):
                routing.set_in_routing(a.link, True)

    for link in ("AB", "AC", "CB"):
        apply(mon.sample(link, 1000.0, 0.01, None, None, now=0.0))
    assert routing.find_path("A", "B", 10.0, now=0.0).nodes == ("A", "B")
    apply(mon.sample("AB", 1000.0, 0.12, None, None, now=1.0))
    assert routing.find_path("A", "B", 10.0, now=1.0).nodes == ("A", "C", "B")
    for i in range(3):
        apply(mon.sample("AB", 1000.0, 0.01, None, None, now=2.0 + i))
    assert routing.find_path("A", "B", 10.0, now=5.0).nodes == ("A", "B")


# --------------------------------------------------------------------------- Prometheus text format

# https://prometheus.io/docs/instrumenting/exposition_formats/ (text format 0.0.4)
_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL_VALUE = r'"(?:[^"\\\n]|\\\\|\\"|\\n)*"'
_LABEL = rf"[a-zA-Z_][a-zA-Z0-9_]*={_LABEL_VALUE}"
_SAMPLE = re.compile(rf"^({_NAME})(\{{{_LABEL}(?:,{_LABEL})*\}})?"
                     r" ([-+]?(?:[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?|Inf)|NaN)$")
_HELP = re.compile(rf"^# HELP ({_NAME}) (?:[^\\\n]|\\\\|\\n)*$")
_TYPE = re.compile(rf"^# TYPE ({_NAME}) (counter|gauge|histogram|summary|untyped)$")


def sample_state():
    mon = MonitoringElement(CFG)
    mon.sample("L1", 1000.0, 0.02, 4096, 2048, now=0.0)
    mon.sample('odd"link\\name\nx', 12.5, None, None, 0, now=1.0)
    mon.sample("L3", 5.0, 0.3, 0, 0, now=2.0)
    return mon.snapshot(4.0, load={"L1": (250.0, 2), "L3": (0.0, 0)})


def test_prometheus_text_follows_the_exposition_grammar():
    text = render_prometheus(sample_state())
    assert text.endswith("\n")
    typed: dict[str, str] = {}
    helped: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# HELP"):
            name = _HELP.match(line).group(1)
            assert name not in helped
            helped.add(name)
        elif line.startswith("# TYPE"):
            match = _TYPE.match(line)
            assert match and match.group(1) not in typed and match.group(1) in helped
            typed[match.group(1)] = match.group(2)
        else:
            match = _SAMPLE.match(line)
            assert match, line
            assert match.group(1) in typed  # TYPE comes before the samples of its family
    assert typed["qkdsdn_link_skr_bps"] == "gauge" and typed["qkdsdn_link_alarms_total"] == "counter"
    assert 'qkdsdn_link_skr_bps{link="L1"} 1000.0' in text.splitlines()
    assert 'qkdsdn_link_in_routing{link="L3"} 0' in text.splitlines()
    assert 'qkdsdn_link_pool_bits{link="L1",end="dst"} 2048' in text.splitlines()
    assert 'qkdsdn_link_alarms_total{link="L3",severity="MAJOR"} 1' in text.splitlines()
    assert 'qkdsdn_link_reserved_bps{link="L1"} 250.0' in text.splitlines()
    assert 'qkdsdn_link_skr_bps{link="odd\\"link\\\\name\\nx"} 12.5' in text.splitlines()
    assert "qkdsdn_monitoring_links_out_of_routing 1" in text.splitlines()
    assert not any(line.startswith('qkdsdn_link_qber{link="odd') for line in text.splitlines())


def test_prometheus_text_parses_with_the_reference_parser():
    parser = pytest.importorskip("prometheus_client.parser")
    families = {f.name: f for f in parser.text_string_to_metric_families(render_prometheus(sample_state()))}
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert families["qkdsdn_link_alarms"].type == "counter"  # the parser drops _total from the family
    assert values[("qkdsdn_link_skr_bps", (("link", "L1"),))] == 1000.0
    assert values[("qkdsdn_link_skr_bps", (("link", 'odd"link\\name\nx'),))] == 12.5
    assert values[("qkdsdn_link_qber", (("link", "L3"),))] == 0.3
    assert values[("qkdsdn_link_last_sample_age_seconds", (("link", "L1"),))] == 4.0
    assert values[("qkdsdn_link_sessions", (("link", "L1"),))] == 2
    assert values[("qkdsdn_link_alarms_total", (("link", "L3"), ("severity", "MAJOR")))] == 1
    assert values[("qkdsdn_monitoring_links", ())] == 3


def test_prometheus_special_values():
    from controller.monitoring import LinkMetrics, MonitoringSnapshot
    state = MonitoringSnapshot((LinkMetrics(link="L", in_routing=True, reason=None, skr_bps=math.inf,
                                            skr_measured_bps=1e-7, qber=None, pool_bits_src=None,
                                            pool_bits_dst=None, last_sample_age_s=None, samples_total=0,
                                            stale_samples_total=0, alarms_total={}),))
    lines = render_prometheus(state).splitlines()
    assert 'qkdsdn_link_skr_bps{link="L"} +Inf' in lines
    assert 'qkdsdn_link_skr_measured_bps{link="L"} 1e-07' in lines
    assert 'qkdsdn_link_alarms_total{link="L",severity="MINOR"} 0' in lines
