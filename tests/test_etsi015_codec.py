"""etsi015 model and RFC 7951 codec: identities, value types, round trips, resources,
notifications, merge. (YANG conformance of the output: test_etsi015_yang.py.)"""
from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from etsi015 import codec
from etsi015 import yang_types as types
from etsi015.model import (
    Alarm, AppStatistics, AppStatus, AppType, Application, ApplicationDisconnected,
    ApplicationNew, ApplicationQosUpdate, ApplicationReport, AttachmentPoint, Capabilities,
    Event, Identity, Interface, InterfaceCapabilities, InterfaceDown, InterfaceNew, InterfaceOut,
    InterfaceReport, InterfaceStatus, Link, LinkDown, LinkEnd, LinkOverloaded, LinkPerfUpdate,
    LinkPerformance, LinkReport, LinkStatus, LinkType, NodeStatus, PhysPerf, PhysPerfType, QkdNode,
    QkdRole, QkdTechnology, QoS, Severity, identity_from_json)
from etsi015.validate import Etsi015ValidationError

NODE_A = "5d3a6c1e-0000-4000-8000-00000000000a"
NODE_B = "5d3a6c1e-0000-4000-8000-00000000000b"
NODE_C = "5d3a6c1e-0000-4000-8000-00000000000c"
PHYS_ID = "7f000000-0000-4000-8000-000000000001"
VIRT_ID = "7f000000-0000-4000-8000-000000000002"
KSID = "a1b2c3d4-0000-4000-8000-000000000001"
KSID2 = "a1b2c3d4-0000-4000-8000-000000000002"
ROOT = "/etsi-qkd-sdn-node:qkd_node"


def phys_link() -> Link:
    return Link(
        qkdl_id=PHYS_ID, qkdl_status=LinkStatus.ACTIVE, qkdl_enable=True,
        qkdl_local=LinkEnd(qkdn_id=NODE_A, qkdi_id=1),
        qkdl_remote=LinkEnd(qkdn_id=NODE_B, qkdi_id=2),
        qkdl_type=LinkType.PHYS, qkdl_applications=[KSID],
        phys_channel_att=Decimal("11.250"), phys_wavelength="1550",
        phys_qkd_role=QkdRole.TRANSMITTER,
        qkdl_performance=LinkPerformance(
            expected_consumption=2048, skr=12000, eskr=11000,
            phys_perf=[PhysPerf(PhysPerfType.QBER, Decimal("0.021")),
                       PhysPerf(PhysPerfType.SNR, Decimal("17.5"))]))


def virt_link() -> Link:
    return Link(
        qkdl_id=VIRT_ID, qkdl_status=LinkStatus.PENDING, qkdl_enable=False,
        qkdl_local=LinkEnd(qkdn_id=NODE_A), qkdl_remote=LinkEnd(qkdn_id=NODE_C),
        qkdl_type=LinkType.VIRT, qkdl_applications=[KSID2],
        virt_prev_hop=NODE_B, virt_next_hop=[NODE_C], virt_bandwidth=4096,
        qkdl_performance=LinkPerformance(expected_consumption=4096))


def application() -> Application:
    return Application(
        app_id=KSID, app_status=AppStatus.ON, app_type=AppType.CLIENT,
        server_app_id="sae-km0-a", client_app_id=["sae-km1-a", "urn:sae:km1-b"], app_priority=3,
        creation_time="2024-05-01T10:00:00Z", expiration_time="2024-05-01T11:00:00.5+02:00",
        statistics=[AppStatistics("2024-05-01T10:01:00Z", "2024-05-01T10:00:00Z", 65536),
                    AppStatistics("2024-05-01T10:02:00Z", "2024-05-01T10:01:00Z", 32768)],
        app_qos=QoS(max_bandwidth=8192, min_bandwidth=1024, jitter=10, ttl=3600,
                    clients_shared_path_enable=False, clients_shared_keys_required=True),
        backing_qkdl_id=[PHYS_ID], local_qkdn_id=NODE_A, remote_qkdn_id=NODE_B)


def interface() -> Interface:
    return Interface(
        qkdi_id=1, qkdi_model="twin/decoy-bb84", qkdi_type=QkdTechnology.DV_QKD,
        qkdi_att_point=AttachmentPoint(device="KM0", port=1),
        qkdi_capabilities=InterfaceCapabilities(role_support=QkdRole.TRANSCEIVER,
                                                wavelength_range="1,12-20,40",
                                                max_absorption=Decimal("30.5")),
        qkdi_status=InterfaceStatus.ENABLED)


def sample_node() -> QkdNode:
    """A node using every leaf of the model."""
    return QkdNode(
        qkdn_id=NODE_A, qkdn_status=NodeStatus.OPERATING, qkdn_version="qkdsdn 0.1.0",
        qkdn_location_id="lab-1",
        capabilities=Capabilities(link_stats_support=True, application_stats_support=False,
                                  key_relay_mode_enable=True),
        applications=[application(),
                      Application(app_id=KSID2, app_type=AppType.INTERNAL, app_priority=0)],
        interfaces=[interface(), Interface(qkdi_id=2, qkdi_type=QkdTechnology.CV_QKD)],
        links=[phys_link(), virt_link()])


def sample_notifications() -> list:
    perf = LinkPerformance(expected_consumption=100, skr=2000, eskr=1500,
                           phys_perf=[PhysPerf(PhysPerfType.QBER, Decimal("0.05"))])
    return [
        ApplicationNew.from_application(application()),
        ApplicationQosUpdate(app_id=KSID, app_qos=QoS(max_bandwidth=1), app_priority=2),
        ApplicationDisconnected(app_id=KSID),
        InterfaceNew.from_interface(interface()),
        InterfaceDown(qkdi_id=1, reason="detector saturated"),
        InterfaceOut(qkdi_id=2),
        LinkDown(qkdl_id=PHYS_ID, reason="fibre cut"),
        LinkPerfUpdate(qkdl_id=PHYS_ID, performance=perf),
        LinkOverloaded(qkdl_id=PHYS_ID, performance=LinkPerformance(expected_consumption=9000,
                                                                    skr=2000, eskr=1500)),
        Alarm(link=LinkReport(qkdl_id=PHYS_ID, qkdl_status=LinkStatus.OFF, message="QBER > 11%",
                              severity=Severity.MAJOR),
              interface=InterfaceReport(qkdi_id=1, qkdi_status=InterfaceStatus.FAILED,
                                        message="no clock", severity=Severity.MAJOR),
              application=ApplicationReport(app_id=KSID, app_status=AppStatus.ZOMBIE,
                                            message="peer gone", severity=Severity.MINOR)),
        Event(application=ApplicationReport(app_id=KSID, app_status=AppStatus.OUT_OF_TIME,
                                            severity=Severity.MINOR)),
    ]


# --------------------------------------------------------------------------- identities

ALL_ENUMS = Identity.__subclasses__()


def test_every_identity_encodes_qualified_and_decodes_back():
    assert len(ALL_ENUMS) == 10
    for enum_cls in ALL_ENUMS:
        for member in enum_cls:
            assert member.value == f"etsi-qkd-node-types:{member.identity}"
            assert str(member) == f"{member}" == member.value
            assert enum_cls.from_json(member.value) is member
            assert identity_from_json(member.value) is member
    assert LinkType.PHYS == "etsi-qkd-node-types:PHYS"
    assert AppStatus.OUT_OF_TIME.identity == "OUT-OF-TIME"
    assert QkdTechnology.DV_QKD_2WS.identity == "DV-QKD-2Ws"
    assert json.dumps(LinkType.VIRT) == '"etsi-qkd-node-types:VIRT"'


def test_unqualified_identity_is_rejected_with_hint():
    with pytest.raises(ValueError, match=r"must be module-qualified.*RFC 7951 sec. 6.8.*"
                                         r"use 'etsi-qkd-node-types:PHYS'"):
        LinkType.from_json("PHYS")


def test_identity_of_another_base_or_module_is_rejected():
    with pytest.raises(ValueError, match="not derived from etsi-qkd-node-types:QKD-LINK-TYPES"):
        LinkType.from_json("etsi-qkd-node-types:ACTIVE")
    with pytest.raises(ValueError, match="base identity"):
        LinkType.from_json("etsi-qkd-node-types:QKD-LINK-TYPES")
    with pytest.raises(ValueError, match="module 'etsi-qkd-sdn-node' defines no identity"):
        LinkType.from_json("etsi-qkd-sdn-node:PHYS")
    with pytest.raises(ValueError, match="unknown identity"):
        LinkType.from_json("etsi-qkd-node-types:WORMHOLE")


# --------------------------------------------------------------------------- value types


def test_integer_json_forms_and_ranges():
    assert types.UINT32.parse(4294967295) == 4294967295
    assert types.UINT32.serialize(0) == 0
    for bad in (4294967296, -1):
        with pytest.raises(ValueError, match="out of range for uint32"):
            types.UINT32.parse(bad)
    for bad in ("5", 5.0, True, None):
        with pytest.raises(ValueError, match="expected uint32 as a JSON number"):
            types.UINT32.parse(bad)
    # RFC 7951 sec. 6.1: 64-bit integers are strings.
    assert types.UINT64.serialize(18446744073709551615) == "18446744073709551615"
    assert types.UINT64.parse("+42") == 42
    assert types.INT64.parse("-9223372036854775808") == -(1 << 63)
    with pytest.raises(ValueError, match="as a JSON string"):
        types.UINT64.parse(42)
    with pytest.raises(ValueError, match="out of range"):
        types.UINT64.parse("18446744073709551616")
    with pytest.raises(ValueError, match="not a valid int64"):
        types.INT64.parse("0x10")
    assert types.UINT8.serialize(255) == 255
    with pytest.raises(ValueError, match="out of range for int8"):
        types.INT8.serialize(128)


def test_decimal64_forms():
    d = types.DECIMAL64_3
    assert d.parse("11.25") == Decimal("11.250")
    assert d.parse("-0.5") == Decimal("-0.500")
    assert d.serialize(Decimal("11.000")) == "11.0"
    assert d.serialize(0) == "0.0"
    assert d.serialize(Decimal("-0.000")) == "0.0"
    assert d.serialize(Decimal("-1.5")) == "-1.5"
    # A float is rounded to 3 digits (0.2 dB/km * 50 km + 1 dB is not exact in binary).
    assert d.serialize(0.2 * 50 + 1.0000004) == "11.0"
    assert d.serialize(3.14159) == "3.142"
    with pytest.raises(ValueError, match="more than 3 fraction digits"):
        d.parse("1.2345")
    with pytest.raises(ValueError, match="more than 3 fraction digits"):
        d.serialize(Decimal("1.2345"))
    with pytest.raises(ValueError, match="as a JSON string"):
        d.parse(1.5)
    for bad in ("1e3", "NaN", "", "1.", ".5", " 1.0"):
        with pytest.raises(ValueError):
            d.parse(bad)
    assert d.parse("9223372036854775.807") == Decimal("9223372036854775.807")
    with pytest.raises(ValueError, match="out of range"):
        d.parse("9223372036854775.808")
    with pytest.raises(ValueError, match="finite"):
        d.serialize(float("inf"))


def test_boolean_and_empty():
    assert types.BOOLEAN.parse(False) is False
    for bad in ("true", 1, None):
        with pytest.raises(ValueError, match="JSON boolean"):
            types.BOOLEAN.parse(bad)
    assert types.EMPTY.serialize(True) == [None]
    assert types.EMPTY.parse([None]) is True
    for bad in (None, [], True, [None, None]):
        with pytest.raises(ValueError, match=r"\[null\]"):
            types.EMPTY.parse(bad)


def test_date_and_time():
    good = ["2024-05-01T10:00:00Z", "2024-02-29T23:59:60Z", "2024-05-01T10:00:00.123456789+05:30",
            "1999-12-31T00:00:00-00:00"]
    for text in good:
        assert types.DATE_AND_TIME.parse(text) == text
    for text, why in [("2024-13-01T00:00:00Z", "month"), ("2023-02-29T00:00:00Z", "day 29"),
                      ("2024-05-01T24:00:00Z", "time of day"), ("2024-05-01T10:00:00+24:00",
                                                                 "offset"),
                      ("2024-05-01 10:00:00Z", "pattern"), ("2024-05-01T10:00:00", "pattern")]:
        with pytest.raises(ValueError, match=why):
            types.DATE_AND_TIME.parse(text)
    when = datetime(2024, 5, 1, 10, 0, 0, 250000, tzinfo=timezone(timedelta(hours=2)))
    text = types.format_date_and_time(when)
    assert text == "2024-05-01T10:00:00.250000+02:00"
    assert types.parse_date_and_time(text) == when
    assert types.format_date_and_time(datetime(2024, 1, 1, tzinfo=timezone.utc)) == \
        "2024-01-01T00:00:00Z"
    assert types.parse_date_and_time("2024-02-29T23:59:60Z").second == 59
    with pytest.raises(ValueError, match="timezone-aware"):
        types.format_date_and_time(datetime(2024, 1, 1))


# --------------------------------------------------------------------------- node codec


def test_full_node_round_trip_through_json_text():
    node = sample_node()
    doc = codec.encode_node(node)
    again = codec.decode_node(json.loads(json.dumps(doc)))
    assert again == node
    assert codec.encode_node(again) == doc


def test_node_encoding_follows_rfc7951():
    doc = codec.encode_node(sample_node())
    assert list(doc) == ["etsi-qkd-sdn-node:qkd_node"]
    body = doc["etsi-qkd-sdn-node:qkd_node"]
    # Inner members are never qualified (RFC 7951 sec. 4).
    assert all(":" not in key for key in _all_keys(body))
    assert body["qkdn_status"] == "etsi-qkd-node-types:OPERATING"
    assert body["qkdn_capabilities"] == {"link_stats_support": True,
                                         "application_stats_support": False,
                                         "key_relay_mode_enable": True}
    phys, virt = body["qkd_links"]["qkd_link"]
    assert phys["qkdl_type"] == "etsi-qkd-node-types:PHYS"
    assert phys["phys_channel_att"] == "11.25"  # decimal64: a string
    assert phys["qkdl_local"] == {"qkdn_id": NODE_A, "qkdi_id": 1}  # uint32: a number
    assert phys["qkdl_performance"]["phys_perf"] == [
        {"perf_type": "etsi-qkd-node-types:QBER", "value": "0.021"},
        {"perf_type": "etsi-qkd-node-types:SNR", "value": "17.5"}]
    assert virt["virt_next_hop"] == [NODE_C] and virt["virt_bandwidth"] == 4096
    assert virt["qkdl_enable"] is False
    assert not any(k.startswith("phys_") for k in virt)
    app = body["qkd_applications"]["qkd_app"][0]
    assert app["app_statistics"]["statistics"][0] == {
        "end_time": "2024-05-01T10:01:00Z", "start_time": "2024-05-01T10:00:00Z",
        "consumed_bits": 65536}
    assert app["client_app_id"] == ["sae-km1-a", "urn:sae:km1-b"]
    # Members come in YANG order.
    assert list(body) == ["qkdn_id", "qkdn_status", "qkdn_version", "qkdn_location_id",
                          "qkdn_capabilities", "qkd_applications", "qkd_interfaces", "qkd_links"]


def _all_keys(value):
    if isinstance(value, dict):
        for key, sub in value.items():
            yield key
            yield from _all_keys(sub)
    elif isinstance(value, list):
        for sub in value:
            yield from _all_keys(sub)


def test_empty_node_keeps_the_top_containers():
    doc = codec.encode_node(QkdNode(qkdn_id=NODE_A))
    assert doc == {"etsi-qkd-sdn-node:qkd_node": {
        "qkdn_id": NODE_A, "qkdn_capabilities": {}, "qkd_applications": {"qkd_app": []},
        "qkd_interfaces": {"qkd_interface": []}, "qkd_links": {"qkd_link": []}}}
    assert codec.decode_node(doc) == QkdNode(qkdn_id=NODE_A)


def test_config_only_leaves_out_state():
    full = codec.encode_node(sample_node())["etsi-qkd-sdn-node:qkd_node"]
    config = codec.encode_node(sample_node(), config_only=True)["etsi-qkd-sdn-node:qkd_node"]
    assert "qkdn_status" in full and "qkdn_status" not in config
    app = config["qkd_applications"]["qkd_app"][0]
    for gone in ("app_status", "creation_time", "app_statistics"):
        assert gone in full["qkd_applications"]["qkd_app"][0] and gone not in app
    assert app["expiration_time"] == "2024-05-01T11:00:00.5+02:00"
    iface = config["qkd_interfaces"]["qkd_interface"][0]
    assert "qkdi_status" not in iface and iface["qkdi_att_point"] == {"device": "KM0", "port": 1}
    for link in config["qkd_links"]["qkd_link"]:
        assert "qkdl_performance" not in link
        assert "qkdl_status" in link  # qkdl_status is configuration in this model
    # What remains is the same configuration.
    decoded = codec.decode_node({"etsi-qkd-sdn-node:qkd_node": config}, content="config")
    assert decoded.links[0].phys_channel_att == Decimal("11.25")
    assert decoded.qkdn_status is None and decoded.applications[0].statistics == []


def test_effective_applies_yang_defaults():
    link = Link(qkdl_id=PHYS_ID)
    assert link.qkdl_enable is None and link.effective("qkdl_enable") is True
    assert Link(qkdl_id=PHYS_ID, qkdl_enable=False).effective("qkdl_enable") is False
    assert QoS().effective("clients_shared_path_enable") is False
    assert Application(app_id=KSID).effective("app_priority") == 0
    assert Capabilities().effective("key_relay_mode_enable") is True
    assert QkdNode(qkdn_id=NODE_A).effective("qkdn_location_id") == ""
    assert QoS().effective("max_bandwidth") is None
    with pytest.raises(AttributeError):
        QoS().effective("nope")


def test_node_lookups():
    node = sample_node()
    assert node.link(VIRT_ID).is_virtual and node.link(PHYS_ID).is_physical
    assert node.application(KSID2).app_type is AppType.INTERNAL
    assert node.interface(2).qkdi_type is QkdTechnology.CV_QKD
    with pytest.raises(KeyError, match="no qkd_link"):
        node.link(NODE_A)


def test_python_conveniences_are_encoded():
    when = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
    app = Application(app_id=uuid.UUID(KSID), expiration_time=when,
                      app_type="etsi-qkd-node-types:CLIENT")
    entry = codec.encode_application(app)["etsi-qkd-sdn-node:qkd_app"][0]
    assert entry == {"app_id": KSID, "app_type": "etsi-qkd-node-types:CLIENT",
                     "expiration_time": "2024-05-01T12:00:00Z"}
    link = Link(qkdl_id=PHYS_ID, qkdl_type=LinkType.PHYS, phys_wavelength=1550,
                phys_channel_att=10)
    entry = codec.encode_link(link)["etsi-qkd-sdn-node:qkd_link"][0]
    assert entry["phys_wavelength"] == "1550" and entry["phys_channel_att"] == "10.0"


def test_encoder_reports_bad_python_values_by_path():
    node = sample_node()
    node.links[0].qkdl_local.qkdi_id = -1
    node.links[1].virt_next_hop = ["not-a-uuid"]
    node.applications[0].app_type = LinkType.PHYS
    node.interfaces[0].qkdi_att_point = "KM0:1"
    with pytest.raises(Etsi015ValidationError) as info:
        codec.encode_node(node)
    paths = dict(info.value.errors)
    links = f"{ROOT}/qkd_links/qkd_link"
    assert "out of range" in paths[f"{links}[qkdl_id='{PHYS_ID}']/qkdl_local/qkdi_id"]
    assert "yang:uuid" in paths[f"{links}[qkdl_id='{VIRT_ID}']/virt_next_hop[.='not-a-uuid']"]
    assert "not derived from etsi-qkd-node-types:QKD-APP-TYPES" in \
        paths[f"{ROOT}/qkd_applications/qkd_app[app_id='{KSID}']/app_type"]
    assert "expected a AttachmentPoint" in \
        paths[f"{ROOT}/qkd_interfaces/qkd_interface[qkdi_id='1']/qkdi_att_point"]


def test_encoder_checks_when_conditions():
    link = phys_link()
    link.virt_bandwidth = 100
    with pytest.raises(Etsi015ValidationError, match=r"qkd_link\[qkdl_id='7f000000-0000-4000-"
                                                     r"8000-000000000001'\]/virt_bandwidth"):
        codec.encode_link(link)
    # A PATCH body cannot know the stored qkdl_type: the server checks the merged link.
    patch = Link(qkdl_id=VIRT_ID, virt_bandwidth=100)
    assert codec.encode_link(patch, config_only=True, partial=True) == {
        "etsi-qkd-sdn-node:qkd_link": [{"qkdl_id": VIRT_ID, "virt_bandwidth": 100}]}


# --------------------------------------------------------------------------- resources


def test_resource_documents_and_round_trips():
    node = sample_node()
    cases = [
        (codec.encode_capabilities, codec.decode_capabilities, node.capabilities,
         "qkdn_capabilities", dict),
        (codec.encode_applications, codec.decode_applications, node.applications,
         "qkd_applications", dict),
        (codec.encode_interfaces, codec.decode_interfaces, node.interfaces, "qkd_interfaces",
         dict),
        (codec.encode_links, codec.decode_links, node.links, "qkd_links", dict),
        (codec.encode_application, codec.decode_application, node.applications[0], "qkd_app",
         list),
        (codec.encode_interface, codec.decode_interface, node.interfaces[0], "qkd_interface",
         list),
        (codec.encode_link, codec.decode_link, node.links[1], "qkd_link", list),
    ]
    for encode, decode, value, name, shape in cases:
        doc = encode(value)
        assert list(doc) == [f"etsi-qkd-sdn-node:{name}"]
        assert isinstance(doc[f"etsi-qkd-sdn-node:{name}"], shape)
        assert decode(json.loads(json.dumps(doc))) == value, name
        assert codec.payload_name(doc) == name
    assert codec.encode_links([]) == {"etsi-qkd-sdn-node:qkd_links": {"qkd_link": []}}
    assert codec.decode_links({"etsi-qkd-sdn-node:qkd_links": {}}) == []


def test_teraflow_style_unqualified_post_body_is_accepted():
    # What the TeraFlowSDN QKD driver POSTs to qkd_links/.
    body = {"qkd_links": {"qkd_link": [{
        "qkdl_id": VIRT_ID, "qkdl_type": "etsi-qkd-node-types:VIRT",
        "qkdl_local": {"qkdn_id": NODE_A, "qkdi_id": 1},
        "qkdl_remote": {"qkdn_id": NODE_C, "qkdi_id": 3},
        "virt_prev_hop": NODE_B, "virt_next_hop": [NODE_C], "virt_bandwidth": 1000}]}}
    assert codec.payload_name(body) == "qkd_links"
    (link,) = codec.decode_links(body, content="config")
    assert link.qkdl_type is LinkType.VIRT and link.virt_prev_hop == NODE_B
    assert link.qkdl_remote == LinkEnd(qkdn_id=NODE_C, qkdi_id=3)


def test_list_entry_accepts_object_or_one_entry_array():
    entry = {"qkdl_id": PHYS_ID, "qkdl_type": "etsi-qkd-node-types:PHYS"}
    as_object = codec.decode_link({"etsi-qkd-sdn-node:qkd_link": entry})
    as_array = codec.decode_link({"etsi-qkd-sdn-node:qkd_link": [entry]})
    assert as_object == as_array == Link(qkdl_id=PHYS_ID, qkdl_type=LinkType.PHYS)


def test_payload_name():
    assert codec.payload_name({"etsi-qkd-sdn-node:qkd_link": []}) == "qkd_link"
    assert codec.payload_name({"qkd_app": []}) == "qkd_app"
    assert codec.payload_name({"other-module:qkd_link": []}) is None
    assert codec.payload_name({"qkd_links": {}, "qkd_applications": {}}) is None
    assert codec.payload_name({"qkdl_id": PHYS_ID}) is None
    assert codec.payload_name([]) is None


# --------------------------------------------------------------------------- merge


def test_merge_is_a_plain_patch():
    stored = virt_link()
    patch = codec.decode_link({"etsi-qkd-sdn-node:qkd_link": [{
        "qkdl_id": VIRT_ID, "qkdl_status": "etsi-qkd-node-types:ACTIVE",
        "virt_next_hop": [NODE_B, NODE_C], "qkdl_remote": {"qkdi_id": 9}}]}, partial=True)
    merged = codec.merge(stored, patch)
    assert merged.qkdl_status is LinkStatus.ACTIVE
    assert merged.virt_next_hop == [NODE_C, NODE_B]  # leaf-list values are added
    assert merged.qkdl_remote == LinkEnd(qkdn_id=NODE_C, qkdi_id=9)
    assert merged.virt_bandwidth == 4096 and merged.qkdl_enable is False  # untouched
    assert stored == virt_link()  # inputs unchanged

    node = sample_node()
    change = QkdNode(qkdn_id=NODE_A, links=[Link(qkdl_id=PHYS_ID, qkdl_enable=False),
                                            Link(qkdl_id=NODE_B, qkdl_type=LinkType.PHYS)])
    merged_node = codec.merge(node, change)
    assert [lk.qkdl_id for lk in merged_node.links] == [PHYS_ID, VIRT_ID, NODE_B]
    assert merged_node.links[0].qkdl_enable is False
    assert merged_node.links[0].phys_channel_att == Decimal("11.25")
    assert node.links[0].qkdl_enable is True
    with pytest.raises(TypeError):
        codec.merge(node, stored)


def test_merged_result_is_checked_on_encode():
    merged = codec.merge(phys_link(), Link(qkdl_id=PHYS_ID, virt_bandwidth=5))
    with pytest.raises(Etsi015ValidationError, match="virt_bandwidth: allowed only when "
                                                     "qkdl_type = 'etsi-qkd-node-types:VIRT'"):
        codec.encode_link(merged)


# --------------------------------------------------------------------------- notifications


def test_notification_documents():
    docs = {type(n).NAME: n.to_json() for n in sample_notifications()}
    assert len(docs) == 11
    assert docs["sdqkdn_link_down"] == {"etsi-qkd-sdn-node:sdqkdn_link_down": {
        "qkd_link": {"qkdl_id": PHYS_ID, "reason": "fibre cut"}}}
    assert docs["sdqkdn_application_new"] == {"etsi-qkd-sdn-node:sdqkdn_application_new": {
        "qkd_application": {
            "app_type": "etsi-qkd-node-types:CLIENT", "server_app_id": "sae-km0-a",
            "client_app_id": ["sae-km1-a", "urn:sae:km1-b"], "app_priority": 3,
            "local_qkdn_id": NODE_A,
            "app_qos": {"max_bandwidth": 8192, "min_bandwidth": 1024, "jitter": 10, "ttl": 3600,
                        "clients_shared_path_enable": False,
                        "clients_shared_keys_required": True}}}}
    assert docs["sdqkdn_link_perf_update"]["etsi-qkd-sdn-node:sdqkdn_link_perf_update"] == {
        "qkd_link": {"qkdl_id": PHYS_ID, "performance": {
            "expected_consumption": 100, "skr": 2000, "eskr": 1500,
            "phys_perf": [{"perf_type": "etsi-qkd-node-types:QBER", "value": "0.05"}]}}}
    assert docs["alarm"]["etsi-qkd-sdn-node:alarm"]["interface"] == {
        "qkdi_id": 1, "qkdi_status": "etsi-qkd-node-types:FAILED", "message": "no clock",
        "severity": "etsi-qkd-node-types:MAJOR"}
    assert docs["event"] == {"etsi-qkd-sdn-node:event": {"application": {
        "app_id": KSID, "app_status": "etsi-qkd-node-types:OUT-OF-TIME",
        "severity": "etsi-qkd-node-types:MINOR"}}}
    assert docs["sdqkdn_interface_out"] == {
        "etsi-qkd-sdn-node:sdqkdn_interface_out": {"qkd_interface": {"qkdi_id": 2}}}


def test_notifications_round_trip_in_restconf_envelope():
    stamp = datetime(2024, 5, 1, 10, 0, tzinfo=timezone.utc)
    for notification in sample_notifications():
        doc = notification.to_restconf(stamp)
        (envelope,) = doc.values()
        assert list(doc) == ["ietf-restconf:notification"]
        assert envelope["eventTime"] == "2024-05-01T10:00:00Z"
        decoded, event_time = codec.decode_notification(json.loads(json.dumps(doc)))
        assert decoded == notification and event_time == "2024-05-01T10:00:00Z"
        bare, no_time = codec.decode_notification(notification.to_json())
        assert bare == notification and no_time is None


def test_link_overloaded_has_no_phys_perf():
    bad = LinkOverloaded(qkdl_id=PHYS_ID, performance=LinkPerformance(
        skr=1, phys_perf=[PhysPerf(PhysPerfType.QBER, Decimal("0.1"))]))
    with pytest.raises(Etsi015ValidationError,
                       match=r"/etsi-qkd-sdn-node:sdqkdn_link_overloaded/qkd_link/performance/"
                             r"phys_perf: unknown member"):
        bad.to_json()


def test_notification_values_are_checked():
    with pytest.raises(Etsi015ValidationError, match=r"/etsi-qkd-sdn-node:alarm/link/severity"):
        Alarm(link=LinkReport(qkdl_id=PHYS_ID, severity=LinkStatus.OFF)).to_json()
    with pytest.raises(Etsi015ValidationError, match="eventTime"):
        LinkDown(qkdl_id=PHYS_ID).to_restconf(datetime(2024, 1, 1))
    with pytest.raises(TypeError):
        codec.encode_notification(LinkReport())

