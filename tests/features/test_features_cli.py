"""``mtsae features`` end to end: the data the dashboard is written from (synthetic and language-model runs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mtsae_app.cli as mtsae_cli
from mtsae.features.collect import select_features


def test_synthetic_dashboard_data(synthetic_site: dict) -> None:
    index, feats = synthetic_site["index"], synthetic_site["features"]
    meta = index["meta"]
    assert [r["id"] for r in index["rows"]] == list(range(24)) and sorted(feats) == list(range(24))
    assert meta["has_truth"] and not meta["has_tokens"] and not meta["has_logits"]
    assert meta["dilations"] == [1, 2, 4, 8] and meta["split"] == "val"
    assert meta["n_tokens"] == 64 * 15  # 64 validation rows of 16 tokens, BOS excluded
    live = [f for f in feats.values() if f["n_fire"] > 0]
    assert live, "no feature fired"
    for f in live:
        assert f["truth"]["group"] in ("local", "medium", "slow") and f["truth"]["span"] in (1.0, 8.0, 32.0)
        tops = [e for e in f["examples"] if e["kind"] == "top"]
        assert 1 <= len(tops) <= 12
        maxima = [e["acts"][e["pos"] - e["start"]] for e in tops]
        assert maxima == sorted(maxima, reverse=True)
        assert maxima[0] == pytest.approx(f["max_act"], rel=1e-3, abs=1e-4)
        assert len({e["row"] for e in f["examples"]}) == len(f["examples"])  # one example per sequence
        for e in f["examples"]:
            assert max(e["acts"]) == pytest.approx(e["acts"][e["pos"] - e["start"]], abs=1e-4)
            assert len(e["acts"]) == len(e["tokens"]) == len(e["truth"]) == len(e["valid"])
            a = e["attr"]
            assert a["pre"] == pytest.approx(sum(a["self"]) + sum(a["context"]) + a["bias"], abs=2e-3)
            assert a["act"] == pytest.approx(e["acts"][e["pos"] - e["start"]], abs=1e-3)
            assert 0 <= a["context_share"] <= 1
        assert sum(f["hist"]["counts"]) == f["n_fire"]
        assert f["density"] == pytest.approx(f["n_fire"] / meta["n_tokens"])
        assert 0 <= f["context_share"] <= 1


def test_lm_dashboard_shows_tokens_and_logits(lm_site: dict) -> None:
    from transformers import AutoTokenizer

    meta = lm_site["index"]["meta"]
    assert meta["has_tokens"] and meta["has_logits"] and not meta["has_truth"]
    tok = AutoTokenizer.from_pretrained(str(lm_site["lm"]))
    live = [f for f in lm_site["features"].values() if f["n_fire"] > 0]
    assert live
    for f in live:
        assert len(f["promoted"]) == len(f["suppressed"]) == 10
        assert [v for _, _, v in f["promoted"]] == sorted((v for _, _, v in f["promoted"]), reverse=True)
        assert f["promoted"][0][2] > 0 > f["suppressed"][0][2]
        for e in f["examples"]:
            assert e["text"] == [tok.decode([t], clean_up_tokenization_spaces=False) for t in e["tokens"]]


def test_select_features() -> None:
    assert select_features(None, 5).tolist() == [0, 1, 2, 3, 4]
    assert select_features(["3", "1-2", "3"], 10).tolist() == [1, 2, 3]
    assert select_features(["first:3"], 10).tolist() == [0, 1, 2]
    s = select_features(["sample:4"], 100, seed=1)
    assert len(s) == 4 and torch.equal(s, select_features(["sample:4"], 100, seed=1))
    for bad in (["12"], ["5-2"], ["x"], ["sample:0"]):
        with pytest.raises(ValueError, match="--features"):
            select_features(bad, 10)


def test_clear_errors(synthetic_run: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["features", "--config", str(synthetic_run["config"]), "--out", str(tmp_path / "o")]
    assert mtsae_cli.main([*base, "--ckpt", str(tmp_path / "none.ckpt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert mtsae_cli.main([*base, "--ckpt", str(synthetic_run["ckpt"]), "--features", "999"]) == 2
    assert "0-63" in capsys.readouterr().err
    assert mtsae_cli.main([*base, "--ckpt", str(synthetic_run["ckpt"]), "--n-bins", "10"]) == 2
    assert "power of two" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
