"""RFC 8040 sec. 7.1 error documents (``ietf-restconf:errors``), stdlib only.

Servers build the body with ``restconf_error``; ``parse_restconf_errors`` reads one
back on the client side.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["ERROR_TAG_STATUS", "ERROR_TYPES", "RestconfErrorItem", "restconf_error",
           "parse_restconf_errors"]

ERROR_TYPES = ("transport", "rpc", "protocol", "application")

# RFC 8040 sec. 7: the HTTP status codes each error-tag may be sent with.
ERROR_TAG_STATUS: dict[str, tuple[int, ...]] = {
    "in-use": (409,),
    "invalid-value": (400, 404, 406),
    "too-big": (400, 413),
    "missing-attribute": (400,),
    "bad-attribute": (400,),
    "unknown-attribute": (400,),
    "bad-element": (400,),
    "unknown-element": (400,),
    "unknown-namespace": (400,),
    "access-denied": (401, 403),
    "lock-denied": (409,),
    "resource-denied": (409,),
    "rollback-failed": (500,),
    "data-exists": (409,),
    "data-missing": (409,),
    "operation-not-supported": (405, 501),
    "operation-failed": (412, 500),
    "partial-operation": (500,),
    "malformed-message": (400,),
}


@dataclass(frozen=True)
class RestconfErrorItem:
    """One ``error`` entry of an RFC 8040 error document."""

    error_type: str
    error_tag: str
    error_message: str | None = None
    error_path: str | None = None
    error_app_tag: str | None = None
    error_info: Any = None

    def __str__(self) -> str:
        text = f"{self.error_type}/{self.error_tag}"
        if self.error_path:
            text += f" at {self.error_path}"
        if self.error_message:
            text += f": {self.error_message}"
        return text


def restconf_error(status: int, tag: str, message: str, path: str | None = None,
                   type: str = "application") -> dict:
    """The RFC 8040 error document for one error, to send with HTTP ``status``.

    Raises ValueError when ``tag`` is not an RFC 8040 error-tag, ``type`` not an
    error-type, or ``status`` not a code RFC 8040 sec. 7 allows for ``tag`` (e.g.
    a missing resource is ``restconf_error(404, "invalid-value", ...)``).
    """
    if type not in ERROR_TYPES:
        raise ValueError(f"error-type must be one of {ERROR_TYPES}, not {type!r}")
    allowed = ERROR_TAG_STATUS.get(tag)
    if allowed is None:
        raise ValueError(f"{tag!r} is not an RFC 8040 error-tag")
    if status not in allowed:
        raise ValueError(f"RFC 8040 sends error-tag {tag!r} with status "
                         f"{' or '.join(map(str, allowed))}, not {status}")
    error: dict[str, Any] = {"error-type": type, "error-tag": tag, "error-message": message}
    if path is not None:
        error["error-path"] = path
    return {"ietf-restconf:errors": {"error": [error]}}


def parse_restconf_errors(doc: Any) -> list[RestconfErrorItem] | None:
    """The errors of an RFC 8040 error document, or None if ``doc`` is not one."""
    if not isinstance(doc, dict):
        return None
    errors = doc.get("ietf-restconf:errors")
    if not isinstance(errors, dict):
        return None
    entries = errors.get("error")
    if isinstance(entries, dict):  # some servers send one error as an object
        entries = [entries]
    if not isinstance(entries, list):
        return None
    items = []
    for entry in entries:
        if not isinstance(entry, dict):
            continue

        def text(name: str) -> str | None:
            value = entry.get(name)
            return value if isinstance(value, str) else None
        items.append(RestconfErrorItem(
            error_type=text("error-type") or "application",
            error_tag=text("error-tag") or "operation-failed",
            error_message=text("error-message"),
            error_path=text("error-path"),
            error_app_tag=text("error-app-tag"),
            error_info=entry.get("error-info")))
    return items
