"""The ETSI 014 device driver against the digital twin over mutual TLS on 127.0.0.1,
its error mapping, its checks of malformed answers, and the link-end factory."""
from __future__ import annotations

import base64
from pathlib import Path

import pytest
import yaml
from flask import Flask, jsonify

from agents.drivers import (
    BadRequest,
    DeviceUnreachable,
    ETSI014Device,
    KeysUnavailable,
    ProtocolError,
    Unauthorized,
    device_for_link_end,
)
from db import netfile
from qkdsdn.httpserver import HTTPServer, https_session

REPO = Path(__file__).resolve().parents[1]
SPEC = Path(__file__).resolve().parents[2] / "shared" / "etsi" / "qkd014" / "openapi.yaml"


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


@pytest.fixture(scope="module")
def network():
    return netfile.load(REPO / "examples" / "paper-poc.yaml")


@pytest.fixture(scope="module")
def twin(network, pki_dir):
    from qkdsdn.twin.service import TwinService

    clock = FakeClock()
    service = TwinService(network, pki=pki_dir, ephemeral_ports=True, clock=clock, threads_per_kme=2)
    service.clock = clock
    service.start()
    yield service
    service.stop()


def driver(twin, pki_dir, link, node, peer, *, cert_of=None, **kw):
    master_url, slave_url = twin.urls(link)
    cert, key = pki_dir.node(cert_of or node) if not str(cert_of).startswith("SAE-") else pki_dir.app(cert_of)
    url = master_url if twin.links[link].link.master == node else slave_url
    return ETSI014Device(url, peer, str(cert), str(key), str(pki_dir.ca_cert), **kw)


def spec_validator(name: str):
    import jsonschema

    if not SPEC.is_file():
        pytest.skip(f"ETSI 014 OpenAPI transcription not found at {SPEC} (shared/etsi is absent)")
    components = yaml.safe_load(SPEC.read_text(encoding="utf-8"))["components"]
    schema = {"$ref": f"#/components/schemas/{name}", "components": components}
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


# ----------------------------------------------------------------------------- mTLS round trip


def test_round_trip_over_mutual_tls(twin, pki_dir):
    twin.clock.t += 1.0  # 200 kbit on every link
    master = driver(twin, pki_dir, "L01", "KM0", "KM1")
    slave = driver(twin, pki_dir, "L01", "KM1", "KM0")
    with master, slave:
        st = master.get_status()
        assert (st.master_sae_id, st.slave_sae_id) == ("KM0", "KM1")
        assert st.stored_key_count == 200_000 // 256
        assert st.max_sae_id_count == 0
        assert st.qber == pytest.approx(0.02) and st.link_state == "up"
        assert st.skr_bps == pytest.approx(200_000)
        keys = master.enc_keys(5, 512)
        assert len(keys) == 5 and all(k.size_bits == 512 for k in keys)
        assert slave.get_status().stored_key_count == 5
        ids = [k.key_id for k in keys]
        got = slave.dec_keys(list(reversed(ids)))
        assert [k.key_id for k in got] == list(reversed(ids))  # in the order asked
        assert {k.key_id: k.key for k in got} == {k.key_id: k.key for k in keys}
        # Used once: the second fetch is refused with the spec's message.
        with pytest.raises(BadRequest) as err:
            slave.dec_keys(ids[:1])
        assert err.value.message == "one or more keys specified are not found on KME"


def test_raw_responses_over_tls_fit_the_spec(twin, pki_dir):
    twin.clock.t += 1.0
    cert, key = pki_dir.node("KM4")
    master_url, _ = twin.urls("L45")
    with https_session(cert, key, pki_dir.ca_cert) as s:
        status = s.get(f"{master_url}/api/v1/keys/KM5/status", timeout=5)
        assert status.status_code == 200 and status.headers["Content-Type"] == "application/json"
        spec_validator("Status").validate(status.json())
        keys = s.get(f"{master_url}/api/v1/keys/KM5/enc_keys?number=2&size=128", timeout=5)
        spec_validator("KeyContainer").validate(keys.json())
        bad = s.post(f"{master_url}/api/v1/keys/KM5/enc_keys", json={"size": 12}, timeout=5)
        assert bad.status_code == 400
        spec_validator("Error").validate(bad.json())
    _, slave_url = twin.urls("L45")
    cert, key = pki_dir.node("KM5")
    with https_session(cert, key, pki_dir.ca_cert) as s:
        ids = [k["key_ID"] for k in keys.json()["keys"]]
        got = s.get(f"{slave_url}/api/v1/keys/KM4/dec_keys?key_ID={ids[0]}", timeout=5)
        spec_validator("KeyContainer").validate(got.json())
        assert got.json()["keys"][0] == keys.json()["keys"][0]


def test_errors_map_to_typed_exceptions(twin, pki_dir):
    twin.clock.t += 1.0
    with driver(twin, pki_dir, "L02", "KM0", "KM2") as master:
        with pytest.raises(BadRequest) as err:
            master.enc_keys(1, 100)
        assert err.value.message == "size shall be a multiple of 8"
        with pytest.raises(BadRequest, match="max_key_per_request"):
            master.enc_keys(1025, 256)
    # A different node's certificate, and an application's, are not the SAE this KME serves.
    for other in ("KM3", "SAE-KM0"):
        with driver(twin, pki_dir, "L02", "KM0", "KM2", cert_of=other) as wrong:
            with pytest.raises(Unauthorized):
                wrong.get_status()
            with pytest.raises(Unauthorized):
                wrong.enc_keys(1)


def test_cut_link_drained_gives_keys_unavailable(twin, pki_dir):
    twin.clock.t += 1.0
    engine = twin.engine("L03")
    engine.cut()
    try:
        with driver(twin, pki_dir, "L03", "KM0", "KM3") as master:
            st = master.get_status()
            assert st.link_state == "cut"
            while st.stored_key_count:
                master.enc_keys(min(st.stored_key_count, st.max_key_per_request), 256)
                st = master.get_status()
            with pytest.raises(KeysUnavailable, match="link cut"):
                master.enc_keys(1, 256)
            engine.restore()
            twin.clock.t += 0.01
            assert len(master.enc_keys(1, 256)) == 1
    finally:
        engine.restore()


def test_tls_failures_are_unreachable(twin, pki_dir, tmp_path):
    master_url, _ = twin.urls("L04")
    # No client certificate: the handshake is refused.
    plain = ETSI014Device(master_url, "KM4", str(pki_dir.node("KM0")[0]), str(pki_dir.node("KM0")[1]),
                          str(pki_dir.ca_cert))
    plain._session.cert = None  # noqa: SLF001 - the same session without our certificate
    with plain, pytest.raises(DeviceUnreachable):
        plain.get_status()
    # A server certificate from another CA is refused by the driver.
    from qkdsdn.pki import init_pki

    other = netfile.load(REPO / "examples" / "paper-poc.yaml")
    layout_dir = tmp_path / "other-pki"
    init_pki(other, layout_dir)
    from qkdsdn.pki import PkiLayout

    foreign = PkiLayout(layout_dir)
    cert, key = foreign.node("KM0")
    with ETSI014Device(master_url, "KM4", str(cert), str(key), str(foreign.ca_cert)) as dev:
        with pytest.raises(DeviceUnreachable, match="TLS"):
            dev.get_status()


def test_nothing_listening_is_unreachable():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: nobody listens there
    dev = ETSI014Device(f"http://127.0.0.1:{port}", "KM1", insecure_dev_sae_id="KM0", timeout=2)
    with dev, pytest.raises(DeviceUnreachable):
        dev.enc_keys()


# ----------------------------------------------------------------------------- malformed answers


@pytest.fixture(scope="module")
def liar():
    """A plain-HTTP development 'KME' on loopback whose answers break the spec in chosen ways."""
    app = Flask("liar")
    answers = {}

    @app.route("/api/v1/keys/<sae>/<op>", methods=["GET", "POST"])
    def any_op(sae, op):
        body, code = answers["next"]
        if isinstance(body, (bytes, str)):
            return body, code, {"Content-Type": "text/plain"}
        return jsonify(body), code

    server = HTTPServer(app, "127.0.0.1", 0, tls=None, insecure_dev=True, name="liar", threads=2).start()
    yield server, answers
    server.stop()


KEY = base64.b64encode(b"\x01" * 32).decode()
KID = "6b1a3c1e-0000-4000-8000-000000000001"


@pytest.mark.parametrize("body,code,op,exc,match", [
    ({"keys": [{"key_ID": KID, "key": KEY}]}, 200, "dec_other", ProtocolError, "other key IDs"),
    ({"keys": [{"key_ID": "nope", "key": KEY}]}, 200, "enc", ProtocolError, "not a UUID"),
    ({"keys": [{"key_ID": KID, "key": "***"}]}, 200, "enc", ProtocolError, "not valid base64"),
    ({"keys": []}, 200, "enc", ProtocolError, "asked for 1 key"),
    ({"keys": [{"key_ID": KID, "key": KEY}]}, 200, "enc512", ProtocolError, "512-bit"),
    ({"nokeys": 1}, 200, "enc", ProtocolError, "not a Key container"),
    ({"source_KME_ID": "a"}, 200, "status", ProtocolError, "Status field"),
    ("<html>", 200, "enc", ProtocolError, "not JSON"),
    ({"message": "key data access error"}, 503, "enc", KeysUnavailable, "key data access error"),
    ("gateway", 502, "enc", ProtocolError, "unexpected HTTP 502"),
    ({"oops": 1}, 400, "enc", BadRequest, "malformed Error body"),
])
def test_malformed_answers_are_protocol_errors(liar, body, code, op, exc, match):
    server, answers = liar
    answers["next"] = (body, code)
    with ETSI014Device(server.url, "KM1", insecure_dev_sae_id="KM0") as dev:
        with pytest.raises(exc, match=match) as err:
            if op == "enc":
                dev.enc_keys(1)
            elif op == "enc512":
                dev.enc_keys(1, 512)
            elif op == "status":
                dev.get_status()
            else:
                dev.dec_keys(["6b1a3c1e-0000-4000-8000-000000000002"])
        assert KEY not in str(err.value)


def test_argument_checks():
    with pytest.raises(ValueError, match="loopback"):
        ETSI014Device("http://192.0.2.1:9000", "KM1", insecure_dev_sae_id="KM0")
    with pytest.raises(ValueError, match="mutual TLS"):
        ETSI014Device("https://127.0.0.1:9000", "KM1")
    with pytest.raises(ValueError, match="plain HTTP"):
        ETSI014Device("http://127.0.0.1:9000", "KM1")
    dev = ETSI014Device("http://127.0.0.1:9", "KM1", insecure_dev_sae_id="KM0")
    with pytest.raises(ValueError):
        dev.enc_keys(0)
    with pytest.raises(ValueError):
        dev.dec_keys(["x"])
    with pytest.raises(ValueError):
        dev.dec_keys([KID, KID])
    with pytest.raises(ValueError):
        dev.dec_keys([])


def test_key_repr_hides_bytes():
    from agents.drivers import DeviceKey

    k = DeviceKey(KID, b"\xab" * 16)
    assert "ab" * 16 not in repr(k) and KID in repr(k)


# ----------------------------------------------------------------------------- factory


def test_factory_for_emulated_link(network, pki_dir):
    link = network.link("L45")
    master = device_for_link_end(network, "L45", "KM4", pki=pki_dir)
    slave = device_for_link_end(network, link, "KM5", pki=pki_dir)
    m_addr, s_addr = network.twin_addresses(link)
    assert (master.url, master.peer) == (f"https://{m_addr}", "KM5")
    assert (slave.url, slave.peer) == (f"https://{s_addr}", "KM4")
    assert master._session.cert == tuple(map(str, pki_dir.node("KM4")))  # noqa: SLF001
    assert master._session.verify == str(pki_dir.ca_cert)  # noqa: SLF001
    dev = device_for_link_end(network, "L45", "KM4", insecure_dev=True)
    assert dev.url == f"http://{m_addr}"
    with pytest.raises(ValueError, match="not an end"):
        device_for_link_end(network, "L45", "KM0", pki=pki_dir)
    with pytest.raises(ValueError, match="PKI folder"):
        device_for_link_end(network, "L45", "KM4")
    with pytest.raises(ValueError, match="no link named"):
        device_for_link_end(network, "L99", "KM4", pki=pki_dir)


def test_factory_for_real_kme_link(tmp_path):
    text = """
network: {name: hw}
nodes:
  - {name: A, km_address: "127.0.0.1:8500"}
  - {name: B, km_address: "127.0.0.1:8501"}
links:
  - name: AB
    ends: [A, B]
    length_km: 20
    kme:
      master: {url: "https://127.0.0.1:7001", sae_id: SAE-A, cert: certs/a.pem, key: certs/a.key, ca: certs/ca.pem}
      slave: {url: "https://127.0.0.1:7002", sae_id: SAE-B}
"""
    path = tmp_path / "hw.yaml"
    path.write_text(text)
    certs = tmp_path / "certs"
    certs.mkdir()
    for name in ("a.pem", "a.key", "ca.pem"):
        (certs / name).write_text("placeholder\n")  # the driver only checks that the files exist
    net = netfile.load(path)
    master = device_for_link_end(net, "AB", "A")
    assert (master.url, master.peer) == ("https://127.0.0.1:7001", "SAE-B")
    assert master._session.cert == (str(certs / "a.pem"), str(certs / "a.key"))  # noqa: SLF001
    assert master._session.verify == str(certs / "ca.pem")  # noqa: SLF001
    # The slave end has no certificate of its own: the node's from the PKI folder.
    with pytest.raises(ValueError, match="no client certificate"):
        device_for_link_end(net, "AB", "B")
    from qkdsdn.pki import PkiLayout

    layout = PkiLayout(tmp_path / "pki")
    for f in (*layout.node("B"), layout.ca_cert):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("placeholder\n")
    slave = device_for_link_end(net, "AB", "B", pki=layout)
    assert slave.peer == "SAE-A"
    assert slave._session.cert == tuple(map(str, layout.node("B")))  # noqa: SLF001
    assert slave._session.verify == str(layout.ca_cert)  # noqa: SLF001
