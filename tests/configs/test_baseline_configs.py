"""Baseline overlays in configs/baselines/: only a model section, same width, compose with their main config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from train import cli_main

#: overlay name prefix -> the main (MTSAE) config it is an overlay of
MAIN_CONFIGS = {"demo": "configs/demo.yaml", "gemma": "configs/gemma_l19.yaml"}
KINDS = ("relu", "topk", "batchtopk", "jumprelu")
OVERLAYS = sorted(str(p) for p in Path("configs/baselines").glob("*.yaml"))
_MAIN_PRINTED: dict[str, dict] = {}  # main config -> its printed config (parsed once per session)


def _main_of(overlay: str) -> str:
    prefix = Path(overlay).stem.split("_")[0]
    assert prefix in MAIN_CONFIGS, f"{overlay}: name it <{'|'.join(MAIN_CONFIGS)}>_<kind>.yaml"
    return MAIN_CONFIGS[prefix]


def _printed(args: list[str], capsys: pytest.CaptureFixture) -> dict:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli_main(["fit", *args, "--print_config"])
    assert e.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("prefix", sorted(MAIN_CONFIGS))
def test_every_baseline_kind_exists(prefix: str) -> None:
    for kind in KINDS:
        assert Path(f"configs/baselines/{prefix}_{kind}.yaml").is_file(), f"{prefix}_{kind}.yaml is missing"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_changes_only_the_model(overlay: str) -> None:
    content = yaml.safe_load(Path(overlay).read_text())
    assert set(content) == {"model"}, f"{overlay} must contain only a model: section, has {sorted(content)}"
    model = content["model"]
    assert model["dilations"] == [], "a baseline is a per-token SAE"
    assert model["separation"] == "none"
    kind = Path(overlay).stem.split("_", 1)[1]
    assert model["activation"] == kind
    if kind in ("topk", "batchtopk"):
        assert isinstance(model["activation_kwargs"]["k"], int)
    main = _main_of(overlay)
    if "d_sae" in model and Path(main).is_file():
        assert model["d_sae"] == yaml.safe_load(Path(main).read_text())["model"]["d_sae"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_composes_with_its_main_config(overlay: str, capsys: pytest.CaptureFixture) -> None:
    main = _main_of(overlay)
    if not Path(main).is_file():
        pytest.skip(f"{main} does not exist yet")
    if main not in _MAIN_PRINTED:
        _MAIN_PRINTED[main] = _printed(["--config", main], capsys)
    alone = _MAIN_PRINTED[main]
    both = _printed(["--config", main, "--config", overlay], capsys)
    # same width, data, seed and budget; the model is what the overlay says
    assert both["model"]["d_sae"] == alone["model"]["d_sae"]
    for section in ("data", "trainer", "seed_everything"):
        assert both[section] == alone[section], section
    for key, value in yaml.safe_load(Path(overlay).read_text())["model"].items():
        assert both["model"][key] == value, key
