"""Text for language models: reading text datasets (hub name, local folder or local file) and packing
tokenized documents into rows of ``[BOS] + (ctx_len - 1)`` tokens.

One table of file types (:data:`FILE_TYPES`) and one error (:class:`DatasetUnavailableError`, with the
fix in its message) serve every reader: :class:`data.LMSource`, the unlearning corpora and the
multiple-choice question sets. Two packing rules live here side by side: this project's
(:func:`pack_documents`, :func:`pack_rows`: documents joined with EOS, every row starts with BOS, no
token overwritten) and SAEBench's (:func:`pack_rows_saebench`, reproduced exactly for its unlearning
evaluation).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mtsae.lm.hub import check_hub, download_command, is_local
from mtsae.lm.loading import LMUnavailableError, special_ids

__all__ = [
    "DatasetUnavailableError",
    "FILE_TYPES",
    "dataset_error",
    "looks_local",
    "open_dataset",
    "pack_documents",
    "pack_rows",
    "pack_rows_saebench",
    "tokenize_documents",
]

#: local file suffix -> the ``datasets`` builder that reads it (``.txt``: one document per line)
FILE_TYPES: dict[str, str] = {
    ".jsonl": "json",
    ".json": "json",
    ".txt": "text",
    ".parquet": "parquet",
    ".csv": "csv",
}

_TOKENIZE_BATCH = 64  # documents per call of the (fast, Rust) tokenizer


class DatasetUnavailableError(LMUnavailableError):
    """A text dataset cannot be read (missing file, unsupported file type, no network)."""


def looks_local(name: str) -> bool:
    """True if ``name`` can only be a local path (a hub id is ``name`` or ``org/name``)."""
    return is_local(name) or Path(name).suffix.lower() in FILE_TYPES


def dataset_error(
    source: str,
    config: str | None,
    split: str,
    err: Exception,
    columns: str,
    setting: str = "",
    error: type[DatasetUnavailableError] = DatasetUnavailableError,
) -> DatasetUnavailableError:
    """The error (of type ``error``) for a dataset that cannot be read; ``columns`` says what the records
    must hold, ``setting`` which option names the dataset."""
    cfg = f" (config {config!r})" if config else ""
    local = f"/path/to/local/{Path(source.rstrip('/')).name or 'dataset'}"
    local_path = looks_local(source) or Path(source).expanduser().exists()
    if isinstance(err, FileNotFoundError) and local_path:
        hint = "Point it at an existing local file or folder, or at a Hugging Face hub dataset name"
    elif local_path:  # it exists here: no download helps
        hint = "The local file or folder exists but could not be read as such a dataset (is it empty?)"
    else:
        hint = (
            f"Without network access, download the dataset once elsewhere "
            f"(`{download_command(source, 'dataset')}`) and pass the local copy"
        )
    where = f":\n    {setting}: {local}" if setting else "."
    return error(
        f"cannot read dataset {source!r}{cfg}, split {split!r}: {type(err).__name__}: "
        f"{str(err) or 'no records found (an empty file?)'}\n"
        f"A local dataset is a folder or a file ({', '.join(FILE_TYPES)}) with {columns}. {hint}{where}"
    )


def open_dataset(
    source: str | Path,
    config: str | None = None,
    split: str = "train",
    *,
    streaming: bool = False,
    columns: str = "a 'text' column",
    setting: str = "",
    cache_dir: str | Path | None = None,
    error: type[DatasetUnavailableError] = DatasetUnavailableError,
) -> Any:
    """A ``datasets`` split from a hub name, a local folder (a snapshot of a hub repository) or a local
    file (the whole file is the split; ``train[:1000]`` still slices it).

    ``columns`` and ``setting`` go into the error message (what the records must hold, which option names
    the dataset).

    Raises:
        DatasetUnavailableError: (or ``error``, a subclass) the dataset cannot be read; the message says
            how to use a local copy.
    """
    from datasets import load_dataset

    source = str(source)
    path = Path(source).expanduser()
    cache = None if cache_dir is None else str(cache_dir)
    try:
        if path.is_file():
            builder = FILE_TYPES.get(path.suffix.lower())
            if builder is None:
                raise ValueError(
                    f"unsupported file type {path.suffix!r} (supported: {', '.join(FILE_TYPES)})"
                )
            split_name = split.split("[")[0]  # `train[:1000]` slices the split called `train`
            return load_dataset(
                builder, data_files={split_name: str(path)}, split=split, streaming=streaming, cache_dir=cache
            )
        if path.is_dir():
            return load_dataset(str(path), config, split=split, streaming=streaming, cache_dir=cache)
        if looks_local(source):
            raise FileNotFoundError(f"local path {str(path.resolve())!r} does not exist")
        check_hub(source, "the dataset", None, "dataset", setting)
        return load_dataset(source, config, split=split, streaming=streaming, cache_dir=cache)
    except Exception as err:  # re-raised with instructions, never swallowed
        raise dataset_error(source, config, split, err, columns, setting, error) from err


def tokenize_documents(tokenizer: Any, texts: Iterable[str]) -> Iterator[list[int]]:
    """Token ids of each document, without special tokens, tokenized in batches."""
    texts = iter(texts)
    while batch := list(itertools.islice(texts, _TOKENIZE_BATCH)):
        yield from tokenizer(batch, add_special_tokens=False)["input_ids"]


def pack_documents(
    token_lists: Iterable[list[int]], ctx_len: int, bos_id: int, eos_id: int
) -> Iterator[list[int]]:
    """Pack tokenized documents into rows of ``ctx_len`` tokens: ``[bos] + ctx_len - 1`` stream tokens.

    The stream is every document followed by ``eos_id``. Rows cut it into consecutive pieces of
    ``ctx_len - 1`` tokens, so a long document continues in the next row (after its BOS). Empty
    documents are skipped; the incomplete last row (when the documents run out) is not yielded.
    """
    if ctx_len < 2:
        raise ValueError(f"ctx_len must be at least 2 (BOS + one token), got {ctx_len}")
    body = ctx_len - 1
    buf: list[int] = []
    for toks in token_lists:
        if not toks:
            continue
        buf.extend(toks)
        buf.append(eos_id)
        if len(buf) < body:
            continue
        n_full = len(buf) // body
        for i in range(n_full):
            yield [bos_id, *buf[i * body : (i + 1) * body]]
        buf = buf[n_full * body :]


def _too_short(n_tokens: int, seq_len: int) -> ValueError:
    return ValueError(f"the corpus has {n_tokens} tokens: not one row of {seq_len}")


def pack_rows(tokenizer: Any, texts: Sequence[str], seq_len: int, n_rows: int, seed: int = 42) -> Tensor:
    """This project's packing (:func:`pack_documents`) as a tensor ``[n, seq_len]``: the rows shuffled
    with ``seed`` and the first ``n_rows`` kept. Unlike SAEBench's packing (:func:`pack_rows_saebench`) no
    token is overwritten and no BOS appears inside a row. ``ValueError`` if not one row fits."""
    bos, eos, _ = special_ids(tokenizer)
    token_lists = list(tokenize_documents(tokenizer, texts))
    rows = list(pack_documents(token_lists, seq_len, bos, eos))
    if not rows:
        raise _too_short(sum(len(t) + 1 for t in token_lists if t), seq_len)
    out = torch.tensor(rows, dtype=torch.long)  # [n, seq_len]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
    return out[order[:n_rows]]


def pack_rows_saebench(
    tokenizer: Any, texts: Sequence[str], seq_len: int, n_rows: int, generator: torch.Generator
) -> Tensor:
    """SAEBench's ``tokenize_and_concat_dataset`` followed by its shuffle: rows ``[n, seq_len]``.

    The documents are joined with the EOS *text*, the string is cut into 20 equal character chunks, each
    chunk is tokenized as the tokenizer does by default (Gemma's adds a BOS to each), every PAD id is
    removed, the stream is cut into rows of ``seq_len`` (the incomplete last row is dropped), position 0 of
    every row is overwritten with BOS (its token is lost), the rows are shuffled with ``generator``
    (``torch.randperm``) and the first ``n_rows`` kept. ``ValueError`` if not one row fits.
    """
    if tokenizer.eos_token is None or tokenizer.bos_token_id is None:
        raise ValueError("SAEBench's packing needs a tokenizer with both an EOS and a BOS token")
    full = tokenizer.eos_token.join(texts)
    n_chunks = 20
    length = (len(full) - 1) // n_chunks + 1
    stream: list[int] = []
    for i in range(n_chunks):
        stream.extend(tokenizer(full[i * length : (i + 1) * length])["input_ids"])
    if tokenizer.pad_token_id is not None:
        stream = [t for t in stream if t != tokenizer.pad_token_id]
    n_full = len(stream) // seq_len
    if n_full == 0:
        raise _too_short(len(stream), seq_len)
    rows = torch.tensor(stream[: n_full * seq_len], dtype=torch.long).view(n_full, seq_len)
    rows[:, 0] = tokenizer.bos_token_id
    return rows[torch.randperm(n_full, generator=generator)[:n_rows]]
