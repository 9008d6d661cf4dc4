"""Access and admission control as the key manager sees them.

The key manager needs four things from the control plane (DESIGN.md, session
life cycle): authenticate an application's user, admit a session (which ends
with every key manager on the route configured, or with a refusal), hear that
a session is still in use, and hear that it closed. ``ControlPlane`` is that
interface.

``LocalControlPlane`` is the implementation that needs no controller: every
agent reads the same network file. For each session one key manager is the
*admission authority*: the home node of the session's source SAE. The other
endpoint's key manager forwards its admission request there over the relay
channel (``POST /relay/v1/control/admit``). The authority checks the user's SLA,
waits for both endpoints (ETSI 004: an OPEN_CONNECT whose peer has not come
within its Timeout gets status 1 and stays pending, so the peer may still open
later) or not (ETSI 014), computes the route with
networkx (hop count; ties broken by the order of the network file) and
configures every key manager on it through their ETSI 015 RESTCONF, exactly as
the controller does. Limits, stated: each authority counts only the sessions it
admitted against ``max_sessions``, and it reserves no link bandwidth (there is
no network-wide view without a controller). The controller issue replaces this
class with bus clients.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import networkx as nx

from db.netfile import Network

log = logging.getLogger("qkdsdn.agent.control")

# ETSI 004 status codes used here (agents.core.session.Status has them all).
SUCCESSFUL, PEER_NOT_CONNECTED, NO_QKD_CONNECTION, KSID_IN_USE, TIMEOUT, QOS_NOT_MET = 0, 1, 4, 5, 6, 7
DEFAULT_INACTIVITY_S = 300
# How long an OPEN_CONNECT whose peer has not opened yet stays pending at the authority (the key
# manager's own set-up timeout, KeyManagerLogic.setup_timeout_s, is the same).
PENDING_TTL_S = 300.0


@dataclass(frozen=True)
class AuthResult:
    ok: bool
    user: str | None = None
    reason: str = ""


@dataclass(frozen=True)
class AdmissionRequest:
    """What a key manager asks admission control for one endpoint of a session."""

    ksid: str
    interface: str  # "004" or "014"
    user: str
    requesting_node: str
    local_sae: str
    source_sae: str
    destination_sae: str
    qos: dict[str, Any]  # ETSI 004 QoS names (Key_chunk_size, Max_bps, ..., Timeout ms, TTL s)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, raw: Any) -> "AdmissionRequest":
        if not isinstance(raw, dict):
            raise ValueError("an admission request is a JSON object")
        missing = [k for k in cls.__dataclass_fields__ if k not in raw]
        unknown = [k for k in raw if k not in cls.__dataclass_fields__]
        if missing or unknown:
            raise ValueError(f"admission request: missing {missing or 'nothing'}, unknown {unknown or 'nothing'}")
        for k in ("ksid", "interface", "user", "requesting_node", "local_sae", "source_sae", "destination_sae"):
            if not isinstance(raw[k], str) or not raw[k]:
                raise ValueError(f"admission request: '{k}' must be a non-empty string")
        if raw["interface"] not in ("004", "014"):
            raise ValueError("admission request: 'interface' must be '004' or '014'")
        if not isinstance(raw["qos"], dict):
            raise ValueError("admission request: 'qos' must be an object")
        return cls(**raw)


@dataclass(frozen=True)
class AdmissionResult:
    status: int
    qos: dict[str, Any] = field(default_factory=dict)  # granted QoS, or the counter-proposal (status 7)
    hops: int | None = None  # trusted nodes on the route
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "qos": self.qos, "hops": self.hops, "reason": self.reason}

    @classmethod
    def from_json(cls, raw: Any) -> "AdmissionResult":
        if not isinstance(raw, dict) or not isinstance(raw.get("status"), int):
            raise ValueError("an admission result is a JSON object with an integer 'status'")
        return cls(status=raw["status"], qos=dict(raw.get("qos") or {}), hops=raw.get("hops"),
                   reason=str(raw.get("reason") or ""))


@dataclass(frozen=True)
class RouteConfig:
    """The configuration of one key manager on a route (node names; mapped to ETSI 015 by the pusher)."""

    node: str
    ksid: str
    priority: int
    bucket_rate_bps: int
    bucket_size_bits: int
    inactivity_timeout_s: int
    prev_hop: str | None
    next_hop: str | None
    source_sae: str
    destination_sae: str
    source_node: str
    destination_node: str
    interface: str


class ControlPlane(Protocol):
    def authenticate(self, sae_id: str, *, fingerprint: str | None, interface: str) -> AuthResult: ...

    def admit(self, request: AdmissionRequest) -> AdmissionResult: ...

    def key_request(self, ksid: str) -> None: ...

    def closed(self, ksid: str, source_sae: str | None, reason: str) -> None: ...


# A function that configures (or, with None, deconfigures) a session at one key manager.
Pusher = Callable[[RouteConfig], None]
Remover = Callable[[str, str], None]  # (node, ksid)
Forwarder = Callable[[str, str, dict], dict]  # (node, path, body) -> answer body


def physical_graph(network: Network) -> nx.Graph:
    """The network file's nodes and physical links."""
    graph = nx.Graph()
    graph.add_nodes_from(n.name for n in network.nodes)
    graph.add_edges_from(link.ends for link in network.links)
    return graph


def shortest_route(graph: nx.Graph, src_node: str, dst_node: str) -> list[str] | None:
    """The shortest path of nodes from ``src_node`` to ``dst_node`` (None: no path)."""
    try:
        return nx.shortest_path(graph, src_node, dst_node)
    except (nx.NetworkXNoPath, nx.NodeNotFound):
        return None


class LocalControlPlane:
    """Access and admission control from the network file, run inside the agents (see module doc)."""

    def __init__(self, network: Network, node: str, *, push: Pusher, remove: Remover, forward: Forwarder,
                 clock: Callable[[], float]):
        self.network = network
        self.node = node
        self._push, self._remove, self._forward, self._clock = push, remove, forward, clock
        self._apps = {a.sae_id: a for a in network.applications}
        self._users = {u.name: u for u in network.users}
        self._graph = physical_graph(network)
        self._cond = threading.Condition()
        self._pending: dict[str, dict[str, AdmissionRequest]] = {}  # ksid -> role -> request
        self._pending_since: dict[str, float] = {}  # ksid -> when its first half arrived
        self._waiting: set[str] = set()  # ksids whose pending half has a thread blocked on the peer
        self._results: dict[str, AdmissionResult] = {}
        self._routes: dict[str, list[str]] = {}  # admitted sessions: ksid -> route
        self._owner: dict[str, str] = {}  # ksid -> user

    # -- access control ---------------------------------------------------------------------

    def authenticate(self, sae_id: str, *, fingerprint: str | None, interface: str) -> AuthResult:
        app = self._apps.get(sae_id)
        if app is None:
            return AuthResult(False, reason=f"unknown application '{sae_id}'")
        if app.node != self.node:
            return AuthResult(False, reason=f"application '{sae_id}' is not homed on {self.node}")
        if app.cert_sha256 and fingerprint is not None and fingerprint.lower() != app.cert_sha256:
            return AuthResult(False, reason="client certificate does not match the application's registered one")
        user = self._users.get(app.user)
        if user is None or user.revoked:
            return AuthResult(False, reason=f"user '{app.user}' is revoked")
        return AuthResult(True, user=user.name)

    # -- admission control ------------------------------------------------------------------

    def authority(self, source_sae: str) -> str | None:
        app = self._apps.get(source_sae)
        return app.node if app else None

    def admit(self, request: AdmissionRequest) -> AdmissionResult:
        authority = self.authority(request.source_sae)
        if authority is None:
            return AdmissionResult(NO_QKD_CONNECTION, reason=f"unknown source application '{request.source_sae}'")
        if authority != self.node:
            try:
                answer = self._forward(authority, "/relay/v1/control/admit", request.to_json())
                return AdmissionResult.from_json(answer)
            except Exception as exc:  # noqa: BLE001 — any failure to reach the authority refuses the session
                log.warning("admission authority %s unreachable for %s: %s", authority, request.ksid, exc)
                return AdmissionResult(NO_QKD_CONNECTION, reason=f"admission authority {authority} unreachable")
        return self.handle_admission(request)

    def handle_admission(self, request: AdmissionRequest) -> AdmissionResult:
        """At the authority: check, pair, route, configure. Blocks until decided."""
        refusal = self._check_sla(request)
        if refusal is not None:
            return refusal
        timeout_s = max(float(request.qos.get("Timeout") or 0) / 1000.0, 0.0)
        role = "source" if request.local_sae == request.source_sae else "destination"
        with self._cond:
            self._expire_pending()
            if request.ksid in self._routes:
                return AdmissionResult(KSID_IN_USE, reason="Key_stream_ID already in use")
            pair = self._pending.setdefault(request.ksid, {})
            if role in pair:
                return AdmissionResult(KSID_IN_USE, reason="this endpoint already opened the Key_stream_ID")
            other = next(iter(pair.values()), None)
            if other is not None and (other.source_sae, other.destination_sae, other.interface) != (
                    request.source_sae, request.destination_sae, request.interface):
                return AdmissionResult(KSID_IN_USE, reason="Key_stream_ID already in use by other applications")
            mine, theirs = request.qos.get("Key_chunk_size"), (other.qos.get("Key_chunk_size") if other else None)
            if mine and theirs and mine != theirs:
                # Both ends index one key stream: the peer's chunk size is the counter-proposal.
                return AdmissionResult(QOS_NOT_MET, qos=dict(request.qos, Key_chunk_size=theirs),
                                       reason=f"Key_chunk_size {mine} differs from the peer's {theirs}")
            pair[role] = request
            self._pending_since.setdefault(request.ksid, self._clock())
            complete = request.interface == "014" or len(pair) == 2
            if not complete:
                deadline = self._clock() + timeout_s
                self._waiting.add(request.ksid)
                try:
                    while request.ksid not in self._results:
                        left = deadline - self._clock()
                        if left <= 0:
                            # ETSI 004 status 1: connected, the peer not yet. The half stays pending, so a
                            # peer that opens later still completes the session (and configures this end);
                            # it goes when this end's session ends (closed) or after PENDING_TTL_S.
                            return AdmissionResult(PEER_NOT_CONNECTED,
                                                   reason="the peer has not opened the Key_stream_ID yet")
                        self._cond.wait(left)
                    return self._results.pop(request.ksid)
                finally:
                    self._waiting.discard(request.ksid)
        # This thread completed the pair: it routes and configures; a peer still waiting gets the result.
        result = self._establish(request, pair)
        with self._cond:
            self._pending.pop(request.ksid, None)
            self._pending_since.pop(request.ksid, None)
            if request.interface == "004" and request.ksid in self._waiting:
                self._results[request.ksid] = result
            self._cond.notify_all()
        return result

    def _expire_pending(self) -> None:
        """Forget halves whose peer never came (under ``_cond``)."""
        horizon = self._clock() - PENDING_TTL_S
        for ksid in [k for k, t in self._pending_since.items()
                     if t < horizon and k not in self._waiting and len(self._pending.get(k, ())) < 2]:
            self._pending.pop(ksid, None)
            self._pending_since.pop(ksid, None)

    def _check_sla(self, r: AdmissionRequest) -> AdmissionResult | None:
        user = self._users.get(r.user)
        if user is None or user.revoked:
            return AdmissionResult(NO_QKD_CONNECTION, reason=f"user '{r.user}' is unknown or revoked")
        sla = user.sla
        src, dst = self._apps.get(r.source_sae), self._apps.get(r.destination_sae)
        if src is None or dst is None:
            return AdmissionResult(NO_QKD_CONNECTION, reason="unknown source or destination application")
        peer_node = dst.node if r.local_sae == r.source_sae else src.node
        if sla.allowed_destinations is not None and peer_node not in sla.allowed_destinations:
            return AdmissionResult(NO_QKD_CONNECTION, reason=f"user '{user.name}' may not reach {peer_node}")
        qos = dict(r.qos)
        counter = dict(qos)
        if (qos.get("Max_bps") or 0) > sla.max_bps:
            counter["Max_bps"] = sla.max_bps
        if (qos.get("Min_bps") or 0) > sla.max_bps:
            counter["Min_bps"] = sla.max_bps
        if (qos.get("Priority") or 0) > sla.max_priority:
            counter["Priority"] = sla.max_priority
        chunk_bits = 8 * int(qos.get("Key_chunk_size") or 0)
        if chunk_bits > sla.bucket_bits:
            counter["Key_chunk_size"] = sla.bucket_bits // 8
        if counter != qos:
            return AdmissionResult(QOS_NOT_MET, qos=counter, reason="the QoS exceeds the user's SLA")
        with self._cond:
            active = sum(1 for u in self._owner.values() if u == user.name)
            pending_same = r.ksid in self._pending
        if not pending_same and active >= sla.max_sessions:
            return AdmissionResult(NO_QKD_CONNECTION, reason=f"user '{user.name}' has {active} sessions, "
                                                             f"the SLA allows {sla.max_sessions}")
        return None

    def route(self, src_node: str, dst_node: str) -> list[str] | None:
        return shortest_route(self._graph, src_node, dst_node)

    def _establish(self, request: AdmissionRequest, pair: dict[str, AdmissionRequest]) -> AdmissionResult:
        src_node = self._apps[request.source_sae].node
        dst_node = self._apps[request.destination_sae].node
        route = self.route(src_node, dst_node)
        if route is None or len(route) < 2:
            return AdmissionResult(NO_QKD_CONNECTION, reason=f"no QKD path from {src_node} to {dst_node}")
        # Both endpoints' QoS must hold: the tighter of each.
        qos = _combine([p.qos for p in pair.values()])
        user = self._users[request.user].sla
        rate = int(min(qos.get("Max_bps") or user.max_bps, user.max_bps))
        chunk_bits = 8 * int(qos.get("Key_chunk_size") or 32)
        bucket = max(chunk_bits, user.bucket_bits)
        inactivity = int(qos.get("TTL") or DEFAULT_INACTIVITY_S)
        configs = [RouteConfig(node=node, ksid=request.ksid, priority=int(qos.get("Priority") or 0),
                               bucket_rate_bps=rate, bucket_size_bits=bucket, inactivity_timeout_s=inactivity,
                               prev_hop=route[i - 1] if i > 0 else None,
                               next_hop=route[i + 1] if i + 1 < len(route) else None,
                               source_sae=request.source_sae, destination_sae=request.destination_sae,
                               source_node=src_node, destination_node=dst_node, interface=request.interface)
                   for i, node in enumerate(route)]
        done: list[str] = []
        try:
            # Intermediate nodes first, then the destination, the source last: the source starts
            # producing keys as soon as it is configured (ETSI 014 at once, ETSI 004 on the first
            # GET_KEY), so a relay message never meets an unconfigured hop.
            for cfg in sorted(configs, key=lambda c: (c.prev_hop is None, c.next_hop is None)):
                self._push(cfg)
                done.append(cfg.node)
        except Exception as exc:  # noqa: BLE001 — roll back whatever was configured
            log.warning("configuring %s failed at %s: %s", request.ksid, cfg.node, exc)
            for node in done:
                try:
                    self._remove(node, request.ksid)
                except Exception:  # noqa: BLE001
                    log.warning("rollback of %s at %s failed", request.ksid, node)
            return AdmissionResult(NO_QKD_CONNECTION, reason=f"configuring {cfg.node} failed")
        with self._cond:
            self._routes[request.ksid] = route
            self._owner[request.ksid] = request.user
        granted = dict(qos, Max_bps=rate)
        return AdmissionResult(SUCCESSFUL, qos=granted, hops=len(route) - 2)

    # -- session signals --------------------------------------------------------------------

    def key_request(self, ksid: str) -> None:
        # The local plane keeps no session timer of its own: the key managers' inactivity timers end sessions.
        return None

    def closed(self, ksid: str, source_sae: str | None, reason: str) -> None:
        authority = self.authority(source_sae) if source_sae else None
        if authority is None:
            return
        if authority != self.node:
            try:
                self._forward(authority, "/relay/v1/control/closed", {"ksid": ksid, "reason": reason})
            except Exception as exc:  # noqa: BLE001 — the peer's own timers end the session anyway
                log.warning("could not tell %s that %s closed: %s", authority, ksid, exc)
            return
        self.handle_closed(ksid, reason)

    def handle_closed(self, ksid: str, reason: str) -> None:
        """At the authority: delete the session's configuration from every key manager on its route."""
        with self._cond:
            route = self._routes.pop(ksid, None)
            self._owner.pop(ksid, None)
            if len(self._pending.get(ksid, ())) < 2:
                # A half-open session ended at its endpoint: a late peer must not complete it any more.
                self._pending.pop(ksid, None)
                self._pending_since.pop(ksid, None)
        for node in route or ():
            try:
                self._remove(node, ksid)
            except Exception as exc:  # noqa: BLE001 — a node that is down has lost the session anyway
                log.warning("deleting %s at %s failed: %s", ksid, node, exc)

    def sessions(self) -> dict[str, list[str]]:
        with self._cond:
            return dict(self._routes)

    def adopt(self, ksid: str, route: list[str], user: str | None) -> None:
        """A session this authority admitted before a restart (from the key manager's saved
        configuration): its route is released at its end as if admitted now."""
        if not isinstance(route, list) or len(route) < 2 or not all(n in self._graph for n in route):
            raise ValueError(f"route {route!r} is not a path of this network")
        with self._cond:
            self._routes[ksid] = list(route)
            if user:
                self._owner[ksid] = user


def _combine(qoss: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for q in qoss:
        for k, v in q.items():
            if v is None:
                continue
            if k not in out:
                out[k] = v
            elif k in ("Max_bps", "Priority", "Jitter", "TTL", "Timeout"):
                out[k] = min(out[k], v)
            elif k == "Min_bps":
                out[k] = max(out[k], v)
    return out
