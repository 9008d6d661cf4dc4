"""The agent's application APIs over real HTTPS with mutual TLS: ETSI GS QKD 014 (every
response checked against the schemas of shared/etsi/qkd014/openapi.yaml) and the ETSI GS
QKD 004 JSON mapping (every status code an application can meet), on the paper's network
run in this process: digital twin + one agent per node on loopback."""
from __future__ import annotations

import base64
import threading
import time
import uuid
from pathlib import Path

import pytest
import requests
import yaml

from agent_harness import EXAMPLES, Network, relocate
from agents.client import ETSI004Error, QoS
from agents.core.keymanager import METADATA_MAX_SIZE
from agents.core.session import Status

SPEC = Path(__file__).resolve().parents[2] / "shared" / "etsi" / "qkd014" / "openapi.yaml"
SIZE_NOT_MULTIPLE_OF_8 = "size shall be a multiple of 8"
EXT_MANDATORY = "not all extension_mandatory parameters are supported"
NOT_FOUND = "one or more keys specified are not found on KME"
STATUS, ENC, DEC = ("/api/v1/keys/{slave_SAE_ID}/status", "/api/v1/keys/{slave_SAE_ID}/enc_keys",
                    "/api/v1/keys/{master_SAE_ID}/dec_keys")
# The second application on KM1 is not the slave of keys made for SAE-KM1.
OTHER = "SAE-KM1-B"
LOAD_MAX_CALLS, LOAD_MAX_S = 200, 15.0


def _edit(data: dict) -> None:
    data["applications"].append({"sae_id": OTHER, "node": "KM1", "user": "bob", "priority": 1})
    for user in data["users"]:
        user["sla"]["max_sessions"] = 64  # the module opens many sessions; none is refused for quota


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("agent-api")
    path = relocate(EXAMPLES / "paper-poc.yaml", tmp / "net.yaml", edit=_edit)
    with Network(path, tmp, tls=True) as network:
        network.wait_for_pools()
        yield network


@pytest.fixture(scope="module")
def spec():
    return yaml.safe_load(SPEC.read_text(encoding="utf-8")) if SPEC.is_file() else None


def check_014(spec: dict | None, method: str, template: str, resp: requests.Response) -> None:
    """The status code is one the spec lists for the operation and the body fits its schema."""
    import jsonschema

    if resp.status_code == 401:
        assert resp.content == b"", "ETSI 014: a 401 carries no body"
    elif resp.status_code in (400, 503):
        assert isinstance(resp.json().get("message"), str)
    if spec is None:
        return
    op = spec["paths"][template][method.lower()]
    assert str(resp.status_code) in op["responses"], f"{method} {template}: {resp.status_code} not in the spec"
    answer = op["responses"][str(resp.status_code)]
    if "$ref" in answer:
        answer = spec["components"]["responses"][answer["$ref"].rsplit("/", 1)[1]]
    content = answer.get("content")
    if content is None:
        assert resp.content == b""
        return
    assert resp.headers["Content-Type"].startswith("application/json")
    schema = {"$ref": content["application/json"]["schema"]["$ref"], "components": spec["components"]}
    body = resp.json()
    jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker()).validate(body)
    for key in body.get("keys", []):
        base64.b64decode(key["key"], validate=True)
        uuid.UUID(key["key_ID"])


class Api014:
    """Raw ETSI 014 calls of one SAE at its home key manager; every answer checked against the spec."""

    def __init__(self, net: Network, spec: dict | None, sae: str, node: str | None = None):
        app = next(a for a in net.net.applications if a.sae_id == sae)
        self.base = net.url(node or app.node) + "/api/v1/keys"
        self.http = net.session("sae", sae)
        self.spec = spec

    def call(self, method: str, template: str, peer: str, **kw) -> requests.Response:
        path = template.replace("{slave_SAE_ID}", peer).replace("{master_SAE_ID}", peer).removeprefix("/api/v1/keys")
        resp = self.http.request(method, self.base + path, timeout=30, **kw)
        check_014(self.spec, method, template, resp)
        return resp

    def status(self, slave: str) -> requests.Response:
        return self.call("GET", STATUS, slave)

    def enc(self, slave: str, body: dict | None = None, params: dict | None = None) -> requests.Response:
        if params is not None:
            return self.call("GET", ENC, slave, params=params)
        return self.call("POST", ENC, slave, json=body if body is not None else {})

    def dec(self, master: str, ids: list[str] | None = None, params: dict | None = None) -> requests.Response:
        if params is not None:
            return self.call("GET", DEC, master, params=params)
        return self.call("POST", DEC, master, json={"key_IDs": [{"key_ID": k} for k in ids]})


def keys_of(resp: requests.Response) -> dict[str, bytes]:
    assert resp.status_code == 200, resp.text
    return {k["key_ID"]: base64.b64decode(k["key"]) for k in resp.json()["keys"]}


@pytest.fixture(scope="module")
def km0(net, spec):
    return Api014(net, spec, "SAE-KM0")


@pytest.fixture(scope="module")
def km1(net, spec):
    return Api014(net, spec, "SAE-KM1")


# ============================================================================ ETSI 014


def test_spec_is_present_for_schema_checks(spec):
    if spec is None:
        pytest.skip(f"ETSI 014 OpenAPI transcription not found at {SPEC}: responses checked for behaviour only")
    assert {"Status", "KeyContainer", "KeyIDs", "Error"} <= set(spec["components"]["schemas"])


def test_014_status_document(net, km0, spec):
    resp = km0.status("SAE-KM1")
    assert resp.status_code == 200
    st = resp.json()
    assert (st["source_KME_ID"], st["target_KME_ID"], st["master_SAE_ID"], st["slave_SAE_ID"]) == (
        "KM0", "KM1", "SAE-KM0", "SAE-KM1")
    assert (st["key_size"], st["min_key_size"], st["max_key_size"]) == (256, 64, 8192)
    assert st["max_key_per_request"] == 128 and st["max_SAE_ID_count"] == 16
    assert 0 < st["stored_key_count"] <= st["max_key_count"]
    assert st["status_extension"] == {"qkdsdn_route_hops": 0}
    # A relayed pair: the target is the slave's key manager, one trusted node in between.
    relayed = Api014(net, spec, "SAE-KM2").status("SAE-KM3").json()
    assert (relayed["source_KME_ID"], relayed["target_KME_ID"]) == ("KM2", "KM3")
    assert relayed["status_extension"] == {"qkdsdn_route_hops": 1}


def test_014_round_trip_post_and_get_forms(km0, km1):
    made = keys_of(km0.enc("SAE-KM1", {"number": 3, "size": 512}))
    assert len(made) == 3 and all(len(k) == 64 for k in made.values())
    more = keys_of(km0.enc("SAE-KM1", params={"number": 2, "size": 128}))
    assert len(more) == 2 and all(len(k) == 16 for k in more.values())
    default = keys_of(km0.enc("SAE-KM1"))
    assert [len(k) for k in default.values()] == [32]  # number 1, key_size 256 bits
    assert len(set(made) | set(more) | set(default)) == 6
    assert len({*made.values(), *more.values(), *default.values()}) == 6
    ids = list(made)
    assert keys_of(km1.dec("SAE-KM0", ids[:2])) == {k: made[k] for k in ids[:2]}
    assert keys_of(km1.dec("SAE-KM0", params={"key_ID": ids[2]})) == {ids[2]: made[ids[2]]}
    assert keys_of(km1.dec("SAE-KM0", list(more) + list(default))) == {**more, **default}


def test_014_relayed_pair_gets_identical_keys(net, spec):
    master, slave = Api014(net, spec, "SAE-KM2"), Api014(net, spec, "SAE-KM3")
    made = keys_of(master.enc("SAE-KM3", {"number": 4, "size": 256}))
    assert keys_of(slave.dec("SAE-KM2", list(made))) == made


def test_014_a_key_is_delivered_once(km0, km1):
    made = keys_of(km0.enc("SAE-KM1", {"number": 2}))
    first, second = list(made)
    assert keys_of(km1.dec("SAE-KM0", [first])) == {first: made[first]}
    for again in (km1.dec("SAE-KM0", [first]), km1.dec("SAE-KM0", params={"key_ID": first}),
                  km1.dec("SAE-KM0", [second, first])):
        assert again.status_code == 400 and again.json()["message"] == NOT_FOUND
    # The refused request that named the second key did not consume it.
    assert keys_of(km1.dec("SAE-KM0", [second])) == {second: made[second]}


@pytest.mark.parametrize("body, params, message", [
    ({"size": 100}, None, SIZE_NOT_MULTIPLE_OF_8),
    (None, {"size": 100}, SIZE_NOT_MULTIPLE_OF_8),
    ({"size": 8}, None, "size must be between 64 and 8192"),
    ({"size": 8200}, None, "size must be between 64 and 8192"),
    ({"number": 129}, None, "number exceeds max_key_per_request (128)"),
    (None, {"number": 129}, "number exceeds max_key_per_request (128)"),
    ({"number": 0}, None, "number must be a positive integer"),
    ({"number": "2"}, None, "number and size must be integers"),
    ({"extension_mandatory": [{"vendor_option": True}]}, None, EXT_MANDATORY),
    ({"additional_slave_SAE_IDs": ["SAE-NOWHERE"]}, None, "unknown slave SAE 'SAE-NOWHERE'"),
    ({"additional_slave_SAE_IDs": "SAE-KM4"}, None, "additional_slave_SAE_IDs must be an array of SAE IDs"),
    ({"additional_slave_SAE_IDs": ["SAE-KM4", "SAE-KM4"]}, None, "additional_slave_SAE_IDs names a slave SAE twice"),
    ({"additional_slave_SAE_IDs": ["SAE-KM1"]}, None, "additional_slave_SAE_IDs names a slave SAE twice"),
    ({"additional_slave_SAE_IDs": ["SAE-KM0"]}, None, "the master SAE cannot be one of its slave SAEs"),
    ({"additional_slave_SAE_IDs": [f"SAE-X{i}" for i in range(17)]}, None, "unknown slave SAE 'SAE-X0'"),
], ids=["size-not-multiple-post", "size-not-multiple-get", "size-below-min", "size-above-max",
        "number-above-max-post", "number-above-max-get", "number-zero", "number-not-integer",
        "extension-mandatory", "multicast-unknown-slave", "multicast-not-an-array", "multicast-repeated-slave",
        "multicast-slave-twice", "multicast-master-as-slave", "multicast-too-many"])
def test_014_enc_keys_errors(km0, body, params, message):
    resp = km0.enc("SAE-KM1", body, params)
    assert resp.status_code == 400
    assert resp.json()["message"] == message


def test_014_multicast_every_slave_gets_the_same_keys_once(net, spec):
    """additional_slave_SAE_IDs: one key_ID, the same bytes at every slave (adjacent and relayed
    over two hops), each slave served once; an SAE that is not a slave gets 401 where a copy is."""
    master = Api014(net, spec, "SAE-KM1")
    assert master.status("SAE-KM0").json()["max_SAE_ID_count"] == 16
    made = keys_of(master.enc("SAE-KM0", {"number": 3, "size": 512,
                                          "additional_slave_SAE_IDs": ["SAE-KM4", "SAE-KM5"]}))
    assert len(made) == 3 and all(len(k) == 64 for k in made.values())
    # ETSI 015 at the master's node: one qkd_app per slave, each accounting the keys handed out.
    apps = net.session("controller").get(net.url("KM1") + "/restconf/data/etsi-qkd-sdn-node:qkd_node/"
                                         "qkd_applications", timeout=30).json()[
        "etsi-qkd-sdn-node:qkd_applications"]["qkd_app"]
    (to_km4,) = [a for a in apps if a["server_app_id"] == "SAE-KM1" and a["client_app_id"] == ["SAE-KM4"]]
    assert sum(int(s["consumed_bits"]) for s in to_km4["app_statistics"]["statistics"]) == 3 * 512
    ids = list(made)
    for slave in ("SAE-KM0", "SAE-KM4", "SAE-KM5"):
        api = Api014(net, spec, slave)
        assert keys_of(api.dec("SAE-KM1", ids[:2])) == {k: made[k] for k in ids[:2]}
        assert keys_of(api.dec("SAE-KM1", params={"key_ID": ids[2]})) == {ids[2]: made[ids[2]]}
        again = api.dec("SAE-KM1", [ids[0]])
        assert again.status_code == 400 and again.json()["message"] == NOT_FOUND
    # The next call of the group: new key_IDs, new keys.
    more = keys_of(master.enc("SAE-KM4", {"additional_slave_SAE_IDs": ["SAE-KM0", "SAE-KM5"]}))
    assert not set(more) & set(made) and not set(more.values()) & set(made.values())
    assert keys_of(Api014(net, spec, "SAE-KM5").dec("SAE-KM1", list(more))) == more
    # Keys of the pair SAE-KM1 -> SAE-KM0 alone are not the group's.
    alone = keys_of(master.enc("SAE-KM0", {"number": 1}))
    assert not set(alone) & set(made)
    assert Api014(net, spec, "SAE-KM4").dec("SAE-KM1", list(alone)).status_code == 400


def test_014_multicast_to_two_slaves_on_one_node_and_401_for_others(net, spec, km0, km1):
    made = keys_of(km0.enc("SAE-KM1", {"number": 2, "additional_slave_SAE_IDs": [OTHER]}))
    ids = list(made)
    other = Api014(net, spec, OTHER)
    assert keys_of(other.dec("SAE-KM0", ids)) == made
    assert keys_of(km1.dec("SAE-KM0", ids)) == made
    assert other.dec("SAE-KM0", ids[:1]).status_code == 400  # each copy once
    # Keys made for SAE-KM1 and SAE-KM4 only: the other application on KM1 is not a slave of them.
    only = keys_of(km0.enc("SAE-KM1", {"additional_slave_SAE_IDs": ["SAE-KM4"]}))
    resp = other.dec("SAE-KM0", list(only))
    assert resp.status_code == 401 and resp.content == b""
    assert keys_of(km1.dec("SAE-KM0", list(only))) == only


@pytest.mark.parametrize("slave", ["SAE-NOWHERE", "SAE-KM0"], ids=["unknown", "itself"])
def test_014_unknown_slave(km0, slave):
    for resp in (km0.enc(slave, {"number": 1}), km0.enc(slave, params={"number": 1}), km0.status(slave)):
        assert resp.status_code == 400
        assert slave in resp.json()["message"]


def test_014_dec_keys_errors(km0, km1):
    made = keys_of(km0.enc("SAE-KM1", {"number": 1}))
    (kid,) = made
    for resp in (km1.dec("SAE-KM0", [str(uuid.uuid4())]), km1.dec("SAE-KM0", params={"key_ID": str(uuid.uuid4())}),
                 km1.dec("SAE-KM0", [kid, str(uuid.uuid4())]), km1.dec("SAE-KM4", [kid])):
        assert resp.status_code == 400 and resp.json()["message"] == NOT_FOUND
    assert km1.call("POST", DEC, "SAE-KM0", json={"key_IDs": []}).status_code == 400
    assert km1.call("POST", DEC, "SAE-KM0", json={"key_IDs": [{"key_ID": kid}],
                                                 "key_IDs_extension": {"vendor_x": 1}}).json()["message"] == EXT_MANDATORY
    assert km1.dec("SAE-KM0", params={}).status_code == 400
    # None of the refused requests consumed the key.
    assert keys_of(km1.dec("SAE-KM0", [kid])) == made


def test_014_dec_keys_by_an_application_that_is_not_the_slave_is_401(net, spec, km0, km1):
    made = keys_of(km0.enc("SAE-KM1", {"number": 1}))
    (kid,) = made
    intruder = Api014(net, spec, OTHER)  # homed on KM1 too, holding a valid certificate
    for resp in (intruder.dec("SAE-KM0", [kid]), intruder.dec("SAE-KM0", params={"key_ID": kid})):
        assert resp.status_code == 401 and resp.content == b""
    # The master itself may not read the slave's copy either.
    assert Api014(net, spec, "SAE-KM0", node="KM1").dec("SAE-KM0", [kid]).status_code == 401
    assert keys_of(km1.dec("SAE-KM0", [kid])) == made


def test_014_callers_that_are_not_applications_are_401(net, spec):
    for kind, name in (("node", "KM0"), ("controller", None), ("operator", None)):
        http = net.session(kind, name)
        for resp in (http.get(net.url("KM0") + "/api/v1/keys/SAE-KM1/status", timeout=30),
                     http.post(net.url("KM0") + "/api/v1/keys/SAE-KM1/enc_keys", json={}, timeout=30)):
            check_014(spec, resp.request.method, STATUS if resp.request.method == "GET" else ENC, resp)
            assert resp.status_code == 401
    # An application homed on another node is not served here.
    assert Api014(net, spec, "SAE-KM4", node="KM0").status("SAE-KM1").status_code == 401


def test_tls_handshake_without_a_client_certificate_is_refused(net):
    from qkdsdn.httpserver import https_session

    anonymous = https_session(None, None, net.pki.ca_cert)
    for path in ("/api/v1/keys/SAE-KM1/status", "/api/v1/qkd004/open_connect",
                 "/restconf/data/etsi-qkd-sdn-node:qkd_node"):
        with pytest.raises((requests.exceptions.SSLError, requests.exceptions.ConnectionError)):
            anonymous.get(net.url("KM0") + path, timeout=30)
    # Plain HTTP to the TLS listener is told to use HTTPS; nothing behind it answers.
    plain = requests.get(net.url("KM0").replace("https", "http") + "/api/v1/keys/SAE-KM1/status", timeout=30)
    assert plain.status_code == 400 and "HTTPS only" in plain.text
    # A certificate from another CA is refused in the handshake as well.
    from qkdsdn.pki import PkiLayout, init_pki

    foreign = PkiLayout(init_pki(net.net, net.state / "foreign-pki") and net.state / "foreign-pki")
    stranger = https_session(*foreign.app("SAE-KM0"), net.pki.ca_cert)
    with pytest.raises((requests.exceptions.SSLError, requests.exceptions.ConnectionError)):
        stranger.get(net.url("KM0") + "/api/v1/keys/SAE-KM1/status", timeout=30)


# ============================================================================ ETSI 004


def open_pair(net: Network, source: str, destination: str, qos: QoS, ksid: str | None = None):
    """Both applications call OPEN_CONNECT on the same KSID concurrently; returns both answers."""
    ksid = ksid or str(uuid.uuid4())
    out: dict[str, object] = {}

    def run(sae: str) -> None:
        try:
            out[sae] = net.client(sae).open_connect(source, destination, qos, ksid)
        except Exception as exc:  # noqa: BLE001 — reported by the assertion below
            out[sae] = exc

    threads = [threading.Thread(target=run, args=(sae,)) for sae in (source, destination)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return ksid, out[source], out[destination]


QOS = QoS(Key_chunk_size=32, Timeout=10_000)


def test_004_round_trip_status_0(net):
    ksid, a, b = open_pair(net, "SAE-KM0", "SAE-KM1", QOS)
    assert (a.status, b.status) == (0, 0) and a.key_stream_id == b.key_stream_id == ksid
    assert a.qos.Key_chunk_size == 32 and a.qos.Max_bps == 64000  # the SLA's rate, granted
    src, dst = net.client("SAE-KM0"), net.client("SAE-KM1")
    got_src = [src.get_key(ksid, metadata_size=METADATA_MAX_SIZE) for _ in range(3)]  # indices chosen by the KM
    got_dst = [dst.get_key(ksid, index=i, metadata_size=METADATA_MAX_SIZE) for i in (2, 0, 1)]
    assert [k.status for k in got_src + got_dst] == [0] * 6
    assert [k.index for k in got_src] == [0, 1, 2]
    by_index = {k.index: k.key for k in got_dst}
    assert [k.key for k in got_src] == [by_index[i] for i in range(3)]
    assert all(len(k.key) == 32 for k in got_src) and len({k.key for k in got_src}) == 3
    assert all(k.metadata["hops"] == 0 and k.metadata["age"] >= 0 for k in got_src + got_dst)
    # A key is handed out once per side: asking for it again is refused at once, at both ends.
    for client in (src, dst):
        with pytest.raises(ETSI004Error) as again:
            client.get_key(ksid, index=1)
        assert again.value.status == 409 and "already delivered" in again.value.message
    assert src.get_key(ksid).index == 3  # the next index the source KM chooses
    assert (src.close(ksid), dst.close(ksid)) == (0, 0)


def test_004_peer_that_opens_late_status_1_then_3_then_0(net):
    src, dst = net.client("SAE-KM0"), net.client("SAE-KM1")
    ksid = str(uuid.uuid4())
    # Its Timeout also bounds the session's GET_KEY calls below: short, not too short for a busy machine.
    alone = src.open_connect("SAE-KM0", "SAE-KM1", QoS(Key_chunk_size=32, Timeout=1500), ksid)
    assert alone.status == Status.PEER_NOT_CONNECTED and alone.key_stream_id == ksid
    early = src.get_key(ksid, index=0)
    assert early.status == Status.PEER_NOT_YET_CONNECTED
    # The half-open session is still there: the peer opening later completes it.
    late = dst.open_connect("SAE-KM0", "SAE-KM1", QoS(Key_chunk_size=32, Timeout=10_000), ksid)
    assert late.status == 0
    # The first application learns that its peer connected by opening again (same KSID).
    again = src.open_connect("SAE-KM0", "SAE-KM1", QoS(Key_chunk_size=32, Timeout=10_000), ksid)
    assert again.status == 0 and again.key_stream_id == ksid
    a = src.get_key(ksid, index=0)
    b = dst.get_key(ksid, index=0)
    assert (a.status, b.status) == (0, 0) and a.key == b.key
    assert (src.close(ksid), dst.close(ksid)) == (0, 0)


def test_004_a_half_open_session_closed_by_its_application_is_not_completed_later(net):
    src, dst = net.client("SAE-KM0"), net.client("SAE-KM1")
    ksid = str(uuid.uuid4())
    assert src.open_connect("SAE-KM0", "SAE-KM1", QoS(Key_chunk_size=32, Timeout=300), ksid).status == 1
    assert src.close(ksid) == 0
    authority = net.agents["KM0"].control  # the source application's key manager admits the session
    deadline = time.monotonic() + 20
    while ksid in authority._pending and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ksid not in authority._pending
    # The peer opening now waits for a new first half instead of joining the closed one.
    assert dst.open_connect("SAE-KM0", "SAE-KM1", QoS(Key_chunk_size=32, Timeout=300), ksid).status == 1
    assert dst.close(ksid) == 0


def test_004_unknown_or_closed_ksid_status_4(net):
    src, dst = net.client("SAE-KM0"), net.client("SAE-KM1")
    assert src.get_key(str(uuid.uuid4()), index=0).status == Status.NO_QKD_CONNECTION
    assert src.close(str(uuid.uuid4())) == Status.NO_QKD_CONNECTION
    ksid, a, b = open_pair(net, "SAE-KM0", "SAE-KM1", QOS)
    assert (a.status, b.status) == (0, 0)
    # Another application cannot see the session: it looks unknown to it.
    assert net.client(OTHER).get_key(ksid, index=0).status == Status.NO_QKD_CONNECTION
    assert src.close(ksid) == 0
    assert src.get_key(ksid, index=0).status == Status.NO_QKD_CONNECTION
    assert dst.close(ksid) == 0


def test_004_ksid_in_use_status_5(net):
    ksid, a, b = open_pair(net, "SAE-KM0", "SAE-KM1", QOS)
    assert (a.status, b.status) == (0, 0)
    # Another application on the destination's node, and the source towards another peer.
    taken = net.client(OTHER).open_connect("SAE-KM0", OTHER, QOS, ksid)
    assert taken.status == Status.KSID_IN_USE
    assert net.client("SAE-KM0").open_connect("SAE-KM0", "SAE-KM4", QOS, ksid).status == Status.KSID_IN_USE
    # The session of a relayed pair is in use at its trusted node KM0 too.
    rksid, c, d = open_pair(net, "SAE-KM2", "SAE-KM3", QOS)
    assert (c.status, d.status) == (0, 0)
    assert net.client("SAE-KM0").open_connect("SAE-KM0", "SAE-KM1", QOS, rksid).status == Status.KSID_IN_USE
    # A retry by the session's own application is not a conflict.
    assert net.client("SAE-KM0").open_connect("SAE-KM0", "SAE-KM1", QOS, ksid).status == 0
    for sae, k in (("SAE-KM0", ksid), ("SAE-KM1", ksid), ("SAE-KM2", rksid), ("SAE-KM3", rksid)):
        assert net.client(sae).close(k) == 0


def test_004_qos_beyond_the_sla_status_7_with_a_counter_proposal(net):
    src = net.client("SAE-KM0")
    too_fast = src.open_connect("SAE-KM0", "SAE-KM1", QoS(Key_chunk_size=32, Max_bps=1_000_000, Timeout=2000))
    assert too_fast.status == Status.QOS_NOT_MET
    assert too_fast.qos.Max_bps == 64000 and too_fast.qos.Key_chunk_size == 32
    carol = net.client("SAE-KM2")  # max_priority 3
    urgent = carol.open_connect("SAE-KM2", "SAE-KM3", QoS(Key_chunk_size=32, Priority=6, Timeout=2000))
    assert urgent.status == Status.QOS_NOT_MET and urgent.qos.Priority == 3
    big = src.open_connect("SAE-KM0", "SAE-KM1", QoS(Key_chunk_size=65536 // 8 + 8, Timeout=2000))
    assert big.status == Status.QOS_NOT_MET and big.qos.Key_chunk_size == 65536 // 8
    xml = src.open_connect("SAE-KM0", "SAE-KM1", QoS(Key_chunk_size=32, Metadata_mimetype="text/xml", Timeout=2000))
    assert xml.status == Status.QOS_NOT_MET and xml.qos.Metadata_mimetype == "application/json"
    # The counter-proposal is accepted as it is.
    ksid, a, b = open_pair(net, "SAE-KM0", "SAE-KM1", too_fast.qos)
    assert (a.status, b.status) == (0, 0) and a.qos.Max_bps == 64000
    assert (src.close(ksid), net.client("SAE-KM1").close(ksid)) == (0, 0)


def test_004_peers_with_different_key_chunk_sizes_get_status_7_with_the_peers_size(net):
    ksid = str(uuid.uuid4())
    src, dst = net.client("SAE-KM0"), net.client("SAE-KM1")
    waiting = {}
    peer = threading.Thread(target=lambda: waiting.setdefault(
        "b", dst.open_connect("SAE-KM0", "SAE-KM1", QoS(Key_chunk_size=32, Timeout=15_000), ksid)))
    peer.start()
    deadline = time.monotonic() + 15
    while ksid not in net.agents["KM0"].control._pending and time.monotonic() < deadline:
        time.sleep(0.02)
    other = src.open_connect("SAE-KM0", "SAE-KM1", QoS(Key_chunk_size=64, Timeout=5000), ksid)
    assert other.status == Status.QOS_NOT_MET and other.qos.Key_chunk_size == 32
    agreed = src.open_connect("SAE-KM0", "SAE-KM1", other.qos, ksid)  # the counter-proposal as it is
    peer.join(timeout=30)
    assert agreed.status == 0 and waiting["b"].status == 0
    key = src.get_key(ksid)
    assert len(key.key) == 32 and dst.get_key(ksid, index=key.index).key == key.key
    assert (src.close(ksid), dst.close(ksid)) == (0, 0)


def test_004_metadata_buffer_too_small_status_8(net):
    ksid, a, b = open_pair(net, "SAE-KM0", "SAE-KM1", QOS)
    assert (a.status, b.status) == (0, 0)
    src = net.client("SAE-KM0")
    small = src.get_key(ksid, index=0, metadata_size=4)
    assert small.status == Status.METADATA_SIZE_INSUFFICIENT and small.metadata_size == METADATA_MAX_SIZE
    ok = src.get_key(ksid, index=0, metadata_size=small.metadata_size)
    assert ok.status == 0 and ok.metadata == {"age": ok.metadata["age"], "hops": 0}
    assert len(ok.key) == 32
    assert (src.close(ksid), net.client("SAE-KM1").close(ksid)) == (0, 0)


def test_004_no_metadata_for_a_session_that_wants_none(net):
    ksid, a, b = open_pair(net, "SAE-KM0", "SAE-KM1", QoS(Key_chunk_size=32, Timeout=10_000, Metadata_mimetype=""))
    assert (a.status, b.status) == (0, 0) and a.qos.Metadata_mimetype == ""
    src, dst = net.client("SAE-KM0"), net.client("SAE-KM1")
    key = src.get_key(ksid, metadata_size=4)  # no size check either
    assert key.status == 0 and key.metadata is None
    assert dst.get_key(ksid, index=key.index, metadata_size=METADATA_MAX_SIZE).metadata is None
    assert (src.close(ksid), dst.close(ksid)) == (0, 0)


def test_004_calls_that_are_not_understood_are_http_errors(net):
    src = net.client("SAE-KM0")
    with pytest.raises(ETSI004Error) as err:
        src.open_connect("SAE-KM4", "SAE-KM1", QOS)  # the caller is neither endpoint
    assert err.value.status == 403
    with pytest.raises(ETSI004Error) as err:
        src.get_key("not-a-uuid", index=0)
    assert err.value.status == 400
    http = net.session("sae", "SAE-KM0")
    resp = http.post(net.url("KM0") + "/api/v1/qkd004/open_connect", json={"source": "SAE-KM0", "bogus": 1},
                     timeout=30)
    assert resp.status_code == 400 and "bogus" in resp.json()["message"]
    node = net.session("node", "KM1")
    assert node.post(net.url("KM0") + "/api/v1/qkd004/get_key", json={}, timeout=30).status_code == 401


def test_token_bucket_limits_a_greedy_application(net):
    """A greedy source asks for keys back to back: what it gets over the whole run is bounded
    by rate x t + bucket, and the calls beyond that are answered with status 2."""
    chunk_bytes, rate = 1024, 512  # 8192-bit keys; a new one every 16 s once the burst is spent
    bucket = 65536  # alice's SLA bucket_bits: a burst of 8 keys
    src, dst = net.client("SAE-KM0"), net.client("SAE-KM1")
    ksid = str(uuid.uuid4())
    # The source's calls may wait 1 s (for tokens or key); its peer opens second.
    first = src.open_connect("SAE-KM0", "SAE-KM1", QoS(Key_chunk_size=chunk_bytes, Max_bps=rate, Timeout=1000), ksid)
    assert first.status == Status.PEER_NOT_CONNECTED
    started = time.monotonic()  # before the session (and its full bucket) exists
    second = dst.open_connect("SAE-KM0", "SAE-KM1", QoS(Key_chunk_size=chunk_bytes, Max_bps=rate, Timeout=10_000),
                              ksid)
    assert second.status == 0 and second.qos.Max_bps == rate
    # OPEN_CONNECT again answers 0 once this end is configured too (ETSI 004: the peer has connected).
    assert src.open_connect("SAE-KM0", "SAE-KM1", QoS(Key_chunk_size=chunk_bytes, Max_bps=rate, Timeout=10_000),
                            ksid).status == 0
    statuses: list[int] = []
    keys: list[bytes] = []
    while len(statuses) < LOAD_MAX_CALLS and time.monotonic() - started < LOAD_MAX_S:
        r = src.get_key(ksid)
        statuses.append(r.status)
        if r.status == 0:
            keys.append(r.key)
        elif statuses.count(Status.INSUFFICIENT_KEY) >= 12:
            break
    elapsed = time.monotonic() - started
    # 6: a key that took longer than the call's 1 s Timeout to make (a loaded machine); nothing else.
    assert set(statuses) <= {0, Status.INSUFFICIENT_KEY, Status.TIMEOUT}, statuses
    assert 8 * chunk_bytes * len(keys) <= rate * elapsed + bucket
    assert statuses.count(Status.INSUFFICIENT_KEY) >= 1
    assert len(set(keys)) == len(keys) and all(len(k) == chunk_bytes for k in keys)
    # The keys the source got are the destination's too (within its own bucket's burst).
    shared = min(len(keys), bucket // (8 * chunk_bytes))
    assert [dst.get_key(ksid, index=i).key for i in range(shared)] == keys[:shared]
    assert (src.close(ksid), dst.close(ksid)) == (0, 0)
