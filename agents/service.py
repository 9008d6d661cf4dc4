"""The agent of one node: virtual key manager + SDN agent on one HTTPS listener.

This is the I/O shell around the decision classes (``agents.core``): it serves
ETSI 014 and ETSI 004 to applications, RESTCONF (ETSI 015) to the controller,
and the relay channel to neighbouring key managers; it fills the link-key pools
from the QKD devices, keeps the durable key store and carries out the actions
``KeyManagerLogic`` returns. The logic is called under one lock; actions that
wait on the network run in a thread pool and feed their outcome back into the
logic. See docs/key-management.md for the wire formats and rules.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import math
import os
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import requests
from flask import Flask

from agents import relay
from agents.batch import group_productions, produce_batch
from agents.control import (AdmissionRequest, AdmissionResult, ControlPlane, LocalControlPlane, RouteConfig,
                            physical_graph, shortest_route)
from agents.core.keymanager import (AnswerPeer, DeliverKey, EmitEvent, FetchFromSource, KeyManagerLogic,
                                    NeedAdmission, NeedAuthentication, ProduceKey, PurgeKeys, Reject, Reply,
                                    SignalKeyRequest, Terminate, Wait, key_id_for)
from agents.core.session import QoS, SessionConfig, Status
from agents.keystore import AlreadyDelivered, InsufficientKey, KeyStore
from agents.linkkeys import LinkKeyWorker
from agents.sdn_agent import (ConfigRejected, NodeState, SessionConfig as WireConfig, etsi_from_config,
                              restconf_blueprint)
from agents.sdn_agent import Datastore
from db.netfile import Link, Network
from etsi015.session import virt_link_id
from etsi015 import model as e015

log = logging.getLogger("qkdsdn.agent")

DEV_IDENTITY_HEADER = "X-QKDSDN-Dev-Identity"
RELAY_TIMEOUT_S = 10.0
EVENT_BUFFER = 10_000
PERF_PERIOD_S = 1.0
# After a session is (re)configured here, the other key managers on its route may not be yet (a
# controller configures them all at once; a re-route changes them one after the other): for this
# long a hop that does not know the session (409) is asked again, with backoff, instead of the
# key failing and the route being declared broken.
CONFIG_SETTLE_S = 3.0
FULL_POOL_SHARE = 0.9  # a pool this full takes key in fits and starts: its arrival rate is no key rate
SETTLE_RETRY_S = 0.05
PRUNE_PERIOD_S = 60.0
# A relay message older than this can no longer name a consumed key (its references are
# rejected as unknown instead of as consumed: refused either way).
PRUNE_AFTER_S = 600.0

@dataclass(frozen=True)
class Caller:
    kind: str  # sae | node | controller | operator
    name: str
    fingerprint: str | None = None


def relay_refusal(status: int, message: str) -> tuple[bool, bool]:
    """(route refused, index used) of a relay error: a 409 about the key (relay.KEY_CONFLICT,
    relay.GROUP_CONFLICT) is no broken route; KEY_CONFLICT says the index names a key already."""
    if status != 409:
        return False, False
    return message not in (relay.KEY_CONFLICT, relay.GROUP_CONFLICT), message == relay.KEY_CONFLICT


def link_key_rate(measured_bps: float, device_bps: float | None, pool_bits: int, pool_max_bits: int,
                  held_bps: float) -> float:
    """The key rate of a link as this end reports it (ETSI 015 skr, the routing's capacity).

    The device's own figure when it gives one. Else the rate key arrives in the pool, except
    while the pool is (nearly) full: a full pool takes no key, so arrival then says nothing
    about the link, and the rate measured while it was filling (``held_bps``) stands.
    """
    if device_bps is not None and device_bps >= 0:
        return float(device_bps)
    if pool_bits >= FULL_POOL_SHARE * pool_max_bits:
        return max(measured_bps, held_bps)
    return measured_bps


class _Pending:
    """An application call waiting for its answer from the logic."""

    __slots__ = ("event", "answer")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.answer: Reply | Reject | DeliverKey | None = None


class Peer:
    """HTTPS client towards another key manager (relay channel)."""

    def __init__(self, name: str, url: str, session: requests.Session):
        self.name, self.url, self.session = name, url, session

    def post(self, path: str, body: dict, timeout: float = RELAY_TIMEOUT_S) -> dict:
        response = self.session.post(self.url + path, json=body, timeout=timeout)
        try:
            payload = response.json()
        except ValueError:
            payload = {}
        if response.status_code != 200:
            raise PeerError(response.status_code, str(payload.get("message") or response.reason))
        return payload


class PeerError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status, self.message = status, message


class _RecordFile:
    """A small JSON file of records by KSID, rewritten atomically (temporary file, fsync,
    rename) on every change. Key bytes are never in it."""

    REQUIRED: frozenset[str] = frozenset()
    LOST = "its records are lost"

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._records: dict[str, dict[str, Any]] = {}
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            self._records = {k: v for k, v in raw.items() if isinstance(v, dict) and self.REQUIRED <= set(v)}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError) as exc:
            log.error("%s is unreadable (%s): %s", path, type(exc).__name__, self.LOST)

    def get(self, ksid: str) -> dict[str, Any] | None:
        with self._lock:
            record = self._records.get(ksid)
            return dict(record) if record is not None else None

    def items(self) -> list[tuple[str, dict[str, Any]]]:
        with self._lock:
            return [(k, dict(v)) for k, v in self._records.items()]

    def put(self, ksid: str, record: dict[str, Any]) -> None:
        with self._lock:
            if self._records.get(ksid) == record:
                return
            self._records[ksid] = dict(record)
            self._save()

    def update(self, ksid: str, **fields: Any) -> None:
        """Change fields of an existing record (none: nothing happens)."""
        with self._lock:
            record = self._records.get(ksid)
            if record is None or all(record.get(k) == v for k, v in fields.items()):
                return
            record.update(fields)
            self._save()

    def remove(self, ksid: str) -> None:
        with self._lock:
            if self._records.pop(ksid, None) is not None:
                self._save()

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as out:
            json.dump(self._records, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)


class SlaveSessions(_RecordFile):
    """The ETSI 014 sessions this key manager is the destination of, on disk.

    Keys stored here for a slave SAE must survive a restart (``kill -9`` included) until that
    SAE calls dec_keys, but the sessions themselves live in memory. This file keeps what
    dec_keys needs besides the keys: each session's master and slave SAE, how long its keys
    may wait unused and, for a multicast member, its group. At start-up the key_ID ->
    (ksid, index) map is rebuilt from it and the key store.
    """

    REQUIRED = frozenset({"source_sae", "destination_sae", "retain_s"})
    LOST = "keys stored for ETSI 014 slaves before a restart are not deliverable"

    def add(self, ksid: str, source_sae: str, destination_sae: str, retain_s: float) -> None:
        record = {"source_sae": source_sae, "destination_sae": destination_sae, "retain_s": float(retain_s)}
        old = self.get(ksid)
        if old is not None and "group" in old:
            record["group"] = old["group"]
        self.put(ksid, record)

    def set_group(self, ksid: str, group: str) -> None:
        """The session is a member of an ETSI 014 multicast group: its key_IDs derive from it."""
        self.update(ksid, group=group)


class SessionJournal(_RecordFile):
    """The sessions configured at this key manager, on disk: what the control plane configured
    (the ETSI 015 qkd_app + VIRT qkd_link, as a SessionConfig), the interface, the QoS the
    application asked for, the user and the trusted nodes on the route. At start-up the agent
    configures them again through its datastore, so ETSI 004 sessions and the routes through
    this node outlive a restart (``kill -9`` included). ETSI 014 endpoints are not in it: the
    master's session is implicit (the next enc_keys opens one) and the slave's keys have
    SlaveSessions."""

    REQUIRED = frozenset({"config", "interface"})
    LOST = "sessions configured before the restart are not restored"


class KeyManagerAgent:
    """One node's agent. ``start()`` serves; ``stop()`` ends every thread."""

    def __init__(self, network: Network, node: str, *, state_dir: str | Path, pki: Any = None,
                 insecure_dev: bool = False, control: ControlPlane | None = None, host: str | None = None,
                 port: int | None = None, clock: Callable[[], float] = time.monotonic,
                 link_workers: bool = True, pool_max_bits: int = 8 * 2 ** 20, bus: Any = None,
                 max_sae_id_count: int = 16):
        from qkdsdn.pki import PkiLayout

        if pki is None and not insecure_dev:
            raise ValueError("an agent needs certificates (pki) unless it runs with insecure_dev on loopback")
        self.network = network
        self.node = network.node(node)
        self.name = node
        self.insecure_dev = insecure_dev
        self.pki = PkiLayout(pki) if pki is not None and not isinstance(pki, PkiLayout) else pki
        self.clock = clock
        self._clock_offset = time.time() - clock()  # Unix time of the logic's clock readings
        self.host = host or self.node.km_host
        self.port = self.node.km_port if port is None else port
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = KeyStore(self.state_dir / f"{node}.keystore.sqlite", pool_max_bits=pool_max_bits)
        self.logic = KeyManagerLogic(node, max_additional_slaves=max_sae_id_count,
                                     max_chunk_bytes=relay.MAX_KEY_BYTES)
        self._lock = threading.RLock()
        self._calls: dict[str, _Pending] = {}
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix=f"km-{node}")
        self._threads: list[threading.Thread] = []
        self._by_qkdn = {n.qkdn_id: n.name for n in network.nodes}
        self._qkdn = {n.name: n.qkdn_id for n in network.nodes}
        self._apps = {a.sae_id: a for a in network.applications}
        self._links: dict[str, Link] = {}  # neighbour name -> physical link
        for link in network.links_of(node):
            other = link.slave if link.master == node else link.master
            self._links[other] = link
        self._links_by_id = {link.qkdl_id: link for link in self._links.values()}
        self._graph = physical_graph(network)  # for ETSI 014 status before a route is configured
        self._key_meta: dict[tuple[str, int], tuple[float, int]] = {}  # (ksid, index) -> (stored at, hops)
        self._key_ids: dict[str, tuple[str, int]] = {}  # ETSI 014 key_ID -> (ksid, index)
        # Multicast: one key_ID names a copy per member session; two slaves on this node each have one.
        self._member_key_ids: dict[tuple[str, str], tuple[str, int]] = {}  # (key_ID, slave SAE) -> (ksid, index)
        self._session_group: dict[str, str] = {}  # member session KSID -> its multicast group
        self._group_slaves: dict[str, set[str]] = {}  # multicast group -> its slave SAEs served here
        self._producing: dict[tuple[str, int], None] = {}  # keys being made here
        self._configured_at: dict[str, float] = {}  # KSID -> monotonic time of its last configuration here
        # Sessions whose route has carried a key (a multicast member's keys are stored under its group).
        self._carried: set[str] = set()
        self._claimed: dict[str, int] = {}  # pool -> link-key bits of productions that have not taken theirs yet
        self._skr_held: dict[str, float] = {}  # link -> key rate reported last (held while the pool is full)
        # ETSI 014 destination sessions on disk; those from before a restart ("orphans": no session
        # in the logic any more) keep their undelivered keys deliverable until their retention ends.
        self.slave_sessions = SlaveSessions(self.state_dir / f"{node}.slave-sessions.json")
        self.journal = SessionJournal(self.state_dir / f"{node}.sessions.json")
        self._restoring: dict[str, dict[str, Any]] = {}  # KSID -> journal record, while start() restores it
        self.restored_sessions = 0  # how many start() restored (the bus link re-announces them)
        self._orphans: dict[str, float] = {}  # ksid -> wall-clock time its keys are dropped
        self._admitting: dict[str, str] = {}  # ksid -> source SAE, from admission request to termination
        self.events: deque[dict] = deque(maxlen=EVENT_BUFFER)
        self._event_file = open(self.state_dir / f"{node}.events.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        self._event_subscribers: list[Callable[[dict], None]] = []
        self.peers = {n.name: self._make_peer(n.name) for n in network.nodes if n.name != node}
        self.node_state = NodeState.from_network(network, node)
        # The one Datastore of this node: RESTCONF writes and bus configuration go through it.
        self.datastore = Datastore(self.node_state, self)
        # With a bus (qkdsdn.bus.Bus) a controller runs: access and admission control are reached over it
        # (agents.buscontrol.BusControlPlane) and it configures this node over it (AgentBusLink).
        self.bus = bus
        self.bus_link = None
        if bus is not None:
            from agents.buscontrol import AgentBusLink, BusControlPlane
            from qkdsdn.bus import Topics

            topics = Topics(network.name)
            control = control or BusControlPlane(bus, topics, node)
            self.bus_link = AgentBusLink(self, bus, topics, datastore=self.datastore)
        self.control = control or LocalControlPlane(network, node, push=self._push_config,
                                                    remove=self._remove_config, forward=self._forward_control,
                                                    clock=clock)
        self.workers: dict[str, LinkKeyWorker] = {}
        if link_workers:
            from agents.drivers.factory import device_for_link_end

            for other, link in self._links.items():
                if link.device is None and link.kme is None:
                    continue
                role = "master" if link.master == node else "slave"
                device = device_for_link_end(network, link, node, pki=self.pki, insecure_dev=insecure_dev)
                notify = (lambda msg, peer=self.peers[other]: peer.post("/relay/v1/link_keys", msg)) \
                    if role == "master" else None
                self.workers[link.qkdl_id] = LinkKeyWorker(link, role, device, self.store, notify_slave=notify,
                                                           clock=clock)
        self._recover_slave_sessions()
        self._users: dict[str, str] = {}  # KSID -> authenticated user
        self._hops: dict[str, int] = {}  # KSID -> trusted nodes on its route (004 metadata)
        self._fingerprints: dict[str, str] = {}  # SAE -> its client certificate's fingerprint
        self.app = self._make_app()
        self.server = None

    # ------------------------------------------------------------------ life cycle

    def start(self) -> "KeyManagerAgent":
        from qkdsdn.httpserver import HTTPServer, TLSConfig

        tls = None if self.insecure_dev else TLSConfig.for_node(self.pki, self.name)
        self.server = HTTPServer(self.app, self.host, self.port, tls=tls, insecure_dev=self.insecure_dev,
                                 name=f"agent {self.name}", threads=32)
        self._restore_sessions()  # before the first application call can arrive
        self.server.start()
        self.port = self.server.port
        for worker in self.workers.values():
            worker.start()
        for target, name in ((self._ticker, "tick"), (self._monitor, "perf")):
            t = threading.Thread(target=target, name=f"km-{self.name}-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        if self.bus_link is not None:
            self.bus_link.start()
        self.node_state.set_node_status(e015.NodeStatus.OPERATING)
        self._emit_raw("agent_started", None, url=self.server.url)
        return self

    def stop(self) -> None:
        if self.bus_link is not None:
            self.bus_link.stop()  # the bus itself belongs to the caller
        self._stopping.set()
        self._wake.set()
        for worker in self.workers.values():
            worker.stop()
        if self.server is not None:
            self.server.stop()
        for t in self._threads:
            t.join(timeout=5)
        self._pool.shutdown(wait=True, cancel_futures=True)
        for peer in self.peers.values():
            peer.session.close()
        self.store.close()
        self._event_file.close()

    def __enter__(self) -> "KeyManagerAgent":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def url(self) -> str:
        scheme = "http" if self.insecure_dev else "https"
        return f"{scheme}://{self.host}:{self.port}"

    # ------------------------------------------------------------------ peers and identity

    def _make_peer(self, name: str) -> Peer:
        from qkdsdn.httpserver import https_session

        node = self.network.node(name)
        if self.insecure_dev:
            session = requests.Session()
            session.headers[DEV_IDENTITY_HEADER] = f"node:{self.name}"
            return Peer(name, f"http://{node.km_host}:{node.km_port}", session)
        cert, key = self.pki.node(self.name)
        return Peer(name, f"https://{node.km_host}:{node.km_port}", https_session(cert, key, self.pki.ca_cert))

    def set_peer_url(self, name: str, url: str) -> None:
        """Where another key manager listens (tests that bind ephemeral ports)."""
        self.peers[name].url = url.rstrip("/")

    def caller(self, environ: dict) -> Caller | None:
        if self.insecure_dev:
            raw = environ.get("HTTP_" + DEV_IDENTITY_HEADER.upper().replace("-", "_"), "")
            kind, _, name = raw.partition(":")
            if kind in ("sae", "node") and name:
                return Caller(kind, name)
            if kind in ("controller", "operator"):
                return Caller(kind, kind)
            return None
        from qkdsdn import pki
        from qkdsdn.httpserver import peer_certificate, peer_fingerprint

        cert = peer_certificate(environ)
        if cert is None:
            return None
        kind = pki.certificate_kind(cert)
        fp = peer_fingerprint(environ)
        if kind == "application":
            return Caller("sae", pki.sae_id_from_certificate(cert), fp)
        if kind == "node":
            name = self._by_qkdn.get(pki.node_id_from_certificate(cert) or "")
            return Caller("node", name, fp) if name else None
        if kind in ("controller", "operator"):
            return Caller(kind, kind, fp)
        return None

    # ------------------------------------------------------------------ events

    def _emit(self, event: Any) -> None:
        if hasattr(event, "to_json"):
            record = event.to_json()
            # The logic's times are this agent's clock (monotonic): the stream is in Unix time, with
            # one offset so events of one decision keep their order and equal times.
            record["timestamp"] = float(event.timestamp) + self._clock_offset
        else:
            record = dict(event)
        record.setdefault("node", self.name)
        record.setdefault("element", "key_manager")
        self.events.append(record)
        try:
            self._event_file.write(json.dumps(record, default=str) + "\n")
            self._event_file.flush()
        except ValueError:  # closed during shutdown
            pass
        for callback in list(self._event_subscribers):
            try:
                callback(record)
            except Exception:  # noqa: BLE001 — a subscriber never breaks the key manager
                log.exception("event subscriber failed")

    def _emit_raw(self, kind: str, ksid: str | None, **details: Any) -> None:
        self._emit({"timestamp": time.time(), "kind": kind, "ksid": ksid, "details": details})

    def subscribe_events(self, callback: Callable[[dict], None]) -> None:
        self._event_subscribers.append(callback)

    # ------------------------------------------------------------------ driving the logic

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            result = fn(*args, **kwargs)
        actions = result.actions if hasattr(result, "actions") else result
        self._run(actions)
        return result

    def _run(self, actions: Iterable[Any]) -> None:
        produce: list[ProduceKey] = []
        for a in actions:
            if isinstance(a, (Reply, Reject, DeliverKey)):
                pending = self._calls.get(a.call_id)
                if pending is not None:
                    pending.answer = a
                    pending.event.set()
            elif isinstance(a, Wait):
                self._wake.set()
            elif isinstance(a, EmitEvent):
                self._emit(a.event)
            elif isinstance(a, NeedAuthentication):
                self._pool.submit(self._authenticate, a)
            elif isinstance(a, NeedAdmission):
                with self._lock:
                    self._admitting[a.ksid] = a.source_sae
                self._pool.submit(self._admit, a)
            elif isinstance(a, ProduceKey):
                if (a.ksid, a.index) not in self._producing:
                    produce.append(a)
            elif isinstance(a, FetchFromSource):
                self._pool.submit(self._fetch, a)
            elif isinstance(a, AnswerPeer):
                self._pool.submit(self._answer_peer, a)
            elif isinstance(a, SignalKeyRequest):
                self._pool.submit(self.control.key_request, a.ksid)
            elif isinstance(a, Terminate):
                self._terminated(a)
            elif isinstance(a, PurgeKeys) and a.indices is not None:
                self.store.drop_session_keys(a.ksid, a.indices)
            elif isinstance(a, PurgeKeys):
                self.store.drop_session(a.ksid)
                self.slave_sessions.remove(a.ksid)
                with self._lock:
                    for k in [k for k in self._key_meta if k[0] == a.ksid]:
                        del self._key_meta[k]
                    self._forget_key_ids(a.ksid)
                    self._hops.pop(a.ksid, None)
                    self._users.pop(a.ksid, None)
            else:  # pragma: no cover — a new action type must be handled here
                log.error("unhandled action %r", a)
        # Several keys of one session and route in one decision are made together (agents/batch.py).
        for batch in group_productions(produce):
            self._submit_production(batch)

    def _submit_production(self, batch: list[ProduceKey]) -> None:
        """Make the keys of ``batch`` (one key, or a batch of one session and pool) in the pool.
        Their link key counts as spoken for until it is taken: the queue must not hand the same
        material to the next request meanwhile (``material_available`` in the ticker)."""
        for a in batch:  # registered before the job can end and unregister them
            self._producing[(a.ksid, a.index)] = None
        pool = batch[0].pool
        claim = sum(relay.link_key_bits_needed(a.bits) for a in batch)
        with self._lock:
            self._claimed[pool] = self._claimed.get(pool, 0) + claim
        release = self._releaser(pool, claim)
        if len(batch) == 1:
            self._pool.submit(self._produce, batch[0], release)
        else:
            self._pool.submit(produce_batch, self, batch, release)

    def _await(self, decision: Any, deadline_s: float) -> Reply | Reject | DeliverKey | None:
        """Block the calling (HTTP) thread until the call is answered or its deadline passes."""
        answer = decision.answer
        if answer is not None:
            self._calls.pop(decision.call_id, None)
            return answer
        pending = self._calls[decision.call_id]
        # The logic answers every waiting call by its deadline (tick); the margin covers scheduling.
        pending.event.wait(deadline_s + 5.0)
        self._calls.pop(decision.call_id, None)
        return pending.answer

    def _start_call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run an application call: register its pending answer before any action can answer it."""
        with self._lock:
            decision = fn(*args, **kwargs)
            if decision.answer is None:
                self._calls[decision.call_id] = _Pending()
        self._run(decision.actions)
        return decision

    def _ticker(self) -> None:
        while not self._stopping.is_set():
            now = self.clock()
            with self._lock:
                deadline = self.logic.next_deadline()
            wait = 0.2 if deadline is None else min(max(deadline - now, 0.0), 0.2)
            self._wake.wait(wait)
            self._wake.clear()
            if self._stopping.is_set():
                return
            now = self.clock()
            actions: list[Any] = []
            with self._lock:
                actions += self.logic.tick(now)
                for link_id, link in self._links_by_id.items():
                    queue = self.logic.queue(link_id)
                    if queue is not None and len(queue):
                        role = "master" if link.master == self.name else "slave"
                        free = self.store.available_bits(link_id, role) - self._claimed.get(link_id, 0)
                        actions += self.logic.material_available(link_id, max(free, 0),
                                                                 now)
            self._run(actions)

    def _monitor(self) -> None:
        """Link performance for ETSI 015 (qkdl_performance, link perf notifications)."""
        last_prune = 0.0
        while not self._stopping.wait(PERF_PERIOD_S):
            self._expire_orphans(time.time())
            if time.monotonic() - last_prune >= PRUNE_PERIOD_S:
                last_prune = time.monotonic()
                try:
                    # Fully consumed link keys hold no bytes; their rows only slow the pool down.
                    self.store.prune_consumed(time.time() - PRUNE_AFTER_S)
                except Exception:  # noqa: BLE001
                    log.exception("pruning consumed link keys failed")
            for link_id, worker in self.workers.items():
                try:
                    measured = worker.arrival_rate_bps()
                    # The device's own view (QBER, key rate, a cut fibre) when it reports one (the
                    # twin's status extension); the link-key worker asks for the status only when
                    # it needs key, so a full pool would hide a cut or an eavesdropper.
                    qber, device_state, device_skr = None, None, None
                    if worker.role == "master":
                        try:
                            device = worker.device.get_status()
                            qber, device_state, device_skr = device.qber, device.link_state, device.skr_bps
                        except Exception as exc:  # noqa: BLE001 - no device status: key arrival decides
                            log.debug("status of the device of %s unavailable: %s", link_id, exc)
                    if qber is not None and not 0 <= qber <= 1:
                        qber = None
                    skr = self._skr_held[link_id] = link_key_rate(
                        measured, device_skr, self.store.pool_bits(link_id), self.store.pool_max_bits,
                        self._skr_held.get(link_id, 0.0))
                    self.node_state.set_link_performance(link_id, skr=skr, qber=qber)
                    if device_state == "cut":
                        status = e015.LinkStatus.OFF
                    elif skr > 0 or self.store.available_bits(link_id) > 0:
                        status = e015.LinkStatus.ACTIVE
                    else:
                        status = e015.LinkStatus.PENDING
                    self.node_state.set_link_status(link_id, status, "the QKD device reports the fibre cut"
                                                    if status is e015.LinkStatus.OFF else None)
                except Exception:  # noqa: BLE001 — monitoring never stops the agent
                    log.exception("performance update of %s failed", link_id)

    # ------------------------------------------------------------------ control plane

    def _authenticate(self, a: NeedAuthentication) -> None:
        fingerprint = self._fingerprints.get(a.sae)
        try:
            result = self.control.authenticate(a.sae, fingerprint=fingerprint, interface=a.interface)
        except Exception as exc:  # noqa: BLE001
            log.warning("authentication of %s failed: %s", a.sae, exc)
            self._call(self.logic.authentication_failed, a.ksid, "access control unreachable", self.clock())
            return
        if result.ok:
            self._users[a.ksid] = result.user
            self._call(self.logic.authenticated, a.ksid, result.user, self.clock())
        else:
            self._call(self.logic.authentication_failed, a.ksid, result.reason, self.clock())

    def _admit(self, a: NeedAdmission) -> None:
        req = AdmissionRequest(ksid=a.ksid, interface=a.interface, user=a.user, requesting_node=self.name,
                               local_sae=a.local_sae, source_sae=a.source_sae, destination_sae=a.destination_sae,
                               qos=a.qos.to_json())
        try:
            result = self.control.admit(req)
        except Exception as exc:  # noqa: BLE001
            log.warning("admission of %s failed: %s", a.ksid, exc)
            result = AdmissionResult(int(Status.NO_QKD_CONNECTION), reason="admission control unreachable")
        if result.hops is not None:
            self._hops[a.ksid] = result.hops
            self.journal.update(a.ksid, hops=result.hops)
        if result.status == 0 and isinstance(self.control, LocalControlPlane):
            route = self.control.sessions().get(a.ksid)
            if route is not None:  # this node is the session's admission authority
                self.journal.update(a.ksid, route=route)
        if result.status == int(Status.PEER_NOT_CONNECTED):
            # The peer has not opened yet; the session stays user_accepted (the OPEN_CONNECT call has
            # its answer 1 from the logic at its Timeout) until admission configures it or it times out.
            self._emit_raw("admission_pending", a.ksid, reason=result.reason)
            return
        if result.status != 0:
            counter = QoS.from_json(result.qos) if result.qos else None
            self._call(self.logic.admission_rejected, a.ksid, result.status, self.clock(), result.reason, counter)

    # The control plane configures sessions through RESTCONF (ours and the other agents').
    def configure(self, config: WireConfig) -> None:
        prev_hop = self._by_qkdn.get(config.prev_hop) if config.prev_hop else None
        next_hop = self._by_qkdn.get(config.next_hop) if config.next_hop else None
        for hop, raw in ((prev_hop, config.prev_hop), (next_hop, config.next_hop)):
            if raw and (hop is None or hop not in self._links):
                raise ConfigRejected(f"hop {raw} is not a neighbour of {self.name} on a physical link")
        with self._lock:
            existing = self.logic.session(config.ksid)
        restoring = self._restoring.get(config.ksid)
        if existing is not None:
            interface = existing.interface
        elif restoring is not None:
            interface = restoring["interface"]
        elif next_hop is None and prev_hop is not None:
            # A destination that no local OPEN_CONNECT awaits: the slave side of an ETSI 014 pair
            # (admission configures a 004 destination only after its application opened).
            interface = "014"
        else:
            interface = "004"  # an intermediate node: the interface does not matter there
        core = SessionConfig(
            ksid=config.ksid, priority=config.priority, bucket_rate_bps=float(config.bucket_rate_bps),
            bucket_size_bits=int(config.bucket_size_bits), inactivity_timeout_s=float(config.inactivity_timeout_s),
            prev_hop=prev_hop, next_hop=next_hop,
            link_prev=self._links[prev_hop].qkdl_id if prev_hop else None,
            link_next=self._links[next_hop].qkdl_id if next_hop else None,
            virt_link_id=config.virt_link_id, source_sae=config.source_sae,
            destination_sae=config.destination_sae, interface=interface)
        qos = QoS.from_json(restoring["qos"]) if restoring is not None and restoring.get("qos") else None
        try:
            self._call(self.logic.configure, core, self.clock(), qos=qos)
        except Exception as exc:  # noqa: BLE001 — the logic refuses configurations that do not fit
            raise ConfigRejected(f"configuration refused: {exc}") from None
        self._configured_at[config.ksid] = time.monotonic()
        with self._lock:
            session = self.logic.session(config.ksid)
        if interface != "014" and session is not None and session.is_live:
            self.journal.put(config.ksid, {
                "config": dataclasses.asdict(config), "interface": interface, "qos": session.qos.to_json(),
                "user": session.user or self._users.get(config.ksid),
                "hops": self._hops.get(config.ksid, restoring.get("hops") if restoring else None)})
            if not session.is_live:  # it ended meanwhile (_terminated may have run before the put)
                self.journal.remove(config.ksid)
        if interface == "014" and next_hop is None and prev_hop is not None:
            # Before any key of the session can arrive: its keys must stay deliverable across a restart.
            self.slave_sessions.add(config.ksid, config.source_sae, config.destination_sae,
                                    float(config.inactivity_timeout_s))

    def deconfigure(self, ksid: str) -> None:
        self._call(self.logic.deconfigure, ksid, self.clock())
        self.journal.remove(ksid)

    def _restore_sessions(self) -> None:
        """At start-up: the sessions configured before a restart are configured again, through
        the datastore (so the ETSI 015 view has them too), with their interface and QoS; an
        application that lets the key manager choose indices goes on after the last one used.
        Keys of sessions that nothing here can deliver any more are erased."""
        restored = 0
        for ksid, record in self.journal.items():
            created = False
            try:
                wire = WireConfig(**record["config"])
                app, link = etsi_from_config(wire, self._qkdn[self.name])
                route = record.get("route")
                if route is not None and not (isinstance(route, list) and len(route) > 1
                                              and all(n in self._qkdn for n in route)):
                    # The network file changed: the session comes back, its route is not adopted
                    # (its other hops end it by inactivity if it closes).
                    log.warning("session %s: saved route %r is not a path of this network", ksid, route)
                    route = None
                self._restoring[ksid] = record
                self.datastore.create(links=[link], apps=[app])
                created = True
                with self._lock:
                    session = self.logic.session(ksid)
                # The application's next automatic index: after the last key handed out on this side
                # (keys made for the peer's requests are not this application's).
                side = "source" if session.role.value == "source" else "destination"
                used = [info.index for info in self.store.list_session_keys(ksid) if side in info.delivered]
                self._call(self.logic.resume, ksid, self.clock(), next_index=max(used) + 1 if used else 0,
                           user=record.get("user"))
                if record.get("hops") is not None:
                    self._hops[ksid] = int(record["hops"])
                if record.get("user"):
                    self._users[ksid] = record["user"]
                if route is not None and isinstance(self.control, LocalControlPlane):
                    self.control.adopt(ksid, route, record.get("user"))
                restored += 1
            except Exception as exc:  # noqa: BLE001 — a session that cannot come back is dropped, not fatal
                log.warning("session %s not restored: %s", ksid, exc)
                if created:  # undo: neither half a session in the logic nor in the ETSI 015 view
                    try:
                        self.datastore.delete_application(ksid)
                        self.datastore.delete_link(virt_link_id(ksid))
                    except Exception:  # noqa: BLE001
                        log.exception("removing the half-restored session %s failed", ksid)
                self.journal.remove(ksid)
            finally:
                self._restoring.pop(ksid, None)
        self.restored_sessions = restored
        with self._lock:
            live = {s.ksid for s in self.logic.sessions()}
        keep = {k for k, _ in self.journal.items()} | {k for k, _ in self.slave_sessions.items()} | live
        dropped = self.store.drop_sessions_except(keep)
        if restored or dropped:
            log.info("%s: %d session(s) restored, keys of %d ended session(s) erased", self.name, restored, dropped)

    def _push_config(self, cfg: RouteConfig) -> None:
        """LocalControlPlane: configure one key manager on a route over its RESTCONF."""
        wire = WireConfig(
            ksid=cfg.ksid, priority=cfg.priority, bucket_rate_bps=cfg.bucket_rate_bps,
            bucket_size_bits=cfg.bucket_size_bits, inactivity_timeout_s=cfg.inactivity_timeout_s,
            prev_hop=self._qkdn[cfg.prev_hop] if cfg.prev_hop else None,
            next_hop=self._qkdn[cfg.next_hop] if cfg.next_hop else None,
            source_sae=cfg.source_sae, destination_sae=cfg.destination_sae, virt_link_id=virt_link_id(cfg.ksid),
            source_qkdn_id=self._qkdn[cfg.source_node], destination_qkdn_id=self._qkdn[cfg.destination_node])
        app, link = etsi_from_config(wire, self._qkdn[cfg.node])
        client = self._restconf(cfg.node)
        client.post_link(link)
        client.post_application(app)

    def _remove_config(self, node: str, ksid: str) -> None:
        from etsi015.restconf import RestconfError

        client = self._restconf(node)
        for remove, key in ((client.delete_application, ksid), (client.delete_link, virt_link_id(ksid))):
            try:
                remove(key)
            except RestconfError as exc:
                if exc.status != 404:  # already gone is fine
                    raise

    def _restconf(self, node: str):
        from etsi015.restconf import RestconfClient

        base = self.url if node == self.name else self.peers[node].url
        session = self.peers[node].session if node != self.name else self._self_session()
        return RestconfClient(base, session=session, timeout=RELAY_TIMEOUT_S)

    def _self_session(self) -> requests.Session:
        if not hasattr(self, "_own_session"):
            from qkdsdn.httpserver import https_session

            if self.insecure_dev:
                self._own_session = requests.Session()
                self._own_session.headers[DEV_IDENTITY_HEADER] = f"node:{self.name}"
            else:
                cert, key = self.pki.node(self.name)
                self._own_session = https_session(cert, key, self.pki.ca_cert)
        return self._own_session

    def _forward_control(self, node: str, path: str, body: dict) -> dict:
        return self.peers[node].post(path, body, timeout=RELAY_TIMEOUT_S + float(body.get("qos", {}).get(
            "Timeout") or 0) / 1000.0)

    def _terminated(self, a: Terminate) -> None:
        self._emit_raw("session_terminated", a.ksid, reason=a.reason)
        self.journal.remove(a.ksid)
        self._configured_at.pop(a.ksid, None)
        self._carried.discard(a.ksid)
        with self._lock:
            session = self.logic.session(a.ksid)
            # A session never configured here is gone from the logic already; its admission knew the source.
            admitted_for = self._admitting.pop(a.ksid, None)
        if a.notify_control:
            source = session.source_sae if session is not None else admitted_for
            self._pool.submit(self.control.closed, a.ksid, source, a.reason)

    # ------------------------------------------------------------------ key production (source)

    def _side(self, ksid: str) -> str:
        with self._lock:
            session = self.logic.session(ksid)
        return "source" if session is None or session.role.value == "source" else "destination"

    def _releaser(self, pool: str, bits: int) -> Callable[[], None]:
        """A one-shot release of ``bits`` claimed on ``pool``."""
        done = threading.Event()

        def release() -> None:
            if done.is_set():
                return
            done.set()
            with self._lock:
                left = self._claimed.get(pool, 0) - bits
                if left > 0:
                    self._claimed[pool] = left
                else:
                    self._claimed.pop(pool, None)
        return release

    def _settling(self, ksid: str) -> bool:
        return time.monotonic() - self._configured_at.get(ksid, -math.inf) < CONFIG_SETTLE_S

    def _produce(self, a: ProduceKey, release: Callable[[], None] = lambda: None) -> None:
        try:
            outcome = self._produce_once(a, release)
            wait = SETTLE_RETRY_S
            while (outcome[0] == "failed" and len(outcome) > 3 and outcome[3] and self._settling(a.ksid)
                   and not self._stopping.wait(wait)):
                self._emit_raw("relay_retry", a.ksid, index=a.index, reason=outcome[2])
                outcome = self._produce_once(a)
                wait = min(2 * wait, 0.8)
        except Exception:  # noqa: BLE001
            log.exception("producing key %d of %s failed", a.index, a.ksid)
            outcome = ("failed", int(Status.NO_QKD_CONNECTION), "internal error")
        finally:
            release()
            self._producing.pop((a.ksid, a.index), None)
        now = self.clock()
        if outcome[0] == "ready":
            self._carried.add(a.ksid)
            self._call(self.logic.key_ready, a.ksid, a.index, now)
        elif outcome[0] == "short":
            self._call(self.logic.key_material_short, a.ksid, a.index, outcome[1], now)
            self.workers.get(a.pool) and self.workers[a.pool].wake()
        else:
            self._call(self.logic.key_failed, a.ksid, a.index, now, outcome[1], outcome[2],
                       index_used=len(outcome) > 4 and outcome[4])
            if len(outcome) > 3 and outcome[3]:
                # 409: a key manager on the route does not carry the session (any more).
                self._route_broken(a.ksid, outcome[2])

    def _produce_once(self, a: ProduceKey, release: Callable[[], None] = lambda: None) -> tuple:
        link = self._links.get(a.next_hop)
        if link is None:
            return ("failed", int(Status.NO_QKD_CONNECTION), f"{a.next_hop} is not a neighbour")
        if self._has_key(a.ksid, a.index):
            # Made already (a fetch that crossed the production): the destination has it too.
            return ("ready",)
        role = "master" if link.master == self.name else "slave"
        needed = relay.link_key_bits_needed(a.bits)
        with self._lock:
            session = self.logic.session(a.ksid)
        if session is None:
            return ("failed", int(Status.NO_QKD_CONNECTION), "session gone")
        dest_app = self._apps.get(session.destination_sae)
        # A multicast member's key is the group's: one-time-padded even to a neighbour, since a
        # deliver names link key as the key and each member has its own link.
        adjacent = dest_app is not None and dest_app.node == a.next_hop and a.group is None
        msg_id = str(uuid.uuid4())
        group_key = None
        if a.group is not None:
            try:
                group_key = self.store.group_key(a.group, a.index, lambda: os.urandom(a.bits // 8))
            except AlreadyDelivered:
                return ("failed", int(Status.NO_QKD_CONNECTION), "the multicast key was delivered already")
            if len(group_key) * 8 != a.bits:
                return ("failed", int(Status.NO_QKD_CONNECTION), "the multicast key has another size")
        try:
            slices = self.store.take(link.qkdl_id, role, needed)
        except InsufficientKey:
            return ("short", needed)
        finally:
            release()
        me, dest = self._qkdn[self.name], self._qkdn[dest_app.node] if dest_app else None
        if adjacent:
            msg, payload = relay.seal_deliver(ksid=a.ksid, index=a.index, msg_id=msg_id, link=link.qkdl_id,
                                              source_node=me, destination_node=dest, key_bits=a.bits,
                                              slices=slices)
            path, hops = "/relay/v1/deliver", 0
        else:
            payload = relay.RelayPayload.generate(a.bits) if group_key is None else \
                relay.RelayPayload(group_key, os.urandom(relay.CONFIRM_KEY_BYTES))
            msg = relay.seal_forward(ksid=a.ksid, index=a.index, msg_id=msg_id, link=link.qkdl_id, hop=1,
                                     source_node=me, destination_node=dest, payload=payload, slices=slices,
                                     group=a.group)
            path, hops = "/relay/v1/forward", None
        self.workers.get(link.qkdl_id) and self.workers[link.qkdl_id].wake()
        try:
            answer = self.peers[a.next_hop].post(path, msg.to_dict())
            confirm = relay.ConfirmMessage.from_dict(answer["confirm"])
            relay.verify_confirm(confirm, payload)
        except PeerError as exc:
            status = int(Status.INSUFFICIENT_KEY) if exc.status == 503 else int(Status.NO_QKD_CONNECTION)
            self._emit_raw("relay_failed", a.ksid, index=a.index, status=exc.status, message=exc.message)
            return ("failed", status, exc.message, *relay_refusal(exc.status, exc.message))
        except (requests.RequestException, KeyError, relay.RelayError, ValueError) as exc:
            self._emit_raw("relay_failed", a.ksid, index=a.index, message=type(exc).__name__)
            return ("failed", int(Status.NO_QKD_CONNECTION), "relay failed")
        if hops is None:
            hops = int(answer.get("hops", 0))
        if a.group is not None:
            return ("ready",)  # the master's copy is the group's, stored before the relay
        self.store.put_session_key(a.ksid, a.index, payload.key, sides=(self._side(a.ksid),))
        self._remember_key(a.ksid, a.index, hops)
        return ("ready",)

    # ------------------------------------------------------------------ ETSI 014 slaves across restarts

    def _recover_slave_sessions(self) -> None:
        """At start-up: the keys stored for ETSI 014 slaves before a restart become deliverable again."""
        now = time.time()
        for ksid, record in self.slave_sessions.items():
            waiting = [info.index for info in self.store.list_session_keys(ksid)
                       if "destination" in info.sides and "destination" not in info.delivered
                       and info.state != "unconfirmed"]
            if not waiting:
                self.store.drop_session(ksid)
                self.slave_sessions.remove(ksid)
                continue
            self._orphans[ksid] = now + float(record["retain_s"])
            group = record.get("group")
            if group is not None:
                self._session_group[ksid] = group
            for index in waiting:
                self._register_key_id(ksid, index, record["destination_sae"])
            self._emit_raw("keys_recovered", ksid, count=len(waiting))

    def orphan_session(self, ksid: str) -> dict[str, Any] | None:
        """The stored SAEs of an ETSI 014 session from before a restart whose keys are still here."""
        with self._lock:
            live = ksid in self._orphans
        return self.slave_sessions.get(ksid) if live else None

    def forget_orphan_if_done(self, ksid: str) -> None:
        if not any("destination" not in info.delivered for info in self.store.list_session_keys(ksid)):
            self._drop_orphan(ksid)

    def _drop_orphan(self, ksid: str) -> None:
        with self._lock:
            self._orphans.pop(ksid, None)
            self._forget_key_ids(ksid)
        self.store.drop_session(ksid)
        self.slave_sessions.remove(ksid)

    def _expire_orphans(self, now: float) -> None:
        with self._lock:
            expired = [ksid for ksid, until in self._orphans.items() if until <= now]
            # A session configured here again owns its keys: the logic purges them, not this timer.
            for ksid in [k for k in expired if self.logic.session(k) is not None]:
                del self._orphans[ksid]
                expired.remove(ksid)
        for ksid in expired:
            self._drop_orphan(ksid)
            self._emit_raw("purged", ksid, reason="keys from before the restart were not fetched in time")

    def _route_broken(self, ksid: str, reason: str) -> None:
        """A key manager on the session's route no longer knows it (it restarted, or dropped it):
        end it here and tell admission control, so the route is released everywhere and the
        next ETSI 014 call of the pair opens a new session (004 applications get status 4).
        Only a route that carried keys before counts as broken: a session's first key may meet
        a key manager that is still being configured (a controller configures them in any order)."""
        with self._lock:
            session = self.logic.session(ksid)
        if session is None or not session.is_live or (ksid not in self._carried
                                                      and not self.store.list_session_keys(ksid)):
            return
        self._emit_raw("route_broken", ksid, reason=reason)
        self._call(self.logic.deconfigure, ksid, self.clock())
        self._pool.submit(self.control.closed, ksid, session.source_sae, "route broken")

    def _has_key(self, ksid: str, index: int) -> bool:
        return self.store.session_key_info(ksid, index) is not None

    def _remember_key(self, ksid: str, index: int, hops: int, group: str | None = None) -> None:
        with self._lock:
            self._key_meta[(ksid, index)] = (time.time(), hops)
            session = self.logic.session(ksid)
            if group is not None:
                self._session_group[ksid] = group
            self._register_key_id(ksid, index, session.destination_sae if session is not None else None)
        if group is not None:
            self.slave_sessions.set_group(ksid, group)

    def route_estimate(self, master_sae: str, slave_sae: str, slave_node: str) -> tuple[str | None, int | None]:
        """First hop and trusted nodes between this key manager and ``slave_node`` for ETSI 014
        status: the live session of the pair's route if there is one (whoever configured it,
        the local admission or the controller), else the shortest path over the physical links
        of the network file, which is what admission picks when no link is down or full."""
        with self._lock:
            ksid = self.logic.session_for_pair(master_sae, slave_sae)
            entry = self.logic.forwarding.get(ksid) if ksid is not None else None
            hops = self._hops.get(ksid) if ksid is not None else None
        if entry is not None and entry.next_hop is not None and hops is not None:
            return entry.next_hop, hops
        route = shortest_route(self._graph, self.name, slave_node)
        if not route or len(route) < 2:
            return (entry.next_hop if entry is not None else None), None
        return (entry.next_hop if entry is not None and entry.next_hop else route[1]), len(route) - 2

    def key_id_of(self, ksid: str, index: int) -> str:
        """The ETSI 014 key_ID of key ``index`` of a session (of its group for a multicast member)."""
        return key_id_for(self._session_group.get(ksid, ksid), index)

    def resolve_key_id(self, key_id: str, slave_sae: str) -> tuple[str, int] | None:
        """(ksid, index) that a dec_keys of ``slave_sae`` names with ``key_id``: its own copy of a
        multicast key first; else whatever session holds that key_ID here (the logic answers 401
        when that is another SAE's)."""
        kid = key_id.lower()
        with self._lock:
            own = self._member_key_ids.get((kid, slave_sae))
            if own is not None:
                return own
            found = self._key_ids.get(kid)
            group = self._session_group.get(found[0]) if found is not None else None
            if group is not None and slave_sae in self._group_slaves.get(group, ()):
                return None  # a slave of the group whose own copy is gone (delivered): not found
            return found

    def _register_key_id(self, ksid: str, index: int, destination_sae: str | None) -> None:
        kid = self.key_id_of(ksid, index)
        self._key_ids[kid] = (ksid, index)
        if ksid in self._session_group and destination_sae is not None:
            self._member_key_ids[(kid, destination_sae)] = (ksid, index)
            self._group_slaves.setdefault(self._session_group[ksid], set()).add(destination_sae)

    def _forget_key_ids(self, ksid: str) -> None:
        """Under self._lock: the session's keys are gone."""
        for kid in [kid for kid, v in self._key_ids.items() if v[0] == ksid]:
            del self._key_ids[kid]
        for k in [k for k, v in self._member_key_ids.items() if v[0] == ksid]:
            del self._member_key_ids[k]
        group = self._session_group.pop(ksid, None)
        if group is not None and group not in self._session_group.values():
            self._group_slaves.pop(group, None)

    def _fetch(self, a: FetchFromSource) -> None:
        wait = SETTLE_RETRY_S
        while True:
            try:
                self.peers[a.prev_hop].post("/relay/v1/fetch", {"ksid": a.ksid, "index": a.index})
                self._carried.add(a.ksid)
                return
            except PeerError as exc:
                if relay_refusal(exc.status, exc.message)[0] and self._settling(a.ksid) \
                        and not self._stopping.wait(wait):
                    wait = min(2 * wait, 0.8)  # a hop towards the source is not configured yet
                    continue
                failure: Exception = exc
            except requests.RequestException as exc:
                failure = exc
            break
        busy = isinstance(failure, PeerError) and failure.status == 503
        status = int(Status.INSUFFICIENT_KEY if busy else Status.NO_QKD_CONNECTION)
        self._call(self.logic.key_failed, a.ksid, a.index, self.clock(), status, f"fetch failed: {failure}")
        if isinstance(failure, PeerError) and relay_refusal(failure.status, failure.message)[0]:
            self._route_broken(a.ksid, failure.message)

    def _answer_peer(self, a: AnswerPeer) -> None:
        with self._lock:
            entry = self.logic.forwarding.get(a.ksid)
        if entry is None or entry.next_hop is None:
            return
        try:
            self.peers[entry.next_hop].post("/relay/v1/answer",
                                            {"ksid": a.ksid, "index": a.index, "status": int(a.status)})
        except (PeerError, requests.RequestException) as exc:
            log.warning("answer for %s/%d not delivered: %s", a.ksid, a.index, exc)

    # ------------------------------------------------------------------ HTTP

    def _make_app(self) -> Flask:
        app = Flask(f"qkdsdn-agent-{self.name}")
        app.config["MAX_CONTENT_LENGTH"] = 4 * 2 ** 20

        def authorize(environ: dict, method: str, path: str) -> bool:
            from agents.sdn_agent import AuthenticationRequired

            who = self.caller(environ)
            if who is None:
                raise AuthenticationRequired()
            if who.kind in ("controller", "operator"):
                return True
            # Without a controller, the admission authority (another agent) configures routes.
            return who.kind == "node" and isinstance(self.control, LocalControlPlane)

        app.register_blueprint(restconf_blueprint(self.node_state, self, authorize, datastore=self.datastore))
        from agents.api import register_application_apis, register_relay_api

        register_application_apis(app, self)
        register_relay_api(app, self)
        return app
