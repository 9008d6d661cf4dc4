"""Token bucket of a key-management session: it limits how fast an application draws key.

The bucket holds at most ``size_bits`` tokens (the burst the session may draw at once) and
refills at ``rate_bps`` tokens per second (the agreed key rate). Taking ``bits`` tokens is
allowed only when the bucket holds them, so over any interval of length T a caller draws at
most ``rate_bps * T + size_bits`` bits.

Time is passed in (monotonic seconds); the bucket never reads a clock.
"""
from __future__ import annotations

import math

# Refills are float products; a caller waking exactly at now + time_until() must not miss its
# tokens by a rounding error. The tolerance is relative to the bucket size, far below one bit.
_REL_TOLERANCE = 1e-9


class TokenBucket:
    """A token bucket that starts full."""

    __slots__ = ("_rate", "_size", "_tokens", "_last")

    def __init__(self, rate_bps: float, size_bits: int, now: float):
        self._rate, self._size = _checked(rate_bps, size_bits)
        self._tokens = float(self._size)
        self._last = float(now)

    def __repr__(self) -> str:
        return f"TokenBucket(rate_bps={self._rate!r}, size_bits={self._size!r}, tokens={self._tokens:.1f})"

    @property
    def rate_bps(self) -> float:
        return self._rate

    @property
    def size_bits(self) -> int:
        return self._size

    def tokens(self, now: float) -> float:
        """Tokens held at ``now`` (after refilling)."""
        self.refill(now)
        return self._tokens

    def refill(self, now: float) -> None:
        """Add the tokens earned since the last refill. A clock that goes backwards earns nothing."""
        if now > self._last:
            self._tokens = min(float(self._size), self._tokens + (now - self._last) * self._rate)
            self._last = float(now)

    def try_take(self, bits: int, now: float) -> bool:
        """Take ``bits`` tokens if the bucket holds them; False (and nothing taken) otherwise."""
        bits = _checked_bits(bits)
        self.refill(now)
        if bits > self._size or self._tokens + self._tolerance() < bits:
            return False
        self._tokens = max(0.0, self._tokens - bits)
        return True

    def time_until(self, bits: int, now: float) -> float:
        """Seconds from ``now`` until ``bits`` tokens are held; inf if never (bits > size or rate 0)."""
        bits = _checked_bits(bits)
        self.refill(now)
        return self._wait(bits)

    def ready_at(self, bits: int) -> float:
        """Absolute time at which ``bits`` tokens will be held, from the state of the last refill."""
        return self._last + self._wait(_checked_bits(bits))

    def reconfigure(self, rate_bps: float, size_bits: int, now: float) -> None:
        """New rate and size from ``now`` on. Tokens earned so far are kept up to the new size; a
        larger bucket is not topped up (it fills at the new rate), so a re-configuration never
        grants a free burst."""
        rate, size = _checked(rate_bps, size_bits)
        self.refill(now)
        self._rate, self._size = rate, size
        self._tokens = min(self._tokens, float(size))

    def _wait(self, bits: int) -> float:
        if bits > self._size:
            return math.inf
        deficit = bits - self._tokens
        if deficit <= self._tolerance():
            return 0.0
        if self._rate <= 0.0:
            return math.inf
        return deficit / self._rate

    def _tolerance(self) -> float:
        return _REL_TOLERANCE * max(1.0, float(self._size))


def _checked(rate_bps: float, size_bits: int) -> tuple[float, int]:
    if isinstance(rate_bps, bool) or not isinstance(rate_bps, (int, float)) or not math.isfinite(rate_bps) or rate_bps < 0:
        raise ValueError(f"token-bucket rate must be a finite number >= 0 bit/s, got {rate_bps!r}")
    if isinstance(size_bits, bool) or not isinstance(size_bits, int) or size_bits < 0:
        raise ValueError(f"token-bucket size must be an integer >= 0 bits, got {size_bits!r}")
    return float(rate_bps), size_bits


def _checked_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits < 0:
        raise ValueError(f"bits must be an integer >= 0, got {bits!r}")
    return bits
