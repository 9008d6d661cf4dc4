"""The routing element as an os-ken app: ``RoutingElement`` + ``Reservations`` (controller/routing.py).

Loaded from the topology DB at start-up (PHYS links, no reservations: the sessions of a previous
run are terminated by then). Link status comes from the SDN controller (``EventLinkState``), the
smoothed key rate and QBER from the monitoring element (``EventLinkMetrics``), out-of-routing
decisions from it too (``EventLinkRouting``). Admission control asks for paths and reservations
with requests (``PathRequest``, ``BestRateRequest``, ``ReserveRequest``, ``ReleaseRequest``);
every change of a link's reservations is written to its DB row (reserved bit/s, sessions).
"""
from __future__ import annotations

from typing import Iterable

from os_ken.controller.handler import set_ev_cls
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from controller.apps.base import ControllerApp
from controller.apps.events import (BestRateRequest, EventLinkMetrics, EventLinkRouting, EventLinkState,
                                    LoadRequest, PathRequest, ReleaseRequest, ReserveRequest)
from controller.routing import LinkView, Reservations, RoutingElement
from db import models as dbm


class RoutingApp(ControllerApp):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cfg = self.ctx.config
        self.routing = RoutingElement(qber_threshold=cfg.routing_qber_threshold,
                                      unknown_skr_bps=cfg.routing_unknown_skr_bps)
        self.reservations = Reservations(self.routing)
        with self.ctx.session_factory() as session:
            links = session.scalars(select(dbm.Link).where(dbm.Link.kind == dbm.LinkKind.PHYS)
                                    .options(selectinload(dbm.Link.src_node), selectinload(dbm.Link.dst_node))
                                    .order_by(dbm.Link.name)).all()
            views = [LinkView.from_model(link, with_load=False) for link in links]
            nodes = session.scalars(select(dbm.Node.name)).all()
        self.routing.load(views, nodes)

    def health(self) -> dict:
        links = self.routing.links()
        return {"links": len(links), "routable_links": sum(1 for l in links if self.routing.routable(l.name)),
                "reservations": len(self.reservations.sessions())}

    # ----------------------------------------------------------------- link state

    def _update(self, link: str, **attrs) -> None:
        if not self.routing.has_link(link):
            self.log.warning("update of unknown link %s ignored", link)
            return
        with self.reservations.lock:
            self.routing.update_link(link, **attrs)

    @set_ev_cls(EventLinkState)
    def _link_state(self, ev: EventLinkState) -> None:
        self._update(ev.link, status=ev.status)

    @set_ev_cls(EventLinkMetrics)
    def _link_metrics(self, ev: EventLinkMetrics) -> None:
        attrs = {"skr_bps": ev.skr_bps}
        if ev.qber is not None:
            attrs["qber"] = ev.qber
        self._update(ev.link, **attrs)

    @set_ev_cls(EventLinkRouting)
    def _link_routing(self, ev: EventLinkRouting) -> None:
        self._update(ev.link, in_routing=ev.in_routing)

    # ----------------------------------------------------------------- requests

    @set_ev_cls(PathRequest)
    def _path(self, req: PathRequest) -> None:
        self.respond(req, lambda: self.routing.find_path(req.src_node, req.dst_node, req.rate_bps,
                                                         exclude_links=req.exclude_links, now=req.now))

    @set_ev_cls(BestRateRequest)
    def _best_rate(self, req: BestRateRequest) -> None:
        self.respond(req, lambda: self.routing.best_feasible_rate(req.src_node, req.dst_node,
                                                                  exclude_links=req.exclude_links))

    @set_ev_cls(ReserveRequest)
    def _reserve(self, req: ReserveRequest) -> None:
        def reserve() -> bool:
            ok = self.reservations.reserve(req.ksid, req.nodes, req.rate_bps)
            if ok:
                self._write_load(self.routing.route_links(req.nodes))
            return ok
        self.respond(req, reserve)

    @set_ev_cls(ReleaseRequest)
    def _release(self, req: ReleaseRequest) -> None:
        def release() -> bool:
            rec = self.reservations.release(req.ksid)
            if rec is not None:
                self._write_load(rec.links)
            return rec is not None
        self.respond(req, release)

    @set_ev_cls(LoadRequest)
    def _load(self, req: LoadRequest) -> None:
        self.respond(req, lambda: {v.name: (v.reserved_bps, v.session_count) for v in self.routing.links()})

    def _write_load(self, links: Iterable[str]) -> None:
        load = {}
        for name in links:
            if self.routing.has_link(name):
                view = self.routing.link(name)
                load[name] = (view.reserved_bps, view.session_count)
        self.ctx.store.link_load(load)
