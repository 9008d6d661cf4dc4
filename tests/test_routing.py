"""Routing element and reservations: weights, constrained paths, tie-break, rerouting, concurrency."""
from __future__ import annotations

import itertools
import math
import random
import sys
import threading

import networkx as nx
import pytest

from controller.routing import LinkView, LinkWeights, Path, Reservations, RoutingElement
from db import models as m


def square(**kw) -> RoutingElement:
    """A-B-D and A-C-D: two equal two-hop paths."""
    r = RoutingElement()
    r.load([LinkView(n, a, b, **kw) for n, a, b in (("AB", "A", "B"), ("BD", "B", "D"),
                                                     ("AC", "A", "C"), ("CD", "C", "D"))])
    return r


def poc() -> RoutingElement:
    """The paper's PoC: star around KM0 plus KM4-KM5."""
    r = RoutingElement()
    links = [LinkView(f"L0{i}", "KM0", f"KM{i}", skr_bps=1000.0) for i in range(1, 6)]
    links.append(LinkView("L45", "KM4", "KM5", skr_bps=1000.0))
    r.load(links)
    return r


# --------------------------------------------------------------------------- link views


def test_link_view_from_model_reads_the_topology_row():
    a = m.Node(name="KM0", qkdn_id="00000000-0000-4000-8000-000000000000", km_host="h", km_port=1)
    b = m.Node(name="KM1", qkdn_id="00000000-0000-4000-8000-000000000001", km_host="h", km_port=2)
    row = m.Link(name="L01", qkdl_id="x", kind=m.LinkKind.PHYS, src_node=a, dst_node=b, length_km=12.5,
                 skr_bps=None, eskr_bps=2500.0, qber=0.03, status=m.LinkStatus.PENDING, enabled=True,
                 reserved_bps=100.0, session_count=2)
    view = LinkView.from_model(row)
    assert (view.name, view.a, view.b, view.status) == ("L01", "KM0", "KM1", "PENDING")
    assert view.capacity_bps == 2500.0 and view.qber == 0.03 and view.length_km == 12.5
    assert (view.reserved_bps, view.session_count) == (100.0, 2)
    empty = LinkView.from_model(row, with_load=False)
    assert (empty.reserved_bps, empty.session_count) == (0.0, 0)
    row.kind = m.LinkKind.VIRT
    with pytest.raises(ValueError, match="only PHYS"):
        LinkView.from_model(row)


@pytest.mark.parametrize("kw", [dict(a="A", b="A"), dict(qber=1.5), dict(skr_bps=-1.0), dict(status="UP"),
                                dict(enabled=1), dict(session_count=-1), dict(reserved_bps=math.nan),
                                dict(length_km=0.0), dict(name="")])
def test_link_view_rejects_bad_values(kw):
    base = dict(name="L", a="A", b="B")
    with pytest.raises(ValueError):
        LinkView(**{**base, **kw})


def test_load_rejects_parallel_and_duplicate_links():
    r = RoutingElement()
    with pytest.raises(ValueError, match="parallel"):
        r.load([LinkView("L1", "A", "B"), LinkView("L2", "B", "A")])
    with pytest.raises(ValueError, match="duplicate link name"):
        r.load([LinkView("L1", "A", "B"), LinkView("L1", "B", "C")])
    assert r.links() == []  # a failed load leaves the previous graph


def test_update_link_checks_before_changing_anything():
    r = square()
    with pytest.raises(TypeError, match="colour"):
        r.update_link("AB", skr_bps=10.0, colour="red")
    with pytest.raises(ValueError, match="qber"):
        r.update_link("AB", skr_bps=10.0, qber=2.0)
    assert r.link("AB").skr_bps is None
    with pytest.raises(KeyError):
        r.update_link("ZZ", skr_bps=1.0)
    r.update_link("AB", skr_bps=10, qber=0.02)
    assert r.link("AB").skr_bps == 10.0 and r.link("AB").qber == 0.02


def test_graph_view_is_read_only_and_carries_the_attributes():
    r = poc()
    g = r.graph
    assert g.edges["KM0", "KM1"]["name"] == "L01" and g.edges["KM0", "KM1"]["skr_bps"] == 1000.0
    with pytest.raises(nx.NetworkXError):
        g.add_edge("X", "Y")


# --------------------------------------------------------------------------- weights


def test_weight_is_one_per_hop_without_monitoring_data():
    r = square()
    assert all(r.link_weight(n, 123.0) == 1.0 for n in ("AB", "BD", "AC", "CD"))
    path = r.find_path("A", "D", 1e9, now=0.0)
    assert path.weight == 2.0 and path.bottleneck_bps == math.inf


def test_weight_formula_load_and_qber_terms():
    r = RoutingElement(qber_threshold=0.1)
    r.load([LinkView("L", "A", "B", skr_bps=1000.0, reserved_bps=250.0)])
    assert r.link_weight("L", 0.0) == pytest.approx(1 + 0.25 / 0.75)
    assert r.link_weight("L", 250.0) == pytest.approx(2.0)  # half used after the request
    assert r.link_weight("L", 750.0) == pytest.approx(1 + 1 / 0.01)  # full: capped
    r.update_link("L", reserved_bps=0.0, qber=0.05)
    assert r.link_weight("L", 0.0) == pytest.approx(2.0)  # QBER at half the threshold
    r.update_link("L", qber=0.0999)
    assert r.link_weight("L", 0.0) == pytest.approx(1 + 0.999 / 0.01, rel=1e-5)
    # expected SKR stands in for a missing measurement
    r.update_link("L", skr_bps=None, expected_skr_bps=500.0, qber=None)
    assert r.link_weight("L", 250.0) == pytest.approx(2.0)


def test_weight_coefficients_scale_the_terms():
    r = RoutingElement(weights=LinkWeights(load=3.0, qber=0.0))
    r.load([LinkView("L", "A", "B", skr_bps=1000.0, qber=0.1)])
    assert r.link_weight("L", 500.0) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        LinkWeights(load=-1.0)


def test_load_term_steers_away_from_a_busy_link():
    # Direct link is 1 hop but nearly full; the two-hop detour is idle.
    r = RoutingElement()
    r.load([LinkView("AB", "A", "B", skr_bps=1000.0, reserved_bps=900.0),
            LinkView("AC", "A", "C", skr_bps=1000.0), LinkView("CB", "C", "B", skr_bps=1000.0)])
    assert r.find_path("A", "B", 50.0, now=0.0).nodes == ("A", "C", "B")
    r.update_link("AB", reserved_bps=0.0)
    assert r.find_path("A", "B", 50.0, now=0.0).nodes == ("A", "B")


# --------------------------------------------------------------------------- constrained paths


def test_find_path_honours_the_residual_constraint_exactly():
    r = poc()
    r.update_link("L01", reserved_bps=400.0)
    assert r.find_path("KM1", "KM2", 600.0, now=0.0).nodes == ("KM1", "KM0", "KM2")
    assert r.find_path("KM1", "KM2", 600.5, now=0.0) is None
    path = r.find_path("KM4", "KM5", 10.0, now=7.5)
    assert path == Path(nodes=("KM4", "KM5"), links=("L45",), rate_bps=10.0, weight=pytest.approx(1.0101, abs=1e-6),
                        bottleneck_bps=1000.0, sessions=0, computed_at=7.5)


@pytest.mark.parametrize("change", [dict(status="OFF"), dict(status="PENDING"), dict(status="PASSIVE"),
                                    dict(enabled=False), dict(in_routing=False), dict(qber=0.11)])
def test_links_out_of_service_are_not_used(change):
    r = poc()
    r.update_link("L45", **change)
    assert not r.routable("L45")
    assert r.find_path("KM4", "KM5", 1.0, now=0.0).nodes == ("KM4", "KM0", "KM5")
    r.update_link("L04", **change)
    assert r.find_path("KM4", "KM5", 1.0, now=0.0) is None
    assert r.best_feasible_rate("KM4", "KM5") == 0.0


def test_set_link_up_and_in_routing():
    r = poc()
    r.set_link_up("L45", False)
    assert r.link("L45").status == "OFF" and not r.routable("L45")
    r.set_link_up("L45", True)
    r.set_in_routing("L45", False)
    assert r.link("L45").status == "ACTIVE" and not r.routable("L45")
    r.set_in_routing("L45", True)
    assert r.routable("L45")


def test_find_path_exclusions_and_bad_requests():
    r = poc()
    assert r.find_path("KM4", "KM5", 1.0, exclude_links=["L45"], now=0.0).links == ("L04", "L05")
    assert r.find_path("KM4", "KM9", 1.0, now=0.0) is None
    assert r.best_feasible_rate("KM9", "KM4") == 0.0
    with pytest.raises(ValueError, match="same node"):
        r.find_path("KM4", "KM4", 1.0, now=0.0)
    for bad in (-1.0, math.nan, math.inf, "10"):
        with pytest.raises(ValueError):
            r.find_path("KM4", "KM5", bad, now=0.0)


def test_unknown_skr_setting_routes_only_over_known_links():
    r = RoutingElement(unknown_skr_bps=0.0)
    r.load([LinkView("AB", "A", "B"), LinkView("AC", "A", "C", expected_skr_bps=100.0),
            LinkView("CB", "C", "B", skr_bps=100.0)])
    assert r.find_path("A", "B", 10.0, now=0.0).nodes == ("A", "C", "B")
    assert r.best_feasible_rate("A", "B") == 100.0


def test_tie_break_prefers_fewer_sessions_then_more_residual_then_names():
    r = RoutingElement(weights=LinkWeights(load=0.0))  # hop count only: the tie-break decides
    r.load([LinkView("AB", "A", "B", skr_bps=1000.0), LinkView("BD", "B", "D", skr_bps=1000.0),
            LinkView("AC", "A", "C", skr_bps=2000.0), LinkView("CD", "C", "D", skr_bps=2000.0)])
    assert r.find_path("A", "D", 10.0, now=0.0).nodes == ("A", "C", "D")  # more residual
    r.update_link("AC", session_count=1)
    assert r.find_path("A", "D", 10.0, now=0.0).nodes == ("A", "B", "D")  # fewer sessions
    r.update_link("AC", session_count=0, skr_bps=1000.0, expected_skr_bps=None)
    r.update_link("CD", skr_bps=1000.0)
    assert r.find_path("A", "D", 10.0, now=0.0).nodes == ("A", "B", "D")  # names


@pytest.mark.parametrize("skr", [None, 1000.0])
def test_equal_paths_take_sessions_in_turn(skr):
    # Without monitoring data the session count spreads the load; with it, the load term does.
    r = square(skr_bps=skr)
    res = Reservations(r)
    turns = [res.admit(f"s{i}", "A", "D", 100.0, now=float(i)).nodes[1] for i in range(6)]
    assert turns == ["B", "C", "B", "C", "B", "C"]
    for ksid in ("s0", "s2", "s4"):  # everything on the B side leaves
        res.release(ksid)
    # B catches up with C's three sessions, then the tie goes to B by name, then C again.
    assert [res.admit(f"t{i}", "A", "D", 100.0, now=10.0).nodes[1] for i in range(5)] == ["B", "B", "B", "B", "C"]


def test_equal_costs_tie_exactly_whatever_the_summation_order():
    # 0.1 + 0.2 != 0.3 in floats; costs are integer micro-units, so these paths tie and the
    # session count decides.
    r = RoutingElement(qber_threshold=0.5, weights=LinkWeights(load=0.0, qber=1.0))
    q = [0.5 * x / (1 + x) for x in (0.1, 0.2, 0.3)]  # Q(q/θ) = 0.1, 0.2, 0.3
    r.load([LinkView("AB", "A", "B", qber=q[0]), LinkView("BD", "B", "D", qber=q[1]),
            LinkView("AC", "A", "C", qber=q[2]), LinkView("CD", "C", "D", qber=0.0, session_count=0)])
    r.update_link("AB", session_count=1)
    assert r.link_weight("AB") + r.link_weight("BD") == r.link_weight("AC") + r.link_weight("CD")
    assert r.find_path("A", "D", 1.0, now=0.0).nodes == ("A", "C", "D")


# --------------------------------------------------------------------------- properties on generated topologies


def random_topology(seed: int, n: int = 12) -> tuple[RoutingElement, nx.Graph]:
    rng = random.Random(seed)
    g = nx.waxman_graph(n, beta=0.6, alpha=0.5, seed=seed) if seed % 2 else \
        nx.random_geometric_graph(n, 0.45, seed=seed)
    views = []
    for i, (u, v) in enumerate(sorted(g.edges)):
        skr = rng.choice([None, rng.uniform(100, 2000)])
        views.append(LinkView(f"L{i}", f"N{u}", f"N{v}", skr_bps=skr,
                              expected_skr_bps=rng.uniform(100, 2000) if skr is None else None,
                              qber=rng.choice([None, rng.uniform(0.0, 0.12)]),
                              status=rng.choice(["ACTIVE"] * 6 + ["OFF"]), enabled=rng.random() > 0.05,
                              reserved_bps=rng.choice([0.0, rng.uniform(0, 100)]),
                              session_count=rng.randrange(3)))
    r = RoutingElement()
    rng.shuffle(views)
    r.load(views, nodes=[f"N{u}" for u in g.nodes])
    return r, g


def feasible_graph(r: RoutingElement, rate: float) -> nx.Graph:
    f = nx.Graph()
    f.add_nodes_from(r.nodes())
    for view in r.links():
        if r.routable(view.name) and r.residual_bps(view.name) >= rate:
            f.add_edge(view.a, view.b, name=view.name, w=r.link_weight(view.name, rate))
    return f


@pytest.mark.parametrize("seed", range(8))
def test_paths_on_generated_topologies_are_feasible_and_optimal(seed):
    r, _ = random_topology(seed)
    rng = random.Random(1000 + seed)
    nodes = r.nodes()
    checked_none = checked_path = 0
    for _ in range(40):
        src, dst = rng.sample(nodes, 2)
        rate = rng.choice([1.0, 200.0, 800.0, 1500.0])
        path = r.find_path(src, dst, rate, now=0.0)
        f = feasible_graph(r, rate)
        if path is None:
            assert not nx.has_path(f, src, dst)
            checked_none += 1
            continue
        checked_path += 1
        assert path.nodes[0] == src and path.nodes[-1] == dst and len(set(path.nodes)) == len(path.nodes)
        assert path.links == r.route_links(path.nodes)
        for name in path.links:
            assert r.routable(name) and r.residual_bps(name) >= rate
        assert path.bottleneck_bps == min(r.residual_bps(n) for n in path.links)
        brute = min(sum(f.edges[a, b]["w"] for a, b in zip(p, p[1:])) for p in nx.all_simple_paths(f, src, dst))
        assert path.weight == pytest.approx(brute, abs=1e-5)
    assert checked_none and checked_path  # the generated cases exercise both outcomes


@pytest.mark.parametrize("seed", range(8))
def test_best_feasible_rate_is_the_max_bottleneck(seed):
    r, _ = random_topology(seed, n=10)
    f = feasible_graph(r, 0.0)
    for src, dst in itertools.combinations(r.nodes()[:6], 2):
        brute = max((min(r.residual_bps(f.edges[a, b]["name"]) for a, b in zip(p, p[1:]))
                     for p in nx.all_simple_paths(f, src, dst)), default=0.0)
        best = r.best_feasible_rate(src, dst)
        assert best == max(brute, 0.0)
        if best > 0:
            assert r.find_path(src, dst, best, now=0.0) is not None
            assert r.find_path(src, dst, best * 1.0001 + 1e-9, now=0.0) is None


def test_answers_do_not_depend_on_load_order():
    a, _ = random_topology(3)
    b = RoutingElement()
    b.load(sorted(a.links(), key=lambda v: v.name), nodes=a.nodes())
    for src, dst in itertools.permutations(a.nodes()[:5], 2):
        assert a.find_path(src, dst, 50.0, now=0.0) == b.find_path(src, dst, 50.0, now=0.0)


# --------------------------------------------------------------------------- disjoint paths


def test_k_disjoint_paths_are_node_disjoint_and_feasible():
    r = RoutingElement()
    r.load([LinkView(f"{a}{b}", a, b, skr_bps=100.0) for a, b in
            [("S", "A"), ("A", "T"), ("S", "B"), ("B", "T"), ("S", "C"), ("C", "D"), ("D", "T"), ("A", "B")]])
    paths = r.k_disjoint_paths("S", "T", 5, rate_bps=10.0, now=0.0)
    assert [p.nodes for p in paths] == [("S", "A", "T"), ("S", "B", "T"), ("S", "C", "D", "T")]
    assert r.k_disjoint_paths("S", "T", 2, now=0.0)[0].nodes == ("S", "A", "T")
    assert len(r.k_disjoint_paths("S", "T", 2, now=0.0)) == 2
    r.update_link("CD", reserved_bps=95.0)
    assert len(r.k_disjoint_paths("S", "T", 5, rate_bps=10.0, now=0.0)) == 2
    assert r.k_disjoint_paths("S", "T", 5, rate_bps=1000.0, now=0.0) == []
    with pytest.raises(ValueError):
        r.k_disjoint_paths("S", "T", 0, now=0.0)


@pytest.mark.parametrize("seed", range(4))
def test_k_disjoint_paths_reach_the_connectivity(seed):
    r, _ = random_topology(seed, n=14)
    f = feasible_graph(r, 0.0)
    for src, dst in itertools.combinations(r.nodes()[:5], 2):
        paths = r.k_disjoint_paths(src, dst, 4, now=0.0)
        inner = [set(p.nodes[1:-1]) for p in paths]
        assert all(not (x & y) for x, y in itertools.combinations(inner, 2))
        assert all(r.routable(n) for p in paths for n in p.links)
        if not nx.has_path(f, src, dst):
            assert paths == []
        elif not f.has_edge(src, dst):
            assert len(paths) == min(4, nx.node_connectivity(f, src, dst))


def test_k_disjoint_paths_with_adjacent_endpoints_include_the_direct_link():
    r = poc()
    assert [p.nodes for p in r.k_disjoint_paths("KM4", "KM5", 3, now=0.0)] == [("KM4", "KM5"), ("KM4", "KM0", "KM5")]


# --------------------------------------------------------------------------- failures and rerouting


def test_affected_sessions():
    r = poc()
    routes = {"s1": ["KM2", "KM0", "KM3"], "s2": ["KM4", "KM5"], "s3": ["KM3", "KM0", "KM4"],
              "s4": ["KM5", "KM4"]}
    assert r.affected_sessions("L03", routes) == ["s1", "s3"]
    assert r.affected_sessions("L45", routes) == ["s2", "s4"]
    assert r.affected_sessions("L01", routes) == []
    with pytest.raises(KeyError):
        r.affected_sessions("nope", routes)


def diamond() -> RoutingElement:
    # A-B is the only way out of A, and has room for one session only.
    r = RoutingElement()
    r.load([LinkView("AB", "A", "B", skr_bps=100.0), LinkView("BD", "B", "D", skr_bps=1000.0),
            LinkView("BC", "B", "C", skr_bps=1000.0), LinkView("CD", "C", "D", skr_bps=1000.0)])
    return r


def test_reroute_counts_the_sessions_own_reservation_as_released():
    r = diamond()
    res = Reservations(r)
    assert res.admit("s", "A", "D", 100.0, now=0.0).nodes == ("A", "B", "D")
    assert r.residual_bps("AB") == 0.0
    path = r.reroute("s", ["A", "B", "D"], 100.0, "BD", now=1.0)
    assert path.nodes == ("A", "B", "C", "D")
    assert r.link("BD").reserved_bps == 100.0  # the element itself changes nothing
    assert r.find_path("A", "D", 100.0, exclude_links=["BD"], now=1.0) is None  # without the credit
    with pytest.raises(ValueError, match="does not use"):
        r.reroute("s", ["A", "B", "D"], 100.0, "CD", now=1.0)


def test_reservations_reroute_moves_the_reservation_atomically():
    r = diamond()
    res = Reservations(r)
    res.admit("s", "A", "D", 100.0, now=0.0)
    r.set_link_up("BD", False)
    assert res.affected("BD") == ["s"]
    path = res.reroute("s", "BD", now=2.0)
    assert path.nodes == ("A", "B", "C", "D")
    assert {v.name: (v.reserved_bps, v.session_count) for v in r.links()} == {
        "AB": (100.0, 1), "BC": (100.0, 1), "CD": (100.0, 1), "BD": (0.0, 0)}
    assert res.get("s").nodes == ("A", "B", "C", "D")
    # No way around CD: nothing changes.
    r.set_link_up("CD", False)
    assert res.reroute("s", "CD", now=3.0) is None
    assert res.get("s").links == ("AB", "BC", "CD") and r.link("CD").reserved_bps == 100.0
    with pytest.raises(KeyError):
        res.reroute("unknown", "CD", now=3.0)


# --------------------------------------------------------------------------- reservations


def test_reserve_is_all_or_nothing():
    r = poc()
    r.update_link("L03", reserved_bps=950.0)
    res = Reservations(r)
    assert res.reserve("s", ["KM2", "KM0", "KM3"], 100.0) is False
    assert r.link("L02").reserved_bps == 0.0 and r.link("L02").session_count == 0 and res.get("s") is None
    r.set_link_up("L02", False)
    assert res.reserve("s", ["KM2", "KM0", "KM1"], 1.0) is False
    assert res.reserve("s", ["KM1", "KM0", "KM4"], 1000.0) is True
    assert res.reserve("t", ["KM1", "KM0", "KM5"], 0.5) is False  # L01 full
    with pytest.raises(ValueError, match="already holds"):
        res.reserve("s", ["KM4", "KM5"], 1.0)
    with pytest.raises(KeyError):
        res.reserve("u", ["KM1", "KM2"], 1.0)
    with pytest.raises(ValueError, match="twice"):
        res.reserve("u", ["KM1", "KM0", "KM4", "KM0", "KM2"], 1.0)


def test_release_returns_links_to_their_exact_base_load():
    r = poc()
    r.update_link("L04", reserved_bps=12.5, session_count=1)  # e.g. from the database
    res = Reservations(r)
    rates = [0.1, 0.2, 0.7, 1e-3, 333.3, 0.3]
    for i, rate in enumerate(rates):
        assert res.reserve(f"s{i}", ["KM4", "KM0", "KM1"], rate)
    assert r.link("L04").session_count == 1 + len(rates)
    assert r.link("L04").reserved_bps == 12.5 + math.fsum(rates)
    for i in (3, 0, 5, 1, 4, 2):
        assert res.release(f"s{i}").rate_bps == rates[i]
    assert (r.link("L01").reserved_bps, r.link("L01").session_count) == (0.0, 0)
    assert (r.link("L04").reserved_bps, r.link("L04").session_count) == (12.5, 1)
    assert res.release("s0") is None


def test_invariant_holds_to_the_last_bit():
    # 0.1 + 0.2 exceeds 0.3 in binary floating point: the second session must not fit.
    r = RoutingElement()
    r.load([LinkView("AB", "A", "B", skr_bps=0.3)])
    res = Reservations(r)
    assert res.reserve("s1", ["A", "B"], 0.1)
    assert res.reserve("s2", ["A", "B"], 0.2) is False
    assert r.link("AB").reserved_bps <= r.capacity_bps("AB")
    assert res.admit("s3", "A", "B", 0.2, now=0.0) is None


def test_restore_skips_the_feasibility_check_and_oversubscription_is_reported():
    r = poc()
    res = Reservations(r)
    rec = res.restore("old", ["KM1", "KM0", "KM2"], 1200.0)  # a session from before a restart
    assert rec.links == ("L01", "L02") and r.link("L01").reserved_bps == 1200.0
    assert r.oversubscribed_links() == ["L01", "L02"]
    assert res.admit("new", "KM1", "KM2", 1.0, now=0.0) is None
    res.release("old")
    r.update_link("L45", skr_bps=10.0)  # SKR drop under an existing reservation
    assert res.reserve("a", ["KM4", "KM5"], 8.0)
    r.update_link("L45", skr_bps=5.0)
    assert r.oversubscribed_links() == ["L45"]


def test_admit_is_find_plus_reserve():
    r = poc()
    res = Reservations(r)
    path = res.admit("s", "KM2", "KM3", 600.0, now=1.0)
    assert path.nodes == ("KM2", "KM0", "KM3") and res.get("s").rate_bps == 600.0
    assert res.admit("t", "KM2", "KM3", 600.0, now=1.0) is None
    assert res.get("t") is None
    assert r.best_feasible_rate("KM2", "KM3") == 400.0
    assert res.routes() == {"s": ("KM2", "KM0", "KM3")}


def test_fifty_threads_never_reserve_more_than_a_links_skr():
    r = poc()
    r.update_link("L45", skr_bps=700.0)
    res = Reservations(r)
    violations: list[str] = []
    admitted = [0] * 50
    barrier = threading.Barrier(50)
    pairs = [("KM1", "KM2"), ("KM2", "KM3"), ("KM4", "KM5"), ("KM3", "KM5"), ("KM1", "KM4")]

    def check() -> None:
        with res.lock:
            for view in r.links():
                if view.reserved_bps > r.capacity_bps(view.name):
                    violations.append(f"{view.name}: {view.reserved_bps} > {r.capacity_bps(view.name)}")
                held = math.fsum(rec.rate_bps for rec in res.sessions().values() if view.name in rec.links)
                if held != view.reserved_bps:
                    violations.append(f"{view.name}: books {held} != link {view.reserved_bps}")

    def worker(t: int) -> None:
        rng = random.Random(t)
        mine: list[str] = []
        barrier.wait()
        for i in range(40):
            if mine and rng.random() < 0.3:
                res.release(mine.pop(rng.randrange(len(mine))))
            else:
                src, dst = rng.choice(pairs)
                if res.admit(f"t{t}-{i}", src, dst, rng.choice([13.0, 37.5, 101.0]), now=float(i)) is not None:
                    mine.append(f"t{t}-{i}")
                    admitted[t] += 1
            check()

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        threads = [threading.Thread(target=worker, args=(t,)) for t in range(50)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        sys.setswitchinterval(old)
    check()
    assert violations == []
    assert sum(admitted) > 100  # the links did fill up and drain
    for ksid in list(res.sessions()):
        res.release(ksid)
    assert all(v.reserved_bps == 0.0 and v.session_count == 0 for v in r.links())
