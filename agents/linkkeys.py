"""Link-key pools: both ends of a physical link filled from its QKD device.

Protocol (``docs/key-management.md``, "Link-key pools"). The link's **master** KM
calls its device's ``enc_keys``, stores the keys as *pending* and posts their IDs
with an owner each to the **slave** KM::

    POST /relay/v1/link_keys   {"link": "<qkdl_id>", "keys": [{"key_ID": "...", "owner": "master"|"slave"}]}

The slave fetches them with ``dec_keys``, stores them as *available* and answers
``{"stored": [ids], "missing": [ids]}``; the master marks the stored ones
available and discards the missing ones. ``missing`` (an addition to the
documented answer) names IDs the slave's device does not hold (expired, or
fetched before a crash that lost them): the master drops them, since no one can
ever spend them on both ends. A transient device failure at the slave is an
error answer, not ``missing``: the master keeps the keys pending and re-sends.
The slave's answer is idempotent — IDs it already holds are answered as stored
without asking the device again — so re-sending pending keys is always safe.

Ownership alternates key by key, so each direction gets half of the link's key
rate. ``PoolFiller`` makes the master's decisions (when to fetch, how many, when
to back off) from the time and pool levels it is given; ``LinkKeyWorker`` carries
them out against the device, the store and the slave, in ``step()`` or in a
background thread.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Union

from agents.drivers.base import BadRequest, DeviceError, DeviceStatus, KeysUnavailable, QKDDevice
from agents.keystore import KeyStore
from db.netfile import Link

log = logging.getLogger(__name__)

ROLES = ("master", "slave")
DEFAULT_RATE_WINDOW_S = 10.0
DEFAULT_MIN_BACKOFF_S = 0.05
DEFAULT_MAX_BACKOFF_S = 2.0
DEFAULT_FULL_POLL_S = 0.5
# After a round that drained the device, let key accumulate for a while: rounds of a few
# keys each would cost an HTTP exchange with the device and one with the slave per key.
DEFAULT_ROUND_S = 0.25
DEFAULT_BATCH = 1024  # keys per notification before the device's limit is known
MAX_NOTIFY_KEYS = 8192  # bound on one notification's key list
MSG_KEYS_NOT_FOUND = "one or more keys specified are not found on KME"  # ETSI GS QKD 014, clause 6


class LinkKeyProtocolError(ValueError):
    """A link-key notification or answer that breaks the protocol (the relay answers 400)."""


# ----------------------------------------------------------------------------- rate meter


class RateMeter:
    """Bits per second over a sliding window: the link's key rate measured from key arrival."""

    def __init__(self, window_s: float = DEFAULT_RATE_WINDOW_S, *, now: float):
        if window_s <= 0:
            raise ValueError("window_s must be positive")
        self.window_s = float(window_s)
        self._start = float(now)
        self._samples: deque[tuple[float, int]] = deque()
        self._bits = 0
        self.total_bits = 0

    def add(self, now: float, bits: int) -> None:
        if bits <= 0:
            return
        self._samples.append((now, bits))
        self._bits += bits
        self.total_bits += bits
        self._trim(now)

    def _trim(self, now: float) -> None:
        horizon = now - self.window_s
        while self._samples and self._samples[0][0] <= horizon:
            self._bits -= self._samples.popleft()[1]

    def rate(self, now: float) -> float:
        self._trim(now)
        # Before a full window has passed, average over the time observed so far.
        span = min(self.window_s, now - self._start)
        return self._bits / span if span > 0 else 0.0


# ----------------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class GetStatus:
    """Ask the device for its status (key size, batch limit, keys it holds)."""


@dataclass(frozen=True)
class Fetch:
    """enc_keys for ``number`` keys of ``size`` bits, then notify the slave."""

    number: int
    size: int


@dataclass(frozen=True)
class Renotify:
    """Re-send up to ``limit`` pending keys to the slave (an earlier notification went unanswered)."""

    limit: int


@dataclass(frozen=True)
class Wait:
    """Nothing to do before ``until`` (None: until woken)."""

    until: float | None
    reason: str


Action = Union[GetStatus, Fetch, Renotify, Wait]


class PoolFiller:
    """What one link end does next to keep its pool filled (no I/O; time passed in).

    Master: fetches batches of up to the device's ``max_key_per_request`` keys of
    the device's ``key_size``, sized to the room left in the pool and to the keys
    the device last reported (``stored_key_count``); resolves pending keys before
    fetching more; backs off exponentially (``min_backoff_s`` doubling up to
    ``max_backoff_s``) while the device has no key, fails, or the slave does not
    answer; polls every ``full_poll_s`` while the pool is full. Slave: never
    fetches (the master's notifications drive it). Both measure the key arrival
    rate.
    """

    def __init__(self, role: str, *, pool_max_bits: int, now: float,
                 min_backoff_s: float = DEFAULT_MIN_BACKOFF_S, max_backoff_s: float = DEFAULT_MAX_BACKOFF_S,
                 full_poll_s: float = DEFAULT_FULL_POLL_S, max_batch: int | None = None,
                 rate_window_s: float = DEFAULT_RATE_WINDOW_S, round_s: float = DEFAULT_ROUND_S):
        if role not in ROLES:
            raise ValueError(f"role must be 'master' or 'slave', got {role!r}")
        if pool_max_bits < 8:
            raise ValueError("pool_max_bits must be at least 8")
        if not 0 < min_backoff_s <= max_backoff_s or full_poll_s <= 0:
            raise ValueError("need 0 < min_backoff_s <= max_backoff_s and full_poll_s > 0")
        if max_batch is not None and max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.role = role
        self.pool_max_bits = int(pool_max_bits)
        self.min_backoff_s = float(min_backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self.full_poll_s = float(full_poll_s)
        self.round_s = float(round_s)
        self._drained = False
        self.max_batch = max_batch
        self.meter = RateMeter(rate_window_s, now=now)
        self.key_size: int | None = None  # bits, from the device status
        self.max_key_per_request: int | None = None
        self._device_keys: int | None = None  # keys the device holds, as last reported minus taken since
        self._failures = 0
        self._until = -float("inf")
        self._reason = ""
        self._next_owner = "master"

    # ------------------------------------------------------------------ decisions

    @property
    def failures(self) -> int:
        """Failures in a row (device, notification) since the last progress."""
        return self._failures

    def batch_limit(self) -> int:
        limit = self.max_key_per_request or DEFAULT_BATCH
        return min(limit, self.max_batch) if self.max_batch else limit

    def next_action(self, now: float, pool_bits: int, pending_keys: int) -> Action:
        """The next thing to do, given the pool's occupied bits and the number of pending keys."""
        if self.role == "slave":
            return Wait(None, "slave end: the master's notifications bring the keys")
        if now < self._until:
            return Wait(self._until, self._reason)
        if pending_keys > 0:
            # Unconfirmed keys first: fetching more would only pile them up.
            return Renotify(self.batch_limit())
        if self.key_size is None or not self._device_keys:
            return GetStatus()
        room = (self.pool_max_bits - pool_bits) // self.key_size
        if room < 1:
            return Wait(now + self.full_poll_s, "pool full")
        return Fetch(min(self.batch_limit(), room, self._device_keys), self.key_size)

    def assign_owners(self, n: int, levels: dict[str, int] | None = None) -> list[str]:
        """Owners for the next ``n`` keys.

        With ``levels`` (available bits per owner) each key goes to the end that holds
        less, so a one-way flow of traffic keeps getting key instead of the idle end's
        share filling the bounded pool; ties (and no levels) alternate, continuing
        across batches.
        """
        out = []
        have = dict(levels) if levels is not None else None
        for _ in range(n):
            if have is not None and have["master"] != have["slave"]:
                owner = "master" if have["master"] < have["slave"] else "slave"
            else:
                owner = self._next_owner
                self._next_owner = "slave" if owner == "master" else "master"
            if have is not None:
                have[owner] += self.key_size or 0
            out.append(owner)
        return out

    # ------------------------------------------------------------------ outcomes

    def _backoff(self, now: float, reason: str) -> None:
        delay = min(self.max_backoff_s, self.min_backoff_s * 2 ** min(self._failures, 30))
        self._failures += 1
        self._until = now + delay
        self._reason = reason

    def _progress(self) -> None:
        self._failures = 0
        self._until = -float("inf")
        self._reason = ""

    def on_status(self, now: float, status: DeviceStatus) -> None:
        if status.key_size <= 0 or status.key_size % 8:
            self._backoff(now, f"device reports an unusable key size ({status.key_size} bits)")
            return
        self.key_size = status.key_size
        self.max_key_per_request = max(1, status.max_key_per_request)
        self._device_keys = status.stored_key_count
        if status.stored_key_count == 0:
            self._backoff(now, "device has no key")
        else:
            self._progress()

    def on_fetched(self, now: float, number: int) -> None:
        # A batch below the request limit drained the device: pace the next round.
        self._drained = number < self.batch_limit()
        if self._device_keys is not None:
            self._device_keys = max(0, self._device_keys - number)
        self._progress()

    def on_no_key(self, now: float) -> None:
        """The device answered 503: no key now."""
        self._device_keys = 0
        self._backoff(now, "device has no key")

    def on_device_error(self, now: float, reason: str = "device error") -> None:
        self._device_keys = None
        self._backoff(now, reason)

    def on_notified(self, now: float, stored_bits: int, resolved: int) -> None:
        """The slave answered: ``resolved`` keys left the pending state, ``stored_bits`` became available."""
        self.meter.add(now, stored_bits)
        if resolved:
            self._progress()
            if self._drained and self.round_s > 0:
                self._drained = False
                self._until, self._reason = now + self.round_s, "letting the device accumulate a batch"
        else:
            self._backoff(now, "the slave resolved none of the pending keys")

    def on_notify_failed(self, now: float) -> None:
        self._backoff(now, "the slave KM did not answer the notification")

    def on_stored(self, now: float, bits: int) -> None:
        """Slave end: keys arrived from the master's notification."""
        self.meter.add(now, bits)

    def arrival_rate_bps(self, now: float) -> float:
        return self.meter.rate(now)


# ----------------------------------------------------------------------------- runner


def _canonical_uuid(value: Any) -> str | None:
    """``value`` if it is a UUID in canonical form (lower case, hyphens), else None.

    The answer quotes the notified IDs verbatim, so only one spelling of an ID is accepted.
    """
    if not isinstance(value, str):
        return None
    try:
        canon = str(uuid.UUID(value))
    except ValueError:
        return None
    return canon if canon == value else None


class LinkKeyWorker:
    """Keeps this KM's pool of one physical link filled (master) or answers the master (slave).

    ``link`` is the link's qkdl_id (or a ``db.netfile.Link``); ``notify_slave``
    posts a notification to the slave KM and returns its JSON answer (master
    only). ``step(now)`` runs one fetch/notify round; ``start()`` runs rounds in a
    background thread that sleeps while the filler waits, and ``wake()`` cuts the
    sleep short (call it after spending keys from a full pool).
    """

    def __init__(self, link: str | Link, role: str, device: QKDDevice, store: KeyStore,
                 notify_slave: Callable[[dict], dict] | None = None, clock: Callable[[], float] = time.monotonic,
                 **filler_options: Any):
        self.link = link if isinstance(link, str) else link.qkdl_id
        if role not in ROLES:
            raise ValueError(f"role must be 'master' or 'slave', got {role!r}")
        if role == "master" and notify_slave is None:
            raise ValueError("the master end needs notify_slave")
        self.role = role
        self.device = device
        self.store = store
        self.notify_slave = notify_slave
        self._clock = clock
        self.filler = PoolFiller(role, pool_max_bits=store.pool_max_bits, now=clock(), **filler_options)
        self._round = threading.Lock()  # one round (or one notification) at a time
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"LinkKeyWorker({self.link!r}, {self.role!r})"

    # ------------------------------------------------------------------ master

    def _pending_count(self) -> int:
        return len(self.store.pending_keys(self.link, limit=1))

    def step(self, now: float | None = None) -> int:
        """One fetch/notify round (master); returns the bits that became available."""
        if self.role != "master":
            return 0
        now = self._clock() if now is None else now
        added = 0
        with self._round:
            # A round: at most a status query, a re-notification and a fetch with its notification.
            for _ in range(4):
                action = self.filler.next_action(now, self.store.pool_bits(self.link), self._pending_count())
                if isinstance(action, Wait):
                    break
                if isinstance(action, GetStatus):
                    try:
                        self.filler.on_status(now, self.device.get_status())
                    except DeviceError as exc:
                        self._device_failed(now, exc)
                elif isinstance(action, Renotify):
                    pending = self.store.pending_keys(self.link, limit=action.limit)
                    added += self._notify(now, [(k, o) for k, o, _ in pending], {k: b for k, _, b in pending})
                elif isinstance(action, Fetch):
                    try:
                        keys = self.device.enc_keys(action.number, action.size)
                    except KeysUnavailable:
                        self.filler.on_no_key(now)
                        continue
                    except DeviceError as exc:
                        self._device_failed(now, exc)
                        continue
                    owners = self.filler.assign_owners(len(keys), {
                        o: self.store.available_bits(self.link, o) for o in ("master", "slave")})
                    self.store.add_pending(self.link, [(k.key_id, k.key, o) for k, o in zip(keys, owners)])
                    self.filler.on_fetched(now, len(keys))
                    added += self._notify(now, [(k.key_id, o) for k, o in zip(keys, owners)],
                                          {k.key_id: k.size_bits for k in keys})
                    break
        return added

    def _device_failed(self, now: float, exc: DeviceError) -> None:
        # Loud on the first failure of a streak, quiet while backing off.
        level = logging.WARNING if self.filler.failures == 0 else logging.DEBUG
        log.log(level, "link %s: QKD device failed: %s", self.link, exc)
        self.filler.on_device_error(now, f"device error: {type(exc).__name__}")

    def _notify(self, now: float, items: list[tuple[str, str]], bits: dict[str, int]) -> int:
        if not items:
            return 0
        message = {"link": self.link, "keys": [{"key_ID": k, "owner": o} for k, o in items]}
        assert self.notify_slave is not None
        try:
            answer = self.notify_slave(message)
        except Exception as exc:  # noqa: BLE001 - any failure leaves the keys pending, to be re-sent
            level = logging.WARNING if self.filler.failures == 0 else logging.DEBUG
            log.log(level, "link %s: notifying the slave KM of %d key(s) failed: %s", self.link, len(items), exc)
            self.filler.on_notify_failed(now)
            return 0
        sent = {k for k, _ in items}
        try:
            stored, missing = _parse_answer(answer)
        except LinkKeyProtocolError as exc:
            log.warning("link %s: the slave KM's answer is malformed: %s", self.link, exc)
            self.filler.on_notify_failed(now)
            return 0
        marked = self.store.mark_available(self.link, [k for k in stored if k in sent])
        gone = self.store.discard_pending(self.link, [k for k in missing if k in sent and k not in stored])
        if gone:
            log.warning("link %s: the slave's device no longer holds %d key(s); discarded them", self.link, len(gone))
        added = sum(bits.get(k, 0) for k in marked)
        self.filler.on_notified(now, added, len(marked) + len(gone))
        return added

    # ------------------------------------------------------------------ slave

    def handle_link_keys(self, message: Any, now: float | None = None) -> dict:
        """Slave end: a notification from the master; returns ``{"stored": [...], "missing": [...]}``.

        Raises LinkKeyProtocolError for a malformed notification (answer 400) and
        DeviceError when the device fails (answer 503: the master re-sends later).
        """
        if self.role != "slave":
            raise LinkKeyProtocolError(f"link {self.link}: this KM is the link's master; it sends notifications")
        owners = self._parse_notification(message)
        now = self._clock() if now is None else now
        with self._round:  # a re-sent notification waits for the first, then finds its keys stored
            ids = list(owners)
            known = self.store.known_keys(self.link, ids)
            clash = [k for k, o in known.items() if o != owners[k]]
            if clash:
                raise LinkKeyProtocolError(f"link {self.link}: key {clash[0]} is already stored with "
                                           f"another owner ({known[clash[0]]})")
            stored = set(known)
            missing: list[str] = []
            new = [k for k in ids if k not in known]
            bits = 0
            try:
                for keys in self._dec_keys(new, missing):
                    self.store.add_available(self.link, [(k.key_id, k.key, owners[k.key_id]) for k in keys])
                    stored.update(k.key_id for k in keys)
                    bits += sum(k.size_bits for k in keys)
            finally:
                # Keys the device handed over are already stored, even if a later batch fails.
                self.filler.on_stored(now, bits)
            if missing:
                log.warning("link %s: the device does not hold %d notified key(s)", self.link, len(missing))
            return {"stored": [k for k in ids if k in stored], "missing": missing}

    def _parse_notification(self, message: Any) -> dict[str, str]:
        if not isinstance(message, dict) or set(message) != {"link", "keys"}:
            raise LinkKeyProtocolError('a link-key notification is {"link": qkdl_id, "keys": [...]}')
        if message["link"] != self.link:
            raise LinkKeyProtocolError(f"notification for link {message['link']!r}, but this worker serves {self.link}")
        keys = message["keys"]
        if not isinstance(keys, list) or not keys:
            raise LinkKeyProtocolError("keys must be a non-empty array")
        if len(keys) > MAX_NOTIFY_KEYS:
            raise LinkKeyProtocolError(f"{len(keys)} keys in one notification; at most {MAX_NOTIFY_KEYS}")
        owners: dict[str, str] = {}
        for item in keys:
            if not isinstance(item, dict) or set(item) != {"key_ID", "owner"}:
                raise LinkKeyProtocolError('every key is {"key_ID": UUID, "owner": "master"|"slave"}')
            kid = _canonical_uuid(item["key_ID"])
            if kid is None:
                raise LinkKeyProtocolError(f"key_ID {str(item['key_ID'])[:64]!r} is not a UUID")
            if item["owner"] not in ("master", "slave"):
                raise LinkKeyProtocolError(f"owner of key {kid} must be 'master' or 'slave'")
            if kid in owners:
                raise LinkKeyProtocolError(f"key {kid} appears twice")
            owners[kid] = item["owner"]
        return owners

    def _dec_keys(self, ids: list[str], missing: list[str]):
        """Yield batches of keys fetched by ID; IDs the device does not hold go to ``missing``.

        ETSI 014 dec_keys is all or nothing. On the spec's "keys not found" 400 the
        IDs the device names (twin extension) are set aside, else the batch is split
        in halves until they are found; any other 400 is split too (the batch may
        exceed the device's limit), and raised once it concerns a single ID.
        """
        if not ids:
            return
        try:
            keys = self.device.dec_keys(ids)
        except BadRequest as exc:
            not_found = exc.message == MSG_KEYS_NOT_FOUND
            named = _named_missing(exc.details, ids) if not_found else set()
            if named:
                missing.extend(k for k in ids if k in named)
                yield from self._dec_keys([k for k in ids if k not in named], missing)
                return
            if len(ids) == 1:
                if not_found:
                    missing.append(ids[0])
                    return
                raise
            half = len(ids) // 2
            yield from self._dec_keys(ids[:half], missing)
            yield from self._dec_keys(ids[half:], missing)
            return
        yield keys

    # ------------------------------------------------------------------ monitoring

    def arrival_rate_bps(self, now: float | None = None) -> float:
        """Key arrival rate of this link end over the filler's window (the measured SKR)."""
        return self.filler.arrival_rate_bps(self._clock() if now is None else now)

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        now = self._clock() if now is None else now
        return {
            "link": self.link,
            "role": self.role,
            "pool_bits": self.store.pool_bits(self.link),
            "pool_max_bits": self.store.pool_max_bits,
            "available_bits": {o: self.store.available_bits(self.link, o) for o in ("master", "slave")},
            "arrival_rate_bps": self.filler.arrival_rate_bps(now),
            "arrived_bits": self.filler.meter.total_bits,
        }

    # ------------------------------------------------------------------ thread

    def start(self) -> "LinkKeyWorker":
        """Run rounds in a background thread (master; a slave only answers notifications)."""
        if self.role != "master":
            return self
        if self._thread is not None:
            raise RuntimeError(f"{self!r} is already running")
        self._stopping = False
        self._wake.clear()
        self._thread = threading.Thread(target=self._run, name=f"linkkeys {self.link}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        thread = self._thread
        if thread is None:
            return
        self._stopping = True
        self._wake.set()
        thread.join()
        self._thread = None

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while not self._stopping:
            now = self._clock()
            try:
                self.step(now)
            except Exception:  # noqa: BLE001 - the loop must outlive one bad round; keys stay pending
                log.exception("link %s: link-key round failed", self.link)
                self.filler.on_device_error(now, "round failed")
            now = self._clock()
            action = self.filler.next_action(now, self.store.pool_bits(self.link), self._pending_count())
            if isinstance(action, Wait):
                delay = None if action.until is None else max(0.0, action.until - now)
                self._wake.wait(delay)
                self._wake.clear()


def _named_missing(details: list, ids: list[str]) -> set[str]:
    """IDs a KME's 400 details name as missing (the twin's ``qkdsdn_missing_key_IDs``), among ``ids``."""
    named: set[str] = set()
    for item in details:
        value = item.get("qkdsdn_missing_key_IDs") if isinstance(item, dict) else None
        if isinstance(value, list):
            named.update(v.lower() for v in value if isinstance(v, str))
    return named & set(ids)


def _parse_answer(answer: Any) -> tuple[list[str], list[str]]:
    if not isinstance(answer, dict) or not isinstance(answer.get("stored"), list):
        raise LinkKeyProtocolError('the answer is {"stored": [key_ID, ...], "missing": [...]}')
    missing = answer.get("missing", [])
    if not isinstance(missing, list):
        raise LinkKeyProtocolError("missing must be an array")
    for kid in answer["stored"] + missing:
        if not isinstance(kid, str):
            raise LinkKeyProtocolError("key IDs in the answer must be strings")
    return answer["stored"], missing


__all__ = ["Fetch", "GetStatus", "LinkKeyProtocolError", "LinkKeyWorker", "PoolFiller", "RateMeter",
           "Renotify", "Wait"]
