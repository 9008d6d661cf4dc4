"""What etsi015 encodes conforms to the ETSI GS QKD 015 YANG modules (checked with
yangson), and etsi015's own validator rejects what yangson rejects."""
from __future__ import annotations

import json

import pytest

from etsi015 import codec, validate
from etsi015.model import Link, LinkType, QkdNode
from test_etsi015_codec import (NODE_A, PHYS_ID, VIRT_ID, phys_link, sample_node,
                                sample_notifications, virt_link)
from yang_helper import (QKD015_DIR, YangInvalid, etsi_dir, validate_notification_with_yang,
                         validate_resource_with_yang, validate_with_yang)


@pytest.fixture(autouse=True)
def _modules():
    etsi_dir()  # skips when ../shared/etsi is absent


def test_helper_rejects_invalid_documents():
    # The helper must be able to fail, or every test below proves nothing.
    with pytest.raises(YangInvalid, match="member-not-allowed"):
        validate_with_yang({"etsi-qkd-sdn-node:qkd_node": {
            "qkdn_id": NODE_A, "qkd_links": {"qkd_link": [{
                "qkdl_id": PHYS_ID, "qkdl_type": "etsi-qkd-node-types:PHYS",
                "virt_bandwidth": 1}]}}})
    with pytest.raises(YangInvalid, match="qkdn_status"):
        validate_with_yang({"etsi-qkd-sdn-node:qkd_node": {
            "qkdn_id": NODE_A, "qkdn_status": "etsi-qkd-node-types:NEW"}}, content="config")


def test_full_node_conforms():
    validate_with_yang(codec.encode_node(sample_node()))


def test_configuration_conforms_as_config_data():
    validate_with_yang(codec.encode_node(sample_node(), config_only=True), content="config")


def test_physical_and_virtual_links_conform():
    node = QkdNode(qkdn_id=NODE_A, links=[phys_link(), virt_link(),
                                          Link(qkdl_id=NODE_A, qkdl_type=LinkType.VIRT)])
    validate_with_yang(codec.encode_node(node))


def test_every_resource_document_conforms():
    node = sample_node()
    docs = {
        "qkdn_capabilities": codec.encode_capabilities(node.capabilities),
        "qkd_applications": codec.encode_applications(node.applications),
        "qkd_app": codec.encode_application(node.applications[0]),
        "qkd_interfaces": codec.encode_interfaces(node.interfaces),
        "qkd_interface": codec.encode_interface(node.interfaces[0]),
        "qkd_links": codec.encode_links(node.links),
        "qkd_link": codec.encode_link(node.links[0]),
    }
    for resource, doc in docs.items():
        validate_resource_with_yang(doc, resource)


def _without_empty_lists(value):
    if isinstance(value, dict):
        return {k: _without_empty_lists(v) for k, v in value.items() if v != []}
    if isinstance(value, list):
        return [_without_empty_lists(v) for v in value]
    return value


def test_startup_example_decodes_and_reencodes_equivalently():
    startup = json.loads((QKD015_DIR / "startup.example.json").read_text(encoding="utf-8"))
    # The file keys the datastore by module (freeconf startup form); RFC 7951 qualifies
    # the top member instead.
    doc = {"etsi-qkd-sdn-node:qkd_node": startup["etsi-qkd-sdn-node"]["qkd_node"]}
    validate_with_yang(doc)
    node = codec.decode_node(doc)
    assert node == QkdNode(qkdn_id="00000000-0000-0000-0000-000000000000")
    again = codec.encode_node(node)
    validate_with_yang(again)
    # Identical up to the empty entry arrays the encoder adds to the list wrappers.
    assert _without_empty_lists(again) == doc
    assert codec.decode_node(again) == node


def test_notifications_conform_to_their_yang_schema():
    for notification in sample_notifications():
        validate_notification_with_yang(notification.to_json())
        validate_notification_with_yang(notification.to_restconf("2024-05-01T10:00:00Z"))


def _node_with_link(**leaves):
    entry = {"qkdl_id": VIRT_ID, **leaves}
    return {"etsi-qkd-sdn-node:qkd_node": {"qkdn_id": NODE_A,
                                           "qkd_links": {"qkd_link": [entry]}}}


MALFORMED = {
    "bad uuid": _node_with_link(virt_prev_hop="KM0", qkdl_type="etsi-qkd-node-types:VIRT"),
    "uint32 out of range": _node_with_link(qkdl_type="etsi-qkd-node-types:VIRT",
                                           virt_bandwidth=4294967296),
    "unqualified identity": _node_with_link(qkdl_type="VIRT"),
    "identity of another base": _node_with_link(qkdl_type="etsi-qkd-node-types:ACTIVE"),
    "virt leaf on PHYS": _node_with_link(qkdl_type="etsi-qkd-node-types:PHYS",
                                         virt_bandwidth=5),
    "phys leaf on VIRT": _node_with_link(qkdl_type="etsi-qkd-node-types:VIRT",
                                         phys_channel_att="1.5"),
    "phys_perf on VIRT": _node_with_link(qkdl_type="etsi-qkd-node-types:VIRT",
                                         qkdl_performance={"phys_perf": [
                                             {"perf_type": "etsi-qkd-node-types:QBER"}]}),
    "missing qkdn_id": {"etsi-qkd-sdn-node:qkd_node": {"qkdn_location_id": "x"}},
    "duplicate keys": {"etsi-qkd-sdn-node:qkd_node": {"qkdn_id": NODE_A, "qkd_links": {
        "qkd_link": [{"qkdl_id": VIRT_ID}, {"qkdl_id": VIRT_ID}]}}},
    "wrong JSON type": _node_with_link(qkdl_enable="true"),
    "unknown member": _node_with_link(bandwidth=5),
    "decimal64 as number": _node_with_link(qkdl_type="etsi-qkd-node-types:PHYS",
                                           phys_channel_att=1.5),
    "bad wavelength": _node_with_link(qkdl_type="etsi-qkd-node-types:PHYS",
                                      phys_wavelength="0"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_own_validator_agrees_with_yangson_on_malformed_documents(case):
    doc = MALFORMED[case]
    with pytest.raises(YangInvalid):
        validate_with_yang(doc)
    with pytest.raises(validate.Etsi015ValidationError):
        validate.validate_node(doc)
