"""Key generation engine of one emulated QKD link (the digital twin's device pair).

Both ends of a link share one engine, so they see identical key material by
construction. Secret key accrues in a bounded device buffer at the rate that
``physics.performance`` gives for the link's current disturbance; the accrual is
computed lazily from the elapsed time whenever somebody looks (no thread, no
timer), with a fractional-bit accumulator so slow links do not lose bits to
rounding.

Life of a key: the master SAE's ``enc_keys`` carves keys of the requested size
off the buffer; each gets a UUID and waits in a bounded table of pending keys
until the slave SAE's ``dec_keys`` fetches it by ID, after which it is gone from
both ends. Key bytes come from ``os.urandom``, or from a deterministic AES-CTR
stream when the device has a ``seed`` (reproducible tests).

Disturbances (cut, eavesdropper, QBER drift) are set through methods; the rate
in force during each elapsed interval is the one used for that interval, and a
drifting QBER is integrated in short steps.
"""
from __future__ import annotations

import hashlib
import math
import os
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable, Iterable

from db.netfile import Link
from qkdsdn.twin import physics
from qkdsdn.twin.physics import LinkState, Performance

Clock = Callable[[], float]

DEFAULT_SKR_WINDOW_S = 10.0
DEFAULT_PENDING_TTL_S = 600.0
# Drift is integrated with steps no longer than this (the rate changes with QBER).
_DRIFT_STEP_S = 0.25
_DRIFT_MAX_STEPS = 256


class EngineError(Exception):
    """Base of the key engine's refusals; messages never carry key material."""


class InsufficientKey(EngineError):
    """Not enough key material (or pending-table room) to serve a request."""


class KeysNotFound(EngineError):
    """One or more requested key IDs are not (or no longer) held by the device."""

    def __init__(self, missing: list[str]):
        self.missing = missing
        super().__init__(f"{len(missing)} key ID(s) not found")


class NotKeySlave(EngineError):
    """The caller was not the slave SAE named when these keys were delivered."""


@dataclass(frozen=True)
class Key:
    key_id: str
    # Excluded from repr so that a logged Key never shows its bytes.
    material: bytes = field(repr=False)


@dataclass(frozen=True)
class EngineStatus:
    """A snapshot of one link's device pair, for ETSI 014 status and the admin API."""

    link: str
    state: str  # "up", "cut", "aborted" (QBER above threshold) or "no-key" (rate 0)
    reason: str | None
    qber: float
    model_skr_bps: float  # rate in force now, from the physics model
    measured_skr_bps: float  # bits generated over the last window / window
    available_bits: int
    buffer_bits: int
    pending_keys: int
    pending_bits: int
    eve_fraction: float
    qber_drift: float  # current additive QBER from drift
    drift_qber_per_s: float
    drift_max_qber: float | None
    generated_bits: int  # total since start, before buffer overflow
    delivered_bits: int  # total handed to the master SAE


class _Drbg:
    """AES-256-CTR keystream keyed by the device seed: reproducible key bytes."""

    def __init__(self, seed: int, label: str):
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        key = hashlib.sha256(f"qkdsdn-twin-drbg/{label}/{seed}".encode()).digest()
        self._enc = Cipher(algorithms.AES(key), modes.CTR(b"\0" * 16)).encryptor()

    def __call__(self, n: int) -> bytes:
        return self._enc.update(b"\0" * n)


@dataclass
class _Pending:
    material: bytes
    master_sae: str
    slave_sae: str
    created: float


class KeyEngine:
    """Key accrual and delivery for one link with an emulated device.

    ``clock`` returns seconds (monotonic); tests pass a fake one. ``seed``
    overrides ``link.device.seed``. ``performance`` defaults to
    ``physics.performance``. Thread-safe: the ETSI 014 servers of both ends call
    into it from their worker threads.
    """

    def __init__(self, link: Link, *, clock: Clock = time.monotonic, seed: int | None = None,
                 abort_qber: float = physics.DEFAULT_ABORT_QBER,
                 skr_window_s: float = DEFAULT_SKR_WINDOW_S,
                 pending_max_bits: int | None = None,
                 pending_ttl_s: float = DEFAULT_PENDING_TTL_S,
                 performance: Callable[..., Performance] = physics.performance):
        if link.device is None:
            raise ValueError(f"link '{link.name}' has no emulated device")
        if skr_window_s <= 0 or pending_ttl_s <= 0:
            raise ValueError("skr_window_s and pending_ttl_s must be positive")
        self.link = link
        self.device = link.device
        self._clock = clock
        self._perf_fn = performance
        self._abort_qber = abort_qber
        self._window = float(skr_window_s)
        self.buffer_bits = int(self.device.buffer_bits)
        # The device holds delivered-but-unfetched keys in memory as large as its buffer.
        self.pending_max_bits = int(pending_max_bits if pending_max_bits is not None else self.buffer_bits)
        self.pending_ttl_s = float(pending_ttl_s)
        seed = seed if seed is not None else self.device.seed
        if seed is None:
            self._key_bytes: Callable[[int], bytes] = os.urandom
            self._id_bytes: Callable[[int], bytes] = os.urandom
        else:
            # Link id in the label: two links with the same seed still differ.
            self._key_bytes = _Drbg(seed, f"{link.qkdl_id}/key")
            self._id_bytes = _Drbg(seed, f"{link.qkdl_id}/id")

        self._lock = threading.Lock()
        now = clock()
        self._start = now
        self._last = now
        self._available = 0  # whole bits in the buffer
        self._frac = 0.0  # fraction of a bit carried to the next accrual
        self._generated = 0.0
        self._delivered = 0
        # Disturbances.
        self._cut = False
        self._eve = 0.0
        self._drift_rate = 0.0
        self._drift_max: float | None = None
        self._drift_since = now
        self._drift_base = 0.0  # drift reached when the drift rate was last changed
        # (drift, performance) last computed; dropped when a disturbance changes.
        self._static_perf: tuple[float, Performance] | None = None
        self._base_qber: float | None = None
        # (start, end, bits) of generation since now - window; constant-rate pieces merge.
        self._history: deque[list[float]] = deque()
        self._pending: OrderedDict[str, _Pending] = OrderedDict()
        self._pending_bits = 0

    # ------------------------------------------------------------------ physics

    def _state(self, drift: float) -> LinkState:
        return LinkState(eve_fraction=self._eve, qber_drift=drift, cut=self._cut)

    def _perf(self, drift: float) -> Performance:
        # Cached for the last drift value: without a drift rate it is the same every call.
        cached = self._static_perf
        if cached is not None and cached[0] == drift:
            return cached[1]
        perf = self._perf_fn(self.link, self._state(drift), abort_qber=self._abort_qber)
        self._static_perf = (drift, perf)
        return perf

    @staticmethod
    def _rate(perf: Performance) -> float:
        return 0.0 if perf.aborted else max(perf.skr_bps, 0.0)

    def _drift_cap(self) -> float:
        """Largest additive drift: up to max_qber in total, and within the model's range."""
        if self._drift_max is None:
            return physics.QBER_MAX
        if self._base_qber is None:
            # QBER of the connected link without drift (a cut link shows noise only).
            self._base_qber = self._perf_fn(self.link, LinkState(eve_fraction=self._eve),
                                            abort_qber=self._abort_qber).qber
        return min(max(self._drift_max - self._base_qber, 0.0), physics.QBER_MAX)

    def _drift_at(self, t: float) -> float:
        if self._drift_rate == 0.0:
            return self._drift_base
        d = self._drift_base + self._drift_rate * (t - self._drift_since)
        cap = self._drift_cap()
        return min(d, cap) if self._drift_rate > 0 else max(d, -physics.QBER_MAX)

    # ------------------------------------------------------------------ accrual

    def _accrue(self) -> float:
        """Bring the buffer up to now; returns now. Caller holds the lock."""
        now = self._clock()
        t0 = self._last
        if now <= t0:
            return t0
        if self._drift_rate == 0.0:
            self._add(t0, now, self._rate(self._perf(self._drift_base)) * (now - t0))
        else:
            self._accrue_drift(t0, now)
        self._last = now
        self._expire_pending(now)
        return now

    def _accrue_drift(self, t0: float, t1: float) -> None:
        # Once the drift reaches its cap the rate is constant: split there.
        cap = self._drift_cap()
        if self._drift_rate > 0:
            t_cap = self._drift_since + max(cap - self._drift_base, 0.0) / self._drift_rate
        else:
            t_cap = math.inf
        varying_end = min(t1, max(t_cap, t0))
        if varying_end > t0:
            steps = min(_DRIFT_MAX_STEPS, max(1, math.ceil((varying_end - t0) / _DRIFT_STEP_S)))
            h = (varying_end - t0) / steps
            for i in range(steps):
                a = t0 + i * h
                mid = self._drift_at(a + h / 2)  # midpoint rule
                self._add(a, a + h, self._rate(self._perf(mid)) * h)
        if t1 > varying_end:
            self._add(varying_end, t1, self._rate(self._perf(self._drift_at(t1))) * (t1 - varying_end))

    def _add(self, a: float, b: float, bits: float) -> None:
        self._generated += bits
        total = self._frac + bits
        whole = int(total)
        self._frac = total - whole
        room = self.buffer_bits - self._available
        if whole >= room:
            # Buffer full: the device discards the surplus.
            self._available = self.buffer_bits
            self._frac = 0.0
        else:
            self._available += whole
        self._record(a, b, bits)

    def _record(self, a: float, b: float, bits: float) -> None:
        h = self._history
        if h:
            last = h[-1]
            same_rate = math.isclose(bits / (b - a), last[2] / (last[1] - last[0]), rel_tol=1e-9, abs_tol=1e-9)
            # Merge with the previous piece when rates match, or when it is short, so the
            # history stays small even under drift.
            if last[1] == a and (same_rate or last[1] - last[0] < self._window / 100):
                last[1], last[2] = b, last[2] + bits
                return
        h.append([a, b, bits])
        horizon = b - self._window
        while h and h[0][1] <= horizon:
            h.popleft()

    def _measured(self, now: float) -> float:
        lo = max(now - self._window, self._start)
        span = now - lo
        if span <= 0:
            return 0.0
        bits = 0.0
        for a, b, n in self._history:
            if b <= lo or b <= a:
                continue
            # A piece straddling the window edge counts pro rata (uniform within a piece).
            bits += n * (b - max(a, lo)) / (b - a)
        return bits / span

    def _expire_pending(self, now: float) -> None:
        # Insertion order is time order: expired keys sit at the front.
        while self._pending:
            kid, p = next(iter(self._pending.items()))
            if now - p.created < self.pending_ttl_s:
                break
            del self._pending[kid]
            self._pending_bits -= 8 * len(p.material)

    # ------------------------------------------------------------------ disturbances

    def _changed(self) -> None:
        self._static_perf = None
        self._base_qber = None

    def cut(self) -> None:
        """Cut the fibre: no key accrues until restore(); buffered keys stay deliverable."""
        with self._lock:
            self._accrue()
            self._cut = True
            self._changed()

    def restore(self) -> None:
        """Clear every disturbance: reconnect, no eavesdropper, no drift."""
        with self._lock:
            now = self._accrue()
            self._cut = False
            self._eve = 0.0
            self._drift_rate, self._drift_max, self._drift_base, self._drift_since = 0.0, None, 0.0, now
            self._changed()

    def set_eavesdropper(self, fraction: float) -> None:
        """Intercept-resend attack on ``fraction`` of the pulses (QBER + fraction/4)."""
        fraction = float(fraction)
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"eavesdropper fraction must lie in [0, 1], got {fraction:g}")
        with self._lock:
            self._accrue()
            self._eve = fraction
            self._changed()

    def set_drift(self, qber_per_s: float, max_qber: float | None = None) -> None:
        """QBER rising by ``qber_per_s`` each second from now, up to ``max_qber`` in total.

        The drift already reached is kept; ``set_drift(0)`` freezes it, restore() clears it.
        """
        qber_per_s = float(qber_per_s)
        if not math.isfinite(qber_per_s) or abs(qber_per_s) > physics.QBER_MAX:
            raise ValueError(f"drift rate must be a finite QBER per second within ±0.5, got {qber_per_s:g}")
        if max_qber is not None and not 0.0 <= float(max_qber) <= physics.QBER_MAX:
            raise ValueError(f"max_qber must lie in [0, 0.5], got {max_qber:g}")
        with self._lock:
            now = self._accrue()
            self._drift_base = self._drift_at(now)
            self._drift_since = now
            self._drift_rate = qber_per_s
            self._drift_max = None if max_qber is None else float(max_qber)
            self._changed()

    # ------------------------------------------------------------------ status

    def status(self) -> EngineStatus:
        with self._lock:
            now = self._accrue()
            drift = self._drift_at(now)
            perf = self._perf(drift)
            if self._cut:
                state = "cut"
            elif perf.aborted:
                state = "aborted"
            elif perf.skr_bps <= 0:
                state = "no-key"
            else:
                state = "up"
            return EngineStatus(
                link=self.link.name, state=state, reason=perf.reason, qber=perf.qber,
                model_skr_bps=self._rate(perf), measured_skr_bps=self._measured(now),
                available_bits=self._available, buffer_bits=self.buffer_bits,
                pending_keys=len(self._pending), pending_bits=self._pending_bits,
                eve_fraction=self._eve, qber_drift=drift, drift_qber_per_s=self._drift_rate,
                drift_max_qber=self._drift_max, generated_bits=int(self._generated),
                delivered_bits=self._delivered)

    def available_bits(self) -> int:
        with self._lock:
            self._accrue()
            return self._available

    def stored_key_count(self, size_bits: int) -> int:
        """Keys of ``size_bits`` the master SAE could take now."""
        return self.available_bits() // size_bits

    def pending_count(self, slave_sae: str | None = None) -> int:
        """Keys delivered to the master that wait for (this) slave SAE."""
        with self._lock:
            self._accrue()
            if slave_sae is None:
                return len(self._pending)
            return sum(1 for p in self._pending.values() if p.slave_sae == slave_sae)

    # ------------------------------------------------------------------ delivery

    def take_keys(self, number: int, size_bits: int, *, master_sae: str, slave_sae: str) -> list[Key]:
        """Carve ``number`` keys of ``size_bits`` for the master SAE (ETSI 014 enc_keys).

        All or nothing: raises InsufficientKey when the buffer or the pending table
        cannot take the whole request.
        """
        if number < 1 or size_bits < 8 or size_bits % 8:
            raise ValueError("number must be >= 1 and size a positive multiple of 8")
        need = number * size_bits
        with self._lock:
            now = self._accrue()
            if need > self._available:
                have = self._available // size_bits
                why = ""
                if self._cut:
                    why = " (link cut: no key is being generated)"
                else:
                    perf = self._perf(self._drift_at(now))
                    if perf.aborted or perf.skr_bps <= 0:
                        why = f" ({perf.reason})"
                raise InsufficientKey(f"insufficient key material: {number} key(s) of {size_bits} bits "
                                      f"requested, {have} available{why}")
            if self._pending_bits + need > self.pending_max_bits:
                raise InsufficientKey(
                    f"device memory full: {len(self._pending)} key(s) delivered to the master SAE "
                    f"still wait for the slave SAE's dec_keys")
            size = size_bits // 8
            material = self._key_bytes(number * size)
            ids = self._id_bytes(16 * number)
            keys = []
            for i in range(number):
                kid = str(uuid.UUID(bytes=ids[16 * i:16 * i + 16], version=4))
                if kid in self._pending:  # a 2^-122 event, or a reused seed
                    kid = str(uuid.uuid4())
                k = Key(kid, material[i * size:(i + 1) * size])
                self._pending[kid] = _Pending(k.material, master_sae, slave_sae, now)
                keys.append(k)
            self._available -= need
            self._pending_bits += need
            self._delivered += need
            return keys

    def fetch_keys(self, key_ids: Iterable[str], *, caller_sae: str, master_sae: str | None = None) -> list[Key]:
        """Hand pending keys to their slave SAE (ETSI 014 dec_keys); they then leave the device.

        All or nothing: KeysNotFound when any ID is unknown (or was delivered for
        another master SAE), NotKeySlave when the caller is not the keys' slave.
        """
        ids = list(key_ids)
        if len(set(ids)) != len(ids):
            raise ValueError("duplicate key IDs in one request")
        with self._lock:
            self._accrue()
            missing = [k for k in ids if k not in self._pending
                       or (master_sae is not None and self._pending[k].master_sae != master_sae)]
            if missing:
                raise KeysNotFound(missing)
            if any(self._pending[k].slave_sae != caller_sae for k in ids):
                raise NotKeySlave("the caller is not the slave SAE of the requested keys")
            out = []
            for k in ids:
                p = self._pending.pop(k)
                self._pending_bits -= 8 * len(p.material)
                out.append(Key(k, p.material))
            return out
