"""`qkdsdn timeline`: draw a recorded event stream as the paper's Fig. 4."""
from __future__ import annotations

import argparse

HELP = "draw a recorded key-manager event stream as a timeline PNG (the paper's Fig. 4)"

DESCRIPTION = """\
Draw the events of the key managers as a timeline: one lane per key manager,
time in milliseconds from the first request, a marker per event (request
arrival, authentication, configuration, QKD key available, relay received,
relay forwarded, key returned) and a colour per session.

EVENTS is what 'qkdsdn demo' writes (events.json), a JSON list of event
records, or an agent's own log (RUN_DIR/state/NODE/NODE.events.jsonl, one JSON
record per line); give several files to merge the logs of several agents.
Agents stamp events in Unix time. Logs of earlier agents have some events on
their monotonic clock: for those give --clock-offset, or --run-dir to read it
from the 'qkdsdn up' state file.
"""

EPILOG = """\
examples:
  qkdsdn timeline run/demo-paper-poc/events.json -o fig4.png
  qkdsdn timeline run/paper-poc/state/*/*.events.jsonl --run-dir run/paper-poc -o all.png
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("timeline", help=HELP, description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("events", nargs="+", metavar="EVENTS", help="event file(s): JSON, JSON list or JSON lines")
    p.add_argument("-o", "--output", metavar="FILE.png", required=True, help="the image to write")
    p.add_argument("--ksid", action="append", metavar="KSID", help="draw only this session (repeatable)")
    p.add_argument("--title", help="figure title")
    offset = p.add_mutually_exclusive_group()
    offset.add_argument("--clock-offset", type=float, metavar="S",
                        help="time.time() - time.monotonic() of the agents' host, for monotonic stamps")
    offset.add_argument("--run-dir", metavar="DIR", help="take the clock offset from DIR/up.json ('qkdsdn up')")
    p.set_defaults(func=cmd_timeline)


def cmd_timeline(args: argparse.Namespace) -> int:
    import json
    import tempfile
    from pathlib import Path

    from qkdsdn.cli import CommandError
    from qkdsdn.timeline import TimelineError, load_events, render_file

    offset = args.clock_offset
    if args.run_dir:
        from qkdsdn.launch import LaunchError, RunDir

        try:
            state = RunDir(args.run_dir).read_state()
        except LaunchError as exc:
            raise CommandError(str(exc)) from None
        if not state or state.get("clock_offset") is None:
            raise CommandError(f"{args.run_dir} has no up.json with a clock offset")
        offset = float(state["clock_offset"])
    try:
        if len(args.events) == 1:
            summary = render_file(args.events[0], args.output, clock_offset=offset, title=args.title,
                                  ksids=args.ksid)
        else:
            merged: list[dict] = []
            meta: dict = {}
            for path in args.events:
                records, m = load_events(path)
                merged += records
                meta = meta or m
            with tempfile.TemporaryDirectory() as tmp:
                combined = Path(tmp) / "events.json"
                combined.write_text(json.dumps(dict(meta, events=merged)))
                summary = render_file(combined, args.output, clock_offset=offset, title=args.title,
                                      ksids=args.ksid)
    except TimelineError as exc:
        raise CommandError(str(exc)) from None
    except OSError as exc:
        raise CommandError(f"cannot write {args.output}: {exc.strerror or exc}") from None
    drawn = ", ".join(f"{n} {k}" for k, n in summary.points.items())
    print(f"wrote {summary.path}: {len(summary.lanes)} key managers, {len(summary.sessions)} sessions, "
          f"{summary.span_ms:.0f} ms; {drawn}")
    return 0
