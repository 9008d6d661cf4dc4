"""etsi015.session: the session configuration on the bus (qkd_app + VIRT qkd_link entries)."""
from __future__ import annotations

import uuid

import pytest

from etsi015 import Etsi015ValidationError
from etsi015.session import (SessionConfig, SessionMappingError, session_entries, session_from_entries,
                             virt_link_id)
from qkdsdn.bus import config_message

KM0, KM2, KM3 = (str(uuid.uuid5(uuid.NAMESPACE_DNS, n)) for n in ("KM0", "KM2", "KM3"))


def relay(ksid: str, **kw) -> SessionConfig:
    base = dict(ksid=ksid, priority=3, bucket_rate_bps=4096, bucket_size_bits=1024, inactivity_timeout_s=30,
                prev_hop=KM2, next_hop=KM3, source_sae="SAE-KM2", destination_sae="SAE-KM3",
                virt_link_id=virt_link_id(ksid), source_qkdn_id=KM2, destination_qkdn_id=KM3)
    base.update(kw)
    return SessionConfig(**base)


def test_entries_round_trip_through_a_bus_message():
    ksid = str(uuid.uuid4())
    config = relay(ksid)
    app, link = session_entries(config, KM0)
    # The shape docs/bus.md shows: bare entries, identities module-qualified.
    assert app["app_id"] == ksid and app["app_qos"] == {"max_bandwidth": 4096, "jitter": 250, "ttl": 30}
    assert app["backing_qkdl_id"] == [virt_link_id(ksid)]
    assert link["qkdl_type"] == "etsi-qkd-node-types:VIRT"
    assert link["virt_prev_hop"] == KM2 and link["virt_next_hop"] == [KM3]
    message = config_message("configure", ksid, qkd_app=app, qkd_link=link)
    assert session_from_entries(message["qkd_app"], message["qkd_link"], KM0) == config


def test_endpoints_default_to_the_configured_node_at_the_ends():
    ksid = str(uuid.uuid4())
    source = relay(ksid, prev_hop=None, next_hop=KM0, source_qkdn_id=None, destination_qkdn_id=KM3)
    app, link = session_entries(source, KM2)
    assert app["local_qkdn_id"] == KM2
    assert session_from_entries(app, link, KM2).source_qkdn_id == KM2


def test_virt_link_id_is_stable_and_distinct_per_session():
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    assert virt_link_id(a) == virt_link_id(a) != virt_link_id(b)
    uuid.UUID(virt_link_id(a))


def test_a_ksid_that_is_not_a_uuid_cannot_be_carried():
    with pytest.raises(ValueError):
        session_entries(relay("not-a-uuid"), KM0)


def test_entries_for_another_node_are_refused_by_the_receiver():
    ksid = str(uuid.uuid4())
    app, link = session_entries(relay(ksid), KM0)
    # KM2 is this configuration's previous hop: it cannot be the node configured.
    with pytest.raises(SessionMappingError):
        session_from_entries(app, link, KM2)


def test_entries_the_model_refuses():
    ksid = str(uuid.uuid4())
    app, link = session_entries(relay(ksid), KM0)
    with pytest.raises(Etsi015ValidationError):
        session_from_entries(dict(app, app_priority=-1), link, KM0)
    with pytest.raises(TypeError):
        session_from_entries([app], link, KM0)
