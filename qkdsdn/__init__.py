"""qkdsdn: software-defined control and key-management plane for QKD networks."""

__version__ = "0.1.0"
