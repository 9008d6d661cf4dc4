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


def relocate(source: Path, out: Path, *, devices: dict | None = None) -> Path:
    """Copy a network file with every listener on a free loopback port (and optional device overrides)."""
    data = yaml.safe_load(source.read_text())
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

    def __init__(self, path: Path, state: Path, *, tls: bool, nodes=None, pool_max_bits: int = 2 ** 20):
        from qkdsdn.pki import PkiLayout, init_pki

        self.path, self.state, self.tls = path, state, tls
        self.net = load(path)
        self.pki = None
        if tls:
            init_pki(self.net, state / "pki")
            self.pki = PkiLayout(state / "pki")
        self.names = nodes or [n.name for n in self.net.nodes]
        self.pool_max_bits = pool_max_bits
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
                                insecure_dev=not self.tls, pool_max_bits=self.pool_max_bits)
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
