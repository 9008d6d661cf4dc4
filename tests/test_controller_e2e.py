"""The whole chain in one process: digital twin, real agents on the bus, the controller's apps.

Applications call their key managers (ETSI 004 and 014); the key managers ask access and
admission control over the bus; the controller routes, reserves and configures every key
manager on the route over ``km/<node>/config``; the key managers relay and deliver the keys.
Four nodes of the paper's network run (KM0..KM3): KM2 -> KM3 is relayed through KM0, KM0 -> KM1
is adjacent.
"""
from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import select

from agent_harness import free_ports
from controller.apps.base import ROUTING
from controller.launcher import Controller, ControllerOptions
from db import models as dbm
from db.netfile import load
from qkdsdn.bus import Topics
from test_controller_apps import FAST, MQTT_URL, NO_MQTT, WAIT, BusKind, network_file, wait_for

NODES = ("KM0", "KM1", "KM2", "KM3")


@pytest.fixture(params=["local", "embedded", "mosquitto"])
def chain(request, tmp_path):
    from agents.service import KeyManagerAgent
    from qkdsdn.twin.service import TwinService

    if request.param == "mosquitto" and not MQTT_URL:
        pytest.skip(NO_MQTT)
    net = load(network_file(tmp_path))
    topics = Topics(net.name)
    buses = BusKind(request.param)
    twin = TwinService(net, pki=None, insecure_dev=True, admin_port=free_ports(1)[0])
    twin.start()
    agents = {}
    controller = None
    try:
        for name in NODES:
            bus = buses.bus(f"{net.name}-agent-{name}", status_topic=topics.status(f"agent-{name}"))
            agents[name] = KeyManagerAgent(net, name, state_dir=tmp_path / name, insecure_dev=True,
                                           pool_max_bits=2 ** 20, bus=bus).start()
        controller = Controller(ControllerOptions(network=net, db_url=f"sqlite:///{tmp_path / 'c.db'}",
                                                  bus_url=buses.controller_url, insecure_dev=True, config=FAST))
        controller.start()
        # L01, L02, L03 carry key between running agents; the links to KM4 and KM5 do not.
        wait_for(lambda: controller.health()[ROUTING]["routable_links"] == 3, "the running agents' links",
                 timeout=60)
        yield net, controller
    finally:
        if controller is not None:
            controller.stop()
        for agent in agents.values():
            agent.stop()
        twin.stop()
        buses.close(extra_clients=[f"{net.name}-controller"], extra_retained=[topics.status("controller")])


def client(net, sae: str):
    from agents.client import KeyManagerClient

    app = next(a for a in net.applications if a.sae_id == sae)
    return KeyManagerClient(f"http://{net.node(app.node).km_address}", dev_sae_id=sae, timeout=WAIT)


def session_row(controller, ksid: str):
    with controller.services.session_factory() as s:
        return s.scalar(select(dbm.Session).where(dbm.Session.ksid == ksid))


def test_relayed_etsi004_session_through_the_controller(chain):
    from agents.core.session import QoS

    net, controller = chain
    km2, km3 = client(net, "SAE-KM2"), client(net, "SAE-KM3")
    ksid = str(uuid.uuid4())
    qos = QoS(Key_chunk_size=32, Max_bps=8000, Timeout=15_000, TTL=60)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(km2.open_connect, "SAE-KM2", "SAE-KM3", qos, ksid)
        wait_for(lambda: session_row(controller, ksid) is not None, "the pending session")
        second = pool.submit(km3.open_connect, "SAE-KM2", "SAE-KM3", qos, ksid)
        opened = [first.result(WAIT), second.result(WAIT)]
    assert [o.status for o in opened] == [0, 0], [o.message for o in opened]
    # A key manager answers its application once it is configured itself; admission control
    # counts the session active once every key manager on the route confirmed.
    wait_for(lambda: session_row(controller, ksid).state is dbm.SessionState.ACTIVE, "the active session")
    assert session_row(controller, ksid).route == ["KM2", "KM0", "KM3"]

    for index in range(3):
        k2, k3 = km2.get_key(ksid, timeout=WAIT), km3.get_key(ksid, timeout=WAIT)
        assert (k2.status, k3.status, k2.index, k3.index) == (0, 0, index, index)
        assert k2.key == k3.key and len(k2.key) == 32

    assert km2.close(ksid) == 0
    km3.close(ksid)
    wait_for(lambda: session_row(controller, ksid).state is dbm.SessionState.TERMINATED, "the closed session")
    with controller.services.session_factory() as s:
        kinds = {e.kind for e in s.scalars(select(dbm.Event).where(dbm.Event.ksid == ksid))}
        # Admission control's own events and the key managers' (stored from the bus).
        assert {"session_pending", "session_active", "session_terminated"} <= kinds
        assert s.scalar(select(dbm.Event).where(dbm.Event.ksid == ksid, dbm.Event.element == "key_manager"))


def test_adjacent_etsi014_keys_through_the_controller(chain):
    net, controller = chain
    master, slave = client(net, "SAE-KM0"), client(net, "SAE-KM1")
    keys = master.enc_keys("SAE-KM1", number=2, size=256)
    assert len(keys) == 2
    assert slave.dec_keys("SAE-KM0", [k for k, _ in keys]) == keys
    with controller.services.session_factory() as s:
        row = s.scalar(select(dbm.Session).where(dbm.Session.src_sae_id == "SAE-KM0"))
        assert row.interface == "014" and row.route == ["KM0", "KM1"]
    wait_for(lambda: session_row(controller, row.ksid).state is dbm.SessionState.ACTIVE, "the active session")


def test_refusals_reach_the_application(chain):
    from agents.client import ETSI014Error
    from agents.core.session import QoS

    net, controller = chain
    km2 = client(net, "SAE-KM2")
    # carol's SLA allows 32000 bit/s: ETSI 004 status 7 and the counter-proposal.
    opened = km2.open_connect("SAE-KM2", "SAE-KM3", QoS(Key_chunk_size=32, Max_bps=64_000, Timeout=5000))
    assert opened.status == 7 and opened.qos.Max_bps == 32000
    # KM4 does not run: there is no path.
    with pytest.raises(ETSI014Error):
        client(net, "SAE-KM0").enc_keys("SAE-KM4", number=1)
    with controller.services.session_factory() as s:
        assert s.scalar(select(dbm.Event).where(dbm.Event.kind == "request_rejected")) is not None


def test_etsi014_multicast_and_status_through_the_controller(chain):
    """additional_slave_SAE_IDs with the controller admitting and routing every member session
    (adjacent and relayed); ETSI 014 status in bus mode reports the route and the key at hand."""
    net, controller = chain
    master = client(net, "SAE-KM1")
    status = client(net, "SAE-KM2").status("SAE-KM3")
    assert status["status_extension"] == {"qkdsdn_route_hops": 1}  # KM2 - KM0 - KM3
    wait_for(lambda: client(net, "SAE-KM2").status("SAE-KM3")["stored_key_count"] > 0, "key at hand on L02")
    assert master.status("SAE-KM0")["max_SAE_ID_count"] == 16
    # Two members share L01 (each reserves bob's 64 kb/s of its 200 kb/s); one is relayed.
    keys = master.enc_keys("SAE-KM0", number=2, additional_slave_sae_ids=["SAE-KM2"])
    assert len(keys) == 2
    for sae in ("SAE-KM0", "SAE-KM2"):
        assert client(net, sae).dec_keys("SAE-KM1", [k for k, _ in keys]) == keys
    with controller.services.session_factory() as s:
        rows = s.scalars(select(dbm.Session).where(dbm.Session.src_sae_id == "SAE-KM1")).all()
        routes = sorted((r.dst_sae_id, r.route) for r in rows)
    assert routes == [("SAE-KM0", ["KM1", "KM0"]), ("SAE-KM2", ["KM1", "KM0", "KM2"])]
