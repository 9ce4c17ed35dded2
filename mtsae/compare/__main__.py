"""``python -m mtsae.compare ...`` (the same as ``mtsae compare ...``)."""

import sys

from mtsae.compare.cli import main

sys.exit(main())
