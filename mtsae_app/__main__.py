"""``python -m mtsae_app ...`` is the ``mtsae`` command."""

import sys

from mtsae_app.cli import main

sys.exit(main())
