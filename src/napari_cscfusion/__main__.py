"""``python -m napari_cscfusion ...``: the ``cscfusion`` command line."""

import sys

from .cli import main

sys.exit(main())
