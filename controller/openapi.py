"""The OpenAPI 3.1 document of the operator REST API (``controller.rest``), served at /openapi.json.

Built in Python from the same constants the API checks its input with (name rule, ranges,
enumerations, error codes), so that the document and the server cannot drift apart; the tests
validate every real response of the API against it.
"""
from __future__ import annotations

import copy
import functools
from typing import Any

from db import models as m
from db import netfile
from controller import rest

JSON = "application/json"
_NAME = {"type": "string", "pattern": netfile.NAME_RE.pattern,
         "description": "letters, digits, '_', '.', ':', '-'; at most 64 characters; starts with a letter or digit"}
_NO_CONTROL = "^[^\\x00-\\x1f\\x7f]*$"
_UUID = {"type": "string", "pattern": "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"}
_FINGERPRINT_IN = {"type": "string", "pattern": "^\\s*:*(?:[0-9A-Fa-f]:*){64}\\s*$",
                   "description": "SHA-256 of the DER certificate: 64 hex digits, ':' separators allowed"}
_FINGERPRINT = {"type": "string", "pattern": "^[0-9a-f]{64}$", "description": "lower-case hex SHA-256"}
_TIME = {"type": "string", "format": "date-time"}
_PRIORITY = {"type": "integer", "minimum": 0, "maximum": rest.UINT32_MAX, "description": "uint32"}
_POSITIVE_UINT32 = {"type": "integer", "minimum": 1, "maximum": rest.UINT32_MAX, "description": "positive uint32"}
_POSITIVE_INT32 = {"type": "integer", "minimum": 1, "maximum": rest.INT32_MAX}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in schema or "anyOf" in schema:
        return {"anyOf": [schema, {"type": "null"}]}
    out = dict(schema)
    kind = out.get("type")
    out["type"] = [kind, "null"] if isinstance(kind, str) else list(kind) + ["null"]
    if "enum" in out:
        out["enum"] = list(out["enum"]) + [None]
    return out


def _obj(properties: dict[str, Any], required: list[str] | None = None, *, all_required: bool = True,
         description: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": properties}
    req = list(properties) if all_required and required is None else (required or [])
    if req:
        out["required"] = req
    if description:
        out["description"] = description
    return out


def _array(items: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "items": items}


def _list_of(name: str) -> dict[str, Any]:
    return _obj({"items": _array(_ref(name))})


def _page_of(name: str) -> dict[str, Any]:
    return _obj({"items": _array(_ref(name)),
                 "next_cursor": {"type": ["string", "null"],
                                 "description": "give it as 'cursor' for the next page; null on the last page"}})


def _schemas() -> dict[str, Any]:
    str_or_null = {"type": ["string", "null"]}
    num_or_null = {"type": ["number", "null"]}
    int_or_null = {"type": ["integer", "null"]}
    sample = _obj({
        "ts": _TIME, "skr_bps": num_or_null, "eskr_bps": num_or_null,
        "qber": {"type": ["number", "null"], "minimum": 0},
        "pool_bits_src": int_or_null, "pool_bits_dst": int_or_null, "reserved_bps": num_or_null,
    }, description="one monitoring sample of a link")
    link_props: dict[str, Any] = {
        "name": {"type": "string"}, "qkdl_id": _UUID,
        "kind": {"type": "string", "enum": list(rest.LINK_KINDS)},
        "src_node": {"type": "string"}, "dst_node": {"type": "string"},
        "src_interface": int_or_null, "dst_interface": int_or_null,
        "length_km": num_or_null, "attenuation_db_km": num_or_null, "channel_att_db": num_or_null,
        "wavelength_nm": int_or_null,
        "status": {"type": "string", "enum": [s.value for s in m.LinkStatus]},
        "enabled": {"type": "boolean"},
        "skr_bps": {**num_or_null, "description": "monitored secret key rate (bits/s)"},
        "eskr_bps": {**num_or_null, "description": "expected secret key rate (bits/s)"},
        "qber": num_or_null,
        "reserved_bps": {"type": "number", "minimum": 0, "description": "bandwidth reserved by sessions"},
        "session_count": {"type": "integer", "minimum": 0},
        "sessions": {**_array({"type": "string"}), "description": "KSIDs of the live sessions over the link"},
        "device": {"type": ["object", "null"],
                   "description": "emulated device parameters or real KME endpoints (paths only, never keys)"},
        "ksid": {**str_or_null, "description": "VIRT links: the session the path serves"},
        "path": {"type": ["array", "null"], "description": "VIRT links: the hops"},
        "bandwidth_bps": num_or_null,
        "updated_at": _TIME,
        "last_sample": _nullable(_ref("LinkSample")),
    }
    link_detail_props = {**link_props, "recent_samples": {
        **_array(_ref("LinkSample")), "description": "the newest samples, newest first"}}
    sla_props = {
        "max_priority": _PRIORITY, "max_bps": _POSITIVE_UINT32, "max_sessions": _POSITIVE_INT32,
        "bucket_bits": _POSITIVE_UINT32,
        "allowed_destinations": {**_nullable(_array(_NAME)), "uniqueItems": True,
                                 "description": "node names the user may reach; null: every node"},
    }
    token = {"type": ["string", "null"], "minLength": rest.TOKEN_MIN_LENGTH, "maxLength": rest.TOKEN_MAX_LENGTH,
             "pattern": _NO_CONTROL, "writeOnly": True,
             "description": "write-only: the clear token, stored only as a salted PBKDF2 hash; "
                            "null removes the token; absent leaves it unchanged"}
    event = _obj({
        "id": {"type": "integer"}, "ts": _TIME, "element": {"type": "string"}, "node": str_or_null,
        "ksid": str_or_null, "kind": {"type": "string"}, "details": {"type": ["object", "null"]},
    }, description="one event of a control-plane element or key manager (never key material)")
    session_props: dict[str, Any] = {
        "ksid": {"type": "string"}, "interface": {"type": "string", "description": "'004' or '014'"},
        "state": {"type": "string", "enum": list(rest.SESSION_STATES)},
        "src_sae_id": {"type": "string"}, "dst_sae_id": {"type": "string"},
        "src_node": {"type": "string"}, "dst_node": {"type": "string"}, "user": str_or_null,
        "qos": {"type": "object", "description": "ETSI GS QKD 004 QoS (as granted)"},
        "priority": {"type": "integer"},
        "route": {**_nullable(_array({"type": "string"})), "description": "node names, source to destination"},
        "links": {**_nullable(_array(str_or_null)),
                  "description": "the physical link of each hop (null where two route nodes share none)"},
        "reservations": {"type": ["object", "null"], "additionalProperties": {"type": "number"},
                         "description": "link name -> reserved bits/s"},
        "rate_bps": num_or_null, "inactivity_timeout_s": num_or_null,
        "created_at": _TIME, "updated_at": _TIME, "last_activity": _nullable(_TIME),
        "expires_at": _nullable(_TIME), "terminated_at": _nullable(_TIME), "reason": str_or_null,
    }
    return {
        "Error": _obj({"error": _obj({
            "code": {"type": "string", "enum": list(rest.ERROR_CODES)},
            "message": {"type": "string"},
            "details": {"type": "object", "description": "validation_failed: {problems: [Problem]}; "
                                                         "invalid_parameter: {parameter}; others vary"},
        }, required=["code", "message"])}),
        "Problem": _obj({"field": {"type": "string", "description": "path of the field, e.g. sla.max_bps"},
                         "message": {"type": "string"}}),
        "Interface": _obj({
            "qkdi_id": {"type": "integer"}, "model": str_or_null, "qkd_type": {"type": "string"},
            "att_device": str_or_null, "att_port": str_or_null, "role": str_or_null,
            "wavelength_nm": int_or_null, "status": {"type": "string"}, "link": str_or_null,
        }, description="a node's QKD interface (ETSI GS QKD 015 qkd_interface)"),
        "Node": _obj({
            "name": {"type": "string"}, "qkdn_id": _UUID, "location": str_or_null,
            "km_address": {"type": "string", "description": "HOST:PORT of the node's key manager"},
            "status": {"type": "string", "enum": [s.value for s in m.NodeStatus]},
            "version": str_or_null, "last_seen": _nullable(_TIME),
            "interfaces": _array(_ref("Interface")),
            "links": _array({"type": "string"}),
            "applications": _array({"type": "string"}),
        }),
        "NodeList": _list_of("Node"),
        "LinkSample": sample,
        "Link": _obj(link_props, description="a QKD link with its live metrics"),
        "LinkDetail": _obj(link_detail_props, description="a QKD link, its live metrics and recent samples"),
        "LinkList": _list_of("Link"),
        "SamplePage": _page_of("LinkSample"),
        "SLA": _obj(sla_props, description="a user's service-level agreement"),
        "SLAInput": _obj(sla_props, required=["max_priority", "max_bps", "max_sessions", "bucket_bits"]),
        "SLAPatch": _obj(sla_props, required=[]),
        "User": _obj({
            "name": {"type": "string"}, "revoked": {"type": "boolean"}, "created_at": _TIME,
            "sla": _nullable(_ref("SLA")),
            "has_token": {"type": "boolean", "description": "a token is registered (it is never returned)"},
            "applications": _array({"type": "string"}),
        }),
        "UserList": _list_of("User"),
        "UserCreate": _obj({"name": _NAME, "sla": _ref("SLAInput"), "revoked": {"type": "boolean"},
                            "token": token}, required=["name", "sla"]),
        "UserReplace": _obj({"name": {**_NAME, "description": "optional; must equal the name in the path"},
                             "sla": _ref("SLAInput"), "revoked": {"type": "boolean"}, "token": token},
                            required=["sla"]),
        "UserPatch": _obj({"sla": _ref("SLAPatch"), "revoked": {"type": "boolean"}, "token": token},
                          required=[]),
        "Certificate": _obj({"fingerprint": _FINGERPRINT, "revoked": {"type": "boolean"}, "created_at": _TIME}),
        "Application": _obj({
            "sae_id": {"type": "string"}, "app_id": _UUID, "node": {"type": "string"}, "user": {"type": "string"},
            "priority": {"type": "integer"}, "certificates": _array(_ref("Certificate")),
            "has_token": {"type": "boolean"},
        }, description="an application (SAE) at its home node"),
        "ApplicationList": _list_of("Application"),
        "ApplicationCreate": _obj({
            "sae_id": _NAME, "node": _NAME, "user": _NAME, "priority": _PRIORITY,
            "app_id": {**_nullable(_UUID), "description": "default: derived from the network and the SAE ID"},
            "cert_sha256": _nullable(_FINGERPRINT_IN),
        }, required=["sae_id", "node", "user"]),
        "CertificateCreate": _obj({"fingerprint": _FINGERPRINT_IN}),
        "Session": _obj(session_props),
        "SessionDetail": _obj({**session_props, "recent_events": {
            **_array(_ref("Event")),
            "description": f"the session's newest {rest.RECENT_EVENTS} events, newest first"}}),
        "SessionPage": _page_of("Session"),
        "TerminateAccepted": _obj({"ksid": {"type": "string"}, "status": {"type": "string", "enum": ["terminating"]},
                                   "message": {"type": "string"}}),
        "Route": _obj({
            "ksid": {"type": "string"}, "state": {"type": "string", "enum": ["accepted", "active"]},
            "user": str_or_null, "src_node": {"type": "string"}, "dst_node": {"type": "string"},
            "src_sae_id": {"type": "string"}, "dst_sae_id": {"type": "string"},
            "route": {**_array({"type": "string"}), "minItems": 1},
            "links": _array(str_or_null), "hops": {"type": "integer", "minimum": 0,
                                                  "description": "trusted (intermediate) nodes"},
            "rate_bps": num_or_null,
            "reservations": {"type": ["object", "null"], "additionalProperties": {"type": "number"}},
        }),
        "RouteList": _list_of("Route"),
        "Event": event,
        "EventPage": _page_of("Event"),
        "Health": _obj({
            "status": {"type": "string", "enum": ["ok", "degraded", "down"]},
            "version": {"type": "string"},
            "checks": {"type": "object", "additionalProperties": {
                "type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}}},
        }),
    }


_ERRORS = {
    400: ("BadRequest", "malformed JSON, a bad field (validation_failed, with every problem) or a bad query "
                        "parameter (invalid_parameter)"),
    401: ("Unauthorized", "no credentials, or an invalid bearer token"),
    403: ("Forbidden", "the credentials lack the role this request needs"),
    404: ("NotFound", "no such resource"),
    409: ("Conflict", "the request conflicts with the current state (duplicate, still in use, already ended)"),
    413: ("PayloadTooLarge", f"the body exceeds {rest.MAX_BODY_BYTES} bytes"),
    415: ("UnsupportedMediaType", "the body is not application/json"),
    503: ("Unavailable", "a component the request needs (database, admission control, monitoring) is "
                         "missing or down; nothing was changed"),
}


def _responses() -> dict[str, Any]:
    out = {}
    for status, (name, description) in _ERRORS.items():
        response: dict[str, Any] = {"description": description,
                                    "content": {JSON: {"schema": _ref("Error")}}}
        if status in (401, 403):
            response["headers"] = {"WWW-Authenticate": {
                "description": "Bearer challenge (RFC 6750)", "schema": {"type": "string"}}}
        out[name] = response
    return out


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(s): {"$ref": f"#/components/responses/{_ERRORS[s][0]}"} for s in statuses}


def _ok(status: int, schema: str, description: str) -> dict[str, Any]:
    return {str(status): {"description": description, "content": {JSON: {"schema": _ref(schema)}}}}


def _body(schema: str, *, patch: bool = False) -> dict[str, Any]:
    content = {JSON: {"schema": _ref(schema)}}
    if patch:
        content["application/merge-patch+json"] = {"schema": _ref(schema)}
    return {"required": True, "content": content}


def _param(name: str, where: str, schema: dict[str, Any], description: str, required: bool = False
           ) -> dict[str, Any]:
    return {"name": name, "in": where, "required": required or where == "path", "schema": schema,
            "description": description}


def _pref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/parameters/{name}"}


def _parameters() -> dict[str, Any]:
    return {
        "limit": _param("limit", "query", {"type": "integer", "minimum": 1, "maximum": rest.MAX_LIMIT,
                                           "default": rest.DEFAULT_LIMIT}, "page size"),
        "cursor": _param("cursor", "query", {"type": "string"}, "next_cursor of the previous page"),
        "order": _param("order", "query", {"type": "string", "enum": ["asc", "desc"], "default": "asc"},
                        "oldest first (asc) or newest first (desc); keep it while paging"),
        "since": _param("since", "query", {"type": "string"},
                        "ISO 8601 time, inclusive (e.g. 2025-01-31T12:00:00Z; without an offset: UTC)"),
        "until": _param("until", "query", {"type": "string"}, "ISO 8601 time, exclusive; not before 'since'"),
        "nodeName": _param("name", "path", {"type": "string"}, "node name"),
        "linkName": _param("name", "path", {"type": "string"}, "link name"),
        "userName": _param("name", "path", {"type": "string"}, "user name"),
        "saeId": _param("sae_id", "path", {"type": "string"}, "SAE ID of the application"),
        "ksid": _param("ksid", "path", {"type": "string"}, "key stream ID of the session"),
        "fingerprint": _param("fingerprint", "path", {"type": "string"}, "SHA-256 fingerprint (hex)"),
    }


def _op(op_id: str, tag: str, summary: str, responses: dict[str, Any], *, description: str = "",
        parameters: list | None = None, body: dict | None = None, public: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"operationId": op_id, "tags": [tag], "summary": summary}
    if description:
        out["description"] = description
    if parameters:
        out["parameters"] = parameters
    if body is not None:
        out["requestBody"] = body
    out["responses"] = responses
    if public:
        out["security"] = []
    return out


_READ = "Role: read."
_ADMIN = "Role: admin."


def _paths() -> dict[str, Any]:
    p = rest.API_PREFIX
    page = [_pref("limit"), _pref("cursor"), _pref("order")]
    read_errors = (400, 401, 403, 503)
    one_errors = (400, 401, 403, 404, 503)
    write_errors = (400, 401, 403, 404, 409, 413, 415, 503)
    name_q = {"type": "string", "pattern": netfile.NAME_RE.pattern}
    return {
        f"{p}/health": {"get": _op(
            "getHealth", "service", "Liveness and readiness",
            {**_ok(200, "Health", "every component is ok"),
             "400": _errors(400)["400"],
             "503": {"description": "a component is degraded or down (body says which)",
                     "content": {JSON: {"schema": _ref("Health")}}}},
            description="No authentication. 'checks' holds the database check and the controller's components.",
            public=True)},
        "/metrics": {"get": _op(
            "getMetrics", "service", "Prometheus metrics of the monitoring element",
            {"200": {"description": "Prometheus text exposition format 0.0.4",
                     "content": {"text/plain": {"schema": {"type": "string"}}}},
             **_errors(*read_errors)}, description=_READ)},
        "/openapi.json": {"get": _op(
            "getOpenApi", "service", "This document",
            {"200": {"description": "the OpenAPI document", "content": {JSON: {"schema": {"type": "object"}}}},
             **_errors(400)}, description="No authentication.", public=True)},
        f"{p}/nodes": {"get": _op("listNodes", "topology", "All nodes",
                                  {**_ok(200, "NodeList", "the nodes, by name"), **_errors(*read_errors)},
                                  description=_READ)},
        f"{p}/nodes/{{name}}": {"get": _op("getNode", "topology", "One node",
                                           {**_ok(200, "Node", "the node"), **_errors(*one_errors)},
                                           description=_READ, parameters=[_pref("nodeName")])},
        f"{p}/links": {"get": _op(
            "listLinks", "topology", "All links with live metrics",
            {**_ok(200, "LinkList", "the links, by name"), **_errors(*read_errors)}, description=_READ,
            parameters=[_param("kind", "query", {"type": "string", "enum": list(rest.LINK_KINDS)},
                               "only links of this kind")])},
        f"{p}/links/{{name}}": {"get": _op(
            "getLink", "topology", "One link with live metrics and its recent samples",
            {**_ok(200, "LinkDetail", "the link"), **_errors(*one_errors)}, description=_READ,
            parameters=[_pref("linkName")])},
        f"{p}/links/{{name}}/samples": {"get": _op(
            "listLinkSamples", "topology", "A link's metric samples",
            {**_ok(200, "SamplePage", "one page of samples in (ts, id) order"), **_errors(*one_errors)},
            description=_READ, parameters=[_pref("linkName"), _pref("since"), _pref("until"), *page])},
        f"{p}/users": {
            "get": _op("listUsers", "users", "All users and their SLAs",
                       {**_ok(200, "UserList", "the users, by name"), **_errors(*read_errors)}, description=_READ),
            "post": _op("createUser", "users", "Create a user with an SLA",
                        {**_ok(201, "User", "created; Location names it"),
                         **_errors(400, 401, 403, 409, 413, 415, 503)},
                        description=_ADMIN + " Priorities are uint32 (0 to 2^32-1), max_bps and bucket_bits "
                                             "positive uint32 (1 to 2^32-1), max_sessions 1 to 2^31-1; allowed "
                                             "destinations must be known nodes. A clear token is hashed and "
                                             "never returned.",
                        body=_body("UserCreate")),
        },
        f"{p}/users/{{name}}": {
            "parameters": [_pref("userName")],
            "get": _op("getUser", "users", "One user", {**_ok(200, "User", "the user"), **_errors(*one_errors)},
                       description=_READ),
            "put": _op("replaceUser", "users", "Replace a user's SLA and state",
                       {**_ok(200, "User", "the user as stored"), **_errors(*write_errors)},
                       description=_ADMIN + " Users cannot be renamed. 'token' absent keeps the stored token.",
                       body=_body("UserReplace")),
            "patch": _op("updateUser", "users", "Change some of a user's fields",
                         {**_ok(200, "User", "the user as stored"), **_errors(*write_errors)},
                         description=_ADMIN + " Only the given fields change (SLA fields one by one).",
                         body=_body("UserPatch", patch=True)),
            "delete": _op("deleteUser", "users", "Delete a user",
                          {"204": {"description": "deleted"}, **_errors(400, 401, 403, 404, 409, 503)},
                          description=_ADMIN + " Refused (409) while the user owns applications or live sessions."),
        },
        f"{p}/applications": {
            "get": _op("listApplications", "applications", "Applications (SAEs)",
                       {**_ok(200, "ApplicationList", "the applications, by SAE ID"), **_errors(*read_errors)},
                       description=_READ, parameters=[
                           _param("node", "query", name_q, "only applications homed at this node"),
                           _param("user", "query", name_q, "only applications of this user")]),
            "post": _op("createApplication", "applications", "Register an application",
                        {**_ok(201, "Application", "created; Location names it"),
                         **_errors(400, 401, 403, 409, 413, 415, 503)},
                        description=_ADMIN + " Node and user must exist; priority is uint32 (0 to 2^32-1, "
                                             "default 0).", body=_body("ApplicationCreate")),
        },
        f"{p}/applications/{{sae_id}}": {
            "parameters": [_pref("saeId")],
            "get": _op("getApplication", "applications", "One application",
                       {**_ok(200, "Application", "the application"), **_errors(*one_errors)}, description=_READ),
            "delete": _op("deleteApplication", "applications", "Delete an application and its credentials",
                          {"204": {"description": "deleted"}, **_errors(400, 401, 403, 404, 409, 503)},
                          description=_ADMIN + " Refused (409) while the application has live sessions."),
        },
        f"{p}/applications/{{sae_id}}/certificates": {
            "parameters": [_pref("saeId")],
            "post": _op("addCertificate", "applications", "Register a client-certificate fingerprint",
                        {**_ok(201, "Application", "the application with the new certificate"),
                         **_errors(*write_errors)},
                        description=_ADMIN + " A fingerprint belongs to one owner (409 otherwise).",
                        body=_body("CertificateCreate")),
        },
        f"{p}/applications/{{sae_id}}/certificates/{{fingerprint}}": {
            "parameters": [_pref("saeId"), _pref("fingerprint")],
            "delete": _op("removeCertificate", "applications", "Remove a certificate fingerprint",
                          {"204": {"description": "removed"}, **_errors(400, 401, 403, 404, 503)},
                          description=_ADMIN),
        },
        f"{p}/sessions": {"get": _op(
            "listSessions", "sessions", "Key sessions",
            {**_ok(200, "SessionPage", "one page of sessions in id order"), **_errors(*read_errors)},
            description=_READ, parameters=[
                _param("state", "query", {"type": "string", "enum": [*rest.SESSION_STATES, "live"]},
                       "only sessions in this state ('live': not terminated)"),
                _param("user", "query", name_q, "only this user's sessions"),
                _param("node", "query", name_q, "only sessions with this node as an endpoint or on the route"),
                *page])},
        f"{p}/sessions/{{ksid}}": {
            "parameters": [_pref("ksid")],
            "get": _op("getSession", "sessions", "Inspect one session",
                       {**_ok(200, "SessionDetail", "the session and its newest events"), **_errors(*one_errors)},
                       description=_READ),
            "delete": _op("terminateSession", "sessions", "Terminate a live session",
                          {**_ok(202, "TerminateAccepted", "admission control is terminating the session"),
                           **_errors(400, 401, 403, 404, 409, 503)},
                          description=_ADMIN + " Goes through admission control, which deletes the session on "
                                               "every key manager of its route and releases its reservations. "
                                               "409: already terminated. 503: admission control is not "
                                               "running or did not answer."),
        },
        f"{p}/routes": {"get": _op(
            "listRoutes", "sessions", "The route of every live session",
            {**_ok(200, "RouteList", "routes of accepted and active sessions"), **_errors(*read_errors)},
            description=_READ)},
        f"{p}/events": {"get": _op(
            "listEvents", "events", "The event stream",
            {**_ok(200, "EventPage", "one page of events in (ts, id) order"), **_errors(*read_errors)},
            description=_READ, parameters=[
                _param("node", "query", {"type": "string", "maxLength": 64}, "only events of this node"),
                _param("ksid", "query", {"type": "string", "maxLength": 36}, "only events of this session"),
                _param("kind", "query", {"type": "string", "maxLength": 64}, "only events of this kind"),
                _param("element", "query", {"type": "string", "maxLength": 32},
                       "only events of this element (e.g. admission_control, key_manager, rest_api)"),
                _pref("since"), _pref("until"), *page])},
    }


@functools.lru_cache(maxsize=1)
def _document() -> dict[str, Any]:
    from qkdsdn import __version__

    return {
        "openapi": "3.1.0",
        "info": {
            "title": "qkdsdn controller operator API",
            "version": __version__,
            "description": (
                "Operator REST API of the qkdsdn control plane: topology and live link metrics, users and "
                "SLAs, applications, key sessions and their routes, the event stream. Authenticate with "
                "'Authorization: Bearer <token>' (roles read and admin) or an operator client certificate "
                "(admin). Every client error is a 4xx with the Error body. Lists of sessions, events and "
                "samples are paged: pass next_cursor back as 'cursor' until it is null."),
        },
        "servers": [{"url": "/"}],
        "tags": [{"name": n} for n in ("service", "topology", "users", "applications", "sessions", "events")],
        "security": [{"bearerAuth": []}, {"operatorCertificate": []}],
        "paths": _paths(),
        "components": {
            "schemas": _schemas(),
            "responses": _responses(),
            "parameters": _parameters(),
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer",
                               "description": "an API token; the controller stores only its salted hash"},
                "operatorCertificate": {"type": "mutualTLS",
                                        "description": "a client certificate of kind operator or controller "
                                                       "issued by the network's CA ('qkdsdn pki init')"},
            },
        },
    }


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document (a fresh copy: callers may change it)."""
    return copy.deepcopy(_document())
