"""Drivers for the QKD devices under a key manager.

A key manager sees every QKD device, real hardware or the digital twin, through
``QKDDevice``; ``ETSI014Device`` reaches any device that speaks ETSI GS QKD 014
over mutual TLS, and ``device_for_link_end`` builds it for a link end of the
network file.
"""
from agents.drivers.base import (
    BadRequest,
    DeviceError,
    DeviceKey,
    DeviceStatus,
    DeviceUnreachable,
    KeysUnavailable,
    ProtocolError,
    QKDDevice,
    Unauthorized,
)
from agents.drivers.etsi014 import ETSI014Device
from agents.drivers.factory import device_for_link_end

__all__ = [
    "BadRequest",
    "DeviceError",
    "DeviceKey",
    "DeviceStatus",
    "DeviceUnreachable",
    "ETSI014Device",
    "KeysUnavailable",
    "ProtocolError",
    "QKDDevice",
    "Unauthorized",
    "device_for_link_end",
]
