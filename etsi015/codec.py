"""RFC 7951 JSON encoding and decoding of the ``etsi-qkd-sdn-node`` model.

Encoders return what a RESTCONF GET on the resource returns (RFC 8040 sec. 3.5.3,
RFC 7951 sec. 4: the top member is module-qualified, members below are not):

=================================  ==================================================
``encode_node(node)``              ``{"etsi-qkd-sdn-node:qkd_node": {...}}``
``encode_capabilities(caps)``      ``{"etsi-qkd-sdn-node:qkdn_capabilities": {...}}``
``encode_links(links)``            ``{"etsi-qkd-sdn-node:qkd_links": {"qkd_link": [...]}}``
``encode_link(link)``              ``{"etsi-qkd-sdn-node:qkd_link": [{...}]}``
(same for applications, interfaces)
``encode_notification(n)``         ``{"etsi-qkd-sdn-node:<name>": {...}}``
=================================  ==================================================

``config_only=True`` leaves out config-false nodes (state: statuses, statistics,
performance), as for a configuration datastore or a request body. Encoders check
the Python values and, unless ``validate=False``, validate the produced document,
so they never emit an invalid one; errors raise ``Etsi015ValidationError`` whose
paths name the offending node.

Decoders accept what ``etsi015.validate`` accepts (including the unqualified top
member TeraFlowSDN sends, and a list entry as an object or a one-entry array),
validate first, and return model objects; they raise ``Etsi015ValidationError``.
``content="config"`` rejects config-false nodes (request bodies), ``partial=True``
skips ``when`` and mandatory checks (PATCH bodies: check the merged result with
``merge`` + an encoder).
"""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any, Iterable

from etsi015 import model as m
from etsi015 import schema as s
from etsi015 import yang_types as t
from etsi015.model import NODE_MODULE
from etsi015.validate import (
    CONTENT_ALL, CONTENT_CONFIG, RESTCONF_NOTIFICATION, Etsi015ValidationError, Issue,
    _entry_path, check_resource, unwrap_notification, unwrap_resource, validate_notification)

__all__ = [
    "encode_resource", "decode_resource", "encode_node", "decode_node", "encode_capabilities",
    "decode_capabilities", "encode_applications", "decode_applications", "encode_application",
    "decode_application", "encode_interfaces", "decode_interfaces", "encode_interface",
    "decode_interface", "encode_links", "decode_links", "encode_link", "decode_link",
    "encode_notification", "decode_notification", "merge", "payload_name",
]


# --------------------------------------------------------------------------- encoding


class _Encoder:
    def __init__(self, config_only: bool):
        self.config_only = config_only
        self.issues: list[Issue] = []

    def add(self, path: str, message: str) -> None:
        self.issues.append(Issue(path, message))

    def object(self, node: s.Container | s.ListNode, obj: Any, path: str) -> dict:
        cls = node.cls
        if cls is not None and not isinstance(obj, cls):
            self.add(path, f"expected a {cls.__name__}, got {type(obj).__name__}")
            return {}
        if cls is not None:
            # A set attribute that this schema node lacks would vanish silently.
            for name in _attrs_of(cls) - _bound_attrs(node):
                if _is_set(getattr(obj, name)):
                    self.add(f"{path}/{name}", f"unknown member: {node.name} has no "
                                               f"{name} in YANG; leave it unset")
        return self.members(node, obj, path)

    def members(self, node: s.Container | s.ListNode, obj: Any, path: str) -> dict:
        out: dict[str, Any] = {}
        for child in node.children:
            if self.config_only and not child.config:
                continue
            child_path = f"{path}/{child.name}"
            if isinstance(child, s.Leaf):
                value = getattr(obj, child.attr)
                if value is not None:
                    try:
                        out[child.name] = child.type.serialize(value)
                    except ValueError as exc:
                        self.add(child_path, str(exc))
            elif isinstance(child, s.LeafList):
                values = self.sequence(getattr(obj, child.attr), child_path)
                encoded = []
                for value in values:
                    try:
                        encoded.append(child.type.serialize(value))
                    except ValueError as exc:
                        self.add(f"{child_path}[.='{value}']", str(exc))
                if encoded:
                    out[child.name] = encoded
            elif isinstance(child, s.Container):
                if child.cls is None:
                    value = self.members(child, obj, child_path)
                else:
                    sub = getattr(obj, child.attr)
                    if sub is None:
                        continue
                    value = self.object(child, sub, child_path)
                if value or child.emit_empty:
                    out[child.name] = value
            else:
                entries = [self.object(child, entry, self.entry_path(child, child_path, entry, i))
                           for i, entry in enumerate(
                               self.sequence(getattr(obj, child.attr), child_path), start=1)]
                if entries or child.emit_empty:
                    out[child.name] = entries
        return out

    def sequence(self, value: Any, path: str) -> list:
        if value is None:
            return []
        if isinstance(value, (str, bytes, dict)) or not isinstance(value, Iterable):
            self.add(path, f"expected a list, got {type(value).__name__}")
            return []
        return list(value)

    @staticmethod
    def entry_path(node: s.ListNode, list_path: str, entry: Any, position: int) -> str:
        key = getattr(entry, node.key_leaf.attr, None)
        try:
            raw_key = node.key_leaf.type.serialize(key)
        except ValueError:
            raw_key = None
        return _entry_path(list_path, node, {node.key: raw_key}, position)


def _attrs_of(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _bound_attrs(node: s.Container | s.ListNode) -> set[str]:
    attrs = set()
    for child in node.children:
        if isinstance(child, s.Container) and child.cls is None:
            attrs |= _bound_attrs(child)
        else:
            attrs.add(child.attr)
    return attrs


def _is_set(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, list):
        return bool(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return any(_is_set(getattr(value, f.name)) for f in dataclasses.fields(value))
    return True


def _resource(name: str | s.Resource) -> s.Resource:
    return name if isinstance(name, s.Resource) else s.RESOURCES[name]


def encode_resource(value: Any, resource: str | s.Resource, *, config_only: bool = False,
                    validate: bool = True, partial: bool = False) -> dict:
    """Encode a resource (see module doc). ``value`` is the model object of the
    resource: a QkdNode, Capabilities, a list of Links/Applications/Interfaces for
    the wrapper containers, or one Link/Application/Interface for an entry."""
    res = _resource(resource)
    enc = _Encoder(config_only)
    node = res.node
    if isinstance(node, s.ListNode):
        body: Any = [enc.object(node, value, enc.entry_path(node, res.path, value, 1))]
    elif node.cls is None:
        (list_node,) = node.children
        holder = SimpleNamespace(**{list_node.attr: value})
        body = enc.members(node, holder, res.path)
    else:
        body = enc.object(node, value, res.path)
    if enc.issues:
        raise Etsi015ValidationError(enc.issues)
    doc = {res.qualified: body}
    if validate:
        issues = check_resource(doc, res, content=CONTENT_CONFIG if config_only else CONTENT_ALL,
                                partial=partial)
        if issues:
            raise Etsi015ValidationError(issues)
    return doc


def encode_node(node: m.QkdNode, *, config_only: bool = False, validate: bool = True) -> dict:
    return encode_resource(node, "qkd_node", config_only=config_only, validate=validate)


def encode_capabilities(caps: m.Capabilities, *, config_only: bool = False,
                        validate: bool = True) -> dict:
    return encode_resource(caps, "qkdn_capabilities", config_only=config_only, validate=validate)


def encode_applications(apps: Iterable[m.Application], *, config_only: bool = False,
                        validate: bool = True) -> dict:
    return encode_resource(list(apps), "qkd_applications", config_only=config_only,
                           validate=validate)


def encode_application(app: m.Application, *, config_only: bool = False, validate: bool = True,
                       partial: bool = False) -> dict:
    return encode_resource(app, "qkd_app", config_only=config_only, validate=validate,
                           partial=partial)


def encode_interfaces(ifaces: Iterable[m.Interface], *, config_only: bool = False,
                      validate: bool = True) -> dict:
    return encode_resource(list(ifaces), "qkd_interfaces", config_only=config_only,
                           validate=validate)


def encode_interface(iface: m.Interface, *, config_only: bool = False, validate: bool = True,
                     partial: bool = False) -> dict:
    return encode_resource(iface, "qkd_interface", config_only=config_only, validate=validate,
                           partial=partial)


def encode_links(links: Iterable[m.Link], *, config_only: bool = False,
                 validate: bool = True) -> dict:
    return encode_resource(list(links), "qkd_links", config_only=config_only, validate=validate)


def encode_link(link: m.Link, *, config_only: bool = False, validate: bool = True,
                partial: bool = False) -> dict:
    """``partial=True`` encodes a PATCH body: only the leaves set on ``link`` are sent
    and ``when`` conditions are left to the server (they need the stored qkdl_type)."""
    return encode_resource(link, "qkd_link", config_only=config_only, validate=validate,
                           partial=partial)


def encode_notification(notification: m.Notification, *, event_time: Any = None,
                        validate: bool = True) -> dict:
    """RFC 7951 content of a notification; with ``event_time`` (RFC 3339 str or aware
    datetime) wrapped in the RFC 8040 sec. 6.4 ``ietf-restconf:notification`` envelope."""
    node = s.NOTIFICATION_CLASSES.get(type(notification))
    if node is None:
        raise TypeError(f"not an etsi-qkd-sdn-node notification: {type(notification).__name__}")
    path = f"/{NODE_MODULE}:{node.name}"
    enc = _Encoder(config_only=False)
    body = enc.object(node, notification, path)
    doc: dict = {f"{NODE_MODULE}:{node.name}": body}
    if event_time is not None:
        try:
            stamp = t.DATE_AND_TIME.serialize(event_time)
        except ValueError as exc:
            enc.add(f"/{RESTCONF_NOTIFICATION}/eventTime", str(exc))
        else:
            doc = {RESTCONF_NOTIFICATION: {"eventTime": stamp, **doc}}
    if enc.issues:
        raise Etsi015ValidationError(enc.issues)
    if validate:
        validate_notification(doc)
    return doc


# --------------------------------------------------------------------------- decoding


def _decode_object(node: s.Container | s.ListNode, raw: dict) -> Any:
    kwargs: dict[str, Any] = {}
    _decode_members(node, raw, kwargs)
    return node.cls(**kwargs)


def _decode_members(node: s.Container | s.ListNode, raw: dict, kwargs: dict) -> None:
    for child in node.children:
        if child.name not in raw:
            continue
        value = raw[child.name]
        if isinstance(child, s.Leaf):
            kwargs[child.attr] = child.type.parse(value)
        elif isinstance(child, s.LeafList):
            kwargs[child.attr] = [child.type.parse(v) for v in value]
        elif isinstance(child, s.Container):
            if child.cls is None:
                _decode_members(child, value, kwargs)
            else:
                kwargs[child.attr] = _decode_object(child, value)
        else:
            kwargs[child.attr] = [_decode_object(child, entry) for entry in value]


def decode_resource(doc: Any, resource: str | s.Resource, *, content: str = CONTENT_ALL,
                    partial: bool = False) -> Any:
    """Validate and decode a resource document into its model value (see encode_resource)."""
    res = _resource(resource)
    issues = check_resource(doc, res, content=content, partial=partial)
    if issues:
        raise Etsi015ValidationError(issues)
    value, _ = unwrap_resource(doc, res)
    node = res.node
    if isinstance(node, s.ListNode):
        entry = value[0] if isinstance(value, list) else value
        return _decode_object(node, entry)
    if node.cls is None:
        kwargs: dict[str, Any] = {}
        _decode_members(node, value, kwargs)
        (list_node,) = node.children
        return kwargs.get(list_node.attr, [])
    return _decode_object(node, value)


def decode_node(doc: Any, *, content: str = CONTENT_ALL, partial: bool = False) -> m.QkdNode:
    return decode_resource(doc, "qkd_node", content=content, partial=partial)


def decode_capabilities(doc: Any, *, content: str = CONTENT_ALL,
                        partial: bool = False) -> m.Capabilities:
    return decode_resource(doc, "qkdn_capabilities", content=content, partial=partial)


def decode_applications(doc: Any, *, content: str = CONTENT_ALL,
                        partial: bool = False) -> list[m.Application]:
    return decode_resource(doc, "qkd_applications", content=content, partial=partial)


def decode_application(doc: Any, *, content: str = CONTENT_ALL,
                       partial: bool = False) -> m.Application:
    return decode_resource(doc, "qkd_app", content=content, partial=partial)


def decode_interfaces(doc: Any, *, content: str = CONTENT_ALL,
                      partial: bool = False) -> list[m.Interface]:
    return decode_resource(doc, "qkd_interfaces", content=content, partial=partial)


def decode_interface(doc: Any, *, content: str = CONTENT_ALL,
                     partial: bool = False) -> m.Interface:
    return decode_resource(doc, "qkd_interface", content=content, partial=partial)


def decode_links(doc: Any, *, content: str = CONTENT_ALL, partial: bool = False) -> list[m.Link]:
    return decode_resource(doc, "qkd_links", content=content, partial=partial)


def decode_link(doc: Any, *, content: str = CONTENT_ALL, partial: bool = False) -> m.Link:
    return decode_resource(doc, "qkd_link", content=content, partial=partial)


def decode_notification(doc: Any) -> tuple[m.Notification, str | None]:
    """(notification, eventTime or None) from the bare or the RFC 8040 envelope form."""
    validate_notification(doc)
    name, content, event_time, _ = unwrap_notification(doc)
    assert name is not None  # validate_notification raised otherwise
    return _decode_object(s.NOTIFICATIONS[name], content), event_time


def payload_name(doc: Any) -> str | None:
    """The resource a request body carries: a key of ``etsi015.schema.RESOURCES``
    (``"qkd_links"``, ``"qkd_link"``, ...) when ``doc`` is an object whose only
    member names one (qualified or not), else None. Lets a server accept both
    ``{"qkd_links": {...}}`` and ``{"etsi-qkd-sdn-node:qkd_link": [...]}`` on POST."""
    if not isinstance(doc, dict) or len(doc) != 1:
        return None
    (member,) = doc
    if not isinstance(member, str):
        return None
    module, sep, local = member.rpartition(":")
    if sep and module != NODE_MODULE:
        return None
    return local if local in s.RESOURCES else None


# --------------------------------------------------------------------------- merge


def _schema_of_classes() -> dict[type, s.Container | s.ListNode]:
    found: dict[type, s.Container | s.ListNode] = {}

    def walk(node: s.Node) -> None:
        if isinstance(node, (s.Container, s.ListNode)):
            if node.cls is not None:
                found.setdefault(node.cls, node)
            for child in node.children:
                walk(child)
    walk(s.QKD_NODE)
    return found


_CLASS_NODES = _schema_of_classes()


def merge(target: Any, patch: Any) -> Any:
    """RFC 8040 plain-PATCH merge of two model objects of the same class: leaves set
    in ``patch`` replace, leaf-list values are added, containers merge, list entries
    merge by key (new keys are appended). Returns a new object; inputs are unchanged.
    Validate the result (encode it) since ``when`` conditions may now fail."""
    if type(target) is not type(patch):
        raise TypeError(f"cannot merge {type(patch).__name__} into {type(target).__name__}")
    node = _CLASS_NODES.get(type(target))
    if node is None:
        raise TypeError(f"not a data model class: {type(target).__name__}")
    return _merge_object(node, target, patch)


def _merge_object(node: s.Container | s.ListNode, target: Any, patch: Any) -> Any:
    changes: dict[str, Any] = {}
    _merge_members(node, target, patch, changes)
    return dataclasses.replace(target, **changes)


def _merge_members(node: s.Container | s.ListNode, target: Any, patch: Any,
                   changes: dict) -> None:
    for child in node.children:
        if isinstance(child, s.Container) and child.cls is None:
            _merge_members(child, target, patch, changes)
            continue
        new = getattr(patch, child.attr)
        old = getattr(target, child.attr)
        if isinstance(child, s.Leaf):
            if new is not None:
                changes[child.attr] = new
        elif isinstance(child, s.LeafList):
            changes[child.attr] = list(old) + [v for v in new if v not in old]
        elif isinstance(child, s.Container):
            if new is not None:
                changes[child.attr] = new if old is None else _merge_object(child, old, new)
        else:
            key = child.key_leaf.attr
            merged = list(old)
            for entry in new:
                for i, existing in enumerate(merged):
                    if getattr(existing, key) == getattr(entry, key):
                        merged[i] = _merge_object(child, existing, entry)
                        break
                else:
                    merged.append(entry)
            changes[child.attr] = merged
