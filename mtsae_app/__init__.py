"""The ``mtsae`` command line: ``mtsae eval``, ``mtsae features``, ``mtsae unlearn``, ``mtsae compare``, ``mtsae cache``, ``mtsae example``."""
