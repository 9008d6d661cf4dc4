"""One index, one key; routes that heal: the key managers of R0 - R1 - R2 (mutual TLS, in this
process) when a relay's confirmation is lost, when a slave's key manager restarts under a
multicast group, and when a destination restarts in the middle of an ETSI 004 session."""
from __future__ import annotations

import pytest
import requests

from agent_harness import Network, relocate
from agents.client import ETSI014Error
from test_agent_restart import NETWORK
from test_agent_restart import open_pair as open_both


@pytest.fixture()
def net(tmp_path):
    (tmp_path / "source.yaml").write_text(NETWORK)
    path = relocate(tmp_path / "source.yaml", tmp_path / "net.yaml")
    with Network(path, tmp_path, tls=True) as network:
        network.wait_for_pools(bits=65536)
        yield network


def open_pair(net: Network, src: str, dst: str) -> str:
    return open_both(net.client(src), net.client(dst), src, dst)


def test_a_lost_confirmation_never_gives_an_index_two_keys(net):
    """The destination stored key 0 and confirmed it, but the source never heard: the source
    must not make another key under index 0 and hand it out."""
    a0, a1 = net.client("SAE-R0"), net.client("SAE-R1")
    ksid = open_pair(net, "SAE-R0", "SAE-R1")
    peer = net.agents["R0"].peers["R1"]
    real, lost = peer.post, []

    def post(path, body, timeout=10.0):
        out = real(path, body, timeout)
        if path.startswith("/relay/v1/deliver") and not lost:
            lost.append(path)
            raise requests.ReadTimeout("the confirmation was lost")
        return out

    peer.post = post
    try:
        assert a0.get_key(ksid).status != 0
    finally:
        peer.post = real
    assert lost
    theirs = a1.get_key(ksid, index=0)
    assert theirs.status == 0
    mine = a0.get_key(ksid, index=0)
    assert mine.status != 0 or mine.key == theirs.key
    nxt = a0.get_key(ksid)  # the source's next automatic index names a key both ends agree on
    assert nxt.status == 0 and nxt.index >= 1 and a1.get_key(ksid, index=nxt.index).key == nxt.key


def test_a_multicast_group_heals_after_a_slaves_key_manager_restarts(net, monkeypatch):
    import agents.service

    monkeypatch.setattr(agents.service, "CONFIG_SETTLE_S", 0.2)  # past the settling time at once
    a0 = net.client("SAE-R0")
    first = a0.enc_keys("SAE-R1-B", additional_slave_sae_ids=["SAE-R2"])
    assert net.client("SAE-R2").dec_keys("SAE-R0", [k for k, _ in first]) == first
    net.stop_agent("R2")
    net.start_agent("R2")
    net.wait_for_pools(bits=65536)
    outcomes = []
    for _ in range(4):
        try:
            keys = a0.enc_keys("SAE-R1-B", additional_slave_sae_ids=["SAE-R2"])
            outcomes.append(net.client("SAE-R2").dec_keys("SAE-R0", [k for k, _ in keys]) == keys)
        except ETSI014Error as exc:
            outcomes.append(exc.status)
    # The member route through the restarted key manager is torn down at its first refusal;
    # the next call opens a new member session.
    assert outcomes[-2:] == [True, True], outcomes
    assert [e for e in net.agents["R0"].events if e["kind"] == "route_broken"]


def test_a_restored_destination_goes_on_with_its_own_automatic_index(net):
    a0, a1 = net.client("SAE-R0"), net.client("SAE-R1")
    ksid = open_pair(net, "SAE-R0", "SAE-R1")
    made = [a0.get_key(ksid) for _ in range(4)]  # the source's application: 0..3
    assert [k.index for k in made] == [0, 1, 2, 3]
    assert a1.get_key(ksid).index == 0
    net.stop_agent("R1")
    net.start_agent("R1")
    nxt = a1.get_key(ksid)  # the keys made for the peer are not this application's
    assert (nxt.status, nxt.index, nxt.key) == (0, 1, made[1].key)
