"""Multi-host: every agent in its own Linux network namespace, with its own address.

The test builds a small private network that exists only for its duration: a "hub"
namespace holding a bridge, one namespace per key manager joined to the bridge by a veth
pair (address 10.250.0.1x/24 on its eth0), and one veth pair from the root namespace to the
bridge (10.250.0.1/24), where the digital twin, the controller and the MQTT broker listen.
Nothing is routed anywhere else; everything is removed in ``finally``. Agents reach the
twin, the broker, the controller and each other only across namespaces, so no part of the
system may assume one host (127.0.0.1 is per namespace). Mutual TLS throughout, with the
certificates issued for those addresses.

Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) and iproute2; skips with the reason otherwise.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import uuid

import pytest
import yaml

from qkdsdn.launch import NetworkRun, RunDir, UpOptions, controller_available, free_ports
from up_helpers import EXAMPLES, clients, exchange_keys, wait_gone, wait_pools

SUBNET = "10.250.0"
ROOT_ADDR = f"{SUBNET}.1"


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


class PrivateNet:
    """Namespaces, bridge and veths of one test; ``remove`` undoes all of it."""

    def __init__(self, nodes: list[str]):
        self.tag = uuid.uuid4().hex[:6]
        self.hub = f"qkt{self.tag}hub"
        self.ns = {node: f"qkt{self.tag}{node.lower()}" for node in nodes}
        self.addr = {node: f"{SUBNET}.{10 + i}" for i, node in enumerate(nodes)}
        self.root_if = f"qk{self.tag}r"
        self.created: list[str] = []

    def create(self) -> None:
        ip("netns", "add", self.hub)
        self.created.append(self.hub)
        ip("-n", self.hub, "link", "set", "lo", "up")
        ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        ip("-n", self.hub, "link", "set", "br0", "up")
        # root namespace <-> bridge
        ip("link", "add", self.root_if, "type", "veth", "peer", "name", f"qk{self.tag}rh")
        ip("link", "set", f"qk{self.tag}rh", "netns", self.hub)
        ip("-n", self.hub, "link", "set", f"qk{self.tag}rh", "master", "br0", "up")
        ip("addr", "add", f"{ROOT_ADDR}/24", "dev", self.root_if)
        ip("link", "set", self.root_if, "up")
        for i, (node, ns) in enumerate(self.ns.items()):
            ip("netns", "add", ns)
            self.created.append(ns)
            inner, outer = f"qk{self.tag}a{i}", f"qk{self.tag}b{i}"
            ip("link", "add", inner, "type", "veth", "peer", "name", outer)
            ip("link", "set", inner, "netns", ns)
            ip("link", "set", outer, "netns", self.hub)
            ip("-n", self.hub, "link", "set", outer, "master", "br0", "up")
            ip("-n", ns, "link", "set", inner, "name", "eth0")
            ip("-n", ns, "addr", "add", f"{self.addr[node]}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "link", "set", "lo", "up")

    def remove(self) -> None:
        ip("link", "del", self.root_if, check=False)
        for ns in reversed(self.created):
            ip("netns", "del", ns, check=False)

    def identify(self, pid: int) -> str:
        return ip("netns", "identify", str(pid)).stdout.strip()


@pytest.fixture
def private_net():
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (CAP_NET_ADMIN, CAP_SYS_ADMIN)")
    if shutil.which("ip") is None:
        pytest.skip("iproute2 ('ip') is not installed")
    routes = ip("-4", "route", "show", check=False).stdout + ip("-4", "addr", "show", check=False).stdout
    if f"{SUBNET}." in routes:
        pytest.skip(f"{SUBNET}.0/24 is already in use on this host")
    net = PrivateNet([f"KM{i}" for i in range(6)])
    probe = f"qkt{net.tag}probe"
    r = ip("netns", "add", probe, check=False)
    if r.returncode != 0:
        pytest.skip(f"'ip netns add' failed: {r.stderr.strip() or r.returncode}")
    ip("netns", "del", probe, check=False)
    try:
        net.create()
        yield net
    finally:
        net.remove()
        leftovers = [ns for ns in ip("netns", "list", check=False).stdout.split() if ns.startswith(f"qkt{net.tag}")]
        assert leftovers == [], leftovers


def network_file(net: PrivateNet, out) -> object:
    """paper-poc with every key manager on its namespace's address, the twin and controller on the
    root end of the private network."""
    data = yaml.safe_load((EXAMPLES / "paper-poc.yaml").read_text())
    data["network"]["name"] = f"netns-{net.tag}"
    for node in data["nodes"]:
        node["km_address"] = f"{net.addr[node['name']]}:8400"
    ports = iter(free_ports(2 * len(data["links"]) + 2, host=ROOT_ADDR))
    for link in data["links"]:
        link["device"] = dict(link["device"], master_address=f"{ROOT_ADDR}:{next(ports)}",
                              slave_address=f"{ROOT_ADDR}:{next(ports)}")
    admin = next(ports)
    data["deployment"] = {"controller": f"{ROOT_ADDR}:{next(ports)}", "bus": "embedded",
                          "twin_host": ROOT_ADDR, "twin_base_port": admin + 1}
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def run_in_namespaces(net: PrivateNet, tmp_path, *, controller: bool) -> None:
    path = network_file(net, tmp_path / "netns.yaml")
    opts = UpOptions(network_file=path, run_dir=tmp_path / "run", controller=controller,
                     node_prefix={node: ["ip", "netns", "exec", ns] for node, ns in net.ns.items()})
    run = NetworkRun(opts, grace_s=10.0)
    pids: list[int] = []
    try:
        run.start()
        procs = {p.name: p for p in run.processes}
        pids = [p.pid for p in procs.values()]
        for node, ns in net.ns.items():
            assert net.identify(procs[f"agent-{node}"].pid) == ns  # really in its own namespace
        assert net.identify(procs["twin"].pid) == ""  # the root namespace
        if controller:
            assert run.bus_url.startswith(f"mqtts://{ROOT_ADDR}:")  # mutual TLS on the bus as well
        wait_pools(tmp_path / "run", run.opts.network_file)
        make = clients(run.opts.network_file, run.state())
        exchange_keys(make, "SAE-KM2", "SAE-KM3")  # relayed KM2 -> KM0 -> KM3 across three namespaces
        exchange_keys(make, "SAE-KM4", "SAE-KM5")
    finally:
        run.stop()
    assert wait_gone(pids) == []
    assert RunDir(tmp_path / "run").read_state()["status"] == "stopped"


def test_agents_in_their_own_namespaces_with_the_local_control_plane(private_net, tmp_path):
    run_in_namespaces(private_net, tmp_path, controller=False)


@pytest.mark.skipif(not controller_available(), reason="'qkdsdn controller' is not available in this installation")
def test_agents_in_their_own_namespaces_with_controller_and_broker(private_net, tmp_path):
    run_in_namespaces(private_net, tmp_path, controller=True)
