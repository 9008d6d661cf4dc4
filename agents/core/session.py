"""A key manager's session: state machine, configuration, ETSI GS QKD 004 QoS and status codes.

Life cycle at one key manager (DESIGN, "Session life cycle"):

    authenticating --authenticated--> user_accepted --configured--> operative
    operative --key_request_started--> key_exchanging --key_request_done (last one)--> operative
    authenticating | user_accepted --rejected / setup timeout--> terminated
    any live state --close (CLOSE, deletion, inactivity)--> terminated

Sessions at a key manager where no local application opened them (a trusted node in the
middle of the route, or the slave side of an ETSI 014 pair) are created by the control
plane's configuration and start ``operative`` (``KMSession.from_config``).

An ETSI 014 master/slave pair has no OPEN_CONNECT: its implicit session is opened by the
first ``enc_keys`` (``KMSession.implicit_014``) and ended by inactivity.

The inactivity timer runs only in ``operative``: a session whose application requests no key
for ``inactivity_timeout_s`` (from the configuration) is terminated at the next ``tick``.

Every transition returns Event records (what, when, from which state to which); they carry
identities and reasons, never key material. Methods take the current monotonic time ``now``
and never read a clock.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields, replace
from enum import StrEnum
from typing import Any, Mapping

from qkdsdn.etsi004 import Status  # noqa: F401  (re-exported: agents.core.session.Status)

from .forwarding import ForwardingEntry, Role

UINT32_MAX = 2**32 - 1
INTERFACES = ("004", "014")
JSON_MIMETYPE = "application/json"


# ---------------------------------------------------------------------------------------------
# KSID

class InvalidKSID(ValueError):
    """A Key_stream_ID that is not a UUID in canonical text form."""


_UUID_TEXT = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
NIL_KSID = "00000000-0000-0000-0000-000000000000"


def normalize_ksid(value: object) -> str | None:
    """Canonical (lower-case) KSID, or None for a null KSID (None, "" or the nil UUID), which
    asks the key manager for a new one. Anything else raises InvalidKSID."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not _UUID_TEXT.match(value):
        raise InvalidKSID("Key_stream_ID must be a UUID (8-4-4-4-12 hexadecimal digits)")
    value = value.lower()
    return None if value == NIL_KSID else value


def _require_ksid(value: object) -> str:
    ksid = normalize_ksid(value)
    if ksid is None:
        raise InvalidKSID("a session needs a non-null Key_stream_ID")
    return ksid


# ---------------------------------------------------------------------------------------------
# QoS

class QoSError(ValueError):
    """A QoS object that does not follow ETSI 004 (unknown member, wrong type, out of range)."""


@dataclass(frozen=True)
class QoS:
    """ETSI 004 QoS; None = NULL (the key manager chooses). Names are the specification's."""

    Key_chunk_size: int | None = None  # bytes per GET_KEY
    Max_bps: int | None = None
    Min_bps: int | None = None
    Jitter: int | None = None
    Priority: int | None = None
    Timeout: int | None = None  # ms: a call waits at most this long
    TTL: int | None = None  # s: unused keys are erased this long after the session ended
    Metadata_mimetype: str | None = None  # "" = no metadata

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if f.name == "Metadata_mimetype":
                # char[256] with its terminating NUL
                if not isinstance(value, str) or len(value.encode("utf-8")) > 255 or "\x00" in value:
                    raise QoSError("QoS Metadata_mimetype must be a string of at most 255 bytes")
            elif isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= UINT32_MAX:
                raise QoSError(f"QoS {f.name} must be an unsigned 32-bit integer")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def to_json(self) -> dict[str, Any]:
        """JSON object with the specification's member names; NULL fields as null."""
        return asdict(self)

    @classmethod
    def from_json(cls, obj: Any) -> "QoS":
        """Parse a JSON QoS object (None = all NULL). Unknown members are errors."""
        if obj is None:
            return cls()
        if not isinstance(obj, Mapping):
            raise QoSError("QoS must be a JSON object")
        unknown = sorted(set(obj) - set(cls.field_names()))
        if unknown:
            raise QoSError(f"unknown QoS member(s): {', '.join(map(str, unknown))}")
        return cls(**{k: obj[k] for k in obj})

    def with_defaults(self, defaults: "QoS") -> "QoS":
        """NULL fields taken from ``defaults``."""
        return replace(self, **{n: getattr(defaults, n) for n in self.field_names()
                                if getattr(self, n) is None and getattr(defaults, n) is not None})

    def replace(self, **changes: Any) -> "QoS":
        return replace(self, **changes)

    @property
    def chunk_bits(self) -> int | None:
        return None if self.Key_chunk_size is None else 8 * self.Key_chunk_size

    @property
    def timeout_s(self) -> float | None:
        return None if self.Timeout is None else self.Timeout / 1000.0

    @property
    def wants_metadata(self) -> bool:
        return bool(self.Metadata_mimetype)


DEFAULT_QOS = QoS(Key_chunk_size=32, Priority=0, Timeout=10_000, TTL=600, Metadata_mimetype=JSON_MIMETYPE)


# ---------------------------------------------------------------------------------------------
# Configuration (from the control plane)

class ConfigError(ValueError):
    """A configuration that contradicts the session it is for."""


@dataclass(frozen=True)
class SessionConfig:
    """What the control plane tells each key manager on a session's route (DESIGN step 4):
    KSID, priority, token-bucket rate and size, inactivity timeout, previous and next hop.
    The physical links towards the hops, the session's VIRT link, the endpoint SAEs and the
    interface complete it where the ETSI 015 objects carry them."""

    ksid: str
    priority: int
    bucket_rate_bps: float
    bucket_size_bits: int
    inactivity_timeout_s: float
    prev_hop: str | None
    next_hop: str | None
    link_prev: str | None = None
    link_next: str | None = None
    virt_link_id: str | None = None
    source_sae: str | None = None
    destination_sae: str | None = None
    interface: str = "004"

    def __post_init__(self) -> None:
        object.__setattr__(self, "ksid", _require_ksid(self.ksid))
        if isinstance(self.priority, bool) or not isinstance(self.priority, int) or not 0 <= self.priority <= UINT32_MAX:
            raise ConfigError("priority must be an unsigned 32-bit integer")
        if (isinstance(self.bucket_rate_bps, bool) or not isinstance(self.bucket_rate_bps, (int, float))
                or not math.isfinite(self.bucket_rate_bps) or self.bucket_rate_bps < 0):
            raise ConfigError("bucket_rate_bps must be a finite number >= 0")
        if isinstance(self.bucket_size_bits, bool) or not isinstance(self.bucket_size_bits, int) or self.bucket_size_bits < 0:
            raise ConfigError("bucket_size_bits must be an integer >= 0")
        if (isinstance(self.inactivity_timeout_s, bool) or not isinstance(self.inactivity_timeout_s, (int, float))
                or not math.isfinite(self.inactivity_timeout_s) or self.inactivity_timeout_s <= 0):
            raise ConfigError("inactivity_timeout_s must be a finite number > 0")
        if self.interface not in INTERFACES:
            raise ConfigError(f"interface must be one of {INTERFACES}")
        for name in ("source_sae", "destination_sae"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"{name} must be a non-empty string or None")
        try:
            self.forwarding_entry()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def forwarding_entry(self) -> ForwardingEntry:
        return ForwardingEntry(self.prev_hop, self.next_hop, self.link_prev, self.link_next, self.virt_link_id)

    @property
    def role(self) -> Role:
        return self.forwarding_entry().role


# ---------------------------------------------------------------------------------------------
# Events and the state machine

class SessionState(StrEnum):
    AUTHENTICATING = "authenticating"
    USER_ACCEPTED = "user_accepted"
    OPERATIVE = "operative"
    KEY_EXCHANGING = "key_exchanging"
    TERMINATED = "terminated"


LIVE_STATES = frozenset({SessionState.AUTHENTICATING, SessionState.USER_ACCEPTED,
                         SessionState.OPERATIVE, SessionState.KEY_EXCHANGING})
SETUP_STATES = frozenset({SessionState.AUTHENTICATING, SessionState.USER_ACCEPTED})
ACTIVE_STATES = frozenset({SessionState.OPERATIVE, SessionState.KEY_EXCHANGING})


@dataclass(frozen=True)
class Event:
    """One timestamped event (the paper's Fig. 4 stream). Never holds key material."""

    timestamp: float
    kind: str
    ksid: str | None
    from_state: str | None = None
    to_state: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"timestamp": self.timestamp, "kind": self.kind, "ksid": self.ksid,
                "from": self.from_state, "to": self.to_state, "details": dict(self.details)}


class InvalidTransition(Exception):
    """An event that the session's current state does not allow."""

    def __init__(self, ksid: str, state: SessionState, event: str):
        super().__init__(f"session {ksid}: {event} not allowed in state {state}")
        self.ksid, self.state, self.event = ksid, state, event


class KMSession:
    """One session at one key manager."""

    def __init__(self, ksid: str, interface: str, local_sae: str, peer_sae: str, source_sae: str,
                 destination_sae: str, role: Role | str, qos: QoS, now: float, *,
                 setup_timeout_s: float | None = None):
        role = Role(role)
        if role is Role.INTERMEDIATE:
            raise ValueError("an intermediate key manager's session comes from its configuration: use from_config()")
        if not all(isinstance(s, str) and s for s in (local_sae, peer_sae, source_sae, destination_sae)):
            raise ValueError("SAE IDs must be non-empty strings")
        if source_sae == destination_sae:
            raise ValueError("source and destination must be different applications")
        expected = (source_sae, destination_sae) if role is Role.SOURCE else (destination_sae, source_sae)
        if (local_sae, peer_sae) != expected:
            raise ValueError(f"a {role} key manager's local SAE must be the session's {role}")
        if setup_timeout_s is not None and not setup_timeout_s > 0:
            raise ValueError("setup_timeout_s must be > 0")
        self._init(ksid, interface, local_sae, peer_sae, source_sae, destination_sae, role, qos, now,
                   SessionState.AUTHENTICATING)
        self._setup_deadline = None if setup_timeout_s is None else now + setup_timeout_s

    def _init(self, ksid, interface, local_sae, peer_sae, source_sae, destination_sae, role, qos, now, state):
        if interface not in INTERFACES:
            raise ValueError(f"interface must be one of {INTERFACES}")
        if not isinstance(qos, QoS):
            raise TypeError("qos must be a QoS")
        self.ksid = _require_ksid(ksid)
        self.interface = interface
        self.local_sae, self.peer_sae = local_sae, peer_sae
        self.source_sae, self.destination_sae = source_sae, destination_sae
        self.role = Role(role)
        self.qos = qos
        self.state = state
        self.created_at = now
        self.user: str | None = None
        self.config: SessionConfig | None = None
        self.end_reason: str | None = None
        self.terminated_at: float | None = None
        self._last_activity = now
        self._in_flight = 0
        self._setup_deadline: float | None = None

    @classmethod
    def implicit_014(cls, ksid: str, master_sae: str, slave_sae: str, qos: QoS, now: float, *,
                     setup_timeout_s: float | None = None) -> "KMSession":
        """The implicit session of an ETSI 014 master/slave pair at the master's key manager,
        opened by its first enc_keys (the master is the source)."""
        return cls(ksid, "014", master_sae, slave_sae, master_sae, slave_sae, Role.SOURCE, qos, now,
                   setup_timeout_s=setup_timeout_s)

    @classmethod
    def from_config(cls, config: SessionConfig, now: float, *, qos: QoS | None = None) -> tuple["KMSession", list[Event]]:
        """A session this key manager learns from the control plane alone: a trusted node in the
        middle of the route, or an endpoint whose application has not called it (ETSI 014 slave
        side, a predefined KSID). It starts operative."""
        role = config.role
        if role is Role.INTERMEDIATE:
            local, peer = None, None
        else:
            if config.source_sae is None or config.destination_sae is None:
                raise ConfigError("an endpoint configuration must name the source and destination SAEs")
            if config.source_sae == config.destination_sae:
                raise ConfigError("source and destination must be different applications")
            local, peer = ((config.source_sae, config.destination_sae) if role is Role.SOURCE
                           else (config.destination_sae, config.source_sae))
        self = cls.__new__(cls)
        self._init(config.ksid, config.interface, local, peer, config.source_sae, config.destination_sae,
                   role, qos or QoS(), now, SessionState.OPERATIVE)
        self.config = config
        return self, [self._event(now, "state_change", None, SessionState.OPERATIVE, by="configuration")]

    def __repr__(self) -> str:
        return (f"KMSession(ksid={self.ksid!r}, interface={self.interface!r}, role={self.role.value!r}, "
                f"state={self.state.value!r}, local_sae={self.local_sae!r}, peer_sae={self.peer_sae!r})")

    # -- queries --------------------------------------------------------------------------

    @property
    def is_live(self) -> bool:
        return self.state in LIVE_STATES

    @property
    def in_flight(self) -> int:
        """Key requests between key_request_started and key_request_done."""
        return self._in_flight

    @property
    def last_activity(self) -> float:
        return self._last_activity

    @property
    def inactivity_deadline(self) -> float | None:
        """When the session ends for inactivity if nothing happens (only while operative)."""
        if self.state is SessionState.OPERATIVE and self.config is not None:
            return self._last_activity + self.config.inactivity_timeout_s
        return None

    @property
    def setup_deadline(self) -> float | None:
        return self._setup_deadline if self.state in SETUP_STATES else None

    @property
    def next_deadline(self) -> float | None:
        return self.inactivity_deadline if self.inactivity_deadline is not None else self.setup_deadline

    # -- events ---------------------------------------------------------------------------

    def authenticated(self, user: str, now: float) -> list[Event]:
        """Access control accepted the caller as ``user``."""
        self._require({SessionState.AUTHENTICATING}, "authenticated")
        if not isinstance(user, str) or not user:
            raise ValueError("user must be a non-empty string")
        self.user = user
        return [self._move(SessionState.USER_ACCEPTED, now, user=user)]

    def rejected(self, reason: str, now: float) -> list[Event]:
        """Access or admission control refused the session."""
        self._require(SETUP_STATES, "rejected")
        return [self._end(now, reason)]

    def configured(self, config: SessionConfig, now: float) -> list[Event]:
        """The control plane's configuration arrived: first one makes the session operative;
        later ones (re-route, new bucket) keep the state."""
        self._require({SessionState.USER_ACCEPTED} | ACTIVE_STATES, "configured")
        self._check_config(config)
        first = self.state is SessionState.USER_ACCEPTED
        self.config = config
        self._last_activity = now
        details = {"priority": config.priority, "rate_bps": config.bucket_rate_bps,
                   "bucket_bits": config.bucket_size_bits, "prev_hop": config.prev_hop, "next_hop": config.next_hop}
        if first:
            return [self._move(SessionState.OPERATIVE, now, **details)]
        return [self._event(now, "reconfigured", self.state, self.state, **details)]

    def key_request_started(self, now: float) -> list[Event]:
        self._require(ACTIVE_STATES, "key_request_started")
        self._in_flight += 1
        self._last_activity = now
        if self.state is SessionState.OPERATIVE:
            return [self._move(SessionState.KEY_EXCHANGING, now)]
        return []

    def key_request_done(self, now: float) -> list[Event]:
        self._require({SessionState.KEY_EXCHANGING}, "key_request_done")
        self._in_flight -= 1
        self._last_activity = now
        if self._in_flight == 0:
            return [self._move(SessionState.OPERATIVE, now)]
        return []

    def activity(self, now: float) -> None:
        """Something used the session (a relay passed, the peer asked for a key): restart the
        inactivity timer."""
        self._require(ACTIVE_STATES, "activity")
        self._last_activity = max(self._last_activity, now)

    def close(self, now: float, reason: str) -> list[Event]:
        """CLOSE from the application, deletion from the control plane, or any other end."""
        self._require(LIVE_STATES, "close")
        return [self._end(now, reason)]

    def tick(self, now: float) -> list[Event]:
        """Timers: inactivity while operative; set-up taking too long before."""
        deadline = self.inactivity_deadline
        if deadline is not None and now >= deadline:
            return [self._end(now, "inactivity")]
        deadline = self.setup_deadline
        if deadline is not None and now >= deadline:
            return [self._end(now, "setup_timeout")]
        return []

    # -- internals ------------------------------------------------------------------------

    def _check_config(self, config: SessionConfig) -> None:
        if config.ksid != self.ksid:
            raise ConfigError(f"configuration for {config.ksid} given to session {self.ksid}")
        if config.role is not self.role:
            raise ConfigError(f"configuration makes this node {config.role}, but it is the session's {self.role}")
        if config.interface != self.interface:
            raise ConfigError("configuration names another interface than the session's")
        for name in ("source_sae", "destination_sae"):
            given = getattr(config, name)
            if given is not None and given != getattr(self, name):
                raise ConfigError(f"configuration's {name} differs from the session's")

    def _require(self, allowed: frozenset[SessionState] | set[SessionState], event: str) -> None:
        if self.state not in allowed:
            raise InvalidTransition(self.ksid, self.state, event)

    def _move(self, to: SessionState, now: float, **details: Any) -> Event:
        before, self.state = self.state, to
        return self._event(now, "state_change", before, to, **details)

    def _end(self, now: float, reason: str) -> Event:
        self.end_reason = reason
        self.terminated_at = now
        self._in_flight = 0
        return self._move(SessionState.TERMINATED, now, reason=reason)

    def _event(self, now: float, kind: str, before: SessionState | None, to: SessionState | None, **details: Any) -> Event:
        return Event(now, kind, self.ksid, None if before is None else before.value,
                     None if to is None else to.value, details)
