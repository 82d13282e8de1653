"""``python -m napari_mae.cli``: same as the ``napari-mae`` console script."""

import sys

from napari_mae.cli import main

sys.exit(main())
