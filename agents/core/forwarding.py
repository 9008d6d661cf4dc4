"""Forwarding table of a key manager: for each session (KSID), its neighbours on the route.

A key manager knows only its previous and next hop on a session's path, never the whole
route (DESIGN, session life cycle step 4). The entry comes from the ETSI 015 configuration:
the VIRT ``qkd_link``'s ``virt_prev_hop`` / ``virt_next_hop`` (neighbours' ``qkdn_id``), plus
the physical links (``qkdl_id``) towards them, whose key pools carry the session's keys.

The hops say the node's role: no previous hop = the route starts here (source); no next hop
= it ends here (destination); both = a trusted node in between (intermediate).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Iterator


class Role(StrEnum):
    SOURCE = "source"
    DESTINATION = "destination"
    INTERMEDIATE = "intermediate"


@dataclass(frozen=True)
class ForwardingEntry:
    prev_hop: str | None
    next_hop: str | None
    link_prev: str | None = None  # qkdl_id of the physical link towards prev_hop
    link_next: str | None = None  # qkdl_id of the physical link towards next_hop
    virt_link_id: str | None = None  # the session's VIRT qkd_link

    def __post_init__(self) -> None:
        for name in ("prev_hop", "next_hop", "link_prev", "link_next", "virt_link_id"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"forwarding entry: {name} must be a non-empty string or None")
        if self.prev_hop is None and self.next_hop is None:
            raise ValueError("forwarding entry needs a previous or a next hop")
        if self.prev_hop is not None and self.prev_hop == self.next_hop:
            raise ValueError("forwarding entry: previous and next hop are the same node")
        if self.link_prev is not None and self.prev_hop is None:
            raise ValueError("forwarding entry: link_prev given without a previous hop")
        if self.link_next is not None and self.next_hop is None:
            raise ValueError("forwarding entry: link_next given without a next hop")

    @property
    def role(self) -> Role:
        if self.prev_hop is None:
            return Role.SOURCE
        if self.next_hop is None:
            return Role.DESTINATION
        return Role.INTERMEDIATE


class ForwardingTable:
    """KSID -> ForwardingEntry. Replacing an entry is one step: there is never a moment
    without a route for a session that is being re-routed."""

    def __init__(self) -> None:
        self._entries: dict[str, ForwardingEntry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, ksid: object) -> bool:
        return ksid in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def items(self) -> list[tuple[str, ForwardingEntry]]:
        return list(self._entries.items())

    def get(self, ksid: str) -> ForwardingEntry | None:
        return self._entries.get(ksid)

    def set(self, ksid: str, entry: ForwardingEntry) -> None:
        """Install the entry of a session that has none (use ``replace`` to re-route)."""
        if not isinstance(entry, ForwardingEntry):
            raise TypeError("entry must be a ForwardingEntry")
        if ksid in self._entries:
            raise ValueError(f"session {ksid} already has a forwarding entry; use replace()")
        self._entries[ksid] = entry

    def replace(self, ksid: str, entry: ForwardingEntry) -> ForwardingEntry:
        """Re-route: install the new entry and return the old one, whose resources (e.g. the old
        next hop's relay state) the caller releases only now that the new route is in place.
        A re-route never changes what this node is on the route."""
        if not isinstance(entry, ForwardingEntry):
            raise TypeError("entry must be a ForwardingEntry")
        old = self._entries.get(ksid)
        if old is None:
            raise KeyError(ksid)
        if old.role is not entry.role:
            raise ValueError(f"re-route of {ksid} would change this node's role from {old.role} to {entry.role}")
        self._entries[ksid] = entry
        return old

    def remove(self, ksid: str) -> ForwardingEntry:
        return self._entries.pop(ksid)

    def discard(self, ksid: str) -> ForwardingEntry | None:
        return self._entries.pop(ksid, None)

    def role(self, ksid: str) -> Role:
        """This node's role on the session's route; KeyError if the session has no entry."""
        return self._entries[ksid].role

    def sessions_via(self, neighbour: str) -> list[str]:
        """KSIDs routed through a neighbouring node (for a link or node failure)."""
        return [k for k, e in self._entries.items() if neighbour in (e.prev_hop, e.next_hop)]

    def sessions_on_link(self, qkdl_id: str) -> list[str]:
        """KSIDs whose keys travel over a physical link."""
        return [k for k, e in self._entries.items() if qkdl_id in (e.link_prev, e.link_next)]
