"""The network's public-key infrastructure: one private CA and a certificate per party.

Every HTTP interface of qkdsdn is TLS with client certificates, so every party needs a
certificate from the network's CA:

=============  ==============================  ======================  ============================
kind           files (under the PKI folder)    extended key usage      identity in the certificate
=============  ==============================  ======================  ============================
CA             ca.pem, ca.key                  (CA:TRUE, pathlen 0)    CN "qkdsdn CA <network>"
controller     controller.pem/.key             serverAuth, clientAuth  URI urn:qkdsdn:controller
operator       operator.pem/.key               clientAuth              URI urn:qkdsdn:operator
key manager    nodes/<node>.pem/.key           serverAuth, clientAuth  CN node, URI urn:qkdsdn:node:<qkdn_id>
application    apps/<sae_id>.pem/.key          clientAuth              CN SAE ID, URI urn:etsi:qkd:sae:<sae_id>
twin KME       devices/<link>-<role>.pem/.key  serverAuth              URI urn:qkdsdn:device:<link>:<role>
=============  ==============================  ======================  ============================

``init_pki`` is idempotent: an existing key is never replaced, an existing certificate is
kept, and only what is missing is issued. ``pki.json`` maps every party to its files and
the SHA-256 fingerprint of its certificate; the user-profile database identifies
applications by that fingerprint.

Also here: the salted PBKDF2 token hashes that the network file stores for development
tokens (``hash_token`` / ``verify_token``).
"""
from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import hmac
import ipaddress
import json
import os
import re
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, ed448, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

if TYPE_CHECKING:  # db.netfile is only needed for type names
    from db.netfile import Network

SAE_URI_PREFIX = "urn:etsi:qkd:sae:"
NODE_URI_PREFIX = "urn:qkdsdn:node:"
DEVICE_URI_PREFIX = "urn:qkdsdn:device:"
CONTROLLER_URI = "urn:qkdsdn:controller"
OPERATOR_URI = "urn:qkdsdn:operator"

MANIFEST_NAME = "pki.json"
MANIFEST_VERSION = 1
KEY_TYPES = ("ec", "rsa")
DEVICE_ROLES = ("master", "slave")
RSA_BITS = 3072  # NIST SP 800-57: 128-bit security, same as P-256
CA_MIN_DAYS = 3650  # the CA outlives the leaves it signs, so leaves can be renewed under it
CLOCK_SKEW = dt.timedelta(minutes=5)  # peers with a slightly slow clock still accept new certs
CN_MAX = 64  # RFC 5280 ub-common-name

TOKEN_ITERATIONS = 600_000  # OWASP 2023 recommendation for PBKDF2-HMAC-SHA256
_DNS_RE = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
                     r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey


class PkiError(ValueError):
    """A PKI folder or request that cannot be used as is; the message says what to do."""


# --------------------------------------------------------------------------- layout


class PkiLayout:
    """Where every file of a PKI folder lives (paths only; nothing is read or written)."""

    def __init__(self, out_dir: str | os.PathLike[str]):
        self.out_dir = Path(out_dir)

    def __repr__(self) -> str:
        return f"PkiLayout({str(self.out_dir)!r})"

    @property
    def ca_cert(self) -> Path:
        return self.out_dir / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.out_dir / "ca.key"

    @property
    def manifest(self) -> Path:
        return self.out_dir / MANIFEST_NAME

    def controller(self) -> tuple[Path, Path]:
        return self._pair(self.out_dir, "controller")

    def operator(self) -> tuple[Path, Path]:
        return self._pair(self.out_dir, "operator")

    def node(self, name: str) -> tuple[Path, Path]:
        return self._pair(self.out_dir / "nodes", name)

    def app(self, sae_id: str) -> tuple[Path, Path]:
        return self._pair(self.out_dir / "apps", sae_id)

    def device(self, link: str, role: str) -> tuple[Path, Path]:
        if role not in DEVICE_ROLES:
            raise ValueError(f"device role must be 'master' or 'slave', got {role!r}")
        return self._pair(self.out_dir / "devices", f"{link}-{role}")

    def fingerprint(self, cert_path: str | os.PathLike[str]) -> str:
        """SHA-256 fingerprint of a certificate file; relative paths are taken from the folder."""
        path = Path(cert_path)
        return fingerprint(path if path.is_absolute() else self.out_dir / path)

    @staticmethod
    def _pair(folder: Path, stem: str) -> tuple[Path, Path]:
        # Names come from the network file (no '/'), but a path separator here would
        # write outside the folder, so refuse it outright.
        if not stem or "/" in stem or "\\" in stem or stem in (".", ".."):
            raise ValueError(f"not a usable file name: {stem!r}")
        return folder / f"{stem}.pem", folder / f"{stem}.key"


# --------------------------------------------------------------------------- certificate helpers


def certificate_fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 over the DER encoding, lower-case hex without separators."""
    return cert.fingerprint(hashes.SHA256()).hex()


def fingerprint(cert_path: str | os.PathLike[str]) -> str:
    """SHA-256 fingerprint (lower-case hex) of the first certificate in a PEM file."""
    return certificate_fingerprint(load_certificate(cert_path))


def load_certificate(path: str | os.PathLike[str]) -> x509.Certificate:
    data = Path(path).read_bytes()
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        try:
            return x509.load_der_x509_certificate(data)
        except ValueError:
            raise PkiError(f"{path}: not a PEM or DER X.509 certificate") from None


def _uris(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def _common_name(cert: x509.Certificate) -> str | None:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attrs:
        return None
    value = attrs[0].value
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def sae_id_from_certificate(cert: x509.Certificate) -> str | None:
    """The SAE ID a certificate speaks for: its ``urn:etsi:qkd:sae:`` URI SAN, else its CN.

    The CN fallback serves certificates from other issuers (vendor and test PKIs put the
    SAE ID there). A server that must tell applications from key managers checks
    ``certificate_kind`` as well, since a node certificate's CN is the node name.
    """
    for uri in _uris(cert):
        if uri.startswith(SAE_URI_PREFIX) and len(uri) > len(SAE_URI_PREFIX):
            return uri[len(SAE_URI_PREFIX):]
    return _common_name(cert) or None


def node_id_from_certificate(cert: x509.Certificate) -> str | None:
    """The qkdn_id of a key-manager certificate (``urn:qkdsdn:node:<id>``), else None."""
    for uri in _uris(cert):
        if uri.startswith(NODE_URI_PREFIX) and len(uri) > len(NODE_URI_PREFIX):
            return uri[len(NODE_URI_PREFIX):]
    return None


def certificate_kind(cert: x509.Certificate) -> str | None:
    """Which party a certificate of this PKI was issued to, from its identity URI.

    One of "controller", "operator", "node", "application", "device"; "ca" for a CA
    certificate; None for a certificate that carries none of these identities.
    """
    try:
        if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return "ca"
    except x509.ExtensionNotFound:
        pass
    for uri in _uris(cert):
        if uri == CONTROLLER_URI:
            return "controller"
        if uri == OPERATOR_URI:
            return "operator"
        if uri.startswith(NODE_URI_PREFIX):
            return "node"
        if uri.startswith(SAE_URI_PREFIX):
            return "application"
        if uri.startswith(DEVICE_URI_PREFIX):
            return "device"
    return None


# --------------------------------------------------------------------------- tokens


def hash_token(token: str | bytes, iterations: int = TOKEN_ITERATIONS) -> str:
    """Salted PBKDF2-HMAC-SHA256 of a token: ``pbkdf2_sha256$ITER$SALT_HEX$HASH_HEX``."""
    if iterations < 1:
        raise ValueError("iterations must be positive")
    raw = token.encode("utf-8") if isinstance(token, str) else bytes(token)
    if not raw:
        raise ValueError("an empty token cannot be hashed")
    salt = secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", raw, salt, iterations)
    return f"pbkdf2_sha256${iterations}${salt.hex()}${digest.hex()}"


def verify_token(token: str | bytes, stored: str) -> bool:
    """True when ``token`` hashes to ``stored``; False for a wrong token or a malformed hash."""
    parts = stored.split("$") if isinstance(stored, str) else []
    if len(parts) != 4 or parts[0] != "pbkdf2_sha256" or not parts[1].isdigit():
        return False
    try:
        iterations = int(parts[1])
        salt = bytes.fromhex(parts[2])
        expected = bytes.fromhex(parts[3])
    except ValueError:
        return False
    if iterations < 1 or not expected:
        return False
    raw = token.encode("utf-8") if isinstance(token, str) else bytes(token)
    digest = hashlib.pbkdf2_hmac("sha256", raw, salt, iterations, dklen=len(expected))
    return hmac.compare_digest(digest, expected)


# --------------------------------------------------------------------------- report


@dataclass(frozen=True)
class PkiEntry:
    kind: str  # "ca", "controller", "operator", "node", "application", "device"
    name: str
    cert: Path
    key: Path
    status: str  # "created" (new key and certificate), "issued" (new certificate, kept key), "kept"
    fingerprint: str
    not_after: dt.datetime


@dataclass
class PkiReport:
    out_dir: Path
    ca_cert: Path
    manifest: Path
    entries: list[PkiEntry] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def created(self) -> list[PkiEntry]:
        """Entries whose certificate was issued in this run (with or without a new key)."""
        return [e for e in self.entries if e.status != "kept"]

    @property
    def kept(self) -> list[PkiEntry]:
        return [e for e in self.entries if e.status == "kept"]

    def entry(self, kind: str, name: str) -> PkiEntry:
        for e in self.entries:
            if e.kind == kind and e.name == name:
                return e
        raise KeyError((kind, name))


# --------------------------------------------------------------------------- issuing


@dataclass(frozen=True)
class _Spec:
    kind: str
    name: str
    cert: Path
    key: Path
    common_name: str
    uri: str | None
    server: bool
    client: bool
    hosts: tuple[str, ...] = ()


def init_pki(network: "Network", out_dir: str | os.PathLike[str], *, days: int = 825,
             key_type: str = "ec", extra_hosts: tuple[str, ...] | list[str] = ()) -> PkiReport:
    """Create or complete the PKI of ``network`` in ``out_dir``.

    ``days`` is the validity of the certificates issued now (the CA gets at least ten
    years); ``key_type`` is "ec" (P-256) or "rsa" (3072 bits) for new keys;
    ``extra_hosts`` are DNS names or IP addresses added to every server certificate
    issued now. Raises PkiError when the folder is inconsistent (a certificate without
    its key, a leaf from another CA, a key that does not match its certificate).
    """
    if key_type not in KEY_TYPES:
        raise PkiError(f"unknown key type {key_type!r}: expected one of {', '.join(KEY_TYPES)}")
    if not isinstance(days, int) or not 1 <= days <= 36500:
        raise PkiError(f"days must be between 1 and 36500, got {days!r}")
    extra = tuple(_check_host(h, "extra host") for h in extra_hosts)

    layout = PkiLayout(out_dir)
    layout.out_dir.mkdir(parents=True, exist_ok=True)
    specs = _specs(network, layout, extra)
    now = dt.datetime.now(dt.timezone.utc)
    report = PkiReport(out_dir=layout.out_dir, ca_cert=layout.ca_cert, manifest=layout.manifest)

    with _folder_lock(layout.out_dir):
        ca_cert, ca_key, ca_entry = _ensure_ca(network, layout, days, key_type, now, specs, report)
        report.entries.append(ca_entry)
        for spec in specs:
            report.entries.append(_ensure_leaf(spec, ca_cert, ca_key, days, key_type, now, report))
        _write_manifest(network, layout, report)
    return report


def _specs(network: "Network", layout: PkiLayout, extra: tuple[str, ...]) -> list[_Spec]:
    d = network.deployment
    specs: list[_Spec] = []
    cert, key = layout.controller()
    specs.append(_Spec("controller", "controller", cert, key, "qkdsdn controller", CONTROLLER_URI,
                       server=True, client=True,
                       hosts=_hosts(_check_host(d.controller_host, "deployment.controller"),
                                    "localhost", "127.0.0.1", *extra)))
    cert, key = layout.operator()
    specs.append(_Spec("operator", "operator", cert, key, "qkdsdn operator", OPERATOR_URI,
                       server=False, client=True))
    for node in network.nodes:
        cert, key = layout.node(node.name)
        specs.append(_Spec("node", node.name, cert, key, node.name, NODE_URI_PREFIX + node.qkdn_id,
                           server=True, client=True,
                           hosts=_hosts(_check_host(node.km_host, f"node {node.name} km_address"),
                                        "localhost", "127.0.0.1", *extra)))
    for app in network.applications:
        cert, key = layout.app(app.sae_id)
        specs.append(_Spec("application", app.sae_id, cert, key, app.sae_id, SAE_URI_PREFIX + app.sae_id,
                           server=False, client=True))
    for link in network.links:
        if link.device is None:  # a real device brings its own KME certificates
            continue
        for role, address in zip(DEVICE_ROLES, network.twin_addresses(link)):
            host = _check_host(_host_of(address), f"link {link.name} {role} address")
            cert, key = layout.device(link.name, role)
            specs.append(_Spec("device", f"{link.name}-{role}", cert, key, f"{link.name}-{role}",
                               f"{DEVICE_URI_PREFIX}{link.name}:{role}", server=True, client=False,
                               hosts=_hosts(host, "localhost", *extra)))
    return specs


def _host_of(address: str) -> str:
    host, sep, _port = address.rpartition(":")
    if not sep:
        return address
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def _check_host(host: str, what: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not _DNS_RE.match(host):
        raise PkiError(f"{what}: {host!r} is neither an IP address nor a DNS name")
    return host.rstrip(".").lower()


def _hosts(*hosts: str) -> tuple[str, ...]:
    out: list[str] = []
    for h in hosts:
        # A wildcard bind address names no host a client could check against.
        with contextlib.suppress(ValueError):
            if ipaddress.ip_address(h).is_unspecified:
                continue
        if h not in out:
            out.append(h)
    return tuple(out)


def _ensure_ca(network: "Network", layout: PkiLayout, days: int, key_type: str, now: dt.datetime,
               specs: list[_Spec], report: PkiReport) -> tuple[x509.Certificate, PrivateKey | None, PkiEntry]:
    cert_path, key_path = layout.ca_cert, layout.ca_key
    key = _read_key(key_path, report) if key_path.exists() else None
    if cert_path.exists():
        cert = load_certificate(cert_path)
        if key is not None and not _same_public_key(cert, key):
            raise PkiError(f"{key_path} does not match {cert_path}; restore the matching pair "
                           "(replacing the CA invalidates every certificate it issued)")
        if key is None:
            # An offline CA key is fine as long as nothing needs signing.
            missing = [s for s in specs if not (s.cert.exists() and s.key.exists())]
            if missing:
                names = ", ".join(str(s.cert.relative_to(layout.out_dir)) for s in missing[:5])
                raise PkiError(f"{key_path} is missing, so {len(missing)} missing certificate(s) "
                               f"cannot be issued ({names}{', ...' if len(missing) > 5 else ''}); "
                               "restore the CA key into the folder and run again")
        status = "kept"
    else:
        orphans = [s for s in specs if s.cert.exists()] if key is None else []
        if orphans:
            # A new CA would disown them; stop before writing anything.
            raise PkiError(f"{cert_path} and {key_path} are missing but {len(orphans)} certificate(s) they "
                           f"issued are still there (e.g. {orphans[0].cert}); restore the CA files, or "
                           f"start over in an empty folder")
        status = "issued" if key is not None else "created"
        if key is None:
            key = _new_key(key_type)
            _write_private(key_path, key)
        cert = _issue_ca(network, key, days, now)
        _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert, key, PkiEntry("ca", "ca", cert_path, key_path, status, certificate_fingerprint(cert),
                               cert.not_valid_after_utc)


def _ensure_leaf(spec: _Spec, ca_cert: x509.Certificate, ca_key: PrivateKey | None, days: int,
                 key_type: str, now: dt.datetime, report: PkiReport) -> PkiEntry:
    has_cert, has_key = spec.cert.exists(), spec.key.exists()
    if has_cert and not has_key:
        raise PkiError(f"{spec.cert} exists but its key {spec.key} is missing; restore the key, or "
                       "delete the certificate to have both issued again")
    key = _read_key(spec.key, report) if has_key else None
    if has_cert:
        cert = load_certificate(spec.cert)
        if key is not None and not _same_public_key(cert, key):
            raise PkiError(f"{spec.key} does not match {spec.cert}; delete both to have them issued again")
        try:
            cert.verify_directly_issued_by(ca_cert)
        except (InvalidSignature, ValueError, TypeError) as exc:
            raise PkiError(f"{spec.cert} was not issued by {report.ca_cert} (did the CA change?); "
                           "delete the certificate and its key to have them issued again") from exc
        if cert.not_valid_after_utc < now:
            report.warnings.append(f"{spec.cert} expired on {cert.not_valid_after_utc:%Y-%m-%d}; "
                                   "delete it (keep the key) to have it renewed")
        status = "kept"
    else:
        assert ca_key is not None  # _ensure_ca refuses missing leaves without a CA key
        status = "issued" if key is not None else "created"
        if key is None:
            key = _new_key(key_type)
            _write_private(spec.key, key)
        cert = _issue_leaf(spec, key.public_key(), ca_cert, ca_key, days, now)
        _write_public(spec.cert, cert.public_bytes(serialization.Encoding.PEM))
    return PkiEntry(spec.kind, spec.name, spec.cert, spec.key, status, certificate_fingerprint(cert),
                    cert.not_valid_after_utc)


def _name(network: "Network", common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "qkdsdn"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, network.name[:CN_MAX]),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name[:CN_MAX]),
    ])


def _issue_ca(network: "Network", key: PrivateKey, days: int, now: dt.datetime) -> x509.Certificate:
    # The subject is a function of the network name only, so a CA certificate re-issued
    # from the kept ca.key still validates every leaf issued before.
    subject = _name(network, f"qkdsdn CA {network.name}")
    public = key.public_key()
    ski = x509.SubjectKeyIdentifier.from_public_key(public)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=max(days, CA_MIN_DAYS)))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
    )
    return builder.sign(key, _sign_hash(key))


def _issue_leaf(spec: _Spec, public, ca_cert: x509.Certificate, ca_key: PrivateKey, days: int,
                now: dt.datetime) -> x509.Certificate:
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    network_ou = ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "qkdsdn"),
        *([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, network_ou[0].value)] if network_ou else []),
        x509.NameAttribute(NameOID.COMMON_NAME, spec.common_name[:CN_MAX]),
    ])
    sans: list[x509.GeneralName] = []
    for host in spec.hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    if spec.uri:
        sans.append(x509.UniformResourceIdentifier(spec.uri))
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if spec.server else []) + \
             ([ExtendedKeyUsageOID.CLIENT_AUTH] if spec.client else [])
    is_rsa = isinstance(public, rsa.RSAPublicKey)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=is_rsa, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
    )
    if sans:
        # RFC 5280: SAN is critical only when the subject is empty; ours never is.
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, _sign_hash(ca_key))


def _sign_hash(key: PrivateKey):
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def _new_key(key_type: str) -> PrivateKey:
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    return ec.generate_private_key(ec.SECP256R1())


def _same_public_key(cert: x509.Certificate, key: PrivateKey) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return cert.public_key().public_bytes(*fmt) == key.public_key().public_bytes(*fmt)


def _read_key(path: Path, report: PkiReport) -> PrivateKey:
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        # Tighten rather than refuse: the key is ours, and leaving it readable is the bug.
        os.chmod(path, 0o600)
        report.warnings.append(f"{path} was readable by others (mode {mode:03o}); set to 600")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except TypeError:
        raise PkiError(f"{path} is encrypted; qkdsdn needs unencrypted keys (protect them with "
                       "file permissions)") from None
    except ValueError as exc:
        raise PkiError(f"{path}: not a PEM private key ({exc})") from None
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey,
                            ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        raise PkiError(f"{path}: unsupported key type {type(key).__name__}")
    return key


# --------------------------------------------------------------------------- files


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Write through a temporary file in the same folder, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)  # mkstemp creates 0600; set the final mode before any data lands
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _write_private(path: Path, key: PrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    _atomic_write(path, pem, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    _atomic_write(path, data, 0o644)


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    # Two concurrent runs would each issue a CA; the second would orphan the first's leaves.
    with open(folder / ".lock", "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _write_manifest(network: "Network", layout: PkiLayout, report: PkiReport) -> None:
    def item(e: PkiEntry) -> dict:
        return {"cert": e.cert.relative_to(layout.out_dir).as_posix(),
                "key": e.key.relative_to(layout.out_dir).as_posix(),
                "sha256": e.fingerprint,
                "not_after": e.not_after.strftime("%Y-%m-%dT%H:%M:%SZ")}

    by_kind = {(e.kind, e.name): e for e in report.entries}
    manifest: dict = {
        "version": MANIFEST_VERSION,
        "network": network.name,
        "ca": item(by_kind[("ca", "ca")]),
        "controller": item(by_kind[("controller", "controller")]),
        "operator": item(by_kind[("operator", "operator")]),
        "nodes": {n.name: {**item(by_kind[("node", n.name)]), "qkdn_id": n.qkdn_id} for n in network.nodes},
        "applications": {a.sae_id: {**item(by_kind[("application", a.sae_id)]), "node": a.node}
                         for a in network.applications},
        "devices": {},
    }
    for link in network.links:
        if link.device is not None:
            manifest["devices"][link.name] = {role: item(by_kind[("device", f"{link.name}-{role}")])
                                              for role in DEVICE_ROLES}
    data = (json.dumps(manifest, indent=2) + "\n").encode("utf-8")
    with contextlib.suppress(OSError):
        if layout.manifest.read_bytes() == data:
            return  # a run that changed nothing leaves the folder untouched
    _write_public(layout.manifest, data)


def read_manifest(out_dir: str | os.PathLike[str]) -> dict:
    """The parsed pki.json of a PKI folder (paths in it are relative to the folder)."""
    path = PkiLayout(out_dir).manifest
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PkiError(f"{path} not found; run 'qkdsdn pki init NETWORK.yaml --out {out_dir}'") from None
    except ValueError as exc:
        raise PkiError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("version") != MANIFEST_VERSION:
        raise PkiError(f"{path}: unsupported manifest version {data.get('version') if isinstance(data, dict) else None!r}")
    return data
