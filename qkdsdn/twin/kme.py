"""ETSI GS QKD 014 key delivery server for one end of an emulated link (the twin's KME).

``create_kme_app(engine, "master")`` serves the link's master key manager (SAE ID =
master node name): ``status`` and ``enc_keys`` for the slave SAE. ``"slave"``
serves the slave key manager: ``dec_keys`` for keys the master took, and a
``status`` whose ``stored_key_count`` is the number of keys waiting for it.
Paths, fields and messages follow ETSI GS QKD 014 V1.1.1 (``shared/etsi/qkd014``):

* 400 with Error ``{message, details?}`` for a malformed request, with the spec's
  fixed messages where it has one; 401 with no body when the caller is not the
  SAE this end serves, or not the slave of the requested keys; 503 with Error
  when key material is not available (link cut, QBER abort, buffer empty).
* The twin is point-to-point: ``max_SAE_ID_count`` is 0 and key multicast
  (``additional_slave_SAE_IDs``) is refused; a path naming an SAE that this link
  does not connect is a 400 (ETSI 014 defines no 404 for it).
* ``status_extension`` carries the device's vendor-prefixed (``qkdsdn_``) live
  figures: QBER, measured and model key rate, link state, buffer.

The caller's SAE ID comes from its verified client certificate. Only when the
app is built with ``insecure_dev=True`` (plain HTTP on loopback, development)
is it taken from the ``X-Qkdsdn-Dev-SAE-ID`` request header instead.
"""
from __future__ import annotations

import base64
import json
import logging
import uuid
from typing import Any, Callable

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from qkdsdn.twin.engine import EngineStatus, InsufficientKey, KeyEngine, KeysNotFound, NotKeySlave

log = logging.getLogger(__name__)

ROLES = ("master", "slave")
DEV_SAE_HEADER = "X-Qkdsdn-Dev-SAE-ID"
_DEV_SAE_ENVIRON = "HTTP_" + DEV_SAE_HEADER.upper().replace("-", "_")

# Spec-fixed 400 messages (ETSI GS QKD 014 clause 6).
MSG_SIZE_MULTIPLE_OF_8 = "size shall be a multiple of 8"
MSG_EXTENSION_MANDATORY = "not all extension_mandatory parameters are supported"
MSG_KEYS_NOT_FOUND = "one or more keys specified are not found on KME"

KEY_REQUEST_ITEMS = {"number", "size", "additional_slave_SAE_IDs", "extension_mandatory",
                     "extension_optional"}
KEY_IDS_ITEMS = {"key_IDs", "key_IDs_extension"}
KEY_ID_ITEMS = {"key_ID", "key_ID_extension"}

Identify = Callable[[dict], "str | None"]


def kme_id(link_name: str, role: str) -> str:
    """KME ID of a twin end; equal to the CN of its device certificate."""
    return f"{link_name}-{role}"


class _BadRequest(Exception):
    def __init__(self, message: str, details: list[dict] | None = None):
        super().__init__(message)
        self.message, self.details = message, details


class _Unauthorized(Exception):
    pass


def certificate_identity(environ: dict) -> str | None:
    """SAE ID of the verified client certificate (``qkdsdn.httpserver``), or None.

    A twin KME serves key managers: a certificate that this network's PKI issued to
    another kind of party (an application, the operator...) is no identity here, even
    if its CN happened to equal a node name. Certificates from other issuers count by
    their SAE URI or CN, as with hardware KMEs.
    """
    from qkdsdn import pki
    from qkdsdn.httpserver import peer_certificate

    cert = peer_certificate(environ)
    if cert is None or pki.certificate_kind(cert) not in ("node", None):
        return None
    return pki.sae_id_from_certificate(cert)


def create_kme_app(engine: KeyEngine, role: str, *, insecure_dev: bool = False,
                   identify: Identify | None = None) -> Flask:
    """The ETSI 014 WSGI app of the ``role`` end ("master" or "slave") of ``engine``'s link.

    ``identify(environ)`` returns the caller's SAE ID (default: from the client
    certificate). ``insecure_dev`` additionally honours the development header.
    """
    if role not in ROLES:
        raise ValueError(f"role must be 'master' or 'slave', got {role!r}")
    link, device = engine.link, engine.device
    served = link.master if role == "master" else link.slave
    peer = link.slave if role == "master" else link.master
    own_id, peer_id = kme_id(link.name, role), kme_id(link.name, "slave" if role == "master" else "master")
    direction = f"key delivery on link {link.name} runs from master SAE {link.master} to slave SAE {link.slave}"
    by_cert = identify or certificate_identity

    def caller() -> str | None:
        if insecure_dev:
            dev = request.environ.get(_DEV_SAE_ENVIRON)
            if dev:
                return dev
        return by_cert(request.environ)

    app = Flask(f"qkdsdn-twin-kme-{own_id}")
    app.config["MAX_CONTENT_LENGTH"] = 1 << 20  # a KeyIDs body for max_key_per_request fits easily

    # ------------------------------------------------------------------ helpers

    def authorize() -> str:
        sae = caller()
        if sae is None or sae != served:
            raise _Unauthorized()
        return sae

    def check_peer(path_sae: str, what: str) -> None:
        if path_sae != peer:
            raise _BadRequest(f"{what} '{path_sae}' is not connected to this KME: it serves {served} "
                              f"on link {link.name}, whose other end is {peer}")

    def body_json(required: bool) -> Any:
        raw = request.get_data(cache=False)
        if not raw.strip():
            if required:
                raise _BadRequest("request body is empty: a JSON object is required")
            return {}
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise _BadRequest("request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise _BadRequest("request body must be a JSON object")
        return data

    def as_int(value: Any, name: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, str):
                try:
                    return int(value.strip(), 10)
                except ValueError:
                    pass
            raise _BadRequest(f"{name} must be an integer, got {value!r}"[:200])
        return value

    def key_container(keys) -> dict:
        return {"keys": [{"key_ID": k.key_id, "key": base64.b64encode(k.material).decode("ascii")}
                         for k in keys]}

    def status_extension(st: EngineStatus) -> dict:
        return {
            "qkdsdn_link": link.name,
            "qkdsdn_link_state": st.state,
            "qkdsdn_reason": st.reason,
            "qkdsdn_qber": round(st.qber, 6),
            "qkdsdn_skr_bps": round(st.measured_skr_bps, 3),
            "qkdsdn_model_skr_bps": round(st.model_skr_bps, 3),
            "qkdsdn_buffer_bits": st.buffer_bits,
            "qkdsdn_available_bits": st.available_bits,
            "qkdsdn_pending_keys": st.pending_keys,
            "qkdsdn_eve_fraction": st.eve_fraction,
            "qkdsdn_qber_drift": round(st.qber_drift, 6),
        }

    def issue_keys(number: Any, size: Any, slave_sae: str, master_sae: str) -> dict:
        number = 1 if number is None else as_int(number, "number")
        size = device.key_size_bits if size is None else as_int(size, "size")
        if number < 1:
            raise _BadRequest(f"number must be at least 1, got {number}")
        if number > device.max_keys_per_request:
            raise _BadRequest(f"number {number} exceeds max_key_per_request "
                              f"({device.max_keys_per_request})")
        if size % 8:
            raise _BadRequest(MSG_SIZE_MULTIPLE_OF_8)
        if not device.min_key_size_bits <= size <= device.max_key_size_bits:
            raise _BadRequest(f"size {size} is out of range: keys are {device.min_key_size_bits} to "
                              f"{device.max_key_size_bits} bits (min_key_size, max_key_size)")
        keys = engine.take_keys(number, size, master_sae=master_sae, slave_sae=slave_sae)
        return key_container(keys)

    def json_response(data: Any, status: int = 200) -> Response:
        resp = Response(json.dumps(data, separators=(",", ":")), status=status,
                        mimetype="application/json")
        # Key material must not linger in intermediaries' caches.
        resp.headers["Cache-Control"] = "no-store"
        return resp

    # ------------------------------------------------------------------ errors

    @app.errorhandler(_BadRequest)
    def _bad(exc: _BadRequest):
        body: dict = {"message": exc.message}
        if exc.details:
            body["details"] = exc.details
        return json_response(body, 400)

    @app.errorhandler(_Unauthorized)
    def _unauth(_exc):
        return Response(b"", status=401)

    @app.errorhandler(InsufficientKey)
    def _unavailable(exc: InsufficientKey):
        return json_response({"message": str(exc)}, 503)

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException):
        # Unknown paths and methods: still an Error object, never an HTML page.
        return json_response({"message": f"{exc.code} {exc.name}: {exc.description}"}, exc.code or 500)

    @app.errorhandler(Exception)
    def _internal(exc: Exception):
        # The traceback stays in the log (it never holds key bytes: they live only in
        # Key objects whose repr omits them); the caller gets a plain 500.
        log.exception("twin KME %s: internal error", own_id)
        return json_response({"message": "internal error of the KME"}, 500)

    # ------------------------------------------------------------------ routes

    @app.get("/api/v1/keys/<slave_sae_id>/status")
    def get_status(slave_sae_id: str):
        authorize()
        check_peer(slave_sae_id, "slave_SAE_ID" if role == "master" else "SAE ID")
        st = engine.status()
        key_size = device.key_size_bits
        if role == "master":
            stored = st.available_bits // key_size
        else:
            # What the slave SAE can take: the keys waiting for it.
            stored = engine.pending_count(served)
        return json_response({
            "source_KME_ID": own_id,
            "target_KME_ID": peer_id,
            "master_SAE_ID": link.master,
            "slave_SAE_ID": link.slave,
            "key_size": key_size,
            "stored_key_count": stored,
            "max_key_count": st.buffer_bits // key_size,
            "max_key_per_request": device.max_keys_per_request,
            "max_key_size": device.max_key_size_bits,
            "min_key_size": device.min_key_size_bits,
            "max_SAE_ID_count": 0,
            "status_extension": status_extension(st),
        })

    def enc_keys_allowed(slave_sae_id: str) -> None:
        if role != "master":
            # This SAE is the link's slave: it receives keys through dec_keys only.
            raise _BadRequest(f"enc_keys is not available at this KME: {direction}; the slave SAE "
                              "fetches its keys with dec_keys")
        check_peer(slave_sae_id, "slave_SAE_ID")

    @app.get("/api/v1/keys/<slave_sae_id>/enc_keys")
    def get_enc_keys(slave_sae_id: str):
        caller_sae = authorize()
        enc_keys_allowed(slave_sae_id)
        extra = sorted(set(request.args) - {"number", "size"})
        if extra:
            raise _BadRequest(f"enc_keys by GET takes only 'number' and 'size' (got {', '.join(extra)}); "
                              "use POST with a Key request for other items")
        for name in ("number", "size"):
            if len(request.args.getlist(name)) > 1:
                raise _BadRequest(f"'{name}' given more than once")
        return json_response(issue_keys(request.args.get("number"), request.args.get("size"),
                                        slave_sae_id, caller_sae))

    @app.post("/api/v1/keys/<slave_sae_id>/enc_keys")
    def post_enc_keys(slave_sae_id: str):
        caller_sae = authorize()
        enc_keys_allowed(slave_sae_id)
        req = body_json(required=False)
        unknown = sorted(set(req) - KEY_REQUEST_ITEMS)
        if unknown:
            raise _BadRequest(f"unknown item(s) in Key request: {', '.join(unknown)}")
        for name in ("number", "size"):
            if name in req and (isinstance(req[name], bool) or not isinstance(req[name], int)):
                raise _BadRequest(f"{name} must be an integer, got {req[name]!r}"[:200])
        extra_slaves = req.get("additional_slave_SAE_IDs")
        if extra_slaves is not None:
            if not isinstance(extra_slaves, list) or not all(isinstance(s, str) for s in extra_slaves):
                raise _BadRequest("additional_slave_SAE_IDs must be an array of SAE IDs")
            if extra_slaves:
                raise _BadRequest("additional_slave_SAE_IDs is not supported: this KME serves one "
                                  "point-to-point link and does not multicast keys (max_SAE_ID_count is 0)")
        for name in ("extension_mandatory", "extension_optional"):
            ext = req.get(name)
            if ext is not None and (not isinstance(ext, list) or not all(isinstance(e, dict) for e in ext)):
                raise _BadRequest(f"{name} must be an array of objects")
        mandatory = req.get("extension_mandatory") or []
        if mandatory:
            # The twin defines no extension, so every mandatory one is unsupported.
            names = [n for e in mandatory for n in e] or ["(empty extension object)"]
            raise _BadRequest(MSG_EXTENSION_MANDATORY,
                              [{"extension_mandatory_unsupported": f"{n} is not supported"} for n in names])
        # extension_optional: the KME may ignore it (clause 6.2), and does.
        return json_response(issue_keys(req.get("number"), req.get("size"), slave_sae_id, caller_sae))

    def deliver(master_sae_id: str, key_ids: list[str], caller_sae: str) -> Response:
        if role != "slave":
            # Keys on this link only ever go master -> slave, so none can be found here.
            raise _BadRequest(MSG_KEYS_NOT_FOUND, [{"qkdsdn_reason": f"{direction}; dec_keys is served "
                                                    "by the slave end's KME"}])
        check_peer(master_sae_id, "master_SAE_ID")
        if len(key_ids) > device.max_keys_per_request:
            raise _BadRequest(f"{len(key_ids)} key IDs exceed max_key_per_request "
                              f"({device.max_keys_per_request})")
        for kid in key_ids:
            try:
                ok = str(uuid.UUID(kid)) == kid.lower()
            except ValueError:
                ok = False
            if not ok:
                raise _BadRequest(f"key_ID {kid!r} is not a UUID"[:200])
        ids = [k.lower() for k in key_ids]
        if len(set(ids)) != len(ids):
            raise _BadRequest("the same key_ID is requested more than once")
        try:
            keys = engine.fetch_keys(ids, caller_sae=caller_sae, master_sae=master_sae_id)
        except KeysNotFound as exc:
            raise _BadRequest(MSG_KEYS_NOT_FOUND, [{"qkdsdn_missing_key_IDs": exc.missing}]) from None
        except NotKeySlave:
            raise _Unauthorized() from None
        return json_response(key_container(keys))

    @app.get("/api/v1/keys/<master_sae_id>/dec_keys")
    def get_dec_keys(master_sae_id: str):
        caller_sae = authorize()
        extra = sorted(set(request.args) - {"key_ID"})
        if extra:
            raise _BadRequest(f"dec_keys by GET takes only 'key_ID' (got {', '.join(extra)}); "
                              "use POST with Key IDs for other items")
        ids = request.args.getlist("key_ID")
        if len(ids) != 1:
            raise _BadRequest("dec_keys by GET takes exactly one key_ID; use POST with Key IDs for more")
        return deliver(master_sae_id, ids, caller_sae)

    @app.post("/api/v1/keys/<master_sae_id>/dec_keys")
    def post_dec_keys(master_sae_id: str):
        caller_sae = authorize()
        req = body_json(required=True)
        unknown = sorted(set(req) - KEY_IDS_ITEMS)
        if unknown:
            raise _BadRequest(f"unknown item(s) in Key IDs: {', '.join(unknown)}")
        items = req.get("key_IDs")
        if not isinstance(items, list) or not items:
            raise _BadRequest("key_IDs must be a non-empty array of {\"key_ID\": UUID} objects")
        ids = []
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("key_ID"), str):
                raise _BadRequest("every key_IDs item must be an object with a string key_ID")
            unknown = sorted(set(item) - KEY_ID_ITEMS)
            if unknown:
                raise _BadRequest(f"unknown item(s) in key_IDs entry: {', '.join(unknown)}")
            ids.append(item["key_ID"])
        return deliver(master_sae_id, ids, caller_sae)

    return app
