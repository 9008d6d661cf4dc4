"""Admission control: the life cycle of every key session (KSID) on the controller side.

Per session (DESIGN.md "Session life cycle", the paper's Fig. 2b):

    pending (waiting for the peer) -> accepted -> active -> terminated

- ``request``: a key manager forwards an authenticated ETSI 004 OPEN_CONNECT or the first
  ETSI 014 request of an application. The QoS is checked against the user's SLA; a QoS the
  SLA cannot grant is refused with ETSI 004 status 7 and a counter-proposal (the QoS clipped
  to the SLA). For 004 the session then waits for the peer application's OPEN_CONNECT on the
  same KSID, which arrives from the other endpoint's key manager; for 014 (an implicit
  session opened by the master SAE) there is no peer to wait for.
- With both ends present, routing is asked for a path whose residual key rate carries
  ``Max_bps``; failing that, the best feasible rate if it still reaches ``Min_bps`` (the
  application asked for anything in [Min_bps, Max_bps]: granted, status 0, with the granted
  rate in the returned QoS); below ``Min_bps`` the open fails with status 7 and a
  counter-proposal carrying the best feasible rate (status 4 when there is no path at all).
  The rate is reserved on every link of the path, every key manager on it gets a
  ``Configure`` and each requesting key manager a ``Reply`` (status 0, granted QoS, ``hops``).
- ``confirmation``: the session is active once every key manager confirmed its
  configuration; missing confirmations at the deadline roll the session back.
- ``key_request`` restarts the inactivity timer (the QoS ``TTL``); ``close`` from either
  endpoint key manager, timer expiry (``tick``) or a path failure without replacement
  (``link_down``) terminate it: ``Delete`` to every key manager on the route, reservations
  released, then the delete confirmations are collected.
- ``link_down`` moves a session to a replacement path, keeping its KSID, in confirmed steps:
  the nodes new to the route, then the changed ones from the destination back to the source,
  then the deletion of the old route's own nodes (``_reroute``); the next step is in the
  ``Outcome`` of the ``confirmation`` that completes the one before.

Reading of ETSI GS QKD 004 used here:
- OPEN_CONNECT blocks until both peers are connected or the QoS ``Timeout`` passes, so a peer
  that never arrives ends the call with status 6 (TIMEOUT_ERROR) and the pending session is
  dropped; status 1 ("peer not connected") belongs to a non-blocking variant we do not offer.
- A KSID is "in use" (status 5) for a second request from the same endpoint, for a request
  whose endpoints or interface differ from the pending session's, and for any request once the
  pair is complete and until the session's deletions are confirmed.
- Both peers share one QoS: the intersection of their requests (lower ``Max_bps``, ``Priority``,
  ``Jitter``, ``TTL``; higher ``Min_bps``), which keeps it within both users' SLAs.
  ``Key_chunk_size`` must be equal (both ends index the same key stream).
- Absent (None) QoS fields let the system choose: ``Max_bps`` the SLA's maximum, ``Min_bps`` 0,
  ``Priority`` the application's priority capped by the SLA, the rest from ``AdmissionConfig``;
  for the peer of a pending KSID, the values the KSID already holds (within the peer's SLA).
  Zero ``Key_chunk_size``, ``Max_bps``, ``Timeout`` or ``TTL`` is read the same way (a zero
  there is meaningless).
- Refusals that no QoS would fix (unknown or revoked user, destination outside the SLA,
  session quota used up, requester not an endpoint) carry status 4 and no counter-proposal.

Token bucket: rate = the granted rate; size = ``max(chunk bits, rate x Jitter / 1000)``
capped by the users' SLA ``bucket_bits`` (the mapping docs/key-management.md gives to ETSI
015: size = max_bandwidth x jitter / 1000). A ``Key_chunk_size`` larger than the SLA bucket
could never be served and is refused with a counter-proposal. Inactivity timeout = ``TTL``.

Everything here is deterministic: no I/O, no clock (every input carries ``now``, a datetime),
no threads. Each call returns an ``Outcome``: the actions for the shell to send, the ``Event``
rows to record and the ``to_session_row()`` of every session the call changed.
"""
from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Iterable, Mapping, Optional, Protocol, Sequence, Union

from db import models as m
from db.models import SessionState

from controller.access import SLAProfile, UserProfiles

ELEMENT = "admission_control"
INTERFACES = ("004", "014")
_UINT32_MAX = 2 ** 32 - 1
_KSID_MAX = 36  # db.models.Session.ksid


from qkdsdn.etsi004 import Status  # noqa: E402,F401  (ETSI 004 codes, shared with the key managers)


# --------------------------------------------------------------------------- routing, as admission needs it


# What admission needs from the routing element. ``controller.routing.RoutingElement``,
# ``Path`` and ``Reservations`` provide it; any other implementation may stand in.


class RoutePath(Protocol):
    """A path from routing: node names from source to destination, link names between them."""

    @property
    def nodes(self) -> Sequence[str]: ...

    @property
    def links(self) -> Sequence[str]: ...


class Routing(Protocol):
    def find_path(self, src: str, dst: str, rate_bps: float, *, exclude_links: Iterable[str] = (),
                  now: float) -> Optional[RoutePath]:
        """A path whose every link has residual key rate >= ``rate_bps``, or None."""

    def best_feasible_rate(self, src: str, dst: str, *, exclude_links: Iterable[str] = ()) -> float:
        """The highest rate any single path from ``src`` to ``dst`` could still carry (0: none;
        inf: unlimited)."""


class ReservationBook(Protocol):
    def reserve(self, ksid: str, path: RoutePath, rate: float) -> Any:
        """Reserve ``rate`` on every link of ``path`` for ``ksid``, all or nothing.

        A return value of ``False`` means nothing was reserved; anything else is success."""

    def release(self, ksid: str) -> Any:
        """Release whatever ``ksid`` holds (no error when it holds nothing)."""


# --------------------------------------------------------------------------- inputs


_ETSI_QOS = {"key_chunk_size": "Key_chunk_size", "max_bps": "Max_bps", "min_bps": "Min_bps",
             "jitter": "Jitter", "priority": "Priority", "timeout": "Timeout", "ttl": "TTL"}
# QoS members the key manager handles itself.
_ETSI_QOS_IGNORED = frozenset({"Metadata_mimetype"})


@dataclass(frozen=True)
class QoS:
    """ETSI 004 QoS. None: the system chooses."""

    key_chunk_size: Optional[int] = None  # bytes
    max_bps: Optional[int] = None
    min_bps: Optional[int] = None
    jitter: Optional[int] = None  # ms (docs/key-management.md)
    priority: Optional[int] = None
    timeout: Optional[int] = None  # ms
    ttl: Optional[int] = None  # s

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= _UINT32_MAX:
                raise ValueError(f"QoS {_ETSI_QOS[f.name]} must be an unsigned 32-bit integer, got {v!r}")

    def to_etsi(self) -> dict[str, int]:
        return {_ETSI_QOS[f.name]: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_etsi(cls, data: Mapping[str, Any] | None) -> "QoS":
        if not data:
            return cls()
        names = {v: k for k, v in _ETSI_QOS.items()}
        unknown = sorted(set(data) - set(names) - _ETSI_QOS_IGNORED)
        if unknown:
            raise ValueError(f"unknown QoS member(s): {', '.join(unknown)}")
        return cls(**{names[k]: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class AdmissionRequest:
    ksid: str
    interface: str  # "004" or "014"
    src_sae: str
    dst_sae: str
    src_node: str
    dst_node: str
    requesting_node: str  # the key manager that forwards the request
    user: str  # authenticated by access control
    qos: QoS = field(default_factory=QoS)

    def __post_init__(self) -> None:
        if self.interface not in INTERFACES:
            raise ValueError(f"interface must be one of {INTERFACES}, got {self.interface!r}")
        if not isinstance(self.ksid, str) or not 0 < len(self.ksid) <= _KSID_MAX:
            raise ValueError(f"KSID must be a non-empty string of at most {_KSID_MAX} characters")
        for name in ("src_sae", "dst_sae", "src_node", "dst_node", "requesting_node", "user"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty string")
        if not isinstance(self.qos, QoS):
            raise ValueError("qos must be a QoS")

    @property
    def requesting_sae(self) -> str:
        return self.src_sae if self.requesting_node == self.src_node else self.dst_sae

    @property
    def far_node(self) -> str:
        """The other endpoint's node, as seen from the requesting key manager."""
        return self.dst_node if self.requesting_node == self.src_node else self.src_node

    def endpoints(self) -> tuple[str, str, str, str, str]:
        return (self.interface, self.src_sae, self.dst_sae, self.src_node, self.dst_node)


@dataclass(frozen=True)
class AdmissionConfig:
    default_chunk_bytes: int = 32  # 256-bit keys
    default_jitter_ms: int = 1000  # bucket holds one second of key
    default_timeout_ms: int = 30_000  # peer wait of an OPEN_CONNECT
    default_ttl_s: int = 300  # inactivity timeout
    confirm_timeout_s: float = 10.0  # every KM must confirm its configuration within this
    delete_timeout_s: float = 10.0  # after this, missing delete confirmations are given up

    def __post_init__(self) -> None:
        for f in fields(self):
            if not getattr(self, f.name) > 0:
                raise ValueError(f"AdmissionConfig.{f.name} must be positive")


# --------------------------------------------------------------------------- outputs


@dataclass(frozen=True)
class Configure:
    """One key manager's configuration for a session (docs/key-management.md maps it to ETSI 015)."""

    node: str  # the key manager to configure
    ksid: str
    priority: int
    bucket_bits: int
    rate_bps: int
    inactivity_timeout_s: float
    prev_hop: Optional[str]  # None at the source
    next_hop: Optional[str]  # None at the destination


@dataclass(frozen=True)
class Delete:
    node: str
    ksid: str


@dataclass(frozen=True)
class Reply:
    """The answer to a requesting key manager."""

    node: str
    ksid: str
    status: Status
    qos: Optional[QoS]  # granted QoS (status 0) or counter-proposal (status 7)
    hops: Optional[int]  # trusted nodes crossed (ETSI 004 metadata "hops"; 0 = direct)
    reason: str


Action = Union[Configure, Delete, Reply]


@dataclass
class Outcome:
    actions: list[Action] = field(default_factory=list)
    events: list[m.Event] = field(default_factory=list)
    # to_session_row() of every session this call changed, in the order of the changes.
    sessions: list[dict[str, Any]] = field(default_factory=list)
    # Set when the input did not apply (unknown KSID, unexpected confirmation...).
    error: Optional[str] = None

    @property
    def replies(self) -> list[Reply]:
        return [a for a in self.actions if isinstance(a, Reply)]

    @property
    def configures(self) -> list[Configure]:
        return [a for a in self.actions if isinstance(a, Configure)]

    @property
    def deletes(self) -> list[Delete]:
        return [a for a in self.actions if isinstance(a, Delete)]

    def extend(self, other: "Outcome") -> None:
        self.actions += other.actions
        self.events += other.events
        self.sessions += other.sessions


# --------------------------------------------------------------------------- session


@dataclass
class AdmissionSession:
    """Admission control's view of one KSID. Read it; change it only through AdmissionControl."""

    ksid: str
    interface: str
    src_sae: str
    dst_sae: str
    src_node: str
    dst_node: str
    qos: QoS  # complete; the intersection of the requests so far
    created_at: dt.datetime
    state: SessionState = SessionState.PENDING
    requests: dict[str, AdmissionRequest] = field(default_factory=dict)  # by requesting node
    users: list[str] = field(default_factory=list)
    bucket_cap_bits: Optional[int] = None  # lowest SLA bucket of the users
    route: Optional[list[str]] = None
    links: Optional[list[str]] = None
    rate_bps: Optional[int] = None
    bucket_bits: Optional[int] = None
    reserved: bool = False
    # The configuration each key manager holds (or was sent last); a node leaves once its Delete is sent.
    sent: dict[str, Configure] = field(default_factory=dict)
    # The steps of a re-configuration not sent yet: the next one goes once every node of the one
    # before confirmed (``AdmissionControl._reroute`` says why).
    staged: list[list[Action]] = field(default_factory=list)
    awaiting_config: set[str] = field(default_factory=set)
    awaiting_delete: set[str] = field(default_factory=set)
    updated_at: Optional[dt.datetime] = None
    last_activity: Optional[dt.datetime] = None
    # PENDING: the peer-wait deadline; ACTIVE: inactivity expiry.
    expires_at: Optional[dt.datetime] = None
    config_deadline: Optional[dt.datetime] = None
    delete_deadline: Optional[dt.datetime] = None
    terminated_at: Optional[dt.datetime] = None
    reason: Optional[str] = None

    @property
    def endpoints(self) -> tuple[str, str, str, str, str]:
        return (self.interface, self.src_sae, self.dst_sae, self.src_node, self.dst_node)

    @property
    def hops(self) -> Optional[int]:
        return None if self.route is None else max(0, len(self.route) - 2)

    @property
    def inactivity_timeout_s(self) -> int:
        return self.qos.ttl  # type: ignore[return-value]  # complete QoS

    def granted_qos(self) -> Optional[QoS]:
        if self.rate_bps is None:
            return None
        return replace(self.qos, max_bps=self.rate_bps, min_bps=min(self.qos.min_bps or 0, self.rate_bps))

    def to_session_row(self) -> dict[str, Any]:
        """The fields of a ``db.models.Session`` row for this session."""
        primary = self.requests.get(self.src_node) or next(iter(self.requests.values()), None)
        granted = self.granted_qos()
        return {
            "ksid": self.ksid,
            "interface": self.interface,
            "src_sae_id": self.src_sae,
            "dst_sae_id": self.dst_sae,
            "src_node": self.src_node,
            "dst_node": self.dst_node,
            "user": primary.user if primary is not None else (self.users[0] if self.users else None),
            "qos": (granted or self.qos).to_etsi(),
            "priority": self.qos.priority or 0,
            "state": self.state,
            "route": list(self.route) if self.route is not None else None,
            "reservations": ({link: float(self.rate_bps) for link in self.links}
                             if self.reserved and self.links and self.rate_bps is not None else None),
            "rate_bps": float(self.rate_bps) if self.rate_bps is not None else None,
            "inactivity_timeout_s": float(self.inactivity_timeout_s),
            "created_at": self.created_at,
            "updated_at": self.updated_at or self.created_at,
            "last_activity": self.last_activity,
            "expires_at": self.expires_at,
            "terminated_at": self.terminated_at,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class _Refusal:
    status: Status
    reason: str
    counter: Optional[QoS] = None


# --------------------------------------------------------------------------- decisions


class AdmissionControl:
    """Admission decisions over a user-profile snapshot, a routing element and its reservations.

    Not thread-safe: the os-ken app shell feeds it from one thread. Path search and reservation
    are separate calls, so another thread booking the same links in between makes the
    reservation fail; admission then searches once more (``_place``).
    Sessions count against the user's ``max_sessions`` from their first request (pending
    included) until they are terminated.
    """

    def __init__(self, profiles: UserProfiles, routing: Routing, reservations: ReservationBook,
                 config: AdmissionConfig | None = None):
        self._profiles = profiles
        self._routing = routing
        self._reservations = reservations
        self._config = config or AdmissionConfig()
        self._sessions: dict[str, AdmissionSession] = {}
        self._down_links: set[str] = set()

    # ----------------------------------------------------------------- queries

    @property
    def config(self) -> AdmissionConfig:
        return self._config

    def refresh(self, profiles: UserProfiles) -> None:
        """Check later requests against ``profiles`` (admitted sessions keep their grant)."""
        self._profiles = profiles

    def session(self, ksid: str) -> Optional[AdmissionSession]:
        return self._sessions.get(ksid)

    def sessions(self) -> list[AdmissionSession]:
        return [self._sessions[k] for k in sorted(self._sessions)]

    def active_sessions_of(self, user: str) -> int:
        """Sessions that count against ``user``'s SLA quota (not terminated)."""
        return sum(1 for s in self._sessions.values() if s.state is not SessionState.TERMINATED and user in s.users)

    def next_deadline(self) -> Optional[dt.datetime]:
        """When ``tick`` has something to do next (None: nothing is timed)."""
        times = []
        for s in self._sessions.values():
            if s.state in (SessionState.PENDING, SessionState.ACTIVE) and s.expires_at is not None:
                times.append(s.expires_at)
            times += [t for t in (s.config_deadline, s.delete_deadline) if t is not None]
        return min(times, default=None)

    # ----------------------------------------------------------------- inputs

    def request(self, req: AdmissionRequest, now: dt.datetime) -> Outcome:
        """An authenticated open request (004 OPEN_CONNECT or first 014 request) from a key manager."""
        existing = self._sessions.get(req.ksid)
        if existing is not None:
            return self._join(existing, req, now)

        if req.src_node == req.dst_node:
            return self._refuse(req, _Refusal(Status.NO_QKD_CONNECTION,
                                              f"both applications are homed at {req.src_node}; "
                                              "a session needs two key managers"), now)
        if req.requesting_node not in (req.src_node, req.dst_node):
            return self._refuse(req, _Refusal(Status.NO_QKD_CONNECTION,
                                              f"{req.requesting_node} is not an endpoint of the session "
                                              f"({req.src_node} -> {req.dst_node})"), now)
        qos, sla, refusal = self._check(req, exclude=None)
        if refusal is not None:
            return self._refuse(req, refusal, now)
        assert sla is not None
        s = AdmissionSession(ksid=req.ksid, interface=req.interface, src_sae=req.src_sae, dst_sae=req.dst_sae,
                             src_node=req.src_node, dst_node=req.dst_node, qos=qos, created_at=now,
                             requests={req.requesting_node: req}, users=[req.user],
                             bucket_cap_bits=sla.bucket_bits, updated_at=now)
        self._sessions[s.ksid] = s
        if req.interface == "014":
            # Implicit session: the slave SAE never opens it, so nothing to wait for.
            return self._admit(s, now)
        s.expires_at = now + dt.timedelta(milliseconds=qos.timeout)  # type: ignore[arg-type]
        out = Outcome()
        self._event(out, s, "session_pending", now, node=req.requesting_node,
                    waiting_for=req.far_node, timeout_ms=qos.timeout, qos=qos.to_etsi(), user=req.user)
        self._row(out, s)
        return out

    def confirmation(self, ksid: str, node: str, now: dt.datetime, *, deleted: bool = False) -> Outcome:
        """Key manager ``node`` applied the configuration (``deleted``: the deletion) of ``ksid``."""
        s = self._sessions.get(ksid)
        if s is None:
            return Outcome(error=f"unknown KSID {ksid}")
        out = Outcome()
        if deleted:
            if node not in s.awaiting_delete:
                return Outcome(error=f"no deletion of {ksid} pending at {node}")
            s.awaiting_delete.discard(node)
            if not s.awaiting_delete:
                s.delete_deadline = None
                if s.state is SessionState.TERMINATED:
                    self._forget(out, s, now)
            return out
        if s.state is SessionState.TERMINATED:
            # The Delete already sent to that node covers a configuration applied late.
            return Outcome(error=f"session {ksid} is terminated")
        if node not in s.awaiting_config:
            return Outcome(error=f"no configuration of {ksid} pending at {node}")
        s.awaiting_config.discard(node)
        if s.awaiting_config:
            return out
        s.config_deadline = None
        self._advance(out, s, now)
        if s.awaiting_config:
            return out  # the next step of a re-route went out
        s.updated_at = now
        if s.state is SessionState.ACCEPTED:
            s.state = SessionState.ACTIVE
            s.last_activity = now
            s.expires_at = now + dt.timedelta(seconds=s.inactivity_timeout_s)
            self._event(out, s, "session_active", now, route=list(s.route or []), rate_bps=s.rate_bps)
        else:
            self._event(out, s, "session_reconfigured", now, route=list(s.route or []), rate_bps=s.rate_bps)
        self._row(out, s)
        return out

    def failure(self, ksid: str, node: str, reason: str, now: dt.datetime) -> Outcome:
        """Key manager ``node`` could not apply the configuration of ``ksid``: roll the session back."""
        s = self._sessions.get(ksid)
        if s is None:
            return Outcome(error=f"unknown KSID {ksid}")
        if s.state not in (SessionState.ACCEPTED, SessionState.ACTIVE) or node not in s.awaiting_config:
            return Outcome(error=f"no configuration of {ksid} pending at {node}")
        out = Outcome()
        self._terminate(out, s, now, f"configuration failed at {node}: {reason}", node=node,
                        kind="configuration_failed")
        return out

    def key_request(self, ksid: str, now: dt.datetime) -> Outcome:
        """A key request on ``ksid``: restarts its inactivity timer."""
        s = self._sessions.get(ksid)
        if s is None or s.state is SessionState.TERMINATED:
            return Outcome(error=f"no live session {ksid}")
        if s.state is SessionState.PENDING:
            return Outcome(error=f"session {ksid} is waiting for the peer")
        s.last_activity = s.updated_at = now
        if s.state is SessionState.ACTIVE:
            s.expires_at = now + dt.timedelta(seconds=s.inactivity_timeout_s)
        out = Outcome()
        self._row(out, s)
        return out

    def close(self, ksid: str, node: str, now: dt.datetime) -> Outcome:
        """An endpoint application closed ``ksid`` at key manager ``node``."""
        s = self._sessions.get(ksid)
        if s is None:
            # Normal when the peer closed first and the session is gone already.
            return Outcome(error=f"unknown KSID {ksid}")
        if node not in (s.src_node, s.dst_node):
            out = Outcome(error=f"{node} is not an endpoint of {ksid}")
            self._event(out, s, "close_refused", now, node=node, reason=out.error)
            return out
        if s.state is SessionState.TERMINATED:
            return Outcome()
        out = Outcome()
        self._terminate(out, s, now, f"closed at {node}", node=node, status=Status.NO_QKD_CONNECTION, kind="closed")
        return out

    def tick(self, now: dt.datetime) -> Outcome:
        """Fire every timer that is due at ``now``."""
        out = Outcome()
        for ksid in sorted(self._sessions):
            s = self._sessions[ksid]
            if s.state is SessionState.PENDING and s.expires_at is not None and now >= s.expires_at:
                self._terminate(out, s, now, "peer did not open the session within the timeout",
                                status=Status.TIMEOUT, kind="peer_timeout")
            elif s.state is not SessionState.TERMINATED and s.config_deadline is not None \
                    and now >= s.config_deadline:
                self._terminate(out, s, now, "configuration not confirmed by "
                                + ", ".join(sorted(s.awaiting_config)), kind="configuration_timeout")
            elif s.state is SessionState.ACTIVE and s.expires_at is not None and now >= s.expires_at:
                self._terminate(out, s, now, "inactivity timeout", kind="inactivity_timeout")
            if s.delete_deadline is not None and now >= s.delete_deadline:
                self._event(out, s, "delete_unconfirmed", now, nodes=sorted(s.awaiting_delete))
                s.awaiting_delete.clear()
                s.delete_deadline = None
                if s.state is SessionState.TERMINATED:
                    self._forget(out, s, now)
        return out

    def link_down(self, link: str, now: dt.datetime) -> Outcome:
        """Link ``link`` failed: move every session that uses it to a replacement path, or end it."""
        self._down_links.add(link)
        out = Outcome()
        for ksid in sorted(self._sessions):
            s = self._sessions[ksid]
            if s.state in (SessionState.ACCEPTED, SessionState.ACTIVE) and s.links and link in s.links:
                self._reroute(out, s, link, now)
        return out

    def link_up(self, link: str) -> None:
        """Link ``link`` may carry new paths again (sessions stay where they are)."""
        self._down_links.discard(link)

    # ----------------------------------------------------------------- steps

    def _join(self, s: AdmissionSession, req: AdmissionRequest, now: dt.datetime) -> Outcome:
        if s.state is not SessionState.PENDING:
            return self._refuse(req, _Refusal(Status.KSID_IN_USE, f"KSID {s.ksid} is in use ({s.state.value})"), now)
        if req.endpoints() != s.endpoints:
            return self._refuse(req, _Refusal(
                Status.KSID_IN_USE, f"KSID {s.ksid} is in use by a {s.interface} session "
                f"{s.src_sae}@{s.src_node} -> {s.dst_sae}@{s.dst_node}"), now)
        if req.requesting_node not in (s.src_node, s.dst_node):
            return self._refuse(req, _Refusal(Status.NO_QKD_CONNECTION,
                                              f"{req.requesting_node} is not an endpoint of the session "
                                              f"({s.src_node} -> {s.dst_node})"), now)
        if req.requesting_node in s.requests:
            return self._refuse(req, _Refusal(Status.KSID_IN_USE,
                                              f"KSID {s.ksid} is already open at {req.requesting_node}"), now)
        qos, sla, refusal = self._check(req, exclude=s)
        if refusal is not None:
            return self._refuse(req, refusal, now)
        assert sla is not None
        if qos.key_chunk_size != s.qos.key_chunk_size:
            return self._refuse(req, _Refusal(
                Status.QOS_NOT_MET, f"Key_chunk_size {qos.key_chunk_size} differs from the peer's "
                f"{s.qos.key_chunk_size}", replace(qos, key_chunk_size=s.qos.key_chunk_size)), now)
        both = _intersect(s.qos, qos)
        if both.min_bps > both.max_bps:  # type: ignore[operator]
            return self._refuse(req, _Refusal(
                Status.QOS_NOT_MET, f"Min_bps {both.min_bps} exceeds the Max_bps {both.max_bps} both peers accept",
                replace(qos, max_bps=both.max_bps,
                        min_bps=min(qos.min_bps, both.max_bps))), now)  # type: ignore[type-var]
        s.requests[req.requesting_node] = req
        if req.user not in s.users:
            s.users.append(req.user)
        s.bucket_cap_bits = min(s.bucket_cap_bits or sla.bucket_bits, sla.bucket_bits)
        s.qos = both
        return self._admit(s, now)

    def _admit(self, s: AdmissionSession, now: dt.datetime) -> Outcome:
        out = Outcome()
        q = s.qos
        path, rate, best = self._place(s.ksid, s.src_node, s.dst_node, q, now)
        if path is None:
            if best >= 1:
                counter = replace(q, max_bps=best, min_bps=best)
                self._terminate(out, s, now, f"no path carries Min_bps {q.min_bps}; best feasible rate {best} bit/s",
                                status=Status.QOS_NOT_MET, counter=counter, reply_all=True, kind="qos_not_met")
            else:
                self._terminate(out, s, now, f"no path from {s.src_node} to {s.dst_node}",
                                status=Status.NO_QKD_CONNECTION, reply_all=True, kind="no_path")
            return out
        s.reserved = True
        s.rate_bps = rate
        s.bucket_bits = self._bucket(s, rate)
        s.route, s.links = list(path.nodes), list(path.links)
        s.state = SessionState.ACCEPTED
        s.updated_at = now
        s.expires_at = None
        # One step: no application has its answer (and none asks for keys) before every key
        # manager confirmed (controller.bus_adapter.AdmissionReplies holds the status 0).
        self._send(out, s, [self._configure(s, node, entry) for node, entry in _entries(s.route).items()], now)
        granted = s.granted_qos()
        for node in sorted(s.requests, key=lambda n: (n != s.src_node, n)):
            out.actions.append(Reply(node=node, ksid=s.ksid, status=Status.SUCCESSFUL, qos=granted, hops=s.hops,
                                     reason="accepted"))
        self._event(out, s, "session_accepted", now, route=list(s.route), links=list(s.links), rate_bps=rate,
                    bucket_bits=s.bucket_bits, hops=s.hops, qos=granted.to_etsi() if granted else None,
                    users=list(s.users))
        self._row(out, s)
        return out

    def _reroute(self, out: Outcome, s: AdmissionSession, link: str, now: dt.datetime) -> None:
        old_route = list(s.route or [])
        # The session's own reservation must not count against its replacement path.
        self._reservations.release(s.ksid)
        s.reserved = False
        path, rate, _best = self._place(s.ksid, s.src_node, s.dst_node, s.qos, now)
        if path is None:
            self._terminate(out, s, now, f"link {link} down and no replacement path", kind="path_failure")
            return
        s.reserved = True
        s.rate_bps = rate
        s.bucket_bits = self._bucket(s, rate)
        s.route, s.links = list(path.nodes), list(path.links)
        new = [self._configure(s, n, e) for n, e in _entries(s.route).items()]
        # Make before break, one step at a time, so that no relay message meets a key manager that
        # does not know its sender. Key managers send only to the hops they hold (the source
        # forwards keys towards the destination), so:
        # 1. the nodes new to the route, all at once: nobody sends to them yet;
        # 2. the nodes on both routes whose configuration changes, one by one from the destination
        #    back to the source: each switches only once everything downstream of it on the new
        #    route knows the session; the source goes last;
        # 3. the nodes only on the old route, deleted once the new route is confirmed: the old
        #    route carried the messages still in flight.
        # A step goes out when every node of the one before confirmed (``confirmation``); a key
        # manager applies its configuration on receipt, so sending them together would leave the
        # order to the bus.
        fresh = [c for c in new if c.node not in s.sent]
        moved = [c for c in reversed(new) if c.node in s.sent and s.sent[c.node] != c]
        obsolete = [n for n in s.sent if n not in s.route]
        s.staged = ([fresh] if fresh else []) + [[c] for c in moved] \
            + ([[Delete(node=n, ksid=s.ksid) for n in obsolete]] if obsolete else [])
        # A step of an earlier re-route still unconfirmed goes first (its nodes stay awaited).
        s.awaiting_config &= set(s.route)
        if not s.awaiting_config:
            s.config_deadline = None
        s.updated_at = now
        self._event(out, s, "session_rerouted", now, link=link, old_route=old_route, route=list(s.route),
                    links=list(s.links), rate_bps=rate, configured=[c.node for c in fresh + moved],
                    deleted=obsolete)
        self._advance(out, s, now)
        self._row(out, s)

    def _send(self, out: Outcome, s: AdmissionSession, step: list[Action], now: dt.datetime) -> None:
        """Send one step of Configure / Delete actions; its configurations are then awaited."""
        for a in step:
            if isinstance(a, Configure):
                s.sent[a.node] = a
                s.awaiting_config.add(a.node)
                s.config_deadline = now + dt.timedelta(seconds=self._config.confirm_timeout_s)
            elif isinstance(a, Delete):
                s.sent.pop(a.node, None)
                s.awaiting_delete.add(a.node)
                s.delete_deadline = now + dt.timedelta(seconds=self._config.delete_timeout_s)
        out.actions += step

    def _advance(self, out: Outcome, s: AdmissionSession, now: dt.datetime) -> None:
        """Send the staged steps up to the next one that must be confirmed."""
        while s.staged and not s.awaiting_config:
            self._send(out, s, s.staged.pop(0), now)

    def _terminate(self, out: Outcome, s: AdmissionSession, now: dt.datetime, reason: str, *,
                   node: Optional[str] = None, status: Status = Status.NO_QKD_CONNECTION,
                   counter: Optional[QoS] = None, reply_all: bool = False, kind: str) -> None:
        """End ``s``. Before acceptance the waiting key managers get a Reply with ``status`` (except
        ``node``, the one that ended it); after, every KM on the route gets a Delete."""
        was = s.state
        if was is SessionState.PENDING or reply_all:
            for n in sorted(s.requests, key=lambda n: (n != s.src_node, n)):
                if n != node:
                    out.actions.append(Reply(node=n, ksid=s.ksid, status=status, qos=counter, hops=None,
                                             reason=reason))
        deletes: list[str] = []
        if was in (SessionState.ACCEPTED, SessionState.ACTIVE):
            # Every node that holds (or was sent) a configuration: the route's, and those of the old
            # route a re-route had not deleted yet; never a node a staged step had not reached.
            route = list(s.route or [])
            deletes = [n for n in route if n in s.sent] + [n for n in s.sent if n not in route]
            out.actions += [Delete(node=n, ksid=s.ksid) for n in deletes]
        s.sent.clear()
        s.staged.clear()
        if s.reserved:
            # Released at once: a key manager that never confirms must not keep the bandwidth.
            self._reservations.release(s.ksid)
            s.reserved = False
        s.state = SessionState.TERMINATED
        s.reason = reason
        s.terminated_at = s.updated_at = now
        s.expires_at = s.config_deadline = None
        s.awaiting_config.clear()
        s.awaiting_delete |= set(deletes)
        if deletes:
            s.delete_deadline = now + dt.timedelta(seconds=self._config.delete_timeout_s)
        self._event(out, s, "session_terminated", now, node=node, cause=kind, reason=reason,
                    previous_state=was.value, status=int(status) if (was is SessionState.PENDING or reply_all)
                    else None, counter_proposal=counter.to_etsi() if counter else None, deleted=deletes)
        self._row(out, s)
        if not s.awaiting_delete:
            self._forget(out, s, now)

    def _forget(self, out: Outcome, s: AdmissionSession, now: dt.datetime) -> None:
        self._sessions.pop(s.ksid, None)
        self._event(out, s, "session_removed", now)

    def _refuse(self, req: AdmissionRequest, refusal: _Refusal, now: dt.datetime) -> Outcome:
        out = Outcome()
        out.actions.append(Reply(node=req.requesting_node, ksid=req.ksid, status=refusal.status,
                                 qos=refusal.counter, hops=None, reason=refusal.reason))
        out.events.append(m.Event(ts=now, element=ELEMENT, node=req.requesting_node, ksid=req.ksid,
                                  kind="request_rejected",
                                  details={"interface": req.interface, "src_sae": req.src_sae, "dst_sae": req.dst_sae,
                                           "src_node": req.src_node, "dst_node": req.dst_node, "user": req.user,
                                           "status": int(refusal.status), "reason": refusal.reason,
                                           "qos": req.qos.to_etsi(),
                                           "counter_proposal": refusal.counter.to_etsi() if refusal.counter
                                           else None}))
        return out

    # ----------------------------------------------------------------- helpers

    def _check(self, req: AdmissionRequest, exclude: Optional[AdmissionSession]
               ) -> tuple[QoS, Optional[SLAProfile], Optional[_Refusal]]:
        """The request's QoS with the system's choices filled in, and the SLA verdict on it."""
        user = self._profiles.users.get(req.user)
        empty = req.qos
        if user is None:
            return empty, None, _Refusal(Status.NO_QKD_CONNECTION, f"unknown user {req.user!r}")
        if user.revoked:
            return empty, None, _Refusal(Status.NO_QKD_CONNECTION, f"user {req.user!r} revoked")
        sla = user.sla
        if sla is None:
            return empty, None, _Refusal(Status.NO_QKD_CONNECTION, f"user {req.user!r} has no SLA")
        qos = self._resolve(req, sla, exclude.qos if exclude is not None else None)
        if not sla.allows(req.far_node):
            return qos, sla, _Refusal(Status.NO_QKD_CONNECTION,
                                      f"destination {req.far_node} is not allowed by the SLA of {req.user!r}")
        in_use = self.active_sessions_of(req.user) - (1 if exclude is not None and req.user in exclude.users else 0)
        if in_use >= sla.max_sessions:
            return qos, sla, _Refusal(Status.NO_QKD_CONNECTION,
                                      f"user {req.user!r} already has {in_use} of {sla.max_sessions} sessions")
        problems: list[str] = []
        counter = qos
        if qos.max_bps > sla.max_bps:  # type: ignore[operator]
            problems.append(f"Max_bps {qos.max_bps} exceeds the SLA's {sla.max_bps}")
            counter = replace(counter, max_bps=sla.max_bps)
        if counter.min_bps > counter.max_bps:  # type: ignore[operator]
            problems.append(f"Min_bps {qos.min_bps} exceeds Max_bps {counter.max_bps}")
            counter = replace(counter, min_bps=counter.max_bps)
        if qos.priority > sla.max_priority:  # type: ignore[operator]
            problems.append(f"Priority {qos.priority} exceeds the SLA's {sla.max_priority}")
            counter = replace(counter, priority=sla.max_priority)
        if qos.key_chunk_size * 8 > sla.bucket_bits:  # type: ignore[operator]
            problems.append(f"Key_chunk_size {qos.key_chunk_size} bytes exceeds the SLA's bucket of "
                            f"{sla.bucket_bits} bits")
            counter = replace(counter, key_chunk_size=sla.bucket_bits // 8)
        if problems:
            return qos, sla, _Refusal(Status.QOS_NOT_MET, "; ".join(problems), counter)
        return qos, sla, None

    def _resolve(self, req: AdmissionRequest, sla: SLAProfile, registered: Optional[QoS]) -> QoS:
        """Fill the fields the application left to the system. For the peer of a pending session
        (``registered``: the QoS the KSID holds) they take the registered values, within its SLA."""
        q, c, r = req.qos, self._config, registered
        if r is None:
            max_bps = q.max_bps or sla.max_bps
            min_bps = q.min_bps if q.min_bps is not None else 0
        else:
            max_bps = q.max_bps or min(r.max_bps, sla.max_bps)  # type: ignore[type-var]
            min_bps = q.min_bps if q.min_bps is not None else min(r.min_bps, max_bps)  # type: ignore[type-var]
        priority = q.priority
        if priority is None:
            if r is not None:
                priority = min(r.priority, sla.max_priority)  # type: ignore[type-var]
            else:
                app = self._profiles.applications.get(req.requesting_sae)
                priority = min(app.priority if app is not None else 0, sla.max_priority)
        return QoS(key_chunk_size=q.key_chunk_size or (r.key_chunk_size if r else c.default_chunk_bytes),
                   max_bps=max_bps, min_bps=min_bps,
                   jitter=q.jitter if q.jitter is not None else (r.jitter if r else c.default_jitter_ms),
                   priority=priority,
                   timeout=q.timeout or (r.timeout if r else c.default_timeout_ms),
                   ttl=q.ttl or (r.ttl if r else c.default_ttl_s))

    def _place(self, ksid: str, src: str, dst: str, q: QoS, now: dt.datetime
               ) -> tuple[Optional[RoutePath], int, int]:
        """Find a path for ``q`` and reserve it: (path, granted rate, best feasible rate), or
        (None, 0, best) when not even ``Min_bps`` fits. ``Max_bps`` first, then the best feasible
        rate if it reaches ``Min_bps``."""
        exclude = tuple(sorted(self._down_links))
        when = now.timestamp()  # routing takes POSIX seconds
        best = 0
        # Search and reservation are two steps: when another thread took the residual in
        # between, the reservation fails and one fresh search settles it.
        for _attempt in range(2):
            path = self._routing.find_path(src, dst, q.max_bps,  # type: ignore[arg-type]
                                           exclude_links=exclude, now=when)
            rate: int = q.max_bps  # type: ignore[assignment]
            if path is None:
                feasible = self._routing.best_feasible_rate(src, dst, exclude_links=exclude)
                # inf: links of unknown rate; never above what was asked anyway.
                best = max(0, int(math.floor(min(feasible, q.max_bps))))  # type: ignore[type-var]
                rate = best
                if rate < max(q.min_bps, 1):  # type: ignore[type-var]
                    return None, 0, best
                path = self._routing.find_path(src, dst, rate, exclude_links=exclude, now=when)
                if path is None:
                    return None, 0, best
            _checked_path(path, src, dst)
            if self._reservations.reserve(ksid, path, rate) is not False:
                return path, rate, max(best, rate)
        return None, 0, best

    def _bucket(self, s: AdmissionSession, rate: int) -> int:
        chunk_bits = s.qos.key_chunk_size * 8  # type: ignore[operator]
        burst = max(chunk_bits, math.ceil(rate * s.qos.jitter / 1000))  # type: ignore[operator]
        return min(burst, s.bucket_cap_bits) if s.bucket_cap_bits is not None else burst

    def _configure(self, s: AdmissionSession, node: str, entry: tuple[Optional[str], Optional[str]]) -> Configure:
        return Configure(node=node, ksid=s.ksid, priority=s.qos.priority,  # type: ignore[arg-type]
                         bucket_bits=s.bucket_bits, rate_bps=s.rate_bps,  # type: ignore[arg-type]
                         inactivity_timeout_s=float(s.inactivity_timeout_s), prev_hop=entry[0], next_hop=entry[1])

    @staticmethod
    def _event(out: Outcome, s: AdmissionSession, kind: str, now: dt.datetime, *, node: Optional[str] = None,
               **details: Any) -> None:
        out.events.append(m.Event(ts=now, element=ELEMENT, node=node, ksid=s.ksid, kind=kind,
                                  details={"state": s.state.value, **details}))

    @staticmethod
    def _row(out: Outcome, s: AdmissionSession) -> None:
        out.sessions.append(s.to_session_row())


def _intersect(a: QoS, b: QoS) -> QoS:
    """The QoS both peers accept (both complete)."""
    return QoS(key_chunk_size=a.key_chunk_size, max_bps=min(a.max_bps, b.max_bps),  # type: ignore[type-var]
               min_bps=max(a.min_bps, b.min_bps), jitter=min(a.jitter, b.jitter),  # type: ignore[type-var]
               priority=min(a.priority, b.priority), timeout=a.timeout,  # type: ignore[type-var]
               ttl=min(a.ttl, b.ttl))  # type: ignore[type-var]


def _entries(route: Sequence[str]) -> dict[str, tuple[Optional[str], Optional[str]]]:
    """Each node's forwarding entry: (previous hop, next hop); None at the ends."""
    return {n: (route[i - 1] if i > 0 else None, route[i + 1] if i + 1 < len(route) else None)
            for i, n in enumerate(route)}


def _checked_path(path: RoutePath, src: str, dst: str) -> RoutePath:
    nodes, links = list(path.nodes), list(path.links)
    if len(nodes) < 2 or nodes[0] != src or nodes[-1] != dst or len(links) != len(nodes) - 1 \
            or len(set(nodes)) != len(nodes):
        raise ValueError(f"routing returned an invalid path from {src} to {dst}: nodes={nodes} links={links}")
    return path
