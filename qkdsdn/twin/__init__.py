"""Digital twin of QKD links: emulated devices, their physics model, key generation and ETSI 014 delivery."""
