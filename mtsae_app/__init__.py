"""The ``mtsae`` command line: ``mtsae eval``, ``mtsae unlearn``, ``mtsae compare``, ``mtsae cache``."""
