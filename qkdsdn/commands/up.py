"""`qkdsdn up`, `qkdsdn down`, `qkdsdn status`: a whole network as separate processes."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

UP_HELP = "start a whole network: broker, controller, one agent per node, digital twin (one process each)"
DOWN_HELP = "stop a network started by 'qkdsdn up'"
STATUS_HELP = "show a running network: processes, nodes, links (SKR, QBER, key pools), sessions"

UP_DESCRIPTION = """\
Start every element of a network as its own process, as the containers of the
paper's proof of concept, and keep them running until Ctrl-C or 'qkdsdn down':

  broker      the MQTT bus (python -m qkdsdn.bus broker on a free loopback
              port), unless --bus names an external broker such as Mosquitto
  twin        the digital twin: every emulated link's ETSI 014 KMEs
  controller  'qkdsdn controller': SDN controller, access and admission
              control, routing and monitoring, on the database of --db
  agent-NODE  'qkdsdn agent' for each node: its key manager and SDN agent

Each start is checked before the next group starts (the broker's "listening"
line, the twin's admin API and KME ports, an HTTPS GET of every agent's
RESTCONF root with the operator certificate), every process logs to
RUN_DIR/logs/NAME.log, and RUN_DIR/up.json records the processes so that
'qkdsdn status' and 'qkdsdn down' find them. A second 'up' of a running
network says so and starts nothing.

TLS is on by default: without --pki, 'up' issues the network's certificates
into RUN_DIR/pki (as 'qkdsdn pki init' does). --insecure-dev runs everything on
plain HTTP on loopback instead.

--no-controller runs the network without controller and broker: every agent
uses its built-in local control plane (each agent reads the network file; the
key manager of a session's source application admits it and configures the
route over the agents' RESTCONF). Limits of that mode: SLA session counts are
per admitting agent and no link bandwidth is reserved network-wide.
"""

UP_EPILOG = """\
examples:
  qkdsdn up examples/paper-poc.yaml
  qkdsdn up examples/paper-poc.yaml --db postgresql+psycopg://qkdsdn@127.0.0.1/qkdsdn --bus mqtt://127.0.0.1:1883
  qkdsdn up examples/linear-5.yaml --no-controller --free-ports
  qkdsdn status examples/paper-poc.yaml
  qkdsdn down examples/paper-poc.yaml
"""

LOCATE_HELP = ("the network file (its run directory is ./run/NAME), or --run-dir; without either, the only "
               "run directory under ./run with a running network")


def register(sub: argparse._SubParsersAction) -> None:
    up = sub.add_parser("up", help=UP_HELP, description=UP_DESCRIPTION, epilog=UP_EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    up.add_argument("network", metavar="NETWORK.yaml", help="network file")
    up.add_argument("--run-dir", metavar="DIR", help="logs, state file, certificates, agent state "
                                                     "(default: ./run/NETWORK_NAME)")
    sec = up.add_mutually_exclusive_group()
    sec.add_argument("--pki", metavar="DIR", help="certificates from 'qkdsdn pki init' (default: issue them "
                                                  "into RUN_DIR/pki)")
    sec.add_argument("--insecure-dev", action="store_true",
                     help="development only: plain HTTP on loopback, no certificates")
    up.add_argument("--no-controller", action="store_true",
                    help="no controller and no broker: agents use their local control plane")
    up.add_argument("--db", metavar="URL", help="the controller's SQLAlchemy database URL, e.g. "
                                                "postgresql+psycopg://qkdsdn@127.0.0.1/qkdsdn (default: SQLite "
                                                "file RUN_DIR/qkdsdn.db)")
    up.add_argument("--bus", metavar="URL", help="an external MQTT broker, e.g. mqtt://127.0.0.1:1883 (default: "
                                                 "start the embedded broker)")
    up.add_argument("--free-ports", action="store_true",
                    help="move every listener of the network file to a free loopback port (the moved "
                         "file is RUN_DIR/network.yaml)")
    up.add_argument("--ready-timeout", type=float, default=90.0, metavar="S",
                    help="how long each group of processes may take to become ready (default 90)")
    up.add_argument("--grace", type=float, default=10.0, metavar="S",
                    help="when stopping, SIGKILL what SIGTERM has not ended after S seconds (default 10)")
    up.add_argument("--refresh", type=float, default=1.0, metavar="S",
                    help="refresh period of the live status (default 1)")
    up.add_argument("--no-live", action="store_true",
                    help="print the status once when ready instead of a live table (default when "
                         "stdout is not a terminal)")
    up.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                    help="log level of the processes (default INFO)")
    up.set_defaults(func=cmd_up)

    down = sub.add_parser("down", help=DOWN_HELP,
                          description="Stop the network of a run directory: SIGTERM to the 'qkdsdn up' "
                                      "process, which stops every process it started (agents first, broker "
                                      "last); anything still alive after the grace period is killed.")
    down.add_argument("network", nargs="?", metavar="NETWORK.yaml", help=LOCATE_HELP)
    down.add_argument("--run-dir", metavar="DIR", help="run directory of the network")
    down.add_argument("--grace", type=float, default=10.0, metavar="S", help="grace period (default 10)")
    down.set_defaults(func=cmd_down)

    status = sub.add_parser("status", help=STATUS_HELP,
                            description="Show a network started by 'qkdsdn up': its processes, nodes, links "
                                        "(measured secret key rate, QBER, key-pool level at both ends) and "
                                        "sessions, read from the agents' ETSI 015 RESTCONF with the operator "
                                        "certificate. Exit status 0 when every process runs, 1 otherwise.")
    status.add_argument("network", nargs="?", metavar="NETWORK.yaml", help=LOCATE_HELP)
    status.add_argument("--run-dir", metavar="DIR", help="run directory of the network")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.set_defaults(func=cmd_status)


# =============================================================================================
# locating a run directory


def default_run_dir(network_name: str) -> Path:
    return Path("run") / network_name


def locate_run_dir(network: str | None, run_dir: str | None, *, need_running: bool = False):
    """The RunDir named by --run-dir, by a network file, or the only running one under ./run."""
    from qkdsdn.cli import CommandError
    from qkdsdn.commands.common import load_network
    from qkdsdn.launch import RunDir

    if run_dir:
        return RunDir(run_dir)
    if network:
        return RunDir(default_run_dir(load_network(network).name))
    base = Path("run")
    candidates = sorted(p.parent for p in base.glob("*/up.json")) if base.is_dir() else []
    running = [RunDir(c) for c in candidates if RunDir(c).running_state() is not None]
    if len(running) == 1:
        return running[0]
    if not running:
        raise CommandError("no running network under ./run: name the network file or --run-dir")
    raise CommandError("several networks run under ./run (" + ", ".join(r.path.name for r in running)
                       + "): name the network file or --run-dir")


# =============================================================================================
# up


def _options(args) -> Any:
    from qkdsdn.cli import CommandError
    from qkdsdn.commands.common import load_network
    from qkdsdn.launch import UpOptions

    network = load_network(args.network)
    if args.no_controller and (args.db or args.bus):
        raise CommandError("--db and --bus configure the controller and its bus; --no-controller has neither")
    if args.bus is not None:
        from urllib.parse import urlsplit

        parts = urlsplit(args.bus)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise CommandError(f"--bus {args.bus}: expected mqtt://HOST:PORT or mqtts://HOST:PORT")
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(network.name)
    return UpOptions(network_file=Path(args.network).absolute(), run_dir=run_dir.absolute(),
                     pki=Path(args.pki).absolute() if args.pki else None, insecure_dev=args.insecure_dev,
                     controller=not args.no_controller, bus=args.bus, db=args.db, log_level=args.log_level)


def install_stop_handlers(stop) -> dict:
    """SIGINT, SIGTERM and SIGHUP set ``stop``; returns the previous handlers."""
    import signal

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        previous[sig] = signal.signal(sig, lambda *_: stop.set())
    return previous


def restore_handlers(previous: dict) -> None:
    import signal

    for sig, handler in previous.items():
        signal.signal(sig, handler)


class StartDisplay:
    """Progress of a start: a spinner line per process on a terminal, plain lines otherwise."""

    def __init__(self, console, live: bool):
        self.console = console
        self.live = live
        self.progress = None
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> "StartDisplay":
        if self.live:
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self.progress = Progress(SpinnerColumn(finished_text="[green]✓[/]"), TextColumn("{task.description}"),
                                     TimeElapsedColumn(), console=self.console, transient=False)
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()

    def __call__(self, event: str, proc, detail: str) -> None:
        name = proc.name
        if self.progress is not None:
            if event == "spawned":
                self.tasks[name] = self.progress.add_task(f"{name:<12} starting (pid {proc.pid})", total=1)
            elif event == "waiting" and name in self.tasks:
                self.progress.update(self.tasks[name], description=f"{name:<12} waiting for {detail}")
            elif event == "ready" and name in self.tasks:
                took = proc.ready_at - proc.started_at
                self.progress.update(self.tasks[name], completed=1,
                                     description=f"{name:<12} ready in {took:.1f} s (pid {proc.pid})")
            elif event in ("stopping", "stopped"):
                self.console.print(f"{name}: {event} {detail}".rstrip())
            return
        if event == "spawned":
            self.console.print(f"{name}: started (pid {proc.pid}), log {proc.log_path}")
        elif event == "ready":
            self.console.print(f"{name}: ready in {proc.ready_at - proc.started_at:.1f} s")
        elif event == "stopping":
            self.console.print(f"{name}: {detail}")
        elif event == "stopped":
            self.console.print(f"{name}: stopped" + (f" (status {detail})" if detail else ""))


def cmd_up(args: argparse.Namespace) -> int:
    import threading

    from qkdsdn.cli import CommandError
    from qkdsdn.console import make_console
    from qkdsdn.launch import AlreadyRunning, LaunchError, NetworkRun

    opts = _options(args)
    if opts.controller:
        from qkdsdn.launch import controller_available

        if not controller_available():
            raise CommandError("'qkdsdn controller' is not available in this installation: use --no-controller "
                               "(agents' local control plane)")
    console = make_console()
    live = sys.stdout.isatty() and not args.no_live
    stop = threading.Event()
    previous = install_stop_handlers(stop)
    run = None
    try:
        with StartDisplay(console, live) as display:
            run = NetworkRun(opts, free_ports=args.free_ports, grace_s=args.grace,
                             ready_timeout_s=args.ready_timeout, on_progress=display, stop_event=stop)
            try:
                run.start()
            except AlreadyRunning as exc:
                raise CommandError(str(exc)) from None
            except LaunchError as exc:
                if stop.is_set():
                    console.print("start interrupted; every process stopped")
                    return 130
                raise CommandError(str(exc)) from None
        import atexit

        atexit.register(run.stop)
        state = run.state()
        mode = "controller + bus" if opts.controller else "local control plane (no controller)"
        console.print(f"network [bold]{run.network.name}[/] is up: {len(run.processes)} processes, {mode}, "
                      f"{'mutual TLS' if not opts.insecure_dev else 'PLAIN HTTP (insecure dev)'}; "
                      f"run directory {opts.run_dir}")
        if state.get("bus"):
            console.print(f"bus {state['bus']}   database {state.get('db')}")
        console.print("Ctrl-C or 'qkdsdn down' stops it.", highlight=False)
        sys.stdout.flush()
        failed = _watch(run, console, stop, live=live, refresh=args.refresh)
        return 1 if failed else 0
    finally:
        if run is not None:
            run.stop()
        restore_handlers(previous)


def _watch(run, console, stop, *, live: bool, refresh: float) -> list:
    """Until stop: a live status table (terminal) or the status once; returns processes
    that died on their own (then the network is stopped)."""
    state_reader = lambda: run.run_dir.read_state() or run.state()  # noqa: E731
    if live:
        from rich.live import Live

        def view_now():
            return render_status(collect_status(state_reader()), compact=True)

        with Live(view_now(), console=console, refresh_per_second=4, transient=False) as view:
            while not stop.wait(refresh):
                view.update(view_now())
                if run.exited():
                    break
    else:
        console.print(render_status(collect_status(state_reader())))
        sys.stdout.flush()
        while not stop.wait(refresh):
            if run.exited():
                break
    dead = run.exited()
    for proc in dead:
        from qkdsdn.launch import log_tail

        console.print(f"[red]{proc.name} (pid {proc.pid}) exited with status {proc.returncode}[/]; "
                      f"stopping the network. Last lines of {proc.log_path}:")
        console.print(log_tail(proc.log_path), markup=False, highlight=False)
    return dead


# =============================================================================================
# down


def cmd_down(args: argparse.Namespace) -> int:
    from qkdsdn.console import make_console
    from qkdsdn.launch import down

    run_dir = locate_run_dir(args.network, args.run_dir)
    console = make_console()
    state = run_dir.read_state()
    if state is None:
        console.print(f"nothing to stop: no network was started in {run_dir.path}")
        return 0

    def progress(event, proc, detail):
        if event == "stopping":
            console.print(f"{proc.name} (pid {proc.pid}): {detail}")

    anything, killed = down(run_dir, grace_s=args.grace, on_progress=progress)
    if not anything:
        console.print(f"network {state.get('network', '?')} in {run_dir.path} is not running")
        return 0
    left = run_dir.live_processes()
    if left:
        console.print("[red]still alive:[/] " + ", ".join(f"{p.name} (pid {p.pid})" for p in left))
        return 1
    extra = f" ({len(killed)} killed after the grace period)" if killed else ""
    console.print(f"network {state.get('network', '?')} stopped{extra}")
    return 0


# =============================================================================================
# status


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from qkdsdn.console import make_console

    run_dir = locate_run_dir(args.network, args.run_dir)
    state = run_dir.read_state()
    console = make_console()
    if state is None:
        if args.json:
            print(json.dumps({"running": False, "run_dir": str(run_dir.path)}))
        else:
            console.print(f"no network was started in {run_dir.path}")
        return 1
    running = run_dir.running_state() is not None
    status = collect_status(state, running=running)
    if args.json:
        print(json.dumps(status, indent=2, default=str))
    else:
        console.print(render_status(status))
    healthy = running and all(p["alive"] for p in status["processes"])
    return 0 if healthy else 1


def _restconf_session(state: dict):
    import requests

    from qkdsdn.pki import PkiLayout

    if not state.get("tls"):
        session = requests.Session()
        session.trust_env = False
        session.headers["X-QKDSDN-Dev-Identity"] = "operator"
        return session
    from qkdsdn.httpserver import https_session

    layout = PkiLayout(state["pki"])
    cert, key = layout.operator()
    return https_session(cert, key, layout.ca_cert)


def _fetch_nodes(network, state: dict, timeout: float) -> dict[str, dict | str]:
    """Each node's qkd_node over RESTCONF (or the error, as a string), fetched in parallel."""
    from concurrent.futures import ThreadPoolExecutor

    from qkdsdn.launch import restconf_url

    try:
        session = _restconf_session(state)
    except (OSError, ValueError) as exc:
        return {n.name: f"no operator certificate: {exc}" for n in network.nodes}

    def get(name: str):
        try:
            r = session.get(restconf_url(network, name, not state.get("tls")), timeout=timeout)
        except Exception as exc:  # noqa: BLE001 — any failure is a status to show
            return name, type(exc).__name__
        if r.status_code != 200:
            return name, f"HTTP {r.status_code}"
        try:
            return name, r.json().get("etsi-qkd-sdn-node:qkd_node") or {}
        except ValueError:
            return name, "bad JSON"

    with session, ThreadPoolExecutor(max_workers=min(16, len(network.nodes) or 1)) as pool:
        return dict(pool.map(get, [n.name for n in network.nodes]))


def _fetch_twin(network, state: dict, timeout: float) -> dict[str, dict]:
    """The twin's view of every emulated link (state, QBER, measured SKR), if it runs."""
    from qkdsdn.pki import PkiLayout
    from qkdsdn.twin.service import admin_client_url

    twin = next((p for p in state.get("processes", []) if p.get("role") == "twin"), None)
    if twin is None:
        return {}
    argv = twin.get("argv") or []
    admin_port = int(argv[argv.index("--admin-port") + 1]) if "--admin-port" in argv else None
    layout = PkiLayout(state["pki"]) if state.get("tls") else None
    try:
        session = _restconf_session(state)
        with session:
            r = session.get(admin_client_url(network, layout, admin_port) + "/links", timeout=timeout)
        if r.status_code != 200:
            return {}
        return {v["name"]: v for v in r.json().get("links", [])}
    except Exception:  # noqa: BLE001 — the twin may be gone; the table shows what is known
        return {}


def pool_levels(state_dir: Path, node: str) -> dict[str, dict[str, int]] | None:
    """Available link-key bits per link and owner in an agent's key store (read-only), or None."""
    import sqlite3

    path = Path(state_dir) / f"{node}.keystore.sqlite"
    if not path.is_file():
        return None
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1.0)
    except sqlite3.Error:
        return None
    try:
        rows = db.execute("SELECT link, owner, COALESCE(SUM(size - consumed), 0) FROM link_keys "
                          "WHERE state='available' GROUP BY link, owner").fetchall()
    except sqlite3.Error:
        return None
    finally:
        db.close()
    out: dict[str, dict[str, int]] = {}
    for link, owner, size in rows:
        out.setdefault(link, {})[owner] = 8 * int(size)
    return out


def _qber(link_json: dict) -> float | None:
    for perf in (link_json.get("qkdl_performance") or {}).get("phys_perf") or []:
        if str(perf.get("perf_type", "")).endswith("QBER"):
            try:
                return float(perf.get("value"))
            except (TypeError, ValueError):
                return None
    return None


def collect_status(state: dict, *, running: bool | None = None, timeout: float = 2.0) -> dict:
    """Everything 'status' shows, as plain data: processes, nodes, links, sessions."""
    from db.netfile import load
    from qkdsdn.launch import RunDir, Running

    run_dir = RunDir(state.get("run_dir", "."))
    procs = []
    for item in state.get("processes", []):
        try:
            p = Running.from_json(item)
        except (KeyError, TypeError, ValueError):
            continue
        procs.append({"name": p.name, "role": p.spec.role, "pid": p.pid, "alive": p.alive(),
                      "address": p.spec.address, "log": str(p.log_path), "ready": p.ready_at is not None,
                      "node": p.spec.node})
    if running is None:
        running = any(p["alive"] for p in procs)
    out: dict[str, Any] = {"network": state.get("network"), "run_dir": str(run_dir.path), "running": running,
                           "status": state.get("status"), "mode": state.get("mode"), "tls": state.get("tls"),
                           "bus": state.get("bus"), "db": state.get("db"), "processes": procs,
                           "nodes": [], "links": [], "sessions": []}
    try:
        network = load(state["network_file"])
    except Exception as exc:  # noqa: BLE001 — a moved or broken file: show the processes only
        out["error"] = f"cannot read the network file: {exc}"
        return out
    alive = {p["node"]: p["alive"] for p in procs if p["node"]}
    nodes = _fetch_nodes(network, state, timeout) if running else {}
    twin = _fetch_twin(network, state, timeout) if running else {}
    by_qkdn = {n.qkdn_id: n.name for n in network.nodes}
    pools = {n.name: pool_levels(run_dir.agent_state(n.name), n.name) for n in network.nodes}

    sessions: dict[str, dict] = {}
    for n in network.nodes:
        doc = nodes.get(n.name)
        apps = []
        if isinstance(doc, dict):
            apps = (doc.get("qkd_applications") or {}).get("qkd_app") or []
            virt = {l["qkdl_id"]: l for l in (doc.get("qkd_links") or {}).get("qkd_link") or []
                    if str(l.get("qkdl_type", "")).endswith("VIRT")}
            for app in apps:
                ksid = app.get("app_id")
                s = sessions.setdefault(ksid, {"ksid": ksid, "source": app.get("server_app_id"),
                                               "destination": ",".join(app.get("client_app_id") or []),
                                               "rate_bps": (app.get("app_qos") or {}).get("max_bandwidth"),
                                               "hops": {}, "status": set()})
                s["status"].add(str(app.get("app_status", "")).split(":")[-1])
                link = next((virt[i] for i in app.get("backing_qkdl_id") or [] if i in virt), None)
                s["hops"][n.name] = (by_qkdn.get((link or {}).get("virt_prev_hop")),
                                     by_qkdn.get((link or {}).get("virt_next_hop")))
        out["nodes"].append({
            "node": n.name, "address": n.km_address, "process": alive.get(n.name),
            "status": str(doc.get("qkdn_status", "")).split(":")[-1] if isinstance(doc, dict) else None,
            "error": doc if isinstance(doc, str) else None, "sessions": len(apps)})

    for link in network.links:
        master_doc = nodes.get(link.master)
        lj = {}
        if isinstance(master_doc, dict):
            lj = next((l for l in (master_doc.get("qkd_links") or {}).get("qkd_link") or []
                       if l.get("qkdl_id") == link.qkdl_id), {})
        tv = twin.get(link.name, {})
        skr = (lj.get("qkdl_performance") or {}).get("skr")
        qber = _qber(lj)
        if qber is None and tv:
            qber = tv.get("qber")
        pm = (pools.get(link.master) or {}).get(link.qkdl_id)
        ps = (pools.get(link.slave) or {}).get(link.qkdl_id)
        out["links"].append({
            "link": link.name, "ends": [link.master, link.slave],
            "status": str(lj.get("qkdl_status", "")).split(":")[-1] or (tv.get("state") if tv else None),
            "skr_bps": skr, "device_skr_bps": tv.get("skr_bps") if tv else None, "qber": qber,
            "pool_bits": [None if pm is None else sum(pm.values()), None if ps is None else sum(ps.values())]})

    for s in sessions.values():
        s["route"] = _route(s.pop("hops"))
        s["status"] = "/".join(sorted(x for x in s["status"] if x)) or None
        out["sessions"].append(s)
    out["sessions"].sort(key=lambda s: s["ksid"] or "")
    return out


def _route(hops: dict[str, tuple[str | None, str | None]]) -> list[str]:
    """Order the nodes of a session by their (previous, next) hops."""
    if not hops:
        return []
    start = next((n for n, (prev, _) in hops.items() if prev is None), None) or sorted(hops)[0]
    route, seen = [start], {start}
    while True:
        nxt = hops.get(route[-1], (None, None))[1]
        if nxt is None or nxt in seen:
            break
        route.append(nxt)
        seen.add(nxt)
    route += sorted(n for n in hops if n not in seen)
    return route


def _bits(value: int | None) -> str | None:
    if value is None:
        return None
    for unit, scale in (("Mib", 2 ** 20), ("kib", 2 ** 10)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value} b"


def _table(title: str, columns: list[str], rows: list[list[Any]], right: tuple[str, ...] = ()):
    from rich import box
    from rich.table import Table

    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", show_edge=False, pad_edge=False,
                  title_style="bold")
    for col in columns:
        table.add_column(col, justify="right" if col in right else "left", no_wrap=True)
    for row in rows:
        table.add_row(*("—" if v is None else str(v) for v in row))
    return table


def render_status(status: dict, *, compact: bool = False, max_sessions: int = 8):
    """The status as rich renderables: processes, nodes, links, sessions. ``compact`` (the live
    view): the agents appear in the node table, the other processes on one line, and at most
    ``max_sessions`` sessions, so that it fits a terminal."""
    from rich.console import Group
    from rich.text import Text

    from qkdsdn.console import human_bps

    head = Text(f"network {status.get('network')}  ({status.get('mode')} mode, "
                f"{'mutual TLS' if status.get('tls') else 'plain HTTP'}; {status.get('run_dir')})  "
                f"{'running' if status.get('running') else 'NOT RUNNING'}", style="bold")
    parts: list[Any] = [head]
    if status.get("error"):
        parts.append(Text(status["error"], style="red"))
    procs = status["processes"]
    agents = {p["node"]: p for p in procs if p["node"]}
    if compact:
        others = [f"{p['name']} {'running' if p['alive'] else 'STOPPED'} (pid {p['pid']})"
                  for p in procs if not p["node"]]
        up_agents = sum(1 for p in agents.values() if p["alive"])
        parts.append(Text("processes: " + " · ".join(others + [f"{up_agents}/{len(agents)} agents running"])))
    else:
        parts.append(_table("processes", ["process", "pid", "state", "address", "log"],
                            [[p["name"], p["pid"], "running" if p["alive"] else "stopped", p["address"],
                              Path(p["log"]).name] for p in procs], right=("pid",)))
    if status.get("nodes"):
        rows = []
        for n in status["nodes"]:
            agent = agents.get(n["node"])
            state = None if agent is None else ("running" if agent["alive"] else "stopped")
            rows.append([n["node"], n["address"], state if not compact or agent is None
                         else f"{state} ({agent['pid']})", n["status"] or n["error"], n["sessions"]])
        parts.append(_table("nodes", ["node", "address", "agent", "ETSI 015 status", "sessions"], rows,
                            right=("sessions",)))
    if status.get("links"):
        rows = []
        for link in status["links"]:
            pm, ps = link["pool_bits"]
            rows.append([link["link"], " – ".join(link["ends"]), link["status"], human_bps(link["skr_bps"]),
                         None if link["qber"] is None else f"{100 * link['qber']:.2f} %",
                         _bits(pm), _bits(ps)])
        parts.append(_table("links", ["link", "ends", "status", "SKR", "QBER", "pool (master)", "pool (slave)"],
                            rows, right=("SKR", "QBER", "pool (master)", "pool (slave)")))
    sess = status.get("sessions") or []
    shown = sess[:max_sessions] if compact else sess
    parts.append(_table(f"sessions ({len(sess)})", ["KSID", "source", "destination", "route", "rate", "status"],
                        [[s["ksid"], s["source"], s["destination"], " → ".join(s["route"]),
                          human_bps(s["rate_bps"]), s["status"]] for s in shown], right=("rate",)))
    if len(shown) < len(sess):
        parts.append(Text(f"… and {len(sess) - len(shown)} more ('qkdsdn status' lists them all)"))
    return Group(*parts)
