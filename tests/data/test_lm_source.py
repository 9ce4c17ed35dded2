"""data.lm_source: document packing and LMSource on a tiny offline model and a local jsonl corpus."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from data.lm_source import LMSource, SourceUnavailableError
from mtsae.lm.hooks import capture_resid_post
from mtsae.lm.text import pack_documents
from tests.helpers.lm import offline_hub, tiny_lm_dir

BOS, EOS = 1, 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_lm_dir(tmp_path_factory, "gemma2")


def _source(tiny: Path, **kw) -> LMSource:
    args = dict(
        model_name=str(tiny),
        layer=1,
        dataset=str(tiny / "corpus.jsonl"),
        ctx_len=16,
        model_dtype="float32",
        device="cpu",
        llm_batch_size=3,
    )
    return LMSource(**{**args, **kw})


# ---------------------------------------------------------------------------------------- packing
def test_pack_documents_nothing_dropped_or_duplicated() -> None:
    docs = [[10 + i] * n for i, n in enumerate([3, 0, 20, 1, 7, 2, 9, 30, 4])]  # one empty, some > a row
    rows = list(pack_documents(iter(docs), ctx_len=8, bos_id=BOS, eos_id=EOS))
    stream = [t for d in docs if d for t in (*d, EOS)]
    assert len(rows) == len(stream) // 7 and all(len(r) == 8 and r[0] == BOS for r in rows)
    body = [t for r in rows for t in r[1:]]
    assert body == stream[: len(body)]  # in order, nothing dropped or duplicated
    assert len(stream) - len(body) < 7  # only the incomplete tail is left out


def test_pack_documents_separators_and_continuation() -> None:
    rows = list(pack_documents([[5, 6, 7], [8, 9, 10, 11, 12, 13]], ctx_len=5, bos_id=BOS, eos_id=EOS))
    # stream: 5 6 7 E 8 9 10 11 12 13 E (11 tokens) -> two rows of 4, tail of 3 left out
    assert rows == [[BOS, 5, 6, 7, EOS], [BOS, 8, 9, 10, 11]]
    assert list(pack_documents([], 4, BOS, EOS)) == []
    with pytest.raises(ValueError, match="ctx_len"):
        list(pack_documents([[1]], 1, BOS, EOS))


# ---------------------------------------------------------------------------------------- LMSource
def test_generate_shapes_dtypes_valid(tiny: Path) -> None:
    src = _source(tiny)
    assert src.d_in == 64 and src._model is None  # d_in from the config, no weights loaded
    chunks = list(src.generate(0, 10, batch_size=4))
    assert [len(c) for c in chunks] == [4, 4, 2]
    acts = torch.cat([c.acts for c in chunks])
    tokens = torch.cat([c.tokens for c in chunks])
    valid = torch.cat([c.valid for c in chunks])
    assert acts.shape == (10, 16, 64) and acts.dtype == torch.float32 and acts.device.type == "cpu"
    assert tokens.dtype == torch.int32 and valid.dtype == torch.bool and valid.shape == (10, 16)
    assert (tokens[:, 0] == BOS).all()
    special = (tokens == BOS) | (tokens == EOS) | (tokens == 0)
    assert (valid == ~special).all() and (tokens == EOS).any() and valid.any()
    assert not acts.is_inference()
    # rows are the corpus, packed: first document right after the first BOS, then EOS
    tok = src._load_tokenizer()
    first = json.loads((tiny / "corpus.jsonl").read_text().splitlines()[0])["text"]
    stream = tok(first, add_special_tokens=False).input_ids + [EOS]
    assert tokens[:, 1:].flatten().tolist()[: len(stream)] == stream
    # activations are resid_post of layer 1 on those tokens
    ref = capture_resid_post(src._load_model(), 1, tokens[:3].long())
    torch.testing.assert_close(acts[:3], ref, rtol=1e-5, atol=1e-5)
    src.close()
    assert src._model is None


def test_generate_resume_equals_slice(tiny: Path) -> None:
    full = _source(tiny)
    acts = torch.cat([c.acts for c in full.generate(0, 9, batch_size=5)])
    tokens = torch.cat([c.tokens for c in full.generate(0, 9, batch_size=5)])
    # a fresh source (packs rows 0..5 without running them), and the same source continuing / rewinding
    for src, (a, b) in [(_source(tiny), (5, 9)), (full, (2, 6)), (full, (6, 9))]:
        chunks = list(src.generate(a, b, batch_size=3))
        torch.testing.assert_close(torch.cat([c.acts for c in chunks]), acts[a:b])
        assert torch.equal(torch.cat([c.tokens for c in chunks]), tokens[a:b])


def test_generate_bfloat16_default(tiny: Path) -> None:
    src = _source(tiny, model_dtype="bfloat16")
    (chunk,) = src.generate(0, 2, batch_size=8)
    assert chunk.acts.dtype == torch.bfloat16 and chunk.acts.shape == (2, 16, 64)
    assert list(src.generate(3, 3, batch_size=8)) == []


def test_generate_runs_out_of_data(tiny: Path, tmp_path: Path) -> None:
    (tmp_path / "small.txt").write_text("The cell binds the membrane.\nA virus crosses the river.\n")
    src = _source(tiny, dataset=str(tmp_path / "small.txt"), ctx_len=8)
    assert len(list(src.generate(0, 1, batch_size=4))) == 1  # .txt: one document per line
    with pytest.raises(ValueError, match=r"small\.txt.*ends after \d+ rows"):
        list(src.generate(0, 50, batch_size=4))


def test_fingerprint(tiny: Path) -> None:
    fp = _source(tiny).fingerprint()
    json.dumps(fp)
    assert fp["source"] == "lm" and fp["hook"] == "resid_post" and fp["layer"] == 1 and fp["ctx_len"] == 16
    assert _source(tiny, layer=2).fingerprint() != fp
    assert _source(tiny, ctx_len=32).fingerprint() != fp
    assert _source(tiny, model_dtype="bfloat16").fingerprint() != fp
    assert _source(tiny, llm_batch_size=7, streaming=False, progress=False).fingerprint() == fp  # same bytes
    assert _source(tiny, shuffle_buffer=100).fingerprint() != fp


def test_fingerprint_identifies_a_local_dataset_file_by_its_bytes(tiny: Path, tmp_path: Path) -> None:
    """An edited corpus at the same path is another cache (the path alone would reuse stale activations)."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes((tiny / "corpus.jsonl").read_bytes())
    fp = _source(tiny, dataset=str(corpus)).fingerprint()
    assert fp["dataset"] == str(corpus) and len(fp["dataset_sha256"]) == 64
    lines = corpus.read_text().splitlines(keepends=True)
    corpus.write_text("".join(reversed(lines)))  # the same documents in another order
    assert _source(tiny, dataset=str(corpus)).fingerprint() != fp
    assert "dataset_sha256" not in _source(tiny, dataset="some/hub-dataset").fingerprint()


def test_check_and_pickle(tiny: Path) -> None:
    src = _source(tiny)
    src.check()
    with pytest.raises(ValueError, match=r"layer=4 is out of range.*4 decoder layers"):
        _source(tiny, layer=4).check()
    with pytest.raises(ValueError, match=r"no column 'body'.*text_column"):
        _source(tiny, text_column="body").check()
    list(src.generate(0, 1, batch_size=1))
    clone = pickle.loads(pickle.dumps(src))
    assert clone._model is None and clone.fingerprint() == src.fingerprint()


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(ctx_len=1), "ctx_len"),
        (dict(model_dtype="int8"), "model_dtype"),
        (dict(layer=-1), "layer"),
        (dict(llm_batch_size=0), "llm_batch_size"),
        (dict(device="gpu0"), "device"),
    ],
)
def test_invalid_arguments(tiny: Path, kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _source(tiny, **kw)


def test_missing_local_model(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    offline_hub(monkeypatch)
    missing = str(tmp_path / "models" / "gemma-2-2b")
    src = _source(tiny, model_name=missing)
    with pytest.raises(SourceUnavailableError) as info:
        src.check()
    msg = str(info.value)
    assert missing in msg and "does not exist" in msg
    assert "data.source.init_args.model_name: /path/to/local/gemma-2-2b" in msg
    with pytest.raises(SourceUnavailableError, match="gemma-2-2b"):
        _ = src.d_in


def test_unreachable_hub_model(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    offline_hub(monkeypatch)
    with pytest.raises(
        SourceUnavailableError, match=r"(?s)'google/gemma-2-2b'.*init_args\.model_name"
    ) as info:
        _source(tiny, model_name="google/gemma-2-2b").check()
    assert isinstance(info.value.__cause__, Exception)  # the hub's error is kept as the cause


@pytest.mark.parametrize("dataset", ["someone/no-such-dataset", "./no/such/file.jsonl"])
def test_unreachable_dataset(tiny: Path, monkeypatch: pytest.MonkeyPatch, dataset: str) -> None:
    offline_hub(monkeypatch)
    with pytest.raises(SourceUnavailableError, match=r"(?s)no-such|no/such.*init_args\.dataset") as info:
        _source(tiny, dataset=dataset).check()
    assert dataset in str(info.value) and "data.source.init_args.dataset:" in str(info.value)
