"""Validation of RFC 7951 JSON documents of the ``etsi-qkd-sdn-node`` model.

Checked: JSON types, integer ranges, decimal64 form and range, string patterns
(uuid, date-and-time with calendar rules, wavelength), identityrefs (qualified,
known, derived from the leaf's base), mandatory leaves and list keys, unknown
members, unique list keys and leaf-list values (YANG 1.0), the ``when``
conditions that keep ``virt_*`` leaves on VIRT links and ``phys_*`` leaves on
PHYS links, and (``content="config"``) the absence of config-false nodes.
The YANG defines no leafref, must or unique statements, so there are none to check.

Every error names its instance path in RFC 7951 / RFC 8040 ``error-path``
form, e.g. ``/etsi-qkd-sdn-node:qkd_node/qkd_links/qkd_link[qkdl_id='...']/virt_bandwidth``.

Accepted document forms, per resource (``RESOURCES`` in ``etsi015.schema``):

* a container resource: ``{"etsi-qkd-sdn-node:qkd_links": {"qkd_link": [...]}}``;
  the unqualified top member (``{"qkd_links": ...}``, as TeraFlowSDN POSTs it) is
  accepted too;
* a list-entry resource: ``{"etsi-qkd-sdn-node:qkd_link": [{...}]}`` (RFC 8040
  form, exactly one entry) or ``{"etsi-qkd-sdn-node:qkd_link": {...}}``;
* a notification: ``{"etsi-qkd-sdn-node:alarm": {...}}`` or the RFC 8040 sec. 6.4
  envelope ``{"ietf-restconf:notification": {"eventTime": ..., "etsi-qkd-sdn-node:alarm": {...}}}``.

``partial=True`` is for PATCH bodies (plain merge): ``when`` conditions and
mandatory leaves are not checked (they depend on the stored data; check the
merged result), list keys still are.
"""
from __future__ import annotations

from typing import Any, Iterable, NamedTuple

from etsi015 import schema as s
from etsi015 import yang_types as t
from etsi015.model import NODE_MODULE

__all__ = [
    "Issue", "Etsi015ValidationError", "validate_node", "validate_capabilities",
    "validate_applications", "validate_application", "validate_interfaces",
    "validate_interface", "validate_links", "validate_link", "validate_resource",
    "validate_notification", "check_resource", "unwrap_resource", "unwrap_notification",
    "CONTENT_ALL", "CONTENT_CONFIG",
]

CONTENT_ALL = "all"
CONTENT_CONFIG = "config"
RESTCONF_NOTIFICATION = "ietf-restconf:notification"


class Issue(NamedTuple):
    """One validation error: instance path, message, and the RFC 8040 error-tag."""

    path: str
    message: str
    tag: str = "invalid-value"

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class Etsi015ValidationError(ValueError):
    """A document that does not conform; ``errors`` is a list of (path, message)."""

    def __init__(self, issues: Iterable[Issue]):
        self.issues: list[Issue] = list(issues)
        if not self.issues:
            raise ValueError("Etsi015ValidationError needs at least one issue")
        super().__init__("; ".join(str(i) for i in self.issues))

    @property
    def errors(self) -> list[tuple[str, str]]:
        return [(i.path, i.message) for i in self.issues]

    def restconf_errors(self, error_type: str = "application") -> dict:
        """RFC 8040 sec. 7.1 error document listing every issue (send with HTTP 400)."""
        return {"ietf-restconf:errors": {"error": [
            {"error-type": error_type, "error-tag": i.tag, "error-path": i.path,
             "error-message": i.message} for i in self.issues]}}


def _json_kind(raw: Any) -> str:
    return t._json_kind(raw)


def _quote(value: str) -> str:
    """A string literal for an instance-identifier predicate."""
    return f'"{value}"' if "'" in value else f"'{value}'"


def _entry_path(list_path: str, node: s.ListNode, entry: Any, position: int) -> str:
    key = entry.get(node.key) if isinstance(entry, dict) else None
    if isinstance(key, str) or (isinstance(key, int) and not isinstance(key, bool)):
        return f"{list_path}[{node.key}={_quote(str(key))}]"
    # No usable key: name the entry by its position (1-based).
    return f"{list_path}[{position}]"


class _Checker:
    def __init__(self, content: str, partial: bool):
        if content not in (CONTENT_ALL, CONTENT_CONFIG):
            raise ValueError(f"content must be {CONTENT_ALL!r} or {CONTENT_CONFIG!r}")
        self.content = content
        self.partial = partial
        self.issues: list[Issue] = []

    def add(self, path: str, message: str, tag: str = "invalid-value") -> None:
        self.issues.append(Issue(path, message, tag))

    # -- structure

    def container(self, node: s.Container, raw: Any, path: str, stack: list, config: bool) -> None:
        if not isinstance(raw, dict):
            self.add(path, f"expected a JSON object for container {node.name}, "
                           f"got {_json_kind(raw)}")
            return
        self.members(node, raw, path, stack + [raw], config)

    def entry(self, node: s.ListNode, raw: Any, path: str, stack: list, config: bool) -> Any:
        """Check one list entry; returns its key value when valid, else None."""
        if not isinstance(raw, dict):
            self.add(path, f"expected a JSON object for a {node.name} entry, "
                           f"got {_json_kind(raw)}")
            return None
        key = None
        if node.key not in raw:
            self.add(f"{path}/{node.key}", f"missing list key {node.key}", "missing-element")
        else:
            try:
                key = node.key_leaf.type.parse(raw[node.key])
            except ValueError:
                pass  # reported by members() below
        self.members(node, raw, path, stack + [raw], config)
        return key

    def list(self, node: s.ListNode, raw: Any, path: str, stack: list, config: bool) -> None:
        if not isinstance(raw, list):
            self.add(path, f"expected a JSON array for list {node.name} (RFC 7951 sec. 5.4), "
                           f"got {_json_kind(raw)}")
            return
        seen: dict[Any, int] = {}
        for position, entry in enumerate(raw, start=1):
            entry_path = _entry_path(path, node, entry, position)
            key = self.entry(node, entry, entry_path, stack, config)
            if key is None:
                continue
            if key in seen:
                self.add(entry_path, f"duplicate list key {node.key}={key!s} "
                                     f"(entries {seen[key]} and {position})")
            else:
                seen[key] = position

    def members(self, node: s.Container | s.ListNode, raw: dict, path: str, stack: list,
                config: bool) -> None:
        for name, value in raw.items():
            child = node.child(name) if isinstance(name, str) else None
            member_path = f"{path}/{name}"
            if child is None:
                if isinstance(name, str) and ":" in name and node.child(name.partition(":")[2]):
                    self.add(member_path, "member name must not be module-qualified here: "
                                          "RFC 7951 sec. 4 uses the simple name inside the "
                                          "parent's module", "unknown-element")
                else:
                    self.add(member_path, f"unknown member {name!r}: {NODE_MODULE} defines "
                                          f"no such node in {node.name}", "unknown-element")
                continue
            child_config = config and child.config
            if self.content == CONTENT_CONFIG and not child_config:
                self.add(member_path, "config false (read-only) node is not allowed in "
                                      "configuration data")
                continue
            if child.when is not None and not self.partial:
                problem = self.when_fails(child.when, stack)
                if problem:
                    self.add(member_path, problem, "unknown-element")
                    continue
            if isinstance(child, s.Leaf):
                self.leaf(child, value, member_path)
            elif isinstance(child, s.LeafList):
                self.leaf_list(child, value, member_path)
            elif isinstance(child, s.Container):
                self.container(child, value, member_path, stack, child_config)
            else:
                self.list(child, value, member_path, stack, child_config)
        if not self.partial:
            for child in node.children:
                if isinstance(child, s.Leaf) and child.mandatory and child.name not in raw:
                    if self.content == CONTENT_CONFIG and not (config and child.config):
                        continue
                    self.add(f"{path}/{child.name}", f"missing mandatory leaf {child.name}",
                             "missing-element")

    def when_fails(self, when: s.When, stack: list) -> str | None:
        """Why a ``when`` condition is false, or None when it holds or cannot be judged."""
        if when.up >= len(stack):
            return None  # the context lies outside this payload
        context = stack[-1 - when.up]
        raw = context.get(when.leaf)
        if raw is None:
            return (f"allowed only when {when.describe()} (YANG when), "
                    f"but {when.leaf} is not set")
        try:
            actual = when.identity.__class__.from_json(raw)
        except ValueError:
            return None  # the bad value itself is reported on its own leaf
        if actual is when.identity:
            return None
        return (f"allowed only when {when.describe()} (YANG when), "
                f"but {when.leaf} is '{actual.value}'")

    # -- values

    def leaf(self, node: s.Leaf, raw: Any, path: str) -> None:
        try:
            node.type.parse(raw)
        except ValueError as exc:
            self.add(path, str(exc))

    def leaf_list(self, node: s.LeafList, raw: Any, path: str) -> None:
        if not isinstance(raw, list):
            self.add(path, f"expected a JSON array for leaf-list {node.name} (RFC 7951 "
                           f"sec. 5.3), got {_json_kind(raw)}")
            return
        seen: set = set()
        for position, item in enumerate(raw, start=1):
            item_path = (f"{path}[.={_quote(item)}]" if isinstance(item, str)
                         else f"{path}[{position}]")
            try:
                value = node.type.parse(item)
            except ValueError as exc:
                self.add(item_path, str(exc))
                continue
            if value in seen:
                # YANG 1.0 (RFC 6020 sec. 7.7): leaf-list values are unique.
                self.add(item_path, f"duplicate value in leaf-list {node.name}")
            seen.add(value)


# --------------------------------------------------------------------------- documents


def unwrap_resource(doc: Any, resource: s.Resource) -> tuple[Any, list[Issue]]:
    """The payload value of a resource document, or issues about its envelope."""
    where = resource.path
    if not isinstance(doc, dict):
        return None, [Issue("/", f"expected a JSON object with member {resource.qualified!r}, "
                                 f"got {_json_kind(doc)}", "malformed-message")]
    names = (resource.qualified, resource.name)
    found = [k for k in doc if k in names]
    others = [k for k in doc if k not in names]
    issues = [Issue(f"/{k}" if not resource.parent_path else f"{resource.parent_path}/{k}",
                    f"unexpected member {k!r}: this payload is {resource.qualified!r}",
                    "unknown-element") for k in others]
    if not found:
        issues.insert(0, Issue(where, f"missing member {resource.qualified!r}",
                               "malformed-message"))
        return None, issues
    if len(found) > 1:
        issues.append(Issue(where, "both qualified and unqualified member given",
                            "malformed-message"))
        return None, issues
    return doc[found[0]], issues


def check_resource(doc: Any, resource: s.Resource | str, *, content: str = CONTENT_ALL,
                   partial: bool = False) -> list[Issue]:
    """All issues of a resource document (empty list: valid)."""
    if isinstance(resource, str):
        resource = s.RESOURCES[resource]
    checker = _Checker(content, partial)
    value, envelope = unwrap_resource(doc, resource)
    checker.issues.extend(envelope)
    if value is None:
        return checker.issues
    node = resource.node
    if isinstance(node, s.ListNode):
        if isinstance(value, list):
            if len(value) != 1:
                checker.add(resource.path, f"expected exactly one {node.name} entry, "
                                           f"got {len(value)}", "malformed-message")
                return checker.issues
            value = value[0]
        checker.entry(node, value, _entry_path(resource.path, node, value, 1), [], True)
    else:
        checker.container(node, value, resource.path, [], True)
    return checker.issues


def validate_resource(doc: Any, resource: s.Resource | str, *, content: str = CONTENT_ALL,
                      partial: bool = False) -> None:
    """Raise Etsi015ValidationError unless ``doc`` is a valid document of ``resource``
    (a key of ``etsi015.schema.RESOURCES`` such as ``"qkd_links"``, or a Resource)."""
    issues = check_resource(doc, resource, content=content, partial=partial)
    if issues:
        raise Etsi015ValidationError(issues)


def validate_node(doc: Any, *, content: str = CONTENT_ALL, partial: bool = False) -> None:
    """``{"etsi-qkd-sdn-node:qkd_node": {...}}`` (the whole datastore)."""
    validate_resource(doc, "qkd_node", content=content, partial=partial)


def validate_capabilities(doc: Any, *, content: str = CONTENT_ALL, partial: bool = False) -> None:
    """``{"etsi-qkd-sdn-node:qkdn_capabilities": {...}}``."""
    validate_resource(doc, "qkdn_capabilities", content=content, partial=partial)


def validate_applications(doc: Any, *, content: str = CONTENT_ALL, partial: bool = False) -> None:
    """``{"etsi-qkd-sdn-node:qkd_applications": {"qkd_app": [...]}}``."""
    validate_resource(doc, "qkd_applications", content=content, partial=partial)


def validate_application(doc: Any, *, content: str = CONTENT_ALL, partial: bool = False) -> None:
    """``{"etsi-qkd-sdn-node:qkd_app": [{...}]}`` (one entry)."""
    validate_resource(doc, "qkd_app", content=content, partial=partial)


def validate_interfaces(doc: Any, *, content: str = CONTENT_ALL, partial: bool = False) -> None:
    """``{"etsi-qkd-sdn-node:qkd_interfaces": {"qkd_interface": [...]}}``."""
    validate_resource(doc, "qkd_interfaces", content=content, partial=partial)


def validate_interface(doc: Any, *, content: str = CONTENT_ALL, partial: bool = False) -> None:
    """``{"etsi-qkd-sdn-node:qkd_interface": [{...}]}`` (one entry)."""
    validate_resource(doc, "qkd_interface", content=content, partial=partial)


def validate_links(doc: Any, *, content: str = CONTENT_ALL, partial: bool = False) -> None:
    """``{"etsi-qkd-sdn-node:qkd_links": {"qkd_link": [...]}}``."""
    validate_resource(doc, "qkd_links", content=content, partial=partial)


def validate_link(doc: Any, *, content: str = CONTENT_ALL, partial: bool = False) -> None:
    """``{"etsi-qkd-sdn-node:qkd_link": [{...}]}`` (one entry)."""
    validate_resource(doc, "qkd_link", content=content, partial=partial)


def _notification_name(member: str) -> str | None:
    module, sep, local = member.rpartition(":")
    if sep and module != NODE_MODULE:
        return None
    return local if local in s.NOTIFICATIONS else None


def unwrap_notification(doc: Any) -> tuple[str | None, Any, Any, list[Issue]]:
    """(notification name, content, eventTime or None, envelope issues)."""
    if not isinstance(doc, dict):
        return None, None, None, [Issue("/", f"expected a JSON object, got {_json_kind(doc)}",
                                        "malformed-message")]
    issues: list[Issue] = []
    event_time = None
    body = doc
    if RESTCONF_NOTIFICATION in doc:
        if len(doc) != 1:
            issues.append(Issue("/", f"{RESTCONF_NOTIFICATION!r} must be the only member",
                                "malformed-message"))
        body = doc[RESTCONF_NOTIFICATION]
        if not isinstance(body, dict):
            return None, None, None, issues + [Issue(
                f"/{RESTCONF_NOTIFICATION}", f"expected a JSON object, got {_json_kind(body)}",
                "malformed-message")]
        body = dict(body)
        if "eventTime" not in body:
            issues.append(Issue(f"/{RESTCONF_NOTIFICATION}/eventTime",
                                "missing eventTime (RFC 8040 sec. 6.4)", "missing-element"))
        else:
            event_time = body.pop("eventTime")
            try:
                t.DATE_AND_TIME.parse(event_time)
            except ValueError as exc:
                issues.append(Issue(f"/{RESTCONF_NOTIFICATION}/eventTime", str(exc)))
    names = [k for k in body if _notification_name(k) is not None]
    others = [k for k in body if k not in names]
    issues += [Issue(f"/{k}", f"unknown member {k!r}: not a notification of {NODE_MODULE}",
                     "unknown-element") for k in others]
    if len(names) != 1:
        issues.append(Issue("/", f"expected exactly one {NODE_MODULE} notification, "
                                 f"got {len(names)}", "malformed-message"))
        return None, None, event_time, issues
    key = names[0]
    return _notification_name(key), body[key], event_time, issues


def validate_notification(doc: Any) -> None:
    """A notification, bare (``{"etsi-qkd-sdn-node:alarm": {...}}``) or in the RFC 8040 envelope."""
    name, content, _, issues = unwrap_notification(doc)
    if name is not None:
        checker = _Checker(CONTENT_ALL, False)
        checker.container(s.NOTIFICATIONS[name], content, f"/{NODE_MODULE}:{name}", [], True)
        issues += checker.issues
    if issues:
        raise Etsi015ValidationError(issues)
