"""``python -m replace_wrap``: the command line (see :mod:`replace_wrap.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
