"""``python -m kdiff.data``: see :mod:`kdiff.data.cli`."""

import sys

from .cli import main

sys.exit(main())
