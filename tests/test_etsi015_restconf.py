"""etsi015.restconf: the RFC 8040 error document helper and the RESTCONF client,
against a small RESTCONF node served by werkzeug on 127.0.0.1 (plain HTTP with
Bearer/Basic authentication, and HTTPS with client certificates)."""
from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import socket
import ssl
import threading
from contextlib import contextmanager
from decimal import Decimal

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from flask import Flask, Response, request
from werkzeug.serving import make_server

from etsi015 import codec
from etsi015.errors import parse_restconf_errors
from etsi015.model import (Application, AppType, Capabilities, Link, LinkStatus, LinkType, QoS,
                           QkdNode)
from etsi015.restconf import (MEDIA_TYPE, RestconfClient, RestconfError,
                              RestconfTransportError, restconf_error)
from etsi015.validate import Etsi015ValidationError
from test_etsi015_codec import KSID, NODE_A, NODE_C, PHYS_ID, ROOT, VIRT_ID, sample_node

PREFIX = "/restconf/data/etsi-qkd-sdn-node:qkd_node"


# --------------------------------------------------------------------------- error documents


def test_restconf_error_document():
    assert restconf_error(404, "invalid-value", "no such link", path=f"{ROOT}/qkd_links") == {
        "ietf-restconf:errors": {"error": [{
            "error-type": "application", "error-tag": "invalid-value",
            "error-message": "no such link", "error-path": f"{ROOT}/qkd_links"}]}}
    doc = restconf_error(401, "access-denied", "no credentials", type="protocol")
    assert doc == {"ietf-restconf:errors": {"error": [{
        "error-type": "protocol", "error-tag": "access-denied",
        "error-message": "no credentials"}]}}
    (item,) = parse_restconf_errors(doc)
    assert (item.error_type, item.error_tag, item.error_message, item.error_path) == (
        "protocol", "access-denied", "no credentials", None)


def test_restconf_error_checks_rfc8040_tag_status_and_type():
    with pytest.raises(ValueError, match="with status 409, not 400"):
        restconf_error(400, "data-exists", "x")
    with pytest.raises(ValueError, match="not an RFC 8040 error-tag"):
        restconf_error(400, "bad-request", "x")
    with pytest.raises(ValueError, match="error-type"):
        restconf_error(400, "invalid-value", "x", type="app")


def test_parse_restconf_errors_tolerates_single_object_and_rejects_other_json():
    doc = {"ietf-restconf:errors": {"error": {"error-type": "rpc", "error-tag": "in-use"}}}
    (item,) = parse_restconf_errors(doc)
    assert item.error_tag == "in-use" and item.error_message is None
    assert parse_restconf_errors({"errors": []}) is None
    assert parse_restconf_errors([]) is None


# --------------------------------------------------------------------------- a RESTCONF node


def _error(status: int, tag: str, message: str, path: str | None = None) -> Response:
    import json
    return Response(json.dumps(restconf_error(status, tag, message, path)), status=status,
                    content_type=MEDIA_TYPE)


def _json(doc: dict, status: int = 200) -> Response:
    import json
    return Response(json.dumps(doc), status=status, content_type=MEDIA_TYPE)


class FakeNode:
    """An ETSI 015 node datastore over the etsi015 codec, enough to exercise the client."""

    def __init__(self, node: QkdNode, authorization: str | None = None):
        self.node = node
        self.authorization = authorization
        self.seen: list[dict] = []
        self.peer_cert: dict | None = None
        self.app = self._build()

    def _build(self) -> Flask:
        app = Flask("fake-qkd-node")
        lists = {"qkd_links": ("links", "qkd_link", "qkdl_id", codec.decode_link,
                               codec.encode_link),
                 "qkd_applications": ("applications", "qkd_app", "app_id",
                                      codec.decode_application, codec.encode_application)}

        @app.before_request
        def check():
            sock = request.environ.get("werkzeug.socket")
            if isinstance(sock, ssl.SSLSocket):
                self.peer_cert = sock.getpeercert()
            self.seen.append({
                "method": request.method, "path": request.path,
                "body": request.get_json(silent=True) if request.data else None,
                "accept": request.headers.get("Accept"),
                "content_type": request.headers.get("Content-Type"),
                "authorization": request.headers.get("Authorization")})
            if self.authorization and request.headers.get("Authorization") != self.authorization:
                return Response(status=401)  # RFC 8040 allows 401 without a body
            return None

        @app.errorhandler(Etsi015ValidationError)
        def invalid(exc: Etsi015ValidationError):
            return _json(exc.restconf_errors(), 400)

        @app.get(PREFIX)
        def get_node():
            return _json(codec.encode_node(self.node))

        @app.get(f"{PREFIX}/<container>")
        def get_container(container):
            if container == "qkdn_capabilities":
                return _json(codec.encode_capabilities(self.node.capabilities))
            if container == "qkd_interfaces":
                return _json(codec.encode_interfaces(self.node.interfaces))
            if container == "qkd_links":
                return _json(codec.encode_links(self.node.links))
            if container == "qkd_applications":
                return _json(codec.encode_applications(self.node.applications))
            if container == "broken":
                return Response("backend exploded", status=500, content_type="text/plain")
            return _error(404, "invalid-value", "no such resource", f"{ROOT}/{container}")

        def find(container: str, key: str):
            attr, _, key_leaf, _, _ = lists[container]
            for i, item in enumerate(getattr(self.node, attr)):
                if str(getattr(item, key_leaf)) == key:
                    return i, item
            return None, None

        @app.get(f"{PREFIX}/qkd_interfaces/qkd_interface=<int:qkdi_id>")
        def get_interface(qkdi_id):
            for iface in self.node.interfaces:
                if iface.qkdi_id == qkdi_id:
                    return _json(codec.encode_interface(iface))
            return _error(404, "invalid-value", "no such interface")

        @app.route(f"{PREFIX}/<container>/<name>=<key>", methods=["GET", "PUT", "PATCH", "DELETE"])
        def entry(container, name, key):
            if container not in lists or lists[container][1] != name:
                return _error(404, "invalid-value", "no such resource")
            attr, entry_name, key_leaf, decode, encode = lists[container]
            path = f"{ROOT}/{container}/{entry_name}[{key_leaf}='{key}']"
            index, current = find(container, key)
            items = getattr(self.node, attr)
            if request.method == "GET":
                if current is None:
                    return _error(404, "invalid-value", "no such entry", path)
                return _json(encode(current))
            if request.method == "DELETE":
                if current is None:
                    return _error(404, "invalid-value", "no such entry", path)
                del items[index]
                return Response(status=204)
            partial = request.method == "PATCH"
            new = decode(request.get_json(), content="config", partial=partial)
            if str(getattr(new, key_leaf)) != key:
                return _error(400, "invalid-value", "key in body differs from URL", path)
            if partial:
                if current is None:
                    return _error(404, "invalid-value", "no such entry", path)
                new = codec.merge(current, new)
                encode(new)  # the merged entry must be valid (when conditions)
            if current is None:
                items.append(new)
                return Response(status=201)
            items[index] = new
            return Response(status=204)

        @app.post(f"{PREFIX}/<container>")
        def create(container):
            if container not in lists:
                return _error(405, "operation-not-supported", "cannot create here")
            attr, entry_name, key_leaf, decode, _ = lists[container]
            body = request.get_json()
            # RFC 8040 sends the entry; TeraFlowSDN sends the wrapper container.
            if codec.payload_name(body) == container:
                new_items = codec.decode_resource(body, container, content="config")
            else:
                new_items = [decode(body, content="config")]
            for item in new_items:
                key = str(getattr(item, key_leaf))
                if find(container, key)[1] is not None:
                    return _error(409, "data-exists", "entry exists",
                                  f"{ROOT}/{container}/{entry_name}[{key_leaf}='{key}']")
            getattr(self.node, attr).extend(new_items)
            response = Response(status=201)
            response.headers["Location"] = (
                f"{request.host_url.rstrip('/')}{PREFIX}/{container}/{entry_name}="
                f"{getattr(new_items[0], key_leaf)}")
            return response

        return app


@contextmanager
def serving(app: Flask, ssl_context: ssl.SSLContext | None = None):
    server = make_server("127.0.0.1", 0, app, threaded=True, ssl_context=ssl_context)
    # A short poll interval keeps shutdown() (which waits for one poll) quick.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02},
                              name="fake-restconf", daemon=True)
    thread.start()
    try:
        scheme = "https" if ssl_context else "http"
        yield f"{scheme}://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def fake():
    node = FakeNode(sample_node(), authorization="Bearer s3cret")
    with serving(node.app) as url:
        node.url = url
        yield node


@pytest.fixture
def client(fake):
    with RestconfClient(fake.url, token="s3cret") as c:
        yield c


# --------------------------------------------------------------------------- reads


def test_get_node_and_containers(client, fake):
    assert client.get_node() == fake.node
    assert client.get("qkdn_capabilities") == fake.node.capabilities
    assert client.get("qkd_links") == fake.node.links
    assert client.get("qkd_applications") == fake.node.applications
    assert client.get("qkd_interfaces") == fake.node.interfaces
    assert client.get_link(VIRT_ID) == fake.node.links[1]
    assert client.get_application(KSID) == fake.node.applications[0]
    assert client.get_interface(2) == fake.node.interfaces[1]
    raw = client.get_raw("qkd_links")
    assert list(raw) == ["etsi-qkd-sdn-node:qkd_links"]
    with pytest.raises(ValueError, match="unknown container"):
        client.get("qkd_link")


def test_requests_carry_restconf_media_type_and_bearer_token(client, fake):
    client.get("qkdn_capabilities")
    client.patch_link(Link(qkdl_id=PHYS_ID, qkdl_enable=False))
    get, patch = fake.seen
    assert (get["method"], get["path"]) == ("GET", f"{PREFIX}/qkdn_capabilities")
    assert get["accept"] == patch["accept"] == patch["content_type"] == MEDIA_TYPE
    assert get["authorization"] == patch["authorization"] == "Bearer s3cret"
    assert (patch["method"], patch["path"]) == ("PATCH",
                                                f"{PREFIX}/qkd_links/qkd_link={PHYS_ID}")


# --------------------------------------------------------------------------- writes


def test_post_put_patch_delete_link(client, fake):
    new = Link(qkdl_id=NODE_C, qkdl_type=LinkType.VIRT, qkdl_status=LinkStatus.PENDING,
               virt_prev_hop=NODE_A, virt_next_hop=[VIRT_ID], virt_bandwidth=512)
    location = client.post_link(new)
    assert location.endswith(f"{PREFIX}/qkd_links/qkd_link={NODE_C}")
    sent = fake.seen[-1]
    assert (sent["method"], sent["path"]) == ("POST", f"{PREFIX}/qkd_links")
    assert sent["body"] == codec.encode_link(new, config_only=True)
    assert fake.node.link(NODE_C) == new

    client.patch_link(Link(qkdl_id=NODE_C, qkdl_status=LinkStatus.ACTIVE))
    assert fake.seen[-1]["body"] == {"etsi-qkd-sdn-node:qkd_link": [
        {"qkdl_id": NODE_C, "qkdl_status": "etsi-qkd-node-types:ACTIVE"}]}
    stored = fake.node.link(NODE_C)
    assert stored.qkdl_status is LinkStatus.ACTIVE and stored.virt_bandwidth == 512

    replaced = Link(qkdl_id=NODE_C, qkdl_type=LinkType.PHYS, phys_channel_att=Decimal("4.2"))
    assert client.put_link(replaced) is False
    assert fake.node.link(NODE_C) == replaced
    created = Link(qkdl_id="0e000000-0000-4000-8000-000000000000", qkdl_type=LinkType.PHYS)
    assert client.put_link(created) is True

    client.delete_link(NODE_C)
    with pytest.raises(KeyError):
        fake.node.link(NODE_C)


def test_config_false_state_is_not_sent(client, fake):
    link = sample_node().links[0]
    link.qkdl_id = NODE_C
    client.post_link(link)
    sent = fake.seen[-1]["body"]["etsi-qkd-sdn-node:qkd_link"][0]
    assert "qkdl_performance" not in sent and sent["phys_channel_att"] == "11.25"


def test_application_writes(client, fake):
    app = Application(app_id=NODE_C, app_type=AppType.CLIENT, server_app_id="sae-1",
                      client_app_id=["sae-2"], app_qos=QoS(max_bandwidth=1024))
    client.post_application(app)
    assert fake.node.application(NODE_C) == app
    client.patch_application(Application(app_id=NODE_C, app_priority=7,
                                         client_app_id=["sae-3"]))
    stored = fake.node.application(NODE_C)
    assert stored.app_priority == 7 and stored.client_app_id == ["sae-2", "sae-3"]
    assert stored.app_qos == QoS(max_bandwidth=1024)
    assert client.put_application(Application(app_id=NODE_C)) is False
    assert fake.node.application(NODE_C) == Application(app_id=NODE_C)
    client.delete_application(NODE_C)
    assert [a.app_id for a in fake.node.applications] == [a.app_id for a in
                                                           sample_node().applications]


def test_client_refuses_to_send_invalid_documents(client, fake):
    before = len(fake.seen)
    with pytest.raises(Etsi015ValidationError, match="virt_bandwidth"):
        client.post_link(Link(qkdl_id=NODE_C, qkdl_type=LinkType.PHYS, virt_bandwidth=1))
    assert len(fake.seen) == before


# --------------------------------------------------------------------------- errors


def test_missing_resource_surfaces_rfc8040_error(client):
    with pytest.raises(RestconfError) as info:
        client.get_link(NODE_C)
    err = info.value
    assert err.status == 404
    assert (err.error_type, err.error_tag, err.error_message) == (
        "application", "invalid-value", "no such entry")
    assert err.error_path == f"{ROOT}/qkd_links/qkd_link[qkdl_id='{NODE_C}']"
    assert f"GET {client.node_url}/qkd_links/qkd_link={NODE_C}: HTTP 404" in str(err)


def test_conflict_on_existing_entry(client):
    with pytest.raises(RestconfError) as info:
        client.post_link(Link(qkdl_id=PHYS_ID, qkdl_type=LinkType.PHYS))
    assert info.value.status == 409 and info.value.error_tag == "data-exists"


def test_server_validation_errors_list_every_problem(client):
    body = {"etsi-qkd-sdn-node:qkd_link": [{
        "qkdl_id": NODE_C, "qkdl_type": "VIRT", "virt_bandwidth": -1,
        "qkdl_status": "etsi-qkd-node-types:ON"}]}
    with pytest.raises(RestconfError) as info:
        client.request("POST", "qkd_links", body)
    err = info.value
    assert err.status == 400
    paths = {e.error_path: e.error_tag for e in err.errors}
    entry = f"{ROOT}/qkd_links/qkd_link[qkdl_id='{NODE_C}']"
    assert paths == {f"{entry}/qkdl_type": "invalid-value",
                     f"{entry}/virt_bandwidth": "invalid-value",
                     f"{entry}/qkdl_status": "invalid-value"}


def test_merged_patch_that_breaks_when_is_refused(client, fake):
    with pytest.raises(RestconfError) as info:
        client.patch_link(Link(qkdl_id=PHYS_ID, virt_bandwidth=10))
    assert info.value.status == 400
    assert info.value.error_path.endswith("/virt_bandwidth")
    assert fake.node.link(PHYS_ID).virt_bandwidth is None


def test_teraflow_style_post_of_the_wrapper(client, fake):
    body = {"qkd_links": {"qkd_link": [{
        "qkdl_id": NODE_C, "qkdl_type": "etsi-qkd-node-types:VIRT",
        "qkdl_local": {"qkdn_id": NODE_A, "qkdi_id": 1},
        "qkdl_remote": {"qkdn_id": NODE_C, "qkdi_id": 1},
        "virt_prev_hop": NODE_A, "virt_next_hop": [], "virt_bandwidth": 100}]}}
    response = client.request("POST", "qkd_links", body)
    assert response.status_code == 201
    assert fake.node.link(NODE_C).virt_bandwidth == 100


def test_unauthenticated_and_wrong_token(fake):
    for kwargs in ({}, {"token": "wrong"}, {"username": "u", "password": "p"}):
        with RestconfClient(fake.url, **kwargs) as client, \
                pytest.raises(RestconfError) as info:
            client.get_node()
        assert info.value.status == 401 and info.value.errors == []
        assert info.value.error_tag is None


def test_basic_authentication():
    expected = "Basic " + base64.b64encode(b"admin:pa:ss").decode()
    node = FakeNode(sample_node(), authorization=expected)
    with serving(node.app) as url, \
            RestconfClient(url, username="admin", password="pa:ss") as client:
        assert client.get("qkdn_capabilities") == Capabilities(
            link_stats_support=True, application_stats_support=False,
            key_relay_mode_enable=True)


def test_non_restconf_error_body(client):
    with pytest.raises(RestconfError) as info:
        client.get_raw("broken")
    assert info.value.status == 500 and info.value.errors == []
    assert info.value.detail == "backend exploded"


def test_invalid_response_is_rejected(fake, client):
    # A misbehaving node answers with a link whose id is not a uuid.
    doc = codec.encode_links(sample_node().links)
    doc["etsi-qkd-sdn-node:qkd_links"]["qkd_link"][0]["qkdl_id"] = "not-a-uuid"
    fake.app.view_functions["get_container"] = lambda container: _json(doc)
    with pytest.raises(Etsi015ValidationError, match=r"qkd_link\[qkdl_id='not-a-uuid'\]"):
        client.get("qkd_links")


def test_connection_refused_is_a_transport_error():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        port = sock.getsockname()[1]
        with RestconfClient(f"http://127.0.0.1:{port}", timeout=5) as client, \
                pytest.raises(RestconfTransportError) as info:
            client.get_node()
    assert info.value.status is None and "no response" in str(info.value)


def test_client_argument_checks():
    with pytest.raises(ValueError, match="not both"):
        RestconfClient("http://127.0.0.1:1", token="t", username="u", password="p")
    with pytest.raises(ValueError, match="both username and password"):
        RestconfClient("http://127.0.0.1:1", username="u")
    client = RestconfClient("http://127.0.0.1:1/", data_root="/rc/data/")
    assert client.node_url == "http://127.0.0.1:1/rc/data/etsi-qkd-sdn-node:qkd_node"


# --------------------------------------------------------------------------- mutual TLS


def _issue(subject: str, key, issuer_name, issuer_key, *, ca=False, san_ip=None, client=False):
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(issuer_name)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san_ip:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(san_ip))]),
            critical=False)
    if not ca:
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    out = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = _issue("test CA", ca_key, ca_name, ca_key, ca=True)
    files = {}

    def write(name, cert, key):
        cert_path, key_path = out / f"{name}.pem", out / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        if key is not None:
            key_path.write_bytes(key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()))
        files[name] = (str(cert_path), str(key_path))

    write("ca", ca, None)
    for name, is_client in (("server", False), ("controller", True)):
        key = ec.generate_private_key(ec.SECP256R1())
        write(name, _issue(name, key, ca_name, ca_key, san_ip="127.0.0.1" if not is_client
                           else None, client=is_client), key)
    return files


def test_mutual_tls(pki):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*pki["server"])
    context.load_verify_locations(pki["ca"][0])
    context.verify_mode = ssl.CERT_REQUIRED
    node = FakeNode(sample_node())
    with serving(node.app, context) as url:
        with RestconfClient(url, cert=pki["controller"], ca=pki["ca"][0]) as client:
            assert client.get_node() == node.node
        subject = dict(item for rdn in node.peer_cert["subject"] for item in rdn)
        assert subject["commonName"] == "controller"
        # Without a client certificate the node refuses the connection.
        with RestconfClient(url, ca=pki["ca"][0]) as client, \
                pytest.raises(RestconfTransportError):
            client.get_node()
        # Without the CA the client does not trust the node.
        with RestconfClient(url, cert=pki["controller"]) as client, \
                pytest.raises(RestconfTransportError, match="CERTIFICATE_VERIFY_FAILED"):
            client.get_node()
