"""Process manager of ``qkdsdn up``: one OS process per network element, as the paper's containers.

Two layers:

* A generic launcher: ``ProcessSpec`` (what to run, how to tell it is ready), ``Launcher``
  (spawn each in its own process group with its log file, wait for readiness, stop with
  SIGTERM then SIGKILL after a grace period) and ``RunDir`` (the run directory: logs, state
  file, lock).
* The plan of a network: ``plan_network`` turns a network file and ``UpOptions`` into the
  processes to start — the MQTT broker (embedded unless an external one is given), the
  digital twin, the controller and one agent per node — in start order.

Run directory (default ``./run/<network>``)::

    up.json         state file: launcher pid, mode, bus, database, every process (pid, log, address)
    up.lock         held (flock) by the running launcher: a second ``up`` finds the network running
    logs/NAME.log   stdout and stderr of each process
    pki/            certificates, when ``up`` generated them
    state/NODE/     each agent's key store and event log (NODE.events.jsonl)
    network.yaml    the network file as started, when ``--free-ports`` moved its listeners
    qkdsdn.db       the controller's SQLite database, unless ``--db URL``

No orphans: children run in their own session (so Ctrl-C reaches only the launcher, which
stops them in order), and on Linux each one is started with ``PR_SET_PDEATHSIG`` = SIGTERM,
so the kernel stops it if the launcher dies without cleaning up (``kill -9``). The death
signal follows the *thread* that spawned the child: call ``Launcher.start`` from a thread that
lives as long as the network (normally the main thread).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

STATE_FILE = "up.json"
LOCK_FILE = "up.lock"
STATE_VERSION = 1
DEFAULT_GRACE_S = 10.0
DEFAULT_READY_TIMEOUT_S = 90.0
POLL_S = 0.05

# Started in front of every child on Linux: ask the kernel for SIGTERM when the launcher
# dies, give up if it is already gone, then become the real program (same pid).
_PDEATHSIG_WRAPPER = r"""
import ctypes, os, signal, sys
parent = int(sys.argv[1])
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
except (OSError, AttributeError):
    pass
if os.getppid() != parent:
    sys.exit(143)
os.execvp(sys.argv[2], sys.argv[2:])
"""


class LaunchError(Exception):
    """A process could not be started or did not become ready (the message says why)."""


class AlreadyRunning(LaunchError):
    """The run directory belongs to a network that is running."""

    def __init__(self, message: str, state: dict | None):
        super().__init__(message)
        self.state = state


# =============================================================================================
# process identity


def _start_ticks(pid: int) -> int | None:
    """Start time of a process (clock ticks since boot, /proc/PID/stat field 22): with the pid
    it names one process, so a reused pid is not taken for ours. None off Linux or if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may contain spaces.
    fields_after = raw[raw.rindex(")") + 2:].split()
    try:
        return int(fields_after[19])
    except (IndexError, ValueError):
        return None


def _is_zombie(pid: int) -> bool:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return raw[raw.rindex(")") + 2:].startswith("Z")


def process_alive(pid: int | None, start_ticks: int | None = None) -> bool:
    """True if process ``pid`` runs (and, given ``start_ticks``, is the one that started then)."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    if _is_zombie(pid):
        return False
    if start_ticks is not None:
        current = _start_ticks(pid)
        if current is not None and current != start_ticks:
            return False
    return True


# =============================================================================================
# readiness probes


class Probe:
    """Tells whether a started process is ready. ``check`` is called repeatedly and must
    return quickly (short network timeouts); it may record what it found in ``found``."""

    def check(self, proc: "Running") -> bool:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


@dataclass
class TCPProbe(Probe):
    """Ready when a TCP connection to host:port succeeds."""

    host: str
    port: int
    timeout: float = 0.5

    def check(self, proc: "Running") -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=self.timeout):
                return True
        except OSError:
            return False

    def describe(self) -> str:
        return f"TCP {self.host}:{self.port}"


@dataclass
class HTTPProbe(Probe):
    """Ready when GET ``url`` answers with one of ``expect`` — over HTTPS with the given client
    certificate and CA (so the probe also proves the TLS set-up), or plain HTTP with headers."""

    url: str
    cert: tuple[str, str] | None = None
    ca: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    expect: tuple[int, ...] = (200,)
    timeout: float = 2.0
    last_error: str | None = None

    def __post_init__(self) -> None:
        self._session = None

    def _get_session(self):
        if self._session is None:
            import requests

            if self.cert is not None or self.ca is not None:
                from qkdsdn.httpserver import https_session

                cert, key = self.cert if self.cert else (None, None)
                self._session = https_session(cert, key, self.ca)
            else:
                self._session = requests.Session()
                self._session.trust_env = False
            self._session.headers.update(self.headers)
        return self._session

    def check(self, proc: "Running") -> bool:
        import requests

        try:
            response = self._get_session().get(self.url, timeout=self.timeout)
        except requests.RequestException as exc:
            self.last_error = f"{type(exc).__name__}"
            return False
        if response.status_code in self.expect:
            self.close()
            return True
        self.last_error = f"HTTP {response.status_code}"
        return False

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    def describe(self) -> str:
        return f"GET {self.url}" + (f" ({self.last_error})" if self.last_error else "")


@dataclass
class LogLineProbe(Probe):
    """Ready when the process's log has a line matching ``pattern`` since it started;
    the match's named groups go to ``Running.found``."""

    pattern: str

    def check(self, proc: "Running") -> bool:
        regex = re.compile(self.pattern)
        try:
            with open(proc.log_path, "rb") as fh:
                fh.seek(proc.log_offset)
                text = fh.read().decode("utf-8", "replace")
        except OSError:
            return False
        match = regex.search(text)
        if match is None:
            return False
        proc.found.update({k: v for k, v in match.groupdict().items() if v is not None})
        return True

    def describe(self) -> str:
        return f"log line /{self.pattern}/"


@dataclass
class AllOf(Probe):
    probes: Sequence[Probe]

    def __post_init__(self) -> None:
        self._done: set[int] = set()

    def check(self, proc: "Running") -> bool:
        for i, probe in enumerate(self.probes):
            if i not in self._done:
                if not probe.check(proc):
                    return False
                self._done.add(i)
        return True

    def describe(self) -> str:
        pending = [p.describe() for i, p in enumerate(self.probes) if i not in self._done]
        return " and ".join(pending) or "ready"


# =============================================================================================
# specs and running processes


@dataclass
class ProcessSpec:
    """One process of a network. ``group``: processes start group by group (0 first), the
    next group once every process of the previous one is ready. ``stop_group``: they stop
    group by group, the highest first (default: ``group``, i.e. the reverse of the start)."""

    name: str
    role: str  # broker | twin | controller | agent | other
    argv: list[str]
    probe: Probe | None = None
    group: int = 0
    stop_group: int | None = None
    node: str | None = None
    address: str | None = None  # what the status table shows (host:port or URL)
    env: dict[str, str] | None = None
    cwd: str | None = None

    @property
    def stop_order(self) -> int:
        return self.group if self.stop_group is None else self.stop_group


@dataclass
class Running:
    spec: ProcessSpec
    pid: int
    start_ticks: int | None
    log_path: Path
    log_offset: int
    started_at: float
    popen: subprocess.Popen | None = None  # None when read back from a state file
    pgid: int | None = None
    ready_at: float | None = None
    found: dict[str, str] = field(default_factory=dict)
    returncode: int | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    def alive(self) -> bool:
        if self.popen is not None:
            if self.returncode is None:
                self.returncode = self.popen.poll()
            return self.returncode is None
        return process_alive(self.pid, self.start_ticks)

    def to_json(self) -> dict:
        return {"name": self.spec.name, "role": self.spec.role, "node": self.spec.node,
                "address": self.spec.address, "argv": self.spec.argv, "pid": self.pid, "pgid": self.pgid,
                "start_ticks": self.start_ticks, "log": str(self.log_path), "started_at": self.started_at,
                "ready_at": self.ready_at, "found": self.found, "group": self.spec.group,
                "stop_group": self.spec.stop_order}

    @classmethod
    def from_json(cls, data: dict) -> "Running":
        spec = ProcessSpec(name=data["name"], role=data.get("role", "other"), argv=list(data.get("argv", [])),
                           node=data.get("node"), address=data.get("address"), group=int(data.get("group", 0)),
                           stop_group=data.get("stop_group"))
        return cls(spec=spec, pid=int(data["pid"]), start_ticks=data.get("start_ticks"),
                   log_path=Path(data["log"]), log_offset=0, started_at=float(data.get("started_at", 0)),
                   pgid=data.get("pgid"), ready_at=data.get("ready_at"), found=dict(data.get("found") or {}))


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 16384))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# =============================================================================================
# run directory


class RunDir:
    """The run directory of one network: state file, lock, logs."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path).absolute()
        self._lock_fd: int | None = None

    @property
    def state_file(self) -> Path:
        return self.path / STATE_FILE

    @property
    def lock_file(self) -> Path:
        return self.path / LOCK_FILE

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def agent_state(self, node: str) -> Path:
        return self.path / "state" / node

    def read_state(self) -> dict | None:
        try:
            data = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise LaunchError(f"cannot read {self.state_file}: {exc}") from None
        return data if isinstance(data, dict) else None

    def write_state(self, state: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".up.", suffix=".json", dir=self.path)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(state, fh, indent=2, sort_keys=True)
                fh.write("\n")
            os.replace(tmp, self.state_file)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    # -- the lock: held by the launcher for as long as the network runs ------------------

    def try_lock(self) -> bool:
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.set_inheritable(fd, False)
        self._lock_fd = fd
        return True

    def unlock(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def locked_by_other(self) -> bool:
        """True if another process holds the lock (a launcher is running)."""
        if not self.lock_file.exists():
            return False
        fd = os.open(self.lock_file, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def live_processes(self, state: dict | None = None) -> list[Running]:
        """Processes of the state file that still run (whatever the launcher's fate)."""
        state = self.read_state() if state is None else state
        if not state:
            return []
        out = []
        for item in state.get("processes", []):
            try:
                proc = Running.from_json(item)
            except (KeyError, TypeError, ValueError):
                continue
            if proc.alive():
                out.append(proc)
        return out

    def running_state(self) -> dict | None:
        """The state file if the network it describes is running (its launcher holds the lock,
        or some of its processes are still alive), else None."""
        state = self.read_state()
        if state is None:
            return None
        if self.locked_by_other() or self.live_processes(state):
            return state
        return None


# =============================================================================================
# launcher


def _wrapped(argv: list[str]) -> list[str]:
    if sys.platform.startswith("linux"):
        return [sys.executable, "-I", "-S", "-c", _PDEATHSIG_WRAPPER, str(os.getpid()), *argv]
    return argv


class Launcher:
    """Starts ``ProcessSpec``s group by group, waits for their readiness, stops them all.

    ``on_progress(event, running, detail)`` is called with event "spawned", "ready",
    "waiting" (periodically, detail = what is awaited), "stopping", "stopped".
    ``stop_event``: set it (e.g. from a signal handler) to abandon a start in progress.
    """

    def __init__(self, run_dir: RunDir, *, grace_s: float = DEFAULT_GRACE_S,
                 ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S,
                 on_progress: Callable[[str, Running, str], None] | None = None,
                 stop_event: threading.Event | None = None, state: dict | None = None,
                 base_env: dict[str, str] | None = None):
        self.run_dir = run_dir
        self.grace_s = grace_s
        self.ready_timeout_s = ready_timeout_s
        self.on_progress = on_progress or (lambda *_: None)
        self.stop_event = stop_event or threading.Event()
        self.processes: list[Running] = []
        self.state: dict = dict(state or {})
        self._stopped = False
        self._lock = threading.RLock()
        env = dict(os.environ if base_env is None else base_env)
        env["PYTHONUNBUFFERED"] = "1"
        self.base_env = env

    # -- state file ---------------------------------------------------------------------

    def save_state(self, status: str | None = None) -> None:
        with self._lock:
            if status is not None:
                self.state["status"] = status
            self.state.update({"version": STATE_VERSION, "launcher_pid": os.getpid(),
                               "launcher_start_ticks": _start_ticks(os.getpid()),
                               "run_dir": str(self.run_dir.path),
                               "processes": [p.to_json() for p in self.processes]})
            self.run_dir.write_state(self.state)

    # -- start --------------------------------------------------------------------------

    def spawn(self, spec: ProcessSpec) -> Running:
        self.run_dir.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.run_dir.log(spec.name)
        env = dict(self.base_env)
        env.update(spec.env or {})
        with open(log_path, "ab") as log:
            offset = log.tell()
            header = f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {spec.name}: {' '.join(spec.argv)}\n"
            log.write(header.encode())
            log.flush()
            offset += len(header.encode())
            try:
                popen = subprocess.Popen(_wrapped(spec.argv), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=env, cwd=spec.cwd,
                                         start_new_session=True, close_fds=True)
            except OSError as exc:
                raise LaunchError(f"cannot start {spec.name} ({spec.argv[0]}): {exc.strerror or exc}") from None
        running = Running(spec=spec, pid=popen.pid, start_ticks=_start_ticks(popen.pid), log_path=log_path,
                          log_offset=offset, started_at=time.time(), popen=popen, pgid=popen.pid)
        with self._lock:
            self.processes.append(running)
        self.save_state()
        self.on_progress("spawned", running, "")
        return running

    def start(self, specs: Iterable[ProcessSpec]) -> list[Running]:
        """Start every spec group by group; returns the running processes. On failure (or
        ``stop_event``) stops whatever was started and raises LaunchError."""
        specs = list(specs)
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError("process names must be unique")
        try:
            for group in sorted({s.group for s in specs}):
                batch = [self.spawn(s) for s in specs if s.group == group]
                self.wait_ready(batch)
        except BaseException:
            self.stop()
            raise
        return list(self.processes)

    def wait_ready(self, batch: list[Running]) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        pending = [r for r in batch if r.ready_at is None]
        last_report = 0.0
        while pending:
            if self.stop_event.is_set():
                raise LaunchError("start interrupted")
            for r in list(pending):
                if not r.alive():
                    tail = log_tail(r.log_path)
                    raise LaunchError(f"{r.name} exited with status {r.returncode} before it was ready "
                                      f"(log {r.log_path}):\n{tail}")
                if r.spec.probe is None or r.spec.probe.check(r):
                    r.ready_at = time.time()
                    pending.remove(r)
                    self.save_state()
                    self.on_progress("ready", r, "")
            if not pending:
                break
            now = time.monotonic()
            if now > deadline:
                waits = "; ".join(f"{r.name}: {r.spec.probe.describe() if r.spec.probe else '?'}" for r in pending)
                tails = "\n".join(f"--- {r.log_path}\n{log_tail(r.log_path, 8)}" for r in pending)
                raise LaunchError(f"not ready after {self.ready_timeout_s:g} s: {waits}\n{tails}")
            if now - last_report > 1.0:
                last_report = now
                for r in pending:
                    self.on_progress("waiting", r, r.spec.probe.describe() if r.spec.probe else "")
            self.stop_event.wait(POLL_S)

    def exited(self) -> list[Running]:
        """Processes that ended on their own."""
        with self._lock:
            return [p for p in self.processes if not p.alive()]

    # -- stop ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop every process, group by group in reverse start order: SIGTERM to its process
        group, SIGKILL to what is left after the grace period. Idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            procs = list(self.processes)
        if procs:
            with contextlib.suppress(OSError, LaunchError):
                self.save_state("stopping")
        stop_processes(procs, grace_s=self.grace_s, on_progress=self.on_progress)
        with contextlib.suppress(OSError, LaunchError):
            self.save_state("stopped")


def _signal_group(proc: Running, sig: int) -> None:
    pgid = proc.pgid or proc.pid
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(proc.pid, sig)


def _group_alive(proc: Running) -> bool:
    """The process, or anything else left in its process group."""
    if proc.alive():
        return True
    pgid = proc.pgid or proc.pid
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    # Zombies of the group that nobody reaped yet do not count.
    return any(not _is_zombie(int(pid)) for pid in _group_members(pgid))


def _group_members(pgid: int) -> list[str]:
    members = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        rest = raw[raw.rindex(")") + 2:].split()
        if len(rest) > 2 and rest[2] == str(pgid):
            members.append(entry)
    return members


def stop_processes(procs: Sequence[Running], *, grace_s: float = DEFAULT_GRACE_S,
                   on_progress: Callable[[str, Running, str], None] | None = None) -> list[Running]:
    """Stop processes group by group (highest ``stop_order`` first); returns those that had to
    be killed with SIGKILL."""
    on_progress = on_progress or (lambda *_: None)
    killed: list[Running] = []
    for group in sorted({p.spec.stop_order for p in procs}, reverse=True):
        batch = [p for p in procs if p.spec.stop_order == group]
        live = [p for p in batch if _group_alive(p)]
        for p in live:
            on_progress("stopping", p, "SIGTERM")
            _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while live and time.monotonic() < deadline:
            live = [p for p in live if _group_alive(p)]
            if live:
                time.sleep(POLL_S)
        for p in live:
            on_progress("stopping", p, "SIGKILL")
            _signal_group(p, signal.SIGKILL)
            killed.append(p)
        for p in batch:
            if p.popen is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.returncode = p.popen.wait(timeout=grace_s)
            else:
                end = time.monotonic() + grace_s
                while p.alive() and time.monotonic() < end:
                    time.sleep(POLL_S)
            on_progress("stopped", p, "" if p.returncode is None else str(p.returncode))
    return killed


# =============================================================================================
# ports


def port_free(host: str, port: int) -> bool | None:
    """True if we may bind host:port now, False if something holds it, None if the address
    is not one of this host's (another machine's or network namespace's: cannot tell)."""
    import errno

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                return None
            return False
    return True


def _ephemeral_range() -> tuple[int, int] | None:
    try:
        low, high = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return None
    return low, high


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports that are free now on ``host``. On Linux they are taken below the
    kernel's ephemeral range (ip_local_port_range), where no outgoing connection's source port
    can take them before our servers bind them; elsewhere the kernel picks them."""
    import random

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks: list[socket.socket] = []
    try:
        span = _ephemeral_range()
        if span is not None and span[0] > 10000 + 4 * n:
            candidates = list(range(10000, span[0]))
            random.shuffle(candidates)
            for port in candidates:
                if len(socks) == n:
                    break
                s = socket.socket(family, socket.SOCK_STREAM)
                try:
                    s.bind((host, port))
                except OSError:
                    s.close()
                    continue
                socks.append(s)
        while len(socks) < n:
            s = socket.socket(family, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# =============================================================================================
# the plan of a network


@dataclass
class UpOptions:
    """What ``qkdsdn up`` starts. ``controller=False`` is the controller-less mode (agents
    use their built-in local control plane; no broker). ``bus``: an external broker URL, or
    None for the embedded broker process. ``db``: SQLAlchemy URL of the controller's database
    (None: SQLite file in the run directory)."""

    network_file: Path
    run_dir: Path
    pki: Path | None = None  # None with insecure_dev=False: generated into run_dir/pki
    insecure_dev: bool = False
    controller: bool = True
    bus: str | None = None
    db: str | None = None
    broker_host: str | None = None  # None: the controller's host (deployment.controller)
    broker_port: int = 0  # 0: any free port
    python: str = sys.executable
    log_level: str = "INFO"
    extra_controller_args: list[str] = field(default_factory=list)
    extra_agent_args: list[str] = field(default_factory=list)
    # Commands put in front of a node's agent, e.g. {"KM2": ["ip", "netns", "exec", "km2"]} to run
    # it in its own network namespace (the multi-host test does that).
    node_prefix: dict[str, list[str]] = field(default_factory=dict)

    def pki_dir(self) -> Path | None:
        if self.insecure_dev:
            return None
        return Path(self.pki) if self.pki is not None else Path(self.run_dir) / "pki"

    def db_url(self) -> str:
        return self.db or f"sqlite:///{Path(self.run_dir).absolute() / 'qkdsdn.db'}"


QKDSDN_MAIN = "import sys; from qkdsdn.cli import main; sys.exit(main())"


def qkdsdn_argv(python: str, *args: str) -> list[str]:
    """``qkdsdn ARGS`` run with the given interpreter (no reliance on PATH). Not ``-m qkdsdn.cli``:
    that would load the module twice (as __main__ and as qkdsdn.cli), and the commands' CommandError
    would not be the one main() catches."""
    return [python, "-c", QKDSDN_MAIN, *args]


def security_args(opts: UpOptions) -> list[str]:
    return ["--insecure-dev"] if opts.insecure_dev else ["--pki", str(opts.pki_dir())]


def operator_probe_args(opts: UpOptions) -> dict:
    """How a probe authenticates: the operator's certificate, or the development header."""
    pki_dir = opts.pki_dir()
    if pki_dir is None:
        return {"headers": {"X-QKDSDN-Dev-Identity": "operator"}}
    from qkdsdn.pki import PkiLayout

    layout = PkiLayout(pki_dir)
    cert, key = layout.operator()
    return {"cert": (str(cert), str(key)), "ca": str(layout.ca_cert)}


def restconf_url(network: Any, node: str, insecure_dev: bool) -> str:
    n = network.node(node)
    host = f"[{n.km_host}]" if ":" in n.km_host else n.km_host
    scheme = "http" if insecure_dev else "https"
    return f"{scheme}://{host}:{n.km_port}/restconf/data/etsi-qkd-sdn-node:qkd_node"


def broker_spec(opts: UpOptions, network: Any = None) -> ProcessSpec:
    """The embedded MQTT broker as a process. With TLS it serves mqtts with the controller's
    certificate (the broker belongs to the control plane) and admits only clients with a
    certificate of the network's CA: mutual TLS on the bus too."""
    host = opts.broker_host or (network.deployment.controller_host if network is not None else "127.0.0.1")
    argv = [opts.python, "-m", "qkdsdn.bus", "broker", "--host", host, "--port", str(opts.broker_port)]
    pki_dir = opts.pki_dir()
    if pki_dir is not None:
        from qkdsdn.pki import PkiLayout

        layout = PkiLayout(pki_dir)
        cert, key = layout.controller()
        argv += ["--cert", str(cert), "--key", str(key), "--ca", str(layout.ca_cert)]
    return ProcessSpec(name="broker", role="broker", argv=argv, group=0,
                       probe=LogLineProbe(r"listening on (?P<url>mqtts?://\S+)"),
                       address=f"{host}:{opts.broker_port or 'auto'}")


def twin_spec(network: Any, opts: UpOptions, admin_port: int | None = None) -> ProcessSpec:
    from qkdsdn.twin.service import admin_client_url, default_admin_port, emulated_links

    argv = qkdsdn_argv(opts.python, "twin", "serve", str(opts.network_file), *security_args(opts),
                       "--log-level", opts.log_level.lower())
    if admin_port is not None:
        argv += ["--admin-port", str(admin_port)]
    layout = None
    if not opts.insecure_dev:
        from qkdsdn.pki import PkiLayout

        layout = PkiLayout(opts.pki_dir())
    admin = admin_client_url(network, layout, admin_port) + "/links"
    probes: list[Probe] = [HTTPProbe(admin, **operator_probe_args(opts))]
    for link in emulated_links(network):
        for address in network.twin_addresses(link):
            host, _, port = address.rpartition(":")
            probes.append(TCPProbe(host.strip("[]"), int(port)))
    port = admin_port if admin_port is not None else default_admin_port(network)
    # Started with the broker (it needs nothing), stopped after everything that uses it.
    return ProcessSpec(name="twin", role="twin", argv=argv, group=0, stop_group=1, probe=AllOf(probes),
                       address=f"admin 127.0.0.1:{port}")


def controller_spec(network: Any, opts: UpOptions, bus_url: str) -> ProcessSpec:
    """The controller; ready when its operator REST API answers /api/v1/health over (mutual) TLS.
    A 503 ("degraded": e.g. no key manager discovered yet, as the agents start after it) counts as
    up: the process serves."""
    d = network.deployment
    rest = f"{d.controller_host}:{d.controller_port}"
    argv = qkdsdn_argv(opts.python, "controller", str(opts.network_file), "--db", opts.db_url(),
                       "--bus", bus_url, *security_args(opts), "--rest", rest, *opts.extra_controller_args)
    host = f"[{d.controller_host}]" if ":" in d.controller_host else d.controller_host
    scheme = "http" if opts.insecure_dev else "https"
    probe = HTTPProbe(f"{scheme}://{host}:{d.controller_port}/api/v1/health", expect=(200, 503),
                      **operator_probe_args(opts))
    # Started after the agents, stopped just after them: agents never wait for a gone controller.
    return ProcessSpec(name="controller", role="controller", argv=argv, group=3, stop_group=2, probe=probe,
                       address=rest)


def agent_spec(network: Any, opts: UpOptions, node: str, bus_url: str | None) -> ProcessSpec:
    state_dir = Path(opts.run_dir) / "state" / node
    argv = qkdsdn_argv(opts.python, "agent", str(opts.network_file), "--node", node, *security_args(opts),
                       "--state-dir", str(state_dir), "--log-level", opts.log_level.upper())
    if bus_url is not None:
        argv += ["--bus", bus_url]
    argv = [*opts.node_prefix.get(node, []), *argv, *opts.extra_agent_args]
    probe = HTTPProbe(restconf_url(network, node, opts.insecure_dev), **operator_probe_args(opts))
    return ProcessSpec(name=f"agent-{node}", role="agent", argv=argv, group=2, stop_group=3, probe=probe,
                       node=node, address=network.node(node).km_address)


def plan_network(network: Any, opts: UpOptions, *, bus_url: str | None = None,
                 twin_admin_port: int | None = None) -> list[ProcessSpec]:
    """The processes of a network besides the embedded broker, in start groups: twin (0, with
    the broker), agents (2), controller (3) — last, so that its first discovery round finds
    every key manager serving (agents need only the bus to start; the broker keeps their
    messages). They stop agents first, then controller, twin, broker. With the embedded broker,
    ``bus_url`` is only known once the broker runs: ``NetworkRun`` starts group 0 first and plans
    the rest with its URL."""
    specs: list[ProcessSpec] = []
    if any(link.device is not None for link in network.links):
        specs.append(twin_spec(network, opts, twin_admin_port))
    if opts.controller and bus_url is None:
        raise ValueError("the controller and the agents need the bus URL")
    for node in network.nodes:
        specs.append(agent_spec(network, opts, node.name, bus_url if opts.controller else None))
    if opts.controller:
        specs.append(controller_spec(network, opts, bus_url))
    return specs


# =============================================================================================
# network files with every listener on a free port


def relocate_to_free_ports(source: Path, out: Path) -> Path:
    """Copy a network file, moving every loopback listener (key managers, twin KMEs, twin
    admin, controller) to a port that is free now. Refuses files with non-loopback addresses."""
    import ipaddress

    import yaml

    data = yaml.safe_load(Path(source).read_text())
    from db.netfile import load

    network = load(source)  # validates; raises NetworkFileError with file:line on problems

    def loopback(host: str) -> bool:
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return host == "localhost"

    hosts = [n.km_host for n in network.nodes] + [network.deployment.controller_host]
    for link in network.links:
        if link.device is not None:
            hosts += [a.rpartition(":")[0] for a in network.twin_addresses(link)]
    foreign = sorted({h for h in hosts if not loopback(h)})
    if foreign:
        raise LaunchError(f"--free-ports moves loopback listeners only; {source} names {', '.join(foreign)}")
    count = len(network.nodes) + 2 * len(network.links) + 2
    ports = iter(free_ports(count))
    for node in data["nodes"]:
        host = network.node(node["name"]).km_host
        node["km_address"] = f"{host}:{next(ports)}"
    for item, link in zip(data.get("links") or [], network.links):
        if link.device is None:
            continue
        master, slave = network.twin_addresses(link)
        device = dict(item.get("device") or {})
        device["master_address"] = f"{master.rpartition(':')[0]}:{next(ports)}"
        device["slave_address"] = f"{slave.rpartition(':')[0]}:{next(ports)}"
        item["device"] = device
    deployment = dict(data.get("deployment") or {})
    deployment["controller"] = f"{network.deployment.controller_host}:{next(ports)}"
    # The twin's admin API listens on twin_base_port - 1: pick a free admin port and derive the base.
    admin = next(ports)
    if admin + 1 >= 65000:
        admin = next(p for p in free_ports(20) if p + 1 < 65000)
    deployment["twin_base_port"] = admin + 1
    data["deployment"] = deployment
    out.parent.mkdir(parents=True, exist_ok=True)
    header = f"# {Path(source).name} with every listener moved to a free loopback port (qkdsdn --free-ports)\n"
    out.write_text(header + yaml.safe_dump(data, sort_keys=False))
    return out


def listener_conflicts(network: Any, opts: UpOptions) -> list[str]:
    """Addresses of the plan that something else already listens on, as sentences."""
    from qkdsdn.twin.service import default_admin_port

    wanted: list[tuple[str, int, str]] = []
    for node in network.nodes:
        wanted.append((node.km_host, node.km_port, f"key manager {node.name}"))
    for link in network.links:
        if link.device is not None:
            for role, address in zip(("master", "slave"), network.twin_addresses(link)):
                host, _, port = address.rpartition(":")
                wanted.append((host.strip("[]"), int(port), f"twin {link.name} {role} KME"))
    if any(link.device is not None for link in network.links):
        wanted.append(("127.0.0.1", default_admin_port(network), "twin admin API"))
    if opts.controller:
        d = network.deployment
        wanted.append((d.controller_host, d.controller_port, "controller REST API"))
    out = []
    for host, port, what in wanted:
        with contextlib.suppress(OSError):  # e.g. a host name that does not resolve here
            if port_free(host, port) is False:
                out.append(f"{host}:{port} ({what}) is in use")
    return out


def controller_available() -> bool:
    """Whether this installation has the 'qkdsdn controller' command."""
    import argparse

    from qkdsdn.cli import build_parser

    for action in build_parser()._actions:  # noqa: SLF001 — argparse keeps subcommands there
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            return "controller" in action.choices
    return False


def clock_offset() -> float:
    """time.time() - time.monotonic() now: converts this host's monotonic timestamps
    (CLOCK_MONOTONIC is system-wide on Linux) to Unix time."""
    return time.time() - time.monotonic()


__all__ = [
    "AllOf", "AlreadyRunning", "HTTPProbe", "LaunchError", "Launcher", "LogLineProbe", "Probe", "ProcessSpec",
    "RunDir", "Running", "TCPProbe", "UpOptions", "agent_spec", "broker_spec", "clock_offset", "controller_spec",
    "free_ports", "listener_conflicts", "log_tail", "plan_network", "port_free", "process_alive",
    "relocate_to_free_ports", "restconf_url", "stop_processes", "twin_spec", "NetworkRun", "controller_available",
    "down",
]


# =============================================================================================
# a whole network


class NetworkRun:
    """Start a network's processes under one run directory, and stop them (``qkdsdn up``,
    ``qkdsdn demo``). ``start`` holds the run directory's lock until ``stop``; it raises
    ``AlreadyRunning`` if the network runs already, ``LaunchError`` on anything else."""

    def __init__(self, opts: UpOptions, *, free_ports: bool = False, grace_s: float = DEFAULT_GRACE_S,
                 ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S,
                 on_progress: Callable[[str, Running, str], None] | None = None,
                 stop_event: threading.Event | None = None):
        self.opts = opts
        self.free_ports = free_ports
        self.grace_s = grace_s
        self.ready_timeout_s = ready_timeout_s
        self.on_progress = on_progress
        self.stop_event = stop_event or threading.Event()
        self.run_dir = RunDir(opts.run_dir)
        self.launcher: Launcher | None = None
        self.network: Any = None
        self.bus_url: str | None = None
        self.source_file = Path(opts.network_file).absolute()
        self._locked = False

    # -- start --------------------------------------------------------------------------

    def start(self) -> "NetworkRun":
        from db.netfile import NetworkFileError, load

        rd = self.run_dir
        if not rd.try_lock():
            state = rd.read_state()
            raise AlreadyRunning(_running_message(state, rd), state)
        self._locked = True
        try:
            leftovers = rd.live_processes()
            if leftovers:
                names = ", ".join(f"{p.name} (pid {p.pid})" for p in leftovers)
                raise AlreadyRunning(f"processes of an earlier run in {rd.path} are still alive: {names}; "
                                     f"stop them with 'qkdsdn down --run-dir {rd.path}'", rd.read_state())
            opts = self.opts
            opts.run_dir = rd.path
            if self.free_ports:
                opts.network_file = relocate_to_free_ports(self.source_file, rd.path / "network.yaml")
            opts.network_file = Path(opts.network_file).absolute()
            try:
                self.network = load(opts.network_file)
            except NetworkFileError as exc:
                raise LaunchError(f"problems in the network file:\n{exc}") from None
            pki_dir = opts.pki_dir()
            if pki_dir is not None:
                self._ensure_pki(pki_dir)
                self._enrol_applications(pki_dir)
            conflicts = listener_conflicts(self.network, opts)
            if conflicts:
                raise LaunchError("cannot start: " + "; ".join(conflicts)
                                  + " (another network or program listens there; 'qkdsdn status' shows "
                                    "running networks, --free-ports moves this one to free ports)")
            rd.logs.mkdir(parents=True, exist_ok=True)
            state = {"network": self.network.name, "network_file": str(opts.network_file),
                     "source_file": str(self.source_file), "mode": "controller" if opts.controller else "local",
                     "tls": not opts.insecure_dev, "pki": str(pki_dir) if pki_dir else None,
                     "db": opts.db_url() if opts.controller else None, "bus": opts.bus,
                     "bus_kind": ("external" if opts.bus else "embedded") if opts.controller else None,
                     "started_at": time.time(), "clock_offset": clock_offset()}
            self.launcher = Launcher(rd, grace_s=self.grace_s, ready_timeout_s=self.ready_timeout_s,
                                     on_progress=self.on_progress, stop_event=self.stop_event, state=state)
            self.launcher.save_state("starting")
            # Group 0 (broker, twin) first: the agents' and controller's bus URL is known only
            # once the embedded broker listens.
            first = [broker_spec(opts, self.network)] if opts.controller and opts.bus is None else []
            first += [s for s in plan_network(self.network, opts, bus_url="-") if s.group == 0]
            started = {p.name: p for p in self.launcher.start(first)} if first else {}
            if opts.controller:
                self.bus_url = started["broker"].found["url"] if opts.bus is None else opts.bus
                self.launcher.state["bus"] = self.bus_url
            self.launcher.start([s for s in plan_network(self.network, opts, bus_url=self.bus_url)
                                 if s.group > 0])
            if opts.controller:
                self._wait_discovery()
            self.launcher.save_state("running")
        except BaseException:
            if self.launcher is not None:
                self.launcher.stop()
            self._unlock()
            raise
        return self

    def _wait_discovery(self) -> None:
        """Until the controller has discovered every key manager: its health report
        (GET /api/v1/health, checks.SDNControllerApp.nodes) says "up" for each node. A report
        without that part (another controller version) is not waited for."""
        controller = next(p for p in self.launcher.processes if p.spec.role == "controller")
        probe = controller_spec(self.network, self.opts, self.bus_url or "").probe
        assert isinstance(probe, HTTPProbe)
        deadline = time.monotonic() + self.ready_timeout_s
        names = {n.name for n in self.network.nodes}
        session = probe._get_session()  # noqa: SLF001 — the same authenticated session as the probe
        last_report = 0.0
        try:
            while True:
                if self.stop_event.is_set():
                    raise LaunchError("start interrupted")
                if not controller.alive():
                    raise LaunchError(f"controller exited with status {controller.returncode} "
                                      f"(log {controller.log_path}):\n{log_tail(controller.log_path)}")
                nodes = None
                try:
                    report = session.get(probe.url, timeout=probe.timeout).json()
                    nodes = report["checks"]["SDNControllerApp"]["nodes"]
                except (KeyError, TypeError, ValueError):
                    return  # no discovery report to wait for
                except Exception:  # noqa: BLE001 — connection trouble: try again until the deadline
                    nodes = {}
                if not isinstance(nodes, dict):
                    return
                missing = sorted(n for n in names if nodes.get(n) != "up")
                if not missing:
                    return
                now = time.monotonic()
                if now > deadline:
                    raise LaunchError(f"the controller has not discovered {', '.join(missing)} after "
                                      f"{self.ready_timeout_s:g} s (log {controller.log_path})")
                if now - last_report > 1.0:
                    last_report = now
                    self.launcher.on_progress("waiting", controller, "discovery of " + ", ".join(missing))
                self.stop_event.wait(0.2)
        finally:
            probe.close()

    def _enrol_applications(self, pki_dir: Path) -> None:
        """Applications without ``cert_sha256`` in the network file get the fingerprint of their
        certificate in the PKI, in RUN_DIR/network.yaml: access control (the controller's, and the
        agents' local one) identifies applications by that fingerprint, as the operator would enrol
        them by hand ('qkdsdn pki init' prints them; docs/network-file.md)."""
        import yaml

        from db.netfile import load
        from qkdsdn.pki import PkiLayout

        missing = [a.sae_id for a in self.network.applications if not a.cert_sha256]
        if not missing:
            return
        layout = PkiLayout(pki_dir)
        source = Path(self.opts.network_file)
        data = yaml.safe_load(source.read_text())
        enrolled = 0
        for item in data.get("applications") or []:
            if item.get("sae_id") in missing:
                cert, _key = layout.app(item["sae_id"])
                if cert.is_file():
                    item["cert_sha256"] = layout.fingerprint(cert)
                    enrolled += 1
        if not enrolled:
            return
        out = self.run_dir.path / "network.yaml"
        header = (f"# {self.source_file.name} as started by qkdsdn up: applications enrolled with the "
                  f"fingerprints of their certificates in {pki_dir}"
                  + (", listeners on free ports" if self.free_ports else "") + "\n")
        out.write_text(header + yaml.safe_dump(data, sort_keys=False))
        self.opts.network_file = out
        self.network = load(out)

    def _ensure_pki(self, pki_dir: Path) -> None:
        from qkdsdn.pki import PkiError, PkiLayout, init_pki

        generated = self.opts.pki is None
        if generated:
            try:
                init_pki(self.network, pki_dir)
            except (PkiError, OSError) as exc:
                raise LaunchError(f"cannot issue certificates into {pki_dir}: {exc}") from None
        elif not PkiLayout(pki_dir).ca_cert.is_file():
            raise LaunchError(f"{pki_dir} holds no ca.pem: run 'qkdsdn pki init NETWORK.yaml --out {pki_dir}'")

    # -- running ------------------------------------------------------------------------

    @property
    def processes(self) -> list[Running]:
        return list(self.launcher.processes) if self.launcher else []

    def exited(self) -> list[Running]:
        return self.launcher.exited() if self.launcher else []

    def state(self) -> dict:
        return dict(self.launcher.state) if self.launcher else {}

    # -- stop ---------------------------------------------------------------------------

    def stop(self) -> None:
        try:
            if self.launcher is not None:
                self.launcher.stop()
        finally:
            self._unlock()

    def _unlock(self) -> None:
        if self._locked:
            self.run_dir.unlock()
            self._locked = False

    def __enter__(self) -> "NetworkRun":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _running_message(state: dict | None, rd: RunDir) -> str:
    if not state:
        return f"a network is already starting or running in {rd.path}"
    pid = state.get("launcher_pid")
    since = state.get("started_at")
    when = time.strftime("%H:%M:%S", time.localtime(since)) if since else "?"
    return (f"network {state.get('network', '?')} is already running in {rd.path} (launcher pid {pid}, "
            f"since {when}, {state.get('status', '?')}): see 'qkdsdn status --run-dir {rd.path}', "
            f"stop it with 'qkdsdn down --run-dir {rd.path}'")


def down(run_dir: RunDir, *, grace_s: float = DEFAULT_GRACE_S,
         on_progress: Callable[[str, Running, str], None] | None = None) -> tuple[bool, list[Running]]:
    """Stop the network of a run directory: SIGTERM to its launcher (which stops its
    processes in order), then SIGTERM/SIGKILL to whatever of them is still alive. Returns
    (whether anything was running, processes that had to be killed)."""
    state = run_dir.read_state()
    if state is None:
        return False, []
    launcher_pid = state.get("launcher_pid")
    launcher_ticks = state.get("launcher_start_ticks")
    anything = False
    if launcher_pid and launcher_pid != os.getpid() and process_alive(launcher_pid, launcher_ticks):
        anything = True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(launcher_pid, signal.SIGTERM)
        # The launcher stops its children group by group, each within the grace period.
        groups = len({p.get("stop_group", p.get("group", 0)) for p in state.get("processes", [])}) or 1
        deadline = time.monotonic() + grace_s * (groups + 1)
        while process_alive(launcher_pid, launcher_ticks) and time.monotonic() < deadline:
            time.sleep(POLL_S)
        if process_alive(launcher_pid, launcher_ticks):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(launcher_pid, signal.SIGKILL)
    leftovers = run_dir.live_processes(state)
    killed: list[Running] = []
    if leftovers:
        anything = True
        killed = stop_processes(leftovers, grace_s=grace_s, on_progress=on_progress)
    # The launcher writes "stopped" itself; if it could not, we do.
    fresh = run_dir.read_state() or state
    if fresh.get("status") != "stopped" and not run_dir.locked_by_other():
        fresh["status"] = "stopped"
        run_dir.write_state(fresh)
    return anything, killed
