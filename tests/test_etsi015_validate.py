"""etsi015.validate rejects malformed documents with the instance path of the error."""
from __future__ import annotations

import pytest

from etsi015 import codec, validate
from etsi015.validate import Etsi015ValidationError
from test_etsi015_codec import KSID, NODE_A, NODE_B, PHYS_ID, ROOT, VIRT_ID, sample_node

LINKS = f"{ROOT}/qkd_links/qkd_link"
PHYS = f"{LINKS}[qkdl_id='{PHYS_ID}']"
VIRT = f"{LINKS}[qkdl_id='{VIRT_ID}']"


def node_doc() -> dict:
    """A valid whole-node document to break in one place per test."""
    return codec.encode_node(sample_node())


def body(doc: dict) -> dict:
    return doc["etsi-qkd-sdn-node:qkd_node"]


def link(doc: dict, index: int) -> dict:
    return body(doc)["qkd_links"]["qkd_link"][index]


def errors_of(check, doc, **kwargs) -> dict[str, str]:
    with pytest.raises(Etsi015ValidationError) as info:
        check(doc, **kwargs)
    assert str(info.value) == "; ".join(f"{p}: {m}" for p, m in info.value.errors)
    return dict(info.value.errors)


def test_valid_document_passes():
    validate.validate_node(node_doc())
    validate.validate_node(codec.encode_node(sample_node(), config_only=True), content="config")


def test_bad_uuid():
    doc = node_doc()
    link(doc, 1)["virt_prev_hop"] = "KM0"
    errors = errors_of(validate.validate_node, doc)
    assert "'KM0' is not a valid yang:uuid" in errors[f"{VIRT}/virt_prev_hop"]


def test_bad_uuid_as_list_key_names_entry_by_its_key():
    doc = node_doc()
    link(doc, 0)["qkdl_id"] = "link-1"
    errors = errors_of(validate.validate_node, doc)
    assert "yang:uuid" in errors[f"{LINKS}[qkdl_id='link-1']/qkdl_id"]


def test_out_of_range_uint32():
    doc = node_doc()
    link(doc, 1)["virt_bandwidth"] = 4294967296
    errors = errors_of(validate.validate_node, doc)
    assert errors == {f"{VIRT}/virt_bandwidth":
                      "4294967296 is out of range for uint32 (0..4294967295)"}


def test_negative_uint32_in_nested_container():
    doc = node_doc()
    body(doc)["qkd_interfaces"]["qkd_interface"][0]["qkdi_att_point"]["port"] = -1
    errors = errors_of(validate.validate_node, doc)
    assert "out of range" in \
        errors[f"{ROOT}/qkd_interfaces/qkd_interface[qkdi_id='1']/qkdi_att_point/port"]


def test_unqualified_identity():
    doc = node_doc()
    link(doc, 0)["qkdl_type"] = "PHYS"
    errors = errors_of(validate.validate_node, doc)
    message = errors[f"{PHYS}/qkdl_type"]
    assert "must be module-qualified" in message
    assert "'etsi-qkd-node-types:PHYS'" in message
    # The phys_* leaves are not blamed for the bad qkdl_type.
    assert list(errors) == [f"{PHYS}/qkdl_type"]


def test_identity_from_wrong_base():
    doc = node_doc()
    link(doc, 0)["qkdl_status"] = "etsi-qkd-node-types:PHYS"
    errors = errors_of(validate.validate_node, doc)
    assert errors[f"{PHYS}/qkdl_status"] == (
        "identity 'etsi-qkd-node-types:PHYS' is not derived from "
        "etsi-qkd-node-types:LINK-STATUS-TYPES (it is a etsi-qkd-node-types:QKD-LINK-TYPES)")


def test_virt_leaf_on_phys_link():
    doc = node_doc()
    link(doc, 0)["virt_bandwidth"] = 1000
    errors = errors_of(validate.validate_node, doc)
    assert errors == {f"{PHYS}/virt_bandwidth": (
        "allowed only when qkdl_type = 'etsi-qkd-node-types:VIRT' (YANG when), "
        "but qkdl_type is 'etsi-qkd-node-types:PHYS'")}


def test_phys_leaf_on_virt_link():
    doc = node_doc()
    link(doc, 1)["phys_channel_att"] = "3.5"
    errors = errors_of(validate.validate_node, doc)
    assert "allowed only when qkdl_type = 'etsi-qkd-node-types:PHYS'" in \
        errors[f"{VIRT}/phys_channel_att"]


def test_phys_perf_on_virt_link():
    doc = node_doc()
    link(doc, 1)["qkdl_performance"]["phys_perf"] = [
        {"perf_type": "etsi-qkd-node-types:QBER", "value": "0.01"}]
    errors = errors_of(validate.validate_node, doc)
    assert "allowed only when ../qkdl_type = 'etsi-qkd-node-types:PHYS'" in \
        errors[f"{VIRT}/qkdl_performance/phys_perf"]


def test_virt_leaf_without_link_type():
    doc = node_doc()
    del link(doc, 1)["qkdl_type"]
    errors = errors_of(validate.validate_node, doc)
    assert "but qkdl_type is not set" in errors[f"{VIRT}/virt_bandwidth"]


def test_missing_qkdn_id():
    doc = node_doc()
    del body(doc)["qkdn_id"]
    errors = errors_of(validate.validate_node, doc)
    assert errors == {f"{ROOT}/qkdn_id": "missing mandatory leaf qkdn_id"}


def test_missing_list_key():
    doc = node_doc()
    del body(doc)["qkd_applications"]["qkd_app"][1]["app_id"]
    errors = errors_of(validate.validate_node, doc)
    assert errors == {f"{ROOT}/qkd_applications/qkd_app[2]/app_id": "missing list key app_id"}


def test_duplicate_list_keys():
    doc = node_doc()
    link(doc, 1)["qkdl_id"] = PHYS_ID
    errors = errors_of(validate.validate_node, doc)
    assert errors[PHYS] == f"duplicate list key qkdl_id={PHYS_ID} (entries 1 and 2)"


def test_duplicate_integer_list_keys():
    doc = node_doc()
    body(doc)["qkd_interfaces"]["qkd_interface"][1]["qkdi_id"] = 1
    errors = errors_of(validate.validate_node, doc)
    assert "duplicate list key qkdi_id=1" in \
        errors[f"{ROOT}/qkd_interfaces/qkd_interface[qkdi_id='1']"]


def test_duplicate_leaf_list_values():
    doc = node_doc()
    link(doc, 1)["virt_next_hop"] = [NODE_B, NODE_B]
    errors = errors_of(validate.validate_node, doc)
    assert errors == {f"{VIRT}/virt_next_hop[.='{NODE_B}']":
                      "duplicate value in leaf-list virt_next_hop"}


def test_wrong_json_type_for_leaf():
    doc = node_doc()
    link(doc, 0)["qkdl_enable"] = "true"
    errors = errors_of(validate.validate_node, doc)
    assert errors == {f"{PHYS}/qkdl_enable": "expected a JSON boolean (true/false), got string "
                                             "'true'"}


def test_wrong_json_type_for_list_and_container():
    doc = node_doc()
    body(doc)["qkd_links"] = [{"qkd_link": []}]
    body(doc)["qkdn_capabilities"] = []
    body(doc)["qkd_applications"]["qkd_app"] = {"app_id": KSID}
    errors = errors_of(validate.validate_node, doc)
    assert "expected a JSON object for container qkd_links, got array" == \
        errors[f"{ROOT}/qkd_links"]
    assert "got array" in errors[f"{ROOT}/qkdn_capabilities"]
    assert "expected a JSON array for list qkd_app" in errors[f"{ROOT}/qkd_applications/qkd_app"]


def test_wrong_json_type_for_uint32_and_decimal64():
    doc = node_doc()
    link(doc, 1)["virt_bandwidth"] = "4096"
    link(doc, 0)["phys_channel_att"] = 11.25
    errors = errors_of(validate.validate_node, doc)
    assert errors[f"{VIRT}/virt_bandwidth"] == "expected uint32 as a JSON number, got string '4096'"
    assert "decimal64 (fraction-digits 3) as a JSON string" in errors[f"{PHYS}/phys_channel_att"]


def test_unknown_member():
    doc = node_doc()
    link(doc, 0)["bandwidth"] = 5
    errors = errors_of(validate.validate_node, doc)
    assert errors == {f"{PHYS}/bandwidth": "unknown member 'bandwidth': etsi-qkd-sdn-node "
                                           "defines no such node in qkd_link"}


def test_qualified_inner_member_is_rejected():
    doc = node_doc()
    body(doc)["etsi-qkd-sdn-node:qkdn_version"] = body(doc).pop("qkdn_version")
    errors = errors_of(validate.validate_node, doc)
    assert "must not be module-qualified" in errors[f"{ROOT}/etsi-qkd-sdn-node:qkdn_version"]


def test_bad_date_and_time():
    doc = node_doc()
    body(doc)["qkd_applications"]["qkd_app"][0]["expiration_time"] = "2023-02-29T10:00:00Z"
    errors = errors_of(validate.validate_node, doc)
    assert "day 29 does not exist in 2023-02" in \
        errors[f"{ROOT}/qkd_applications/qkd_app[app_id='{KSID}']/expiration_time"]


def test_bad_pattern_wavelength_range():
    doc = node_doc()
    body(doc)["qkd_interfaces"]["qkd_interface"][0]["qkdi_capabilities"]["wavelength_range"] = \
        "1,,2"
    errors = errors_of(validate.validate_node, doc)
    assert "etsi-qkdn-types:wavelength-range-type" in errors[
        f"{ROOT}/qkd_interfaces/qkd_interface[qkdi_id='1']/qkdi_capabilities/wavelength_range"]


def test_every_error_is_reported_at_once():
    doc = node_doc()
    link(doc, 0)["virt_bandwidth"] = 1
    link(doc, 1)["virt_bandwidth"] = -1
    del body(doc)["qkdn_id"]
    errors = errors_of(validate.validate_node, doc)
    assert set(errors) == {f"{PHYS}/virt_bandwidth", f"{VIRT}/virt_bandwidth", f"{ROOT}/qkdn_id"}


def test_config_content_rejects_state():
    doc = node_doc()
    errors = errors_of(validate.validate_node, doc, content="config")
    assert errors[f"{ROOT}/qkdn_status"] == ("config false (read-only) node is not allowed in "
                                             "configuration data")
    assert f"{PHYS}/qkdl_performance/skr" in errors
    assert f"{ROOT}/qkd_applications/qkd_app[app_id='{KSID}']/app_statistics/statistics" in errors
    with pytest.raises(ValueError, match="content must be"):
        validate.validate_node(doc, content="state")


def test_restconf_error_document_from_validation():
    doc = node_doc()
    link(doc, 0)["virt_bandwidth"] = 1
    link(doc, 0)["extra"] = 1
    del body(doc)["qkdn_id"]
    with pytest.raises(Etsi015ValidationError) as info:
        validate.validate_node(doc)
    errors = info.value.restconf_errors()["ietf-restconf:errors"]["error"]
    tags = {e["error-path"]: e["error-tag"] for e in errors}
    assert tags == {f"{PHYS}/virt_bandwidth": "unknown-element",
                    f"{PHYS}/extra": "unknown-element",
                    f"{ROOT}/qkdn_id": "missing-element"}
    assert all(e["error-type"] == "application" and e["error-message"] for e in errors)


# --------------------------------------------------------------------------- resource payloads


def test_link_payload_paths_are_absolute():
    doc = {"etsi-qkd-sdn-node:qkd_link": [{"qkdl_id": VIRT_ID,
                                           "qkdl_type": "etsi-qkd-node-types:VIRT",
                                           "virt_bandwidth": -5}]}
    errors = errors_of(validate.validate_link, doc)
    assert list(errors) == [f"{VIRT}/virt_bandwidth"]


def test_phys_perf_when_is_checked_in_entry_payload():
    doc = {"etsi-qkd-sdn-node:qkd_link": {"qkdl_id": VIRT_ID,
                                          "qkdl_type": "etsi-qkd-node-types:VIRT",
                                          "qkdl_performance": {"phys_perf": []}}}
    errors = errors_of(validate.validate_link, doc)
    assert list(errors) == [f"{VIRT}/qkdl_performance/phys_perf"]


def test_links_payload_unqualified_wrapper():
    doc = {"qkd_links": {"qkd_link": [{"qkdl_id": VIRT_ID, "qkdl_type": "VIRT"}]}}
    errors = errors_of(validate.validate_links, doc)
    assert list(errors) == [f"{VIRT}/qkdl_type"]


def test_entry_payload_must_hold_one_entry():
    doc = {"etsi-qkd-sdn-node:qkd_app": [{"app_id": KSID}, {"app_id": NODE_A}]}
    errors = errors_of(validate.validate_application, doc)
    assert errors == {f"{ROOT}/qkd_applications/qkd_app": "expected exactly one qkd_app entry, "
                                                           "got 2"}


def test_wrong_top_member():
    errors = errors_of(validate.validate_links, {"etsi-qkd-sdn-node:qkd_link": []})
    assert errors[f"{ROOT}/qkd_links"] == "missing member 'etsi-qkd-sdn-node:qkd_links'"
    assert "unexpected member" in errors[f"{ROOT}/etsi-qkd-sdn-node:qkd_link"]
    errors = errors_of(validate.validate_node, {"other:qkd_node": {}})
    assert "unexpected member" in errors["/other:qkd_node"]
    errors = errors_of(validate.validate_node, [])
    assert errors == {"/": "expected a JSON object with member 'etsi-qkd-sdn-node:qkd_node', "
                           "got array"}
    both = {"qkd_links": {}, "etsi-qkd-sdn-node:qkd_links": {}}
    assert "both qualified and unqualified" in errors_of(validate.validate_links, both)[
        f"{ROOT}/qkd_links"]


def test_partial_payload_skips_when_and_mandatory_but_not_keys():
    patch = {"etsi-qkd-sdn-node:qkd_link": [{"qkdl_id": VIRT_ID, "virt_bandwidth": 1}]}
    validate.validate_link(patch, content="config", partial=True)
    with pytest.raises(Etsi015ValidationError):
        validate.validate_link(patch)
    errors = errors_of(validate.validate_link, {"etsi-qkd-sdn-node:qkd_link": [{
        "virt_bandwidth": 1}]}, partial=True)
    assert errors == {f"{LINKS}[1]/qkdl_id": "missing list key qkdl_id"}
    validate.validate_node({"etsi-qkd-sdn-node:qkd_node": {"qkdn_location_id": "b"}},
                           partial=True)


def test_other_resources_validate():
    validate.validate_capabilities({"etsi-qkd-sdn-node:qkdn_capabilities": {
        "link_stats_support": False}})
    errors = errors_of(validate.validate_capabilities, {"qkdn_capabilities": {
        "link_stats_support": 0}})
    assert list(errors) == [f"{ROOT}/qkdn_capabilities/link_stats_support"]
    errors = errors_of(validate.validate_interface, {"etsi-qkd-sdn-node:qkd_interface": [{
        "qkdi_id": 7, "qkdi_type": "etsi-qkd-node-types:QKD"}]})
    assert list(errors) == [f"{ROOT}/qkd_interfaces/qkd_interface[qkdi_id='7']/qkdi_type"]
    errors = errors_of(validate.validate_applications, {"qkd_applications": {"qkd_app": [{
        "app_id": KSID, "app_qos": {"ttl": 1.5}}]}})
    assert list(errors) == [f"{ROOT}/qkd_applications/qkd_app[app_id='{KSID}']/app_qos/ttl"]
    validate.validate_interfaces({"etsi-qkd-sdn-node:qkd_interfaces": {}})


# --------------------------------------------------------------------------- notifications


def test_notification_errors():
    errors = errors_of(validate.validate_notification, {"etsi-qkd-sdn-node:sdqkdn_link_down": {
        "qkd_link": {"qkdl_id": PHYS_ID, "cause": "x"}}})
    assert list(errors) == ["/etsi-qkd-sdn-node:sdqkdn_link_down/qkd_link/cause"]
    errors = errors_of(validate.validate_notification, {"ietf-restconf:notification": {
        "eventTime": "yesterday", "etsi-qkd-sdn-node:alarm": {}}})
    assert "yang:date-and-time" in errors["/ietf-restconf:notification/eventTime"]
    errors = errors_of(validate.validate_notification, {"etsi-qkd-sdn-node:link_up": {}})
    assert "not a notification" in errors["/etsi-qkd-sdn-node:link_up"]
    errors = errors_of(validate.validate_notification, {"ietf-restconf:notification": {
        "etsi-qkd-sdn-node:event": {}}})
    assert "missing eventTime" in errors["/ietf-restconf:notification/eventTime"]
