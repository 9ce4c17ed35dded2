"""Hub failures are fast and short: one check, the actionable message first, `hf download` named; a
GPU config on a machine without a GPU says which overrides run it on the CPU. No test touches the network."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import transformers

import mtsae.hub as hub
from data.lm_source import LMSource, SourceUnavailableError
from mtsae.core_eval import LMUnavailableError, load_causal_lm, load_tokenizer
from tests.lm_helpers import offline_hub
from tests.test_train import tiny_args
from train import CPU_OVERRIDES, ConfigError, cli_main


def _forbid_transformers_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("the hub should not be tried at all")

    for cls in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        monkeypatch.setattr(cls, "from_pretrained", fail)


@pytest.fixture
def empty_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(hub, "_probe_result", False)


def test_offline_fails_at_once_with_the_fix_first(empty_hf_cache, monkeypatch: pytest.MonkeyPatch) -> None:
    offline_hub(monkeypatch)
    _forbid_transformers_loading(monkeypatch)
    src = LMSource(model_name="google/gemma-2-2b", layer=19, dataset="/nonexistent.jsonl", ctx_len=16)
    start = time.monotonic()
    with pytest.raises(SourceUnavailableError) as info:
        _ = src.d_in
    assert time.monotonic() - start < 5
    lines = str(info.value).splitlines()
    assert lines[0] == (
        "cannot load the model 'google/gemma-2-2b': HF_HUB_OFFLINE=1 is set and it is not in the local "
        "Hugging Face cache."
    )
    assert len(lines) <= 3
    assert "`hf download google/gemma-2-2b --local-dir /path/to/local/gemma-2-2b`" in lines[1]
    assert "set data.source.init_args.model_name: /path/to/local/gemma-2-2b" in lines[1]
    assert "huggingface-cli" not in str(info.value)


def test_unreachable_hub_is_probed_once(empty_hf_cache, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    _forbid_transformers_loading(monkeypatch)
    probes = []
    monkeypatch.setattr(
        hub, "_probe", lambda: probes.append(1) or "https://huggingface.co is unreachable (timeout)"
    )
    with pytest.raises(
        LMUnavailableError, match=r"^cannot load the tokenizer of 'google/gemma-2-2b'.*unreachable"
    ):
        load_tokenizer("google/gemma-2-2b")
    with pytest.raises(LMUnavailableError, match="hf download google/gemma-2-2b"):
        load_causal_lm("google/gemma-2-2b")
    assert probes == [1]


def test_cached_model_is_used_without_the_hub(empty_hf_cache, monkeypatch: pytest.MonkeyPatch) -> None:
    offline_hub(monkeypatch)
    monkeypatch.setattr(hub, "_cached", lambda name, revision, repo_type: True)
    hub.check_hub("google/gemma-2-2b", "the model")  # no error: transformers loads the cached copy


def test_local_paths_never_need_the_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub, "_probe", lambda: pytest.fail("a local path must not probe the hub"))
    monkeypatch.setattr(hub, "_probe_result", False)
    hub.check_hub(str(tmp_path), "the model")
    hub.check_hub("./models/gemma", "the model")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_gpu_config_without_a_gpu_names_the_cpu_overrides(tmp_path: Path) -> None:
    args = ["fit", *tiny_args(tmp_path, "--trainer.accelerator", "gpu", "--trainer.devices", "1")]
    with pytest.raises(ConfigError, match="This machine has no GPU; to run this config on the CPU") as info:
        cli_main(args)
    assert CPU_OVERRIDES in str(info.value)
    assert "--trainer.accelerator cpu" in CPU_OVERRIDES and "--trainer.precision 32-true" in CPU_OVERRIDES
    readme = Path(__file__).resolve().parents[1].joinpath("README.md").read_text()
    assert CPU_OVERRIDES in readme
