"""The network file: every invalid input is refused with its file, line and key."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from db.netfile import NetworkFileError, derived_uuid, load, parse

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

BASE = """\
network:
  name: t
nodes:
  - name: A
  - name: B
  - name: C
links:
  - {ends: [A, B], length_km: 10}
  - {ends: [B, C], length_km: 20}
users:
  - name: u
    sla: {max_priority: 5, max_bps: 1000, max_sessions: 2, bucket_bits: 4096}
applications:
  - {sae_id: SAE-A, node: A, user: u}
"""


def problems(text: str) -> list[str]:
    with pytest.raises(NetworkFileError) as info:
        parse(textwrap.dedent(text), "net.yaml")
    return [str(p) for p in info.value.problems]


def one(text: str) -> str:
    found = problems(text)
    assert len(found) == 1, found
    return found[0]


def test_examples_parse():
    names = {p.name for p in EXAMPLES.glob("*.yaml")}
    assert {"paper-poc.yaml", "linear-5.yaml", "metro-24.yaml"} <= names
    poc = load(EXAMPLES / "paper-poc.yaml")
    assert [n.name for n in poc.nodes] == [f"KM{i}" for i in range(6)]
    pairs = {frozenset(link.ends) for link in poc.links}
    assert pairs == {frozenset(("KM0", f"KM{i}")) for i in range(1, 6)} | {frozenset(("KM4", "KM5"))}
    assert {a.node for a in poc.applications} == {n.name for n in poc.nodes}
    linear = load(EXAMPLES / "linear-5.yaml")
    assert len(linear.nodes) == 6 and len(linear.links) == 5
    metro = load(EXAMPLES / "metro-24.yaml")
    assert len(metro.nodes) >= 20
    assert all(10 <= link.length_km <= 80 and link.device is not None for link in metro.links)
    assert min(link.length_km for link in metro.links) == 10 and max(link.length_km for link in metro.links) == 80


def test_derived_ids_are_stable_and_distinct():
    net = parse(BASE, "net.yaml")
    assert net.node("A").qkdn_id == derived_uuid("t", "node", "A")
    assert len({n.qkdn_id for n in net.nodes} | {link.qkdl_id for link in net.links}) == 5
    assert net.links[0].name == "A-B"
    assert net.interface_id("B", "A-B") == 1 and net.interface_id("B", "B-C") == 2


def test_exponent_floats_are_numbers():
    net = parse(BASE.replace("{ends: [A, B], length_km: 10}",
                             "{ends: [A, B], length_km: 10, device: {clock_rate_hz: 2.5e9}}"), "net.yaml")
    assert net.links[0].device.clock_rate_hz == 2.5e9


def test_malformed_yaml():
    msg = one("network:\n  name: t\nnodes: [\n  - name: A\n")
    assert msg.startswith("net.yaml:") and "malformed YAML" in msg


def test_malformed_yaml_line_points_at_problem():
    msg = one("network:\n  name: t\nnodes:\n  - name: A\n   bad: indent\n")
    assert msg.startswith("net.yaml:5:") and "malformed YAML" in msg


def test_empty_file():
    assert one("") == "net.yaml:1: the file is empty"


def test_unknown_top_level_key():
    msg = one(BASE + "topology: {}\n")
    assert msg.startswith("net.yaml:15: topology: unknown key 'topology' in network file")


def test_unknown_key_in_link():
    msg = one(BASE.replace("{ends: [B, C], length_km: 20}", "{ends: [B, C], length_km: 20, lenght: 3}"))
    assert msg.startswith("net.yaml:9: links[1].lenght: unknown key 'lenght' in link")


def test_unknown_key_in_device():
    msg = one(BASE.replace("{ends: [A, B], length_km: 10}", "{ends: [A, B], length_km: 10, device: {eta: 1}}"))
    assert msg.startswith("net.yaml:8: links[0].device.eta: unknown key 'eta' in device")


def test_wrong_type():
    msg = one(BASE.replace("length_km: 20", "length_km: twenty"))
    assert msg == "net.yaml:9: links[1].length_km: expected number, got string 'twenty'"


def test_boolean_is_not_an_integer():
    msg = one(BASE.replace("max_sessions: 2", "max_sessions: true"))
    assert msg == "net.yaml:12: users[0].sla.max_sessions: expected integer, got boolean True"


def test_nodes_not_a_list():
    msg = one("network: {name: t}\nnodes: {A: 1}\n")
    assert msg == "net.yaml:2: nodes: expected a list, got mapping"


def test_missing_required_field():
    msg = one(BASE.replace("  - {ends: [B, C], length_km: 20}\n", "  - {ends: [B, C]}\n"))
    assert msg == "net.yaml:9: links[1]: missing required key 'length_km'"


def test_missing_network_name():
    msg = one(BASE.replace("  name: t\n", "  description: x\n", 1))
    assert msg == "net.yaml:1: network: missing required key 'name'"


def test_missing_nodes():
    assert one("network: {name: t}\n") == "net.yaml:1: missing required key 'nodes'"


def test_duplicate_node_name():
    msg = one(BASE.replace("  - name: C\n", "  - name: A\n").replace("[B, C]", "[B, A]").replace(
        "  - {ends: [B, A], length_km: 20}\n", ""))
    assert msg == "net.yaml:6: nodes[2].name: duplicate node name 'A' (first used at nodes[0].name, line 4)"


def test_duplicate_id():
    same = "0b8b6a3e-7d43-4c89-9f0a-6c1f7e1d2a11"
    msg = one(BASE.replace("  - name: A\n", f"  - name: A\n    id: {same}\n").replace(
        "  - name: B\n", f"  - name: B\n    id: {same}\n"))
    assert msg.startswith("net.yaml:7: nodes[1].id: duplicate id '0b8b6a3e")


def test_duplicate_sae_id():
    msg = one(BASE + "  - {sae_id: SAE-A, node: B, user: u}\n")
    assert msg.startswith("net.yaml:15: applications[1].sae_id: duplicate SAE ID 'SAE-A'")


def test_duplicate_yaml_key():
    msg = one(BASE.replace("  name: t\n", "  name: t\n  name: u\n", 1))
    assert msg == "net.yaml:3: network.name: duplicate key"


def test_link_to_unknown_node():
    msg = one(BASE.replace("[B, C]", "[B, Z]"))
    assert msg == "net.yaml:9: links[1].ends[1]: unknown node 'Z'"


def test_self_loop():
    msg = one(BASE.replace("[B, C]", "[B, B]"))
    assert msg == "net.yaml:9: links[1].ends: self-loop: both ends are 'B'"


def test_duplicate_link():
    msg = one(BASE.replace("[B, C]", "[B, A]"))
    assert msg == "net.yaml:9: links[1].ends: duplicate link between 'B' and 'A' (already links[0] at line 8)"


def test_application_on_unknown_node():
    msg = one(BASE.replace("node: A", "node: Q"))
    assert msg == "net.yaml:14: applications[0].node: unknown node 'Q'"


def test_application_of_unknown_user():
    msg = one(BASE.replace("user: u}", "user: nobody}"))
    assert msg == "net.yaml:14: applications[0].user: unknown user 'nobody'"


def test_user_without_sla():
    msg = problems(BASE.replace(
        "    sla: {max_priority: 5, max_bps: 1000, max_sessions: 2, bucket_bits: 4096}\n", ""))
    assert msg[0] == "net.yaml:11: users[0]: user 'u' has no 'sla' (every user needs a service-level agreement)"


@pytest.mark.parametrize("old,new,where", [
    ("max_bps: 1000", "max_bps: 0", "users[0].sla.max_bps: must be between 1 and 4294967295 (uint32), got 0"),
    ("max_bps: 1000", "max_bps: -5", "users[0].sla.max_bps: must be between 1 and 4294967295 (uint32), got -5"),
    ("length_km: 20", "length_km: -1", "links[1].length_km: must be greater than 0, got -1.0"),
    ("length_km: 10}", "length_km: 10, device: {model: fixed, skr_bps: 0, qber: 0.01}}",
     "links[0].device.skr_bps: must be greater than 0, got 0.0"),
    ("length_km: 10}", "length_km: 10, device: {clock_rate_hz: -1.0e9}}",
     "links[0].device.clock_rate_hz: must be greater than 0, got -1000000000.0"),
])
def test_negative_or_zero_rates(old, new, where):
    msg = one(BASE.replace(old, new, 1))
    assert msg.startswith("net.yaml:") and msg.split(": ", 1)[1] == where


UINT32_MAX = 2**32 - 1
INT32_MAX = 2**31 - 1
SLA_LINE = "    sla: {max_priority: 5, max_bps: 1000, max_sessions: 2, bucket_bits: 4096}\n"


# Every integer that lands in a bounded database column is checked: SLA values and priorities against the ranges
# the operator REST API enforces, the wavelength against ETSI 015's etsi-qkdn-types:wavelength (1 to 4 digits).
# (key as in the file, text of BASE it goes into, line, smallest, largest, note in the message)
BOUNDED = [
    ("users[0].sla.max_priority", "max_priority: 5", 12, 0, UINT32_MAX, " (uint32)"),
    ("users[0].sla.max_bps", "max_bps: 1000", 12, 1, UINT32_MAX, " (uint32)"),
    ("users[0].sla.max_sessions", "max_sessions: 2", 12, 1, INT32_MAX, ""),
    ("users[0].sla.bucket_bits", "bucket_bits: 4096", 12, 1, UINT32_MAX, " (uint32)"),
    ("applications[0].priority", "user: u}", 14, 0, UINT32_MAX, " (uint32)"),
    ("links[0].wavelength_nm", "length_km: 10}", 8, 1, 9999, ""),
]


def _set(old: str, key: str, value: int) -> str:
    name = key.rsplit(".", 1)[1]
    if old.startswith(name):
        return BASE.replace(old, f"{name}: {value}", 1)
    return BASE.replace(old, f"{old[:-1]}, {name}: {value}}}", 1)


@pytest.mark.parametrize("key,old,line,lo,hi,note", BOUNDED, ids=[b[0] for b in BOUNDED])
def test_integer_bounds(key, old, line, lo, hi, note):
    name = key.rsplit(".", 1)[1]
    for ok in (lo, hi):
        net = parse(_set(old, key, ok), "net.yaml")
        holder = {"users": lambda: net.users[0].sla, "applications": lambda: net.applications[0],
                  "links": lambda: net.links[0]}[key.split("[")[0]]()
        assert getattr(holder, name) == ok
    for bad in (lo - 1, hi + 1):
        assert one(_set(old, key, bad)) == (
            f"net.yaml:{line}: {key}: must be between {lo} and {hi}{note}, got {bad}")


def test_out_of_range_values_are_reported_together():
    text = BASE.replace(SLA_LINE, f"    sla: {{max_priority: {UINT32_MAX + 1}, max_bps: {UINT32_MAX + 1}, "
                                  f"max_sessions: {INT32_MAX + 1}, bucket_bits: {2**64}}}\n").replace(
        "user: u}", f"user: u, priority: {UINT32_MAX + 1}}}")
    assert problems(text) == [
        "net.yaml:12: users[0].sla.max_priority: must be between 0 and 4294967295 (uint32), got 4294967296",
        "net.yaml:12: users[0].sla.max_bps: must be between 1 and 4294967295 (uint32), got 4294967296",
        "net.yaml:12: users[0].sla.max_sessions: must be between 1 and 2147483647, got 2147483648",
        "net.yaml:12: users[0].sla.bucket_bits: must be between 1 and 4294967295 (uint32), "
        "got 18446744073709551616",
        "net.yaml:14: applications[0].priority: must be between 0 and 4294967295 (uint32), got 4294967296",
    ]


def test_largest_values_parse():
    net = parse(BASE.replace(SLA_LINE, f"    sla: {{max_priority: {UINT32_MAX}, max_bps: {UINT32_MAX}, "
                                       f"max_sessions: {INT32_MAX}, bucket_bits: {UINT32_MAX}}}\n"), "net.yaml")
    sla = net.users[0].sla
    assert (sla.max_priority, sla.max_bps, sla.max_sessions, sla.bucket_bits) == (
        UINT32_MAX, UINT32_MAX, INT32_MAX, UINT32_MAX)


@pytest.mark.parametrize("port,ok", [(1, True), (65535, True), (0, False), (65536, False)])
def test_key_manager_port_bounds(port, ok):
    text = BASE.replace("  - name: A\n", f"  - name: A\n    km_address: 127.0.0.1:{port}\n", 1)
    if ok:
        assert parse(text, "net.yaml").node("A").km_port == port
    else:
        assert one(text) == f"net.yaml:5: nodes[0].km_address: '127.0.0.1:{port}' is not HOST:PORT"


def test_twin_base_port_bounds():
    assert parse(BASE + "deployment: {twin_base_port: 64999}\n", "net.yaml").deployment.twin_base_port == 64999
    assert one(BASE + "deployment: {twin_base_port: 65000}\n") == (
        "net.yaml:15: deployment.twin_base_port: must be between 1 and 64999, got 65000")


def chain(links: int, base: int, last_device: str | None = None) -> str:
    """A chain of emulated links N0-N1-...; the last link's device given as YAML flow text."""
    nodes = "".join(f"  - name: N{i}\n" for i in range(links + 1))
    edges = "".join(f"  - {{ends: [N{i}, N{i + 1}], length_km: 10"
                    f"{f', device: {last_device}' if last_device and i == links - 1 else ''}}}\n"
                    for i in range(links))
    return f"network: {{name: t}}\nnodes:\n{nodes}links:\n{edges}deployment: {{twin_base_port: {base}}}\n"


def test_twin_ports_of_every_emulated_link_exist():
    # Link i's emulated KMEs listen on base+2i and base+2i+1: with base 64999, 268 links end at 65534.
    net = parse(chain(268, 64999), "net.yaml")
    assert net.twin_addresses(net.links[-1]) == ("127.0.0.1:65533", "127.0.0.1:65534")
    line = 2 + 270 + 1 + 269 + 1  # the deployment line
    assert one(chain(269, 64999)) == (
        f"net.yaml:{line}: deployment.twin_base_port: links[268] would get port 65536 (twin_base_port 64999 + 537)"
        " for its emulated KME, above 65535: lower twin_base_port or give that device master_address and"
        " slave_address")
    # A device with its own addresses needs no twin port.
    addresses = "{master_address: '127.0.0.1:7000', slave_address: '127.0.0.1:7001'}"
    net = parse(chain(269, 64999, addresses), "net.yaml")
    assert net.twin_addresses(net.links[-1]) == ("127.0.0.1:7000", "127.0.0.1:7001")


# Every text of the file that lands in a length-bounded database column (String(N): VARCHAR(N) on PostgreSQL, which
# refuses a longer value while SQLite stores it) is checked against that column.
# (key, line, text of BASE it replaces, replacement for a value of n characters, characters counted, limit)
NODE_A = "  - name: A\n"
USER_U = "  - name: u\n"
TOKEN_PREFIX = "pbkdf2_sha256$600000$00112233445566778899aabbccddeeff$"
TEXTS = [
    ("nodes[0].location", 5, NODE_A, lambda n: f"{NODE_A}    location: \"{'é' * n}\"\n", ""),
    ("nodes[0].km_address", 5, NODE_A, lambda n: f"{NODE_A}    km_address: \"{'h' * n}:8400\"\n", "host part "),
    ("nodes[0].km_address", 5, NODE_A,
     lambda n: f"{NODE_A}    km_address: \"[{('0:' * n)[:n - 1]}1]:8400\"\n", "host part "),
    ("users[0].token_hash", 12, USER_U,
     lambda n: f"{USER_U}    token_hash: {TOKEN_PREFIX}{'f' * (n - len(TOKEN_PREFIX))}\n", ""),
]


def test_text_limits_are_the_database_columns():
    from db import models as m
    from db.netfile import CREDENTIAL_MAX, KM_HOST_MAX, LINK_NAME_MAX, LOCATION_MAX, NAME_RE

    assert m.Node.__table__.c.location.type.length == LOCATION_MAX == 255
    assert m.Node.__table__.c.km_host.type.length == KM_HOST_MAX == 255
    assert m.Credential.__table__.c.value.type.length == CREDENTIAL_MAX == 255
    assert m.Link.__table__.c.name.type.length == LINK_NAME_MAX == 128
    # Names (at most 64 by NAME_RE) and ids (canonical UUIDs) fit their columns by their own rules.
    assert NAME_RE.match("x" * 64) and not NAME_RE.match("x" * 65)
    for column in (m.NetworkMeta.name, m.Node.name, m.User.name, m.Application.sae_id, m.Interface.att_device):
        assert column.type.length >= 64
    for column in (m.Node.qkdn_id, m.Link.qkdl_id, m.Application.app_id):
        assert column.type.length == 36


@pytest.mark.parametrize("key,line,old,new,what", TEXTS, ids=["location", "km_host", "km_host_ipv6", "token_hash"])
def test_text_bounds(key, line, old, new, what):
    net = parse(BASE.replace(old, new(255), 1), "net.yaml")
    if key == "nodes[0].location":
        assert net.node("A").location == "é" * 255
    elif key == "nodes[0].km_address":
        assert len(net.node("A").km_host) == 255 and net.node("A").km_port == 8400
    else:
        assert len(net.users[0].token_hash) == 255
    assert one(BASE.replace(old, new(256), 1)) == (
        f"net.yaml:{line}: {key}: {what}must be at most 255 characters, got 256")


def long_names(a: int, b: int, link: str = "{ends: [%s, %s], length_km: 10}") -> str:
    na, nb = "A" * a, "B" * b
    return f"network: {{name: t}}\nnodes:\n  - name: {na}\n  - name: {nb}\nlinks:\n  - {link % (na, nb)}\n"


def test_default_link_name_bound():
    # Two node names of at most 64 characters: their MASTER-SLAVE name can reach 129, links.name holds 128.
    net = parse(long_names(64, 63), "net.yaml")
    assert net.links[0].name == "A" * 64 + "-" + "B" * 63
    assert one(long_names(64, 64)) == (
        "net.yaml:6: links[0]: the default name MASTER-SLAVE would have 129 characters, more than the 128 a link"
        " name may have: give the link an explicit 'name' (or use shorter node names)")
    net = parse(long_names(64, 64, "{name: AB, ends: [%s, %s], length_km: 10}"), "net.yaml")
    assert net.links[0].name == "AB"


def test_too_long_texts_are_reported_together():
    text = long_names(64, 64).replace("  - name: BBBB", "  - location: " + "x" * 256 + "\n    name: BBBB").replace(
        "  - name: AAAA", "  - km_address: " + "h" * 300 + ":1\n    name: AAAA") + (
        "users:\n  - name: u\n    token_hash: " + TOKEN_PREFIX + "0" * 300 + "\n"
        "    sla: {max_priority: 5, max_bps: 1000, max_sessions: 2, bucket_bits: 4096}\n")
    assert problems(text) == [
        "net.yaml:3: nodes[0].km_address: host part must be at most 255 characters, got 300",
        "net.yaml:5: nodes[1].location: must be at most 255 characters, got 256",
        "net.yaml:8: links[0]: the default name MASTER-SLAVE would have 129 characters, more than the 128 a link"
        " name may have: give the link an explicit 'name' (or use shorter node names)",
        "net.yaml:11: users[0].token_hash: must be at most 255 characters, got 354",
    ]


def test_fixed_model_needs_rate_and_qber():
    found = problems(BASE.replace("length_km: 10}", "length_km: 10, device: {model: fixed}}"))
    assert found == ["net.yaml:8: links[0].device: missing required key 'skr_bps'",
                     "net.yaml:8: links[0].device: missing required key 'qber'"]


def test_token_in_clear_is_refused():
    msg = one(BASE.replace("  - name: u\n", "  - name: u\n    token_hash: hunter2\n"))
    assert "users[0].token_hash" in msg and "never a clear token" in msg and "hunter2" not in msg.split(":", 3)[-1]


def test_every_problem_is_reported_at_once():
    found = problems(BASE.replace("[B, C]", "[B, Z]").replace("node: A", "node: Q"))
    assert len(found) == 2
    assert [p.split(":")[1] for p in found] == ["9", "14"]


def test_unreadable_file(tmp_path):
    with pytest.raises(NetworkFileError, match="cannot read"):
        load(tmp_path / "missing.yaml")
