"""One reader for text datasets: every caller accepts the same file types and gets the same errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mtsae.evals.unlearning.corpora import UnlearningDataError, load_texts
from mtsae.evals.unlearning.mcq import MCQDatasetError, load_mcq
from mtsae.lm.text import FILE_TYPES, DatasetUnavailableError, open_dataset, pack_documents
from tests.helpers.lm import offline_hub

DOCS = ["The first document is long enough to count as text.", "A second document, also long enough here."]


def _write(path: Path) -> Path:
    if path.suffix == ".txt":
        path.write_text("\n".join(DOCS) + "\n")
    elif path.suffix == ".csv":
        path.write_text("text\n" + "\n".join(f'"{d}"' for d in DOCS) + "\n")
    elif path.suffix == ".parquet":
        from datasets import Dataset

        Dataset.from_list([{"text": d} for d in DOCS]).to_parquet(str(path))
    elif path.suffix == ".json":
        path.write_text(json.dumps([{"text": d} for d in DOCS]))
    else:
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    return path


@pytest.mark.parametrize("suffix", sorted(FILE_TYPES))
def test_every_file_type_reads_in_every_reader(tmp_path: Path, suffix: str) -> None:
    path = _write(tmp_path / f"docs{suffix}")
    rows = open_dataset(path, cache_dir=tmp_path / "cache")
    assert rows["text"] == DOCS
    streamed = [r["text"] for r in open_dataset(path, streaming=True)]
    assert streamed == DOCS
    assert load_texts(str(path), min_chars=10) == DOCS  # the unlearning corpora read the same table


def test_unsupported_and_missing_files_raise_the_callers_error(tmp_path: Path, monkeypatch) -> None:
    offline_hub(monkeypatch)
    odd = tmp_path / "docs.xml"
    odd.write_text("<doc/>")
    with pytest.raises(
        DatasetUnavailableError, match=r"unsupported file type '\.xml'.*\.jsonl, \.json, \.txt"
    ):
        open_dataset(odd)
    with pytest.raises(UnlearningDataError, match="does not exist"):
        load_texts(str(tmp_path / "missing.jsonl"))
    with pytest.raises(MCQDatasetError, match="does not exist"):
        load_mcq(tmp_path / "missing.parquet", "wmdp-bio")
    with pytest.raises(DatasetUnavailableError, match=r"(?s)no-such.*my.setting: /path/to/local/no-such"):
        open_dataset("someone/no-such", setting="my.setting")


def test_pack_documents_continues_long_documents_in_the_next_row() -> None:
    rows = list(pack_documents([[1, 2, 3, 4, 5], [], [6, 7]], ctx_len=4, bos_id=0, eos_id=9))
    assert rows == [[0, 1, 2, 3], [0, 4, 5, 9], [0, 6, 7, 9]]
    with pytest.raises(ValueError, match="ctx_len"):
        list(pack_documents([[1]], ctx_len=1, bos_id=0, eos_id=9))
