"""SDN controller decisions: the network as the controller sees it, and the configurations it pushes.

Two plain classes (no os_ken, no I/O, no clock: every input carries ``now``, an aware datetime)
that the SDN controller app (``controller/apps/sdn_controller.py``) feeds and whose outputs it
carries out:

``TopologyTracker`` follows every node and PHYS link from three sources: the node's ETSI 015
``qkd_node`` read over RESTCONF (discovery, repeated periodically), the ETSI 015 notifications
the node publishes on the bus (``sdqkdn_link_perf_update``, ``sdqkdn_link_down``...), and the
node's agent's retained bus status (``status/agent-<node>``, with its Last Will). It returns a
``TopologyOutcome``: rows for the topology DB, link state changes for routing and admission,
link samples for the monitoring element and ``Event`` rows.

- A node is **up** when its RESTCONF answered the last discovery (as the node of the network
  file: same ``qkdn_id``), it does not report itself DOWN / FAILURE / OUT, and its agent's bus
  status is not ``offline``. It goes **down** at once when its bus status goes offline, when it
  answers as another node or reports a failed status, and after ``failures_to_down``
  consecutive failed discoveries. A node never seen yet is *unknown*. Its DB row changes when
  its status or version does; ``last_seen`` is refreshed at most every ``last_seen_interval_s``.
- A PHYS link's status (ETSI 015 ``qkdl_status``) combines its two ends: OFF if an end node is
  down or an end reports it OFF (or ``sdqkdn_link_down``), or does not list it at all; PENDING
  while an end node is unknown; else ACTIVE as soon as one end shows key flowing (status ACTIVE,
  or a reported secret key rate above 0: "links start PENDING, become ACTIVE when key flows");
  else PASSIVE if an end says so; else PENDING. Only ACTIVE links are routed.
- A link's performance (SKR, expected SKR, QBER) is taken from its master end (the end that
  pulls key from the device, first of the link's ``ends``); each report from there while the
  link is ACTIVE is a monitoring sample. One reporter per link keeps the samples in time order.

``ConfigTracker`` remembers the configuration pushed to every key manager (``km/<node>/config``)
by message id, turns the key managers' replies (``km/<node>/reply``) into ``ConfigResult``\\ s
for admission control, and answers a key manager's re-synchronisation (its list of applied
sessions after it lost its bus session) with the pushes that make it match.

``reset_runtime_state`` is run once at start-up: what the database says about node and link
state and about sessions comes from the previous controller run and is stale.
"""
from __future__ import annotations

import datetime as dt
import enum
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence

from sqlalchemy import select, update
from sqlalchemy.orm import Session as DbSession

from db import models as dbm
from etsi015 import model as em
from etsi015.session import SessionConfig, SessionMappingError, session_entries, session_from_entries, \
    virt_link_id

ELEMENT = "sdn_controller"

ACTIVE, PASSIVE, PENDING, OFF = "ACTIVE", "PASSIVE", "PENDING", "OFF"
_FAILED_NODE_STATES = frozenset({"DOWN", "FAILURE", "OUT"})


def short(identity: Any) -> Optional[str]:
    """``etsi-qkd-node-types:ACTIVE`` -> ``ACTIVE`` (None stays None)."""
    if identity is None:
        return None
    value = getattr(identity, "value", identity)
    return str(value).rsplit(":", 1)[-1]


# --------------------------------------------------------------------------- references


@dataclass(frozen=True)
class NodeRef:
    name: str
    qkdn_id: str


@dataclass(frozen=True)
class LinkRef:
    name: str
    qkdl_id: str
    master: str  # node names
    slave: str

    @property
    def ends(self) -> tuple[str, str]:
        return (self.master, self.slave)


def refs_from_network(network: Any) -> tuple[list[NodeRef], list[LinkRef]]:
    """Node and PHYS link references of a ``db.netfile.Network``."""
    return ([NodeRef(n.name, n.qkdn_id) for n in network.nodes],
            [LinkRef(l.name, l.qkdl_id, l.master, l.slave) for l in network.links])


# --------------------------------------------------------------------------- outputs


@dataclass(frozen=True)
class NodeRow:
    """New values of a ``db.models.Node`` row (None: leave as it is)."""

    name: str
    status: dbm.NodeStatus
    version: Optional[str] = None
    last_seen: Optional[dt.datetime] = None


@dataclass(frozen=True)
class InterfaceRow:
    node: str
    qkdi_id: int
    status: str  # ENABLED / DISABLED / FAILED
    model: Optional[str] = None


@dataclass(frozen=True)
class LinkRow:
    """New values of a PHYS ``db.models.Link`` row; None leaves a column unchanged."""

    name: str
    status: Optional[dbm.LinkStatus] = None
    skr_bps: Optional[float] = None
    eskr_bps: Optional[float] = None
    qber: Optional[float] = None


@dataclass(frozen=True)
class LinkStateChange:
    """A link's combined status changed: tell routing (status) and admission (``up``)."""

    link: str
    status: str  # ACTIVE / PASSIVE / PENDING / OFF
    up: bool  # status == ACTIVE
    reason: str


@dataclass(frozen=True)
class LinkSampleIn:
    """A measurement for the monitoring element (``MonitoringElement.sample``)."""

    link: str
    skr_bps: float
    qber: Optional[float]
    ts: float  # POSIX seconds


@dataclass
class TopologyOutcome:
    nodes: list[NodeRow] = field(default_factory=list)
    interfaces: list[InterfaceRow] = field(default_factory=list)
    links: list[LinkRow] = field(default_factory=list)
    changes: list[LinkStateChange] = field(default_factory=list)
    samples: list[LinkSampleIn] = field(default_factory=list)
    events: list[dbm.Event] = field(default_factory=list)
    # Nodes to read again over RESTCONF now (their bus status came online, an interface changed).
    rediscover: list[str] = field(default_factory=list)

    def extend(self, other: "TopologyOutcome") -> None:
        for name in ("nodes", "interfaces", "links", "changes", "samples", "events", "rediscover"):
            getattr(self, name).extend(getattr(other, name))

    def __bool__(self) -> bool:
        return any((self.nodes, self.interfaces, self.links, self.changes, self.samples, self.events,
                    self.rediscover))


# --------------------------------------------------------------------------- tracker


class Liveness(str, enum.Enum):
    UNKNOWN = "unknown"
    UP = "up"
    DOWN = "down"


@dataclass
class _Node:
    ref: NodeRef
    liveness: Liveness = Liveness.UNKNOWN
    reason: str = "not discovered yet"
    failures: int = 0
    restconf_ok: bool = False
    reported_status: Optional[str] = None
    identity_error: Optional[str] = None
    bus_online: Optional[bool] = None  # None: the agent has no bus status (yet)
    version: Optional[str] = None
    interfaces: dict[int, str] = field(default_factory=dict)
    written: Optional[tuple] = None  # (status, version) last written to the DB
    seen_written: Optional[dt.datetime] = None  # when last_seen was last written


@dataclass
class _End:
    status: Optional[str] = None  # last reported qkdl_status (short), None: never reported
    flowing: bool = False
    reason: Optional[str] = None


@dataclass
class _Link:
    ref: LinkRef
    ends: dict[str, _End]
    status: str = PENDING
    skr: Optional[float] = None
    eskr: Optional[float] = None
    qber: Optional[float] = None


@dataclass(frozen=True)
class TopologyConfig:
    failures_to_down: int = 2  # consecutive failed discoveries that take a node down
    last_seen_interval_s: float = 30.0  # a node's last_seen is written at most this often

    def __post_init__(self) -> None:
        if not isinstance(self.failures_to_down, int) or self.failures_to_down < 1:
            raise ValueError("failures_to_down must be an integer >= 1")
        if not isinstance(self.last_seen_interval_s, (int, float)) or not self.last_seen_interval_s >= 0:
            raise ValueError("last_seen_interval_s must be a number >= 0")


class TopologyTracker:
    """Nodes and PHYS links as reported by the nodes (module doc). Not thread-safe."""

    def __init__(self, nodes: Iterable[NodeRef], links: Iterable[LinkRef], config: TopologyConfig | None = None):
        self.config = config or TopologyConfig()
        self._nodes = {n.name: _Node(n) for n in nodes}
        self._links: dict[str, _Link] = {}
        self._by_qkdl: dict[str, str] = {}
        for ref in links:
            for end in ref.ends:
                if end not in self._nodes:
                    raise ValueError(f"link {ref.name}: unknown node {end}")
            self._links[ref.name] = _Link(ref, {end: _End() for end in ref.ends})
            self._by_qkdl[ref.qkdl_id] = ref.name
        self._by_qkdn = {n.ref.qkdn_id: name for name, n in self._nodes.items()}

    # ----------------------------------------------------------------- queries

    def nodes(self) -> list[str]:
        return sorted(self._nodes)

    def liveness(self, node: str) -> Liveness:
        return self._nodes[node].liveness

    def link_status(self, link: str) -> str:
        return self._links[link].status

    def link_name(self, qkdl_id: str) -> Optional[str]:
        return self._by_qkdl.get(qkdl_id)

    def links_of(self, node: str) -> list[str]:
        return sorted(name for name, l in self._links.items() if node in l.ref.ends)

    def node_of_process(self, process: str) -> Optional[str]:
        """The node whose agent has bus process name ``process`` (``agent-<node>``, or the node name)."""
        if process in self._nodes:
            return process
        if process.startswith("agent-") and process[len("agent-"):] in self._nodes:
            return process[len("agent-"):]
        return None

    # ----------------------------------------------------------------- inputs

    def discovered(self, node: str, qkd_node: em.QkdNode, now: dt.datetime) -> TopologyOutcome:
        """The node answered a RESTCONF GET of its ``qkd_node``."""
        st = self._nodes[node]
        out = TopologyOutcome()
        if qkd_node.qkdn_id != st.ref.qkdn_id:
            st.restconf_ok = False
            st.identity_error = (f"its RESTCONF answers as qkdn_id {qkd_node.qkdn_id}, "
                                 f"not {st.ref.qkdn_id} of the network file")
            self._set_liveness(out, st, now)
            return out
        st.identity_error = None
        st.failures = 0
        st.restconf_ok = True
        st.reported_status = short(qkd_node.qkdn_status)
        st.version = qkd_node.qkdn_version
        self._set_liveness(out, st, now)
        status = dbm.NodeStatus.DOWN if st.liveness is Liveness.DOWN else (
            _db_node_status(st.reported_status) or dbm.NodeStatus.OPERATING)
        row = (status, st.version)
        # The row is written when it changes, and last_seen at most every last_seen_interval_s.
        if row != st.written or st.seen_written is None or \
                (now - st.seen_written).total_seconds() >= self.config.last_seen_interval_s:
            st.written, st.seen_written = row, now
            out.nodes.append(NodeRow(node, status, version=st.version, last_seen=now))

        for iface in qkd_node.interfaces:
            iface_status = short(iface.qkdi_status) or "ENABLED"
            if st.interfaces.get(iface.qkdi_id) != iface_status:
                st.interfaces[iface.qkdi_id] = iface_status
                out.interfaces.append(InterfaceRow(node, iface.qkdi_id, iface_status, iface.qkdi_model))

        reported: dict[str, Optional[LinkSampleIn]] = {}
        for link in qkd_node.links:
            if link.qkdl_type is not None and link.qkdl_type is not em.LinkType.PHYS:
                continue
            name = self._by_qkdl.get(link.qkdl_id)
            if name is None or node not in self._links[name].ref.ends:
                continue  # not a link of the network file at this node: nothing to route over
            end = self._links[name].ends[node]
            skr = _number(link.qkdl_performance.skr)
            if not link.effective("qkdl_enable"):
                end.status, end.flowing, end.reason = OFF, False, f"{node} reports the link disabled"
            else:
                end.status = short(link.qkdl_status)
                end.flowing = end.status == ACTIVE or (end.status != OFF and (skr or 0) > 0)
                end.reason = (f"{node} reports key flowing" if end.flowing
                              else f"{node} reports it {end.status or 'without a status'}")
            reported[name] = self._performance(out, name, node, link.qkdl_performance, now)
        for name in self.links_of(node):
            if name not in reported:
                end = self._links[name].ends[node]
                end.status, end.flowing, end.reason = OFF, False, f"{node} does not list the link"
            self._recompute(out, name, now, reported.get(name))
        return out

    def unreachable(self, node: str, reason: str, now: dt.datetime) -> TopologyOutcome:
        """A RESTCONF GET of the node failed (no answer, TLS refused, HTTP error, invalid body)."""
        st = self._nodes[node]
        out = TopologyOutcome()
        st.failures += 1
        if st.failures >= self.config.failures_to_down or st.liveness is not Liveness.UP:
            st.restconf_ok = False
        self._set_liveness(out, st, now, why=f"no RESTCONF answer ({reason})")
        return out

    def bus_status(self, process: str, state: str, now: dt.datetime) -> TopologyOutcome:
        """A retained ``status/<process>`` message: ``online`` or ``offline``."""
        out = TopologyOutcome()
        node = self.node_of_process(process)
        if node is None or state not in ("online", "offline"):
            return out
        st = self._nodes[node]
        online = state == "online"
        if st.bus_online == online:
            return out
        st.bus_online = online
        if online:
            # The agent (re)connected: read it now rather than at the next poll.
            out.rediscover.append(node)
            out.events.append(dbm.Event(ts=now, element=ELEMENT, node=node, kind="agent_online",
                                        details={"process": process}))
        else:
            # Down until its RESTCONF answers again: what it said before is stale.
            st.restconf_ok = False
        self._set_liveness(out, st, now)
        return out

    def notification(self, node: str, notification: em.Notification, now: dt.datetime) -> TopologyOutcome:
        """An ETSI 015 notification the node published on ``notifications/<node>``."""
        out = TopologyOutcome()
        if node not in self._nodes:
            return out
        if isinstance(notification, (em.LinkPerfUpdate, em.LinkDown, em.LinkOverloaded)):
            name = self._by_qkdl.get(notification.qkdl_id or "")
            if name is None or node not in self._links[name].ref.ends:
                return out
            end = self._links[name].ends[node]
            sample = None
            if isinstance(notification, em.LinkPerfUpdate):
                skr = _number(notification.performance.skr)
                if skr is not None and skr > 0 and not end.flowing:
                    # Key flowing makes the end ACTIVE, after a link down too (the device recovered).
                    end.status, end.flowing, end.reason = ACTIVE, True, f"{node} reports key flowing"
                sample = self._performance(out, name, node, notification.performance, now)
            elif isinstance(notification, em.LinkDown):
                end.status, end.flowing = OFF, False
                end.reason = f"{node} reports the link down" + (f": {notification.reason}"
                                                                if notification.reason else "")
            else:
                perf = notification.performance
                out.events.append(dbm.Event(ts=now, element=ELEMENT, node=node, kind="link_overloaded",
                                            details={"link": name, "skr": perf.skr,
                                                     "expected_consumption": perf.expected_consumption}))
            self._recompute(out, name, now, sample)
        elif isinstance(notification, (em.InterfaceDown, em.InterfaceOut, em.InterfaceNew)):
            out.events.append(dbm.Event(ts=now, element=ELEMENT, node=node, kind=notification.NAME,
                                        details={"qkdi_id": notification.qkdi_id}))
            out.rediscover.append(node)
        return out

    # ----------------------------------------------------------------- internals

    def _performance(self, out: TopologyOutcome, name: str, node: str, perf: em.LinkPerformance,
                     now: dt.datetime) -> Optional[LinkSampleIn]:
        """Record the master end's performance report; the sample it makes, if any."""
        link = self._links[name]
        if node != link.ref.master:
            return None
        skr, eskr, qber = _number(perf.skr), _number(perf.eskr), _qber(perf)
        row = LinkRow(name, skr_bps=skr if skr is not None and skr != link.skr else None,
                      eskr_bps=eskr if eskr is not None and eskr != link.eskr else None,
                      qber=qber if qber is not None and qber != link.qber else None)
        if any(v is not None for v in (row.skr_bps, row.eskr_bps, row.qber)):
            out.links.append(row)
        link.skr = skr if skr is not None else link.skr
        link.eskr = eskr if eskr is not None else link.eskr
        link.qber = qber if qber is not None else link.qber
        return LinkSampleIn(name, skr, qber, now.timestamp()) if skr is not None else None

    def _recompute(self, out: TopologyOutcome, name: str, now: dt.datetime,
                   sample: Optional[LinkSampleIn] = None) -> None:
        link = self._links[name]
        status, reason = self._combined(link)
        if status != link.status:
            was_up = link.status == ACTIVE
            link.status = status
            out.links.append(LinkRow(name, status=dbm.LinkStatus(status)))
            out.changes.append(LinkStateChange(name, status, status == ACTIVE, reason))
            kind = ("link_up" if status == ACTIVE else "link_down") if (status == ACTIVE) != was_up \
                else "link_status"
            out.events.append(dbm.Event(ts=now, element=ELEMENT, node=None, kind=kind,
                                        details={"link": name, "status": status, "reason": reason}))
            if status == ACTIVE and sample is None and link.skr is not None:
                # Just came up: the master's latest report is the first sample.
                sample = LinkSampleIn(name, link.skr, link.qber, now.timestamp())
        if sample is not None and link.status == ACTIVE:
            out.samples.append(sample)

    def _combined(self, link: _Link) -> tuple[str, str]:
        nodes = [self._nodes[e] for e in link.ref.ends]
        down = [n for n in nodes if n.liveness is Liveness.DOWN]
        if down:
            return OFF, f"node {down[0].ref.name} is down: {down[0].reason}"
        unknown = [n for n in nodes if n.liveness is Liveness.UNKNOWN]
        if unknown:
            return PENDING, f"node {unknown[0].ref.name} not discovered yet"
        ends = [link.ends[e] for e in link.ref.ends]
        off = [r for r in ends if r.status == OFF]
        if off:
            return OFF, off[0].reason or "an end reports it OFF"
        flowing = [r for r in ends if r.flowing]
        if flowing:
            return ACTIVE, flowing[0].reason or "key flowing"
        if any(r.status == PASSIVE for r in ends):
            return PASSIVE, "an end reports it PASSIVE"
        return PENDING, "no key flowing yet"

    def _set_liveness(self, out: TopologyOutcome, st: _Node, now: dt.datetime, *, why: Optional[str] = None) -> None:
        if st.identity_error is not None:
            new, reason = Liveness.DOWN, st.identity_error
        elif st.bus_online is False:
            new, reason = Liveness.DOWN, "its agent's bus status is offline"
        elif st.restconf_ok and st.reported_status in _FAILED_NODE_STATES:
            new, reason = Liveness.DOWN, f"it reports status {st.reported_status}"
        elif st.restconf_ok:
            new, reason = Liveness.UP, "answers over RESTCONF"
        elif st.failures >= self.config.failures_to_down or (st.liveness is Liveness.UNKNOWN and st.failures):
            new, reason = Liveness.DOWN, why or st.reason
        else:
            new, reason = st.liveness, st.reason
        if new is st.liveness:
            return
        old = st.liveness
        st.liveness, st.reason = new, reason
        if new is Liveness.DOWN:
            out.nodes.append(NodeRow(st.ref.name, dbm.NodeStatus.DOWN))
            st.written = (dbm.NodeStatus.DOWN, st.written[1] if st.written else None)
        out.events.append(dbm.Event(ts=now, element=ELEMENT, node=st.ref.name,
                                    kind="node_up" if new is Liveness.UP else "node_down",
                                    details={"previous": old.value, "reason": reason}))
        for name in self.links_of(st.ref.name):
            self._recompute(out, name, now)


def _db_node_status(value: Optional[str]) -> Optional[dbm.NodeStatus]:
    try:
        return dbm.NodeStatus(value) if value is not None else None
    except ValueError:
        return None


def _number(value: Any) -> Optional[float]:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number >= 0 else None


def _qber(perf: em.LinkPerformance) -> Optional[float]:
    for p in perf.phys_perf:
        if p.perf_type is em.PhysPerfType.QBER and p.value is not None:
            value = _number(p.value)
            return value if value is not None and value <= 1 else None
    return None


# --------------------------------------------------------------------------- configuration pushes


CONFIGURE, DECONFIGURE = "configure", "deconfigure"


@dataclass(frozen=True)
class Push:
    """One message for ``km/<node>/config``: ``entries`` (qkd_app, qkd_link) for a configure."""

    node: str
    ksid: str
    op: str
    entries: Optional[tuple[dict, dict]] = None
    awaited: bool = True  # admission control waits for its result


@dataclass(frozen=True)
class ConfigResult:
    """A key manager's answer to a pushed configuration."""

    node: str
    ksid: str
    op: str
    ok: bool
    error: Optional[str]
    awaited: bool


@dataclass
class _Sent:
    push: Push
    sent_at: dt.datetime


def build_session_config(*, ksid: str, priority: int, bucket_bits: int, rate_bps: int,
                         inactivity_timeout_s: float, prev_hop: Optional[str], next_hop: Optional[str],
                         src_sae: str, dst_sae: str, src_node: str, dst_node: str,
                         qkdn_ids: Mapping[str, str]) -> SessionConfig:
    """The wire configuration of one key manager on a route (hops and endpoints as node names,
    mapped to qkdn_ids). Raises KeyError for a node name that is not in ``qkdn_ids``."""
    return SessionConfig(
        ksid=ksid, priority=int(priority), bucket_rate_bps=int(rate_bps), bucket_size_bits=int(bucket_bits),
        inactivity_timeout_s=int(math.ceil(inactivity_timeout_s)),
        prev_hop=qkdn_ids[prev_hop] if prev_hop is not None else None,
        next_hop=qkdn_ids[next_hop] if next_hop is not None else None,
        source_sae=src_sae, destination_sae=dst_sae, virt_link_id=virt_link_id(ksid),
        source_qkdn_id=qkdn_ids[src_node], destination_qkdn_id=qkdn_ids[dst_node])


class ConfigTracker:
    """What was pushed to which key manager, and what their replies mean (module doc).

    ``pending_timeout_s``: a message without reply is forgotten after this (admission control
    has its own, shorter, deadlines; this only bounds the memory). Not thread-safe.
    """

    def __init__(self, qkdn_ids: Mapping[str, str], *, pending_timeout_s: float = 300.0):
        self._qkdn = dict(qkdn_ids)
        self._timeout = dt.timedelta(seconds=pending_timeout_s)
        self._pending: dict[str, _Sent] = {}  # msg_id -> what it carried
        self._applied: dict[str, dict[str, tuple[dict, dict]]] = {}  # node -> ksid -> entries pushed

    def configure(self, node: str, config: SessionConfig, *, awaited: bool = True) -> Push:
        """The push that configures ``config`` at ``node`` (ValueError if ETSI 015 cannot carry it)."""
        entries = session_entries(config, self._qkdn[node])
        return Push(node, config.ksid, CONFIGURE, entries, awaited)

    def deconfigure(self, node: str, ksid: str, *, awaited: bool = True) -> Push:
        return Push(node, ksid, DECONFIGURE, None, awaited)

    def sent(self, msg_id: str, push: Push, now: dt.datetime) -> None:
        """``push`` went out as message ``msg_id``: remember it, and what the node should hold."""
        self._pending[msg_id] = _Sent(push, now)
        held = self._applied.setdefault(push.node, {})
        if push.op == CONFIGURE:
            held[push.ksid] = push.entries  # type: ignore[assignment]
        else:
            held.pop(push.ksid, None)

    def reply(self, node: str, payload: Mapping[str, Any]) -> Optional[ConfigResult]:
        """A ``km/<node>/reply`` message; None when it answers nothing this controller sent."""
        msg_id = payload.get("msg_id")
        sent = self._pending.get(msg_id) if isinstance(msg_id, str) else None
        if sent is None or sent.push.node != node:
            return None
        del self._pending[msg_id]
        ok = payload.get("ok") is True
        error = payload.get("error")
        if not ok and not isinstance(error, str):
            error = "refused without a reason"
        push = sent.push
        return ConfigResult(node, push.ksid, push.op, ok, error if not ok else None, push.awaited)

    def expire(self, now: dt.datetime) -> list[Push]:
        """Forget messages unanswered for ``pending_timeout_s``; returns what they carried."""
        gone = [k for k, s in self._pending.items() if now - s.sent_at >= self._timeout]
        return [self._pending.pop(k).push for k in gone]

    def pending(self) -> int:
        return len(self._pending)

    def held(self, node: str) -> dict[str, tuple[dict, dict]]:
        """KSID -> entries this controller last configured at ``node`` (and did not delete since)."""
        return dict(self._applied.get(node, {}))

    def resync(self, node: str, reported: Sequence[Mapping[str, Any]]) -> list[Push]:
        """A key manager re-announced the sessions it holds (``{"ksid", "qkd_app", "qkd_link"}``
        each, after it lost its bus session): the pushes that make it hold exactly what this
        controller configured there. None of them is awaited by admission control."""
        wanted = self._applied.get(node, {})
        qkdn = self._qkdn[node]
        seen: set[str] = set()
        pushes: list[Push] = []
        for entry in reported:
            ksid = entry.get("ksid") if isinstance(entry, Mapping) else None
            if not isinstance(ksid, str) or not ksid:
                continue
            seen.add(ksid)
            if ksid not in wanted:
                pushes.append(Push(node, ksid, DECONFIGURE, None, awaited=False))
                continue
            try:
                theirs = session_from_entries(entry.get("qkd_app") or {}, entry.get("qkd_link") or {}, qkdn)
            except (ValueError, TypeError, SessionMappingError):
                theirs = None
            ours = session_from_entries(*wanted[ksid], qkdn)
            if theirs != ours:
                pushes.append(Push(node, ksid, CONFIGURE, wanted[ksid], awaited=False))
        for ksid in sorted(set(wanted) - seen):
            pushes.append(Push(node, ksid, CONFIGURE, wanted[ksid], awaited=False))
        return pushes


# --------------------------------------------------------------------------- start-up


@dataclass(frozen=True)
class StaleSession:
    ksid: str
    route: tuple[str, ...]


def reset_runtime_state(session: DbSession, now: dt.datetime) -> list[StaleSession]:
    """At controller start-up, in the caller's transaction: nodes back to NEW and PHYS links to
    PENDING with no reservations (the controller learns their state anew), and every session
    the previous run left unterminated is terminated (reason "controller restarted"). Returns
    those sessions, whose configuration the key managers on their route may still hold."""
    session.execute(update(dbm.Node).values(status=dbm.NodeStatus.NEW))
    session.execute(update(dbm.Link).where(dbm.Link.kind == dbm.LinkKind.PHYS)
                    .values(status=dbm.LinkStatus.PENDING, reserved_bps=0.0, session_count=0))
    stale = []
    rows = session.scalars(select(dbm.Session).where(dbm.Session.state != dbm.SessionState.TERMINATED)
                           .order_by(dbm.Session.ksid)).all()
    for row in rows:
        previous = row.state
        row.state = dbm.SessionState.TERMINATED
        row.terminated_at = row.updated_at = now
        row.reason = "controller restarted"
        row.reservations = None
        stale.append(StaleSession(row.ksid, tuple(row.route or ())))
        session.add(dbm.Event(ts=now, element="admission_control", ksid=row.ksid, kind="session_terminated",
                              details={"cause": "controller_restarted", "previous_state": getattr(previous, "value",
                                                                                                   previous),
                                       "deleted": list(row.route or ())}))
    session.flush()
    return stale
