"""``python -m fxconet``: the ``fxconet`` command."""

import sys

from fxconet.cli import main

sys.exit(main())
