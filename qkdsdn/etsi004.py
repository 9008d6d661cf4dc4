"""ETSI GS QKD 004 V2.1.1 status codes (clause 6.1), shared by the key managers and the controller.

Both sides speak these codes (the application API, admission answers on the
bus), so they are defined once here; ``agents.core.session.Status`` and
``controller.admission.Status`` are this enum.
"""
from __future__ import annotations

from enum import IntEnum


class Status(IntEnum):
    SUCCESSFUL = 0
    PEER_NOT_CONNECTED = 1
    INSUFFICIENT_KEY = 2
    PEER_NOT_YET_CONNECTED = 3
    NO_QKD_CONNECTION = 4
    KSID_IN_USE = 5
    TIMEOUT = 6
    QOS_NOT_MET = 7
    METADATA_SIZE_INSUFFICIENT = 8
    METADATA_TOO_SMALL = 8  # alias of METADATA_SIZE_INSUFFICIENT

    @property
    def meaning(self) -> str:
        return _MEANINGS[self]


_MEANINGS = {
    Status.SUCCESSFUL: "Successful.",
    Status.PEER_NOT_CONNECTED: "Successful connection, but peer not connected.",
    Status.INSUFFICIENT_KEY: "GET_KEY failed because insufficient key available.",
    Status.PEER_NOT_YET_CONNECTED: "GET_KEY failed because peer application is not yet connected.",
    Status.NO_QKD_CONNECTION: "No QKD connection available.",
    Status.KSID_IN_USE: "OPEN_CONNECT failed because the KSID is already in use.",
    Status.TIMEOUT: "TIMEOUT_ERROR: the call failed because of the specified TIMEOUT.",
    Status.QOS_NOT_MET: "OPEN failed because requested QoS settings could not be met, counter proposal included in "
                        "return.",
    Status.METADATA_SIZE_INSUFFICIENT: "GET_KEY failed because metadata field size insufficient; "
                                       "the returned Metadata_size holds the minimum needed size.",
}
