"""The source key manager's production of several keys of one call at once.

When the logic asks for several keys of one session on one route in one decision (an ETSI
014 ``enc_keys`` with ``number`` > 1), the shell makes them together: one ``take`` of link
key for all of them, one ``forward_batch`` / ``deliver_batch`` request to the next hop (each
key still its own message, sealed and tagged with its own one-time link key: docs/relay.md,
"Batches"), one transaction storing the confirmed keys. Made one by one, every key paid a
durable commit at both ends of every link, a relay request and a confirmation on its own,
and the keys of one call queued behind each other on the key stores' locks.

The outcome of every key is reported to the logic exactly as for a key made alone
(``key_ready``, ``key_material_short``, ``key_failed``): the logic does not know about
batches. Multicast keys (``group``) are made one by one.
"""
from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING, Callable, Iterable

import requests

from agents import relay
from agents.core.keymanager import ProduceKey
from agents.core.session import Status
from agents.keystore import InsufficientKey

if TYPE_CHECKING:
    from agents.service import KeyManagerAgent

log = logging.getLogger("qkdsdn.agent")


def group_productions(actions: Iterable[ProduceKey]) -> list[list[ProduceKey]]:
    """The productions of one decision, grouped into batches: same session, next hop, pool and
    key size, at most ``relay.MAX_BATCH`` keys each. A multicast key stays alone."""
    groups: dict[tuple, list[ProduceKey]] = {}
    seen: set[tuple[str, int]] = set()
    for a in actions:
        if (a.ksid, a.index) in seen:
            continue  # one production per key
        seen.add((a.ksid, a.index))
        key = ("single", a.ksid, a.index) if a.group is not None else (a.ksid, a.next_hop, a.pool, a.bits)
        groups.setdefault(key, []).append(a)
    out: list[list[ProduceKey]] = []
    for batch in groups.values():
        out += [batch[i:i + relay.MAX_BATCH] for i in range(0, len(batch), relay.MAX_BATCH)]
    return out


def produce_batch(km: "KeyManagerAgent", batch: list[ProduceKey], release: Callable[[], None] = lambda: None) -> None:
    """Make the keys of ``batch`` (one session, one next hop, one size) and report each.
    ``release`` frees the batch's claim on its pool once its link key is taken."""
    from agents.service import SETTLE_RETRY_S

    alone: list[ProduceKey] = []
    try:
        outcomes = _produce(km, batch, release)
        wait = SETTLE_RETRY_S
        # A hop that does not know the session yet (409) just after it was configured here: again.
        while outcomes is not None and _refused(outcomes) and km._settling(batch[0].ksid) \
                and not km._stopping.wait(wait):
            again = [a for a in batch if outcomes[a.index][0] != "ready"]
            km._emit_raw("relay_retry", batch[0].ksid, indices=[a.index for a in again],
                         reason=outcomes[again[0].index][2])
            more = _produce(km, again)
            if more is None:
                alone = again
                break
            outcomes.update(more)
            wait = min(2 * wait, 0.8)
        if outcomes is None:
            alone = batch
    except Exception:  # noqa: BLE001
        log.exception("producing keys %s of %s failed", [a.index for a in batch], batch[0].ksid)
        outcomes = {a.index: ("failed", int(Status.NO_QKD_CONNECTION), "internal error") for a in batch}
    finally:
        release()
        for a in batch:
            km._producing.pop((a.ksid, a.index), None)
    if alone:
        # The pool holds less than the whole batch: one by one, so that those that fit are made
        # now and the others wait in the pool's queue (key_material_short), as alone.
        for a in alone:
            if (a.ksid, a.index) not in km._producing:
                km._submit_production([a])
        if alone is batch:
            return
        outcomes = {i: o for i, o in outcomes.items() if i not in {a.index for a in alone}}
    now = km.clock()
    broken = None
    for a in batch:
        outcome = outcomes.get(a.index)
        if outcome is None:
            continue  # made alone now
        if outcome[0] == "ready":
            km._carried.add(a.ksid)
            km._call(km.logic.key_ready, a.ksid, a.index, now)
        else:
            km._call(km.logic.key_failed, a.ksid, a.index, now, outcome[1], outcome[2],
                     index_used=len(outcome) > 4 and outcome[4])
            if len(outcome) > 3 and outcome[3]:
                broken = outcome[2]
    if broken is not None:
        km._route_broken(batch[0].ksid, broken)  # 409: a key manager on the route lost the session


def _refused(outcomes: dict[int, tuple]) -> bool:
    """A hop answered 409 (it does not know the session) for some key."""
    return any(o[0] == "failed" and len(o) > 3 and o[3] for o in outcomes.values())


def _produce(km: "KeyManagerAgent", batch: list[ProduceKey],
             release: Callable[[], None] = lambda: None) -> dict[int, tuple] | None:
    """Outcome per index (as ``KeyManagerAgent._produce_once``), or None: not enough link key
    for the whole batch (nothing taken)."""
    a0 = batch[0]
    ksid, next_hop, bits = a0.ksid, a0.next_hop, a0.bits
    link = km._links.get(next_hop)
    if link is None:
        return {a.index: ("failed", int(Status.NO_QKD_CONNECTION), f"{next_hop} is not a neighbour") for a in batch}
    outcomes: dict[int, tuple] = {}
    held = km.store.session_key_infos(ksid, [a.index for a in batch])
    for a in batch:
        if a.index in held:
            outcomes[a.index] = ("ready",)  # made already (a fetch that crossed the production)
    todo = [a for a in batch if a.index not in outcomes]
    if not todo:
        return outcomes
    with km._lock:
        session = km.logic.session(ksid)
    if session is None:
        return {a.index: ("failed", int(Status.NO_QKD_CONNECTION), "session gone") for a in batch}
    role = "master" if link.master == km.name else "slave"
    needed = relay.link_key_bits_needed(bits)
    dest_app = km._apps.get(session.destination_sae)
    adjacent = dest_app is not None and dest_app.node == next_hop
    try:
        slices = km.store.take(link.qkdl_id, role, needed * len(todo))
    except InsufficientKey:
        return None
    finally:
        release()
    me, dest = km._qkdn[km.name], km._qkdn[dest_app.node] if dest_app else None
    sent: list[tuple[ProduceKey, object, relay.RelayPayload]] = []
    for a, part in zip(todo, relay.partition_slices(slices, [needed // 8] * len(todo))):
        common = dict(ksid=ksid, index=a.index, msg_id=str(uuid.uuid4()), link=link.qkdl_id, source_node=me,
                      destination_node=dest, slices=part)
        if adjacent:
            msg, payload = relay.seal_deliver(key_bits=bits, **common)
        else:
            payload = relay.RelayPayload.generate(bits)
            msg = relay.seal_forward(hop=1, payload=payload, **common)
        sent.append((a, msg, payload))
    km.workers.get(link.qkdl_id) and km.workers[link.qkdl_id].wake()
    path = "/relay/v1/deliver_batch" if adjacent else "/relay/v1/forward_batch"
    made: list[tuple[int, bytes]] = []
    hops = 0
    for chunk in _chunks(sent):
        try:
            answer = km.peers[next_hop].post(path, relay.RelayBatch(tuple(m for _, m, _ in chunk)).to_dict())
            confirms = answer["confirms"]
            if not isinstance(confirms, list) or len(confirms) != len(chunk):
                raise ValueError("the answer does not confirm every key of the batch")
            for (a, _, payload), confirm in zip(chunk, confirms):
                relay.verify_confirm(relay.ConfirmMessage.from_dict(confirm), payload)
        except Exception as exc:  # noqa: BLE001 — every key of the chunk failed, as alone
            from agents.service import PeerError, relay_refusal

            if isinstance(exc, PeerError):
                status = int(Status.INSUFFICIENT_KEY) if exc.status == 503 else int(Status.NO_QKD_CONNECTION)
                outcome: tuple = ("failed", status, exc.message, *relay_refusal(exc.status, exc.message))
                details = {"status": exc.status, "message": exc.message}
            elif isinstance(exc, (requests.RequestException, KeyError, TypeError, relay.RelayError, ValueError)):
                outcome, details = ("failed", int(Status.NO_QKD_CONNECTION), "relay failed"), \
                    {"message": type(exc).__name__}
            else:
                raise
            for a, _, _ in chunk:
                km._emit_raw("relay_failed", ksid, index=a.index, **details)
                outcomes[a.index] = outcome
            continue
        hops = 0 if adjacent else int(answer.get("hops", 0))
        made += [(a.index, payload.key) for a, _, payload in chunk]
    if made:
        km.store.put_session_keys(ksid, made, sides=(km._side(ksid),))
        for index, _ in made:
            km._remember_key(ksid, index, hops)
            outcomes[index] = ("ready",)
    return outcomes


def _chunks(sent: list) -> list[list]:
    """Consecutive chunks within the batch bounds of docs/relay.md (messages, link-key ranges)."""
    out: list[list] = []
    refs = 0
    for item in sent:
        n = len(item[1].consumed_refs())
        if out and len(out[-1]) < relay.MAX_BATCH and refs + n <= relay.MAX_BATCH_REFS:
            out[-1].append(item)
            refs += n
        else:
            out.append([item])
            refs = n
    return out
