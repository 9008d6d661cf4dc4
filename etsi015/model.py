"""The ``etsi-qkd-sdn-node`` data model (ETSI GS QKD 015 V2.1.1) as Python dataclasses.

The classes mirror the YANG tree one to one, with YANG leaf names as attribute
names, except where a YANG container only wraps a list:

=====================================  =====================================
YANG                                   Python
=====================================  =====================================
``qkd_node/qkdn_capabilities``         ``QkdNode.capabilities``
``qkd_node/qkd_applications/qkd_app``  ``QkdNode.applications`` (list)
``qkd_node/qkd_interfaces/...``        ``QkdNode.interfaces`` (list)
``qkd_node/qkd_links/qkd_link``        ``QkdNode.links`` (list)
``qkd_app/app_statistics/statistics``  ``Application.statistics`` (list)
=====================================  =====================================

Value conventions (see ``etsi015.yang_types``): ``None`` means "leaf not set" (the
YANG default, if any, then applies: ``obj.effective("qkdl_enable")``); an empty
list means "no entries"; non-presence containers are always objects (empty when
nothing is set). uuids are ``str`` (``uuid.UUID`` accepted), decimal64 values are
``decimal.Decimal`` (ints and floats accepted, floats rounded to 3 digits),
date-and-time values are RFC 3339 ``str`` (aware ``datetime`` accepted), and
identityrefs are members of the ``Identity`` enums below, whose values are the
module-qualified RFC 7951 strings (``LinkType.PHYS == "etsi-qkd-node-types:PHYS"``).

Nothing here checks values on assignment; ``etsi015.codec`` checks them (and the
whole document) when encoding, and ``etsi015.validate`` checks raw JSON.

Building a node from Python values::

    node = QkdNode(
        qkdn_id="5d3a...", qkdn_status=NodeStatus.OPERATING, qkdn_location_id="lab-1",
        capabilities=Capabilities(key_relay_mode_enable=True),
        interfaces=[Interface(qkdi_id=1, qkdi_type=QkdTechnology.DV_QKD,
                              qkdi_att_point=AttachmentPoint(device="KM0", port=1))],
        links=[
            Link(qkdl_id="...", qkdl_type=LinkType.PHYS, qkdl_status=LinkStatus.ACTIVE,
                 qkdl_local=LinkEnd(qkdn_id="5d3a...", qkdi_id=1),
                 qkdl_remote=LinkEnd(qkdn_id="9b1e...", qkdi_id=2),
                 phys_channel_att=Decimal("11.000"), phys_qkd_role=QkdRole.TRANSMITTER,
                 qkdl_performance=LinkPerformance(
                     skr=12000, phys_perf=[PhysPerf(PhysPerfType.QBER, Decimal("0.021"))])),
            Link(qkdl_id="...", qkdl_type=LinkType.VIRT, virt_prev_hop="...",
                 virt_next_hop=["..."], virt_bandwidth=2048),
        ],
        applications=[Application(app_id="<KSID>", app_type=AppType.CLIENT,
                                  server_app_id="sae-a", client_app_id=["sae-b"],
                                  app_qos=QoS(max_bandwidth=4096))],
    )
    doc = etsi015.codec.encode_node(node)        # {"etsi-qkd-sdn-node:qkd_node": {...}}
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from decimal import Decimal
from enum import Enum
from typing import Any, ClassVar

__all__ = [
    "NODE_MODULE", "TYPES_MODULE", "Identity", "QkdTechnology", "NodeStatus", "LinkType",
    "QkdRole", "AppType", "PhysPerfType", "LinkStatus", "InterfaceStatus", "AppStatus",
    "Severity", "identity_from_json",
    "Capabilities", "QoS", "AppStatistics", "Application", "AttachmentPoint",
    "InterfaceCapabilities", "Interface", "LinkEnd", "PhysPerf", "LinkPerformance", "Link",
    "QkdNode",
    "Notification", "ApplicationNew", "ApplicationQosUpdate", "ApplicationDisconnected",
    "InterfaceNew", "InterfaceDown", "InterfaceOut", "LinkDown", "LinkPerfUpdate",
    "LinkOverloaded", "LinkReport", "InterfaceReport", "ApplicationReport", "Alarm", "Event",
]

NODE_MODULE = "etsi-qkd-sdn-node"
TYPES_MODULE = "etsi-qkd-node-types"


# --------------------------------------------------------------------------- identities


class Identity(str, Enum):
    """An identity of ``etsi-qkd-node-types``; the value is its RFC 7951 form.

    Every leaf of ``etsi-qkd-sdn-node`` that holds one of these identities is in a
    different module than the identity, so RFC 7951 sec. 6.8 requires the
    module-qualified form on the wire; ``from_json`` rejects bare names.
    """

    BASE: ClassVar[str]

    @property
    def identity(self) -> str:
        """The identity name without its module (``"PHYS"``)."""
        return self.value.partition(":")[2]

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def from_json(cls, raw: str) -> "Identity":
        """Decode an RFC 7951 identityref value whose base is this enum's base."""
        found = identity_from_json(raw)
        if not isinstance(found, cls):
            raise ValueError(f"identity {raw!r} is not derived from {TYPES_MODULE}:{cls.BASE} "
                             f"(it is a {TYPES_MODULE}:{type(found).BASE})")
        return found


def _q(name: str) -> str:
    return f"{TYPES_MODULE}:{name}"


def _base(name: str):
    def set_base(cls):
        cls.BASE = name
        return cls
    return set_base


@_base("QKD-TECHNOLOGY-TYPES")
class QkdTechnology(Identity):
    CV_QKD = _q("CV-QKD")
    DV_QKD = _q("DV-QKD")
    DV_QKD_COW = _q("DV-QKD-COW")
    DV_QKD_2WS = _q("DV-QKD-2Ws")


@_base("QKDN-STATUS-TYPES")
class NodeStatus(Identity):
    NEW = _q("NEW")
    OPERATING = _q("OPERATING")
    DOWN = _q("DOWN")
    FAILURE = _q("FAILURE")
    OUT = _q("OUT")


@_base("QKD-LINK-TYPES")
class LinkType(Identity):
    VIRT = _q("VIRT")
    PHYS = _q("PHYS")


@_base("QKD-ROLE-TYPES")
class QkdRole(Identity):
    TRANSMITTER = _q("TRANSMITTER")
    RECEIVER = _q("RECEIVER")
    TRANSCEIVER = _q("TRANSCEIVER")


@_base("QKD-APP-TYPES")
class AppType(Identity):
    CLIENT = _q("CLIENT")
    INTERNAL = _q("INTERNAL")


@_base("PHYS-PERF-TYPES")
class PhysPerfType(Identity):
    QBER = _q("QBER")
    SNR = _q("SNR")


@_base("LINK-STATUS-TYPES")
class LinkStatus(Identity):
    ACTIVE = _q("ACTIVE")
    PASSIVE = _q("PASSIVE")
    PENDING = _q("PENDING")
    OFF = _q("OFF")


@_base("IFACE-STATUS-TYPES")
class InterfaceStatus(Identity):
    ENABLED = _q("ENABLED")
    DISABLED = _q("DISABLED")
    FAILED = _q("FAILED")


@_base("APP-STATUS-TYPES")
class AppStatus(Identity):
    ON = _q("ON")
    DISCONNECTED = _q("DISCONNECTED")
    OUT_OF_TIME = _q("OUT-OF-TIME")
    ZOMBIE = _q("ZOMBIE")


@_base("SEVERITY-TYPES")
class Severity(Identity):
    MAJOR = _q("MAJOR")
    MINOR = _q("MINOR")


_IDENTITY_ENUMS: tuple[type[Identity], ...] = (
    QkdTechnology, NodeStatus, LinkType, QkdRole, AppType, PhysPerfType, LinkStatus,
    InterfaceStatus, AppStatus, Severity)
_IDENTITIES: dict[str, Identity] = {m.value: m for e in _IDENTITY_ENUMS for m in e}
_BASES = {e.BASE for e in _IDENTITY_ENUMS}


def identity_from_json(raw: str) -> Identity:
    """Any ``etsi-qkd-node-types`` identity from its module-qualified RFC 7951 form."""
    if not isinstance(raw, str):
        raise ValueError(f"an identityref is a JSON string, got {type(raw).__name__}")
    module, sep, name = raw.partition(":")
    if not sep:
        hint = f"; use '{_q(raw)}'" if _q(raw) in _IDENTITIES else ""
        raise ValueError(
            f"identityref {raw!r} must be module-qualified: RFC 7951 sec. 6.8 allows the "
            f"bare name only for identities of the leaf's own module ({NODE_MODULE}), and "
            f"this one belongs to {TYPES_MODULE}{hint}")
    found = _IDENTITIES.get(raw)
    if found is not None:
        return found
    if module == TYPES_MODULE and name in _BASES:
        raise ValueError(f"{raw!r} is a base identity, not a value derived from it")
    if module != TYPES_MODULE:
        raise ValueError(f"unknown identity {raw!r}: module {module!r} defines no identity "
                         f"used by {NODE_MODULE}")
    raise ValueError(f"unknown identity {raw!r}")


# --------------------------------------------------------------------------- helpers


def _default(value: Any) -> Any:
    """A leaf that is unset (None) by default, with the YANG default recorded for effective()."""
    return field(default=None, metadata={"yang_default": value})


class _YangData:
    """Mixin for model classes."""

    def effective(self, name: str) -> Any:
        """The value of leaf ``name``, or its YANG default when unset (None if it has none)."""
        value = getattr(self, name)
        if value is not None:
            return value
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if f.name == name:
                return f.metadata.get("yang_default")
        raise AttributeError(name)


# --------------------------------------------------------------------------- node


@dataclass
class Capabilities(_YangData):
    """``qkdn_capabilities`` (all three default to true)."""

    link_stats_support: bool | None = _default(True)
    application_stats_support: bool | None = _default(True)
    key_relay_mode_enable: bool | None = _default(True)


@dataclass
class QoS(_YangData):
    """``app_qos``: bandwidths in bit/s, jitter in ms, ttl in s (all uint32)."""

    max_bandwidth: int | None = None
    min_bandwidth: int | None = None
    jitter: int | None = None
    ttl: int | None = None
    clients_shared_path_enable: bool | None = _default(False)
    clients_shared_keys_required: bool | None = _default(False)


@dataclass
class AppStatistics(_YangData):
    """One entry of ``app_statistics/statistics`` (config false), keyed by ``end_time``."""

    end_time: str
    start_time: str | None = None
    consumed_bits: int | None = None


@dataclass
class Application(_YangData):
    """``qkd_app``: an application registered at the node (here: a key session, app_id = KSID).

    Read-only (config false): ``app_status``, ``creation_time``, ``statistics``.
    """

    app_id: str
    app_status: AppStatus | None = None
    app_type: AppType | None = None
    server_app_id: str | None = None
    client_app_id: list[str] = field(default_factory=list)
    app_priority: int | None = _default(0)
    creation_time: str | None = None
    expiration_time: str | None = None
    statistics: list[AppStatistics] = field(default_factory=list)
    app_qos: QoS = field(default_factory=QoS)
    backing_qkdl_id: list[str] = field(default_factory=list)
    local_qkdn_id: str | None = None
    remote_qkdn_id: str | None = None


@dataclass
class AttachmentPoint(_YangData):
    """``qkdi_att_point``: optical switch (or device) and port the interface attaches to."""

    device: str | None = None
    port: int | None = None


@dataclass
class InterfaceCapabilities(_YangData):
    """``qkdi_capabilities``; ``max_absorption`` in dB (decimal64, 3 digits)."""

    role_support: QkdRole | None = None
    wavelength_range: str | None = None
    max_absorption: Decimal | None = None


@dataclass
class Interface(_YangData):
    """``qkd_interface`` (a QKD module of the node); ``qkdi_status`` is read-only."""

    qkdi_id: int
    qkdi_model: str | None = None
    qkdi_type: QkdTechnology | None = None
    qkdi_att_point: AttachmentPoint = field(default_factory=AttachmentPoint)
    qkdi_capabilities: InterfaceCapabilities = field(default_factory=InterfaceCapabilities)
    qkdi_status: InterfaceStatus | None = None


@dataclass
class LinkEnd(_YangData):
    """``qkdl_local`` / ``qkdl_remote``."""

    qkdn_id: str | None = None
    qkdi_id: int | None = None


@dataclass
class PhysPerf(_YangData):
    """One ``phys_perf`` entry (PHYS links only), keyed by ``perf_type``."""

    perf_type: PhysPerfType
    value: Decimal | None = None


@dataclass
class LinkPerformance(_YangData):
    """``qkdl_performance`` (all config false); rates in bit/s."""

    expected_consumption: int | None = None
    skr: int | None = None
    eskr: int | None = None
    phys_perf: list[PhysPerf] = field(default_factory=list)


@dataclass
class Link(_YangData):
    """``qkd_link``: a key association link, physical (PHYS) or virtual multi-hop (VIRT).

    ``virt_*`` leaves exist only when ``qkdl_type`` is VIRT and ``phys_*`` leaves
    (and ``qkdl_performance.phys_perf``) only when it is PHYS (YANG ``when``).
    ``phys_channel_att`` is in dB, ``virt_bandwidth`` in bit/s.
    """

    qkdl_id: str
    qkdl_status: LinkStatus | None = None
    qkdl_enable: bool | None = _default(True)
    qkdl_local: LinkEnd = field(default_factory=LinkEnd)
    qkdl_remote: LinkEnd = field(default_factory=LinkEnd)
    qkdl_type: LinkType | None = None
    qkdl_applications: list[str] = field(default_factory=list)
    virt_prev_hop: str | None = None
    virt_next_hop: list[str] = field(default_factory=list)
    virt_bandwidth: int | None = None
    phys_channel_att: Decimal | None = None
    phys_wavelength: str | None = None
    phys_qkd_role: QkdRole | None = None
    qkdl_performance: LinkPerformance = field(default_factory=LinkPerformance)

    @property
    def is_virtual(self) -> bool:
        return self.qkdl_type is LinkType.VIRT

    @property
    def is_physical(self) -> bool:
        return self.qkdl_type is LinkType.PHYS


def _find(items: list, attr: str, key: Any, what: str) -> Any:
    for item in items:
        if getattr(item, attr) == key:
            return item
    raise KeyError(f"no {what} with {attr} {key!r}")


@dataclass
class QkdNode(_YangData):
    """``qkd_node``: the whole SD-QKD node. ``qkdn_id`` (uuid) is mandatory;
    ``qkdn_status`` is read-only."""

    qkdn_id: str
    qkdn_status: NodeStatus | None = None
    qkdn_version: str | None = None
    qkdn_location_id: str | None = _default("")
    capabilities: Capabilities = field(default_factory=Capabilities)
    applications: list[Application] = field(default_factory=list)
    interfaces: list[Interface] = field(default_factory=list)
    links: list[Link] = field(default_factory=list)

    def link(self, qkdl_id: str) -> Link:
        return _find(self.links, "qkdl_id", qkdl_id, "qkd_link")

    def application(self, app_id: str) -> Application:
        return _find(self.applications, "app_id", app_id, "qkd_app")

    def interface(self, qkdi_id: int) -> Interface:
        return _find(self.interfaces, "qkdi_id", qkdi_id, "qkd_interface")


# --------------------------------------------------------------------------- notifications


class Notification(_YangData):
    """Base of the YANG notifications; ``NAME`` is the notification's YANG name.

    ``to_json()`` gives the notification content as RFC 7951 JSON
    (``{"etsi-qkd-sdn-node:<NAME>": {...}}``); ``to_restconf(event_time)`` wraps it
    in the RFC 8040 sec. 6.4 envelope. ``etsi015.codec.decode_notification`` reads
    either form back.
    """

    NAME: ClassVar[str]

    def to_json(self) -> dict:
        from etsi015.codec import encode_notification
        return encode_notification(self)

    def to_restconf(self, event_time: Any) -> dict:
        from etsi015.codec import encode_notification
        return encode_notification(self, event_time=event_time)


@dataclass
class ApplicationNew(Notification):
    """``sdqkdn_application_new``: a new application asks the node for keys."""

    NAME: ClassVar[str] = "sdqkdn_application_new"
    app_type: AppType | None = None
    server_app_id: str | None = None
    client_app_id: list[str] = field(default_factory=list)
    app_priority: int | None = _default(0)
    local_qkdn_id: str | None = None
    app_qos: QoS = field(default_factory=QoS)

    @classmethod
    def from_application(cls, app: Application) -> "ApplicationNew":
        return cls(app_type=app.app_type, server_app_id=app.server_app_id,
                   client_app_id=list(app.client_app_id), app_priority=app.app_priority,
                   local_qkdn_id=app.local_qkdn_id, app_qos=dataclasses.replace(app.app_qos))


@dataclass
class ApplicationQosUpdate(Notification):
    """``sdqkdn_application_qos_update``: priority or QoS of a registered application changed."""

    NAME: ClassVar[str] = "sdqkdn_application_qos_update"
    app_id: str | None = None
    app_qos: QoS = field(default_factory=QoS)
    app_priority: int | None = _default(0)


@dataclass
class ApplicationDisconnected(Notification):
    """``sdqkdn_application_disconnected``."""

    NAME: ClassVar[str] = "sdqkdn_application_disconnected"
    app_id: str | None = None


@dataclass
class InterfaceNew(Notification):
    """``sdqkdn_interface_new``: a QKD module was installed."""

    NAME: ClassVar[str] = "sdqkdn_interface_new"
    qkdi_id: int | None = None
    qkdi_model: str | None = None
    qkdi_type: QkdTechnology | None = None
    qkdi_att_point: AttachmentPoint = field(default_factory=AttachmentPoint)
    qkdi_capabilities: InterfaceCapabilities = field(default_factory=InterfaceCapabilities)

    @classmethod
    def from_interface(cls, iface: Interface) -> "InterfaceNew":
        return cls(qkdi_id=iface.qkdi_id, qkdi_model=iface.qkdi_model, qkdi_type=iface.qkdi_type,
                   qkdi_att_point=dataclasses.replace(iface.qkdi_att_point),
                   qkdi_capabilities=dataclasses.replace(iface.qkdi_capabilities))


@dataclass
class InterfaceDown(Notification):
    """``sdqkdn_interface_down``."""

    NAME: ClassVar[str] = "sdqkdn_interface_down"
    qkdi_id: int | None = None
    reason: str | None = None


@dataclass
class InterfaceOut(Notification):
    """``sdqkdn_interface_out``: a QKD module was switched off and uninstalled."""

    NAME: ClassVar[str] = "sdqkdn_interface_out"
    qkdi_id: int | None = None


@dataclass
class LinkDown(Notification):
    """``sdqkdn_link_down``."""

    NAME: ClassVar[str] = "sdqkdn_link_down"
    qkdl_id: str | None = None
    reason: str | None = None


@dataclass
class LinkPerfUpdate(Notification):
    """``sdqkdn_link_perf_update``: the performance of an active link changed markedly."""

    NAME: ClassVar[str] = "sdqkdn_link_perf_update"
    qkdl_id: str | None = None
    performance: LinkPerformance = field(default_factory=LinkPerformance)


@dataclass
class LinkOverloaded(Notification):
    """``sdqkdn_link_overloaded``: demand exceeds the link; ``performance.phys_perf``
    does not exist in this notification and must stay empty."""

    NAME: ClassVar[str] = "sdqkdn_link_overloaded"
    qkdl_id: str | None = None
    performance: LinkPerformance = field(default_factory=LinkPerformance)


@dataclass
class LinkReport(_YangData):
    """The ``link`` part of ``alarm`` / ``event``."""

    qkdl_id: str | None = None
    qkdl_status: LinkStatus | None = None
    message: str | None = None
    severity: Severity | None = None


@dataclass
class InterfaceReport(_YangData):
    """The ``interface`` part of ``alarm`` / ``event``."""

    qkdi_id: int | None = None
    qkdi_status: InterfaceStatus | None = None
    message: str | None = None
    severity: Severity | None = None


@dataclass
class ApplicationReport(_YangData):
    """The ``application`` part of ``alarm`` / ``event``."""

    app_id: str | None = None
    app_status: AppStatus | None = None
    message: str | None = None
    severity: Severity | None = None


@dataclass
class Alarm(Notification):
    """``alarm``: any of link / interface / application (None: part absent)."""

    NAME: ClassVar[str] = "alarm"
    link: LinkReport | None = None
    interface: InterfaceReport | None = None
    application: ApplicationReport | None = None


@dataclass
class Event(Notification):
    """``event``: same shape as ``alarm``."""

    NAME: ClassVar[str] = "event"
    link: LinkReport | None = None
    interface: InterfaceReport | None = None
    application: ApplicationReport | None = None
