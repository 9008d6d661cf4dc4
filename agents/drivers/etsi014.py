"""Driver for a QKD device reached over its ETSI GS QKD 014 key delivery API.

It speaks plain ETSI 014 over HTTPS with mutual TLS, so it serves hardware KMEs
and the qkdsdn digital twin alike: give it the KME's base URL, the SAE ID of the
key manager at the other end of the link, our client certificate and key, and
the CA that signed the KME's server certificate. Responses are checked against
the ETSI 014 data formats before anything is returned; HTTP errors become typed
exceptions (400 BadRequest with the KME's message, 401 Unauthorized, 503
KeysUnavailable).

Development only: an ``http://`` URL on a loopback host with
``insecure_dev_sae_id`` talks to a twin started with ``--insecure-dev``, which
reads the caller's SAE ID from a header instead of a certificate.
"""
from __future__ import annotations

import base64
import binascii
import logging
import uuid
from typing import Any, Iterable
from urllib.parse import quote, urlsplit

import requests

from agents.drivers.base import (
    BadRequest,
    DeviceKey,
    DeviceStatus,
    DeviceUnreachable,
    KeysUnavailable,
    ProtocolError,
    QKDDevice,
    Unauthorized,
)

log = logging.getLogger(__name__)

DEV_SAE_HEADER = "X-Qkdsdn-Dev-SAE-ID"  # same name as qkdsdn.twin.kme.DEV_SAE_HEADER
_STATUS_INT_FIELDS = ("key_size", "stored_key_count", "max_key_count", "max_key_per_request",
                      "max_key_size", "min_key_size", "max_SAE_ID_count")
_STATUS_STR_FIELDS = ("source_KME_ID", "target_KME_ID", "master_SAE_ID", "slave_SAE_ID")


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _canonical_uuid(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return None


class ETSI014Device(QKDDevice):
    """One KME end of a QKD link, used by the key manager whose SAE ID the client certificate carries.

    ``url`` is the KME's base URL (``https://host:port``, optionally with a path
    prefix); ``sae_id_of_peer`` is the SAE ID of the key manager at the other end
    (the slave SAE in ``enc_keys``/``status``, the master SAE in ``dec_keys``).
    ``ca=None`` trusts the system store (hardware KMEs with public certificates).
    """

    def __init__(self, url: str, sae_id_of_peer: str, cert: str | None = None, key: str | None = None,
                 ca: str | None = None, timeout: float = 5.0, *, insecure_dev_sae_id: str | None = None):
        parts = urlsplit(url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError(f"KME URL must be https://host:port, got {url!r}")
        if not sae_id_of_peer:
            raise ValueError("the peer SAE ID is required")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.url = url.rstrip("/")
        self.peer = sae_id_of_peer
        self.timeout = float(timeout)
        self._headers = {"Accept": "application/json"}
        if parts.scheme == "http":
            if insecure_dev_sae_id is None or not _is_loopback(parts.hostname):
                raise ValueError(f"{url}: plain HTTP is only for a development twin on a loopback address "
                                 "(with insecure_dev_sae_id); use https:// with a client certificate")
            log.warning("ETSI 014 device %s over PLAIN HTTP (development mode, SAE ID %s by header)",
                        self.url, insecure_dev_sae_id)
            self._headers[DEV_SAE_HEADER] = insecure_dev_sae_id
            session = requests.Session()
            session.trust_env = False
        else:
            if cert is None or key is None:
                raise ValueError(f"{url}: ETSI 014 needs mutual TLS: give the client certificate and key")
            from qkdsdn.httpserver import https_session

            session = https_session(cert, key, ca)
        self._session = session

    def __repr__(self) -> str:
        return f"ETSI014Device({self.url!r}, peer={self.peer!r})"

    # ------------------------------------------------------------------ HTTP

    def _path(self, op: str) -> str:
        return f"{self.url}/api/v1/keys/{quote(self.peer, safe='')}/{op}"

    def _request(self, method: str, op: str, body: dict | None = None) -> Any:
        url = self._path(op)
        try:
            resp = self._session.request(method, url, json=body, headers=self._headers, timeout=self.timeout)
        except requests.exceptions.SSLError as exc:
            raise DeviceUnreachable(f"{method} {url}: TLS failure: {_reason(exc)}") from None
        except requests.exceptions.Timeout:
            raise DeviceUnreachable(f"{method} {url}: no answer within {self.timeout:g} s") from None
        except requests.exceptions.RequestException as exc:
            raise DeviceUnreachable(f"{method} {url}: {_reason(exc)}") from None
        code = resp.status_code
        if code == 200:
            try:
                return resp.json()
            except ValueError:
                # The body may hold key bytes: never quote it.
                raise ProtocolError(f"{method} {url}: 200 response is not JSON") from None
        if code == 401:
            raise Unauthorized(f"{method} {url}: the KME refused our SAE ID (401)")
        error = _error_body(resp)
        if code == 400:
            raise BadRequest(*error)
        if code == 503:
            raise KeysUnavailable(*error)
        raise ProtocolError(f"{method} {url}: unexpected HTTP {code}: {error[0]}")

    # ------------------------------------------------------------------ API

    def get_status(self) -> DeviceStatus:
        data = self._request("GET", "status")
        if not isinstance(data, dict):
            raise ProtocolError(f"{self.url}: Status is not a JSON object")
        for name in _STATUS_STR_FIELDS:
            if not isinstance(data.get(name), str):
                raise ProtocolError(f"{self.url}: Status field {name} missing or not a string")
        for name in _STATUS_INT_FIELDS:
            v = data.get(name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ProtocolError(f"{self.url}: Status field {name} missing or not a non-negative integer")
        ext = data.get("status_extension", {})
        if not isinstance(ext, dict):
            raise ProtocolError(f"{self.url}: status_extension is not an object")
        return DeviceStatus(
            source_kme_id=data["source_KME_ID"], target_kme_id=data["target_KME_ID"],
            master_sae_id=data["master_SAE_ID"], slave_sae_id=data["slave_SAE_ID"],
            key_size=data["key_size"], stored_key_count=data["stored_key_count"],
            max_key_count=data["max_key_count"], max_key_per_request=data["max_key_per_request"],
            max_key_size=data["max_key_size"], min_key_size=data["min_key_size"],
            max_sae_id_count=data["max_SAE_ID_count"], extension=dict(ext))

    def enc_keys(self, number: int = 1, size: int | None = None) -> list[DeviceKey]:
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            raise ValueError(f"number must be a positive integer, got {number!r}")
        body: dict[str, int] = {"number": number}
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
                raise ValueError(f"size must be a positive integer (bits), got {size!r}")
            body["size"] = size
        keys = self._keys(self._request("POST", "enc_keys", body), "enc_keys")
        if len(keys) != number:
            raise ProtocolError(f"{self.url}: asked for {number} key(s), got {len(keys)}")
        sizes = {k.size_bits for k in keys}
        if size is not None and sizes != {size}:
            raise ProtocolError(f"{self.url}: asked for {size}-bit keys, got sizes {sorted(sizes)}")
        if len(sizes) > 1:
            raise ProtocolError(f"{self.url}: keys of one request differ in size: {sorted(sizes)}")
        return keys

    def dec_keys(self, key_ids: Iterable[str]) -> list[DeviceKey]:
        wanted = []
        for kid in key_ids:
            canon = _canonical_uuid(kid)
            if canon is None:
                raise ValueError(f"key ID {kid!r} is not a UUID")
            wanted.append(canon)
        if not wanted:
            raise ValueError("dec_keys needs at least one key ID")
        if len(set(wanted)) != len(wanted):
            raise ValueError("the same key ID is given more than once")
        keys = self._keys(self._request("POST", "dec_keys", {"key_IDs": [{"key_ID": k} for k in wanted]}),
                          "dec_keys")
        by_id = {k.key_id: k for k in keys}
        if len(by_id) != len(keys) or set(by_id) != set(wanted):
            raise ProtocolError(f"{self.url}: dec_keys returned other key IDs than requested")
        return [by_id[k] for k in wanted]

    def close(self) -> None:
        self._session.close()

    # ------------------------------------------------------------------ parsing

    def _keys(self, data: Any, op: str) -> list[DeviceKey]:
        if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
            raise ProtocolError(f"{self.url}: {op} answer is not a Key container")
        out = []
        seen = set()
        for item in data["keys"]:
            if not isinstance(item, dict):
                raise ProtocolError(f"{self.url}: {op}: a key entry is not an object")
            kid = _canonical_uuid(item.get("key_ID"))
            if kid is None:
                raise ProtocolError(f"{self.url}: {op}: a key_ID is missing or not a UUID")
            if kid in seen:
                raise ProtocolError(f"{self.url}: {op}: key_ID {kid} appears twice")
            seen.add(kid)
            raw = item.get("key")
            if not isinstance(raw, str):
                raise ProtocolError(f"{self.url}: {op}: key {kid} has no key data")
            try:
                material = base64.b64decode(raw, validate=True)
            except (binascii.Error, ValueError):
                raise ProtocolError(f"{self.url}: {op}: key {kid} is not valid base64") from None
            if not material:
                raise ProtocolError(f"{self.url}: {op}: key {kid} is empty")
            out.append(DeviceKey(kid, material))
        return out


def _error_body(resp: requests.Response) -> tuple[str, list]:
    """(message, details) of an ETSI 014 Error body, or a description of what came instead."""
    try:
        data = resp.json()
    except ValueError:
        text = resp.text.strip().replace("\n", " ")[:200]
        return (text or f"HTTP {resp.status_code} without an Error body"), []
    if isinstance(data, dict) and isinstance(data.get("message"), str):
        details = data.get("details")
        return data["message"], details if isinstance(details, list) else []
    return f"HTTP {resp.status_code} with a malformed Error body", []


def _reason(exc: Exception) -> str:
    # requests nests the useful part several levels down; the innermost reason reads best.
    inner: BaseException | None = exc
    while inner is not None and inner.args and isinstance(inner.args[0], BaseException):
        inner = inner.args[0]
    text = str(getattr(inner, "reason", None) or inner or exc)
    return text[:300]

