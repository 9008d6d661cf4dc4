"""The device-driver interface of a key manager, and its typed errors.

A key manager pulls link keys from the QKD device on each of its links. At the
link's master end it calls ``enc_keys`` (new keys, with their IDs); it tells the
slave end's key manager the IDs over the relay channel, and that one calls
``dec_keys`` on its own device to get the identical keys. ``get_status`` reports
what the device can deliver, with its vendor extension (QBER, key rate...).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Iterable


class DeviceError(Exception):
    """A QKD device refused or failed a request. Messages never carry key material."""


class BadRequest(DeviceError):
    """HTTP 400: the device rejected the request; ``message`` is the device's (spec) message."""

    def __init__(self, message: str, details: list | None = None):
        super().__init__(message)
        self.message = message
        self.details = details or []


class Unauthorized(DeviceError):
    """HTTP 401: the device does not accept our SAE ID for this request."""


class KeysUnavailable(DeviceError):
    """HTTP 503: no key material now (buffer empty, link cut, QBER abort); try again later."""

    def __init__(self, message: str, details: list | None = None):
        super().__init__(message)
        self.message = message
        self.details = details or []


class DeviceUnreachable(DeviceError):
    """No answer: connection refused, TLS failure, timeout."""


class ProtocolError(DeviceError):
    """The device answered something that is not a valid ETSI 014 response."""


@dataclass(frozen=True)
class DeviceKey:
    key_id: str
    # Never in repr: a logged key shows its ID only.
    key: bytes = field(repr=False)

    @property
    def size_bits(self) -> int:
        return 8 * len(self.key)


@dataclass(frozen=True)
class DeviceStatus:
    """ETSI 014 Status of a device as seen by our SAE (sizes in bits)."""

    source_kme_id: str
    target_kme_id: str
    master_sae_id: str
    slave_sae_id: str
    key_size: int
    stored_key_count: int
    max_key_count: int
    max_key_per_request: int
    max_key_size: int
    min_key_size: int
    max_sae_id_count: int
    extension: dict[str, Any] = field(default_factory=dict)

    @property
    def qber(self) -> float | None:
        """QBER from a qkdsdn twin's vendor extension, when the device reports it."""
        value = self.extension.get("qkdsdn_qber")
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    @property
    def skr_bps(self) -> float | None:
        value = self.extension.get("qkdsdn_skr_bps")
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    @property
    def link_state(self) -> str | None:
        value = self.extension.get("qkdsdn_link_state")
        return value if isinstance(value, str) else None


class QKDDevice(abc.ABC):
    """One end of a QKD link, as the key manager at that end uses it."""

    @abc.abstractmethod
    def get_status(self) -> DeviceStatus:
        """What the device can deliver for the link's peer SAE."""

    @abc.abstractmethod
    def enc_keys(self, number: int = 1, size: int | None = None) -> list[DeviceKey]:
        """New keys shared with the peer (master end); ``size`` in bits, None = device default."""

    @abc.abstractmethod
    def dec_keys(self, key_ids: Iterable[str]) -> list[DeviceKey]:
        """The keys the peer's enc_keys returned under these IDs (slave end), in the same order."""

    def close(self) -> None:
        """Release connections; the default holds none."""

    def __enter__(self) -> "QKDDevice":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
