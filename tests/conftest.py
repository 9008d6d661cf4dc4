"""Shared pytest fixtures."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def pki_dir(tmp_path_factory):
    """A PKI for examples/paper-poc.yaml (issued once per test session); returns its PkiLayout."""
    from db import netfile
    from qkdsdn.pki import PkiLayout, init_pki

    out = tmp_path_factory.mktemp("pki")
    init_pki(netfile.load(REPO / "examples" / "paper-poc.yaml"), out)
    return PkiLayout(out)
