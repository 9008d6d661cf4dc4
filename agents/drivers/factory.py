"""Build the device driver of one link end from the network file.

* A link with an emulated ``device``: the digital twin's KME for that end, at
  ``Network.twin_addresses(link)``, reached with the node's certificate from the
  PKI folder (its CN, the node name, is the SAE ID the twin expects).
* A link with a real ``kme``: the URL of the node's end, with the certificate,
  key and CA given there (paths relative to the network file), else the node's
  certificate from the PKI folder. The peer's SAE ID is the other end's
  ``sae_id``, else the other node's name.
"""
from __future__ import annotations

import os
from pathlib import Path

from agents.drivers.etsi014 import ETSI014Device
from db.netfile import Link, Network


def _pki_layout(pki):
    from qkdsdn.pki import PkiLayout

    return pki if isinstance(pki, PkiLayout) else PkiLayout(pki)


def _resolve(network: Network, path: str | None) -> str | None:
    if path is None:
        return None
    p = Path(path).expanduser()
    if not p.is_absolute() and network.source:
        p = Path(network.source).resolve().parent / p
    return str(p)


def device_for_link_end(network: Network, link: Link | str, node: str, *,
                        pki: "str | os.PathLike[str] | object | None" = None,
                        insecure_dev: bool = False, timeout: float = 5.0) -> ETSI014Device:
    """The ETSI 014 driver that ``node``'s key manager uses on ``link``.

    ``pki`` is a PKI folder or ``PkiLayout`` (``qkdsdn pki init``); ``insecure_dev``
    reaches a twin served with ``--insecure-dev`` over plain HTTP on loopback.
    """
    if isinstance(link, str):
        try:
            link = network.link(link)
        except KeyError:
            raise ValueError(f"no link named {link!r} in network {network.name}") from None
    if node not in link.ends:
        raise ValueError(f"node {node!r} is not an end of link {link.name} ({link.master} - {link.slave})")
    is_master = node == link.master
    other = link.slave if is_master else link.master
    layout = _pki_layout(pki) if pki is not None else None

    if link.device is not None:
        address = network.twin_addresses(link)[0 if is_master else 1]
        if insecure_dev:
            return ETSI014Device(f"http://{address}", other, timeout=timeout, insecure_dev_sae_id=node)
        if layout is None:
            raise ValueError(f"link {link.name} is emulated: give the PKI folder (qkdsdn pki init) for "
                             "mutual TLS with the twin, or insecure_dev for a development twin")
        cert, key = layout.node(node)
        return ETSI014Device(f"https://{address}", other, str(cert), str(key), str(layout.ca_cert),
                             timeout=timeout)

    if link.kme is None:  # the parser gives every link one or the other
        raise ValueError(f"link {link.name} has neither an emulated device nor a kme")
    own = link.kme.master if is_master else link.kme.slave
    peer_end = link.kme.slave if is_master else link.kme.master
    peer = peer_end.sae_id or other
    cert, key, ca = _resolve(network, own.cert), _resolve(network, own.key), _resolve(network, own.ca)
    if layout is not None:
        if cert is None and key is None:
            node_cert, node_key = layout.node(node)
            cert, key = str(node_cert), str(node_key)
        if ca is None:
            ca = str(layout.ca_cert)
    if own.url.startswith("http://"):
        if not insecure_dev:
            raise ValueError(f"link {link.name}: {own.url} is plain HTTP; ETSI 014 needs https:// with "
                             "mutual TLS (plain HTTP only in development mode)")
        return ETSI014Device(own.url, peer, timeout=timeout, insecure_dev_sae_id=own.sae_id or node)
    if cert is None or key is None:
        role = "master" if is_master else "slave"
        raise ValueError(f"link {link.name}: no client certificate for {node}: set kme.{role}.cert and "
                         f"kme.{role}.key in the network file, or give the PKI folder")
    return ETSI014Device(own.url, peer, cert, key, ca, timeout=timeout)
