"""Access control: certificate fingerprint -> application (SAE) -> user, tokens, refusals, events."""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from sqlalchemy import select

from controller.access import (AccessControl, ApplicationProfile, CredentialProfile, SLAProfile, UserProfile,
                               UserProfiles, normalize_fingerprint)
from db import models as m
from db.bootstrap import load_network
from db.database import make_engine, session_factory, upgrade
from db.netfile import load
from qkdsdn.pki import hash_token
from dbutil import db_url  # noqa: F401  (fixture)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NOW = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.timezone.utc)
ITER = 1000  # fast hashes in tests; production uses qkdsdn.pki.TOKEN_ITERATIONS

# Certificate fingerprints: "aaa...", "bbb...", ... (64 hex digits each).
FP = {sae: f"{i:x}" * 64 for i, sae in enumerate(["SAE-KM0", "SAE-KM1", "SAE-KM2", "SAE-KM3"], start=10)}
ALICE_TOKEN = "alice-dev-token"
BOB_TOKEN = "bob-dev-token"


def fingerprint(sae: str) -> str:
    return FP[sae]


@pytest.fixture
def db_sessions(db_url):  # noqa: F811
    """paper-poc loaded, with certificate credentials for SAE-KM0..3 and tokens for alice and bob."""
    engine = make_engine(db_url)
    upgrade(engine)
    sessions = session_factory(engine)
    with sessions.begin() as s:
        load_network(s, load(EXAMPLES / "paper-poc.yaml"))
        apps = {a.sae_id: a for a in s.scalars(select(m.Application))}
        users = {u.name: u for u in s.scalars(select(m.User))}
        for sae, fp in FP.items():
            apps[sae].credentials.append(m.Credential(kind=m.CredentialKind.CERT_SHA256, value=fp))
        users["alice"].credentials.append(m.Credential(kind=m.CredentialKind.TOKEN_PBKDF2,
                                                       value=hash_token(ALICE_TOKEN, ITER)))
        users["bob"].credentials.append(m.Credential(kind=m.CredentialKind.TOKEN_PBKDF2,
                                                     value=hash_token(BOB_TOKEN, ITER)))
    yield sessions
    engine.dispose()


@pytest.fixture
def access(db_sessions):
    with db_sessions() as s:
        return AccessControl(UserProfiles.load(s))


def refreshed(access: AccessControl, db_sessions) -> AccessControl:
    with db_sessions() as s:
        access.refresh(UserProfiles.load(s))
    return access


# ------------------------------------------------------------------ loading


def test_profiles_load_from_the_database(access):
    p = access.profiles
    assert sorted(p.users) == ["alice", "bob", "carol"]
    assert p.users["carol"].sla == SLAProfile(max_priority=3, max_bps=32000, max_sessions=2, bucket_bits=32768,
                                              allowed_destinations=frozenset({"KM0", "KM1", "KM2", "KM3"}))
    assert p.users["alice"].sla.allowed_destinations is None
    app = p.applications["SAE-KM4"]
    assert (app.node, app.user, app.priority) == ("KM4", "alice", 5)
    assert p.certificate(FP["SAE-KM2"]).application == "SAE-KM2"
    assert [c.user for c in p.tokens_of(p.applications["SAE-KM0"])] == ["alice"]


# ------------------------------------------------------------------ certificates


def test_certificate_maps_to_sae_and_user(access):
    d = access.authenticate("SAE-KM2", cert_fingerprint=fingerprint("SAE-KM2"), node="KM2", now=NOW)
    assert d.ok and bool(d)
    assert (d.user, d.application, d.reason) == ("carol", "SAE-KM2", "authenticated")
    e = d.event
    assert (e.element, e.kind, e.node, e.ksid, e.ts) == ("access_control", "auth_accepted", "KM2", None, NOW)
    assert e.details == {"sae_id": "SAE-KM2", "method": "certificate", "node": "KM2",
                         "fingerprint": fingerprint("SAE-KM2"), "reason": "authenticated", "user": "carol"}


def test_fingerprint_spellings_are_normalised(access):
    fp = fingerprint("SAE-KM1")
    colons = ":".join(fp[i:i + 2] for i in range(0, 64, 2)).upper()
    assert normalize_fingerprint(f"  {colons} ") == fp
    d = access.authenticate("SAE-KM1", cert_fingerprint=colons, node="KM1", now=NOW)
    assert d.ok and d.user == "bob"


def test_certificate_of_another_sae_is_refused(access):
    d = access.authenticate("SAE-KM1", cert_fingerprint=fingerprint("SAE-KM0"), node="KM1", now=NOW)
    assert not d.ok and d.application is None
    assert d.reason == "certificate belongs to SAE 'SAE-KM0', not 'SAE-KM1'"
    assert d.event.kind == "auth_rejected" and d.event.details["reason"] == d.reason


def test_application_must_be_homed_at_the_asking_node(access):
    d = access.authenticate("SAE-KM0", cert_fingerprint=fingerprint("SAE-KM0"), node="KM1", now=NOW)
    assert not d.ok
    assert d.reason == "SAE 'SAE-KM0' is homed at 'KM0', not at the asking key manager 'KM1'"
    assert d.user == "alice"  # known, but refused
    assert d.event.node == "KM1"


def test_unknown_and_malformed_fingerprints_are_refused(access):
    d = access.authenticate("SAE-KM0", cert_fingerprint="ab" * 32, node="KM0", now=NOW)
    assert not d.ok and d.reason == "unknown client certificate"
    d = access.authenticate("SAE-KM0", cert_fingerprint="not-a-fingerprint", node="KM0", now=NOW)
    assert not d.ok and d.reason.startswith("malformed certificate fingerprint")
    assert "fingerprint" not in d.event.details


def test_sae_without_certificate_credential_is_refused(access):
    # SAE-KM4 exists but has no certificate registered; SAE-KM0's certificate cannot speak for it.
    d = access.authenticate("SAE-KM4", cert_fingerprint=fingerprint("SAE-KM0"), node="KM4", now=NOW)
    assert not d.ok and "belongs to SAE 'SAE-KM0'" in d.reason


def test_revoked_user_is_refused(access, db_sessions):
    assert access.authenticate("SAE-KM2", cert_fingerprint=fingerprint("SAE-KM2"), node="KM2", now=NOW).ok
    with db_sessions.begin() as s:
        s.scalars(select(m.User).where(m.User.name == "carol")).one().revoked = True
    # The snapshot decides until it is refreshed.
    assert access.authenticate("SAE-KM2", cert_fingerprint=fingerprint("SAE-KM2"), node="KM2", now=NOW).ok
    d = refreshed(access, db_sessions).authenticate("SAE-KM3", cert_fingerprint=fingerprint("SAE-KM3"),
                                                    node="KM3", now=NOW)
    assert not d.ok and d.reason == "user 'carol' revoked" and d.user == "carol"


def test_revoked_certificate_is_refused(access, db_sessions):
    with db_sessions.begin() as s:
        s.scalars(select(m.Credential).where(m.Credential.value == fingerprint("SAE-KM1"))).one().revoked = True
    refreshed(access, db_sessions)
    d = access.authenticate("SAE-KM1", cert_fingerprint=fingerprint("SAE-KM1"), node="KM1", now=NOW)
    assert not d.ok and d.reason == "client certificate revoked"
    # Other applications are unaffected.
    assert access.authenticate("SAE-KM0", cert_fingerprint=fingerprint("SAE-KM0"), node="KM0", now=NOW).ok


def test_no_credential_is_refused(access):
    d = access.authenticate("SAE-KM0", node="KM0", now=NOW)
    assert not d.ok and d.reason.startswith("no credential presented")
    assert d.event.details["method"] == "none"


# ------------------------------------------------------------------ tokens


def test_token_of_the_user_authenticates(access):
    d = access.authenticate("SAE-KM4", token=ALICE_TOKEN, node="KM4", now=NOW)
    assert d.ok and (d.user, d.application) == ("alice", "SAE-KM4")
    assert d.event.details["method"] == "token"


def test_wrong_token_is_refused(access):
    d = access.authenticate("SAE-KM0", token="guess", node="KM0", now=NOW)
    assert not d.ok and d.reason == "token does not match"
    # Bob's valid token does not speak for alice's application.
    d = access.authenticate("SAE-KM0", token=BOB_TOKEN, node="KM0", now=NOW)
    assert not d.ok and d.reason == "token does not match"


def test_user_without_token_and_unknown_sae(access):
    d = access.authenticate("SAE-KM2", token=ALICE_TOKEN, node="KM2", now=NOW)
    assert not d.ok and d.reason == "no token registered for SAE 'SAE-KM2' or its user"
    d = access.authenticate("SAE-NOPE", token=ALICE_TOKEN, node="KM0", now=NOW)
    assert not d.ok and d.reason == "unknown SAE 'SAE-NOPE'"


def test_revoked_token_is_refused(access, db_sessions):
    with db_sessions.begin() as s:
        cred = s.scalars(select(m.Credential).where(m.Credential.kind == m.CredentialKind.TOKEN_PBKDF2,
                                                    m.Credential.user.has(name="bob"))).one()
        cred.revoked = True
    d = refreshed(access, db_sessions).authenticate("SAE-KM1", token=BOB_TOKEN, node="KM1", now=NOW)
    assert not d.ok and d.reason == "token revoked"


def test_certificate_and_token_must_both_hold(access):
    ok = access.authenticate("SAE-KM0", cert_fingerprint=fingerprint("SAE-KM0"), token=ALICE_TOKEN, node="KM0",
                             now=NOW)
    assert ok.ok and ok.event.details["method"] == "certificate+token"
    bad = access.authenticate("SAE-KM0", cert_fingerprint=fingerprint("SAE-KM0"), token="guess", node="KM0",
                              now=NOW)
    assert not bad.ok and bad.reason == "token does not match"


def test_events_never_carry_tokens_or_hashes(access):
    profiles = access.profiles
    hashes = [c.value for sae in ("SAE-KM0", "SAE-KM1") for c in profiles.tokens_of(profiles.applications[sae])]
    decisions = [
        access.authenticate("SAE-KM0", token=ALICE_TOKEN, node="KM0", now=NOW),
        access.authenticate("SAE-KM0", token=BOB_TOKEN, node="KM0", now=NOW),
        access.authenticate("SAE-KM1", token=BOB_TOKEN, node="KM0", now=NOW),
        access.authenticate("SAE-KM0", cert_fingerprint=fingerprint("SAE-KM0"), token="guess", node="KM0", now=NOW),
    ]
    assert [d.ok for d in decisions] == [True, False, False, False]
    for d in decisions:
        text = json.dumps(d.event.details) + d.reason
        for secret in (ALICE_TOKEN, BOB_TOKEN, "guess", *hashes, *(h.split("$")[3] for h in hashes)):
            assert secret not in text
        assert d.event.element == "access_control"


def test_event_rows_persist(access, db_sessions):
    d = access.authenticate("SAE-KM0", cert_fingerprint=fingerprint("SAE-KM0"), node="KM0", now=NOW)
    with db_sessions.begin() as s:
        s.add(d.event)
    with db_sessions() as s:
        row = s.scalars(select(m.Event).where(m.Event.element == "access_control")).one()
        assert row.kind == "auth_accepted" and row.details["user"] == "alice"


# ------------------------------------------------------------------ snapshot built directly


def test_user_owned_certificate_and_node_check_skipped_without_node():
    profiles = UserProfiles(
        users=[UserProfile("dave", SLAProfile(1, 1000, 1, 4096))],
        applications=[ApplicationProfile("SAE-D", node="N1", user="dave"),
                      ApplicationProfile("SAE-E", node="N2", user="erin")],
        credentials=[CredentialProfile(m.CredentialKind.CERT_SHA256, "c" * 64, user="dave")])
    ac = AccessControl(profiles)
    assert ac.authenticate("SAE-D", cert_fingerprint="c" * 64, now=NOW).ok  # no node: no home check
    d = ac.authenticate("SAE-E", cert_fingerprint="c" * 64, node="N2", now=NOW)
    assert not d.ok and d.reason == "certificate belongs to user 'dave', who does not own SAE 'SAE-E'"
    d = ac.authenticate("SAE-E", token="x", node="N2", now=NOW)
    assert not d.ok and d.reason == "no token registered for SAE 'SAE-E' or its user"


def test_snapshot_rejects_inconsistent_credentials():
    with pytest.raises(ValueError):
        CredentialProfile(m.CredentialKind.CERT_SHA256, "c" * 64)
    with pytest.raises(ValueError):
        CredentialProfile(m.CredentialKind.CERT_SHA256, "C" * 64, user="dave")
    with pytest.raises(ValueError):
        UserProfiles(credentials=[CredentialProfile(m.CredentialKind.CERT_SHA256, "c" * 64, user="a"),
                                  CredentialProfile(m.CredentialKind.CERT_SHA256, "c" * 64, user="b")])
