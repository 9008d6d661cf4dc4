"""A key session's configuration and its ETSI GS QKD 015 form (``qkd_app`` + VIRT ``qkd_link``).

Whoever configures a key manager (the controller over the bus, a RESTCONF client, the
local control plane of the agents) and the key manager itself (its SDN agent) meet on
this mapping, fixed in docs/key-management.md:

| configuration                | ETSI 015 leaf |
|------------------------------|---------------|
| KSID                         | ``qkd_app/app_id`` (and ``qkd_link/qkdl_applications``) |
| priority                     | ``qkd_app/app_priority`` |
| token-bucket rate (bit/s)    | ``qkd_app/app_qos/max_bandwidth`` |
| token-bucket size (bits)     | ``max_bandwidth x app_qos/jitter / 1000`` |
| inactivity timeout (s)       | ``qkd_app/app_qos/ttl`` |
| endpoints                    | ``server_app_id`` / ``client_app_id`` (SAEs), ``local_qkdn_id`` / ``remote_qkdn_id`` |
| previous / next hop          | the VIRT ``qkd_link`` named by ``backing_qkdl_id``: ``virt_prev_hop``, ``virt_next_hop`` |

``SessionConfig`` is the configuration, ``etsi_from_config`` / ``config_from_etsi`` turn it
into the two model objects and back, and ``session_entries`` / ``session_from_entries`` do
the same with the RFC 7951 entry objects that a bus ``configure`` message carries
(``qkdsdn.bus.config_message``). ``virt_link_id`` is the VIRT link id both sides derive
from a KSID. Plain data and functions: no I/O, no threads.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from etsi015 import codec
from etsi015 import model as m
from etsi015.validate import CONTENT_CONFIG

__all__ = [
    "SessionConfig", "SessionMappingError", "config_from_etsi", "etsi_from_config",
    "session_entries", "session_from_entries", "virt_link_id", "app_issues", "link_path", "app_path",
    "quote_key", "UINT32_MAX", "VIRT_NAMESPACE",
]

UINT32_MAX = 0xFFFFFFFF
_ROOT_PATH = f"/{m.NODE_MODULE}:qkd_node"
# The namespace of the VIRT link ids derived from KSIDs (the agents' and the controller's).
VIRT_NAMESPACE = uuid.UUID("1b7d9a52-3f0e-4c8a-9d21-5e6f7a8b9c0d")


def virt_link_id(ksid: str) -> str:
    """The qkdl_id of the VIRT link (forwarding entry) that backs session ``ksid``."""
    return str(uuid.uuid5(VIRT_NAMESPACE, ksid))


# --------------------------------------------------------------------------- error paths


def quote_key(value: Any) -> str:
    text = str(value)
    return f'"{text}"' if "'" in text else f"'{text}'"


def link_path(qkdl_id: str, leaf: str | None = None) -> str:
    """RFC 8040 error-path of a qkd_link entry (or of one of its leaves)."""
    path = f"{_ROOT_PATH}/qkd_links/qkd_link[qkdl_id={quote_key(qkdl_id)}]"
    return f"{path}/{leaf}" if leaf else path


def app_path(app_id: str, leaf: str | None = None) -> str:
    """RFC 8040 error-path of a qkd_app entry (or of one of its leaves)."""
    path = f"{_ROOT_PATH}/qkd_applications/qkd_app[app_id={quote_key(app_id)}]"
    return f"{path}/{leaf}" if leaf else path


# --------------------------------------------------------------------------- session configuration


@dataclass(frozen=True)
class SessionConfig:
    """What a key manager is told about one session (DESIGN.md, Session life cycle 4).

    ``prev_hop`` / ``next_hop`` are the neighbours' qkdn_ids on the route (None at
    the source / destination); ``source_qkdn_id`` / ``destination_qkdn_id`` name the
    endpoint key managers when known (``qkd_app/local_qkdn_id`` / ``remote_qkdn_id``).
    """

    ksid: str
    priority: int
    bucket_rate_bps: int
    bucket_size_bits: int
    inactivity_timeout_s: int
    prev_hop: str | None
    next_hop: str | None
    source_sae: str
    destination_sae: str
    virt_link_id: str
    source_qkdn_id: str | None = None
    destination_qkdn_id: str | None = None

    @property
    def is_source(self) -> bool:
        return self.prev_hop is None

    @property
    def is_destination(self) -> bool:
        return self.next_hop is None


class SessionMappingError(ValueError):
    """A qkd_app / VIRT qkd_link pair that is no valid session configuration;
    ``issues`` lists (error-path, message)."""

    def __init__(self, issues: Iterable[tuple[str, str]]):
        self.issues = list(issues)
        if not self.issues:
            raise ValueError("SessionMappingError needs at least one issue")
        super().__init__("; ".join(f"{p}: {msg}" for p, msg in self.issues))

    def restconf_errors(self) -> dict:
        return {"ietf-restconf:errors": {"error": [
            {"error-type": "application", "error-tag": "invalid-value", "error-path": p,
             "error-message": msg} for p, msg in self.issues]}}


def app_issues(app: m.Application) -> list[tuple[str, str]]:
    """What keeps an application from being a session configuration, on its own."""
    issues = []
    ident = app.app_id

    def need(ok: bool, leaf: str, message: str) -> None:
        if not ok:
            issues.append((app_path(ident, leaf), message))

    need(app.app_type in (None, m.AppType.CLIENT), "app_type",
         "a key session is a CLIENT application")
    need(bool(app.server_app_id), "server_app_id", "the source SAE (server_app_id) is required")
    need(len(app.client_app_id) == 1, "client_app_id",
         f"exactly one destination SAE (client_app_id) is required, got {len(app.client_app_id)}")
    qos = app.app_qos
    need(qos.max_bandwidth is not None and qos.max_bandwidth >= 1, "app_qos/max_bandwidth",
         "max_bandwidth (the token-bucket rate, bit/s) is required and must be at least 1")
    need(qos.jitter is not None, "app_qos/jitter",
         "jitter (ms) is required: the token-bucket size is max_bandwidth x jitter / 1000")
    if qos.max_bandwidth and qos.jitter is not None and qos.max_bandwidth * qos.jitter < 1000:
        issues.append((app_path(ident, "app_qos/jitter"),
                       f"max_bandwidth x jitter / 1000 = {qos.max_bandwidth * qos.jitter / 1000:g} "
                       "bits: the token bucket must hold at least one bit"))
    need(qos.ttl is not None and qos.ttl >= 1, "app_qos/ttl",
         "ttl (the inactivity timeout, s) is required and must be at least 1")
    need(len(app.backing_qkdl_id) == 1, "backing_qkdl_id",
         "exactly one backing VIRT qkd_link (the session's forwarding entry) is required, "
         f"got {len(app.backing_qkdl_id)}")
    return issues


def config_from_etsi(app: m.Application, virt_link: m.Link,
                     local_qkdn_id: str | None = None) -> SessionConfig:
    """The session configuration that ``app`` and its backing VIRT ``virt_link`` carry.

    Mapping (docs/key-management.md): ksid = app_id; priority = app_priority (YANG
    default 0); rate = app_qos/max_bandwidth; bucket size = floor(max_bandwidth x
    jitter / 1000); inactivity timeout = app_qos/ttl; source / destination SAE =
    server_app_id / client_app_id; endpoint nodes = local_qkdn_id / remote_qkdn_id
    (else qkdl_local / qkdl_remote of the link); previous hop = virt_prev_hop; next
    hop = the first virt_next_hop (TeraFlowSDN lists the whole onward path there,
    our controller only the neighbour). ``virt_bandwidth`` is 0/absent or the rate.

    With ``local_qkdn_id`` (the node being configured) the hops are also checked
    against it: neither hop is the node itself, and the node is the source when
    there is no previous hop and the destination when there is no next hop.
    Raises SessionMappingError listing every problem with its error-path.
    """
    issues = app_issues(app)
    lid = virt_link.qkdl_id
    if virt_link.qkdl_type is not m.LinkType.VIRT:
        issues.append((link_path(lid, "qkdl_type"),
                       f"a session's forwarding entry is a {m.LinkType.VIRT.value} link"))
    if app.backing_qkdl_id and lid not in app.backing_qkdl_id:
        issues.append((app_path(app.app_id, "backing_qkdl_id"),
                       f"does not name qkd_link {lid}"))
    prev_hop = virt_link.virt_prev_hop
    next_hop = virt_link.virt_next_hop[0] if virt_link.virt_next_hop else None
    if prev_hop is not None and prev_hop == next_hop:
        issues.append((link_path(lid, "virt_next_hop"), "previous and next hop are the same node"))
    rate = app.app_qos.max_bandwidth
    if virt_link.virt_bandwidth and rate and virt_link.virt_bandwidth != rate:
        issues.append((link_path(lid, "virt_bandwidth"),
                       f"{virt_link.virt_bandwidth} bit/s differs from the application's "
                       f"max_bandwidth {rate} bit/s"))
    source = app.local_qkdn_id or virt_link.qkdl_local.qkdn_id
    destination = app.remote_qkdn_id or virt_link.qkdl_remote.qkdn_id
    for leaf, app_value, link_end in (("qkdl_local/qkdn_id", app.local_qkdn_id, virt_link.qkdl_local),
                                      ("qkdl_remote/qkdn_id", app.remote_qkdn_id, virt_link.qkdl_remote)):
        if app_value and link_end.qkdn_id and app_value != link_end.qkdn_id:
            issues.append((link_path(lid, leaf), f"{link_end.qkdn_id} differs from the "
                                                 f"application's endpoint {app_value}"))
    if local_qkdn_id is not None:
        if prev_hop == local_qkdn_id:
            issues.append((link_path(lid, "virt_prev_hop"), "the previous hop is this node itself"))
        if next_hop == local_qkdn_id:
            issues.append((link_path(lid, "virt_next_hop"), "the next hop is this node itself"))
        if prev_hop is None and source and source != local_qkdn_id:
            issues.append((link_path(lid, "virt_prev_hop"),
                           f"missing: this node is not the session's source {source}"))
        if next_hop is None and destination and destination != local_qkdn_id:
            issues.append((link_path(lid, "virt_next_hop"),
                           f"missing: this node is not the session's destination {destination}"))
    if issues:
        raise SessionMappingError(issues)
    qos = app.app_qos
    return SessionConfig(
        ksid=app.app_id, priority=app.effective("app_priority"), bucket_rate_bps=qos.max_bandwidth,
        bucket_size_bits=qos.max_bandwidth * qos.jitter // 1000,
        inactivity_timeout_s=qos.ttl, prev_hop=prev_hop, next_hop=next_hop,
        source_sae=app.server_app_id, destination_sae=app.client_app_id[0], virt_link_id=lid,
        source_qkdn_id=source, destination_qkdn_id=destination)


def etsi_from_config(config: SessionConfig,
                     local_qkdn_id: str | None = None) -> tuple[m.Application, m.Link]:
    """The qkd_app and VIRT qkd_link that configure ``config`` on node ``local_qkdn_id``.

    The inverse of ``config_from_etsi``, except that ``app_qos/jitter`` is whole
    milliseconds: jitter = ceil(bucket_size x 1000 / rate), so the bucket read back
    is exactly the configured one whenever bucket_size x 1000 is a multiple of the
    rate, and otherwise larger by less than one millisecond of rate (never smaller:
    a bucket below one key would starve the session). The endpoints default to the
    local node at the route's ends (no previous hop: it is the source; no next hop:
    the destination). Raises ValueError for values the model cannot carry.
    """
    problems = []
    for name in ("priority", "bucket_rate_bps", "bucket_size_bits", "inactivity_timeout_s"):
        value = getattr(config, name)
        low = 0 if name == "priority" else 1
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= UINT32_MAX:
            problems.append(f"{name} must be an integer from {low} to {UINT32_MAX}, got {value!r}")
    if problems:
        raise ValueError("; ".join(problems))
    jitter = -(-config.bucket_size_bits * 1000 // config.bucket_rate_bps)
    if jitter > UINT32_MAX:
        raise ValueError(f"bucket of {config.bucket_size_bits} bits at {config.bucket_rate_bps} bit/s "
                         f"needs a jitter of {jitter} ms, beyond uint32")
    source = config.source_qkdn_id
    destination = config.destination_qkdn_id
    if local_qkdn_id is not None:
        source = source or (local_qkdn_id if config.prev_hop is None else None)
        destination = destination or (local_qkdn_id if config.next_hop is None else None)
    app = m.Application(
        app_id=config.ksid, app_type=m.AppType.CLIENT, server_app_id=config.source_sae,
        client_app_id=[config.destination_sae], app_priority=config.priority,
        app_qos=m.QoS(max_bandwidth=config.bucket_rate_bps, jitter=jitter,
                      ttl=config.inactivity_timeout_s),
        backing_qkdl_id=[config.virt_link_id], local_qkdn_id=source, remote_qkdn_id=destination)
    link = m.Link(
        qkdl_id=config.virt_link_id, qkdl_type=m.LinkType.VIRT, qkdl_enable=True,
        qkdl_local=m.LinkEnd(qkdn_id=source), qkdl_remote=m.LinkEnd(qkdn_id=destination),
        qkdl_applications=[config.ksid], virt_prev_hop=config.prev_hop,
        virt_next_hop=[config.next_hop] if config.next_hop else [],
        virt_bandwidth=config.bucket_rate_bps)
    return app, link


# --------------------------------------------------------------------------- bus entries


def session_entries(config: SessionConfig, local_qkdn_id: str | None = None) -> tuple[dict, dict]:
    """The RFC 7951 ``qkd_app`` and VIRT ``qkd_link`` entry objects (configuration leaves
    only, validated against the YANG model) that configure ``config`` on node
    ``local_qkdn_id``: the ``qkd_app`` / ``qkd_link`` members of a bus ``configure``
    message. Raises ValueError (``etsi015.Etsi015ValidationError`` is one) for a
    configuration the model cannot carry, e.g. a KSID that is not a UUID."""
    app, link = etsi_from_config(config, local_qkdn_id)
    app_doc = codec.encode_application(app, config_only=True)
    link_doc = codec.encode_link(link, config_only=True)
    return (app_doc[f"{m.NODE_MODULE}:qkd_app"][0], link_doc[f"{m.NODE_MODULE}:qkd_link"][0])


def session_from_entries(qkd_app: Mapping[str, Any], qkd_link: Mapping[str, Any],
                         local_qkdn_id: str | None = None) -> SessionConfig:
    """The inverse of ``session_entries``: validate and decode the two entry objects of a
    bus ``configure`` message and read the session configuration they carry (checked
    against ``local_qkdn_id`` as in ``config_from_etsi``). Raises
    ``etsi015.Etsi015ValidationError`` for entries the YANG model refuses and
    SessionMappingError for a pair that is no session configuration."""
    if not isinstance(qkd_app, Mapping) or not isinstance(qkd_link, Mapping):
        raise TypeError("qkd_app and qkd_link must be JSON objects")
    app = codec.decode_application({f"{m.NODE_MODULE}:qkd_app": [dict(qkd_app)]}, content=CONTENT_CONFIG)
    link = codec.decode_link({f"{m.NODE_MODULE}:qkd_link": [dict(qkd_link)]}, content=CONTENT_CONFIG)
    return config_from_etsi(app, link, local_qkdn_id)
