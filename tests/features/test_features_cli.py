"""``mtsae features`` end to end: the data the dashboard is written from (synthetic and language-model runs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mtsae_app.cli as mtsae_cli
from mtsae import MTSAE, SAEMetadata
from mtsae.features.collect import select_features
from mtsae.sae.saelens import save_saelens
from tests.features.conftest import read_site
from tests.helpers.lm import offline_hub


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
    (tmp_path / "file").write_text("")
    out_file = ["features", "--config", str(synthetic_run["config"]), "--out", str(tmp_path / "file")]
    assert mtsae_cli.main([*out_file, "--ckpt", str(synthetic_run["ckpt"])]) == 2
    assert "--out" in capsys.readouterr().err and (tmp_path / "file").read_text() == ""


def test_exported_sae_folder_gives_the_checkpoints_dashboard(
    synthetic_run: dict, synthetic_site: dict
) -> None:
    """``--sae run_dir/sae`` (the export: the input scale folded in) shows what ``--ckpt`` shows."""
    out = synthetic_run["tmp"] / "site_sae"
    sae_dir = synthetic_run["config"].parent / "sae"
    args = ["features", "--sae", str(sae_dir), "--config", str(synthetic_run["config"]), "--out", str(out)]
    assert mtsae_cli.main([*args, "--features", "0-23", "--no-progress"]) == 0
    got, want = read_site(out)["index"]["rows"], synthetic_site["index"]["rows"]
    assert [r["id"] for r in got] == [r["id"] for r in want]
    for a, b in zip(got, want, strict=True):
        assert a["density"] == pytest.approx(b["density"])
        assert a["max_act"] == pytest.approx(b["max_act"], rel=1e-4, abs=1e-5)


def test_saelens_folder_on_the_lm(lm_site: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """A per-token SAE in SAELens's format (as a public release) on the tiny LM: tokens and logit effects,
    no context attribution."""
    offline_hub(monkeypatch)
    monkeypatch.chdir(lm_site["tmp"])
    sae = MTSAE(64, 32, dilations=[], activation="relu")
    with torch.no_grad():
        sae.b_enc.fill_(-0.5)
    meta = SAEMetadata(model_name="tiny-gemma", layer=2, hook_name="blocks.2.hook_resid_post")
    folder = save_saelens(sae, lm_site["tmp"] / "public_sae", meta)
    out = lm_site["tmp"] / "site_saelens"
    args = ["features", "--sae", str(folder), "--config", str(lm_site["config"]), "--out", str(out)]
    assert mtsae_cli.main([*args, "--no-progress", "--device", "cpu"]) == 0
    site = read_site(out)
    meta_out = site["index"]["meta"]
    assert meta_out["dilations"] == [] and meta_out["has_logits"] and meta_out["n_features_shown"] == 32
    live = [f for f in site["features"].values() if f["n_fire"]]
    assert live and all("context_share" not in f and "attr" not in f["examples"][0] for f in live)
    assert all(len(f["promoted"]) == 10 for f in live)
