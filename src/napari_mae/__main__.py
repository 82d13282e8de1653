"""``python -m napari_mae``: same as ``python -m napari_mae.cli`` and the ``napari-mae`` console script."""

import sys

from napari_mae.cli import main

sys.exit(main())
