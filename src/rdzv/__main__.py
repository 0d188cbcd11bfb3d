"""``python -m rdzv``: the ``rdzv`` command (see ``rdzv.cli``)."""

import sys

from rdzv.cli import main

if __name__ == "__main__":
    sys.exit(main())
