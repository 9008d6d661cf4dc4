"""Relay messages and cryptography (agents/relay.py), with in-test link-key pools."""
from __future__ import annotations

import base64
import json
import random
import re
import uuid
from typing import NamedTuple

import pytest

from agents import relay
from agents.relay import (
    CONFIRM_KEY_BYTES, ConfirmMessage, DeliverMessage, ForwardMessage, KeyRef,
    LinkKeysAnswer, LinkKeysMessage, Material, RelayAuthError, RelayFormatError, RelayPayload,
    ReplayWindow, link_key_bits_needed, open_, open_deliver, open_forward, reencrypt, seal,
    seal_confirm, seal_deliver, seal_forward, split_slices, verify_confirm)


class Slice(NamedTuple):
    """Shape of the key store's KeySlice."""

    key_ID: str
    offset: int
    length: int
    data: bytes


def uid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


class LinkPool:
    """Both ends of one link's key pool: the sender takes the oldest bytes, the
    receiver consumes exactly the named ranges, each byte once per end."""

    def __init__(self, rng: random.Random, n_keys: int = 12, key_bytes: int = 40):
        self.link = uid(rng)
        self.keys = {uid(rng): rng.randbytes(key_bytes) for _ in range(n_keys)}
        self._order = list(self.keys)
        self._cursor = (0, 0)
        self.sender_taken_bits = 0
        self.receiver_consumed: set[tuple[str, int]] = set()

    def take(self, nbits: int) -> list[Slice]:
        assert nbits % 8 == 0
        need, out = nbits // 8, []
        i, pos = self._cursor
        while need:
            kid = self._order[i]
            n = min(need, len(self.keys[kid]) - pos)
            out.append(Slice(kid, pos, n, self.keys[kid][pos:pos + n]))
            pos, need = pos + n, need - n
            if pos == len(self.keys[kid]):
                i, pos = i + 1, 0
        self._cursor = (i, pos)
        self.sender_taken_bits += nbits
        return out

    def read(self, refs) -> bytes:
        return b"".join(self.keys[r.key_ID][r.offset:r.offset + r.length] for r in refs)

    def consume(self, refs) -> bytes:
        wanted = [(r.key_ID, b) for r in refs for b in range(r.offset, r.offset + r.length)]
        if any(w in self.receiver_consumed for w in wanted):
            raise KeyError("range already consumed")
        self.receiver_consumed.update(wanted)
        return self.read(refs)

    @property
    def receiver_consumed_bits(self) -> int:
        return 8 * len(self.receiver_consumed)


def secret_spellings(*secrets: bytes) -> list[str]:
    """Ways a leaked secret could show up in text."""
    out = []
    for s in secrets:
        out += [s.hex(), s.hex().upper(), base64.b64encode(s).decode(), repr(s)[2:-1]]
        # Pieces too, so a part of a secret (e.g. a pad inside a key's range) shows up.
        out += [s[i:i + 8].hex() for i in range(0, len(s) - 7, 8)]
        out += [repr(s[i:i + 8])[2:-1] for i in range(0, len(s) - 7, 8)]
    return out


@pytest.fixture
def rng():
    return random.Random(20240601)


@pytest.fixture
def ends(rng):
    """Session identifiers: ksid, source node, destination node."""
    return {"ksid": uid(rng), "source_node": uid(rng), "destination_node": uid(rng)}


def one_hop(rng, ends, key_bits=256):
    pool = LinkPool(rng)
    payload = RelayPayload.generate(key_bits, rng.randbytes)
    msg = seal_forward(**ends, index=7, msg_id=uid(rng), link=pool.link, hop=1, payload=payload,
                       slices=pool.take(link_key_bits_needed(key_bits)))
    return pool, payload, msg


# --------------------------------------------------------------------------- low-level seal/open

def test_seal_open_round_trip(rng):
    key, pad, mac_key, header = rng.randbytes(48), rng.randbytes(48), rng.randbytes(32), b"hdr"
    ciphertext, tag = seal(key, pad, mac_key, header)
    assert len(ciphertext) == len(key) and len(tag) == 16
    assert ciphertext == bytes(a ^ b for a, b in zip(key, pad))
    assert open_(ciphertext, tag, pad, mac_key, header) == key


def test_seal_open_reject_bad_lengths(rng):
    key = rng.randbytes(32)
    with pytest.raises(ValueError, match="exactly as long"):
        seal(key, rng.randbytes(31), rng.randbytes(32), b"h")
    with pytest.raises(ValueError, match="MAC key must be 32"):
        seal(key, rng.randbytes(32), rng.randbytes(16), b"h")
    with pytest.raises(ValueError, match="empty"):
        seal(b"", b"", rng.randbytes(32), b"h")
    ct, tag = seal(key, key, rng.randbytes(32), b"h")
    with pytest.raises(ValueError, match="exactly as long"):
        open_(ct, tag, rng.randbytes(33), rng.randbytes(32), b"h")


def test_open_rejects_wrong_mac_key_header_or_short_tag(rng):
    key, pad, mac_key = rng.randbytes(32), rng.randbytes(32), rng.randbytes(32)
    ct, tag = seal(key, pad, mac_key, b"header")
    with pytest.raises(RelayAuthError):
        open_(ct, tag, pad, rng.randbytes(32), b"header")
    with pytest.raises(RelayAuthError):
        open_(ct, tag, pad, mac_key, b"headex")
    with pytest.raises(RelayAuthError):
        open_(ct, tag[:15], pad, mac_key, b"header")


# --------------------------------------------------------------------------- forward: one hop and a chain

def test_one_hop_forward_and_confirm(rng, ends):
    pool, payload, msg = one_hop(rng, ends)
    wire = ForwardMessage.from_json(msg.to_json())
    assert wire == msg and wire.hop == 1 and wire.key_bits == 256
    got = open_forward(wire, pool.consume(wire.consumed_refs()))
    assert got == payload
    assert pool.sender_taken_bits == pool.receiver_consumed_bits == link_key_bits_needed(256)

    confirm = seal_confirm(ksid=wire.ksid, index=wire.index, msg_id=wire.msg_id,
                           source_node=wire.source_node, destination_node=wire.destination_node,
                           payload=got)
    verify_confirm(ConfirmMessage.from_json(confirm.to_json()), payload)


def test_four_hop_chain_delivers_the_same_key_with_per_link_pads(rng, ends):
    key_bits = 512
    pools = [LinkPool(rng) for _ in range(4)]
    payload = RelayPayload.generate(key_bits, rng.randbytes)
    need = link_key_bits_needed(key_bits)
    msg = seal_forward(**ends, index=3, msg_id=uid(rng), link=pools[0].link, hop=1,
                       payload=payload, slices=pools[0].take(need))
    seen = [msg]
    for prev, nxt in zip(pools, pools[1:]):  # three trusted nodes
        msg = ForwardMessage.from_json(msg.to_json())
        msg = reencrypt(msg, prev.consume(msg.consumed_refs()), nxt.link, nxt.take(need))
        seen.append(msg)
    final = ForwardMessage.from_json(msg.to_json())
    got = open_forward(final, pools[-1].consume(final.consumed_refs()))

    assert got.key == payload.key and got.confirm_key == payload.confirm_key
    assert [m.hop for m in seen] == [1, 2, 3, 4]
    assert [m.link for m in seen] == [p.link for p in pools]
    assert len({m.msg_id for m in seen}) == 1
    # Each link's own pad: the ciphertexts differ hop to hop, none is the plaintext.
    assert len({m.ciphertext for m in seen}) == 4
    assert payload.to_bytes() not in {m.ciphertext for m in seen}
    for p, m in zip(pools, seen):
        assert p.sender_taken_bits == p.receiver_consumed_bits == need
        assert m.ciphertext == bytes(a ^ b for a, b in zip(payload.to_bytes(), p.read(m.pad_refs)))
    verify_confirm(seal_confirm(ksid=ends["ksid"], index=3, msg_id=final.msg_id,
                                source_node=ends["source_node"],
                                destination_node=ends["destination_node"], payload=got), payload)


def test_reencrypt_with_wrong_incoming_material_fails_before_sealing(rng, ends):
    pool, _, msg = one_hop(rng, ends)
    nxt = LinkPool(rng)
    with pytest.raises(RelayAuthError):
        reencrypt(msg, rng.randbytes(len(pool.read(msg.consumed_refs()))), nxt.link,
                  nxt.take(link_key_bits_needed(256)))


def test_reencrypt_refuses_same_link_and_hop_overflow(rng, ends):
    pool, _, msg = one_hop(rng, ends)
    with pytest.raises(ValueError, match="next link"):
        reencrypt(msg, pool.read(msg.consumed_refs()), msg.link, [])
    last = ForwardMessage.from_dict({**msg.to_dict(), "hop": relay.MAX_HOPS})
    with pytest.raises(RelayFormatError, match="'hop' would exceed"):
        reencrypt(last, pool.read(msg.consumed_refs()), uid(rng), [])


def test_open_forward_needs_exactly_the_named_bytes(rng, ends):
    pool, _, msg = one_hop(rng, ends)
    data = pool.read(msg.consumed_refs())
    with pytest.raises(ValueError, match="the message names"):
        open_forward(msg, data[:-1])


# --------------------------------------------------------------------------- tampering

def _tampered(msg: ForwardMessage, member: str, rng) -> dict:
    d = msg.to_dict()
    if member in ("ksid", "link", "source_node", "destination_node", "msg_id"):
        d[member] = uid(rng)
    elif member == "index":
        d["index"] += 1
    elif member == "hop":
        d["hop"] += 1
    elif member in ("pad_refs", "mac_refs"):
        # Point the first range at other bytes of the same link key pool.
        ref = d[member][0]
        ref["offset"] += 200 if member == "pad_refs" else 100
    return d


@pytest.mark.parametrize("member", ["ksid", "index", "msg_id", "link", "hop", "source_node",
                                    "destination_node", "pad_refs", "mac_refs"])
def test_altering_any_header_field_breaks_the_tag(rng, ends, member):
    pool = LinkPool(rng, n_keys=2, key_bytes=400)
    payload = RelayPayload.generate(256, rng.randbytes)
    msg = seal_forward(**ends, index=7, msg_id=uid(rng), link=pool.link, hop=1, payload=payload,
                       slices=pool.take(link_key_bits_needed(256)))
    forged = ForwardMessage.from_dict(_tampered(msg, member, rng))
    assert forged != msg
    with pytest.raises(RelayAuthError):
        # The receiver's store hands out whatever the (altered) refs name.
        open_forward(forged, pool.read(forged.consumed_refs()))


def test_any_bit_flip_in_ciphertext_or_tag_is_rejected(rng, ends):
    pool, payload, msg = one_hop(rng, ends, key_bits=64)
    data = pool.read(msg.consumed_refs())
    assert open_forward(msg, data) == payload
    d = msg.to_dict()
    for member, raw in (("ciphertext", msg.ciphertext), ("tag", msg.tag)):
        for bit in range(8 * len(raw)):
            flipped = bytearray(raw)
            flipped[bit // 8] ^= 1 << (bit % 8)
            forged = ForwardMessage.from_dict(
                {**d, member: base64.b64encode(bytes(flipped)).decode()})
            with pytest.raises(RelayAuthError):
                open_forward(forged, data)


def test_forged_messages_with_random_tags_are_rejected(rng, ends):
    pool, _, msg = one_hop(rng, ends)
    data = pool.read(msg.consumed_refs())
    for _ in range(64):
        forged = ForwardMessage.from_dict({**msg.to_dict(),
                                           "tag": base64.b64encode(rng.randbytes(16)).decode()})
        with pytest.raises(RelayAuthError):
            open_forward(forged, data)
    # A forger who does not know the pad picks a ciphertext and a tag at random.
    forged = ForwardMessage.from_dict({
        **msg.to_dict(), "ciphertext": base64.b64encode(rng.randbytes(len(msg.ciphertext))).decode(),
        "tag": base64.b64encode(rng.randbytes(16)).decode()})
    with pytest.raises(RelayAuthError):
        open_forward(forged, data)


def test_a_tag_made_for_one_link_does_not_verify_on_another(rng, ends):
    a, b = LinkPool(rng), LinkPool(rng)
    payload = RelayPayload.generate(256, rng.randbytes)
    msg = seal_forward(**ends, index=0, msg_id=uid(rng), link=a.link, hop=1, payload=payload,
                       slices=a.take(link_key_bits_needed(256)))
    moved = ForwardMessage.from_dict({**msg.to_dict(), "link": b.link})
    with pytest.raises(RelayAuthError):
        open_forward(moved, a.read(moved.consumed_refs()))


# --------------------------------------------------------------------------- deliver (adjacent)

def test_deliver_names_link_key_as_the_session_key(rng, ends):
    pool = LinkPool(rng)
    msg, sent = seal_deliver(**ends, index=1, msg_id=uid(rng), link=pool.link, key_bits=256,
                             slices=pool.take(link_key_bits_needed(256)))
    wire = DeliverMessage.from_json(msg.to_json())
    got = open_deliver(wire, pool.consume(wire.consumed_refs()))
    assert got == sent and got.key == pool.read(msg.key_refs) and wire.key_bits == 256
    assert pool.sender_taken_bits == pool.receiver_consumed_bits == link_key_bits_needed(256)
    confirm = seal_confirm(ksid=wire.ksid, index=wire.index, msg_id=wire.msg_id,
                           source_node=wire.source_node, destination_node=wire.destination_node,
                           payload=got)
    verify_confirm(confirm, sent)


@pytest.mark.parametrize("member", ["ksid", "index", "msg_id", "link", "source_node",
                                    "destination_node", "key_refs", "confirm_refs", "mac_refs",
                                    "tag"])
def test_altered_or_redirected_deliver_is_rejected(rng, ends, member):
    pool = LinkPool(rng, n_keys=2, key_bytes=400)
    msg, _ = seal_deliver(**ends, index=1, msg_id=uid(rng), link=pool.link, key_bits=256,
                          slices=pool.take(link_key_bits_needed(256)))
    d = msg.to_dict()
    if member == "index":
        d["index"] = 2
    elif member == "tag":
        d["tag"] = base64.b64encode(rng.randbytes(16)).decode()
    elif member.endswith("_refs"):
        d[member][0]["offset"] += 200
    else:
        d[member] = uid(rng)
    forged = DeliverMessage.from_dict(d)
    with pytest.raises(RelayAuthError):
        open_deliver(forged, pool.read(forged.consumed_refs()))


# --------------------------------------------------------------------------- confirm

@pytest.mark.parametrize("member", ["ksid", "index", "msg_id", "source_node", "destination_node",
                                    "tag"])
def test_forged_or_altered_confirm_is_rejected(rng, ends, member):
    payload = RelayPayload.generate(256, rng.randbytes)
    confirm = seal_confirm(**ends, index=4, msg_id=uid(rng), payload=payload)
    verify_confirm(confirm, payload)
    d = confirm.to_dict()
    if member == "index":
        d["index"] = 5
    elif member == "tag":
        d["tag"] = base64.b64encode(rng.randbytes(16)).decode()
    else:
        d[member] = uid(rng)
    with pytest.raises(RelayAuthError):
        verify_confirm(ConfirmMessage.from_dict(d), payload)


def test_confirm_needs_the_confirmation_key_not_just_the_key(rng, ends):
    payload = RelayPayload.generate(256, rng.randbytes)
    # Someone who knows the key but not the confirmation key cannot confirm.
    other = RelayPayload(payload.key, rng.randbytes(CONFIRM_KEY_BYTES))
    confirm = seal_confirm(**ends, index=4, msg_id=uid(rng), payload=other)
    with pytest.raises(RelayAuthError):
        verify_confirm(confirm, payload)


# --------------------------------------------------------------------------- replay window

def test_replay_window_rejects_a_replayed_msg_id(rng, ends):
    pool, _, msg = one_hop(rng, ends)
    window = ReplayWindow(max_entries=10, max_age=60.0)
    wire = ForwardMessage.from_json(msg.to_json())
    assert window.check_and_add(wire.link, wire.msg_id, now=100.0)
    replay = ForwardMessage.from_json(msg.to_json())
    assert not window.check_and_add(replay.link, replay.msg_id, now=101.0)
    # The same msg_id on the next link of the route is a different message.
    assert window.check_and_add(uid(rng), wire.msg_id, now=101.0)


def test_replay_window_is_bounded_by_age_and_count(rng):
    link = uid(rng)
    window = ReplayWindow(max_entries=3, max_age=10.0)
    ids = [uid(rng) for _ in range(5)]
    assert window.check_and_add(link, ids[0], now=0.0)
    assert not window.check_and_add(link, ids[0], now=9.9)
    assert window.check_and_add(link, ids[1], now=9.9)
    # ids[0] has aged out; ids[1] has not.
    assert window.check_and_add(link, ids[0], now=10.0)
    assert not window.check_and_add(link, ids[1], now=10.0)
    assert len(window) == 2
    assert not window.remember_message(link, ids[1], now=10.0)  # the key store's name for it
    for i in ids[2:]:
        assert window.check_and_add(link, i, now=11.0)
    assert len(window) == 3
    assert window.check_and_add(link, ids[1], now=11.0)  # pushed out by count
    with pytest.raises(ValueError):
        ReplayWindow(max_entries=0)


# --------------------------------------------------------------------------- pad accounting

@pytest.mark.parametrize("key_bits", [8, 128, 256, 1000, 8 * relay.MAX_KEY_BYTES])
def test_link_key_accounting_is_one_bit_per_relayed_bit_plus_256(rng, ends, key_bits):
    relayed_bits = key_bits + 8 * CONFIRM_KEY_BYTES
    assert link_key_bits_needed(key_bits) == relayed_bits + 256
    pool = LinkPool(rng, n_keys=3, key_bytes=relay.MAX_KEY_BYTES)
    payload = RelayPayload.generate(key_bits, rng.randbytes)
    msg = seal_forward(**ends, index=0, msg_id=uid(rng), link=pool.link, hop=1, payload=payload,
                       slices=pool.take(link_key_bits_needed(key_bits)))
    assert 8 * sum(r.length for r in msg.pad_refs) == 8 * len(msg.ciphertext) == relayed_bits
    assert 8 * sum(r.length for r in msg.mac_refs) == 256


@pytest.mark.parametrize("bad", [0, 7, 12, -8, 8 * relay.MAX_KEY_BYTES + 8])
def test_link_key_bits_needed_refuses_odd_sizes(bad):
    with pytest.raises(ValueError):
        link_key_bits_needed(bad)
    with pytest.raises(TypeError):
        link_key_bits_needed(True)


def test_seal_needs_exactly_the_material_it_consumes(rng, ends):
    pool = LinkPool(rng)
    payload = RelayPayload.generate(256, rng.randbytes)
    need = link_key_bits_needed(256)
    common = dict(**ends, index=0, msg_id=uid(rng), link=pool.link, hop=1, payload=payload)
    with pytest.raises(ValueError, match="exactly 96 needed"):
        seal_forward(**common, slices=pool.take(need + 8))
    with pytest.raises(ValueError, match="exactly 96 needed"):
        seal_forward(**common, slices=pool.take(need - 8))


class StoreSlice(NamedTuple):
    """agents.keystore.KeySlice spells the ID key_id."""

    key_id: str
    offset: int
    length: int
    data: bytes


@pytest.mark.parametrize("shape", [Slice, StoreSlice])
def test_split_slices_cuts_inside_keys(rng, shape):
    a, b = uid(rng), uid(rng)
    slices = [shape(a, 10, 5, b"ABCDE"), shape(b, 0, 4, b"FGHI")]
    first, second = split_slices(slices, [3, 6])
    assert first == Material((KeyRef(a, 10, 3),), b"ABC")
    assert second.refs == (KeyRef(a, 13, 2), KeyRef(b, 0, 4)) and second.data == b"DEFGHI"
    with pytest.raises(ValueError, match="not that many bytes"):
        split_slices([Slice(a, 0, 5, b"ABC")], [5])


# --------------------------------------------------------------------------- strict parsing

def _fwd_dict(rng, ends) -> dict:
    return one_hop(rng, ends)[2].to_dict()


def _b64(n: int) -> str:
    return base64.b64encode(bytes(n)).decode()


FORWARD_ERRORS = [
    (lambda d: d.pop("tag"), "missing member 'tag'"),
    (lambda d: d.update(extra=1), "unknown member 'extra'"),
    (lambda d: d.update(index="7"), "'index' must be an integer"),
    (lambda d: d.update(index=True), "'index' must be an integer"),
    (lambda d: d.update(index=7.0), "'index' must be an integer"),
    (lambda d: d.update(index=-1), "'index' must be between"),
    (lambda d: d.update(hop=0), "'hop' must be between"),
    (lambda d: d.update(hop=relay.MAX_HOPS + 1), "'hop' must be between"),
    (lambda d: d.update(ksid="not-a-uuid"), "'ksid' is not a UUID"),
    (lambda d: d.update(ksid=7), "'ksid' must be a UUID string"),
    (lambda d: d.update(link="{" + d["link"] + "}"), "'link' is not a UUID in 8-4-4-4-12"),
    (lambda d: d.update(source_node=d["source_node"].replace("-", "")), "'source_node' is not a UUID in"),
    (lambda d: d.update(msg_id=str(uuid.uuid1())), "'msg_id' must be a random (version 4)"),
    (lambda d: d.update(destination_node=d["source_node"]), "'destination_node' must differ"),
    (lambda d: d.update(ciphertext="***"), "'ciphertext' is not valid base64"),
    (lambda d: d.update(ciphertext=d["ciphertext"].rstrip("=")), "'ciphertext' is not valid base64"),
    (lambda d: d.update(tag="AAAAAAAAAAAAAAAAAAAAAB=="), "'tag' is not canonical base64"),
    (lambda d: d.update(tag="ü"), "'tag' is not valid base64"),
    (lambda d: d.update(tag=[]), "'tag' must be a base64 string"),
    (lambda d: d.update(tag=_b64(15)), "'tag' must be 16 bytes"),
    (lambda d: d.update(ciphertext=_b64(80)), "'pad_refs' must cover exactly the ciphertext's 80"),
    (lambda d: d.update(ciphertext=_b64(32)), "'ciphertext' must be 33 to"),
    (lambda d: d["mac_refs"][0].update(length=31), "'mac_refs' must cover exactly 32"),
    (lambda d: d.update(pad_refs=[]), "'pad_refs' must not be empty"),
    (lambda d: d.update(pad_refs={}), "'pad_refs' must be a list"),
    (lambda d: d.update(pad_refs=["x"]), "'pad_refs[0]' must be a JSON object"),
    (lambda d: d["pad_refs"][0].pop("offset"), "'pad_refs[0].offset' is missing"),
    (lambda d: d["pad_refs"][0].update(key="x"), "'pad_refs[0].key' is not a member"),
    (lambda d: d["pad_refs"][0].update(length=0), "'pad_refs[0].length' must be between 1"),
    (lambda d: d["pad_refs"][0].update(offset=-1), "'pad_refs[0].offset' must be between 0"),
    (lambda d: d["mac_refs"][0].update(key_ID="KEY"), "'mac_refs[0].key_ID' is not a UUID"),
    (lambda d: d.update(mac_refs=[{**d["pad_refs"][0], "length": 32}]),
     "'pad_refs[0]' overlaps 'mac_refs[0]'"),
]


@pytest.mark.parametrize("mutate,message", FORWARD_ERRORS)
def test_forward_strict_parsing(rng, ends, mutate, message):
    d = _fwd_dict(rng, ends)
    mutate(d)
    with pytest.raises(RelayFormatError, match="^forward message: ") as err:
        ForwardMessage.from_json(json.dumps(d))
    assert message in str(err.value)


@pytest.mark.parametrize("text,message", [
    ("[]", "must be a JSON object"),
    ("{", "not valid JSON"),
    (b"\xc3\x28", "not UTF-8"),
    ('{"ksid": 1, "ksid": 2}', "member 'ksid' appears twice"),
    ('{"index": NaN}', "NaN is not a JSON number"),
    ("[" * 100_000, "nested too deeply"),
    (" " * (relay.MAX_JSON_CHARS + 1), "longer than"),
])
def test_json_level_errors(text, message):
    with pytest.raises(RelayFormatError, match=message):
        ForwardMessage.from_json(text)


def test_uuids_are_canonicalised_and_the_tag_still_verifies(rng, ends):
    pool, payload, msg = one_hop(rng, ends)
    d = msg.to_dict()
    d["ksid"] = d["ksid"].upper()
    d["pad_refs"][0]["key_ID"] = d["pad_refs"][0]["key_ID"].upper()
    parsed = ForwardMessage.from_dict(d)
    assert parsed == msg
    assert open_forward(parsed, pool.read(parsed.consumed_refs())) == payload


def test_deliver_and_confirm_strict_parsing(rng, ends):
    pool = LinkPool(rng)
    msg, payload = seal_deliver(**ends, index=1, msg_id=uid(rng), link=pool.link, key_bits=256,
                                slices=pool.take(link_key_bits_needed(256)))
    d = msg.to_dict()
    for mutate, message in [
        (lambda x: x.pop("confirm_refs"), "missing member 'confirm_refs'"),
        (lambda x: x.update(hop=1), "unknown member 'hop'"),
        (lambda x: x["confirm_refs"][0].update(length=16), "'confirm_refs' must cover exactly 32"),
        (lambda x: x.update(key_refs=x["mac_refs"]), "overlaps"),
        (lambda x: x.update(index=None), "'index' must be an integer"),
    ]:
        bad = json.loads(json.dumps(d))
        mutate(bad)
        with pytest.raises(RelayFormatError, match="^deliver message: .*" + re.escape(message)):
            DeliverMessage.from_dict(bad)
    c = seal_confirm(**ends, index=1, msg_id=uid(rng), payload=payload).to_dict()
    for mutate, message in [
        (lambda x: x.update(link=pool.link), "unknown member 'link'"),
        (lambda x: x.pop("msg_id"), "missing member 'msg_id'"),
        (lambda x: x.update(tag=_b64(32)), "'tag' must be 16 bytes"),
    ]:
        bad = dict(c)
        mutate(bad)
        with pytest.raises(RelayFormatError, match="^confirm message: .*" + re.escape(message)):
            ConfirmMessage.from_dict(bad)


def test_link_keys_messages(rng):
    link, ids = uid(rng), [uid(rng) for _ in range(3)]
    msg = LinkKeysMessage(link, [(ids[0], "master"), (ids[1], "slave"), (ids[2], "master")])
    text = msg.to_json()
    assert json.loads(text) == {"link": link, "keys": [
        {"key_ID": ids[0], "owner": "master"}, {"key_ID": ids[1], "owner": "slave"},
        {"key_ID": ids[2], "owner": "master"}]}
    assert LinkKeysMessage.from_json(text) == msg
    answer = LinkKeysAnswer(ids[:2])
    assert json.loads(answer.to_json()) == {"stored": ids[:2]}
    assert LinkKeysAnswer.from_json(answer.to_json()) == answer
    assert LinkKeysAnswer.from_json('{"stored": []}').stored == ()

    base = json.loads(text)
    for mutate, message in [
        (lambda x: x["keys"][1].update(owner="both"), "'keys[1].owner' must be 'master' or 'slave'"),
        (lambda x: x["keys"].append(dict(x["keys"][0])), "'keys[3].key_ID' appears twice"),
        (lambda x: x.update(keys=[]), "'keys' must not be empty"),
        (lambda x: x["keys"][0].pop("owner"), "'keys[0].owner' is missing"),
        (lambda x: x["keys"][0].update(key="k"), "'keys[0].key' is not a member"),
        (lambda x: x.update(key=[]), "unknown member 'key'"),
        (lambda x: x.update(link="L01"), "'link' is not a UUID"),
    ]:
        bad = json.loads(text)
        mutate(bad)
        with pytest.raises(RelayFormatError, match="^link_keys message: .*" + re.escape(message)):
            LinkKeysMessage.from_dict(bad)
    assert base == json.loads(text)
    for body, message in [('{"stored": {}}', "'stored' must be a list"),
                          ('{"stored": ["x"]}', "'stored[0]' is not a UUID"),
                          (json.dumps({"stored": [ids[0], ids[0]]}), "names a key ID twice"),
                          ('{}', "missing member 'stored'")]:
        with pytest.raises(RelayFormatError, match=re.escape(message)):
            LinkKeysAnswer.from_json(body)


# --------------------------------------------------------------------------- no key bytes in text

def test_no_key_bytes_in_repr_str_or_errors(rng, ends):
    pools = [LinkPool(rng), LinkPool(rng)]
    payload = RelayPayload.generate(256, rng.randbytes)
    need = link_key_bits_needed(256)
    slices0 = pools[0].take(need)
    fwd = seal_forward(**ends, index=0, msg_id=uid(rng), link=pools[0].link, hop=1,
                       payload=payload, slices=slices0)
    in_data = pools[0].read(fwd.consumed_refs())
    slices1 = pools[1].take(need)
    fwd2 = reencrypt(fwd, in_data, pools[1].link, slices1)
    dl, dpayload = seal_deliver(**ends, index=1, msg_id=uid(rng), link=pools[1].link,
                                key_bits=256, slices=pools[1].take(need))
    conf = seal_confirm(**ends, index=0, msg_id=fwd.msg_id, payload=payload)
    materials = split_slices(slices0, [64, 32])
    secrets = [payload.key, payload.confirm_key, dpayload.key, dpayload.confirm_key, in_data,
               b"".join(s.data for s in slices1)]
    secrets += [m.data for m in materials]
    texts = [repr(o) for o in (fwd, fwd2, dl, conf, payload, dpayload, *materials)]
    texts += [str(o) for o in (fwd, fwd2, dl, conf, payload, dpayload, *materials)]

    errors = []
    for call in (
        lambda: open_forward(fwd, bytes(len(in_data))),
        lambda: open_forward(ForwardMessage.from_dict(
            {**fwd.to_dict(), "tag": base64.b64encode(bytes(16)).decode()}), in_data),
        lambda: ForwardMessage.from_dict({**fwd.to_dict(), "ciphertext": base64.b64encode(
            payload.key).decode()[:-1]}),
        lambda: ForwardMessage.from_dict({**fwd.to_dict(), "ksid": payload.key.hex()}),
        lambda: ForwardMessage.from_json(fwd.to_json()[:-2] + payload.key.hex()),
        lambda: open_(payload.key, bytes(16), payload.key, payload.confirm_key, b"h"),
        lambda: seal(payload.key, payload.key[:-1], payload.confirm_key, b"h"),
        lambda: verify_confirm(conf, dpayload),
        lambda: RelayPayload(payload.key, payload.key[:5]),
        lambda: Material((KeyRef(uid(rng), 0, 4),), payload.key),
        lambda: split_slices(slices0, [1]),
    ):
        with pytest.raises(Exception) as err:
            call()
        errors += [str(err.value), repr(err.value)]
    assert len(errors) == 22
    for text in texts + errors:
        for leak in secret_spellings(*secrets):
            assert leak not in text


# --------------------------------------------------------------------------- multicast group member

def test_forward_group_is_authenticated_and_round_trips(rng, ends):
    pool = LinkPool(rng)
    payload = RelayPayload.generate(256, rng.randbytes)
    group = uid(rng)
    msg = seal_forward(**ends, index=2, msg_id=uid(rng), link=pool.link, hop=1, payload=payload,
                       slices=pool.take(link_key_bits_needed(256)), group=group)
    wire = msg.to_dict()
    assert wire["group"] == group
    again = ForwardMessage.from_dict(json.loads(json.dumps(wire)))
    assert again == msg and again.group == group
    assert open_forward(again, pool.read(again.consumed_refs())) == payload
    # Another group, no group, or a group added to a message sealed without one: the tag fails.
    for forged in ({**wire, "group": uid(rng)}, {k: v for k, v in wire.items() if k != "group"}):
        with pytest.raises(RelayAuthError):
            open_forward(ForwardMessage.from_dict(forged), pool.read(msg.consumed_refs()))
    plain_pool = LinkPool(rng)
    plain = seal_forward(**ends, index=3, msg_id=uid(rng), link=plain_pool.link, hop=1, payload=payload,
                         slices=plain_pool.take(link_key_bits_needed(256)))
    assert "group" not in plain.to_dict() and plain.group is None
    with pytest.raises(RelayAuthError):
        open_forward(ForwardMessage.from_dict({**plain.to_dict(), "group": group}),
                     plain_pool.read(plain.consumed_refs()))


def test_forward_group_must_be_a_uuid(rng, ends):
    _pool, _payload, msg = one_hop(rng, ends)
    for bad in (None, "not-a-uuid", 7):
        with pytest.raises(RelayFormatError, match="group"):
            ForwardMessage.from_dict({**msg.to_dict(), "group": bad})


def test_reencrypt_keeps_the_group(rng, ends):
    first, nxt = LinkPool(rng), LinkPool(rng)
    payload = RelayPayload.generate(128, rng.randbytes)
    group = uid(rng)
    msg = seal_forward(**ends, index=0, msg_id=uid(rng), link=first.link, hop=1, payload=payload,
                       slices=first.take(link_key_bits_needed(128)), group=group)
    onward = reencrypt(msg, first.consume(msg.consumed_refs()), nxt.link, nxt.take(link_key_bits_needed(128)))
    assert onward.group == group and onward.hop == 2
    assert open_forward(onward, nxt.read(onward.consumed_refs())) == payload


# --------------------------------------------------------------------------- batches


def test_batch_of_forwards_round_trip_each_key_with_its_own_material(rng, ends):
    pool = LinkPool(rng, n_keys=40)
    needed = link_key_bits_needed(256)
    parts = relay.partition_slices(pool.take(3 * needed), [needed // 8] * 3)
    assert [sum(s.length for s in p) for p in parts] == [needed // 8] * 3
    payloads = [RelayPayload.generate(256, rng.randbytes) for _ in parts]
    msgs = [seal_forward(**ends, index=i, msg_id=uid(rng), link=pool.link, hop=1, payload=p, slices=part)
            for i, (p, part) in enumerate(zip(payloads, parts))]
    batch = relay.RelayBatch.from_dict(json.loads(json.dumps(relay.RelayBatch(tuple(msgs)).to_dict())), "forward")
    assert batch.kind == "forward" and batch.messages == tuple(msgs)
    data = pool.consume(batch.consumed_refs())
    assert [relay.open_forward(m, d) for m, d in zip(batch.messages, batch.split(data))] == payloads
    assert pool.receiver_consumed_bits == pool.sender_taken_bits == 3 * needed


def test_batch_format_is_strict(rng, ends):
    pool = LinkPool(rng, n_keys=40)
    needed = link_key_bits_needed(256)

    def msg(index, **over):
        fields = {**ends, "index": index, "msg_id": uid(rng), "link": pool.link, "hop": 1, **over}
        return seal_forward(**fields, payload=RelayPayload.generate(256, rng.randbytes), slices=pool.take(needed))

    one = msg(1)
    cases = [
        ({"messages": []}, "must not be empty"),
        ({"messages": [one.to_dict()], "extra": 1}, "unknown member 'extra'"),
        ({"messages": [one.to_dict(), msg(2, hop=2).to_dict()]}, r"messages\[1\]\.hop"),
        ({"messages": [one.to_dict(), msg(3, ksid=uid(rng)).to_dict()]}, r"messages\[1\]\.ksid"),
        ({"messages": [one.to_dict(), msg(1).to_dict()]}, r"messages\[1\]\.index"),
        ({"messages": [one.to_dict(), {**msg(4).to_dict(), "msg_id": one.msg_id}]}, r"messages\[1\]\.msg_id"),
        ({"messages": [one.to_dict(), {**msg(5).to_dict(), "pad_refs": one.to_dict()["pad_refs"]}]},
         "overlaps|must cover"),
        ({"messages": [{**one.to_dict(), "hop": 0}]}, r"messages\[0\].*hop"),
        ({"messages": [one.to_dict()] * (relay.MAX_BATCH + 1)}, "more than"),
    ]
    for body, match in cases:
        with pytest.raises(RelayFormatError, match=match):
            relay.RelayBatch.from_dict(body, "forward")
    with pytest.raises(RelayFormatError, match="messages"):
        relay.RelayBatch.from_dict({"messages": [one.to_dict()]}, "deliver")  # a forward is no deliver
