"""The ``etsi-qkd-sdn-node`` schema tree, written out from the YANG modules.

The tree drives validation (``etsi015.validate``) and the JSON codec
(``etsi015.codec``): every node knows its YANG name, type, ``config`` flag,
``mandatory`` flag and ``when`` condition, and how it binds to the Python model:

* a ``Leaf`` / ``LeafList`` reads attribute ``attr`` of the current object;
* a ``Container`` with ``cls`` is an object of that class in attribute ``attr``;
  without ``cls`` it is *inline*: its children live on the current object
  (``qkd_links`` holds ``qkd_link``, whose entries are ``QkdNode.links``);
* a ``ListNode`` is a Python list (attribute ``attr``) of ``cls`` objects.

Groupings of the YANG text are the functions prefixed ``_g_``; they are called
again where the YANG ``uses`` them, so each place gets the same definitions.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from etsi015 import model as m
from etsi015 import yang_types as t
from etsi015.model import NODE_MODULE

__all__ = ["When", "Leaf", "LeafList", "Container", "ListNode", "Resource", "QKD_NODE",
           "RESOURCES", "NOTIFICATIONS", "NOTIFICATION_CLASSES"]


@dataclass(frozen=True, eq=False)
class When:
    """``when "<up * '../'><leaf> = '<identity>'"``; the context is the node's parent
    object (``up`` = 0) or an ancestor object ``up`` levels higher."""

    leaf: str
    identity: m.Identity
    up: int = 0

    def describe(self) -> str:
        return f"{'../' * self.up}{self.leaf} = '{self.identity.value}'"


@dataclass(frozen=True, eq=False)
class Leaf:
    name: str
    type: t.YangType
    config: bool = True
    mandatory: bool = False
    when: When | None = None
    attr: str = ""

    def __post_init__(self) -> None:
        if not self.attr:
            object.__setattr__(self, "attr", self.name)


@dataclass(frozen=True, eq=False)
class LeafList:
    name: str
    type: t.YangType
    config: bool = True
    when: When | None = None
    attr: str = ""

    def __post_init__(self) -> None:
        if not self.attr:
            object.__setattr__(self, "attr", self.name)


@dataclass(frozen=True, eq=False)
class Container:
    name: str
    children: tuple["Node", ...]
    cls: type | None = None
    attr: str = ""
    config: bool = True
    when: When | None = None
    # Written even when empty (the node's four top containers; clients index them).
    emit_empty: bool = False
    by_name: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.attr:
            object.__setattr__(self, "attr", self.name)
        self.by_name.update({c.name: c for c in self.children})

    def child(self, name: str) -> "Node | None":
        return self.by_name.get(name)


@dataclass(frozen=True, eq=False)
class ListNode:
    name: str
    key: str
    children: tuple["Node", ...]
    cls: type
    attr: str = ""
    config: bool = True
    when: When | None = None
    emit_empty: bool = False
    by_name: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.attr:
            object.__setattr__(self, "attr", self.name)
        self.by_name.update({c.name: c for c in self.children})
        if not isinstance(self.by_name.get(self.key), Leaf):
            raise ValueError(f"list {self.name}: key {self.key} is not a leaf")

    def child(self, name: str) -> "Node | None":
        return self.by_name.get(name)

    @property
    def key_leaf(self) -> Leaf:
        return self.by_name[self.key]


Node = Union[Leaf, LeafList, Container, ListNode]


# --------------------------------------------------------------------------- groupings

_VIRT = When("qkdl_type", m.LinkType.VIRT)
_PHYS = When("qkdl_type", m.LinkType.PHYS)
_PHYS_UP = When("qkdl_type", m.LinkType.PHYS, up=1)


def _g_app_qos() -> Container:
    # augmented_app_qos: app_qos plus the two clients_shared_* leaves.
    return Container("app_qos", cls=m.QoS, children=(
        Leaf("max_bandwidth", t.UINT32),
        Leaf("min_bandwidth", t.UINT32),
        Leaf("jitter", t.UINT32),
        Leaf("ttl", t.UINT32),
        Leaf("clients_shared_path_enable", t.BOOLEAN),
        Leaf("clients_shared_keys_required", t.BOOLEAN),
    ))


def _g_app_details() -> tuple:
    return (
        Leaf("app_type", t.IdentityRef(m.AppType)),
        Leaf("server_app_id", t.URI),
        LeafList("client_app_id", t.URI),
        Leaf("app_priority", t.UINT32),
    )


def _g_att_point() -> Container:
    return Container("qkdi_att_point", cls=m.AttachmentPoint, children=(
        Leaf("device", t.STRING),
        Leaf("port", t.UINT32),
    ))


def _g_qkd_interface_item() -> tuple:
    return (
        Leaf("qkdi_id", t.UINT32),
        Leaf("qkdi_model", t.STRING),
        Leaf("qkdi_type", t.IdentityRef(m.QkdTechnology)),
        _g_att_point(),
        Container("qkdi_capabilities", cls=m.InterfaceCapabilities, children=(
            Leaf("role_support", t.IdentityRef(m.QkdRole)),
            Leaf("wavelength_range", t.WAVELENGTH_RANGE),
            Leaf("max_absorption", t.DECIMAL64_3),
        )),
    )


def _g_common_performance(config: bool = False) -> tuple:
    return (
        Leaf("expected_consumption", t.UINT32, config=config),
        Leaf("skr", t.UINT32, config=config),
        Leaf("eskr", t.UINT32, config=config),
    )


def _g_physical_link_perf(when: When | None) -> ListNode:
    return ListNode("phys_perf", key="perf_type", cls=m.PhysPerf, config=False, when=when,
                    children=(
                        Leaf("perf_type", t.IdentityRef(m.PhysPerfType), config=False),
                        Leaf("value", t.DECIMAL64_3, config=False),
                    ))


def _g_report(id_leaf: Leaf, status_leaf: Leaf) -> tuple:
    return (id_leaf, status_leaf, Leaf("message", t.STRING),
            Leaf("severity", t.IdentityRef(m.Severity)))


# --------------------------------------------------------------------------- data tree

QKD_APP = ListNode("qkd_app", key="app_id", cls=m.Application, attr="applications",
                   emit_empty=True, children=(
    Leaf("app_id", t.UUID),
    Leaf("app_status", t.IdentityRef(m.AppStatus), config=False),
    *_g_app_details(),
    Leaf("creation_time", t.DATE_AND_TIME, config=False),
    Leaf("expiration_time", t.DATE_AND_TIME),
    Container("app_statistics", children=(
        ListNode("statistics", key="end_time", cls=m.AppStatistics, config=False, children=(
            Leaf("end_time", t.DATE_AND_TIME, config=False),
            Leaf("start_time", t.DATE_AND_TIME, config=False),
            Leaf("consumed_bits", t.UINT32, config=False),
        )),
    )),
    _g_app_qos(),
    LeafList("backing_qkdl_id", t.UUID),
    Leaf("local_qkdn_id", t.UUID),
    Leaf("remote_qkdn_id", t.UUID),
))

QKD_INTERFACE = ListNode("qkd_interface", key="qkdi_id", cls=m.Interface, attr="interfaces",
                         emit_empty=True, children=(
    *_g_qkd_interface_item(),
    Leaf("qkdi_status", t.IdentityRef(m.InterfaceStatus), config=False),
))


def _link_end(name: str) -> Container:
    return Container(name, cls=m.LinkEnd, children=(
        Leaf("qkdn_id", t.UUID),
        Leaf("qkdi_id", t.UINT32),
    ))


QKD_LINK = ListNode("qkd_link", key="qkdl_id", cls=m.Link, attr="links", emit_empty=True,
                    children=(
    Leaf("qkdl_id", t.UUID),
    Leaf("qkdl_status", t.IdentityRef(m.LinkStatus)),
    Leaf("qkdl_enable", t.BOOLEAN),
    _link_end("qkdl_local"),
    _link_end("qkdl_remote"),
    Leaf("qkdl_type", t.IdentityRef(m.LinkType)),
    LeafList("qkdl_applications", t.UUID),
    # virtual_link_spec
    Leaf("virt_prev_hop", t.UUID, when=_VIRT),
    LeafList("virt_next_hop", t.UUID, when=_VIRT),
    Leaf("virt_bandwidth", t.UINT32, when=_VIRT),
    # physical_link_spec
    Leaf("phys_channel_att", t.DECIMAL64_3, when=_PHYS),
    Leaf("phys_wavelength", t.WAVELENGTH, when=_PHYS),
    Leaf("phys_qkd_role", t.IdentityRef(m.QkdRole), when=_PHYS),
    Container("qkdl_performance", cls=m.LinkPerformance, children=(
        *_g_common_performance(),
        _g_physical_link_perf(_PHYS_UP),
    )),
))

QKDN_CAPABILITIES = Container("qkdn_capabilities", cls=m.Capabilities, attr="capabilities",
                              emit_empty=True, children=(
    Leaf("link_stats_support", t.BOOLEAN),
    Leaf("application_stats_support", t.BOOLEAN),
    Leaf("key_relay_mode_enable", t.BOOLEAN),
))

QKD_APPLICATIONS = Container("qkd_applications", children=(QKD_APP,), emit_empty=True)
QKD_INTERFACES = Container("qkd_interfaces", children=(QKD_INTERFACE,), emit_empty=True)
QKD_LINKS = Container("qkd_links", children=(QKD_LINK,), emit_empty=True)

QKD_NODE = Container("qkd_node", cls=m.QkdNode, children=(
    Leaf("qkdn_id", t.UUID, mandatory=True),
    Leaf("qkdn_status", t.IdentityRef(m.NodeStatus), config=False),
    Leaf("qkdn_version", t.STRING),
    Leaf("qkdn_location_id", t.STRING),
    QKDN_CAPABILITIES,
    QKD_APPLICATIONS,
    QKD_INTERFACES,
    QKD_LINKS,
))


@dataclass(frozen=True, eq=False)
class Resource:
    """A RESTCONF data resource: ``node`` at ``parent_path`` (an instance path);
    ``entry`` resources are one list entry (``.../qkd_links/qkd_link=<id>``)."""

    node: Node
    parent_path: str

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def entry(self) -> bool:
        return isinstance(self.node, ListNode)

    @property
    def qualified(self) -> str:
        return f"{NODE_MODULE}:{self.node.name}"

    @property
    def path(self) -> str:
        """Instance path of the resource (for list entries: of the list)."""
        name = self.qualified if not self.parent_path else self.node.name
        return f"{self.parent_path}/{name}"


_ROOT = f"/{NODE_MODULE}:qkd_node"
RESOURCES: dict[str, Resource] = {
    "qkd_node": Resource(QKD_NODE, ""),
    "qkdn_capabilities": Resource(QKDN_CAPABILITIES, _ROOT),
    "qkd_applications": Resource(QKD_APPLICATIONS, _ROOT),
    "qkd_app": Resource(QKD_APP, f"{_ROOT}/qkd_applications"),
    "qkd_interfaces": Resource(QKD_INTERFACES, _ROOT),
    "qkd_interface": Resource(QKD_INTERFACE, f"{_ROOT}/qkd_interfaces"),
    "qkd_links": Resource(QKD_LINKS, _ROOT),
    "qkd_link": Resource(QKD_LINK, f"{_ROOT}/qkd_links"),
}


# --------------------------------------------------------------------------- notifications
# A notification is a Container bound to its model class; config does not apply.

def _g_report_parts() -> tuple:
    # The link / interface / application containers of "alarm" and "event".
    return (
        Container("link", cls=m.LinkReport, children=_g_report(
            Leaf("qkdl_id", t.UUID), Leaf("qkdl_status", t.IdentityRef(m.LinkStatus)))),
        Container("interface", cls=m.InterfaceReport, children=_g_report(
            Leaf("qkdi_id", t.UINT32), Leaf("qkdi_status", t.IdentityRef(m.InterfaceStatus)))),
        Container("application", cls=m.ApplicationReport, children=_g_report(
            Leaf("app_id", t.UUID), Leaf("app_status", t.IdentityRef(m.AppStatus)))),
    )


def _notification(cls: type, *children: Node) -> Container:
    return Container(cls.NAME, cls=cls, children=tuple(children))


NOTIFICATIONS: dict[str, Container] = {n.name: n for n in (
    _notification(m.ApplicationNew, Container("qkd_application", children=(
        *_g_app_details(),
        Leaf("local_qkdn_id", t.UUID),
        _g_app_qos(),
    ))),
    _notification(m.ApplicationQosUpdate, Container("qkd_application", children=(
        Leaf("app_id", t.UUID),
        _g_app_qos(),
        Leaf("app_priority", t.UINT32),
    ))),
    _notification(m.ApplicationDisconnected, Container("qkd_application", children=(
        Leaf("app_id", t.UUID),
    ))),
    _notification(m.InterfaceNew, Container("qkd_interface", children=(
        *_g_qkd_interface_item(),
    ))),
    _notification(m.InterfaceDown, Container("qkd_interface", children=(
        Leaf("qkdi_id", t.UINT32),
        Leaf("reason", t.STRING),
    ))),
    _notification(m.InterfaceOut, Container("qkd_interface", children=(
        Leaf("qkdi_id", t.UINT32),
    ))),
    _notification(m.LinkDown, Container("qkd_link", children=(
        Leaf("qkdl_id", t.UUID),
        Leaf("reason", t.STRING),
    ))),
    _notification(m.LinkPerfUpdate, Container("qkd_link", children=(
        Leaf("qkdl_id", t.UUID),
        Container("performance", cls=m.LinkPerformance, children=(
            *_g_common_performance(),
            _g_physical_link_perf(None),
        )),
    ))),
    _notification(m.LinkOverloaded, Container("qkd_link", children=(
        Leaf("qkdl_id", t.UUID),
        Container("performance", cls=m.LinkPerformance, children=(
            *_g_common_performance(),
        )),
    ))),
    *(_notification(cls, *_g_report_parts()) for cls in (m.Alarm, m.Event)),
)}

NOTIFICATION_CLASSES: dict[type, Container] = {n.cls: n for n in NOTIFICATIONS.values()}
