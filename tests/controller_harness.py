"""Emulated nodes for running the controller in-process: the tests' and the controller benchmark's.

``network_file`` copies an example network under a unique name with every listener on a free
loopback port. ``EmulatedNode`` is one node as the controller sees it: its ETSI 015 RESTCONF
server (``agents.sdn_agent``: NodeState + restconf_blueprint on qkdsdn.httpserver), its
notifications published on ``notifications/<node>``, its status retained on ``status/agent-<node>``,
and a key-manager stand-in on the bus that answers every ``km/<node>/config`` the way a key manager
does (``reply_message``) and sends admission requests the way a key manager does (``bus.request``
/ ``publish`` on ``admission/request``). What a node does with a configuration before it answers
(check it, record it, refuse it, time it) is its subclass's ``on_config``.
"""
from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, Callable

import yaml

from agent_harness import free_ports

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def network_file(tmp_path: Path, source: str = "paper-poc.yaml", *, prefix: str = "ctl",
                 edit: Callable[[dict], Any] | None = None) -> Path:
    """The example with a unique network name (topics, client ids) and free loopback ports;
    ``edit(data)`` may change the parsed file before it is written."""
    data = yaml.safe_load((EXAMPLES / source).read_text())
    data["network"]["name"] = f"{prefix}-{uuid.uuid4().hex[:8]}"
    ports = iter(free_ports(len(data["nodes"]) + 2 * len(data["links"]) + 1))
    for node in data["nodes"]:
        node["km_address"] = f"127.0.0.1:{next(ports)}"
    for link in data["links"]:
        dev = dict(link.get("device") or {})
        dev["master_address"] = f"127.0.0.1:{next(ports)}"
        dev["slave_address"] = f"127.0.0.1:{next(ports)}"
        link["device"] = dev
    data.setdefault("deployment", {})["controller"] = f"127.0.0.1:{next(ports)}"
    if edit is not None:
        edit(data)
    out = tmp_path / "network.yaml"
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


class EmulatedNode:
    """One node: its ETSI 015 RESTCONF server, its notifications on the bus, a key-manager stand-in.

    ``make_bus(client_id, status_topic)`` gives the node's bus client. Every configuration is
    answered ok unless ``on_config`` returns a reason to refuse it.
    """

    def __init__(self, net, name: str, make_bus: Callable[[str, str], Any]):
        from flask import Flask

        from agents.sdn_agent import NodeState, restconf_blueprint
        from qkdsdn.bus import Topics
        from qkdsdn.httpserver import HTTPServer

        self.net, self.name = net, name
        self.topics = Topics(net.name)
        self.qkdn_id = net.node(name).qkdn_id
        self.state = NodeState.from_network(net, name, perf_change_threshold=0.0)
        app = Flask(f"emulated-{name}")
        app.register_blueprint(restconf_blueprint(self.state, self, lambda environ, method, path: True))
        node = net.node(name)
        self.server = HTTPServer(app, node.km_host, node.km_port, tls=None, insecure_dev=True,
                                 name=f"emulated {name}")
        self.bus = make_bus(f"{net.name}-agent-{name}", self.topics.status(f"agent-{name}"))
        self.bus.subscribe(self.topics.km_config(name), self._on_config)
        self.state.subscribe(self._notify)
        self.server.start()

    # SessionConfigHandler of the RESTCONF datastore (the controller configures over the bus)
    def configure(self, config) -> None:
        pass

    def deconfigure(self, ksid: str) -> None:
        pass

    def on_config(self, op: str, ksid: str, msg: dict) -> str | None:
        """A ``configure`` or ``deconfigure`` has arrived: the reason to refuse it, or None to confirm it."""
        return None

    def _on_config(self, topic: str, msg: dict) -> None:
        from qkdsdn.bus import reply_message

        op, ksid = msg["op"], msg["ksid"]
        refuse = self.on_config(op, ksid, msg)
        self.bus.publish(self.topics.km_reply(self.name),
                         reply_message(msg, refuse is None, refuse, node=self.name, op=op, ksid=ksid))

    def _notify(self, notification, event_time) -> None:
        from etsi015 import codec

        self.bus.publish(self.topics.notifications(self.name),
                         codec.encode_notification(notification, event_time=event_time))

    def links_up(self, skr: int = 200_000, qber: float = 0.02) -> None:
        """Every link of the node ACTIVE at ``skr`` bits/s: discovery makes each routable."""
        from etsi015 import model as em

        for link in self.net.links_of(self.name):
            self.state.set_link_status(link.qkdl_id, em.LinkStatus.ACTIVE)
            self.state.set_link_performance(link.qkdl_id, skr=skr, qber=qber)

    def request(self, payload: dict, timeout: float = 20.0) -> dict:
        """An admission request from this node's key manager, and its answer."""
        return self.bus.request(self.topics.admission_request(), {"node": self.name, **payload},
                                reply_topic=self.topics.admission_reply(self.name), timeout=timeout)

    def publish(self, payload: dict) -> None:
        """An admission message from this node's key manager that is not answered (close, key_request)."""
        self.bus.publish(self.topics.admission_request(), {"node": self.name, **payload})

    def stop(self) -> None:
        self.server.stop()
