"""A small client for applications: ETSI GS QKD 004 and 014 against a qkdsdn key manager.

    from agents.client import KeyManagerClient, QoS

    km = KeyManagerClient("https://10.0.0.2:8400", cert=("app.pem", "app.key"), ca="ca.pem")
    r = km.open_connect("SAE-A", "SAE-B", QoS(Key_chunk_size=32, Max_bps=8000, Timeout=10000))
    if r.status == 0:
        k = km.get_key(r.key_stream_id, index=0, metadata_size=256)
        # k.key (bytes), k.index, k.metadata {"age": ms, "hops": n}
        km.close(r.key_stream_id)

ETSI 004 results carry the specification's status code (0..8) rather than
raising; ETSI 014 errors raise ``ETSI014Error`` with the HTTP status and the
spec's message. The wire mapping is documented in docs/etsi004-mapping.md.
"""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

import requests

from agents.core.session import QoS, Status

__all__ = ["KeyManagerClient", "QoS", "Status", "OpenResult", "KeyResult", "ETSI014Error", "DEV_IDENTITY_HEADER"]

DEV_IDENTITY_HEADER = "X-QKDSDN-Dev-Identity"


@dataclass(frozen=True)
class OpenResult:
    status: int
    key_stream_id: str | None
    qos: QoS | None
    message: str = ""


@dataclass(frozen=True)
class KeyResult:
    status: int
    key_stream_id: str | None
    index: int | None = None
    key: bytes | None = field(default=None, repr=False)  # never in a repr
    metadata: dict[str, Any] | None = None
    metadata_size: int | None = None
    message: str = ""


class ETSI014Error(Exception):
    def __init__(self, status: int, message: str, details: Any = None):
        super().__init__(f"HTTP {status}: {message}" if message else f"HTTP {status}")
        self.status, self.message, self.details = status, message, details


class ETSI004Error(Exception):
    """The call itself was refused (malformed request, not authorised): no 004 status applies."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}" if message else f"HTTP {status}")
        self.status, self.message = status, message


class KeyManagerClient:
    """``cert``: (certificate, key) of the application (mutual TLS); ``ca``: the network's CA.
    ``dev_sae_id`` is for agents in --insecure-dev mode on loopback only."""

    def __init__(self, base_url: str, *, cert: tuple[str, str] | None = None, ca: str | None = None,
                 dev_sae_id: str | None = None, timeout: float = 60.0, session: requests.Session | None = None):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.session = session or requests.Session()
        if cert is not None:
            self.session.cert = cert
        if ca is not None:
            self.session.verify = ca
            # REQUESTS_CA_BUNDLE in the environment would otherwise replace the network's own CA.
            self.session.trust_env = False
        if dev_sae_id is not None:
            self.session.headers[DEV_IDENTITY_HEADER] = f"sae:{dev_sae_id}"

    def close_session(self) -> None:
        self.session.close()

    # -- ETSI GS QKD 004 ---------------------------------------------------------------------

    def _call004(self, name: str, body: dict, timeout: float | None) -> dict:
        r = self.session.post(f"{self.base_url}/api/v1/qkd004/{name}", json=body, timeout=timeout or self.timeout)
        if r.status_code != 200:
            try:
                message = r.json().get("message", "")
            except ValueError:
                message = ""
            raise ETSI004Error(r.status_code, message)
        return r.json()

    def open_connect(self, source: str, destination: str, qos: QoS | None = None,
                     key_stream_id: str | None = None) -> OpenResult:
        body = {"source": source, "destination": destination, "QoS": qos.to_json() if qos else None,
                "Key_stream_ID": key_stream_id}
        timeout = (qos.Timeout / 1000.0 + 15.0) if qos is not None and qos.Timeout else None
        out = self._call004("open_connect", body, timeout)
        return OpenResult(out["status"], out.get("Key_stream_ID"),
                          QoS.from_json(out["QoS"]) if out.get("QoS") else None, out.get("message", ""))

    def get_key(self, key_stream_id: str, index: int | None = None, metadata_size: int = 0,
                timeout: float | None = None) -> KeyResult:
        body: dict[str, Any] = {"Key_stream_ID": key_stream_id, "index": index}
        if metadata_size:
            body["Metadata_size"] = metadata_size
        out = self._call004("get_key", body, timeout)
        meta = out.get("Metadata") or {}
        buffer = meta.get("Metadata_buffer")
        return KeyResult(out["status"], out.get("Key_stream_ID"), out.get("index"),
                         base64.b64decode(out["Key_buffer"]) if out.get("Key_buffer") else None,
                         json.loads(buffer) if buffer else None, meta.get("Metadata_size"), out.get("message", ""))

    def close(self, key_stream_id: str) -> int:
        return self._call004("close", {"Key_stream_ID": key_stream_id}, None)["status"]

    # -- ETSI GS QKD 014 ---------------------------------------------------------------------

    def _call014(self, method: str, path: str, **kw: Any) -> Any:
        r = self.session.request(method, f"{self.base_url}/api/v1/keys/{path}", timeout=self.timeout, **kw)
        if r.status_code != 200:
            message, details = "", None
            if r.content:
                try:
                    body = r.json()
                    message, details = body.get("message", ""), body.get("details")
                except ValueError:
                    pass
            raise ETSI014Error(r.status_code, message, details)
        return r.json()

    def status(self, slave_sae_id: str) -> dict:
        return self._call014("GET", f"{slave_sae_id}/status")

    def enc_keys(self, slave_sae_id: str, number: int = 1, size: int | None = None,
                 additional_slave_sae_ids: list[str] | None = None) -> list[tuple[str, bytes]]:
        """New keys for the slave SAE (and, multicast, for every additional slave SAE too:
        each gets the same keys under the same key_IDs with its own dec_keys)."""
        body: dict[str, Any] = {"number": number}
        if size is not None:
            body["size"] = size
        if additional_slave_sae_ids:
            body["additional_slave_SAE_IDs"] = list(additional_slave_sae_ids)
        out = self._call014("POST", f"{slave_sae_id}/enc_keys", json=body)
        return [(k["key_ID"], base64.b64decode(k["key"])) for k in out["keys"]]

    def dec_keys(self, master_sae_id: str, key_ids: list[str]) -> list[tuple[str, bytes]]:
        out = self._call014("POST", f"{master_sae_id}/dec_keys", json={"key_IDs": [{"key_ID": k} for k in key_ids]})
        return [(k["key_ID"], base64.b64decode(k["key"])) for k in out["keys"]]
