"""Shared helpers of the LM tests: tiny offline language models, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtsae.tiny_lm import build_tiny_lm

__all__ = ["tiny_lm_dir", "offline_hub"]

_BUILT: dict[tuple[int, str], Path] = {}


def tiny_lm_dir(tmp_path_factory: pytest.TempPathFactory, arch: str = "gemma2") -> Path:
    """Folder with a tiny random ``arch`` LM (4 layers, d_model 64), its tokenizer and ``corpus.jsonl``.

    Built once per session and architecture (a few hundred ms each).
    """
    key = (id(tmp_path_factory), arch)
    if key not in _BUILT:
        _BUILT[key] = build_tiny_lm(tmp_path_factory.mktemp(f"tiny_{arch}"), arch=arch)
    return _BUILT[key]


def offline_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every Hugging Face hub access fail at once (no retries against an unreachable network)."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
