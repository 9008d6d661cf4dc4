"""`qkdsdn pki`: issue and inspect the network's certificates."""
from __future__ import annotations

import argparse

PKI_HELP = "issue and inspect the network's TLS certificates (CA, controller, nodes, apps, devices)"

PKI_DESCRIPTION = """\
Every HTTP interface of qkdsdn (ETSI 004/014 key delivery, ETSI 015 RESTCONF,
key relay, the digital twin's ETSI 014 KMEs, the operator API) is HTTPS with
client certificates from one private CA per network. These commands issue that
CA and one certificate per party from a network file, and show what a PKI
folder holds.
"""

INIT_DESCRIPTION = """\
Issue the CA and every certificate the network file needs, into DIR.

Files written (private keys with mode 0600, certificates 0644):
  ca.pem, ca.key                      the network's CA (valid 10 years or --days, if longer)
  controller.pem/.key                 controller: server and client (operator REST API)
  operator.pem/.key                   operator CLI / dashboard: client
  nodes/NODE.pem/.key                 each node's key manager: server and client,
                                      CN=NODE, SAN=its km_address host, localhost,
                                      urn:qkdsdn:node:QKDN_ID
  apps/SAE_ID.pem/.key                each application: client, CN=SAE_ID,
                                      SAN=urn:etsi:qkd:sae:SAE_ID (the ETSI 014
                                      key manager reads the caller's SAE ID from it)
  devices/LINK-master.pem/.key,       the two ETSI 014 KMEs of each emulated link
  devices/LINK-slave.pem/.key         (digital twin): server
  pki.json                            manifest: every party's files and the SHA-256
                                      fingerprint of its certificate

Running it again is safe: existing keys and certificates are kept and only what
is missing is issued (e.g. after adding a node or an application). To renew a
certificate, delete its .pem (the key is kept) and run again; to re-key, delete
both files. If ca.key has been moved offline, a run that needs nothing new still
succeeds.

The fingerprints are what the user-profile database stores as application
credentials (the network file's applications[].cert_sha256).
"""

INIT_EPILOG = """\
examples:
  qkdsdn pki init examples/paper-poc.yaml --out pki
  qkdsdn pki init net.yaml --out /etc/qkdsdn/pki --days 365 --key-type rsa
  qkdsdn pki init net.yaml --out pki --host km0.example.net --host 10.0.0.5
"""

SHOW_DESCRIPTION = """\
List the certificates in a PKI folder made by 'qkdsdn pki init': file, subject,
expiry date and SHA-256 fingerprint, and whether each leaf was issued by the
folder's ca.pem. Nothing is written. Exit status 1 when a certificate is
expired, not yet valid, unreadable or not issued by ca.pem.
"""

SHOW_EPILOG = """\
example:
  qkdsdn pki show pki
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("pki", help=PKI_HELP, description=PKI_DESCRIPTION,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="pki_command", metavar="SUBCOMMAND")
    sub.required = True

    init = sub.add_parser("init", help="issue the CA and all missing certificates for a network file",
                          description=INIT_DESCRIPTION, epilog=INIT_EPILOG,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    init.add_argument("network", metavar="NETWORK.yaml", help="the network file (see docs/network-file.md)")
    init.add_argument("--out", metavar="DIR", required=True,
                      help="folder for the CA, keys, certificates and pki.json (created if missing)")
    init.add_argument("--days", type=_days, default=825, metavar="N",
                      help="validity of the certificates issued now, in days (default 825; never "
                           "beyond the CA's own expiry)")
    init.add_argument("--key-type", choices=("ec", "rsa"), default="ec",
                      help="algorithm of new keys: ec = ECDSA P-256 (default), rsa = RSA 3072; "
                           "existing keys are kept whatever their type")
    init.add_argument("--host", action="append", default=[], metavar="HOST",
                      help="extra DNS name or IP address for every server certificate issued in this "
                           "run (controller, key managers, twin KMEs); repeat for more. Certificates "
                           "that already exist keep their names: delete a .pem to reissue it")
    init.set_defaults(func=_init)

    show = sub.add_parser("show", help="list the certificates of a PKI folder",
                          description=SHOW_DESCRIPTION, epilog=SHOW_EPILOG,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    show.add_argument("dir", metavar="DIR", help="a folder written by 'qkdsdn pki init'")
    show.set_defaults(func=_show)


def _days(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of days: {text!r}") from None
    if not 1 <= value <= 36500:
        raise argparse.ArgumentTypeError(f"must be between 1 and 36500, got {value}")
    return value


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def _init(args: argparse.Namespace) -> int:
    from db import netfile
    from qkdsdn import pki
    from qkdsdn.cli import CommandError

    try:
        network = netfile.load(args.network)
    except netfile.NetworkFileError as exc:
        raise CommandError(str(exc)) from None
    try:
        report = pki.init_pki(network, args.out, days=args.days, key_type=args.key_type,
                              extra_hosts=tuple(args.host))
    except pki.PkiError as exc:
        raise CommandError(str(exc)) from None
    except OSError as exc:
        raise CommandError(f"cannot write the PKI in {args.out}: {exc.strerror or exc} "
                           f"({exc.filename or args.out})") from None

    rows = [[e.kind, e.name, str(e.cert.relative_to(report.out_dir)), e.status, e.fingerprint[:16]]
            for e in report.entries]
    print(_table(["KIND", "NAME", "FILE", "STATUS", "SHA-256"], rows))
    print()
    issued = len(report.created)
    print(f"{issued} certificate(s) issued, {len(report.kept)} kept, in {report.out_dir}")
    ca = report.entry("ca", "ca")
    print(f"CA certificate: {ca.cert} (sha256 {ca.fingerprint})")
    print(f"CA key:         {ca.key}  <- keep it private; it signs every certificate of the network")
    print(f"manifest:       {report.manifest}")
    for warning in report.warnings:
        print(f"warning: {warning}")
    return 0


def _show(args: argparse.Namespace) -> int:
    import datetime as dt
    from pathlib import Path

    from cryptography.exceptions import InvalidSignature

    from qkdsdn import pki
    from qkdsdn.cli import CommandError

    layout = pki.PkiLayout(args.dir)
    if not layout.out_dir.is_dir():
        raise CommandError(f"{layout.out_dir}: no such folder")
    if not layout.ca_cert.is_file():
        raise CommandError(f"{layout.ca_cert} not found: is {layout.out_dir} a folder from 'qkdsdn pki init'?")

    files: list[Path] = [layout.ca_cert]
    files += [p for p in (layout.controller()[0], layout.operator()[0]) if p.is_file()]
    for sub in ("nodes", "apps", "devices"):
        files += sorted((layout.out_dir / sub).glob("*.pem"))

    try:
        ca = pki.load_certificate(layout.ca_cert)
    except pki.PkiError as exc:
        raise CommandError(str(exc)) from None
    now = dt.datetime.now(dt.timezone.utc)
    rows: list[list[str]] = []
    problems = 0
    for path in files:
        try:
            cert = pki.load_certificate(path)
        except pki.PkiError:
            rows.append([str(path.relative_to(layout.out_dir)), "-", "-", "unreadable", "-"])
            problems += 1
            continue
        status = "ok"
        if path != layout.ca_cert:
            try:
                cert.verify_directly_issued_by(ca)
            except (InvalidSignature, ValueError, TypeError):
                status = "not issued by ca.pem"
        if cert.not_valid_after_utc < now:
            status = "EXPIRED" if status == "ok" else f"{status}, EXPIRED"
        elif cert.not_valid_before_utc > now:
            status = "not yet valid" if status == "ok" else f"{status}, not yet valid"
        problems += status != "ok"
        rows.append([str(path.relative_to(layout.out_dir)), cert.subject.rfc4514_string(),
                     f"{cert.not_valid_after_utc:%Y-%m-%d}", status, pki.certificate_fingerprint(cert)])
    print(_table(["FILE", "SUBJECT", "EXPIRES", "STATUS", "SHA-256"], rows))
    print()
    print(f"{len(rows)} certificate(s) in {layout.out_dir}"
          + (f"; {problems} with problems" if problems else ""))
    return 1 if problems else 0
