"""The network file: one YAML document that describes a QKD network.

It is parsed into frozen dataclasses (``Network`` and friends) that the rest of
the project reads: the database bootstrap, the PKI, the digital twin and the
processes that ``qkdsdn`` starts. Every error names the file, the line and the
key (``paper-poc.yaml:14: links[2].ends[1]: unknown node 'KM9'``), and all
errors of a file are reported together. The format is documented in
``docs/network-file.md``.
"""
from __future__ import annotations

import math
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

# Fixed namespace so that ids derived from names are stable across runs and hosts.
QKDSDN_NAMESPACE = uuid.UUID("6f1d3b0e-5a7c-4e8e-9a52-2f7d0c1b9e11")

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
HOSTPORT_RE = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(?P<port>[0-9]{1,5})$")


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class SLA:
    max_priority: int
    max_bps: int
    max_sessions: int
    bucket_bits: int
    # None: every destination node is allowed.
    allowed_destinations: tuple[str, ...] | None = None


@dataclass(frozen=True)
class User:
    name: str
    sla: SLA
    # Salted hash of a development token ("pbkdf2_sha256$iterations$salt_hex$hash_hex").
    token_hash: str | None = None
    revoked: bool = False


@dataclass(frozen=True)
class Application:
    sae_id: str
    node: str
    user: str
    app_id: str
    priority: int = 0
    # SHA-256 fingerprint (hex, lower case) of the application's client certificate.
    cert_sha256: str | None = None


@dataclass(frozen=True)
class Node:
    name: str
    qkdn_id: str
    km_host: str
    km_port: int
    location: str | None = None

    @property
    def km_address(self) -> str:
        return f"{self.km_host}:{self.km_port}"


@dataclass(frozen=True)
class Device:
    """An emulated QKD device pair (digital twin) on one link."""

    model: str = "decoy-bb84"  # or "fixed"
    # fixed model
    skr_bps: float | None = None
    qber: float | None = None
    # decoy-state BB84 model
    insertion_loss_db: float = 1.0
    detector_efficiency: float = 0.2
    dark_count_prob: float = 1e-6
    misalignment_error: float = 0.01
    clock_rate_hz: float = 1e9
    ec_efficiency: float = 1.16
    mu: float = 0.5
    nu: float = 0.1
    # key delivery
    buffer_bits: int = 1 << 26
    key_size_bits: int = 256
    min_key_size_bits: int = 64
    max_key_size_bits: int = 8192
    max_keys_per_request: int = 1024
    seed: int | None = None
    # ETSI 014 servers of the two link ends (master KME, slave KME)
    master_address: str | None = None
    slave_address: str | None = None


@dataclass(frozen=True)
class KMEEndpoint:
    """One end of a real QKD device, reached over ETSI GS QKD 014."""

    url: str
    sae_id: str | None = None
    cert: str | None = None
    key: str | None = None
    ca: str | None = None


@dataclass(frozen=True)
class KME:
    master: KMEEndpoint
    slave: KMEEndpoint


@dataclass(frozen=True)
class Link:
    name: str
    qkdl_id: str
    master: str  # node whose key manager pulls enc_keys
    slave: str  # node whose key manager pulls dec_keys
    length_km: float
    attenuation_db_km: float = 0.2
    wavelength_nm: int = 1550
    device: Device | None = None
    kme: KME | None = None

    @property
    def ends(self) -> tuple[str, str]:
        return (self.master, self.slave)

    @property
    def channel_att_db(self) -> float:
        """Total channel attenuation: fibre plus the device's insertion loss."""
        extra = self.device.insertion_loss_db if self.device else 0.0
        return self.length_km * self.attenuation_db_km + extra


@dataclass(frozen=True)
class Deployment:
    controller_host: str = "127.0.0.1"
    controller_port: int = 8080
    bus: str = "embedded"
    twin_host: str = "127.0.0.1"
    twin_base_port: int = 9100


@dataclass(frozen=True)
class Network:
    name: str
    description: str | None
    nodes: tuple[Node, ...]
    links: tuple[Link, ...]
    users: tuple[User, ...]
    applications: tuple[Application, ...]
    deployment: Deployment = field(default_factory=Deployment)
    source: str | None = None

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def link(self, name: str) -> Link:
        for link in self.links:
            if link.name == name:
                return link
        raise KeyError(name)

    def links_of(self, node: str) -> list[Link]:
        return [link for link in self.links if node in link.ends]

    def interface_id(self, node: str, link: str) -> int:
        """qkdi_id of a node's interface on a physical link: 1, 2, ... in file order."""
        for i, candidate in enumerate(self.links_of(node), start=1):
            if candidate.name == link:
                return i
        raise KeyError((node, link))

    def twin_addresses(self, link: Link) -> tuple[str, str]:
        """ETSI 014 addresses (host:port) of the emulated master and slave KMEs of a link."""
        index = self.links.index(link)
        d = self.deployment
        default_master = f"{d.twin_host}:{d.twin_base_port + 2 * index}"
        default_slave = f"{d.twin_host}:{d.twin_base_port + 2 * index + 1}"
        dev = link.device or Device()
        return (dev.master_address or default_master, dev.slave_address or default_slave)


def derived_uuid(network: str, kind: str, name: str) -> str:
    """Stable UUID for an object that the file names but gives no id."""
    return str(uuid.uuid5(QKDSDN_NAMESPACE, f"{network}/{kind}/{name}"))


# --------------------------------------------------------------------------- errors


@dataclass(frozen=True)
class Problem:
    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class NetworkFileError(Exception):
    """A network file that cannot be used; ``problems`` lists every reason."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


# --------------------------------------------------------------------------- YAML with lines


class _Doc:
    """Plain Python values from YAML, plus the line of every path."""

    def __init__(self, file: str):
        self.file = file
        self.lines: dict[tuple, int] = {}
        self.problems: list[Problem] = []

    def build(self, node: yaml.Node, path: tuple) -> Any:
        self.lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
                if not isinstance(key, str) or key_node.tag != "tag:yaml.org,2002:str":
                    self.error(path, f"mapping key {key_node.value!r} is not a string",
                               line=key_node.start_mark.line + 1)
                    continue
                if key in out:
                    self.error(path + (key,), "duplicate key", line=key_node.start_mark.line + 1)
                    continue
                out[key] = self.build(value_node, path + (key,))
                # The key's own line is the one an operator looks for.
                self.lines[path + (key,)] = key_node.start_mark.line + 1
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, path + (i,)) for i, item in enumerate(node.value)]
        return _SAFE.construct_object(node, deep=True)

    def line(self, path: tuple) -> int | None:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get(())

    def error(self, path: tuple, message: str, line: int | None = None) -> None:
        self.problems.append(Problem(self.file, line or self.line(path), fmt_path(path), message))


class _Loader(yaml.SafeLoader):
    """Safe YAML, plus YAML 1.2 exponent floats: PyYAML reads 2.5e9 as a string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)?(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789."))

_SAFE = _Loader("")


def fmt_path(path: tuple) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


# --------------------------------------------------------------------------- field checks

_MISSING = object()


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string",
            list: "list", dict: "mapping"}.get(type(value), type(value).__name__)


class _Section:
    """Checks one mapping against its allowed keys; reads typed fields from it."""

    def __init__(self, doc: _Doc, data: Any, path: tuple, allowed: set[str], what: str):
        self.doc, self.path, self.ok = doc, path, True
        if not isinstance(data, dict):
            doc.error(path, f"expected a mapping ({what}), got {_type_name(data)}")
            self.data, self.ok = {}, False
            return
        self.data = data
        for key in data:
            if key not in allowed:
                doc.error(path + (key,), f"unknown key '{key}' in {what} "
                          f"(allowed: {', '.join(sorted(allowed))})")
                self.ok = False

    def get(self, key: str, kind: str, required: bool = False, default: Any = None,
            check: Callable[[Any], str | None] | None = None) -> Any:
        value = self.data.get(key, _MISSING)
        if value is _MISSING:
            if required:
                self.doc.error(self.path, f"missing required key '{key}'")
                self.ok = False
            return default
        converted = _convert(value, kind)
        if converted is _MISSING:
            self.doc.error(self.path + (key,), f"expected {kind}, got {_type_name(value)} {value!r}")
            self.ok = False
            return default
        if check is not None:
            msg = check(converted)
            if msg:
                self.doc.error(self.path + (key,), msg)
                self.ok = False
                return default
        return converted


def _convert(value: Any, kind: str) -> Any:
    if kind == "string":
        return value if isinstance(value, str) and value != "" else _MISSING
    if kind == "integer":
        return value if isinstance(value, int) and not isinstance(value, bool) else _MISSING
    if kind == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return _MISSING
        return float(value) if math.isfinite(value) else _MISSING
    if kind == "boolean":
        return value if isinstance(value, bool) else _MISSING
    if kind == "list of strings":
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        return _MISSING
    raise AssertionError(kind)


def positive(v: float) -> str | None:
    return None if v > 0 else f"must be greater than 0, got {v}"


def non_negative(v: float) -> str | None:
    return None if v >= 0 else f"must not be negative, got {v}"


def probability(v: float) -> str | None:
    return None if 0 <= v <= 1 else f"must be between 0 and 1, got {v}"


def fraction_open(v: float) -> str | None:
    return None if 0 < v <= 1 else f"must be greater than 0 and at most 1, got {v}"


def below_half(v: float) -> str | None:
    return None if 0 <= v < 0.5 else f"must be between 0 and 0.5, got {v}"


# Integers the databases hold in bounded columns (db/models.py), with the ranges the operator REST API
# (controller/rest.py) enforces: ETSI uint32 values in BIGINT columns, max_sessions in an INTEGER column.
UINT32_MAX = 2**32 - 1
INT32_MAX = 2**31 - 1
PORT_MAX = 65535
# etsi-qkdn-types:wavelength is a string of at most four digits, no leading zero (ETSI GS QKD 015).
WAVELENGTH_MAX = 9999


def int_range(lo: int, hi: int, note: str = "") -> Callable[[int], str | None]:
    def check(v: int) -> str | None:
        return None if lo <= v <= hi else f"must be between {lo} and {hi}{note}, got {v}"
    return check


uint32 = int_range(0, UINT32_MAX, " (uint32)")
positive_uint32 = int_range(1, UINT32_MAX, " (uint32)")
positive_int32 = int_range(1, INT32_MAX)
wavelength_check = int_range(1, WAVELENGTH_MAX)


# Texts the databases hold in length-bounded columns (db/models.py: String(N) is VARCHAR(N) on PostgreSQL, which
# refuses a longer value, while SQLite stores it): the file's limits, in characters, that keep every backend alike.
# Names (NAME_RE, at most 64) and ids (UUIDs, 36) fit their columns by their own rules; description and the
# device/kme details are unbounded (TEXT, JSON).
LOCATION_MAX = 255  # nodes.location
KM_HOST_MAX = 255  # nodes.km_host
CREDENTIAL_MAX = 255  # credentials.value (users[].token_hash; a cert_sha256 is 64 hex digits)
LINK_NAME_MAX = 128  # links.name, which the default MASTER-SLAVE name can exceed


def max_length(limit: int) -> Callable[[str], str | None]:
    def check(v: str) -> str | None:
        return None if len(v) <= limit else f"must be at most {limit} characters, got {len(v)}"
    return check


def all_of(*checks: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    """The first problem of several checks, in order."""
    def check(v: Any) -> str | None:
        for c in checks:
            msg = c(v)
            if msg:
                return msg
        return None
    return check


def name_check(v: str) -> str | None:
    return None if NAME_RE.match(v) else (
        f"'{v}' is not a valid name (letters, digits, '_', '.', ':', '-'; at most 64)")


def uuid_check(v: str) -> str | None:
    try:
        return None if str(uuid.UUID(v)) == v.lower() else f"'{v}' is not a UUID"
    except ValueError:
        return f"'{v}' is not a UUID"


def hostport_check(v: str) -> str | None:
    m = HOSTPORT_RE.match(v)
    if not m or not 0 < int(m.group("port")) < 65536:
        return f"'{v}' is not HOST:PORT"
    return None


def km_address_check(v: str) -> str | None:
    """HOST:PORT whose host (without IPv6 brackets, as stored) fits nodes.km_host."""
    msg = hostport_check(v)
    if msg:
        return msg
    host = split_hostport(v)[0]
    if len(host) > KM_HOST_MAX:
        return f"host part must be at most {KM_HOST_MAX} characters, got {len(host)}"
    return None


def multiple_of_8(v: int) -> str | None:
    return None if v > 0 and v % 8 == 0 else f"must be a positive multiple of 8, got {v}"


def sha256_check(v: str) -> str | None:
    return None if SHA256_RE.match(v.lower().replace(":", "")) else (
        f"'{v}' is not a SHA-256 fingerprint (64 hex digits)")


def token_hash_check(v: str) -> str | None:
    parts = v.split("$")
    if len(parts) == 4 and parts[0] == "pbkdf2_sha256" and parts[1].isdigit():
        return None
    return "expected 'pbkdf2_sha256$ITERATIONS$SALT$HASH' (see 'qkdsdn db hash-token'); never a clear token"


def split_hostport(v: str) -> tuple[str, int]:
    m = HOSTPORT_RE.match(v)
    assert m
    return m.group("host").strip("[]"), int(m.group("port"))


# --------------------------------------------------------------------------- sections

TOP_KEYS = {"network", "nodes", "links", "users", "applications", "deployment"}
NETWORK_KEYS = {"name", "description"}
NODE_KEYS = {"name", "id", "location", "km_address"}
LINK_KEYS = {"name", "id", "ends", "length_km", "attenuation_db_km", "wavelength_nm", "device", "kme"}
DEVICE_FLOAT = {
    "insertion_loss_db": non_negative,
    "detector_efficiency": fraction_open,
    "dark_count_prob": probability,
    "misalignment_error": below_half,
    "clock_rate_hz": positive,
    "ec_efficiency": lambda v: None if v >= 1 else f"must be at least 1, got {v}",
    "mu": positive,
    "nu": positive,
}
DEVICE_INT = {
    "buffer_bits": multiple_of_8,
    "key_size_bits": multiple_of_8,
    "min_key_size_bits": multiple_of_8,
    "max_key_size_bits": multiple_of_8,
    "max_keys_per_request": positive,
}
DEVICE_KEYS = {"model", "skr_bps", "qber", "seed", "master_address", "slave_address"} | set(
    DEVICE_FLOAT) | set(DEVICE_INT)
KME_KEYS = {"master", "slave"}
KME_END_KEYS = {"url", "sae_id", "cert", "key", "ca"}
USER_KEYS = {"name", "sla", "token_hash", "revoked"}
SLA_KEYS = {"max_priority", "max_bps", "max_sessions", "bucket_bits", "allowed_destinations"}
APP_KEYS = {"sae_id", "node", "user", "id", "priority", "cert_sha256"}
DEPLOYMENT_KEYS = {"controller", "bus", "twin_host", "twin_base_port"}


def _list(doc: _Doc, top: dict, key: str, required: bool) -> list:
    value = top.get(key, _MISSING)
    if value is _MISSING:
        if required:
            doc.error((), f"missing required key '{key}'")
        return []
    if value is None:
        return []
    if not isinstance(value, list):
        doc.error((key,), f"expected a list, got {_type_name(value)}")
        return []
    return value


def _device(doc: _Doc, data: Any, path: tuple) -> Device | None:
    s = _Section(doc, data, path, DEVICE_KEYS, "device")
    if not s.ok and not s.data:
        return None
    model = s.get("model", "string", default="decoy-bb84",
                  check=lambda v: None if v in ("decoy-bb84", "fixed")
                  else f"unknown model '{v}' (expected 'decoy-bb84' or 'fixed')")
    kw: dict[str, Any] = {"model": model}
    for key, check in DEVICE_FLOAT.items():
        v = s.get(key, "number", check=check)
        if v is not None:
            kw[key] = v
    for key, check in DEVICE_INT.items():
        v = s.get(key, "integer", check=check)
        if v is not None:
            kw[key] = v
    kw["skr_bps"] = s.get("skr_bps", "number", required=(model == "fixed"), check=positive)
    kw["qber"] = s.get("qber", "number", required=(model == "fixed"), check=below_half)
    kw["seed"] = s.get("seed", "integer", check=non_negative)
    kw["master_address"] = s.get("master_address", "string", check=hostport_check)
    kw["slave_address"] = s.get("slave_address", "string", check=hostport_check)
    if model != "fixed":
        for key in ("skr_bps", "qber"):
            if key in s.data:
                doc.error(path + (key,), f"'{key}' applies to model 'fixed' only")
    if s.ok:
        dev = Device(**kw)
        if dev.nu >= dev.mu:
            doc.error(path + ("nu",), f"decoy intensity nu ({dev.nu}) must be below signal mu ({dev.mu})")
        if not dev.min_key_size_bits <= dev.key_size_bits <= dev.max_key_size_bits:
            doc.error(path + ("key_size_bits",),
                      "must lie between min_key_size_bits and max_key_size_bits")
        return dev
    return None


def _kme(doc: _Doc, data: Any, path: tuple) -> KME | None:
    s = _Section(doc, data, path, KME_KEYS, "kme")
    ends = []
    for role in ("master", "slave"):
        if role not in s.data:
            doc.error(path, f"missing required key '{role}'")
            continue
        e = _Section(doc, s.data[role], path + (role,), KME_END_KEYS, f"kme.{role}")
        url = e.get("url", "string", required=True,
                    check=lambda v: None if re.match(r"^https?://", v) else f"'{v}' is not an http(s) URL")
        ends.append(KMEEndpoint(url=url, sae_id=e.get("sae_id", "string"), cert=e.get("cert", "string"),
                                key=e.get("key", "string"), ca=e.get("ca", "string")))
    return KME(*ends) if len(ends) == 2 and s.ok else None


def parse(text: str, file: str = "<network>") -> Network:
    """Parse and check a network file's text. Raises NetworkFileError."""
    doc = _Doc(file)
    try:
        root = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        raise NetworkFileError([Problem(file, line, "", f"malformed YAML: {exc.problem or exc}")]) from None
    except yaml.YAMLError as exc:
        raise NetworkFileError([Problem(file, None, "", f"malformed YAML: {exc}")]) from None
    if root is None:
        raise NetworkFileError([Problem(file, 1, "", "the file is empty")])
    try:
        data = doc.build(root, ())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise NetworkFileError([Problem(file, mark.line + 1 if mark else None, "",
                                        f"malformed YAML: {exc}")]) from None
    if doc.problems:
        raise NetworkFileError(doc.problems)
    top = _Section(doc, data, (), TOP_KEYS, "network file")
    if not isinstance(data, dict):
        raise NetworkFileError(doc.problems)

    net = _Section(doc, top.data.get("network", _MISSING) if "network" in data else {}, ("network",),
                   NETWORK_KEYS, "network")
    if "network" not in data:
        doc.error((), "missing required key 'network'")
    net_name = net.get("name", "string", required="network" in data, default="network", check=name_check)
    description = net.get("description", "string")

    # nodes
    nodes: list[Node] = []
    node_seen: dict[str, tuple] = {}
    ids_seen: dict[str, tuple] = {}
    addr_seen: dict[str, tuple] = {}
    for i, item in enumerate(_list(doc, data, "nodes", required=True)):
        p = ("nodes", i)
        s = _Section(doc, item, p, NODE_KEYS, "node")
        name = s.get("name", "string", required=True, check=name_check)
        qkdn_id = s.get("id", "string", check=uuid_check)
        location = s.get("location", "string", check=max_length(LOCATION_MAX))
        addr = s.get("km_address", "string", default=f"127.0.0.1:{8400 + i}", check=km_address_check)
        if name is None:
            continue
        _unique(doc, node_seen, name, p + ("name",), "node name")
        qkdn_id = _object_id(doc, ids_seen, qkdn_id, net_name, "node", name, p + ("id",))
        _unique(doc, addr_seen, addr, p + ("km_address",), "key-manager address")
        host, port = split_hostport(addr)
        nodes.append(Node(name=name, qkdn_id=qkdn_id, km_host=host, km_port=port, location=location))
    if "nodes" in data and not nodes and not doc.problems:
        doc.error(("nodes",), "a network needs at least one node")

    # links
    links: list[Link] = []
    link_paths: list[tuple] = []
    link_names: dict[str, tuple] = {}
    pairs: dict[frozenset, tuple] = {}
    for i, item in enumerate(_list(doc, data, "links", required=False)):
        p = ("links", i)
        s = _Section(doc, item, p, LINK_KEYS, "link")
        ends = s.get("ends", "list of strings", required=True)
        name = s.get("name", "string", check=name_check)
        qkdl_id = s.get("id", "string", check=uuid_check)
        length = s.get("length_km", "number", required=True, check=positive)
        att = s.get("attenuation_db_km", "number", default=0.2, check=positive)
        wl = s.get("wavelength_nm", "integer", default=1550, check=wavelength_check)
        device = kme = None
        if "device" in s.data:
            device = _device(doc, s.data["device"], p + ("device",))
        if "kme" in s.data:
            kme = _kme(doc, s.data["kme"], p + ("kme",))
            if "device" in s.data:
                doc.error(p + ("kme",), "a link has either an emulated 'device' or a real 'kme', not both")
        elif "device" not in s.data:
            device = Device()
        if ends is None:
            continue
        if len(ends) != 2:
            doc.error(p + ("ends",), f"expected two node names [master, slave], got {len(ends)}")
            continue
        bad = False
        for j, end in enumerate(ends):
            if end not in node_seen:
                doc.error(p + ("ends", j), f"unknown node '{end}'")
                bad = True
        if ends[0] == ends[1]:
            doc.error(p + ("ends",), f"self-loop: both ends are '{ends[0]}'")
            bad = True
        if bad:
            continue
        pair = frozenset(ends)
        if pair in pairs:
            doc.error(p + ("ends",), f"duplicate link between '{ends[0]}' and '{ends[1]}' "
                      f"(already {fmt_path(pairs[pair])} at line {doc.line(pairs[pair])})")
            continue
        pairs[pair] = p
        if name is None:
            name = f"{ends[0]}-{ends[1]}"
            # Given names follow NAME_RE (at most 64); the default joins two of them and can exceed links.name.
            if "name" not in s.data and len(name) > LINK_NAME_MAX:
                doc.error(p, f"the default name MASTER-SLAVE would have {len(name)} characters, more than the "
                          f"{LINK_NAME_MAX} a link name may have: give the link an explicit 'name' "
                          "(or use shorter node names)")
        _unique(doc, link_names, name, p + ("name",), "link name")
        qkdl_id = _object_id(doc, ids_seen, qkdl_id, net_name, "link", name, p + ("id",))
        if length is None or not s.ok:
            continue
        links.append(Link(name=name, qkdl_id=qkdl_id, master=ends[0], slave=ends[1], length_km=length,
                          attenuation_db_km=att, wavelength_nm=wl, device=device, kme=kme))
        link_paths.append(p)

    # users
    users: list[User] = []
    user_seen: dict[str, tuple] = {}
    for i, item in enumerate(_list(doc, data, "users", required=False)):
        p = ("users", i)
        s = _Section(doc, item, p, USER_KEYS, "user")
        name = s.get("name", "string", required=True, check=name_check)
        token_hash = s.get("token_hash", "string", check=all_of(token_hash_check, max_length(CREDENTIAL_MAX)))
        revoked = s.get("revoked", "boolean", default=False)
        sla = None
        if "sla" not in s.data:
            doc.error(p, f"user '{name}' has no 'sla' (every user needs a service-level agreement)")
        else:
            sla = _sla(doc, s.data["sla"], p + ("sla",), node_seen)
        if name is None:
            continue
        _unique(doc, user_seen, name, p + ("name",), "user name")
        if sla is not None and s.ok:
            users.append(User(name=name, sla=sla, token_hash=token_hash, revoked=revoked))

    # applications
    apps: list[Application] = []
    sae_seen: dict[str, tuple] = {}
    for i, item in enumerate(_list(doc, data, "applications", required=False)):
        p = ("applications", i)
        s = _Section(doc, item, p, APP_KEYS, "application")
        sae_id = s.get("sae_id", "string", required=True, check=name_check)
        node = s.get("node", "string", required=True)
        user = s.get("user", "string", required=True)
        app_id = s.get("id", "string", check=uuid_check)
        priority = s.get("priority", "integer", default=0, check=uint32)
        cert = s.get("cert_sha256", "string", check=sha256_check)
        if node is not None and node not in node_seen:
            doc.error(p + ("node",), f"unknown node '{node}'")
        if user is not None and user not in user_seen:
            doc.error(p + ("user",), f"unknown user '{user}'")
        if sae_id is None:
            continue
        _unique(doc, sae_seen, sae_id, p + ("sae_id",), "SAE ID")
        app_id = _object_id(doc, ids_seen, app_id, net_name, "application", sae_id, p + ("id",))
        if s.ok and node and user:
            apps.append(Application(sae_id=sae_id, node=node, user=user, app_id=app_id, priority=priority,
                                    cert_sha256=cert.lower().replace(":", "") if cert else None))

    deployment = Deployment()
    if "deployment" in data:
        s = _Section(doc, data["deployment"], ("deployment",), DEPLOYMENT_KEYS, "deployment")
        ctl = s.get("controller", "string", default="127.0.0.1:8080", check=hostport_check)
        bus = s.get("bus", "string", default="embedded",
                    check=lambda v: None if v == "embedded" or re.match(r"^mqtts?://", v)
                    else f"'{v}' is neither 'embedded' nor an mqtt:// or mqtts:// URL")
        twin_host = s.get("twin_host", "string", default="127.0.0.1")
        twin_port = s.get("twin_base_port", "integer", default=9100, check=int_range(1, 64999))
        ch, cp = split_hostport(ctl)
        deployment = Deployment(controller_host=ch, controller_port=cp, bus=bus,
                                twin_host=twin_host, twin_base_port=twin_port)
    _check_twin_ports(doc, links, link_paths, deployment, "deployment" in data)

    if doc.problems:
        raise NetworkFileError(sorted(doc.problems, key=lambda pr: (pr.line or 0)))
    return Network(name=net_name, description=description, nodes=tuple(nodes), links=tuple(links),
                   users=tuple(users), applications=tuple(apps), deployment=deployment, source=file)


def _sla(doc: _Doc, data: Any, path: tuple, nodes: dict[str, tuple]) -> SLA | None:
    s = _Section(doc, data, path, SLA_KEYS, "sla")
    max_priority = s.get("max_priority", "integer", required=True, check=uint32)
    max_bps = s.get("max_bps", "integer", required=True, check=positive_uint32)
    max_sessions = s.get("max_sessions", "integer", required=True, check=positive_int32)
    bucket = s.get("bucket_bits", "integer", required=True, check=positive_uint32)
    allowed = s.get("allowed_destinations", "list of strings")
    if allowed is not None:
        for j, dest in enumerate(allowed):
            if dest not in nodes:
                doc.error(path + ("allowed_destinations", j), f"unknown node '{dest}'")
    if not s.ok or None in (max_priority, max_bps, max_sessions, bucket):
        return None
    return SLA(max_priority=max_priority, max_bps=max_bps, max_sessions=max_sessions, bucket_bits=bucket,
               allowed_destinations=tuple(allowed) if allowed is not None else None)


def _check_twin_ports(doc: _Doc, links: list[Link], paths: list[tuple], deployment: Deployment,
                      explicit: bool) -> None:
    """An emulated link without its own KME addresses gets ports base+2i and base+2i+1: all must exist."""
    base = deployment.twin_base_port
    for i, (link, path) in enumerate(zip(links, paths)):
        if link.device is None:
            continue
        needed = [base + 2 * i + k for k, addr in enumerate((link.device.master_address,
                                                              link.device.slave_address)) if addr is None]
        if needed and needed[-1] > PORT_MAX:
            where = ("deployment", "twin_base_port") if explicit else path
            doc.error(where, f"{fmt_path(path)} would get port {needed[-1]} (twin_base_port {base} + "
                      f"{needed[-1] - base}) for its emulated KME, above {PORT_MAX}: lower twin_base_port "
                      "or give that device master_address and slave_address")
            return


def _unique(doc: _Doc, seen: dict[str, tuple], value: str, path: tuple, what: str) -> None:
    if value in seen:
        first = seen[value]
        doc.error(path, f"duplicate {what} '{value}' (first used at {fmt_path(first)}, line {doc.line(first)})")
    else:
        seen[value] = path


def _object_id(doc: _Doc, seen: dict[str, tuple], given: str | None, network: str, kind: str, name: str,
               path: tuple) -> str:
    """The file's id for an object, else one derived from its name; ids the file gives must be unique."""
    if given is None:
        derived = derived_uuid(network, kind, name)
        seen.setdefault(derived, path)
        return derived
    _unique(doc, seen, given.lower(), path, "id")
    return given.lower()


def load(path: str | Path) -> Network:
    """Read and parse a network file from disk."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise NetworkFileError([Problem(str(p), None, "", f"cannot read: {exc.strerror}")]) from None
    except UnicodeDecodeError as exc:
        raise NetworkFileError([Problem(str(p), None, "", f"not UTF-8 text: {exc.reason}")]) from None
    return parse(text, str(p))
