"""Benchmark of the routing element: path computation and admission on a large topology.

    python benchmarks/routing_bench.py [--requests 2000] [--hold 1500] [--nodes 1000] [--links 5000] [--seed 1]

Generates a seeded metro-like QKD topology (nodes scattered on a 100 km x 100 km square; each
node joined to its nearest earlier node so the graph is connected, then links drawn between
near neighbours up to the link count; key rate falling with fibre length, QBER 1-6 %), and
times, over N random requests (rates 2-30 kb/s; up to --hold sessions are held, then the oldest
leave as new ones come, so links fill up and some requests are refused). Each request is served
twice, as two sessions: once as find_path then reserve (timed apart), once as admit.

- find_path: the constrained least-cost path alone;
- reserve: the all-or-nothing reservation alone, on the path just found;
- admit: path search plus reservation as one step under the Reservations lock (what admission
  control calls);
- best_feasible_rate: the widest path (counter-proposal) for the same pair;
- reroute: moving a session off one of its links (find with credit, release, reserve);
- release.

Prints p50 / p99 / max per operation, the admission outcome, and the machine.
"""
from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time

from _common import REPO, machine, on_path, pct

on_path(REPO)

import networkx as nx  # noqa: E402

from controller.routing import LinkView, Reservations, RoutingElement  # noqa: E402


def topology(nodes: int, links: int, seed: int) -> list[LinkView]:
    rng = random.Random(seed)
    pos = [(rng.uniform(0, 100), rng.uniform(0, 100)) for _ in range(nodes)]

    def dist(i: int, j: int) -> float:
        return max(0.5, math.dist(pos[i], pos[j]))

    edges: set[tuple[int, int]] = set()
    for i in range(1, nodes):
        j = min(range(i), key=lambda k: dist(i, k))
        edges.add((j, i))
    near = {i: sorted((j for j in range(nodes) if j != i), key=lambda j: dist(i, j))[:16] for i in range(nodes)}
    while len(edges) < links:
        i = rng.randrange(nodes)
        j = rng.choice(near[i])
        edges.add((min(i, j), max(i, j)))
    views = []
    for n, (i, j) in enumerate(sorted(edges)):
        length = dist(i, j)
        # Metro decoy-state BB84 order of magnitude: 200 kb/s at 0 km, falling 0.2 dB/km.
        skr = 2e5 * 10 ** (-0.2 * length / 10)
        views.append(LinkView(f"L{n}", f"N{i}", f"N{j}", skr_bps=round(skr, 1), qber=round(rng.uniform(0.01, 0.06), 4),
                              length_km=round(length, 3)))
    return views


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--hold", type=int, default=1500, help="sessions held before the oldest leave")
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--links", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    views = topology(args.nodes, args.links, args.seed)
    routing = RoutingElement()
    routing.load(views)
    res = Reservations(routing)
    build_s = time.perf_counter() - t0
    g = routing.graph
    assert nx.is_connected(g) and g.number_of_edges() == args.links

    rng = random.Random(args.seed + 1)
    names = routing.nodes()
    times: dict[str, list[float]] = {k: [] for k in
                                     ("find_path", "admit", "reserve", "best_feasible_rate", "reroute", "release")}
    active: list[str] = []
    admitted = rejected = rerouted = 0
    hops: list[int] = []
    clock = time.perf_counter
    for i in range(args.requests):
        src, dst = rng.sample(names, 2)
        rate = rng.choice([2e3, 5e3, 1e4, 3e4])
        now = float(i)

        t = clock()
        path = routing.find_path(src, dst, rate, now=now)
        times["find_path"].append(clock() - t)

        t = clock()
        routing.best_feasible_rate(src, dst)
        times["best_feasible_rate"].append(clock() - t)

        if path is not None:
            t = clock()
            ok = res.reserve(f"p{i}", path, rate)
            times["reserve"].append(clock() - t)
            if ok:
                active.append(f"p{i}")

        t = clock()
        admitted_path = res.admit(f"a{i}", src, dst, rate, now=now)
        times["admit"].append(clock() - t)
        if admitted_path is None:
            rejected += 1
        else:
            admitted += 1
            hops.append(admitted_path.hops)
            active.append(f"a{i}")

        if active and i % 4 == 0:
            ksid = rng.choice(active)
            rec = res.get(ksid)
            t = clock()
            moved = res.reroute(ksid, rng.choice(rec.links), now=now)
            times["reroute"].append(clock() - t)
            rerouted += moved is not None

        while len(active) > args.hold:
            t = clock()
            res.release(active.pop(0))
            times["release"].append(clock() - t)

    print(f"routing benchmark: {args.nodes} nodes, {args.links} links (seed {args.seed}), "
          f"{args.requests} requests, up to {args.hold} sessions held; graph built in {build_s:.2f} s")
    print(f"machine: {machine()}, networkx {nx.__version__}")
    print()
    print(f"{'operation':<20} {'n':>6} {'p50 ms':>9} {'p99 ms':>9} {'mean ms':>9} {'max ms':>9}")
    for op, values in times.items():
        if not values:
            continue
        ms = [v * 1e3 for v in values]
        print(f"{op:<20} {len(ms):>6} {pct(ms, 0.5):>9.3f} {pct(ms, 0.99):>9.3f} {statistics.fmean(ms):>9.3f} "
              f"{max(ms):>9.3f}")
    print()
    print(f"admit: {admitted} admitted, {rejected} rejected; mean hops {statistics.fmean(hops):.2f}; "
          f"{rerouted}/{len(times['reroute'])} reroutes found a path; "
          f"{len(active)} sessions held at the end; over-subscribed links: {len(routing.oversubscribed_links())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
