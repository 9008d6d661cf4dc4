"""YANG types of the ETSI GS QKD 015 model and their RFC 7951 JSON encoding.

Each type checks a raw JSON value (``parse``: JSON -> Python, raising
``ValueError`` with a message fit for an error report) and serialises a Python
value (``serialize``: Python -> JSON). The rules follow RFC 7951 sec. 6:
integers up to 32 bits are JSON numbers, 64-bit integers and decimal64 are JSON
strings, ``empty`` is ``[null]``, identityrefs are module-qualified strings.

Python values used by the model:

* integers: ``int``
* decimal64: ``decimal.Decimal`` (``int``, ``str`` and ``float`` are accepted
  when serialising; a float is rounded to the type's fraction digits because a
  binary float cannot be exact anyway)
* ``yang:date-and-time``: ``str`` in RFC 3339 form (a timezone-aware
  ``datetime`` is accepted when serialising; see ``format_date_and_time``)
* ``yang:uuid``, ``inet:uri``, strings: ``str``; ``uuid.UUID`` is accepted for uuids
* identityrefs: members of an ``etsi015.model.Identity`` enum
"""
from __future__ import annotations

import calendar
import decimal
import math
import re
import uuid
from datetime import datetime, timedelta, timezone
from enum import Enum
from typing import Any, Callable

__all__ = [
    "YangType", "Integer", "Decimal64", "String", "Boolean", "Empty", "IdentityRef",
    "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "STRING", "BOOLEAN", "EMPTY", "UUID", "DATE_AND_TIME", "URI", "WAVELENGTH",
    "WAVELENGTH_RANGE", "DECIMAL64_3", "format_date_and_time", "parse_date_and_time",
]


def _json_kind(raw: Any) -> str:
    """Name of a JSON value's type, for error messages."""
    if raw is None:
        return "null"
    if isinstance(raw, bool):
        return "boolean"
    if isinstance(raw, (int, float)):
        return "number"
    if isinstance(raw, str):
        return "string"
    if isinstance(raw, list):
        return "array"
    if isinstance(raw, dict):
        return "object"
    return type(raw).__name__


class YangType:
    """A leaf type: ``name`` is the YANG type name used in messages."""

    name = "?"

    def parse(self, raw: Any) -> Any:
        raise NotImplementedError

    def serialize(self, value: Any) -> Any:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<YangType {self.name}>"


class Integer(YangType):
    """intN / uintN. 64-bit values travel as JSON strings (RFC 7951 sec. 6.1)."""

    _LEXICAL = re.compile(r"[+-]?[0-9]+")

    def __init__(self, name: str, bits: int, signed: bool):
        self.name = name
        self.bits = bits
        self.as_string = bits == 64
        self.lo = -(1 << (bits - 1)) if signed else 0
        self.hi = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1

    def _check_range(self, value: int) -> int:
        if not self.lo <= value <= self.hi:
            raise ValueError(f"{value} is out of range for {self.name} ({self.lo}..{self.hi})")
        return value

    def parse(self, raw: Any) -> int:
        if self.as_string:
            if not isinstance(raw, str):
                raise ValueError(f"expected {self.name} as a JSON string (RFC 7951 sec. 6.1), "
                                 f"got {_json_kind(raw)}")
            if not self._LEXICAL.fullmatch(raw):
                raise ValueError(f"{raw!r} is not a valid {self.name}")
            return self._check_range(int(raw))
        # bool is an int subclass in Python but never a YANG integer.
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ValueError(f"expected {self.name} as a JSON number, got {_json_kind(raw)}"
                             + (f" {raw!r}" if isinstance(raw, (str, float)) else ""))
        return self._check_range(raw)

    def serialize(self, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an int for {self.name}, got {type(value).__name__}")
        self._check_range(value)
        return str(value) if self.as_string else value


class Decimal64(YangType):
    """decimal64 with a fixed number of fraction digits; a JSON string (RFC 7951 sec. 6.1)."""

    _LEXICAL = re.compile(r"[+-]?[0-9]+(\.[0-9]+)?")

    def __init__(self, fraction_digits: int):
        if not 1 <= fraction_digits <= 18:
            raise ValueError("fraction-digits must be 1..18")
        self.fraction_digits = fraction_digits
        self.name = f"decimal64 (fraction-digits {fraction_digits})"
        self._quantum = decimal.Decimal(1).scaleb(-fraction_digits)
        scale = decimal.Decimal(10) ** fraction_digits
        self.lo = decimal.Decimal(-(1 << 63)) / scale
        self.hi = decimal.Decimal((1 << 63) - 1) / scale

    def _check(self, value: decimal.Decimal) -> decimal.Decimal:
        # Range first: quantize() fails on numbers wider than the decimal context.
        if not self.lo <= value <= self.hi:
            raise ValueError(f"{value} is out of range for {self.name} ({self.lo}..{self.hi})")
        exact = value.quantize(self._quantum)
        if exact != value:
            raise ValueError(f"{value} has more than {self.fraction_digits} fraction digits")
        return exact

    def parse(self, raw: Any) -> decimal.Decimal:
        if not isinstance(raw, str):
            raise ValueError(f"expected {self.name} as a JSON string (RFC 7951 sec. 6.1), "
                             f"got {_json_kind(raw)}")
        match = self._LEXICAL.fullmatch(raw)
        if not match:
            raise ValueError(f"{raw!r} is not a valid decimal64 number")
        if match.group(1) and len(match.group(1)) - 1 > self.fraction_digits:
            raise ValueError(f"{raw!r} has more than {self.fraction_digits} fraction digits")
        return self._check(decimal.Decimal(raw))

    def canonical(self, value: decimal.Decimal) -> str:
        """RFC 7950 sec. 9.3.2: no leading/trailing zeros, at least one digit each side."""
        text = format(value.quantize(self._quantum), "f")
        if text.startswith("-") and decimal.Decimal(text) == 0:
            text = text[1:]
        whole, _, frac = text.partition(".")
        frac = frac.rstrip("0") or "0"
        return f"{whole}.{frac}"

    def coerce(self, value: Any) -> decimal.Decimal:
        """A Python number as the Decimal this type stores (floats are rounded)."""
        if isinstance(value, bool):
            raise ValueError(f"expected a number for {self.name}, got bool")
        if isinstance(value, float):
            if not math.isfinite(value):
                raise ValueError(f"{value} is not a finite number")
            value = decimal.Decimal(repr(value)).quantize(self._quantum, decimal.ROUND_HALF_EVEN)
        elif isinstance(value, int):
            value = decimal.Decimal(value)
        elif isinstance(value, str):
            return self.parse(value)
        elif not isinstance(value, decimal.Decimal):
            raise ValueError(f"expected a Decimal for {self.name}, got {type(value).__name__}")
        if not value.is_finite():
            raise ValueError(f"{value} is not a finite number")
        return self._check(value)

    def serialize(self, value: Any) -> str:
        return self.canonical(self.coerce(value))


class String(YangType):
    """string with optional XSD patterns (all must match, implicitly anchored) and a check."""

    def __init__(self, name: str = "string", patterns: tuple[str, ...] = (),
                 check: Callable[[str], None] | None = None,
                 accepts: tuple[type, ...] = ()):
        self.name = name
        self._patterns = tuple(re.compile(p) for p in patterns)
        self._check = check
        # Extra Python types accepted when serialising (turned into str).
        self._accepts = accepts

    def parse(self, raw: Any) -> str:
        if not isinstance(raw, str):
            raise ValueError(f"expected {self.name} as a JSON string, got {_json_kind(raw)}")
        for pattern in self._patterns:
            if not pattern.fullmatch(raw):
                raise ValueError(f"{raw!r} is not a valid {self.name} "
                                 f"(pattern {pattern.pattern!r})")
        if self._check is not None:
            self._check(raw)
        return raw

    def serialize(self, value: Any) -> str:
        if self._accepts and isinstance(value, self._accepts):
            value = self._convert(value)
        if not isinstance(value, str):
            raise ValueError(f"expected a str for {self.name}, got {type(value).__name__}")
        return self.parse(value)

    def _convert(self, value: Any) -> str:
        if isinstance(value, datetime):
            return format_date_and_time(value)
        return str(value)


class Boolean(YangType):
    name = "boolean"

    def parse(self, raw: Any) -> bool:
        if not isinstance(raw, bool):
            raise ValueError(f"expected a JSON boolean (true/false), got {_json_kind(raw)}"
                             + (f" {raw!r}" if isinstance(raw, (str, int, float)) else ""))
        return raw

    def serialize(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise ValueError(f"expected a bool, got {type(value).__name__}")
        return value


class Empty(YangType):
    """YANG ``empty``: present or not; ``[null]`` in JSON (RFC 7951 sec. 6.9)."""

    name = "empty"

    def parse(self, raw: Any) -> bool:
        if raw != [None]:
            raise ValueError(f"expected [null] for type empty, got {_json_kind(raw)}")
        return True

    def serialize(self, value: Any) -> list:
        if value is not True:
            raise ValueError("an empty-type leaf is set with True (absent: None)")
        return [None]


class IdentityRef(YangType):
    """identityref to identities derived from one base; values are Identity enum members."""

    def __init__(self, enum_cls: type[Enum]):
        self.enum_cls = enum_cls
        self.name = f"identityref (base {enum_cls.BASE})"  # type: ignore[attr-defined]

    def parse(self, raw: Any) -> Enum:
        if not isinstance(raw, str):
            raise ValueError(f"expected an identity name as a JSON string, got {_json_kind(raw)}")
        return self.enum_cls.from_json(raw)  # type: ignore[attr-defined]

    def serialize(self, value: Any) -> str:
        if isinstance(value, self.enum_cls):
            return value.value
        if isinstance(value, str):
            # Python callers may pass the wire string; it is checked like any input.
            return self.parse(value).value
        raise ValueError(f"expected a {self.enum_cls.__name__} member, got {type(value).__name__}")


# --------------------------------------------------------------------------- date-and-time

_DATE_AND_TIME = re.compile(
    r"(?P<y>\d{4})-(?P<mo>\d{2})-(?P<d>\d{2})T(?P<h>\d{2}):(?P<mi>\d{2}):(?P<s>\d{2})"
    r"(?P<frac>\.\d+)?(?P<tz>Z|[+-]\d{2}:\d{2})")


def _check_date_and_time(text: str) -> None:
    """The calendar rules the ietf-yang-types pattern cannot express (RFC 3339 sec. 5.7)."""
    m = _DATE_AND_TIME.fullmatch(text)
    if m is None:  # the pattern ran before; kept for direct callers
        raise ValueError(f"{text!r} is not a valid yang:date-and-time")
    year, month, day = int(m["y"]), int(m["mo"]), int(m["d"])
    if not 1 <= month <= 12:
        raise ValueError(f"{text!r}: month {month} is not 1..12")
    if not 1 <= day <= calendar.monthrange(year, month)[1]:
        raise ValueError(f"{text!r}: day {day} does not exist in {year:04d}-{month:02d}")
    # Second 60 is a leap second, allowed by RFC 3339.
    if int(m["h"]) > 23 or int(m["mi"]) > 59 or int(m["s"]) > 60:
        raise ValueError(f"{text!r}: time of day out of range")
    tz = m["tz"]
    if tz != "Z" and (int(tz[1:3]) > 23 or int(tz[4:6]) > 59):
        raise ValueError(f"{text!r}: timezone offset out of range")


def format_date_and_time(value: datetime) -> str:
    """A timezone-aware datetime as yang:date-and-time (UTC is written with 'Z')."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("yang:date-and-time needs a timezone-aware datetime")
    offset = value.utcoffset()
    text = value.isoformat(timespec="microseconds" if value.microsecond else "seconds")
    if offset == timedelta(0):
        text = text[: -len("+00:00")] + "Z"
    return text


def parse_date_and_time(text: str) -> datetime:
    """yang:date-and-time as an aware datetime (fractions beyond microseconds are cut;
    a leap second 60 becomes 59.999999)."""
    DATE_AND_TIME.parse(text)
    m = _DATE_AND_TIME.fullmatch(text)
    assert m is not None
    second = int(m["s"])
    frac = (m["frac"] or ".0")[1:]
    micro = int((frac + "000000")[:6])
    if second == 60:
        second, micro = 59, 999999
    tz = m["tz"]
    if tz == "Z" or tz == "-00:00":
        tzinfo = timezone.utc
    else:
        sign = 1 if tz[0] == "+" else -1
        tzinfo = timezone(sign * timedelta(hours=int(tz[1:3]), minutes=int(tz[4:6])))
    return datetime(int(m["y"]), int(m["mo"]), int(m["d"]), int(m["h"]), int(m["mi"]),
                    second, micro, tzinfo=tzinfo)


# --------------------------------------------------------------------------- instances

UINT8 = Integer("uint8", 8, False)
UINT16 = Integer("uint16", 16, False)
UINT32 = Integer("uint32", 32, False)
UINT64 = Integer("uint64", 64, False)
INT8 = Integer("int8", 8, True)
INT16 = Integer("int16", 16, True)
INT32 = Integer("int32", 32, True)
INT64 = Integer("int64", 64, True)
STRING = String()
BOOLEAN = Boolean()
EMPTY = Empty()
DECIMAL64_3 = Decimal64(3)

# ietf-yang-types (RFC 6991)
UUID = String("yang:uuid", (
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",),
    accepts=(uuid.UUID,))
DATE_AND_TIME = String("yang:date-and-time", (
    r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[\+\-]\d{2}:\d{2})",),
    check=_check_date_and_time, accepts=(datetime,))
# ietf-inet-types (RFC 6991): inet:uri has no pattern.
URI = String("inet:uri")
# etsi-qkd-node-types
WAVELENGTH = String("etsi-qkdn-types:wavelength", (r"([1-9][0-9]{0,3})",), accepts=(int,))
WAVELENGTH_RANGE = String("etsi-qkdn-types:wavelength-range-type", (
    r"([1-9][0-9]{0,3}(-[1-9][0-9]{0,3})?(,[1-9][0-9]{0,3}(-[1-9][0-9]{0,3})?)*)",))
