"""ETSI GS QKD 014 server of the digital twin: every error case through Flask's test client,
every response checked against the schemas of shared/etsi/qkd014/openapi.yaml."""
from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path

import pytest
import yaml

from db.netfile import Device, Link
from qkdsdn.twin.engine import KeyEngine
from qkdsdn.twin.kme import DEV_SAE_HEADER, create_kme_app

SPEC = Path(__file__).resolve().parents[2] / "shared" / "etsi" / "qkd014" / "openapi.yaml"
MASTER, SLAVE = "KM0", "KM1"
IDENT = "test.sae_id"  # environ key our test identify() reads, standing in for the client cert


# ----------------------------------------------------------------------------- spec checking


SPEC_MISSING = f"ETSI 014 OpenAPI transcription not found at {SPEC} (shared/etsi is absent)"


@pytest.fixture(scope="module")
def spec():
    # Without the spec the behaviour tests still run; only the schema checks are left out
    # (test_responses_are_checked_against_the_spec reports the skip).
    return yaml.safe_load(SPEC.read_text(encoding="utf-8")) if SPEC.is_file() else None


def test_responses_are_checked_against_the_spec(spec):
    if spec is None:
        pytest.skip(SPEC_MISSING + ": responses are checked for behaviour only")
    ops = {(path, method) for path, item in spec["paths"].items() for method in item}
    assert ops == {("/api/v1/keys/{slave_SAE_ID}/status", "get"),
                   ("/api/v1/keys/{slave_SAE_ID}/enc_keys", "get"),
                   ("/api/v1/keys/{slave_SAE_ID}/enc_keys", "post"),
                   ("/api/v1/keys/{master_SAE_ID}/dec_keys", "get"),
                   ("/api/v1/keys/{master_SAE_ID}/dec_keys", "post")}


def check_response(spec: dict | None, method: str, template: str, resp) -> None:
    """The status code is one the spec lists for this operation, and the body fits its schema."""
    import jsonschema

    if resp.status_code == 401:
        assert resp.get_data() == b"", "401 carries no body (ETSI 014: response data model '-')"
    elif resp.status_code in (400, 503):
        assert isinstance(resp.get_json(), dict) and isinstance(resp.get_json().get("message"), str)
    if spec is None:
        return
    op = spec["paths"][template][method.lower()]
    code = str(resp.status_code)
    assert code in op["responses"], f"{method} {template}: {code} is not a documented response"
    answer = op["responses"][code]
    if "$ref" in answer:
        answer = spec["components"]["responses"][answer["$ref"].rsplit("/", 1)[1]]
    content = answer.get("content")
    if content is None:
        assert resp.get_data() == b"", "a response without a data model must have an empty body"
        return
    assert resp.mimetype == "application/json"
    schema = {"$ref": content["application/json"]["schema"]["$ref"], "components": spec["components"]}
    body = resp.get_json()
    jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker()).validate(body)
    for key in body.get("keys", []) if isinstance(body, dict) else []:
        base64.b64decode(key["key"], validate=True)  # format: byte


# ----------------------------------------------------------------------------- fixtures


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def make_engine(clock, **device) -> KeyEngine:
    dev = Device(model="fixed", skr_bps=1_000_000.0, qber=0.02, key_size_bits=256, min_key_size_bits=64,
                 max_key_size_bits=1024, max_keys_per_request=16, buffer_bits=1 << 20, **device)
    link = Link(name="L01", qkdl_id="11111111-2222-4333-8444-555555555555", master=MASTER, slave=SLAVE,
                length_km=10, device=dev)
    return KeyEngine(link, clock=clock)


class Ends:
    """Test clients of the master and slave KMEs of one engine."""

    def __init__(self, spec, engine, insecure_dev=False):
        self.spec, self.engine = spec, engine

        def identify(environ):
            return environ.get(IDENT)

        self.apps = {role: create_kme_app(engine, role, insecure_dev=insecure_dev, identify=identify)
                     for role in ("master", "slave")}
        self.clients = {role: app.test_client() for role, app in self.apps.items()}

    def call(self, role, method, path, *, sae, template=None, check=True, **kw):
        environ = {IDENT: sae} if sae is not None else {}
        resp = self.clients[role].open(path, method=method, environ_base=environ, **kw)
        if check:
            tpl = template or _template(path)
            check_response(self.spec, method, tpl, resp)
        return resp

    def enc(self, method="POST", body=None, *, sae=MASTER, slave=SLAVE, query="", **kw):
        path = f"/api/v1/keys/{slave}/enc_keys{query}"
        if method == "POST" and body is not None:
            kw["json"] = body
        return self.call("master", method, path, sae=sae, template="/api/v1/keys/{slave_SAE_ID}/enc_keys", **kw)

    def dec(self, key_ids=None, method="POST", *, sae=SLAVE, master=MASTER, query="", body=None, role="slave"):
        path = f"/api/v1/keys/{master}/dec_keys{query}"
        kw = {}
        if method == "POST":
            kw["json"] = body if body is not None else {"key_IDs": [{"key_ID": k} for k in key_ids]}
        return self.call(role, method, path, sae=sae, template="/api/v1/keys/{master_SAE_ID}/dec_keys", **kw)


def _template(path: str) -> str:
    parts = path.split("?")[0].split("/")
    name = {"status": "slave_SAE_ID", "enc_keys": "slave_SAE_ID", "dec_keys": "master_SAE_ID"}[parts[-1]]
    parts[-2] = "{" + name + "}"
    return "/".join(parts)


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def ends(spec, clock):
    engine = make_engine(clock)
    clock.t = 1.0  # 1 Mbit available
    return Ends(spec, engine)


# ----------------------------------------------------------------------------- round trip


def test_status_fields_and_extension(ends):
    resp = ends.call("master", "GET", f"/api/v1/keys/{SLAVE}/status", sae=MASTER)
    assert resp.status_code == 200
    st = resp.get_json()
    assert st["source_KME_ID"] == "L01-master" and st["target_KME_ID"] == "L01-slave"
    assert (st["master_SAE_ID"], st["slave_SAE_ID"]) == (MASTER, SLAVE)
    assert st["key_size"] == 256
    assert st["stored_key_count"] == 1_000_000 // 256  # 1 s at 1 Mb/s
    assert st["max_key_count"] == (1 << 20) // 256
    assert (st["max_key_per_request"], st["max_key_size"], st["min_key_size"]) == (16, 1024, 64)
    assert st["max_SAE_ID_count"] == 0
    ext = st["status_extension"]
    assert all(k.startswith("qkdsdn_") for k in ext)
    assert ext["qkdsdn_link_state"] == "up"
    assert ext["qkdsdn_qber"] == pytest.approx(0.02)
    assert ext["qkdsdn_skr_bps"] == pytest.approx(1e6)


def test_enc_keys_then_dec_keys_deliver_identical_keys_once(ends):
    resp = ends.enc(body={"number": 3, "size": 512})
    assert resp.status_code == 200
    keys = resp.get_json()["keys"]
    assert len(keys) == 3
    assert all(len(base64.b64decode(k["key"])) == 64 for k in keys)
    assert all(uuid.UUID(k["key_ID"]).version == 4 for k in keys)
    assert resp.headers["Cache-Control"] == "no-store"

    ids = [k["key_ID"] for k in keys]
    got = ends.dec(ids[:2])
    assert got.status_code == 200
    assert got.get_json()["keys"] == keys[:2]
    single = ends.dec(method="GET", query=f"?key_ID={ids[2]}")
    assert single.status_code == 200
    assert single.get_json()["keys"] == keys[2:]

    # Removed once delivered: the same ID again is not found.
    again = ends.dec(ids[:1])
    assert again.status_code == 400
    assert again.get_json()["message"] == "one or more keys specified are not found on KME"
    st = ends.call("slave", "GET", f"/api/v1/keys/{MASTER}/status", sae=SLAVE).get_json()
    assert st["stored_key_count"] == 0


def test_enc_keys_get_form_and_defaults(ends):
    resp = ends.enc("GET", query="?number=2&size=128")
    assert resp.status_code == 200
    assert [len(base64.b64decode(k["key"])) for k in resp.get_json()["keys"]] == [16, 16]
    default = ends.enc("GET")
    assert len(default.get_json()["keys"]) == 1
    assert len(base64.b64decode(default.get_json()["keys"][0]["key"])) == 32  # key_size 256
    empty_post = ends.enc("POST", data=b"")
    assert empty_post.status_code == 200 and len(empty_post.get_json()["keys"]) == 1


def test_status_at_slave_counts_waiting_keys(ends):
    ends.enc(body={"number": 4})
    st = ends.call("slave", "GET", f"/api/v1/keys/{MASTER}/status", sae=SLAVE)
    assert st.status_code == 200
    assert st.get_json()["stored_key_count"] == 4
    assert st.get_json()["source_KME_ID"] == "L01-slave"


def test_extension_optional_is_ignored(ends):
    resp = ends.enc(body={"number": 1, "extension_optional": [{"abc_route_type": "direct"}]})
    assert resp.status_code == 200


# ----------------------------------------------------------------------------- 400


@pytest.mark.parametrize("body,message", [
    ({"size": 100}, "size shall be a multiple of 8"),
    ({"extension_mandatory": [{"abc_route_type": "direct"}]},
     "not all extension_mandatory parameters are supported"),
    ({"number": 0}, "number must be at least 1, got 0"),
    ({"number": 17}, "number 17 exceeds max_key_per_request (16)"),
    ({"size": 32}, "size 32 is out of range"),
    ({"size": 2048}, "size 2048 is out of range"),
    ({"number": "two"}, "number must be an integer"),
    ({"number": True}, "number must be an integer"),
    ({"size": 25.5}, "size must be an integer"),
    ({"additional_slave_SAE_IDs": ["KM2"]}, "additional_slave_SAE_IDs is not supported"),
    ({"additional_slave_SAE_IDs": "KM2"}, "additional_slave_SAE_IDs must be an array"),
    ({"extension_mandatory": {"a": 1}}, "extension_mandatory must be an array of objects"),
    ({"colour": "blue"}, "unknown item(s) in Key request: colour"),
])
def test_enc_keys_bad_requests(ends, body, message):
    resp = ends.enc(body=body)
    assert resp.status_code == 400
    assert resp.get_json()["message"].startswith(message)
    assert ends.engine.pending_count() == 0


def test_extension_mandatory_details_name_each_unsupported_parameter(ends):
    resp = ends.enc(body={"extension_mandatory": [{"abc_route_type": "direct"}, {"xyz_qos": 1}]})
    assert resp.get_json()["details"] == [
        {"extension_mandatory_unsupported": "abc_route_type is not supported"},
        {"extension_mandatory_unsupported": "xyz_qos is not supported"}]


@pytest.mark.parametrize("query,message", [
    ("?size=100", "size shall be a multiple of 8"),
    ("?number=x", "number must be an integer"),
    ("?number=1&colour=blue", "enc_keys by GET takes only 'number' and 'size'"),
    ("?number=1&number=2", "'number' given more than once"),
])
def test_enc_keys_get_bad_requests(ends, query, message):
    resp = ends.enc("GET", query=query)
    assert resp.status_code == 400
    assert resp.get_json()["message"].startswith(message)


def test_malformed_json_bodies(ends):
    for data in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        resp = ends.enc("POST", data=data, content_type="application/json")
        assert resp.status_code == 400
    resp = ends.dec(body={"key_IDs": []})
    assert resp.status_code == 400 and "non-empty array" in resp.get_json()["message"]
    resp = ends.dec(body={"key_IDs": [{"key_ID": "not-a-uuid"}]})
    assert resp.status_code == 400 and "is not a UUID" in resp.get_json()["message"]
    resp = ends.dec(body={"key_IDs": [{"id": str(uuid.uuid4())}]})
    assert resp.status_code == 400
    resp = ends.call("slave", "POST", f"/api/v1/keys/{MASTER}/dec_keys", sae=SLAVE, data=b"")
    assert resp.status_code == 400 and "empty" in resp.get_json()["message"]


def test_dec_keys_bad_requests(ends):
    ids = [k["key_ID"] for k in ends.enc(body={"number": 2}).get_json()["keys"]]
    unknown = str(uuid.uuid4())
    # All or nothing: one unknown ID fails the request and leaves the others in place.
    resp = ends.dec([ids[0], unknown])
    assert resp.status_code == 400
    body = resp.get_json()
    assert body["message"] == "one or more keys specified are not found on KME"
    assert body["details"] == [{"qkdsdn_missing_key_IDs": [unknown]}]
    assert ends.engine.pending_count() == 2
    resp = ends.dec([ids[0], ids[0]])
    assert resp.status_code == 400 and "more than once" in resp.get_json()["message"]
    resp = ends.dec(method="GET", query=f"?key_ID={ids[0]}&key_ID={ids[1]}")
    assert resp.status_code == 400 and "exactly one key_ID" in resp.get_json()["message"]
    resp = ends.dec(method="GET", query="")
    assert resp.status_code == 400
    resp = ends.dec(method="GET", query=f"?key_ID={ids[0]}&x=1")
    assert resp.status_code == 400 and "only 'key_ID'" in resp.get_json()["message"]
    many = [str(uuid.uuid4()) for _ in range(17)]
    resp = ends.dec(many)
    assert resp.status_code == 400 and "max_key_per_request" in resp.get_json()["message"]
    assert ends.dec(ids).status_code == 200


def test_unknown_sae_ids_in_path(ends):
    resp = ends.call("master", "GET", "/api/v1/keys/KM9/status", sae=MASTER)
    assert resp.status_code == 400 and "'KM9' is not connected to this KME" in resp.get_json()["message"]
    resp = ends.enc(slave="KM9", body={})
    assert resp.status_code == 400 and "KM9" in resp.get_json()["message"]
    ids = [k["key_ID"] for k in ends.enc(body={}).get_json()["keys"]]
    resp = ends.dec(ids, master="KM9")
    assert resp.status_code == 400 and "KM9" in resp.get_json()["message"]


def test_wrong_direction_is_refused(ends):
    # The slave SAE cannot originate keys, and the master KME holds none to decrypt.
    resp = ends.call("slave", "POST", f"/api/v1/keys/{MASTER}/enc_keys", sae=SLAVE, json={},
                     template="/api/v1/keys/{slave_SAE_ID}/enc_keys")
    assert resp.status_code == 400 and "runs from master SAE KM0 to slave SAE KM1" in resp.get_json()["message"]
    resp = ends.dec([str(uuid.uuid4())], sae=MASTER, master=SLAVE, role="master")
    assert resp.status_code == 400
    assert resp.get_json()["message"] == "one or more keys specified are not found on KME"


# ----------------------------------------------------------------------------- 401


def test_wrong_or_missing_sae_gets_401_without_body(ends):
    for sae in (None, SLAVE, "KM2", "SAE-KM0"):
        resp = ends.call("master", "GET", f"/api/v1/keys/{SLAVE}/status", sae=sae)
        assert resp.status_code == 401 and resp.get_data() == b""
        assert ends.enc(body={"number": 1}, sae=sae).status_code == 401
    ids = [k["key_ID"] for k in ends.enc(body={"number": 1}).get_json()["keys"]]
    for sae in (None, MASTER, "KM2"):
        assert ends.dec(ids, sae=sae).status_code == 401
        assert ends.dec(method="GET", query=f"?key_ID={ids[0]}", sae=sae).status_code == 401
    # A 401 takes nothing: the rightful slave still gets its key.
    assert ends.dec(ids).status_code == 200


def test_dev_header_only_in_insecure_dev_mode(spec, clock):
    engine = make_engine(clock)
    clock.t = 1.0
    plain = create_kme_app(engine, "master", identify=lambda env: None).test_client()
    resp = plain.get(f"/api/v1/keys/{SLAVE}/status", headers={DEV_SAE_HEADER: MASTER})
    assert resp.status_code == 401
    dev = create_kme_app(engine, "master", insecure_dev=True, identify=lambda env: None).test_client()
    resp = dev.get(f"/api/v1/keys/{SLAVE}/status", headers={DEV_SAE_HEADER: MASTER})
    assert resp.status_code == 200
    check_response(spec, "GET", "/api/v1/keys/{slave_SAE_ID}/status", resp)
    assert dev.get(f"/api/v1/keys/{SLAVE}/status", headers={DEV_SAE_HEADER: SLAVE}).status_code == 401


# ----------------------------------------------------------------------------- 503


def test_insufficient_key_is_503(spec, clock):
    engine = make_engine(clock)
    ends = Ends(spec, engine)
    clock.t = 0.001  # 1000 bits: three 256-bit keys
    resp = ends.enc(body={"number": 4})
    assert resp.status_code == 503
    assert "insufficient key material" in resp.get_json()["message"]
    assert ends.enc(body={"number": 3}).status_code == 200


def test_cut_link_is_503_once_buffer_is_empty_and_restore_recovers(spec, clock):
    engine = make_engine(clock)
    ends = Ends(spec, engine)
    clock.t = 0.001
    engine.cut()
    clock.t = 10.0
    st = ends.call("master", "GET", f"/api/v1/keys/{SLAVE}/status", sae=MASTER).get_json()
    assert st["status_extension"]["qkdsdn_link_state"] == "cut"
    assert st["stored_key_count"] == 3
    assert ends.enc(body={"number": 3}).status_code == 200
    resp = ends.enc(body={"number": 1})
    assert resp.status_code == 503 and "link cut" in resp.get_json()["message"]
    engine.restore()
    clock.t = 11.0
    assert ends.enc(body={"number": 1}).status_code == 200


def test_eavesdropper_above_threshold_shows_in_status_and_stops_key(spec, clock):
    engine = make_engine(clock)
    ends = Ends(spec, engine)
    engine.set_eavesdropper(0.4)
    clock.t = 5.0
    st = ends.call("master", "GET", f"/api/v1/keys/{SLAVE}/status", sae=MASTER).get_json()
    assert st["status_extension"]["qkdsdn_qber"] == pytest.approx(0.12)
    assert st["status_extension"]["qkdsdn_link_state"] == "aborted"
    assert st["stored_key_count"] == 0
    resp = ends.enc(body={})
    assert resp.status_code == 503 and "abort threshold" in resp.get_json()["message"]


def test_unknown_route_and_method_answer_json(ends):
    resp = ends.clients["master"].get("/api/v1/nothing", environ_base={IDENT: MASTER})
    assert resp.status_code == 404 and "message" in resp.get_json()
    resp = ends.clients["master"].delete(f"/api/v1/keys/{SLAVE}/status", environ_base={IDENT: MASTER})
    assert resp.status_code == 405 and "message" in resp.get_json()


def test_key_bytes_never_reach_logs(spec, clock, caplog):
    engine = make_engine(clock)
    ends = Ends(spec, engine)
    clock.t = 1.0
    caplog.set_level("DEBUG")
    keys = ends.enc(body={"number": 2}).get_json()["keys"]
    ends.dec([k["key_ID"] for k in keys])
    ends.dec([k["key_ID"] for k in keys])  # a failing one too
    text = caplog.text
    for k in keys:
        assert k["key"] not in text
        assert base64.b64decode(k["key"]).hex() not in text


def test_role_must_be_known(clock):
    with pytest.raises(ValueError):
        create_kme_app(make_engine(clock), "observer")


def test_json_error_bodies_are_compact_json(ends):
    body = ends.enc(body={"size": 100}).get_data()
    assert json.loads(body) == {"message": "size shall be a multiple of 8"}
