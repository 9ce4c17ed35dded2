"""Shared helpers of the LM tests: tiny offline language models, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtsae.lm.tiny_lm import build_tiny_lm
from tests.helpers.train import QUIET_OVERLAY, REPO

__all__ = ["tiny_lm_dir", "offline_hub", "tiny_lm_args"]

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


def tiny_lm_args(lm: Path, cache_dir: Path, runs: Path, steps: int) -> list[str]:
    """``configs/tiny_lm.yaml`` + ``configs/debug/quiet.yaml`` pointed at the tiny LM in ``lm``.

    Caches and logs go under tmp folders.
    """
    return [
        "--config", str(REPO / "configs/tiny_lm.yaml"),
        "--config", QUIET_OVERLAY,
        "--data.source.init_args.model_name", str(lm),
        "--data.source.init_args.dataset", str(lm / "corpus.jsonl"),
        "--data.source.init_args.progress", "false",
        "--data.num_workers", "0",
        "--data.cache_dir", str(cache_dir),
        "--trainer.default_root_dir", str(runs),
        "--trainer.logger.init_args.save_dir", str(runs),
        "--trainer.max_steps", str(steps),
    ]  # fmt: skip
