"""Key-management plane: the per-node SDN agent, the virtual key manager and its QKD device drivers."""
