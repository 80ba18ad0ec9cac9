"""``python -m pneumoseg`` == ``pneumoseg``."""

import sys

from pneumoseg.cli import main

sys.exit(main())
