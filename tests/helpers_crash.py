"""Child process of the key store's crash test (tests/test_keystore.py).

    python tests/helpers_crash.py DB LOG LINK OWNER

Takes key from LINK's pool in a loop (sizes cycling so that keys are split) and,
only after each ``take`` has returned, appends one line per slice to LOG:
``key_ID offset length sha256(data)``. The parent kills this process with SIGKILL
at a random point, so every logged slice was returned (and, by the store's
contract, consumed on disk) before the kill; a take that committed but was not
logged yet is the only one the log can miss. Writes ``END`` when the pool is dry.
"""
from __future__ import annotations

import hashlib
import os
import sys

SIZES_BITS = (8, 24, 256, 40, 128, 16, 512, 64)


def main(argv: list[str]) -> int:
    db, log_path, link, owner = argv
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from agents.keystore import InsufficientKey, KeyStore

    store = KeyStore(db)
    with open(log_path, "a", encoding="ascii") as log:
        i = 0
        while True:
            try:
                slices = store.take(link, owner, SIZES_BITS[i % len(SIZES_BITS)])
            except InsufficientKey:
                break
            i += 1
            # One write per take: a kill leaves whole lines, or a cut last line the parent ignores.
            log.write("".join(f"{s.key_id} {s.offset} {s.length} {hashlib.sha256(s.data).hexdigest()}\n"
                              for s in slices))
            log.flush()
        log.write("END\n")
        log.flush()
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
