"""Routing element: constrained paths over the physical QKD links, and the bandwidth they carry.

``RoutingElement`` holds a networkx graph of the PHYS links (nodes by name, one edge per link,
its attributes the link's state) and answers path questions; ``Reservations`` books a session's
rate on every link of its path. Both are plain classes: no os_ken, no I/O, no clock (``now`` is
an argument). The os-ken app shell feeds them from the topology DB and the monitoring element.

**Link state.** A link carries ``capacity`` = monitored SKR, else expected SKR (``eskr``), else
``unknown_skr_bps`` (default: unlimited, so that a network without monitoring routes like the
paper's proof of concept; pass 0 to route only over links whose rate is known). A link is
*routable* when it is enabled, its ETSI 015 status is ACTIVE (PASSIVE / PENDING / OFF links
generate no key), the monitoring element has not taken it out of routing, and its QBER (when
known) is below the threshold. Its *residual* is ``capacity - reserved_bps``.

**Link weight** for a request of ``rate`` bits/s (all terms dimensionless)::

    cost = 1 + w_load * L(u) + w_qber * Q(q / qber_threshold)
    u    = (reserved_bps + rate) / capacity      (0 when the capacity is unknown/unlimited)
    L(x) = Q(x) = x / max(1 - x, 0.01)           (0 at x = 0, 1 at x = 1/2, 99 at x >= 0.99)

The constant 1 is the hop cost: every hop spends one link-key bit per relayed bit and adds a
trusted node. ``L`` grows without bound (capped at 99) as the residual left after this
request shrinks, ``Q`` as the QBER approaches the threshold; both are 0 without monitoring
data, so every link then weighs 1 (hop count, the PoC's equal weights). Costs are rounded to
integer micro-units, so equal paths tie exactly whatever the order of summation.

**Path choice.** Among links with ``residual >= rate`` (routable, not excluded), the path of
least total cost; ties go to the path whose links carry fewer sessions in total, then to the
one with the larger bottleneck residual, then to the lexicographically smallest node sequence.
The middle two spread load over equal paths; the last makes the answer deterministic.
The (cost, sessions, -bottleneck, nodes) label is monotone and isotone under path extension,
so a label-setting Dijkstra search finds the optimum.

Parallel links between the same two nodes are rejected (the network file forbids them), so a
route given as node names (``Session.route``) names its links unambiguously.

**Concurrency.** ``RoutingElement`` is not thread-safe. ``Reservations`` is the concurrency
boundary: its lock serialises admission (path search and reservation as one atomic step),
release and reroute; a caller on another thread that changes link state (monitoring updates,
link up/down) does so while holding ``Reservations.lock``.
"""
from __future__ import annotations

import heapq
import math
import threading
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import networkx as nx

ROUTABLE_STATUS = "ACTIVE"
LINK_STATUSES = ("ACTIVE", "PASSIVE", "PENDING", "OFF")
DEFAULT_QBER_THRESHOLD = 0.11

_WEIGHT_SCALE = 1_000_000  # integer micro-units of cost
_MIN_HEADROOM = 0.01  # caps L and Q at 99

_NUMERIC_ATTRS = {"skr_bps": True, "expected_skr_bps": True, "qber": True, "length_km": True,
                  "reserved_bps": False}  # name -> may be None
_UPDATABLE = set(_NUMERIC_ATTRS) | {"status", "enabled", "in_routing", "session_count"}


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class LinkView:
    """The routing element's view of one physical link."""

    name: str
    a: str  # master end (node name)
    b: str  # slave end
    skr_bps: float | None = None  # monitored secret key rate
    expected_skr_bps: float | None = None
    qber: float | None = None
    status: str = ROUTABLE_STATUS
    enabled: bool = True
    reserved_bps: float = 0.0
    session_count: int = 0
    length_km: float | None = None
    in_routing: bool = True  # False while the monitoring element keeps it out

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("link name must be a non-empty string")
        for end in (self.a, self.b):
            if not isinstance(end, str) or not end:
                raise ValueError(f"link {self.name}: node names must be non-empty strings")
        if self.a == self.b:
            raise ValueError(f"link {self.name}: self-loop at {self.a}")
        _check_attrs(self.name, {k: getattr(self, k) for k in _UPDATABLE})

    @property
    def ends(self) -> tuple[str, str]:
        return (self.a, self.b)

    @property
    def capacity_bps(self) -> float | None:
        """Monitored SKR, else expected SKR, else None (unknown)."""
        return self.skr_bps if self.skr_bps is not None else self.expected_skr_bps

    @classmethod
    def from_model(cls, link: Any, *, with_load: bool = True) -> "LinkView":
        """From a ``db.models.Link`` (PHYS). ``with_load=False`` starts it with no reservations,
        for a controller that re-registers its sessions with ``Reservations.restore``."""
        kind = getattr(link.kind, "value", link.kind)
        if kind != "PHYS":
            raise ValueError(f"link {link.name}: only PHYS links are routed, not {kind}")
        status = getattr(link.status, "value", link.status) or "PENDING"
        return cls(name=link.name, a=link.src_node.name, b=link.dst_node.name, skr_bps=link.skr_bps,
                   expected_skr_bps=link.eskr_bps, qber=link.qber, status=status,
                   enabled=bool(link.enabled) if link.enabled is not None else True,
                   reserved_bps=float(link.reserved_bps or 0.0) if with_load else 0.0,
                   session_count=int(link.session_count or 0) if with_load else 0,
                   length_km=link.length_km)


@dataclass(frozen=True)
class Path:
    """A route: node names from source to destination and the links between them."""

    nodes: tuple[str, ...]
    links: tuple[str, ...]
    rate_bps: float  # the rate it was computed for
    weight: float  # total link cost
    bottleneck_bps: float  # least residual along it before this request (inf: unlimited)
    sessions: int  # sessions already on its links, summed
    computed_at: float

    @property
    def src(self) -> str:
        return self.nodes[0]

    @property
    def dst(self) -> str:
        return self.nodes[-1]

    @property
    def hops(self) -> int:
        return len(self.links)


@dataclass(frozen=True)
class LinkWeights:
    """Coefficients of the link cost (module docstring)."""

    load: float = 1.0
    qber: float = 1.0

    def __post_init__(self) -> None:
        for name in ("load", "qber"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or value < 0:
                raise ValueError(f"link weight coefficient {name} must be a finite number >= 0")


# --------------------------------------------------------------------------- routing element


class RoutingElement:
    """Graph of the physical links and the path computations over it."""

    def __init__(self, *, qber_threshold: float = DEFAULT_QBER_THRESHOLD, weights: LinkWeights | None = None,
                 unknown_skr_bps: float = math.inf):
        if not _is_number(qber_threshold) or not 0 < qber_threshold <= 0.5:
            raise ValueError("qber_threshold must be in (0, 0.5]")
        if not _is_number(unknown_skr_bps) or math.isnan(unknown_skr_bps) or unknown_skr_bps < 0:
            raise ValueError("unknown_skr_bps must be a number >= 0 (inf: unlimited)")
        self.qber_threshold = float(qber_threshold)
        self.weights = weights if weights is not None else LinkWeights()
        self.unknown_skr_bps = float(unknown_skr_bps)
        self._g = nx.Graph()
        self._ends: dict[str, tuple[str, str]] = {}  # link name -> (u, v)

    # ----------------------------------------------------------------- topology

    def load(self, links: Iterable[LinkView], nodes: Iterable[str] = ()) -> None:
        """Replace the graph with these links (and isolated ``nodes``). All or nothing."""
        g = nx.Graph()
        ends: dict[str, tuple[str, str]] = {}
        for node in nodes:
            g.add_node(node)
        for view in links:
            _add(g, ends, view)
        self._g, self._ends = g, ends

    def add_node(self, name: str) -> None:
        self._g.add_node(name)

    def add_link(self, view: LinkView) -> None:
        _add(self._g, self._ends, view)

    def remove_link(self, name: str) -> None:
        u, v = self._ends.pop(name)
        self._g.remove_edge(u, v)

    def update_link(self, name: str, **metrics: Any) -> None:
        """Change some of a link's attributes (skr_bps, expected_skr_bps, qber, status, enabled,
        in_routing, reserved_bps, session_count, length_km). Checked before anything changes."""
        unknown = set(metrics) - _UPDATABLE
        if unknown:
            raise TypeError(f"update_link: unknown attribute(s) {', '.join(sorted(unknown))}")
        attrs = self._attrs(name)
        _check_attrs(name, metrics)
        attrs.update({k: _normalised(k, v) for k, v in metrics.items()})

    def set_link_up(self, name: str, up: bool) -> None:
        """Link up (ETSI 015 status ACTIVE) or down (OFF), e.g. on sdqkdn_link_down."""
        self.update_link(name, status=ROUTABLE_STATUS if up else "OFF")

    def set_in_routing(self, name: str, in_routing: bool) -> None:
        """The monitoring element's TakeOutOfRouting / RestoreToRouting."""
        self.update_link(name, in_routing=bool(in_routing))

    @property
    def graph(self) -> nx.Graph:
        """A read-only view of the graph (edge attributes as in ``LinkView``)."""
        return self._g.copy(as_view=True)

    def has_link(self, name: str) -> bool:
        return name in self._ends

    def link(self, name: str) -> LinkView:
        attrs = self._attrs(name)
        return LinkView(**{k: attrs[k] for k in _VIEW_FIELDS})

    def links(self) -> list[LinkView]:
        return [self.link(name) for name in sorted(self._ends)]

    def nodes(self) -> list[str]:
        return sorted(self._g.nodes)

    def capacity_bps(self, name: str) -> float:
        return self._capacity(self._attrs(name))

    def residual_bps(self, name: str) -> float:
        attrs = self._attrs(name)
        return self._capacity(attrs) - attrs["reserved_bps"]

    def routable(self, name: str) -> bool:
        return self._routable(self._attrs(name))

    def link_weight(self, name: str, rate_bps: float = 0.0) -> float:
        """The cost of the link for a request of ``rate_bps`` (module docstring)."""
        _check_rate(rate_bps)
        return self._cost(self._attrs(name), rate_bps, 0.0) / _WEIGHT_SCALE

    def oversubscribed_links(self) -> list[str]:
        """Links whose reservations exceed their (since dropped) key rate."""
        return sorted(n for n, (u, v) in self._ends.items()
                      if self._g.edges[u, v]["reserved_bps"] > self._capacity(self._g.edges[u, v]))

    def route_links(self, route: Sequence[str]) -> tuple[str, ...]:
        """The link names of a route given as node names. KeyError when two nodes are not linked."""
        if len(route) < 2:
            raise ValueError("a route has at least two nodes")
        out = []
        for u, v in zip(route, route[1:]):
            if not self._g.has_edge(u, v):
                raise KeyError(f"no link between {u} and {v}")
            out.append(self._g.edges[u, v]["name"])
        return tuple(out)

    # ----------------------------------------------------------------- paths

    def find_path(self, src: str, dst: str, rate_bps: float, *, exclude_links: Iterable[str] = (),
                  now: float, credit: Mapping[str, float] | None = None) -> Path | None:
        """Least-cost path on which every link can carry ``rate_bps`` more; None if there is none.

        ``credit`` (link name -> bits/s) counts as not reserved: a session's own reservation
        while it is moved to another path (one session fewer on those links for the tie-break).
        """
        _check_endpoints(src, dst)
        _check_rate(rate_bps)
        if src not in self._g or dst not in self._g:
            return None
        return self._search(src, dst, float(rate_bps), frozenset(exclude_links), credit or {}, now)

    def best_feasible_rate(self, src: str, dst: str, *, exclude_links: Iterable[str] = (),
                           credit: Mapping[str, float] | None = None) -> float:
        """The largest rate some path could still carry (max over paths of the least residual):
        the counter-proposal when a request does not fit. 0.0 without any routable path;
        inf when every link of a path has an unknown, unlimited rate."""
        _check_endpoints(src, dst)
        if src not in self._g or dst not in self._g:
            return 0.0
        excluded, credit = frozenset(exclude_links), credit or {}
        best = {src: math.inf}
        heap = [(-math.inf, src)]
        done: set[str] = set()
        adj = self._g._adj  # networkx's dict of dicts: the hot loop skips the view layer
        routable, residual = self._routable, self._residual
        while heap:
            neg_width, u = heapq.heappop(heap)
            if u in done:
                continue
            if u == dst:
                return -neg_width
            done.add(u)
            for v, attrs in adj[u].items():
                if v in done or attrs["name"] in excluded or not routable(attrs):
                    continue
                width = min(-neg_width, residual(attrs, credit))
                if width > 0 and width > best.get(v, 0.0):
                    best[v] = width
                    heapq.heappush(heap, (-width, v))
        return 0.0

    def k_disjoint_paths(self, src: str, dst: str, k: int, *, rate_bps: float = 0.0,
                         exclude_links: Iterable[str] = (), now: float) -> list[Path]:
        """Up to ``k`` node-disjoint feasible paths (for multi-path relay), cheapest first.

        The paths come from a maximum flow on the feasible links, so they are as many as the
        topology allows (up to k), not necessarily the k individually cheapest ones.
        """
        _check_endpoints(src, dst)
        _check_rate(rate_bps)
        if not isinstance(k, int) or k < 1:
            raise ValueError("k must be a positive integer")
        if src not in self._g or dst not in self._g:
            return []
        excluded = frozenset(exclude_links)
        feasible = nx.Graph()
        # Sorted construction: the flow algorithm then returns the same paths on every run.
        feasible.add_nodes_from(sorted(self._g.nodes))
        for name in sorted(self._ends):
            u, v = self._ends[name]
            attrs = self._g.edges[u, v]
            if name not in excluded and self._routable(attrs) and self._residual(attrs, {}) >= rate_bps:
                feasible.add_edge(u, v)
        try:
            raw = list(nx.node_disjoint_paths(feasible, src, dst, cutoff=k))
        except nx.NetworkXNoPath:
            return []
        paths = [self._path_of(nodes, float(rate_bps), now) for nodes in raw]
        paths.sort(key=lambda p: (p.weight, p.nodes))
        return paths[:k]

    def affected_sessions(self, link_name: str, routes: Mapping[str, Sequence[str]]) -> list[str]:
        """KSIDs whose route (node names) crosses the link, sorted."""
        u, v = self._ends[link_name]
        hop = {(u, v), (v, u)}
        return sorted(ksid for ksid, route in routes.items() if any(p in hop for p in zip(route, route[1:])))

    def reroute(self, ksid: str, route: Sequence[str], rate_bps: float, failed_link: str, *,
                now: float) -> Path | None:
        """A replacement path for session ``ksid`` (``route``: node names) that avoids
        ``failed_link``; its own reservation on the old route counts as released. Nothing is
        changed here: ``Reservations.reroute`` moves the reservation."""
        if failed_link not in self._ends:
            raise KeyError(f"session {ksid}: unknown link {failed_link}")
        old_links = self.route_links(route)
        if failed_link not in old_links:
            raise ValueError(f"session {ksid}: its route does not use link {failed_link}")
        credit = {name: float(rate_bps) for name in old_links if name != failed_link}
        return self.find_path(route[0], route[-1], rate_bps, exclude_links=(failed_link,), now=now, credit=credit)

    # ----------------------------------------------------------------- internals

    def _attrs(self, name: str) -> dict[str, Any]:
        try:
            u, v = self._ends[name]
        except KeyError:
            raise KeyError(f"unknown link {name}") from None
        return self._g.edges[u, v]

    def _capacity(self, attrs: Mapping[str, Any]) -> float:
        skr = attrs["skr_bps"]
        if skr is None:
            skr = attrs["expected_skr_bps"]
        return self.unknown_skr_bps if skr is None else skr

    def _routable(self, attrs: Mapping[str, Any]) -> bool:
        qber = attrs["qber"]
        return (attrs["enabled"] and attrs["in_routing"] and attrs["status"] == ROUTABLE_STATUS
                and (qber is None or qber < self.qber_threshold))

    def _residual(self, attrs: Mapping[str, Any], credit: Mapping[str, float]) -> float:
        reserved = max(0.0, attrs["reserved_bps"] - credit.get(attrs["name"], 0.0))
        return self._capacity(attrs) - reserved

    def _cost(self, attrs: Mapping[str, Any], rate: float, credited: float) -> int:
        used = max(0.0, attrs["reserved_bps"] - credited) + rate
        return _cost_units(used, self._capacity(attrs), attrs["qber"], self.qber_threshold,
                           self.weights.load, self.weights.qber)

    def _search(self, src: str, dst: str, rate: float, excluded: frozenset[str],
                credit: Mapping[str, float], now: float) -> Path | None:
        # Label (cost, sessions, -bottleneck, nodes): lexicographic, smaller is better. The hot
        # loop inlines _routable/_capacity (same rules) and reads networkx's dict of dicts.
        start = (0, 0, -math.inf, (src,))
        best: dict[str, tuple] = {src: start}
        heap = [start]
        done: set[str] = set()
        adj = self._g._adj
        thr, unknown, w_load, w_qber = self.qber_threshold, self.unknown_skr_bps, self.weights.load, self.weights.qber
        heappush, heappop = heapq.heappush, heapq.heappop
        while heap:
            label = heappop(heap)
            nodes = label[3]
            u = nodes[-1]
            if u in done:
                continue
            if u == dst:
                return self._path_of(nodes, rate, now, credit=credit, label=label)
            done.add(u)
            cost, sessions, neg_width = label[0], label[1], label[2]
            for v, attrs in adj[u].items():
                if v in done or not (attrs["enabled"] and attrs["in_routing"] and attrs["status"] == ROUTABLE_STATUS):
                    continue
                name = attrs["name"]
                qber = attrs["qber"]
                if name in excluded or (qber is not None and qber >= thr):
                    continue
                capacity = attrs["skr_bps"]
                if capacity is None:
                    capacity = attrs["expected_skr_bps"]
                    if capacity is None:
                        capacity = unknown
                credited = credit.get(name, 0.0) if credit else 0.0
                reserved = attrs["reserved_bps"] - credited if credited else attrs["reserved_bps"]
                if reserved < 0.0:
                    reserved = 0.0
                if reserved + rate > capacity:
                    continue
                key = (cost + _cost_units(reserved + rate, capacity, qber, thr, w_load, w_qber),
                       sessions + attrs["session_count"] - (1 if credited and attrs["session_count"] else 0),
                       max(neg_width, reserved - capacity))
                old = best.get(v)
                # Build the node tuple only for a candidate that can win.
                if old is None or key < old[:3] or (key == old[:3] and nodes + (v,) < old[3]):
                    cand = key + (nodes + (v,),)
                    best[v] = cand
                    heappush(heap, cand)
        return None

    def _path_of(self, nodes: Sequence[str], rate: float, now: float, *, credit: Mapping[str, float] | None = None,
                 label: tuple | None = None) -> Path:
        credit = credit or {}
        links = self.route_links(nodes)
        if label is None:
            cost = sum(self._cost(self._attrs(n), rate, credit.get(n, 0.0)) for n in links)
            sessions = sum(self._attrs(n)["session_count"] for n in links)
            width = min(self._residual(self._attrs(n), credit) for n in links)
        else:
            cost, sessions, width = label[0], label[1], -label[2]
        return Path(nodes=tuple(nodes), links=links, rate_bps=rate, weight=cost / _WEIGHT_SCALE,
                    bottleneck_bps=width, sessions=sessions, computed_at=now)


_VIEW_FIELDS = ("name", "a", "b", "skr_bps", "expected_skr_bps", "qber", "status", "enabled", "reserved_bps",
                "session_count", "length_km", "in_routing")


def _add(g: nx.Graph, ends: dict[str, tuple[str, str]], view: LinkView) -> None:
    if not isinstance(view, LinkView):
        raise TypeError(f"expected a LinkView, got {type(view).__name__}")
    if view.name in ends:
        raise ValueError(f"duplicate link name {view.name}")
    if g.has_edge(view.a, view.b):
        raise ValueError(f"link {view.name}: {view.a} and {view.b} are already joined by link "
                         f"{g.edges[view.a, view.b]['name']} (parallel links are not supported)")
    g.add_edge(view.a, view.b, **{k: _normalised(k, getattr(view, k)) if k in _UPDATABLE else getattr(view, k)
                                  for k in _VIEW_FIELDS})
    ends[view.name] = (view.a, view.b)


def _rising(x: float) -> float:
    """0 at 0, 1 at 1/2, growing to 99 as x reaches 1 (and beyond)."""
    x = max(0.0, x)
    return x / max(1.0 - x, _MIN_HEADROOM)


def _cost_units(used: float, capacity: float, qber: float | None, threshold: float, w_load: float,
                w_qber: float) -> int:
    """The link cost (module docstring) in integer micro-units."""
    cost = 1.0
    if w_load and capacity != math.inf:
        cost += w_load * (_rising(used / capacity) if capacity > 0 else _rising(1.0))
    if w_qber and qber is not None:
        cost += w_qber * _rising(qber / threshold)
    return round(cost * _WEIGHT_SCALE)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_attrs(name: str, attrs: Mapping[str, Any]) -> None:
    for key, value in attrs.items():
        if key in _NUMERIC_ATTRS:
            if value is None:
                if not _NUMERIC_ATTRS[key]:
                    raise ValueError(f"link {name}: {key} must be a number")
                continue
            if not _is_number(value) or math.isnan(value):
                raise ValueError(f"link {name}: {key} must be a number, got {value!r}")
            if key == "qber" and not 0 <= value <= 1:
                raise ValueError(f"link {name}: qber must be in [0, 1], got {value!r}")
            if key == "length_km" and value <= 0:
                raise ValueError(f"link {name}: length_km must be > 0")
            if value < 0 or (key != "skr_bps" and key != "expected_skr_bps" and math.isinf(value)):
                raise ValueError(f"link {name}: {key} must be finite and >= 0, got {value!r}")
        elif key == "status":
            if value not in LINK_STATUSES:
                raise ValueError(f"link {name}: status must be one of {', '.join(LINK_STATUSES)}, got {value!r}")
        elif key in ("enabled", "in_routing"):
            if not isinstance(value, bool):
                raise ValueError(f"link {name}: {key} must be a bool")
        elif key == "session_count":
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"link {name}: session_count must be an integer >= 0")


def _normalised(key: str, value: Any) -> Any:
    if key in _NUMERIC_ATTRS and value is not None:
        return float(value)
    return value


def _check_endpoints(src: str, dst: str) -> None:
    if src == dst:
        raise ValueError(f"source and destination are the same node ({src})")


def _check_rate(rate_bps: float) -> None:
    if not _is_number(rate_bps) or not math.isfinite(rate_bps) or rate_bps < 0:
        raise ValueError(f"rate must be a finite number >= 0, got {rate_bps!r}")


# --------------------------------------------------------------------------- reservations


@dataclass(frozen=True)
class Reservation:
    """The rate a session holds on every link of its route."""

    ksid: str
    nodes: tuple[str, ...]
    links: tuple[str, ...]
    rate_bps: float


@dataclass
class _LinkBook:
    base_bps: float  # load found on the link that no session here accounts for
    base_sessions: int
    rates: dict[str, float] = field(default_factory=dict)  # ksid -> bits/s


class Reservations:
    """Bandwidth reservations of the sessions, all-or-nothing on every link of a path.

    This is the routing element's concurrency boundary: the os-ken app shell and the REST
    thread both call it, so every method holds ``lock`` (re-entrant). Code that changes link
    state from another thread (``routing.update_link`` ...) holds it too.

    Invariant: no reservation made here takes a link's ``reserved_bps`` above its capacity
    (``reserved + rate <= capacity``, the same float expression that becomes the new value).
    A later drop of the key rate can still leave a link over-subscribed
    (``routing.oversubscribed_links()``); admission control decides what to do then.

    A link's reserved rate is its base load (what it carried when this object first touched it,
    e.g. from the database) plus the exact sum (``math.fsum``) of the sessions' rates, so
    reserving and releasing never drifts.
    """

    def __init__(self, routing: RoutingElement):
        self.routing = routing
        self.lock = threading.RLock()
        self._sessions: dict[str, Reservation] = {}
        self._books: dict[str, _LinkBook] = {}

    def get(self, ksid: str) -> Reservation | None:
        with self.lock:
            return self._sessions.get(ksid)

    def sessions(self) -> dict[str, Reservation]:
        with self.lock:
            return dict(self._sessions)

    def routes(self) -> dict[str, tuple[str, ...]]:
        """KSID -> node route, for ``RoutingElement.affected_sessions``."""
        with self.lock:
            return {k: r.nodes for k, r in self._sessions.items()}

    def affected(self, link_name: str) -> list[str]:
        with self.lock:
            return self.routing.affected_sessions(link_name, self.routes())

    def reserve(self, ksid: str, route: Path | Sequence[str], rate_bps: float) -> bool:
        """Reserve ``rate_bps`` on every link of ``route`` (a Path or node names) for ``ksid``.

        False, with nothing reserved, when some link is not routable or lacks the residual.
        """
        _check_rate(rate_bps)
        with self.lock:
            self._check_new(ksid)
            nodes = tuple(route.nodes if isinstance(route, Path) else route)
            links = self.routing.route_links(nodes)
            if len(set(nodes)) != len(nodes):
                raise ValueError(f"session {ksid}: route {list(nodes)} visits a node twice")
            for name in links:
                # The exact value the link would hold, not reserved + rate: the invariant is on it.
                if not self.routing.routable(name) or \
                        self._prospective(name, float(rate_bps)) > self.routing.capacity_bps(name):
                    return False
            self._book(Reservation(ksid, nodes, links, float(rate_bps)))
            return True

    def restore(self, ksid: str, route: Sequence[str], rate_bps: float) -> Reservation:
        """Re-register a session that already holds its path (controller restart): no
        feasibility check, the network carries it already. Load the links ``with_load=False``."""
        _check_rate(rate_bps)
        with self.lock:
            self._check_new(ksid)
            nodes = tuple(route)
            rec = Reservation(ksid, nodes, self.routing.route_links(nodes), float(rate_bps))
            self._book(rec)
            return rec

    def release(self, ksid: str) -> Reservation | None:
        """Give back a session's reservation; None if it held none. Links removed meanwhile are skipped."""
        with self.lock:
            rec = self._sessions.pop(ksid, None)
            if rec is None:
                return None
            for name in rec.links:
                book = self._books.get(name)
                if book is not None:
                    book.rates.pop(ksid, None)
                    self._write(name, book)
            return rec

    def admit(self, ksid: str, src: str, dst: str, rate_bps: float, *, now: float,
              exclude_links: Iterable[str] = ()) -> Path | None:
        """Find a path for ``rate_bps`` and reserve it, as one atomic step; None if none fits."""
        with self.lock:
            self._check_new(ksid)
            path = self.routing.find_path(src, dst, rate_bps, exclude_links=exclude_links, now=now)
            if path is None:
                return None
            # Under the lock only a link filled to within a rounding error of its capacity can
            # pass the search's check and fail the exact one: then nothing fits, conservatively.
            return path if self.reserve(ksid, path, rate_bps) else None

    def reroute(self, ksid: str, failed_link: str, *, now: float) -> Path | None:
        """Move session ``ksid`` off ``failed_link`` onto the best path that fits, atomically.
        None, with the old reservation untouched, when there is no such path."""
        with self.lock:
            rec = self._sessions.get(ksid)
            if rec is None:
                raise KeyError(f"session {ksid} holds no reservation")
            path = self.routing.reroute(ksid, rec.nodes, rec.rate_bps, failed_link, now=now)
            if path is None:
                return None
            self.release(ksid)
            if not self.reserve(ksid, path, rec.rate_bps):
                # Only if a link of the old route was over-subscribed; give the old one back.
                self._book(rec)
                return None
            return path

    def _check_new(self, ksid: str) -> None:
        if not isinstance(ksid, str) or not ksid:
            raise ValueError("ksid must be a non-empty string")
        if ksid in self._sessions:
            raise ValueError(f"session {ksid} already holds a reservation")

    def _prospective(self, name: str, rate: float) -> float:
        book = self._books.get(name)
        if book is None:
            return self.routing._attrs(name)["reserved_bps"] + rate
        return book.base_bps + math.fsum([*book.rates.values(), rate])

    def _book(self, rec: Reservation) -> None:
        for name in rec.links:
            book = self._books.get(name)
            if book is None:
                attrs = self.routing._attrs(name)
                book = self._books[name] = _LinkBook(attrs["reserved_bps"], attrs["session_count"])
            book.rates[rec.ksid] = rec.rate_bps
            self._write(name, book)
        self._sessions[rec.ksid] = rec

    def _write(self, name: str, book: _LinkBook) -> None:
        if self.routing.has_link(name):
            self.routing.update_link(name, reserved_bps=book.base_bps + math.fsum(book.rates.values()),
                                     session_count=book.base_sessions + len(book.rates))
