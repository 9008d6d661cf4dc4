"""agents.sdn_agent: the node's ETSI GS QKD 015 RESTCONF server, its live state,
the qkd_app + VIRT qkd_link <-> session configuration mapping, and notifications."""
from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from urllib.parse import quote

import pytest
from flask import Flask

from agents.sdn_agent import (MEDIA_TYPE, AuthenticationRequired, ConfigRejected, Datastore,
                              DatastoreError, NodeState, SessionConfig, SessionConfigHandler,
                              SessionMappingError, app_path, config_from_etsi, etsi_from_config,
                              link_path, restconf_blueprint)
from db import netfile
from etsi015 import codec
from etsi015 import model as m
from etsi015.restconf import RestconfClient, RestconfError
from qkdsdn.httpserver import HTTPServer

REPO = Path(__file__).resolve().parent.parent
P = "/restconf/data/etsi-qkd-sdn-node:qkd_node"
ROOT = "/etsi-qkd-sdn-node:qkd_node"
KSID = "5b0f2c9e-7d8a-4e1b-9c3f-0a1b2c3d4e5f"
KSID2 = "6c1f3d0f-8e9b-4f2c-8d40-1b2c3d4e5f60"
VIRT = "0d9e8f7a-6b5c-4d3e-9f2a-1b0c9d8e7f6a"
VIRT2 = "1e0f9a8b-7c6d-4e5f-8a3b-2c1d0e9f8a7b"
T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)


def _network(name: str) -> netfile.Network:
    return netfile.load(REPO / "examples" / f"{name}.yaml")


POC = _network("paper-poc")
ID = {n.name: n.qkdn_id for n in POC.nodes}
L01 = POC.link("L01").qkdl_id


class Recorder:
    """A SessionConfigHandler that records its calls and refuses chosen sessions."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.refuse: dict[str, ConfigRejected] = {}

    def configure(self, config: SessionConfig) -> None:
        if config.ksid in self.refuse:
            raise self.refuse[config.ksid]
        self.calls.append(("configure", config))

    def deconfigure(self, ksid: str) -> None:
        self.calls.append(("deconfigure", ksid))


class Clock:
    def __init__(self, start: datetime = T0):
        self.now = start

    def __call__(self) -> datetime:
        return self.now


def _allow(environ, method, path) -> bool:
    return True


def _client(state: NodeState, handler: SessionConfigHandler, authorize=_allow):
    app = Flask("sdn-agent-test")
    app.register_blueprint(restconf_blueprint(state, handler, authorize))
    return app.test_client()


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def km0(clock):
    """KM0 of the paper's PoC (the hub: master end of five links)."""
    return NodeState.from_network(POC, "KM0", clock=clock)


@pytest.fixture
def handler():
    return Recorder()


@pytest.fixture
def client(km0, handler):
    return _client(km0, handler)


@pytest.fixture
def notes(km0):
    received: list[tuple[m.Notification, str]] = []
    km0.subscribe(lambda n, t: received.append((n, t)))
    return received


def relay_config(ksid: str = KSID, virt: str = VIRT, **changes) -> SessionConfig:
    """The KM0 hop of a KM2 -> KM0 -> KM3 relayed session."""
    values = dict(ksid=ksid, priority=3, bucket_rate_bps=32000, bucket_size_bits=32768,
                  inactivity_timeout_s=30, prev_hop=ID["KM2"], next_hop=ID["KM3"],
                  source_sae="SAE-KM2", destination_sae="SAE-KM3", virt_link_id=virt,
                  source_qkdn_id=ID["KM2"], destination_qkdn_id=ID["KM3"])
    values.update(changes)
    return SessionConfig(**values)


def bodies(config: SessionConfig, local: str = ID["KM0"]) -> tuple[dict, dict]:
    """(qkd_app, VIRT qkd_link) request bodies as a controller builds them."""
    app, link = etsi_from_config(config, local)
    return (codec.encode_application(app, config_only=True),
            codec.encode_link(link, config_only=True))


def error_of(response, status: int, tag: str, path: str | None = None) -> dict:
    assert response.status_code == status, response.data
    assert response.mimetype == MEDIA_TYPE
    errors = response.get_json()["ietf-restconf:errors"]["error"]
    assert errors and errors[0]["error-tag"] == tag, errors
    assert errors[0]["error-type"] in ("application", "protocol")
    assert errors[0]["error-message"]
    if path is not None:
        assert errors[0]["error-path"] == path, errors
    return errors[0]


# --------------------------------------------------------------------------- start state


def test_from_network_builds_interfaces_and_physical_links(km0):
    node = km0.snapshot()
    assert node.qkdn_id == ID["KM0"] and node.qkdn_status is m.NodeStatus.NEW
    assert node.qkdn_location_id == "5TONIC rack A" and node.qkdn_version.startswith("qkdsdn")
    assert [i.qkdi_id for i in node.interfaces] == [1, 2, 3, 4, 5]
    link = node.link(L01)
    assert link.qkdl_type is m.LinkType.PHYS and link.qkdl_status is m.LinkStatus.PENDING
    assert (link.qkdl_local.qkdn_id, link.qkdl_local.qkdi_id) == (ID["KM0"], 1)
    assert (link.qkdl_remote.qkdn_id, link.qkdl_remote.qkdi_id) == (ID["KM1"], 1)
    assert link.phys_qkd_role is m.QkdRole.TRANSMITTER
    assert link.phys_channel_att == Decimal("3.0") and link.phys_wavelength == "1550"
    iface = node.interface(1)
    assert iface.qkdi_att_point == m.AttachmentPoint(device="KM0", port=1)
    assert iface.qkdi_capabilities.role_support is m.QkdRole.TRANSMITTER
    assert iface.qkdi_status is m.InterfaceStatus.ENABLED

    km5 = NodeState.from_network(POC, "KM5").snapshot()
    # KM5 is the slave of L05 (its interface 1) and the slave of L45 (interface 2).
    l45 = km5.link(POC.link("L45").qkdl_id)
    assert l45.phys_qkd_role is m.QkdRole.RECEIVER
    assert (l45.qkdl_local.qkdi_id, l45.qkdl_remote.qkdn_id, l45.qkdl_remote.qkdi_id) == (
        2, ID["KM4"], POC.interface_id("KM4", "L45"))
    assert km5.interface(2).qkdi_capabilities.role_support is m.QkdRole.RECEIVER


def test_unknown_node_and_preconfigured_sessions_are_refused():
    with pytest.raises(ValueError, match="no node 'KM9'.*KM0"):
        NodeState.from_network(POC, "KM9")
    app, link = etsi_from_config(relay_config())
    with pytest.raises(ValueError, match="PHYS links only"):
        NodeState(m.QkdNode(qkdn_id=ID["KM0"], links=[link]))
    with pytest.raises(ValueError, match="PHYS links only"):
        NodeState(m.QkdNode(qkdn_id=ID["KM0"], applications=[app]))


# --------------------------------------------------------------------------- YANG conformance


def _all_documents(client) -> list[tuple[str, dict]]:
    """(resource name, document) for the root, every child and every list entry."""
    docs = [("qkd_node", client.get(P).get_json())]
    root = docs[0][1]["etsi-qkd-sdn-node:qkd_node"]
    for child in ("qkdn_capabilities", "qkd_applications", "qkd_interfaces", "qkd_links"):
        r = client.get(f"{P}/{child}/")
        assert r.status_code == 200 and r.mimetype == MEDIA_TYPE
        docs.append((child, r.get_json()))
    entries = [("qkd_link", "qkd_links", "qkdl_id"), ("qkd_app", "qkd_applications", "app_id"),
               ("qkd_interface", "qkd_interfaces", "qkdi_id")]
    for name, container, key in entries:
        for entry in root[container][name]:
            r = client.get(f"{P}/{container}/{name}={quote(str(entry[key]), safe='')}")
            assert r.status_code == 200
            assert r.get_json() == {f"etsi-qkd-sdn-node:{name}": [entry]}
            docs.append((name, r.get_json()))
    return docs


@pytest.mark.parametrize("network_name", ["paper-poc", "linear-5"])
def test_every_get_document_of_every_node_conforms_to_the_yang(network_name, clock):
    from yang_helper import (etsi_dir, validate_notification_with_yang,
                             validate_resource_with_yang)
    etsi_dir()  # skips with the reason when ../shared/etsi is absent
    network = _network(network_name)
    for node in network.nodes:
        state = NodeState.from_network(network, node.name, clock=clock)
        sent = []
        state.subscribe(lambda n, t: sent.append(n.to_restconf(t)))
        client = _client(state, Recorder())
        phys = [link.qkdl_id for link in network.links_of(node.name)]
        for i, lid in enumerate(phys):
            state.set_link_status(lid, m.LinkStatus.ACTIVE)
            state.set_link_performance(lid, skr=1000 + i, eskr=900, qber=0.021,
                                       expected_consumption=64)
        # One session through the node: it is the source, a KM answering for a
        # neighbour-less config validates too.
        config = relay_config(prev_hop=None, next_hop=None, source_qkdn_id=node.qkdn_id,
                              destination_qkdn_id=node.qkdn_id)
        app_doc, link_doc = bodies(config, node.qkdn_id)
        assert client.post(f"{P}/qkd_links", json=link_doc).status_code == 201
        assert client.post(f"{P}/qkd_applications", json=app_doc).status_code == 201
        state.record_consumption(KSID, 4096)
        state.set_link_status(phys[0], m.LinkStatus.OFF, reason="fibre cut")
        for resource, doc in _all_documents(client):
            validate_resource_with_yang(doc, resource)
        validate_resource_with_yang(client.get(f"{P}?content=config").get_json(), "qkd_node",
                                    content="config")
        assert {next(iter(n["ietf-restconf:notification"].keys() - {"eventTime"}))
                for n in sent} == {"etsi-qkd-sdn-node:sdqkdn_link_perf_update",
                                   "etsi-qkd-sdn-node:sdqkdn_application_new",
                                   "etsi-qkd-sdn-node:sdqkdn_link_down"}
        for doc in sent:
            validate_notification_with_yang(doc)


def test_yang_helper_is_strict_enough_to_catch_a_bad_document(client):
    from yang_helper import YangInvalid, etsi_dir, validate_resource_with_yang
    etsi_dir()
    doc = client.get(f"{P}/qkd_links").get_json()
    doc["etsi-qkd-sdn-node:qkd_links"]["qkd_link"][0]["virt_bandwidth"] = 5  # on a PHYS link
    with pytest.raises(YangInvalid):
        validate_resource_with_yang(doc, "qkd_links")


# --------------------------------------------------------------------------- mapping


def test_mapping_round_trip_is_exact_when_the_bucket_fits_whole_milliseconds():
    config = relay_config()
    app, link = etsi_from_config(config, ID["KM0"])
    assert app.app_qos == m.QoS(max_bandwidth=32000, jitter=1024, ttl=30)
    assert (app.app_id, app.app_priority, app.server_app_id, app.client_app_id) == (
        KSID, 3, "SAE-KM2", ["SAE-KM3"])
    assert (app.backing_qkdl_id, app.local_qkdn_id, app.remote_qkdn_id) == (
        [VIRT], ID["KM2"], ID["KM3"])
    assert (link.qkdl_type, link.virt_prev_hop, link.virt_next_hop, link.virt_bandwidth,
            link.qkdl_applications) == (m.LinkType.VIRT, ID["KM2"], [ID["KM3"]], 32000, [KSID])
    assert config_from_etsi(app, link, ID["KM0"]) == config
    codec.encode_application(app, config_only=True)  # valid request bodies
    codec.encode_link(link, config_only=True)


def test_bucket_size_rounds_up_by_less_than_a_millisecond_of_rate():
    for rate, size in [(3000, 1000), (1_000_000, 256), (64000, 65537), (7, 1)]:
        app, link = etsi_from_config(relay_config(bucket_rate_bps=rate, bucket_size_bits=size))
        back = config_from_etsi(app, link).bucket_size_bits
        assert size <= back < size + rate / 1000 + 1, (rate, size, back)


def test_endpoints_default_to_the_local_node_at_the_ends_of_the_route():
    source = relay_config(prev_hop=None, source_qkdn_id=None, destination_qkdn_id=None)
    app, link = etsi_from_config(source, ID["KM2"])
    assert (app.local_qkdn_id, app.remote_qkdn_id) == (ID["KM2"], None)
    assert link.virt_prev_hop is None and link.qkdl_local.qkdn_id == ID["KM2"]
    assert config_from_etsi(app, link, ID["KM2"]).source_qkdn_id == ID["KM2"]
    with pytest.raises(ValueError, match="bucket_rate_bps"):
        etsi_from_config(relay_config(bucket_rate_bps=0))
    with pytest.raises(ValueError, match="priority"):
        etsi_from_config(relay_config(priority=-1))


def test_config_from_etsi_lists_every_problem_with_its_path():
    app = m.Application(app_id=KSID, client_app_id=["a", "b"],
                        app_qos=m.QoS(max_bandwidth=0, ttl=0), backing_qkdl_id=[VIRT2])
    link = m.Link(qkdl_id=VIRT, qkdl_type=m.LinkType.VIRT, virt_prev_hop=ID["KM0"],
                  virt_next_hop=[ID["KM0"]], virt_bandwidth=5)
    with pytest.raises(SessionMappingError) as info:
        config_from_etsi(app, link, ID["KM0"])
    paths = {p for p, _ in info.value.issues}
    assert paths == {app_path(KSID, "server_app_id"), app_path(KSID, "client_app_id"),
                     app_path(KSID, "app_qos/max_bandwidth"), app_path(KSID, "app_qos/jitter"),
                     app_path(KSID, "app_qos/ttl"), app_path(KSID, "backing_qkdl_id"),
                     link_path(VIRT, "virt_next_hop"), link_path(VIRT, "virt_prev_hop")}
    doc = info.value.restconf_errors()["ietf-restconf:errors"]["error"]
    assert {e["error-tag"] for e in doc} == {"invalid-value"} and len(doc) == len(info.value.issues)


def test_config_from_etsi_checks_the_route_ends_against_the_local_node():
    app, link = etsi_from_config(relay_config(prev_hop=None, source_qkdn_id=ID["KM2"]))
    # This node (KM0) has no previous hop, yet the session's source is KM2.
    with pytest.raises(SessionMappingError, match="not the session's source"):
        config_from_etsi(app, link, ID["KM0"])
    assert config_from_etsi(app, link).prev_hop is None  # without a local node: no such check
    app, link = etsi_from_config(relay_config())
    link.qkdl_local = m.LinkEnd(qkdn_id=ID["KM1"])
    with pytest.raises(SessionMappingError, match="differs from the application's endpoint"):
        config_from_etsi(app, link)


def test_teraflow_style_onward_path_gives_the_first_entry_as_next_hop():
    app, link = etsi_from_config(relay_config())
    link.virt_next_hop = [ID["KM3"], ID["KM4"], ID["KM5"]]
    link.virt_bandwidth = 0  # TeraFlowSDN sends 0
    config = config_from_etsi(app, link, ID["KM0"])
    assert config.next_hop == ID["KM3"] and config.bucket_rate_bps == 32000


# --------------------------------------------------------------------------- TeraFlowSDN


def test_teraflow_call_sequence(client, handler):
    root = client.get(P)
    assert root.status_code == 200
    assert list(root.get_json()) == ["etsi-qkd-sdn-node:qkd_node"]
    for child in ("qkd_interfaces", "qkd_links", "qkd_applications", "qkdn_capabilities"):
        r = client.get(f"{P}/{child}/")
        assert r.status_code == 200 and list(r.get_json()) == [f"etsi-qkd-sdn-node:{child}"]
    interfaces = client.get(f"{P}/qkd_interfaces/").get_json()[
        "etsi-qkd-sdn-node:qkd_interfaces"]["qkd_interface"]
    assert interfaces[0]["qkdi_att_point"] == {"device": "KM0", "port": 1}
    # What the TeraFlowSDN QKD driver posts at the first node of a route (null prev hop,
    # the whole onward path as next hops, bandwidth 0).
    body = {"qkd_links": {"qkd_link": [{
        "qkdl_id": VIRT, "qkdl_type": "etsi-qkd-node-types:VIRT",
        "qkdl_local": {"qkdn_id": ID["KM0"], "qkdi_id": 2},
        "qkdl_remote": {"qkdn_id": ID["KM5"], "qkdi_id": 1},
        "virt_prev_hop": None, "virt_next_hop": [ID["KM4"], ID["KM5"]], "virt_bandwidth": 0}]}}
    r = client.post(f"{P}/qkd_links/", json=body)
    assert r.status_code == 201, r.data
    assert r.headers["Location"] == f"http://localhost{P}/qkd_links/qkd_link={VIRT}"
    links = client.get(f"{P}/qkd_links/").get_json()["etsi-qkd-sdn-node:qkd_links"]["qkd_link"]
    (virt,) = [link for link in links if link["qkdl_id"] == VIRT]
    assert virt["virt_next_hop"] == [ID["KM4"], ID["KM5"]] and "virt_prev_hop" not in virt
    assert client.get(r.headers["Location"]).get_json()["etsi-qkd-sdn-node:qkd_link"] == [virt]
    assert handler.calls == []  # a forwarding entry waiting for its session


def test_rfc8040_post_forms_and_posting_to_the_node(client):
    _, link_doc = bodies(relay_config())
    assert list(link_doc) == ["etsi-qkd-sdn-node:qkd_link"]
    assert client.post(f"{P}/qkd_links", json=link_doc).status_code == 201
    # The qualified wrapper, POSTed to the node itself, creates the entries too.
    _, other = bodies(relay_config(ksid=KSID2, virt=VIRT2))
    wrapper = {"etsi-qkd-sdn-node:qkd_links": {
        "qkd_link": other["etsi-qkd-sdn-node:qkd_link"]}}
    r = client.post(P, json=wrapper)
    assert r.status_code == 201 and r.headers["Location"].endswith(f"qkd_link={VIRT2}")
    assert client.get(f"{P}/qkd_links/qkd_link={VIRT2}").status_code == 200


# --------------------------------------------------------------------------- sessions


@pytest.mark.parametrize("app_first", [True, False], ids=["app-first", "link-first"])
def test_session_is_configured_once_both_halves_are_present(client, handler, km0, notes, app_first):
    app_doc, link_doc = bodies(relay_config())
    first, second = (("qkd_applications", app_doc), ("qkd_links", link_doc))[::1 if app_first else -1]
    assert client.post(f"{P}/{first[0]}", json=first[1]).status_code == 201
    assert handler.calls == [] and notes == []
    if app_first:
        app = client.get(f"{P}/qkd_applications/qkd_app={KSID}").get_json()[
            "etsi-qkd-sdn-node:qkd_app"][0]
        assert "app_status" not in app and app["creation_time"] == "2026-01-01T12:00:00Z"
    assert client.post(f"{P}/{second[0]}", json=second[1]).status_code == 201
    assert handler.calls == [("configure", relay_config())]
    assert km0.configured_sessions() == {KSID: relay_config()}
    app = client.get(f"{P}/qkd_applications/qkd_app={KSID}").get_json()["etsi-qkd-sdn-node:qkd_app"][0]
    assert app["app_status"] == "etsi-qkd-node-types:ON"
    link = client.get(f"{P}/qkd_links/qkd_link={VIRT}").get_json()["etsi-qkd-sdn-node:qkd_link"][0]
    assert link["qkdl_applications"] == [KSID]
    ((note, stamp),) = notes
    assert isinstance(note, m.ApplicationNew) and stamp == "2026-01-01T12:00:00Z"
    assert (note.server_app_id, note.client_app_id, note.app_priority, note.local_qkdn_id) == (
        "SAE-KM2", ["SAE-KM3"], 3, ID["KM2"])


def test_deleting_the_app_deconfigures_and_frees_its_forwarding_entry(client, handler, km0, notes):
    app_doc, link_doc = bodies(relay_config())
    client.post(f"{P}/qkd_links", json=link_doc)
    client.post(f"{P}/qkd_applications", json=app_doc)
    # The forwarding entry of a configured session cannot go first.
    error_of(client.delete(f"{P}/qkd_links/qkd_link={VIRT}"), 409, "in-use", link_path(VIRT))
    r = client.delete(f"{P}/qkd_applications/qkd_app={KSID}")
    assert r.status_code == 204 and r.data == b""
    assert handler.calls[-1] == ("deconfigure", KSID) and km0.configured_sessions() == {}
    assert isinstance(notes[-1][0], m.ApplicationDisconnected) and notes[-1][0].app_id == KSID
    assert client.delete(f"{P}/qkd_links/qkd_link={VIRT}").status_code == 204
    assert client.get(f"{P}/qkd_links/qkd_link={VIRT}").status_code == 404
    assert len(handler.calls) == 2


def test_patch_reconfigures_and_notifies_a_qos_update(client, handler, km0, notes):
    app_doc, link_doc = bodies(relay_config())
    client.post(f"{P}/qkd_links", json=link_doc)
    client.post(f"{P}/qkd_applications", json=app_doc)
    patch = {"etsi-qkd-sdn-node:qkd_app": [{"app_id": KSID, "app_priority": 6,
                                            "app_qos": {"ttl": 90}}]}
    r = client.patch(f"{P}/qkd_applications/qkd_app={KSID}", json=patch)
    assert r.status_code == 204, r.data
    assert handler.calls[-1] == ("configure", relay_config(priority=6, inactivity_timeout_s=90))
    note = notes[-1][0]
    assert isinstance(note, m.ApplicationQosUpdate)
    assert (note.app_id, note.app_priority, note.app_qos.ttl, note.app_qos.max_bandwidth) == (
        KSID, 6, 90, 32000)
    # A PATCH that changes nothing calls nobody.
    calls = len(handler.calls)
    assert client.patch(f"{P}/qkd_applications/qkd_app={KSID}", json=patch).status_code == 204
    assert len(handler.calls) == calls


def test_put_creates_then_replaces_and_a_reroute_reconfigures(client, handler, km0):
    app_doc, link_doc = bodies(relay_config())
    r = client.put(f"{P}/qkd_links/qkd_link={VIRT}", json=link_doc)
    assert r.status_code == 201 and r.headers["Location"].endswith(f"qkd_link={VIRT}")
    assert client.put(f"{P}/qkd_applications/qkd_app={KSID}", json=app_doc).status_code == 201
    assert handler.calls == [("configure", relay_config())]
    # The route changed upstream: the previous hop is now KM1.
    _, rerouted = bodies(relay_config(prev_hop=ID["KM1"]))
    assert client.put(f"{P}/qkd_links/qkd_link={VIRT}", json=rerouted).status_code == 204
    assert handler.calls[-1] == ("configure", relay_config(prev_hop=ID["KM1"]))
    assert km0.link(VIRT).virt_prev_hop == ID["KM1"]
    # A forwarding entry whose far end contradicts the session's destination is refused.
    _, elsewhere = bodies(relay_config(next_hop=ID["KM1"], destination_qkdn_id=ID["KM1"]))
    error_of(client.put(f"{P}/qkd_links/qkd_link={VIRT}", json=elsewhere), 400, "invalid-value",
             link_path(VIRT, "qkdl_remote/qkdn_id"))
    assert km0.configured_sessions() == {KSID: relay_config(prev_hop=ID["KM1"])}
    # Replacing the whole application list with nothing ends the session.
    assert client.put(f"{P}/qkd_applications", json={
        "etsi-qkd-sdn-node:qkd_applications": {"qkd_app": []}}).status_code == 204
    assert handler.calls[-1] == ("deconfigure", KSID) and km0.configured_sessions() == {}


def test_put_of_the_entry_needs_matching_keys(client):
    _, link_doc = bodies(relay_config())
    error_of(client.put(f"{P}/qkd_links/qkd_link={VIRT2}", json=link_doc), 400, "invalid-value",
             f"{ROOT}/qkd_links/qkd_link[qkdl_id='{VIRT2}']/qkdl_id")


def test_disabled_forwarding_entry_holds_the_session_back(client, handler, km0):
    app_doc, link_doc = bodies(relay_config())
    link_doc["etsi-qkd-sdn-node:qkd_link"][0]["qkdl_enable"] = False
    client.post(f"{P}/qkd_links", json=link_doc)
    client.post(f"{P}/qkd_applications", json=app_doc)
    assert handler.calls == []
    enable = {"etsi-qkd-sdn-node:qkd_link": [{"qkdl_id": VIRT, "qkdl_enable": True}]}
    assert client.patch(f"{P}/qkd_links/qkd_link={VIRT}", json=enable).status_code == 204
    assert handler.calls == [("configure", relay_config())]
    disable = {"etsi-qkd-sdn-node:qkd_links": {"qkd_link": [{"qkdl_id": VIRT, "qkdl_enable": False}]}}
    assert client.patch(f"{P}/qkd_links", json=disable).status_code == 204
    assert handler.calls[-1] == ("deconfigure", KSID)
    assert km0.application(KSID).app_status is m.AppStatus.DISCONNECTED


def test_refused_configuration_changes_nothing(client, handler, km0, notes):
    app_doc, link_doc = bodies(relay_config())
    client.post(f"{P}/qkd_links", json=link_doc)
    handler.refuse[KSID] = ConfigRejected("no key pool towards KM3 yet", tag="resource-denied")
    err = error_of(client.post(f"{P}/qkd_applications", json=app_doc), 409, "resource-denied",
                   app_path(KSID))
    assert "no key pool towards KM3 yet" in err["error-message"]
    assert client.get(f"{P}/qkd_applications/qkd_app={KSID}").status_code == 404
    assert km0.configured_sessions() == {} and notes == []
    handler.refuse[KSID] = ConfigRejected("priority too high")
    error_of(client.post(f"{P}/qkd_applications", json=app_doc), 400, "invalid-value")
    del handler.refuse[KSID]
    assert client.post(f"{P}/qkd_applications", json=app_doc).status_code == 201
    assert km0.configured_sessions() == {KSID: relay_config()}
    with pytest.raises(ValueError):
        ConfigRejected("x", tag="data-exists")


def test_a_refusal_midway_rolls_back_the_sessions_already_reconfigured(client, handler, km0):
    # Two sessions share one forwarding entry; re-routing it reconfigures both.
    for ksid in (KSID, KSID2):
        app_doc, _ = bodies(relay_config(ksid=ksid))
        client.post(f"{P}/qkd_applications", json=app_doc)
    _, link_doc = bodies(relay_config())
    link_doc["etsi-qkd-sdn-node:qkd_link"][0]["qkdl_applications"] = [KSID, KSID2]
    client.post(f"{P}/qkd_links", json=link_doc)
    assert km0.configured_sessions() == {KSID: relay_config(), KSID2: relay_config(ksid=KSID2)}
    handler.calls.clear()
    handler.refuse[KSID2] = ConfigRejected("busy", tag="resource-denied")
    patch = {"etsi-qkd-sdn-node:qkd_link": [{"qkdl_id": VIRT, "virt_bandwidth": 64000}]}
    # virt_bandwidth must equal the apps' rate: refused before any handler call.
    error_of(client.patch(f"{P}/qkd_links/qkd_link={VIRT}", json=patch), 400, "invalid-value",
             link_path(VIRT, "virt_bandwidth"))
    assert handler.calls == []
    new_link = dict(link_doc["etsi-qkd-sdn-node:qkd_link"][0], virt_prev_hop=ID["KM1"])
    error_of(client.put(f"{P}/qkd_links/qkd_link={VIRT}",
                        json={"etsi-qkd-sdn-node:qkd_link": [new_link]}), 409, "resource-denied")
    assert handler.calls == [("configure", relay_config(prev_hop=ID["KM1"])),
                             ("configure", relay_config())]  # the rollback
    assert km0.configured_sessions()[KSID] == relay_config()
    assert km0.link(VIRT).virt_prev_hop == ID["KM2"]


# --------------------------------------------------------------------------- RFC 8040 errors


def test_post_of_an_existing_entry_is_409_data_exists(client, km0):
    app_doc, link_doc = bodies(relay_config())
    client.post(f"{P}/qkd_links", json=link_doc)
    client.post(f"{P}/qkd_applications", json=app_doc)
    error_of(client.post(f"{P}/qkd_links", json=link_doc), 409, "data-exists", link_path(VIRT))
    error_of(client.post(f"{P}/qkd_applications", json=app_doc), 409, "data-exists", app_path(KSID))
    # A PHYS link's id is taken too.
    link_doc["etsi-qkd-sdn-node:qkd_link"][0]["qkdl_id"] = L01
    error_of(client.post(f"{P}/qkd_links", json=link_doc), 409, "data-exists", link_path(L01))
    error_of(client.post("/restconf/data", json={"etsi-qkd-sdn-node:qkd_node": {
        "qkdn_id": ID["KM0"]}}), 409, "data-exists", ROOT)


def test_missing_resources_are_404(client):
    error_of(client.delete(f"{P}/qkd_links/qkd_link={VIRT}"), 404, "invalid-value", link_path(VIRT))
    error_of(client.delete(f"{P}/qkd_applications/qkd_app={KSID}"), 404, "invalid-value",
             app_path(KSID))
    error_of(client.patch(f"{P}/qkd_applications/qkd_app={KSID}", json={
        "etsi-qkd-sdn-node:qkd_app": [{"app_id": KSID, "app_priority": 1}]}), 404, "invalid-value")
    error_of(client.get(f"{P}/qkd_interfaces/qkd_interface=9"), 404, "invalid-value",
             f"{ROOT}/qkd_interfaces/qkd_interface[qkdi_id='9']")
    error_of(client.get(f"{P}/no_such_child"), 404, "invalid-value")
    error_of(client.get("/restconf/data/ietf-interfaces:interfaces"), 404, "invalid-value")
    error_of(client.get("/restconf/nothing"), 404, "invalid-value")
    error_of(client.get(f"{P}/qkd_links/qkd_link={L01}/virt_bandwidth"), 404, "invalid-value")


def test_malformed_bodies_are_400_malformed_message(client):
    for raw in (b"{", b"[1,", b'{"a": NaN}', b"\xff\xfe", b"",
                b'{"qkd_links": {"qkd_link": []}, "qkd_links": {}}'):
        r = client.post(f"{P}/qkd_links", data=raw, content_type=MEDIA_TYPE)
        error_of(r, 400, "malformed-message")
    error_of(client.post(f"{P}/qkd_links", json={"qkd_links": {"qkd_link": []}}), 400,
             "malformed-message")
    r = client.delete(f"{P}/qkd_links/qkd_link={VIRT}", data=b'{"x": 1}',
                      content_type=MEDIA_TYPE)
    error_of(r, 400, "malformed-message")


def test_invalid_values_are_400_with_the_path_of_each_problem(client):
    _, link_doc = bodies(relay_config())
    entry = link_doc["etsi-qkd-sdn-node:qkd_link"][0]
    entry["virt_bandwidth"] = "fast"
    entry["virt_prev_hop"] = "KM2"
    r = client.post(f"{P}/qkd_links", json=link_doc)
    assert r.status_code == 400
    errors = r.get_json()["ietf-restconf:errors"]["error"]
    assert {e["error-path"] for e in errors} == {link_path(VIRT, "virt_bandwidth"),
                                                 link_path(VIRT, "virt_prev_hop")}
    assert {e["error-tag"] for e in errors} == {"invalid-value"}
    # Read-only state is not configuration.
    app_doc, _ = bodies(relay_config())
    app_doc["etsi-qkd-sdn-node:qkd_app"][0]["app_status"] = "etsi-qkd-node-types:ON"
    error_of(client.post(f"{P}/qkd_applications", json=app_doc), 400, "invalid-value",
             app_path(KSID, "app_status"))
    # A session without jitter has no token-bucket size.
    app_doc, _ = bodies(relay_config())
    del app_doc["etsi-qkd-sdn-node:qkd_app"][0]["app_qos"]["jitter"]
    error_of(client.post(f"{P}/qkd_applications", json=app_doc), 400, "invalid-value",
             app_path(KSID, "app_qos/jitter"))
    # A link without a type is neither a forwarding entry nor a physical link.
    error_of(client.post(f"{P}/qkd_links", json={"etsi-qkd-sdn-node:qkd_link": [
        {"qkdl_id": VIRT2}]}), 400, "invalid-value", link_path(VIRT2, "qkdl_type"))
    # An application cannot be backed by a physical link.
    app_doc, _ = bodies(relay_config())
    app_doc["etsi-qkd-sdn-node:qkd_app"][0]["backing_qkdl_id"] = [L01]
    error_of(client.post(f"{P}/qkd_applications", json=app_doc), 400, "invalid-value",
             app_path(KSID, "backing_qkdl_id"))
    # Payload and target must agree.
    error_of(client.post(f"{P}/qkd_links", json=app_doc), 400, "unknown-element",
             f"{ROOT}/qkd_links/etsi-qkd-sdn-node:qkd_app")
    # A bad key in the URI.
    error_of(client.get(f"{P}/qkd_links/qkd_link"), 400, "malformed-message")
    error_of(client.get(f"{P}/qkd_links/qkd_link=a,b"), 400, "malformed-message")
    error_of(client.get(f"{P}/qkdn_capabilities=1"), 400, "malformed-message")


def test_physical_links_are_read_only(client, km0):
    phys = {"etsi-qkd-sdn-node:qkd_link": [{
        "qkdl_id": VIRT, "qkdl_type": "etsi-qkd-node-types:PHYS",
        "qkdl_local": {"qkdn_id": ID["KM0"], "qkdi_id": 1}, "phys_channel_att": "3.0"}]}
    error_of(client.post(f"{P}/qkd_links", json=phys), 403, "access-denied",
             link_path(VIRT, "qkdl_type"))
    error_of(client.delete(f"{P}/qkd_links/qkd_link={L01}"), 403, "access-denied", link_path(L01))
    patch = {"etsi-qkd-sdn-node:qkd_link": [{"qkdl_id": L01, "qkdl_enable": False}]}
    error_of(client.patch(f"{P}/qkd_links/qkd_link={L01}", json=patch), 403, "access-denied",
             link_path(L01))
    current = client.get(f"{P}/qkd_links/qkd_link={L01}?content=config").get_json()
    # Writing back exactly what is there changes nothing and is allowed.
    assert client.put(f"{P}/qkd_links/qkd_link={L01}", json=current).status_code == 204
    current["etsi-qkd-sdn-node:qkd_link"][0]["phys_channel_att"] = "9.0"
    error_of(client.put(f"{P}/qkd_links/qkd_link={L01}", json=current), 403, "access-denied")
    error_of(client.delete(f"{P}/qkd_links"), 403, "access-denied")
    # Replacing the whole list must keep the PHYS links as they are.
    config = client.get(f"{P}/qkd_links?content=config").get_json()
    _, link_doc = bodies(relay_config())
    config["etsi-qkd-sdn-node:qkd_links"]["qkd_link"] += link_doc["etsi-qkd-sdn-node:qkd_link"]
    assert client.put(f"{P}/qkd_links", json=config).status_code == 204
    assert km0.link(VIRT).is_virtual
    del config["etsi-qkd-sdn-node:qkd_links"]["qkd_link"][0]
    error_of(client.put(f"{P}/qkd_links", json=config), 403, "access-denied")
    assert km0.link(L01).qkdl_enable is True


def test_read_only_resources_answer_405_with_allow(client):
    r = client.post(f"{P}/qkd_interfaces", json={"qkd_interfaces": {"qkd_interface": []}})
    error_of(r, 405, "operation-not-supported")
    assert r.headers["Allow"] == "GET, HEAD, OPTIONS"
    r = client.delete(f"{P}/qkdn_capabilities")
    error_of(r, 405, "operation-not-supported")
    r = client.put(P, json={})
    error_of(r, 405, "operation-not-supported")
    assert "POST" in r.headers["Allow"]
    r = client.options(f"{P}/qkd_links/qkd_link={L01}")
    assert r.status_code == 200 and r.headers["Allow"] == "GET, HEAD, OPTIONS, PUT, PATCH, DELETE"


def test_authorization(km0, handler):
    seen = []

    def authorize(environ, method, path):
        seen.append((method, path))
        who = environ.get("HTTP_X_WHO")
        if who is None:
            raise AuthenticationRequired("client certificate or token required")
        return who == "controller" or method == "GET"

    client = _client(km0, handler, authorize)
    r = client.get(P)
    error_of(r, 401, "access-denied")
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert client.get(P, headers={"X-Who": "sae"}).status_code == 200
    app_doc, _ = bodies(relay_config())
    error_of(client.post(f"{P}/qkd_applications", json=app_doc, headers={"X-Who": "sae"}),
             403, "access-denied")
    assert km0.snapshot().applications == []
    assert client.post(f"{P}/qkd_applications", json=app_doc,
                       headers={"X-Who": "controller"}).status_code == 201
    assert seen[:2] == [("GET", P), ("GET", P)]
    assert seen[2] == ("POST", f"{P}/qkd_applications")


def test_media_types_and_query_parameters(client):
    _, link_doc = bodies(relay_config())
    import json
    r = client.post(f"{P}/qkd_links", data=json.dumps(link_doc), content_type="application/xml")
    assert r.status_code == 415 and r.get_json()["ietf-restconf:errors"]["error"][0]["error-tag"]
    r = client.post(f"{P}/qkd_links", data=json.dumps(link_doc),
                    content_type="application/yang-data+json; charset=utf-8")
    assert r.status_code == 201
    error_of(client.get(P, headers={"Accept": "application/yang-data+xml"}), 406, "invalid-value")
    assert client.get(P, headers={"Accept": "application/json"}).mimetype == "application/json"
    error_of(client.get(f"{P}?depth=2"), 400, "invalid-value")
    error_of(client.get(f"{P}?content=nonconfig"), 400, "invalid-value")
    error_of(client.post(f"{P}/qkd_links?insert=first", json=link_doc), 400, "invalid-value")
    config = client.get(f"{P}?content=config").get_json()["etsi-qkd-sdn-node:qkd_node"]
    assert "qkdn_status" not in config and "qkdn_id" in config


def test_keys_are_percent_decoded_and_deeper_nodes_readable(client, km0):
    km0.set_link_performance(L01, skr=1200, qber=0.02)
    encoded = "".join(f"%{ord(c):02X}" for c in L01)
    r = client.get(f"{P}/qkd_links/qkd_link={encoded}")
    assert r.status_code == 200 and r.get_json()["etsi-qkd-sdn-node:qkd_link"][0]["qkdl_id"] == L01
    perf = client.get(f"{P}/qkd_links/qkd_link={L01}/qkdl_performance").get_json()
    assert perf == {"etsi-qkd-sdn-node:qkdl_performance": {
        "skr": 1200, "phys_perf": [{"perf_type": "etsi-qkd-node-types:QBER", "value": "0.02"}]}}
    qber = quote("etsi-qkd-node-types:QBER", safe="")
    r = client.get(f"{P}/qkd_links/qkd_link={L01}/qkdl_performance/phys_perf={qber}/value")
    assert r.get_json() == {"etsi-qkd-sdn-node:value": "0.02"}
    assert client.get(f"{P}/qkd_interfaces/qkd_interface=1/qkdi_att_point/port").get_json() == {
        "etsi-qkd-sdn-node:port": 1}
    # The module may qualify a segment; an encoded '/' stays inside the key.
    assert client.get(f"{P}/etsi-qkd-sdn-node:qkd_links").status_code == 200
    key = f"{L01[:8]}/{L01[9:]}"
    error_of(client.get(f"{P}/qkd_links/qkd_link={L01[:8]}%2F{L01[9:]}"), 404, "invalid-value",
             f"{ROOT}/qkd_links/qkd_link[qkdl_id='{key}']")


def test_discovery_resources(client):
    r = client.get("/.well-known/host-meta")
    assert r.status_code == 200 and b"rel='restconf' href='/restconf'" in r.data
    assert client.get("/restconf").get_json()["ietf-restconf:restconf"][
        "yang-library-version"] == "2016-06-21"
    assert client.get("/restconf/yang-library-version").get_json() == {
        "ietf-restconf:yang-library-version": "2016-06-21"}
    whole = client.get("/restconf/data").get_json()
    assert whole == client.get(P).get_json()


def test_handler_crash_is_a_500_with_an_rfc8040_body_and_no_change(km0):
    class Broken(Recorder):
        def configure(self, config):
            raise RuntimeError("bug")

    client = _client(km0, Broken())
    app_doc, link_doc = bodies(relay_config())
    client.post(f"{P}/qkd_links", json=link_doc)
    error_of(client.post(f"{P}/qkd_applications", json=app_doc), 500, "operation-failed")
    assert km0.snapshot().applications == [] and km0.configured_sessions() == {}
    assert isinstance(Recorder(), SessionConfigHandler)


def test_datastore_api_for_bus_clients(km0, handler):
    """The same transactions without HTTP: what a bus client applies."""
    store = Datastore(km0, handler)
    app, link = etsi_from_config(relay_config(), ID["KM0"])
    store.create(links=[link], apps=[app])  # both halves in one transaction
    assert handler.calls == [("configure", relay_config())]
    assert store.put_application(app) is False and len(handler.calls) == 1
    with pytest.raises(DatastoreError) as info:
        store.delete_link(VIRT)
    assert (info.value.status, info.value.tag, info.value.path) == (409, "in-use", link_path(VIRT))
    assert info.value.document["ietf-restconf:errors"]["error"][0]["error-tag"] == "in-use"
    store.delete_application(KSID)
    store.delete_link(VIRT)
    with pytest.raises(DatastoreError) as info:
        store.merge_link(m.Link(qkdl_id=VIRT, virt_bandwidth=1))
    assert info.value.status == 404
    assert store.put_link(link) is True
    store.delete_applications()
    with pytest.raises(DatastoreError) as info:
        store.delete_links()
    assert info.value.status == 403 and km0.link(VIRT).is_virtual


# --------------------------------------------------------------------------- notifications


def test_link_performance_notifications(km0, notes, clock):
    km0.set_link_performance(L01, skr=10000, eskr=9000, qber=0.02)
    ((note, stamp),) = notes
    assert isinstance(note, m.LinkPerfUpdate) and note.qkdl_id == L01
    assert (note.performance.skr, note.performance.eskr) == (10000, 9000)
    assert note.performance.phys_perf == [m.PhysPerf(m.PhysPerfType.QBER, Decimal("0.020"))]
    km0.set_link_performance(L01, skr=10300)  # 3 %: not a marked change
    assert len(notes) == 1 and km0.link(L01).qkdl_performance.skr == 10300
    clock.now = T0 + timedelta(seconds=5)
    km0.set_link_performance(L01, skr=10600)  # 6 % above the last notified value
    assert len(notes) == 2 and notes[1][0].performance.skr == 10600
    assert notes[1][1] == "2026-01-01T12:00:05Z"
    km0.set_link_performance(L01, qber=0.03)
    assert notes[2][0].performance.phys_perf[0].value == Decimal("0.030")
    km0.set_link_performance(L01, expected_consumption=512)
    assert notes[3][0].performance.expected_consumption == 512
    doc = notes[3][0].to_json()
    assert doc["etsi-qkd-sdn-node:sdqkdn_link_perf_update"]["qkd_link"]["qkdl_id"] == L01
    with pytest.raises(ValueError):
        km0.set_link_performance(L01, qber=1.5)
    with pytest.raises(ValueError):
        km0.set_link_performance(L01, skr=-1)
    with pytest.raises(KeyError):
        km0.set_link_performance(VIRT, skr=1)
    km0.set_link_performance(L01, skr=2 ** 40)  # saturates at uint32
    assert km0.link(L01).qkdl_performance.skr == 0xFFFFFFFF


def test_link_down_and_interface_down_notifications(km0, notes):
    km0.set_link_status(L01, m.LinkStatus.ACTIVE)
    assert notes == []
    km0.set_link_status(L01, m.LinkStatus.OFF, reason="fibre cut")
    km0.set_link_status(L01, m.LinkStatus.OFF, reason="still cut")
    ((note, _),) = notes
    assert note == m.LinkDown(qkdl_id=L01, reason="fibre cut")
    assert km0.link(L01).qkdl_status is m.LinkStatus.OFF
    km0.set_interface_status(1, m.InterfaceStatus.FAILED, reason="detector")
    assert notes[-1][0] == m.InterfaceDown(qkdi_id=1, reason="detector")
    km0.set_node_status(m.NodeStatus.OPERATING)
    assert km0.snapshot().qkdn_status is m.NodeStatus.OPERATING and len(notes) == 2
    with pytest.raises(TypeError):
        km0.set_link_status(L01, "OFF")


def test_application_disconnected_once_when_the_key_manager_ends_the_session(client, km0, notes,
                                                                             handler):
    app_doc, link_doc = bodies(relay_config())
    client.post(f"{P}/qkd_links", json=link_doc)
    client.post(f"{P}/qkd_applications", json=app_doc)
    km0.set_app_status(KSID, m.AppStatus.OUT_OF_TIME)  # inactivity timer
    assert [type(n) for n, _ in notes] == [m.ApplicationNew, m.ApplicationDisconnected]
    assert client.delete(f"{P}/qkd_applications/qkd_app={KSID}").status_code == 204
    assert handler.calls[-1] == ("deconfigure", KSID)
    assert [type(n) for n, _ in notes] == [m.ApplicationNew, m.ApplicationDisconnected]


def test_subscribers_fail_alone_unsubscribe_and_see_changes_in_order(km0):
    got = []

    def broken(n, t):
        raise RuntimeError("subscriber bug")

    def reentrant(n, t):
        got.append(n)
        if isinstance(n, m.LinkDown):
            # Changing the state from inside a callback queues behind the current notice.
            km0.set_link_performance(L01, skr=5)

    km0.subscribe(broken)
    stop = km0.subscribe(reentrant)
    km0.set_link_status(L01, m.LinkStatus.OFF)
    assert [type(n) for n in got] == [m.LinkDown, m.LinkPerfUpdate]
    stop()
    km0.set_link_status(L01, m.LinkStatus.ACTIVE)
    km0.set_link_status(L01, m.LinkStatus.OFF)
    assert len(got) == 2


def test_consumption_statistics_in_windows(client, km0, clock):
    app_doc, link_doc = bodies(relay_config())
    client.post(f"{P}/qkd_links", json=link_doc)
    client.post(f"{P}/qkd_applications", json=app_doc)
    km0.record_consumption(KSID, 256, T0 + timedelta(seconds=10))
    km0.record_consumption(KSID, 512, T0 + timedelta(seconds=59))
    km0.record_consumption(KSID, 128, T0 + timedelta(seconds=60))
    stats = km0.application(KSID).statistics
    assert [(s.start_time, s.end_time, s.consumed_bits) for s in stats] == [
        ("2026-01-01T12:00:00Z", "2026-01-01T12:01:00Z", 768),
        ("2026-01-01T12:01:00Z", "2026-01-01T12:02:00Z", 128)]
    clock.now = T0 + timedelta(minutes=2)
    km0.record_consumption(KSID, 2 ** 33)
    assert km0.application(KSID).statistics[-1].consumed_bits == 0xFFFFFFFF
    app = client.get(f"{P}/qkd_applications/qkd_app={KSID}").get_json()["etsi-qkd-sdn-node:qkd_app"][0]
    assert [s["consumed_bits"] for s in app["app_statistics"]["statistics"]] == [768, 128, 0xFFFFFFFF]
    # A later configuration write keeps the statistics.
    patch = {"etsi-qkd-sdn-node:qkd_app": [{"app_id": KSID, "app_priority": 4}]}
    client.patch(f"{P}/qkd_applications/qkd_app={KSID}", json=patch)
    assert len(km0.application(KSID).statistics) == 3

    short = NodeState.from_network(POC, "KM0", stats_windows=2, stats_window_s=10)
    Datastore(short, Recorder()).create(apps=[etsi_from_config(relay_config())[0]])
    for i in range(5):
        short.record_consumption(KSID, i + 1, T0 + timedelta(seconds=10 * i))
    assert [s.consumed_bits for s in short.application(KSID).statistics] == [4, 5]
    with pytest.raises(ValueError):
        short.record_consumption(KSID, -1)
    with pytest.raises(KeyError):
        short.record_consumption(KSID2, 1)


# --------------------------------------------------------------------------- concurrency


def test_concurrent_writes_and_live_updates_stay_consistent(km0, handler):
    store = Datastore(km0, handler)
    per_thread = 15
    failures = []

    def writer(t: int) -> None:
        try:
            for i in range(per_thread):
                n = t * per_thread + i
                ksid = f"{n:08x}-0000-4000-8000-000000000000"
                virt = f"{n:08x}-1111-4000-8000-000000000000"
                app, link = etsi_from_config(relay_config(ksid=ksid, virt=virt))
                store.create(links=[link])
                store.create(apps=[app])
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            failures.append(exc)

    def monitor() -> None:
        for i in range(200):
            km0.set_link_performance(L01, skr=1000 + 100 * i)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    threads.append(threading.Thread(target=monitor))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert len(km0.configured_sessions()) == 4 * per_thread
    assert len([c for c in handler.calls if c[0] == "configure"]) == 4 * per_thread
    assert km0.link(L01).qkdl_performance.skr == 1000 + 100 * 199
    codec.encode_node(km0.snapshot())


# --------------------------------------------------------------------------- over HTTP


def test_real_http_round_trip_with_the_etsi015_client(km0, handler):
    app = Flask("km0")
    app.register_blueprint(restconf_blueprint(km0, handler, _allow))
    with HTTPServer(app, "127.0.0.1", 0, tls=None, insecure_dev=True, name="km0-restconf") as server:
        with RestconfClient(server.url) as rc:
            node = rc.get_node()
            assert node.qkdn_id == ID["KM0"] and len(node.links) == 5
            assert rc.get("qkdn_capabilities").key_relay_mode_enable is True
            new_app, new_link = etsi_from_config(relay_config(), ID["KM0"])
            location = rc.post_link(new_link)
            assert location == f"{server.url}{P}/qkd_links/qkd_link={VIRT}"
            rc.post_application(new_app)
            assert handler.calls == [("configure", relay_config())]
            assert rc.get_application(KSID).app_status is m.AppStatus.ON
            assert rc.get_link(VIRT).qkdl_applications == [KSID]
            with pytest.raises(RestconfError) as info:
                rc.post_link(new_link)
            assert (info.value.status, info.value.error_tag, info.value.error_path) == (
                409, "data-exists", link_path(VIRT))
            with pytest.raises(RestconfError) as info:
                rc.delete_link(L01)
            assert (info.value.status, info.value.error_tag) == (403, "access-denied")
            rc.patch_application(m.Application(app_id=KSID, app_priority=5))
            assert handler.calls[-1] == ("configure", relay_config(priority=5))
            rc.delete_application(KSID)
            rc.delete_link(VIRT)
            assert handler.calls[-1] == ("deconfigure", KSID)
            links = rc.get("qkd_links")
            assert len(links) == 5 and all(link.is_physical for link in links)
