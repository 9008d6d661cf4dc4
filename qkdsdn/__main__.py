"""``python -m qkdsdn`` is the ``qkdsdn`` command."""
import sys

from qkdsdn.cli import main

sys.exit(main())
