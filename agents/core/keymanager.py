"""Decisions of one node's virtual key manager, without I/O.

``KeyManagerLogic`` holds the node's sessions (``KMSession``), their token buckets, the
forwarding table and the priority queues of requests waiting for link-key material. Every
method takes the current monotonic time ``now`` and returns what the I/O shell
(``agents/service.py``) must do next, as small action records. The logic never touches the
network, the key store or a clock and never starts a thread; it is not thread-safe either:
the shell serialises calls into it (one lock) and carries the actions out after releasing it.

Contract with the shell
-----------------------
* Application calls (``open_connect``, ``get_key``, ``close``, ``enc_keys``, ``dec_keys``)
  return a ``Decision``: the ``call_id`` of the call and the actions. The call's answer is
  ``Reply`` / ``Reject`` / ``DeliverKey`` with that ``call_id`` — in this decision, or in the
  actions of a later method when the decision holds ``Wait(call_id, deadline)``. A waiting
  call is always answered at the latest by ``tick(now)`` with ``now >= deadline``.
* Actions, in the order given:
  - ``Reply(call_id, status, ...)``: answer with this ETSI 004 status (the ETSI 014 mapping
    answers a non-zero status with 503 and ``message``).
  - ``Reject(call_id, http_status, message)``: no 004 status applies (malformed input, a caller
    that may not use the session); for ETSI 014 the HTTP status and message are the spec's.
  - ``DeliverKey(call_id, ksid, indices)``: read the keys (ksid, index) from the key store, hand
    them out (consuming them in the same transaction) and answer status 0. 004: one index,
    metadata per ``metadata_json``; 014: key_ID = ``key_id_for(ksid, index)``.
  - ``NeedAuthentication(ksid, sae, interface)``: ask access control; then call
    ``authenticated`` or ``authentication_failed``.
  - ``NeedAdmission(...)``: ask admission control; it configures the route (``configure`` here,
    through RESTCONF or the bus) or refuses (``admission_rejected``). For ETSI 014 it does not
    wait for the slave application, which never opens anything.
  - ``ProduceKey(ksid, index, bits, pool, next_hop)`` (source KM): make end-to-end key number
    ``index`` from link key of ``pool`` (direct or trusted-node relay); report ``key_ready``
    when the destination confirmed, ``key_material_short`` when the pool lacks material,
    ``key_failed`` otherwise. The shell runs at most one production per (ksid, index): a
    repeated ProduceKey joins the one in progress; one for a key the store already holds
    re-sends it to the destination if that asked (``peer_key_request``) and reports ``key_ready``.
  - ``FetchFromSource(ksid, index, bits, prev_hop)`` (destination KM): ask the source KM for
    that key (there: ``peer_key_request``); report ``key_ready`` when it is stored here, or
    ``key_failed``.
  - ``AnswerPeer(ksid, index, status)``: tell the destination KM that a key it asked for
    will not come (it calls ``key_failed`` there).
  - ``SignalKeyRequest(ksid)``: tell admission control (it restarts its session timer).
  - ``Terminate(ksid, reason, notify_control)``: the session ended here; if
    ``notify_control``, tell admission control so it releases the route.
  - ``PurgeKeys(ksid, indices=None)``: erase the session's unused keys from the store (only
    ``indices`` if given: a multicast group's keys of a call that failed).
  - ``EmitEvent(event)``: publish the event (no key material in it).
* Link-key pools: when a pool gains material, call ``material_available(pool, bits, now)``;
  it hands the queued requests that fit, by priority, back as ``ProduceKey``.
* Timers: call ``tick(now)`` whenever ``now >= next_deadline()``.

Sequences (source KM X of application A, destination KM Y of application B)
------------------------------------------------------------------------
OPEN_CONNECT at X::

    open_connect(A, B, qos, None, caller_sae=A)  -> NeedAuthentication, Wait(c1)
    authenticated(ksid, user)                    -> NeedAdmission
    configure(SessionConfig(prev_hop=None, next_hop=...))
                                                 -> Reply(c1, 0, ksid, qos offered)
      or admission_rejected(ksid, 7, counter_qos=...) -> Reply(c1, 7, qos=counter)
      or tick(now >= Timeout)                    -> Reply(c1, 1)  (connected, peer not yet)

GET_KEY at X (the source makes every key)::

    get_key(ksid, None, A, have_key=store_has)   -> SignalKeyRequest, Wait(c2), ProduceKey(ksid, 0, bits)
    key_material_short(ksid, 0, needed_bits)     -> (queued by priority)
    material_available(pool, bits)               -> ProduceKey(ksid, 0, bits)
    key_ready(ksid, 0)                           -> DeliverKey(c2, ksid, (0,))

GET_KEY at Y::

    get_key(ksid, 0, B, have_key=store_has)      -> FetchFromSource(ksid, 0, bits, prev_hop)
      X: peer_key_request(ksid, 0)               -> ProduceKey ...   (relay stores it at Y)
    key_ready(ksid, 0)                           -> DeliverKey(c3, ksid, (0,))

CLOSE at X::

    close(ksid, A)      -> Terminate(ksid, "closed", notify_control=True), Reply(c4, 0)
    unused keys stay (B may still fetch those already made at Y) until the peer closed —
    peer_closed(ksid) or deconfigure(ksid, peer_closed=True) -> PurgeKeys — or the QoS TTL
    after the end has passed: tick -> PurgeKeys.

ETSI 014 enc_keys at X, dec_keys at Y::

    enc_keys(A, B, number=2, size_bits=256)      -> NeedAuthentication, Wait(c5)   (implicit session)
    authenticated / configure (Y is configured too: its slave-side session)
                                                 -> ProduceKey(ksid, 0), ProduceKey(ksid, 1)
    key_ready(ksid, 0), key_ready(ksid, 1)       -> DeliverKey(c5, ksid, (0, 1))
    Y: dec_keys(B, ksid, (0, 1), have_keys=True) -> DeliverKey(c6, ksid, (0, 1))
    no enc_keys for the inactivity timeout: tick -> Terminate(ksid, "inactivity", True)

Status codes (ETSI 004): 1 OPEN_CONNECT timed out before the peer connected; 2 rate above
the session's token bucket that the call's Timeout cannot absorb, key queue full, or
``Timeout`` 0 and no key at hand; 3 GET_KEY before the session is configured; 4 unknown,
closed or terminated KSID, or the key path failed; 5 KSID already used by another
application (or by a session this node relays); 6 the call's Timeout passed; 7 QoS
counter-proposal; 8 metadata buffer smaller than ``METADATA_MAX_SIZE``.
"""
from __future__ import annotations

import json
import math
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Union

from .bucket import TokenBucket
from .forwarding import ForwardingEntry, ForwardingTable, Role
from .queue import DEADLINE_PASSED, PriorityRequestQueue, QueuedRequest
from .session import (ACTIVE_STATES, DEFAULT_QOS, JSON_MIMETYPE, SETUP_STATES, UINT32_MAX, Event,
                      InvalidKSID, InvalidTransition, KMSession, QoS, SessionConfig, SessionState,
                      Status, normalize_ksid)

KEYS_NOT_FOUND = "one or more keys specified are not found on KME"
SIZE_NOT_MULTIPLE_OF_8 = "size shall be a multiple of 8"
UNKNOWN_KSID = "unknown Key_stream_ID"


def metadata_json(age_ms: int, hops: int) -> str:
    """The GET_KEY metadata this key manager returns (ETSI 004 Table 3: age, hops)."""
    return json.dumps({"age": age_ms, "hops": hops}, separators=(",", ":"))


# Metadata fields are uint32, so this is the largest metadata; a buffer of this size always fits.
METADATA_MAX_SIZE = len(metadata_json(UINT32_MAX, UINT32_MAX).encode("utf-8"))


def key_id_for(ksid: str, index: int) -> str:
    """ETSI 014 key_ID of key ``index`` of a session: both ends derive the same ID."""
    return str(uuid.uuid5(uuid.UUID(ksid), str(index)))


def _mimetype_supported(mimetype: str) -> bool:
    return mimetype.split(";", 1)[0].strip().lower() == JSON_MIMETYPE


# ---------------------------------------------------------------------------------------------
# Actions

@dataclass(frozen=True)
class Reply:
    call_id: str
    status: Status
    ksid: str | None = None
    qos: QoS | None = None
    index: int | None = None
    metadata_size: int | None = None  # status 8: the size needed
    retry_after: float | None = None  # status 2 for rate: seconds until the bucket allows the call
    message: str = ""


@dataclass(frozen=True)
class Reject:
    call_id: str
    http_status: int
    message: str


@dataclass(frozen=True)
class DeliverKey:
    call_id: str
    ksid: str
    indices: tuple[int, ...]


@dataclass(frozen=True)
class Wait:
    call_id: str
    deadline: float
    reason: str  # authentication | admission | rate | key


@dataclass(frozen=True)
class NeedAuthentication:
    ksid: str
    sae: str
    interface: str


@dataclass(frozen=True)
class NeedAdmission:
    ksid: str
    interface: str
    user: str
    local_sae: str
    source_sae: str
    destination_sae: str
    qos: QoS


@dataclass(frozen=True)
class ProduceKey:
    ksid: str
    index: int
    bits: int
    pool: str  # qkdl_id of the link towards next_hop ("node:<next_hop>" if none was configured)
    next_hop: str
    group: str | None = None  # ETSI 014 multicast: every member session relays the group's key ``index``


@dataclass(frozen=True)
class FetchFromSource:
    ksid: str
    index: int
    bits: int
    prev_hop: str


@dataclass(frozen=True)
class AnswerPeer:
    ksid: str
    index: int
    status: Status


@dataclass(frozen=True)
class SignalKeyRequest:
    ksid: str


@dataclass(frozen=True)
class Terminate:
    ksid: str
    reason: str
    notify_control: bool


@dataclass(frozen=True)
class PurgeKeys:
    ksid: str
    indices: tuple[int, ...] | None = None  # only these keys (None: every key of the session)


@dataclass(frozen=True)
class EmitEvent:
    event: Event


Action = Union[Reply, Reject, DeliverKey, Wait, NeedAuthentication, NeedAdmission, ProduceKey,
               FetchFromSource, AnswerPeer, SignalKeyRequest, Terminate, PurgeKeys, EmitEvent]
_ANSWERS = (Reply, Reject, DeliverKey)


@dataclass(frozen=True)
class Decision:
    call_id: str
    actions: tuple[Action, ...]

    @property
    def answer(self) -> Reply | Reject | DeliverKey | None:
        """The call's answer if it is already decided; None while the call waits."""
        for action in self.actions:
            if isinstance(action, _ANSWERS) and action.call_id == self.call_id:
                return action
        return None

    def of_type(self, kind: type) -> list:
        return [a for a in self.actions if isinstance(a, kind)]


@dataclass(frozen=True)
class RelayRoute:
    """Where a relay message for a session goes next at this node."""

    accept: bool
    local: bool = False  # the message ends here
    node: str | None = None  # neighbour to pass it to
    link_id: str | None = None  # physical link towards that neighbour
    reason: str = ""


# ---------------------------------------------------------------------------------------------
# Internal records

@dataclass(eq=False)
class _Call:
    call_id: str
    kind: str  # open_connect | get_key | enc_keys
    ksid: str
    deadline: float
    phase: str  # setup (session not operative yet) | tokens (waiting for the bucket) | key
    bits: int = 0  # per key
    number: int = 0  # enc_keys: keys asked for
    indices: tuple[int, ...] = ()
    present: set[int] = field(default_factory=set)
    auto_index: bool = False  # the key manager chose the index
    counted: bool = False  # the session counts it in key_exchanging
    waiting: bool = False  # a Wait was issued
    parent: str | None = None  # a multicast member's request: the group call it answers to

    @property
    def total_bits(self) -> int:
        return self.bits * len(self.indices)


@dataclass(eq=False)
class _Slot:
    session: KMSession
    bucket: TokenBucket | None = None
    offered_qos: QoS | None = None
    calls: list[str] = field(default_factory=list)  # pending calls, arrival order
    token_fifo: deque[str] = field(default_factory=deque)
    next_index: int = 0
    local_closed: bool = False
    peer_closed: bool = False
    retain_until: float | None = None
    pair_key: tuple | None = None  # its key in _pairs (ETSI 014 source sessions)
    group: str | None = None  # the multicast group it is a member session of


@dataclass(eq=False)
class _Group:
    """An ETSI 014 multicast group: a master SAE and its slave SAEs. Key ``i`` of the group is
    one key, relayed to every slave's key manager over that slave's member session (an implicit
    session master -> slave with its own route, bucket and queue) under the same index ``i``;
    its key_ID is ``key_id_for(gid, i)`` everywhere."""

    gid: str
    master: str
    slaves: frozenset[str]
    next_index: int = 0
    members: dict[str, str] = field(default_factory=dict)  # slave SAE -> member session KSID
    calls: set[str] = field(default_factory=set)  # group calls in progress


@dataclass(eq=False)
class _GroupCall:
    call_id: str
    group: _Group
    indices: tuple[int, ...]
    children: set[str] = field(default_factory=set)  # member requests not answered yet


@dataclass(eq=False)
class _Production:
    """One end-to-end key being made (source) or fetched (destination)."""

    ksid: str
    index: int
    bits: int
    deadline: float
    kind: str  # produce | fetch
    pool: str | None = None
    queued: QueuedRequest | None = None  # its entry while it waits for material
    served: tuple[str, QueuedRequest] | None = None  # (pool, entry) last handed out, for requeue
    for_peer: bool = False  # the destination KM asked for it


class KeyManagerLogic:
    """Per-node key-manager decisions (see the module docstring for the contract)."""

    def __init__(self, node_id: str, *, default_qos: QoS = DEFAULT_QOS, queue_max_len: int = 256,
                 setup_timeout_s: float = 300.0, etsi014_timeout_s: float = 10.0,
                 max_keys_per_request: int = 128, new_ksid: Callable[[], str] | None = None,
                 max_additional_slaves: int = 16, max_chunk_bytes: int = 8192):
        if not isinstance(node_id, str) or not node_id:
            raise ValueError("node_id must be a non-empty string")
        if not setup_timeout_s > 0 or not etsi014_timeout_s > 0 or max_keys_per_request < 1:
            raise ValueError("timeouts must be > 0 and max_keys_per_request >= 1")
        if isinstance(max_additional_slaves, bool) or not isinstance(max_additional_slaves, int) \
                or max_additional_slaves < 0:
            raise ValueError("max_additional_slaves must be an integer >= 0")
        self.node_id = node_id
        self.default_qos = default_qos.with_defaults(DEFAULT_QOS)
        self.queue_max_len = queue_max_len
        self.setup_timeout_s = setup_timeout_s
        self.etsi014_timeout_s = etsi014_timeout_s
        self.max_keys_per_request = max_keys_per_request
        self.max_additional_slaves = max_additional_slaves  # ETSI 014 max_SAE_ID_count
        self.max_chunk_bytes = max_chunk_bytes  # the largest key the relay carries
        self._new_ksid = new_ksid or (lambda: str(uuid.uuid4()))
        self.forwarding = ForwardingTable()
        self._slots: dict[str, _Slot] = {}
        self._pairs: dict[tuple, str] = {}  # live ETSI 014 (master, slave) [+ group id] -> KSID
        self._groups: dict[tuple[str, frozenset[str]], _Group] = {}  # (master, slaves) -> group
        self._group_calls: dict[str, _GroupCall] = {}
        self._calls: dict[str, _Call] = {}
        self._productions: dict[tuple[str, int], _Production] = {}
        self._queues: dict[str, PriorityRequestQueue] = {}
        self._queued_ids: dict[str, tuple[str, int]] = {}
        self._call_seq = 0

    def __repr__(self) -> str:
        return f"KeyManagerLogic(node_id={self.node_id!r}, sessions={len(self._slots)}, pending_calls={len(self._calls)})"

    # -- queries --------------------------------------------------------------------------

    def session(self, ksid: str) -> KMSession | None:
        ksid = _canon(ksid)
        slot = self._slots.get(ksid)
        return None if slot is None else slot.session

    def sessions(self) -> list[KMSession]:
        return [slot.session for slot in self._slots.values()]

    def bucket(self, ksid: str) -> TokenBucket | None:
        ksid = _canon(ksid)
        slot = self._slots.get(ksid)
        return None if slot is None else slot.bucket

    def queue(self, pool: str) -> PriorityRequestQueue | None:
        return self._queues.get(pool)

    def offered_qos(self, ksid: str) -> QoS | None:
        ksid = _canon(ksid)
        slot = self._slots.get(ksid)
        return None if slot is None else slot.offered_qos

    def pending_calls(self) -> list[str]:
        return [*self._calls, *self._group_calls]

    def group_members(self, gid: str) -> dict[str, str]:
        """Slave SAE -> member session KSID of a live multicast group (empty if none)."""
        for group in self._groups.values():
            if group.gid == gid:
                return dict(group.members)
        return {}

    def session_for_pair(self, master_sae: str, slave_sae: str) -> str | None:
        """KSID of the live ETSI 014 implicit session of a master/slave pair."""
        return self._pairs.get((master_sae, slave_sae))

    def next_deadline(self) -> float | None:
        """The earliest time at which ``tick`` has something to do."""
        times: list[float] = [c.deadline for c in self._calls.values()]
        times += [p.deadline for p in self._productions.values()]
        for slot in self._slots.values():
            s = slot.session
            if s.next_deadline is not None:
                times.append(s.next_deadline)
            if not s.is_live and slot.retain_until is not None:
                times.append(slot.retain_until)
            if slot.token_fifo and slot.bucket is not None:
                times.append(slot.bucket.ready_at(self._calls[slot.token_fifo[0]].total_bits))
        finite = [t for t in times if math.isfinite(t)]
        return min(finite, default=None)

    # -- ETSI 004 -------------------------------------------------------------------------

    def open_connect(self, source: str, destination: str, qos: QoS | None, ksid: str | None,
                     caller_sae: str, now: float) -> Decision:
        call_id = self._new_call_id()
        acts: list[Action] = [self._ev(now, "request_arrival", _known(ksid), call="OPEN_CONNECT", sae=caller_sae)]

        def done(*more: Action) -> Decision:
            return Decision(call_id, tuple(acts) + more)

        if not all(isinstance(x, str) and x for x in (source, destination)):
            return done(Reject(call_id, 400, "source and destination are required"))
        if source == destination:
            return done(Reject(call_id, 400, "source and destination must be different applications"))
        if caller_sae not in (source, destination):
            return done(Reject(call_id, 403, "the caller is neither the source nor the destination"))
        try:
            ksid = normalize_ksid(ksid)
        except InvalidKSID as exc:
            return done(Reject(call_id, 400, str(exc)))
        requested = (qos or QoS()).with_defaults(self.default_qos)
        counter = self._counter_proposal(requested)
        if counter is not None:
            return done(Reply(call_id, Status.QOS_NOT_MET, ksid=ksid, qos=counter,
                              message="requested QoS cannot be met; counter-proposal returned"))
        if ksid is None:
            ksid = self._fresh_ksid()
        slot = self._slots.get(ksid)
        if slot is not None:
            s = slot.session
            if (s.is_live and s.interface == "004" and not slot.local_closed and s.local_sae == caller_sae
                    and s.source_sae == source and s.destination_sae == destination):
                return done(*self._reopen(slot, call_id, requested, now))
            return done(Reply(call_id, Status.KSID_IN_USE, ksid=ksid, message="Key_stream_ID already in use"))
        role = Role.SOURCE if caller_sae == source else Role.DESTINATION
        peer = destination if role is Role.SOURCE else source
        session = KMSession(ksid, "004", caller_sae, peer, source, destination, role, requested, now,
                            setup_timeout_s=self.setup_timeout_s)
        slot = self._slots[ksid] = _Slot(session)
        call = _Call(call_id, "open_connect", ksid, now + requested.timeout_s, "setup")
        self._add_call(slot, call)
        acts.append(self._ev(now, "state_change", ksid, None, SessionState.AUTHENTICATING.value,
                             sae=caller_sae, interface="004", role=role.value))
        acts.append(NeedAuthentication(ksid, caller_sae, "004"))
        return done(*self._wait(call, "authentication"))

    def get_key(self, ksid: str, index: int | None, caller_sae: str, now: float,
                have_key: bool | Callable[[int], bool], *, metadata_size: int | None = None) -> Decision:
        """GET_KEY. ``have_key`` says whether the key store holds key ``index`` of the session
        (a callable is asked with the index, for calls without an index)."""
        call_id = self._new_call_id()
        acts: list[Action] = [self._ev(now, "request_arrival", _known(ksid), call="GET_KEY", sae=caller_sae,
                                       index=index)]

        def done(*more: Action) -> Decision:
            return Decision(call_id, tuple(acts) + more)

        try:
            ksid = normalize_ksid(ksid)
        except InvalidKSID as exc:
            return done(Reject(call_id, 400, str(exc)))
        if ksid is None:
            return done(Reject(call_id, 400, "Key_stream_ID is required"))
        if index is not None and (isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= UINT32_MAX):
            return done(Reject(call_id, 400, "index must be an unsigned 32-bit integer"))
        if metadata_size is not None and (isinstance(metadata_size, bool) or not isinstance(metadata_size, int)
                                          or metadata_size < 0):
            return done(Reject(call_id, 400, "Metadata_size must be an unsigned integer"))
        has = have_key if callable(have_key) else (lambda _i, _v=bool(have_key): _v)
        slot = self._slots.get(ksid)
        if (slot is None or slot.session.interface != "004" or slot.session.local_sae != caller_sae
                or slot.local_closed):
            # A session of another application looks exactly like an unknown one.
            return done(Reply(call_id, Status.NO_QKD_CONNECTION, ksid=ksid, index=index, message=UNKNOWN_KSID))
        s = slot.session
        if s.state in SETUP_STATES:
            return done(Reply(call_id, Status.PEER_NOT_YET_CONNECTED, ksid=ksid, index=index,
                              message="the session is not connected yet"))
        qos = slot.offered_qos or s.qos
        if qos.wants_metadata and metadata_size and metadata_size < METADATA_MAX_SIZE:
            return done(Reply(call_id, Status.METADATA_SIZE_INSUFFICIENT, ksid=ksid, index=index,
                              metadata_size=METADATA_MAX_SIZE, message="metadata buffer too small"))
        idx = slot.next_index if index is None else index
        if s.state is SessionState.TERMINATED:
            # No new keys after the end; keys already made stay deliverable until purged.
            if has(idx):
                slot.next_index = max(slot.next_index, idx + 1)
                acts.append(self._ev(now, "key_returned", ksid, index=idx))
                return done(DeliverKey(call_id, ksid, (idx,)))
            return done(Reply(call_id, Status.NO_QKD_CONNECTION, ksid=ksid, index=idx, message="session terminated"))
        slot.next_index = max(slot.next_index, idx + 1)
        call = _Call(call_id, "get_key", ksid, now + qos.timeout_s, "tokens", bits=qos.chunk_bits,
                     indices=(idx,), auto_index=index is None)
        if has(idx):
            call.present.add(idx)
        self._add_call(slot, call)
        return done(*self._begin_request(slot, call, now))

    def close(self, ksid: str, caller_sae: str, now: float) -> Decision:
        """CLOSE: no new keys; unused ones stay until the peer closed or the TTL passed."""
        call_id = self._new_call_id()
        acts: list[Action] = [self._ev(now, "request_arrival", _known(ksid), call="CLOSE", sae=caller_sae)]
        try:
            ksid = normalize_ksid(ksid)
        except InvalidKSID as exc:
            return Decision(call_id, (*acts, Reject(call_id, 400, str(exc))))
        if ksid is None:
            return Decision(call_id, (*acts, Reject(call_id, 400, "Key_stream_ID is required")))
        slot = self._slots.get(ksid)
        if slot is None or slot.session.local_sae != caller_sae:
            return Decision(call_id, (*acts, Reply(call_id, Status.NO_QKD_CONNECTION, ksid=ksid, message=UNKNOWN_KSID)))
        if not slot.local_closed:
            slot.local_closed = True
            s = slot.session
            if s.is_live:
                acts += self._terminate(slot, now, "closed", notify_control=s.state is not SessionState.AUTHENTICATING)
            else:
                acts += self._settle(slot, now)
        return Decision(call_id, (*acts, Reply(call_id, Status.SUCCESSFUL, ksid=ksid)))

    # -- ETSI 014 -------------------------------------------------------------------------

    def enc_keys(self, master_sae: str, slave_sae: str, number: int, size_bits: int, now: float,
                 additional_slaves: tuple[str, ...] | list[str] = ()) -> Decision:
        """ETSI 014 enc_keys of the master SAE: ``number`` new keys of ``size_bits`` each, for
        ``slave_sae`` and, multicast, for every SAE of ``additional_slaves`` too."""
        call_id = self._new_call_id()
        acts: list[Action] = [self._ev(now, "request_arrival",
                                       None if additional_slaves else self._pairs.get((master_sae, slave_sae)),
                                       call="enc_keys", sae=master_sae, slave=slave_sae, number=number, size=size_bits)]

        def done(*more: Action) -> Decision:
            return Decision(call_id, tuple(acts) + more)

        if not all(isinstance(x, str) and x for x in (master_sae, slave_sae)) or master_sae == slave_sae:
            return done(Reject(call_id, 400, "the slave SAE must be another application"))
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            return done(Reject(call_id, 400, "number must be a positive integer"))
        if number > self.max_keys_per_request:
            return done(Reject(call_id, 400, f"number exceeds max_key_per_request ({self.max_keys_per_request})"))
        if isinstance(size_bits, bool) or not isinstance(size_bits, int) or size_bits <= 0 or size_bits % 8:
            return done(Reject(call_id, 400, SIZE_NOT_MULTIPLE_OF_8))
        if additional_slaves:
            extra = tuple(additional_slaves)
            if not all(isinstance(x, str) and x for x in extra):
                return done(Reject(call_id, 400, "additional_slave_SAE_IDs must be SAE IDs"))
            if len(extra) > self.max_additional_slaves:
                return done(Reject(call_id, 400, "additional_slave_SAE_IDs names more SAEs than max_SAE_ID_count "
                                                 f"({self.max_additional_slaves})"))
            slaves = (slave_sae, *extra)
            if len(set(slaves)) != len(slaves):
                return done(Reject(call_id, 400, "additional_slave_SAE_IDs names a slave SAE twice"))
            if master_sae in slaves:
                return done(Reject(call_id, 400, "the master SAE cannot be one of its slave SAEs"))
            return done(*self._enc_group(call_id, master_sae, slaves, number, size_bits, now))
        deadline = now + self.etsi014_timeout_s
        ksid = self._pairs.get((master_sae, slave_sae))
        slot = self._slots.get(ksid) if ksid is not None else None
        if slot is None or not slot.session.is_live:
            ksid = self._fresh_ksid()
            qos = self.default_qos.replace(Key_chunk_size=size_bits // 8, Timeout=int(self.etsi014_timeout_s * 1000),
                                           Metadata_mimetype="")
            session = KMSession.implicit_014(ksid, master_sae, slave_sae, qos, now, setup_timeout_s=self.setup_timeout_s)
            slot = self._slots[ksid] = _Slot(session, pair_key=(master_sae, slave_sae))
            self._pairs[(master_sae, slave_sae)] = ksid
            call = _Call(call_id, "enc_keys", ksid, deadline, "setup", bits=size_bits, number=number)
            self._add_call(slot, call)
            acts.append(self._ev(now, "state_change", ksid, None, SessionState.AUTHENTICATING.value,
                                 sae=master_sae, interface="014", role=Role.SOURCE.value))
            acts.append(NeedAuthentication(ksid, master_sae, "014"))
            return done(*self._wait(call, "authentication"))
        call = _Call(call_id, "enc_keys", ksid, deadline, "setup", bits=size_bits, number=number)
        self._add_call(slot, call)
        if slot.session.state in SETUP_STATES:
            return done(*self._wait(call, "admission" if slot.session.state is SessionState.USER_ACCEPTED
                                    else "authentication"))
        return done(*self._start_enc(slot, call, now))

    def _enc_group(self, call_id: str, master: str, slaves: tuple[str, ...], number: int, size_bits: int,
                   now: float) -> list[Action]:
        """Multicast enc_keys: one request per member session, all for the same indices; the
        group call is answered once every member's keys are at its slave's key manager."""
        key = (master, frozenset(slaves))
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group(self._fresh_ksid(), master, key[1])
        indices = tuple(range(group.next_index, group.next_index + number))
        group.next_index += number  # never reused, even if this call fails: key_IDs stay unique
        deadline = now + self.etsi014_timeout_s
        parent = self._group_calls[call_id] = _GroupCall(call_id, group, indices)
        group.calls.add(call_id)
        acts: list[Action] = [self._ev(now, "multicast_request", group.gid, master=master, slaves=sorted(slaves),
                                       indices=list(indices))]
        children = [(slave, self._new_call_id()) for slave in sorted(slaves)]
        parent.children.update(child for _, child in children)  # all known before any can answer
        for slave, child in children:
            if call_id not in self._group_calls:
                break  # a member failed at once: the group call is answered
            acts += self._member_request(group, slave, child, call_id, number, size_bits, indices, deadline, now)
        if call_id in self._group_calls:
            acts.append(Wait(call_id, deadline, "multicast"))
        return acts

    def _member_request(self, group: _Group, slave: str, child_id: str, parent_id: str, number: int,
                        size_bits: int, indices: tuple[int, ...], deadline: float, now: float) -> list[Action]:
        pair = (group.master, slave, group.gid)
        ksid = self._pairs.get(pair)
        slot = self._slots.get(ksid) if ksid is not None else None
        if slot is None or not slot.session.is_live:
            ksid = self._fresh_ksid()
            qos = self.default_qos.replace(Key_chunk_size=size_bits // 8, Timeout=int(self.etsi014_timeout_s * 1000),
                                           Metadata_mimetype="")
            session = KMSession.implicit_014(ksid, group.master, slave, qos, now, setup_timeout_s=self.setup_timeout_s)
            slot = self._slots[ksid] = _Slot(session, pair_key=pair, group=group.gid)
            self._pairs[pair] = ksid
            group.members[slave] = ksid
            self._add_call(slot, _Call(child_id, "enc_keys", ksid, deadline, "setup", bits=size_bits, number=number,
                                       indices=indices, parent=parent_id))
            return [self._ev(now, "state_change", ksid, None, SessionState.AUTHENTICATING.value, sae=group.master,
                             interface="014", role=Role.SOURCE.value, group=group.gid),
                    NeedAuthentication(ksid, group.master, "014")]
        call = _Call(child_id, "enc_keys", ksid, deadline, "setup", bits=size_bits, number=number, indices=indices,
                     parent=parent_id)
        self._add_call(slot, call)
        if slot.session.state in SETUP_STATES:
            return []
        return self._start_enc(slot, call, now)

    def _answered(self, call: _Call, answer: Action, now: float) -> list[Action]:
        """The answer to ``call``; a multicast member's request answers its group call instead:
        keys once every member has them, the first failure at once (the others are dropped)."""
        if call.parent is None:
            return [answer]
        parent = self._group_calls.get(call.parent)
        if parent is None:
            return []  # the group call was answered already (another member failed)
        parent.children.discard(call.call_id)
        if isinstance(answer, DeliverKey) and parent.children:
            return []
        del self._group_calls[parent.call_id]
        group = parent.group
        group.calls.discard(parent.call_id)
        if isinstance(answer, DeliverKey):
            return [self._ev(now, "key_returned", group.gid, call="enc_keys", indices=list(parent.indices),
                             multicast=True),
                    DeliverKey(parent.call_id, group.gid, parent.indices)]
        # The master gets none of these keys: the copy kept for it goes now.
        acts: list[Action] = [PurgeKeys(group.gid, parent.indices)]
        for child in list(parent.children):
            other = self._calls.get(child)
            if other is not None:
                acts += self._finish(other, now)
        parent.children.clear()
        if isinstance(answer, Reject):
            return acts + [Reject(parent.call_id, answer.http_status, answer.message)]
        return acts + [Reply(parent.call_id, answer.status, ksid=group.gid, retry_after=answer.retry_after,
                             message=answer.message)]

    def dec_keys(self, slave_sae: str, ksid: str, indices: tuple[int, ...] | list[int], now: float,
                 have_keys: bool) -> Decision:
        """ETSI 014 dec_keys of the slave SAE; the shell has mapped the key_IDs to (ksid, index)
        in its store and says whether it holds them all."""
        call_id = self._new_call_id()
        acts: list[Action] = [self._ev(now, "request_arrival", _known(ksid), call="dec_keys", sae=slave_sae)]
        try:
            ksid = normalize_ksid(ksid)
        except InvalidKSID:
            ksid = None
        slot = self._slots.get(ksid) if ksid is not None else None
        if slot is None:
            return Decision(call_id, (*acts, Reject(call_id, 400, KEYS_NOT_FOUND)))
        s = slot.session
        if s.interface != "014" or s.destination_sae != slave_sae or s.local_sae != slave_sae:
            return Decision(call_id, (*acts, Reject(call_id, 401, "")))
        indices = tuple(indices)
        if not indices or not have_keys:
            return Decision(call_id, (*acts, Reject(call_id, 400, KEYS_NOT_FOUND)))
        if s.state in ACTIVE_STATES:
            s.activity(now)
        acts.append(self._ev(now, "key_returned", ksid, count=len(indices)))
        return Decision(call_id, (*acts, DeliverKey(call_id, ksid, indices)))

    # -- control plane --------------------------------------------------------------------

    def authenticated(self, ksid: str, user: str, now: float) -> list[Action]:
        ksid = _canon(ksid)
        slot = self._slots.get(ksid)
        if slot is None or slot.session.state is not SessionState.AUTHENTICATING:
            return []  # a late answer for a session that ended meanwhile
        s = slot.session
        acts: list[Action] = [self._ev(now, "authentication", ksid, result="accepted", sae=s.local_sae, user=user)]
        acts += self._events(s.authenticated(user, now))
        acts.append(NeedAdmission(ksid, s.interface, user, s.local_sae, s.source_sae, s.destination_sae, s.qos))
        return acts

    def authentication_failed(self, ksid: str, reason: str, now: float) -> list[Action]:
        ksid = _canon(ksid)
        slot = self._slots.get(ksid)
        if slot is None or slot.session.state is not SessionState.AUTHENTICATING:
            return []
        s = slot.session
        acts: list[Action] = [self._ev(now, "authentication", ksid, result="rejected", sae=s.local_sae, reason=reason)]
        acts += self._events(s.rejected(reason, now))
        for call in self._calls_of(slot):
            acts += self._finish(call, now)
            acts += self._answered(call, Reject(call.call_id, 401 if s.interface == "014" else 403,
                                                "authentication failed"), now)
        acts.append(Terminate(ksid, "authentication_failed", notify_control=False))
        acts += self._wind_down(slot, now)
        return acts

    def admission_rejected(self, ksid: str, status: Status | int, now: float, reason: str = "",
                           counter_qos: QoS | None = None) -> list[Action]:
        """Admission refused the session: 7 with a counter-proposal (SLA), 4 no path, ..."""
        ksid = _canon(ksid)
        status = Status(status)
        if status in (Status.SUCCESSFUL, Status.PEER_NOT_CONNECTED):
            raise ValueError("a refusal needs a failure status")
        slot = self._slots.get(ksid)
        if slot is None or slot.session.state not in SETUP_STATES:
            return []
        s = slot.session
        reason = reason or status.name.lower()
        acts: list[Action] = self._events(s.rejected(reason, now))
        for call in self._calls_of(slot):
            acts += self._finish(call, now)
            acts += self._answered(call, Reply(call.call_id, status, ksid=ksid,
                                               qos=counter_qos if call.kind == "open_connect" else None,
                                               message=reason), now)
        acts.append(Terminate(ksid, reason, notify_control=False))
        acts += self._wind_down(slot, now)
        return acts

    def configure(self, config: SessionConfig, now: float, *, qos: QoS | None = None) -> list[Action]:
        """The control plane's configuration (first one or a re-route). Raises ConfigError /
        InvalidTransition, without any change, for one that does not fit the session.
        ``qos``: the QoS of a session this key manager learns from the configuration alone
        (default: the key manager's defaults), e.g. one restored after a restart."""
        ksid = config.ksid
        entry = config.forwarding_entry()
        slot = self._slots.get(ksid)
        if slot is None:
            qos = (qos or self.default_qos).with_defaults(self.default_qos).replace(Priority=config.priority)
            session, events = KMSession.from_config(config, now, qos=qos)
            slot = self._slots[ksid] = _Slot(session)
            if session.interface == "014" and session.role is Role.SOURCE:
                self._pairs.setdefault((session.source_sae, session.destination_sae), ksid)
        else:
            if not slot.session.is_live:
                raise InvalidTransition(ksid, slot.session.state, "configured")
            events = slot.session.configured(config, now)
        s = slot.session
        acts: list[Action] = self._events(events)
        acts.append(self._ev(now, "configuration", ksid, role=s.role.value, prev_hop=config.prev_hop,
                             next_hop=config.next_hop, priority=config.priority))
        if ksid in self.forwarding:
            old = self.forwarding.replace(ksid, entry)
            acts += self._move_queued(ksid, old, entry, now)
        else:
            self.forwarding.set(ksid, entry)
        if s.role is not Role.INTERMEDIATE:
            if slot.bucket is None:
                slot.bucket = TokenBucket(config.bucket_rate_bps, config.bucket_size_bits, now)
            else:
                slot.bucket.reconfigure(config.bucket_rate_bps, config.bucket_size_bits, now)
            slot.offered_qos = s.qos.replace(Priority=config.priority,
                                             Max_bps=min(int(config.bucket_rate_bps), UINT32_MAX))
        for call in self._calls_of(slot):
            if call.phase != "setup":
                continue
            if call.kind == "open_connect":
                acts += self._finish(call, now)
                acts.append(Reply(call.call_id, Status.SUCCESSFUL, ksid=ksid, qos=slot.offered_qos))
            else:
                acts += self._start_enc(slot, call, now)
        return acts

    def resume(self, ksid: str, now: float, *, next_index: int, user: str | None) -> list[Action]:
        """A session restored after a restart (configured again from the key manager's saved
        configuration): indices below ``next_index`` were handed out before, so an application
        that lets the key manager choose gets the next one; ``user`` is who access control
        accepted then."""
        ksid = _canon(ksid)
        slot = self._slots.get(ksid)
        if slot is None or not slot.session.is_live:
            return []
        if isinstance(next_index, bool) or not isinstance(next_index, int) or next_index < 0:
            raise ValueError("next_index must be an integer >= 0")
        slot.next_index = max(slot.next_index, next_index)
        if user and slot.session.user is None:
            slot.session.user = user
        return [self._ev(now, "session_restored", ksid, role=slot.session.role.value, next_index=slot.next_index)]

    def deconfigure(self, ksid: str, now: float, *, peer_closed: bool = False) -> list[Action]:
        """Deletion from the control plane. ``peer_closed``: the peer application closed."""
        ksid = _canon(ksid)
        slot = self._slots.get(ksid)
        if slot is None:
            return []
        if peer_closed:
            slot.peer_closed = True
        if slot.session.is_live:
            return self._terminate(slot, now, "deconfigured", notify_control=False)
        return self._settle(slot, now)

    def peer_closed(self, ksid: str, now: float) -> list[Action]:
        """The peer application closed the session at its key manager."""
        ksid = _canon(ksid)
        slot = self._slots.get(ksid)
        if slot is None:
            return []
        slot.peer_closed = True
        return self._settle(slot, now)

    # -- key material ---------------------------------------------------------------------

    def key_ready(self, ksid: str, index: int, now: float) -> list[Action]:
        """Key ``index`` of the session is in the local store (made here and confirmed by the
        destination, or relayed here)."""
        ksid = _canon(ksid)
        p = self._productions.pop((ksid, index), None)
        if p is not None:
            self._unqueue(p)
        slot = self._slots.get(ksid)
        if slot is None:
            return []
        acts: list[Action] = [self._ev(now, "key_available", ksid, index=index)]
        if slot.session.state in ACTIVE_STATES:
            slot.session.activity(now)
        for call in self._calls_of(slot):
            if index in call.indices:
                call.present.add(index)
                if call.phase == "key" and call.present.issuperset(call.indices):
                    acts += self._deliver(call, now)
        return acts

    def key_failed(self, ksid: str, index: int, now: float, status: Status | int = Status.NO_QKD_CONNECTION,
                   reason: str = "key delivery failed", *, index_used: bool = False) -> list[Action]:
        """Key ``index`` could not be made or fetched. ``index_used``: the peer holds another key
        under that index (a key it stored whose confirmation was lost, before a failure or a
        restart here), so the index is not handed to a later call: one index, one key."""
        ksid = _canon(ksid)
        p = self._productions.get((ksid, index))
        if p is None:
            return []
        return self._fail_production(p, Status(status), reason, now, index_used=index_used)

    def key_material_short(self, ksid: str, index: int, needed_bits: int, now: float) -> list[Action]:
        """The source's pool lacks the ``needed_bits`` link-key bits that key ``index`` takes:
        it waits in the pool's priority queue for ``material_available``."""
        ksid = _canon(ksid)
        if isinstance(needed_bits, bool) or not isinstance(needed_bits, int) or needed_bits <= 0:
            raise ValueError("needed_bits must be an integer > 0")
        p = self._productions.get((ksid, index))
        if p is None or p.kind != "produce" or p.queued is not None:
            return []
        return self._enqueue(p, needed_bits, now)

    def material_available(self, pool: str, available_bits: int, now: float) -> list[Action]:
        """Link-key material of ``pool`` the source may spend now: the waiting requests it
        covers, by priority, go to production."""
        q = self._queues.get(pool)
        if q is None:
            return []
        acts = self._expire_queue(q, now)
        for entry in q.pop_ready(available_bits, now):
            p = self._productions[self._queued_ids.pop(entry.request_id)]
            p.queued, p.served = None, (pool, entry)
            acts.append(self._produce_action(p))
        return acts

    def peer_key_request(self, ksid: str, index: int, now: float) -> list[Action]:
        """The destination KM asks this source KM for key ``index`` (it lacks it)."""
        ksid = _canon(ksid)
        slot = self._slots.get(ksid)
        if (slot is None or slot.session.state not in ACTIVE_STATES or slot.session.role is not Role.SOURCE
                or isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= UINT32_MAX):
            return [AnswerPeer(ksid, index, Status.NO_QKD_CONNECTION)]
        s = slot.session
        s.activity(now)
        qos = slot.offered_qos or s.qos
        acts: list[Action] = [self._ev(now, "peer_key_request", ksid, index=index)]
        return acts + self._want(slot, index, qos.chunk_bits, now + qos.timeout_s, now, for_peer=True)

    def route_relay(self, ksid: str, from_node: str, now: float) -> RelayRoute:
        """Where a relay message of the session arriving from ``from_node`` goes: on towards
        the destination (from the previous hop), back towards the source (a confirmation from
        the next hop), or it ends here."""
        ksid = _canon(ksid)
        slot = self._slots.get(ksid)
        entry = self.forwarding.get(ksid)
        if slot is None or entry is None or slot.session.state not in ACTIVE_STATES:
            return RelayRoute(False, reason="no active session")
        if from_node is not None and from_node == entry.prev_hop:
            slot.session.activity(now)
            if entry.next_hop is None:
                return RelayRoute(True, local=True)
            return RelayRoute(True, node=entry.next_hop, link_id=entry.link_next)
        if from_node is not None and from_node == entry.next_hop:
            slot.session.activity(now)
            if entry.prev_hop is None:
                return RelayRoute(True, local=True)
            return RelayRoute(True, node=entry.prev_hop, link_id=entry.link_prev)
        return RelayRoute(False, reason="sender is not a neighbour on the session's route")

    # -- timers ---------------------------------------------------------------------------

    def tick(self, now: float) -> list[Action]:
        """Everything due at ``now``: queue expiries, bucket releases, call timeouts, session
        timers (inactivity, set-up), key purges."""
        acts: list[Action] = []
        for q in self._queues.values():
            acts += self._expire_queue(q, now)
        for slot in list(self._slots.values()):
            acts += self._release_tokens(slot, now)
        for call in sorted((c for c in self._calls.values() if c.deadline <= now), key=lambda c: c.deadline):
            if call.call_id in self._calls:
                acts += self._call_timeout(call, now)
        for p in [p for p in self._productions.values() if p.deadline <= now]:
            acts += self._fail_production(p, Status.TIMEOUT, "timeout", now)
        for slot in list(self._slots.values()):
            s = slot.session
            if s.is_live:
                events = s.tick(now)
                if events:
                    acts += self._events(events)
                    acts += self._after_end(slot, now, s.end_reason or "timeout", notify_control=True,
                                            call_status=Status.TIMEOUT)
        for slot in list(self._slots.values()):
            acts += self._settle(slot, now)
        return acts

    # -- internals: calls -----------------------------------------------------------------

    def _new_call_id(self) -> str:
        self._call_seq += 1
        return f"call-{self._call_seq}"

    def _fresh_ksid(self) -> str:
        for _ in range(16):
            ksid = normalize_ksid(self._new_ksid())
            if ksid is not None and ksid not in self._slots:
                return ksid
        raise RuntimeError("KSID generator keeps returning KSIDs in use")

    def _add_call(self, slot: _Slot, call: _Call) -> None:
        self._calls[call.call_id] = call
        slot.calls.append(call.call_id)

    def _calls_of(self, slot: _Slot) -> list[_Call]:
        return [self._calls[c] for c in list(slot.calls)]

    def _wait(self, call: _Call, reason: str) -> list[Action]:
        if call.waiting:
            return []
        call.waiting = True
        return [Wait(call.call_id, call.deadline, reason)]

    def _reopen(self, slot: _Slot, call_id: str, requested: QoS, now: float) -> list[Action]:
        """OPEN_CONNECT again by the session's own application (a retry, or a KSID the control
        plane configured before the application came): the QoS assigned to it."""
        s = slot.session
        if s.state in ACTIVE_STATES:
            return [Reply(call_id, Status.SUCCESSFUL, ksid=s.ksid, qos=slot.offered_qos)]
        call = _Call(call_id, "open_connect", s.ksid, now + requested.timeout_s, "setup")
        self._add_call(slot, call)
        return self._wait(call, "admission" if s.state is SessionState.USER_ACCEPTED else "authentication")

    def _counter_proposal(self, q: QoS) -> QoS | None:
        changes: dict[str, object] = {}
        if q.Metadata_mimetype and not _mimetype_supported(q.Metadata_mimetype):
            changes["Metadata_mimetype"] = JSON_MIMETYPE
        if q.Key_chunk_size == 0:
            changes["Key_chunk_size"] = self.default_qos.Key_chunk_size
        elif q.Key_chunk_size is not None and q.Key_chunk_size > self.max_chunk_bytes:
            changes["Key_chunk_size"] = self.max_chunk_bytes
        if q.Max_bps is not None and q.Min_bps is not None and q.Min_bps > q.Max_bps:
            changes["Min_bps"] = q.Max_bps
        return q.replace(**changes) if changes else None

    def _start_enc(self, slot: _Slot, call: _Call, now: float) -> list[Action]:
        if not call.indices:  # a multicast member's request comes with its group's indices
            call.indices = tuple(range(slot.next_index, slot.next_index + call.number))
        slot.next_index = max(slot.next_index, call.indices[-1] + 1)
        return self._begin_request(slot, call, now)

    def _begin_request(self, slot: _Slot, call: _Call, now: float) -> list[Action]:
        """A key request on an operative session: token bucket first, then the keys."""
        s = slot.session
        acts: list[Action] = self._events(s.key_request_started(now))
        call.counted = True
        acts.append(SignalKeyRequest(s.ksid))
        bucket = slot.bucket
        total = call.total_bits
        if total > bucket.size_bits:
            return acts + self._fail_call(call, Status.INSUFFICIENT_KEY,
                                          "request larger than the session's token bucket", now)
        if not slot.token_fifo and bucket.try_take(total, now):
            return acts + self._start_key_phase(slot, call, now)
        # Shaping: wait for the tokens if the call's timeout allows, behind earlier waiters.
        queued = sum(self._calls[c].total_bits for c in slot.token_fifo)
        deficit = queued + total - bucket.tokens(now)
        wait = 0.0 if deficit <= 0 else (math.inf if bucket.rate_bps <= 0 else deficit / bucket.rate_bps)
        if now + wait >= call.deadline:
            retry = bucket.time_until(total, now)
            acts.append(self._ev(now, "rate_limited", s.ksid, bits=total))
            return acts + self._fail_call(call, Status.INSUFFICIENT_KEY, "key requested faster than the session's rate",
                                          now, retry_after=retry if math.isfinite(retry) else None)
        call.phase = "tokens"
        slot.token_fifo.append(call.call_id)
        return acts + self._wait(call, "rate")

    def _release_tokens(self, slot: _Slot, now: float) -> list[Action]:
        acts: list[Action] = []
        while slot.token_fifo:
            call = self._calls[slot.token_fifo[0]]
            if call.deadline <= now:
                acts += self._call_timeout(call, now)
                continue
            if not slot.bucket.try_take(call.total_bits, now):
                break
            slot.token_fifo.popleft()
            acts += self._start_key_phase(slot, call, now)
        return acts

    def _start_key_phase(self, slot: _Slot, call: _Call, now: float) -> list[Action]:
        call.phase = "key"
        missing = [i for i in call.indices if i not in call.present]
        if not missing:
            return self._deliver(call, now)
        acts: list[Action] = []
        for index in missing:
            acts += self._want(slot, index, call.bits, call.deadline, now, for_peer=False)
            if call.call_id not in self._calls:
                return acts  # the request could not even be queued
        if call.deadline <= now:
            return acts + self._fail_call(call, Status.INSUFFICIENT_KEY, "no key available now", now)
        return acts + self._wait(call, "key")

    def _deliver(self, call: _Call, now: float) -> list[Action]:
        acts = self._finish(call, now)
        acts.append(self._ev(now, "key_returned", call.ksid, call=call.kind, indices=list(call.indices)))
        return acts + self._answered(call, DeliverKey(call.call_id, call.ksid, call.indices), now)

    def _fail_call(self, call: _Call, status: Status, reason: str, now: float,
                   retry_after: float | None = None, *, give_back: bool = True) -> list[Action]:
        """Answer ``call`` with a failure. An index the key manager chose goes to the next call,
        unless the peer holds another key under it (``give_back`` False)."""
        slot = self._slots.get(call.ksid)
        acts = self._finish(call, now)
        if slot is not None and call.auto_index and give_back and slot.next_index == call.indices[-1] + 1:
            slot.next_index = call.indices[0]  # the index was never handed out: give it to the next call
        acts.append(self._ev(now, "key_request_failed", call.ksid, call=call.kind, status=int(status), reason=reason))
        index = call.indices[0] if call.kind == "get_key" and call.indices else None
        return acts + self._answered(call, Reply(call.call_id, status, ksid=call.ksid, index=index,
                                                 retry_after=retry_after, message=reason), now)

    def _finish(self, call: _Call, now: float) -> list[Action]:
        """Forget a call that is being answered."""
        self._calls.pop(call.call_id, None)
        slot = self._slots.get(call.ksid)
        if slot is None:
            return []
        if call.call_id in slot.calls:
            slot.calls.remove(call.call_id)
        if call.call_id in slot.token_fifo:
            slot.token_fifo.remove(call.call_id)
        if call.counted and slot.session.state is SessionState.KEY_EXCHANGING:
            call.counted = False
            return self._events(slot.session.key_request_done(now))
        return []

    def _call_timeout(self, call: _Call, now: float) -> list[Action]:
        slot = self._slots[call.ksid]
        s = slot.session
        if call.kind == "open_connect" and s.state is SessionState.USER_ACCEPTED:
            # Connected here; the peer has not opened yet. The session keeps waiting for it.
            acts = self._finish(call, now)
            return acts + [Reply(call.call_id, Status.PEER_NOT_CONNECTED, ksid=s.ksid, qos=s.qos,
                                 message="peer not connected")]
        acts = self._fail_call(call, Status.TIMEOUT, "timeout", now)
        if s.state is SessionState.AUTHENTICATING and not slot.calls:
            acts += self._terminate(slot, now, "timeout", notify_control=False, call_status=Status.TIMEOUT)
        return acts

    # -- internals: productions and queues ------------------------------------------------

    def _want(self, slot: _Slot, index: int, bits: int, deadline: float, now: float, *, for_peer: bool) -> list[Action]:
        """Make sure key ``index`` is being made (source) or fetched (destination)."""
        ksid = slot.session.ksid
        p = self._productions.get((ksid, index))
        if p is not None:
            p.for_peer = p.for_peer or for_peer
            if deadline > p.deadline:
                p.deadline = deadline
                if p.queued is not None:
                    q = self._queues[p.pool]
                    q.extend_deadline(p.queued.request_id, deadline)
                    p.queued = q.get(p.queued.request_id)
            return []
        entry = self.forwarding.get(ksid)
        if slot.session.role is Role.SOURCE:
            p = _Production(ksid, index, bits, deadline, "produce", _pool_of(entry), for_peer=for_peer)
            self._productions[(ksid, index)] = p
            q = self._queues.get(p.pool)
            acts = self._expire_queue(q, now) if q is not None else []
            if q is not None and len(q):
                # Strict priority: no request overtakes those already waiting for this pool. The
                # key's own size is a lower bound of the link bits it takes; the shell corrects
                # it with key_material_short if the pool cannot serve it.
                return acts + self._enqueue(p, bits, now)
            return acts + [self._produce_action(p)]
        p = _Production(ksid, index, bits, deadline, "fetch", for_peer=for_peer)
        self._productions[(ksid, index)] = p
        return [FetchFromSource(ksid, index, bits, entry.prev_hop)]

    def _produce_action(self, p: _Production) -> ProduceKey:
        entry = self.forwarding.get(p.ksid)
        slot = self._slots.get(p.ksid)
        return ProduceKey(p.ksid, p.index, p.bits, p.pool, entry.next_hop, group=slot.group if slot else None)

    def _enqueue(self, p: _Production, link_bits: int, now: float) -> list[Action]:
        q = self._queues.get(p.pool)
        if q is None:
            q = self._queues[p.pool] = PriorityRequestQueue(self.queue_max_len)
        acts = self._expire_queue(q, now)
        slot = self._slots[p.ksid]
        rid = f"{p.ksid}/{p.index}"
        if p.served is not None and p.served[0] == p.pool:
            result = q.requeue(p.served[1], now, bits=link_bits, deadline=p.deadline)
        else:
            result = q.push(rid, slot.session.config.priority, link_bits, p.deadline, now)
        if not result.accepted:
            status = Status.TIMEOUT if result.reason == DEADLINE_PASSED else Status.INSUFFICIENT_KEY
            return acts + self._fail_production(p, status, f"key material queue: {result.reason}", now)
        p.queued = q.get(rid)
        self._queued_ids[rid] = (p.ksid, p.index)
        acts.append(self._ev(now, "request_queued", p.ksid, index=p.index, pool=p.pool, bits=link_bits,
                             priority=p.queued.priority))
        for dropped in result.evicted:
            other = self._productions[self._queued_ids.pop(dropped.request_id)]
            other.queued = None
            acts += self._fail_production(other, Status.INSUFFICIENT_KEY, "dropped from a full key material queue", now)
        return acts

    def _unqueue(self, p: _Production) -> None:
        if p.queued is not None:
            self._queues[p.pool].remove(p.queued.request_id)
            self._queued_ids.pop(p.queued.request_id, None)
            p.queued = None

    def _expire_queue(self, q: PriorityRequestQueue, now: float) -> list[Action]:
        acts: list[Action] = []
        for rid in q.expire(now):
            p = self._productions[self._queued_ids.pop(rid)]
            p.queued = None
            acts += self._fail_production(p, Status.TIMEOUT, "timeout waiting for key material", now)
        return acts

    def _fail_production(self, p: _Production, status: Status, reason: str, now: float, *,
                         index_used: bool = False) -> list[Action]:
        self._productions.pop((p.ksid, p.index), None)
        self._unqueue(p)
        acts: list[Action] = []
        slot = self._slots.get(p.ksid)
        if slot is not None:
            for call in self._calls_of(slot):
                if call.phase == "key" and p.index in call.indices and p.index not in call.present:
                    acts += self._fail_call(call, status, reason, now, give_back=not index_used)
        if p.for_peer:
            acts.append(AnswerPeer(p.ksid, p.index, status))
        return acts

    def _move_queued(self, ksid: str, old: ForwardingEntry, new: ForwardingEntry, now: float) -> list[Action]:
        """A re-route of a source session changed its pool: its waiting requests follow it."""
        acts: list[Action] = []
        if new.role is not Role.SOURCE or _pool_of(old) == _pool_of(new):
            return acts
        for p in [p for p in self._productions.values() if p.ksid == ksid and p.kind == "produce"]:
            was_queued = p.queued
            self._unqueue(p)
            p.pool, p.served = _pool_of(new), None
            if was_queued is not None:
                acts += self._enqueue(p, was_queued.bits, now)
        return acts

    # -- internals: ending sessions -------------------------------------------------------

    def _terminate(self, slot: _Slot, now: float, reason: str, *, notify_control: bool,
                   call_status: Status = Status.NO_QKD_CONNECTION) -> list[Action]:
        acts: list[Action] = self._events(slot.session.close(now, reason))
        return acts + self._after_end(slot, now, reason, notify_control=notify_control, call_status=call_status)

    def _after_end(self, slot: _Slot, now: float, reason: str, *, notify_control: bool,
                   call_status: Status) -> list[Action]:
        """The session has just become terminated: answer its calls, drop its productions and
        route, and start the retention of its unused keys."""
        s = slot.session
        acts: list[Action] = []
        for call in self._calls_of(slot):
            acts += self._fail_call(call, call_status, f"session ended: {reason}", now)
        acts.append(Terminate(s.ksid, reason, notify_control))
        acts += self._wind_down(slot, now)
        return acts

    def _wind_down(self, slot: _Slot, now: float) -> list[Action]:
        s = slot.session
        acts: list[Action] = []
        for p in [p for p in self._productions.values() if p.ksid == s.ksid]:
            self._productions.pop((p.ksid, p.index))
            self._unqueue(p)
            if p.for_peer:
                acts.append(AnswerPeer(p.ksid, p.index, Status.NO_QKD_CONNECTION))
        self.forwarding.discard(s.ksid)
        pair = slot.pair_key or (s.source_sae, s.destination_sae)
        if s.interface == "014" and self._pairs.get(pair) == s.ksid:
            del self._pairs[pair]
        if slot.group is not None:
            acts += self._leave_group(slot, now)
        slot.token_fifo.clear()
        ttl = (slot.offered_qos or s.qos).TTL
        slot.retain_until = now + (self.default_qos.TTL if ttl is None else ttl)
        return acts + self._settle(slot, now)

    def _leave_group(self, slot: _Slot, now: float) -> list[Action]:
        """A member session ended; the group ends with its last member (its undelivered keys go)."""
        for key, group in list(self._groups.items()):
            if group.gid != slot.group:
                continue
            if group.members.get(slot.session.destination_sae) == slot.session.ksid:
                del group.members[slot.session.destination_sae]
            if not group.members and not group.calls:
                del self._groups[key]
                return [self._ev(now, "multicast_group_ended", group.gid), PurgeKeys(group.gid)]
        return []

    def _settle(self, slot: _Slot, now: float) -> list[Action]:
        """Forget an ended session once its unused keys may go."""
        s = slot.session
        if s.is_live or s.ksid not in self._slots:
            return []
        if s.config is None or s.role is Role.INTERMEDIATE:
            del self._slots[s.ksid]  # no end-to-end key was ever stored here
            return []
        if (slot.local_closed and slot.peer_closed) or (slot.retain_until is not None and now >= slot.retain_until):
            del self._slots[s.ksid]
            return [self._ev(now, "purged", s.ksid), PurgeKeys(s.ksid)]
        return []

    # -- internals: events ----------------------------------------------------------------

    @staticmethod
    def _ev(now: float, kind: str, ksid: str | None, from_state: str | None = None, to_state: str | None = None,
            **details: object) -> EmitEvent:
        return EmitEvent(Event(now, kind, ksid, from_state, to_state, details))

    @staticmethod
    def _events(events: list[Event]) -> list[Action]:
        return [EmitEvent(e) for e in events]


def _canon(ksid: object) -> object:
    """KSIDs from the wire in canonical form; anything else is looked up as given (and not found)."""
    try:
        return normalize_ksid(ksid) or ksid
    except InvalidKSID:
        return ksid


def _known(ksid: object) -> str | None:
    """A request's KSID for its arrival event: canonical if well formed, else none."""
    try:
        return normalize_ksid(ksid) if isinstance(ksid, str) else None
    except InvalidKSID:
        return None


def _pool_of(entry: ForwardingEntry) -> str:
    return entry.link_next or f"node:{entry.next_hop}"
