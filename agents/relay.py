"""Trusted-node relay: the messages key managers exchange, and their cryptography.

Pure module: no I/O, no clock (the time is an argument). Link-key material comes
in as ``(refs, bytes)`` pairs -- the refs name ranges of link keys by key ID,
byte offset and length, the bytes are those ranges' content -- so this module
does not depend on the key store. ``docs/relay.md`` has the wire formats and the
security argument.

Relayed key (route of three nodes or more), per hop::

    payload    = key || confirm_key                (confirm_key: 32 random bytes)
    ciphertext = payload XOR pad                   (pad: len(payload) bytes of link key)
    tag        = Poly1305(mac_key, header || ciphertext)   (mac_key: 32 more bytes of link key)

Adjacent endpoints: the key *is* link key; a ``deliver`` message names the
ranges (key, confirmation key) and carries a Poly1305 tag over its header keyed
by 32 further link-key bytes. Either way the destination answers with a
``confirm`` tagged by Poly1305 under the confirmation key, which only the two
endpoints (and the trusted nodes between them) know. Every key, pad and MAC key
is used once.

Key bytes never appear in a repr, a str or an exception message.
"""
from __future__ import annotations

import base64
import binascii
import json
import os
import struct
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Mapping, NamedTuple, Sequence

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.poly1305 import Poly1305

TAG_BYTES = 16
MAC_KEY_BYTES = 32  # Poly1305 one-time key: r (16 bytes) and s (16 bytes)
CONFIRM_KEY_BYTES = 32
MAC_KEY_BITS = 8 * MAC_KEY_BYTES
CONFIRM_KEY_BITS = 8 * CONFIRM_KEY_BYTES
# Bounds keep hostile input from costing memory or CPU; all are far above real use.
MAX_KEY_BYTES = 8192  # 65536-bit end-to-end keys
MAX_HOPS = 64
MAX_REFS = 1024  # ranges per list in one message
MAX_LINK_KEYS = 4096  # key IDs per link_keys message
MAX_BATCH = 128  # messages per forward_batch / deliver_batch (ETSI 014 max_key_per_request)
MAX_BATCH_REFS = 4096  # link-key ranges named by all messages of one batch together
MAX_INT = 2**63 - 1  # indices, offsets and lengths fit a signed 64-bit column
MAX_JSON_CHARS = 1 << 20
OWNERS = ("master", "slave")

# Domain separation: a tag made for one message kind (or protocol version) never
# verifies as another.
_DOMAIN = b"qkdsdn-relay/1\x00"


# 409 answers of a relay receiver that are about the key, not the route: the index names another
# key there (the sender must not use that index again) or the key's multicast group is not the
# session's. Any other 409 means the receiver does not know the session (not configured yet,
# or not any more).
KEY_CONFLICT = "a different key with that index is already stored"
GROUP_CONFLICT = "the key's multicast group is not the session's"


class RelayError(Exception):
    """Base of the relay's errors. Messages never carry key material."""


class RelayFormatError(RelayError, ValueError):
    """A message (or a field given to a constructor) is malformed; the text names the member."""


class RelayAuthError(RelayError):
    """An authentication tag does not verify: the message was altered, forged or misrouted."""


# --------------------------------------------------------------------------- helpers

def _fail(kind: str, member: str, problem: str) -> RelayFormatError:
    return RelayFormatError(f"{kind} message: member '{member}' {problem}")


def _uuid(kind: str, member: str, value: Any, *, v4: bool = False) -> str:
    """Canonical (lower-case, hyphenated) UUID text; only that textual form is accepted."""
    if not isinstance(value, str):
        raise _fail(kind, member, "must be a UUID string")
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        raise _fail(kind, member, "is not a UUID") from None
    canonical = str(parsed)
    # uuid.UUID also takes braces, 'urn:uuid:' and unhyphenated forms: refuse them,
    # so one UUID has one spelling on the wire.
    if value.lower() != canonical:
        raise _fail(kind, member, "is not a UUID in 8-4-4-4-12 form")
    if v4 and (parsed.version != 4 or parsed.variant != uuid.RFC_4122):
        raise _fail(kind, member, "must be a random (version 4) UUID")
    return canonical


def _int(kind: str, member: str, value: Any, lo: int, hi: int) -> int:
    # bool is an int subclass; JSON true is not a number.
    if not isinstance(value, int) or isinstance(value, bool):
        raise _fail(kind, member, "must be an integer")
    if not lo <= value <= hi:
        raise _fail(kind, member, f"must be between {lo} and {hi}")
    return value


def _bytes(kind: str, member: str, value: Any) -> bytes:
    if not isinstance(value, (bytes, bytearray)):
        raise _fail(kind, member, "must be bytes")
    return bytes(value)


def _b64(kind: str, member: str, value: Any) -> bytes:
    if not isinstance(value, str):
        raise _fail(kind, member, "must be a base64 string")
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        raise _fail(kind, member, "is not valid base64") from None
    # Non-zero padding bits decode too: refuse them so a message has one encoding.
    if base64.b64encode(raw).decode("ascii") != value:
        raise _fail(kind, member, "is not canonical base64")
    return raw


def _b64enc(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _members(kind: str, obj: Any, members: Sequence[str], optional: Sequence[str] = ()) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping):
        raise RelayFormatError(f"{kind} message: must be a JSON object")
    missing = [m for m in members if m not in obj]
    if missing:
        raise RelayFormatError(f"{kind} message: missing member '{missing[0]}'")
    unknown = sorted(str(k) for k in obj if k not in members and k not in optional)
    if unknown:
        raise RelayFormatError(f"{kind} message: unknown member '{unknown[0]}'")
    return obj


def _list(kind: str, member: str, value: Any, max_len: int, *, allow_empty: bool = False) -> list:
    if not isinstance(value, list):
        raise _fail(kind, member, "must be a list")
    if not value and not allow_empty:
        raise _fail(kind, member, "must not be empty")
    if len(value) > max_len:
        raise _fail(kind, member, f"has more than {max_len} items")
    return value


def _seq(kind: str, member: str, value: Any) -> tuple:
    if isinstance(value, (str, bytes, bytearray, Mapping)) or not isinstance(value, Iterable):
        raise _fail(kind, member, "must be a sequence")
    return tuple(value)


def _loads(kind: str, text: str | bytes | bytearray) -> Any:
    if not isinstance(text, (str, bytes, bytearray)):
        raise RelayFormatError(f"{kind} message: must be JSON text")
    if len(text) > MAX_JSON_CHARS:
        raise RelayFormatError(f"{kind} message: longer than {MAX_JSON_CHARS} characters")

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
        out: dict = {}
        for k, v in pairs:
            if k in out:
                raise RelayFormatError(f"{kind} message: member '{k}' appears twice")
            out[k] = v
        return out

    def no_constants(name: str) -> Any:
        raise RelayFormatError(f"{kind} message: {name} is not a JSON number")

    try:
        return json.loads(text, object_pairs_hook=no_duplicates, parse_constant=no_constants)
    except RelayFormatError:
        raise
    except json.JSONDecodeError as exc:
        # Position only: the document's content stays out of the error.
        raise RelayFormatError(f"{kind} message: not valid JSON ({exc.msg} at line {exc.lineno} "
                               f"column {exc.colno})") from None
    except UnicodeDecodeError:
        raise RelayFormatError(f"{kind} message: not UTF-8 text") from None
    except RecursionError:
        raise RelayFormatError(f"{kind} message: nested too deeply") from None


def _dumps(obj: Mapping[str, Any]) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


# --------------------------------------------------------------------------- key references

class KeyRef(NamedTuple):
    """A byte range of one link key: the store's ``(key_ID, offset, length)``."""

    key_ID: str
    offset: int
    length: int

    def to_dict(self) -> dict[str, Any]:
        return {"key_ID": self.key_ID, "offset": self.offset, "length": self.length}

    @classmethod
    def from_dict(cls, obj: Any, kind: str = "key reference", member: str = "ref") -> KeyRef:
        if not isinstance(obj, Mapping):
            raise _fail(kind, member, "must be a JSON object")
        extra = sorted(str(k) for k in obj if k not in cls._fields)
        if extra:
            raise _fail(kind, f"{member}.{extra[0]}", "is not a member of a key reference")
        for m in cls._fields:
            if m not in obj:
                raise _fail(kind, f"{member}.{m}", "is missing")
        return _check_ref(kind, member, cls(obj["key_ID"], obj["offset"], obj["length"]))


def _check_ref(kind: str, member: str, ref: Any) -> KeyRef:
    if not isinstance(ref, tuple) or len(ref) != 3:
        raise _fail(kind, member, "must be a (key_ID, offset, length) reference")
    key_id, offset, length = ref
    return KeyRef(_uuid(kind, f"{member}.key_ID", key_id),
                  _int(kind, f"{member}.offset", offset, 0, MAX_INT),
                  _int(kind, f"{member}.length", length, 1, MAX_INT))


def _check_refs(kind: str, member: str, refs: Any) -> tuple[KeyRef, ...]:
    refs = _seq(kind, member, refs)
    if not refs:
        raise _fail(kind, member, "must not be empty")
    if len(refs) > MAX_REFS:
        raise _fail(kind, member, f"has more than {MAX_REFS} items")
    return tuple(_check_ref(kind, f"{member}[{i}]", r) for i, r in enumerate(refs))


def _refs_from_json(kind: str, member: str, value: Any) -> tuple[KeyRef, ...]:
    items = _list(kind, member, value, MAX_REFS)
    return tuple(KeyRef.from_dict(item, kind, f"{member}[{i}]") for i, item in enumerate(items))


def _span(refs: Sequence[KeyRef]) -> int:
    return sum(r.length for r in refs)


def _check_disjoint(kind: str, groups: Sequence[tuple[str, Sequence[KeyRef]]]) -> None:
    """No byte of link key may be named twice in one message: a range used both as
    pad and as MAC key, or as two parts of one pad, would break the one-time use."""
    by_key: dict[str, list[tuple[int, int, str]]] = {}
    for member, refs in groups:
        for i, r in enumerate(refs):
            by_key.setdefault(r.key_ID, []).append((r.offset, r.offset + r.length, f"{member}[{i}]"))
    for ranges in by_key.values():
        ranges.sort()
        for (_, end, first), (start, _, second) in zip(ranges, ranges[1:]):
            if start < end:
                raise _fail(kind, second, f"overlaps '{first}': a link-key byte may be used once only")


# --------------------------------------------------------------------------- key material

@dataclass(frozen=True)
class Material:
    """Link-key bytes together with the refs that name them (in order)."""

    refs: tuple[KeyRef, ...]
    data: bytes = field(repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "refs", _check_refs("link-key material", "refs", self.refs))
        if not isinstance(self.data, bytes):
            raise TypeError("link-key material: data must be bytes")
        if _span(self.refs) != len(self.data):
            raise ValueError(f"link-key material: refs cover {_span(self.refs)} bytes, "
                             f"data has {len(self.data)}")


def split_slices(slices: Iterable[Any], sizes: Sequence[int]) -> list[Material]:
    """Cut the key store's slices (objects with ``key_id`` or ``key_ID``, and
    ``offset, length, data``: ``KeySlice``) into consecutive parts of the given
    byte sizes.

    A slice may be cut inside; the total must match exactly, so material the
    caller took is never silently left over.
    """
    pieces: list[tuple[KeyRef, bytes]] = []
    for i, s in enumerate(slices):
        try:
            key_id = s.key_id if hasattr(s, "key_id") else s.key_ID
            offset, length, data = s.offset, s.length, s.data
        except AttributeError:
            raise TypeError(f"slice {i}: needs key_id, offset, length and data") from None
        ref = _check_ref("link-key material", f"slices[{i}]", (key_id, offset, length))
        if not isinstance(data, (bytes, bytearray)) or len(data) != ref.length:
            raise ValueError(f"link-key material: slices[{i}] has length {ref.length} "
                             f"but not that many bytes of data")
        pieces.append((ref, bytes(data)))
    have, want = sum(len(d) for _, d in pieces), sum(sizes)
    if have != want:
        raise ValueError(f"link-key material: {have} bytes given, exactly {want} needed")
    out: list[Material] = []
    i = pos = 0
    for size in sizes:
        if size < 1:
            raise ValueError("link-key material: every part needs at least one byte")
        refs: list[KeyRef] = []
        chunks: list[bytes] = []
        need = size
        while need:
            ref, data = pieces[i]
            n = min(need, ref.length - pos)
            refs.append(KeyRef(ref.key_ID, ref.offset + pos, n))
            chunks.append(data[pos:pos + n])
            pos += n
            need -= n
            if pos == ref.length:
                i, pos = i + 1, 0
        out.append(Material(tuple(refs), b"".join(chunks)))
    return out


def _split_received(groups: Sequence[Sequence[KeyRef]], data: bytes) -> list[Material]:
    """The receiver's bytes for ``refs1 + refs2 + ...``, split back per group."""
    if not isinstance(data, (bytes, bytearray)):
        raise TypeError("link-key material must be bytes")
    want = sum(_span(g) for g in groups)
    if len(data) != want:
        raise ValueError(f"link-key material: {len(data)} bytes given, the message names {want}")
    out, at = [], 0
    for g in groups:
        n = _span(g)
        out.append(Material(tuple(g), bytes(data[at:at + n])))
        at += n
    return out


def link_key_bits_needed(key_bits: int) -> int:
    """Link-key bits one hop consumes to carry a ``key_bits`` end-to-end key.

    The relayed payload is the key plus a 256-bit confirmation key; the pad is
    exactly one link-key bit per payload bit, and the one-time MAC key is 256
    more: ``key_bits + 256 + 256``. An adjacent ``deliver`` consumes the same.
    """
    if not isinstance(key_bits, int) or isinstance(key_bits, bool):
        raise TypeError("key_bits must be an integer")
    if key_bits < 8 or key_bits % 8 or key_bits > 8 * MAX_KEY_BYTES:
        raise ValueError(f"key_bits must be a multiple of 8 between 8 and {8 * MAX_KEY_BYTES}")
    return key_bits + CONFIRM_KEY_BITS + MAC_KEY_BITS


# --------------------------------------------------------------------------- payload

@dataclass(frozen=True, repr=False)
class RelayPayload:
    """What a relay carries end to end: the key and the one-time confirmation key."""

    key: bytes
    confirm_key: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.key, bytes) or not 1 <= len(self.key) <= MAX_KEY_BYTES:
            raise ValueError(f"relay payload: the key must be 1 to {MAX_KEY_BYTES} bytes")
        if not isinstance(self.confirm_key, bytes) or len(self.confirm_key) != CONFIRM_KEY_BYTES:
            raise ValueError(f"relay payload: the confirmation key must be {CONFIRM_KEY_BYTES} bytes")

    def __repr__(self) -> str:
        return f"RelayPayload(key_bits={self.key_bits})"

    @property
    def key_bits(self) -> int:
        return 8 * len(self.key)

    def to_bytes(self) -> bytes:
        return self.key + self.confirm_key

    @classmethod
    def from_bytes(cls, data: bytes) -> RelayPayload:
        if len(data) <= CONFIRM_KEY_BYTES:
            raise ValueError("relay payload: too short to hold a key and a confirmation key")
        return cls(bytes(data[:-CONFIRM_KEY_BYTES]), bytes(data[-CONFIRM_KEY_BYTES:]))

    @classmethod
    def generate(cls, key_bits: int, randbytes: Callable[[int], bytes] = os.urandom) -> RelayPayload:
        """A fresh key and confirmation key from the CSPRNG (the source KM's job)."""
        link_key_bits_needed(key_bits)  # validates key_bits
        return cls(randbytes(key_bits // 8), randbytes(CONFIRM_KEY_BYTES))


# --------------------------------------------------------------------------- one-time pad + Poly1305

def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def seal(plaintext_key: bytes, pad: bytes, mac_key: bytes, header: bytes) -> tuple[bytes, bytes]:
    """One-time-pad ``plaintext_key`` and tag ``header || ciphertext`` with Poly1305.

    ``pad`` (exactly ``len(plaintext_key)`` bytes) and ``mac_key`` (32 bytes) are
    link key, each used for this one message only. ``header`` must be a
    self-delimiting encoding (``forward_header``) so header and ciphertext cannot
    be re-split. Returns ``(ciphertext, tag)``.
    """
    if not plaintext_key:
        raise ValueError("nothing to seal: the plaintext is empty")
    if len(pad) != len(plaintext_key):
        raise ValueError(f"the pad must be exactly as long as the plaintext "
                         f"({len(pad)} != {len(plaintext_key)} bytes)")
    if len(mac_key) != MAC_KEY_BYTES:
        raise ValueError(f"the MAC key must be {MAC_KEY_BYTES} bytes, not {len(mac_key)}")
    ciphertext = _xor(bytes(plaintext_key), bytes(pad))
    return ciphertext, Poly1305.generate_tag(bytes(mac_key), bytes(header) + ciphertext)


def _verify(mac_key: bytes, data: bytes, tag: bytes) -> None:
    if len(mac_key) != MAC_KEY_BYTES:
        raise ValueError(f"the MAC key must be {MAC_KEY_BYTES} bytes, not {len(mac_key)}")
    if len(tag) != TAG_BYTES:
        raise RelayAuthError("the authentication tag does not verify")
    try:
        # Constant-time comparison inside cryptography.
        Poly1305.verify_tag(bytes(mac_key), bytes(data), bytes(tag))
    except InvalidSignature:
        raise RelayAuthError("the authentication tag does not verify") from None


def open_(ciphertext: bytes, tag: bytes, pad: bytes, mac_key: bytes, header: bytes) -> bytes:
    """Check the tag over ``header || ciphertext``, then remove the pad.

    Raises RelayAuthError before any decryption if the tag does not verify.
    """
    if not ciphertext:
        raise ValueError("nothing to open: the ciphertext is empty")
    if len(pad) != len(ciphertext):
        raise ValueError(f"the pad must be exactly as long as the ciphertext "
                         f"({len(pad)} != {len(ciphertext)} bytes)")
    _verify(mac_key, bytes(header) + bytes(ciphertext), tag)
    return _xor(bytes(ciphertext), bytes(pad))


# --------------------------------------------------------------------------- canonical headers

def _enc_uuid(s: str) -> bytes:
    return uuid.UUID(s).bytes


def _enc_refs(refs: Sequence[KeyRef]) -> bytes:
    out = [struct.pack(">I", len(refs))]
    out.extend(_enc_uuid(r.key_ID) + struct.pack(">QQ", r.offset, r.length) for r in refs)
    return b"".join(out)


def forward_header(ksid: str, index: int, msg_id: str, link: str, hop: int, source_node: str,
                   destination_node: str, pad_refs: Sequence[KeyRef],
                   mac_refs: Sequence[KeyRef], group: str | None = None) -> bytes:
    """Canonical, self-delimiting encoding of a forward message's header fields:
    fixed-width UUIDs and integers, count-prefixed ref lists, and the optional
    multicast group as a presence byte and a UUID."""
    return b"".join([
        _DOMAIN, b"forward\x00", _enc_uuid(ksid), struct.pack(">Q", index), _enc_uuid(msg_id),
        _enc_uuid(link), struct.pack(">H", hop), _enc_uuid(source_node),
        _enc_uuid(destination_node), _enc_refs(pad_refs), _enc_refs(mac_refs),
        b"\x00" if group is None else b"\x01" + _enc_uuid(group)])


def deliver_header(ksid: str, index: int, msg_id: str, link: str, source_node: str,
                   destination_node: str, key_refs: Sequence[KeyRef],
                   confirm_refs: Sequence[KeyRef], mac_refs: Sequence[KeyRef]) -> bytes:
    return b"".join([
        _DOMAIN, b"deliver\x00", _enc_uuid(ksid), struct.pack(">Q", index), _enc_uuid(msg_id),
        _enc_uuid(link), _enc_uuid(source_node), _enc_uuid(destination_node),
        _enc_refs(key_refs), _enc_refs(confirm_refs), _enc_refs(mac_refs)])


def confirm_header(ksid: str, index: int, msg_id: str, source_node: str,
                   destination_node: str) -> bytes:
    return b"".join([
        _DOMAIN, b"confirm\x00", _enc_uuid(ksid), struct.pack(">Q", index), _enc_uuid(msg_id),
        _enc_uuid(source_node), _enc_uuid(destination_node)])


# --------------------------------------------------------------------------- messages

class _Json:
    KIND: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def to_json(self) -> str:
        return _dumps(self.to_dict())

    @classmethod
    def from_dict(cls, obj: Any) -> Any:
        raise NotImplementedError

    @classmethod
    def from_json(cls, text: str | bytes | bytearray) -> Any:
        return cls.from_dict(_loads(cls.KIND, text))


@dataclass(frozen=True)
class ForwardMessage(_Json):
    """One hop of a relayed key (``POST /relay/v1/forward``).

    ``msg_id`` stays the same along the route; ``link`` and ``hop`` (1 on the
    first link) change at every trusted node, as do the refs, ciphertext and tag.
    ``group`` (optional, authenticated like the rest of the header) names the
    ETSI 014 multicast group the key belongs to: the destination derives the
    key's key_ID from it instead of from ``ksid`` (docs/relay.md).
    """

    KIND: ClassVar[str] = "forward"
    MEMBERS: ClassVar[tuple[str, ...]] = (
        "ksid", "index", "msg_id", "link", "hop", "source_node", "destination_node",
        "pad_refs", "mac_refs", "ciphertext", "tag")
    OPTIONAL: ClassVar[tuple[str, ...]] = ("group",)

    ksid: str
    index: int
    msg_id: str
    link: str
    hop: int
    source_node: str
    destination_node: str
    pad_refs: tuple[KeyRef, ...]
    mac_refs: tuple[KeyRef, ...]
    ciphertext: bytes = field(repr=False)
    tag: bytes = field(repr=False)
    group: str | None = None

    def __post_init__(self) -> None:
        k, s = self.KIND, object.__setattr__
        for m in ("ksid", "link", "source_node", "destination_node"):
            s(self, m, _uuid(k, m, getattr(self, m)))
        if self.group is not None:
            s(self, "group", _uuid(k, "group", self.group))
        s(self, "msg_id", _uuid(k, "msg_id", self.msg_id, v4=True))
        _int(k, "index", self.index, 0, MAX_INT)
        _int(k, "hop", self.hop, 1, MAX_HOPS)
        if self.source_node == self.destination_node:
            raise _fail(k, "destination_node", "must differ from 'source_node'")
        s(self, "pad_refs", _check_refs(k, "pad_refs", self.pad_refs))
        s(self, "mac_refs", _check_refs(k, "mac_refs", self.mac_refs))
        s(self, "ciphertext", _bytes(k, "ciphertext", self.ciphertext))
        s(self, "tag", _bytes(k, "tag", self.tag))
        n = len(self.ciphertext)
        if not CONFIRM_KEY_BYTES < n <= MAX_KEY_BYTES + CONFIRM_KEY_BYTES:
            raise _fail(k, "ciphertext", f"must be {CONFIRM_KEY_BYTES + 1} to "
                        f"{MAX_KEY_BYTES + CONFIRM_KEY_BYTES} bytes long")
        if len(self.tag) != TAG_BYTES:
            raise _fail(k, "tag", f"must be {TAG_BYTES} bytes long")
        if _span(self.pad_refs) != n:
            raise _fail(k, "pad_refs", f"must cover exactly the ciphertext's {n} bytes")
        if _span(self.mac_refs) != MAC_KEY_BYTES:
            raise _fail(k, "mac_refs", f"must cover exactly {MAC_KEY_BYTES} bytes")
        _check_disjoint(k, [("pad_refs", self.pad_refs), ("mac_refs", self.mac_refs)])

    @property
    def key_bits(self) -> int:
        return 8 * (len(self.ciphertext) - CONFIRM_KEY_BYTES)

    def header(self) -> bytes:
        return forward_header(self.ksid, self.index, self.msg_id, self.link, self.hop,
                              self.source_node, self.destination_node, self.pad_refs,
                              self.mac_refs, self.group)

    def consumed_refs(self) -> list[KeyRef]:
        """The link-key ranges the receiver consumes, in the order ``open_forward`` expects."""
        return [*self.pad_refs, *self.mac_refs]

    def to_dict(self) -> dict[str, Any]:
        out = {"ksid": self.ksid, "index": self.index, "msg_id": self.msg_id, "link": self.link,
               "hop": self.hop, "source_node": self.source_node,
               "destination_node": self.destination_node,
               "pad_refs": [r.to_dict() for r in self.pad_refs],
               "mac_refs": [r.to_dict() for r in self.mac_refs],
               "ciphertext": _b64enc(self.ciphertext), "tag": _b64enc(self.tag)}
        if self.group is not None:
            out["group"] = self.group
        return out

    @classmethod
    def from_dict(cls, obj: Any) -> ForwardMessage:
        k = cls.KIND
        o = _members(k, obj, cls.MEMBERS, cls.OPTIONAL)
        if "group" in o and o["group"] is None:
            raise _fail(k, "group", "must be a UUID when present")
        return cls(ksid=o["ksid"], index=o["index"], msg_id=o["msg_id"], link=o["link"],
                   hop=o["hop"], source_node=o["source_node"],
                   destination_node=o["destination_node"],
                   pad_refs=_refs_from_json(k, "pad_refs", o["pad_refs"]),
                   mac_refs=_refs_from_json(k, "mac_refs", o["mac_refs"]),
                   ciphertext=_b64(k, "ciphertext", o["ciphertext"]), tag=_b64(k, "tag", o["tag"]),
                   group=o.get("group"))


@dataclass(frozen=True)
class DeliverMessage(_Json):
    """Adjacent endpoints (``POST /relay/v1/deliver``): the key is the link-key
    ranges ``key_refs``; ``confirm_refs`` is the confirmation key. Refs are not
    secret, but the tag (keyed by the ``mac_refs`` ranges) binds them to this
    KSID, index and pair of nodes, so nobody on the classical channel can make
    the destination file the key under another session."""

    KIND: ClassVar[str] = "deliver"
    MEMBERS: ClassVar[tuple[str, ...]] = (
        "ksid", "index", "msg_id", "link", "source_node", "destination_node", "key_refs",
        "confirm_refs", "mac_refs", "tag")

    ksid: str
    index: int
    msg_id: str
    link: str
    source_node: str
    destination_node: str
    key_refs: tuple[KeyRef, ...]
    confirm_refs: tuple[KeyRef, ...]
    mac_refs: tuple[KeyRef, ...]
    tag: bytes = field(repr=False)

    def __post_init__(self) -> None:
        k, s = self.KIND, object.__setattr__
        for m in ("ksid", "link", "source_node", "destination_node"):
            s(self, m, _uuid(k, m, getattr(self, m)))
        s(self, "msg_id", _uuid(k, "msg_id", self.msg_id, v4=True))
        _int(k, "index", self.index, 0, MAX_INT)
        if self.source_node == self.destination_node:
            raise _fail(k, "destination_node", "must differ from 'source_node'")
        for m in ("key_refs", "confirm_refs", "mac_refs"):
            s(self, m, _check_refs(k, m, getattr(self, m)))
        s(self, "tag", _bytes(k, "tag", self.tag))
        if len(self.tag) != TAG_BYTES:
            raise _fail(k, "tag", f"must be {TAG_BYTES} bytes long")
        if _span(self.key_refs) > MAX_KEY_BYTES:
            raise _fail(k, "key_refs", f"must cover at most {MAX_KEY_BYTES} bytes")
        if _span(self.confirm_refs) != CONFIRM_KEY_BYTES:
            raise _fail(k, "confirm_refs", f"must cover exactly {CONFIRM_KEY_BYTES} bytes")
        if _span(self.mac_refs) != MAC_KEY_BYTES:
            raise _fail(k, "mac_refs", f"must cover exactly {MAC_KEY_BYTES} bytes")
        _check_disjoint(k, [("key_refs", self.key_refs), ("confirm_refs", self.confirm_refs),
                            ("mac_refs", self.mac_refs)])

    @property
    def key_bits(self) -> int:
        return 8 * _span(self.key_refs)

    def header(self) -> bytes:
        return deliver_header(self.ksid, self.index, self.msg_id, self.link, self.source_node,
                              self.destination_node, self.key_refs, self.confirm_refs,
                              self.mac_refs)

    def consumed_refs(self) -> list[KeyRef]:
        """The link-key ranges the receiver consumes, in the order ``open_deliver`` expects."""
        return [*self.key_refs, *self.confirm_refs, *self.mac_refs]

    def to_dict(self) -> dict[str, Any]:
        return {"ksid": self.ksid, "index": self.index, "msg_id": self.msg_id, "link": self.link,
                "source_node": self.source_node, "destination_node": self.destination_node,
                "key_refs": [r.to_dict() for r in self.key_refs],
                "confirm_refs": [r.to_dict() for r in self.confirm_refs],
                "mac_refs": [r.to_dict() for r in self.mac_refs], "tag": _b64enc(self.tag)}

    @classmethod
    def from_dict(cls, obj: Any) -> DeliverMessage:
        k = cls.KIND
        o = _members(k, obj, cls.MEMBERS)
        return cls(ksid=o["ksid"], index=o["index"], msg_id=o["msg_id"], link=o["link"],
                   source_node=o["source_node"], destination_node=o["destination_node"],
                   key_refs=_refs_from_json(k, "key_refs", o["key_refs"]),
                   confirm_refs=_refs_from_json(k, "confirm_refs", o["confirm_refs"]),
                   mac_refs=_refs_from_json(k, "mac_refs", o["mac_refs"]),
                   tag=_b64(k, "tag", o["tag"]))


@dataclass(frozen=True)
class ConfirmMessage(_Json):
    """The destination's proof that it holds key ``index`` of ``ksid`` (``POST
    /relay/v1/confirm``), travelling back to the source. ``msg_id`` is that of
    the forward/deliver being confirmed. The tag is Poly1305 under the one-time
    confirmation key, so it says nothing about the key itself."""

    KIND: ClassVar[str] = "confirm"
    MEMBERS: ClassVar[tuple[str, ...]] = (
        "ksid", "index", "msg_id", "source_node", "destination_node", "tag")

    ksid: str
    index: int
    msg_id: str
    source_node: str
    destination_node: str
    tag: bytes = field(repr=False)

    def __post_init__(self) -> None:
        k, s = self.KIND, object.__setattr__
        for m in ("ksid", "source_node", "destination_node"):
            s(self, m, _uuid(k, m, getattr(self, m)))
        s(self, "msg_id", _uuid(k, "msg_id", self.msg_id, v4=True))
        _int(k, "index", self.index, 0, MAX_INT)
        if self.source_node == self.destination_node:
            raise _fail(k, "destination_node", "must differ from 'source_node'")
        s(self, "tag", _bytes(k, "tag", self.tag))
        if len(self.tag) != TAG_BYTES:
            raise _fail(k, "tag", f"must be {TAG_BYTES} bytes long")

    def header(self) -> bytes:
        return confirm_header(self.ksid, self.index, self.msg_id, self.source_node,
                              self.destination_node)

    def to_dict(self) -> dict[str, Any]:
        return {"ksid": self.ksid, "index": self.index, "msg_id": self.msg_id,
                "source_node": self.source_node, "destination_node": self.destination_node,
                "tag": _b64enc(self.tag)}

    @classmethod
    def from_dict(cls, obj: Any) -> ConfirmMessage:
        o = _members(cls.KIND, obj, cls.MEMBERS)
        return cls(ksid=o["ksid"], index=o["index"], msg_id=o["msg_id"],
                   source_node=o["source_node"], destination_node=o["destination_node"],
                   tag=_b64(cls.KIND, "tag", o["tag"]))


class LinkKey(NamedTuple):
    """A link key's ID and the end that may spend it."""

    key_ID: str
    owner: str


@dataclass(frozen=True)
class LinkKeysMessage(_Json):
    """Master to slave: key IDs the master took from its device, with their owner
    (``POST /relay/v1/link_keys``). Carries IDs only, never key bytes."""

    KIND: ClassVar[str] = "link_keys"
    MEMBERS: ClassVar[tuple[str, ...]] = ("link", "keys")

    link: str
    keys: tuple[LinkKey, ...]

    def __post_init__(self) -> None:
        k, s = self.KIND, object.__setattr__
        s(self, "link", _uuid(k, "link", self.link))
        items = _seq(k, "keys", self.keys)
        if not items:
            raise _fail(k, "keys", "must not be empty")
        if len(items) > MAX_LINK_KEYS:
            raise _fail(k, "keys", f"has more than {MAX_LINK_KEYS} items")
        keys, seen = [], set()
        for i, item in enumerate(items):
            if not isinstance(item, tuple) or len(item) != 2:
                raise _fail(k, f"keys[{i}]", "must be a (key_ID, owner) pair")
            kid = _uuid(k, f"keys[{i}].key_ID", item[0])
            if item[1] not in OWNERS:
                raise _fail(k, f"keys[{i}].owner", "must be 'master' or 'slave'")
            if kid in seen:
                raise _fail(k, f"keys[{i}].key_ID", "appears twice")
            seen.add(kid)
            keys.append(LinkKey(kid, item[1]))
        s(self, "keys", tuple(keys))

    def to_dict(self) -> dict[str, Any]:
        return {"link": self.link,
                "keys": [{"key_ID": key.key_ID, "owner": key.owner} for key in self.keys]}

    @classmethod
    def from_dict(cls, obj: Any) -> LinkKeysMessage:
        k = cls.KIND
        o = _members(k, obj, cls.MEMBERS)
        keys = []
        for i, item in enumerate(_list(k, "keys", o["keys"], MAX_LINK_KEYS)):
            if not isinstance(item, Mapping):
                raise _fail(k, f"keys[{i}]", "must be a JSON object")
            extra = sorted(str(x) for x in item if x not in LinkKey._fields)
            if extra:
                raise _fail(k, f"keys[{i}].{extra[0]}", "is not a member of a link key")
            for m in LinkKey._fields:
                if m not in item:
                    raise _fail(k, f"keys[{i}].{m}", "is missing")
            keys.append(LinkKey(item["key_ID"], item["owner"]))
        return cls(link=o["link"], keys=tuple(keys))


@dataclass(frozen=True)
class LinkKeysAnswer(_Json):
    """Slave to master: the key IDs the slave got from its device and stored."""

    KIND: ClassVar[str] = "link_keys answer"
    MEMBERS: ClassVar[tuple[str, ...]] = ("stored",)

    stored: tuple[str, ...]

    def __post_init__(self) -> None:
        k = self.KIND
        items = _seq(k, "stored", self.stored)
        if len(items) > MAX_LINK_KEYS:
            raise _fail(k, "stored", f"has more than {MAX_LINK_KEYS} items")
        ids = tuple(_uuid(k, f"stored[{i}]", v) for i, v in enumerate(items))
        if len(set(ids)) != len(ids):
            raise _fail(k, "stored", "names a key ID twice")
        object.__setattr__(self, "stored", ids)

    def to_dict(self) -> dict[str, Any]:
        return {"stored": list(self.stored)}

    @classmethod
    def from_dict(cls, obj: Any) -> LinkKeysAnswer:
        o = _members(cls.KIND, obj, cls.MEMBERS)
        return cls(stored=tuple(_list(cls.KIND, "stored", o["stored"], MAX_LINK_KEYS,
                                      allow_empty=True)))


# --------------------------------------------------------------------------- message crypto

def seal_forward(*, ksid: str, index: int, msg_id: str, link: str, hop: int, source_node: str,
                 destination_node: str, payload: RelayPayload,
                 slices: Iterable[Any], group: str | None = None) -> ForwardMessage:
    """Encrypt and tag ``payload`` for ``link``. ``slices`` is the link-key
    material taken for it (``link_key_bits_needed(payload.key_bits)`` bits, as
    the store's ``take`` returns it): the pad comes first, the MAC key last.
    ``group``: the ETSI 014 multicast group of the key, or None."""
    if not isinstance(payload, RelayPayload):
        raise TypeError("payload must be a RelayPayload")
    plaintext = payload.to_bytes()
    pad, mac = split_slices(slices, [len(plaintext), MAC_KEY_BYTES])
    # Built once without ciphertext/tag only to validate and canonicalize the fields.
    header = forward_header(
        _uuid("forward", "ksid", ksid), _int("forward", "index", index, 0, MAX_INT),
        _uuid("forward", "msg_id", msg_id, v4=True), _uuid("forward", "link", link),
        _int("forward", "hop", hop, 1, MAX_HOPS), _uuid("forward", "source_node", source_node),
        _uuid("forward", "destination_node", destination_node), pad.refs, mac.refs,
        None if group is None else _uuid("forward", "group", group))
    ciphertext, tag = seal(plaintext, pad.data, mac.data, header)
    return ForwardMessage(ksid=ksid, index=index, msg_id=msg_id, link=link, hop=hop,
                          source_node=source_node, destination_node=destination_node,
                          pad_refs=pad.refs, mac_refs=mac.refs, ciphertext=ciphertext, tag=tag,
                          group=group)


def open_forward(msg: ForwardMessage, data: bytes) -> RelayPayload:
    """Verify and decrypt a received forward. ``data`` is the link-key bytes of
    ``msg.consumed_refs()`` in that order. Raises RelayAuthError on a bad tag."""
    pad, mac = _split_received([msg.pad_refs, msg.mac_refs], data)
    return RelayPayload.from_bytes(open_(msg.ciphertext, msg.tag, pad.data, mac.data, msg.header()))


def reencrypt(msg: ForwardMessage, data: bytes, next_link: str,
              slices: Iterable[Any]) -> ForwardMessage:
    """A trusted node's step: open ``msg`` with the previous link's material
    (``data``, as for ``open_forward``) and seal it for ``next_link`` with fresh
    material (``slices``); ``hop`` goes up by one, ``msg_id`` stays.

    To spend no outgoing link key on a bad message, a caller may instead call
    ``open_forward`` first and take the outgoing slices only if it succeeds,
    then ``seal_forward(..., hop=msg.hop + 1)``.
    """
    if _uuid("forward", "link", next_link) == msg.link:
        raise ValueError("the next link must differ from the link the message came on")
    if msg.hop >= MAX_HOPS:
        raise RelayFormatError(f"forward message: member 'hop' would exceed {MAX_HOPS}")
    payload = open_forward(msg, data)
    return seal_forward(ksid=msg.ksid, index=msg.index, msg_id=msg.msg_id, link=next_link,
                        hop=msg.hop + 1, source_node=msg.source_node,
                        destination_node=msg.destination_node, payload=payload, slices=slices,
                        group=msg.group)


def seal_deliver(*, ksid: str, index: int, msg_id: str, link: str, source_node: str,
                 destination_node: str, key_bits: int,
                 slices: Iterable[Any]) -> tuple[DeliverMessage, RelayPayload]:
    """Adjacent endpoints: name ``link_key_bits_needed(key_bits)`` bits of link
    key as key, confirmation key and MAC key, and tag the header. Returns the
    message and the payload (the key the source delivers once confirmed)."""
    link_key_bits_needed(key_bits)
    key, confirm, mac = split_slices(slices, [key_bits // 8, CONFIRM_KEY_BYTES, MAC_KEY_BYTES])
    header = deliver_header(
        _uuid("deliver", "ksid", ksid), _int("deliver", "index", index, 0, MAX_INT),
        _uuid("deliver", "msg_id", msg_id, v4=True), _uuid("deliver", "link", link),
        _uuid("deliver", "source_node", source_node),
        _uuid("deliver", "destination_node", destination_node),
        key.refs, confirm.refs, mac.refs)
    tag = Poly1305.generate_tag(mac.data, header)
    msg = DeliverMessage(ksid=ksid, index=index, msg_id=msg_id, link=link,
                         source_node=source_node, destination_node=destination_node,
                         key_refs=key.refs, confirm_refs=confirm.refs, mac_refs=mac.refs, tag=tag)
    return msg, RelayPayload(key.data, confirm.data)


def open_deliver(msg: DeliverMessage, data: bytes) -> RelayPayload:
    """Verify a received deliver. ``data`` is the link-key bytes of
    ``msg.consumed_refs()`` in that order. Raises RelayAuthError on a bad tag."""
    key, confirm, mac = _split_received([msg.key_refs, msg.confirm_refs, msg.mac_refs], data)
    _verify(mac.data, msg.header(), msg.tag)
    return RelayPayload(key.data, confirm.data)


def seal_confirm(*, ksid: str, index: int, msg_id: str, source_node: str, destination_node: str,
                 payload: RelayPayload) -> ConfirmMessage:
    """The destination's confirmation, tagged with the payload's one-time confirmation key."""
    header = confirm_header(
        _uuid("confirm", "ksid", ksid), _int("confirm", "index", index, 0, MAX_INT),
        _uuid("confirm", "msg_id", msg_id, v4=True), _uuid("confirm", "source_node", source_node),
        _uuid("confirm", "destination_node", destination_node))
    return ConfirmMessage(ksid=ksid, index=index, msg_id=msg_id, source_node=source_node,
                          destination_node=destination_node,
                          tag=Poly1305.generate_tag(payload.confirm_key, header))


def verify_confirm(msg: ConfirmMessage, payload: RelayPayload) -> None:
    """The source's check of a confirmation for the payload it sent; RelayAuthError if forged."""
    _verify(payload.confirm_key, msg.header(), msg.tag)


# --------------------------------------------------------------------------- batches

@dataclass(frozen=True)
class _Slice:
    """A part of a key-store slice (``split_slices`` and ``seal_*`` accept it like a KeySlice);
    its repr leaves the key bytes out."""

    key_ID: str
    offset: int
    length: int
    data: bytes = field(repr=False)


def partition_slices(slices: Iterable[Any], sizes: Sequence[int]) -> list[list[_Slice]]:
    """Cut the slices of one ``take`` into consecutive parts of the given byte sizes, each a
    list of slices to hand to ``seal_forward`` / ``seal_deliver`` (one part per key of a batch).
    The total must match exactly."""
    return [[_Slice(r.key_ID, r.offset, r.length, m.data[at - r.length:at])
             for r, at in zip(m.refs, _ends(m.refs))] for m in split_slices(slices, sizes)]


def _ends(refs: Sequence[KeyRef]) -> list[int]:
    out, at = [], 0
    for r in refs:
        at += r.length
        out.append(at)
    return out


_BATCH_SAME = {"forward": ("ksid", "link", "hop", "source_node", "destination_node", "group"),
               "deliver": ("ksid", "link", "source_node", "destination_node")}


@dataclass(frozen=True)
class RelayBatch(_Json):
    """Several keys of one session on one link in one request (``POST /relay/v1/forward_batch``,
    ``/relay/v1/deliver_batch``): ``{"messages": [<forward or deliver message>, ...]}``.

    Every message is a complete ``forward`` / ``deliver`` message, sealed and tagged with its
    own one-time link key exactly as when sent alone; the batch only shares the HTTP request,
    the receiver's transaction and its answer. All messages are of one kind and share ``ksid``,
    ``link``, both nodes (and ``hop`` and ``group`` for forwards); their ``msg_id`` and ``index``
    differ; no link-key byte is named twice in the whole batch. The receiver verifies every tag
    and consumes every range in one transaction: one bad message and nothing is consumed.
    """

    messages: tuple[Any, ...]

    KIND: ClassVar[str] = "batch"

    def __post_init__(self) -> None:
        msgs = _seq("batch", "messages", self.messages)
        object.__setattr__(self, "messages", msgs)
        if not 1 <= len(msgs) <= MAX_BATCH:
            raise _fail("batch", "messages", f"must hold 1 to {MAX_BATCH} messages")
        first = msgs[0]
        if not isinstance(first, (ForwardMessage, DeliverMessage)):
            raise _fail("batch", "messages[0]", "must be a forward or deliver message")
        kind = first.KIND
        for i, m in enumerate(msgs):
            if type(m) is not type(first):
                raise _fail("batch", f"messages[{i}]", f"must be a {kind} message like messages[0]")
            for member in _BATCH_SAME[kind]:
                if getattr(m, member) != getattr(first, member):
                    raise _fail("batch", f"messages[{i}].{member}", "must equal that of messages[0]")
        for member in ("msg_id", "index"):
            seen: set[Any] = set()
            for i, m in enumerate(msgs):
                if getattr(m, member) in seen:
                    raise _fail("batch", f"messages[{i}].{member}", "repeats an earlier message's")
                seen.add(getattr(m, member))
        refs = [(f"messages[{i}]", m.consumed_refs()) for i, m in enumerate(msgs)]
        if sum(len(r) for _, r in refs) > MAX_BATCH_REFS:
            raise _fail("batch", "messages", f"name more than {MAX_BATCH_REFS} link-key ranges together")
        _check_disjoint("batch", refs)

    @property
    def kind(self) -> str:
        return self.messages[0].KIND

    @property
    def link(self) -> str:
        return self.messages[0].link

    @property
    def ksid(self) -> str:
        return self.messages[0].ksid

    def consumed_refs(self) -> list[KeyRef]:
        """Every message's ``consumed_refs()``, message after message."""
        return [r for m in self.messages for r in m.consumed_refs()]

    def split(self, data: bytes) -> list[bytes]:
        """The receiver's bytes for ``consumed_refs()``, cut back per message."""
        return [p.data for p in _split_received([m.consumed_refs() for m in self.messages], data)]

    def to_dict(self) -> dict[str, Any]:
        return {"messages": [m.to_dict() for m in self.messages]}

    @classmethod
    def from_dict(cls, obj: Any, kind: str = "forward") -> RelayBatch:
        message_cls = {"forward": ForwardMessage, "deliver": DeliverMessage}.get(kind)
        if message_cls is None:
            raise ValueError(f"a batch holds forward or deliver messages, not {kind!r}")
        o = _members(f"{kind} batch", obj, ("messages",))
        items = _list(f"{kind} batch", "messages", o["messages"], MAX_BATCH)
        msgs = []
        for i, item in enumerate(items):
            try:
                msgs.append(message_cls.from_dict(item))
            except RelayFormatError as exc:
                raise RelayFormatError(f"{kind} batch: messages[{i}]: {exc}") from None
        return cls(tuple(msgs))


# --------------------------------------------------------------------------- replay window

class ReplayWindow:
    """Message IDs seen per link, bounded by count and by age (in-memory).

    ``check_and_add`` answers True for a new ``(link, msg_id)`` and records it,
    False for a replay. Call it only after the message's tag verified, so forged
    messages cannot fill the window and push real IDs out. An ID that has left
    the window (older than ``max_age`` or pushed out by ``max_entries``) is
    accepted again here; the real guarantee is that its link-key ranges are
    already consumed, so the store refuses them.
    """

    def __init__(self, max_entries: int = 100_000, max_age: float = 3600.0):
        if max_entries < 1 or max_age <= 0:
            raise ValueError("a replay window needs max_entries >= 1 and max_age > 0")
        self.max_entries = max_entries
        self.max_age = max_age
        self._seen: OrderedDict[tuple[str, str], float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def check_and_add(self, link: str, msg_id: str, now: float) -> bool:
        # Insertion order is arrival order: the oldest entries are at the front.
        while self._seen:
            oldest = next(iter(self._seen.values()))
            if now - oldest < self.max_age:
                break
            self._seen.popitem(last=False)
        key = (link, msg_id)
        if key in self._seen:
            return False
        self._seen[key] = now
        if len(self._seen) > self.max_entries:
            self._seen.popitem(last=False)
        return True

    # The durable window in the key store has this name: either can serve the agent.
    remember_message = check_and_add
