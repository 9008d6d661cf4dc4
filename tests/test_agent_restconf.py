"""ETSI GS QKD 015 RESTCONF of running agents over real HTTPS with mutual TLS: every document
they serve, with live sessions configured, validates against the YANG of
shared/etsi/qkd015/patched/; and the call sequence of the ETSI TeraFlowSDN QKD driver works
with the controller's certificate."""
from __future__ import annotations

import threading
import uuid
from urllib.parse import quote

import pytest

from agent_harness import EXAMPLES, Network, relocate
from agents.client import QoS
from yang_helper import validate_resource_with_yang, validate_with_yang

ROOT = "/restconf/data/etsi-qkd-sdn-node:qkd_node"
CHILDREN = ("qkd_applications", "qkd_interfaces", "qkd_links", "qkdn_capabilities")
ENTRIES = {"qkd_applications": ("qkd_app", "app_id"), "qkd_interfaces": ("qkd_interface", "qkdi_id"),
           "qkd_links": ("qkd_link", "qkdl_id")}


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("agent-restconf")
    path = relocate(EXAMPLES / "paper-poc.yaml", tmp / "net.yaml")
    with Network(path, tmp, tls=True) as network:
        network.wait_for_pools()
        yield network


@pytest.fixture(scope="module")
def live(net):
    """A relayed 004 session KM2 -> KM0 -> KM3 with keys delivered, and an ETSI 014 pair KM0 -> KM1."""
    ksid = str(uuid.uuid4())
    qos = QoS(Key_chunk_size=32, Timeout=15_000)
    status: dict[str, int] = {}

    def run(sae: str) -> None:
        status[sae] = net.client(sae).open_connect("SAE-KM2", "SAE-KM3", qos, ksid).status

    threads = [threading.Thread(target=run, args=(s,)) for s in ("SAE-KM2", "SAE-KM3")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert status == {"SAE-KM2": 0, "SAE-KM3": 0}
    for i in range(2):
        assert net.client("SAE-KM2").get_key(ksid).status == 0
        assert net.client("SAE-KM3").get_key(ksid, index=i).status == 0
    assert len(net.client("SAE-KM0").enc_keys("SAE-KM1", number=2)) == 2
    (pair,) = [s.ksid for s in net.agents["KM0"].logic.sessions() if s.interface == "014"]
    yield {"relayed": ksid, "pair": pair}


def get(http, net: Network, node: str, path: str = "") -> dict:
    resp = http.get(net.url(node) + ROOT + path, timeout=30)
    assert resp.status_code == 200, (node, path, resp.text)
    assert resp.headers["Content-Type"].startswith("application/yang-data+json")
    return resp.json()


@pytest.mark.parametrize("node", ["KM0", "KM1", "KM2", "KM3", "KM5"])
def test_every_document_of_a_running_agent_validates_against_the_yang(net, live, node):
    http = net.session("controller")
    root = get(http, net, node)
    validate_with_yang(root)
    checked = 1
    for child in CHILDREN:
        doc = get(http, net, node, f"/{child}/")
        assert list(doc) == [f"etsi-qkd-sdn-node:{child}"]
        validate_resource_with_yang(doc, child)
        checked += 1
        if child not in ENTRIES:
            continue
        entry, key = ENTRIES[child]
        for item in doc[f"etsi-qkd-sdn-node:{child}"].get(entry, []):
            one = get(http, net, node, f"/{child}/{entry}={quote(str(item[key]), safe='')}")
            # Live leaves (link performance, statistics) may move between the two reads.
            (got,) = one[f"etsi-qkd-sdn-node:{entry}"]
            assert got[key] == item[key]
            validate_resource_with_yang(one, entry)
            checked += 1
    assert checked >= 1 + len(CHILDREN) + 1  # at least one interface/link entry as well


def test_live_sessions_are_visible_as_etsi_015_apps_and_virtual_links(net, live):
    http = net.session("controller")
    ids = {n: net.qkdn_id(n) for n in ("KM0", "KM1", "KM2", "KM3")}
    expect = {"KM2": (None, ids["KM0"]), "KM0": (ids["KM2"], ids["KM3"]), "KM3": (ids["KM0"], None)}
    for node, (prev_hop, next_hop) in expect.items():
        node_doc = get(http, net, node)["etsi-qkd-sdn-node:qkd_node"]
        apps = {a["app_id"]: a for a in node_doc["qkd_applications"]["qkd_app"]}
        app = apps[live["relayed"]]
        links = {link["qkdl_id"]: link for link in node_doc["qkd_links"]["qkd_link"]}
        (virt_id,) = app["backing_qkdl_id"]
        virt = links[virt_id]
        assert virt["qkdl_type"] == "etsi-qkd-node-types:VIRT"
        assert virt.get("virt_prev_hop") == prev_hop
        assert virt.get("virt_next_hop", [None])[0] == next_hop
        assert live["relayed"] in virt["qkdl_applications"]
    # The endpoints account the keys they handed out.
    km2_app = {a["app_id"]: a for a in get(http, net, "KM2", "/qkd_applications/")[
        "etsi-qkd-sdn-node:qkd_applications"]["qkd_app"]}[live["relayed"]]
    consumed = sum(int(s["consumed_bits"]) for s in km2_app["app_statistics"]["statistics"])
    assert consumed == 2 * 256
    # The ETSI 014 pair is configured at both of its ends.
    for node in ("KM0", "KM1"):
        apps = get(http, net, node, "/qkd_applications/")["etsi-qkd-sdn-node:qkd_applications"]["qkd_app"]
        assert live["pair"] in {a["app_id"] for a in apps}


def test_teraflowsdn_call_sequence_with_the_controller_certificate(net):
    http = net.session("controller")
    node, peer = "KM4", "KM5"
    root = get(http, net, node)
    assert list(root) == ["etsi-qkd-sdn-node:qkd_node"]
    assert root["etsi-qkd-sdn-node:qkd_node"]["qkdn_id"] == net.qkdn_id(node)
    docs = {child: get(http, net, node, f"/{child}/") for child in
            ("qkd_interfaces", "qkd_links", "qkd_applications", "qkdn_capabilities")}
    interfaces = docs["qkd_interfaces"]["etsi-qkd-sdn-node:qkd_interfaces"]["qkd_interface"]
    assert {i["qkdi_att_point"]["device"] for i in interfaces} == {node}
    towards_peer = next(link for link in docs["qkd_links"]["etsi-qkd-sdn-node:qkd_links"]["qkd_link"]
                        if link["qkdl_type"] == "etsi-qkd-node-types:PHYS"
                        and link["qkdl_remote"]["qkdn_id"] == net.qkdn_id(peer))
    virt_id = str(uuid.uuid4())
    body = {"qkd_links": {"qkd_link": [{
        "qkdl_id": virt_id, "qkdl_type": "etsi-qkd-node-types:VIRT",
        "qkdl_local": {"qkdn_id": net.qkdn_id(node), "qkdi_id": towards_peer["qkdl_local"]["qkdi_id"]},
        "qkdl_remote": {"qkdn_id": net.qkdn_id(peer), "qkdi_id": towards_peer["qkdl_remote"]["qkdi_id"]},
        "virt_prev_hop": None, "virt_next_hop": [net.qkdn_id(peer)], "virt_bandwidth": 0}]}}
    created = http.post(net.url(node) + ROOT + "/qkd_links/", json=body, timeout=30)
    assert created.status_code == 201, created.text
    assert created.headers["Location"].endswith(f"{ROOT}/qkd_links/qkd_link={virt_id}")
    links = get(http, net, node, "/qkd_links/")["etsi-qkd-sdn-node:qkd_links"]["qkd_link"]
    (virt,) = [link for link in links if link["qkdl_id"] == virt_id]
    assert virt["virt_next_hop"] == [net.qkdn_id(peer)] and "virt_prev_hop" not in virt
    assert virt["qkdl_local"]["qkdn_id"] == net.qkdn_id(node)
    validate_with_yang(get(http, net, node))
    # Posting it again is a conflict; the operator may remove it.
    assert http.post(net.url(node) + ROOT + "/qkd_links/", json=body, timeout=30).status_code == 409
    operator = net.session("operator")
    assert operator.delete(created.headers["Location"], timeout=30).status_code == 204
    assert virt_id not in {link["qkdl_id"] for link in
                           get(http, net, node, "/qkd_links/")["etsi-qkd-sdn-node:qkd_links"]["qkd_link"]}


def test_restconf_is_not_for_applications(net):
    app = net.session("sae", "SAE-KM4")
    body = {"qkd_links": {"qkd_link": []}}
    for resp in (app.get(net.url("KM4") + ROOT, timeout=30),
                 app.post(net.url("KM4") + ROOT + "/qkd_links/", json=body, timeout=30)):
        assert resp.status_code == 403
        assert resp.json()["ietf-restconf:errors"]["error"][0]["error-tag"] == "access-denied"
