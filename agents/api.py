"""The agent's HTTP surface for applications (ETSI 014, ETSI 004) and for peer key managers (relay).

ETSI GS QKD 014 follows the spec's paths, schemas and error messages. ETSI GS
QKD 004 is an abstract interface; its JSON-over-HTTPS mapping is documented in
docs/etsi004-mapping.md. The relay channel's messages are in docs/relay.md and
docs/key-management.md.
"""
from __future__ import annotations

import base64
import json
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from flask import Flask, Response, request

from agents import relay
from agents.control import AdmissionRequest, LocalControlPlane
from agents.core.keymanager import DeliverKey, Reject, Reply, Wait, key_id_for, metadata_json
from agents.core.session import SETUP_STATES, QoS, Status
from agents.keystore import AlreadyDelivered, InsufficientKey, KeyRefError, ReplayedMessage, SessionKeyConflict
from agents.linkkeys import LinkKeyProtocolError

if TYPE_CHECKING:
    from agents.service import KeyManagerAgent

log = logging.getLogger("qkdsdn.agent.api")

# ETSI GS QKD 014 fixed 400 messages.
SIZE_NOT_MULTIPLE_OF_8 = "size shall be a multiple of 8"
EXT_MANDATORY_UNSUPPORTED = "not all extension_mandatory parameters are supported"
KEYS_NOT_FOUND = "one or more keys specified are not found on KME"
DEFAULT_KEY_SIZE = 256
MIN_KEY_SIZE, MAX_KEY_SIZE = 64, 8192
ANSWER_TIMEOUT_S = 60.0


def _json(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, mimetype="application/json")


def _error(status: int, message: str, details: list | None = None) -> Response:
    if status == 401:
        return Response(status=401)  # ETSI 014: 401 carries no body
    body: dict[str, Any] = {"message": message}
    if details:
        body["details"] = details
    return _json(body, status)


def _body() -> dict | None:
    if not request.data:
        return {}
    try:
        raw = json.loads(request.data)
    except ValueError:
        return None
    return raw if isinstance(raw, dict) else None


def _deadline(decision: Any, now: float) -> float:
    for action in decision.actions:
        if isinstance(action, Wait) and action.call_id == decision.call_id:
            return max(action.deadline - now, 0.0)
    return ANSWER_TIMEOUT_S


def register_application_apis(app: Flask, km: "KeyManagerAgent") -> None:
    dec_lock = threading.Lock()  # dec_keys: check-then-read of several keys without interleaving

    def sae_caller() -> str | None:
        who = km.caller(request.environ)
        if who is None or who.kind != "sae":
            return None
        if who.fingerprint:
            km._fingerprints[who.name] = who.fingerprint
        return who.name

    def read_keys(answer: DeliverKey, side: str) -> list[tuple[int, bytes]] | Response:
        # One transaction for all the keys of the call: all handed out, or none.
        try:
            data = km.store.get_session_keys(answer.ksid, answer.indices, side)
        except AlreadyDelivered as exc:
            return _error(409, f"key index {getattr(exc, 'index', '?')} of this Key_stream_ID was already delivered")
        if data is None:
            return _error(503, "key not available")
        # Statistics of the ETSI 015 application(s): a multicast key counts for every member session.
        with km._lock:
            apps = list(km.logic.group_members(answer.ksid).values()) or [answer.ksid]
        bits = sum(8 * len(key) for key in data)
        for app_id in apps:
            if _known_app(app_id):
                km.node_state.record_consumption(app_id, bits)
        return list(zip(answer.indices, data))

    def _known_app(ksid: str) -> bool:
        try:
            km.node_state.application(ksid)
            return True
        except KeyError:
            return False

    # ---------------------------------------------------------------- ETSI GS QKD 014

    def local_app(sae: str) -> bool:
        a = km._apps.get(sae)
        return a is not None and a.node == km.name

    @app.get("/api/v1/keys/<slave>/status")
    def status(slave: str) -> Response:
        master = sae_caller()
        if master is None or not local_app(master):
            return _error(401, "")
        target = km._apps.get(slave)
        if target is None or slave == master:
            return _error(400, f"unknown slave SAE '{slave}'")
        first_hop, hops = km.route_estimate(master, slave, target.node)
        first = km._links.get(first_hop) if first_hop is not None else None
        needed = relay.link_key_bits_needed(DEFAULT_KEY_SIZE)
        stored = max_count = 0
        if first is not None:
            role = "master" if first.master == km.name else "slave"
            stored = km.store.available_bits(first.qkdl_id, role) // needed
            max_count = km.store.pool_max_bits // 2 // needed
        return _json({
            "source_KME_ID": km.name, "target_KME_ID": target.node, "master_SAE_ID": master,
            "slave_SAE_ID": slave, "key_size": DEFAULT_KEY_SIZE, "stored_key_count": stored,
            "max_key_count": max_count, "max_key_per_request": km.logic.max_keys_per_request,
            "max_key_size": MAX_KEY_SIZE, "min_key_size": MIN_KEY_SIZE,
            "max_SAE_ID_count": km.logic.max_additional_slaves,
            "status_extension": {"qkdsdn_route_hops": hops}})

    @app.route("/api/v1/keys/<slave>/enc_keys", methods=["GET", "POST"])
    def enc_keys(slave: str) -> Response:
        master = sae_caller()
        if master is None or not local_app(master):
            return _error(401, "")
        if request.method == "POST":
            body = _body()
            if body is None:
                return _error(400, "the request body is not a JSON object")
            unknown = set(body) - {"number", "size", "additional_slave_SAE_IDs", "extension_mandatory",
                                   "extension_optional"}
            if unknown:
                return _error(400, f"unknown member(s): {', '.join(sorted(unknown))}")
            if body.get("extension_mandatory"):
                return _error(400, EXT_MANDATORY_UNSUPPORTED)
            extra = body.get("additional_slave_SAE_IDs", [])
            if not isinstance(extra, list) or not all(isinstance(x, str) for x in extra):
                return _error(400, "additional_slave_SAE_IDs must be an array of SAE IDs")
            unknown_sae = [x for x in extra if x not in km._apps]
            if unknown_sae:
                return _error(400, f"unknown slave SAE '{unknown_sae[0]}'")
            number, size = body.get("number", 1), body.get("size", DEFAULT_KEY_SIZE)
        else:
            extra = []
            try:
                number = int(request.args.get("number", 1))
                size = int(request.args.get("size", DEFAULT_KEY_SIZE))
            except ValueError:
                return _error(400, "number and size must be integers")
        if not isinstance(number, int) or isinstance(number, bool) or not isinstance(size, int) \
                or isinstance(size, bool):
            return _error(400, "number and size must be integers")
        if size % 8:
            return _error(400, SIZE_NOT_MULTIPLE_OF_8)
        if not MIN_KEY_SIZE <= size <= MAX_KEY_SIZE:
            return _error(400, f"size must be between {MIN_KEY_SIZE} and {MAX_KEY_SIZE}")
        if slave not in km._apps or slave == master:
            return _error(400, f"unknown slave SAE '{slave}'")
        now = km.clock()
        decision = km._start_call(km.logic.enc_keys, master, slave, number, size, now, extra)
        answer = km._await(decision, _deadline(decision, now))
        if isinstance(answer, DeliverKey):
            keys = read_keys(answer, "source")
            if isinstance(keys, Response):
                return keys
            return _json({"keys": [{"key_ID": key_id_for(answer.ksid, i), "key": base64.b64encode(d).decode()}
                                   for i, d in keys]})
        return _answer_014(answer)

    @app.route("/api/v1/keys/<master>/dec_keys", methods=["GET", "POST"])
    def dec_keys(master: str) -> Response:
        slave = sae_caller()
        if slave is None or not local_app(slave):
            return _error(401, "")
        if request.method == "POST":
            body = _body()
            if body is None or not isinstance(body.get("key_IDs"), list) or not body["key_IDs"]:
                return _error(400, "key_IDs must be a non-empty list")
            if body.get("key_IDs_extension"):
                return _error(400, EXT_MANDATORY_UNSUPPORTED)
            try:
                ids = [str(k["key_ID"]) for k in body["key_IDs"]]
            except (TypeError, KeyError):
                return _error(400, "every entry of key_IDs needs a key_ID")
        else:
            ids = request.args.getlist("key_ID")
            if len(ids) != 1:
                return _error(400, "GET dec_keys takes exactly one key_ID")
        found = [km.resolve_key_id(k, slave) for k in ids]
        if any(f is None for f in found) or len({f[0] for f in found}) != 1:
            return _error(400, KEYS_NOT_FOUND)
        if len(set(found)) != len(found):
            return _error(400, "key_IDs names a key more than once")
        ksid = found[0][0]
        with km._lock:
            session = km.logic.session(ksid)
        indices = [i for _, i in found]
        if session is None:
            orphan = km.orphan_session(ksid)
            if orphan is not None and orphan["source_sae"] == master:
                return recovered_keys(ksid, orphan, slave, indices)
        if session is None or session.source_sae != master:
            return _error(400, KEYS_NOT_FOUND)
        # All or nothing: the keys are checked, then read, with no other dec_keys in between, so a
        # request naming one key already delivered consumes none of the others.
        with dec_lock:
            held = km.store.session_key_infos(ksid, indices)
            have = all(i in held and held[i].state != "unconfirmed" and "destination" in held[i].sides
                       and "destination" not in held[i].delivered for i in indices)
            now = km.clock()
            decision = km._start_call(km.logic.dec_keys, slave, ksid, indices, now, have)
            answer = km._await(decision, _deadline(decision, now))
            if isinstance(answer, DeliverKey):
                keys = read_keys(answer, "destination")
                if isinstance(keys, Response):
                    return _error(400, KEYS_NOT_FOUND) if keys.status_code == 409 else keys
                return _json({"keys": [{"key_ID": km.key_id_of(ksid, i), "key": base64.b64encode(d).decode()}
                                       for i, d in keys]})
        return _answer_014(answer)

    def recovered_keys(ksid: str, record: dict, slave: str, indices: list[int]) -> Response:
        """dec_keys of keys stored before this agent restarted (its session is gone from the logic):
        the same checks the logic makes, against the session's SAEs kept on disk."""
        if record["destination_sae"] != slave:
            return _error(401, "")
        with dec_lock:
            held = km.store.session_key_infos(ksid, indices)
            if not all(i in held and held[i].state != "unconfirmed" and "destination" not in held[i].delivered
                       for i in indices):
                return _error(400, KEYS_NOT_FOUND)
            try:
                data = km.store.get_session_keys(ksid, indices, "destination")
            except AlreadyDelivered:
                data = None
            if data is None:
                return _error(400, KEYS_NOT_FOUND)
            out = list(zip(indices, data))
        km._emit_raw("key_returned", ksid, call="dec_keys", count=len(out), recovered=True)
        answer = _json({"keys": [{"key_ID": km.key_id_of(ksid, i), "key": base64.b64encode(d).decode()}
                                 for i, d in out]})
        km.forget_orphan_if_done(ksid)
        return answer

    # ---------------------------------------------------------------- ETSI GS QKD 004 (docs/etsi004-mapping.md)

    def call_004(members: set[str]) -> tuple[str, dict] | Response:
        """The calling application and its JSON body, or the error answer (401, 400)."""
        caller = sae_caller()
        if caller is None or not local_app(caller):
            return _error(401, "")
        body = _body()
        if body is None:
            return _error(400, "the request body is not a JSON object")
        unknown = set(body) - members
        if unknown:
            return _error(400, f"unknown member(s): {', '.join(sorted(unknown))}")
        return caller, body

    @app.post("/api/v1/qkd004/open_connect")
    def open_connect() -> Response:
        parsed = call_004({"source", "destination", "QoS", "Key_stream_ID"})
        if isinstance(parsed, Response):
            return parsed
        caller, body = parsed
        try:
            qos = QoS.from_json(body["QoS"]) if body.get("QoS") is not None else None
        except (ValueError, TypeError) as exc:
            return _error(400, f"QoS: {exc}")
        now = km.clock()
        decision = km._start_call(km.logic.open_connect, body.get("source"), body.get("destination"), qos,
                                  body.get("Key_stream_ID"), caller, now)
        answer = km._await(decision, _deadline(decision, now))
        if isinstance(answer, Reject):
            return _error(answer.http_status, answer.message)
        if answer is None:
            return _json({"status": int(Status.TIMEOUT), "Key_stream_ID": body.get("Key_stream_ID")})
        out: dict[str, Any] = {"status": int(answer.status), "Key_stream_ID": answer.ksid}
        if answer.qos is not None:
            out["QoS"] = answer.qos.to_json()
        if answer.message and answer.status:
            out["message"] = answer.message
        return _json(out)

    @app.post("/api/v1/qkd004/get_key")
    def get_key() -> Response:
        parsed = call_004({"Key_stream_ID", "index", "Metadata_size"})
        if isinstance(parsed, Response):
            return parsed
        caller, body = parsed
        ksid = body.get("Key_stream_ID")
        side_of = km._side
        now = km.clock()

        def have_key(index: int) -> bool:
            if not isinstance(ksid, str):
                return False
            info = km.store.session_key_info(ksid, index)
            return info is not None and info.state != "unconfirmed" and side_of(ksid) not in info.delivered

        index = body.get("index")
        if isinstance(ksid, str) and isinstance(index, int) and not isinstance(index, bool):
            with km._lock:
                session = km.logic.session(ksid)
            if session is not None and session.local_sae == caller and session.interface == "004":
                side = km._side(session.ksid)
                info = km.store.session_key_info(session.ksid, index)
                if info is not None and side in info.delivered:
                    # Answered here: the logic would ask for the key again (the source, or the
                    # destination through the source) and the call would wait for its Timeout.
                    return _error(409, f"key index {index} of this Key_stream_ID was already delivered")
        decision = km._start_call(km.logic.get_key, ksid, body.get("index"), caller, now, have_key,
                                  metadata_size=body.get("Metadata_size"))
        answer = km._await(decision, _deadline(decision, now))
        if isinstance(answer, Reject):
            return _error(answer.http_status, answer.message)
        if answer is None:
            return _json({"status": int(Status.TIMEOUT), "Key_stream_ID": ksid})
        if isinstance(answer, DeliverKey):
            keys = read_keys(answer, km._side(answer.ksid))
            if isinstance(keys, Response):
                return keys
            (index, data), = keys
            stored_at, hops = km._key_meta.get((answer.ksid, index), (time.time(), km._hops.get(answer.ksid, 0)))
            metadata = metadata_json(int(max(time.time() - stored_at, 0) * 1000), hops)
            out = {"status": 0, "Key_stream_ID": answer.ksid, "index": index,
                   "Key_buffer": base64.b64encode(data).decode()}
            with km._lock:
                qos = km.logic.offered_qos(answer.ksid)
            # Metadata for a session that asked for it (its Metadata_mimetype), into a buffer it gave.
            if body.get("Metadata_size") and (qos is None or qos.wants_metadata):
                out["Metadata"] = {"Metadata_size": len(metadata.encode()), "Metadata_buffer": metadata,
                                   "Metadata_mimetype": "application/json"}
            return _json(out)
        out = {"status": int(answer.status), "Key_stream_ID": answer.ksid or ksid}
        if answer.index is not None:
            out["index"] = answer.index
        if answer.metadata_size is not None:
            out["Metadata"] = {"Metadata_size": answer.metadata_size}
        if answer.retry_after is not None:
            out["retry_after"] = round(answer.retry_after, 3)
        if answer.message and answer.status:
            out["message"] = answer.message
        return _json(out)

    @app.post("/api/v1/qkd004/close")
    def close() -> Response:
        parsed = call_004({"Key_stream_ID"})
        if isinstance(parsed, Response):
            return parsed
        caller, body = parsed
        now = km.clock()
        decision = km._start_call(km.logic.close, body.get("Key_stream_ID"), caller, now)
        answer = km._await(decision, _deadline(decision, now))
        if isinstance(answer, Reject):
            return _error(answer.http_status, answer.message)
        return _json({"status": int(answer.status) if answer is not None else int(Status.TIMEOUT),
                      "Key_stream_ID": body.get("Key_stream_ID")})


def _answer_014(answer: Any) -> Response:
    if isinstance(answer, Reject):
        return _error(answer.http_status, answer.message)
    if answer is None:
        return _error(503, "timeout waiting for key material")
    if isinstance(answer, Reply):
        if answer.status == Status.QOS_NOT_MET and answer.message:
            return _error(400, answer.message)
        return _error(503, answer.message or Status(answer.status).meaning)
    return _error(503, "key not available")


def register_relay_api(app: Flask, km: "KeyManagerAgent") -> None:
    def neighbour(link_id: str) -> str | None:
        """The calling key manager, if it is this node's neighbour on ``link_id``."""
        who = km.caller(request.environ)
        if who is None or who.kind != "node":
            return None
        link = km._links.get(who.name)
        return who.name if link is not None and link.qkdl_id == link_id else None

    def any_node() -> str | None:
        who = km.caller(request.environ)
        return who.name if who is not None and who.kind == "node" else None

    def rejected(kind: str, status: int, message: str, ksid: str | None = None, **details: Any) -> Response:
        km._emit_raw("relay_rejected", ksid, message_kind=kind, reason=message, **details)
        return _error(status, message)

    def not_ready(ksid: str) -> Response | None:
        """503 for a session this key manager has opened but not been configured for yet: the
        other end was configured first (admission configures one key manager after the other) and
        its application called at once. The sender answers status 2; a retry finds it ready."""
        with km._lock:
            session = km.logic.session(ksid)
            setting_up = session is not None and session.state in SETUP_STATES
        return _error(503, "the session is not configured at this key manager yet") if setting_up else None

    @app.post("/relay/v1/link_keys")
    def link_keys() -> Response:
        body = _body()
        if body is None or not isinstance(body.get("link"), str):
            return _error(400, "malformed link_keys message")
        if neighbour(body["link"]) is None:
            return _error(403, "only the link's other key manager may send its key IDs")
        worker = km.workers.get(body["link"])
        if worker is None or worker.role != "slave":
            return _error(400, "this key manager is not the slave end of that link")
        try:
            answer = worker.handle_link_keys(body)
        except LinkKeyProtocolError as exc:
            return _error(400, str(exc))
        except Exception as exc:  # noqa: BLE001 — the device failed: the master keeps the keys pending
            log.warning("link_keys on %s: device error %s", body["link"], exc)
            return _error(503, "the QKD device did not deliver the keys")
        km._wake.set()
        return _json(answer)

    def receive(kind: str, parse: Callable[[Any], Any], open_fn: Callable[[Any, bytes], relay.RelayPayload],
                batch: bool = False):
        """A forward or deliver message, or (``batch``) a RelayBatch of them: several keys of one
        session on one link, verified, consumed and stored in one transaction each."""
        body = _body()
        if body is None:
            return _error(400, "the body is not a JSON object")
        try:
            msg = parse(body)
        except relay.RelayFormatError as exc:
            return rejected(kind, 400, str(exc))
        msgs = list(msg.messages) if batch else [msg]
        first = msgs[0]
        sender = neighbour(first.link)
        if sender is None:
            return rejected(kind, 403, "the sender is not this node's neighbour on that link", first.ksid)
        # The tag is checked and the named link key consumed before the session is looked up: the
        # sender spent those bytes when it sent an authentic message, so this end discards them too
        # even when it cannot take the message (no such session here any more, e.g. after a restart)
        # and both ends of the link stay in step. A forged, altered or replayed message consumes
        # nothing: tag checks, msg_id records and consumption are one transaction (for a batch: one
        # bad message and the whole batch is refused, nothing consumed).
        opened: list[relay.RelayPayload] = []

        def verify(data: bytes) -> None:
            parts = msg.split(data) if batch else [data]
            opened[:] = [open_fn(m, d) for m, d in zip(msgs, parts)]

        try:
            km.store.consume_refs(first.link, msg.consumed_refs(), verify=verify,
                                  msg_id=[m.msg_id for m in msgs], now=time.time())
        except relay.RelayAuthError:
            return rejected(kind, 400, "authentication tag does not verify", first.ksid, link=first.link)
        except ReplayedMessage:
            return rejected(kind, 400, "replayed message", first.ksid, link=first.link)
        except KeyRefError as exc:
            return rejected(kind, 400, f"link key references rejected: {exc}", first.ksid, link=first.link)
        with km._lock:
            route = km.logic.route_relay(first.ksid, sender, km.clock())
        if not route.accept:
            return not_ready(first.ksid) or rejected(kind, 409, route.reason, first.ksid)
        group = getattr(first, "group", None)
        if route.local:
            hops = (first.hop - 1) if kind == "forward" else 0
            known_group = km._session_group.get(first.ksid)
            if known_group is not None and group != known_group:
                return rejected(kind, 409, relay.GROUP_CONFLICT, first.ksid)
            if group is not None:
                km.slave_sessions.set_group(first.ksid, group)  # on disk before the key: key_IDs after a restart
            try:
                km.store.put_session_keys(first.ksid, [(m.index, p.key) for m, p in zip(msgs, opened)],
                                          sides=("destination",))
            except SessionKeyConflict:
                return rejected(kind, 409, relay.KEY_CONFLICT, first.ksid)
            confirms = []
            for m, payload in zip(msgs, opened):
                km._remember_key(m.ksid, m.index, hops, group=group)
                confirms.append(relay.seal_confirm(ksid=m.ksid, index=m.index, msg_id=m.msg_id,
                                                   source_node=m.source_node, destination_node=m.destination_node,
                                                   payload=payload).to_dict())
            km._hops[first.ksid] = hops
            for m in msgs:
                km._emit_raw("relay_received", m.ksid, index=m.index, hops=hops)
                km._call(km.logic.key_ready, m.ksid, m.index, km.clock())
            if batch:
                return _json({"confirms": confirms, "hops": hops})
            return _json({"confirm": confirms[0], "hops": hops})
        # Trusted node: decrypt with the previous link's key, re-encrypt with the next one's (one
        # take for all the keys of a batch).
        next_link = km._links.get(route.node)
        role = "master" if next_link.master == km.name else "slave"
        sizes = [relay.link_key_bits_needed(p.key_bits) // 8 for p in opened]
        try:
            slices = km.store.take(next_link.qkdl_id, role, 8 * sum(sizes))
        except InsufficientKey:
            return _error(503, f"insufficient link key towards {route.node}")
        onward = [relay.seal_forward(ksid=m.ksid, index=m.index, msg_id=m.msg_id, link=next_link.qkdl_id,
                                     hop=m.hop + 1, source_node=m.source_node, destination_node=m.destination_node,
                                     payload=payload, slices=part, group=group)
                  for m, payload, part in zip(msgs, opened, relay.partition_slices(slices, sizes))]
        km.workers.get(next_link.qkdl_id) and km.workers[next_link.qkdl_id].wake()
        for m in msgs:
            km._emit_raw("relay_forwarded", m.ksid, index=m.index, to=route.node)
        try:
            if batch:
                return _json(km.peers[route.node].post("/relay/v1/forward_batch",
                                                       relay.RelayBatch(tuple(onward)).to_dict()))
            return _json(km.peers[route.node].post("/relay/v1/forward", onward[0].to_dict()))
        except Exception as exc:  # noqa: BLE001 — pass the failure back towards the source
            status = getattr(exc, "status", 502)
            return _error(status if status in (400, 409, 503) else 502, f"next hop {route.node}: {exc}")

    @app.post("/relay/v1/forward")
    def forward() -> Response:
        return receive("forward", relay.ForwardMessage.from_dict, relay.open_forward)

    @app.post("/relay/v1/deliver")
    def deliver() -> Response:
        return receive("deliver", relay.DeliverMessage.from_dict, relay.open_deliver)

    @app.post("/relay/v1/forward_batch")
    def forward_batch() -> Response:
        return receive("forward", lambda b: relay.RelayBatch.from_dict(b, "forward"), relay.open_forward, batch=True)

    @app.post("/relay/v1/deliver_batch")
    def deliver_batch() -> Response:
        return receive("deliver", lambda b: relay.RelayBatch.from_dict(b, "deliver"), relay.open_deliver, batch=True)

    def along(path: str, towards_source: bool) -> Response:
        body = _body()
        sender = any_node()
        if sender is None:
            return _error(403, "only key managers use the relay channel")
        if body is None or not isinstance(body.get("ksid"), str) or not isinstance(body.get("index"), int):
            return _error(400, "the body is {\"ksid\", \"index\"}")
        ksid, index = body["ksid"], body["index"]
        with km._lock:
            route = km.logic.route_relay(ksid, sender, km.clock())
        if not route.accept:
            return not_ready(ksid) or _error(409, route.reason)
        if route.local:
            now = km.clock()
            if towards_source:
                km._call(km.logic.peer_key_request, ksid, index, now)
            else:
                km._call(km.logic.key_failed, ksid, index, now, int(body.get("status", 4)), "source refused")
            return _json({"ok": True})
        try:
            return _json(km.peers[route.node].post(path, body))
        except Exception as exc:  # noqa: BLE001
            return _error(502, f"next hop {route.node}: {exc}")

    @app.post("/relay/v1/fetch")
    def fetch() -> Response:
        return along("/relay/v1/fetch", towards_source=True)

    @app.post("/relay/v1/answer")
    def answer() -> Response:
        return along("/relay/v1/answer", towards_source=False)

    @app.post("/relay/v1/control/admit")
    def control_admit() -> Response:
        if any_node() is None or not isinstance(km.control, LocalControlPlane):
            return _error(403, "admission requests come from key managers in local control mode")
        try:
            req = AdmissionRequest.from_json(_body())
        except ValueError as exc:
            return _error(400, str(exc))
        return _json(km.control.handle_admission(req).to_json())

    @app.post("/relay/v1/control/closed")
    def control_closed() -> Response:
        body = _body()
        if any_node() is None or not isinstance(km.control, LocalControlPlane):
            return _error(403, "close signals come from key managers in local control mode")
        if body is None or not isinstance(body.get("ksid"), str):
            return _error(400, "the body is {\"ksid\", \"reason\"}")
        km._pool.submit(km.control.handle_closed, body["ksid"], str(body.get("reason", "")))
        return _json({"ok": True})
