"""The controller's operator REST API (controller.rest) against a real database.

Every response any test gets goes through ``Api.call``, which checks it against the OpenAPI
document the app serves: the status must be documented for the operation, the JSON body must
match the documented schema, and a request body that the documented schema rejects must not
succeed. Runs on SQLite and (QKDSDN_TEST_POSTGRES_URL) PostgreSQL.
"""
from __future__ import annotations

import datetime as dt
import json
import random
import string
import threading
import urllib.parse
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_spec
from prometheus_client.parser import text_string_to_metric_families
from referencing import Registry
from referencing.jsonschema import DRAFT202012
from sqlalchemy import func, select

from controller.monitoring import MonitoringElement, render_prometheus
from controller.openapi import openapi_document
from controller.rest import (ADMIN, API_PREFIX, READ, DbRestBackend, TokenAuth, TokenEntry, TokenFileError,
                             Unauthorized, create_rest_app, decode_cursor, encode_cursor)
from db import models as m
from db import netfile
from db.bootstrap import load_network
from db.database import make_engine, session_factory, upgrade
from dbutil import db_url  # noqa: F401  (fixture)
from qkdsdn import pki
from qkdsdn.httpserver import PEER_CERT_KEY, HTTPServer, TLSConfig, https_session

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "paper-poc.yaml"
ITER = 1000  # PBKDF2 iterations of the tests' hashes (production: pki.TOKEN_ITERATIONS)
ADMIN_TOKEN = "admin-token-0123456789abcdef"
READ_TOKEN = "read-token-0123456789abcdef"
T0 = dt.datetime(2025, 3, 1, 12, 0, 0, tzinfo=dt.timezone.utc)

KSID_01 = "11111111-1111-4111-8111-111111111111"  # KM0 -> KM1, active, adjacent
KSID_23 = "22222222-2222-4222-8222-222222222222"  # KM2 -> KM3, active, relayed through KM0
KSID_45 = "44444444-4444-4444-8444-444444444444"  # KM4 -> KM5, pending
KSID_OLD = "99999999-9999-4999-8999-999999999999"  # KM0 -> KM1, terminated
FP_A = "ab" * 32
FP_B = "cd" * 32


# --------------------------------------------------------------------------- the database


def seed(sessions) -> None:
    with sessions.begin() as s:
        load_network(s, netfile.load(EXAMPLE))
    with sessions.begin() as s:
        links = {link.name: link for link in s.scalars(select(m.Link))}
        for name, link in links.items():
            link.status = m.LinkStatus.ACTIVE
            link.eskr_bps = 200000.0
        links["L01"].skr_bps, links["L01"].qber = 190000.0, 0.021
        links["L01"].reserved_bps, links["L01"].session_count = 64000.0, 1
        for name in ("L02", "L03"):
            links[name].reserved_bps, links[name].session_count = 32000.0, 1
        links["L45"].status = m.LinkStatus.OFF
        for i in range(5):
            s.add(m.LinkSample(link=links["L01"], ts=T0 + dt.timedelta(seconds=10 * i), skr_bps=180000.0 + i,
                               qber=0.02, pool_bits_src=4096 * i, pool_bits_dst=4096 * i, reserved_bps=64000.0))
        for i in range(3):
            s.add(m.LinkSample(link=links["L02"], ts=T0 + dt.timedelta(seconds=10 * i), skr_bps=150000.0,
                               qber=0.03))

        def session(ksid, src, dst, user, state, route, reservations, created):
            s.add(m.Session(ksid=ksid, interface="004", src_sae_id=f"SAE-{src}", dst_sae_id=f"SAE-{dst}",
                            src_node=src, dst_node=dst, user=user, state=state, route=route,
                            reservations=reservations, rate_bps=64000.0 if route else None,
                            qos={"Key_chunk_size": 256, "Max_bps": 64000, "Priority": 5, "Timeout": 5000},
                            priority=5, inactivity_timeout_s=60.0, created_at=created, updated_at=created,
                            terminated_at=created + dt.timedelta(seconds=30)
                            if state is m.SessionState.TERMINATED else None,
                            reason="closed by SAE-KM0" if state is m.SessionState.TERMINATED else None))

        session(KSID_OLD, "KM0", "KM1", "alice", m.SessionState.TERMINATED, ["KM0", "KM1"], None, T0)
        session(KSID_01, "KM0", "KM1", "alice", m.SessionState.ACTIVE, ["KM0", "KM1"], {"L01": 64000.0},
                T0 + dt.timedelta(seconds=1))
        session(KSID_23, "KM2", "KM3", "carol", m.SessionState.ACTIVE, ["KM2", "KM0", "KM3"],
                {"L02": 32000.0, "L03": 32000.0}, T0 + dt.timedelta(seconds=2))
        session(KSID_45, "KM4", "KM5", "alice", m.SessionState.PENDING, None, None, T0 + dt.timedelta(seconds=3))
        # 20 events: key-manager events of both live sessions, admission events, and an alarm.
        kinds = ["request_arrival", "authenticated", "configured", "key_available", "key_returned"]
        k = 0
        for ksid, node in ((KSID_01, "KM0"), (KSID_01, "KM1"), (KSID_23, "KM2"), (KSID_23, "KM0")):
            for kind in kinds[:4] if node == "KM0" and ksid == KSID_23 else kinds:
                s.add(m.Event(ts=T0 + dt.timedelta(seconds=k), element="key_manager", node=node, ksid=ksid,
                              kind=kind, details={"n": k}))
                k += 1
        s.add(m.Event(ts=T0 + dt.timedelta(seconds=k), element="admission_control", node=None, ksid=KSID_23,
                      kind="session_active", details={"route": ["KM2", "KM0", "KM3"]}))
        # Two events at the very same instant: paging must neither lose nor repeat one.
        s.add(m.Event(ts=T0 + dt.timedelta(seconds=k), element="monitoring", node=None, ksid=None,
                      kind="link_alarm", details={"link": "L45", "severity": "MAJOR"}))


class Terminator:
    """Stands in for the admission app's terminate callable: records requests, answers as told."""

    def __init__(self):
        self.calls: list[str] = []
        self.answer = True
        self.error: Exception | None = None

    def __call__(self, ksid: str) -> bool:
        self.calls.append(ksid)
        if self.error is not None:
            raise self.error
        return self.answer


# --------------------------------------------------------------------------- the spec checker


class SpecChecker:
    """Checks real responses against the OpenAPI document."""

    BASE = "urn:qkdsdn:openapi"

    def __init__(self, doc: dict):
        self.doc = doc
        self.registry = Registry().with_resource(self.BASE, DRAFT202012.create_resource(doc))
        self.templates = []
        for path in doc["paths"]:
            pattern = "^" + "".join(
                "[^/]+" if part.startswith("{") else urllib.parse.quote(part)
                for part in _split_template(path)) + "$"
            self.templates.append((path, pattern))
        self.seen: set[tuple[str, str, int]] = set()

    def validator(self, pointer: str) -> Draft202012Validator:
        ref = f"{self.BASE}#{urllib.parse.quote(pointer, safe='/~')}"
        return Draft202012Validator({"$ref": ref}, registry=self.registry,
                                    format_checker=Draft202012Validator.FORMAT_CHECKER)

    def errors(self, pointer: str, instance) -> list[str]:
        return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                for e in self.validator(pointer).iter_errors(instance)]

    def match(self, path: str) -> str | None:
        import re

        for template, pattern in self.templates:
            if re.match(pattern, path):
                return template
        return None

    def resolve(self, obj: dict) -> tuple[dict, str | None]:
        ref = obj.get("$ref")
        if ref is None:
            return obj, None
        node = self.doc
        for part in ref[2:].split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
        return node, ref[1:]

    def check(self, method: str, path: str, response, request_json=None, json_sent: bool = False) -> None:
        method = method.lower()
        body = response.get_data()
        template = self.match(path)
        if template is None:
            assert response.status_code == 404, (method, path, response.status_code, body)
            self._error_body(response)
            return
        item = self.doc["paths"][template]
        if method == "head":
            return
        op = item.get(method)
        if op is None:
            assert response.status_code == 405, (method, path, response.status_code, body)
            assert response.headers.get("Allow"), "405 without Allow"
            self._error_body(response)
            return
        status = str(response.status_code)
        assert status in op["responses"], f"{method.upper()} {template}: undocumented status {status}: {body[:300]}"
        self.seen.add((template, method, response.status_code))
        spec_response, pointer = self.resolve(op["responses"][status])
        if pointer is None:
            pointer = "/paths/" + _escape(template) + f"/{method}/responses/{status}"
        content = spec_response.get("content")
        if not content:
            assert body == b"", f"{status} must have no body"
        elif "application/json" in content:
            assert response.mimetype == "application/json", response.mimetype
            problems = self.errors(pointer + "/content/application~1json/schema", json.loads(body))
            assert not problems, f"{method.upper()} {path} -> {status}: {problems}\n{body[:500]}"
        else:
            assert response.mimetype in content, (response.mimetype, list(content))
        if response.status_code in (401, 403):
            assert response.headers.get("WWW-Authenticate") or response.status_code == 403
        # A body the document rejects must not be accepted by the server.
        if json_sent and "requestBody" in op and isinstance(request_json, (dict, list, str, int, float, bool)):
            req_pointer = "/paths/" + _escape(template) + f"/{method}/requestBody/content/application~1json/schema"
            if self.errors(req_pointer, request_json):
                assert 400 <= response.status_code < 500, (
                    f"{method.upper()} {path} accepted a body the document rejects: {request_json!r}")

    def _error_body(self, response) -> None:
        assert response.mimetype == "application/json"
        problems = self.errors("/components/schemas/Error", json.loads(response.get_data()))
        assert not problems, problems


def _split_template(path: str) -> list[str]:
    import re

    return [p for p in re.split(r"(\{[^}]+\})", path) if p]


def _escape(path: str) -> str:
    return path.replace("~", "~0").replace("/", "~1")


_UNSET = object()


class Api:
    """A test client whose every response is checked against the OpenAPI document."""

    def __init__(self, app, checker: SpecChecker):
        self.client = app.test_client()
        self.checker = checker

    def call(self, method: str, path: str, *, token=ADMIN_TOKEN, json_body=_UNSET, data=None, content_type=None,
             query=None, headers=None, environ=None):
        hdrs = dict(headers or {})
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        kwargs = {}
        if json_body is not _UNSET:
            kwargs["data"] = json.dumps(json_body)
            kwargs["content_type"] = content_type or "application/json"
        elif data is not None:
            kwargs["data"] = data
            if content_type:
                kwargs["content_type"] = content_type
        response = self.client.open(path, method=method, query_string=query, headers=hdrs,
                                    environ_overrides=environ or {}, **kwargs)
        self.checker.check(method, urllib.parse.urlsplit(path).path, response,
                           request_json=None if json_body is _UNSET else json_body,
                           json_sent=json_body is not _UNSET and (content_type or "application/json")
                           == "application/json")
        return response

    def get(self, path, **kw):
        return self.call("GET", path, **kw)

    def post(self, path, body=_UNSET, **kw):
        return self.call("POST", path, json_body=body, **kw)

    def put(self, path, body=_UNSET, **kw):
        return self.call("PUT", path, json_body=body, **kw)

    def patch(self, path, body=_UNSET, **kw):
        return self.call("PATCH", path, json_body=body, **kw)

    def delete(self, path, **kw):
        return self.call("DELETE", path, **kw)


def error_of(response) -> dict:
    return response.get_json()["error"]


def fields_of(response) -> set[str]:
    err = error_of(response)
    assert err["code"] == "validation_failed", err
    return {p["field"] for p in err["details"]["problems"]}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def doc():
    return openapi_document()


@pytest.fixture(scope="module")
def checker(doc):
    return SpecChecker(doc)


@pytest.fixture
def sessions(db_url):  # noqa: F811
    engine = make_engine(db_url)
    upgrade(engine)
    sf = session_factory(engine)
    seed(sf)
    yield sf
    engine.dispose()


def make_auth(**kw) -> TokenAuth:
    return TokenAuth([TokenEntry(ADMIN, pki.hash_token(ADMIN_TOKEN, ITER), "ops"),
                      TokenEntry(READ, pki.hash_token(READ_TOKEN, ITER), "grafana")], **kw)


@pytest.fixture
def terminator():
    return Terminator()


@pytest.fixture
def refreshes():
    return []


@pytest.fixture
def monitoring():
    mon = MonitoringElement()
    for i, link in enumerate(("L01", "L02")):
        mon.watch(link, 0.0)
        mon.sample(link, 190000.0 - i, 0.02, 4096, 8192, now=1.0)
    return mon


@pytest.fixture
def api(sessions, checker, terminator, refreshes, monitoring):
    backend = DbRestBackend(sessions, terminate=terminator, metrics=lambda: render_prometheus(monitoring.snapshot(2.0)),
                            health=lambda: {"bus": {"status": "ok", "clients": 6}},
                            on_profiles_changed=lambda: refreshes.append(1), token_iterations=ITER)
    return Api(create_rest_app(backend, make_auth()), checker)


def bare_api(sessions, checker, **kw) -> Api:
    """An API whose backend has none of the app callables (or only those given)."""
    return Api(create_rest_app(DbRestBackend(sessions, token_iterations=ITER, **kw), make_auth()), checker)


def sla(**kw):
    return {"max_priority": 5, "max_bps": 16000, "max_sessions": 2, "bucket_bits": 8192, **kw}


def all_pages(api: Api, path: str, **query) -> list[dict]:
    items, cursor, pages = [], None, 0
    while True:
        q = dict(query, **({"cursor": cursor} if cursor else {}))
        r = api.get(path, query=q)
        assert r.status_code == 200, r.get_json()
        body = r.get_json()
        items += body["items"]
        pages += 1
        assert pages < 100
        cursor = body["next_cursor"]
        if cursor is None:
            return items


# --------------------------------------------------------------------------- the document


def test_document_is_valid_openapi(doc):
    validate_spec(doc)
    assert doc["openapi"].startswith("3.1")


def test_document_describes_exactly_the_app_routes(doc, sessions, checker):
    app = create_rest_app(DbRestBackend(sessions), make_auth())
    served = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = rule.rule.replace("<", "{").replace(">", "}")
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            served.add((path, method.lower()))
    documented = {(path, method) for path, item in doc["paths"].items() for method in item
                  if method in ("get", "put", "post", "patch", "delete")}
    assert served == documented


def test_every_error_status_is_documented_with_the_error_schema(doc):
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method == "parameters":
                continue
            for status, response in op["responses"].items():
                if int(status) >= 400 and not (path.endswith("/health") and status == "503"):
                    assert response["$ref"].startswith("#/components/responses/"), (path, method, status)


def test_openapi_json_is_served_without_authentication(api, doc):
    r = api.get("/openapi.json", token=None)
    assert r.status_code == 200
    assert r.get_json() == doc


# --------------------------------------------------------------------------- health and metrics


def test_health_needs_no_token_and_reports_components(api):
    r = api.get(f"{API_PREFIX}/health", token=None)
    assert r.status_code == 200
    body = r.get_json()
    assert body["status"] == "ok"
    assert body["checks"]["database"] == {"status": "ok"}
    assert body["checks"]["bus"] == {"status": "ok", "clients": 6}


def test_health_is_503_when_a_component_is_down(sessions, checker):
    api = bare_api(sessions, checker, health=lambda: {"bus": {"status": "down", "error": "broker unreachable"}})
    r = api.get(f"{API_PREFIX}/health", token=None)
    assert r.status_code == 503
    assert r.get_json()["status"] == "degraded"


def test_health_survives_a_failing_health_callable(sessions, checker):
    def broken():
        raise RuntimeError("boom")

    r = bare_api(sessions, checker, health=broken).get(f"{API_PREFIX}/health", token=None)
    assert r.status_code == 503
    assert r.get_json()["checks"]["controller"]["status"] == "down"


def test_metrics_are_prometheus_text_for_the_read_role(api):
    r = api.get("/metrics", token=READ_TOKEN)
    assert r.status_code == 200
    assert r.content_type.startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(r.get_data(as_text=True))}
    skr = {s.labels["link"]: s.value for s in families["qkdsdn_link_skr_bps"].samples}
    assert skr == {"L01": 190000.0, "L02": 189999.0}
    assert api.get("/metrics", token=None).status_code == 401


def test_metrics_without_monitoring_is_503(sessions, checker):
    r = bare_api(sessions, checker).get("/metrics")
    assert r.status_code == 503
    assert "monitoring" in error_of(r)["message"]


def test_metrics_callable_failure_is_503(sessions, checker):
    def broken():
        raise ValueError("no snapshot")

    assert bare_api(sessions, checker, metrics=broken).get("/metrics").status_code == 503


# --------------------------------------------------------------------------- topology


def test_nodes(api):
    r = api.get(f"{API_PREFIX}/nodes", token=READ_TOKEN)
    assert r.status_code == 200
    nodes = {n["name"]: n for n in r.get_json()["items"]}
    assert sorted(nodes) == ["KM0", "KM1", "KM2", "KM3", "KM4", "KM5"]
    km0 = nodes["KM0"]
    assert km0["km_address"] == "127.0.0.1:8400"
    assert km0["links"] == ["L01", "L02", "L03", "L04", "L05"]
    assert [i["link"] for i in km0["interfaces"]] == ["L01", "L02", "L03", "L04", "L05"]
    assert km0["applications"] == ["SAE-KM0"]
    assert km0["location"] == "5TONIC rack A"
    one = api.get(f"{API_PREFIX}/nodes/KM4")
    assert one.status_code == 200 and one.get_json() == nodes["KM4"]


@pytest.mark.parametrize("name", ["KM9", "bad%20name", "%00", "x" * 65])
def test_unknown_node_is_404(api, name):
    r = api.get(f"{API_PREFIX}/nodes/{name}")
    assert r.status_code == 404
    assert error_of(r)["code"] == "not_found"


def test_links_carry_live_metrics_sessions_and_last_sample(api):
    r = api.get(f"{API_PREFIX}/links")
    assert r.status_code == 200
    links = {link["name"]: link for link in r.get_json()["items"]}
    assert sorted(links) == ["L01", "L02", "L03", "L04", "L05", "L45"]
    l01 = links["L01"]
    assert (l01["src_node"], l01["dst_node"], l01["kind"], l01["status"]) == ("KM0", "KM1", "PHYS", "ACTIVE")
    assert (l01["skr_bps"], l01["eskr_bps"], l01["qber"]) == (190000.0, 200000.0, 0.021)
    assert (l01["reserved_bps"], l01["session_count"]) == (64000.0, 1)
    assert l01["sessions"] == [KSID_01]  # the terminated session over L01 is history
    assert l01["last_sample"]["ts"] == "2025-03-01T12:00:40Z"
    assert l01["last_sample"]["skr_bps"] == 180004.0
    assert links["L02"]["sessions"] == [KSID_23] and links["L03"]["sessions"] == [KSID_23]
    assert links["L04"]["sessions"] == [] and links["L04"]["last_sample"] is None
    assert links["L45"]["status"] == "OFF"
    assert links["L01"]["device"]["model"] == "fixed"
    assert api.get(f"{API_PREFIX}/links", query={"kind": "VIRT"}).get_json()["items"] == []
    assert len(api.get(f"{API_PREFIX}/links", query={"kind": "PHYS"}).get_json()["items"]) == 6


def test_one_link_has_recent_samples_newest_first(api):
    r = api.get(f"{API_PREFIX}/links/L01")
    assert r.status_code == 200
    body = r.get_json()
    assert [s["skr_bps"] for s in body["recent_samples"]] == [180004.0, 180003.0, 180002.0, 180001.0, 180000.0]
    assert body["last_sample"] == body["recent_samples"][0]
    assert api.get(f"{API_PREFIX}/links/L99").status_code == 404


def test_link_samples_pages_and_time_range(api):
    path = f"{API_PREFIX}/links/L01/samples"
    everything = all_pages(api, path, limit="2")
    assert [s["ts"][-9:] for s in everything] == ["12:00:00Z", "12:00:10Z", "12:00:20Z", "12:00:30Z",
                                                  "12:00:40Z"]
    newest_first = all_pages(api, path, limit="3", order="desc")
    assert newest_first == list(reversed(everything))
    window = api.get(path, query={"since": "2025-03-01T12:00:10Z", "until": "2025-03-01T12:00:30Z"}).get_json()
    assert [s["ts"] for s in window["items"]] == ["2025-03-01T12:00:10Z", "2025-03-01T12:00:20Z"]
    assert window["next_cursor"] is None
    # Offsets and naive times (UTC) mean the same instants.
    same = api.get(path, query={"since": "2025-03-01T13:00:10+01:00", "until": "2025-03-01T12:00:30"}).get_json()
    assert same["items"] == window["items"]
    assert api.get(f"{API_PREFIX}/links/L04/samples").get_json() == {"items": [], "next_cursor": None}
    assert api.get(f"{API_PREFIX}/links/L99/samples").status_code == 404


# --------------------------------------------------------------------------- users


def test_users_list_and_one(api):
    r = api.get(f"{API_PREFIX}/users", token=READ_TOKEN)
    users = {u["name"]: u for u in r.get_json()["items"]}
    assert sorted(users) == ["alice", "bob", "carol"]
    assert users["carol"]["sla"] == {"max_priority": 3, "max_bps": 32000, "max_sessions": 2, "bucket_bits": 32768,
                                     "allowed_destinations": ["KM0", "KM1", "KM2", "KM3"]}
    assert users["alice"]["sla"]["allowed_destinations"] is None
    assert users["alice"]["applications"] == ["SAE-KM0", "SAE-KM4"]
    assert api.get(f"{API_PREFIX}/users/bob").get_json() == users["bob"]
    assert api.get(f"{API_PREFIX}/users/nobody").status_code == 404


def test_create_user_stores_only_a_token_hash(api, sessions, refreshes):
    body = {"name": "dave", "sla": sla(allowed_destinations=["KM1", "KM2"]), "token": "dave-secret-token-0001"}
    r = api.post(f"{API_PREFIX}/users", body)
    assert r.status_code == 201, r.get_json()
    assert r.headers["Location"] == f"{API_PREFIX}/users/dave"
    created = r.get_json()
    assert created["has_token"] is True and created["revoked"] is False
    assert created["sla"] == sla(allowed_destinations=["KM1", "KM2"])
    assert "dave-secret-token-0001" not in r.get_data(as_text=True)
    with sessions() as s:
        cred = s.scalar(select(m.Credential).join(m.User).where(m.User.name == "dave"))
        assert cred.kind is m.CredentialKind.TOKEN_PBKDF2
        assert cred.value.startswith(f"pbkdf2_sha256${ITER}$")
        assert pki.verify_token("dave-secret-token-0001", cred.value)
        audit = s.scalar(select(m.Event).where(m.Event.kind == "user_created"))
        assert audit.element == "rest_api" and audit.details == {"by": "token:ops", "user": "dave"}
        assert "dave-secret-token-0001" not in json.dumps(audit.details)
    assert refreshes == [1]
    assert api.get(f"{API_PREFIX}/users/dave").get_json() == created
    dup = api.post(f"{API_PREFIX}/users", {"name": "dave", "sla": sla()})
    assert dup.status_code == 409 and error_of(dup)["code"] == "conflict"


@pytest.mark.parametrize("body, fields", [
    ({"name": "eve", "sla": sla(max_bps=-5)}, {"sla.max_bps"}),
    ({"name": "eve", "sla": sla(max_bps=0, bucket_bits=-1, max_sessions=0)},
     {"sla.max_bps", "sla.bucket_bits", "sla.max_sessions"}),
    ({"name": "eve", "sla": sla(max_priority=-1)}, {"sla.max_priority"}),
    ({"name": "eve", "sla": sla(max_priority=2**32)}, {"sla.max_priority"}),
    ({"name": "eve", "sla": sla(max_bps=2**32)}, {"sla.max_bps"}),
    ({"name": "eve", "sla": sla(bucket_bits=2**32)}, {"sla.bucket_bits"}),
    ({"name": "eve", "sla": sla(max_sessions=2**31)}, {"sla.max_sessions"}),
    ({"name": "eve", "sla": sla(max_bps="64000")}, {"sla.max_bps"}),
    ({"name": "eve", "sla": sla(max_bps=64000.0)}, {"sla.max_bps"}),
    ({"name": "eve", "sla": sla(max_sessions=True)}, {"sla.max_sessions"}),
    ({"name": "eve", "sla": sla(allowed_destinations="KM1")}, {"sla.allowed_destinations"}),
    ({"name": "eve", "sla": sla(allowed_destinations=["KM1", "KM1"])}, {"sla.allowed_destinations"}),
    ({"name": "eve", "sla": sla(allowed_destinations=["KM1", "bad name"])}, {"sla.allowed_destinations[1]"}),
    ({"name": "eve", "sla": {**sla(), "colour": "red"}}, {"sla.colour"}),
    ({"name": "eve", "sla": sla(), "admin": True}, {"admin"}),
    ({"name": "eve", "sla": sla(), "revoked": "no"}, {"revoked"}),
    ({"name": "eve", "sla": sla(), "token": "short"}, {"token"}),
    ({"name": "eve", "sla": sla(), "token": "sixteen-chars-ok\x00"}, {"token"}),
    ({"name": "eve", "sla": sla(), "token": 1234567890123456789}, {"token"}),
    ({"name": "eve", "sla": sla(), "token_hash": "pbkdf2_sha256$1$00$00"}, {"token_hash"}),
    ({"name": "eve", "sla": None}, {"sla"}),
    ({"name": "eve"}, {"sla"}),
    ({"sla": sla()}, {"name"}),
    ({"name": "", "sla": sla()}, {"name"}),
    ({"name": "bad/name", "sla": sla()}, {"name"}),
    ({"name": 7, "sla": [1, 2]}, {"name", "sla"}),
    ({"name": "eve", "sla": {"max_bps": 5}}, {"sla.max_priority", "sla.max_sessions", "sla.bucket_bits"}),
])
def test_create_user_reports_every_bad_field(api, body, fields):
    r = api.post(f"{API_PREFIX}/users", body)
    assert r.status_code == 400, r.get_json()
    assert fields_of(r) == fields
    assert api.get(f"{API_PREFIX}/users/eve").status_code == 404


def test_unknown_destination_is_named(api):
    r = api.post(f"{API_PREFIX}/users", {"name": "eve", "sla": sla(allowed_destinations=["KM1", "KM9", "KM8"])})
    assert r.status_code == 400
    problems = error_of(r)["details"]["problems"]
    assert problems == [{"field": "sla.allowed_destinations[1]", "message": "unknown node 'KM9'"},
                        {"field": "sla.allowed_destinations[2]", "message": "unknown node 'KM8'"}]


BAD_BODIES = [
    (b"{", "application/json", 400, "invalid_json"),
    (b"", "application/json", 400, "invalid_json"),
    (b'{"name": "eve", "name": "eve2", "sla": {}}', "application/json", 400, "invalid_json"),
    (b'{"name": "eve", "sla": {"max_bps": NaN}}', "application/json", 400, "invalid_json"),
    (b'{"name": "eve", "sla": {"max_bps": 1e999}}', "application/json", 400, "invalid_json"),
    (b'{"name": "eve", "sla": {"max_bps": ' + b"9" * 5000 + b"}}", "application/json", 400, "invalid_json"),
    (b"[" * 100000 + b"]" * 100000, "application/json", 400, "invalid_json"),
    (b"\xff\xfe{}", "application/json", 400, "invalid_json"),
    (b"[]", "application/json", 400, "validation_failed"),
    (b'"text"', "application/json", 400, "validation_failed"),
    (b"null", "application/json", 400, "validation_failed"),
    (b'{"name": "eve"}', "text/plain", 415, "unsupported_media_type"),
    (b'{"name": "eve"}', None, 415, "unsupported_media_type"),
    (b'{"name": "eve"}', "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
]


@pytest.mark.parametrize("data, content_type, status, code", BAD_BODIES,
                         ids=[f"{i}-{c}" for i, (_, _, _, c) in enumerate(BAD_BODIES)])
def test_bad_bodies(api, data, content_type, status, code):
    r = api.call("POST", f"{API_PREFIX}/users", data=data, content_type=content_type)
    assert r.status_code == status, r.get_json()
    assert error_of(r)["code"] == code


def test_body_too_large_is_413(sessions, checker):
    backend = DbRestBackend(sessions, token_iterations=ITER)
    api = Api(create_rest_app(backend, make_auth(), max_body_bytes=1024), checker)
    r = api.post(f"{API_PREFIX}/users", {"name": "eve", "sla": sla(), "pad": "x" * 2000})
    assert r.status_code == 413
    assert error_of(r)["code"] == "payload_too_large"


def test_replace_user(api, sessions, refreshes):
    r = api.put(f"{API_PREFIX}/users/carol", {"sla": sla(allowed_destinations=["KM3"]), "revoked": True})
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["sla"] == sla(allowed_destinations=["KM3"]) and r.get_json()["revoked"] is True
    # the name may be repeated, never changed
    assert api.put(f"{API_PREFIX}/users/carol", {"name": "carol", "sla": sla()}).status_code == 200
    renamed = api.put(f"{API_PREFIX}/users/carol", {"name": "caroline", "sla": sla()})
    assert renamed.status_code == 400 and fields_of(renamed) == {"name"}
    assert api.put(f"{API_PREFIX}/users/zed", {"sla": sla()}).status_code == 404
    assert api.put(f"{API_PREFIX}/users/carol", {"sla": sla(max_sessions=-1)}).status_code == 400
    bad_dest = api.put(f"{API_PREFIX}/users/carol", {"sla": sla(allowed_destinations=["KM7"])})
    assert fields_of(bad_dest) == {"sla.allowed_destinations[0]"}
    with sessions() as s:
        user = s.scalar(select(m.User).where(m.User.name == "carol"))
        assert (user.sla.max_bps, user.sla.allowed_destinations, user.revoked) == (16000, None, False)
    assert len(refreshes) == 2


def test_patch_user_changes_only_given_fields_and_the_write_only_token(api, sessions):
    path = f"{API_PREFIX}/users/bob"
    r = api.patch(path, {"sla": {"max_bps": 1000, "allowed_destinations": ["KM0"]}})
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["sla"] == {"max_priority": 7, "max_bps": 1000, "max_sessions": 4, "bucket_bits": 65536,
                                   "allowed_destinations": ["KM0"]}
    assert r.get_json()["has_token"] is False
    r = api.patch(path, {"token": "bob-token-abcdefghijkl"}, content_type="application/merge-patch+json")
    assert r.status_code == 200 and r.get_json()["has_token"] is True
    assert r.get_json()["sla"]["max_bps"] == 1000
    # PUT without 'token' keeps it; null removes it.
    assert api.put(path, {"sla": sla()}).get_json()["has_token"] is True
    with sessions() as s:
        hashes = s.scalars(select(m.Credential.value).join(m.User).where(m.User.name == "bob")).all()
        assert len(hashes) == 1 and pki.verify_token("bob-token-abcdefghijkl", hashes[0])
    r = api.patch(path, {"token": None, "revoked": True, "sla": {"allowed_destinations": None}})
    assert r.get_json()["has_token"] is False and r.get_json()["revoked"] is True
    assert r.get_json()["sla"]["allowed_destinations"] is None
    assert api.patch(path, {}).status_code == 200
    bad = api.patch(path, {"sla": {"max_bps": 0, "burst": 1}, "name": "robert"})
    assert bad.status_code == 400 and fields_of(bad) == {"sla.max_bps", "sla.burst", "name"}
    assert fields_of(api.patch(path, {"sla": {"allowed_destinations": ["KM6"]}})) == {
        "sla.allowed_destinations[0]"}
    assert api.patch(f"{API_PREFIX}/users/nobody", {"revoked": True}).status_code == 404


def test_delete_user(api, sessions):
    conflict = api.delete(f"{API_PREFIX}/users/carol")
    assert conflict.status_code == 409
    assert error_of(conflict)["details"]["applications"] == ["SAE-KM2", "SAE-KM3"]
    assert api.post(f"{API_PREFIX}/users", {"name": "frank", "sla": sla(), "token": "frank-token-0123456789"}
                    ).status_code == 201
    r = api.delete(f"{API_PREFIX}/users/frank")
    assert r.status_code == 204 and r.get_data() == b""
    assert api.get(f"{API_PREFIX}/users/frank").status_code == 404
    assert api.delete(f"{API_PREFIX}/users/frank").status_code == 404
    with sessions() as s:  # credentials and SLA went with the user
        assert s.scalar(select(m.Credential).where(m.Credential.user_id.is_not(None))) is None
        assert len(s.scalars(select(m.SLA)).all()) == 3


def test_user_with_live_sessions_cannot_be_deleted(api, sessions):
    # A user without applications but named on a live session (e.g. its SAE moved to another user).
    assert api.post(f"{API_PREFIX}/users", {"name": "gina", "sla": sla()}).status_code == 201
    with sessions.begin() as s:
        s.scalar(select(m.Session).where(m.Session.ksid == KSID_45)).user = "gina"
    r = api.delete(f"{API_PREFIX}/users/gina")
    assert r.status_code == 409 and error_of(r)["details"]["sessions"] == [KSID_45]


# --------------------------------------------------------------------------- uint32 fields

UINT32_MAX = 2**32 - 1
# max_sessions is a plain INTEGER column (int32 on PostgreSQL): it keeps that bound.
SLA_MAX = sla(max_priority=UINT32_MAX, max_bps=UINT32_MAX, max_sessions=2**31 - 1, bucket_bits=UINT32_MAX,
              allowed_destinations=None)
_SLA_INTS = ("max_priority", "max_bps", "max_sessions", "bucket_bits")


def profiles(sessions) -> dict:
    """Everything an SLA or application write could touch, to compare before and after."""
    with sessions() as s:
        return {
            "slas": sorted((x.user.name, x.max_priority, x.max_bps, x.max_sessions, x.bucket_bits,
                            x.allowed_destinations) for x in s.scalars(select(m.SLA))),
            "users": sorted((u.name, u.revoked) for u in s.scalars(select(m.User))),
            "apps": sorted((a.sae_id, a.node.name, a.user.name, a.priority) for a in s.scalars(select(m.Application))),
            "credentials": sorted((c.kind.value, c.value) for c in s.scalars(select(m.Credential))),
            "events": s.scalar(select(func.count(m.Event.id))),
        }


def test_document_gives_each_integer_field_its_column_range(doc):
    schemas = doc["components"]["schemas"]
    for name in ("SLA", "SLAInput", "SLAPatch"):
        props = schemas[name]["properties"]
        assert {k: (props[k]["minimum"], props[k]["maximum"]) for k in _SLA_INTS} == {
            "max_priority": (0, UINT32_MAX), "max_bps": (1, UINT32_MAX), "max_sessions": (1, 2**31 - 1),
            "bucket_bits": (1, UINT32_MAX)}
    assert (schemas["ApplicationCreate"]["properties"]["priority"]["minimum"],
            schemas["ApplicationCreate"]["properties"]["priority"]["maximum"]) == (0, UINT32_MAX)
    assert "Priorities are uint32 (0 to 2^32-1)" in doc["paths"][f"{API_PREFIX}/users"]["post"]["description"]


def test_uint32_fields_take_the_whole_uint32_range(api, sessions):
    r = api.post(f"{API_PREFIX}/users", {"name": "uma", "sla": SLA_MAX})
    assert r.status_code == 201, r.get_json()
    assert r.get_json()["sla"] == SLA_MAX
    assert api.get(f"{API_PREFIX}/users/uma").get_json()["sla"] == SLA_MAX
    r = api.put(f"{API_PREFIX}/users/carol", {"sla": SLA_MAX})
    assert r.status_code == 200 and r.get_json()["sla"] == SLA_MAX, r.get_json()
    r = api.patch(f"{API_PREFIX}/users/bob", {"sla": {"max_priority": UINT32_MAX, "max_bps": UINT32_MAX,
                                                      "bucket_bits": UINT32_MAX}})
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["sla"] == {"max_priority": UINT32_MAX, "max_bps": UINT32_MAX, "max_sessions": 4,
                                   "bucket_bits": UINT32_MAX, "allowed_destinations": None}
    r = api.post(f"{API_PREFIX}/applications", {"sae_id": "SAE-U", "node": "KM1", "user": "uma",
                                                "priority": UINT32_MAX})
    assert r.status_code == 201, r.get_json()
    assert r.get_json()["priority"] == UINT32_MAX
    assert api.get(f"{API_PREFIX}/applications/SAE-U").get_json()["priority"] == UINT32_MAX
    with sessions() as s:
        stored = {u.name: (u.sla.max_priority, u.sla.max_bps, u.sla.max_sessions, u.sla.bucket_bits)
                  for u in s.scalars(select(m.User).where(m.User.name.in_(["uma", "carol", "bob"])))}
        assert s.scalar(select(m.Application.priority).where(m.Application.sae_id == "SAE-U")) == UINT32_MAX
    assert stored == {"uma": (UINT32_MAX, UINT32_MAX, 2**31 - 1, UINT32_MAX),
                      "carol": (UINT32_MAX, UINT32_MAX, 2**31 - 1, UINT32_MAX),
                      "bob": (UINT32_MAX, UINT32_MAX, 4, UINT32_MAX)}


def _too_big(key: str) -> tuple[int, str]:
    """The first value past a field's column and the API's message for it."""
    if key == "max_sessions":
        return 2**31, f"must be between 1 and {2**31 - 1}, got {2**31}"
    return 2**32, f"must be between {0 if key.endswith('priority') else 1} and {UINT32_MAX} (uint32), got {2**32}"


@pytest.mark.parametrize("method, path, body, field", [
    *[("POST", "/users", {"name": "uma", "sla": sla(**{k: _too_big(k)[0]})}, f"sla.{k}") for k in _SLA_INTS],
    *[("PUT", "/users/carol", {"sla": sla(**{k: _too_big(k)[0]})}, f"sla.{k}") for k in _SLA_INTS],
    *[("PATCH", "/users/bob", {"sla": {k: _too_big(k)[0]}}, f"sla.{k}") for k in _SLA_INTS],
    ("POST", "/applications", {"sae_id": "SAE-U", "node": "KM1", "user": "bob", "priority": 2**32}, "priority"),
])
def test_past_the_column_range_is_refused_and_changes_nothing(api, sessions, refreshes, method, path, body, field):
    before = profiles(sessions)
    r = api.call(method, f"{API_PREFIX}{path}", json_body=body)
    assert r.status_code == 400, r.get_json()
    err = error_of(r)
    assert err["code"] == "validation_failed"
    assert err["details"]["problems"] == [{"field": field, "message": _too_big(field.rpartition(".")[2])[1]}]
    assert profiles(sessions) == before
    assert refreshes == []


# --------------------------------------------------------------------------- applications


def test_applications_list_filters_and_one(api):
    apps = api.get(f"{API_PREFIX}/applications").get_json()["items"]
    assert [a["sae_id"] for a in apps] == [f"SAE-KM{i}" for i in range(6)]
    assert [a["sae_id"] for a in api.get(f"{API_PREFIX}/applications", query={"user": "carol"}).get_json()["items"]
            ] == ["SAE-KM2", "SAE-KM3"]
    assert [a["sae_id"] for a in api.get(f"{API_PREFIX}/applications",
                                         query={"user": "alice", "node": "KM4"}).get_json()["items"]] == ["SAE-KM4"]
    assert api.get(f"{API_PREFIX}/applications", query={"node": "KM9"}).get_json()["items"] == []
    one = api.get(f"{API_PREFIX}/applications/SAE-KM2").get_json()
    assert (one["node"], one["user"], one["priority"], one["certificates"]) == ("KM2", "carol", 3, [])
    assert one["app_id"] == netfile.derived_uuid("paper-poc", "application", "SAE-KM2")
    assert api.get(f"{API_PREFIX}/applications/SAE-KM9").status_code == 404


def test_create_and_delete_application_with_certificates(api, sessions, refreshes):
    fp_colons = ":".join(FP_A[i:i + 2].upper() for i in range(0, 64, 2))
    r = api.post(f"{API_PREFIX}/applications", {"sae_id": "SAE-X", "node": "KM1", "user": "bob", "priority": 2,
                                                "cert_sha256": fp_colons})
    assert r.status_code == 201, r.get_json()
    app = r.get_json()
    assert r.headers["Location"] == f"{API_PREFIX}/applications/SAE-X"
    assert [c["fingerprint"] for c in app["certificates"]] == [FP_A]
    assert app["app_id"] == netfile.derived_uuid("paper-poc", "application", "SAE-X")
    assert "SAE-X" in api.get(f"{API_PREFIX}/nodes/KM1").get_json()["applications"]

    dup = api.post(f"{API_PREFIX}/applications", {"sae_id": "SAE-X", "node": "KM1", "user": "bob"})
    assert dup.status_code == 409
    taken = api.post(f"{API_PREFIX}/applications", {"sae_id": "SAE-Y", "node": "KM1", "user": "bob",
                                                    "cert_sha256": FP_A})
    assert taken.status_code == 409 and "SAE-X" in error_of(taken)["message"]
    same_id = api.post(f"{API_PREFIX}/applications", {"sae_id": "SAE-Z", "node": "KM1", "user": "bob",
                                                      "app_id": app["app_id"]})
    assert same_id.status_code == 409

    cert_path = f"{API_PREFIX}/applications/SAE-X/certificates"
    added = api.post(cert_path, {"fingerprint": FP_B})
    assert added.status_code == 201
    assert [c["fingerprint"] for c in added.get_json()["certificates"]] == [FP_A, FP_B]
    assert api.post(cert_path, {"fingerprint": FP_B}).status_code == 409
    assert fields_of(api.post(cert_path, {"fingerprint": "abc"})) == {"fingerprint"}
    assert fields_of(api.post(cert_path, {"fp": FP_B})) == {"fp", "fingerprint"}
    assert api.post(f"{API_PREFIX}/applications/SAE-NONE/certificates", {"fingerprint": FP_B}).status_code == 404

    assert api.delete(f"{cert_path}/{FP_A.upper()}").status_code == 204
    assert api.delete(f"{cert_path}/{FP_A}").status_code == 404
    assert api.delete(f"{cert_path}/not-a-fingerprint").status_code == 404
    assert [c["fingerprint"] for c in api.get(f"{API_PREFIX}/applications/SAE-X").get_json()["certificates"]
            ] == [FP_B]

    assert api.delete(f"{API_PREFIX}/applications/SAE-X").status_code == 204
    assert api.get(f"{API_PREFIX}/applications/SAE-X").status_code == 404
    assert api.delete(f"{API_PREFIX}/applications/SAE-X").status_code == 404
    with sessions() as s:
        assert s.scalar(select(m.Credential).where(m.Credential.value == FP_B)) is None
        kinds = s.scalars(select(m.Event.kind).where(m.Event.element == "rest_api").order_by(m.Event.id)).all()
    assert kinds == ["application_created", "certificate_registered", "certificate_removed", "application_deleted"]
    assert len(refreshes) == 4


@pytest.mark.parametrize("body, fields", [
    ({"sae_id": "SAE-X", "node": "KM9", "user": "bob"}, {"node"}),
    ({"sae_id": "SAE-X", "node": "KM1", "user": "zoe"}, {"user"}),
    ({"sae_id": "SAE-X", "node": "KM9", "user": "zoe"}, {"node", "user"}),
    ({"node": "KM1", "user": "bob"}, {"sae_id"}),
    ({"sae_id": "SAE X", "node": "KM1", "user": "bob"}, {"sae_id"}),
    ({"sae_id": "SAE-X", "node": "KM1", "user": "bob", "priority": -1}, {"priority"}),
    ({"sae_id": "SAE-X", "node": "KM1", "user": "bob", "priority": 2**32}, {"priority"}),
    ({"sae_id": "SAE-X", "node": "KM1", "user": "bob", "app_id": "nope"}, {"app_id"}),
    ({"sae_id": "SAE-X", "node": "KM1", "user": "bob", "cert_sha256": "12"}, {"cert_sha256"}),
    ({"sae_id": "SAE-X", "node": "KM1", "user": "bob", "extra": 1}, {"extra"}),
])
def test_create_application_errors(api, body, fields):
    r = api.post(f"{API_PREFIX}/applications", body)
    assert r.status_code == 400
    assert fields_of(r) == fields


def test_application_with_live_sessions_cannot_be_deleted(api):
    r = api.delete(f"{API_PREFIX}/applications/SAE-KM2")
    assert r.status_code == 409
    assert error_of(r)["details"]["sessions"] == [KSID_23]


# --------------------------------------------------------------------------- sessions and routes


def test_sessions_list_and_filters(api):
    def ksids(**query):
        r = api.get(f"{API_PREFIX}/sessions", query=query)
        assert r.status_code == 200, r.get_json()
        return [s["ksid"] for s in r.get_json()["items"]]

    assert ksids() == [KSID_OLD, KSID_01, KSID_23, KSID_45]
    assert ksids(state="active") == [KSID_01, KSID_23]
    assert ksids(state="live") == [KSID_01, KSID_23, KSID_45]
    assert ksids(state="terminated") == [KSID_OLD]
    assert ksids(user="carol") == [KSID_23]
    assert ksids(node="KM0") == [KSID_OLD, KSID_01, KSID_23]  # KM0 relays KSID_23
    assert ksids(node="KM3", state="active") == [KSID_23]
    assert ksids(node="KM_0") == []  # '_' is no wildcard
    assert ksids(order="desc") == [KSID_45, KSID_23, KSID_01, KSID_OLD]
    paged = all_pages(api, f"{API_PREFIX}/sessions", limit="1")
    assert [s["ksid"] for s in paged] == [KSID_OLD, KSID_01, KSID_23, KSID_45]
    s23 = next(s for s in paged if s["ksid"] == KSID_23)
    assert s23["route"] == ["KM2", "KM0", "KM3"] and s23["links"] == ["L02", "L03"]
    assert s23["reservations"] == {"L02": 32000.0, "L03": 32000.0}
    assert s23["qos"]["Max_bps"] == 64000


def test_inspect_one_session(api):
    r = api.get(f"{API_PREFIX}/sessions/{KSID_23}", token=READ_TOKEN)
    assert r.status_code == 200
    body = r.get_json()
    assert (body["state"], body["user"], body["src_node"], body["dst_node"]) == ("active", "carol", "KM2", "KM3")
    assert body["created_at"] == "2025-03-01T12:00:02Z"
    kinds = [e["kind"] for e in body["recent_events"]]
    assert kinds[0] == "session_active" and len(kinds) == 10
    old = api.get(f"{API_PREFIX}/sessions/{KSID_OLD}").get_json()
    assert old["terminated_at"] == "2025-03-01T12:00:30Z" and old["reason"] == "closed by SAE-KM0"
    assert api.get(f"{API_PREFIX}/sessions/00000000-0000-4000-8000-000000000000").status_code == 404
    assert api.get(f"{API_PREFIX}/sessions/{'x' * 40}").status_code == 404


def test_terminate_goes_through_admission_control(api, terminator, sessions):
    assert api.delete(f"{API_PREFIX}/sessions/{KSID_01}", token=READ_TOKEN).status_code == 403
    assert terminator.calls == []
    r = api.delete(f"{API_PREFIX}/sessions/{KSID_01}")
    assert r.status_code == 202
    assert r.get_json()["ksid"] == KSID_01 and r.get_json()["status"] == "terminating"
    assert terminator.calls == [KSID_01]
    with sessions() as s:
        ev = s.scalar(select(m.Event).where(m.Event.kind == "session_terminate_requested"))
        assert ev.ksid == KSID_01 and ev.details == {"by": "token:ops"}

    already = api.delete(f"{API_PREFIX}/sessions/{KSID_OLD}")
    assert already.status_code == 409
    assert api.delete(f"{API_PREFIX}/sessions/00000000-0000-4000-8000-000000000000").status_code == 404
    terminator.answer = False
    assert api.delete(f"{API_PREFIX}/sessions/{KSID_23}").status_code == 409
    terminator.error = TimeoutError("no answer from admission control")
    gone = api.delete(f"{API_PREFIX}/sessions/{KSID_23}")
    assert gone.status_code == 503 and "TimeoutError" in error_of(gone)["message"]
    assert terminator.calls == [KSID_01, KSID_23, KSID_23]


def test_terminate_without_admission_control_is_503(sessions, checker):
    r = bare_api(sessions, checker).delete(f"{API_PREFIX}/sessions/{KSID_01}")
    assert r.status_code == 503
    assert "admission-control" in error_of(r)["message"]


def test_routes(api):
    r = api.get(f"{API_PREFIX}/routes", token=READ_TOKEN)
    assert r.status_code == 200
    routes = {x["ksid"]: x for x in r.get_json()["items"]}
    assert sorted(routes) == sorted([KSID_01, KSID_23])
    assert routes[KSID_23]["route"] == ["KM2", "KM0", "KM3"]
    assert routes[KSID_23]["links"] == ["L02", "L03"] and routes[KSID_23]["hops"] == 1
    assert routes[KSID_01]["links"] == ["L01"] and routes[KSID_01]["hops"] == 0


# --------------------------------------------------------------------------- events


def test_events_filters(api):
    def kinds(**query):
        r = api.get(f"{API_PREFIX}/events", query=query)
        assert r.status_code == 200, r.get_json()
        return [e["kind"] for e in r.get_json()["items"]]

    everything = api.get(f"{API_PREFIX}/events", query={"limit": "1000"}).get_json()["items"]
    assert len(everything) == 21 + 1  # the seeded events and the bootstrap's network_loaded
    assert kinds(node="KM1") == ["request_arrival", "authenticated", "configured", "key_available", "key_returned"]
    assert kinds(ksid=KSID_23, node="KM0") == ["request_arrival", "authenticated", "configured", "key_available"]
    assert kinds(element="admission_control") == ["session_active"]
    assert kinds(kind="link_alarm") == ["link_alarm"]
    assert kinds(kind="network_loaded", element="db") == ["network_loaded"]
    assert kinds(since="2025-03-01T12:00:13Z", until="2025-03-01T12:00:15Z") == ["key_available", "key_returned"]
    assert kinds(since="2025-03-01T12:00:19Z", until="2025-03-01T12:00:19Z") == []
    assert kinds(until="2025-03-01T12:00:01Z") == ["request_arrival"]
    assert kinds(since="2025-03-01T13:00:14+01:00", until="2025-03-01T12:00:15Z") == ["key_returned"]
    # an unencoded '+' of an offset arrives as a space, and still means the offset
    r = api.client.get(f"{API_PREFIX}/events?since=2025-03-01T13:00:14+01:00&until=2025-03-01T12:00:15Z",
                       headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert [e["kind"] for e in r.get_json()["items"]] == ["key_returned"]
    assert kinds(node="nowhere") == []


def test_events_pages_lose_and_repeat_nothing(api):
    full = api.get(f"{API_PREFIX}/events", query={"limit": "1000"}).get_json()["items"]
    ids = [e["id"] for e in full]
    for limit in ("1", "2", "7"):
        assert [e["id"] for e in all_pages(api, f"{API_PREFIX}/events", limit=limit)] == ids
        assert [e["id"] for e in all_pages(api, f"{API_PREFIX}/events", limit=limit, order="desc")] == ids[::-1]
    # the two events at the same instant straddle a page boundary in some of these walks
    same = [e for e in full if e["ts"] == "2025-03-01T12:00:19Z"]
    assert [e["kind"] for e in same] == ["session_active", "link_alarm"]
    filtered = all_pages(api, f"{API_PREFIX}/events", limit="2", node="KM0", since="2025-03-01T12:00:03Z")
    assert [e["kind"] for e in filtered] == ["key_available", "key_returned", "request_arrival", "authenticated",
                                             "configured", "key_available"]


@pytest.mark.parametrize("query, parameter", [
    ({"since": "yesterday"}, "since"),
    ({"until": "2025-13-01T00:00:00Z"}, "until"),
    ({"since": "2025-03-01T12:00:00Z", "until": "2025-03-01T11:00:00Z"}, "until"),
    ({"since": "0001-01-01T00:00:00+05:00"}, "since"),
    ({"limit": "0"}, "limit"),
    ({"limit": "1001"}, "limit"),
    ({"limit": "ten"}, "limit"),
    ({"limit": "-1"}, "limit"),
    ({"limit": "99999999999999999999"}, "limit"),
    ({"cursor": "garbage!"}, "cursor"),
    ({"cursor": "eyJ2IjoxfQ"}, "cursor"),
    ({"order": "sideways"}, "order"),
    ({"colour": "red"}, "colour"),
    ({"node": "x" * 65}, "node"),
    ({"kind": "\x00"}, "kind"),
    ({"ksid": ""}, "ksid"),
])
def test_bad_event_queries(api, query, parameter):
    r = api.get(f"{API_PREFIX}/events", query=query)
    assert r.status_code == 400, r.get_json()
    err = error_of(r)
    assert err["code"] == "invalid_parameter" and err["details"]["parameter"] == parameter


def test_cursors_belong_to_their_list_and_order(api):
    first = api.get(f"{API_PREFIX}/events", query={"limit": "2"}).get_json()
    cursor = first["next_cursor"]
    assert decode_cursor("events", "asc", cursor)
    for path, query in ((f"{API_PREFIX}/sessions", {"cursor": cursor}),
                        (f"{API_PREFIX}/links/L01/samples", {"cursor": cursor}),
                        (f"{API_PREFIX}/events", {"cursor": cursor, "order": "desc"})):
        r = api.get(path, query=query)
        assert r.status_code == 400 and error_of(r)["details"]["parameter"] == "cursor"
    forged = encode_cursor("sessions", "asc", ("not an id",))
    assert api.get(f"{API_PREFIX}/sessions", query={"cursor": forged}).status_code == 400
    repeated = api.client.get(f"{API_PREFIX}/events?limit=1&limit=2",
                              headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert repeated.status_code == 400 and error_of(repeated)["details"]["parameter"] == "limit"


@pytest.mark.parametrize("path, query", [
    (f"{API_PREFIX}/sessions", {"state": "running"}),
    (f"{API_PREFIX}/sessions", {"user": "bad name"}),
    (f"{API_PREFIX}/links", {"kind": "phys"}),
    (f"{API_PREFIX}/nodes", {"verbose": "1"}),
    (f"{API_PREFIX}/links/L01/samples", {"since": "soon"}),
    (f"{API_PREFIX}/applications", {"node": ""}),
])
def test_bad_query_parameters_elsewhere(api, path, query):
    r = api.get(path, query=query)
    assert r.status_code == 400 and error_of(r)["code"] == "invalid_parameter"


# --------------------------------------------------------------------------- authentication


def test_missing_and_invalid_tokens_are_401_with_a_challenge(api):
    path = f"{API_PREFIX}/nodes"
    r = api.get(path, token=None)
    assert r.status_code == 401 and error_of(r)["code"] == "unauthorized"
    assert r.headers["WWW-Authenticate"] == 'Bearer realm="qkdsdn"'
    r = api.get(path, token="wrong-token-0123456789")
    assert r.status_code == 401 and 'error="invalid_token"' in r.headers["WWW-Authenticate"]
    for header in ("Basic YWRtaW46YWRtaW4=", "Bearer", "Bearer a b", "Token " + ADMIN_TOKEN, "Bearer \u00e9t\u00e9"):
        r = api.get(path, token=None, headers={"Authorization": header})
        assert r.status_code == 401, header
        assert r.headers["WWW-Authenticate"].startswith("Bearer ")
    assert api.get(path, token=None, headers={"Authorization": f"bearer {READ_TOKEN}"}).status_code == 200


def test_read_token_cannot_write(api):
    for method, path, body in (("POST", f"{API_PREFIX}/users", {"name": "x", "sla": sla()}),
                               ("PUT", f"{API_PREFIX}/users/bob", {"sla": sla()}),
                               ("PATCH", f"{API_PREFIX}/users/bob", {"revoked": True}),
                               ("DELETE", f"{API_PREFIX}/users/bob", None),
                               ("POST", f"{API_PREFIX}/applications", {"sae_id": "A", "node": "KM0", "user": "bob"}),
                               ("DELETE", f"{API_PREFIX}/applications/SAE-KM1", None),
                               ("POST", f"{API_PREFIX}/applications/SAE-KM1/certificates", {"fingerprint": FP_A}),
                               ("DELETE", f"{API_PREFIX}/applications/SAE-KM1/certificates/{FP_A}", None),
                               ("DELETE", f"{API_PREFIX}/sessions/{KSID_01}", None)):
        r = api.call(method, path, token=READ_TOKEN, **({"json_body": body} if body is not None else {}))
        assert r.status_code == 403, (method, path)
        assert error_of(r)["code"] == "forbidden"
        assert 'error="insufficient_scope"' in r.headers["WWW-Authenticate"]
    assert api.get(f"{API_PREFIX}/users/bob").get_json()["revoked"] is False


def test_authentication_comes_before_input_checks(api):
    assert api.post(f"{API_PREFIX}/users", {"junk": 1}, token=None).status_code == 401
    assert api.get(f"{API_PREFIX}/events", query={"limit": "x"}, token=None).status_code == 401
    assert api.post(f"{API_PREFIX}/users", {"junk": 1}, token=READ_TOKEN).status_code == 403


def test_client_certificates(api, pki_dir):
    operator = pki.load_certificate(pki_dir.operator()[0])
    controller = pki.load_certificate(pki_dir.controller()[0])
    node = pki.load_certificate(pki_dir.node("KM0")[0])
    app = pki.load_certificate(pki_dir.app("SAE-KM0")[0])
    body = {"name": "henry", "sla": sla()}
    r = api.post(f"{API_PREFIX}/users", body, token=None, environ={PEER_CERT_KEY: operator})
    assert r.status_code == 201
    assert api.delete(f"{API_PREFIX}/users/henry", token=None, environ={PEER_CERT_KEY: controller}).status_code == 204
    for cert in (node, app):
        r = api.get(f"{API_PREFIX}/nodes", token=None, environ={PEER_CERT_KEY: cert})
        assert r.status_code == 403 and "certificate" in error_of(r)["message"]
        # a key manager's certificate plus a valid token: the token decides
        assert api.get(f"{API_PREFIX}/nodes", token=READ_TOKEN, environ={PEER_CERT_KEY: cert}).status_code == 200
    # an operator certificate keeps admin even with a read token; an invalid token is refused outright
    assert api.delete(f"{API_PREFIX}/users/bob", token=READ_TOKEN, environ={PEER_CERT_KEY: operator}
                      ).status_code == 409
    assert api.get(f"{API_PREFIX}/nodes", token="not-a-valid-token-000", environ={PEER_CERT_KEY: operator}
                   ).status_code == 401


def test_certificate_roles_are_configurable(sessions, checker, pki_dir):
    node = pki.load_certificate(pki_dir.node("KM0")[0])
    operator = pki.load_certificate(pki_dir.operator()[0])
    auth = make_auth(certificate_roles={"node": READ})
    api = Api(create_rest_app(DbRestBackend(sessions, token_iterations=ITER), auth), checker)
    assert api.get(f"{API_PREFIX}/nodes", token=None, environ={PEER_CERT_KEY: node}).status_code == 200
    assert api.post(f"{API_PREFIX}/users", {"name": "ivy", "sla": sla()}, token=None,
                    environ={PEER_CERT_KEY: node}).status_code == 403
    assert api.get(f"{API_PREFIX}/nodes", token=None, environ={PEER_CERT_KEY: operator}).status_code == 403


def test_operator_certificate_over_real_mutual_tls(sessions, pki_dir):
    app = create_rest_app(DbRestBackend(sessions, token_iterations=ITER), make_auth())
    tls = TLSConfig.for_controller(pki_dir, require_client_cert=False)
    with HTTPServer(app, "127.0.0.1", 0, tls=tls, name="rest-test") as server:
        operator = https_session(*pki_dir.operator(), pki_dir.ca_cert)
        node = https_session(*pki_dir.node("KM1"), pki_dir.ca_cert)
        anonymous = https_session(None, None, pki_dir.ca_cert)
        try:
            r = operator.post(f"{server.url}{API_PREFIX}/users", json={"name": "jack", "sla": sla()}, timeout=10)
            assert r.status_code == 201, r.text
            assert node.get(f"{server.url}{API_PREFIX}/nodes", timeout=10).status_code == 403
            assert anonymous.get(f"{server.url}{API_PREFIX}/nodes", timeout=10).status_code == 401
            r = anonymous.get(f"{server.url}{API_PREFIX}/users/jack", timeout=10,
                              headers={"Authorization": f"Bearer {READ_TOKEN}"})
            assert r.status_code == 200 and r.json()["name"] == "jack"
        finally:
            for s in (operator, node, anonymous):
                s.close()


def test_token_file(tmp_path):
    admin_hash, read_hash = pki.hash_token(ADMIN_TOKEN, ITER), pki.hash_token(READ_TOKEN, ITER)
    good = tmp_path / "tokens"
    good.write_text(f"# operator API tokens\nadmin {admin_hash} ops  # the console\n\nread {read_hash}\n")
    auth = TokenAuth.from_file(good)
    assert [(e.role, e.name) for e in auth.entries] == [("admin", "ops"), ("read", "tokens:4")]
    assert auth.authenticate({}, f"Bearer {READ_TOKEN}").role == READ
    assert auth.authenticate({}, f"Bearer {ADMIN_TOKEN}").name == "token:ops"

    bad = tmp_path / "bad"
    bad.write_text(f"root {admin_hash}\nadmin {ADMIN_TOKEN}\nread {read_hash} a\nread {read_hash} a\nadmin\n")
    with pytest.raises(TokenFileError) as err:
        TokenAuth.from_file(bad)
    lines = str(err.value).splitlines()
    assert [line.split(":")[1] for line in lines] == ["1", "2", "4", "5"]
    assert "never a clear token" in lines[1] and "duplicate token name 'a'" in lines[2]
    with pytest.raises(TokenFileError, match="cannot read"):
        TokenAuth.from_file(tmp_path / "missing")


def test_token_auth_constructor_checks():
    with pytest.raises(ValueError, match="role"):
        TokenAuth([("superuser", pki.hash_token("x" * 16, ITER))])
    with pytest.raises(ValueError, match="never a clear token"):
        TokenAuth([("admin", ADMIN_TOKEN)])
    with pytest.raises(ValueError, match="unique"):
        TokenAuth([("admin", pki.hash_token("a" * 16, ITER), "x"), ("read", pki.hash_token("b" * 16, ITER), "x")])
    with pytest.raises(ValueError, match="certificate kind"):
        TokenAuth(certificate_roles={"node": "root"})


def test_token_checks_are_remembered_and_serialised(monkeypatch):
    auth = make_auth()
    calls = []
    real = pki.verify_token

    def counting(token, stored):
        calls.append(token)
        return real(token, stored)

    monkeypatch.setattr(pki, "verify_token", counting)
    threads = [threading.Thread(target=auth.authenticate, args=({}, f"Bearer {READ_TOKEN}")) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first = len(calls)
    assert first == 2  # checked against both hashes once, by one thread; the others read the outcome
    with pytest.raises(Unauthorized):
        auth.authenticate({}, "Bearer wrong-token-0123456789")
    with pytest.raises(Unauthorized):
        auth.authenticate({}, "Bearer wrong-token-0123456789")
    assert len(calls) == first + 2


# --------------------------------------------------------------------------- HTTP-level errors


@pytest.mark.parametrize("method, path, allowed", [
    ("POST", f"{API_PREFIX}/nodes", "GET, HEAD"),
    ("DELETE", f"{API_PREFIX}/links/L01", "GET, HEAD"),
    ("PUT", f"{API_PREFIX}/sessions/{KSID_01}", "DELETE, GET, HEAD"),
    ("PATCH", f"{API_PREFIX}/events", "GET, HEAD"),
    ("GET", f"{API_PREFIX}/applications/SAE-KM0/certificates", "POST"),
    ("OPTIONS", f"{API_PREFIX}/users", "GET, HEAD, POST"),
    ("POST", "/metrics", "GET, HEAD"),
])
def test_method_not_allowed_is_json(api, method, path, allowed):
    r = api.call(method, path)
    assert r.status_code == 405
    assert error_of(r)["code"] == "method_not_allowed"
    assert r.headers["Allow"] == allowed


@pytest.mark.parametrize("path", ["/", "/api", f"{API_PREFIX}", f"{API_PREFIX}/nodes/", f"{API_PREFIX}/keys",
                                  f"{API_PREFIX}/nodes/KM0/extra", "/api/v2/nodes", "/%ff"])
def test_unknown_paths_are_json_404(api, path):
    r = api.get(path)
    assert r.status_code == 404
    assert error_of(r)["code"] == "not_found"


def test_every_documented_operation_succeeds_against_its_schema(sessions, doc, terminator, monitoring):
    """One successful call of every operation, each checked against the document."""
    checker = SpecChecker(doc)
    backend = DbRestBackend(sessions, terminate=terminator, metrics=lambda: render_prometheus(monitoring.snapshot(2.0)),
                            health=lambda: {"bus": "ok"}, token_iterations=ITER)
    api = Api(create_rest_app(backend, make_auth()), checker)
    p = API_PREFIX
    calls = [
        ("GET", f"{p}/health", None), ("GET", "/metrics", None), ("GET", "/openapi.json", None),
        ("GET", f"{p}/nodes", None), ("GET", f"{p}/nodes/KM0", None), ("GET", f"{p}/links", None),
        ("GET", f"{p}/links/L01", None), ("GET", f"{p}/links/L01/samples", None), ("GET", f"{p}/users", None),
        ("POST", f"{p}/users", {"name": "kim", "sla": sla(), "token": "kim-token-0123456789"}),
        ("GET", f"{p}/users/kim", None), ("PUT", f"{p}/users/kim", {"sla": sla(max_bps=5)}),
        ("PATCH", f"{p}/users/kim", {"revoked": True}), ("GET", f"{p}/applications", None),
        ("POST", f"{p}/applications", {"sae_id": "SAE-K", "node": "KM3", "user": "kim", "app_id": None}),
        ("GET", f"{p}/applications/SAE-K", None),
        ("POST", f"{p}/applications/SAE-K/certificates", {"fingerprint": FP_A}),
        ("DELETE", f"{p}/applications/SAE-K/certificates/{FP_A}", None), ("DELETE", f"{p}/applications/SAE-K", None),
        ("DELETE", f"{p}/users/kim", None), ("GET", f"{p}/sessions", None), ("GET", f"{p}/sessions/{KSID_01}", None),
        ("DELETE", f"{p}/sessions/{KSID_01}", None), ("GET", f"{p}/routes", None), ("GET", f"{p}/events", None),
    ]
    for method, path, body in calls:
        r = api.call(method, path, **({"json_body": body} if body is not None else {}))
        assert r.status_code < 300, (method, path, r.get_data()[:300])
    ok = {(path, method) for path, method, status in checker.seen if status < 300}
    documented = {(path, method) for path, item in doc["paths"].items() for method in item if method != "parameters"}
    assert documented == ok, sorted(documented ^ ok)


# --------------------------------------------------------------------------- fuzz


def _junk_value(rng: random.Random, depth: int = 0):
    choices = ["int", "bigint", "neg", "float", "str", "unicode", "control", "bool", "null", "list", "dict", "name"]
    if depth > 2:
        choices = choices[:9]
    kind = rng.choice(choices)
    if kind == "int":
        return rng.randint(0, 100000)
    if kind == "bigint":
        return rng.choice([2**31, 2**32, 2**63, 2**64 + 1, -(2**63) - 1, 10**30])
    if kind == "neg":
        return -rng.randint(1, 10**6)
    if kind == "float":
        return rng.choice([0.5, -1.5, 1e308, 3.0, 1e-300])
    if kind == "str":
        return "".join(rng.choice(string.printable) for _ in range(rng.randint(0, 40)))
    if kind == "unicode":
        return rng.choice(["\u00e9\u00e8", "\u2603" * 20, "\ud800", "KM\u0000", "\u202e", "x" * 5000])
    if kind == "control":
        return rng.choice(["\x00", "a\nb", "\x7f", "\t"])
    if kind == "bool":
        return rng.choice([True, False])
    if kind == "null":
        return None
    if kind == "name":
        return rng.choice(["KM0", "KM9", "alice", "SAE-KM1", "L01", FP_A, KSID_01, "a" * 64, "a" * 65])
    if kind == "list":
        return [_junk_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    keys = ["name", "sla", "token", "revoked", "max_bps", "max_priority", "max_sessions", "bucket_bits",
            "allowed_destinations", "sae_id", "node", "user", "priority", "app_id", "cert_sha256", "fingerprint",
            "junk"]
    return {rng.choice(keys): _junk_value(rng, depth + 1) for _ in range(rng.randint(0, 6))}


def _junk_body(rng: random.Random):
    """(bytes, content type) or (JSON value, None)."""
    roll = rng.random()
    if roll < 0.15:
        return rng.choice([b"{", b"\xff", b"[1,", b'{"a":1,"a":2}', b"NaN", b"1e9999", b"", b" ",
                           b'{"sla": {"max_bps": Infinity}}']), "application/json"
    if roll < 0.2:
        return b'{"name": "x"}', rng.choice(["text/plain", "application/xml", "multipart/form-data", ""])
    if roll < 0.5:  # nearly valid: a valid body with one field spoilt
        body = rng.choice([{"name": "fz", "sla": sla(allowed_destinations=["KM1"]), "token": "fuzz-token-0123456789"},
                           {"sae_id": "SAE-FZ", "node": "KM2", "user": "bob", "priority": 1},
                           {"fingerprint": FP_B}, {"sla": {"max_bps": 10}, "revoked": False}])
        body = json.loads(json.dumps(body))
        target = body["sla"] if "sla" in body and rng.random() < 0.5 else body
        target[rng.choice(list(target) + ["junk"])] = _junk_value(rng)
        return body, None
    return _junk_value(rng), None


def test_fuzz_never_yields_a_server_error(api):
    rng = random.Random(20250301)
    paths = [f"{API_PREFIX}/users", f"{API_PREFIX}/users/alice", f"{API_PREFIX}/users/fz",
             f"{API_PREFIX}/users/{{junk}}", f"{API_PREFIX}/applications", f"{API_PREFIX}/applications/SAE-KM5",
             f"{API_PREFIX}/applications/SAE-FZ/certificates", f"{API_PREFIX}/applications/{{junk}}/certificates",
             f"{API_PREFIX}/applications/SAE-KM0/certificates/{{junk}}", f"{API_PREFIX}/sessions",
             f"{API_PREFIX}/sessions/{{junk}}", f"{API_PREFIX}/events", f"{API_PREFIX}/links/{{junk}}/samples",
             f"{API_PREFIX}/links", f"{API_PREFIX}/nodes/{{junk}}", f"{API_PREFIX}/routes", f"{API_PREFIX}/health",
             "/metrics", f"{API_PREFIX}/{{junk}}"]
    params = ["limit", "cursor", "order", "since", "until", "node", "ksid", "kind", "element", "state", "user",
              "junk"]
    junk_segments = ["%00", "..", "%2e%2e", "KM0%0a", "%ff%fe", "a" * 300, "%E2%98%83", "SAE-KM0", "L01", "x y",
                     KSID_45, FP_A, "'; DROP TABLE users; --", "%25", "_", "KM_"]
    statuses = set()
    for _ in range(300):
        method = rng.choice(["GET", "GET", "POST", "PUT", "PATCH", "DELETE"])
        path = rng.choice(paths).replace("{junk}", rng.choice(junk_segments))
        query = {}
        for _ in range(rng.randint(0, 3)):
            value = _junk_value(rng)
            # (a lone surrogate cannot go into a URL at all; its JSON escape can)
            query[rng.choice(params)] = value if isinstance(value, str) and "\ud800" not in value \
                else json.dumps(value)
        token = rng.choice([ADMIN_TOKEN] * 6 + [READ_TOKEN, None, "junk-token-00000000000"])
        kwargs = {}
        if method in ("POST", "PUT", "PATCH"):
            body, content_type = _junk_body(rng)
            if content_type is None:
                kwargs = {"json_body": body}
            else:
                kwargs = {"data": body, "content_type": content_type}
        r = api.call(method, path, token=token, query=query, **kwargs)
        assert r.status_code < 500, (method, path, query, kwargs, r.get_data()[:300])
        statuses.add(r.status_code)
    # the loop reached past authentication and input checks, not just the front door
    assert {200, 400, 401, 403, 404, 405} <= statuses
