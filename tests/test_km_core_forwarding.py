"""ForwardingTable: roles from the hops, atomic re-route, lookups."""
from __future__ import annotations

import pytest

from agents.core.forwarding import ForwardingEntry, ForwardingTable, Role

K1, K2, K3 = "ksid-1", "ksid-2", "ksid-3"


def test_roles_from_the_hops():
    t = ForwardingTable()
    t.set(K1, ForwardingEntry(None, "KM0", link_next="L20"))
    t.set(K2, ForwardingEntry("KM2", "KM3", link_prev="L20", link_next="L03", virt_link_id="v1"))
    t.set(K3, ForwardingEntry("KM0", None, link_prev="L03"))
    assert t.role(K1) == "source" and t.role(K1) is Role.SOURCE
    assert t.role(K2) == "intermediate"
    assert t.role(K3) == "destination"
    with pytest.raises(KeyError):
        t.role("nope")


@pytest.mark.parametrize("kwargs", [
    dict(prev_hop=None, next_hop=None),
    dict(prev_hop="A", next_hop="A"),
    dict(prev_hop=None, next_hop="B", link_prev="L1"),
    dict(prev_hop="A", next_hop=None, link_next="L1"),
    dict(prev_hop="", next_hop="B"),
])
def test_invalid_entries(kwargs):
    with pytest.raises(ValueError):
        ForwardingEntry(**kwargs)


def test_set_refuses_to_overwrite_and_replace_returns_the_old_entry():
    t = ForwardingTable()
    old = ForwardingEntry("KM2", "KM0", "L2", "L0")
    t.set(K1, old)
    with pytest.raises(ValueError):
        t.set(K1, ForwardingEntry("KM2", "KM5"))
    new = ForwardingEntry("KM2", "KM5", "L2", "L5")
    assert t.replace(K1, new) is old
    assert t.get(K1) is new
    with pytest.raises(KeyError):
        t.replace(K2, new)


def test_reroute_cannot_change_the_role():
    t = ForwardingTable()
    t.set(K1, ForwardingEntry(None, "KM0"))
    with pytest.raises(ValueError):
        t.replace(K1, ForwardingEntry("KM3", "KM0"))
    assert t.get(K1) == ForwardingEntry(None, "KM0")


def test_remove_and_lookups_by_neighbour_and_link():
    t = ForwardingTable()
    t.set(K1, ForwardingEntry(None, "KM0", link_next="L10"))
    t.set(K2, ForwardingEntry("KM0", "KM4", link_prev="L10", link_next="L04"))
    assert t.sessions_via("KM0") == [K1, K2]
    assert t.sessions_on_link("L04") == [K2]
    assert t.remove(K1).next_hop == "KM0"
    assert t.discard(K1) is None
    with pytest.raises(KeyError):
        t.remove(K1)
    assert list(t) == [K2] and len(t) == 1 and K2 in t
