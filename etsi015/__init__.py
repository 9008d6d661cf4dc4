"""ETSI GS QKD 015 (SDN controller <-> SD-QKD node) in Python.

* ``etsi015.model``    the ``etsi-qkd-sdn-node`` YANG model as dataclasses and identity enums
* ``etsi015.codec``    RFC 7951 JSON encode/decode of the node, its containers, list
  entries and notifications
* ``etsi015.validate`` validation of RFC 7951 documents with instance-path error messages
* ``etsi015.restconf`` RESTCONF client for a node and RFC 8040 error documents
  (imports ``requests``; import it explicitly)

The package depends only on the standard library (and ``requests`` for the client).
"""
from etsi015.codec import *  # noqa: F401,F403
from etsi015.model import *  # noqa: F401,F403
from etsi015.validate import Etsi015ValidationError, Issue  # noqa: F401
