"""`qkdsdn twin`: the digital twin of the QKD links (emulated devices speaking ETSI 014)."""
from __future__ import annotations

import argparse
import math
import sys

SUBCOMMANDS = ("serve", "rates", "plot", "status", "fault")

TWIN_HELP = "emulated QKD devices: serve them over ETSI 014, show their rates, disturb them"

TWIN_DESCRIPTION = """\
The digital twin stands in for QKD hardware. Every link of the network file
with a 'device' block becomes an emulated device pair: key material accrues at
the rate of the link's physics model (decoy-state BB84 over the fibre, or a
fixed rate) into a bounded buffer, and each end is an ETSI GS QKD 014 KME that
hands it to the key manager of that end (master: enc_keys, slave: dec_keys),
exactly as a hardware KME would. Links with a 'kme' block are real devices and
are left alone.

  qkdsdn twin NETWORK.yaml ...            same as 'qkdsdn twin serve NETWORK.yaml ...'
"""

TWIN_EPILOG = """\
examples:
  qkdsdn pki init examples/paper-poc.yaml --out pki
  qkdsdn twin examples/paper-poc.yaml --pki pki
  qkdsdn twin rates examples/linear-5.yaml
  qkdsdn twin plot examples/linear-5.yaml -o skr.png
  qkdsdn twin fault L01 eve 0.2 --network examples/paper-poc.yaml --pki pki
run 'qkdsdn twin SUBCOMMAND --help' for each subcommand's options.
"""

SERVE_DESCRIPTION = """\
Serve every emulated link of NETWORK.yaml until Ctrl-C (SIGINT) or SIGTERM.

Each link gets two ETSI GS QKD 014 servers at the addresses of the network file
(device.master_address / device.slave_address, else deployment.twin_host and
twin_base_port + 2*i for the master and + 2*i + 1 for the slave of the i-th
link): the master KME serves the link's master node (SAE ID = node name, from
the client certificate's CN), the slave KME the slave node. TLS uses the
device certificates devices/LINK-master.pem and devices/LINK-slave.pem of
--pki DIR and requires a client certificate from its CA.

An admin API listens on 127.0.0.1, port deployment.twin_base_port - 1 unless
--admin-port is given; with TLS it admits the operator certificate only. It
serves 'qkdsdn twin status' and 'qkdsdn twin fault'.
"""

FAULT_DESCRIPTION = """\
Disturb a link of a running twin through its admin API:

  cut                      the fibre is cut: no key accrues (buffered keys stay)
  restore                  clear every disturbance (reconnect, no eavesdropper, no drift)
  eve FRACTION             intercept-resend attack on FRACTION (0..1) of the pulses:
                           QBER rises by FRACTION/4, the key rate falls, and above
                           11 % QBER the devices abort (no key)
  drift RATE               QBER rises by RATE per second (e.g. 0.001), up to
                           --max-qber in total (default: no limit but 0.5)

The new state of the link is printed.
"""

FAULT_EPILOG = """\
examples:
  qkdsdn twin fault L01 cut --network examples/paper-poc.yaml --pki pki
  qkdsdn twin fault L01 eve 0.2 --network examples/paper-poc.yaml --pki pki
  qkdsdn twin fault L45 drift 0.001 --max-qber 0.15 --network examples/paper-poc.yaml --pki pki
"""


class _TwinParser(argparse.ArgumentParser):
    """Reads 'qkdsdn twin NETWORK.yaml ...' as 'qkdsdn twin serve NETWORK.yaml ...'."""

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        if args and args[0] not in SUBCOMMANDS and args[0] not in ("-h", "--help"):
            args.insert(0, "serve")
        return super().parse_known_args(args, namespace)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"port out of range: {value}")
    return value


def _add_security(parser: argparse.ArgumentParser, what: str) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--pki", metavar="DIR",
                       help=f"PKI folder from 'qkdsdn pki init': {what}")
    group.add_argument("--insecure-dev", action="store_true",
                       help="plain HTTP on 127.0.0.1, no TLS, the caller's SAE ID from a request header "
                            "(development only; never with real keys)")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("twin", help=TWIN_HELP, description=TWIN_DESCRIPTION, epilog=TWIN_EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.__class__ = _TwinParser  # argparse builds the parser; we only change how it reads argv
    sub = parser.add_subparsers(dest="twin_command", metavar="SUBCOMMAND", parser_class=argparse.ArgumentParser)
    sub.required = True

    serve = sub.add_parser("serve", help="serve every emulated link over ETSI 014 (the default)",
                           description=SERVE_DESCRIPTION, epilog=TWIN_EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("network", metavar="NETWORK.yaml", help="the network file")
    _add_security(serve, "the KMEs present their device certificates and require client certificates "
                         "from its CA (required unless --insecure-dev)")
    serve.add_argument("--admin-port", type=_port, metavar="N",
                       help="port of the admin API on 127.0.0.1 (default: deployment.twin_base_port - 1)")
    serve.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                       help="log verbosity on stderr (default info)")
    serve.set_defaults(func=cmd_serve)

    rates = sub.add_parser("rates", help="expected key rate and QBER of every link (physics model)",
                           description="Print the physics model's expected secret key rate, QBER and "
                                       "cut-off distance of every link of NETWORK.yaml. Nothing is served.")
    rates.add_argument("network", metavar="NETWORK.yaml", help="the network file")
    rates.set_defaults(func=cmd_rates)

    plot = sub.add_parser("plot", help="plot key rate against fibre length for the network's devices",
                          description="Write a PNG of the expected secret key rate (log scale) against "
                                      "fibre length for every distinct device of NETWORK.yaml, with the "
                                      "PLOB bound and every link marked at its length.")
    plot.add_argument("network", metavar="NETWORK.yaml", help="the network file")
    plot.add_argument("-o", "--output", metavar="FILE.png", required=True, help="the image to write")
    plot.add_argument("--max-km", type=_fraction, default=300.0, metavar="KM",
                      help="longest fibre on the x axis (default 300)")
    plot.set_defaults(func=cmd_plot)

    status = sub.add_parser("status", help="live state of every link of a running twin",
                            description="Ask a running twin's admin API for the state, QBER, measured key "
                                        "rate and buffer of every emulated link.")
    status.add_argument("network", metavar="NETWORK.yaml", help="the network file the twin serves")
    _add_security(status, "authenticate with its operator certificate (required unless --insecure-dev)")
    status.add_argument("--admin-port", type=_port, metavar="N",
                        help="the twin's admin port (default: deployment.twin_base_port - 1)")
    status.set_defaults(func=cmd_status)

    fault = sub.add_parser("fault", help="cut, restore, eavesdrop on or drift a link of a running twin",
                           description=FAULT_DESCRIPTION, epilog=FAULT_EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    fault.add_argument("link", metavar="LINK", help="link name")
    fault.add_argument("action", choices=("cut", "restore", "eve", "drift"), help="the disturbance")
    fault.add_argument("value", nargs="?", type=_fraction, metavar="VALUE",
                       help="eve: fraction of pulses attacked (0..1); drift: QBER increase per second")
    fault.add_argument("--max-qber", type=_fraction, metavar="Q",
                       help="drift: the QBER stops rising at Q (0..0.5)")
    fault.add_argument("--network", metavar="NETWORK.yaml", required=True,
                       help="the network file the twin serves (admin port, link names)")
    _add_security(fault, "authenticate with its operator certificate (required unless --insecure-dev)")
    fault.add_argument("--admin-port", type=_port, metavar="N",
                       help="the twin's admin port (default: deployment.twin_base_port - 1)")
    fault.set_defaults(func=cmd_fault)


# --------------------------------------------------------------------------- handlers


def _layout(args):
    from qkdsdn.cli import CommandError
    from qkdsdn.pki import PkiLayout

    if args.pki is None:
        if not args.insecure_dev:
            raise CommandError("give --pki DIR (certificates from 'qkdsdn pki init'), or --insecure-dev "
                               "for plain HTTP on loopback during development")
        return None
    layout = PkiLayout(args.pki)
    if not layout.ca_cert.is_file():
        raise CommandError(f"{layout.ca_cert} not found: run 'qkdsdn pki init NETWORK.yaml --out {args.pki}'")
    return layout


def cmd_serve(args) -> int:
    import logging

    from qkdsdn.cli import CommandError
    from qkdsdn.commands.common import load_network
    from qkdsdn.twin.service import TwinService

    network = load_network(args.network)
    layout = _layout(args)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        service = TwinService(network, pki=layout, insecure_dev=args.insecure_dev, admin_port=args.admin_port)
        service.start()
    except (ValueError, FileNotFoundError, OSError) as exc:
        raise CommandError(f"cannot start the twin: {exc}") from None
    skipped = [link.name for link in network.links if link.device is None]
    print(f"twin of network {network.name}: {len(service.links)} emulated link(s)"
          + (f", {len(skipped)} real device link(s) skipped ({', '.join(skipped)})" if skipped else ""))
    for name, tl in service.links.items():
        print(f"  {name:<12} {tl.link.master} -> {tl.link.slave}   master KME {tl.master.url}   "
              f"slave KME {tl.slave.url}")
    print(f"  admin API    {service.admin_url}")
    print("serving; Ctrl-C to stop", flush=True)
    service.serve_forever()
    return 0


def cmd_rates(args) -> int:
    from qkdsdn.commands.common import load_network
    from qkdsdn.twin.physics import rates_table

    network = load_network(args.network)
    print(f"network {network.name}: expected secret key rates (physics model)")
    print(rates_table(network), end="")
    return 0


def cmd_plot(args) -> int:
    from qkdsdn.cli import CommandError
    from qkdsdn.commands.common import load_network
    from qkdsdn.twin.plot import plot_skr_vs_distance

    network = load_network(args.network)
    if not any(link.device is not None for link in network.links):
        raise CommandError(f"network {network.name} has no emulated device to plot")
    if args.max_km <= 0:
        raise CommandError("--max-km must be positive")
    try:
        plot_skr_vs_distance(network, args.output, max_km=args.max_km)
    except OSError as exc:
        raise CommandError(f"cannot write {args.output}: {exc.strerror or exc}") from None
    print(f"wrote {args.output}")
    return 0


def _admin_call(args, method: str, path: str, body: dict | None = None) -> dict:
    import requests

    from qkdsdn.cli import CommandError
    from qkdsdn.commands.common import load_network
    from qkdsdn.httpserver import https_session
    from qkdsdn.twin.service import admin_client_url

    network = load_network(args.network)
    layout = _layout(args)
    url = admin_client_url(network, layout, args.admin_port) + path
    if layout is None:
        session = requests.Session()
        session.trust_env = False
    else:
        cert, key = layout.operator()
        try:
            session = https_session(cert, key, layout.ca_cert)
        except FileNotFoundError as exc:
            raise CommandError(str(exc)) from None
    try:
        with session:
            resp = session.request(method, url, json=body, timeout=10)
    except requests.exceptions.RequestException as exc:
        raise CommandError(f"cannot reach the twin's admin API at {url}: {exc.__class__.__name__}; "
                           "is 'qkdsdn twin serve' running with the same network file and security "
                           "options?") from None
    try:
        data = resp.json()
    except ValueError:
        data = {"message": resp.text.strip()[:200]}
    if resp.status_code != 200:
        raise CommandError(f"the twin refused: {data.get('message', resp.status_code)}")
    return data


def _print_links(links: list[dict]) -> None:
    from qkdsdn.twin.physics import format_bps

    header = ("link", "ends", "state", "QBER", "measured SKR", "model SKR", "buffer", "pending", "faults")
    rows = []
    for v in links:
        faults = []
        if v["eve_fraction"]:
            faults.append(f"eve {v['eve_fraction']:g}")
        if v["drift_qber_per_s"] or v["qber_drift"]:
            limit = f" max {v['drift_max_qber']:g}" if v["drift_max_qber"] is not None else ""
            faults.append(f"drift {v['drift_qber_per_s']:g}/s{limit} (+{v['qber_drift'] * 100:.2f} %)")
        fill = v["available_bits"] / v["buffer_bits"] if v["buffer_bits"] else 0.0
        rows.append((v["name"], f"{v['master']} -> {v['slave']}", v["state"], f"{v['qber'] * 100:.2f} %",
                     format_bps(v["skr_bps"]), format_bps(v["model_skr_bps"]),
                     f"{v['available_bits']} b ({fill:.0%})", str(v["pending_keys"]), ", ".join(faults) or "-"))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        reason = next(v["reason"] for v in links if v["name"] == r[0])
        if reason:
            print(f"    {reason}")


def cmd_status(args) -> int:
    data = _admin_call(args, "GET", "/links")
    _print_links(data["links"])
    return 0


def cmd_fault(args) -> int:
    from urllib.parse import quote

    from qkdsdn.cli import CommandError

    body: dict = {"action": args.action}
    if args.action in ("eve", "drift"):
        if args.value is None:
            what = "the attacked fraction (0..1)" if args.action == "eve" else "the QBER increase per second"
            raise CommandError(f"'{args.action}' needs a VALUE: {what}")
        body["fraction" if args.action == "eve" else "qber_per_s"] = args.value
    elif args.value is not None:
        raise CommandError(f"'{args.action}' takes no VALUE")
    if args.max_qber is not None:
        if args.action != "drift":
            raise CommandError("--max-qber applies to 'drift' only")
        body["max_qber"] = args.max_qber
    view = _admin_call(args, "POST", f"/links/{quote(args.link, safe='')}/fault", body)
    _print_links([view])
    return 0
