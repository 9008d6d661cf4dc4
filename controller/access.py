"""Access control: who is asking for keys, decided from the user-profile database.

A key manager that receives an ETSI 004 OPEN_CONNECT or an ETSI 014 request asks access
control to authenticate the caller before anything else (DESIGN.md, session life cycle,
step 2). The caller proves its identity with its mutual-TLS client certificate (the key
manager passes the certificate's SHA-256 fingerprint) or, in development, with a token
whose salted PBKDF2 hash is stored as a credential. The chain is

    certificate fingerprint -> application (SAE) -> user

and the decision also checks that the SAE the caller claims is the one its certificate (or
token) belongs to, and that the application is homed at the key manager that asks.

``UserProfiles`` is an immutable snapshot of the user-profile tables (users, SLAs,
applications, credentials); ``UserProfiles.load`` reads it from a database session and the
shell swaps in a new one with ``AccessControl.refresh`` whenever the tables change.
``AccessControl`` itself does no I/O and never reads the clock: every call takes ``now``
and returns an ``AccessDecision`` carrying the ``Event`` row to record. Events never carry
tokens or token hashes; a certificate fingerprint is public and is recorded.
"""
from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Iterable, Mapping

from sqlalchemy import select
from sqlalchemy.orm import Session as DbSession
from sqlalchemy.orm import selectinload

from db import models as m
from qkdsdn.pki import verify_token

ELEMENT = "access_control"
_FINGERPRINT_RE = re.compile(r"^[0-9a-f]{64}$")


# --------------------------------------------------------------------------- snapshot


@dataclass(frozen=True)
class SLAProfile:
    max_priority: int
    max_bps: int
    max_sessions: int
    bucket_bits: int
    # Node names; None means every destination is allowed.
    allowed_destinations: frozenset[str] | None = None

    def allows(self, node: str) -> bool:
        return self.allowed_destinations is None or node in self.allowed_destinations


@dataclass(frozen=True)
class UserProfile:
    name: str
    sla: SLAProfile | None
    revoked: bool = False


@dataclass(frozen=True)
class ApplicationProfile:
    sae_id: str
    node: str  # home node name
    user: str  # owning user name
    app_id: str = ""
    priority: int = 0


@dataclass(frozen=True)
class CredentialProfile:
    kind: m.CredentialKind
    value: str  # lower-case hex fingerprint, or "pbkdf2_sha256$..." token hash
    # Exactly one owner, as in the database.
    application: str | None = None  # SAE ID
    user: str | None = None  # user name
    revoked: bool = False

    def __post_init__(self) -> None:
        if (self.application is None) == (self.user is None):
            raise ValueError("a credential belongs to exactly one application or one user")
        if self.kind is m.CredentialKind.CERT_SHA256 and not _FINGERPRINT_RE.match(self.value):
            raise ValueError(f"certificate credential {self.value!r} is not a lower-case SHA-256 hex digest")


class UserProfiles:
    """An immutable snapshot of users, SLAs, applications and credentials."""

    def __init__(self, users: Iterable[UserProfile] = (), applications: Iterable[ApplicationProfile] = (),
                 credentials: Iterable[CredentialProfile] = ()):
        self.users: Mapping[str, UserProfile] = MappingProxyType({u.name: u for u in users})
        self.applications: Mapping[str, ApplicationProfile] = MappingProxyType(
            {a.sae_id: a for a in applications})
        certificates: dict[str, CredentialProfile] = {}
        tokens: dict[tuple[str, str], list[CredentialProfile]] = {}
        for c in credentials:
            if c.kind is m.CredentialKind.CERT_SHA256:
                if c.value in certificates:
                    raise ValueError(f"certificate fingerprint {c.value} is registered twice")
                certificates[c.value] = c
            else:
                owner = ("application", c.application) if c.application is not None else ("user", c.user)
                tokens.setdefault(owner, []).append(c)  # type: ignore[arg-type]
        self._certificates = MappingProxyType(certificates)
        self._tokens = MappingProxyType({k: tuple(v) for k, v in tokens.items()})

    def __repr__(self) -> str:
        return (f"UserProfiles(users={len(self.users)}, applications={len(self.applications)}, "
                f"certificates={len(self._certificates)}, tokens={sum(map(len, self._tokens.values()))})")

    @classmethod
    def load(cls, session: DbSession) -> "UserProfiles":
        """Read the user-profile tables through ``session`` (one consistent read)."""
        users = [
            UserProfile(name=u.name, revoked=bool(u.revoked), sla=None if u.sla is None else SLAProfile(
                max_priority=u.sla.max_priority, max_bps=u.sla.max_bps, max_sessions=u.sla.max_sessions,
                bucket_bits=u.sla.bucket_bits,
                allowed_destinations=None if u.sla.allowed_destinations is None
                else frozenset(u.sla.allowed_destinations)))
            for u in session.scalars(select(m.User).options(selectinload(m.User.sla)))
        ]
        apps = [
            ApplicationProfile(sae_id=a.sae_id, node=a.node.name, user=a.user.name, app_id=a.app_id,
                               priority=a.priority or 0)
            for a in session.scalars(select(m.Application).options(selectinload(m.Application.node),
                                                                   selectinload(m.Application.user)))
        ]
        creds = [
            CredentialProfile(kind=c.kind, value=c.value.lower() if c.kind is m.CredentialKind.CERT_SHA256
                              else c.value,
                              application=c.application.sae_id if c.application is not None else None,
                              user=c.user.name if c.user is not None else None, revoked=bool(c.revoked))
            for c in session.scalars(select(m.Credential).options(selectinload(m.Credential.application),
                                                                  selectinload(m.Credential.user)))
        ]
        return cls(users, apps, creds)

    def certificate(self, fingerprint: str) -> CredentialProfile | None:
        return self._certificates.get(fingerprint)

    def tokens_of(self, application: ApplicationProfile) -> tuple[CredentialProfile, ...]:
        """Token credentials that may speak for ``application``: its own, then its user's."""
        return (self._tokens.get(("application", application.sae_id), ())
                + self._tokens.get(("user", application.user), ()))

    def sla_of(self, user: str) -> SLAProfile | None:
        profile = self.users.get(user)
        return profile.sla if profile is not None else None


# --------------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class AccessDecision:
    ok: bool
    user: str | None  # user name, when known
    application: str | None  # SAE ID, when known
    reason: str
    event: m.Event

    def __bool__(self) -> bool:
        return self.ok


def normalize_fingerprint(value: str) -> str | None:
    """Lower-case hex without separators, or None when ``value`` is not a SHA-256 fingerprint.

    Accepts the common spellings (``AB:CD:...``, upper case, surrounding blanks).
    """
    if not isinstance(value, str):
        return None
    cleaned = value.strip().replace(":", "").lower()
    return cleaned if _FINGERPRINT_RE.match(cleaned) else None


class AccessControl:
    """Authenticates applications against a ``UserProfiles`` snapshot."""

    def __init__(self, profiles: UserProfiles):
        self._profiles = profiles

    @property
    def profiles(self) -> UserProfiles:
        return self._profiles

    def refresh(self, profiles: UserProfiles) -> None:
        """Decide from ``profiles`` from now on (e.g. after a user or credential was revoked)."""
        self._profiles = profiles

    def authenticate(self, sae_id: str, *, cert_fingerprint: str | None = None, token: str | bytes | None = None,
                     node: str | None = None, now: dt.datetime) -> AccessDecision:
        """Decide whether the caller may act as application ``sae_id``.

        ``cert_fingerprint``: SHA-256 of the caller's client certificate (mutual TLS).
        ``token``: a development token, checked against salted PBKDF2 hashes.
        When both are given, both must hold. ``node``: name of the key manager that asks; the
        application must be homed there. None skips that check (a caller that is not a key
        manager, e.g. an operator tool checking a credential).

        The ``reason`` of a refusal is meant for logs and operators; the key manager should
        answer the application with a plain refusal (ETSI 014: 401 without body).
        """
        p = self._profiles
        details: dict[str, Any] = {"sae_id": sae_id,
                                   "method": _method(cert_fingerprint, token)}
        if node is not None:
            details["node"] = node

        def refuse(reason: str, user: str | None = None) -> AccessDecision:
            return self._decision(False, user, None, reason, details, node, now)

        if cert_fingerprint is None and token is None:
            return refuse("no credential presented (client certificate or token)")

        app = p.applications.get(sae_id)
        if cert_fingerprint is not None:
            fp = normalize_fingerprint(cert_fingerprint)
            if fp is None:
                return refuse("malformed certificate fingerprint (expected SHA-256 hex)")
            details["fingerprint"] = fp
            cred = p.certificate(fp)
            if cred is None:
                return refuse("unknown client certificate")
            if cred.application is not None and cred.application != sae_id:
                return refuse(f"certificate belongs to SAE {cred.application!r}, not {sae_id!r}")
            if cred.user is not None and (app is None or app.user != cred.user):
                return refuse(f"certificate belongs to user {cred.user!r}, who does not own SAE {sae_id!r}",
                              cred.user)
            if cred.revoked:
                return refuse("client certificate revoked")

        if app is None:
            return refuse(f"unknown SAE {sae_id!r}")

        if token is not None:
            raw = token.encode("utf-8") if isinstance(token, str) else bytes(token)
            if not raw:
                return refuse("empty token", app.user)
            candidates = p.tokens_of(app)
            if not candidates:
                return refuse(f"no token registered for SAE {sae_id!r} or its user", app.user)
            match = next((c for c in candidates if verify_token(raw, c.value)), None)
            if match is None:
                return refuse("token does not match", app.user)
            if match.revoked:
                return refuse("token revoked", app.user)

        user = p.users.get(app.user)
        if user is None:
            return refuse(f"SAE {sae_id!r} belongs to unknown user {app.user!r}")
        if user.revoked:
            return refuse(f"user {user.name!r} revoked", user.name)
        if node is not None and app.node != node:
            return refuse(f"SAE {sae_id!r} is homed at {app.node!r}, not at the asking key manager {node!r}",
                          user.name)
        return self._decision(True, user.name, app.sae_id, "authenticated", details, node, now)

    @staticmethod
    def _decision(ok: bool, user: str | None, application: str | None, reason: str, details: dict[str, Any],
                  node: str | None, now: dt.datetime) -> AccessDecision:
        details = dict(details, reason=reason)
        if user is not None:
            details["user"] = user
        event = m.Event(ts=now, element=ELEMENT, node=node, ksid=None,
                        kind="auth_accepted" if ok else "auth_rejected", details=details)
        return AccessDecision(ok, user, application, reason, event)


def _method(cert_fingerprint: str | None, token: object) -> str:
    if cert_fingerprint is not None and token is not None:
        return "certificate+token"
    if cert_fingerprint is not None:
        return "certificate"
    if token is not None:
        return "token"
    return "none"
