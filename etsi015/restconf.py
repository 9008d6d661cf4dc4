"""A RESTCONF (RFC 8040) client for one SD-QKD node's ``etsi-qkd-sdn-node`` datastore.

    client = RestconfClient("https://127.0.0.1:8443", cert=("ctl.pem", "ctl.key"),
                            ca="ca.pem", token="...")
    node = client.get_node()                       # QkdNode
    links = client.get("qkd_links")                # list[Link]
    client.post_link(Link(qkdl_id=..., qkdl_type=LinkType.VIRT, ...))
    client.patch_link(Link(qkdl_id=..., qkdl_status=LinkStatus.OFF))
    client.delete_application(ksid)

Bodies are RFC 7951 JSON (``application/yang-data+json``) built by
``etsi015.codec`` with config-false nodes left out; responses are validated and
decoded. A server error response raises ``RestconfError`` carrying the RFC 8040
``error-type`` / ``error-tag`` / ``error-message`` / ``error-path``; a network
failure raises ``RestconfTransportError``.
"""
from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import requests

from etsi015 import codec
from etsi015 import model as m
from etsi015.errors import (RestconfErrorItem, parse_restconf_errors, restconf_error)
from etsi015.model import NODE_MODULE

__all__ = ["RestconfClient", "RestconfError", "RestconfTransportError", "restconf_error",
           "MEDIA_TYPE"]

MEDIA_TYPE = "application/yang-data+json"
_CONTAINERS = {
    "qkdn_capabilities": codec.decode_capabilities,
    "qkd_applications": codec.decode_applications,
    "qkd_interfaces": codec.decode_interfaces,
    "qkd_links": codec.decode_links,
}


class RestconfError(Exception):
    """A RESTCONF request that failed; ``errors`` holds the RFC 8040 error entries
    (empty when the server sent none, e.g. a bare 401). The ``error_*`` properties
    read the first entry."""

    def __init__(self, method: str, url: str, status: int | None,
                 errors: list[RestconfErrorItem] | None = None, detail: str | None = None):
        self.method = method
        self.url = url
        self.status = status
        self.errors = list(errors or [])
        self.detail = detail
        what = f"{method} {url}: " + (f"HTTP {status}" if status is not None else "no response")
        if self.errors:
            what += ": " + "; ".join(str(e) for e in self.errors)
        elif detail:
            what += f": {detail}"
        super().__init__(what)

    def _first(self, attr: str) -> Any:
        return getattr(self.errors[0], attr) if self.errors else None

    @property
    def error_type(self) -> str | None:
        return self._first("error_type")

    @property
    def error_tag(self) -> str | None:
        return self._first("error_tag")

    @property
    def error_message(self) -> str | None:
        return self._first("error_message")

    @property
    def error_path(self) -> str | None:
        return self._first("error_path")


class RestconfTransportError(RestconfError):
    """The request did not get an HTTP response (connection, TLS, timeout)."""


class RestconfClient:
    """Client for ``<base_url>/restconf/data/etsi-qkd-sdn-node:qkd_node``.

    ``cert``: client certificate for mutual TLS, a PEM file holding cert and key or
    a (cert, key) pair. ``ca``: CA bundle that verifies the node's certificate
    (default: the system store). Authentication: ``token`` (Bearer) or
    ``username`` + ``password`` (HTTP Basic), at most one of them.
    """

    def __init__(self, base_url: str, *, cert: str | tuple[str, str] | None = None,
                 ca: str | None = None, token: str | None = None,
                 username: str | None = None, password: str | None = None,
                 timeout: float = 10.0, data_root: str = "/restconf/data",
                 session: requests.Session | None = None):
        if token is not None and (username is not None or password is not None):
            raise ValueError("use either a Bearer token or Basic credentials, not both")
        if (username is None) != (password is None):
            raise ValueError("Basic authentication needs both username and password")
        self.node_url = f"{base_url.rstrip('/')}{data_root.rstrip('/')}/{NODE_MODULE}:qkd_node"
        self.timeout = timeout
        self._cert = cert
        # A caller's session keeps its own trust settings unless ``ca`` is given.
        self._verify: str | bool | None = ca if ca is not None else (None if session is not None else True)
        self._auth = (username, password) if username is not None else None
        self._headers = {"Accept": MEDIA_TYPE}
        if token is not None:
            self._headers["Authorization"] = f"Bearer {token}"
        self._own_session = session is None
        self.session = session or requests.Session()

    def close(self) -> None:
        if self._own_session:
            self.session.close()

    def __enter__(self) -> "RestconfClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- transport

    def request(self, method: str, path: str = "", body: Any = None) -> requests.Response:
        """One request to ``<node_url>/<path>``; raises RestconfError on HTTP >= 400."""
        url = f"{self.node_url}/{path}" if path else self.node_url
        headers = dict(self._headers)
        data = None
        if body is not None:
            headers["Content-Type"] = MEDIA_TYPE
            data = json.dumps(body).encode("utf-8")
        try:
            response = self.session.request(
                method, url, data=data, headers=headers, timeout=self.timeout,
                verify=self._verify, cert=self._cert, auth=self._auth)
        except requests.RequestException as exc:
            raise RestconfTransportError(method, url, None, detail=str(exc)) from exc
        if response.status_code >= 400:
            raise self._error(method, url, response)
        return response

    @staticmethod
    def _error(method: str, url: str, response: requests.Response) -> RestconfError:
        errors = None
        if response.content:
            try:
                errors = parse_restconf_errors(response.json())
            except ValueError:
                errors = None
        detail = None
        if errors is None:
            # Not an RFC 8040 body: keep a short excerpt for the operator.
            detail = (response.text or response.reason or "").strip()[:200] or None
        return RestconfError(method, url, response.status_code, errors, detail)

    def get_raw(self, path: str = "") -> Any:
        """GET ``<node_url>/<path>`` and return the JSON body undecoded."""
        response = self.request("GET", path)
        try:
            return response.json()
        except ValueError as exc:
            raise RestconfError("GET", response.url, response.status_code,
                                detail="response body is not JSON") from exc

    # -- reads

    def get_node(self) -> m.QkdNode:
        return codec.decode_node(self.get_raw())

    def get(self, container: str) -> Any:
        """One child container of qkd_node, decoded: ``"qkdn_capabilities"`` ->
        Capabilities; ``"qkd_applications"`` / ``"qkd_interfaces"`` / ``"qkd_links"``
        -> list of Application / Interface / Link."""
        decode = _CONTAINERS.get(container)
        if decode is None:
            raise ValueError(f"unknown container {container!r}; one of {sorted(_CONTAINERS)}")
        return decode(self.get_raw(container))

    def get_link(self, qkdl_id: str) -> m.Link:
        return codec.decode_link(self.get_raw(_link_path(qkdl_id)))

    def get_application(self, app_id: str) -> m.Application:
        return codec.decode_application(self.get_raw(_app_path(app_id)))

    def get_interface(self, qkdi_id: int) -> m.Interface:
        return codec.decode_interface(self.get_raw(
            f"qkd_interfaces/qkd_interface={_key(qkdi_id)}"))

    # -- writes (RFC 8040 sec. 4.4 - 4.7)

    def post_link(self, link: m.Link) -> str | None:
        """Create a link (POST to qkd_links; 201). Returns the Location header, if any."""
        response = self.request("POST", "qkd_links", codec.encode_link(link, config_only=True))
        return response.headers.get("Location")

    def put_link(self, link: m.Link) -> bool:
        """Create or replace a link; True if it was created (201), False if replaced."""
        response = self.request("PUT", _link_path(link.qkdl_id),
                                codec.encode_link(link, config_only=True))
        return response.status_code == 201

    def patch_link(self, link: m.Link) -> None:
        """Merge the leaves set on ``link`` into the stored link (plain PATCH)."""
        self.request("PATCH", _link_path(link.qkdl_id),
                     codec.encode_link(link, config_only=True, partial=True))

    def delete_link(self, qkdl_id: str) -> None:
        self.request("DELETE", _link_path(qkdl_id))

    def post_application(self, app: m.Application) -> str | None:
        response = self.request("POST", "qkd_applications",
                                codec.encode_application(app, config_only=True))
        return response.headers.get("Location")

    def put_application(self, app: m.Application) -> bool:
        response = self.request("PUT", _app_path(app.app_id),
                                codec.encode_application(app, config_only=True))
        return response.status_code == 201

    def patch_application(self, app: m.Application) -> None:
        self.request("PATCH", _app_path(app.app_id),
                     codec.encode_application(app, config_only=True, partial=True))

    def delete_application(self, app_id: str) -> None:
        self.request("DELETE", _app_path(app_id))


def _key(value: Any) -> str:
    # RFC 8040 sec. 3.5.3: key values are percent-encoded, reserved characters included.
    return quote(str(value), safe="")


def _link_path(qkdl_id: str) -> str:
    return f"qkd_links/qkd_link={_key(qkdl_id)}"


def _app_path(app_id: str) -> str:
    return f"qkd_applications/qkd_app={_key(app_id)}"
