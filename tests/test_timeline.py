"""The event timeline (paper's Fig. 4): loading, clock normalisation, attribution, drawing, CLI."""
from __future__ import annotations

import json
import struct

import pytest

from qkdsdn.cli import main
from qkdsdn.timeline import (FIG4_KINDS, Session, TimelineError, attribute, first_times, load_events, normalise,
                             prepare, render, render_file)

KS_A = "11111111-1111-4111-8111-111111111111"
KS_B = "22222222-2222-4222-8222-222222222222"
OFFSET = 1_700_000_000.0  # Unix time at monotonic 0 in these streams


def ev(node, kind, t, ksid=None, unix=False, **details):
    """An agent record: logic events on the monotonic clock, shell events (unix=True) on Unix time."""
    return {"timestamp": t + OFFSET if unix else t, "kind": kind, "ksid": ksid, "node": node,
            "element": "key_manager", "details": details}


def relayed_stream(ksid=KS_A, src="KM2", mid="KM0", dst="KM3", t=100.0):
    """What the agents emit for one relayed ETSI 004 session (shapes as in agents/core and agents/service)."""
    return [
        ev(src, "request_arrival", t + 0.000, call="OPEN_CONNECT", sae=f"SAE-{src}"),
        ev(src, "state_change", t + 0.000, ksid, sae=f"SAE-{src}"),
        ev(src, "authentication", t + 0.002, ksid, unix=True, sae=f"SAE-{src}", accepted=True),
        ev(src, "authentication", t + 0.002, ksid, result="accepted", sae=f"SAE-{src}"),
        ev(dst, "request_arrival", t + 0.001, call="OPEN_CONNECT", sae=f"SAE-{dst}"),
        ev(dst, "state_change", t + 0.001, ksid, sae=f"SAE-{dst}"),
        ev(dst, "authentication", t + 0.003, ksid, result="accepted", sae=f"SAE-{dst}"),
        ev(mid, "state_change", t + 0.010, ksid, by="configuration"),
        ev(mid, "configuration", t + 0.010, ksid, role="intermediate", prev_hop=src, next_hop=dst),
        ev(src, "configuration", t + 0.011, ksid, role="source", prev_hop=None, next_hop=mid),
        ev(dst, "configuration", t + 0.012, ksid, role="destination", prev_hop=mid, next_hop=None),
        ev(src, "request_arrival", t + 0.020, call="GET_KEY", sae=f"SAE-{src}", index=0),
        ev(src, "state_change", t + 0.020, ksid),
        ev(mid, "relay_forwarded", t + 0.025, ksid, unix=True, index=0, to=dst),
        ev(dst, "relay_received", t + 0.027, ksid, unix=True, index=0, hops=1),
        ev(dst, "key_available", t + 0.027, ksid, index=0),
        ev(src, "key_available", t + 0.030, ksid, index=0),
        ev(src, "key_returned", t + 0.030, ksid, call="get_key", indices=[0]),
        ev(dst, "request_arrival", t + 0.031, call="GET_KEY", sae=f"SAE-{dst}", index=0),
        ev(dst, "key_returned", t + 0.031, ksid, call="get_key", indices=[0]),
        ev(src, "request_arrival", t + 0.040, call="CLOSE", sae=f"SAE-{src}"),
        ev(src, "state_change", t + 0.040, ksid, reason="closed"),
    ]


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


# ------------------------------------------------------------------------------ loading


def test_load_accepts_demo_object_list_and_json_lines(tmp_path):
    records = relayed_stream()
    obj = tmp_path / "events.json"
    obj.write_text(json.dumps({"clock_offset": OFFSET, "sessions": [{"ksid": KS_A, "label": "x"}],
                               "events": records}))
    lst = tmp_path / "list.json"
    lst.write_text(json.dumps(records))
    lines = tmp_path / "KM2.events.jsonl"
    lines.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    got_obj, meta = load_events(obj)
    assert got_obj == records and meta["clock_offset"] == OFFSET and meta["sessions"][0]["label"] == "x"
    assert load_events(lst) == (records, {})
    assert load_events(lines) == (records, {})


@pytest.mark.parametrize("content, message", [
    ("", "is empty"),
    ('{"timestamp": 1, "kind": "x"}\nnot json\n', ":2: not JSON"),
    ('[{"timestamp": 1}]', "event 0 is not an object with 'timestamp' and 'kind'"),
    ('[{"timestamp": "soon", "kind": "x"}]', "timestamp must be a number"),
    ('{"events": {"a": 1}}', "'events' must be a list"),
])
def test_load_rejects_bad_files(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(TimelineError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_events(path)


def test_load_missing_file(tmp_path):
    with pytest.raises(TimelineError, match="cannot read"):
        load_events(tmp_path / "nope.json")


# ------------------------------------------------------------------------------ clocks and sessions


def test_normalise_puts_both_clocks_on_unix_time():
    out = normalise(relayed_stream(), OFFSET)
    assert all(r["timestamp"] > 1e9 for r in out)
    # The shell's authentication (Unix) and the logic's (monotonic) happened at the same instant.
    auth = [r["timestamp"] for r in out if r["kind"] == "authentication" and r["node"] == "KM2"]
    assert auth[0] == pytest.approx(auth[1])
    assert out[0]["timestamp_raw"] == 100.0


def test_normalise_refuses_mixed_clocks_without_offset():
    with pytest.raises(TimelineError, match="--clock-offset"):
        normalise(relayed_stream(), None)


def test_normalise_keeps_a_single_monotonic_clock():
    mono = [r for r in relayed_stream() if r["timestamp"] < 1e9]
    assert [r["timestamp"] for r in normalise(mono, None)] == [r["timestamp"] for r in mono]


def test_attribute_gives_request_arrivals_their_session():
    out = attribute(normalise(relayed_stream(), OFFSET))
    arrivals = [r for r in out if r["kind"] == "request_arrival"]
    assert len(arrivals) == 5
    assert all(r["ksid"] == KS_A for r in arrivals)
    # the destination's GET_KEY is followed by key_returned at the same instant
    assert any(r["node"] == "KM3" and r["details"]["call"] == "GET_KEY" for r in arrivals)


def test_attribute_falls_back_on_the_sae_and_leaves_strangers_alone():
    records = [
        ev("KM1", "state_change", 5.0, KS_B, sae="SAE-KM1"),
        ev("KM1", "request_arrival", 6.0, call="GET_KEY", sae="SAE-KM1", index=0),  # refused: nothing follows
        ev("KM1", "request_arrival", 7.0, call="GET_KEY", sae="SAE-UNKNOWN", index=0),
    ]
    out = attribute(records)
    assert out[1]["ksid"] == KS_B and out[1]["ksid_attributed"]
    assert out[2]["ksid"] is None


def test_first_times_per_node_follow_the_papers_order():
    records = prepare(relayed_stream(), OFFSET)
    order = ["request_arrival", "authentication", "configuration", "key_available", "key_returned"]
    for node in ("KM2", "KM3"):
        times = first_times(records, KS_A, node)
        assert [times[k] for k in order] == sorted(times[k] for k in order), node
    assert "relay_received" in first_times(records, KS_A, "KM3")
    assert set(first_times(records, KS_A, "KM0")) == {"configuration", "relay_forwarded"}


# ------------------------------------------------------------------------------ drawing


def test_render_draws_one_lane_per_key_manager(tmp_path):
    records = prepare(relayed_stream(KS_A) + relayed_stream(KS_B, "KM10", "KM0", "KM4", t=100.005), OFFSET)
    out = tmp_path / "fig.png"
    summary = render(records, out, title="two sessions",
                     sessions=[Session(KS_A, "KM2 → KM0 → KM3"), Session(KS_B, "KM10 → KM0 → KM4")])
    assert summary.lanes == ["KM0", "KM2", "KM3", "KM4", "KM10"]  # natural order
    assert summary.sessions == [KS_A, KS_B]
    # CLOSE arrivals are no part of a key delivery; every other arrival is drawn
    assert summary.points["request_arrival"] == 8
    assert summary.points["relay_forwarded"] == 2 and summary.points["relay_received"] == 2
    assert summary.points["key_returned"] == 4
    assert set(summary.points) <= set(FIG4_KINDS)
    assert summary.span_ms == pytest.approx(36.0, abs=0.01)
    width, height = png_size(out)
    assert width > 1000 and height > 400


def test_render_only_the_selected_sessions(tmp_path):
    records = prepare(relayed_stream(KS_A) + relayed_stream(KS_B, "KM4", "KM0", "KM5"), OFFSET)
    summary = render(records, tmp_path / "one.png", sessions=[Session(KS_B, "b")])
    assert summary.sessions == [KS_B] and summary.lanes == ["KM0", "KM4", "KM5"]


def test_render_without_events_fails(tmp_path):
    with pytest.raises(TimelineError, match="no event to draw"):
        render([ev("KM0", "agent_started", 1.0)], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_render_file_uses_the_documents_offset_and_labels(tmp_path):
    doc = tmp_path / "events.json"
    doc.write_text(json.dumps({"clock_offset": OFFSET, "title": "t",
                               "sessions": [{"ksid": KS_A, "label": "KM2 → KM0 → KM3"}],
                               "events": relayed_stream()}))
    summary = render_file(doc, tmp_path / "f.png")
    assert summary.lanes == ["KM0", "KM2", "KM3"] and summary.sessions == [KS_A]
    with pytest.raises(TimelineError, match="none of the given KSIDs"):
        render_file(doc, tmp_path / "g.png", ksids=[KS_B])


# ------------------------------------------------------------------------------ command


def test_command_merges_agent_logs_with_the_run_dirs_clock_offset(tmp_path, capsys):
    records = relayed_stream()
    files = []
    for node in ("KM0", "KM2", "KM3"):
        path = tmp_path / f"{node}.events.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records if r["node"] == node))
        files.append(str(path))
    out = tmp_path / "fig.png"
    assert main(["timeline", *files, "-o", str(out)]) == 2  # mixed clocks, no offset
    assert "--clock-offset" in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    (run / "up.json").write_text(json.dumps({"clock_offset": OFFSET}))
    assert main(["timeline", *files, "--run-dir", str(run), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "3 key managers, 1 sessions" in printed and "1 relay_forwarded" in printed
    png_size(out)
    assert main(["timeline", *files, "--clock-offset", str(OFFSET), "--ksid", KS_A, "-o", str(out)]) == 0


def test_command_reports_unreadable_input(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    assert main(["timeline", str(bad), "-o", str(tmp_path / "x.png")]) == 2
    assert "event 0" in capsys.readouterr().err
