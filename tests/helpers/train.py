"""Arguments for tiny training runs: the demo config with the debug overlay (configs/debug/tiny.yaml)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY_OVERLAY = str(REPO / "configs/debug/tiny.yaml")


def tiny_args(tmp_path: Path, *extra: str) -> list[str]:
    """``configs/demo.yaml`` + ``configs/debug/tiny.yaml`` (seconds), with the cache and logs under ``tmp_path``."""
    return [
        "--config", str(REPO / "configs/demo.yaml"),
        "--config", TINY_OVERLAY,
        "--data.cache_dir", str(tmp_path / "cache"),
        "--trainer.default_root_dir", str(tmp_path / "runs"),
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        *extra,
    ]  # fmt: skip
