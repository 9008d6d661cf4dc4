"""qkdsdn.pki and `qkdsdn pki`: the CA, the certificates, idempotent re-runs, tokens."""
from __future__ import annotations

import ipaddress
import json
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from db import netfile
from qkdsdn import pki

REPO = Path(__file__).resolve().parent.parent
PAPER = REPO / "examples" / "paper-poc.yaml"

TINY = """\
network: {name: tiny}
nodes:
  - {name: A, km_address: "10.1.2.3:8400"}
  - {name: B, km_address: "km-b.example.net:8401"}
links:
  - {name: AB, ends: [A, B], length_km: 5, device: {model: fixed, skr_bps: 1000, qber: 0.01}}
users:
  - {name: u, sla: {max_priority: 1, max_bps: 1000, max_sessions: 1, bucket_bits: 1024}}
applications:
  - {sae_id: app-a, node: A, user: u}
deployment: {controller: "ctl.example.net:8443", twin_host: 10.9.9.9}
"""


@pytest.fixture(scope="module")
def paper():
    return netfile.load(PAPER)


@pytest.fixture(scope="module")
def tiny():
    return netfile.parse(TINY, "tiny.yaml")


def _leaves(layout: pki.PkiLayout, network) -> dict[str, tuple[Path, set[str]]]:
    """Every leaf certificate of a network with the TLS purposes it must pass."""
    out = {"controller": (layout.controller()[0], {"sslserver", "sslclient"}),
           "operator": (layout.operator()[0], {"sslclient"})}
    for n in network.nodes:
        out[f"node {n.name}"] = (layout.node(n.name)[0], {"sslserver", "sslclient"})
    for a in network.applications:
        out[f"app {a.sae_id}"] = (layout.app(a.sae_id)[0], {"sslclient"})
    for link in network.links:
        for role in pki.DEVICE_ROLES:
            out[f"device {link.name} {role}"] = (layout.device(link.name, role)[0], {"sslserver"})
    return out


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _ext(cert: x509.Certificate, cls):
    return cert.extensions.get_extension_for_class(cls)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and p.name != ".lock"}


# --------------------------------------------------------------------------- the issued chain


def test_openssl_accepts_every_leaf_for_its_purpose_only(pki_dir, paper):
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl command not installed")
    for label, (cert, purposes) in _leaves(pki_dir, paper).items():
        for purpose in ("sslserver", "sslclient"):
            run = subprocess.run([openssl, "verify", "-x509_strict", "-purpose", purpose,
                                  "-CAfile", str(pki_dir.ca_cert), str(cert)],
                                 capture_output=True, text=True)
            if purpose in purposes:
                assert run.returncode == 0 and run.stdout.strip().endswith(": OK"), \
                    f"{label} ({purpose}): {run.stdout}{run.stderr}"
            else:
                # An application certificate must not pass as a server, and so on.
                assert run.returncode != 0, f"{label} unexpectedly valid for {purpose}"


def test_ca_certificate_profile(pki_dir):
    ca = _cert(pki_dir.ca_cert)
    bc = _ext(ca, x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = _ext(ca, x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign and not ku.value.digital_signature
    ski = _ext(ca, x509.SubjectKeyIdentifier).value
    assert _ext(ca, x509.AuthorityKeyIdentifier).value.key_identifier == ski.digest
    assert ca.subject == ca.issuer
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp256r1"


def test_leaf_profiles(pki_dir, paper):
    ca = _cert(pki_dir.ca_cert)
    ca_ski = _ext(ca, x509.SubjectKeyIdentifier).value.digest
    expected_eku = {"sslserver": ExtendedKeyUsageOID.SERVER_AUTH, "sslclient": ExtendedKeyUsageOID.CLIENT_AUTH}
    for label, (path, purposes) in _leaves(pki_dir, paper).items():
        cert = _cert(path)
        assert not _ext(cert, x509.BasicConstraints).value.ca, label
        ku = _ext(cert, x509.KeyUsage)
        assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign, label
        assert set(_ext(cert, x509.ExtendedKeyUsage).value) == {expected_eku[p] for p in purposes}, label
        assert _ext(cert, x509.AuthorityKeyIdentifier).value.key_identifier == ca_ski, label
        assert _ext(cert, x509.SubjectKeyIdentifier).value == \
            x509.SubjectKeyIdentifier.from_public_key(cert.public_key()), label
        assert cert.not_valid_after_utc <= ca.not_valid_after_utc, label


def test_node_certificate_names(pki_dir, paper):
    for node in paper.nodes:
        cert = _cert(pki_dir.node(node.name)[0])
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == node.name
        san = _ext(cert, x509.SubjectAlternativeName).value
        assert "localhost" in san.get_values_for_type(x509.DNSName)
        assert ipaddress.ip_address(node.km_host) in san.get_values_for_type(x509.IPAddress)
        assert f"urn:qkdsdn:node:{node.qkdn_id}" in san.get_values_for_type(x509.UniformResourceIdentifier)
        assert pki.node_id_from_certificate(cert) == node.qkdn_id
        assert pki.certificate_kind(cert) == "node"


def test_application_certificate_carries_the_sae_id(pki_dir, paper):
    for app in paper.applications:
        cert = _cert(pki_dir.app(app.sae_id)[0])
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == app.sae_id
        uris = _ext(cert, x509.SubjectAlternativeName).value.get_values_for_type(x509.UniformResourceIdentifier)
        assert uris == [f"urn:etsi:qkd:sae:{app.sae_id}"]
        assert pki.sae_id_from_certificate(cert) == app.sae_id
        assert pki.certificate_kind(cert) == "application"
        assert pki.node_id_from_certificate(cert) is None


def test_device_certificates_name_the_twin_hosts(tiny, tmp_path):
    pki.init_pki(tiny, tmp_path)
    layout = pki.PkiLayout(tmp_path)
    for role in pki.DEVICE_ROLES:
        cert = _cert(layout.device("AB", role)[0])
        san = _ext(cert, x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.9.9.9")]
        assert f"urn:qkdsdn:device:AB:{role}" in san.get_values_for_type(x509.UniformResourceIdentifier)
        assert pki.certificate_kind(cert) == "device"
    # A node addressed by name gets a DNS SAN; the controller gets its host plus loopback.
    node_b = _ext(_cert(layout.node("B")[0]), x509.SubjectAlternativeName).value
    assert "km-b.example.net" in node_b.get_values_for_type(x509.DNSName)
    ctl = _ext(_cert(layout.controller()[0]), x509.SubjectAlternativeName).value
    assert set(ctl.get_values_for_type(x509.DNSName)) == {"ctl.example.net", "localhost"}
    assert ctl.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert pki.certificate_kind(_cert(layout.controller()[0])) == "controller"
    assert pki.certificate_kind(_cert(layout.operator()[0])) == "operator"
    assert pki.certificate_kind(_cert(layout.ca_cert)) == "ca"


def test_sae_id_falls_back_to_common_name():
    key = ec.generate_private_key(ec.SECP256R1())

    def self_signed(name: x509.Name, uris=()):
        import datetime as dt
        now = dt.datetime.now(dt.timezone.utc)
        b = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
             .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1)))
        if uris:
            b = b.add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(u) for u in uris]), critical=False)
        return b.sign(key, hashes.SHA256())

    vendor = self_signed(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sae-vendor-7")]),
                         uris=["https://example.net/x"])
    assert pki.sae_id_from_certificate(vendor) == "sae-vendor-7"
    # The URI wins over the CN when both are present.
    both = self_signed(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cn-name")]),
                       uris=["urn:etsi:qkd:sae:uri-name"])
    assert pki.sae_id_from_certificate(both) == "uri-name"
    anonymous = self_signed(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "x")]))
    assert pki.sae_id_from_certificate(anonymous) is None
    assert pki.certificate_kind(anonymous) is None


# --------------------------------------------------------------------------- files and manifest


def test_private_keys_are_mode_0600_and_certificates_0644(pki_dir):
    keys = list(pki_dir.out_dir.rglob("*.key"))
    assert len(keys) == 1 + 2 + 6 + 6 + 12  # CA, controller+operator, nodes, apps, devices
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    for cert in pki_dir.out_dir.rglob("*.pem"):
        assert stat.S_IMODE(cert.stat().st_mode) == 0o644, cert
    # Keys are unencrypted PKCS#8 PEM that match their certificates.
    cert_path, key_path = pki_dir.node("KM3")
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert key_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    assert key.public_key().public_bytes(serialization.Encoding.DER, pub) == \
        _cert(cert_path).public_key().public_bytes(serialization.Encoding.DER, pub)


def test_manifest_maps_every_party_to_files_and_fingerprints(pki_dir, paper):
    manifest = json.loads(pki_dir.manifest.read_text())
    assert manifest == pki.read_manifest(pki_dir.out_dir)
    assert manifest["network"] == "paper-poc"
    entries = [manifest["ca"], manifest["controller"], manifest["operator"]]
    assert set(manifest["nodes"]) == {n.name for n in paper.nodes}
    assert set(manifest["applications"]) == {a.sae_id for a in paper.applications}
    assert set(manifest["devices"]) == {link.name for link in paper.links}
    for n in paper.nodes:
        assert manifest["nodes"][n.name]["qkdn_id"] == n.qkdn_id
        assert manifest["nodes"][n.name]["cert"] == f"nodes/{n.name}.pem"
    for a in paper.applications:
        assert manifest["applications"][a.sae_id]["node"] == a.node
    entries += list(manifest["nodes"].values()) + list(manifest["applications"].values())
    entries += [d[role] for d in manifest["devices"].values() for role in pki.DEVICE_ROLES]
    assert len(entries) == 27
    for e in entries:
        cert_path = pki_dir.out_dir / e["cert"]
        assert (pki_dir.out_dir / e["key"]).is_file()
        assert re.fullmatch(r"[0-9a-f]{64}", e["sha256"])
        # The fingerprint is SHA-256 over the DER certificate, as the user-profile DB expects.
        assert e["sha256"] == _cert(cert_path).fingerprint(hashes.SHA256()).hex()
        assert e["sha256"] == pki.fingerprint(cert_path) == pki_dir.fingerprint(e["cert"])
    # The network file accepts the fingerprint as an application credential.
    sha = manifest["applications"]["SAE-KM0"]["sha256"]
    text = PAPER.read_text().replace("{sae_id: SAE-KM0, node: KM0, user: alice, priority: 5}",
                                     f"{{sae_id: SAE-KM0, node: KM0, user: alice, cert_sha256: '{sha}'}}")
    assert netfile.parse(text, "x.yaml").applications[0].cert_sha256 == sha


def test_layout_paths(tmp_path):
    layout = pki.PkiLayout(tmp_path)
    assert layout.ca_cert == tmp_path / "ca.pem" and layout.ca_key == tmp_path / "ca.key"
    assert layout.controller() == (tmp_path / "controller.pem", tmp_path / "controller.key")
    assert layout.operator() == (tmp_path / "operator.pem", tmp_path / "operator.key")
    assert layout.node("KM1") == (tmp_path / "nodes/KM1.pem", tmp_path / "nodes/KM1.key")
    assert layout.app("SAE-1") == (tmp_path / "apps/SAE-1.pem", tmp_path / "apps/SAE-1.key")
    assert layout.device("L01", "slave") == (tmp_path / "devices/L01-slave.pem", tmp_path / "devices/L01-slave.key")
    with pytest.raises(ValueError):
        layout.device("L01", "middle")
    with pytest.raises(ValueError):
        layout.node("../../etc/passwd")


# --------------------------------------------------------------------------- re-runs


def test_rerun_keeps_every_file(paper, tmp_path):
    first = pki.init_pki(paper, tmp_path)
    assert {e.status for e in first.entries} == {"created"} and len(first.kept) == 0
    before = _snapshot(tmp_path)
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file() and p.name != ".lock"}
    second = pki.init_pki(paper, tmp_path)
    assert {e.status for e in second.entries} == {"kept"} and len(second.created) == 0
    assert [(e.kind, e.name, e.fingerprint) for e in second.entries] == \
        [(e.kind, e.name, e.fingerprint) for e in first.entries]
    assert _snapshot(tmp_path) == before
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes  # not even rewritten
    assert second.warnings == []


def test_rerun_issues_only_what_is_missing(paper, tmp_path):
    layout = pki.PkiLayout(tmp_path)
    pki.init_pki(paper, tmp_path)
    app_cert, app_key = layout.app("SAE-KM2")
    node_cert, node_key = layout.node("KM4")
    app_key_bytes, old_app_fp = app_key.read_bytes(), pki.fingerprint(app_cert)
    app_cert.unlink()  # renew: the key stays
    node_cert.unlink()
    node_key.unlink()  # re-key
    before = _snapshot(tmp_path)

    report = pki.init_pki(paper, tmp_path)
    assert report.entry("application", "SAE-KM2").status == "issued"
    assert report.entry("node", "KM4").status == "created"
    assert {(e.kind, e.name) for e in report.created} == {("application", "SAE-KM2"), ("node", "KM4")}
    assert app_key.read_bytes() == app_key_bytes
    assert pki.fingerprint(app_cert) != old_app_fp
    after = _snapshot(tmp_path)
    changed = {name for name in after if before.get(name) != after[name]}
    assert changed == {"apps/SAE-KM2.pem", "nodes/KM4.pem", "nodes/KM4.key", "pki.json"}
    manifest = pki.read_manifest(tmp_path)
    assert manifest["applications"]["SAE-KM2"]["sha256"] == pki.fingerprint(app_cert)


def test_ca_certificate_reissued_from_kept_key_still_validates_old_leaves(paper, tmp_path):
    layout = pki.PkiLayout(tmp_path)
    pki.init_pki(paper, tmp_path)
    layout.ca_cert.unlink()
    report = pki.init_pki(paper, tmp_path)
    assert report.entry("ca", "ca").status == "issued"
    assert len(report.kept) == 26  # every leaf verified against the new CA certificate and kept


def test_offline_ca_key(paper, tmp_path):
    layout = pki.PkiLayout(tmp_path)
    pki.init_pki(paper, tmp_path)
    offline = tmp_path.parent / f"{tmp_path.name}-ca.key"
    layout.ca_key.rename(offline)
    assert {e.status for e in pki.init_pki(paper, tmp_path).entries} == {"kept"}
    layout.app("SAE-KM1")[0].unlink()
    with pytest.raises(pki.PkiError, match="ca.key is missing.*apps/SAE-KM1.pem"):
        pki.init_pki(paper, tmp_path)
    offline.rename(layout.ca_key)
    assert pki.init_pki(paper, tmp_path).entry("application", "SAE-KM1").status == "issued"


def test_inconsistent_folders_are_refused(paper, tiny, tmp_path):
    layout = pki.PkiLayout(tmp_path / "a")
    pki.init_pki(paper, layout.out_dir)
    other = pki.PkiLayout(tmp_path / "b")
    pki.init_pki(paper, other.out_dir)

    # A certificate whose key is gone is not silently replaced.
    layout.node("KM1")[1].unlink()
    with pytest.raises(pki.PkiError, match=r"KM1\.pem exists but its key .* is missing"):
        pki.init_pki(paper, layout.out_dir)
    layout.node("KM1")[0].unlink()
    assert pki.init_pki(paper, layout.out_dir).entry("node", "KM1").status == "created"

    # A leaf from another CA.
    for src, dst in zip(other.app("SAE-KM0"), layout.app("SAE-KM0")):
        shutil.copyfile(src, dst)
    with pytest.raises(pki.PkiError, match="was not issued by"):
        pki.init_pki(paper, layout.out_dir)

    # A key that belongs to another certificate.
    shutil.copyfile(other.app("SAE-KM5")[1], layout.app("SAE-KM0")[1])
    shutil.copyfile(layout.app("SAE-KM1")[0], layout.app("SAE-KM0")[0])
    with pytest.raises(pki.PkiError, match="does not match"):
        pki.init_pki(paper, layout.out_dir)


def test_lost_ca_is_not_silently_replaced(tiny, tmp_path):
    layout = pki.PkiLayout(tmp_path)
    pki.init_pki(tiny, tmp_path)
    layout.ca_cert.unlink()
    layout.ca_key.unlink()
    before = _snapshot(tmp_path)
    with pytest.raises(pki.PkiError, match="are missing but 7 certificate"):
        pki.init_pki(tiny, tmp_path)
    assert _snapshot(tmp_path) == before


def test_readable_key_is_tightened_with_a_warning(tiny, tmp_path):
    layout = pki.PkiLayout(tmp_path)
    pki.init_pki(tiny, tmp_path)
    layout.app("app-a")[1].chmod(0o644)
    report = pki.init_pki(tiny, tmp_path)
    assert stat.S_IMODE(layout.app("app-a")[1].stat().st_mode) == 0o600
    assert any("app-a.key was readable by others" in w for w in report.warnings)


def test_rsa_keys_extra_hosts_and_days(tiny, tmp_path):
    report = pki.init_pki(tiny, tmp_path, key_type="rsa", days=30, extra_hosts=("gw.example.org", "192.0.2.7"))
    layout = pki.PkiLayout(tmp_path)
    ca = _cert(layout.ca_cert)
    assert isinstance(ca.public_key(), rsa.RSAPublicKey) and ca.public_key().key_size == pki.RSA_BITS
    node = _cert(layout.node("A")[0])
    assert isinstance(node.public_key(), rsa.RSAPublicKey)
    assert _ext(node, x509.KeyUsage).value.key_encipherment
    assert (node.not_valid_after_utc - node.not_valid_before_utc).days == 30
    assert (ca.not_valid_after_utc - ca.not_valid_before_utc).days >= pki.CA_MIN_DAYS
    for cert_path in (layout.node("A")[0], layout.controller()[0], layout.device("AB", "master")[0]):
        san = _ext(_cert(cert_path), x509.SubjectAlternativeName).value
        assert "gw.example.org" in san.get_values_for_type(x509.DNSName)
        assert ipaddress.ip_address("192.0.2.7") in san.get_values_for_type(x509.IPAddress)
    app_san = _ext(_cert(layout.app("app-a")[0]), x509.SubjectAlternativeName).value
    assert app_san.get_values_for_type(x509.DNSName) == []  # client-only certificates name no host
    assert report.entry("ca", "ca").status == "created"


@pytest.mark.parametrize("kwargs, message", [
    ({"key_type": "dsa"}, "unknown key type"),
    ({"days": 0}, "days must be"),
    ({"extra_hosts": ("bad host!",)}, "neither an IP address nor a DNS name"),
])
def test_bad_arguments(tiny, tmp_path, kwargs, message):
    with pytest.raises(pki.PkiError, match=message):
        pki.init_pki(tiny, tmp_path, **kwargs)
    assert not (tmp_path / "ca.key").exists()


# --------------------------------------------------------------------------- tokens


def test_token_hash_round_trip():
    stored = pki.hash_token("s3cret-token", iterations=1000)
    assert re.fullmatch(r"pbkdf2_sha256\$1000\$[0-9a-f]{32}\$[0-9a-f]{64}", stored)
    assert netfile.token_hash_check(stored) is None
    assert pki.verify_token("s3cret-token", stored)
    assert not pki.verify_token("s3cret-tokeN", stored)
    assert not pki.verify_token("", stored)
    # Salted: the same token never hashes the same way twice.
    assert pki.hash_token("s3cret-token", iterations=1000) != stored
    assert pki.hash_token("x").split("$")[1] == str(pki.TOKEN_ITERATIONS)


@pytest.mark.parametrize("stored", ["", "plain-token", "pbkdf2_sha256$1000$zz$00", "md5$1$00$00",
                                    "pbkdf2_sha256$x$00$00", "pbkdf2_sha256$0$00$00", "pbkdf2_sha256$10$00$"])
def test_malformed_token_hash_never_verifies(stored):
    assert pki.verify_token("plain-token", stored) is False


def test_empty_token_cannot_be_hashed():
    with pytest.raises(ValueError):
        pki.hash_token("")


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def cli():
    from qkdsdn import cli as cli_module

    return cli_module


def test_cli_init_and_show(cli, tmp_path, capsys):
    out = tmp_path / "pki"
    assert cli.main(["pki", "init", str(PAPER), "--out", str(out), "--host", "km.example.net"]) == 0
    printed = capsys.readouterr().out
    layout = pki.PkiLayout(out)
    assert layout.ca_cert.is_file() and layout.app("SAE-KM5")[1].is_file()
    assert re.search(r"^KIND\s+NAME\s+FILE\s+STATUS\s+SHA-256$", printed, re.M)
    fp = pki.fingerprint(layout.node("KM2")[0])
    assert re.search(rf"^node\s+KM2\s+nodes/KM2\.pem\s+created\s+{fp[:16]}$", printed, re.M)
    assert "27 certificate(s) issued, 0 kept" in printed
    assert f"CA certificate: {layout.ca_cert}" in printed
    assert "km.example.net" in _ext(_cert(layout.node("KM2")[0]), x509.SubjectAlternativeName) \
        .value.get_values_for_type(x509.DNSName)

    assert cli.main(["pki", "init", str(PAPER), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "0 certificate(s) issued, 27 kept" in printed
    assert re.search(rf"^node\s+KM2\s+nodes/KM2\.pem\s+kept\s+{fp[:16]}$", printed, re.M)

    assert cli.main(["pki", "show", str(out)]) == 0
    printed = capsys.readouterr().out
    assert re.search(rf"^nodes/KM2\.pem\s+CN=KM2,OU=paper-poc,O=qkdsdn\s+\d{{4}}-\d\d-\d\d\s+ok\s+{fp}$",
                     printed, re.M)
    assert "27 certificate(s)" in printed


def test_cli_show_flags_foreign_certificates(cli, tmp_path, capsys, paper):
    pki.init_pki(paper, tmp_path / "a")
    pki.init_pki(paper, tmp_path / "b")
    shutil.copyfile(tmp_path / "b" / "apps" / "SAE-KM1.pem", tmp_path / "a" / "apps" / "SAE-KM1.pem")
    assert cli.main(["pki", "show", str(tmp_path / "a")]) == 1
    printed = capsys.readouterr().out
    assert re.search(r"^apps/SAE-KM1\.pem\s.*not issued by ca\.pem", printed, re.M)
    assert "1 with problems" in printed


def test_cli_reports_network_file_errors(cli, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(PAPER.read_text().replace("ends: [KM0, KM1]", "ends: [KM0, KM9]"))
    assert cli.main(["pki", "init", str(bad), "--out", str(tmp_path / "pki")]) == 2
    err = capsys.readouterr().err
    assert re.search(r"bad\.yaml:\d+: links\[0\]\.ends\[1\]: unknown node 'KM9'", err)
    assert not (tmp_path / "pki").exists()


def test_cli_usage_errors(cli, tmp_path, capsys):
    assert cli.main(["pki", "show", str(tmp_path / "nowhere")]) == 2
    assert "no such folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["pki", "init", str(PAPER), "--out", str(tmp_path), "--days", "0"])
    with pytest.raises(SystemExit) as exc:
        cli.main(["pki", "init", "--help"])
    assert exc.value.code == 0
    help_text = capsys.readouterr().out
    for phrase in ("apps/SAE_ID.pem", "pki.json", "0600", "--key-type", "--host", "examples:"):
        assert phrase in help_text
