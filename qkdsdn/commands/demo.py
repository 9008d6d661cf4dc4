"""`qkdsdn demo`: the paper's proof of concept, end to end, as separate processes."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qkdsdn.commands.common import int_at_least

HELP = "reproduce the paper's proof of concept: parallel ETSI 004 key requests, event timeline (Fig. 4)"

DESCRIPTION = """\
Reproduce the proof of concept of the paper on examples/paper-poc.yaml: start
the network as 'qkdsdn up' does (broker, controller, one agent per node,
digital twin; each its own process, mutual TLS), then let applications on
KM0..KM5 ask for keys in parallel over ETSI GS QKD 004 — OPEN_CONNECT at both
ends, GET_KEY, CLOSE — between KM0-KM1 and KM4-KM5 (adjacent: the key comes
from the shared link pool) and KM2-KM3 (not adjacent: relayed through KM0).

It prints, per pair, the time of each event at each key manager of the route
(request arrival, authentication, configuration, QKD key available, relay
received or forwarded, key returned; milliseconds from the first request),
checks that both applications of a pair got identical keys, writes the
event stream (events.json) and its timeline figure (timeline.png, one lane per
key manager, as the paper's Fig. 4), and stops every process it started.
Exit status 0 when every pair got identical keys, 1 otherwise.

Without --no-controller the controller's admission control configures the
routes over the bus; with it, the agents' local control plane does.
"""

EPILOG = """\
examples:
  qkdsdn demo
  qkdsdn demo --keys 5 --out results/
  qkdsdn demo --no-controller
  qkdsdn demo examples/linear-5.yaml --pair SAE-N0:SAE-N5 --pair SAE-N2:SAE-N5
"""

PAPER_PAIRS = (("SAE-KM0", "SAE-KM1"), ("SAE-KM4", "SAE-KM5"), ("SAE-KM2", "SAE-KM3"))
STAGES = ("request_arrival", "authentication", "configuration", "key_available", "relay_received",
          "relay_forwarded", "key_returned")
STAGE_TITLES = ("request", "auth", "config", "key avail.", "relay recv.", "relay fwd.", "key returned")


def _pair(text: str) -> tuple[str, str]:
    src, sep, dst = text.partition(":")
    if not sep or not src or not dst or src == dst:
        raise argparse.ArgumentTypeError(f"expected SOURCE_SAE:DESTINATION_SAE, got {text!r}")
    return src, dst


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help=HELP, description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("network", nargs="?", metavar="NETWORK.yaml",
                   help="network file (default: examples/paper-poc.yaml)")
    p.add_argument("--pair", action="append", type=_pair, metavar="SRC:DST",
                   help="source and destination application (SAE IDs) of a key stream; repeatable "
                        "(default: the paper's pairs SAE-KM0:SAE-KM1, SAE-KM4:SAE-KM5, SAE-KM2:SAE-KM3)")
    p.add_argument("--keys", type=int_at_least(1), default=1, metavar="N", help="keys per pair (default 1)")
    p.add_argument("--key-bits", type=int, default=256, choices=(128, 256, 512, 1024), help="key size (default 256)")
    p.add_argument("--out", metavar="DIR", help="where events.json and timeline.png go (default: the run directory)")
    p.add_argument("--run-dir", metavar="DIR", help="run directory (default: ./run/demo-NETWORK_NAME)")
    p.add_argument("--no-controller", action="store_true",
                   help="no controller and broker: the agents' local control plane admits the sessions")
    p.add_argument("--db", metavar="URL", help="the controller's database (default: SQLite in the run directory)")
    p.add_argument("--bus", metavar="URL", help="an external MQTT broker (default: the embedded broker)")
    sec = p.add_mutually_exclusive_group()
    sec.add_argument("--pki", metavar="DIR", help="certificates (default: issued into RUN_DIR/pki)")
    sec.add_argument("--insecure-dev", action="store_true", help="plain HTTP on loopback (development only)")
    p.add_argument("--free-ports", action="store_true",
                   help="move every listener to a free loopback port (default: only if a port of the file is busy)")
    p.add_argument("--timeout", type=float, default=20.0, metavar="S",
                   help="ETSI 004 Timeout of the calls, and how long to wait for key pools (default 20)")
    p.set_defaults(func=cmd_demo)


def default_network() -> Path | None:
    here = Path(__file__).resolve().parents[2] / "examples" / "paper-poc.yaml"
    for candidate in (Path("examples") / "paper-poc.yaml", here):
        if candidate.is_file():
            return candidate
    return None


# =============================================================================================


class PairResult:
    def __init__(self, source: str, destination: str, ksid: str):
        self.source, self.destination, self.ksid = source, destination, ksid
        self.open_status: tuple[int | None, int | None] = (None, None)
        self.keys: list[tuple[int, int, bool]] = []  # (source status, destination status, identical)
        self.close_status: tuple[int | None, int | None] = (None, None)
        self.error: str | None = None

    @property
    def ok(self) -> bool:
        return (self.error is None and self.open_status == (0, 0) and bool(self.keys)
                and all(s == 0 and d == 0 and same for s, d, same in self.keys))


def _clients(network, state: dict):
    """A KeyManagerClient factory per SAE: its certificate (TLS) or the development header."""
    from agents.client import KeyManagerClient
    from qkdsdn.pki import PkiLayout

    apps = {a.sae_id: a for a in network.applications}

    def make(sae: str) -> KeyManagerClient:
        node = network.node(apps[sae].node)
        host = f"[{node.km_host}]" if ":" in node.km_host else node.km_host
        if state.get("tls"):
            layout = PkiLayout(state["pki"])
            cert, key = layout.app(sae)
            return KeyManagerClient(f"https://{host}:{node.km_port}", cert=(str(cert), str(key)),
                                    ca=str(layout.ca_cert))
        return KeyManagerClient(f"http://{host}:{node.km_port}", dev_sae_id=sae)

    return make


def _both(fn_a, fn_b):
    """Run two calls at the same time (the two applications of a pair); results or exceptions."""
    import threading

    out: list = [None, None]

    def run(i, fn):
        try:
            out[i] = fn()
        except Exception as exc:  # noqa: BLE001 — reported per pair
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i, fn), daemon=True) for i, fn in enumerate((fn_a, fn_b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def run_pair(result: PairResult, make_client, *, keys: int, key_bits: int, timeout_s: float, advance) -> None:
    """One application pair: OPEN_CONNECT at both ends, ``keys`` GET_KEY at both ends, CLOSE."""
    from agents.client import ETSI004Error, QoS

    src, dst = make_client(result.source), make_client(result.destination)
    qos = QoS(Key_chunk_size=key_bits // 8, Max_bps=8000, Min_bps=0, Jitter=1000, Priority=0,
              Timeout=int(timeout_s * 1000), TTL=60)
    try:
        a, b = _both(lambda: src.open_connect(result.source, result.destination, qos, key_stream_id=result.ksid),
                     lambda: dst.open_connect(result.source, result.destination, qos, key_stream_id=result.ksid))
        for r in (a, b):
            if isinstance(r, Exception):
                raise r
        result.open_status = (a.status, b.status)
        advance("open")
        if result.open_status != (0, 0):
            result.error = f"OPEN_CONNECT status {a.status} / {b.status}: {a.message or b.message}"
            return
        for index in range(keys):
            ka, kb = _both(lambda: src.get_key(result.ksid, index=index, metadata_size=1024),
                           lambda: dst.get_key(result.ksid, index=index, metadata_size=1024))
            for r in (ka, kb):
                if isinstance(r, Exception):
                    raise r
            same = ka.status == 0 and kb.status == 0 and ka.key is not None and ka.key == kb.key
            result.keys.append((ka.status, kb.status, same))
            advance(f"key {index}")
            if ka.status != 0 or kb.status != 0:
                result.error = f"GET_KEY {index}: status {ka.status} / {kb.status}: {ka.message or kb.message}"
                return
        ca, cb = _both(lambda: src.close(result.ksid), lambda: dst.close(result.ksid))
        result.close_status = (None if isinstance(ca, Exception) else ca, None if isinstance(cb, Exception) else cb)
        advance("close")
    except (ETSI004Error, OSError) as exc:
        result.error = str(exc)
    except Exception as exc:  # noqa: BLE001 — requests errors and the like: reported per pair
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        src.close_session()
        dst.close_session()


def wait_for_pools(run, network, *, bits: int, timeout_s: float, stop) -> bool:
    """Until every link end holds ``bits`` of link key (the devices have started delivering)."""
    import time

    from qkdsdn.commands.up import pool_levels

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not stop.is_set():
        ready = True
        for link in network.links:
            if link.device is None and link.kme is None:
                continue
            for node in link.ends:
                levels = pool_levels(run.run_dir.agent_state(node), node) or {}
                if sum(levels.get(link.qkdl_id, {}).values()) < bits:
                    ready = False
        if ready:
            return True
        stop.wait(0.1)
    return False


def collect_events(run_dir, network, ksids: set[str], clock_offset: float | None) -> list[dict]:
    """The demo's sessions' events from every agent's event log, prepared (see qkdsdn.timeline)."""
    import json

    from qkdsdn.timeline import prepare

    raw: list[dict] = []
    for node in network.nodes:
        path = run_dir.agent_state(node.name) / f"{node.name}.events.jsonl"
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                record.setdefault("node", node.name)
                raw.append(record)
    return [r for r in prepare(raw, clock_offset) if r.get("ksid") in ksids]


def route_of(events: list[dict], ksid: str) -> list[str]:
    """The key managers of a session in path order, from their configuration events."""
    hops = {}
    for r in events:
        if r.get("ksid") == ksid and r["kind"] == "configuration":
            d = r.get("details") or {}
            hops[r["node"]] = (d.get("prev_hop"), d.get("next_hop"))
    from qkdsdn.commands.up import _route

    return _route(hops)


def cmd_demo(args: argparse.Namespace) -> int:
    import atexit
    import json
    import threading
    import time
    import uuid

    from qkdsdn.cli import CommandError
    from qkdsdn.commands.common import load_network
    from qkdsdn.commands.up import StartDisplay, install_stop_handlers, restore_handlers
    from qkdsdn.console import make_console
    from qkdsdn.launch import (AlreadyRunning, LaunchError, NetworkRun, UpOptions, controller_available,
                               listener_conflicts)
    from qkdsdn.timeline import Session, TimelineError, render

    t_start = time.monotonic()
    console = make_console()
    path = Path(args.network) if args.network else default_network()
    if path is None:
        raise CommandError("examples/paper-poc.yaml not found: give the network file")
    network = load_network(str(path))
    apps = {a.sae_id: a for a in network.applications}
    pairs = args.pair or [p for p in PAPER_PAIRS if p[0] in apps and p[1] in apps]
    if not pairs:
        raise CommandError(f"network {network.name} has not the paper's applications: give --pair SRC:DST")
    for src, dst in pairs:
        for sae in (src, dst):
            if sae not in apps:
                raise CommandError(f"no application {sae} in {path} (applications: {', '.join(sorted(apps))})")
    if args.no_controller and (args.db or args.bus):
        raise CommandError("--db and --bus configure the controller; --no-controller has neither")
    if not args.no_controller and not controller_available():
        raise CommandError("'qkdsdn controller' is not available in this installation: run the demo "
                               "with --no-controller (agents' local control plane)")
    run_dir = Path(args.run_dir or Path("run") / f"demo-{network.name}").absolute()
    out_dir = Path(args.out).absolute() if args.out else run_dir
    opts = UpOptions(network_file=path.absolute(), run_dir=run_dir,
                     pki=Path(args.pki).absolute() if args.pki else None, insecure_dev=args.insecure_dev,
                     controller=not args.no_controller, bus=args.bus, db=args.db, log_level="WARNING")
    from qkdsdn.launch import RunDir

    rd = RunDir(run_dir)
    if rd.running_state() is not None:
        raise CommandError(f"a demo already runs in {run_dir} (stop it with 'qkdsdn down --run-dir {run_dir}')")
    _fresh_run_dir(run_dir)
    moved = args.free_ports or bool(listener_conflicts(network, opts))
    if moved and not args.free_ports:
        console.print(f"some ports of {path} are in use: every listener moves to a free loopback port "
                      f"({run_dir / 'network.yaml'})")
    interactive = sys.stdout.isatty()
    stop = threading.Event()
    previous = install_stop_handlers(stop)
    run = None
    results: list[PairResult] = []
    try:
        console.print(f"[bold]qkdsdn demo[/]: network {network.name} ({len(network.nodes)} key managers, "
                      f"{len(network.links)} links), {'controller + bus' if opts.controller else 'local control plane'}, "
                      f"{'mutual TLS' if not opts.insecure_dev else 'plain HTTP'}; run directory {run_dir}")
        with StartDisplay(console, interactive) as display:
            run = NetworkRun(opts, free_ports=moved, on_progress=display, stop_event=stop)
            atexit.register(run.stop)
            try:
                run.start()
            except AlreadyRunning as exc:
                raise CommandError(str(exc)) from None
            except LaunchError as exc:
                if stop.is_set():
                    return 130
                raise CommandError(str(exc)) from None
        t_ready = time.monotonic()
        network = run.network  # the file actually started (ports may have moved)
        state = run.state()
        console.print(f"network up in {t_ready - t_start:.1f} s ({len(run.processes)} processes); waiting for "
                      "link-key pools")
        if not wait_for_pools(run, network, bits=4 * (args.key_bits + 512), timeout_s=args.timeout, stop=stop):
            if stop.is_set():
                return 130
            console.print("[yellow]some link-key pools are still empty; requests wait for key material[/]")
        t_pools = time.monotonic()
        results = [PairResult(src, dst, str(uuid.uuid4())) for src, dst in pairs]
        make_client = _clients(network, state)
        label = {r.ksid: f"{apps[r.source].node} → {apps[r.destination].node}" for r in results}
        _run_pairs(results, make_client, args, console, interactive, label, stop)
        t_done = time.monotonic()
        if stop.is_set():
            return 130
    finally:
        if run is not None:
            console.print("stopping the network")
            t_stop = time.monotonic()
            run.stop()
            t_stopped = time.monotonic()
        restore_handlers(previous)

    ksids = {r.ksid for r in results}
    events = collect_events(run.run_dir, network, ksids, state.get("clock_offset"))
    arrivals = [e["timestamp"] for e in events if e["kind"] == "request_arrival"]
    t0 = min(arrivals) if arrivals else (min(e["timestamp"] for e in events) if events else 0.0)
    sessions = []
    for r in results:
        route = route_of(events, r.ksid) or [apps[r.source].node, apps[r.destination].node]
        sessions.append({"ksid": r.ksid, "label": " → ".join(route), "source": r.source,
                         "destination": r.destination, "route": route, "ok": r.ok})
        _print_pair(r, route, events, t0)
    out_dir.mkdir(parents=True, exist_ok=True)
    events_path = out_dir / "events.json"
    document = {"network": network.name, "title": f"{network.name}: key-manager events (qkdsdn demo)",
                "clock_offset": state.get("clock_offset"), "t0": t0, "sessions": sessions, "events": events}
    events_path.write_text(json.dumps(document, indent=1, default=str))
    figure = out_dir / "timeline.png"
    try:
        summary = render(events, figure, title=document["title"],
                         sessions=[Session(s["ksid"], s["label"]) for s in sessions])
        console.print(f"wrote {events_path} ({len(events)} events) and {figure} "
                      f"({len(summary.lanes)} key managers, {summary.span_ms:.0f} ms)")
    except TimelineError as exc:
        console.print(f"[red]no figure: {exc}[/]")
    ok = all(r.ok for r in results)
    verdict = "[green]every pair got identical keys[/]" if ok else "[red]some pairs failed[/]"
    console.print(f"{verdict}. Wall time {time.monotonic() - t_start:.1f} s: network up {t_ready - t_start:.1f} s, "
                  f"link-key pools {t_pools - t_ready:.1f} s, key requests {t_done - t_pools:.2f} s, "
                  f"stop {t_stopped - t_stop:.1f} s; logs in {run_dir / 'logs'}")
    return 0 if ok else 1


def _fresh_run_dir(run_dir: Path) -> None:
    """A demo starts from empty key stores and event logs (the PKI is kept and completed)."""
    import shutil

    for sub in ("state", "logs"):
        shutil.rmtree(run_dir / sub, ignore_errors=True)
    for name in ("network.yaml", "qkdsdn.db", "events.json", "timeline.png"):
        (run_dir / name).unlink(missing_ok=True)


def _run_pairs(results, make_client, args, console, interactive: bool, label: dict, stop) -> None:
    import threading

    steps = 2 + args.keys
    threads = []
    if interactive:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=console)
    else:
        progress = None
    try:
        if progress is not None:
            progress.start()
        for r in results:
            name = f"{r.source} ⇄ {r.destination} ({label[r.ksid]})"
            if progress is not None:
                task = progress.add_task(name, total=steps)

                def advance(what, task=task, name=name):
                    progress.update(task, advance=1, description=f"{name}: {what} done")
            else:
                def advance(what, name=name):
                    console.print(f"{name}: {what} done")
            t = threading.Thread(target=run_pair, args=(r, make_client),
                                 kwargs={"keys": args.keys, "key_bits": args.key_bits, "timeout_s": args.timeout,
                                         "advance": advance}, daemon=True, name=f"pair-{r.source}")
            t.start()
            threads.append(t)
        for t in threads:
            while t.is_alive() and not stop.is_set():
                t.join(0.1)
    finally:
        if progress is not None:
            progress.stop()


def _print_pair(r: PairResult, route: list[str], events: list[dict], t0: float) -> None:
    from qkdsdn.console import print_table
    from qkdsdn.timeline import first_times

    rows = []
    for node in route:
        times = first_times(events, r.ksid, node, STAGES)
        rows.append([node] + [None if k not in times else f"{(times[k] - t0) * 1000:.1f}" for k in STAGES])
    if r.ok:
        verdict = f"identical keys at both ends ({len(r.keys)} of {len(r.keys)})"
    else:
        verdict = f"FAILED: {r.error or 'keys differ'}"
    print(f"\n{r.source} ⇄ {r.destination}: route {' → '.join(route)}, KSID {r.ksid}, {verdict}")
    print_table("event times, ms from the first request", ["key manager", *STAGE_TITLES], rows,
                right=STAGE_TITLES)
    sys.stdout.flush()
