"""Control plane: os-ken app shells over plain decision classes (routing, monitoring, admission, ...)."""
