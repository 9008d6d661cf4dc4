"""The ETSI GS QKD 015 view of a node, built from the topology and session databases.

``node_model`` gives the ``etsi015.model.QkdNode`` of one node: its capabilities,
its interfaces (one per physical link end), its PHYS links with the monitored
performance, and the VIRT links and applications (``qkd_app``, app_id = KSID) of
the sessions routed through it. ``node_document`` encodes it as RFC 7951 JSON,
validated by ``etsi015`` on the way out.
"""
from __future__ import annotations

from decimal import Decimal

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from db import models as m
from etsi015 import codec
from etsi015 import model as e

_LINK_STATUS = {s.name: e.LinkStatus[s.name] for s in m.LinkStatus}
_NODE_STATUS = {s.name: e.NodeStatus[s.name] for s in m.NodeStatus}
_ROLE = {"TRANSMITTER": e.QkdRole.TRANSMITTER, "RECEIVER": e.QkdRole.RECEIVER,
         "TRANSCEIVER": e.QkdRole.TRANSCEIVER}
_QKD_TYPE = {"CV-QKD": e.QkdTechnology.CV_QKD, "DV-QKD": e.QkdTechnology.DV_QKD,
             "DV-QKD-COW": e.QkdTechnology.DV_QKD_COW, "DV-QKD-2Ws": e.QkdTechnology.DV_QKD_2WS}
_IFACE_STATUS = {s.name: s for s in e.InterfaceStatus}
_APP_STATUS = {m.SessionState.PENDING: None, m.SessionState.ACCEPTED: e.AppStatus.ON,
               m.SessionState.ACTIVE: e.AppStatus.ON, m.SessionState.TERMINATED: e.AppStatus.DISCONNECTED}

UINT32_MAX = 0xFFFFFFFF


def find_node(session: Session, name_or_id: str) -> m.Node:
    node = session.scalar(select(m.Node).where(or_(m.Node.name == name_or_id,
                                                   m.Node.qkdn_id == name_or_id.lower())))
    if node is None:
        known = ", ".join(session.scalars(select(m.Node.name).order_by(m.Node.name)))
        raise LookupError(f"no node '{name_or_id}' in the database (nodes: {known or 'none'})")
    return node


def _bps(value: float | None) -> int | None:
    return None if value is None else min(int(round(value)), UINT32_MAX)


def _interface(iface: m.Interface) -> e.Interface:
    port = int(iface.att_port) if iface.att_port and iface.att_port.isdigit() else None
    wavelength = str(iface.wavelength_nm) if iface.wavelength_nm else None
    return e.Interface(
        qkdi_id=iface.qkdi_id, qkdi_model=iface.model, qkdi_type=_QKD_TYPE.get(iface.qkd_type),
        qkdi_att_point=e.AttachmentPoint(device=iface.att_device, port=port),
        qkdi_capabilities=e.InterfaceCapabilities(role_support=_ROLE.get(iface.role or ""),
                                                  wavelength_range=wavelength),
        qkdi_status=_IFACE_STATUS.get(iface.status))


def _phys_link(link: m.Link, node: m.Node) -> e.Link:
    local_is_src = link.src_node_id == node.id
    local_iface = link.src_interface if local_is_src else link.dst_interface
    remote_iface = link.dst_interface if local_is_src else link.src_interface
    remote = link.dst_node if local_is_src else link.src_node
    perf = e.LinkPerformance(skr=_bps(link.skr_bps), eskr=_bps(link.eskr_bps),
                             expected_consumption=_bps(link.reserved_bps) if link.reserved_bps else None)
    if link.qber is not None:
        perf.phys_perf.append(e.PhysPerf(perf_type=e.PhysPerfType.QBER,
                                         value=Decimal(str(round(link.qber, 3)))))
    return e.Link(
        qkdl_id=link.qkdl_id, qkdl_status=_LINK_STATUS[link.status.name], qkdl_enable=link.enabled,
        qkdl_local=e.LinkEnd(qkdn_id=node.qkdn_id, qkdi_id=local_iface.qkdi_id if local_iface else None),
        qkdl_remote=e.LinkEnd(qkdn_id=remote.qkdn_id, qkdi_id=remote_iface.qkdi_id if remote_iface else None),
        qkdl_type=e.LinkType.PHYS,
        phys_channel_att=Decimal(str(round(link.channel_att_db, 3))) if link.channel_att_db is not None else None,
        phys_wavelength=str(link.wavelength_nm) if link.wavelength_nm else None,
        phys_qkd_role=(local_iface.role and _ROLE.get(local_iface.role)) if local_iface else None,
        qkdl_performance=perf)


def _session_views(session: Session, node: m.Node) -> tuple[list[e.Application], list[e.Link]]:
    """qkd_app and VIRT qkd_link of every live session whose route crosses the node."""
    apps: list[e.Application] = []
    links: list[e.Link] = []
    names = {n.name: n.qkdn_id for n in session.scalars(select(m.Node))}
    virt = {v.ksid: v for v in session.scalars(select(m.Link).where(m.Link.kind == m.LinkKind.VIRT))}
    for s in session.scalars(select(m.Session).where(m.Session.state != m.SessionState.TERMINATED)
                             .order_by(m.Session.created_at, m.Session.ksid)):
        route = list(s.route or [])
        if node.name not in route:
            continue
        i = route.index(node.name)
        prev_hop = names.get(route[i - 1]) if i > 0 else None
        next_hop = names.get(route[i + 1]) if i + 1 < len(route) else None
        v = virt.get(s.ksid)
        backing: list[str] = []
        if v is not None:
            backing.append(v.qkdl_id)
            links.append(e.Link(
                qkdl_id=v.qkdl_id, qkdl_status=_LINK_STATUS[v.status.name], qkdl_enable=v.enabled,
                qkdl_local=e.LinkEnd(qkdn_id=names.get(s.src_node)),
                qkdl_remote=e.LinkEnd(qkdn_id=names.get(s.dst_node)),
                qkdl_type=e.LinkType.VIRT, qkdl_applications=[s.ksid], virt_prev_hop=prev_hop,
                virt_next_hop=[next_hop] if next_hop else [], virt_bandwidth=_bps(s.rate_bps)))
        qos = s.qos or {}
        apps.append(e.Application(
            app_id=s.ksid, app_status=_APP_STATUS[s.state], app_type=e.AppType.CLIENT,
            server_app_id=s.src_sae_id, client_app_id=[s.dst_sae_id], app_priority=s.priority,
            creation_time=s.created_at.astimezone().isoformat() if s.created_at else None,
            app_qos=e.QoS(max_bandwidth=_bps(s.rate_bps), min_bandwidth=_bps(qos.get("Min_bps")),
                          jitter=qos.get("Jitter"), ttl=_bps(s.inactivity_timeout_s)),
            backing_qkdl_id=backing, local_qkdn_id=names.get(s.src_node), remote_qkdn_id=names.get(s.dst_node)))
    return apps, links


def node_model(session: Session, name_or_id: str) -> e.QkdNode:
    node = find_node(session, name_or_id)
    phys = session.scalars(select(m.Link).where(m.Link.kind == m.LinkKind.PHYS).where(
        or_(m.Link.src_node_id == node.id, m.Link.dst_node_id == node.id)).order_by(m.Link.id)).all()
    apps, virt = _session_views(session, node)
    return e.QkdNode(
        qkdn_id=node.qkdn_id, qkdn_status=_NODE_STATUS[node.status.name], qkdn_version=node.version,
        qkdn_location_id=node.location or "",
        capabilities=e.Capabilities(link_stats_support=True, application_stats_support=True,
                                    key_relay_mode_enable=True),
        interfaces=[_interface(i) for i in node.interfaces],
        links=[_phys_link(link, node) for link in phys] + virt,
        applications=apps)


def node_document(session: Session, name_or_id: str) -> dict:
    """RFC 7951 ``{"etsi-qkd-sdn-node:qkd_node": {...}}`` of a node (validated)."""
    return codec.encode_node(node_model(session, name_or_id))
