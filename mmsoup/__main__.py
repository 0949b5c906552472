"""`python -m mmsoup`: the command-line interface (see mmsoup.cli)."""

import sys

from mmsoup.cli import main

if __name__ == "__main__":
    sys.exit(main())
