"""The controller's operator REST API (Flask), described by an OpenAPI document.

``create_rest_app(backend, auth)`` returns a Flask app serving, under ``/api/v1``:

==========================================  ==================  =====  ===========================================
path                                        methods             role   what
==========================================  ==================  =====  ===========================================
/health                                     GET                 none   liveness and readiness (503 when not ok)
/nodes, /nodes/{name}                       GET                 read   topology nodes, their interfaces and links
/links, /links/{name}                       GET                 read   links with live metrics and last samples
/links/{name}/samples                       GET                 read   a link's metric samples (time range, pages)
/users                                      GET, POST           read   users and their SLAs (POST: admin)
/users/{name}                               GET, PUT, PATCH,    read   one user (writes: admin)
                                            DELETE
/applications                               GET, POST           read   applications (SAEs) (POST: admin)
/applications/{sae_id}                      GET, DELETE         read   one application (DELETE: admin)
/applications/{sae_id}/certificates         POST                admin  register a client-certificate fingerprint
/applications/{sae_id}/certificates/{fp}    DELETE              admin  remove one
/sessions, /sessions/{ksid}                 GET, DELETE         read   key sessions (DELETE = terminate: admin)
/routes                                     GET                 read   the route of every live session
/events                                     GET                 read   the event stream (filters, pages)
==========================================  ==================  =====  ===========================================

plus ``/metrics`` (Prometheus text, role read) and ``/openapi.json`` (no authentication).

The layer is thin (Faucet style): each view authenticates, parses and checks its input,
calls one method of a ``RestBackend`` and turns the answer into JSON. It never imports
os_ken; the controller's os-ken shell serves the app on ``qkdsdn.httpserver.HTTPServer`` and
hands ``DbRestBackend`` the callables that need the running apps (``terminate`` through the
admission app's ``send_request``, ``metrics`` from the monitoring element, ``health``).

Every client error is a 4xx with the body ``{"error": {"code", "message", "details"?}}``;
503 means a component the request needs is missing or down (never the client's fault).

Authentication (``TokenAuth``): ``Authorization: Bearer <token>`` with tokens configured as
salted hashes (``qkdsdn.pki.hash_token``), each with the role ``read`` or ``admin``; or a
verified client certificate whose kind (``qkdsdn.pki.certificate_kind``) is ``operator`` or
``controller`` (role ``admin``). ``admin`` may do everything ``read`` may.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import hashlib
import json
import logging
import math
import re
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence

from flask import Flask, Response, g, request
from sqlalchemy import and_, cast, func, or_, select, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session as DbSession
from sqlalchemy.orm import selectinload, sessionmaker
from sqlalchemy.types import Text
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from controller.access import normalize_fingerprint
from db import models as m
from db import netfile
from qkdsdn import pki
from qkdsdn.httpserver import PEER_CERT_KEY

log = logging.getLogger("qkdsdn.rest")

API_PREFIX = "/api/v1"
ELEMENT = "rest_api"
READ = "read"
ADMIN = "admin"
ROLES = (READ, ADMIN)
_ROLE_RANK = {READ: 1, ADMIN: 2}

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
MAX_BODY_BYTES = 1 << 20
RECENT_SAMPLES = 10
RECENT_EVENTS = 50
# Bounds of the integer columns the API writes (db/models.py): ETSI uint32 values (priorities,
# rates, bucket sizes) sit in BIGINT columns and take the whole uint32 range; a plain INTEGER
# column (int32 on PostgreSQL: SLA max_sessions) stops at 2^31 - 1.
UINT32_MAX = netfile.UINT32_MAX
INT32_MAX = netfile.INT32_MAX
TOKEN_MIN_LENGTH = 16
TOKEN_MAX_LENGTH = 1024
SESSION_STATES = tuple(s.value for s in m.SessionState)
LIVE_STATES = (m.SessionState.PENDING, m.SessionState.ACCEPTED, m.SessionState.ACTIVE)
ROUTED_STATES = (m.SessionState.ACCEPTED, m.SessionState.ACTIVE)
LINK_KINDS = tuple(k.value for k in m.LinkKind)
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# error codes (the "code" of the error body)
ERROR_CODES = ("bad_request", "invalid_json", "validation_failed", "invalid_parameter", "unauthorized",
               "forbidden", "not_found", "method_not_allowed", "conflict", "payload_too_large",
               "unsupported_media_type", "unavailable", "internal_error")


# =========================================================================== errors


class ApiError(Exception):
    """An error the API answers with ``{"error": {"code", "message", "details"?}}``."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, details: Mapping[str, Any] | None = None, status: int | None = None,
                 code: str | None = None, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.details = dict(details) if details is not None else None
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details is not None:
            err["details"] = self.details
        return {"error": err}


class BadRequest(ApiError):
    status, code = 400, "bad_request"


class InvalidParameter(ApiError):
    status, code = 400, "invalid_parameter"

    def __init__(self, parameter: str, message: str):
        super().__init__(f"query parameter '{parameter}': {message}", details={"parameter": parameter})


class ValidationFailed(ApiError):
    """A request body with one or more bad fields; ``details.problems`` lists every one."""

    status, code = 400, "validation_failed"

    def __init__(self, problems: Sequence[Mapping[str, str]]):
        problems = [dict(p) for p in problems]
        first = problems[0] if problems else {"field": "", "message": "invalid"}
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        where = f"{first['field']}: " if first.get("field") else ""
        super().__init__(f"invalid request body: {where}{first['message']}{more}", details={"problems": problems})


class Unauthorized(ApiError):
    status, code = 401, "unauthorized"


class Forbidden(ApiError):
    status, code = 403, "forbidden"


class NotFound(ApiError):
    status, code = 404, "not_found"


class Conflict(ApiError):
    status, code = 409, "conflict"


class Unavailable(ApiError):
    status, code = 503, "unavailable"


# =========================================================================== input types


class _Keep:
    """The write-only ``token`` field was not given: leave the stored token as it is."""

    _instance: "_Keep | None" = None

    def __new__(cls) -> "_Keep":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "KEEP"


KEEP: Any = _Keep()


@dataclass(frozen=True)
class SLASpec:
    max_priority: int
    max_bps: int
    max_sessions: int
    bucket_bits: int
    # Node names; None: every destination.
    allowed_destinations: tuple[str, ...] | None = None


@dataclass(frozen=True)
class UserSpec:
    """A whole user (POST, PUT). ``token``: KEEP (unchanged), None (remove) or the clear token to hash."""

    name: str
    sla: SLASpec
    revoked: bool = False
    token: Any = KEEP


@dataclass(frozen=True)
class UserPatch:
    """A partial change (PATCH): only the given fields change."""

    revoked: bool | None = None
    # SLA field -> new value; "allowed_destinations" may map to None (every destination).
    sla: Mapping[str, Any] = field(default_factory=dict)
    token: Any = KEEP


@dataclass(frozen=True)
class ApplicationSpec:
    sae_id: str
    node: str
    user: str
    priority: int = 0
    app_id: str | None = None
    cert_sha256: str | None = None


@dataclass(frozen=True)
class PageQuery:
    limit: int = DEFAULT_LIMIT
    order: str = "asc"  # "asc" or "desc"
    # The position of the last item of the previous page (exclusive): (ts, id) or (id,).
    after: tuple | None = None


@dataclass(frozen=True)
class SampleQuery:
    since: dt.datetime | None = None  # inclusive
    until: dt.datetime | None = None  # exclusive
    page: PageQuery = PageQuery()


@dataclass(frozen=True)
class EventQuery:
    node: str | None = None
    ksid: str | None = None
    kind: str | None = None
    element: str | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    page: PageQuery = PageQuery()


@dataclass(frozen=True)
class SessionQuery:
    state: str | None = None  # a SessionState value, or "live" (not terminated)
    user: str | None = None
    node: str | None = None  # endpoint or on the route
    page: PageQuery = PageQuery()


@dataclass(frozen=True)
class Page:
    items: list[dict[str, Any]]
    # Position of the last item when more may follow, else None.
    next_after: tuple | None = None


# =========================================================================== the backend protocol


class RestBackend(Protocol):
    """What the REST layer needs from the control plane. Every method returns JSON-ready data
    and raises ``ApiError`` (``NotFound``, ``Conflict``, ``ValidationFailed``, ``Unavailable``...)
    for anything it cannot do; ``actor`` names the authenticated principal for the audit trail."""

    def nodes(self) -> list[dict[str, Any]]: ...

    def node(self, name: str) -> dict[str, Any]: ...

    def links(self, kind: str | None = None) -> list[dict[str, Any]]: ...

    def link(self, name: str) -> dict[str, Any]: ...

    def link_samples(self, name: str, query: SampleQuery) -> Page: ...

    def users(self) -> list[dict[str, Any]]: ...

    def user(self, name: str) -> dict[str, Any]: ...

    def create_user(self, spec: UserSpec, *, actor: str) -> dict[str, Any]: ...

    def replace_user(self, name: str, spec: UserSpec, *, actor: str) -> dict[str, Any]: ...

    def update_user(self, name: str, patch: UserPatch, *, actor: str) -> dict[str, Any]: ...

    def delete_user(self, name: str, *, actor: str) -> None: ...

    def applications(self, *, node: str | None = None, user: str | None = None) -> list[dict[str, Any]]: ...

    def application(self, sae_id: str) -> dict[str, Any]: ...

    def create_application(self, spec: ApplicationSpec, *, actor: str) -> dict[str, Any]: ...

    def delete_application(self, sae_id: str, *, actor: str) -> None: ...

    def add_certificate(self, sae_id: str, fingerprint: str, *, actor: str) -> dict[str, Any]: ...

    def remove_certificate(self, sae_id: str, fingerprint: str, *, actor: str) -> None: ...

    def sessions(self, query: SessionQuery) -> Page: ...

    def session(self, ksid: str) -> dict[str, Any]: ...

    def terminate_session(self, ksid: str, *, actor: str) -> dict[str, Any]: ...

    def routes(self) -> list[dict[str, Any]]: ...

    def events(self, query: EventQuery) -> Page: ...

    def health(self) -> dict[str, Any]: ...

    def metrics(self) -> str: ...


# =========================================================================== authentication


@dataclass(frozen=True)
class TokenEntry:
    """One API token: its role and salted hash (``pbkdf2_sha256$ITER$SALT$HASH``), and a name for logs."""

    role: str
    token_hash: str
    name: str = ""

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"token role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if not isinstance(self.token_hash, str) or netfile.token_hash_check(self.token_hash) is not None:
            raise ValueError("token hash must be 'pbkdf2_sha256$ITERATIONS$SALT$HASH' "
                             "(qkdsdn.pki.hash_token, 'qkdsdn db hash-token'), never a clear token")


@dataclass(frozen=True)
class Principal:
    """Who made a request: ``name`` for the audit trail, ``role``, and ``method`` (token/certificate)."""

    name: str
    role: str
    method: str

    def may(self, role: str) -> bool:
        return _ROLE_RANK[self.role] >= _ROLE_RANK[role]


class TokenFileError(ValueError):
    """A token file that cannot be used; the message names the file and line."""


_BEARER_RE = re.compile(r"^[Bb][Ee][Aa][Rr][Ee][Rr] +(?P<token>[\x21-\x7e]+) *$")
_CACHE_SIZE = 4096


class TokenAuth:
    """Bearer tokens (salted hashes, roles ``read``/``admin``) and operator client certificates.

    ``tokens``: ``TokenEntry`` objects, or ``(role, hash)`` / ``(role, hash, name)`` tuples.
    ``certificate_roles``: certificate kind -> role, for verified client certificates (default:
    ``operator`` and ``controller`` -> ``admin``; other kinds get no access).

    Checking a token against PBKDF2 hashes is slow on purpose, so the outcome is remembered per
    token (under its SHA-256 in memory, bounded) and checks of unknown tokens run one at a time.
    """

    def __init__(self, tokens: Iterable[TokenEntry | tuple[str, ...]] = (), *,
                 certificate_roles: Mapping[str, str] | None = None, realm: str = "qkdsdn"):
        entries: list[TokenEntry] = []
        for i, t in enumerate(tokens):
            entry = t if isinstance(t, TokenEntry) else TokenEntry(*t)
            if not entry.name:
                entry = TokenEntry(entry.role, entry.token_hash, f"token-{i + 1}")
            entries.append(entry)
        names = [e.name for e in entries]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"token names must be unique: {', '.join(dupes)}")
        roles = dict(certificate_roles) if certificate_roles is not None else {"operator": ADMIN,
                                                                                "controller": ADMIN}
        for kind, role in roles.items():
            if role not in ROLES:
                raise ValueError(f"certificate kind {kind!r}: role must be one of {', '.join(ROLES)}, got {role!r}")
        if '"' in realm or "\\" in realm:
            raise ValueError("realm must not contain quotes or backslashes")
        self._entries = tuple(entries)
        self._cert_roles = roles
        self.realm = realm
        self._cache: OrderedDict[bytes, TokenEntry | None] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._verify_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"TokenAuth(tokens={len(self._entries)}, certificates={sorted(self._cert_roles)})"

    @property
    def entries(self) -> tuple[TokenEntry, ...]:
        return self._entries

    @classmethod
    def from_file(cls, path: str | Path, **kw: Any) -> "TokenAuth":
        """Read tokens from a text file: one ``ROLE HASH [NAME]`` per line; ``#`` starts a comment.

        Example line: ``admin pbkdf2_sha256$600000$9f...$41... ops-console``.
        """
        p = Path(path)
        try:
            content = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise TokenFileError(f"{p}: cannot read: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise TokenFileError(f"{p}: not UTF-8 text: {exc.reason}") from None
        entries: list[TokenEntry] = []
        seen: dict[str, int] = {}
        problems: list[str] = []
        for lineno, line in enumerate(content.splitlines(), start=1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) not in (2, 3):
                problems.append(f"{p}:{lineno}: expected 'ROLE HASH [NAME]', got {len(parts)} fields")
                continue
            role, token_hash = parts[0], parts[1]
            name = parts[2] if len(parts) == 3 else f"{p.name}:{lineno}"
            try:
                entry = TokenEntry(role, token_hash, name)
            except ValueError as exc:
                problems.append(f"{p}:{lineno}: {exc}")
                continue
            if name in seen:
                problems.append(f"{p}:{lineno}: duplicate token name '{name}' (first at line {seen[name]})")
                continue
            seen[name] = lineno
            entries.append(entry)
        if problems:
            raise TokenFileError("\n".join(problems))
        return cls(entries, **kw)

    # ----------------------------------------------------------------- decisions

    def challenge(self, error: str | None = None, scope: str | None = None) -> str:
        """The ``WWW-Authenticate`` value (RFC 6750)."""
        out = f'Bearer realm="{self.realm}"'
        if error:
            out += f', error="{error}"'
        if scope:
            out += f', scope="{scope}"'
        return out

    def authenticate(self, environ: Mapping[str, Any], authorization: str | None) -> Principal:
        """The principal of a request, or ``Unauthorized`` / ``Forbidden``."""
        cert_principal: Principal | None = None
        cert_kind: str | None = None
        cert = environ.get(PEER_CERT_KEY)
        if cert is not None:
            try:
                cert_kind = pki.certificate_kind(cert)
                fp = pki.certificate_fingerprint(cert)
            except Exception:  # noqa: BLE001 - a certificate we cannot read grants nothing
                cert_kind, fp = None, ""
            role = self._cert_roles.get(cert_kind or "")
            if role is not None:
                cert_principal = Principal(f"certificate:{cert_kind}:{fp[:16]}", role, "certificate")

        if authorization is not None:
            match = _BEARER_RE.match(authorization)
            if match is None:
                raise Unauthorized("the Authorization header must be 'Bearer <token>'",
                                   headers={"WWW-Authenticate": self.challenge("invalid_request")})
            entry = self._verify(match.group("token"))
            if entry is None:
                raise Unauthorized("invalid bearer token",
                                   headers={"WWW-Authenticate": self.challenge("invalid_token")})
            token_principal = Principal(f"token:{entry.name}", entry.role, "token")
            if cert_principal is not None and cert_principal.may(ADMIN) and not token_principal.may(ADMIN):
                return cert_principal
            return token_principal
        if cert_principal is not None:
            return cert_principal
        if cert is not None:
            raise Forbidden(f"a client certificate of kind '{cert_kind or 'unknown'}' gives no access to the "
                            "operator API; use an operator certificate or a bearer token")
        raise Unauthorized("authentication required: send 'Authorization: Bearer <token>' or an operator "
                           "client certificate", headers={"WWW-Authenticate": self.challenge()})

    def authorize(self, environ: Mapping[str, Any], authorization: str | None, role: str) -> Principal:
        """``authenticate`` and check that the principal holds ``role``."""
        principal = self.authenticate(environ, authorization)
        if not principal.may(role):
            raise Forbidden(f"this request needs the '{role}' role; {principal.name} has '{principal.role}'",
                            headers={"WWW-Authenticate": self.challenge("insufficient_scope", role)})
        return principal

    def _verify(self, token: str) -> TokenEntry | None:
        key = hashlib.sha256(token.encode("utf-8")).digest()
        with self._cache_lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        # One PBKDF2 run at a time: guessing tokens costs the guesser, not every core of the server.
        with self._verify_lock:
            with self._cache_lock:
                if key in self._cache:
                    return self._cache[key]
            found = next((e for e in self._entries if pki.verify_token(token, e.token_hash)), None)
            with self._cache_lock:
                self._cache[key] = found
                while len(self._cache) > _CACHE_SIZE:
                    self._cache.popitem(last=False)
            return found


# =========================================================================== input checks


_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_MISSING = object()


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object"}.get(type(value), type(value).__name__)


def _clean_text(value: str) -> str | None:
    """A message when ``value`` holds control characters or lone surrogates, else None."""
    if _CONTROL_RE.search(value):
        return "must not contain control characters"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode text"
    return None


# ETSI priorities, rates and bucket sizes are uint32 (BIGINT columns); max_sessions is an INTEGER
# column: the network file's own checks, so a file and the API accept the same values.
_priority = netfile.uint32
_positive_uint32 = netfile.positive_uint32
_positive_int32 = netfile.positive_int32


def _token_check(v: str) -> str | None:
    if not TOKEN_MIN_LENGTH <= len(v) <= TOKEN_MAX_LENGTH:
        return f"must be {TOKEN_MIN_LENGTH} to {TOKEN_MAX_LENGTH} characters long, got {len(v)}"
    return _clean_text(v)


class _Fields:
    """Reads typed fields from one JSON object and collects every problem (with its field path)."""

    def __init__(self, data: Any, allowed: Iterable[str], where: str = "", problems: list | None = None):
        self.where = where
        self.problems: list[dict[str, str]] = problems if problems is not None else []
        allowed = set(allowed)
        # Not an object: that is the one problem; its fields are not reported missing as well.
        self.is_object = isinstance(data, dict)
        if not isinstance(data, dict):
            self.problem("", f"expected an object, got {_json_type(data)}")
            self.data: dict[str, Any] = {}
            return
        self.data = data
        for key in data:
            if key not in allowed:
                self.problem(key, f"unknown field (allowed: {', '.join(sorted(allowed))})")

    def path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where and key else (self.where or key)

    def problem(self, key: str, message: str) -> None:
        self.problems.append({"field": self.path(key), "message": message})

    def has(self, key: str) -> bool:
        return key in self.data

    def get(self, key: str, kind: str, *, required: bool = False, nullable: bool = False,
            check: Callable[[Any], str | None] | None = None) -> Any:
        """The value, None for an allowed null, or _MISSING when absent or invalid (problem noted)."""
        if key not in self.data:
            if required and self.is_object:
                self.problem(key, "required field is missing")
            return _MISSING
        value = self.data[key]
        if value is None:
            if nullable:
                return None
            self.problem(key, f"must not be null (expected {kind})")
            return _MISSING
        ok = {
            "string": isinstance(value, str),
            "integer": isinstance(value, int) and not isinstance(value, bool),
            "boolean": isinstance(value, bool),
            "array of strings": isinstance(value, list) and all(isinstance(v, str) for v in value),
            "object": isinstance(value, dict),
        }[kind]
        if not ok:
            self.problem(key, f"expected {kind}, got {_json_type(value)}")
            return _MISSING
        if kind == "string":
            msg = _clean_text(value)
            if msg:
                self.problem(key, msg)
                return _MISSING
        if check is not None:
            msg = check(value)
            if msg:
                self.problem(key, msg)
                return _MISSING
        return value


def _check_name(v: str) -> str | None:
    return netfile.name_check(v)


def _destinations(f: _Fields) -> Any:
    value = f.get("allowed_destinations", "array of strings", nullable=True)
    if isinstance(value, list):
        bad = False
        for i, dest in enumerate(value):
            msg = _clean_text(dest) or _check_name(dest)
            if msg:
                f.problems.append({"field": f"{f.path('allowed_destinations')}[{i}]", "message": msg})
                bad = True
        dupes = sorted({d for d in value if value.count(d) > 1})
        if dupes:
            f.problem("allowed_destinations", f"duplicate node names: {', '.join(dupes)}")
            bad = True
        if bad:
            return _MISSING
        return tuple(value)
    return value


SLA_FIELDS = ("max_priority", "max_bps", "max_sessions", "bucket_bits", "allowed_destinations")
_SLA_INT_CHECKS = {"max_priority": _priority, "max_bps": _positive_uint32, "max_sessions": _positive_int32,
                   "bucket_bits": _positive_uint32}


def _sla_fields(data: Any, where: str, problems: list, *, partial: bool) -> dict[str, Any]:
    f = _Fields(data, SLA_FIELDS, where, problems)
    out: dict[str, Any] = {}
    for key, check in _SLA_INT_CHECKS.items():
        value = f.get(key, "integer", required=not partial, check=check)
        if value is not _MISSING:
            out[key] = value
    dest = _destinations(f)
    if dest is not _MISSING:
        out["allowed_destinations"] = dest
    return out


def _token_field(f: _Fields) -> Any:
    if not f.has("token"):
        return KEEP
    value = f.get("token", "string", nullable=True, check=_token_check)
    return KEEP if value is _MISSING else value


USER_FIELDS = ("name", "sla", "revoked", "token")
USER_PATCH_FIELDS = ("sla", "revoked", "token")


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ValidationFailed([{"field": "", "message": f"expected a JSON object, got {_json_type(body)}"}])
    return body


def parse_user(body: Any, *, path_name: str | None = None) -> UserSpec:
    """A whole user from a POST (``path_name`` None) or PUT body; ``ValidationFailed`` otherwise."""
    f = _Fields(_object(body), USER_FIELDS)
    name = f.get("name", "string", required=path_name is None, check=_check_name)
    if path_name is not None:
        if name is _MISSING and not f.has("name"):
            name = path_name
        elif name is not _MISSING and name != path_name:
            f.problem("name", f"does not match the user in the path ('{path_name}'); users cannot be renamed")
    sla: dict[str, Any] = {}
    if not f.has("sla"):
        f.problem("sla", "required field is missing")
    else:
        sla = _sla_fields(f.data["sla"], "sla", f.problems, partial=False)
    revoked = f.get("revoked", "boolean")
    token = _token_field(f)
    if f.problems:
        raise ValidationFailed(f.problems)
    return UserSpec(name=name, sla=SLASpec(**{"allowed_destinations": None, **sla}),
                    revoked=False if revoked is _MISSING else revoked, token=token)


def parse_user_patch(body: Any) -> UserPatch:
    f = _Fields(_object(body), USER_PATCH_FIELDS)
    sla: dict[str, Any] = {}
    if f.has("sla"):
        sla = _sla_fields(f.data["sla"], "sla", f.problems, partial=True)
    revoked = f.get("revoked", "boolean")
    token = _token_field(f)
    if f.problems:
        raise ValidationFailed(f.problems)
    return UserPatch(revoked=None if revoked is _MISSING else revoked, sla=sla, token=token)


APPLICATION_FIELDS = ("sae_id", "node", "user", "priority", "app_id", "cert_sha256")


def _fingerprint_check(v: str) -> str | None:
    return None if normalize_fingerprint(v) is not None else (
        f"'{v}' is not a SHA-256 fingerprint (64 hex digits, ':' separators allowed)")


def parse_application(body: Any) -> ApplicationSpec:
    f = _Fields(_object(body), APPLICATION_FIELDS)
    sae_id = f.get("sae_id", "string", required=True, check=_check_name)
    node = f.get("node", "string", required=True, check=_check_name)
    user = f.get("user", "string", required=True, check=_check_name)
    priority = f.get("priority", "integer", check=_priority)
    app_id = f.get("app_id", "string", nullable=True, check=netfile.uuid_check)
    cert = f.get("cert_sha256", "string", nullable=True, check=_fingerprint_check)
    if f.problems:
        raise ValidationFailed(f.problems)
    return ApplicationSpec(sae_id=sae_id, node=node, user=user, priority=0 if priority is _MISSING else priority,
                           app_id=None if app_id in (_MISSING, None) else app_id.lower(),
                           cert_sha256=None if cert in (_MISSING, None) else normalize_fingerprint(cert))


def parse_certificate(body: Any) -> str:
    f = _Fields(_object(body), ("fingerprint",))
    fp = f.get("fingerprint", "string", required=True, check=_fingerprint_check)
    if f.problems:
        raise ValidationFailed(f.problems)
    return normalize_fingerprint(fp)  # type: ignore[return-value]


# --------------------------------------------------------------------------- JSON bodies


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(f"duplicate key '{key}'")
        out[key] = value
    return out


def _finite_float(text_value: str) -> float:
    value = float(text_value)
    if not math.isfinite(value):
        raise ValueError(f"number {text_value} is out of range")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(raw: bytes) -> Any:
    """Strict JSON: UTF-8, no duplicate keys, no NaN/Infinity, finite numbers. ``BadRequest`` otherwise."""
    try:
        textual = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError("the request body is not UTF-8 text", code="invalid_json") from None
    if not textual.strip():
        raise ApiError("the request body is empty; send a JSON object", code="invalid_json")
    try:
        return json.loads(textual, object_pairs_hook=_no_duplicates, parse_float=_finite_float,
                          parse_constant=_reject_constant)
    except _DuplicateKey as exc:
        raise ApiError(f"malformed JSON: {exc}", code="invalid_json") from None
    except json.JSONDecodeError as exc:
        raise ApiError(f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
                       code="invalid_json") from None
    except (ValueError, RecursionError) as exc:
        raise ApiError(f"malformed JSON: {exc if isinstance(exc, ValueError) else 'nested too deeply'}",
                       code="invalid_json") from None


# --------------------------------------------------------------------------- query parameters


def parse_time(parameter: str, value: str) -> dt.datetime:
    """An ISO 8601 time; without a UTC offset it is taken as UTC. Returned in UTC."""
    candidates = [value.strip()]
    if " " in candidates[0]:
        # An unencoded '+' of a UTC offset arrives as a space.
        head, _, tail = candidates[0].rpartition(" ")
        candidates.append(f"{head}+{tail}")
    for candidate in candidates:
        try:
            when = dt.datetime.fromisoformat(candidate)
        except ValueError:
            continue
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.timezone.utc)
        try:
            return when.astimezone(dt.timezone.utc)
        except (OverflowError, ValueError):
            raise InvalidParameter(parameter, f"'{value}' is outside the representable time range") from None
    raise InvalidParameter(parameter, f"'{value}' is not an ISO 8601 time (e.g. 2025-01-31T12:00:00Z)")


_CURSOR_VERSION = 1


def encode_cursor(kind: str, order: str, position: tuple) -> str:
    parts = [_iso(p) if isinstance(p, dt.datetime) else p for p in position]
    raw = json.dumps({"v": _CURSOR_VERSION, "k": kind, "o": order, "p": parts}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(kind: str, order: str, cursor: str) -> tuple:
    """The position a cursor of ``encode_cursor`` holds; ``InvalidParameter`` for any other string."""
    def bad(why: str) -> InvalidParameter:
        return InvalidParameter("cursor", f"{why}; use the next_cursor of a previous page")

    if not cursor or len(cursor) > 512 or not re.fullmatch(r"[A-Za-z0-9_-]+", cursor):
        raise bad("malformed cursor")
    try:
        data = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("utf-8"))
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError):
        raise bad("malformed cursor") from None
    if not isinstance(data, dict) or data.get("v") != _CURSOR_VERSION or not isinstance(data.get("p"), list):
        raise bad("malformed cursor")
    if data.get("k") != kind:
        raise bad(f"this cursor pages {data.get('k')!r}, not {kind}")
    if data.get("o") != order:
        raise bad(f"this cursor was made for order={data.get('o')!r}; keep the order of the first page")
    p = data["p"]
    if kind == "sessions":
        if len(p) != 1 or not _is_id(p[0]):
            raise bad("malformed cursor")
        return (p[0],)
    if len(p) != 2 or not isinstance(p[0], str) or not _is_id(p[1]):
        raise bad("malformed cursor")
    try:
        ts = dt.datetime.fromisoformat(p[0])
    except ValueError:
        raise bad("malformed cursor") from None
    if ts.tzinfo is None:
        raise bad("malformed cursor")
    return (ts.astimezone(dt.timezone.utc), p[1])


def _is_id(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 2**63 - 1


class _Params:
    """Query parameters of one request: each known at most once, none unknown."""

    def __init__(self, args: Any, allowed: Iterable[str]):
        allowed = set(allowed)
        self.values: dict[str, str] = {}
        for key in args.keys():
            if key not in allowed:
                hint = f" (allowed: {', '.join(sorted(allowed))})" if allowed else " (this endpoint takes none)"
                raise InvalidParameter(key, f"unknown parameter{hint}")
            values = args.getlist(key)
            if len(values) != 1:
                raise InvalidParameter(key, "given more than once")
            msg = _clean_text(values[0])
            if msg:
                raise InvalidParameter(key, msg)
            self.values[key] = values[0]

    def text(self, key: str, max_length: int = 64) -> str | None:
        value = self.values.get(key)
        if value is None:
            return None
        if not value or len(value) > max_length:
            raise InvalidParameter(key, f"must be 1 to {max_length} characters long")
        return value

    def name(self, key: str) -> str | None:
        value = self.text(key)
        if value is not None and _check_name(value):
            raise InvalidParameter(key, _check_name(value))  # type: ignore[arg-type]
        return value

    def choice(self, key: str, choices: Sequence[str], default: str | None = None) -> str | None:
        value = self.values.get(key)
        if value is None:
            return default
        if value not in choices:
            raise InvalidParameter(key, f"'{value}' is not one of {', '.join(choices)}")
        return value

    def time(self, key: str) -> dt.datetime | None:
        value = self.values.get(key)
        return None if value is None else parse_time(key, value)

    def page(self, kind: str) -> PageQuery:
        order = self.choice("order", ("asc", "desc"), "asc") or "asc"
        raw = self.values.get("limit")
        limit = DEFAULT_LIMIT
        if raw is not None:
            if not re.fullmatch(r"[0-9]{1,7}", raw.strip()):
                raise InvalidParameter("limit", f"'{raw}' is not an integer between 1 and {MAX_LIMIT}")
            limit = int(raw)
            if not 1 <= limit <= MAX_LIMIT:
                raise InvalidParameter("limit", f"must be between 1 and {MAX_LIMIT}, got {limit}")
        cursor = self.values.get("cursor")
        after = decode_cursor(kind, order, cursor) if cursor is not None else None
        return PageQuery(limit=limit, order=order, after=after)

    def time_range(self) -> tuple[dt.datetime | None, dt.datetime | None]:
        since, until = self.time("since"), self.time("until")
        if since is not None and until is not None and since > until:
            raise InvalidParameter("until", "must not be earlier than 'since'")
        return since, until


PAGE_PARAMS = ("limit", "cursor", "order")


# =========================================================================== the Flask app


def create_rest_app(backend: RestBackend, auth: TokenAuth, *, max_body_bytes: int = MAX_BODY_BYTES) -> Flask:
    """The operator REST API over ``backend``, authenticated by ``auth`` (module docstring)."""
    app = Flask("qkdsdn.rest", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes

    def route(path: str, methods: list[str], role: str | None) -> Callable:
        def register(view: Callable) -> Callable:
            def guarded(**kwargs: Any) -> Response:
                if role is not None:
                    g.principal = auth.authorize(request.environ, request.headers.get("Authorization"), role)
                return view(**kwargs)

            guarded.__name__ = view.__name__
            app.add_url_rule(path, endpoint=view.__name__, view_func=guarded, methods=methods,
                             provide_automatic_options=False)
            return view
        return register

    def actor() -> str:
        return g.principal.name

    def params(*allowed: str) -> _Params:
        return _Params(request.args, allowed)

    def body() -> Any:
        mimetype = request.mimetype
        allowed = ("application/json", "application/merge-patch+json") if request.method == "PATCH" \
            else ("application/json",)
        if mimetype not in allowed:
            raise ApiError(f"send the body as {' or '.join(allowed)} (got {mimetype or 'no Content-Type'})",
                           status=415, code="unsupported_media_type")
        return parse_json(request.get_data(cache=True))

    def listing(items: list[dict[str, Any]]) -> Response:
        return _json({"items": items})

    def paged(kind: str, page: Page, order: str) -> Response:
        cursor = encode_cursor(kind, order, page.next_after) if page.next_after is not None else None
        return _json({"items": page.items, "next_cursor": cursor})

    def name_in_path(value: str, what: str) -> str:
        # A name the network file could not hold cannot exist either.
        if _clean_text(value) or _check_name(value):
            raise NotFound(f"no {what} named {value!r}")
        return value

    # ----------------------------------------------------------------- service endpoints

    @route(f"{API_PREFIX}/health", ["GET"], None)
    def health() -> Response:
        params()
        report = backend.health()
        return _json(report, 200 if report.get("status") == "ok" else 503)

    @route("/metrics", ["GET"], READ)
    def metrics() -> Response:
        params()
        return Response(backend.metrics(), status=200, content_type=PROMETHEUS_CONTENT_TYPE)

    @route("/openapi.json", ["GET"], None)
    def openapi() -> Response:
        params()
        from controller.openapi import openapi_document

        return _json(openapi_document())

    # ----------------------------------------------------------------- topology

    @route(f"{API_PREFIX}/nodes", ["GET"], READ)
    def list_nodes() -> Response:
        params()
        return listing(backend.nodes())

    @route(f"{API_PREFIX}/nodes/<name>", ["GET"], READ)
    def get_node(name: str) -> Response:
        params()
        return _json(backend.node(name_in_path(name, "node")))

    @route(f"{API_PREFIX}/links", ["GET"], READ)
    def list_links() -> Response:
        p = params("kind")
        return listing(backend.links(p.choice("kind", LINK_KINDS)))

    @route(f"{API_PREFIX}/links/<name>", ["GET"], READ)
    def get_link(name: str) -> Response:
        params()
        return _json(backend.link(_link_name_in_path(name)))

    @route(f"{API_PREFIX}/links/<name>/samples", ["GET"], READ)
    def link_samples(name: str) -> Response:
        link = _link_name_in_path(name)
        p = params("since", "until", *PAGE_PARAMS)
        since, until = p.time_range()
        page = p.page("samples")
        return paged("samples", backend.link_samples(link, SampleQuery(since, until, page)), page.order)

    # ----------------------------------------------------------------- users

    @route(f"{API_PREFIX}/users", ["GET", "POST"], READ)
    def users() -> Response:
        if request.method == "GET":
            params()
            return listing(backend.users())
        _require(ADMIN)
        params()
        spec = parse_user(body())
        created = backend.create_user(spec, actor=actor())
        return _json(created, 201, {"Location": f"{API_PREFIX}/users/{created['name']}"})

    @route(f"{API_PREFIX}/users/<name>", ["GET", "PUT", "PATCH", "DELETE"], READ)
    def one_user(name: str) -> Response:
        name = name_in_path(name, "user")
        if request.method == "GET":
            params()
            return _json(backend.user(name))
        _require(ADMIN)
        params()
        if request.method == "DELETE":
            backend.delete_user(name, actor=actor())
            return Response(status=204)
        if request.method == "PUT":
            return _json(backend.replace_user(name, parse_user(body(), path_name=name), actor=actor()))
        return _json(backend.update_user(name, parse_user_patch(body()), actor=actor()))

    # ----------------------------------------------------------------- applications

    @route(f"{API_PREFIX}/applications", ["GET", "POST"], READ)
    def applications() -> Response:
        if request.method == "GET":
            p = params("node", "user")
            return listing(backend.applications(node=p.name("node"), user=p.name("user")))
        _require(ADMIN)
        params()
        created = backend.create_application(parse_application(body()), actor=actor())
        return _json(created, 201, {"Location": f"{API_PREFIX}/applications/{created['sae_id']}"})

    @route(f"{API_PREFIX}/applications/<sae_id>", ["GET", "DELETE"], READ)
    def one_application(sae_id: str) -> Response:
        sae_id = name_in_path(sae_id, "application (SAE)")
        params()
        if request.method == "GET":
            return _json(backend.application(sae_id))
        _require(ADMIN)
        backend.delete_application(sae_id, actor=actor())
        return Response(status=204)

    @route(f"{API_PREFIX}/applications/<sae_id>/certificates", ["POST"], ADMIN)
    def add_certificate(sae_id: str) -> Response:
        sae_id = name_in_path(sae_id, "application (SAE)")
        params()
        fingerprint = parse_certificate(body())
        return _json(backend.add_certificate(sae_id, fingerprint, actor=actor()), 201,
                     {"Location": f"{API_PREFIX}/applications/{sae_id}"})

    @route(f"{API_PREFIX}/applications/<sae_id>/certificates/<fingerprint>", ["DELETE"], ADMIN)
    def remove_certificate(sae_id: str, fingerprint: str) -> Response:
        sae_id = name_in_path(sae_id, "application (SAE)")
        params()
        fp = normalize_fingerprint(fingerprint)
        if fp is None:
            raise NotFound(f"no certificate {fingerprint!r} registered for application {sae_id!r}")
        backend.remove_certificate(sae_id, fp, actor=actor())
        return Response(status=204)

    # ----------------------------------------------------------------- sessions, routes, events

    @route(f"{API_PREFIX}/sessions", ["GET"], READ)
    def list_sessions() -> Response:
        p = params("state", "user", "node", *PAGE_PARAMS)
        query = SessionQuery(state=p.choice("state", SESSION_STATES + ("live",)), user=p.name("user"),
                             node=p.name("node"), page=p.page("sessions"))
        return paged("sessions", backend.sessions(query), query.page.order)

    @route(f"{API_PREFIX}/sessions/<ksid>", ["GET", "DELETE"], READ)
    def one_session(ksid: str) -> Response:
        params()
        if _clean_text(ksid) or len(ksid) > 36:
            raise NotFound(f"no session with KSID {ksid!r}")
        if request.method == "GET":
            return _json(backend.session(ksid))
        _require(ADMIN)
        return _json(backend.terminate_session(ksid, actor=actor()), 202)

    @route(f"{API_PREFIX}/routes", ["GET"], READ)
    def list_routes() -> Response:
        params()
        return listing(backend.routes())

    @route(f"{API_PREFIX}/events", ["GET"], READ)
    def list_events() -> Response:
        p = params("node", "ksid", "kind", "element", "since", "until", *PAGE_PARAMS)
        since, until = p.time_range()
        query = EventQuery(node=p.text("node"), ksid=p.text("ksid", 36), kind=p.text("kind"),
                           element=p.text("element", 32), since=since, until=until, page=p.page("events"))
        return paged("events", backend.events(query), query.page.order)

    # ----------------------------------------------------------------- errors

    @app.errorhandler(ApiError)
    def api_error(exc: ApiError) -> Response:
        if exc.status >= 500:
            log.warning("%s %s: %s", request.method, request.path, exc.message)
        return _json(exc.body(), exc.status, exc.headers)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        code = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large",
                415: "unsupported_media_type"}.get(status, "bad_request" if status < 500 else "internal_error")
        message = {404: f"no such resource: {request.path}",
                   405: f"method {request.method} is not allowed on {request.path}",
                   413: f"the request body exceeds {max_body_bytes} bytes"}.get(status, exc.description or exc.name)
        headers = {}
        if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
            headers["Allow"] = ", ".join(sorted(exc.valid_methods))
        return _json({"error": {"code": code, "message": message}}, status, headers)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        log.exception("%s %s failed", request.method, request.path)
        return _json({"error": {"code": "internal_error", "message": "internal error; see the controller log"}},
                     500)

    @app.after_request
    def no_store(response: Response) -> Response:
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response

    def _require(role: str) -> None:
        principal: Principal = g.principal
        if not principal.may(role):
            raise Forbidden(f"this request needs the '{role}' role; {principal.name} has '{principal.role}'",
                            headers={"WWW-Authenticate": auth.challenge("insufficient_scope", role)})

    def _link_name_in_path(name: str) -> str:
        # Link names follow the network file's name rule; VIRT links may use longer generated names.
        if _clean_text(name) or not name or len(name) > 128:
            raise NotFound(f"no link named {name!r}")
        return name

    return app


def _json(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    payload = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    response = Response(payload, status=status, mimetype="application/json")
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


# =========================================================================== the database backend


def _iso(value: dt.datetime | None) -> str | None:
    """UTC ISO 8601 with a 'Z'; naive values (SQLite) are UTC."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")


def _num(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _clean_json(value: Any) -> Any:
    """JSON-ready data: non-finite numbers (which JSON cannot carry) as null, times as ISO 8601,
    anything else that JSON has no type for as its string."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean_json(v) for v in value]
    if isinstance(value, dt.datetime):
        return _iso(value)
    return str(value)


def _enum_value(value: Any) -> Any:
    return getattr(value, "value", value)


def _like_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class DbRestBackend:
    """``RestBackend`` over the control plane's database (``db.models``).

    ``terminate(ksid) -> bool``: asks admission control to terminate a live session (the os-ken
    admission app answers through ``send_request``); True when it accepted. Without it, DELETE of
    a session answers 503. ``metrics() -> str``: Prometheus text (``controller.monitoring.
    render_prometheus``). ``health() -> dict``: component name -> ``{"status": "ok"|..., ...}``,
    merged with the database check. ``on_profiles_changed()``: called after every committed change
    of users, SLAs, applications or credentials, so access and admission control reload their
    ``UserProfiles`` snapshot.
    """

    def __init__(self, session_factory: sessionmaker[DbSession], *,
                 terminate: Callable[[str], bool] | None = None,
                 metrics: Callable[[], str] | None = None,
                 health: Callable[[], dict] | None = None,
                 on_profiles_changed: Callable[[], None] | None = None,
                 token_iterations: int = pki.TOKEN_ITERATIONS,
                 recent_samples: int = RECENT_SAMPLES):
        if token_iterations < 1:
            raise ValueError("token_iterations must be positive")
        self._sessions = session_factory
        self._terminate = terminate
        self._metrics = metrics
        self._health = health
        self._on_profiles_changed = on_profiles_changed
        self._token_iterations = token_iterations
        self._recent_samples = recent_samples

    # ----------------------------------------------------------------- transactions

    @contextlib.contextmanager
    def _read(self) -> Iterator[DbSession]:
        with _db_errors(), self._sessions() as s:
            yield s

    @contextlib.contextmanager
    def _write(self) -> Iterator[DbSession]:
        with _db_errors(), self._sessions.begin() as s:
            yield s

    def _profiles_changed(self) -> None:
        if self._on_profiles_changed is None:
            return
        try:
            self._on_profiles_changed()
        except Exception:  # noqa: BLE001 - the change is committed; the refresh is best effort
            log.exception("user-profile change hook failed")

    # ----------------------------------------------------------------- service

    def health(self) -> dict[str, Any]:
        from qkdsdn import __version__

        checks: dict[str, Any] = {}
        try:
            with self._sessions() as s:
                s.execute(text("SELECT 1"))
            checks["database"] = {"status": "ok"}
        except Exception as exc:  # noqa: BLE001 - health reports, it does not fail
            checks["database"] = {"status": "down", "error": type(exc).__name__}
        if self._health is not None:
            try:
                extra = self._health()
                if not isinstance(extra, Mapping):
                    raise TypeError(f"health() returned {type(extra).__name__}, not a mapping")
                for key, value in extra.items():
                    # A component's report: a mapping with a "status", or just the status.
                    checks[str(key)] = (_clean_json(value) if isinstance(value, Mapping)
                                        else {"status": "ok" if value is True else
                                              "down" if value is False else str(value)})
            except Exception as exc:  # noqa: BLE001
                log.exception("health callable failed")
                checks["controller"] = {"status": "down", "error": type(exc).__name__}
        statuses = [c.get("status") for c in checks.values()]
        status = "ok" if all(s == "ok" for s in statuses) else (
            "down" if checks["database"]["status"] != "ok" else "degraded")
        return {"status": status, "version": __version__, "checks": checks}

    def metrics(self) -> str:
        if self._metrics is None:
            raise Unavailable("metrics need the monitoring element, which this controller does not run")
        try:
            out = self._metrics()
        except Exception as exc:  # noqa: BLE001
            log.exception("metrics callable failed")
            raise Unavailable(f"the monitoring element could not render metrics ({type(exc).__name__})") from None
        if not isinstance(out, str):
            raise Unavailable("the monitoring element returned no metrics text")
        return out

    # ----------------------------------------------------------------- nodes

    def nodes(self) -> list[dict[str, Any]]:
        with self._read() as s:
            nodes = s.scalars(select(m.Node).options(selectinload(m.Node.interfaces),
                                                     selectinload(m.Node.applications))
                              .order_by(m.Node.name)).all()
            return [self._node(s, n) for n in nodes]

    def node(self, name: str) -> dict[str, Any]:
        with self._read() as s:
            n = s.scalar(select(m.Node).where(m.Node.name == name)
                         .options(selectinload(m.Node.interfaces), selectinload(m.Node.applications)))
            if n is None:
                raise NotFound(f"no node named {name!r}")
            return self._node(s, n)

    def _node(self, s: DbSession, n: m.Node) -> dict[str, Any]:
        links = s.execute(select(m.Link.name, m.Link.kind, m.Link.src_interface_id, m.Link.dst_interface_id,
                                 m.Link.src_node_id)
                          .where(or_(m.Link.src_node_id == n.id, m.Link.dst_node_id == n.id))
                          .order_by(m.Link.name)).all()
        by_iface = {}
        for row in links:
            iface = row.src_interface_id if row.src_node_id == n.id else row.dst_interface_id
            if iface is not None:
                by_iface[iface] = row.name
        return {
            "name": n.name,
            "qkdn_id": n.qkdn_id,
            "location": n.location,
            "km_address": n.km_address,
            "status": _enum_value(n.status),
            "version": n.version,
            "last_seen": _iso(n.last_seen),
            "interfaces": [{
                "qkdi_id": i.qkdi_id, "model": i.model, "qkd_type": i.qkd_type, "att_device": i.att_device,
                "att_port": i.att_port, "role": i.role, "wavelength_nm": i.wavelength_nm, "status": i.status,
                "link": by_iface.get(i.id)} for i in n.interfaces],
            "links": [row.name for row in links],
            "applications": sorted(a.sae_id for a in n.applications),
        }

    # ----------------------------------------------------------------- links

    def links(self, kind: str | None = None) -> list[dict[str, Any]]:
        with self._read() as s:
            q = select(m.Link).options(*_link_loads()).order_by(m.Link.name)
            if kind is not None:
                q = q.where(m.Link.kind == m.LinkKind(kind))
            links = s.scalars(q).all()
            live = _live_sessions_by_link(s)
            last = _last_samples(s, [link.id for link in links])
            return [self._link(link, live, last.get(link.id)) for link in links]

    def link(self, name: str) -> dict[str, Any]:
        with self._read() as s:
            link = self._find_link(s, name)
            out = self._link(link, _live_sessions_by_link(s), None)
            recent = s.scalars(select(m.LinkSample).where(m.LinkSample.link_id == link.id)
                               .order_by(m.LinkSample.ts.desc(), m.LinkSample.id.desc())
                               .limit(self._recent_samples)).all()
            out["last_sample"] = _sample(recent[0]) if recent else None
            out["recent_samples"] = [_sample(x) for x in recent]
            return out

    def link_samples(self, name: str, query: SampleQuery) -> Page:
        with self._read() as s:
            link = self._find_link(s, name)
            q = select(m.LinkSample).where(m.LinkSample.link_id == link.id)
            if query.since is not None:
                q = q.where(m.LinkSample.ts >= query.since)
            if query.until is not None:
                q = q.where(m.LinkSample.ts < query.until)
            rows = _keyset(s, q, m.LinkSample.ts, m.LinkSample.id, query.page)
            return _page(rows, query.page, _sample, lambda r: (r.ts, r.id))

    @staticmethod
    def _find_link(s: DbSession, name: str) -> m.Link:
        link = s.scalar(select(m.Link).where(m.Link.name == name).options(*_link_loads()))
        if link is None:
            raise NotFound(f"no link named {name!r}")
        return link

    @staticmethod
    def _link(link: m.Link, live: Mapping[str, list[str]], last: m.LinkSample | None) -> dict[str, Any]:
        return {
            "name": link.name,
            "qkdl_id": link.qkdl_id,
            "kind": _enum_value(link.kind),
            "src_node": link.src_node.name,
            "dst_node": link.dst_node.name,
            "src_interface": link.src_interface.qkdi_id if link.src_interface is not None else None,
            "dst_interface": link.dst_interface.qkdi_id if link.dst_interface is not None else None,
            "length_km": _num(link.length_km),
            "attenuation_db_km": _num(link.attenuation_db_km),
            "channel_att_db": _num(link.channel_att_db),
            "wavelength_nm": link.wavelength_nm,
            "status": _enum_value(link.status),
            "enabled": bool(link.enabled),
            "skr_bps": _num(link.skr_bps),
            "eskr_bps": _num(link.eskr_bps),
            "qber": _num(link.qber),
            "reserved_bps": _num(link.reserved_bps) or 0.0,
            "session_count": int(link.session_count or 0),
            "sessions": sorted(set(live.get(link.name, ())) | ({link.ksid} if link.ksid else set())),
            "device": _clean_json(link.device),
            "ksid": link.ksid,
            "path": _clean_json(link.path),
            "bandwidth_bps": _num(link.bandwidth_bps),
            "updated_at": _iso(link.updated_at),
            "last_sample": _sample(last) if last is not None else None,
        }

    # ----------------------------------------------------------------- users

    def users(self) -> list[dict[str, Any]]:
        with self._read() as s:
            return [_user(u) for u in s.scalars(select(m.User).options(*_user_loads()).order_by(m.User.name))]

    def user(self, name: str) -> dict[str, Any]:
        with self._read() as s:
            return _user(self._find_user(s, name))

    def create_user(self, spec: UserSpec, *, actor: str) -> dict[str, Any]:
        with self._write() as s:
            if s.scalar(select(m.User.id).where(m.User.name == spec.name)) is not None:
                raise Conflict(f"user {spec.name!r} already exists", details={"user": spec.name})
            self._check_destinations(s, spec.sla.allowed_destinations, "sla")
            user = m.User(name=spec.name, revoked=spec.revoked)
            user.sla = m.SLA(**_sla_columns(spec.sla))
            s.add(user)
            self._set_token(s, user, spec.token)
            s.add(_audit("user_created", actor, user=spec.name))
            s.flush()
            out = _user(self._find_user(s, spec.name))
        self._profiles_changed()
        return out

    def replace_user(self, name: str, spec: UserSpec, *, actor: str) -> dict[str, Any]:
        with self._write() as s:
            user = self._find_user(s, name)
            self._check_destinations(s, spec.sla.allowed_destinations, "sla")
            user.revoked = spec.revoked
            columns = _sla_columns(spec.sla)
            if user.sla is None:
                user.sla = m.SLA(**columns)
            else:
                for key, value in columns.items():
                    setattr(user.sla, key, value)
            self._set_token(s, user, spec.token)
            s.add(_audit("user_replaced", actor, user=name))
            s.flush()
            out = _user(self._find_user(s, name))
        self._profiles_changed()
        return out

    def update_user(self, name: str, patch: UserPatch, *, actor: str) -> dict[str, Any]:
        with self._write() as s:
            user = self._find_user(s, name)
            if patch.revoked is not None:
                user.revoked = patch.revoked
            if patch.sla:
                if "allowed_destinations" in patch.sla:
                    self._check_destinations(s, patch.sla["allowed_destinations"], "sla")
                if user.sla is None:
                    missing = [k for k in _SLA_INT_CHECKS if k not in patch.sla]
                    if missing:
                        raise ValidationFailed([{"field": f"sla.{k}", "message": "required: the user has no SLA yet"}
                                                for k in missing])
                    user.sla = m.SLA(**_sla_columns(SLASpec(**{"allowed_destinations": None, **patch.sla})))
                else:
                    for key, value in patch.sla.items():
                        setattr(user.sla, key, list(value) if isinstance(value, tuple) else value)
            self._set_token(s, user, patch.token)
            changed = sorted(({"revoked"} if patch.revoked is not None else set())
                             | {f"sla.{k}" for k in patch.sla} | ({"token"} if patch.token is not KEEP else set()))
            s.add(_audit("user_updated", actor, user=name, fields=changed))
            s.flush()
            out = _user(self._find_user(s, name))
        self._profiles_changed()
        return out

    def delete_user(self, name: str, *, actor: str) -> None:
        with self._write() as s:
            user = self._find_user(s, name)
            if user.applications:
                apps = sorted(a.sae_id for a in user.applications)
                raise Conflict(f"user {name!r} still owns applications {', '.join(apps)}; delete them first",
                               details={"applications": apps})
            live = s.scalars(select(m.Session.ksid).where(m.Session.user == name,
                                                          m.Session.state.in_(LIVE_STATES))).all()
            if live:
                raise Conflict(f"user {name!r} has {len(live)} live session(s); terminate them first",
                               details={"sessions": sorted(live)})
            s.delete(user)
            s.add(_audit("user_deleted", actor, user=name))
        self._profiles_changed()

    @staticmethod
    def _find_user(s: DbSession, name: str) -> m.User:
        user = s.scalar(select(m.User).where(m.User.name == name).options(*_user_loads()))
        if user is None:
            raise NotFound(f"no user named {name!r}")
        return user

    @staticmethod
    def _check_destinations(s: DbSession, destinations: Sequence[str] | None, where: str) -> None:
        if not destinations:
            return
        known = set(s.scalars(select(m.Node.name).where(m.Node.name.in_(list(destinations)))))
        problems = [{"field": f"{where}.allowed_destinations[{i}]", "message": f"unknown node '{d}'"}
                    for i, d in enumerate(destinations) if d not in known]
        if problems:
            raise ValidationFailed(problems)

    def _set_token(self, s: DbSession, user: m.User, token: Any) -> None:
        if token is KEEP:
            return
        for cred in list(user.credentials):
            if cred.kind is m.CredentialKind.TOKEN_PBKDF2:
                user.credentials.remove(cred)
        s.flush()
        if token is not None:
            user.credentials.append(m.Credential(kind=m.CredentialKind.TOKEN_PBKDF2,
                                                 value=pki.hash_token(token, self._token_iterations)))

    # ----------------------------------------------------------------- applications

    def applications(self, *, node: str | None = None, user: str | None = None) -> list[dict[str, Any]]:
        with self._read() as s:
            q = select(m.Application).options(*_app_loads()).order_by(m.Application.sae_id)
            if node is not None:
                q = q.join(m.Node, m.Application.node_id == m.Node.id).where(m.Node.name == node)
            if user is not None:
                q = q.join(m.User, m.Application.user_id == m.User.id).where(m.User.name == user)
            return [_application(a) for a in s.scalars(q)]

    def application(self, sae_id: str) -> dict[str, Any]:
        with self._read() as s:
            return _application(self._find_app(s, sae_id))

    def create_application(self, spec: ApplicationSpec, *, actor: str) -> dict[str, Any]:
        with self._write() as s:
            if s.scalar(select(m.Application.id).where(m.Application.sae_id == spec.sae_id)) is not None:
                raise Conflict(f"application {spec.sae_id!r} already exists", details={"sae_id": spec.sae_id})
            node = s.scalar(select(m.Node).where(m.Node.name == spec.node))
            user = s.scalar(select(m.User).where(m.User.name == spec.user))
            problems = []
            if node is None:
                problems.append({"field": "node", "message": f"unknown node '{spec.node}'"})
            if user is None:
                problems.append({"field": "user", "message": f"unknown user '{spec.user}'"})
            if problems:
                raise ValidationFailed(problems)
            app_id = spec.app_id
            if app_id is None:
                network = s.scalar(select(m.NetworkMeta.name).order_by(m.NetworkMeta.id).limit(1))
                app_id = netfile.derived_uuid(network, "application", spec.sae_id) if network else str(uuid.uuid4())
            if s.scalar(select(m.Application.id).where(m.Application.app_id == app_id)) is not None:
                raise Conflict(f"application id {app_id} is already used", details={"app_id": app_id})
            app = m.Application(app_id=app_id, sae_id=spec.sae_id, node=node, user=user, priority=spec.priority)
            s.add(app)
            if spec.cert_sha256 is not None:
                self._check_fingerprint_free(s, spec.cert_sha256)
                app.credentials.append(m.Credential(kind=m.CredentialKind.CERT_SHA256, value=spec.cert_sha256))
            s.add(_audit("application_created", actor, sae_id=spec.sae_id, node=spec.node, user=spec.user))
            s.flush()
            out = _application(self._find_app(s, spec.sae_id))
        self._profiles_changed()
        return out

    def delete_application(self, sae_id: str, *, actor: str) -> None:
        with self._write() as s:
            app = self._find_app(s, sae_id)
            live = s.scalars(select(m.Session.ksid).where(
                or_(m.Session.src_sae_id == sae_id, m.Session.dst_sae_id == sae_id),
                m.Session.state.in_(LIVE_STATES))).all()
            if live:
                raise Conflict(f"application {sae_id!r} has {len(live)} live session(s); terminate them first",
                               details={"sessions": sorted(live)})
            s.delete(app)
            s.add(_audit("application_deleted", actor, sae_id=sae_id))
        self._profiles_changed()

    def add_certificate(self, sae_id: str, fingerprint: str, *, actor: str) -> dict[str, Any]:
        with self._write() as s:
            app = self._find_app(s, sae_id)
            self._check_fingerprint_free(s, fingerprint)
            app.credentials.append(m.Credential(kind=m.CredentialKind.CERT_SHA256, value=fingerprint))
            s.add(_audit("certificate_registered", actor, sae_id=sae_id, fingerprint=fingerprint))
            s.flush()
            out = _application(self._find_app(s, sae_id))
        self._profiles_changed()
        return out

    def remove_certificate(self, sae_id: str, fingerprint: str, *, actor: str) -> None:
        with self._write() as s:
            app = self._find_app(s, sae_id)
            cred = next((c for c in app.credentials
                         if c.kind is m.CredentialKind.CERT_SHA256 and c.value.lower() == fingerprint), None)
            if cred is None:
                raise NotFound(f"no certificate {fingerprint} registered for application {sae_id!r}")
            app.credentials.remove(cred)
            s.add(_audit("certificate_removed", actor, sae_id=sae_id, fingerprint=fingerprint))
        self._profiles_changed()

    @staticmethod
    def _find_app(s: DbSession, sae_id: str) -> m.Application:
        app = s.scalar(select(m.Application).where(m.Application.sae_id == sae_id).options(*_app_loads()))
        if app is None:
            raise NotFound(f"no application (SAE) {sae_id!r}")
        return app

    @staticmethod
    def _check_fingerprint_free(s: DbSession, fingerprint: str) -> None:
        cred = s.scalar(select(m.Credential).where(m.Credential.kind == m.CredentialKind.CERT_SHA256,
                                                   func.lower(m.Credential.value) == fingerprint)
                        .options(selectinload(m.Credential.application), selectinload(m.Credential.user)))
        if cred is not None:
            owner = (f"application {cred.application.sae_id!r}" if cred.application is not None
                     else f"user {cred.user.name!r}" if cred.user is not None else "another owner")
            raise Conflict(f"certificate {fingerprint} is already registered to {owner}",
                           details={"fingerprint": fingerprint})

    # ----------------------------------------------------------------- sessions and routes

    def sessions(self, query: SessionQuery) -> Page:
        with self._read() as s:
            q = select(m.Session)
            if query.state == "live":
                q = q.where(m.Session.state.in_(LIVE_STATES))
            elif query.state is not None:
                q = q.where(m.Session.state == m.SessionState(query.state))
            if query.user is not None:
                q = q.where(m.Session.user == query.user)
            if query.node is not None:
                on_route = cast(m.Session.route, Text).like(f'%"{_like_escape(query.node)}"%', escape="\\")
                q = q.where(or_(m.Session.src_node == query.node, m.Session.dst_node == query.node, on_route))
            page = query.page
            if page.after is not None:
                q = q.where(m.Session.id > page.after[0] if page.order == "asc" else m.Session.id < page.after[0])
            q = q.order_by(m.Session.id.asc() if page.order == "asc" else m.Session.id.desc())
            rows = s.scalars(q.limit(page.limit + 1)).all()
            link_names = _link_names_by_ends(s)
            return _page(rows, page, lambda r: _session(r, link_names), lambda r: (r.id,))

    def session(self, ksid: str) -> dict[str, Any]:
        with self._read() as s:
            row = s.scalar(select(m.Session).where(m.Session.ksid == ksid))
            if row is None:
                raise NotFound(f"no session with KSID {ksid!r}")
            out = _session(row, _link_names_by_ends(s))
            events = s.scalars(select(m.Event).where(m.Event.ksid == ksid)
                               .order_by(m.Event.ts.desc(), m.Event.id.desc()).limit(RECENT_EVENTS)).all()
            out["recent_events"] = [_event(e) for e in events]
            return out

    def terminate_session(self, ksid: str, *, actor: str) -> dict[str, Any]:
        with self._read() as s:
            row = s.scalar(select(m.Session).where(m.Session.ksid == ksid))
            if row is None:
                raise NotFound(f"no session with KSID {ksid!r}")
            if row.state is m.SessionState.TERMINATED:
                raise Conflict(f"session {ksid} is already terminated", details={"state": row.state.value})
        if self._terminate is None:
            raise Unavailable("terminating a session needs the admission-control app, which this controller "
                              "does not run; nothing was changed")
        try:
            accepted = self._terminate(ksid)
        except Exception as exc:  # noqa: BLE001 - the app may time out or be stopping
            log.warning("terminate(%s) failed: %s", ksid, exc)
            raise Unavailable(f"admission control did not take the request ({type(exc).__name__}); "
                              "the session is unchanged, try again") from None
        if not accepted:
            raise Conflict(f"admission control holds no live session {ksid} (it may have just ended)",
                           details={"ksid": ksid})
        with self._write() as s:
            s.add(m.Event(element=ELEMENT, kind="session_terminate_requested", ksid=ksid, details={"by": actor}))
        return {"ksid": ksid, "status": "terminating",
                "message": "admission control is deleting the session on every key manager of its route"}

    def routes(self) -> list[dict[str, Any]]:
        with self._read() as s:
            rows = s.scalars(select(m.Session).where(m.Session.state.in_(ROUTED_STATES),
                                                     m.Session.route.is_not(None))
                             .order_by(m.Session.id)).all()
            link_names = _link_names_by_ends(s)
            out = []
            for r in rows:
                route = _route_of(r)
                if route is None:
                    continue
                out.append({
                    "ksid": r.ksid, "state": _enum_value(r.state), "user": r.user,
                    "src_node": r.src_node, "dst_node": r.dst_node, "src_sae_id": r.src_sae_id,
                    "dst_sae_id": r.dst_sae_id, "route": route, "links": _route_links(route, link_names),
                    "hops": max(0, len(route) - 2), "rate_bps": _num(r.rate_bps),
                    "reservations": _reservations(r.reservations)})
            return out

    # ----------------------------------------------------------------- events

    def events(self, query: EventQuery) -> Page:
        with self._read() as s:
            q = select(m.Event)
            for column, value in ((m.Event.node, query.node), (m.Event.ksid, query.ksid),
                                  (m.Event.kind, query.kind), (m.Event.element, query.element)):
                if value is not None:
                    q = q.where(column == value)
            if query.since is not None:
                q = q.where(m.Event.ts >= query.since)
            if query.until is not None:
                q = q.where(m.Event.ts < query.until)
            rows = _keyset(s, q, m.Event.ts, m.Event.id, query.page)
            return _page(rows, query.page, _event, lambda r: (r.ts, r.id))


# --------------------------------------------------------------------------- backend helpers


@contextlib.contextmanager
def _db_errors() -> Iterator[None]:
    """Database failures as API errors: conflicts 409, out-of-range values 400, outages 503."""
    try:
        yield
    except sa_exc.IntegrityError as exc:
        log.info("integrity error: %s", exc.orig)
        raise Conflict("the change conflicts with the current data (a concurrent change?); "
                       "read the resource and try again") from None
    except sa_exc.DataError as exc:
        log.warning("data error: %s", exc.orig)
        raise BadRequest("a value does not fit the database") from None
    except (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError, sa_exc.DisconnectionError) as exc:
        log.error("database unavailable: %s", exc)
        raise Unavailable("the database is unavailable; try again later") from None


def _audit(kind: str, actor: str, **details: Any) -> m.Event:
    return m.Event(element=ELEMENT, kind=kind, details={"by": actor, **details})


def _link_loads() -> tuple:
    return (selectinload(m.Link.src_node), selectinload(m.Link.dst_node), selectinload(m.Link.src_interface),
            selectinload(m.Link.dst_interface))


def _user_loads() -> tuple:
    return (selectinload(m.User.sla), selectinload(m.User.applications), selectinload(m.User.credentials))


def _app_loads() -> tuple:
    return (selectinload(m.Application.node), selectinload(m.Application.user),
            selectinload(m.Application.credentials))


def _sla_columns(sla: SLASpec) -> dict[str, Any]:
    return {"max_priority": sla.max_priority, "max_bps": sla.max_bps, "max_sessions": sla.max_sessions,
            "bucket_bits": sla.bucket_bits,
            "allowed_destinations": list(sla.allowed_destinations) if sla.allowed_destinations is not None else None}


def _user(u: m.User) -> dict[str, Any]:
    sla = None
    if u.sla is not None:
        dest = u.sla.allowed_destinations
        sla = {"max_priority": u.sla.max_priority, "max_bps": u.sla.max_bps, "max_sessions": u.sla.max_sessions,
               "bucket_bits": u.sla.bucket_bits,
               "allowed_destinations": [str(d) for d in dest] if isinstance(dest, list) else None}
    return {
        "name": u.name,
        "revoked": bool(u.revoked),
        "created_at": _iso(u.created_at),
        "sla": sla,
        "has_token": any(c.kind is m.CredentialKind.TOKEN_PBKDF2 and not c.revoked for c in u.credentials),
        "applications": sorted(a.sae_id for a in u.applications),
    }


def _application(a: m.Application) -> dict[str, Any]:
    return {
        "sae_id": a.sae_id,
        "app_id": a.app_id,
        "node": a.node.name,
        "user": a.user.name,
        "priority": int(a.priority or 0),
        "certificates": [{"fingerprint": c.value.lower(), "revoked": bool(c.revoked), "created_at": _iso(c.created_at)}
                         for c in sorted(a.credentials, key=lambda c: c.id or 0)
                         if c.kind is m.CredentialKind.CERT_SHA256],
        "has_token": any(c.kind is m.CredentialKind.TOKEN_PBKDF2 and not c.revoked for c in a.credentials),
    }


def _sample(x: m.LinkSample) -> dict[str, Any]:
    return {"ts": _iso(x.ts), "skr_bps": _num(x.skr_bps), "eskr_bps": _num(x.eskr_bps), "qber": _num(x.qber),
            "pool_bits_src": x.pool_bits_src, "pool_bits_dst": x.pool_bits_dst,
            "reserved_bps": _num(x.reserved_bps)}


def _event(e: m.Event) -> dict[str, Any]:
    details = _clean_json(e.details)
    return {"id": e.id, "ts": _iso(e.ts), "element": e.element, "node": e.node, "ksid": e.ksid, "kind": e.kind,
            "details": details if isinstance(details, dict) else None}


def _route_of(r: m.Session) -> list[str] | None:
    route = r.route
    if isinstance(route, list) and route and all(isinstance(x, str) for x in route):
        return list(route)
    return None


def _reservations(value: Any) -> dict[str, float] | None:
    if not isinstance(value, dict):
        return None
    out = {}
    for key, bps in value.items():
        n = _num(bps) if isinstance(bps, (int, float)) else None
        if n is not None:
            out[str(key)] = n
    return out


def _route_links(route: Sequence[str], link_names: Mapping[frozenset, str]) -> list[str | None]:
    return [link_names.get(frozenset((u, v))) for u, v in zip(route, route[1:])]


def _link_names_by_ends(s: DbSession) -> dict[frozenset, str]:
    src, dst = m.Node.__table__.alias("src"), m.Node.__table__.alias("dst")
    rows = s.execute(select(m.Link.name, src.c.name, dst.c.name)
                     .join(src, m.Link.src_node_id == src.c.id).join(dst, m.Link.dst_node_id == dst.c.id)
                     .where(m.Link.kind == m.LinkKind.PHYS)).all()
    return {frozenset((a, b)): name for name, a, b in rows}


def _live_sessions_by_link(s: DbSession) -> dict[str, list[str]]:
    """Link name -> KSIDs of the live sessions whose route or reservations use it."""
    link_names = _link_names_by_ends(s)
    out: dict[str, list[str]] = {}
    rows = s.execute(select(m.Session.ksid, m.Session.route, m.Session.reservations)
                     .where(m.Session.state.in_(LIVE_STATES))).all()
    for ksid, route, reservations in rows:
        names = set(_reservations(reservations) or {})
        if isinstance(route, list) and all(isinstance(x, str) for x in route):
            names |= {n for n in _route_links(route, link_names) if n is not None}
        for name in names:
            out.setdefault(name, []).append(ksid)
    return out


def _last_samples(s: DbSession, link_ids: list[int]) -> dict[int, m.LinkSample]:
    if not link_ids:
        return {}
    latest = (select(m.LinkSample.link_id, func.max(m.LinkSample.ts).label("ts"))
              .where(m.LinkSample.link_id.in_(link_ids)).group_by(m.LinkSample.link_id).subquery())
    rows = s.scalars(select(m.LinkSample).join(latest, and_(m.LinkSample.link_id == latest.c.link_id,
                                                            m.LinkSample.ts == latest.c.ts))).all()
    out: dict[int, m.LinkSample] = {}
    for row in rows:
        if row.link_id not in out or row.id > out[row.link_id].id:
            out[row.link_id] = row
    return out


def _session(r: m.Session, link_names: Mapping[frozenset, str]) -> dict[str, Any]:
    route = _route_of(r)
    qos = _clean_json(r.qos)
    return {
        "ksid": r.ksid,
        "interface": r.interface,
        "state": _enum_value(r.state),
        "src_sae_id": r.src_sae_id,
        "dst_sae_id": r.dst_sae_id,
        "src_node": r.src_node,
        "dst_node": r.dst_node,
        "user": r.user,
        "qos": qos if isinstance(qos, dict) else {},
        "priority": int(r.priority or 0),
        "route": route,
        "links": _route_links(route, link_names) if route is not None else None,
        "reservations": _reservations(r.reservations),
        "rate_bps": _num(r.rate_bps),
        "inactivity_timeout_s": _num(r.inactivity_timeout_s),
        "created_at": _iso(r.created_at),
        "updated_at": _iso(r.updated_at),
        "last_activity": _iso(r.last_activity),
        "expires_at": _iso(r.expires_at),
        "terminated_at": _iso(r.terminated_at),
        "reason": r.reason,
    }


def _keyset(s: DbSession, q: Any, ts_col: Any, id_col: Any, page: PageQuery) -> list:
    """One page of ``q`` ordered by (ts, id), after ``page.after``; one row more than the limit."""
    if page.after is not None:
        ts, row_id = page.after
        if page.order == "asc":
            q = q.where(or_(ts_col > ts, and_(ts_col == ts, id_col > row_id)))
        else:
            q = q.where(or_(ts_col < ts, and_(ts_col == ts, id_col < row_id)))
    if page.order == "asc":
        q = q.order_by(ts_col.asc(), id_col.asc())
    else:
        q = q.order_by(ts_col.desc(), id_col.desc())
    return list(s.scalars(q.limit(page.limit + 1)).all())


def _page(rows: Sequence[Any], page: PageQuery, render: Callable[[Any], dict], position: Callable[[Any], tuple]
          ) -> Page:
    more = len(rows) > page.limit
    rows = rows[:page.limit]
    after = None
    if more and rows:
        after = tuple(_utc(p) if isinstance(p, dt.datetime) else p for p in position(rows[-1]))
    return Page([render(r) for r in rows], after)


def _utc(value: dt.datetime) -> dt.datetime:
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.astimezone(dt.timezone.utc)


__all__ = [
    "API_PREFIX", "ADMIN", "READ", "ROLES", "KEEP", "ApiError", "BadRequest", "InvalidParameter", "ValidationFailed",
    "Unauthorized", "Forbidden", "NotFound", "Conflict", "Unavailable", "SLASpec", "UserSpec", "UserPatch",
    "ApplicationSpec", "PageQuery", "SampleQuery", "EventQuery", "SessionQuery", "Page", "RestBackend",
    "TokenEntry", "Principal", "TokenFileError", "TokenAuth", "DbRestBackend", "create_rest_app", "parse_user",
    "parse_user_patch", "parse_application", "parse_certificate", "parse_json", "parse_time", "encode_cursor",
    "decode_cursor",
]
