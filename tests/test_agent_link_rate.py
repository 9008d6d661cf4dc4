"""The key rate a key manager reports for a link (ETSI 015 skr, the controller's routing
capacity): a full pool takes no key, which must not read as a link that makes none."""
from __future__ import annotations

import pytest

from agents.service import FULL_POOL_SHARE, link_key_rate

MAX = 1_000_000


def test_the_devices_own_rate_comes_first():
    assert link_key_rate(0.0, 200_000.0, MAX, MAX, 50_000.0) == 200_000.0
    assert link_key_rate(90_000.0, 0.0, 0, MAX, 50_000.0) == 0.0  # a cut link makes none, full pool or not


def test_while_filling_the_arrival_rate_is_the_link_rate():
    assert link_key_rate(180_000.0, None, MAX // 2, MAX, 250_000.0) == 180_000.0


@pytest.mark.parametrize("pool_bits", [int(FULL_POOL_SHARE * MAX), MAX])
def test_a_full_pool_keeps_the_rate_measured_while_it_filled(pool_bits):
    assert link_key_rate(0.0, None, pool_bits, MAX, 180_000.0) == 180_000.0
    assert link_key_rate(200_000.0, None, pool_bits, MAX, 180_000.0) == 200_000.0
