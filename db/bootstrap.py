"""Load a parsed network file into the topology and user-profile databases.

One transaction: either the whole network is written or nothing is. Loading the
same network twice changes nothing; a different network (or a changed file)
needs ``replace=True``, which reloads topology, users and applications and
drops the sessions that referred to the old ones (events are kept: they are
history).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from db import models as m
from db.netfile import Network


class BootstrapError(Exception):
    pass


@dataclass(frozen=True)
class LoadResult:
    network: str
    action: str  # "created", "unchanged" or "replaced"
    nodes: int
    links: int
    users: int
    applications: int


def network_digest(network: Network) -> str:
    """SHA-256 of the network's content (not of its file name or formatting)."""
    data = dataclasses.asdict(network)
    data.pop("source", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def load_network(session: Session, network: Network, *, replace: bool = False) -> LoadResult:
    """Write ``network`` into the databases in the caller's transaction."""
    digest = network_digest(network)
    existing = session.scalars(select(m.NetworkMeta)).all()
    action = "created"
    if existing:
        meta = existing[0]
        if len(existing) == 1 and meta.name == network.name and meta.digest == digest:
            return _result(network, "unchanged")
        if not replace:
            raise BootstrapError(
                f"the database already holds network '{meta.name}' (loaded from {meta.source or 'unknown'}"
                f" at {meta.loaded_at:%Y-%m-%d %H:%M:%S}) and {network.source or 'this file'} differs from it;"
                " use --replace to reload it")
        _clear(session)
        action = "replaced"
    elif not replace and _has_rows(session):
        raise BootstrapError("the database holds nodes or users that no network file loaded; "
                             "use --replace to overwrite them")
    elif replace:
        _clear(session)

    nodes: dict[str, m.Node] = {}
    for n in network.nodes:
        nodes[n.name] = m.Node(qkdn_id=n.qkdn_id, name=n.name, location=n.location, km_host=n.km_host,
                               km_port=n.km_port, status=m.NodeStatus.NEW)
    session.add_all(nodes.values())

    for link in network.links:
        ifaces = []
        for node_name, role in ((link.master, "TRANSMITTER"), (link.slave, "RECEIVER")):
            iface = m.Interface(node=nodes[node_name], qkdi_id=network.interface_id(node_name, link.name),
                                model="qkdsdn-twin" if link.device else "etsi014-kme", qkd_type="DV-QKD",
                                att_device=node_name, att_port=str(network.interface_id(node_name, link.name)), role=role,
                                wavelength_nm=link.wavelength_nm, status="ENABLED")
            ifaces.append(iface)
        session.add_all(ifaces)
        device = None
        if link.device is not None:
            device = {"type": "twin", **dataclasses.asdict(link.device)}
        elif link.kme is not None:
            # Paths to certificates only; never key material.
            device = {"type": "etsi014", **dataclasses.asdict(link.kme)}
        session.add(m.Link(
            qkdl_id=link.qkdl_id, name=link.name, kind=m.LinkKind.PHYS, src_node=nodes[link.master],
            dst_node=nodes[link.slave], src_interface=ifaces[0], dst_interface=ifaces[1],
            length_km=link.length_km, attenuation_db_km=link.attenuation_db_km,
            channel_att_db=round(link.channel_att_db, 3), wavelength_nm=link.wavelength_nm,
            status=m.LinkStatus.PENDING, enabled=True, reserved_bps=0.0, session_count=0, device=device))

    users: dict[str, m.User] = {}
    for u in network.users:
        user = m.User(name=u.name, revoked=u.revoked)
        user.sla = m.SLA(max_priority=u.sla.max_priority, max_bps=u.sla.max_bps,
                         max_sessions=u.sla.max_sessions, bucket_bits=u.sla.bucket_bits,
                         allowed_destinations=list(u.sla.allowed_destinations)
                         if u.sla.allowed_destinations is not None else None)
        if u.token_hash:
            user.credentials.append(m.Credential(kind=m.CredentialKind.TOKEN_PBKDF2, value=u.token_hash))
        users[u.name] = user
    session.add_all(users.values())

    for a in network.applications:
        app = m.Application(app_id=a.app_id, sae_id=a.sae_id, node=nodes[a.node], user=users[a.user],
                            priority=a.priority)
        if a.cert_sha256:
            app.credentials.append(m.Credential(kind=m.CredentialKind.CERT_SHA256, value=a.cert_sha256))
        session.add(app)

    session.add(m.NetworkMeta(name=network.name, description=network.description, source=network.source,
                              digest=digest))
    session.add(m.Event(element="db", kind="network_loaded",
                        details={"network": network.name, "action": action, "source": network.source}))
    session.flush()
    return _result(network, action)


def _result(network: Network, action: str) -> LoadResult:
    return LoadResult(network=network.name, action=action, nodes=len(network.nodes), links=len(network.links),
                      users=len(network.users), applications=len(network.applications))


def _has_rows(session: Session) -> bool:
    return any(session.scalar(select(func.count()).select_from(t)) for t in (m.Node, m.User))


def _clear(session: Session) -> None:
    # Children first, so that this works without ON DELETE CASCADE support too.
    for model in (m.Session, m.Credential, m.Application, m.SLA, m.User, m.LinkSample, m.Link, m.Interface,
                  m.Node, m.NetworkMeta):
        session.execute(delete(model))
    session.flush()
