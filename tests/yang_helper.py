"""Validate RFC 7951 documents against the ETSI GS QKD 015 YANG modules with yangson.

The modules are read from ``<repo>/../shared/etsi/qkd015`` (never copied into the
repository); ``patched/`` is searched first because its ``when`` conditions
compare with the module-qualified identity, as RFC 7951 JSON carries it (see
``shared/etsi/SPECS.md``). Tests that need the modules are skipped when the
folder is absent.

    from yang_helper import validate_with_yang
    validate_with_yang(etsi015.codec.encode_node(node))           # raises YangInvalid
    validate_resource_with_yang(encode_links(links), "qkd_links")
    validate_notification_with_yang(alarm.to_json())
"""
from __future__ import annotations

import functools
import json
import os
import re
import tempfile
from pathlib import Path

import pytest

ETSI_DIR = Path(__file__).resolve().parents[2] / "shared" / "etsi"
QKD015_DIR = ETSI_DIR / "qkd015"
PATCHED_DIR = QKD015_DIR / "patched"
NODE_MODULE = "etsi-qkd-sdn-node"
# Module -> conformance: etsi-qkd-node-types must be implemented for yangson to
# resolve its identities; the RFC 6991 modules only provide typedefs.
MODULES = {
    NODE_MODULE: "implement",
    "etsi-qkd-node-types": "implement",
    "ietf-yang-types": "import",
    "ietf-inet-types": "import",
}
# Parent of every non-root resource inside qkd_node, for wrapping sub-documents.
_WRAPPERS = {"qkd_app": "qkd_applications", "qkd_interface": "qkd_interfaces",
             "qkd_link": "qkd_links"}
# Any valid uuid: the mandatory qkdn_id of the node a sub-document is wrapped in.
_WRAP_QKDN_ID = "00000000-0000-4000-8000-000000000000"


class YangInvalid(AssertionError):
    """yangson rejected the document."""


def etsi_dir() -> Path:
    """The qkd015 folder, or skip the calling test when it is absent."""
    if not (QKD015_DIR / f"{NODE_MODULE}.yang").is_file() or not PATCHED_DIR.is_dir():
        pytest.skip(f"ETSI QKD 015 YANG modules not found in {QKD015_DIR} "
                    "(the shared reference folder next to the repository)")
    return QKD015_DIR


def _module_file(name: str) -> Path:
    patched = PATCHED_DIR / f"{name}.yang"
    return patched if patched.is_file() else QKD015_DIR / f"{name}.yang"


def _header(name: str) -> tuple[str, str]:
    """(latest revision, namespace) read from the module text."""
    text = _module_file(name).read_text(encoding="utf-8")
    revisions = re.findall(r'\brevision\s+"?(\d{4}-\d{2}-\d{2})"?\s*[{;]', text)
    namespace = re.search(r'\bnamespace\s+"([^"]+)"', text)
    if not revisions or namespace is None:
        raise RuntimeError(f"cannot read revision/namespace of {_module_file(name)}")
    return max(revisions), namespace.group(1)


def yang_library() -> dict:
    """RFC 7895 YANG library data listing the four modules."""
    modules = []
    for name, conformance in MODULES.items():
        revision, namespace = _header(name)
        modules.append({"name": name, "revision": revision, "namespace": namespace,
                        "conformance-type": conformance})
    return {"ietf-yang-library:modules-state": {"module-set-id": "qkdsdn-tests",
                                                "module": modules}}


@functools.lru_cache(maxsize=1)
def _data_model():
    from yangson import DataModel

    fd, path = tempfile.mkstemp(prefix="qkd015-yanglib-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(yang_library(), out)
        # yangson takes the first match along the path: patched/ must come first.
        return DataModel.from_file(path, [str(PATCHED_DIR), str(QKD015_DIR)])
    finally:
        os.unlink(path)


def data_model():
    """The yangson DataModel (cached); skips the test when the modules are absent."""
    etsi_dir()
    return _data_model()


def _content_type(content: str):
    from yangson.enumerations import ContentType
    return {"all": ContentType.all, "config": ContentType.config}[content]


def validate_with_yang(doc: dict, content: str = "all") -> None:
    """Validate a whole-datastore document (``{"etsi-qkd-sdn-node:qkd_node": ...}``).

    ``content="config"`` validates configuration data (config-false nodes are errors).
    Raises YangInvalid with yangson's message.
    """
    from yangson.exceptions import YangsonException

    dm = data_model()
    try:
        instance = dm.from_raw(doc)
        instance.validate(ctype=_content_type(content))
    except YangsonException as exc:
        raise YangInvalid(f"{type(exc).__name__}: {exc}") from None


def validate_resource_with_yang(doc: dict, resource: str, content: str = "all") -> None:
    """Validate the document of a RESTCONF resource below qkd_node (``qkd_links``,
    ``qkd_link``, ``qkdn_capabilities``...) by placing it in a minimal node."""
    if resource == "qkd_node":
        validate_with_yang(doc, content)
        return
    if not isinstance(doc, dict) or len(doc) != 1:
        raise YangInvalid(f"expected one top-level member, got {doc!r:.200}")
    (member, value), = doc.items()
    if member != f"{NODE_MODULE}:{resource}":
        raise YangInvalid(f"expected member {NODE_MODULE}:{resource}, got {member}")
    if resource in _WRAPPERS:
        value = {_WRAPPERS[resource]: {resource: value if isinstance(value, list) else [value]}}
    else:
        value = {resource: value}
    validate_with_yang({f"{NODE_MODULE}:qkd_node": {"qkdn_id": _WRAP_QKDN_ID, **value}},
                       content)


def validate_notification_with_yang(doc: dict) -> None:
    """Validate notification content against its YANG ``notification`` schema.

    Accepts ``{"etsi-qkd-sdn-node:<name>": {...}}`` or the RFC 8040 envelope
    ``{"ietf-restconf:notification": {"eventTime": ..., "etsi-qkd-sdn-node:<name>": {...}}}``.
    """
    from yangson.exceptions import YangsonException

    dm = data_model()
    body = doc.get("ietf-restconf:notification", doc)
    members = {k: v for k, v in body.items() if k != "eventTime"}
    if len(members) != 1:
        raise YangInvalid(f"expected one notification member, got {sorted(members)}")
    (name, content), = members.items()
    if not isinstance(content, dict):
        raise YangInvalid(f"{name}: expected an object")
    module = name.partition(":")[0]
    # Inside the subschema the notification's children are top-level members,
    # so RFC 7951 wants them qualified.
    raw = {f"{module}:{k}": v for k, v in content.items()}
    try:
        instance = dm.from_raw(raw, subschema=name)
        instance.validate(ctype=_content_type("all"))
    except YangsonException as exc:
        raise YangInvalid(f"{type(exc).__name__}: {exc}") from None
