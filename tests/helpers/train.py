"""Arguments for tiny training runs: the demo config with the debug overlays (``configs/debug/``)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY_OVERLAY = str(REPO / "configs/debug/tiny.yaml")
QUIET_OVERLAY = str(REPO / "configs/debug/quiet.yaml")


def tiny_args(tmp_path: Path, *extra: str) -> list[str]:
    """``configs/demo.yaml`` + ``configs/debug/tiny.yaml`` (seconds) + ``configs/debug/quiet.yaml``.

    The cache and logs go under ``tmp_path``.
    """
    return [
        "--config", str(REPO / "configs/demo.yaml"),
        "--config", TINY_OVERLAY,
        "--config", QUIET_OVERLAY,
        "--data.cache_dir", str(tmp_path / "cache"),
        "--trainer.default_root_dir", str(tmp_path / "runs"),
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        *extra,
    ]  # fmt: skip
