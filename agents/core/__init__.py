"""Decision core of the key manager: plain classes without I/O, threads or clocks; the current
time is passed in. ``agents/service.py`` is the shell that puts them on the wire."""
from .bucket import TokenBucket
from .forwarding import ForwardingEntry, ForwardingTable, Role
from .keymanager import (METADATA_MAX_SIZE, Action, AnswerPeer, Decision, DeliverKey, EmitEvent, FetchFromSource,
                         KeyManagerLogic, NeedAdmission, NeedAuthentication, ProduceKey, PurgeKeys, Reject,
                         RelayRoute, Reply, SignalKeyRequest, Terminate, Wait, key_id_for, metadata_json)
from .queue import PriorityRequestQueue, PushResult, QueuedRequest
from .session import (DEFAULT_QOS, ConfigError, Event, InvalidKSID, InvalidTransition, KMSession, QoS, QoSError,
                      SessionConfig, SessionState, Status, normalize_ksid)

__all__ = [
    "METADATA_MAX_SIZE", "Action", "AnswerPeer", "ConfigError", "DEFAULT_QOS", "Decision", "DeliverKey", "EmitEvent",
    "Event", "FetchFromSource", "ForwardingEntry", "ForwardingTable", "InvalidKSID", "InvalidTransition",
    "KMSession", "KeyManagerLogic", "NeedAdmission", "NeedAuthentication", "PriorityRequestQueue", "ProduceKey",
    "PurgeKeys", "PushResult", "QoS", "QoSError", "QueuedRequest", "Reject", "RelayRoute", "Reply", "Role",
    "SessionConfig", "SessionState", "SignalKeyRequest", "Status", "Terminate", "TokenBucket", "Wait", "key_id_for",
    "metadata_json", "normalize_ksid",
]
