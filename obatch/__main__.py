"""``python -m obatch`` is the ``obatch`` command."""

import sys

from obatch.cli import main

sys.exit(main())
