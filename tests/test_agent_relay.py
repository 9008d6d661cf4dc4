"""End-to-end keys over real HTTPS with mutual TLS on the chain of examples/linear-5.yaml
(N0 - N1 - N2 - N3 - N4 - N5): both endpoints get identical keys, directly or relayed
over up to four trusted nodes, the metadata says how many, every link of the route pays
exactly k + 512 link-key bits per key at both of its ends; and the relay channel rejects
tampered, replayed and misdirected messages without consuming anything."""
from __future__ import annotations

import base64
import threading
import uuid

import pytest

from agent_harness import EXAMPLES, Network, relocate
from agents import relay
from agents.client import QoS
from agents.core.keymanager import METADATA_MAX_SIZE

CHUNK = 32  # bytes per key
NEEDED = relay.link_key_bits_needed(8 * CHUNK)  # link-key bits per key on every hop
QOS = QoS(Key_chunk_size=CHUNK, Timeout=15_000)


def _edit(data: dict) -> None:
    # Applications on N1 and N4 as well, so routes of every length start and end at an application.
    data["applications"] += [{"sae_id": "SAE-N1", "node": "N1", "user": "operator-apps"},
                             {"sae_id": "SAE-N4", "node": "N4", "user": "operator-apps"}]
    data["users"][0]["sla"]["max_sessions"] = 64


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("agent-relay")
    # The chain's topology with fast fixed-rate devices, so the pools fill in a moment.
    path = relocate(EXAMPLES / "linear-5.yaml", tmp / "net.yaml", edit=_edit,
                    devices={"model": "fixed", "skr_bps": 400_000, "qber": 0.02})
    with Network(path, tmp, tls=True) as network:
        network.wait_for_pools(bits=16 * NEEDED)
        yield network


def route(src: str, dst: str) -> list[str]:
    a, b = int(src[1:]), int(dst[1:])
    return [f"N{i}" for i in range(a, b + 1)]


def consumed(net: Network) -> dict[tuple[str, str], int]:
    """Link-key bits consumed so far at each (node, link) end."""
    out = {}
    for name, agent in net.agents.items():
        for link_id, entry in agent.store.stats().items():
            out[(name, link_id)] = entry["master"]["consumed"] + entry["slave"]["consumed"]
    return out


def open_pair(net: Network, source: str, destination: str, qos: QoS = QOS) -> str:
    ksid = str(uuid.uuid4())
    out: dict[str, object] = {}

    def run(sae: str) -> None:
        try:
            out[sae] = net.client(sae).open_connect(source, destination, qos, ksid)
        except Exception as exc:  # noqa: BLE001 — reported below
            out[sae] = exc

    threads = [threading.Thread(target=run, args=(sae,)) for sae in (source, destination)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [getattr(out[s], "status", out[s]) for s in (source, destination)] == [0, 0]
    return ksid


@pytest.mark.parametrize("src, dst", [("N0", "N1"), ("N0", "N2"), ("N1", "N5"), ("N0", "N5")],
                         ids=["adjacent", "2-hops", "4-hops", "5-hops"])
def test_004_keys_are_identical_at_both_ends(net, src, dst):
    path = route(src, dst)
    trusted = len(path) - 2
    before = consumed(net)
    ksid = open_pair(net, f"SAE-{src}", f"SAE-{dst}")
    a, b = net.client(f"SAE-{src}"), net.client(f"SAE-{dst}")
    # The destination asks first for a key the source has not made yet (it fetches it), then
    # the source takes its keys in order, then the destination the rest.
    late = b.get_key(ksid, index=2, metadata_size=METADATA_MAX_SIZE)
    mine = [a.get_key(ksid, metadata_size=METADATA_MAX_SIZE) for _ in range(3)]
    theirs = [b.get_key(ksid, index=i, metadata_size=METADATA_MAX_SIZE) for i in (0, 1)] + [late]
    assert [k.status for k in mine + theirs] == [0] * 6
    assert [k.index for k in mine] == [0, 1, 2] and [k.index for k in theirs] == [0, 1, 2]
    assert [k.key for k in mine] == [k.key for k in theirs]
    assert len({k.key for k in mine}) == 3 and all(len(k.key) == CHUNK for k in mine)
    assert {k.metadata["hops"] for k in mine + theirs} == {trusted}
    # Every link of the route paid exactly k + 512 bits per key at both ends; no other link paid.
    after = consumed(net)
    links = {net.link(x, y).qkdl_id for x, y in zip(path, path[1:])}
    for (node, link_id), bits in after.items():
        spent = bits - before.get((node, link_id), 0)
        assert spent == (3 * NEEDED if link_id in links else 0), (node, link_id, spent)
    assert (a.close(ksid), b.close(ksid)) == (0, 0)


def test_014_relayed_over_four_trusted_nodes(net):
    master = net.session("sae", "SAE-N0")
    slave = net.session("sae", "SAE-N5")
    made = master.post(net.url("N0") + "/api/v1/keys/SAE-N5/enc_keys", json={"number": 3, "size": 512}, timeout=60)
    assert made.status_code == 200, made.text
    keys = {k["key_ID"]: k["key"] for k in made.json()["keys"]}
    got = slave.post(net.url("N5") + "/api/v1/keys/SAE-N0/dec_keys",
                     json={"key_IDs": [{"key_ID": k} for k in keys]}, timeout=60)
    assert got.status_code == 200 and {k["key_ID"]: k["key"] for k in got.json()["keys"]} == keys
    assert all(len(base64.b64decode(k)) == 64 for k in keys.values())


# ------------------------------------------------------------------ hostile relay messages


def rejected_events(agent, ksid: str) -> list[dict]:
    return [e for e in list(agent.events) if e["kind"] == "relay_rejected" and e.get("ksid") == ksid]


def flip(b64: str, byte: int = 0) -> str:
    raw = bytearray(base64.b64decode(b64))
    raw[byte] ^= 0x01
    return base64.b64encode(bytes(raw)).decode()


def craft(net: Network, kind: str, ksid: str, sender: str, receiver: str, source: str, destination: str,
          index: int) -> dict:
    """A genuine relay message of session ``ksid`` as ``sender`` would send it to ``receiver``,
    sealed with link key the sender's store hands out (and consumes) for it."""
    agent = net.agents[sender]
    link = net.link(sender, receiver)
    role = "master" if link.master == sender else "slave"
    slices = agent.store.take(link.qkdl_id, role, NEEDED)
    common = dict(ksid=ksid, index=index, msg_id=str(uuid.uuid4()), link=link.qkdl_id,
                  source_node=net.qkdn_id(source), destination_node=net.qkdn_id(destination), slices=slices)
    if kind == "forward":
        msg = relay.seal_forward(hop=1, payload=relay.RelayPayload.generate(8 * CHUNK), **common)
    else:
        msg, _ = relay.seal_deliver(key_bits=8 * CHUNK, **common)
    return msg.to_dict()


def post(net: Network, as_node: str, to: str, kind: str, body: dict):
    return net.session("node", as_node).post(f"{net.url(to)}/relay/v1/{kind}", json=body, timeout=60)


@pytest.mark.parametrize("kind, src, dst", [("forward", "N0", "N2"), ("deliver", "N0", "N1")])
def test_tampered_and_replayed_relay_messages_are_rejected_and_consume_nothing(net, kind, src, dst):
    ksid = open_pair(net, f"SAE-{src}", f"SAE-{dst}")
    receiver = net.agents["N1"]
    index = 1_000_000  # far from the indices the applications use
    genuine = craft(net, kind, ksid, "N0", "N1", src, dst, index)
    tampered = []
    if kind == "forward":
        tampered.append({**genuine, "ciphertext": flip(genuine["ciphertext"], 5)})
    tampered += [{**genuine, "tag": flip(genuine["tag"], 15)}, {**genuine, "index": index + 1},
                 {**genuine, "msg_id": str(uuid.uuid4())}]
    key_of = "pad_refs" if kind == "forward" else "key_refs"
    shifted = [dict(r) for r in genuine[key_of]]
    shifted[0]["offset"] += 1 if shifted[0]["offset"] == 0 else -1
    tampered.append({**genuine, key_of: shifted})
    before = consumed(net)
    for n, body in enumerate(tampered, start=1):
        resp = post(net, "N0", "N1", kind, body)
        assert resp.status_code == 400, (n, resp.text)
        assert len(rejected_events(receiver, ksid)) == n
    assert consumed(net) == before
    reasons = [e["details"]["reason"] for e in rejected_events(receiver, ksid)]
    # Altered members fail the tag; a shifted range fails the tag too, or names bytes the sender
    # does not own at this end (the store refuses it before the tag is even computed).
    assert all(r == "authentication tag does not verify" for r in reasons[:-1]), reasons
    assert reasons[-1] == "authentication tag does not verify" or reasons[-1].startswith("link key references rejected")
    # Sent by a key manager that is not the receiver's neighbour on that link: refused before anything.
    for stranger in ("N2", "N3"):
        assert post(net, stranger, "N1", kind, genuine).status_code == 403
    assert consumed(net) == before
    reported = rejected_events(receiver, ksid)
    assert len(reported) == len(tampered) + 2
    assert {e["details"]["reason"] for e in reported[-2:]} == {"the sender is not this node's neighbour on that link"}
    # The genuine message still goes through: the refusals consumed none of its ranges.
    ok = post(net, "N0", "N1", kind, genuine)
    assert ok.status_code == 200, ok.text
    assert set(ok.json()) == {"confirm", "hops"} and ok.json()["hops"] == len(route(src, dst)) - 2
    landed = net.agents[dst].store.list_session_keys(ksid)
    assert [info.index for info in landed] == [index]
    spent = consumed(net)
    assert spent[("N1", net.link("N0", "N1").qkdl_id)] - before[("N1", net.link("N0", "N1").qkdl_id)] == NEEDED
    # The same message again is a replay: rejected, reported, nothing consumed anywhere.
    again = post(net, "N0", "N1", kind, genuine)
    assert again.status_code == 400
    assert len(rejected_events(receiver, ksid)) == len(tampered) + 3
    assert consumed(net) == spent
    assert [info.index for info in net.agents[dst].store.list_session_keys(ksid)] == [index]
    for node in (src, dst):
        assert net.client(f"SAE-{node}").close(ksid) == 0


def test_relay_messages_never_carry_link_key_bytes(net):
    """The JSON on the wire names link key by ID and range; a crafted message's body holds no
    byte string the sender's store handed out."""
    ksid = open_pair(net, "SAE-N0", "SAE-N1")
    link = net.link("N0", "N1")
    agent = net.agents["N0"]
    slices = agent.store.take(link.qkdl_id, "master", NEEDED)
    msg, payload = relay.seal_deliver(ksid=ksid, index=2_000_000, msg_id=str(uuid.uuid4()), link=link.qkdl_id,
                                      source_node=net.qkdn_id("N0"), destination_node=net.qkdn_id("N1"),
                                      key_bits=8 * CHUNK, slices=slices)
    text = str(msg.to_dict())
    for s in slices:
        assert base64.b64encode(s.data).decode() not in text and s.data.hex() not in text
    assert post(net, "N0", "N1", "deliver", msg.to_dict()).status_code == 200
    for node in ("N0", "N1"):
        assert net.client(f"SAE-{node}").close(ksid) == 0


def test_a_trusted_node_configured_late_is_asked_again_not_declared_broken(net):
    """A controller configures the key managers of a route in any order (at set-up, on a
    re-route): the source may send a key before a trusted node knows the session. Within a
    short settling time after its own configuration, the source asks again instead of failing
    the key and tearing the route down."""
    from etsi015.restconf import RestconfClient
    from etsi015.session import virt_link_id

    ksid = open_pair(net, "SAE-N1", "SAE-N4")
    src, dst = net.client("SAE-N1"), net.client("SAE-N4")
    first = src.get_key(ksid)
    assert first.status == 0 and dst.get_key(ksid, index=first.index).key == first.key
    http = net.session("controller")
    trusted = RestconfClient(net.url("N2"), session=http)
    app, link = trusted.get_application(ksid), trusted.get_link(virt_link_id(ksid))
    trusted.delete_application(ksid)
    trusted.delete_link(virt_link_id(ksid))
    # The source is configured again now (as on a re-route); N2 only a moment later.
    source = RestconfClient(net.url("N1"), session=http)
    assert source.put_application(source.get_application(ksid)) is False
    late = threading.Timer(0.4, lambda: (trusted.post_link(link), trusted.post_application(app)))
    late.start()
    try:
        key = src.get_key(ksid)
    finally:
        late.join()
    assert key.status == 0, key
    assert dst.get_key(ksid, index=key.index).key == key.key
    events = list(net.agents["N1"].events)
    assert [e for e in events if e["kind"] == "relay_retry" and e["ksid"] == ksid]
    assert not [e for e in events if e["kind"] in ("route_broken", "session_terminated") and e["ksid"] == ksid]
    assert (src.close(ksid), dst.close(ksid)) == (0, 0)


# ------------------------------------------------------------------ batches


def test_014_keys_of_one_call_travel_in_one_batch_per_hop(net, monkeypatch):
    """enc_keys of several keys: one forward_batch request per hop (deliver_batch between
    neighbours), the slave gets the same keys, every link of the route pays exactly
    number x (k + 512) bits at both ends."""
    posted: list[tuple[str, str, int]] = []
    for name, agent in net.agents.items():
        for peer in agent.peers.values():
            def spy(path, body, timeout=None, _post=peer.post, _name=name, _peer=peer.name):
                if path.startswith("/relay/v1/") and "_batch" in path:
                    posted.append((_name, _peer, len(body["messages"])))
                return _post(path, body) if timeout is None else _post(path, body, timeout=timeout)
            monkeypatch.setattr(peer, "post", spy)
    for src, dst, kind in (("N1", "N4", "forward_batch"), ("N0", "N1", "deliver_batch")):
        path = route(src, dst)
        before = consumed(net)
        posted.clear()
        master, slave = net.session("sae", f"SAE-{src}"), net.session("sae", f"SAE-{dst}")
        made = master.post(net.url(src) + f"/api/v1/keys/SAE-{dst}/enc_keys", json={"number": 6, "size": 256},
                           timeout=60)
        assert made.status_code == 200, made.text
        keys = {k["key_ID"]: k["key"] for k in made.json()["keys"]}
        assert len(keys) == 6 and len(set(keys.values())) == 6
        got = slave.post(net.url(dst) + f"/api/v1/keys/SAE-{src}/dec_keys",
                         json={"key_IDs": [{"key_ID": k} for k in keys]}, timeout=60)
        assert got.status_code == 200 and {k["key_ID"]: k["key"] for k in got.json()["keys"]} == keys
        # One batch per link of the route (the first call of a pair may also have set the session up).
        assert [(a, b) for a, b, _ in posted] == list(zip(path, path[1:])), (kind, posted)
        assert {n for _, _, n in posted} == {6}
        after = consumed(net)
        links = {net.link(x, y).qkdl_id for x, y in zip(path, path[1:])}
        for (node, link_id), bits in after.items():
            spent = bits - before.get((node, link_id), 0)
            assert spent == (6 * relay.link_key_bits_needed(256) if link_id in links else 0), (node, link_id, spent)


@pytest.mark.parametrize("kind, src, dst", [("forward", "N0", "N2"), ("deliver", "N0", "N1")])
def test_a_batch_with_one_bad_message_is_refused_whole_and_consumes_nothing(net, kind, src, dst):
    ksid = open_pair(net, f"SAE-{src}", f"SAE-{dst}")
    receiver = net.agents["N1"]
    messages = [craft(net, kind, ksid, "N0", "N1", src, dst, 3_000_000 + i) for i in range(3)]
    path = f"{kind}_batch"
    bad_tag = [dict(m) for m in messages]
    bad_tag[2]["tag"] = flip(bad_tag[2]["tag"], 3)
    other_ksid = [dict(m) for m in messages]
    other_ksid[1]["index"] = messages[0]["index"]  # two messages for one index
    before = consumed(net)
    reported = sum(e["kind"] == "relay_rejected" for e in list(receiver.events))
    resp = post(net, "N0", "N1", path, {"messages": bad_tag})
    assert resp.status_code == 400 and "authentication tag" in resp.json()["message"]
    resp = post(net, "N0", "N1", path, {"messages": other_ksid})
    assert resp.status_code == 400 and "messages[1].index" in resp.json()["message"]
    resp = post(net, "N0", "N1", path, {"messages": messages + [messages[0]]})
    assert resp.status_code == 400  # a message twice: same msg_id, and its bytes named twice
    resp = post(net, "N0", "N1", path, {"messages": []})
    assert resp.status_code == 400
    assert consumed(net) == before
    assert sum(e["kind"] == "relay_rejected" for e in list(receiver.events)) == reported + 4
    assert len(rejected_events(receiver, ksid)) == 1  # the others are refused before their KSID is read
    # The genuine batch goes through: one confirmation per message, in order.
    ok = post(net, "N0", "N1", path, {"messages": messages})
    assert ok.status_code == 200, ok.text
    confirms = ok.json()["confirms"]
    assert [c["msg_id"] for c in confirms] == [m["msg_id"] for m in messages]
    assert ok.json()["hops"] == len(route(src, dst)) - 2
    assert [i.index for i in net.agents[dst].store.list_session_keys(ksid)] == [3_000_000, 3_000_001, 3_000_002]
    spent = consumed(net)
    link_id = net.link("N0", "N1").qkdl_id
    assert spent[("N1", link_id)] - before[("N1", link_id)] == 3 * NEEDED
    # Replayed whole, or one message of it alone: refused, nothing consumed.
    assert post(net, "N0", "N1", path, {"messages": messages}).status_code == 400
    assert post(net, "N0", "N1", kind, messages[1]).status_code == 400
    assert consumed(net) == spent
    for node in (src, dst):
        assert net.client(f"SAE-{node}").close(ksid) == 0
