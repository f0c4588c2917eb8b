"""``python -m jaxckpt``: the command-line tool (see `jaxckpt._cli`)."""

import sys

from jaxckpt._cli import main

if __name__ == "__main__":
  sys.exit(main())
