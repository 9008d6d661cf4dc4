"""A whole network on loopback for tests: digital twin + one agent per node, real HTTP(S)."""
from __future__ import annotations

import socket
import time
from contextlib import ExitStack, closing
from pathlib import Path

import requests
import yaml

from db.netfile import load

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def relocate(source: Path, out: Path, *, devices: dict | None = None, edit=None) -> Path:
    """Copy a network file with every listener on a free loopback port (and optional device
    overrides; ``edit(data)`` may change the parsed file first)."""
    data = yaml.safe_load(source.read_text())
    if edit is not None:
        edit(data)
    ports = iter(free_ports(len(data["nodes"]) + 2 * len(data["links"])))
    for node in data["nodes"]:
        node["km_address"] = f"127.0.0.1:{next(ports)}"
    for link in data["links"]:
        dev = dict(link.get("device") or {})
        dev.update(devices or {})
        dev["master_address"] = f"127.0.0.1:{next(ports)}"
        dev["slave_address"] = f"127.0.0.1:{next(ports)}"
        link["device"] = dev
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


class Network:
    """Twin + agents of a network file, started in this process."""

    def __init__(self, path: Path, state: Path, *, tls: bool, nodes=None, pool_max_bits: int = 2 ** 20,
                 link_workers: bool = True):
        from qkdsdn.pki import PkiLayout, init_pki

        self.path, self.state, self.tls = path, state, tls
        self.net = load(path)
        self.pki = None
        if tls:
            init_pki(self.net, state / "pki")
            self.pki = PkiLayout(state / "pki")
        self.names = nodes or [n.name for n in self.net.nodes]
        self.pool_max_bits = pool_max_bits
        self.link_workers = link_workers  # False: no pool filling; the test puts link key in the stores
        self.stack = ExitStack()
        self.agents = {}

    def __enter__(self) -> "Network":
        from agents.service import KeyManagerAgent
        from qkdsdn.twin.service import TwinService

        twin = TwinService(self.net, pki=self.pki, insecure_dev=not self.tls, admin_port=free_ports(1)[0])
        twin.start()
        self.stack.callback(twin.stop)
        self.twin = twin
        for name in self.names:
            self.start_agent(name)
        return self

    def start_agent(self, name: str):
        from agents.service import KeyManagerAgent

        agent = KeyManagerAgent(self.net, name, state_dir=self.state / name, pki=self.pki,
                                insecure_dev=not self.tls, pool_max_bits=self.pool_max_bits,
                                link_workers=self.link_workers)
        agent.start()
        self.agents[name] = agent
        return agent

    def stop_agent(self, name: str) -> None:
        self.agents.pop(name).stop()

    def __exit__(self, *exc) -> None:
        for name in list(self.agents):
            self.stop_agent(name)
        self.stack.close()

    def client(self, sae: str):
        from agents.client import KeyManagerClient

        app = next(a for a in self.net.applications if a.sae_id == sae)
        node = self.net.node(app.node)
        if self.tls:
            cert, key = self.pki.app(sae)
            return KeyManagerClient(f"https://{node.km_address}", cert=(str(cert), str(key)), ca=str(self.pki.ca_cert))
        return KeyManagerClient(f"http://{node.km_address}", dev_sae_id=sae)

    def url(self, node: str) -> str:
        return f"{'https' if self.tls else 'http'}://{self.net.node(node).km_address}"

    def session(self, kind: str, name: str | None = None) -> requests.Session:
        """An HTTP(S) session that calls as ``kind`` ("sae", "node", "controller", "operator"):
        its certificate under TLS, the development identity header otherwise."""
        from qkdsdn.httpserver import https_session

        if not self.tls:
            session = requests.Session()
            session.headers["X-QKDSDN-Dev-Identity"] = f"{kind}:{name}" if name else kind
            return session
        pair = {"sae": lambda: self.pki.app(name), "node": lambda: self.pki.node(name),
                "controller": lambda: self.pki.controller(), "operator": lambda: self.pki.operator()}[kind]()
        return https_session(pair[0], pair[1], self.pki.ca_cert)

    def qkdn_id(self, node: str) -> str:
        return self.net.node(node).qkdn_id

    def link(self, a: str, b: str):
        """The physical link between two nodes."""
        return next(link for link in self.net.links if set(link.ends) == {a, b})

    def wait_for_pools(self, bits: int = 8 * 1024, timeout: float = 20.0) -> None:
        """Until every link end holds some key (link-key pools filled from the twin)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(agent.store.available_bits(link.qkdl_id) >= bits
                   for agent in self.agents.values() for link in agent._links.values()
                   if link.qkdl_id in agent.workers):
                return
            time.sleep(0.05)
        raise TimeoutError("link-key pools did not fill")
