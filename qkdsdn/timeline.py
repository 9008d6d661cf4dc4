"""The event stream of the key managers as a timeline figure (the paper's Fig. 4).

One horizontal lane per key manager; time on the x axis in milliseconds from the first
request; one marker shape per event kind (request arrival, authentication, configuration,
QKD key available, relay received / forwarded, key returned) and one colour per session,
each session on its own row inside a lane. PNG through matplotlib (Agg, no display needed).

Input: event records as the agents write them (``<state-dir>/<node>.events.jsonl``: one
JSON object per line with ``timestamp``, ``kind``, ``ksid``, ``node``, ``details``...), a
JSON list of such records, or the object ``qkdsdn demo`` writes (``{"events": [...],
"sessions": [...], ...}``).

Two properties of the agents' stream are handled here:

* Clocks. Agents stamp every event in Unix time. Logs of earlier agents stamped the events
  decided by the key-manager logic with the monotonic clock (seconds since boot): ``normalise``
  converts such stamps (< 1e9, i.e. before 2001 as Unix time) with the host's
  ``time.time() - time.monotonic()`` offset, which ``qkdsdn up`` records in its state file
  and ``qkdsdn demo`` in its output.
* ``request_arrival`` of a call that names no KSID (the first OPEN_CONNECT or enc_keys of a
  session) has none. ``attribute`` gives it the KSID of the next event of the same node
  decided at the same instant (the session's state change), or else the KSID of the session
  the calling application (SAE) has at that node.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

MONOTONIC_LIMIT = 1e9  # a Unix timestamp below this predates September 2001

# Event kinds drawn, in legend order: kind -> (label, matplotlib marker).
# Marker areas (points^2): events of one instant overlap, so larger markers are drawn below
# smaller ones and every kind stays visible (e.g. key available inside key returned).
MARKER_SIZE = {"key_returned": 280, "key_available": 130, "authentication": 95, "configuration": 80,
               "relay_forwarded": 70, "relay_received": 45, "request_arrival": 45}
FIG4_KINDS: dict[str, tuple[str, str]] = {
    "request_arrival": ("request arrival", "v"),
    "authentication": ("authentication", "s"),
    "configuration": ("configuration", "D"),
    "key_available": ("QKD key available", "o"),
    "relay_received": ("relay received", "^"),
    "relay_forwarded": ("relay forwarded", ">"),
    "key_returned": ("key returned", "*"),
}
# request_arrival of these calls is not part of a key delivery (Fig. 4 ends with the key).
SKIPPED_CALLS = frozenset({"CLOSE"})


class TimelineError(ValueError):
    """An event file that cannot be read or holds nothing to draw."""


@dataclass
class Session:
    """What the figure says about a session: its label (e.g. "KM2 → KM3")."""

    ksid: str
    label: str


@dataclass
class TimelineSummary:
    """What was drawn (so callers and tests can check the figure without looking at it)."""

    path: Path
    lanes: list[str]
    sessions: list[str]
    points: dict[str, int] = field(default_factory=dict)  # kind -> markers drawn
    span_ms: float = 0.0


# =============================================================================================
# loading


def load_events(path: str | Path) -> tuple[list[dict], dict]:
    """Records and metadata (``clock_offset``, ``sessions``...) from a file of any accepted form."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise TimelineError(f"cannot read {p}: {exc.strerror or exc}") from None
    stripped = text.lstrip()
    meta: dict[str, Any] = {}
    if not stripped:
        raise TimelineError(f"{p} is empty")
    records: Any
    try:
        data = json.loads(stripped)
    except ValueError:
        data = None
    if isinstance(data, dict) and "events" in data:
        records = data["events"]
        meta = {k: v for k, v in data.items() if k != "events"}
    elif isinstance(data, list):
        records = data
    elif isinstance(data, dict):
        records = [data]  # a JSON-lines file of one line
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError:
                raise TimelineError(f"{p}:{number}: not JSON") from None
    if not isinstance(records, list):
        raise TimelineError(f"{p}: 'events' must be a list")
    out = []
    for i, r in enumerate(records):
        if not isinstance(r, dict) or "kind" not in r or "timestamp" not in r:
            raise TimelineError(f"{p}: event {i} is not an object with 'timestamp' and 'kind'")
        if not isinstance(r["timestamp"], (int, float)) or isinstance(r["timestamp"], bool):
            raise TimelineError(f"{p}: event {i}: timestamp must be a number")
        out.append(r)
    return out, meta


# =============================================================================================
# preparing the stream


def clocks(records: Iterable[dict]) -> set[str]:
    """Which clocks the stream uses: "monotonic", "unix" or both."""
    return {"monotonic" if r["timestamp"] < MONOTONIC_LIMIT else "unix" for r in records}


def normalise(records: Iterable[dict], clock_offset: float | None) -> list[dict]:
    """Copies of the records with ``timestamp`` in Unix seconds (monotonic stamps + offset) and
    the original in ``timestamp_raw``. Without an offset the stream must use one clock."""
    records = list(records)
    if "monotonic" in clocks(records) and clock_offset is None:
        if clocks(records) == {"monotonic"}:
            return [dict(r, timestamp_raw=r["timestamp"]) for r in records]
        raise TimelineError("the stream mixes monotonic and Unix timestamps and no clock offset is known: "
                            "pass --clock-offset (time.time() - time.monotonic() on the agents' host; "
                            "'qkdsdn up' records it as clock_offset in RUN_DIR/up.json)")
    out = []
    for r in records:
        ts = r["timestamp"]
        out.append(dict(r, timestamp=ts + clock_offset if ts < MONOTONIC_LIMIT else ts, timestamp_raw=ts))
    return out


def attribute(records: Sequence[dict]) -> list[dict]:
    """Copies of the records in which every ``request_arrival`` without KSID gets the KSID of
    its session when it can be told (see the module doc); the others keep None."""
    out = [dict(r) for r in records]
    by_node: dict[str, list[int]] = {}
    for i, r in enumerate(out):
        by_node.setdefault(str(r.get("node")), []).append(i)
    for indices in by_node.values():
        # the session an SAE has at this node, learned from the events that name both
        sae_sessions: dict[str, list[tuple[float, str]]] = {}
        for i in indices:
            r = out[i]
            sae = (r.get("details") or {}).get("sae")
            if r.get("ksid") and sae:
                sae_sessions.setdefault(sae, []).append((r["timestamp"], r["ksid"]))
        for pos, i in enumerate(indices):
            r = out[i]
            if r.get("kind") != "request_arrival" or r.get("ksid"):
                continue
            raw = r.get("timestamp_raw", r["timestamp"])
            ksid = None
            for j in indices[pos + 1:]:
                nxt = out[j]
                if nxt.get("timestamp_raw", nxt["timestamp"]) != raw:
                    break
                if nxt.get("ksid"):
                    ksid = nxt["ksid"]
                    break
            if ksid is None:
                sae = (r.get("details") or {}).get("sae")
                known = sorted(sae_sessions.get(sae, []))
                candidates = {k for _, k in known}
                if len(candidates) == 1:
                    ksid = known[0][1]
                elif known:
                    # the session of that SAE whose events come closest after the arrival
                    after = [k for t, k in known if t >= r["timestamp"]]
                    ksid = after[0] if after else known[-1][1]
            if ksid is not None:
                r["ksid"] = ksid
                r["ksid_attributed"] = True
    return out


def prepare(records: Iterable[dict], clock_offset: float | None = None) -> list[dict]:
    """normalise + attribute, sorted by time."""
    return sorted(attribute(normalise(records, clock_offset)), key=lambda r: r["timestamp"])


def first_times(records: Iterable[dict], ksid: str, node: str, kinds: Iterable[str] = FIG4_KINDS) -> dict[str, float]:
    """Time of the first event of each kind of one session at one node."""
    wanted = set(kinds)
    out: dict[str, float] = {}
    for r in sorted(records, key=lambda r: r["timestamp"]):
        if r.get("ksid") == ksid and r.get("node") == node and r["kind"] in wanted and r["kind"] not in out:
            out[r["kind"]] = r["timestamp"]
    return out


def _drawn(r: dict, kinds: dict) -> bool:
    if r["kind"] not in kinds or not r.get("node"):
        return False
    if r["kind"] == "request_arrival" and (r.get("details") or {}).get("call") in SKIPPED_CALLS:
        return False
    return True


def _natural(name: str) -> tuple:
    import re

    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


# =============================================================================================
# drawing


def render(records: Sequence[dict], out: str | Path, *, title: str | None = None,
           sessions: Sequence[Session] | None = None, kinds: dict[str, tuple[str, str]] = FIG4_KINDS,
           lanes: Sequence[str] | None = None, dpi: int = 150) -> TimelineSummary:
    """Draw prepared records (``prepare``) into a PNG. ``sessions``: which sessions to draw and
    their labels (default: every KSID in the stream). ``lanes``: key managers top to bottom
    (default: every node with a drawn event, in natural order)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    if sessions is None:
        ksids = sorted({r["ksid"] for r in records if r.get("ksid") and _drawn(r, kinds)})
        sessions = [Session(k, k[:8]) for k in ksids]
    wanted = {s.ksid: s for s in sessions}
    points = [r for r in records if _drawn(r, kinds) and r.get("ksid") in wanted]
    if not points:
        raise TimelineError("no event to draw (no key-manager event of the selected sessions and kinds)")
    if lanes is None:
        lanes = sorted({r["node"] for r in points}, key=_natural)
    lanes = list(lanes)
    arrivals = [r["timestamp"] for r in points if r["kind"] == "request_arrival"]
    t0 = min(arrivals) if arrivals else min(r["timestamp"] for r in points)
    span_ms = (max(r["timestamp"] for r in points) - t0) * 1000.0

    # rows: per lane, one row per session seen at that key manager
    lane_sessions: dict[str, list[str]] = {lane: [] for lane in lanes}
    order = [s.ksid for s in sessions]
    for r in points:
        if r["node"] in lane_sessions and r["ksid"] not in lane_sessions[r["node"]]:
            lane_sessions[r["node"]].append(r["ksid"])
    for lane in lanes:
        lane_sessions[lane].sort(key=order.index)

    cmap = plt.get_cmap("tab10")
    colours = {s.ksid: cmap(i % 10) for i, s in enumerate(sessions)}
    height = 1.0 + 0.62 * len(lanes) + 0.16 * sum(len(v) for v in lane_sessions.values())
    fig, ax = plt.subplots(figsize=(11, max(3.2, height)))
    y_of: dict[tuple[str, str], float] = {}
    ticks = []
    for li, lane in enumerate(lanes):
        base = len(lanes) - 1 - li
        ticks.append(base)
        rows = lane_sessions[lane]
        ax.axhline(base, color="0.85", linewidth=0.8, zorder=0)
        for ri, ksid in enumerate(rows):
            offset = 0.0 if len(rows) == 1 else (ri - (len(rows) - 1) / 2) * min(0.28, 0.7 / len(rows))
            y_of[(lane, ksid)] = base + offset
    counts: dict[str, int] = {}
    for (lane, ksid), y in y_of.items():
        xs = [(r["timestamp"] - t0) * 1000.0 for r in points if r["node"] == lane and r["ksid"] == ksid]
        ax.plot([min(xs), max(xs)], [y, y], color=colours[ksid], linewidth=1.6, alpha=0.55, zorder=1)
    for kind, (label, marker) in kinds.items():
        for ksid in wanted:
            sel = [r for r in points if r["kind"] == kind and r["ksid"] == ksid and (r["node"], ksid) in y_of]
            if not sel:
                continue
            xs = [(r["timestamp"] - t0) * 1000.0 for r in sel]
            ys = [y_of[(r["node"], ksid)] for r in sel]
            size = MARKER_SIZE.get(kind, 60)
            ax.scatter(xs, ys, marker=marker, s=size, color=colours[ksid], edgecolors="black", linewidths=0.6,
                       zorder=3 + 1000.0 / size)
            counts[kind] = counts.get(kind, 0) + len(sel)
    ax.set_yticks(ticks)
    ax.set_yticklabels(lanes)
    ax.set_ylim(-0.7, len(lanes) - 0.3)
    ax.set_xlabel("time since the first request (ms)")
    ax.set_ylabel("key manager")
    ax.grid(axis="x", color="0.9", linewidth=0.6)
    ax.set_axisbelow(True)
    ax.set_title(title or "key-manager events")
    kind_handles = [Line2D([], [], linestyle="none", marker=marker, markersize=11 if marker == "*" else 7,
                           markerfacecolor="white", markeredgecolor="black", label=label)
                    for kind, (label, marker) in kinds.items() if counts.get(kind)]
    session_handles = [Line2D([], [], color=colours[s.ksid], linewidth=3, label=s.label) for s in sessions
                       if any(k == s.ksid for _, k in y_of)]
    first = ax.legend(handles=kind_handles, title="event", loc="upper left", bbox_to_anchor=(1.01, 1.0),
                      fontsize=8, title_fontsize=9, frameon=False)
    ax.add_artist(first)
    ax.legend(handles=session_handles, title="session", loc="lower left", bbox_to_anchor=(1.01, 0.0),
              fontsize=8, title_fontsize=9, frameon=False)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return TimelineSummary(path=out, lanes=lanes, sessions=[s.ksid for s in sessions if any(
        k == s.ksid for _, k in y_of)], points=counts, span_ms=span_ms)


def render_file(events: str | Path, out: str | Path, *, clock_offset: float | None = None,
                title: str | None = None, ksids: Sequence[str] | None = None) -> TimelineSummary:
    """Load an event file (any accepted form), prepare it and draw it."""
    records, meta = load_events(events)
    offset = clock_offset if clock_offset is not None else meta.get("clock_offset")
    prepared = prepare(records, offset)
    sessions = None
    if meta.get("sessions"):
        sessions = [Session(s["ksid"], s.get("label") or s["ksid"][:8]) for s in meta["sessions"]
                    if isinstance(s, dict) and s.get("ksid")]
    if ksids:
        wanted = {k.lower() for k in ksids}
        base = sessions or [Session(k, k[:8]) for k in sorted({r["ksid"] for r in prepared if r.get("ksid")})]
        sessions = [s for s in base if s.ksid.lower() in wanted]
        if not sessions:
            raise TimelineError("none of the given KSIDs is in the stream")
    return render(prepared, out, title=title or meta.get("title"), sessions=sessions)
